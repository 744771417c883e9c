//! Reloading the configuration with SIGHUP: what applies at once, what a
//! bad file changes (nothing), and that no admitted peer loses a lock. The
//! server binary as a process, real sockets.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, eventually, temp_dir};
use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};

/// Rewrites the file the server was started with, for the next SIGHUP.
fn rewrite(dir: &Path, text: &str) {
    std::fs::write(dir.join("settings.toml"), text).unwrap();
}

/// A connection from 127.0.0.2, another loopback address, so that an
/// `allowed` list can admit 127.0.0.1 and not it.
fn peer_from_127_0_0_2(addr: SocketAddr) -> Peer {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    Peer { stream }
}

/// `server --check-config` on `path`: its summary lines, without the
/// first (`... valid`) and the notes.
fn check_config_summary(path: &Path, state_home: &Path) -> Vec<String> {
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--check-config")
        .arg(path)
        .env("XDG_STATE_HOME", state_home)
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|line| !line.starts_with("note:"))
        .map(String::from)
        .collect()
}

/// Sends SIGHUP and waits until the server says the reload is done, then
/// returns the summary it logs of what is now in effect, checked line by
/// line against what `--check-config` says of the same file.
fn reload_and_compare(server: &mut ServerProcess, dir: &Path) {
    let expected = check_config_summary(&dir.join("settings.toml"), &dir.join("xdg-state"));
    server.signal("HUP");
    server.wait_for_log("configuration reloaded");
    for line in &expected {
        server.wait_for_log_ending(&format!("in effect: {line}"));
    }
}

fn ping_ok(peer: &mut Peer) -> bool {
    peer.rpc("ping", json!("p"), json!({})) == json!({"status": "ok"})
}

#[test]
fn reload_applies_allowed_and_limits_and_drops_no_lock_of_an_admitted_peer() {
    let dir = temp_dir("reload-live");
    let before = "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nallowed = [\"127.0.0.0/8\"]\n\
                  max_connections = 10\nmax_lock_entries = 10\n";
    let mut server = ServerProcess::start(&dir, before);

    let mut holder = Peer::connect(server.addr);
    let token = holder.take("kept", 1);
    holder.take("second", 2);
    let mut waiter_kept = Peer::connect(server.addr);
    waiter_kept.ask("kept", 3);
    let mut outsider = peer_from_127_0_0_2(server.addr);
    let outsider_token = outsider.take("moved", 4);
    let mut waiter_moved = Peer::connect(server.addr);
    waiter_moved.ask("moved", 5);
    // 5 entries in the table, 4 connections.
    assert!(ping_ok(&mut holder));

    // Limits below what is in use: nothing held or queued may go.
    rewrite(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nallowed = [\"127.0.0.1\"]\n\
         max_connections = 2\nmax_lock_entries = 3\n",
    );
    reload_and_compare(&mut server, &dir);

    // The peer the new list refuses is told so and closed; its lock moves on.
    let last = outsider.expect_closed();
    assert_eq!(last.len(), 1, "{last:?}");
    assert_eq!(last[0]["error"], "denied", "{last:?}");
    assert!(
        last[0]["detail"].as_str().unwrap().contains("127.0.0.2"),
        "{last:?}"
    );
    let granted = waiter_moved.recv();
    assert_eq!(granted["id"], 5, "{granted}");
    assert_eq!(granted["result"]["status"], "ok", "{granted}");
    assert!(granted["result"]["token"].as_u64().unwrap() > outsider_token);

    // The admitted holder keeps its locks, same token, connection answering;
    // the waiter still waits.
    assert!(ping_ok(&mut holder));
    assert_eq!(holder.take("kept", 6), token);
    waiter_kept.expect_nothing(Duration::from_millis(200));

    // 3 connections open, over the new max_connections of 2: refused.
    let mut extra = Peer::connect(server.addr);
    assert_eq!(
        extra.expect_closed(),
        vec![json!({"error": "tooManyConnections", "limit": 2})]
    );
    // 4 entries, over the new max_lock_entries of 3: a new request is refused.
    let refused = holder.lock("third", 7);
    assert_eq!(refused["status"], "tooMany", "{refused}");

    // Once use falls under the new limits, requests are served again.
    assert_eq!(holder.unlock("kept"), "ok");
    let granted = waiter_kept.recv();
    assert_eq!(granted["result"]["status"], "ok", "{granted}");
    assert_eq!(holder.unlock("second"), "ok");
    assert_eq!(holder.lock("third", 8)["status"], "ok");
}

#[test]
fn an_invalid_file_on_reload_changes_nothing_and_is_reported_as_check_config_does() {
    let dir = temp_dir("reload-invalid");
    let mut server = ServerProcess::start(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nmax_connections = 2\n",
    );
    let mut holder = Peer::connect(server.addr);
    let token = holder.take("kept", 1);

    // A bad value in a live key, and a change to a restart-only one.
    rewrite(&dir, "listen = [\"127.0.0.1:1\"]\nmax_connections = 0\n");
    let check = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--check-config")
        .arg(dir.join("settings.toml"))
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(1));
    let stderr = String::from_utf8(check.stderr).unwrap();
    let message = stderr.trim().strip_prefix("server: ").unwrap().to_string();
    assert!(message.contains("max_connections"), "{message}");
    server.signal("HUP");
    let logged = server.wait_for_log("SIGHUP: config ");
    assert!(logged.contains(&message), "{logged} vs {message}");
    assert!(logged.contains("ERROR"), "{logged}");

    // Still serving, on the old limits: max_connections is still 2.
    assert!(ping_ok(&mut holder));
    assert_eq!(holder.take("kept", 2), token);
    let mut second = Peer::connect(server.addr);
    assert_eq!(second.lock("other", 3)["status"], "ok");
    let mut third = Peer::connect(server.addr);
    assert_eq!(
        third.expect_closed(),
        vec![json!({"error": "tooManyConnections", "limit": 2})]
    );
}

/// A connection with a tiny receive buffer that takes `lock`, then sends
/// pings with long ids and never reads again: its replies pile up past
/// `max_output_bytes` and it stalls. Returns it (keep it open) and its token.
fn stalled_holder(addr: SocketAddr, lock: &str) -> (TcpStream, u64) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut peer = Peer {
        stream: stream.try_clone().unwrap(),
    };
    let token = peer.take(lock, 1);
    let mut writer = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let id = "i".repeat(250);
        let ping = json!({"command": "ping", "id": id}).to_string();
        let mut bytes = Vec::new();
        for _ in 0..2000 {
            pklock::frame::encode(ping.as_bytes(), &mut bytes).unwrap();
        }
        // Blocks once the server stops reading; ends when the connection does.
        let _ = writer.write_all(&bytes);
    });
    (stream, token)
}

fn holder_token(watcher: &mut Peer, lock: &str) -> Value {
    let status = watcher.rpc("status", json!("s"), json!({"lockName": lock}));
    status["locks"][0]["holders"][0]["token"].clone()
}

#[test]
fn keepalive_changed_by_reload_applies_to_new_connections_only() {
    let dir = temp_dir("reload-keepalive");
    // Earliest release 8 s before the reload, 1 s after it.
    let keepalive = |probes: u32, user_timeout_ms: u64| {
        format!(
            "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nmax_output_bytes = 4096\n\
             [keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = {probes}\n\
             user_timeout_ms = {user_timeout_ms}\n"
        )
    };
    let mut server = ServerProcess::start(&dir, &keepalive(8, 8000));
    let mut old = Peer::connect(server.addr);
    let old_hello = old.rpc("hello", json!("h"), json!({"client": "old"}));
    assert_eq!(old_hello["earliestReleaseMs"], 8000, "{old_hello}");
    let (_old_stalled, old_token) = stalled_holder(server.addr, "old-lock");

    rewrite(&dir, &keepalive(1, 1000));
    reload_and_compare(&mut server, &dir);

    // hello tells each connection the values its socket was set up with.
    let again = old.rpc("hello", json!("h"), json!({"client": "old"}));
    assert_eq!(again["earliestReleaseMs"], 8000, "{again}");
    assert_eq!(again["keepalive"], old_hello["keepalive"], "{again}");
    let mut new = Peer::connect(server.addr);
    let new_hello = new.rpc("hello", json!("h"), json!({"client": "new"}));
    assert_eq!(new_hello["earliestReleaseMs"], 1000, "{new_hello}");
    assert_eq!(new_hello["keepalive"]["userTimeoutMs"], 1000, "{new_hello}");
    assert_eq!(new_hello["keepalive"]["probes"], 1, "{new_hello}");

    // A connection that stops reading is closed after its own earliest
    // release: a new one after 1 s, an old one not before 8 s.
    let started = Instant::now();
    let (_new_stalled, new_token) = stalled_holder(server.addr, "new-lock");
    assert_eq!(holder_token(&mut new, "new-lock"), new_token);
    eventually("the new stalled connection is closed", || {
        holder_token(&mut new, "new-lock").is_null()
    });
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the new connection was closed after {:?}, not after about 1 s",
        started.elapsed()
    );
    assert_eq!(holder_token(&mut new, "old-lock"), old_token);
}

#[test]
fn reload_changes_the_log_level() {
    let dir = temp_dir("reload-log-level");
    let mut server =
        ServerProcess::start(&dir, "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n");
    rewrite(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nlog_level = \"debug\"\n",
    );
    reload_and_compare(&mut server, &dir);
    Peer::connect(server.addr).take("seen", 1);
    let line = server.wait_for_log("granted \"seen\"");
    assert!(line.contains("DEBUG"), "{line}");
}
