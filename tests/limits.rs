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
        again.send(json!({"command": "ping", "id": 1}));
        again
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
        eprintln!("skipped: this machine has no IPv6 loopback (::1)");
        return;
    }
    let server = TestServer::with(|c| {
        c.listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
        c.allowed = pklock::allow_list::AllowList::parse(&["::1"]).unwrap();
    });
    // The first listen address is the IPv4 one; a loopback IPv4 peer is not allowed.
    let mut outsider = server.peer();
    assert_eq!(outsider.expect_closed(), Vec::<serde_json::Value>::new());
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
    assert!(server.peer().expect_closed().is_empty());
}
