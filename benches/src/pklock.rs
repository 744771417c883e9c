//! The workloads against a pklock server, driven from one thread: a `mio`
//! loop over every connection, each with at most one request outstanding
//! (contended holders send unlock and their next lock together). With TLS
//! (`--tls`), every connection speaks it: the load, the probes and the
//! holder processes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use serde::Deserialize;

use super::conn::{LoadConn, connect_all_over, io_err};
use super::tls::TlsClient;
use super::{
    BenchError, BenchOptions, Contended, DeadHolder, Handshakes, IdleHolders, Latency, ServerCpu,
    Uncontended, histogram, proc, record,
};
use pklock::frame;

/// How long the idle holders may take to be granted their locks.
const HOLDERS_TIMEOUT: Duration = Duration::from_secs(120);

/// The pklock server under test.
pub struct Pklock {
    addr: SocketAddr,
    pid: Option<u32>,
    tls: Option<TlsTarget>,
}

/// The TLS client, and the arguments that give it to a holder process.
struct TlsTarget {
    client: TlsClient,
    args: Vec<String>,
}

impl Pklock {
    /// The server at `addr`; its process is found from the port unless `pid` is given.
    pub fn new(addr: SocketAddr, pid: Option<u32>) -> Pklock {
        let pid = pid.or_else(|| proc::pid_listening_on(addr.port()));
        Pklock {
            addr,
            pid,
            tls: None,
        }
    }

    /// Speaks TLS with `client` on every connection; `holder_args` are the
    /// arguments that do the same for a `hold-pklock` process.
    pub fn with_tls(mut self, client: TlsClient, holder_args: Vec<String>) -> Pklock {
        self.tls = Some(TlsTarget {
            client,
            args: holder_args,
        });
        self
    }

    fn tls(&self) -> Option<&TlsClient> {
        self.tls.as_ref().map(|t| &t.client)
    }

    /// `contended` on the lock `name`; with `hold_own`, each connection
    /// first takes a lock of its own (`name/i`) and holds it throughout, so
    /// that every one of its waits for `name` is a hold-and-wait, which the
    /// server's deadlock check follows through the queue.
    fn one_lock(
        &mut self,
        options: &BenchOptions,
        name: &str,
        hold_own: bool,
    ) -> Result<Contended, BenchError> {
        let ping = ping_latency(self.addr, self.tls(), Duration::from_secs(1))?;
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut conns = connect_all_over(self.addr, options.connections, self.tls(), &mut poll)?;
        let lock = request("lock", LOCK_ID, name);
        let mut unlock_then_lock = request("unlock", UNLOCK_ID, name);
        unlock_then_lock.extend_from_slice(&lock);
        for (i, conn) in conns.iter_mut().enumerate() {
            let mut first = Vec::new();
            if hold_own {
                // Its grant's id is neither LOCK_ID nor UNLOCK_ID, and is
                // passed over below.
                first = request("lock", OWN_LOCK_ID, &format!("{name}/{i}"));
            }
            first.extend_from_slice(&lock);
            conn.send(&first, &poll, Token(i)).map_err(io_err)?;
        }
        // Let every request queue before timing starts.
        std::thread::sleep(Duration::from_millis(100));
        let mut grants = vec![0u64; conns.len()];
        let mut handover = histogram();
        let mut released_at: Option<(usize, Instant)> = None;
        let mut regrants = 0u64;
        let cpu_before = self.pid.and_then(proc::cpu_ms);
        let start = Instant::now();
        let deadline = start + options.duration;
        let mut events = Events::with_capacity(1024);
        while Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            let now = Instant::now();
            for event in &events {
                let i = event.token().0;
                let conn = &mut conns[i];
                if event.is_writable() {
                    conn.flush(&poll, Token(i)).map_err(io_err)?;
                }
                if !event.is_readable() {
                    continue;
                }
                for id in replies(conn, &poll, Token(i)).map_err(io_err)? {
                    if id != LOCK_ID || now >= deadline {
                        continue;
                    }
                    grants[i] += 1;
                    if let Some((previous, at)) = released_at {
                        record(&mut handover, now - at);
                        regrants += u64::from(previous == i);
                    }
                    released_at = Some((i, Instant::now()));
                    conn.send(&unlock_then_lock, &poll, Token(i))
                        .map_err(io_err)?;
                }
            }
        }
        let elapsed = start.elapsed();
        let cpu_after = self.pid.and_then(proc::cpu_ms);
        drop(conns);
        let total: u64 = grants.iter().sum();
        Ok(Contended {
            server_cpu: cpu_before.zip(cpu_after).map(|(b, a)| ServerCpu {
                cpu_ms: a - b,
                us_per_op: (a - b) * 1000.0 / total.max(1) as f64,
            }),
            ..Contended::from_counts(&grants, regrants, &handover, ping, elapsed)
        })
    }
}

fn request(command: &str, id: u64, lock: &str) -> Vec<u8> {
    let body =
        format!(r#"{{"command":"{command}","id":{id},"parameters":{{"lockName":"{lock}"}}}}"#);
    let mut out = Vec::new();
    // A short body always fits in a frame.
    let _ = frame::encode(body.as_bytes(), &mut out);
    out
}

const LOCK_ID: u64 = 1;
const UNLOCK_ID: u64 = 2;

#[derive(Deserialize)]
struct ReplyId {
    id: Option<u64>,
}

const PING_ID: u64 = 3;
const OWN_LOCK_ID: u64 = 5;

/// Reads what `conn` has and returns the ids of the whole replies in it
/// (over TLS, first writing what the session has to send back).
fn replies(conn: &mut LoadConn, poll: &Poll, token: Token) -> io::Result<Vec<u64>> {
    conn.fill()?;
    if conn.is_tls() {
        conn.flush(poll, token)?;
    }
    let mut ids = Vec::new();
    let mut offset = 0;
    while let Ok(Some(f)) = frame::decode(&conn.input[offset..], 1 << 20) {
        let reply: ReplyId = serde_json::from_slice(f.body).map_err(io::Error::other)?;
        if let Some(id) = reply.id {
            ids.push(id);
        }
        offset += f.consumed;
    }
    conn.input.drain(..offset);
    Ok(ids)
}

impl super::Backend for Pklock {
    fn name(&self) -> &str {
        "pklock"
    }

    fn target(&self) -> String {
        let scheme = if self.tls.is_some() { "tls://" } else { "" };
        match self.pid {
            Some(pid) => format!("{scheme}{} (pid {pid})", self.addr),
            None => format!("{scheme}{}", self.addr),
        }
    }

    fn uncontended(&mut self, options: &BenchOptions) -> Result<Uncontended, BenchError> {
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut conns = connect_all_over(self.addr, options.connections, self.tls(), &mut poll)?;
        let locks: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| request("lock", LOCK_ID, &format!("bench/u/{i}")))
            .collect();
        let unlocks: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| request("unlock", UNLOCK_ID, &format!("bench/u/{i}")))
            .collect();
        let mut latency = histogram();
        let mut sent_at = vec![Instant::now(); conns.len()];
        let cpu_before = self.pid.and_then(proc::cpu_ms);
        let start = Instant::now();
        let deadline = start + options.duration;
        for (i, conn) in conns.iter_mut().enumerate() {
            sent_at[i] = Instant::now();
            conn.send(&locks[i], &poll, Token(i)).map_err(io_err)?;
        }
        let mut cycles = 0u64;
        let mut events = Events::with_capacity(1024);
        let mut finished = 0;
        while finished < conns.len() {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            let now = Instant::now();
            for event in &events {
                let i = event.token().0;
                let conn = &mut conns[i];
                if event.is_writable() {
                    conn.flush(&poll, Token(i)).map_err(io_err)?;
                }
                if !event.is_readable() {
                    continue;
                }
                for id in replies(conn, &poll, Token(i)).map_err(io_err)? {
                    match id {
                        LOCK_ID => {
                            record(&mut latency, now - sent_at[i]);
                            conn.send(&unlocks[i], &poll, Token(i)).map_err(io_err)?;
                        }
                        _ if now >= deadline => finished += 1,
                        _ => {
                            cycles += 1;
                            sent_at[i] = now;
                            conn.send(&locks[i], &poll, Token(i)).map_err(io_err)?;
                        }
                    }
                }
            }
        }
        let elapsed = deadline
            .saturating_duration_since(start)
            .max(Duration::from_millis(1));
        let cpu_after = self.pid.and_then(proc::cpu_ms);
        drop(poll);
        Ok(Uncontended::from_counts(
            cycles, &latency, elapsed, cpu_before, cpu_after,
        ))
    }

    fn contended(&mut self, options: &BenchOptions) -> Result<Contended, BenchError> {
        self.one_lock(options, "bench/contended", false)
    }

    fn idle_holders(&mut self, options: &BenchOptions) -> Result<IdleHolders, BenchError> {
        raise_fd_limit(options.holders as u64 + 256)?;
        let probe_cycles = 2000;
        let mut probe = BlockingConn::connect(self.addr, self.tls())?;
        let probe_alone = probe.cycles("bench/probe", probe_cycles)?;
        let rss_before = self.pid.and_then(proc::rss_kib);
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut holders = connect_all_over(self.addr, options.holders, self.tls(), &mut poll)
            .map_err(|e| format!("holders: {e}"))?;
        for (i, conn) in holders.iter_mut().enumerate() {
            let lock = request("lock", LOCK_ID, &format!("bench/idle/{i}"));
            conn.send(&lock, &poll, Token(i))
                .map_err(|e| format!("holder {i}: {e}"))?;
        }
        let mut granted = vec![false; holders.len()];
        let mut waiting = holders.len();
        let deadline = Instant::now() + HOLDERS_TIMEOUT;
        let mut events = Events::with_capacity(1024);
        while waiting > 0 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "{waiting} of {} holders not granted after {HOLDERS_TIMEOUT:?}",
                    holders.len()
                ));
            }
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            for event in &events {
                let i = event.token().0;
                let Some(conn) = holders.get_mut(i) else {
                    continue;
                };
                if event.is_writable() {
                    conn.flush(&poll, Token(i))
                        .map_err(|e| format!("holder {i}: {e}"))?;
                }
                if !event.is_readable() {
                    continue;
                }
                let ids = replies(conn, &poll, Token(i)).map_err(|e| format!("holder {i}: {e}"))?;
                if ids.contains(&LOCK_ID) && !granted[i] {
                    granted[i] = true;
                    waiting -= 1;
                }
            }
        }
        // Let the server settle before reading its memory.
        std::thread::sleep(Duration::from_millis(200));
        let rss_with = self.pid.and_then(proc::rss_kib);
        let probe_with_holders = probe.cycles("bench/probe", probe_cycles)?;
        drop(holders);
        Ok(IdleHolders {
            holders: options.holders,
            probe_alone,
            probe_with_holders,
            rss_before_kib: rss_before,
            rss_with_holders_kib: rss_with,
            bytes_per_holder: rss_before
                .zip(rss_with)
                .map(|(b, a)| (a.saturating_sub(b) * 1024) as f64 / options.holders.max(1) as f64),
        })
    }

    fn handshakes(&mut self, options: &BenchOptions) -> Result<Handshakes, BenchError> {
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut ping = Vec::new();
        let _ = frame::encode(
            format!(r#"{{"command":"ping","id":{PING_ID}}}"#).as_bytes(),
            &mut ping,
        );
        let tls = self.tls.as_ref().map(|t| &t.client);
        let addr = self.addr;
        // Connects, and asks for a ping at once: over TLS it is sent with the
        // client's last handshake record, and its reply says the server has
        // finished the handshake.
        let open = |poll: &Poll, i: usize| -> Result<(LoadConn, Instant), BenchError> {
            let opened = Instant::now();
            let mut conn = LoadConn::open(addr, tls, poll, Token(i))?;
            conn.send(&ping, poll, Token(i)).map_err(io_err)?;
            Ok((conn, opened))
        };
        let cpu_before = self.pid.and_then(proc::cpu_ms);
        let start = Instant::now();
        let deadline = start + options.duration;
        let mut slots = (0..options.connections)
            .map(|i| open(&poll, i).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        let mut latency = histogram();
        let (mut counted, mut all) = (0u64, 0u64);
        let mut open_slots = slots.len();
        let mut events = Events::with_capacity(1024);
        while open_slots > 0 {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            for event in &events {
                let i = event.token().0;
                let Some(Some((conn, opened))) = slots.get_mut(i) else {
                    continue;
                };
                if event.is_writable() {
                    conn.flush(&poll, Token(i)).map_err(io_err)?;
                }
                if !event.is_readable() {
                    continue;
                }
                if !replies(conn, &poll, Token(i))
                    .map_err(io_err)?
                    .contains(&PING_ID)
                {
                    continue;
                }
                let now = Instant::now();
                all += 1;
                if now >= deadline {
                    slots[i] = None;
                    open_slots -= 1;
                    continue;
                }
                counted += 1;
                record(&mut latency, now - *opened);
                // The old connection closes as the new one takes its slot.
                slots[i] = Some(open(&poll, i)?);
            }
        }
        let cpu_after = self.pid.and_then(proc::cpu_ms);
        let elapsed = deadline
            .saturating_duration_since(start)
            .max(Duration::from_millis(1));
        Ok(Handshakes {
            tls: self.tls.is_some(),
            per_sec: counted as f64 / elapsed.as_secs_f64(),
            latency: Latency::from_histogram(&latency),
            server_cpu: cpu_before.zip(cpu_after).map(|(b, a)| ServerCpu {
                cpu_ms: a - b,
                us_per_op: (a - b) * 1000.0 / all.max(1) as f64,
            }),
        })
    }

    fn hold_and_wait(&mut self, options: &BenchOptions) -> Result<Contended, BenchError> {
        self.one_lock(options, "bench/hold-and-wait", true)
    }

    fn supports(&self, _workload: super::Workload) -> bool {
        true
    }

    fn many_locks(&mut self, options: &BenchOptions) -> Result<super::ManyLocks, BenchError> {
        const PER_CONNECTION: usize = 5_000;
        let probe_cycles = 5000;
        let mut probe = BlockingConn::connect(self.addr, self.tls())?;
        let mut few = hold_many(self.addr, self.tls(), 10, PER_CONNECTION, "bench/few")?;
        let probe_with_10 = probe.cycles("bench/probe-many", probe_cycles)?;
        few.clear();
        raise_fd_limit((options.many_locks / PER_CONNECTION) as u64 + 256)?;
        let _many = hold_many(
            self.addr,
            self.tls(),
            options.many_locks,
            PER_CONNECTION,
            "bench/many",
        )?;
        let probe_with_many = probe.cycles("bench/probe-many", probe_cycles)?;
        Ok(super::ManyLocks {
            held: options.many_locks,
            probe_with_10,
            probe_with_many,
        })
    }

    fn dead_holder(&mut self, options: &BenchOptions) -> Result<DeadHolder, BenchError> {
        let mut kill_to_grant = histogram();
        for round in 0..options.rounds {
            let name = format!("bench/dead/{round}");
            let addr = self.addr.to_string();
            let mut args = vec!["hold-pklock", &addr, &name];
            if let Some(tls) = &self.tls {
                args.extend(tls.args.iter().map(String::as_str));
            }
            let mut holder = spawn_holder(&args)?;
            let mut waiter = BlockingConn::connect(self.addr, self.tls())?;
            waiter.send(&request("lock", LOCK_ID, &name))?;
            wait_until_queued(self.addr, self.tls(), &name)?;
            let killed_at = Instant::now();
            holder.kill().map_err(|e| e.to_string())?;
            waiter.recv()?;
            record(&mut kill_to_grant, killed_at.elapsed());
            let _ = holder.wait();
        }
        Ok(DeadHolder {
            rounds: options.rounds,
            kill_to_grant: Latency::from_histogram(&kill_to_grant),
        })
    }
}

/// A socket, or a TLS session over one.
trait Stream: Read + Write {}

impl<T: Read + Write> Stream for T {}

/// A blocking connection for probes and waiters.
struct BlockingConn {
    stream: Box<dyn Stream>,
}

impl BlockingConn {
    fn connect(addr: SocketAddr, tls: Option<&TlsClient>) -> Result<BlockingConn, BenchError> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let stream: Box<dyn Stream> = match tls {
            Some(tls) => Box::new(tls.blocking(stream)?),
            None => Box::new(stream),
        };
        Ok(BlockingConn { stream })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), BenchError> {
        self.stream.write_all(bytes).map_err(|e| e.to_string())
    }

    fn recv(&mut self) -> Result<Vec<u8>, BenchError> {
        frame::read_blocking(&mut self.stream, 1 << 20).map_err(|e| e.to_string())
    }

    /// Lock/unlock cycles on `name`; the latency of each whole cycle.
    fn cycles(&mut self, name: &str, n: usize) -> Result<Latency, BenchError> {
        let (lock, unlock) = (
            request("lock", LOCK_ID, name),
            request("unlock", UNLOCK_ID, name),
        );
        let mut h = histogram();
        for _ in 0..n {
            let start = Instant::now();
            self.send(&lock)?;
            self.recv()?;
            self.send(&unlock)?;
            self.recv()?;
            record(&mut h, start.elapsed());
        }
        Ok(Latency::from_histogram(&h))
    }
}

/// Connections holding `count` distinct locks between them, `per_connection`
/// each (requests pipelined); dropping them releases the locks.
fn hold_many(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    count: usize,
    per_connection: usize,
    prefix: &str,
) -> Result<Vec<BlockingConn>, BenchError> {
    let mut holders = Vec::new();
    let mut taken = 0;
    while taken < count {
        let n = per_connection.min(count - taken);
        let mut conn = BlockingConn::connect(addr, tls)?;
        let mut requests = Vec::new();
        for i in taken..taken + n {
            requests.extend(request("lock", LOCK_ID, &format!("{prefix}/{i}")));
        }
        conn.send(&requests)?;
        for _ in 0..n {
            conn.recv()?;
        }
        holders.push(conn);
        taken += n;
    }
    Ok(holders)
}

/// Round trips of `ping` on one connection, for `duration`.
fn ping_latency(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    duration: Duration,
) -> Result<Latency, BenchError> {
    let mut conn = BlockingConn::connect(addr, tls)?;
    let mut ping = Vec::new();
    let _ = frame::encode(
        format!(r#"{{"command":"ping","id":{PING_ID}}}"#).as_bytes(),
        &mut ping,
    );
    let mut h = histogram();
    let start = Instant::now();
    while start.elapsed() < duration {
        let sent = Instant::now();
        conn.send(&ping)?;
        conn.recv()?;
        record(&mut h, sent.elapsed());
    }
    Ok(Latency::from_histogram(&h))
}

/// Waits until `name` has a waiter, so the kill finds one queued.
fn wait_until_queued(
    addr: SocketAddr,
    tls: Option<&TlsClient>,
    name: &str,
) -> Result<(), BenchError> {
    let mut conn = BlockingConn::connect(addr, tls)?;
    let mut status = Vec::new();
    let body = serde_json::json!({"command": "status", "id": 4, "parameters": {"lockName": name}})
        .to_string();
    let _ = frame::encode(body.as_bytes(), &mut status);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        conn.send(&status)?;
        let reply: serde_json::Value =
            serde_json::from_slice(&conn.recv()?).map_err(|e| e.to_string())?;
        if reply["result"]["locks"][0]["waiters"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(format!("no waiter showed up on {name}"))
}

/// Starts this program again as a holder process; returns once it holds.
pub fn spawn_holder(args: &[&str]) -> Result<std::process::Child, BenchError> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start a holder: {e}"))?;
    let stdout = child.stdout.take().ok_or("holder without stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "held" {
        let _ = child.kill();
        return Err(format!("holder did not take the lock: {line:?}"));
    }
    Ok(child)
}

/// The holder process's side: take `name`, say `held`, and wait to be killed.
pub fn hold(addr: SocketAddr, tls: Option<&TlsClient>, name: &str) -> Result<(), BenchError> {
    let mut conn = BlockingConn::connect(addr, tls)?;
    conn.send(&request("lock", LOCK_ID, name))?;
    conn.recv()?;
    println!("held");
    io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Raises this process's open-file limit to at least `wanted`.
pub fn raise_fd_limit(wanted: u64) -> Result<(), BenchError> {
    let limit = rlimit::increase_nofile_limit(wanted).map_err(|e| e.to_string())?;
    if limit < wanted {
        return Err(format!(
            "the open-file limit is {limit}, {wanted} are needed; raise it (ulimit -n)"
        ));
    }
    Ok(())
}
