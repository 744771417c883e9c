//! Clients given several addresses find the leader: they follow a standby
//! to the leader it names, skip addresses where nothing answers, take a
//! `notLeader` answer as a close (redial, reclaim, send again) and never
//! report it as an error or a loss. The cluster members here are fakes in
//! the test (a standby, and a proxy that turns into one), in front of real
//! servers.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::{PATIENCE, TestServer, temp_dir};
use pklock::client::{Client, ClientOptions, Error, LockOptions, Resumed, StatusFilter};
use pklock::frame;
use serde_json::{Value, json};

/// An address where nothing listens.
fn dead_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// What a real server says to `hello`, for fakes to answer with.
fn hello_of(real: &TestServer) -> Value {
    let mut hello = real.peer().rpc("hello", json!(0), json!({}));
    hello["status"] = "ok".into();
    hello
}

fn reply(stream: &mut TcpStream, message: &Value) -> bool {
    frame::write_blocking(stream, message.to_string().as_bytes()).is_ok()
}

/// A cluster's standby: answers `hello` with its role and the leader it
/// knows of, `ping` and `stats` with ok, and anything else `notLeader`.
struct FakeStandby {
    addr: SocketAddr,
    hellos: Arc<AtomicUsize>,
    /// Every request but hello, ping and stats: none should ever come.
    others: Arc<Mutex<Vec<Value>>>,
}

fn fake_standby(like: &TestServer, leader: Option<String>) -> FakeStandby {
    let mut hello = hello_of(like);
    hello["role"] = "standby".into();
    hello["leader"] = json!(leader);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let standby = FakeStandby {
        addr: listener.local_addr().unwrap(),
        hellos: Arc::default(),
        others: Arc::default(),
    };
    let (hellos, others) = (Arc::clone(&standby.hellos), Arc::clone(&standby.others));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let (hello, leader) = (hello.clone(), leader.clone());
            let (hellos, others) = (Arc::clone(&hellos), Arc::clone(&others));
            std::thread::spawn(move || {
                while let Ok(body) = frame::read_blocking(&mut stream, 1 << 20) {
                    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
                        return;
                    };
                    let id = request["id"].clone();
                    let answer = match request["command"].as_str() {
                        Some("hello") => {
                            hellos.fetch_add(1, Ordering::SeqCst);
                            json!({"id": id, "result": hello})
                        }
                        Some("ping" | "stats") => json!({"id": id, "result": {"status": "ok"}}),
                        _ => {
                            others.lock().unwrap().push(request);
                            json!({"error": "notLeader", "leader": leader, "id": id})
                        }
                    };
                    if !reply(&mut stream, &answer) {
                        return;
                    }
                }
            });
        }
    });
    standby
}

/// A leader in front of `upstream` that steps down without closing: once
/// `standby` is set (by the test, or when `upstream` closes), it answers
/// pings itself and everything else `notLeader` naming `leader`.
struct Proxy {
    addr: SocketAddr,
    standby: Arc<AtomicBool>,
    not_leader_sent: Arc<AtomicUsize>,
}

fn proxy(upstream: SocketAddr, leader: String) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = Proxy {
        addr: listener.local_addr().unwrap(),
        standby: Arc::default(),
        not_leader_sent: Arc::default(),
    };
    let (standby, sent) = (
        Arc::clone(&proxy.standby),
        Arc::clone(&proxy.not_leader_sent),
    );
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(upstream) else {
                continue;
            };
            let (mut to_client, mut from_server) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let went_standby = Arc::clone(&standby);
            std::thread::spawn(move || {
                while let Ok(body) = frame::read_blocking(&mut from_server, 1 << 20) {
                    if frame::write_blocking(&mut to_client, &body).is_err() {
                        return;
                    }
                }
                // The leader went away; its connections stay open here.
                went_standby.store(true, Ordering::SeqCst);
            });
            let (standby, sent, leader) = (Arc::clone(&standby), Arc::clone(&sent), leader.clone());
            std::thread::spawn(move || {
                while let Ok(body) = frame::read_blocking(&mut client, 1 << 20) {
                    if !standby.load(Ordering::SeqCst) {
                        if frame::write_blocking(&mut server, &body).is_err() {
                            return;
                        }
                        continue;
                    }
                    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
                        return;
                    };
                    let id = request["id"].clone();
                    let answer = match request["command"].as_str() {
                        Some("ping") => json!({"id": id, "result": {"status": "ok"}}),
                        _ => {
                            sent.fetch_add(1, Ordering::SeqCst);
                            json!({"error": "notLeader", "leader": leader, "id": id})
                        }
                    };
                    if !reply(&mut client, &answer) {
                        return;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    proxy
}

/// Every resume the client reports, as it comes.
fn resumes(client: &Client) -> mpsc::Receiver<Resumed> {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    client.on_resumed(move |resumed| {
        let _ = tx.lock().unwrap().send(resumed.clone());
    });
    rx
}

#[test]
fn a_standby_leads_the_client_to_the_leader_and_is_sent_nothing_but_hello() {
    let real = TestServer::start();
    let standby = fake_standby(&real, Some(real.addr.to_string()));
    let client = Client::connect(standby.addr.to_string(), &ClientOptions::named("app")).unwrap();
    assert_eq!(client.server(), real.addr.to_string());
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let status = client
        .status(&StatusFilter::Exact("x".into()), None)
        .unwrap();
    assert_eq!(status.locks[0].holders[0].token, guard.token());
    assert_eq!(standby.hellos.load(Ordering::SeqCst), 1);
    assert_eq!(*standby.others.lock().unwrap(), Vec::<Value>::new());
}

#[test]
fn addresses_where_nothing_answers_are_skipped_in_any_form_of_list() {
    let real = TestServer::start();
    let (dead, real_addr) = (dead_address().to_string(), real.addr.to_string());
    let options = ClientOptions::named("app");
    let text = format!("{dead}, {real_addr}");
    let as_slice: &[&str] = &[&dead, &real_addr];
    let as_vec = vec![dead.clone(), real_addr.clone()];
    for client in [
        Client::connect(&text, &options),
        Client::connect(as_slice, &options),
        Client::connect(&as_vec, &options),
        Client::connect([&dead, &real_addr], &options),
    ] {
        let client = client.unwrap();
        assert_eq!(client.server(), real_addr);
        client.lock("x", &LockOptions::exclusive()).unwrap();
    }
}

#[test]
fn a_list_where_nothing_answers_fails_naming_every_address() {
    let (a, b) = (dead_address().to_string(), dead_address().to_string());
    match Client::connect(format!("{a},{b}"), &ClientOptions::named("app")) {
        Err(e @ Error::Connect { .. }) => {
            let message = e.to_string();
            assert!(
                message.starts_with(&format!("cannot connect to {a},{b}: {a}: ")),
                "{message}"
            );
            assert!(message.contains(&format!("; {b}: ")), "{message}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    match Client::connect(format!("{a},,{b}"), &ClientOptions::named("app")) {
        Err(e @ Error::Connect { .. }) => {
            assert!(e.to_string().contains("an empty address"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn standbys_without_a_leader_are_asked_again_until_the_connect_timeout() {
    let real = TestServer::start();
    let standby = fake_standby(&real, None);
    let options = ClientOptions {
        connect_timeout: Duration::from_millis(600),
        ..ClientOptions::named("app")
    };
    let started = Instant::now();
    match Client::connect(standby.addr.to_string(), &options) {
        Err(e @ Error::Connect { .. }) => {
            assert!(e.to_string().contains("no leader"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert!(standby.hellos.load(Ordering::SeqCst) >= 3);
    assert!(standby.others.lock().unwrap().is_empty());
}

#[test]
fn a_not_leader_answer_to_a_lock_sends_it_to_the_leader_named_and_is_no_error() {
    let real = TestServer::start();
    let proxy = proxy(real.addr, real.addr.to_string());
    let client = Client::connect(proxy.addr.to_string(), &ClientOptions::named("app")).unwrap();
    assert_eq!(client.server(), proxy.addr.to_string());
    let resumed = resumes(&client);
    proxy.standby.store(true, Ordering::SeqCst);
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    assert_eq!(proxy.not_leader_sent.load(Ordering::SeqCst), 1);
    assert_eq!(client.server(), real.addr.to_string());
    let resumed = resumed.recv_timeout(PATIENCE).unwrap();
    assert_eq!(
        (resumed.previous.as_str(), resumed.server.as_str()),
        (
            proxy.addr.to_string().as_str(),
            real.addr.to_string().as_str()
        )
    );
    assert!(guard.is_held());
    assert_eq!(client.loss(), None);
    let status = client
        .status(&StatusFilter::Exact("x".into()), None)
        .unwrap();
    assert_eq!(status.locks[0].holders[0].token, guard.token());
}

#[test]
fn a_not_leader_answer_mid_session_moves_held_locks_to_the_new_leader() {
    let dir = temp_dir("not-leader-mid-session");
    let state = dir.join("state");
    let first = TestServer::with(|c| c.state_file = Some(state.clone()));
    let next_addr = dead_address();
    let proxy = proxy(first.addr, next_addr.to_string());
    let client = Client::connect(proxy.addr.to_string(), &ClientOptions::named("app")).unwrap();
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let resumed = resumes(&client);

    // The leader goes; the connection to it stays open and answers
    // notLeader from now on. The next leader takes over its state.
    first.stop().unwrap();
    common::eventually("the proxy to step down", || {
        proxy.standby.load(Ordering::SeqCst)
    });
    let next = TestServer::with(|c| {
        c.listen = vec![next_addr];
        c.state_file = Some(state.clone());
        c.restart_grace_ms = Some(10_000);
    });

    let status = client
        .status(&StatusFilter::Exact("x".into()), None)
        .unwrap();
    assert_eq!(proxy.not_leader_sent.load(Ordering::SeqCst), 1);
    assert_eq!(status.locks[0].holders.len(), 1, "{status:?}");
    assert_eq!(status.locks[0].holders[0].token, guard.token());
    let resumed = resumed.recv_timeout(PATIENCE).unwrap();
    assert_eq!(resumed.reclaimed, ["x"]);
    assert_eq!(resumed.server, next.addr.to_string());
    assert_eq!(client.server(), next.addr.to_string());
    assert!(guard.is_held());
    assert_eq!(client.loss(), None);
    assert_eq!(common::stats(next.addr)["reclaims"], 1);
}

fn pklock(servers: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pklock"));
    command
        .env_remove("PKLOCK_SERVER")
        .args(["--server", servers]);
    command
}

/// The lines a child writes, as they come.
fn lines_of(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `pklock --server SERVERS lock x`, every stream piped.
fn pklock_lock_x(servers: &str) -> std::process::Child {
    pklock(servers)
        .args(["lock", "x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn pklock_lock_skips_a_dead_address_and_holds_the_lock_at_the_next() {
    let real = TestServer::start();
    let mut child = pklock_lock_x(&format!("{},{}", dead_address(), real.addr));
    let stdout = lines_of(child.stdout.take().unwrap());
    let token: u64 = stdout.recv_timeout(PATIENCE).unwrap().parse().unwrap();
    let mut peer = real.peer();
    let status = peer.rpc("status", json!(1), json!({"lockName": "x"}));
    assert_eq!(status["locks"][0]["holders"][0]["token"], token);
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn pklock_server_from_the_environment_takes_a_list() {
    let real = TestServer::start();
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .env("PKLOCK_SERVER", format!("{},{}", dead_address(), real.addr))
        .args(["run", "x", "--", "sh", "-c", "test -n \"$PKLOCK_TOKEN\""])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .env("PKLOCK_SERVER", format!("{},", real.addr))
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has an empty address"), "{stderr}");
}

#[test]
fn a_bad_address_in_a_list_is_a_usage_error_naming_it() {
    for (list, says) in [
        (
            "127.0.0.1:1,localhost",
            "`localhost` (in `127.0.0.1:1,localhost`) is not HOST:PORT",
        ),
        (
            "127.0.0.1:1,,127.0.0.1:2",
            "`127.0.0.1:1,,127.0.0.1:2` has an empty address",
        ),
        ("127.0.0.1:99999,127.0.0.1:1", "`127.0.0.1:99999` (in"),
    ] {
        let output = pklock(list).arg("ping").output().unwrap();
        assert_eq!(output.status.code(), Some(64), "{list}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{list}: {stderr}");
    }
}

#[test]
fn pklock_fails_unavailable_naming_each_dead_address() {
    let (a, b) = (dead_address(), dead_address());
    let output = pklock(&format!("{a},{b}")).arg("ping").output().unwrap();
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{a}: ")) && stderr.contains(&format!("{b}: ")),
        "{stderr}"
    );
}

#[test]
fn pklock_says_which_server_it_moved_to_when_the_leader_changed() {
    let dir = temp_dir("pklock-new-leader");
    let state = dir.join("state");
    let first = TestServer::with(|c| c.state_file = Some(state.clone()));
    let first_addr = first.addr;
    let next_addr = dead_address();
    let standby = fake_standby(&first, Some(next_addr.to_string()));
    let mut child = pklock_lock_x(&format!("{first_addr},{}", standby.addr));
    let stdout = lines_of(child.stdout.take().unwrap());
    let stderr = lines_of(child.stderr.take().unwrap());
    let token: u64 = stdout.recv_timeout(PATIENCE).unwrap().parse().unwrap();

    // The leader steps down closing its connections; the standby names
    // the next one, which is not in pklock's list.
    first.stop().unwrap();
    let next = TestServer::with(|c| {
        c.listen = vec![next_addr];
        c.state_file = Some(state.clone());
        c.restart_grace_ms = Some(10_000);
    });
    let line = stderr.recv_timeout(PATIENCE).unwrap();
    assert!(
        line.starts_with(&format!(
            "pklock: the connection to the server at {first_addr} ended; reconnected to \
             {next_addr} after "
        )) && line.ends_with(" ms and reclaimed \"x\""),
        "{line}"
    );
    let mut peer = next.peer();
    let status = peer.rpc("status", json!(1), json!({"lockName": "x"}));
    assert_eq!(status["locks"][0]["holders"][0]["token"], token);
    assert!(standby.others.lock().unwrap().is_empty());
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.flush();
    drop(stdin);
    assert!(child.wait().unwrap().success());
}
