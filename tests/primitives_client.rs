//! Semaphores, multi-locks and deadlocks from the library and from
//! `pklock`, against a real server, and across a server restart.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use common::{PATIENCE, Peer, TestServer, eventually, stats, temp_dir};
use pklock::client::{Client, ClientOptions, Error, LockOptions};
use pklock::lock_table::Mode;
use serde_json::{Value, json};

fn connect(server: &TestServer, name: &str) -> Client {
    Client::connect(server.addr.to_string(), &ClientOptions::named(name)).expect("connect")
}

fn status(addr: std::net::SocketAddr, name: &str) -> Value {
    let result = Peer::connect(addr).rpc("status", json!("s"), json!({"lockName": name}));
    result["locks"][0].clone()
}

fn pklock(server: &TestServer) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pklock"));
    command.env("PKLOCK_SERVER", server.addr.to_string());
    command
}

#[test]
fn the_library_is_told_of_a_deadlock_with_the_cycle() {
    let server = TestServer::start();
    let a = Arc::new(connect(&server, "job A"));
    let b = connect(&server, "job B");
    let _x = a.lock("x", &LockOptions::exclusive()).unwrap();
    let y = b.lock("y", &LockOptions::exclusive()).unwrap();
    let (tx, granted) = mpsc::channel();
    {
        let a = Arc::clone(&a);
        std::thread::spawn(move || {
            let _ = tx.send(a.lock("y", &LockOptions::exclusive()).map(|g| g.token()));
        });
    }
    eventually("A waits for y", || stats(server.addr)["waiters"] == 1);
    match b.lock("x", &LockOptions::exclusive()) {
        Err(Error::Deadlock { cycle }) => {
            let steps: Vec<(&str, &str)> = cycle
                .iter()
                .map(|s| (s.client.as_str(), s.lock_name.as_str()))
                .collect();
            assert_eq!(steps, [("job B", "x"), ("job A", "y")]);
            let said = Error::Deadlock { cycle }.to_string();
            assert!(said.contains("deadlock") && !said.contains('\n'), "{said}");
        }
        other => panic!("expected a deadlock, got {other:?}"),
    }
    // B gives way; A gets y.
    drop(y);
    let token = granted.recv_timeout(PATIENCE).expect("answered");
    assert!(token.is_ok(), "{token:?}");
}

#[test]
fn library_semaphore_permits_and_multi_lock_guards() {
    let server = TestServer::start();
    let clients: Vec<Client> = (0..3).map(|i| connect(&server, &format!("w{i}"))).collect();
    let pool = LockOptions::semaphore(2);
    let first = clients[0].lock("pool", &pool).unwrap();
    let second = clients[1].lock("pool", &pool).unwrap();
    assert!(second.token() > first.token());
    let try_once = pool.wait(Duration::ZERO);
    assert!(matches!(
        clients[2].lock("pool", &try_once),
        Err(Error::NotGranted)
    ));
    match clients[2].lock("pool", &LockOptions::semaphore(3)) {
        Err(Error::PermitsMismatch { permits, .. }) => assert_eq!(permits, 2),
        other => panic!("expected the permits in force, got {other:?}"),
    }
    drop(first);
    let third = clients[2].lock("pool", &try_once).unwrap();
    assert_eq!(third.take(), Some(1));

    let both = clients[0]
        .lock_all(
            [("a", Mode::Exclusive), ("b", Mode::Shared)],
            &LockOptions::exclusive(),
        )
        .unwrap();
    for name in ["a", "b"] {
        assert_eq!(
            status(server.addr, name)["holders"][0]["token"],
            both.token()
        );
    }
    let try_a = LockOptions::exclusive().wait(Duration::ZERO);
    assert!(matches!(
        clients[1].lock("a", &try_a),
        Err(Error::NotGranted)
    ));
    drop(both);
    eventually("both released", || stats(server.addr)["locks"] == 1);
    clients[1].lock("a", &try_a).unwrap();
}

#[test]
fn pklock_run_keeps_to_the_permits_and_takes_several_names_at_once() {
    let server = TestServer::start();
    let dir = temp_dir("primitives-cli");
    let mut runs = Vec::new();
    for i in 0..3 {
        let marker = dir.join(format!("run{i}"));
        let script = format!("touch {}; sleep 30", marker.display());
        let child = pklock(&server)
            .args(["run", "--permits", "2", "pool", "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .expect("pklock run");
        runs.push((child, marker));
    }
    eventually("two permits held", || stats(server.addr)["locksHeld"] == 2);
    std::thread::sleep(Duration::from_millis(200));
    let running = runs.iter().filter(|(_, marker)| marker.exists()).count();
    assert_eq!(running, 2, "at most 2 of 3 commands run at once");
    let shown = pklock(&server).args(["status"]).output().expect("status");
    let table = String::from_utf8_lossy(&shown.stdout);
    assert!(table.contains("2/2 held"), "{table}");
    common::stop_pklock_runs(runs.iter_mut().map(|(child, _)| child));

    let out = pklock(&server)
        .args([
            "run",
            "a",
            "b",
            "--",
            "sh",
            "-c",
            "echo \"$PKLOCK_NAMES\" $PKLOCK_TOKEN",
        ])
        .output()
        .expect("pklock run a b");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    let mut words = said.split_whitespace();
    assert_eq!(
        (words.next(), words.next()),
        (Some("a"), Some("b")),
        "{said}"
    );
    assert!(
        words.next().is_some_and(|t| t.parse::<u64>().is_ok()),
        "{said}"
    );
}

#[test]
fn semaphore_and_multi_lock_grants_are_reclaimed_across_a_restart() {
    let dir = temp_dir("primitives-restart");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let config = pklock::Config {
        listen: vec![format!("127.0.0.1:{port}").parse().unwrap()],
        state_file: Some(dir.join("tokens")),
        ..pklock::Config::default()
    };
    let server = TestServer::from_config(config.clone());
    let client = connect(&server, "keeper");
    let permit = client
        .lock("pool", &LockOptions::semaphore(3).take(2))
        .unwrap();
    let both = client
        .lock_all(["a", "b"], &LockOptions::exclusive())
        .unwrap();
    server.stop().unwrap();
    let server = TestServer::from_config(config);
    eventually("reclaimed", || stats(server.addr)["locksHeld"] == 3);
    let pool = status(server.addr, "pool");
    assert_eq!(pool["permits"], 3);
    assert_eq!(pool["holders"][0]["take"], 2);
    assert_eq!(pool["holders"][0]["token"], permit.token());
    for name in ["a", "b"] {
        assert_eq!(
            status(server.addr, name)["holders"][0]["token"],
            both.token()
        );
    }
    assert!(permit.is_held() && both.is_held());
    // The reclaimed permits count: only one is left.
    let mut other = Peer::connect(server.addr);
    let result = other.rpc(
        "lock",
        json!(1),
        json!({"lockName": "pool", "permits": 3, "take": 2, "timeoutMs": 0}),
    );
    assert_eq!(result["status"], "timeout");
}

#[test]
fn nested_pklock_runs_in_opposite_orders_end_in_a_deadlock_answer_not_a_hang() {
    let server = TestServer::start();
    let dir = temp_dir("primitives-nested");
    let pklock_bin = env!("CARGO_BIN_EXE_pklock");
    let (go_first, go_second) = (dir.join("go-first"), dir.join("go-second"));
    // Each outer run holds its lock, then its command asks for the other.
    let nested = |inner: &str, wait_for: &std::path::Path| {
        format!(
            "while [ ! -e {} ]; do sleep 0.02; done; {pklock_bin} run {inner} -- true",
            wait_for.display()
        )
    };
    let first_ready = dir.join("first");
    let first_script = format!(
        "touch {}; {}",
        first_ready.display(),
        nested("y", &go_first)
    );
    let second_script = nested("x", &go_second);
    let mut first = pklock(&server)
        .args(["run", "x", "--", "sh", "-c", &first_script])
        .stderr(Stdio::piped())
        .spawn()
        .expect("first run");
    eventually("first holds x", || first_ready.exists());
    let mut second = pklock(&server)
        .args(["run", "y", "--", "sh", "-c", &second_script])
        .stderr(Stdio::piped())
        .spawn()
        .expect("second run");
    eventually("both hold", || stats(server.addr)["locksHeld"] == 2);
    // The first's inner run waits for y first; then the second's asks for x.
    std::fs::write(&go_first, "").unwrap();
    eventually("the first's inner run waits", || {
        stats(server.addr)["waiters"] == 1
    });
    std::fs::write(&go_second, "").unwrap();
    let second_status = common::wait_exit(&mut second, PATIENCE).expect("the second ends");
    let mut said = String::new();
    std::io::Read::read_to_string(second.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert_eq!(second_status.code(), Some(35), "{said}");
    assert!(said.contains("deadlock"), "{said}");
    // The second gave way: the first's inner run got y, and all ended well.
    let first_status = common::wait_exit(&mut first, PATIENCE).expect("the first ends");
    assert_eq!(first_status.code(), Some(0));
    assert_eq!(stats(server.addr)["locks"], 0);
}
