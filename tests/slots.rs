//! Connection slots: one host cannot take them all (`max_connections_per_ip`),
//! and a connection that never completes a frame gives its slot back after
//! `frame_timeout_ms`, unless it holds or waits for a lock.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{netns_or_skip, server_for};
use common::{PATIENCE, Peer, ServerProcess, TestServer, eventually, stats, temp_dir};
use serde_json::json;

#[test]
fn half_sent_and_never_sent_frames_free_their_slot_but_holders_keep_theirs() {
    let server = TestServer::with(|c| c.frame_timeout_ms = 300);
    // Three bytes of a length prefix, and nothing more.
    let mut dribbler = server.peer();
    dribbler.send_raw(&[0, 0, 0]);
    // Connected, and never a byte.
    let mut mute = server.peer();
    // A holder that then starts a frame it never finishes.
    let mut holder = server.peer();
    holder.take("kept", 1);
    holder.send_raw(&[0, 0]);
    // A client that spoke once and is now idle between requests.
    let mut idle = server.peer();
    assert_eq!(
        idle.rpc("ping", json!(1), json!({})),
        json!({"status": "ok"})
    );

    let started = Instant::now();
    assert!(dribbler.expect_closed().is_empty());
    assert!(mute.expect_closed().is_empty());
    let took = started.elapsed();
    assert!(took < PATIENCE, "closed after {took:?}");
    std::thread::sleep(Duration::from_millis(700));
    let s = stats(server.addr);
    assert_eq!(s["frameTimeouts"], 2, "{s}");
    assert_eq!(s["locksHeld"], 1, "the holder kept its lock: {s}");
    assert_eq!(
        idle.rpc("ping", json!(2), json!({})),
        json!({"status": "ok"})
    );
    // The holder's connection is whole: finishing its frame gets an answer.
    let body = json!({"command": "ping", "id": 7}).to_string();
    let mut rest = (body.len() as u32).to_be_bytes()[2..].to_vec();
    rest.extend_from_slice(body.as_bytes());
    holder.send_raw(&rest);
    assert_eq!(holder.recv()["id"], 7);
}

#[test]
fn one_host_cannot_take_every_connection_slot() {
    let Some(netns) = netns_or_skip("per-host connection limit") else {
        return;
    };
    let dir = temp_dir("per-ip");
    let (_server, remote, local) = server_for(&netns, &dir, "max_connections_per_ip = 3\n");
    let in_netns = |args: &[&str]| {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &netns.name, env!("CARGO_BIN_EXE_pklock")])
            .args(["--server", &remote.to_string()])
            .args(args);
        command
    };
    // Three holders from the namespace's one address fill its share.
    let mut holders: Vec<_> = (0..3)
        .map(|i| {
            in_netns(&["lock", &format!("h{i}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    eventually("three holders", || stats(local)["locksHeld"] == 3);
    let refused = in_netns(&["ping"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("max_connections_per_ip"), "{stderr}");
    // Other hosts (loopback here) are unaffected.
    for i in 0..10 {
        Peer::connect(local).take(&format!("local{i}"), 1);
    }
    // A slot freed is a slot to be had again.
    drop(holders[0].stdin.take());
    common::wait_exit(&mut holders[0], PATIENCE).expect("the holder exits");
    let accepted = in_netns(&["ping"]).output().unwrap();
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    for holder in &mut holders {
        let _ = holder.kill();
        let _ = holder.wait();
    }
}

#[test]
fn connect_and_close_storms_cannot_flood_the_log_or_forge_lines() {
    let dir = temp_dir("log-storm");
    let server = ServerProcess::start(&dir, "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n");
    for i in 0..2000 {
        let mut peer = Peer::connect(server.addr);
        if i % 10 == 0 {
            // A client name made to look like a log line of its own.
            peer.rpc(
                "hello",
                json!(1),
                json!({"client": "x\n[2026-01-01T00:00:00Z ERROR pklock] forged\u{1b}[2J"}),
            );
            peer.take("storm", 2);
        }
    }
    // Let the last closes be logged, then read everything logged so far.
    std::thread::sleep(Duration::from_millis(500));
    let lines: Vec<String> = server.log.try_iter().collect();
    println!("2,000 connect/close cycles wrote {} log lines", lines.len());
    assert!(lines.len() < 400, "{} lines", lines.len());
    // Each mention of the name is one line, with its newline spelled out.
    let named: Vec<&String> = lines.iter().filter(|l| l.contains("forged")).collect();
    assert!(!named.is_empty());
    assert!(
        named
            .iter()
            .all(|l| l.contains("x\\n[2026-01-01") && !l.contains('\u{1b}')),
        "a peer forged a log line: {named:?}"
    );
}
