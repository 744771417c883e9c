//! The client library against a real server: guards, tokens, several
//! requests on one connection, and the lease watchdog.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, TestServer, eventually, stats, temp_dir};
use pklock::client::{Client, ClientOptions, Error, LockOptions, LossReason, Mode, StatusFilter};
use pklock::frame;
use serde_json::json;

/// earliestReleaseMs 2000: a lease of 1 s.
const SHORT_RELEASE: &str = "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 2\nuser_timeout_ms = 2000\n";

fn connect(server: &TestServer, name: &str) -> Client {
    Client::connect(server.addr.to_string(), &ClientOptions::named(name)).expect("connect")
}

#[test]
fn guard_carries_the_token_and_unlocks_on_drop() {
    let server = TestServer::start();
    let client = connect(&server, "app");
    let guard = client.lock("job", &LockOptions::exclusive()).unwrap();
    assert!(guard.is_held());
    let status = client
        .status(&StatusFilter::Exact("job".into()), None)
        .unwrap();
    assert_eq!(status.locks[0].holders[0].token, guard.token());
    assert_eq!(status.locks[0].holders[0].client, "app");

    let mut other = server.peer();
    other.ask("job", 1);
    other.expect_nothing(Duration::from_millis(100));
    let first_token = guard.token();
    drop(guard);
    let reply = other.recv();
    assert_eq!(reply["result"]["status"], "ok");
    assert!(reply["result"]["token"].as_u64().unwrap() > first_token);
}

#[test]
fn unlock_is_confirmed_and_tokens_increase() {
    let server = TestServer::start();
    let client = connect(&server, "app");
    let mut last = 0;
    for _ in 0..5 {
        let guard = client.lock("seq", &LockOptions::exclusive()).unwrap();
        assert!(guard.token() > last);
        last = guard.token();
        guard.unlock().unwrap();
    }
    assert_eq!(client.stats().unwrap().locks, 0);
}

#[test]
fn try_lock_does_not_wait() {
    let server = TestServer::start();
    let holder = connect(&server, "holder");
    let other = connect(&server, "other");
    let guard = holder
        .try_lock("t", Mode::Exclusive)
        .unwrap()
        .expect("free lock granted");
    assert!(other.try_lock("t", Mode::Exclusive).unwrap().is_none());
    let wait = LockOptions::exclusive().wait(Duration::from_millis(100));
    assert!(matches!(other.lock("t", &wait), Err(Error::NotGranted)));
    drop(guard);
    assert!(other.lock("t", &LockOptions::exclusive()).is_ok());
}

#[test]
fn shared_guards_coexist() {
    let server = TestServer::start();
    let a = connect(&server, "a");
    let b = connect(&server, "b");
    let ga = a.lock("s", &LockOptions::shared()).unwrap();
    let gb = b.lock("s", &LockOptions::shared()).unwrap();
    assert_eq!((ga.mode(), gb.mode()), (Mode::Shared, Mode::Shared));
    assert!(a.try_lock("other", Mode::Exclusive).unwrap().is_some());
}

#[test]
fn a_second_guard_for_the_same_lock_is_refused() {
    let server = TestServer::start();
    let client = connect(&server, "app");
    let _guard = client.lock("once", &LockOptions::exclusive()).unwrap();
    assert!(matches!(
        client.lock("once", &LockOptions::exclusive()),
        Err(Error::AlreadyHeld(_))
    ));
}

#[test]
fn several_waits_on_one_connection_are_answered_by_id() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("slow", 1);
    let client = std::sync::Arc::new(connect(&server, "multi"));
    let waiting = {
        let client = std::sync::Arc::clone(&client);
        std::thread::spawn(move || {
            client
                .lock("slow", &LockOptions::exclusive())
                .map(|g| g.token())
        })
    };
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    // Other requests on the same connection are answered while that one waits.
    let fast = client.lock("fast", &LockOptions::exclusive()).unwrap();
    assert!(client.ping().is_ok());
    holder.unlock("slow");
    let slow_token = waiting.join().unwrap().unwrap();
    assert!(slow_token > fast.token());
}

#[test]
fn refusals_come_back_as_errors() {
    let server = TestServer::with(|c| c.max_locks_per_connection = 1);
    let client = connect(&server, "app");
    let _one = client.lock("one", &LockOptions::exclusive()).unwrap();
    match client.lock("two", &LockOptions::exclusive()) {
        Err(Error::Refused { status, .. }) => assert_eq!(status, "tooMany"),
        other => panic!("{other:?}"),
    }
    match client.lock("", &LockOptions::exclusive()) {
        Err(Error::Refused { status, error }) => assert_eq!(
            (status.as_str(), error.contains("empty")),
            ("invalid", true)
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_server_gone_for_good_is_a_loss_once_the_lease_runs_out() {
    // Release after 2 s at the earliest: a lease of 1 s.
    let server = TestServer::with(|c| {
        c.keepalive.idle_ms = 1000;
        c.keepalive.interval_ms = 1000;
        c.keepalive.probes = 1;
        c.keepalive.user_timeout_ms = 2000;
    });
    let client = connect(&server, "app");
    assert_eq!(client.lease(), Duration::from_secs(1));
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_lost(move |reason| {
        let _ = tx.send(reason.clone());
    });
    let stopped_at = Instant::now();
    server.stop().unwrap();
    // A close may be a restart: the client dials again, and gives up
    // only when the lease runs out without a server to take the lock back.
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "lost at once on a close"
    );
    assert!(guard.is_held());
    let reason = rx.recv_timeout(PATIENCE).expect("callback");
    let took = stopped_at.elapsed();
    assert!(
        matches!(reason, LossReason::LeaseExpired { .. }),
        "{reason:?}"
    );
    assert!(took <= Duration::from_millis(1500), "lost after {took:?}");
    assert!(!guard.is_held());
    assert!(guard.wait_lost(Some(Duration::ZERO)).is_some());
    assert!(matches!(client.ping(), Err(Error::Lost(_))));
}

#[test]
fn a_server_that_closes_and_says_why_is_a_loss_at_once() {
    let server = TestServer::with(|c| c.max_message_bytes = 1024);
    let client = connect(&server, "app");
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    // A status request with a name over the server's frame limit: the
    // server answers messageTooLarge and closes, and redialing would not
    // make the next frame any smaller.
    let long = "n".repeat(2000);
    let started = Instant::now();
    let outcome = client.status(&StatusFilter::Prefix(long), None);
    assert!(matches!(outcome, Err(Error::Lost(_))), "{outcome:?}");
    let reason = guard.wait_lost(Some(PATIENCE)).expect("lost");
    assert!(
        matches!(&reason, LossReason::Closed(detail) if detail.contains("messageTooLarge")),
        "{reason:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_lease_longer_than_the_server_allows_is_refused() {
    let server = TestServer::start();
    let options = ClientOptions {
        lease: Some(Duration::from_secs(9)),
        ..ClientOptions::named("greedy")
    };
    match Client::connect(server.addr.to_string(), &options) {
        Err(Error::UnsafeLease {
            earliest_release, ..
        }) => assert_eq!(earliest_release, Duration::from_secs(10)),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("a 9 s lease against a 10 s release time was accepted"),
    }
    let client = connect(&server, "default");
    assert_eq!(client.lease(), Duration::from_secs(5));
    assert_eq!(client.heartbeat(), Duration::from_secs(1));
}

/// A peer that answers `hello` (promising release after 1 s at the
/// earliest), takes one lock, then never answers again.
fn silent_server() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let hello = frame::read_blocking(&mut stream, 1 << 20).unwrap();
        let id = serde_json::from_slice::<serde_json::Value>(&hello).unwrap()["id"].clone();
        let reply = json!({"id": id, "result": {"status": "ok", "server": {"name": "fake", "version": "0"},
            "protocol": 2, "conn": 1, "keepalive": {"idleMs": 1000, "intervalMs": 1000, "probes": 1, "userTimeoutMs": 1000},
            "releaseAfterMs": 1000, "earliestReleaseMs": 1000}});
        frame::write_blocking(&mut stream, reply.to_string().as_bytes()).unwrap();
        let lock = frame::read_blocking(&mut stream, 1 << 20).unwrap();
        let id = serde_json::from_slice::<serde_json::Value>(&lock).unwrap()["id"].clone();
        let reply = json!({"id": id, "result": {"status": "ok", "token": 1}});
        frame::write_blocking(&mut stream, reply.to_string().as_bytes()).unwrap();
        // Read (pings) and never answer, until the client hangs up.
        while frame::read_blocking(&mut stream, 1 << 20).is_ok() {}
        let _ = stream.flush();
    });
    (addr, thread)
}

#[test]
fn silence_from_the_server_expires_the_lease() {
    let (addr, fake) = silent_server();
    let client = Client::connect(addr.to_string(), &ClientOptions::named("app")).unwrap();
    assert_eq!(client.lease(), Duration::from_millis(500));
    let granted_at = Instant::now();
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let reason = guard
        .wait_lost(Some(Duration::from_secs(10)))
        .expect("lease expires");
    let lost_after = granted_at.elapsed();
    match reason {
        LossReason::LeaseExpired { silent_for } => {
            assert!(silent_for >= Duration::from_millis(500))
        }
        other => panic!("{other:?}"),
    }
    assert!(!guard.is_held());
    // It cannot expire before the lease, counted from the last answered request.
    assert!(
        lost_after >= Duration::from_millis(400),
        "lost after {lost_after:?}"
    );
    drop(client);
    fake.join().unwrap();
}

#[test]
fn a_stopped_server_is_detected_by_the_lease_before_it_could_release() {
    let dir = temp_dir("sigstop");
    let server = ServerProcess::start(&dir, SHORT_RELEASE);
    let client = Client::connect(server.addr.to_string(), &ClientOptions::named("app")).unwrap();
    assert_eq!(client.hello().earliest_release_ms, 2000);
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    server.signal("STOP");
    let stopped_at = Instant::now();
    let reason = guard.wait_lost(Some(Duration::from_secs(10)));
    server.signal("CONT");
    assert!(
        matches!(reason, Some(LossReason::LeaseExpired { .. })),
        "{reason:?}"
    );
    // The lease (1 s) is well inside the server's earliest release (2 s).
    assert!(
        stopped_at.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped_at.elapsed()
    );
    // The guard is still alive, so its work may be: the lock stays ours
    // until it is dropped.
    let mut other = Peer::connect(server.addr);
    other.ask("x", 1);
    other.expect_nothing(Duration::from_millis(200));
    drop(guard);
    assert_eq!(other.recv()["result"]["status"], "ok");
}

#[test]
fn a_guard_declared_lost_keeps_others_out_until_it_is_dropped() {
    // The server freezes for longer than the lease and thaws well before it
    // could release (2 s): the connection never broke, only confidence in it.
    let dir = temp_dir("lost-guard");
    let server = ServerProcess::start(&dir, SHORT_RELEASE);
    let client = Client::connect(server.addr.to_string(), &ClientOptions::named("app")).unwrap();
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let (tx, rx) = mpsc::channel();
    client.on_lost(move |reason| {
        let _ = tx.send(reason.clone());
    });
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("x", 1);
    waiter.expect_nothing(Duration::from_millis(100));

    server.signal("STOP");
    let reason = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("loss declared");
    server.signal("CONT");
    assert!(
        matches!(reason, LossReason::LeaseExpired { .. }),
        "{reason:?}"
    );
    assert!(!guard.is_held());
    // Told to stop, the holder is still working: nobody else gets the lock.
    waiter.expect_nothing(Duration::from_millis(1000));
    // A lost session stays lost, even though the server answers again.
    assert!(matches!(client.ping(), Err(Error::Lost(_))));
    assert!(!guard.is_held());

    let dropped_at = Instant::now();
    drop(guard);
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    println!(
        "granted {:?} after the guard was dropped",
        dropped_at.elapsed()
    );
}

#[test]
fn dropping_a_lost_client_releases_even_with_guards_left() {
    let dir = temp_dir("lost-client");
    let server = ServerProcess::start(&dir, SHORT_RELEASE);
    let client = Client::connect(server.addr.to_string(), &ClientOptions::named("app")).unwrap();
    let guard = client.lock("x", &LockOptions::exclusive()).unwrap();
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("x", 1);
    server.signal("STOP");
    assert!(guard.wait_lost(Some(Duration::from_secs(5))).is_some());
    server.signal("CONT");
    waiter.expect_nothing(Duration::from_millis(300));
    drop(client);
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    drop(guard);
}

#[test]
fn a_lease_too_short_to_survive_a_late_ping_is_refused() {
    let server = TestServer::start();
    let options = ClientOptions {
        lease: Some(Duration::from_millis(900)),
        ..ClientOptions::named("hasty")
    };
    assert!(matches!(
        Client::connect(server.addr.to_string(), &options),
        Err(Error::UnsafeLease { .. })
    ));
    let options = ClientOptions {
        stop_time: Duration::from_millis(7500),
        ..ClientOptions::named("slow to stop")
    };
    assert!(matches!(
        Client::connect(server.addr.to_string(), &options),
        Err(Error::UnsafeLease { .. })
    ));
}

#[test]
fn a_server_that_is_not_pklock_is_named_as_such() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    match Client::connect(addr.to_string(), &ClientOptions::named("x")) {
        Err(Error::Protocol(detail)) => assert!(
            detail.contains("does not answer as a pklock server"),
            "{detail}"
        ),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("connected to an HTTP server"),
    }
    fake.join().unwrap();
}
