//! Semaphores, multi-locks and deadlock answers on the wire, one rule each
//! (docs/PROTOCOL.md, "Beyond a mutex").

mod common;

use std::time::Duration;

use common::{Peer, TestServer, eventually, stats};
use serde_json::{Value, json};

fn lock(peer: &mut Peer, id: u64, parameters: Value) -> Value {
    peer.rpc("lock", json!(id), parameters)
}

fn status_of(peer: &mut Peer, name: &str) -> Value {
    let result = peer.rpc("status", json!("s"), json!({"lockName": name}));
    result["locks"][0].clone()
}

fn hello(peer: &mut Peer, client: &str) -> u64 {
    let result = peer.rpc("hello", json!("h"), json!({"client": client}));
    result["conn"].as_u64().expect("conn")
}

#[test]
fn a_semaphore_admits_its_permits_and_queues_the_rest_in_order() {
    let server = TestServer::start();
    let mut peers: Vec<Peer> = (0..4).map(|_| server.peer()).collect();
    let mut tokens = Vec::new();
    for (i, take) in [2, 1].into_iter().enumerate() {
        let result = lock(
            &mut peers[i],
            1,
            json!({"lockName": "api", "permits": 3, "take": take}),
        );
        assert_eq!(result["status"], "ok", "{result}");
        tokens.push(result["token"].as_u64().expect("token"));
    }
    peers[2]
        .send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "api", "permits": 3}}));
    peers[3]
        .send(json!({"command": "lock", "id": 3, "parameters": {"lockName": "api", "permits": 3}}));
    eventually("two waiters", || {
        let mut watcher = server.peer();
        status_of(&mut watcher, "api")["waiters"]
            .as_array()
            .is_some_and(|w| w.len() == 2)
    });
    let mut watcher = server.peer();
    let status = status_of(&mut watcher, "api");
    assert_eq!(status["permits"], 3);
    let takes: Vec<&Value> = status["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .map(|h| &h["take"])
        .collect();
    assert_eq!(takes, [&json!(2), &json!(1)]);
    // The holder of two permits dies: both waiters fit, in order.
    drop(peers.remove(0));
    let first = peers[1].recv();
    let second = peers[2].recv();
    assert_eq!(
        (first["id"].clone(), first["result"]["status"].clone()),
        (json!(2), json!("ok"))
    );
    assert_eq!(second["id"], 3);
    let granted = [
        first["result"]["token"].as_u64(),
        second["result"]["token"].as_u64(),
    ];
    assert!(
        granted.iter().all(|t| t.is_some_and(|t| t > tokens[1])),
        "every grant a new, higher token: {granted:?} after {tokens:?}"
    );
}

#[test]
fn a_request_with_other_permits_is_told_the_permits_in_force() {
    let server = TestServer::start();
    let mut holder = server.peer();
    assert_eq!(
        lock(&mut holder, 1, json!({"lockName": "api", "permits": 5}))["status"],
        "ok"
    );
    let mut other = server.peer();
    let result = lock(&mut other, 1, json!({"lockName": "api", "permits": 3}));
    assert_eq!(result["status"], "invalid");
    assert_eq!(result["permits"], 5);
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("5 permits")),
        "{result}"
    );
    // A mutex request on a semaphore, and a semaphore request on a mutex.
    let result = lock(&mut other, 2, json!({"lockName": "api"}));
    assert_eq!(
        (result["status"].clone(), result["permits"].clone()),
        (json!("invalid"), json!(5))
    );
    assert_eq!(
        holder.take("plain", 2),
        holder.take("plain", 3),
        "asking again: same grant"
    );
    let result = lock(&mut other, 3, json!({"lockName": "plain", "permits": 2}));
    assert_eq!(result["status"], "invalid");
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("mutex")),
        "{result}"
    );
    // Nothing was queued by the refusals.
    let status = status_of(&mut other, "api");
    assert_eq!(status["waiters"], json!([]));
}

#[test]
fn semaphore_parameters_out_of_range_or_mixed_with_mode_are_invalid() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for (parameters, says) in [
        (
            json!({"lockName": "s", "permits": 2, "mode": "shared"}),
            "mode",
        ),
        (
            json!({"lockName": "s", "permits": 2, "take": 3}),
            "more than",
        ),
        (
            json!({"lockName": "s", "take": 1}),
            "`take` needs `permits`",
        ),
        (json!({"lockName": "s", "permits": 0}), "from 1"),
        (json!({"lockName": "s", "permits": "2"}), "from 1"),
    ] {
        let result = lock(&mut peer, 1, parameters.clone());
        assert_eq!(result["status"], "invalid", "{parameters}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{parameters}: {error}");
    }
}

#[test]
fn a_multi_lock_waits_holding_nothing_then_gets_every_lock_with_one_token() {
    let server = TestServer::start();
    let mut blocker = server.peer();
    blocker.take("b", 1);
    let mut multi = server.peer();
    hello(&mut multi, "both");
    multi.send(json!({"command": "lock", "id": 7, "parameters": {
        "lockNames": ["a", {"lockName": "b", "mode": "shared"}]}}));
    let mut watcher = server.peer();
    eventually("queued on a and b", || {
        status_of(&mut watcher, "b")["waiters"]
            .as_array()
            .is_some_and(|w| w.len() == 1)
    });
    assert_eq!(
        status_of(&mut watcher, "a")["holders"],
        json!([]),
        "holds nothing while it waits"
    );
    // Someone else wants a now: FIFO puts it behind the multi-lock.
    let mut later = server.peer();
    later.ask("a", 8);
    later.expect_nothing(Duration::from_millis(100));
    assert_eq!(blocker.unlock("b"), "ok");
    let reply = multi.recv();
    assert_eq!(reply["id"], 7);
    let token = reply["result"]["token"].as_u64().expect("one token");
    let proofs = &reply["result"]["proofs"];
    assert!(
        proofs["a"].is_string() && proofs["b"].is_string(),
        "{reply}"
    );
    for name in ["a", "b"] {
        let holders = status_of(&mut watcher, name)["holders"].clone();
        assert_eq!(holders[0]["token"], token, "{name}: {holders}");
    }
    assert_eq!(status_of(&mut watcher, "b")["holders"][0]["mode"], "shared");
    // Releasing both at once lets the later one in.
    let result = multi.rpc("unlock", json!("u"), json!({"lockNames": ["a", "b"]}));
    assert_eq!(result["status"], "ok");
    assert_eq!(later.recv()["result"]["status"], "ok");
    let result = multi.rpc("unlock", json!("u"), json!({"lockNames": ["a", "b"]}));
    assert_eq!(result["status"], "notFound");
}

#[test]
fn unlocking_a_name_of_a_waiting_multi_lock_cancels_all_of_it() {
    let server = TestServer::start();
    let mut blocker = server.peer();
    blocker.take("y", 1);
    let mut multi = server.peer();
    multi.send(json!({"command": "lock", "id": 3, "parameters": {"lockNames": ["x", "y"]}}));
    multi.expect_nothing(Duration::from_millis(100));
    multi.send(json!({"command": "unlock", "id": "u", "parameters": {"lockName": "x"}}));
    assert_eq!(
        multi.recv(),
        json!({"id": 3, "result": {"status": "cancelled"}})
    );
    assert_eq!(multi.recv(), json!({"id": "u", "result": {"status": "ok"}}));
    let mut other = server.peer();
    other.take("x", 1);
    assert_eq!(
        stats(server.addr)["locks"],
        2,
        "x and y, nothing of the multi-lock left"
    );
}

#[test]
fn bad_lock_names_lists_are_invalid_and_queue_nothing() {
    let server = TestServer::start();
    let mut peer = server.peer();
    let many: Vec<String> = (0..65).map(|i| format!("n{i}")).collect();
    for (parameters, says) in [
        (json!({"lockNames": []}), "1 to 64"),
        (json!({"lockNames": many}), "1 to 64"),
        (json!({"lockNames": ["a", "a"]}), "twice"),
        (
            json!({"lockNames": ["a"], "lockName": "b"}),
            "do not go together",
        ),
        (
            json!({"lockNames": ["a"], "permits": 2}),
            "do not go together",
        ),
        (json!({"lockNames": "a"}), "array"),
        (
            json!({"lockNames": [{"lockName": "a", "mode": "read"}]}),
            "mode",
        ),
        (json!({"lockNames": [{"name": "a"}]}), "each of `lockNames`"),
    ] {
        let result = lock(&mut peer, 1, parameters.clone());
        assert_eq!(result["status"], "invalid", "{parameters}");
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{parameters}: {error}");
    }
    peer.take("held", 2);
    let result = lock(&mut peer, 3, json!({"lockNames": ["free", "held"]}));
    assert_eq!(result["status"], "invalid");
    assert!(
        result["error"]
            .as_str()
            .is_some_and(|e| e.contains("\"held\"")),
        "{result}"
    );
    assert_eq!(stats(server.addr)["locks"], 1);
}

#[test]
fn a_wait_that_closes_a_cycle_is_answered_deadlock_with_the_cycle() {
    let server = TestServer::start();
    let mut a = server.peer();
    let mut b = server.peer();
    let conn_a = hello(&mut a, "job A");
    let conn_b = hello(&mut b, "job B");
    a.take("x", 1);
    b.take("y", 1);
    a.ask("y", 2);
    a.expect_nothing(Duration::from_millis(100));
    let result = lock(&mut b, 3, json!({"lockName": "x", "timeoutMs": 60_000}));
    assert_eq!(result["status"], "deadlock");
    assert_eq!(
        result["cycle"],
        json!([
            {"conn": conn_b, "client": "job B", "lockName": "x"},
            {"conn": conn_a, "client": "job A", "lockName": "y"},
        ])
    );
    let mut watcher = server.peer();
    assert_eq!(
        status_of(&mut watcher, "x")["waiters"],
        json!([]),
        "not queued"
    );
    // B gives way: A gets y.
    assert_eq!(b.unlock("y"), "ok");
    assert_eq!(a.recv()["result"]["status"], "ok");
    assert_eq!(stats(server.addr)["deadlocks"], 1);
}

#[test]
fn with_detection_off_the_cycle_is_queued() {
    let server = TestServer::with(|c| c.detect_deadlocks = false);
    let mut a = server.peer();
    let mut b = server.peer();
    a.take("x", 1);
    b.take("y", 1);
    a.ask("y", 2);
    b.ask("x", 3);
    b.expect_nothing(Duration::from_millis(100));
    assert_eq!(stats(server.addr)["waiters"], 2);
}
