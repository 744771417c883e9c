//! TLS listeners, principals from certificates and tokens, `[[acl]]`
//! rights and force-release, seen from the wire.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::pki::{Ca, Pair};
use common::tls_peer::{TlsPeer, client_config};
use common::{Peer, TestServer, temp_dir};
use pklock::config::{AuthConfig, Config, TlsConfig};
use serde_json::json;
use sha2::{Digest, Sha256};

fn tls_config(server: &Pair, client_ca: Option<&Path>) -> TlsConfig {
    TlsConfig {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        cert_file: server.cert_file.clone(),
        key_file: server.key_file.clone(),
        client_ca_file: client_ca.map(Path::to_path_buf),
    }
}

/// A server with a plain and a TLS listener; returns it and the TLS address.
fn tls_server(
    server: &Pair,
    client_ca: Option<&Path>,
    tweak: impl FnOnce(&mut Config),
) -> (TestServer, SocketAddr) {
    let tls = tls_config(server, client_ca);
    let server = TestServer::with(|c| {
        c.tls = Some(tls);
        tweak(c);
    });
    let tls_addr = server.addrs[1];
    (server, tls_addr)
}

fn hash_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn a_tls_listener_serves_locks_beside_the_plain_one() {
    let dir = temp_dir("tls-serves");
    let ca = Ca::new(&dir, "main");
    let (server, tls_addr) = tls_server(&ca.server("server"), None, |_| {});
    let mut secure = TlsPeer::connect(tls_addr, client_config(&ca.cert_file, None)).unwrap();
    let hello = secure.hello(None).unwrap();
    assert_eq!(hello["principal"], "anonymous", "{hello}");
    let granted = secure.call("lock", json!({"lockName": "job"})).unwrap();
    assert_eq!(granted["result"]["status"], "ok", "{granted}");
    // The plain port is the same server: it waits for the TLS holder.
    let mut plain = Peer::connect(server.addr);
    plain.ask("job", 7);
    plain.expect_nothing(std::time::Duration::from_millis(200));
    let unlocked = secure.call("unlock", json!({"lockName": "job"})).unwrap();
    assert_eq!(unlocked["result"]["status"], "ok");
    let reply = plain.recv();
    assert_eq!(reply["result"]["status"], "ok", "{reply}");
    assert!(reply["result"]["token"].as_u64() > granted["result"]["token"].as_u64());
}

#[test]
fn plain_text_sent_to_the_tls_port_is_told_to_use_tls_and_closed() {
    let dir = temp_dir("tls-plain");
    let ca = Ca::new(&dir, "main");
    let (_server, tls_addr) = tls_server(&ca.server("server"), None, |_| {});
    let mut php = Peer::connect(tls_addr);
    php.send(json!({"command": "lock", "parameters": {"lockName": "a"}, "id": 0}));
    let said = php.expect_closed();
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0]["error"], "tlsRequired", "{said:?}");
    assert!(said[0]["detail"].as_str().unwrap().contains("TLS"));
}

#[test]
fn mutual_tls_names_the_principal_and_turns_away_clients_without_a_good_certificate() {
    let dir = temp_dir("mtls");
    let ca = Ca::new(&dir, "main");
    let stranger_ca = Ca::new(&dir, "stranger");
    let (_server, tls_addr) = tls_server(&ca.server("server"), Some(&ca.cert_file), |_| {});

    let alice = ca.client("alice");
    let mut peer = TlsPeer::connect(tls_addr, client_config(&ca.cert_file, Some(&alice))).unwrap();
    assert_eq!(peer.hello(None).unwrap()["principal"], "alice");

    let by_san = ca.client_with_san("backup.example");
    let mut peer = TlsPeer::connect(tls_addr, client_config(&ca.cert_file, Some(&by_san))).unwrap();
    assert_eq!(peer.hello(None).unwrap()["principal"], "backup.example");

    // No certificate, or one from another CA: no request is ever served.
    let stranger = stranger_ca.client("mallory");
    for client in [None, Some(&stranger)] {
        let refused = TlsPeer::connect(tls_addr, client_config(&ca.cert_file, client))
            .and_then(|mut peer| peer.hello(None));
        let error = refused.expect_err("served without a good client certificate");
        let text = error.to_string();
        assert!(
            text.contains("CertificateRequired")
                || text.contains("UnknownCA")
                || text.contains("BadCertificate"),
            "the client is told why: {text}"
        );
    }
}

#[test]
fn tokens_name_principals_and_a_bad_token_is_refused_and_closed() {
    let dir = temp_dir("tokens");
    let tokens_file = dir.join("tokens.toml");
    std::fs::write(
        &tokens_file,
        format!("deploy = \"{}\"\n", hash_hex("right-token")),
    )
    .unwrap();
    let server = TestServer::with(|c| {
        c.auth = AuthConfig {
            tokens_file: Some(tokens_file.clone()),
            allow_plaintext_auth: false,
        };
    });
    let mut good = Peer::connect(server.addr);
    let hello = good.rpc(
        "hello",
        json!(1),
        json!({"client": "c", "auth": "right-token"}),
    );
    assert_eq!(hello["principal"], "deploy", "{hello}");

    let mut bad = Peer::connect(server.addr);
    bad.send(json!({"command": "hello", "id": 1, "parameters": {"auth": "wrong-token"}}));
    let said = bad.expect_closed();
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0]["error"], "authFailed");
    assert_eq!(said[0]["id"], 1);
    assert!(
        !said[0].to_string().contains("wrong-token"),
        "the secret is not echoed"
    );
}

fn locked_down(c: &mut Config) {
    let example = Config::parse(include_str!("../config/locked-down.example.toml")).unwrap();
    c.acl = example.acl;
}

#[test]
fn an_anonymous_peer_can_neither_see_nor_touch_a_locked_down_prefix() {
    let dir = temp_dir("anonymous");
    let tokens_file = dir.join("tokens.toml");
    std::fs::write(
        &tokens_file,
        format!("deploy = \"{}\"\n", hash_hex("d-token")),
    )
    .unwrap();
    let server = TestServer::with(|c| {
        locked_down(c);
        c.auth.tokens_file = Some(tokens_file.clone());
    });
    let mut deploy = Peer::connect(server.addr);
    deploy.rpc(
        "hello",
        json!(1),
        json!({"client": "deployer", "auth": "d-token"}),
    );
    assert_eq!(deploy.lock("deploy/web", 2)["status"], "ok");

    let mut anonymous = Peer::connect(server.addr);
    // v1, exactly as pkLockClient sends it.
    let v1 = anonymous
        .call(json!({"command": "lock", "parameters": {"lockName": "deploy/web"}, "id": 0}));
    assert_eq!(v1, json!({"id": 0, "result": {"status": "denied"}}));
    assert_eq!(
        anonymous.lock("deploy/other", 3),
        json!({"status": "denied"}),
        "the same answer whether it exists or not"
    );
    let status = anonymous.rpc("status", json!(4), json!({"prefix": "deploy/"}));
    assert_eq!(
        status,
        json!({"status": "denied"}),
        "anonymous has no status right at all here"
    );
    assert_eq!(
        anonymous.rpc("stats", json!(5), json!({})),
        json!({"status": "denied"})
    );
    let forced = anonymous.rpc("forceRelease", json!(6), json!({"lockName": "deploy/web"}));
    assert_eq!(forced, json!({"status": "denied"}));
    // Its own unlock only ever touches its own entries.
    let v1_unlock = anonymous.call(json!({"command": "unlock", "lockName": "deploy/web"}));
    assert_eq!(v1_unlock["result"], "notFound");
    // The holder was not disturbed.
    let seen = deploy.rpc("status", json!(7), json!({}));
    assert_eq!(seen["locks"][0]["lockName"], "deploy/web", "{seen}");
    assert_eq!(seen["locks"][0]["holders"][0]["client"], "deployer");
    // Anonymous may still use the open prefix.
    assert_eq!(anonymous.lock("public/x", 8)["status"], "ok");
}

/// Every principal of config/locked-down.example.toml (and one it does not
/// name), every right, on a name under each prefix: what the wire answers.
#[test]
fn the_example_rules_give_each_principal_exactly_its_rights_on_each_prefix() {
    let dir = temp_dir("acl-matrix");
    let principals = ["deploy", "backup", "ops", "stranger"];
    let tokens_file = dir.join("tokens.toml");
    let lines: String = principals
        .iter()
        .map(|p| format!("{p} = \"{}\"\n", hash_hex(&format!("{p}-token"))))
        .collect();
    std::fs::write(&tokens_file, lines).unwrap();
    let server = TestServer::with(|c| {
        locked_down(c);
        c.auth.tokens_file = Some(tokens_file.clone());
    });
    // (principal, [lock, status, admin] on deploy/, backup/, public/, other)
    let expected: [(&str, [[bool; 3]; 4]); 5] = [
        (
            "deploy",
            [
                [true, true, false],
                [false; 3],
                [true, false, false],
                [false; 3],
            ],
        ),
        (
            "backup",
            [
                [false; 3],
                [true, false, false],
                [true, false, false],
                [false; 3],
            ],
        ),
        (
            "ops",
            [
                [false, true, true],
                [false, true, true],
                [true, true, true],
                [false, true, true],
            ],
        ),
        (
            "stranger",
            [[false; 3], [false; 3], [true, false, false], [false; 3]],
        ),
        (
            "anonymous",
            [[false; 3], [false; 3], [true, false, false], [false; 3]],
        ),
    ];
    let names = ["deploy/a", "backup/a", "public/a", "other/a"];
    let mut id = 0;
    for (principal, rows) in expected {
        let mut peer = Peer::connect(server.addr);
        let mut parameters = json!({"client": principal});
        if principal != "anonymous" {
            parameters["auth"] = json!(format!("{principal}-token"));
        }
        let hello = peer.rpc("hello", json!(0), parameters);
        assert_eq!(hello["principal"], principal, "{hello}");
        for (name, [lock, status, admin]) in names.iter().zip(rows) {
            id += 1;
            let took = peer.lock(name, id)["status"].clone();
            assert_eq!(took == "ok", lock, "{principal} lock {name}: {took}");
            assert_eq!(took == "denied", !lock, "{principal} lock {name}: {took}");
            // Status on the name: denied outright without any status right,
            // else the lock is listed only where the right covers it.
            let seen = peer.rpc("status", json!(id), json!({"lockName": name}));
            let listed = seen["locks"].as_array().is_some_and(|l| !l.is_empty());
            if lock {
                assert_eq!(listed, status, "{principal} status {name}: {seen}");
            } else if status {
                assert_eq!(seen["status"], "ok", "{principal} status {name}: {seen}");
            }
            // Force-release of a name this connection holds is refused as
            // its own; of one nobody holds, notFound, if admin.
            let forced = peer.rpc(
                "forceRelease",
                json!(id),
                json!({"lockName": format!("{name}-free")}),
            );
            let expect = if admin { "notFound" } else { "denied" };
            assert_eq!(
                forced["status"], expect,
                "{principal} forceRelease {name}: {forced}"
            );
        }
        let stats = peer.rpc("stats", json!(0), json!({}));
        let any_admin = rows.iter().any(|r| r[2]);
        assert_eq!(
            stats["status"] == "ok",
            any_admin,
            "{principal} stats: {stats}"
        );
    }
}

#[test]
fn force_release_closes_every_holder_and_hands_the_lock_on() {
    let server = TestServer::start();
    let mut holder = Peer::connect(server.addr);
    holder.rpc("hello", json!(0), json!({"client": "stuck-job"}));
    holder.take("job", 1);
    let mut waiter = Peer::connect(server.addr);
    waiter.ask("job", 2);
    let mut admin = Peer::connect(server.addr);
    let forced = admin.rpc("forceRelease", json!(3), json!({"lockName": "job"}));
    assert_eq!(forced["status"], "ok", "{forced}");
    assert_eq!(forced["closed"][0]["client"], "stuck-job", "{forced}");
    assert!(
        holder.expect_closed().is_empty(),
        "the holder is closed, as a dead one"
    );
    let granted = waiter.recv();
    assert_eq!(granted["result"]["status"], "ok", "{granted}");
    assert_eq!(
        admin.rpc(
            "forceRelease",
            json!(4),
            json!({"lockName": "nobody-holds-this"})
        )["status"],
        "notFound"
    );
}
