//! The client's side of TLS, auth tokens, `denied` and force-release, as a
//! user sees it through the library, `pklock` and `test_client`: against
//! fake servers in the test (a rustls server that answers hello and lock
//! frames, plain ones that answer `tlsRequired` or `authFailed`) and a real
//! server's plain port.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::pki::{Ca, Pair};
use common::{PATIENCE, TestServer, temp_dir};
use pklock::client::{
    AuthToken, ClientCert, ClientOptions, ClosedHolder, Error, ForceRelease, LockOptions, Roots,
    StatusFilter, TlsOptions, TlsProblem,
};
use pklock::frame;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Value, json};

/// What a fake does with a request.
enum Say {
    Reply(Value),
    ReplyAndClose(Value),
}

type Answer = Arc<dyn Fn(&Value) -> Say + Send + Sync>;

/// A fake server: every request it got, and the sockets of its connections.
struct Fake {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Value>>>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Fake {
    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn commands(&self) -> Vec<String> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .map(|r| r["command"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn hellos(&self) -> Vec<Value> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| r["command"] == "hello")
            .cloned()
            .collect()
    }

    /// Closes every connection, as a restarting server does.
    fn kick(&self) {
        for socket in self.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

#[allow(deprecated)] // ring, as the client uses (see src/client/transport.rs)
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration with `pair`'s certificate, requiring client
/// certificates signed by `client_ca` if given.
fn server_tls(pair: &Pair, client_ca: Option<&Path>) -> Arc<ServerConfig> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(cert.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = CertificateDer::pem_file_iter(&pair.cert_file)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&pair.key_file).unwrap();
    Arc::new(builder.with_single_cert(chain, key).unwrap())
}

fn fake(tls: Option<Arc<ServerConfig>>, answer: Answer) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = Fake {
        addr: listener.local_addr().unwrap(),
        requests: Arc::default(),
        sockets: Arc::default(),
    };
    let (requests, sockets) = (Arc::clone(&fake.requests), Arc::clone(&fake.sockets));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let Ok(raw) = stream.try_clone() else { return };
            sockets.lock().unwrap().push(raw.try_clone().unwrap());
            let (tls, answer, requests) = (tls.clone(), Arc::clone(&answer), Arc::clone(&requests));
            std::thread::spawn(move || {
                match tls {
                    Some(config) => {
                        let conn = ServerConnection::new(config).unwrap();
                        let mut stream = StreamOwned::new(conn, stream);
                        serve(&mut stream, &answer, &requests);
                        stream.conn.send_close_notify();
                        let _ = stream.flush();
                    }
                    None => serve(&mut { stream }, &answer, &requests),
                }
                // A polite close: what the client sent last is read, so the
                // kernel sends no reset that could overtake an alert.
                let _ = raw.shutdown(Shutdown::Write);
                let _ = raw.set_read_timeout(Some(Duration::from_secs(2)));
                let mut sink = [0u8; 4096];
                while matches!((&raw).read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    fake
}

fn serve(io: &mut (impl Read + Write), answer: &Answer, requests: &Mutex<Vec<Value>>) {
    while let Ok(body) = frame::read_blocking(io, 1 << 20) {
        let Ok(request) = serde_json::from_slice::<Value>(&body) else {
            return;
        };
        requests.lock().unwrap().push(request.clone());
        let (reply, close) = match answer(&request) {
            Say::Reply(reply) => (reply, false),
            Say::ReplyAndClose(reply) => (reply, true),
        };
        if frame::write_blocking(io, reply.to_string().as_bytes()).is_err()
            || io.flush().is_err()
            || close
        {
            return;
        }
    }
}

fn hello_result(principal: &str) -> Value {
    json!({
        "status": "ok",
        "server": {"name": "pklock", "version": "0.1.0"},
        "protocol": 2,
        "conn": 7,
        "keepalive": {"idleMs": 5000, "intervalMs": 1000, "probes": 5, "userTimeoutMs": 10000},
        "releaseAfterMs": 10000,
        "earliestReleaseMs": 10000,
        "grantsResumeInMs": 0,
        "reclaimForMs": 0,
        "principal": principal,
    })
}

/// A server as the wire contract says, for principal `alice` with the
/// token `s3cret` (and `anonymous` without one): grants every lock but
/// `secret` (denied) with token 42, answers `status` and `stats` denied,
/// and `forceRelease` with `force_release`.
fn pklock_like(force_release: Value) -> Answer {
    Arc::new(move |request: &Value| {
        let id = request["id"].clone();
        let params = &request["parameters"];
        let result = match request["command"].as_str().unwrap_or("") {
            "hello" => match params["auth"].as_str() {
                Some("s3cret") => hello_result("alice"),
                None => hello_result("anonymous"),
                Some(_) => {
                    return Say::ReplyAndClose(
                        json!({"error": "authFailed", "detail": "unknown token", "id": id}),
                    );
                }
            },
            "lock" if params["lockName"] == "secret" => json!({"status": "denied"}),
            "lock" => json!({"status": "ok", "token": 42, "proof": "00ff00ff"}),
            "unlock" | "ping" => json!({"status": "ok"}),
            "forceRelease" => force_release.clone(),
            _ => json!({"status": "denied"}),
        };
        Say::Reply(json!({"id": id, "result": result}))
    })
}

/// A plain-TCP fake that answers hello with `error` and closes.
fn refusing(error: Value) -> Fake {
    fake(
        None,
        Arc::new(move |request: &Value| {
            let mut error = error.clone();
            error["id"] = request["id"].clone();
            Say::ReplyAndClose(error)
        }),
    )
}

struct Pki {
    dir: common::TempDir,
    ca: Ca,
    server: Pair,
}

fn pki(name: &str) -> Pki {
    let dir = temp_dir(name);
    let ca = Ca::new(&dir, "main");
    let server = ca.server("server");
    Pki { dir, ca, server }
}

fn tls_to(ca: &Path) -> ClientOptions {
    ClientOptions {
        tls: Some(TlsOptions::with_ca_file(ca)),
        connect_timeout: Duration::from_secs(3),
        ..ClientOptions::named("tls test")
    }
}

fn connect_error(server: &str, options: &ClientOptions) -> Error {
    match pklock::client::Client::connect(server, options) {
        Ok(_) => panic!("connected to {server}"),
        Err(e) => e,
    }
}

#[test]
fn a_lock_over_tls_is_taken_pinged_and_unlocked_with_the_token_in_hello() {
    let pki = pki("tls-lock");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let options = ClientOptions {
        auth: Some(AuthToken::new("s3cret")),
        ..tls_to(&pki.ca.cert_file)
    };
    let client = pklock::client::Client::connect(format!("localhost:{}", fake.port()), &options)
        .expect("connects over TLS");
    assert_eq!(client.principal(), "alice");
    assert_eq!(client.server(), format!("tls://localhost:{}", fake.port()));
    let guard = client.lock("job", &LockOptions::exclusive()).unwrap();
    assert_eq!(guard.token(), 42);
    client.ping().unwrap();
    guard.unlock().unwrap();
    assert_eq!(fake.hellos()[0]["parameters"]["auth"], "s3cret");
    assert_eq!(fake.commands(), ["hello", "lock", "ping", "unlock"]);
}

#[test]
fn a_reconnect_speaks_tls_again_presents_the_token_and_reclaims() {
    let pki = pki("tls-reconnect");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let options = ClientOptions {
        auth: Some(AuthToken::new("s3cret")),
        ..tls_to(&pki.ca.cert_file)
    };
    let client =
        pklock::client::Client::connect(format!("127.0.0.1:{}", fake.port()), &options).unwrap();
    let guard = client.lock("job", &LockOptions::exclusive()).unwrap();
    let (tx, resumed) = mpsc::channel();
    client.on_resumed(move |r| {
        let _ = tx.send(r.reclaimed.clone());
    });
    fake.kick();
    let reclaimed = resumed.recv_timeout(PATIENCE).expect("resumed over TLS");
    assert_eq!(reclaimed, ["job"]);
    assert!(guard.is_held());
    let hellos = fake.hellos();
    assert_eq!(hellos.len(), 2, "{hellos:?}");
    assert_eq!(hellos[1]["parameters"]["auth"], "s3cret");
    let requests = fake.requests.lock().unwrap().clone();
    let reclaim = requests
        .iter()
        .find(|r| !r["parameters"]["reclaim"].is_null())
        .expect("a reclaim");
    assert_eq!(reclaim["parameters"]["reclaim"]["token"], 42);
}

#[test]
fn a_tls_scheme_asks_for_tls_for_its_address_only() {
    let pki = pki("tls-scheme");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    // A root store of the caller's, this time.
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca.cert_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let options = ClientOptions {
        tls: Some(TlsOptions {
            roots: Roots::Store(Arc::new(roots)),
            client_cert: None,
            every_address: false,
        }),
        ..ClientOptions::named("x")
    };
    let client =
        pklock::client::Client::connect(format!("tls://localhost:{}", fake.port()), &options)
            .unwrap();
    assert_eq!(client.principal(), "anonymous");
    client.ping().unwrap();
    // Without TLS settings, a tls:// address is refused before any dial.
    let e = connect_error(
        &format!("tls://localhost:{}", fake.port()),
        &ClientOptions::named("x"),
    );
    assert!(matches!(e, Error::TlsConfig(_)), "{e:?}");
    assert!(e.to_string().contains("asks for TLS"), "{e}");
}

#[test]
fn a_server_certificate_from_another_ca_is_refused_naming_the_ca_file() {
    let pki = pki("tls-unknown-ca");
    let other = Ca::new(&pki.dir, "other");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let e = connect_error(
        &format!("localhost:{}", fake.port()),
        &tls_to(&other.cert_file),
    );
    assert!(
        matches!(
            &e,
            Error::Tls {
                problem: TlsProblem::UnknownIssuer { .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "TLS with tls://localhost:{} failed: its certificate is not signed by a CA in {}",
            fake.port(),
            other.cert_file.display()
        )
    );
}

#[test]
fn an_expired_server_certificate_is_refused_with_its_date() {
    let pki = pki("tls-expired");
    let expired = pki.ca.expired_server("expired");
    let fake = fake(Some(server_tls(&expired, None)), pklock_like(json!({})));
    let e = connect_error(
        &format!("localhost:{}", fake.port()),
        &tls_to(&pki.ca.cert_file),
    );
    assert!(
        matches!(
            &e,
            Error::Tls {
                problem: TlsProblem::Expired(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .ends_with("its certificate expired on 2021-01-01"),
        "{e}"
    );
}

#[test]
fn a_certificate_for_another_name_is_refused_saying_which_names() {
    let pki = pki("tls-name");
    let elsewhere = pki
        .ca
        .server_for("elsewhere", &["locks.example", "10.9.8.7"]);
    let fake = fake(Some(server_tls(&elsewhere, None)), pklock_like(json!({})));
    let e = connect_error(
        &format!("127.0.0.1:{}", fake.port()),
        &tls_to(&pki.ca.cert_file),
    );
    match &e {
        Error::Tls {
            problem: TlsProblem::NameMismatch { name, presented },
            ..
        } => {
            assert_eq!(name, "127.0.0.1");
            assert_eq!(presented, &["locks.example", "10.9.8.7"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string().ends_with(
            "its certificate is not valid for \"127.0.0.1\" (it names locks.example, 10.9.8.7)"
        ),
        "{e}"
    );
}

#[test]
fn client_certificates_missing_refused_and_accepted() {
    let pki = pki("tls-mtls");
    let fake = fake(
        Some(server_tls(&pki.server, Some(&pki.ca.cert_file))),
        pklock_like(json!({})),
    );
    let server = format!("localhost:{}", fake.port());

    let e = connect_error(&server, &tls_to(&pki.ca.cert_file));
    assert!(
        matches!(
            &e,
            Error::Tls {
                problem: TlsProblem::ClientCertRequired,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("requires a client certificate"),
        "{e}"
    );

    let with_cert = |pair: Pair| {
        let mut options = tls_to(&pki.ca.cert_file);
        if let Some(tls) = &mut options.tls {
            tls.client_cert = Some(ClientCert {
                cert_file: pair.cert_file,
                key_file: pair.key_file,
            });
        }
        options
    };
    let stranger = Ca::new(&pki.dir, "stranger").client("mallory");
    let e = connect_error(&server, &with_cert(stranger));
    assert!(
        matches!(
            &e,
            Error::Tls {
                problem: TlsProblem::ClientCertRefused(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("the server refused our client certificate"),
        "{e}"
    );

    let client =
        pklock::client::Client::connect(&server, &with_cert(pki.ca.client("alice"))).unwrap();
    client.ping().unwrap();
}

#[test]
fn tls_to_a_plain_port_says_it_is_the_plain_port() {
    let pki = pki("tls-plain-port");
    let real = TestServer::start();
    let e = connect_error(
        &format!("127.0.0.1:{}", real.addr.port()),
        &tls_to(&pki.ca.cert_file),
    );
    assert!(
        matches!(
            &e,
            Error::Tls {
                problem: TlsProblem::NotTls(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .contains("does not speak TLS: is it the plain port?"),
        "{e}"
    );
}

#[test]
fn plain_text_to_a_tls_port_is_told_to_use_tls() {
    let fake = refusing(json!({"error": "tlsRequired", "detail": "this port speaks TLS"}));
    let server = format!("127.0.0.1:{}", fake.port());
    let e = connect_error(&server, &ClientOptions::named("x"));
    assert!(matches!(&e, Error::TlsRequired { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{server} speaks only TLS: use --tls or tls://{server} (the server said: this port \
             speaks TLS)"
        )
    );
}

#[test]
fn a_refused_token_is_auth_failed_with_the_servers_words() {
    let fake = fake(None, pklock_like(json!({})));
    let server = format!("127.0.0.1:{}", fake.port());
    let options = ClientOptions {
        auth: Some(AuthToken::new("wrong")),
        ..ClientOptions::named("x")
    };
    let e = connect_error(&server, &options);
    assert!(matches!(&e, Error::AuthFailed { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("the server at {server} refused the auth token: unknown token")
    );
    assert_eq!(fake.hellos()[0]["parameters"]["auth"], "wrong");
    assert!(
        !format!("{options:?}").contains("wrong"),
        "Debug shows no secret"
    );
}

#[test]
fn denied_requests_are_errors_naming_the_request_and_the_principal() {
    let fake = fake(
        None,
        pklock_like(json!({"status": "ok", "closed": [
            {"conn": 9, "client": "pklock run job (db1 pid 4)", "peer": "10.0.0.5:5123"}
        ]})),
    );
    let options = ClientOptions {
        auth: Some(AuthToken::new("s3cret")),
        ..ClientOptions::named("x")
    };
    let client =
        pklock::client::Client::connect(format!("127.0.0.1:{}", fake.port()), &options).unwrap();
    let denied = |e: Error, request: &str| match &e {
        Error::PermissionDenied {
            request: r,
            principal,
        } => {
            assert_eq!(r, request);
            assert_eq!(principal, "alice");
            assert_eq!(
                e.to_string(),
                format!("denied: \"alice\" may not {request}")
            );
        }
        other => panic!("{other:?}"),
    };
    denied(
        client
            .lock("secret", &LockOptions::exclusive())
            .unwrap_err(),
        "lock \"secret\"",
    );
    denied(
        client.status(&StatusFilter::All, None).unwrap_err(),
        "see the status of locks",
    );
    denied(client.stats().unwrap_err(), "see the server's counters");
    // Refused, not held: the same name may be asked for again.
    assert!(client.lock("secret", &LockOptions::exclusive()).is_err());
    assert_eq!(
        client.force_release("job").unwrap(),
        ForceRelease::Closed(vec![ClosedHolder {
            conn: 9,
            client: "pklock run job (db1 pid 4)".into(),
            peer: "10.0.0.5:5123".into(),
        }])
    );
    client
        .ping()
        .expect("the connection is kept after a denial");
}

#[test]
fn force_release_of_a_lock_nobody_holds_says_so() {
    let fake = fake(None, pklock_like(json!({"status": "notFound"})));
    let client = pklock::client::Client::connect(
        format!("127.0.0.1:{}", fake.port()),
        &ClientOptions::named("x"),
    )
    .unwrap();
    assert_eq!(client.force_release("job").unwrap(), ForceRelease::NotHeld);
    let fake = fake_denying_force();
    let client = pklock::client::Client::connect(
        format!("127.0.0.1:{}", fake.port()),
        &ClientOptions::named("x"),
    )
    .unwrap();
    let e = client.force_release("job").unwrap_err();
    assert_eq!(
        e.to_string(),
        "denied: \"anonymous\" may not force the release of \"job\""
    );
}

#[test]
fn a_force_released_holder_is_told_why_and_does_not_reclaim() {
    let fake = fake(None, pklock_like(json!({})));
    let client = pklock::client::Client::connect(
        format!("127.0.0.1:{}", fake.port()),
        &ClientOptions::named("x"),
    )
    .unwrap();
    let guard = client.lock("job", &LockOptions::exclusive()).unwrap();
    // What the server sends a holder before closing it.
    let told = json!({"error": "forceReleased", "detail": "an admin (root) released \"job\""});
    for socket in fake.sockets.lock().unwrap().iter_mut() {
        frame::write_blocking(socket, told.to_string().as_bytes()).unwrap();
    }
    fake.kick();
    let reason = guard.wait_lost(Some(PATIENCE)).expect("lost");
    assert_eq!(
        reason.to_string(),
        "the server closed the connection: forceReleased (an admin (root) released \"job\")"
    );
    assert_eq!(fake.hellos().len(), 1, "no reconnect, no reclaim");
}

fn fake_denying_force() -> Fake {
    fake(None, pklock_like(json!({"status": "denied"})))
}

// The command line.

fn pklock(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pklock"))
        .env("PKLOCK_SERVER", server)
        .env_remove("PKLOCK_CA")
        .env_remove("PKLOCK_AUTH_FILE")
        .args(args)
        .output()
        .expect("run pklock")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn pklock_speaks_tls_with_a_token_from_a_file() {
    let pki = pki("cli-tls");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let token_file = pki.dir.join("token");
    std::fs::write(&token_file, "  s3cret \nsecond line\n").unwrap();
    let server = format!("localhost:{}", fake.port());
    let ca = path(&pki.ca.cert_file);
    let output = pklock(
        &server,
        &[
            "--tls",
            "--ca",
            ca,
            "--auth-file",
            path(&token_file),
            "ping",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).starts_with(&format!("tls://{server}: pklock 0.1.0 answered")),
        "{}",
        stdout(&output)
    );
    assert_eq!(fake.hellos()[0]["parameters"]["auth"], "s3cret");
    // The same through the environment and a tls:// address.
    let output = Command::new(env!("CARGO_BIN_EXE_pklock"))
        .env("PKLOCK_SERVER", format!("tls://{server}"))
        .env("PKLOCK_CA", ca)
        .env("PKLOCK_AUTH_FILE", &token_file)
        .args(["run", "job", "--", "sh", "-c", "echo $PKLOCK_TOKEN"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "42\n");
}

#[test]
fn pklock_tls_failures_exit_69_with_their_own_messages() {
    let pki = pki("cli-tls-fail");
    let other = Ca::new(&pki.dir, "other");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let server = format!("localhost:{}", fake.port());

    let output = pklock(&server, &["--tls", "--ca", path(&other.cert_file), "ping"]);
    assert_eq!(output.status.code(), Some(69));
    assert!(
        stderr(&output).contains(&format!(
            "its certificate is not signed by a CA in --ca {}",
            other.cert_file.display()
        )),
        "{}",
        stderr(&output)
    );

    let real = TestServer::start();
    let output = pklock(
        &real.addr.to_string(),
        &["--tls", "--ca", path(&pki.ca.cert_file), "status"],
    );
    assert_eq!(output.status.code(), Some(69));
    assert!(
        stderr(&output).contains("does not speak TLS: is it the plain port?"),
        "{}",
        stderr(&output)
    );

    let tls_only = refusing(json!({"error": "tlsRequired", "detail": "use TLS"}));
    let output = pklock(&format!("127.0.0.1:{}", tls_only.port()), &["ping"]);
    assert_eq!(output.status.code(), Some(69));
    assert!(
        stderr(&output).contains("speaks only TLS: use --tls or tls://127.0.0.1:"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn pklock_refused_tokens_and_denied_requests_exit_77() {
    let fake = fake(None, pklock_like(json!({"status": "denied"})));
    let dir = temp_dir("cli-noperm");
    let server = format!("127.0.0.1:{}", fake.port());
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "nope\n").unwrap();
    let output = pklock(&server, &["--auth-file", path(&wrong), "ping"]);
    assert_eq!(output.status.code(), Some(77), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("refused the auth token: unknown token"),
        "{}",
        stderr(&output)
    );

    for (args, said) in [
        (&["lock", "secret"][..], "may not lock \"secret\""),
        (
            &["run", "secret", "--", "true"][..],
            "may not lock \"secret\"",
        ),
        (&["status"][..], "may not see the status of locks"),
        (&["stats"][..], "may not see the server's counters"),
        (
            &["release", "job", "--force"][..],
            "may not force the release",
        ),
    ] {
        let output = pklock(&server, args);
        assert_eq!(
            output.status.code(),
            Some(77),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(&format!("denied: \"anonymous\" {said}")),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn pklock_release_needs_force_and_says_whom_it_closed() {
    let fake = fake(
        None,
        pklock_like(json!({"status": "ok", "closed": [
            {"conn": 9, "client": "pklock run job (db1 pid 4)", "peer": "10.0.0.5:5123"}
        ]})),
    );
    let server = format!("127.0.0.1:{}", fake.port());
    let output = pklock(&server, &["release", "job"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("a lock belongs to its holder's connection")
            && stderr(&output).contains("--force"),
        "{}",
        stderr(&output)
    );
    assert!(
        !fake.commands().contains(&"forceRelease".to_string()),
        "nothing is sent without --force"
    );

    let output = pklock(&server, &["release", "job", "--force"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "released \"job\": closed connection 9 of \"pklock run job (db1 pid 4)\" from \
         10.0.0.5:5123\n"
    );
    assert_eq!(
        fake.requests.lock().unwrap().last().unwrap()["parameters"]["lockName"],
        "job"
    );

    let nobody = fake_not_found();
    let output = pklock(
        &format!("127.0.0.1:{}", nobody.port()),
        &["release", "job", "--force"],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("nobody holds \"job\""),
        "{}",
        stderr(&output)
    );
}

fn fake_not_found() -> Fake {
    fake(None, pklock_like(json!({"status": "notFound"})))
}

#[test]
fn pklock_tls_flags_are_checked_before_any_dial() {
    let pki = pki("cli-usage");
    let ca = path(&pki.ca.cert_file);
    let cert = path(&pki.server.cert_file);
    for (args, said) in [
        (&["--tls", "ping"][..], "TLS needs --ca FILE"),
        (&["--ca", ca, "--cert", cert, "ping"][..], "--key"),
        (
            &["--ca", ca, "--cert", cert, "--key", cert, "ping"][..],
            "--cert and --key are for TLS",
        ),
        (
            &[
                "--tls",
                "--ca",
                ca,
                "--auth-file",
                "/nonexistent/token",
                "ping",
            ][..],
            "cannot read the auth token from /nonexistent/token",
        ),
        (
            &["--tls", "--ca", "/nonexistent/ca.pem", "ping"][..],
            "/nonexistent/ca.pem",
        ),
    ] {
        let output = pklock("127.0.0.1:1", args);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(said),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let empty = pki.dir.join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let output = pklock("127.0.0.1:1", &["--auth-file", path(&empty), "ping"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("holds no auth token"),
        "{}",
        stderr(&output)
    );
    let output = pklock("tcp://127.0.0.1:1", &["ping"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(
        stderr(&output).contains("`tcp://` is unknown"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn test_client_takes_a_lock_over_tls_and_exits_77_on_a_refused_token() {
    let pki = pki("test-client-tls");
    let fake = fake(Some(server_tls(&pki.server, None)), pklock_like(json!({})));
    let test_client = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_test_client"))
            .env_remove("PKLOCK_AUTH_FILE")
            .args(["--server", &format!("localhost:{}", fake.port())])
            .args(["--tls", "--ca", path(&pki.ca.cert_file)])
            .args(["--hold", "0", "--linger", "0"])
            .args(args)
            .output()
            .unwrap()
    };
    let output = test_client(&[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "Got lock\nOffering to unlock\n");
    let wrong = pki.dir.join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let output = test_client(&["--auth-file", path(&wrong)]);
    assert_eq!(output.status.code(), Some(77));
    assert!(
        stderr(&output).contains("refused the auth token"),
        "{}",
        stderr(&output)
    );
    let output = test_client(&["--lock", "secret"]);
    assert_eq!(output.status.code(), Some(77));
    assert!(
        stderr(&output).contains("denied: \"anonymous\" may not lock \"secret\""),
        "{}",
        stderr(&output)
    );
}
