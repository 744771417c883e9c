//! Who may connect, and how many: `max_connections` and `allowed`.

mod common;

use std::net::{SocketAddr, TcpListener};

use common::{Peer, TestServer, eventually, stats};
use serde_json::json;

#[test]
fn connection_over_the_limit_is_refused_at_once_and_the_others_keep_working() {
    let server = TestServer::with(|c| c.max_connections = 3);
    let mut peers: Vec<Peer> = (0..3).map(|_| server.peer()).collect();
    let token = peers[0].take("kept", 1);
    for peer in &mut peers {
        assert_eq!(
            peer.rpc("ping", json!(1), json!({})),
            json!({"status": "ok"})
        );
    }
    let mut extra = server.peer();
    let messages = extra.expect_closed();
    assert_eq!(
        messages,
        vec![json!({"error": "tooManyConnections", "limit": 3})]
    );
    for peer in &mut peers {
        assert_eq!(
            peer.rpc("ping", json!(2), json!({})),
            json!({"status": "ok"})
        );
    }
    let status = peers[1].rpc("status", json!(3), json!({"lockName": "kept"}));
    assert_eq!(status["locks"][0]["holders"][0]["token"], token);
    // A freed slot is usable again.
    drop(peers.pop());
    eventually("slot freed", || {
        let mut again = server.peer();
        again.try_send(json!({"command": "ping", "id": 1}))
            && again
                .try_recv()
                .is_some_and(|reply| reply["result"]["status"] == "ok")
    });
}

fn ipv6_loopback_available() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn peers_outside_allowed_are_closed_and_counted_and_ipv6_peers_are_served() {
    if !ipv6_loopback_available() {
        common::skip("ipv6", "this machine has no IPv6 loopback (::1)");
        return;
    }
    let server = TestServer::with(|c| {
        c.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        c.allowed = pklock::allow_list::AllowList::parse(&["::1"]).unwrap();
    });
    // The first listen address is the IPv4 one; a loopback IPv4 peer is not allowed.
    let mut outsider = server.peer();
    assert_eq!(
        outsider.expect_closed(),
        vec![
            json!({"error": "denied", "detail": "127.0.0.1 is not in the server's `allowed` list"})
        ]
    );
    let v6: SocketAddr = server.addrs[1];
    let mut insider = Peer::connect(v6);
    insider.take("v6", 1);
    let s = stats(v6);
    assert_eq!(s["rejectedConnections"], 1);
    assert_eq!(s["locksHeld"], 1);
}

#[test]
fn cidr_ranges_admit_their_members() {
    let server = TestServer::with(|c| {
        c.allowed = pklock::allow_list::AllowList::parse(&["127.0.0.0/8"]).unwrap();
    });
    let mut peer = server.peer();
    assert_eq!(
        peer.rpc("ping", json!(1), json!({})),
        json!({"status": "ok"})
    );
    let server = TestServer::with(|c| {
        c.allowed = pklock::allow_list::AllowList::parse(&["10.0.0.0/8", "::1"]).unwrap();
    });
    assert_eq!(server.peer().expect_closed()[0]["error"], "denied");
}

#[test]
fn more_than_a_thousand_connections_are_all_served() {
    // The original stopped answering past 1,016 connections (select() and 1024
    // descriptors). Each connection here holds its own lock.
    let server = TestServer::start();
    let mut peers: Vec<Peer> = Vec::new();
    for i in 0..1100u64 {
        let mut peer = server.peer();
        peer.ask(&format!("many/{i}"), i);
        peers.push(peer);
    }
    for (i, peer) in peers.iter_mut().enumerate() {
        let reply = peer.recv();
        assert_eq!(reply["id"], i, "{reply}");
        assert_eq!(reply["result"]["status"], "ok");
    }
    let s = stats(server.addr);
    assert_eq!(s["locksHeld"], 1100);
    assert_eq!(s["connections"], 1101);
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_descriptors_the_server_sheds_new_connections_without_spinning() {
    let dir = common::temp_dir("emfile");
    let mut server = common::ServerProcess::start_with(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n",
        Some(40),
        &[],
    );
    let mut holder = Peer::connect(server.addr);
    holder.take("kept", 1);
    // Far more connections than descriptors.
    let flood: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(server.addr).ok())
        .collect();
    server.wait_for_log("out of file descriptors");
    let before = cpu_ticks(server.child.id());
    std::thread::sleep(std::time::Duration::from_secs(1));
    let spent = cpu_ticks(server.child.id()) - before;
    // A server spinning on a ready listener would use the whole second (100 ticks).
    assert!(
        spent < 50,
        "the server used {spent} ticks of CPU in 1 s while idle"
    );
    assert_eq!(
        holder.rpc("ping", json!(1), json!({})),
        json!({"status": "ok"})
    );
    // Once descriptors free up, new connections are served again.
    drop(flood);
    eventually("a new connection served", || {
        let mut late = Peer::connect(server.addr);
        late.try_send(json!({"command": "ping", "id": 2}))
            && late
                .try_recv()
                .is_some_and(|reply| reply["result"]["status"] == "ok")
    });
}
