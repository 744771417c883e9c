//! Abusive peers: slowloris connections that dribble one byte a second, and
//! ten thousand connections each holding a lock. The server must stay up and
//! correct and keep serving everybody else. (Connections over
//! `max_connections`, peers outside `allowed` and peers that never read are
//! in tests/limits.rs and tests/bad_input.rs.)

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{PATIENCE, Peer, ServerProcess, TestServer, eventually, stats, temp_dir};
use serde_json::json;

/// Lock/unlock round trips of a well-behaved client, in microseconds, sorted.
fn cycle_latencies(peer: &mut Peer, cycles: usize) -> Vec<u128> {
    let mut latencies: Vec<u128> = (0..cycles)
        .map(|i| {
            let start = Instant::now();
            peer.take("probe", i as u64);
            peer.unlock("probe");
            start.elapsed().as_micros()
        })
        .collect();
    latencies.sort_unstable();
    latencies
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[test]
fn slowloris_connections_do_not_slow_anyone_else_down() {
    let server = TestServer::start();
    let mut probe = server.peer();
    let before = cycle_latencies(&mut probe, 200);

    // 200 connections, each sending one byte of a lock request per second.
    let frame = {
        let body =
            json!({"command": "lock", "id": 1, "parameters": {"lockName": "slow"}}).to_string();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    };
    let mut slow: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dribbler = {
        let stop = Arc::clone(&stop);
        let frame = frame.clone();
        std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) && sent < frame.len() {
                for stream in &mut slow {
                    stream.write_all(&frame[sent..sent + 1]).unwrap();
                }
                sent += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            slow
        })
    };
    let started = Instant::now();
    let mut during = Vec::new();
    while started.elapsed() < Duration::from_secs(4) {
        during.extend(cycle_latencies(&mut probe, 50));
    }
    stop.store(true, Ordering::SeqCst);
    let slow = dribbler.join().unwrap();
    during.sort_unstable();
    println!(
        "slowloris: probe lock+unlock p50/p99 {}/{} us before, {}/{} us with 200 dribbling connections ({} cycles)",
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
        during.len()
    );
    // A server blocked by a slow peer would stall for a second at a time.
    let worst = *during.last().unwrap();
    assert!(
        worst < 500_000,
        "a lock/unlock took {worst} us while slow peers dribbled"
    );
    // The slow peers are still connected, and nothing of theirs was granted.
    let s = stats(server.addr);
    assert_eq!(s["connections"], 202, "{s}");
    assert_eq!(s["locksHeld"], 0, "{s}");
    drop(slow);
    eventually("slow peers gone", || stats(server.addr)["connections"] == 2);
}

/// Raises this process's open-file limit to at least `wanted`, as root if need be.
fn raise_own_fd_limit(wanted: u64) -> bool {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if soft >= wanted {
        return true;
    }
    let hard = hard.max(wanted);
    rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, hard).is_ok()
}

#[test]
fn ten_thousand_connections_each_holding_a_lock() {
    const HOLDERS: usize = 10_000;
    // The server is another process, with its own limit; this one needs a
    // descriptor per client connection.
    if !raise_own_fd_limit(HOLDERS as u64 + 512) {
        common::skip(
            "ten_thousand_connections",
            "cannot raise the open-file limit",
        );
        return;
    }
    let dir = temp_dir("ten-thousand");
    let server = ServerProcess::start(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\nmax_connections = 10100\n",
    );
    let started = Instant::now();
    let mut holders: Vec<Peer> = Vec::with_capacity(HOLDERS);
    for i in 0..HOLDERS {
        let mut peer = Peer::connect(server.addr);
        peer.ask(&format!("h/{i}"), i as u64);
        holders.push(peer);
    }
    for (i, peer) in holders.iter_mut().enumerate() {
        let reply = peer.recv();
        assert_eq!(
            (reply["id"].as_u64(), reply["result"]["status"].as_str()),
            (Some(i as u64), Some("ok"))
        );
    }
    println!(
        "ten thousand: {HOLDERS} connections holding a lock each after {:?}",
        started.elapsed()
    );
    let s = Peer::connect(server.addr).rpc("stats", json!(1), json!({}));
    assert_eq!(s["locksHeld"], HOLDERS, "{s}");
    // Everyone else is still served, and a held lock is still exclusive.
    let mut probe = Peer::connect(server.addr);
    let latencies = cycle_latencies(&mut probe, 200);
    println!(
        "ten thousand: probe lock+unlock p50/p99 {}/{} us beside them",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    let result = probe.rpc(
        "lock",
        json!(1),
        json!({"lockName": "h/42", "timeoutMs": 0}),
    );
    assert_eq!(result["status"], "timeout");
    drop(holders);
    let mut observer = Peer::connect(server.addr);
    let deadline = Instant::now() + PATIENCE;
    while observer.rpc("stats", json!(1), json!({}))["locksHeld"] != 0 {
        assert!(
            Instant::now() < deadline,
            "locks of closed connections still held"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
