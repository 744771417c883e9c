//! The Prometheus endpoint: its text parses, and its counters follow what
//! really happened on the wire.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{Peer, TestServer};
use serde_json::json;

/// A scrape's samples by `name{labels}`, after checking the response and
/// that every sample's family was declared with HELP and TYPE.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    scrape_from("127.0.0.1", addr)
}

/// [`scrape`] from the loopback address `from`.
fn scrape_from(from: &str, addr: SocketAddr) -> HashMap<String, f64> {
    let mut stream = connect_from(from, addr);
    stream.set_read_timeout(Some(common::PATIENCE)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("headers, then a body");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .expect("a length");
    assert_eq!(length, body.len());
    let mut typed = HashMap::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "{name} has no TYPE line");
        samples.insert(series.to_string(), value);
    }
    samples
}

fn get(samples: &HashMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

#[test]
fn the_counters_move_with_real_traffic() {
    let server = TestServer::with(|c| {
        c.metrics_listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.metrics_lock_prefixes = vec!["jobs/".to_string()];
    });
    let metrics = server.metrics_addrs[0];
    let before = scrape(metrics);
    assert_eq!(get(&before, "pklock_up"), 1.0);

    // A grant at once, released by unlock.
    let mut a = Peer::connect(server.addr);
    a.take("plain", 1);
    assert_eq!(a.unlock("plain"), "ok");
    // A wait of 200 ms, then a grant; the holder then dies.
    a.take("jobs/nightly", 2);
    let mut b = Peer::connect(server.addr);
    b.ask("jobs/nightly", 3);
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    assert_eq!(b.recv()["result"]["status"], "ok");
    // A wait that times out, one cancelled by unlock, one bad request.
    let mut c = Peer::connect(server.addr);
    let timed = c.rpc(
        "lock",
        json!(4),
        json!({"lockName": "jobs/nightly", "timeoutMs": 0}),
    );
    assert_eq!(timed["status"], "timeout");
    c.ask("jobs/nightly", 5);
    c.send(json!({"command": "unlock", "id": "u", "parameters": {"lockName": "jobs/nightly"}}));
    assert_eq!(c.recv()["result"]["status"], "cancelled");
    assert_eq!(c.recv()["result"]["status"], "ok");
    let invalid = c.rpc("lock", json!(6), json!({"lockName": ""}));
    assert_eq!(invalid["status"], "invalid");
    // An admin force-releases b's lock, with d waiting.
    let mut d = Peer::connect(server.addr);
    d.ask("jobs/nightly", 7);
    let forced = c.rpc(
        "forceRelease",
        json!(8),
        json!({"lockName": "jobs/nightly"}),
    );
    assert_eq!(forced["status"], "ok");
    assert_eq!(d.recv()["result"]["status"], "ok");

    std::thread::sleep(Duration::from_millis(1100)); // past the one-second cache
    let after = scrape(metrics);
    let moved = |series: &str| get(&after, series) - get(&before, series);
    assert_eq!(
        moved("pklock_grants_total"),
        4.0,
        "plain, nightly twice more, d"
    );
    assert_eq!(moved("pklock_timeouts_total"), 1.0);
    assert_eq!(moved("pklock_cancels_total"), 1.0);
    assert_eq!(moved("pklock_releases_total{cause=\"unlock\"}"), 1.0);
    assert_eq!(moved("pklock_releases_total{cause=\"disconnect\"}"), 1.0);
    assert_eq!(moved("pklock_releases_total{cause=\"force\"}"), 1.0);
    assert_eq!(moved("pklock_errors_total{code=\"invalid\"}"), 1.0);
    assert_eq!(moved("pklock_errors_total{code=\"forceReleased\"}"), 1.0);
    assert!(moved("pklock_connections_accepted_total") >= 4.0);
    assert_eq!(
        get(&after, "pklock_locks_held"),
        1.0,
        "d holds jobs/nightly"
    );
    assert_eq!(moved("pklock_wait_seconds_count"), 4.0);
    assert_eq!(
        get(&after, "pklock_wait_seconds_bucket{le=\"0.1\"}"),
        get(&after, "pklock_wait_seconds_count") - 1.0,
        "one wait of 200 ms, the others at once (d's took a moment)"
    );
    assert!(get(&after, "pklock_wait_seconds_sum") >= 0.2);
    assert_eq!(
        moved("pklock_hold_seconds_count"),
        3.0,
        "unlock, death, force"
    );
    assert_eq!(
        get(&after, "pklock_lock_holders{lock=\"jobs/nightly\"}"),
        1.0
    );
    assert!(
        !after.keys().any(|series| series.contains("lock=\"plain\"")),
        "no series for locks outside metrics_lock_prefixes"
    );
    assert!(get(&after, "pklock_tokens_left") > 1e12);
}

#[test]
fn scrapes_are_bounded_and_anything_but_get_metrics_is_refused() {
    let server = TestServer::with(|c| {
        c.metrics_listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.allowed = pklock::allow_list::AllowList::parse(&["127.0.0.0/8"]).unwrap();
    });
    let metrics = server.metrics_addrs[0];
    let mut wrong = TcpStream::connect(metrics).unwrap();
    wrong.write_all(b"POST /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    wrong.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    // Closed, not merely left unanswered (a scrape's deadline is 5 s).
    let closed_at_once = |from: &str| {
        let mut extra = connect_from(from, metrics);
        extra
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut byte = [0u8; 1];
        match extra.read(&mut byte) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    // Scrapes that never send their request: one address gets four slots,
    // and its fifth is closed at once; another address is still answered.
    let mut idle: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.2", metrics)).collect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(closed_at_once("127.0.0.2"), "a fifth from one address");
    assert!(scrape_from("127.0.0.3", metrics).contains_key("pklock_up"));
    // Sixteen take every slot; the next is closed at once, and lock clients
    // never notice.
    for from in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        idle.extend((0..4).map(|_| connect_from(from, metrics)));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(closed_at_once("127.0.0.6"), "a seventeenth");
    let mut client = Peer::connect(server.addr);
    assert_eq!(client.lock("x", 1)["status"], "ok");
    drop(idle);
}

/// A connection to `to` from the loopback address `from`.
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// The names the dashboard and the alerts use, each a family the server
/// exports (histograms by their `_bucket`, `_sum`, `_count` series).
#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_server_exports() {
    let server = TestServer::with(|c| {
        c.metrics_listen = vec!["127.0.0.1:0".parse().unwrap()];
        c.metrics_lock_prefixes = vec!["jobs/".to_string()];
    });
    let mut holder = Peer::connect(server.addr);
    holder.take("jobs/a", 1);
    let exported: Vec<String> = scrape(server.metrics_addrs[0])
        .keys()
        .map(|series| series.split('{').next().unwrap().to_string())
        .collect();
    for file in ["contrib/alerts.yml", "contrib/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(file).unwrap();
        let mut used = 0;
        for (at, _) in text.match_indices("pklock_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            assert!(
                exported.contains(&name),
                "{file} uses {name}, which is not exported"
            );
            used += 1;
        }
        assert!(used > 5, "{file} uses {used} metrics");
    }
}
