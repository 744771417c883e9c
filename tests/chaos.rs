//! Chaos: worker processes loop taking one exclusive lock, writing to a
//! checker with their fencing token, and unlocking, while a killer SIGKILLs a
//! random worker every few hundred milliseconds and starts a new one. It runs
//! twice:
//!
//! - one server, restarted every few seconds, by SIGTERM and SIGKILL in turn
//!   (holders reclaim their lock and write on across a restart);
//! - a cluster of three servers on a real etcd, whose leader (found by
//!   `hello`) gets SIGTERM or SIGKILL in turn a few seconds after the last
//!   failover ended, and comes back as a standby; the workers are given all
//!   three addresses and follow the leader.
//!
//! The checker records every write with a CLOCK_MONOTONIC timestamp taken by
//! the worker just before it sent the write (one clock for every process on
//! the machine). In timestamp order the tokens must never go down: a lower
//! token after a higher one means a holder wrote after a later grant had
//! started writing. New grants must carry new, higher tokens, across every
//! restart and failover. Grants must keep flowing: no gap over 2 s, or over
//! 2 s plus the restart grace across a restart, plus the leadership's lease
//! and a second too across a failover (the next leader waits out the lease
//! of a crashed one, and etcd's and its own checks, then its grace). At the
//! end no dead worker may still hold.
//!
//! The single server runs for 20 s (`PKLOCK_CHAOS_SECS`), the cluster for
//! 25 s (`PKLOCK_CHAOS_CLUSTER_SECS`, 0 to leave it out). Without etcd the
//! cluster run is skipped (a failure under `PKLOCK_REQUIRE_ALL=1`). This file
//! has its own `main` (harness = false) because the test re-executes itself
//! as the workers it kills.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::etcd::{Etcd, die_with_this_thread, etcd_or_skip};
use common::{Peer, ServerProcess, TempDir, temp_dir};
use pklock::client::{Client, ClientOptions, LockOptions};
use pklock::frame;
use serde_json::{Value, json};

const WORKERS: usize = 8;
const WRITES_PER_GRANT: u32 = 3;
const LOCK: &str = "chaos";
const WORKER_ENV: &str = "PKLOCK_CHAOS_WORKER";
const MAX_GAP: Duration = Duration::from_secs(2);
/// The server restarts this often.
const RESTART_EVERY: Duration = Duration::from_secs(3);
/// `[keepalive]` for a release time (and so a restart grace) of 2 s.
const KEEPALIVE: &str =
    "[keepalive]\nidle_ms = 1000\ninterval_ms = 1000\nprobes = 1\nuser_timeout_ms = 2000\n";
const RESTART_GRACE: Duration = Duration::from_secs(2);
/// The cluster's servers.
const SERVERS: usize = 3;
/// The leadership's etcd lease (the least allowed): after a leader's crash
/// the next one leads within this long.
const LEASE_TTL: Duration = Duration::from_millis(2000);
/// After a leader's crash, how late the next can be beyond the lease: etcd
/// revokes an expired lease at its next check (every 500 ms), and a standby
/// looks at the election every tenth of the lease.
const EXPIRY_LAG: Duration = Duration::from_secs(1);
/// The next failover comes this long after the last one ended.
const FAILOVER_EVERY: Duration = Duration::from_secs(3);
/// How long a failover may go without a leader.
const LEADER_PATIENCE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    if let Ok(spec) = std::env::var(WORKER_ENV) {
        return worker(&spec);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("chaos: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "chaos".contains(f.as_str())) {
        println!("chaos: filtered out");
        return ExitCode::SUCCESS;
    }
    let seconds = |var: &str, default: u64| {
        let seconds = std::env::var(var).ok().and_then(|s| s.parse().ok());
        Duration::from_secs(seconds.unwrap_or(default))
    };
    let single = Plan {
        length: seconds("PKLOCK_CHAOS_SECS", 20),
        every: RESTART_EVERY,
        strikes: "server restarts",
        across: MAX_GAP + RESTART_GRACE,
    };
    let cluster = Plan {
        length: seconds("PKLOCK_CHAOS_CLUSTER_SECS", 25),
        every: FAILOVER_EVERY,
        strikes: "failovers",
        across: MAX_GAP + LEASE_TTL + EXPIRY_LAG + RESTART_GRACE,
    };
    let mut failed = false;
    let mut report = |phase: &str, outcome: Result<String, String>| match outcome {
        Ok(summary) => println!("chaos: {phase}: ok: {summary}"),
        Err(failure) => {
            eprintln!("chaos: {phase}: FAILED: {failure}");
            failed = true;
        }
    };
    report(
        "single server",
        Single::start().and_then(|mut s| run(&mut s, &single)),
    );
    if !cluster.length.is_zero() {
        if let Some(etcd) = etcd_or_skip("chaos", &[]) {
            let root = temp_dir("chaos-cluster");
            report(
                "cluster",
                Cluster::start(etcd, &root).and_then(|mut c| run(&mut c, &cluster)),
            );
        }
    }
    match failed {
        false => ExitCode::SUCCESS,
        true => ExitCode::FAILURE,
    }
}

/// Nanoseconds on CLOCK_MONOTONIC: the same clock in every process.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// One write as the checker saw it.
#[derive(Clone, Copy, Debug)]
struct Write_ {
    token: u64,
    sent_ns: u64,
    worker: u64,
}

/// A tiny protected resource: records writes and acknowledges each one.
struct Checker {
    addr: SocketAddr,
    writes: Arc<Mutex<Vec<Write_>>>,
}

impl Checker {
    fn start() -> Checker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let writes = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::clone(&writes);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let writes = Arc::clone(&shared);
                std::thread::spawn(move || serve_checker(stream, &writes));
            }
        });
        Checker { addr, writes }
    }
}

fn serve_checker(stream: TcpStream, writes: &Mutex<Vec<Write_>>) {
    let mut ack = match stream.try_clone() {
        Ok(ack) => ack,
        Err(_) => return,
    };
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        let fields: Vec<u64> = line.split(' ').filter_map(|f| f.parse().ok()).collect();
        let [token, sent_ns, worker] = fields[..] else {
            return;
        };
        writes.lock().unwrap().push(Write_ {
            token,
            sent_ns,
            worker,
        });
        if ack.write_all(b"ok\n").is_err() {
            return;
        }
    }
}

/// The worker process: lock, write with the token, unlock, for ever.
fn worker(spec: &str) -> ExitCode {
    let mut parts = spec.split(' ');
    let (Some(servers), Some(checker), Some(id)) = (parts.next(), parts.next(), parts.next())
    else {
        return ExitCode::FAILURE;
    };
    let Ok(checker) = TcpStream::connect(checker) else {
        return ExitCode::FAILURE;
    };
    let mut acks = BufReader::new(checker.try_clone().expect("clone"));
    let mut checker = checker;
    loop {
        let Ok(client) = Client::connect(servers, &ClientOptions::named(format!("chaos-{id}")))
        else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        while let Ok(guard) = client.lock(LOCK, &LockOptions::exclusive()) {
            for _ in 0..WRITES_PER_GRANT {
                // Only write while the lock is ours.
                if !guard.is_held() {
                    break;
                }
                let line = format!("{} {} {id}\n", guard.token(), monotonic_ns());
                let mut ack = String::new();
                if checker.write_all(line.as_bytes()).is_err() || acks.read_line(&mut ack).is_err()
                {
                    return ExitCode::FAILURE;
                }
            }
            if guard.unlock().is_err() {
                break;
            }
        }
    }
}

fn spawn_worker(servers: &str, checker: SocketAddr, id: u64) -> Child {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command
        .env(WORKER_ENV, format!("{servers} {checker} {id}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    die_with_this_thread(&mut command);
    command.spawn().expect("start a worker")
}

/// The server binary with `config`, in `dir`; it dies with the test.
fn start_server(dir: &Path, config: &str) -> ServerProcess {
    let mut command = Command::new(ServerProcess::BINARY);
    die_with_this_thread(&mut command);
    ServerProcess::launch(dir, config, command)
}

/// A small deterministic generator, so a failing schedule can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// What the killer knocks over every few seconds, and brings back.
trait Service {
    /// The server list the workers are given.
    fn servers(&self) -> String;
    /// Stops the serving server with `signal` and starts it again, and
    /// returns once grants can flow again (after any grace).
    fn disrupt(&mut self, signal: &str) -> Result<(), String>;
    /// The server serving now.
    fn serving(&mut self) -> Result<SocketAddr, String>;
}

/// One server, restarted in place.
struct Single {
    /// First, so that it stops before its directory goes.
    server: ServerProcess,
    config: String,
    dir: TempDir,
}

impl Single {
    fn start() -> Result<Single, String> {
        let dir = temp_dir("chaos");
        // A fixed port, for the server to come back on.
        let port = free_port()?;
        let config = format!(
            "listen = [\"127.0.0.1:{port}\"]\nstate_file = \"{}\"\n{KEEPALIVE}",
            dir.join("tokens").display()
        );
        let server = start_server(&dir, &config);
        Ok(Single {
            server,
            config,
            dir,
        })
    }
}

impl Service for Single {
    fn servers(&self) -> String {
        self.server.addr.to_string()
    }

    fn disrupt(&mut self, signal: &str) -> Result<(), String> {
        self.server.signal(signal);
        self.server.wait_exit();
        self.server = start_server(&self.dir, &self.config);
        Ok(())
    }

    fn serving(&mut self) -> Result<SocketAddr, String> {
        Ok(self.server.addr)
    }
}

/// etcd and three servers; the leader is the one knocked over, and comes
/// back as a standby.
struct Cluster {
    members: Vec<Member>,
    /// Last, so that the servers stop before it.
    _etcd: Etcd,
}

struct Member {
    dir: PathBuf,
    config: String,
    server: ServerProcess,
}

impl Cluster {
    fn start(etcd: Etcd, root: &Path) -> Result<Cluster, String> {
        let mut members = Vec::new();
        for i in 0..SERVERS {
            let dir = root.join(format!("server-{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let config = format!(
                "listen = [\"127.0.0.1:{}\"]\n{KEEPALIVE}[cluster]\netcd_endpoints = [\"{}\"]\n\
                 lease_ttl_ms = {}\n",
                free_port()?,
                etcd.endpoint(),
                LEASE_TTL.as_millis()
            );
            let server = start_server(&dir, &config);
            members.push(Member {
                dir,
                config,
                server,
            });
        }
        Ok(Cluster {
            members,
            _etcd: etcd,
        })
    }

    /// The one member whose `hello` says it leads, waiting for there to be
    /// one.
    fn leader(&self) -> Result<usize, String> {
        let deadline = Instant::now() + LEADER_PATIENCE;
        loop {
            let leaders: Vec<usize> = (0..self.members.len())
                .filter(|&i| role(self.members[i].server.addr).as_deref() == Some("leader"))
                .collect();
            match leaders[..] {
                [one] => return Ok(one),
                [] if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                [] => return Err(format!("no leader within {LEADER_PATIENCE:?}")),
                _ => {
                    let addrs: Vec<String> = leaders
                        .iter()
                        .map(|&i| self.members[i].server.addr.to_string())
                        .collect();
                    return Err(format!("two leaders at once: {}", addrs.join(", ")));
                }
            }
        }
    }
}

impl Service for Cluster {
    fn servers(&self) -> String {
        let addrs: Vec<String> = self
            .members
            .iter()
            .map(|m| m.server.addr.to_string())
            .collect();
        addrs.join(",")
    }

    fn disrupt(&mut self, signal: &str) -> Result<(), String> {
        let old = self.leader()?;
        let member = &mut self.members[old];
        member.server.signal(signal);
        member.server.wait_exit();
        member.server = start_server(&member.dir, &member.config);
        let new = self.leader()?;
        if new == old {
            return Err(format!(
                "the leader {} came back as the leader again, though two standbys waited",
                self.members[new].server.addr
            ));
        }
        Ok(())
    }

    fn serving(&mut self) -> Result<SocketAddr, String> {
        Ok(self.members[self.leader()?].server.addr)
    }
}

/// `hello`'s `role`, or `None` if the server does not answer (or names none).
fn role(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let hello = json!({"command": "hello", "id": 1, "parameters": {}});
    frame::write_blocking(&mut stream, hello.to_string().as_bytes()).ok()?;
    let body = frame::read_blocking(&mut stream, 1 << 20).ok()?;
    let reply: Value = serde_json::from_slice(&body).ok()?;
    reply["result"]["role"].as_str().map(str::to_string)
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// How a run goes: how often the killer strikes, what it is called, and how
/// long grants may stop across one strike.
struct Plan {
    length: Duration,
    /// Time between the end of one strike and the next.
    every: Duration,
    /// "server restarts", "failovers".
    strikes: &'static str,
    /// The longest gap between grants allowed across a strike.
    across: Duration,
}

fn run(service: &mut dyn Service, plan: &Plan) -> Result<String, String> {
    let checker = Checker::start();
    let servers = service.servers();
    let mut next_id = 0u64;
    let mut workers: Vec<(u64, Child)> = (0..WORKERS)
        .map(|_| {
            next_id += 1;
            (next_id, spawn_worker(&servers, checker.addr, next_id))
        })
        .collect();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let started = Instant::now();
    let start_ns = monotonic_ns();
    let mut kills = 0;
    // When each strike began (the signal) and ended (serving again).
    let mut strikes: Vec<(u64, u64)> = Vec::new();
    let mut last_strike = Instant::now();
    let mut outcome = Ok(());
    while started.elapsed() < plan.length {
        std::thread::sleep(Duration::from_millis(200 + rng.next(200)));
        if last_strike.elapsed() >= plan.every {
            let signal = ["TERM", "KILL"][strikes.len() % 2];
            let began = monotonic_ns();
            if let Err(e) = service.disrupt(signal) {
                outcome = Err(format!("strike {} (SIG{signal}): {e}", strikes.len() + 1));
                break;
            }
            strikes.push((began, monotonic_ns()));
            last_strike = Instant::now();
        }
        let slot = rng.next(WORKERS as u64) as usize;
        let (_, victim) = &mut workers[slot];
        let _ = victim.kill();
        let _ = victim.wait();
        kills += 1;
        next_id += 1;
        workers[slot] = (next_id, spawn_worker(&servers, checker.addr, next_id));
    }
    let end_ns = monotonic_ns();
    for (_, worker) in &mut workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    let writes = checker.writes.lock().unwrap().clone();
    let summary = check(&writes, start_ns, end_ns, kills, &strikes, plan)?;
    outcome.map_err(|e| format!("{e}\n{summary}"))?;

    // Every worker is dead: within moments no lock may be held or waited for.
    let mut observer = Peer::connect(service.serving()?);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = observer.rpc("status", json!(1), json!({"lockName": LOCK}));
        if status["locks"] == json!([]) {
            return Ok(summary);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "dead workers still hold or wait: {status}\n{summary}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn check(
    writes: &[Write_],
    start_ns: u64,
    end_ns: u64,
    kills: u32,
    strikes: &[(u64, u64)],
    plan: &Plan,
) -> Result<String, String> {
    let mut by_time = writes.to_vec();
    by_time.sort_by_key(|w| w.sent_ns);
    let mut violations = Vec::new();
    // Token -> (first write, worker); grants in the order they started writing.
    let mut grants: Vec<(u64, u64)> = Vec::new();
    let mut owner: HashMap<u64, u64> = HashMap::new();
    let mut current = 0u64;
    for w in &by_time {
        if let Some(&worker) = owner.get(&w.token) {
            if worker != w.worker {
                violations.push(format!(
                    "token {} used by workers {worker} and {}",
                    w.token, w.worker
                ));
            }
        }
        if w.token == current {
            continue;
        }
        if w.token < current {
            violations.push(format!(
                "worker {} wrote with token {} at {} ns, after token {current} had started writing",
                w.worker,
                w.token,
                w.sent_ns - start_ns
            ));
            continue;
        }
        // A new grant: its token is above every earlier one.
        owner.insert(w.token, w.worker);
        grants.push((w.sent_ns, w.token));
        current = w.token;
    }
    let mut starts: Vec<u64> = vec![start_ns];
    starts.extend(grants.iter().map(|&(at, _)| at));
    starts.push(end_ns);
    let gaps = starts.windows(2).map(|p| {
        let gap = Duration::from_nanos(p[1].saturating_sub(p[0]));
        // A crash restart holds every grant for its grace; after a clean
        // stop, a lock whose holder died meanwhile waits as long.
        let struck = strikes
            .iter()
            .any(|&(began, ended)| p[0] < ended && began < p[1]);
        (gap, if struck { plan.across } else { MAX_GAP })
    });
    let too_long: Vec<Duration> = gaps
        .clone()
        .filter(|(gap, allowed)| gap > allowed)
        .map(|(gap, _)| gap)
        .collect();
    let longest_gap = gaps.map(|(gap, _)| gap).max().unwrap_or_default();
    let length = plan.length.as_secs_f64();
    let summary = format!(
        "{length:.0} s, {WORKERS} workers, {kills} kills, {} {} ({} by SIGTERM, {} by SIGKILL), {} grants ({:.0}/s), {} writes, longest gap between grants {} ms (allowed {} ms across one of the {}), {} violations",
        strikes.len(),
        plan.strikes,
        strikes.len().div_ceil(2),
        strikes.len() / 2,
        grants.len(),
        grants.len() as f64 / length,
        writes.len(),
        longest_gap.as_millis(),
        plan.across.as_millis(),
        plan.strikes,
        violations.len()
    );
    if !violations.is_empty() {
        return Err(format!(
            "{summary}\n{}",
            violations
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ));
    }
    if !too_long.is_empty() {
        return Err(format!("grants stopped flowing: {too_long:?}: {summary}"));
    }
    Ok(summary)
}
