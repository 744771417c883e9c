//! Start, stop and restart: graceful shutdown, signals, fencing tokens
//! across restarts, and clear errors for a port in use or a bad state file.

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Peer, ServerProcess, TestServer, temp_dir};
use pklock::{Config, Server};
use serde_json::json;

fn config_with_state(state: &Path) -> Config {
    Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        state_file: Some(state.to_path_buf()),
        restart_grace_ms: Some(0),
        ..Config::default()
    }
}

fn stored_ceiling(state: &Path) -> u64 {
    let text = std::fs::read_to_string(state).unwrap();
    text.lines().next().unwrap().parse().unwrap()
}

#[test]
fn shutdown_closes_every_connection_and_saves_the_token_state() {
    let dir = temp_dir("shutdown");
    let state = dir.join("tokens");
    let server = TestServer::from_config(config_with_state(&state));
    let mut holder = server.peer();
    let token = holder.take("x", 1);
    let mut waiter = server.peer();
    waiter.ask("x", 2);
    server.stop().expect("clean stop");
    assert!(holder.expect_closed().is_empty());
    assert!(waiter.expect_closed().is_empty());
    assert_eq!(
        stored_ceiling(&state),
        token + 1,
        "the ceiling is the next token"
    );
    let text = std::fs::read_to_string(&state).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[1], "stopped-holding 1", "the lock held at the stop");
    let held: serde_json::Value = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(
        held,
        json!({"lockName": "x", "mode": "exclusive", "token": token}),
        "listed for its holder to reclaim; the waiter is not"
    );
}

#[test]
fn tokens_after_a_restart_are_above_every_token_before() {
    let dir = temp_dir("restart");
    let state = dir.join("tokens");
    let server = TestServer::from_config(config_with_state(&state));
    let mut peer = server.peer();
    let before: Vec<u64> = (0..5).map(|i| peer.take(&format!("r{i}"), i)).collect();
    server.stop().unwrap();
    let server = TestServer::from_config(config_with_state(&state));
    let after = server.peer().take("r0", 1);
    assert!(
        before.iter().all(|&t| after > t),
        "{after} after {before:?}"
    );
}

#[test]
fn a_ceiling_ahead_of_the_clock_keeps_tokens_increasing() {
    // What a restart sees after the wall clock stepped back: the stored
    // ceiling is far above the clock, and tokens must continue above it.
    let dir = temp_dir("clock-step");
    let state = dir.join("tokens");
    let ahead = 9_000_000_000_000_000u64;
    std::fs::write(&state, format!("{ahead}\n")).unwrap();
    let server = TestServer::from_config(config_with_state(&state));
    let token = server.peer().take("c", 1);
    assert!(
        token >= ahead,
        "token {token} below the stored ceiling {ahead}"
    );
    assert!(
        stored_ceiling(&state) > token,
        "reserved on disk before it was sent"
    );
}

#[test]
fn a_corrupt_state_file_stops_the_start_with_its_name() {
    let dir = temp_dir("corrupt");
    let state = dir.join("tokens");
    std::fs::write(&state, "garbage").unwrap();
    let error = Server::bind(config_with_state(&state))
        .err()
        .expect("refused");
    let message = error.to_string();
    assert!(
        message.contains(&state.display().to_string()) && message.contains("garbage"),
        "{message}"
    );
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        listen: vec![taken.local_addr().unwrap()],
        ..Config::default()
    };
    let message = Server::bind(config).err().expect("refused").to_string();
    assert!(message.contains("already in use"), "{message}");
    assert!(
        message.contains(&taken.local_addr().unwrap().to_string()),
        "{message}"
    );
}

fn binary_config(dir: &Path) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nstate_file = \"{}\"\n",
        dir.join("tokens").display()
    )
}

#[test]
fn sigterm_and_sigint_stop_the_binary_cleanly() {
    for signal in ["TERM", "INT"] {
        let dir = temp_dir(&format!("signal-{signal}"));
        let mut server = ServerProcess::start(&dir, &binary_config(&dir));
        let mut holder = Peer::connect(server.addr);
        let token = holder.take("s", 1);
        server.signal(signal);
        assert!(holder.expect_closed().is_empty());
        assert_eq!(server.wait_exit(), Some(0), "SIG{signal}");
        assert_eq!(stored_ceiling(&dir.join("tokens")), token + 1);
    }
}

#[test]
fn a_killed_server_restarts_above_every_earlier_token() {
    let dir = temp_dir("sigkill");
    let mut server = ServerProcess::start(&dir, &binary_config(&dir));
    let mut holder = Peer::connect(server.addr);
    let before = holder.take("k", 1);
    server.signal("KILL");
    server.wait_exit();
    // The client learns at once that its connection, and so its lock, is gone.
    assert!(holder.expect_closed().is_empty());
    let server = ServerProcess::start(&dir, &binary_config(&dir));
    let after = Peer::connect(server.addr).take("k", 1);
    assert!(after > before, "{after} after {before}");
}

#[test]
fn the_binary_refuses_a_bad_config_naming_key_and_line() {
    let dir = temp_dir("bad-config");
    let path = dir.join("settings.toml");
    std::fs::write(&path, "listen = [\"127.0.0.1:0\"]\nmax_conections = 10\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("max_conections"),
        "{stderr}"
    );
}

#[test]
fn the_binary_reports_a_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = temp_dir("port-in-use");
    let path = dir.join("settings.toml");
    std::fs::write(
        &path,
        format!("listen = [\"{}\"]\n", taken.local_addr().unwrap()),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "off")
        // A fixed port without state_file: the default state file goes here.
        .env("XDG_STATE_HOME", dir.join("xdg-state"))
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
}

#[test]
fn server_keeps_serving_after_many_clients_come_and_go() {
    let server = TestServer::start();
    for i in 0..200 {
        let mut peer = server.peer();
        peer.take("churn", i);
    }
    common::eventually("every lock released", || {
        common::stats(server.addr)["locks"] == 0
    });
    assert_eq!(common::stats(server.addr)["grants"], 200);
    assert_eq!(
        Peer::connect(server.addr).rpc("ping", json!(0), json!({})),
        json!({"status": "ok"})
    );
}

#[test]
fn the_binary_tells_systemd_it_is_ready_once_listening() {
    let dir = temp_dir("notify");
    let socket_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let server = ServerProcess::start_with(
        &dir,
        "listen = [\"127.0.0.1:0\"]\n",
        None,
        &[("NOTIFY_SOCKET", &socket_path)],
    );
    let mut message = [0u8; 256];
    let n = notify.recv(&mut message).expect("a notification");
    assert_eq!(&message[..n], b"READY=1\n");
    // Ready means connections are served.
    assert_eq!(
        Peer::connect(server.addr).rpc("ping", json!(1), json!({})),
        json!({"status": "ok"})
    );
}

#[test]
fn check_config_validates_and_exits() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/settings.example.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .args(["--check-config", example])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));
    let dir = temp_dir("check-config");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[keepalive]\nprobes = 0\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("keepalive.probes"),
        "{stderr}"
    );
}

#[test]
fn check_config_refuses_a_grant_key_others_can_read() {
    let dir = temp_dir("check-config-key");
    let state = dir.join("tokens");
    let config = dir.join("settings.toml");
    std::fs::write(&config, format!("state_file = \"{}\"\n", state.display())).unwrap();
    let key = dir.join("tokens.key");
    std::fs::write(&key, format!("{}\n", "ab".repeat(32))).unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_server"))
            .arg("--check-config")
            .arg(&config)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let output = check();
    assert_eq!(
        output.status.code(),
        Some(1),
        "the server would refuse to start"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("readable by others") && stderr.contains("tokens.key"),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    assert!(check().status.success());
}

fn with_grace(config: Config, grace_ms: u64) -> Config {
    Config {
        restart_grace_ms: Some(grace_ms),
        ..config
    }
}

#[test]
fn a_clean_stop_holding_nothing_lets_the_next_start_grant_at_once() {
    let dir = temp_dir("grace-clean");
    let state = dir.join("tokens");
    let server = TestServer::from_config(config_with_state(&state));
    let mut peer = server.peer();
    peer.take("a", 1);
    peer.unlock("a");
    server.stop().unwrap();
    // A long grace would apply, but nobody can still believe they hold a lock.
    let server = TestServer::from_config(with_grace(config_with_state(&state), 60_000));
    let result = server
        .peer()
        .rpc("lock", json!(1), json!({"lockName": "a", "timeoutMs": 0}));
    assert_eq!(result["status"], "ok");
}

#[test]
fn a_first_start_without_a_state_file_yet_grants_at_once_and_makes_one() {
    let dir = temp_dir("first-start");
    let state = dir.join("tokens");
    // The default grace (10 s) would apply after a crash; there was no run.
    let mut config = config_with_state(&state);
    config.restart_grace_ms = None;
    let server = TestServer::from_config(config);
    let result = server
        .peer()
        .rpc("lock", json!(1), json!({"lockName": "a", "timeoutMs": 0}));
    assert_eq!(result["status"], "ok", "{result}");
    assert!(state.exists(), "the ceiling is kept from the first start");
    let key = dir.join("tokens.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the grant key is private");
}

#[test]
fn a_restart_after_a_stop_with_locks_held_grants_nothing_during_the_grace() {
    let dir = temp_dir("grace-held");
    let state = dir.join("tokens");
    let server = TestServer::from_config(config_with_state(&state));
    let mut holder = server.peer();
    holder.take("a", 1);
    server.stop().unwrap();
    drop(holder);
    let server = TestServer::from_config(with_grace(config_with_state(&state), 700));
    let mut peer = server.peer();
    let result = peer.rpc("lock", json!(1), json!({"lockName": "a", "timeoutMs": 0}));
    assert_eq!(result["status"], "timeout", "granted during the grace");
    let other = peer.rpc("lock", json!(3), json!({"lockName": "b", "timeoutMs": 0}));
    assert_eq!(other["status"], "ok", "a lock nobody held at the stop");
    peer.ask("a", 2);
    peer.expect_nothing(Duration::from_millis(300));
    let reply = peer.recv();
    assert_eq!(
        (reply["id"].as_u64(), reply["result"]["status"].as_str()),
        (Some(2), Some("ok"))
    );
}

#[test]
fn a_killed_server_restarts_with_the_grace_of_its_release_time() {
    let dir = temp_dir("grace-crash");
    let mut server = ServerProcess::start(&dir, &binary_config(&dir));
    Peer::connect(server.addr).take("a", 1);
    server.signal("KILL");
    server.wait_exit();
    // Without restart_grace_ms the grace is the earliest release time (10 s by default).
    let config = format!(
        "listen = [\"127.0.0.1:0\"]\nstate_file = \"{}\"\n",
        dir.join("tokens").display()
    );
    let mut server = ServerProcess::start(&dir, &config);
    server.wait_for_log("no lock is granted for the first 10000 ms");
    let result =
        Peer::connect(server.addr).rpc("lock", json!(1), json!({"lockName": "a", "timeoutMs": 0}));
    assert_eq!(result["status"], "timeout");
}

#[test]
fn the_server_logs_when_the_restart_grace_ends_and_grants_then() {
    let dir = temp_dir("grace-end");
    let config = "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 700\n";
    let mut server = ServerProcess::start(&dir, config);
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("queued", 1);
    let line = server.wait_for_log("restart grace over");
    assert!(line.contains("1 waiting"), "{line}");
    // The waiter queued during the grace is served at its end.
    assert_eq!(waiter.recv()["result"]["status"], "ok");
}

#[test]
fn tokens_stop_before_2_pow_53_and_the_server_still_restarts() {
    let dir = temp_dir("token-end");
    let state = dir.join("tokens");
    let last = pklock::tokens::MAX_TOKEN - pklock::tokens::RESERVATION - 1;
    std::fs::write(&state, format!("{}\n", last - 1)).unwrap();
    let mut server = ServerProcess::start(&dir, &binary_config(&dir));
    let mut peer = Peer::connect(server.addr);
    assert_eq!(peer.take("a", 1), last - 1);
    assert_eq!(peer.take("b", 2), last);
    let refused = peer.rpc("lock", json!(3), json!({"lockName": "c", "timeoutMs": 300}));
    assert_eq!(refused["status"], "timeout", "{refused}");
    server.wait_for_log("no lock is granted any more");
    server.signal("TERM");
    assert_eq!(server.wait_exit(), Some(0));
    // The state file stayed within what a start accepts.
    let mut server = ServerProcess::start(&dir, &binary_config(&dir));
    let again =
        Peer::connect(server.addr).rpc("lock", json!(1), json!({"lockName": "d", "timeoutMs": 0}));
    assert_eq!(again["status"], "timeout", "{again}");
    server.wait_for_log("no lock is granted any more");
}
