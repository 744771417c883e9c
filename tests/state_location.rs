//! Where the token state file lives when the configuration names none: the
//! server binary run with XDG_STATE_HOME set to a directory of the test's.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{ServerProcess, temp_dir};

/// A port nobody listens on right now (another process could take it
/// before the server does; the tests that use it are quick to start).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn without_state_file_the_state_is_kept_in_xdg_state_home_keyed_by_port() {
    let dir = temp_dir("default-state");
    let port = free_port();
    let state_home = dir.join("xdg-state");
    let server = ServerProcess::start(
        &dir,
        &format!("listen = [\"127.0.0.1:{port}\"]\nrestart_grace_ms = 0\n"),
    );
    let file = state_home.join(format!("pklock/state-{port}"));
    assert!(file.is_file(), "no state file at {}", file.display());
    let mode = std::fs::metadata(state_home.join("pklock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    drop(server);
}

#[test]
fn an_unusable_default_place_stops_the_start_naming_it_and_the_way_out() {
    let dir = temp_dir("default-state-unusable");
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let config = dir.join("settings.toml");
    std::fs::write(
        &config,
        format!("listen = [\"127.0.0.1:{}\"]\n", free_port()),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_server"))
        .arg("--config")
        .arg(&config)
        .env("XDG_STATE_HOME", &not_a_dir)
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&not_a_dir.join("pklock").display().to_string())
            && stderr.contains("state_file = \"\""),
        "{stderr}"
    );
}

#[test]
fn a_fresh_start_on_the_default_state_file_grants_at_once() {
    let dir = temp_dir("default-state-fresh");
    let port = free_port();
    // Only the address: the default state place, the default grace (10 s).
    let config = format!("listen = [\"127.0.0.1:{port}\"]\n");
    let started = std::time::Instant::now();
    let mut server = ServerProcess::start(&dir, &config);
    let mut peer = common::Peer::connect(server.addr);
    let result = peer.rpc(
        "lock",
        serde_json::json!(1),
        serde_json::json!({"lockName": "first", "timeoutMs": 0}),
    );
    let took = started.elapsed();
    assert_eq!(result["status"], "ok", "{result}");
    eprintln!("first grant {took:?} after starting the server");
    // A grace would hold it for 10 s.
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    drop(peer);
    // The next start is no first start: the file says how this run ended.
    server.signal("KILL");
    server.wait_exit();
    let server = ServerProcess::start(&dir, &config);
    let result = common::Peer::connect(server.addr).rpc(
        "lock",
        serde_json::json!(1),
        serde_json::json!({"lockName": "first", "timeoutMs": 0}),
    );
    assert_eq!(result["status"], "timeout", "granted in a crash's grace");
}
