//! A real etcd (Debian's `etcd-server`, `/usr/bin/etcd`) for the cluster
//! tests: a single member on free loopback ports (client and peer) with a
//! data directory of its own. It can be killed, paused (SIGSTOP) and resumed,
//! and started again on the same ports and data directory. It dies with the
//! test: dropping it kills it, and it gets SIGKILL if the thread that started
//! it ends first (the test process killed outright included).
//!
//! Without etcd the test is skipped (a failure under `PKLOCK_REQUIRE_ALL=1`).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, temp_dir};

/// How long etcd may take to serve after a start.
const STARTUP: Duration = Duration::from_secs(20);

/// One etcd member, serving clients on `127.0.0.1:client_port` (and on the
/// same port of each extra address it was given).
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    hosts: Vec<Ipv4Addr>,
    data: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Etcd {
    /// Starts etcd on loopback and waits until it serves.
    pub fn start(name: &str) -> Result<Etcd, String> {
        Etcd::start_on(name, &[])
    }

    /// Starts etcd serving clients on loopback and on `extra` addresses (a
    /// network namespace's host side, say), and waits until it serves.
    pub fn start_on(name: &str, extra: &[Ipv4Addr]) -> Result<Etcd, String> {
        let program = etcd_program().ok_or("etcd is not installed (Debian: etcd-server)")?;
        let dir = temp_dir(&format!("etcd-{name}"));
        let mut hosts = vec![Ipv4Addr::LOCALHOST];
        hosts.extend_from_slice(extra);
        let mut etcd = Etcd {
            child: None,
            client_port: 0,
            peer_port: 0,
            hosts,
            data: dir.join("data"),
            log: dir.join("etcd.log"),
            _dir: dir,
        };
        let mut last_error = String::new();
        // A port found free can be taken by someone else before etcd binds
        // it: then try other ports.
        for _ in 0..3 {
            etcd.client_port = free_port()?;
            etcd.peer_port = free_port()?;
            let _ = std::fs::remove_dir_all(&etcd.data);
            match etcd.launch(&program) {
                Ok(()) => return Ok(etcd),
                Err(why) => {
                    etcd.kill();
                    last_error = why;
                }
            }
        }
        Err(last_error)
    }

    /// `http://127.0.0.1:PORT`, for a server's `etcd_endpoints`.
    pub fn endpoint(&self) -> String {
        self.endpoint_at(Ipv4Addr::LOCALHOST)
    }

    /// The client URL on one of the extra addresses it was started with.
    pub fn endpoint_at(&self, host: Ipv4Addr) -> String {
        format!("http://{host}:{}", self.client_port)
    }

    /// SIGKILL, and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: it keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Starts it again (after [`Etcd::kill`]) on the same ports and data
    /// directory, and waits until it serves.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        let program = etcd_program().ok_or("etcd is not installed")?;
        self.launch(&program)
    }

    /// Whether it answers `GET /health` with a healthy member now.
    pub fn healthy(&self) -> bool {
        health(self.client_port).is_some_and(|body| body.contains(r#""health":"true""#))
    }

    /// What etcd wrote on stderr, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("etcd is running");
        let status = Command::new("kill")
            .args(["-s", signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} etcd");
    }

    fn launch(&mut self, program: &str) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let clients: Vec<String> = self.hosts.iter().map(|h| self.endpoint_at(*h)).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let mut command = Command::new(program);
        command
            .args(["--name", "pklock-test", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &clients.join(",")])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("pklock-test={peer}")])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        die_with_this_thread(&mut command);
        let child = command
            .spawn()
            .map_err(|e| format!("start {program}: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        while !self.healthy() {
            let child = self.child.as_mut().expect("just started");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("etcd exited ({status}): {}", self.log()));
            }
            if started.elapsed() > STARTUP {
                return Err(format!(
                    "etcd did not serve within {STARTUP:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A started etcd, or `None` after skipping `test` (why: in the message).
pub fn etcd_or_skip(test: &str, extra: &[Ipv4Addr]) -> Option<Etcd> {
    match Etcd::start_on(test, extra) {
        Ok(etcd) => Some(etcd),
        Err(why) if etcd_program().is_none() => {
            super::skip(test, &why);
            None
        }
        Err(why) => panic!("{test}: etcd is installed but did not start: {why}"),
    }
}

/// Asks the kernel to SIGKILL the child when the thread that spawns it ends,
/// so that nothing a test starts outlives it.
pub fn die_with_this_thread(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

fn etcd_program() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .map(|p| p.display().to_string())
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// The body of `GET /health`, or `None` if etcd does not answer in time.
fn health(port: u16) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(1000)))
        .ok()?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_string())
}
