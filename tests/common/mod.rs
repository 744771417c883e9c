//! Helpers for the integration tests: an in-process server on port 0, a raw
//! protocol peer over a real socket, and the server binary as a process.

#![allow(dead_code)]

pub mod etcd;
pub mod netns;
pub mod pki;
pub mod tls_peer;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pklock::{Config, Server, ServerError, ShutdownHandle, frame};
use serde_json::{Value, json};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A server running in a thread of the test process.
pub struct TestServer {
    /// The first listen address.
    pub addr: SocketAddr,
    /// Every listen address, in configuration order.
    pub addrs: Vec<SocketAddr>,
    /// The metrics endpoint's addresses.
    pub metrics_addrs: Vec<SocketAddr>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// A server with the default configuration, on a free loopback port.
    pub fn start() -> TestServer {
        TestServer::with(|_| {})
    }

    /// A server whose default test configuration `tweak` adjusts.
    pub fn with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            // Tests start servers fresh; the restart grace has its own tests.
            restart_grace_ms: Some(0),
            ..Config::default()
        };
        tweak(&mut config);
        TestServer::from_config(config)
    }

    /// A server on `config`. A process another test forks meanwhile holds
    /// a state file's lock until its exec closes the inherited descriptor,
    /// so binding is tried again for a while.
    pub fn from_config(config: Config) -> TestServer {
        let start = Instant::now();
        loop {
            match Server::bind(config.clone()) {
                Ok(server) => {
                    let addrs = server.local_addrs();
                    let metrics_addrs = server.metrics_addrs();
                    let handle = server.shutdown_handle();
                    let thread = std::thread::spawn(move || server.run());
                    return TestServer {
                        addr: addrs[0],
                        addrs,
                        metrics_addrs,
                        handle,
                        thread: Some(thread),
                    };
                }
                Err(e) if start.elapsed() < PATIENCE => {
                    eprintln!("binding again: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("server binds: {e:?}"),
            }
        }
    }

    /// A new raw connection to the server.
    pub fn peer(&self) -> Peer {
        Peer::connect(self.addr)
    }

    /// Stops the server and returns how its run ended.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.handle.shutdown();
        self.thread.take().unwrap().join().expect("server thread")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.shutdown();
            let _ = thread.join();
        }
    }
}

/// One connection speaking raw frames.
pub struct Peer {
    pub stream: TcpStream,
}

impl Peer {
    pub fn connect(addr: SocketAddr) -> Peer {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        Peer { stream }
    }

    /// Sends one framed JSON message.
    pub fn send(&mut self, message: Value) {
        self.send_body(message.to_string().as_bytes());
    }

    /// Sends one framed JSON message; `false` if the connection is gone.
    pub fn try_send(&mut self, message: Value) -> bool {
        frame::write_blocking(&mut self.stream, message.to_string().as_bytes()).is_ok()
    }

    /// Sends one frame with exactly these body bytes.
    pub fn send_body(&mut self, body: &[u8]) {
        frame::write_blocking(&mut self.stream, body).expect("send");
    }

    /// Sends bytes as they are, framing included.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// The next message's body, exactly as sent.
    pub fn recv_body(&mut self) -> Vec<u8> {
        frame::read_blocking(&mut self.stream, 64 << 20)
            .unwrap_or_else(|e| panic!("expected a message, got {e}"))
    }

    /// The next message, or `None` if the connection ended first.
    pub fn try_recv(&mut self) -> Option<Value> {
        let body = frame::read_blocking(&mut self.stream, 64 << 20).ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// The next message.
    pub fn recv(&mut self) -> Value {
        let body = self.recv_body();
        serde_json::from_slice(&body).expect("server sent JSON")
    }

    /// Sends a request and returns the next message.
    pub fn call(&mut self, message: Value) -> Value {
        self.send(message);
        self.recv()
    }

    /// Sends an RPC and returns its `result`, checking the id came back.
    pub fn rpc(&mut self, command: &str, id: Value, parameters: Value) -> Value {
        let reply = self.call(json!({"command": command, "id": id, "parameters": parameters}));
        assert_eq!(reply["id"], id, "reply to {command}: {reply}");
        reply["result"].clone()
    }

    /// Sends a lock request without waiting for its answer.
    pub fn ask(&mut self, lock: &str, id: u64) {
        self.send(json!({"command": "lock", "id": id, "parameters": {"lockName": lock}}));
    }

    /// Asks for a lock and returns the answer's `result`.
    pub fn lock(&mut self, lock: &str, id: u64) -> Value {
        self.rpc("lock", json!(id), json!({"lockName": lock}))
    }

    /// Asks for a lock, expects it granted, returns the token.
    pub fn take(&mut self, lock: &str, id: u64) -> u64 {
        let result = self.lock(lock, id);
        assert_eq!(result["status"], "ok", "lock {lock}: {result}");
        result["token"].as_u64().expect("token")
    }

    /// Unlocks with an RPC and returns the status word.
    pub fn unlock(&mut self, lock: &str) -> String {
        let result = self.rpc("unlock", json!("u"), json!({"lockName": lock}));
        result["status"].as_str().unwrap_or_default().to_string()
    }

    /// Asserts that no message arrives within `wait`.
    pub fn expect_nothing(&mut self, wait: Duration) {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Ok(0) => panic!("expected silence, the server closed the connection"),
            other => panic!("expected silence, got {other:?}"),
        }
        self.stream.set_read_timeout(Some(PATIENCE)).unwrap();
    }

    /// Asserts that the server closes the connection (after any messages,
    /// which are returned).
    pub fn expect_closed(&mut self) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            match frame::read_blocking(&mut self.stream, 64 << 20) {
                Ok(body) => messages.push(serde_json::from_slice(&body).expect("JSON")),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    ) =>
                {
                    return messages;
                }
                Err(e) => panic!("expected the server to close the connection, got {e}"),
            }
        }
    }
}

/// Waits up to `limit` for a child process to exit.
pub fn wait_exit(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Stops `pklock run` processes still running: SIGTERM to each (pklock
/// stops its command's group before it exits), then waits, then SIGKILL.
pub fn stop_pklock_runs<'a>(runs: impl Iterator<Item = &'a mut Child>) {
    let mut runs: Vec<&mut Child> = runs.collect();
    for child in runs.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-s", "TERM", &child.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
    for child in runs {
        let _ = wait_exit(child, PATIENCE);
        let _ = child.kill();
    }
}

/// Waits for the tests sharing `turns` to finish, so that a test measuring
/// times on a 2-core machine measures its own load, not another test's.
/// A test that panicked still hands its turn on.
pub fn take_turn(turns: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    turns.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls `check` until it holds or PATIENCE runs out.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server's `stats` result, over a fresh connection.
pub fn stats(addr: SocketAddr) -> Value {
    Peer::connect(addr).rpc("stats", json!("s"), json!({}))
}

/// A fresh, empty directory for one test, removed when dropped.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("pklock-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// The server binary running as a child process.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// The server binary.
    pub const BINARY: &str = env!("CARGO_BIN_EXE_server");

    /// Starts `server --config <config_text>` and waits until it listens.
    pub fn start(dir: &Path, config_text: &str) -> ServerProcess {
        ServerProcess::start_with(dir, config_text, None, &[])
    }

    /// Like [`ServerProcess::start`], under a hard open-file limit the
    /// server cannot raise (if given) and with extra environment variables.
    pub fn start_with(
        dir: &Path,
        config_text: &str,
        fd_limit: Option<u32>,
        env: &[(&str, &Path)],
    ) -> ServerProcess {
        let server = ServerProcess::BINARY;
        let mut command = match fd_limit {
            None => Command::new(server),
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(server);
                sh
            }
        };
        command.envs(env.iter().map(|(k, v)| (*k, *v)));
        ServerProcess::launch(dir, config_text, command)
    }

    /// Starts `command` (which runs the server binary, its path being
    /// [`ServerProcess::BINARY`], with the arguments to follow) with
    /// `--config <config_text>`, and waits until it listens.
    pub fn launch(dir: &Path, config_text: &str, mut command: Command) -> ServerProcess {
        let config = dir.join("settings.toml");
        std::fs::write(&config, config_text).unwrap();
        // A config without state_file would keep its state in the default
        // place: a directory of the test's own, never the real home.
        command
            .env("XDG_STATE_HOME", dir.join("xdg-state"))
            .env_remove("STATE_DIRECTORY");
        let mut child = command
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the server binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = ServerProcess {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        process.addr = process.wait_for_address("listening on ");
        process
    }

    /// Waits for a log line `what` ADDRESS and returns the address.
    pub fn wait_for_address(&mut self, what: &str) -> SocketAddr {
        let line = self.wait_for_log(what);
        // The address ends the text line, or the JSON line's message.
        let addr: String = line
            .rsplit(what)
            .next()
            .unwrap_or_default()
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"')
            .collect();
        addr.parse().expect("address in the log")
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("the server never logged {needle:?}"),
            }
        }
    }

    /// Waits for a log line that ends with `tail`, as a line of check-config's
    /// summary ends a line of the log.
    pub fn wait_for_log_ending(&mut self, tail: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.ends_with(tail) => return line,
                Ok(_) => {}
                Err(_) => panic!("the server never logged a line ending {tail:?}"),
            }
        }
    }

    /// Sends `signal` (a `kill -s` name) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Skips the calling test for `why`, visibly: the line goes straight to
/// stderr, past the harness's capture, so `cargo test` shows it even though
/// the test is then reported as passed. With `PKLOCK_REQUIRE_ALL=1` (as in
/// CI) a skip is a failure instead.
pub fn skip(test: &str, why: &str) {
    if std::env::var("PKLOCK_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{test}: cannot run, and PKLOCK_REQUIRE_ALL=1: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
