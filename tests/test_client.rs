//! The `test_client` binary behaves like the original testClient.php.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{PATIENCE, TestServer};

/// Starts test_client and sends each stdout line to `events` with `label`.
fn spawn(
    label: &'static str,
    port: u16,
    args: &[&str],
    events: &mpsc::Sender<(&'static str, String, Instant)>,
) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start test_client");
    let stdout = child.stdout.take().unwrap();
    let events = events.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = events.send((label, line, Instant::now()));
        }
    });
    child
}

#[test]
fn two_test_clients_hand_the_lock_over_in_turn() {
    let server = TestServer::start();
    let port = server.addr.port();
    let (tx, rx) = mpsc::channel();
    let args = ["--hold", "1s", "--linger", "200ms"];
    let mut first = spawn("first", port, &args, &tx);
    let (who, line, first_got) = rx.recv_timeout(PATIENCE).unwrap();
    assert_eq!((who, line.as_str()), ("first", "Got lock"));
    let mut second = spawn("second", port, &args, &tx);
    let mut seen = Vec::new();
    let mut second_got = None;
    while seen.len() < 3 {
        let (who, line, at) = rx.recv_timeout(PATIENCE).expect("more output");
        if (who, line.as_str()) == ("second", "Got lock") {
            second_got = Some(at);
        }
        seen.push(format!("{who}: {line}"));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "first: Offering to unlock",
            "second: Got lock",
            "second: Offering to unlock"
        ]
    );
    // The second one waited out the first one's one-second hold.
    assert!(second_got.unwrap() - first_got >= Duration::from_millis(900));
    assert!(first.wait().unwrap().success());
    assert!(second.wait().unwrap().success());
}

#[test]
fn test_client_that_waits_too_long_says_so_and_exits_0() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("test", 1);
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args(["--port", &server.addr.port().to_string(), "--wait", "300ms"])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "Did not get lock\n"
    );
}

#[test]
fn test_client_takes_the_lock_it_is_told() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("test", 1);
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args([
            "--port",
            &server.addr.port().to_string(),
            "--lock",
            "other",
            "--hold",
            "0",
            "--linger",
            "0",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "Got lock\nOffering to unlock\n"
    );
}

#[test]
fn test_client_without_a_server_fails_with_a_hint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect") && stderr.contains("cargo run --release --bin server"),
        "{stderr}"
    );
}

#[test]
fn test_client_says_so_when_the_server_goes_away_while_it_holds() {
    let server = TestServer::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args([
            "--port",
            &server.addr.port().to_string(),
            "--host",
            "127.0.0.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "Got lock\n");
    server.stop().unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(75));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("lost the lock"), "{stderr}");
}

#[test]
fn test_client_takes_an_ipv6_host_in_brackets() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        common::skip("ipv6", "this machine has no IPv6 loopback (::1)");
        return;
    }
    let server = TestServer::with(|c| c.listen = vec!["[::1]:0".parse().unwrap()]);
    for host in ["[::1]", "::1"] {
        let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
            .args(["--host", host, "--port", &server.addr.port().to_string()])
            .args(["--hold", "0", "--linger", "0"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stdout.starts_with("Got lock"),
            "{host}: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn test_client_takes_a_server_list_from_the_flag_or_the_environment() {
    let server = TestServer::start();
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let list = format!("{dead},{}", server.addr);
    let from_flag = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .env_remove("PKLOCK_SERVER")
        .args(["--server", &list, "--hold", "0", "--linger", "0"])
        .output()
        .unwrap();
    let from_environment = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .env("PKLOCK_SERVER", &list)
        .args(["--hold", "0", "--linger", "0"])
        .output()
        .unwrap();
    for output in [from_flag, from_environment] {
        assert!(output.status.success(), "{output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "Got lock\nOffering to unlock\n"
        );
    }
    // --host and --port still mean what they did, whatever PKLOCK_SERVER says.
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .env("PKLOCK_SERVER", dead.to_string())
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &server.addr.port().to_string(),
        ])
        .args(["--hold", "0", "--linger", "0"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
}

#[test]
fn test_client_refuses_a_bad_server_list_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .env_remove("PKLOCK_SERVER")
        .args(["--server", "127.0.0.1:1,localhost"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`localhost` (in `127.0.0.1:1,localhost`) is not HOST:PORT"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .env("PKLOCK_SERVER", "127.0.0.1:1,,127.0.0.1:2")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("PKLOCK_SERVER: `127.0.0.1:1,,127.0.0.1:2` has an empty address"),
        "{stderr}"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_test_client"))
        .args(["--server", "127.0.0.1:1", "--port", "2"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "--server with --port");
}
