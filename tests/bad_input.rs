//! Bad input from a peer gets the answer docs/PROTOCOL.md gives, never stops
//! the server, and never disturbs other connections or their locks.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{Peer, TestServer, eventually, stats};
use serde_json::{Value, json};

/// A bystander holding a lock; checks at the end that it still does.
struct Bystander {
    peer: Peer,
    token: u64,
}

impl Bystander {
    fn new(server: &TestServer) -> Bystander {
        let mut peer = server.peer();
        let token = peer.take("bystander", 1);
        Bystander { peer, token }
    }

    fn still_holds(mut self, server: &TestServer) {
        assert_eq!(
            self.peer.rpc("ping", json!("p"), json!({})),
            json!({"status": "ok"})
        );
        let status = server
            .peer()
            .rpc("status", json!(1), json!({"lockName": "bystander"}));
        assert_eq!(
            status["locks"][0]["holders"][0]["token"], self.token,
            "{status}"
        );
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

fn ping(id: u64) -> Vec<u8> {
    framed(json!({"command": "ping", "id": id}).to_string().as_bytes())
}

#[test]
fn oversized_length_prefix_is_answered_then_closed_and_its_locks_released() {
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let mut bad = server.peer();
    bad.take("held-by-bad", 1);
    let mut waiter = server.peer();
    waiter.ask("held-by-bad", 2);
    bad.send_raw(&[0xff, 0xff, 0xff, 0xff, b'{']);
    let messages = bad.expect_closed();
    assert_eq!(
        messages,
        vec![json!({"error": "messageTooLarge", "limit": 65536})]
    );
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    bystander.still_holds(&server);
}

#[test]
fn length_just_over_a_configured_limit_is_refused_and_at_the_limit_accepted() {
    let server = TestServer::with(|c| c.max_message_bytes = 4096);
    let mut peer = server.peer();
    let mut body = json!({"command": "ping", "id": 1}).to_string().into_bytes();
    body.resize(4096, b' ');
    peer.send_raw(&framed(&body));
    assert_eq!(peer.recv(), json!({"id": 1, "result": {"status": "ok"}}));
    body.push(b' ');
    peer.send_raw(&framed(&body));
    assert_eq!(
        peer.expect_closed(),
        vec![json!({"error": "messageTooLarge", "limit": 4096})]
    );
}

fn assert_invalid_json_and_still_open(body: &[u8]) {
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let mut peer = server.peer();
    // The bad frame and a good one in a single write: the good one must not stall.
    let mut bytes = framed(body);
    bytes.extend(ping(2));
    peer.send_raw(&bytes);
    let reply = peer.recv();
    assert_eq!(reply["error"], "invalidJson", "for {body:?}: {reply}");
    assert!(reply["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(peer.recv(), json!({"id": 2, "result": {"status": "ok"}}));
    assert_eq!(stats(server.addr)["badMessages"], 1);
    bystander.still_holds(&server);
}

#[test]
fn invalid_json_is_answered_and_the_frames_behind_it_are_served() {
    assert_invalid_json_and_still_open(b"{\"command\": \"lock\", ");
}

#[test]
fn json_that_is_not_an_object_is_invalid_json() {
    assert_invalid_json_and_still_open(b"[\"lock\", \"x\"]");
    assert_invalid_json_and_still_open(b"\"lock\"");
    assert_invalid_json_and_still_open(b"17");
}

#[test]
fn invalid_utf8_is_invalid_json() {
    assert_invalid_json_and_still_open(b"{\"command\":\"ping\",\"id\":\"\xff\xfe\"}");
}

#[test]
fn empty_frame_is_invalid_json() {
    assert_invalid_json_and_still_open(b"");
}

fn rpc_body(command: Value, lock_name: Value) -> Vec<u8> {
    json!({"command": command, "id": 3, "parameters": {"lockName": lock_name}})
        .to_string()
        .into_bytes()
}

#[test]
fn command_that_is_an_array_or_object_does_not_crash_anything() {
    // The original server died on these, and every client lost its locks.
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let mut peer = server.peer();
    for command in [json!(["lock"]), json!({"lock": 1}), json!(7), json!(null)] {
        peer.send_body(&rpc_body(command.clone(), json!("x")));
        let reply = peer.recv();
        assert_eq!(reply["error"], "invalidRequest", "{command}: {reply}");
        assert_eq!(reply["id"], 3);
    }
    peer.send_body(b"{\"id\": 3}");
    assert_eq!(peer.recv()["detail"], "missing `command`");
    bystander.still_holds(&server);
}

#[test]
fn lock_name_of_a_wrong_type_or_size_is_invalid() {
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let mut peer = server.peer();
    let too_long = "n".repeat(1025);
    for name in [
        json!(["x"]),
        json!({"a": 1}),
        json!(1.5),
        json!(true),
        json!(""),
        json!(too_long),
    ] {
        peer.send_body(&rpc_body(json!("lock"), name.clone()));
        let reply = peer.recv();
        assert_eq!(reply["id"], 3);
        assert_eq!(reply["result"]["status"], "invalid", "{reply}");
        assert!(
            reply["result"]["error"]
                .as_str()
                .unwrap()
                .contains("lockName"),
            "{reply}"
        );
    }
    // Exactly 1024 bytes is allowed.
    peer.take(&"n".repeat(1024), 4);
    let unlock = peer.call(json!({"command": "unlock", "lockName": {"x": 1}}));
    assert_eq!(unlock, json!({"attempted": "unlock", "result": "invalid"}));
    bystander.still_holds(&server);
}

#[test]
fn wrong_typed_parameters_are_invalid() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for parameters in [
        json!("lockName"),
        json!([1]),
        json!({"lockName": "x", "timeoutMs": "10"}),
        json!({"lockName": "x", "timeoutMs": -5}),
        json!({"lockName": "x", "mode": ["shared"]}),
    ] {
        let result = peer.rpc("lock", json!(1), parameters.clone());
        assert_eq!(result["status"], "invalid", "{parameters}: {result}");
    }
    let result = peer.rpc("hello", json!(1), json!({"client": 12}));
    assert_eq!(result["status"], "invalid");
    assert_eq!(stats(server.addr)["locks"], 0);
}

#[test]
fn unknown_command_is_answered_and_the_connection_kept() {
    let server = TestServer::start();
    let mut peer = server.peer();
    let reply = peer.call(json!({"command": "steal", "id": "s"}));
    assert_eq!(
        reply,
        json!({"id": "s", "result": {"status": "invalid", "error": "unknown command `steal`"}})
    );
    let reply = peer.call(json!({"command": "steal"}));
    assert_eq!(
        reply,
        json!({"error": "invalidRequest", "detail": "unknown command `steal`"})
    );
    assert_eq!(
        peer.rpc("ping", json!(1), json!(null)),
        json!({"status": "ok"})
    );
}

#[test]
fn frame_split_into_one_byte_writes_is_put_back_together() {
    let server = TestServer::start();
    let mut peer = server.peer();
    let bytes = framed(
        json!({"command": "lock", "id": 9, "parameters": {"lockName": "slow"}})
            .to_string()
            .as_bytes(),
    );
    for byte in &bytes {
        peer.stream.write_all(&[*byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let reply = peer.recv();
    assert_eq!(
        (reply["id"].as_u64(), reply["result"]["status"].as_str()),
        (Some(9), Some("ok"))
    );
}

#[test]
fn a_thousand_frames_in_one_write_are_all_answered_in_order() {
    let server = TestServer::start();
    let mut peer = server.peer();
    let bytes: Vec<u8> = (0..1000).flat_map(ping).collect();
    peer.send_raw(&bytes);
    for id in 0..1000 {
        assert_eq!(peer.recv(), json!({"id": id, "result": {"status": "ok"}}));
    }
}

#[test]
fn peer_reset_mid_frame_releases_its_locks_and_disturbs_no_one() {
    let server = TestServer::start();
    let bystander = Bystander::new(&server);
    let mut leaving = server.peer();
    leaving.take("reset", 1);
    let mut waiter = server.peer();
    waiter.ask("reset", 2);
    let partial = framed(b"{\"command\":\"ping\",\"id\":1}");
    leaving.send_raw(&partial[..10]);
    // SO_LINGER 0: close sends RST instead of FIN.
    socket2::SockRef::from(&leaving.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(leaving);
    assert_eq!(waiter.recv()["result"]["status"], "ok");
    bystander.still_holds(&server);
}

#[test]
fn peer_that_never_reads_is_closed_at_the_output_limit_and_its_locks_released() {
    // A peer that leaves its replies unread past max_output_bytes is given as
    // long as a vanished peer would be: 1 s with these keepalive settings.
    let server = TestServer::with(|c| {
        c.keepalive = pklock::config::KeepaliveConfig {
            idle_ms: 1000,
            interval_ms: 1000,
            probes: 1,
            user_timeout_ms: 1000,
        }
    });
    let bystander = Bystander::new(&server);
    let mut hog = server.peer();
    // Enough held locks that each status reply is large.
    for i in 0..500 {
        hog.send_raw(&framed(
            json!({"command": "lock", "id": i, "parameters": {"lockName": format!("hog/{i:04}")}})
                .to_string()
                .as_bytes(),
        ));
    }
    for _ in 0..500 {
        hog.recv();
    }
    let mut waiter = server.peer();
    waiter.ask("hog/0000", 1);
    // Ask for ~20 MB of status replies and never read them: far more than
    // the socket buffers and max_output_bytes (1 MiB) can hold.
    let status = framed(
        json!({"command": "status", "id": "s"})
            .to_string()
            .as_bytes(),
    );
    hog.send_raw(&status.repeat(300));
    let grant = waiter.recv();
    assert_eq!(
        grant["result"]["status"], "ok",
        "the hog's lock went to the waiter: {grant}"
    );
    eventually("the hog's locks released", || {
        stats(server.addr)["locksHeld"] == 2
    });
    bystander.still_holds(&server);
}

#[test]
fn a_client_that_pipelines_much_but_reads_slowly_is_never_closed() {
    // Megabytes of replies, far more than max_output_bytes and the socket
    // buffers, read slowly by another thread while requests keep coming:
    // its requests wait, it is not cut off.
    let server = TestServer::with(|c| c.max_output_bytes = 4096);
    let mut peer = server.peer();
    for i in 0..4 {
        peer.take(&format!("{i}{}", "n".repeat(200)), i);
    }
    let mut reader = Peer {
        stream: peer.stream.try_clone().unwrap(),
    };
    let rounds = 5_000u64;
    let counting = std::thread::spawn(move || {
        for i in 0..rounds {
            assert_eq!(reader.recv()["id"], i);
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        rounds
    });
    let bytes: Vec<u8> = (0..rounds)
        .flat_map(|i| framed(json!({"command": "status", "id": i}).to_string().as_bytes()))
        .collect();
    peer.send_raw(&bytes);
    assert_eq!(counting.join().unwrap(), rounds);
    assert_eq!(
        peer.rpc("ping", json!("p"), json!({})),
        json!({"status": "ok"})
    );
}
