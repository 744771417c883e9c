//! The server killed with SIGKILL and started again on the same state file:
//! every client learns at once that its locks are gone, and every token after
//! the restart is above every token before it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{PATIENCE, Peer, ServerProcess, temp_dir};
use pklock::client::{Client, ClientOptions, LockOptions, LossReason};
use serde_json::json;

#[test]
fn after_sigkill_every_client_knows_and_tokens_go_on_above() {
    let dir = temp_dir("restart");
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nstate_file = \"{}\"\n",
        dir.join("tokens").display()
    );
    // A ceiling well ahead of the clock, as after the clock stepped back:
    // only the state file keeps tokens above it.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        + 1_000_000_000_000;
    std::fs::write(dir.join("tokens"), format!("{ahead}\n")).unwrap();
    let mut server = ServerProcess::start(&dir, &config);
    let addr = server.addr.to_string();

    // Holders, shared holders and a waiter through the client library...
    let clients: Vec<Client> = (0..6)
        .map(|i| Client::connect(&addr, &ClientOptions::named(format!("c{i}"))).unwrap())
        .collect();
    let mut tokens = Vec::new();
    let mut guards = Vec::new();
    for (i, client) in clients.iter().enumerate().take(3) {
        let guard = client
            .lock(&format!("own/{i}"), &LockOptions::exclusive())
            .unwrap();
        tokens.push(guard.token());
        guards.push(guard);
    }
    for client in &clients[3..5] {
        let guard = client.lock("shared", &LockOptions::shared()).unwrap();
        tokens.push(guard.token());
        guards.push(guard);
    }
    let waiting = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let client = Client::connect(&addr, &ClientOptions::named("waiter")).unwrap();
            client
                .lock("own/0", &LockOptions::exclusive())
                .map(|g| g.token())
        })
    };
    // ...a raw v1-style peer, and a pklock run.
    let mut raw = Peer::connect(server.addr);
    tokens.push(raw.take("raw", 1));
    let mut run = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["--server", &addr, "run", "cli", "--", "sleep", "60"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::eventually("everyone in place", || {
        let s = Peer::connect(server.addr).rpc("stats", json!(1), json!({}));
        s["locksHeld"] == 7 && s["waiters"] == 1
    });
    tokens.push(
        Peer::connect(server.addr).rpc("status", json!(1), json!({"lockName": "cli"}))["locks"][0]
            ["holders"][0]["token"]
            .as_u64()
            .unwrap(),
    );

    server.signal("KILL");
    server.wait_exit();

    for guard in &guards {
        let reason = guard
            .wait_lost(Some(PATIENCE))
            .expect("the guard learns of the loss");
        assert!(matches!(reason, LossReason::Closed(_)), "{reason:?}");
        assert!(!guard.is_held());
    }
    assert!(
        waiting.join().unwrap().is_err(),
        "the waiter's request fails"
    );
    assert!(raw.expect_closed().is_empty());
    let status = common::wait_exit(&mut run, PATIENCE).expect("pklock run exits");
    assert_eq!(status.code(), Some(75));

    let server = ServerProcess::start(&dir, &config);
    let highest = *tokens.iter().max().unwrap();
    let mut fresh = Peer::connect(server.addr);
    for i in 0..5 {
        let token = fresh.take(&format!("own/{i}"), i);
        assert!(
            token > highest,
            "token {token} after the restart, {highest} before"
        );
    }
    drop(clients);
    std::thread::sleep(Duration::from_millis(10));
}
