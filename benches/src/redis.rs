//! The workloads against a Redis lock, taken the way Redis lock clients take
//! one: `SET key token NX PX ttl` to acquire, a compare-and-delete Lua script
//! (`EVALSHA`) to release, and waiters that poll: after a nil they try again
//! `redis_retry` later. RESP is spoken by hand over non-blocking sockets in
//! one `mio` loop, every connection on one thread, like the pklock load
//! generator, so that the two load generators cost alike; the retry timers
//! are the loop's poll timeout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::{Events, Poll, Token};

use super::conn::{self, LoadConn, io_err};
use super::pklock::{raise_fd_limit, spawn_holder};
use super::{
    BenchError, BenchOptions, Contended, DeadHolder, IdleHolders, Latency, Uncontended, histogram,
    proc, record,
};

/// Release only if the lock still holds our token: a lock that expired and
/// went to someone else must not be deleted by its former holder.
const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
     return redis.call('del', KEYS[1]) else return 0 end";

/// Lock-unlock cycles the idle-holders probe times, alone and beside them.
const PROBE_CYCLES: usize = 2000;

/// The Redis server under test.
pub struct Redis {
    url: String,
    addr: SocketAddr,
    pid: Option<u32>,
    /// Overrides `BenchOptions::redis_retry`.
    retry: Option<Duration>,
    name: String,
    /// Key prefix unique to this bench process, so that keys left behind by
    /// an earlier run (they live out their TTL) never collide.
    prefix: String,
    /// Workloads run so far, for a fresh key prefix each.
    runs: u64,
}

impl Redis {
    /// The server at `redis://HOST[:PORT]` (port 6379 by default); its
    /// process, for CPU time and memory, is found from the port.
    pub fn new(url: &str) -> Result<Redis, BenchError> {
        let addr = parse_url(url)?;
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        Ok(Redis {
            url: url.to_string(),
            addr,
            pid: proc::pid_listening_on(addr.port()),
            retry: None,
            name: "redis".to_string(),
            prefix: format!("pklock-bench:{}:{millis}", std::process::id()),
            runs: 0,
        })
    }

    /// Waiters retry every `retry` instead of `options.redis_retry`; the
    /// backend is then named `redis-<retry>ms` in the results.
    pub fn with_retry(mut self, retry: Duration) -> Redis {
        self.retry = Some(retry);
        self.name = format!("redis-{}ms", retry.as_millis());
        self
    }

    fn retry(&self, options: &BenchOptions) -> Duration {
        self.retry.unwrap_or(options.redis_retry)
    }

    /// A key prefix no earlier workload of this process used.
    fn next_prefix(&mut self, workload: &str) -> String {
        self.runs += 1;
        format!("{}:{}:{workload}", self.prefix, self.runs)
    }

    /// Loads the release script; returns its SHA1 for `EVALSHA`.
    fn load_script(&self) -> Result<String, BenchError> {
        let mut conn = Blocking::connect(self.addr)?;
        match conn.call(&[b"SCRIPT", b"LOAD", RELEASE_SCRIPT.as_bytes()])? {
            Reply::Bulk(Some(sha)) => String::from_utf8(sha).map_err(|e| e.to_string()),
            other => Err(format!("SCRIPT LOAD: {}", describe(&other))),
        }
    }

    /// The server's `maxclients`, if it lets us read it.
    fn maxclients(&self) -> Option<usize> {
        let mut conn = Blocking::connect(self.addr).ok()?;
        match conn.call(&[b"CONFIG", b"GET", b"maxclients"]).ok()? {
            Reply::Array(Some(items)) => match items.get(1)? {
                Reply::Bulk(Some(value)) => std::str::from_utf8(value).ok()?.parse().ok(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// `redis://[HOST][:PORT][/0]` to a socket address. No password or database
/// other than 0: the bench needs neither.
fn parse_url(url: &str) -> Result<SocketAddr, BenchError> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("{url}: expected redis://HOST:PORT"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.contains('@') {
        return Err(format!("{url}: authentication is not supported"));
    }
    if !path.is_empty() && path != "0" {
        return Err(format!("{url}: only database 0 is supported"));
    }
    let authority = if authority.is_empty() {
        "127.0.0.1"
    } else {
        authority
    };
    // A port is there if the text after the last ':' follows the host (or
    // the closing bracket of an IPv6 address).
    let has_port = match authority.rfind(':') {
        Some(colon) => authority.starts_with('[') == authority[..colon].ends_with(']'),
        None => false,
    };
    let with_port = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:6379")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))
}

/// One RESP command.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `SET key token NX PX ttl`: take the lock if it is free.
fn acquire(key: &str, token: &str, ttl_ms: u64) -> Vec<u8> {
    command(&[
        b"SET",
        key.as_bytes(),
        token.as_bytes(),
        b"NX",
        b"PX",
        ttl_ms.to_string().as_bytes(),
    ])
}

/// `EVALSHA sha 1 key token`: the compare-and-delete release.
fn release(sha: &str, key: &str, token: &str) -> Vec<u8> {
    command(&[
        b"EVALSHA",
        sha.as_bytes(),
        b"1",
        key.as_bytes(),
        token.as_bytes(),
    ])
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq)]
enum Reply {
    /// `+OK`, `+PONG`.
    Simple(String),
    /// `-ERR ...`.
    Error(String),
    /// `:1`.
    Int(i64),
    /// `$3 abc`; `None` is nil (`$-1`, what `SET NX` answers when held).
    Bulk(Option<Vec<u8>>),
    /// `*2 ...`; `None` is a nil array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn is_ok(&self) -> bool {
        matches!(self, Reply::Simple(s) if s == "OK")
    }

    fn is_nil(&self) -> bool {
        matches!(self, Reply::Bulk(None))
    }
}

/// A reply in words, for errors.
fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Error(e) => format!("redis answered: {e}"),
        other => format!("unexpected reply {other:?}"),
    }
}

/// Parses one reply from the front of `buf`: the reply and the bytes it
/// took, or `None` if it is not all there yet.
fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, BenchError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = &buf[1..end];
    let next = end + 2;
    let text = || String::from_utf8_lossy(line).into_owned();
    let int = || -> Result<i64, BenchError> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad RESP length or integer {:?}", text()))
    };
    let reply = match buf[0] {
        b'+' => (Reply::Simple(text()), next),
        b'-' => (Reply::Error(text()), next),
        b':' => (Reply::Int(int()?), next),
        b'$' => match usize::try_from(int()?) {
            Err(_) => (Reply::Bulk(None), next),
            Ok(n) => {
                if buf.len() < next + n + 2 {
                    return Ok(None);
                }
                (
                    Reply::Bulk(Some(buf[next..next + n].to_vec())),
                    next + n + 2,
                )
            }
        },
        b'*' => match usize::try_from(int()?) {
            Err(_) => (Reply::Array(None), next),
            Ok(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                let mut offset = next;
                for _ in 0..n {
                    let Some((item, used)) = parse(&buf[offset..])? else {
                        return Ok(None);
                    };
                    items.push(item);
                    offset += used;
                }
                (Reply::Array(Some(items)), offset)
            }
        },
        other => return Err(format!("not RESP: starts with {:?}", other as char)),
    };
    Ok(Some(reply))
}

/// What a reply still to come answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Acquire,
    Release,
}

/// One load-generator connection, with the commands whose replies are
/// still to come (they come in order).
struct Conn {
    load: LoadConn,
    pending: VecDeque<Sent>,
}

impl Conn {
    /// Sends `bytes`, which hold the commands `sent`, in order.
    fn send(&mut self, bytes: &[u8], sent: &[Sent], poll: &Poll, token: Token) -> io::Result<()> {
        self.pending.extend(sent);
        self.load.send(bytes, poll, token)
    }

    fn flush(&mut self, poll: &Poll, token: Token) -> io::Result<()> {
        self.load.flush(poll, token)
    }

    /// Reads what is there; returns the whole replies in it, each with the
    /// command it answers.
    fn replies(&mut self) -> Result<Vec<(Sent, Reply)>, BenchError> {
        self.load.fill().map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "redis closed the connection".to_string(),
            _ => io_err(e),
        })?;
        let mut replies = Vec::new();
        let mut offset = 0;
        while let Some((reply, used)) = parse(&self.load.input[offset..])? {
            let sent = self
                .pending
                .pop_front()
                .ok_or_else(|| format!("a reply nothing asked for: {reply:?}"))?;
            replies.push((sent, reply));
            offset += used;
        }
        self.load.input.drain(..offset);
        Ok(replies)
    }
}

/// Connects `n` load-generator connections registered on `poll`.
fn connect_all(addr: SocketAddr, n: usize, poll: &Poll) -> Result<Vec<Conn>, BenchError> {
    Ok(conn::connect_all(addr, n, poll)?
        .into_iter()
        .map(|load| Conn {
            load,
            pending: VecDeque::new(),
        })
        .collect())
}

/// A blocking connection for setup, probes, pings, holders and waiters.
struct Blocking {
    stream: TcpStream,
    input: Vec<u8>,
}

impl Blocking {
    fn connect(addr: SocketAddr) -> Result<Blocking, BenchError> {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Blocking {
            stream,
            input: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), BenchError> {
        self.stream.write_all(bytes).map_err(|e| e.to_string())
    }

    fn recv(&mut self) -> Result<Reply, BenchError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some((reply, used)) = parse(&self.input)? {
                self.input.drain(..used);
                return Ok(reply);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("redis closed the connection".to_string()),
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> Result<Reply, BenchError> {
        self.send(&command(args))?;
        self.recv()
    }

    /// Acquire-release cycles on `key`; the latency of each whole cycle.
    fn cycles(&mut self, acquire: &[u8], release: &[u8], n: usize) -> Result<Latency, BenchError> {
        let mut h = histogram();
        for _ in 0..n {
            let start = Instant::now();
            self.send(acquire)?;
            let got = self.recv()?;
            if !got.is_ok() {
                return Err(format!("probe acquire: {}", describe(&got)));
            }
            self.send(release)?;
            let released = self.recv()?;
            if released != Reply::Int(1) {
                return Err(format!("probe release: {}", describe(&released)));
            }
            record(&mut h, start.elapsed());
        }
        Ok(Latency::from_histogram(&h))
    }
}

/// Round trips of `PING` on one connection, for `duration`.
fn ping_latency(addr: SocketAddr, duration: Duration) -> Result<Latency, BenchError> {
    let mut conn = Blocking::connect(addr)?;
    let ping = command(&[b"PING"]);
    let mut h = histogram();
    let start = Instant::now();
    while start.elapsed() < duration {
        let sent = Instant::now();
        conn.send(&ping)?;
        let reply = conn.recv()?;
        if reply != Reply::Simple("PONG".to_string()) {
            return Err(format!("PING: {}", describe(&reply)));
        }
        record(&mut h, sent.elapsed());
    }
    Ok(Latency::from_histogram(&h))
}

impl super::Backend for Redis {
    fn name(&self) -> &str {
        &self.name
    }

    fn target(&self) -> String {
        let retry = self
            .retry
            .map_or(String::new(), |r| format!(", waiters retry every {r:?}"));
        match self.pid {
            Some(pid) => format!("{} (pid {pid}){retry}", self.addr),
            None => format!("{}{retry}", self.addr),
        }
    }

    fn uncontended(&mut self, options: &BenchOptions) -> Result<Uncontended, BenchError> {
        let sha = self.load_script()?;
        let prefix = self.next_prefix("u");
        let ttl = ttl_ms(options.redis_ttl);
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut conns = connect_all(self.addr, options.connections, &poll)?;
        let keys: Vec<String> = (0..conns.len()).map(|i| format!("{prefix}:{i}")).collect();
        let tokens: Vec<String> = (0..conns.len()).map(|i| format!("client-{i}")).collect();
        let acquires: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| acquire(&keys[i], &tokens[i], ttl))
            .collect();
        let releases: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| release(&sha, &keys[i], &tokens[i]))
            .collect();
        let mut latency = histogram();
        let mut sent_at = vec![Instant::now(); conns.len()];
        let cpu_before = self.pid.and_then(proc::cpu_ms);
        let start = Instant::now();
        let deadline = start + options.duration;
        for (i, conn) in conns.iter_mut().enumerate() {
            sent_at[i] = Instant::now();
            conn.send(&acquires[i], &[Sent::Acquire], &poll, Token(i))
                .map_err(io_err)?;
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
                for (sent, reply) in conn.replies()? {
                    match sent {
                        Sent::Acquire if reply.is_ok() => {
                            record(&mut latency, now - sent_at[i]);
                            conn.send(&releases[i], &[Sent::Release], &poll, Token(i))
                                .map_err(io_err)?;
                        }
                        Sent::Acquire if reply.is_nil() => {
                            return Err(format!("{} was held by someone else", keys[i]));
                        }
                        Sent::Release if reply == Reply::Int(1) => {
                            if now >= deadline {
                                finished += 1;
                            } else {
                                cycles += 1;
                                sent_at[i] = now;
                                conn.send(&acquires[i], &[Sent::Acquire], &poll, Token(i))
                                    .map_err(io_err)?;
                            }
                        }
                        _ => return Err(format!("{sent:?}: {}", describe(&reply))),
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
        let retry = self.retry(options);
        let ping = ping_latency(self.addr, Duration::from_secs(1))?;
        let sha = self.load_script()?;
        let key = self.next_prefix("contended");
        let ttl = ttl_ms(options.redis_ttl);
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        let mut conns = connect_all(self.addr, options.connections, &poll)?;
        let acquires: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| acquire(&key, &format!("client-{i}"), ttl))
            .collect();
        // A holder releases, and once its release is answered tries again,
        // as a client of a Redis lock library does (release() returns, then
        // acquire()). Sending both in one write (as the pklock holders send
        // unlock and their next lock) would make release-and-retake atomic
        // in Redis, which runs a connection's pipelined commands back to
        // back: no waiter could ever win, whatever its retry interval.
        let releases: Vec<Vec<u8>> = (0..conns.len())
            .map(|i| release(&sha, &key, &format!("client-{i}")))
            .collect();
        for (i, conn) in conns.iter_mut().enumerate() {
            conn.send(&acquires[i], &[Sent::Acquire], &poll, Token(i))
                .map_err(io_err)?;
        }
        // Let every first try land before timing starts.
        std::thread::sleep(Duration::from_millis(100));
        let mut grants = vec![0u64; conns.len()];
        let mut handover = histogram();
        let mut released_at: Option<(usize, Instant)> = None;
        let mut regrants = 0u64;
        // Waiters whose try found the lock held, with when to try again; all
        // wait the same interval, so the earliest is always in front.
        let mut retries: VecDeque<(Instant, usize)> = VecDeque::new();
        let start = Instant::now();
        let deadline = start + options.duration;
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let timeout = retries
                .front()
                .map_or(Duration::from_millis(100), |&(at, _)| {
                    at.saturating_duration_since(now)
                })
                .min(deadline - now);
            poll.poll(&mut events, Some(timeout))
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
                for (sent, reply) in conn.replies()? {
                    match sent {
                        Sent::Acquire if reply.is_ok() => {
                            if now >= deadline {
                                continue;
                            }
                            grants[i] += 1;
                            if let Some((previous, at)) = released_at {
                                record(&mut handover, now - at);
                                regrants += u64::from(previous == i);
                            }
                            released_at = Some((i, Instant::now()));
                            conn.send(&releases[i], &[Sent::Release], &poll, Token(i))
                                .map_err(io_err)?;
                        }
                        Sent::Acquire if reply.is_nil() => retries.push_back((now + retry, i)),
                        Sent::Release if reply == Reply::Int(1) => {
                            conn.send(&acquires[i], &[Sent::Acquire], &poll, Token(i))
                                .map_err(io_err)?;
                        }
                        Sent::Release if reply == Reply::Int(0) => {
                            return Err(format!(
                                "a holder found its lock expired; raise --redis-ttl above {ttl} ms"
                            ));
                        }
                        _ => return Err(format!("{sent:?}: {}", describe(&reply))),
                    }
                }
            }
            let now = Instant::now();
            while let Some(&(at, i)) = retries.front() {
                if at > now {
                    break;
                }
                retries.pop_front();
                conns[i]
                    .send(&acquires[i], &[Sent::Acquire], &poll, Token(i))
                    .map_err(io_err)?;
            }
        }
        let elapsed = start.elapsed();
        drop(conns);
        Ok(Contended::from_counts(
            &grants, regrants, &handover, ping, elapsed,
        ))
    }

    fn idle_holders(&mut self, options: &BenchOptions) -> Result<IdleHolders, BenchError> {
        let n = options.holders;
        // The probe, this check and the script load take connections too.
        let maxclients = self.maxclients();
        if let Some(max) = maxclients.filter(|&max| n + 8 > max) {
            return Err(format!(
                "redis maxclients is {max}, too few for {n} holders and a probe: raise it \
                 (CONFIG SET maxclients {}, or start Redis with benches/services.sh) or lower --holders",
                n + 100
            ));
        }
        raise_fd_limit(n as u64 + 256)?;
        let sha = self.load_script()?;
        let prefix = self.next_prefix("idle");
        let ttl = ttl_ms(options.redis_ttl);
        let probe_key = format!("{prefix}:probe");
        let (probe_acquire, probe_release) = (
            acquire(&probe_key, "probe", ttl),
            release(&sha, &probe_key, "probe"),
        );
        let mut probe = Blocking::connect(self.addr)?;
        let probe_alone = probe.cycles(&probe_acquire, &probe_release, PROBE_CYCLES)?;
        let rss_before = self.pid.and_then(proc::rss_kib);
        let refused = |i: usize, e: String| {
            format!(
                "holder {i} of {n}: {e} (redis refuses clients past its maxclients{}; \
                 raise it or lower --holders)",
                maxclients.map_or(String::new(), |m| format!(", {m}"))
            )
        };
        // An idle holder keeps its lock for as long as the measurement runs
        // (a few seconds): give it a TTL that outlasts it, as a holder
        // renewing its lock would. A minute, so that the keys of a run that
        // failed halfway go soon.
        let hold_ttl = ttl.max(60_000);
        let mut holders = Vec::with_capacity(n);
        for i in 0..n {
            let mut conn = Blocking::connect(self.addr).map_err(|e| refused(i, e))?;
            conn.send(&acquire(&format!("{prefix}:{i}"), "holder", hold_ttl))
                .map_err(|e| refused(i, e))?;
            holders.push(conn);
        }
        for (i, conn) in holders.iter_mut().enumerate() {
            let reply = conn.recv().map_err(|e| refused(i, e))?;
            if !reply.is_ok() {
                return Err(refused(i, describe(&reply)));
            }
        }
        // Let the server settle before reading its memory.
        std::thread::sleep(Duration::from_millis(200));
        let rss_with = self.pid.and_then(proc::rss_kib);
        let probe_with_holders = probe.cycles(&probe_acquire, &probe_release, PROBE_CYCLES)?;
        // Release every lock (the keys would otherwise outlive the run).
        for (i, conn) in holders.iter_mut().enumerate() {
            conn.send(&release(&sha, &format!("{prefix}:{i}"), "holder"))?;
        }
        for conn in &mut holders {
            conn.recv()?;
        }
        drop(holders);
        Ok(IdleHolders {
            holders: n,
            probe_alone,
            probe_with_holders,
            rss_before_kib: rss_before,
            rss_with_holders_kib: rss_with,
            bytes_per_holder: rss_before
                .zip(rss_with)
                .map(|(b, a)| (a.saturating_sub(b) * 1024) as f64 / n.max(1) as f64),
        })
    }

    /// A Redis lock outlives its dead holder by its TTL, so each round takes
    /// about `redis_ttl`: at most 3 rounds are run.
    fn dead_holder(&mut self, options: &BenchOptions) -> Result<DeadHolder, BenchError> {
        let retry = self.retry(options);
        let rounds = options.rounds.min(3);
        let sha = self.load_script()?;
        let prefix = self.next_prefix("dead");
        let ttl = ttl_ms(options.redis_ttl);
        let mut kill_to_grant = histogram();
        for round in 0..rounds {
            let name = format!("{prefix}:{round}");
            let mut holder = spawn_holder(&["hold-redis", &self.url, &name, &ttl.to_string()])?;
            let mut waiter = Blocking::connect(self.addr)?;
            let take = acquire(&name, "waiter", ttl);
            // The waiter's first try must find the lock held: it is waiting.
            waiter.send(&take)?;
            let first = waiter.recv()?;
            if !first.is_nil() {
                let _ = holder.kill();
                let _ = holder.wait();
                return Err(format!(
                    "the waiter's first try on {name}: {}",
                    describe(&first)
                ));
            }
            let killed_at = Instant::now();
            holder.kill().map_err(|e| e.to_string())?;
            // The waiter polls as a Redis lock client does, sleeping `retry`
            // after each nil.
            loop {
                std::thread::sleep(retry);
                waiter.send(&take)?;
                let reply = waiter.recv()?;
                if reply.is_ok() {
                    record(&mut kill_to_grant, killed_at.elapsed());
                    break;
                }
                if !reply.is_nil() {
                    return Err(format!("waiter on {name}: {}", describe(&reply)));
                }
            }
            let _ = holder.wait();
            waiter.send(&release(&sha, &name, "waiter"))?;
            waiter.recv()?;
        }
        Ok(DeadHolder {
            rounds,
            kill_to_grant: Latency::from_histogram(&kill_to_grant),
        })
    }
}

/// The holder process's side (`pklock-bench hold-redis URL NAME TTL_MS`):
/// take `name` with `SET NX PX`, say `held`, and wait to be killed.
pub fn hold(url: &str, name: &str, ttl_ms: u64) -> Result<(), BenchError> {
    let mut conn = Blocking::connect(parse_url(url)?)?;
    let token = format!("holder-{}", std::process::id());
    let reply = conn.call(&[
        b"SET",
        name.as_bytes(),
        token.as_bytes(),
        b"NX",
        b"PX",
        ttl_ms.to_string().as_bytes(),
    ])?;
    if !reply.is_ok() {
        return Err(format!("SET {name} NX: {}", describe(&reply)));
    }
    println!("held");
    io::stdout().flush().map_err(|e| e.to_string())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse(b"+OK\r\n").unwrap(),
            Some((Reply::Simple("OK".into()), 5))
        );
        assert_eq!(parse(b"$-1\r\n").unwrap(), Some((Reply::Bulk(None), 5)));
        assert_eq!(parse(b":1\r\n+OK").unwrap(), Some((Reply::Int(1), 4)));
        assert_eq!(
            parse(b"-ERR max number of clients reached\r\n").unwrap(),
            Some((Reply::Error("ERR max number of clients reached".into()), 36))
        );
        assert_eq!(
            parse(b"*2\r\n$10\r\nmaxclients\r\n$5\r\n20000\r\n").unwrap(),
            Some((
                Reply::Array(Some(vec![
                    Reply::Bulk(Some(b"maxclients".to_vec())),
                    Reply::Bulk(Some(b"20000".to_vec())),
                ])),
                32
            ))
        );
        // Incomplete replies wait for more bytes.
        assert_eq!(parse(b"+O").unwrap(), None);
        assert_eq!(parse(b"$5\r\nabc").unwrap(), None);
        assert_eq!(parse(b"*2\r\n:1\r\n").unwrap(), None);
        assert!(parse(b"?\r\n").is_err());
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            acquire("k", "t", 10_000),
            b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nt\r\n$2\r\nNX\r\n$2\r\nPX\r\n$5\r\n10000\r\n"
        );
    }

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6390").unwrap(),
            "127.0.0.1:6390".parse().unwrap()
        );
        assert_eq!(
            parse_url("redis://127.0.0.1").unwrap(),
            "127.0.0.1:6379".parse().unwrap()
        );
        assert_eq!(
            parse_url("redis://[::1]:6390/0").unwrap(),
            "[::1]:6390".parse().unwrap()
        );
        assert_eq!(
            parse_url("redis://[::1]").unwrap(),
            "[::1]:6379".parse().unwrap()
        );
        assert!(parse_url("redis://user:pw@127.0.0.1:6390").is_err());
        assert!(parse_url("redis://127.0.0.1:6390/2").is_err());
        assert!(parse_url("http://127.0.0.1").is_err());
    }
}
