//! Lock semantics over real sockets: FIFO, release on disconnect, unlock,
//! timeouts, shared and exclusive modes, per-connection rules, tokens.

mod common;

use std::time::Duration;

use common::{Peer, TestServer, eventually, stats};
use serde_json::json;

#[test]
fn twenty_queued_clients_are_granted_in_arrival_order() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("fifo", 1);
    let mut waiters: Vec<Peer> = (0..20).map(|_| server.peer()).collect();
    for (i, waiter) in waiters.iter_mut().enumerate() {
        waiter.ask("fifo", i as u64);
        // Each request must be queued before the next is sent.
        eventually("request queued", || stats(server.addr)["waiters"] == i + 1);
    }
    assert_eq!(holder.unlock("fifo"), "ok");
    let mut last_token = 0;
    for i in 0..20 {
        let reply = waiters[i].recv();
        assert_eq!(reply["id"], i, "waiter {i}: {reply}");
        assert_eq!(reply["result"]["status"], "ok");
        let token = reply["result"]["token"].as_u64().unwrap();
        assert!(token > last_token);
        last_token = token;
        for later in &mut waiters[i + 1..] {
            later.expect_nothing(Duration::from_millis(5));
        }
        assert_eq!(waiters[i].unlock("fifo"), "ok");
    }
}

#[test]
fn holder_disconnect_grants_the_next_waiter() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("job", 1);
    let mut waiter = server.peer();
    waiter.ask("job", 7);
    waiter.expect_nothing(Duration::from_millis(100));
    drop(holder);
    let reply = waiter.recv();
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["result"]["status"], "ok");
    assert_eq!(stats(server.addr)["releasedByDisconnect"], 1);
}

#[test]
fn waiter_disconnect_leaves_the_queue_clean() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("q", 1);
    let mut leaving = server.peer();
    leaving.ask("q", 2);
    let mut staying = server.peer();
    eventually("first waiter queued", || stats(server.addr)["waiters"] == 1);
    staying.ask("q", 3);
    eventually("second waiter queued", || {
        stats(server.addr)["waiters"] == 2
    });
    drop(leaving);
    eventually("gone waiter dropped", || stats(server.addr)["waiters"] == 1);
    let status = server
        .peer()
        .rpc("status", json!(1), json!({"lockName": "q"}));
    let waiters = status["locks"][0]["waiters"].as_array().unwrap().clone();
    assert_eq!(waiters.len(), 1);
    holder.unlock("q");
    assert_eq!(staying.recv()["result"]["status"], "ok");
}

#[test]
fn unlock_by_a_waiter_answers_its_lock_cancelled() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("c", 1);
    let mut waiter = server.peer();
    waiter.ask("c", 5);
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    waiter.send(json!({"command": "unlock", "id": 6, "parameters": {"lockName": "c"}}));
    assert_eq!(
        waiter.recv(),
        json!({"id": 5, "result": {"status": "cancelled"}})
    );
    assert_eq!(waiter.recv(), json!({"id": 6, "result": {"status": "ok"}}));
    holder.unlock("c");
    waiter.expect_nothing(Duration::from_millis(100));
    assert_eq!(stats(server.addr)["locks"], 0);
}

#[test]
fn unlock_of_a_lock_not_held_is_not_found() {
    let server = TestServer::start();
    let mut other = server.peer();
    other.take("n", 1);
    let mut peer = server.peer();
    assert_eq!(peer.unlock("n"), "notFound");
    assert_eq!(peer.unlock("never"), "notFound");
    assert_eq!(other.unlock("n"), "ok");
}

#[test]
fn timeout_zero_tries_once() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("t0", 1);
    let mut other = server.peer();
    let result = other.rpc("lock", json!(2), json!({"lockName": "t0", "timeoutMs": 0}));
    assert_eq!(result, json!({"status": "timeout"}));
    let result = other.rpc(
        "lock",
        json!(3),
        json!({"lockName": "free", "timeoutMs": 0}),
    );
    assert_eq!(result["status"], "ok");
    assert_eq!(stats(server.addr)["waiters"], 0);
}

#[test]
fn wait_times_out_and_leaves_the_queue() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("t", 1);
    let mut waiter = server.peer();
    let started = std::time::Instant::now();
    let result = waiter.rpc("lock", json!(2), json!({"lockName": "t", "timeoutMs": 200}));
    assert_eq!(result, json!({"status": "timeout"}));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "answered before its deadline"
    );
    let s = stats(server.addr);
    assert_eq!(
        (s["waiters"].as_u64(), s["timeouts"].as_u64()),
        (Some(0), Some(1))
    );
    holder.unlock("t");
    waiter.expect_nothing(Duration::from_millis(100));
}

#[test]
fn a_timed_wait_that_is_granted_in_time_is_ok() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("g", 1);
    let mut waiter = server.peer();
    waiter.send(
        json!({"command": "lock", "id": 2, "parameters": {"lockName": "g", "timeoutMs": 5000}}),
    );
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    holder.unlock("g");
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    waiter.expect_nothing(Duration::from_millis(100));
}

fn ask_mode(peer: &mut Peer, lock: &str, id: u64, mode: &str) {
    peer.send(json!({"command": "lock", "id": id, "parameters": {"lockName": lock, "mode": mode}}));
}

#[test]
fn shared_holders_share_and_exclusive_waits_for_all_of_them() {
    let server = TestServer::start();
    let mut readers: Vec<Peer> = (0..3).map(|_| server.peer()).collect();
    for (i, reader) in readers.iter_mut().enumerate() {
        ask_mode(reader, "db", i as u64, "shared");
        assert_eq!(reader.recv()["result"]["status"], "ok");
    }
    let mut writer = server.peer();
    ask_mode(&mut writer, "db", 9, "exclusive");
    for reader in &mut readers[..2] {
        reader.unlock("db");
        writer.expect_nothing(Duration::from_millis(50));
    }
    readers[2].unlock("db");
    assert_eq!(writer.recv()["result"]["status"], "ok");
}

#[test]
fn shared_request_behind_a_waiting_writer_waits_so_writers_do_not_starve() {
    let server = TestServer::start();
    let mut reader = server.peer();
    ask_mode(&mut reader, "db", 1, "shared");
    assert_eq!(reader.recv()["result"]["status"], "ok");
    let mut writer = server.peer();
    ask_mode(&mut writer, "db", 2, "exclusive");
    eventually("writer queued", || stats(server.addr)["waiters"] == 1);
    let mut late_reader = server.peer();
    ask_mode(&mut late_reader, "db", 3, "shared");
    late_reader.expect_nothing(Duration::from_millis(100));
    reader.unlock("db");
    assert_eq!(writer.recv()["result"]["status"], "ok");
    late_reader.expect_nothing(Duration::from_millis(50));
    writer.unlock("db");
    assert_eq!(late_reader.recv()["result"]["status"], "ok");
}

#[test]
fn shared_waiters_at_the_head_are_granted_together() {
    let server = TestServer::start();
    let mut writer = server.peer();
    writer.take("db", 1);
    let mut readers: Vec<Peer> = (0..3).map(|_| server.peer()).collect();
    for (i, reader) in readers.iter_mut().enumerate() {
        ask_mode(reader, "db", i as u64, "shared");
        eventually("reader queued", || stats(server.addr)["waiters"] == i + 1);
    }
    writer.unlock("db");
    for reader in &mut readers {
        assert_eq!(reader.recv()["result"]["status"], "ok");
    }
    let status = server
        .peer()
        .rpc("status", json!(1), json!({"lockName": "db"}));
    assert_eq!(status["locks"][0]["holders"].as_array().unwrap().len(), 3);
}

#[test]
fn asking_again_for_a_held_lock_gives_the_same_token() {
    let server = TestServer::start();
    let mut peer = server.peer();
    let token = peer.take("again", 1);
    assert_eq!(peer.take("again", 2), token);
    let result = peer.rpc(
        "lock",
        json!(3),
        json!({"lockName": "again", "mode": "shared"}),
    );
    assert_eq!(result["status"], "invalid", "{result}");
    assert!(result["error"].as_str().unwrap().contains("exclusive mode"));
}

#[test]
fn a_second_wait_on_the_same_lock_is_invalid_and_the_first_stands() {
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.take("w", 1);
    let mut waiter = server.peer();
    waiter.ask("w", 1);
    let second = waiter.rpc("lock", json!(2), json!({"lockName": "w"}));
    assert_eq!(second["status"], "invalid");
    holder.unlock("w");
    let reply = waiter.recv();
    assert_eq!(
        (reply["id"].as_u64(), reply["result"]["status"].as_str()),
        (Some(1), Some("ok"))
    );
}

#[test]
fn locks_per_connection_are_limited() {
    let server = TestServer::with(|c| c.max_locks_per_connection = 3);
    let mut peer = server.peer();
    for i in 0..3 {
        peer.take(&format!("l{i}"), i);
    }
    let result = peer.lock("l3", 3);
    assert_eq!(result["status"], "tooMany", "{result}");
    assert_eq!(peer.unlock("l0"), "ok");
    peer.take("l3", 4);
}

#[test]
fn tokens_strictly_increase_across_locks_and_connections() {
    let server = TestServer::start();
    let mut a = server.peer();
    let mut b = server.peer();
    let mut last = 0;
    for i in 0..50 {
        let peer = if i % 2 == 0 { &mut a } else { &mut b };
        let token = peer.take(&format!("k{}", i % 7), i);
        assert!(token > last, "token {token} after {last}");
        last = token;
        peer.unlock(&format!("k{}", i % 7));
    }
}

#[test]
fn integer_and_string_names_are_one_lock() {
    let server = TestServer::start();
    let mut a = server.peer();
    let result = a.rpc("lock", json!(1), json!({"lockName": 5}));
    assert_eq!(result["status"], "ok");
    let mut b = server.peer();
    let result = b.rpc("lock", json!(1), json!({"lockName": "5", "timeoutMs": 0}));
    assert_eq!(result["status"], "timeout");
}

#[test]
fn empty_queues_are_freed() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for i in 0..100 {
        peer.take(&format!("tmp/{i}"), i);
    }
    assert_eq!(stats(server.addr)["locks"], 100);
    for i in 0..100 {
        peer.unlock(&format!("tmp/{i}"));
    }
    assert_eq!(stats(server.addr)["locks"], 0);
    let status = peer.rpc("status", json!(1), json!({}));
    assert_eq!(status["locks"], json!([]));
}

#[test]
fn half_closed_peer_gets_its_replies_then_loses_its_locks() {
    let server = TestServer::start();
    let mut waiter = server.peer();
    let mut leaving = server.peer();
    leaving.take("half", 1);
    waiter.ask("half", 2);
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    leaving.send(json!({"command": "ping", "id": "last"}));
    leaving.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(
        leaving.expect_closed(),
        vec![json!({"id": "last", "result": {"status": "ok"}})]
    );
    assert_eq!(waiter.recv()["result"]["status"], "ok");
}
