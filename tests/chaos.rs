//! Chaos: worker processes loop taking one exclusive lock, writing to a
//! checker with their fencing token, and unlocking, while a killer SIGKILLs a
//! random worker every few hundred milliseconds and starts a new one, and
//! restarts the server every few seconds, by SIGTERM and SIGKILL in turn
//! (holders reclaim their lock and write on across a restart).
//!
//! The checker records every write with a CLOCK_MONOTONIC timestamp taken by
//! the worker just before it sent the write (one clock for every process on
//! the machine). In timestamp order the tokens must never go down: a lower
//! token after a higher one means a holder wrote after a later grant had
//! started writing. New grants must carry new, higher tokens. Grants must keep
//! flowing (no gap over 2 s, or over 2 s plus the restart grace across a
//! restart), and at the end no dead worker may still hold.
//!
//! Runs for 20 s; `PKLOCK_CHAOS_SECS` sets another length. This file has its
//! own `main` (harness = false) because the test re-executes itself as the
//! workers it kills.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Peer, ServerProcess, temp_dir};
use pklock::client::{Client, ClientOptions, LockOptions};
use serde_json::json;

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
    let seconds = std::env::var("PKLOCK_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    match run(Duration::from_secs(seconds)) {
        Ok(summary) => {
            println!("chaos: ok: {summary}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("chaos: FAILED: {failure}");
            ExitCode::FAILURE
        }
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
    let (Some(server), Some(checker), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return ExitCode::FAILURE;
    };
    let Ok(checker) = TcpStream::connect(checker) else {
        return ExitCode::FAILURE;
    };
    let mut acks = BufReader::new(checker.try_clone().expect("clone"));
    let mut checker = checker;
    loop {
        let Ok(client) = Client::connect(server, &ClientOptions::named(format!("chaos-{id}")))
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

fn spawn_worker(server: SocketAddr, checker: SocketAddr, id: u64) -> Child {
    Command::new(std::env::current_exe().expect("own path"))
        .env(WORKER_ENV, format!("{server} {checker} {id}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a worker")
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

fn run(length: Duration) -> Result<String, String> {
    let dir = temp_dir("chaos");
    // A fixed port, for the server to come back on.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let config = format!(
        "listen = [\"127.0.0.1:{port}\"]\nstate_file = \"{}\"\n{KEEPALIVE}",
        dir.join("tokens").display()
    );
    let mut server = ServerProcess::start(&dir, &config);
    let checker = Checker::start();
    let mut next_id = 0u64;
    let mut workers: Vec<(u64, Child)> = (0..WORKERS)
        .map(|_| {
            next_id += 1;
            (next_id, spawn_worker(server.addr, checker.addr, next_id))
        })
        .collect();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let started = Instant::now();
    let start_ns = monotonic_ns();
    let mut kills = 0;
    // When each restart began (the signal) and ended (the new server listening).
    let mut restarts: Vec<(u64, u64)> = Vec::new();
    let mut last_restart = Instant::now();
    while started.elapsed() < length {
        std::thread::sleep(Duration::from_millis(200 + rng.next(200)));
        if last_restart.elapsed() >= RESTART_EVERY {
            let signal = ["TERM", "KILL"][restarts.len() % 2];
            let began = monotonic_ns();
            server.signal(signal);
            server.wait_exit();
            server = ServerProcess::start(&dir, &config);
            restarts.push((began, monotonic_ns()));
            last_restart = Instant::now();
        }
        let slot = rng.next(WORKERS as u64) as usize;
        let (_, victim) = &mut workers[slot];
        let _ = victim.kill();
        let _ = victim.wait();
        kills += 1;
        next_id += 1;
        workers[slot] = (next_id, spawn_worker(server.addr, checker.addr, next_id));
    }
    let end_ns = monotonic_ns();
    for (_, worker) in &mut workers {
        let _ = worker.kill();
        let _ = worker.wait();
    }
    let writes = checker.writes.lock().unwrap().clone();
    let summary = check(&writes, start_ns, end_ns, kills, &restarts, length)?;

    // Every worker is dead: within moments no lock may be held or waited for.
    let mut observer = Peer::connect(server.addr);
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
    restarts: &[(u64, u64)],
    length: Duration,
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
        let restarted = restarts
            .iter()
            .any(|&(began, ended)| p[0] < ended && began < p[1]);
        let allowed = MAX_GAP
            + if restarted {
                RESTART_GRACE
            } else {
                Duration::ZERO
            };
        (gap, allowed)
    });
    let too_long: Vec<Duration> = gaps
        .clone()
        .filter(|(gap, allowed)| gap > allowed)
        .map(|(gap, _)| gap)
        .collect();
    let longest_gap = gaps.map(|(gap, _)| gap).max().unwrap_or_default();
    let summary = format!(
        "{:.0} s, {} workers, {kills} kills, {} server restarts, {} grants ({:.0}/s), {} writes, longest gap between grants {} ms, {} violations",
        length.as_secs_f64(),
        WORKERS,
        restarts.len(),
        grants.len(),
        grants.len() as f64 / length.as_secs_f64(),
        writes.len(),
        longest_gap.as_millis(),
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
