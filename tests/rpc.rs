//! The v2 RPCs: hello, ping, status, stats, and ids echoed verbatim.

mod common;

use std::time::Duration;

use common::{TestServer, eventually, stats};
use pklock::config::KeepaliveConfig;
use serde_json::json;

#[test]
fn hello_reports_the_keepalive_the_kernel_applies() {
    let server = TestServer::with(|c| {
        c.keepalive = KeepaliveConfig {
            idle_ms: 1500,
            interval_ms: 1000,
            probes: 3,
            user_timeout_ms: 4000,
        }
    });
    let mut peer = server.peer();
    let result = peer.rpc("hello", json!(1), json!({"client": "backup job"}));
    assert_eq!(result["status"], "ok");
    assert_eq!(result["server"]["name"], "pklock");
    assert_eq!(result["server"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(result["protocol"], 2);
    // 1500 ms idle is applied as 2 s: the reported figure is the real one.
    assert_eq!(
        result["keepalive"],
        json!({"idleMs": 2000, "intervalMs": 1000, "probes": 3, "userTimeoutMs": 4000})
    );
    // Keepalive checks at 2, 3, 4 s; the user timeout drops it at the 4 s one.
    assert_eq!(result["releaseAfterMs"], 4000);
    assert_eq!(result["earliestReleaseMs"], 4000);
    assert!(result["conn"].as_u64().is_some());
}

#[test]
fn hello_with_defaults_says_ten_seconds() {
    let server = TestServer::start();
    let result = server.peer().rpc("hello", json!("h"), json!(null));
    assert_eq!(
        result["keepalive"],
        json!({"idleMs": 5000, "intervalMs": 1000, "probes": 5, "userTimeoutMs": 10000})
    );
    assert_eq!(result["releaseAfterMs"], 10000);
}

#[test]
fn ids_of_every_scalar_kind_come_back_verbatim() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for id in [
        r#""abc""#,
        "0",
        "-3",
        "1.25",
        "true",
        "false",
        "12345678901234567890",
    ] {
        peer.send_body(format!(r#"{{"command":"ping","id":{id}}}"#).as_bytes());
        let body = String::from_utf8(peer.recv_body()).unwrap();
        assert_eq!(body, format!(r#"{{"id":{id},"result":{{"status":"ok"}}}}"#));
    }
}

#[test]
fn status_lists_holders_and_waiters_with_names_and_times() {
    let server = TestServer::start();
    let mut holder = server.peer();
    let hello = holder.rpc("hello", json!(0), json!({"client": "nightly backup"}));
    let holder_conn = hello["conn"].clone();
    let token = holder.take("backup", 1);
    let mut waiter = server.peer();
    waiter.rpc("hello", json!(0), json!({"client": "deploy"}));
    waiter.ask("backup", 2);
    eventually("queued", || stats(server.addr)["waiters"] == 1);
    std::thread::sleep(Duration::from_millis(30));

    let status = server.peer().rpc("status", json!(1), json!({}));
    assert_eq!(status["truncated"], false);
    let lock = &status["locks"][0];
    assert_eq!(lock["lockName"], "backup");
    let h = &lock["holders"][0];
    assert_eq!(h["conn"], holder_conn);
    assert_eq!(h["client"], "nightly backup");
    assert_eq!(h["peer"], holder.stream.local_addr().unwrap().to_string());
    assert_eq!(h["mode"], "exclusive");
    assert_eq!(h["token"], token);
    assert!(h["heldMs"].as_u64().unwrap() >= 30, "{h}");
    let w = &lock["waiters"][0];
    assert_eq!(w["client"], "deploy");
    assert_eq!(w["mode"], "exclusive");
    assert!(w["waitingMs"].as_u64().unwrap() >= 30, "{w}");
}

/// The lock names of a `status` result, in order.
fn names(result: &serde_json::Value) -> Vec<String> {
    result["locks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["lockName"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn status_filters_by_name_or_prefix_in_name_order_and_truncates() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for (i, name) in ["job/b", "job/a", "jobs", "other", "job/c"]
        .iter()
        .enumerate()
    {
        peer.take(name, i as u64);
    }
    let all = peer.rpc("status", json!(1), json!({}));
    assert_eq!(names(&all), ["job/a", "job/b", "job/c", "jobs", "other"]);
    let prefixed = peer.rpc("status", json!(2), json!({"prefix": "job/"}));
    assert_eq!(names(&prefixed), ["job/a", "job/b", "job/c"]);
    let exact = peer.rpc("status", json!(3), json!({"lockName": "jobs"}));
    assert_eq!(names(&exact), ["jobs"]);
    let missing = peer.rpc("status", json!(4), json!({"lockName": "nope"}));
    assert_eq!(missing["locks"], json!([]));
    let limited = peer.rpc("status", json!(5), json!({"prefix": "job", "limit": 2}));
    assert_eq!(names(&limited), ["job/a", "job/b"]);
    assert_eq!(limited["truncated"], true);
    let exact_fit = peer.rpc("status", json!(6), json!({"prefix": "job/", "limit": 3}));
    assert_eq!(exact_fit["truncated"], false);
}

#[test]
fn status_pages_continue_after_the_last_name_shown() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for (i, name) in ["a", "b", "c", "d", "e", "job/1", "job/2"]
        .iter()
        .enumerate()
    {
        peer.take(name, i as u64);
    }
    let page = peer.rpc("status", json!(1), json!({"limit": 2, "after": "b"}));
    assert_eq!(names(&page), ["c", "d"]);
    assert_eq!(page["truncated"], true);
    let page = peer.rpc("status", json!(2), json!({"after": "e"}));
    assert_eq!(names(&page), ["job/1", "job/2"]);
    assert_eq!(page["truncated"], false);
    // Within a prefix, before it, and past everything.
    let page = peer.rpc(
        "status",
        json!(3),
        json!({"prefix": "job/", "after": "job/1"}),
    );
    assert_eq!(names(&page), ["job/2"]);
    let page = peer.rpc("status", json!(4), json!({"prefix": "job/", "after": "a"}));
    assert_eq!(names(&page), ["job/1", "job/2"]);
    let page = peer.rpc("status", json!(5), json!({"after": "zzz"}));
    assert_eq!(page["locks"], json!([]));
    let bad = peer.rpc("status", json!(6), json!({"after": 5}));
    assert_eq!(bad["status"], "invalid", "{bad}");
}

#[test]
fn a_status_reply_takes_at_most_64_kib_and_the_cli_pages_through_all() {
    let server = TestServer::start();
    let mut peer = server.peer();
    for i in 0..1000 {
        peer.ask(&format!("{i:0>200}"), i);
    }
    for _ in 0..1000 {
        peer.recv();
    }
    peer.send(json!({"command": "status", "id": 1, "parameters": {"limit": 100000}}));
    let body = peer.recv_body();
    assert!(
        body.len() <= 64 * 1024,
        "status reply of {} bytes",
        body.len()
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pklock"))
        .args(["--server", &server.addr.to_string(), "status", "--json"])
        .output()
        .unwrap();
    let all: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(all["locks"].as_array().map(Vec::len), Some(1000));
    assert_eq!(all["truncated"], false);
}

#[test]
fn status_is_cut_to_fit_the_output_limit() {
    let server = TestServer::with(|c| c.max_output_bytes = 16 * 1024);
    let mut peer = server.peer();
    for i in 0..500 {
        peer.ask(&format!("{i:0>200}"), i);
    }
    for _ in 0..500 {
        peer.recv();
    }
    let body = {
        peer.send(json!({"command": "status", "id": 1}));
        peer.recv_body()
    };
    // Half of max_output_bytes is the most a status reply takes.
    assert!(
        body.len() <= 8 * 1024,
        "status reply of {} bytes",
        body.len()
    );
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["result"]["truncated"], true);
    assert!(!status["result"]["locks"].as_array().unwrap().is_empty());
}

#[test]
fn stats_count_what_happened() {
    let server = TestServer::start();
    let mut a = server.peer();
    let mut b = server.peer();
    a.take("x", 1);
    b.rpc("lock", json!(1), json!({"lockName": "x", "timeoutMs": 0}));
    b.ask("x", 2);
    b.send_body(b"not json");
    assert_eq!(b.recv()["error"], "invalidJson");
    drop(a);
    assert_eq!(b.recv()["result"]["status"], "ok");
    let s = stats(server.addr);
    assert_eq!(s["connections"], 2, "b and the stats connection: {s}");
    assert_eq!(s["locks"], 1);
    assert_eq!(s["locksHeld"], 1);
    assert_eq!(s["waiters"], 0);
    assert_eq!(s["lockEntries"], 1);
    assert_eq!(s["grants"], 2);
    assert_eq!(s["timeouts"], 1);
    assert_eq!(s["releasedByDisconnect"], 1);
    assert_eq!(s["rejectedConnections"], 0);
    assert_eq!(s["badMessages"], 1);
    assert!(s["uptimeMs"].as_u64().is_some());
}

fn status_body(peer: &mut common::Peer) -> Vec<u8> {
    peer.send(json!({"command": "status", "id": 1}));
    peer.recv_body()
}

#[test]
fn status_counts_json_escapes_when_cutting() {
    // Control characters take six bytes each once escaped.
    let server = TestServer::with(|c| c.max_output_bytes = 4096);
    let mut peer = server.peer();
    for i in 0..3u8 {
        let name = format!("{}", char::from(1 + i)).repeat(1024);
        peer.take(&name, u64::from(i));
    }
    let body = status_body(&mut peer);
    assert!(body.len() <= 2048, "status reply of {} bytes", body.len());
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["result"]["truncated"], true);
}

#[test]
fn status_cuts_a_long_holder_list_and_never_closes_the_caller() {
    let server = TestServer::with(|c| c.max_output_bytes = 16 * 1024);
    let mut readers: Vec<common::Peer> = (0..200).map(|_| server.peer()).collect();
    for (i, reader) in readers.iter_mut().enumerate() {
        reader.rpc("hello", json!(0), json!({"client": "r".repeat(200)}));
        let result = reader.rpc(
            "lock",
            json!(i),
            json!({"lockName": "shared", "mode": "shared"}),
        );
        assert_eq!(result["status"], "ok");
    }
    let mut monitor = server.peer();
    let token = monitor.take("important", 1);
    let body = status_body(&mut monitor);
    assert!(
        body.len() <= 8 * 1024,
        "status reply of {} bytes",
        body.len()
    );
    let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["result"]["truncated"], true);
    let shown = status["result"]["locks"][0]["holders"]
        .as_array()
        .unwrap()
        .len();
    assert!(shown > 0 && shown < 200, "{shown} holders shown");
    // The caller keeps its connection and its lock.
    let status = monitor.rpc("status", json!(2), json!({"lockName": "important"}));
    assert_eq!(status["locks"][0]["holders"][0]["token"], token);
}
