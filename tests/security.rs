//! TLS listeners, principals from certificates and tokens, `[[acl]]`
//! rights and force-release, seen from the wire.

mod common;

use std::net::SocketAddr;
use std::path::Path;

use common::pki::{Ca, Pair};
use common::tls_peer::{TlsPeer, client_config};
use common::{Peer, TestServer, temp_dir};
use pklock::auth::token_hash;
use pklock::config::{AuthConfig, Config, TlsConfig};
use serde_json::json;

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

/// A tokens file in `dir` giving each principal its token.
fn tokens_file(dir: &Path, tokens: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.join("tokens.toml");
    let lines: String = tokens
        .iter()
        .map(|(principal, token)| format!("{principal} = \"{}\"\n", token_hash(token)))
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
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
    let tokens_file = tokens_file(&dir, &[("deploy", "right-token")]);
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
    let tokens_file = tokens_file(&dir, &[("deploy", "d-token")]);
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
    let tokens_file = tokens_file(
        &dir,
        &[
            ("deploy", "deploy-token"),
            ("backup", "backup-token"),
            ("ops", "ops-token"),
            ("stranger", "stranger-token"),
        ],
    );
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
    let told = holder.expect_closed();
    assert_eq!(told.len(), 1, "told why, then closed: {told:?}");
    assert_eq!(told[0]["error"], "forceReleased", "{told:?}");
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

#[test]
fn force_release_makes_the_holders_pklock_run_stop_its_command() {
    let dir = temp_dir("force-run");
    let server = TestServer::start();
    let marker = dir.join("got-term");
    let started = dir.join("started");
    let script = format!(
        "trap 'echo TERM > {}; exit 0' TERM; touch {}; while true; do sleep 0.05; done",
        marker.display(),
        started.display()
    );
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_pklock"))
        .env("PKLOCK_SERVER", server.addr.to_string())
        .args([
            "run",
            "nightly",
            // Room for a loaded machine to run the trap before SIGKILL.
            "--kill-grace",
            "3s",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut admin = Peer::connect(server.addr);
    common::eventually("pklock run holds the lock", || {
        admin.rpc("status", json!(0), json!({"lockName": "nightly"}))["locks"][0]["holders"]
            .as_array()
            .is_some_and(|h| h.len() == 1)
    });
    // The command has its trap in place before the lock is taken away.
    common::eventually("the command runs", || started.exists());
    let mut next = Peer::connect(server.addr);
    next.ask("nightly", 1);
    let forced = admin.rpc("forceRelease", json!(2), json!({"lockName": "nightly"}));
    assert_eq!(forced["status"], "ok", "{forced}");
    let granted = next.recv();
    assert_eq!(
        granted["result"]["status"], "ok",
        "the next in line has it: {granted}"
    );
    // The holder's client sees the close, finds its grant not given back,
    // and stops the command.
    let status = common::wait_exit(&mut run, common::PATIENCE).expect("pklock run exits");
    assert_eq!(status.code(), Some(75), "lost-lock exit code");
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap_or_default(),
        "TERM\n"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("lost the lock") && stderr.contains("\"nightly\""),
        "{stderr}"
    );
}

#[test]
fn a_certificate_reload_under_load_loses_no_lock_and_new_connections_get_the_new_one() {
    use common::ServerProcess;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = temp_dir("cert-reload");
    let old_ca = Ca::new(&dir, "old");
    let new_ca = Ca::new(&dir, "new");
    let old = old_ca.server("server");
    let new = new_ca.server("server");
    let cert_file = dir.join("server.crt");
    let key_file = dir.join("server.key");
    std::fs::copy(&old.cert_file, &cert_file).unwrap();
    std::fs::copy(&old.key_file, &key_file).unwrap();
    let mut server = ServerProcess::start(
        &dir,
        &format!(
            "listen = [\"127.0.0.1:0\"]\nrestart_grace_ms = 0\n[tls]\nlisten = [\"127.0.0.1:0\"]\n\
             cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert_file.display(),
            key_file.display()
        ),
    );
    let tls_addr = server.wait_for_address("listening for TLS on ");
    let trusts_old = client_config(&old_ca.cert_file, None);
    let trusts_new = client_config(&new_ca.cert_file, None);

    // Twenty holders over TLS, and two clients taking turns on one lock.
    let mut holders: Vec<(TlsPeer, u64)> = (0..20)
        .map(|i| {
            let mut peer = TlsPeer::connect(tls_addr, trusts_old.clone()).unwrap();
            let granted = peer
                .call("lock", json!({"lockName": format!("held/{i}")}))
                .unwrap();
            assert_eq!(granted["result"]["status"], "ok");
            (peer, granted["result"]["token"].as_u64().unwrap())
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = (0..2)
        .map(|_| {
            let (stop, cycles, config) = (stop.clone(), cycles.clone(), trusts_old.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut peer = TlsPeer::connect(tls_addr, config).map_err(|e| e.to_string())?;
                while !stop.load(Ordering::Relaxed) {
                    for command in ["lock", "unlock"] {
                        let reply = peer
                            .call(command, json!({"lockName": "busy"}))
                            .map_err(|e| format!("{command}: {e}"))?;
                        if reply["result"]["status"] != "ok" {
                            return Err(format!("{command}: {reply}"));
                        }
                    }
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::copy(&new.cert_file, &cert_file).unwrap();
    std::fs::copy(&new.key_file, &key_file).unwrap();
    let before = cycles.load(Ordering::Relaxed);
    server.signal("HUP");
    server.wait_for_log("TLS certificate, key and client CA read again");
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        churner
            .join()
            .unwrap()
            .expect("the churning clients never failed");
    }
    assert!(
        cycles.load(Ordering::Relaxed) > before,
        "the churn went on across the reload"
    );

    // New connections get the new certificate; the old CA no longer fits.
    let mut fresh = TlsPeer::connect(tls_addr, trusts_new).expect("the new certificate is served");
    let listed = fresh.call("status", json!({"prefix": "held/"})).unwrap();
    assert_eq!(
        listed["result"]["locks"].as_array().map(Vec::len),
        Some(20),
        "{listed}"
    );
    let refused = TlsPeer::connect(tls_addr, trusts_old.clone()).map(|_| ());
    assert!(refused.is_err(), "the old certificate is still served");
    // Every holder still holds its lock, on its open connection.
    for (i, (peer, token)) in holders.iter_mut().enumerate() {
        let again = peer
            .call("lock", json!({"lockName": format!("held/{i}")}))
            .unwrap();
        assert_eq!(again["result"]["status"], "ok", "{again}");
        assert_eq!(
            again["result"]["token"].as_u64(),
            Some(*token),
            "the same grant"
        );
    }
}

/// A deadlock answer names only what its asker may see with `status`: a
/// cycle through another tenant's locks is reported, their names are not.
/// (Anonymous gets `admin` only for the test's `stats`.)
#[test]
fn a_deadlock_answer_hides_the_locks_and_clients_the_asker_may_not_see() {
    let dir = temp_dir("deadlock-acl");
    let tokens_file = tokens_file(&dir, &[("alice", "a-token"), ("bob", "b-token")]);
    let server = TestServer::with(|c| {
        c.acl = Config::parse(
            "[[acl]]\nprincipal = \"alice\"\nprefixes = [\"a/\"]\nrights = [\"lock\"]\n\
             [[acl]]\nprincipal = \"bob\"\nprefixes = [\"a/\", \"b/\"]\nrights = [\"lock\", \"status\"]\n\
             [[acl]]\nprincipal = \"anonymous\"\nprefixes = [\"\"]\nrights = [\"admin\"]\n",
        )
        .unwrap()
        .acl;
        c.auth.tokens_file = Some(tokens_file.clone());
    });
    let named = |client: &str, token: &str| {
        let mut peer = Peer::connect(server.addr);
        let hello = peer.rpc("hello", json!(0), json!({"client": client, "auth": token}));
        assert_eq!(hello["status"], "ok", "{hello}");
        peer
    };
    let waiters = |n: u64| {
        common::eventually("the waits to be queued", || {
            common::stats(server.addr)["waiters"] == json!(n)
        })
    };

    // alice (lock on a/ only) closes a cycle through bob's b/ lock.
    let mut alice = named("alice-1", "a-token");
    let mut bob1 = named("bob-payroll-1", "b-token");
    let mut bob2 = named("bob-payroll-2", "b-token");
    assert_eq!(alice.lock("a/1", 1)["status"], "ok");
    assert_eq!(bob1.lock("a/2", 1)["status"], "ok");
    assert_eq!(bob2.lock("b/secret-merger", 1)["status"], "ok");
    bob1.send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "b/secret-merger"}}));
    bob2.send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "a/1"}}));
    waiters(2);
    let told = alice.lock("a/2", 2);
    assert_eq!(told["status"], "deadlock", "{told}");
    let cycle = told["cycle"].as_array().unwrap();
    assert_eq!(cycle.len(), 3, "{told}");
    assert!(
        !told.to_string().contains("secret-merger") && !told.to_string().contains("bob-payroll"),
        "another tenant's names leaked: {told}"
    );
    assert_eq!(cycle[0]["lockName"], "a/2", "its own wait: {told}");
    assert_eq!(cycle[0]["client"], "alice-1", "{told}");
    assert!(
        cycle[1..]
            .iter()
            .all(|step| step["lockName"] == "" && step["client"] == ""),
        "alice may see no other lock with status: {told}"
    );

    // bob (status on a/ and b/) closing a cycle through alice sees it all.
    let mut bob3 = named("bob-3", "b-token");
    assert_eq!(bob3.lock("a/3", 1)["status"], "ok");
    assert_eq!(alice.lock("a/4", 3)["status"], "ok");
    alice.send(json!({"command": "lock", "id": 4, "parameters": {"lockName": "a/3"}}));
    waiters(3);
    let told = bob3.lock("a/4", 2);
    assert_eq!(told["status"], "deadlock", "{told}");
    assert_eq!(told["cycle"][1]["lockName"], "a/3", "{told}");
    assert_eq!(told["cycle"][1]["client"], "alice-1", "{told}");
    drop((alice, bob1, bob2, bob3));
    waiters(0);

    // A nested run of alice's (hello `within` its parent's grant) closing a
    // cycle through its parent: the first step, the parent's, is its own.
    let mut parent = named("alice-run", "a-token");
    let mut bob1 = named("bob-payroll-1", "b-token");
    let mut bob2 = named("bob-payroll-2", "b-token");
    let parent_token = parent.take("a/5", 1);
    assert_eq!(bob1.lock("a/6", 1)["status"], "ok");
    assert_eq!(bob2.lock("b/secret-merger", 1)["status"], "ok");
    bob1.send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "b/secret-merger"}}));
    bob2.send(json!({"command": "lock", "id": 2, "parameters": {"lockName": "a/5"}}));
    waiters(2);
    let mut nested = Peer::connect(server.addr);
    let hello = nested.rpc(
        "hello",
        json!(0),
        json!({"client": "alice-nested", "auth": "a-token",
               "within": {"lockName": "a/5", "token": parent_token}}),
    );
    assert_eq!(hello["status"], "ok", "{hello}");
    let told = nested.lock("a/6", 1);
    assert_eq!(told["status"], "deadlock", "{told}");
    assert_eq!(told["cycle"][0]["lockName"], "a/6", "{told}");
    assert_eq!(told["cycle"][0]["client"], "alice-run", "{told}");
    assert!(!told.to_string().contains("secret-merger"), "{told}");
}
