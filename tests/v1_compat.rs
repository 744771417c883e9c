//! The original PHP pkLockClient against this server: the literal bytes it
//! sends (PHP's json_encode output behind a pack("N") length), and the exact
//! bytes it must get back to keep working unchanged.

mod common;

use std::time::Duration;

use common::{Peer, TestServer, eventually, stats};
use serde_json::json;

/// What pkLockClient::lock writes for its `n`-th RPC.
fn php_lock(name_json: &str, id: u64) -> Vec<u8> {
    framed(&format!(
        r#"{{"command":"lock","parameters":{{"lockName":{name_json}}},"id":{id}}}"#
    ))
}

/// What pkLockClient::unlock writes.
fn php_unlock(name_json: &str) -> Vec<u8> {
    framed(&format!(r#"{{"command":"unlock","lockName":{name_json}}}"#))
}

fn framed(json: &str) -> Vec<u8> {
    let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes
}

fn text(peer: &mut Peer) -> String {
    String::from_utf8(peer.recv_body()).unwrap()
}

/// `{"id":ID,"result":{"status":"ok","token":N}}` with an integer token.
fn assert_granted(body: &str, id: u64) -> u64 {
    let prefix = format!(r#"{{"id":{id},"result":{{"status":"ok","token":"#);
    let token = body
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix("}}"))
        .unwrap_or_else(|| panic!("not a v1 grant for id {id}: {body}"));
    token
        .parse()
        .unwrap_or_else(|_| panic!("token is not an integer: {body}"))
}

#[test]
fn lock_then_unlock_exactly_as_the_php_client_sees_it() {
    let server = TestServer::start();
    let mut php = server.peer();
    php.send_raw(&php_lock(r#""test""#, 0));
    assert_granted(&text(&mut php), 0);
    php.send_raw(&php_unlock(r#""test""#));
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"ok","lockName":"test"}"#
    );
    php.send_raw(&php_unlock(r#""test""#));
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"notFound","lockName":"test"}"#
    );
}

#[test]
fn two_php_clients_hand_the_lock_over() {
    let server = TestServer::start();
    let mut first = server.peer();
    let mut second = server.peer();
    first.send_raw(&php_lock(r#""test""#, 0));
    let first_token = assert_granted(&text(&mut first), 0);
    second.send_raw(&php_lock(r#""test""#, 0));
    second.expect_nothing(Duration::from_millis(100));
    first.send_raw(&php_unlock(r#""test""#));
    assert_eq!(
        text(&mut first),
        r#"{"attempted":"unlock","result":"ok","lockName":"test"}"#
    );
    let second_token = assert_granted(&text(&mut second), 0);
    assert!(second_token > first_token);
}

#[test]
fn php_client_giving_up_gets_cancelled_then_the_unlock_answer() {
    // pkLockClient::lock sends unlock after its timeLimit, in case the grant
    // crossed its give-up; the withdrawn RPC is answered `cancelled` first.
    let server = TestServer::start();
    let mut holder = server.peer();
    holder.send_raw(&php_lock(r#""test""#, 0));
    assert_granted(&text(&mut holder), 0);
    let mut php = server.peer();
    php.send_raw(&php_lock(r#""test""#, 0));
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    php.send_raw(&php_unlock(r#""test""#));
    assert_eq!(
        text(&mut php),
        r#"{"id":0,"result":{"status":"cancelled"}}"#
    );
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"ok","lockName":"test"}"#
    );
    // Its next RPC (id 1) works as before.
    holder.send_raw(&php_unlock(r#""test""#));
    text(&mut holder);
    php.send_raw(&php_lock(r#""test""#, 1));
    assert_granted(&text(&mut php), 1);
}

#[test]
fn php_escapes_are_understood_and_the_name_is_echoed_as_sent() {
    // json_encode writes "a/b" as "a\/b" and "é" as "\u00e9".
    let server = TestServer::start();
    let mut php = server.peer();
    php.send_raw(&php_lock(r#""jobs\/caf\u00e9""#, 0));
    assert_granted(&text(&mut php), 0);
    let mut other = server.peer();
    let result = other.rpc(
        "lock",
        json!(1),
        json!({"lockName": "jobs/café", "timeoutMs": 0}),
    );
    assert_eq!(
        result["status"], "timeout",
        "the escaped name is the same lock"
    );
    php.send_raw(&php_unlock(r#""jobs\/caf\u00e9""#));
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"ok","lockName":"jobs\/caf\u00e9"}"#
    );
}

#[test]
fn integer_lock_names_are_echoed_as_integers() {
    let server = TestServer::start();
    let mut php = server.peer();
    php.send_raw(&php_lock("42", 0));
    assert_granted(&text(&mut php), 0);
    php.send_raw(&php_unlock("42"));
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"ok","lockName":42}"#
    );
}

#[test]
fn unlock_without_a_name_is_invalid() {
    let server = TestServer::start();
    let mut php = server.peer();
    php.send_raw(&framed(r#"{"command":"unlock"}"#));
    assert_eq!(
        text(&mut php),
        r#"{"attempted":"unlock","result":"invalid"}"#
    );
}

#[test]
fn lock_that_is_not_an_rpc_gets_invalid_request() {
    let server = TestServer::start();
    let mut php = server.peer();
    php.send_raw(&framed(
        r#"{"command":"lock","parameters":{"lockName":"x"}}"#,
    ));
    assert_eq!(
        text(&mut php),
        r#"{"error":"invalidRequest","detail":"`lock` is an RPC and needs an `id`"}"#
    );
    php.send_raw(&framed(r#"{"command":"lock","id":4}"#));
    assert_eq!(
        text(&mut php),
        r#"{"error":"invalidRequest","detail":"`lock` needs `parameters`","id":4}"#
    );
    php.send_raw(&framed(r#"{"command":"lock","parameters":{},"id":5}"#));
    assert_eq!(
        text(&mut php),
        r#"{"id":5,"result":{"status":"invalid","error":"missing `lockName`"}}"#
    );
}
