//! `pklock-bench`: the same lock workloads against pklock and, side by side in
//! one run, against the locks people would use instead (a Redis `SET NX PX`
//! lock, PostgreSQL advisory locks; behind the `compare` feature). Each
//! backend implements [`Backend`]; this crate runs them and reports.
//! pklock is reached over plain TCP or, with [`tls::TlsClient`], over TLS.
//!
//! A crate of its own beside the pklock library, which it uses as any
//! client would (its framing, and the TLS provider and CA reader the server
//! and the client share), so that its load generators and comparison
//! clients are no dependency of the product.

#![deny(missing_docs)]

pub mod conn;
pub mod pklock;
#[cfg(feature = "compare")]
pub mod postgres;
pub mod proc;
#[cfg(feature = "compare")]
pub mod redis;
pub mod tls;

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A failure to run a workload, in words.
pub type BenchError = String;

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Each connection its own lock: lock, unlock, again.
    Uncontended,
    /// Every connection on one lock, unlocking as soon as granted.
    Contended,
    /// Many connections each holding a lock while one more measures.
    IdleHolders,
    /// A holder process is SIGKILLed while a waiter is queued.
    DeadHolder,
    /// Lock/unlock beside 10 held locks, then beside many (pklock only: the
    /// cost of a lock must not grow with the number held).
    ManyLocks,
    /// New connections, one after another on each of several slots:
    /// connect (and the TLS handshake, over TLS), one ping, close (pklock
    /// only: what a flood of new clients costs the event loop).
    Handshakes,
    /// `contended`, with each connection also holding a lock of its own the
    /// whole time, so that each of its waits has the server's deadlock check
    /// walk the queue it joins (pklock only).
    HoldAndWait,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 7] = [
        Workload::Uncontended,
        Workload::Contended,
        Workload::IdleHolders,
        Workload::DeadHolder,
        Workload::ManyLocks,
        Workload::Handshakes,
        Workload::HoldAndWait,
    ];

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Uncontended => "uncontended",
            Workload::Contended => "contended",
            Workload::IdleHolders => "idle-holders",
            Workload::DeadHolder => "dead-holder",
            Workload::ManyLocks => "many-locks",
            Workload::Handshakes => "handshakes",
            Workload::HoldAndWait => "hold-and-wait",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// How long each timed workload runs.
    pub duration: Duration,
    /// Connections for `uncontended`, `contended` and `hold-and-wait`.
    pub connections: usize,
    /// Holders for `idle-holders`.
    pub holders: usize,
    /// Rounds for `dead-holder`.
    pub rounds: usize,
    /// Locks held for `many-locks`.
    pub many_locks: usize,
    /// How long a Redis lock lives (its TTL, the PX of SET NX PX).
    pub redis_ttl: Duration,
    /// How often a Redis waiter retries.
    pub redis_retry: Duration,
}

/// Latency percentiles, in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// From a histogram of nanoseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.5)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// A histogram of nanoseconds from 1 µs to 100 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).unwrap_or_else(|_| {
        // The bounds above are valid; this arm cannot be taken.
        Histogram::new(3).unwrap_or_else(|e| unreachable!("{e}"))
    })
}

/// Records `d` in a histogram of nanoseconds, clamped to its range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record(ns.clamp(1_000, 100_000_000_000));
}

/// CPU time the server processes used, per unit of work.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ServerCpu {
    /// User plus system time, in milliseconds.
    pub cpu_ms: f64,
    /// That per completed operation, in microseconds.
    pub us_per_op: f64,
}

/// `uncontended` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Uncontended {
    /// Lock-unlock cycles per second.
    pub cycles_per_sec: f64,
    /// From sending a lock request to its grant.
    pub lock_latency: Latency,
    /// Server CPU per cycle, if the server's processes could be found.
    pub server_cpu: Option<ServerCpu>,
}

/// `contended` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Contended {
    /// Grants per second.
    pub grants_per_sec: f64,
    /// From the holder sending its unlock to the next holder getting its grant.
    pub handover: Latency,
    /// The fewest grants one connection got.
    pub min_grants: u64,
    /// The most grants one connection got.
    pub max_grants: u64,
    /// `min_grants / max_grants`: 1 is perfectly fair.
    pub fairness: f64,
    /// Round trip of a one-connection no-op (ping), measured in the same run.
    pub ping: Latency,
    /// The share of grants that went to the connection that had just released.
    pub regrant_share: f64,
    /// Server CPU per grant, where measured (pklock).
    pub server_cpu: Option<ServerCpu>,
}

impl Uncontended {
    /// The summary of a run: `cycles` done in `elapsed`, lock latencies, and
    /// the server's CPU time (ms) before and after, when it could be read.
    pub fn from_counts(
        cycles: u64,
        latency: &Histogram<u64>,
        elapsed: Duration,
        cpu_before: Option<f64>,
        cpu_after: Option<f64>,
    ) -> Uncontended {
        Uncontended {
            cycles_per_sec: cycles as f64 / elapsed.as_secs_f64().max(1e-3),
            lock_latency: Latency::from_histogram(latency),
            server_cpu: cpu_before.zip(cpu_after).map(|(b, a)| ServerCpu {
                cpu_ms: a - b,
                us_per_op: (a - b) * 1000.0 / cycles.max(1) as f64,
            }),
        }
    }
}

impl Contended {
    /// The summary of a run: `grants` per connection, of which `regrants`
    /// went back to the connection that had just released, over `elapsed`.
    pub fn from_counts(
        grants: &[u64],
        regrants: u64,
        handover: &Histogram<u64>,
        ping: Latency,
        elapsed: Duration,
    ) -> Contended {
        let total: u64 = grants.iter().sum();
        let min = grants.iter().copied().min().unwrap_or(0);
        let max = grants.iter().copied().max().unwrap_or(0);
        Contended {
            grants_per_sec: total as f64 / elapsed.as_secs_f64().max(1e-3),
            handover: Latency::from_histogram(handover),
            min_grants: min,
            max_grants: max,
            fairness: min as f64 / max.max(1) as f64,
            ping,
            regrant_share: regrants as f64 / total.max(1) as f64,
            server_cpu: None,
        }
    }
}

/// `idle-holders` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct IdleHolders {
    /// Holders connected.
    pub holders: usize,
    /// Probe lock-unlock latency with no holders.
    pub probe_alone: Latency,
    /// Probe lock-unlock latency beside the holders.
    pub probe_with_holders: Latency,
    /// Server resident memory before the holders connected, in KiB.
    pub rss_before_kib: Option<u64>,
    /// With the holders, in KiB.
    pub rss_with_holders_kib: Option<u64>,
    /// `(with − before) / holders`, in bytes.
    pub bytes_per_holder: Option<f64>,
}

/// `dead-holder` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DeadHolder {
    /// Rounds run.
    pub rounds: usize,
    /// From SIGKILL of the holder to the waiter's grant.
    pub kill_to_grant: Latency,
}

/// `many-locks` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ManyLocks {
    /// Locks held in the second measurement.
    pub held: usize,
    /// Probe lock-unlock latency with 10 locks held.
    pub probe_with_10: Latency,
    /// With `held` locks held.
    pub probe_with_many: Latency,
}

/// `handshakes` results.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Handshakes {
    /// Whether the connections spoke TLS.
    pub tls: bool,
    /// New connections through to their first reply, per second.
    pub per_sec: f64,
    /// From connecting to the reply to the first request.
    pub latency: Latency,
    /// Server CPU per new connection (accept, handshake, one request, close).
    pub server_cpu: Option<ServerCpu>,
}

/// One backend's results; a workload not run (or failed) is `None`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Results {
    /// `pklock`, `redis`, `postgres`.
    pub backend: String,
    /// Where it was reached.
    pub target: String,
    /// `uncontended`.
    pub uncontended: Option<Uncontended>,
    /// `contended`.
    pub contended: Option<Contended>,
    /// `idle-holders`.
    pub idle_holders: Option<IdleHolders>,
    /// `dead-holder`.
    pub dead_holder: Option<DeadHolder>,
    /// `many-locks`.
    pub many_locks: Option<ManyLocks>,
    /// `handshakes`.
    pub handshakes: Option<Handshakes>,
    /// `hold-and-wait`: as `contended`.
    pub hold_and_wait: Option<Contended>,
    /// Workloads that could not run, and why.
    pub errors: Vec<String>,
}

/// A lock service the workloads can run against.
pub trait Backend {
    /// `pklock`, `redis`, `postgres`.
    fn name(&self) -> &str;
    /// Where it is, for the report.
    fn target(&self) -> String;
    /// Each connection its own lock: lock, unlock, again, for the duration.
    fn uncontended(&mut self, options: &BenchOptions) -> Result<Uncontended, BenchError>;
    /// Every connection on one lock, unlocking as soon as granted.
    fn contended(&mut self, options: &BenchOptions) -> Result<Contended, BenchError>;
    /// `options.holders` connections each holding a lock, and a probe.
    fn idle_holders(&mut self, options: &BenchOptions) -> Result<IdleHolders, BenchError>;
    /// A holder process SIGKILLed while a waiter waits, `options.rounds` times.
    fn dead_holder(&mut self, options: &BenchOptions) -> Result<DeadHolder, BenchError>;
    /// Whether this backend runs `workload` (`many-locks`, `handshakes`
    /// and `hold-and-wait` are pklock's own).
    fn supports(&self, workload: Workload) -> bool {
        !matches!(
            workload,
            Workload::ManyLocks | Workload::Handshakes | Workload::HoldAndWait
        )
    }
    /// Lock/unlock beside 10 held locks, then beside `options.many_locks`.
    fn many_locks(&mut self, _options: &BenchOptions) -> Result<ManyLocks, BenchError> {
        Err("not measured for this backend".to_string())
    }
    /// New connections on `options.connections` slots for the duration.
    fn handshakes(&mut self, _options: &BenchOptions) -> Result<Handshakes, BenchError> {
        Err("not measured for this backend".to_string())
    }
    /// As `contended`, each connection holding a lock of its own throughout.
    fn hold_and_wait(&mut self, _options: &BenchOptions) -> Result<Contended, BenchError> {
        Err("not measured for this backend".to_string())
    }
}

/// Runs `workloads` on `backend`; a failing workload is recorded, not fatal.
pub fn run(backend: &mut dyn Backend, workloads: &[Workload], options: &BenchOptions) -> Results {
    let mut results = Results {
        backend: backend.name().to_string(),
        target: backend.target(),
        ..Results::default()
    };
    let supported: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|&w| backend.supports(w))
        .collect();
    for workload in supported {
        eprintln!("{}: {} ...", backend.name(), workload.name());
        let outcome = match workload {
            Workload::Uncontended => backend
                .uncontended(options)
                .map(|r| results.uncontended = Some(r)),
            Workload::Contended => backend
                .contended(options)
                .map(|r| results.contended = Some(r)),
            Workload::IdleHolders => backend
                .idle_holders(options)
                .map(|r| results.idle_holders = Some(r)),
            Workload::DeadHolder => backend
                .dead_holder(options)
                .map(|r| results.dead_holder = Some(r)),
            Workload::ManyLocks => backend
                .many_locks(options)
                .map(|r| results.many_locks = Some(r)),
            Workload::Handshakes => backend
                .handshakes(options)
                .map(|r| results.handshakes = Some(r)),
            Workload::HoldAndWait => backend
                .hold_and_wait(options)
                .map(|r| results.hold_and_wait = Some(r)),
        };
        if let Err(e) = outcome {
            eprintln!("{}: {}: {e}", backend.name(), workload.name());
            results.errors.push(format!("{}: {e}", workload.name()));
        }
    }
    results
}

/// The readable report: one section per workload, one row per backend,
/// with the ratio of pklock to each other backend.
pub fn report(all: &[Results]) -> String {
    let mut out = String::new();
    let base = all.iter().find(|r| r.backend == "pklock");
    let ratio = |mine: f64, theirs: f64| match mine / theirs {
        r if !r.is_finite() => "-".to_string(),
        r if r >= 100.0 => format!("{r:.0}x"),
        r => format!("{r:.2}x"),
    };
    let per_grant = |c: &Contended| {
        c.server_cpu.as_ref().map_or(String::new(), |cpu| {
            format!("  server CPU/grant {:.1} us", cpu.us_per_op)
        })
    };
    let _ = writeln!(
        out,
        "uncontended (lock+unlock cycles, each connection its own lock)"
    );
    for r in all {
        if let Some(u) = &r.uncontended {
            let cpu = u
                .server_cpu
                .as_ref()
                .map_or("-".to_string(), |c| format!("{:.1} us", c.us_per_op));
            let vs = base
                .and_then(|b| b.uncontended.as_ref())
                .filter(|_| r.backend != "pklock")
                .map_or(String::new(), |b| {
                    format!(
                        "   pklock does {} the cycles/s",
                        ratio(b.cycles_per_sec, u.cycles_per_sec)
                    )
                });
            let _ = writeln!(
                out,
                "  {:<9} {:>9.0} cycles/s  lock p50 {:>7.1} us  p99 {:>7.1} us  p99.9 {:>7.1} us  server CPU/cycle {cpu}{vs}",
                r.backend,
                u.cycles_per_sec,
                u.lock_latency.p50_us,
                u.lock_latency.p99_us,
                u.lock_latency.p999_us
            );
        }
    }
    let _ = writeln!(out, "contended (one lock; each unlocks as soon as granted)");
    for r in all {
        if let Some(c) = &r.contended {
            let vs = base
                .and_then(|b| b.contended.as_ref())
                .filter(|_| r.backend != "pklock")
                .map_or(String::new(), |b| {
                    format!(
                        "   pklock does {} the grants/s",
                        ratio(b.grants_per_sec, c.grants_per_sec)
                    )
                });
            let _ = writeln!(
                out,
                "  {:<9} {:>9.0} grants/s  handover p50 {:>7.1} us  p99 {:>7.1} us  (ping p50 {:.1} us)  grants per client min/max {}/{} ({:.2})  regrants {:.0}%{}{vs}",
                r.backend,
                c.grants_per_sec,
                c.handover.p50_us,
                c.handover.p99_us,
                c.ping.p50_us,
                c.min_grants,
                c.max_grants,
                c.fairness,
                c.regrant_share * 100.0,
                per_grant(c)
            );
        }
    }
    let _ = writeln!(
        out,
        "idle-holders (holders each holding a lock; a probe locks and unlocks)"
    );
    for r in all {
        if let Some(i) = &r.idle_holders {
            let per = i
                .bytes_per_holder
                .map_or("-".to_string(), |b| format!("{:.0} B", b));
            let _ = writeln!(
                out,
                "  {:<9} {} holders: {per} of server RSS each; probe p50/p99 {:.1}/{:.1} us alone, {:.1}/{:.1} us beside them ({:.2}x p99)",
                r.backend,
                i.holders,
                i.probe_alone.p50_us,
                i.probe_alone.p99_us,
                i.probe_with_holders.p50_us,
                i.probe_with_holders.p99_us,
                i.probe_with_holders.p99_us / i.probe_alone.p99_us.max(f64::MIN_POSITIVE)
            );
        }
    }
    let _ = writeln!(out, "dead-holder (holder SIGKILLed while a waiter waits)");
    for r in all {
        if let Some(d) = &r.dead_holder {
            let vs = base
                .and_then(|b| b.dead_holder.as_ref())
                .filter(|_| r.backend != "pklock")
                .map_or(String::new(), |b| {
                    format!(
                        "   {} takes {} pklock's time",
                        r.backend,
                        ratio(d.kill_to_grant.p50_us, b.kill_to_grant.p50_us)
                    )
                });
            let _ = writeln!(
                out,
                "  {:<9} kill to grant p50 {:>10.1} us  max {:>10.1} us over {} rounds{vs}",
                r.backend, d.kill_to_grant.p50_us, d.kill_to_grant.max_us, d.rounds
            );
        }
    }
    for r in all {
        if let Some(m) = &r.many_locks {
            let _ = writeln!(
                out,
                "many-locks (a probe locks and unlocks beside held locks)"
            );
            let _ = writeln!(
                out,
                "  {:<9} probe p50 {:.1} us beside 10 held locks, {:.1} us beside {} ({:.2}x)",
                r.backend,
                m.probe_with_10.p50_us,
                m.probe_with_many.p50_us,
                m.held,
                m.probe_with_many.p50_us / m.probe_with_10.p50_us.max(f64::MIN_POSITIVE)
            );
        }
    }
    for r in all {
        if let Some(h) = &r.handshakes {
            let _ = writeln!(
                out,
                "handshakes (new connections: connect{}, one ping, close)",
                if h.tls { ", TLS handshake" } else { "" }
            );
            let cpu = h
                .server_cpu
                .as_ref()
                .map_or("-".to_string(), |c| format!("{:.1} us", c.us_per_op));
            let _ = writeln!(
                out,
                "  {:<9} {:>9.0} connections/s  connect to reply p50 {:.1} us  p99 {:.1} us  server CPU/connection {cpu}",
                r.backend, h.per_sec, h.latency.p50_us, h.latency.p99_us
            );
        }
    }
    for r in all {
        if let Some(c) = &r.hold_and_wait {
            let _ = writeln!(
                out,
                "hold-and-wait (one lock, each connection also holding one of its own: every wait is checked for deadlock)"
            );
            let _ = writeln!(
                out,
                "  {:<9} {:>9.0} grants/s  handover p50 {:>7.1} us  p99 {:>7.1} us  grants per client min/max {}/{} ({:.2}){}",
                r.backend,
                c.grants_per_sec,
                c.handover.p50_us,
                c.handover.p99_us,
                c.min_grants,
                c.max_grants,
                c.fairness,
                per_grant(c)
            );
        }
    }
    for r in all {
        for e in &r.errors {
            let _ = writeln!(out, "{}: {e}", r.backend);
        }
    }
    out
}
