//! The workloads against PostgreSQL session advisory locks:
//! `SELECT pg_advisory_lock($1)` / `SELECT pg_advisory_unlock($1)` as
//! prepared statements, with `tokio-postgres` on a current_thread runtime so
//! that every connection is driven from one thread, like the pklock load
//! generator. A waiter blocks in the server (the lock queue is PostgreSQL's),
//! and a session's locks go when its backend notices the client is gone.
//!
//! PostgreSQL runs a backend process per connection: the server's CPU time
//! and memory are summed over the postmaster and its children.

use std::cell::RefCell;
use std::fs;
use std::io::{self, Write};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::runtime::Runtime;
use tokio::task::LocalSet;
use tokio_postgres::config::Host;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::pklock::{raise_fd_limit, spawn_holder};
use super::{
    BenchError, BenchOptions, Contended, DeadHolder, IdleHolders, Latency, Uncontended, histogram,
    proc, record,
};

/// Lock-unlock cycles the idle-holders probe times, alone and beside them.
const PROBE_CYCLES: usize = 2000;

/// Connections idle-holders leaves free below `max_connections`.
const SPARE_CONNECTIONS: i64 = 5;

/// Holders connecting at once in idle-holders.
const CONNECT_BATCH: usize = 32;

/// The PostgreSQL server under test.
pub struct Postgres {
    url: String,
    config: Config,
    /// `host:port`, for the report.
    where_: String,
    /// The postmaster, found from the port.
    postmaster: Option<u32>,
    /// Workloads run so far, for fresh lock keys each.
    runs: i64,
}

impl Postgres {
    /// The server at `postgres://USER@HOST[:PORT]/DB`; its processes, for CPU
    /// time and memory, are the postmaster listening on the port and its
    /// children.
    pub fn new(url: &str) -> Result<Postgres, BenchError> {
        let config: Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let (where_, postmaster) = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => (format!("{host}:{port}"), proc::pid_listening_on(port)),
            #[cfg(unix)]
            Some(Host::Unix(dir)) => (format!("{}:{port}", dir.display()), None),
            None => (format!("localhost:{port}"), proc::pid_listening_on(port)),
        };
        Ok(Postgres {
            url: url.to_string(),
            config,
            where_,
            postmaster,
            runs: 0,
        })
    }

    /// The server's processes: the postmaster and its children (a backend
    /// per connection, and the background processes), or every process
    /// named `postgres` if the postmaster could not be found.
    fn server_pids(&self) -> Vec<u32> {
        let all = proc::pids_named("postgres");
        match self.postmaster {
            Some(postmaster) => all
                .into_iter()
                .filter(|&pid| pid == postmaster || parent_of(pid) == Some(postmaster))
                .collect(),
            None => all,
        }
    }

    /// Summed CPU time of the server's processes now, in milliseconds.
    fn cpu_ms(&self) -> Option<f64> {
        let pids = self.server_pids();
        (!pids.is_empty()).then(|| proc::total_cpu_ms(&pids))
    }

    /// The server's resident memory now, in KiB: the proportional set size
    /// (Pss, from /proc/<pid>/smaps_rollup) summed over its processes, or,
    /// where that cannot be read, their summed RSS. Each backend's RSS counts
    /// every page of shared memory (shared_buffers, the lock table) and of the
    /// program that it has touched, pages that every other process counts
    /// too: summed RSS overestimates what PostgreSQL uses many times over
    /// (about 16 MB per idle connection here, against about 1.2 MB of Pss).
    /// Pss splits each shared page among the processes mapping it, so the sum
    /// counts it once.
    fn rss_kib(&self) -> Option<u64> {
        let pids = self.server_pids();
        let pss: Vec<u64> = pids.iter().filter_map(|&pid| pss_kib(pid)).collect();
        if !pss.is_empty() && pss.len() == pids.len() {
            Some(pss.iter().sum())
        } else {
            proc::total_rss_kib(&pids)
        }
    }

    /// A first lock key no earlier workload of this process used; a workload
    /// uses the 2^20 keys from there. Positive, and unique to this process
    /// as long as it runs (advisory locks go with their sessions).
    fn next_keys(&mut self) -> i64 {
        self.runs += 1;
        (i64::from(std::process::id()) << 28) | ((self.runs & 0xff) << 20)
    }
}

/// The parent of `pid`, from /proc/<pid>/stat.
fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The proportional set size of `pid`, in KiB.
fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn pg_err(e: tokio_postgres::Error) -> BenchError {
    match e.as_db_error() {
        Some(db) => format!("postgres: {}: {}", db.severity(), db.message()),
        None => format!("postgres: {e}"),
    }
}

/// A runtime on this thread alone: the load generator is single-threaded.
fn runtime() -> Result<Runtime, BenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Connects, and drives the connection from a task on this thread.
async fn connect(config: &Config) -> Result<Client, BenchError> {
    let (client, connection) = config.connect(NoTls).await.map_err(pg_err)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A numeric setting of the server.
async fn show(client: &Client, name: &str) -> Result<i64, BenchError> {
    let row = client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .map_err(pg_err)?;
    let value: String = row.get(0);
    value
        .parse()
        .map_err(|e| format!("{name} = {value:?}: {e}"))
}

/// A connection with the lock statements prepared.
struct Locker {
    client: Client,
    lock: Statement,
    unlock: Statement,
}

impl Locker {
    async fn connect(config: &Config) -> Result<Locker, BenchError> {
        let client = connect(config).await?;
        let lock = client
            .prepare_typed("SELECT pg_advisory_lock($1)", &[Type::INT8])
            .await
            .map_err(pg_err)?;
        let unlock = client
            .prepare_typed("SELECT pg_advisory_unlock($1)", &[Type::INT8])
            .await
            .map_err(pg_err)?;
        Ok(Locker {
            client,
            lock,
            unlock,
        })
    }

    async fn lock(&self, key: i64) -> Result<(), BenchError> {
        self.client
            .execute(&self.lock, &[&key])
            .await
            .map(drop)
            .map_err(pg_err)
    }

    async fn unlock(&self, key: i64) -> Result<(), BenchError> {
        self.client
            .execute(&self.unlock, &[&key])
            .await
            .map(drop)
            .map_err(pg_err)
    }

    /// Lock-unlock cycles on `key`; the latency of each whole cycle.
    async fn cycles(&self, key: i64, n: usize) -> Result<Latency, BenchError> {
        let mut h = histogram();
        for _ in 0..n {
            let start = Instant::now();
            self.lock(key).await?;
            self.unlock(key).await?;
            record(&mut h, start.elapsed());
        }
        Ok(Latency::from_histogram(&h))
    }
}

/// Round trips of a prepared `SELECT 1` on one connection, for `duration`.
async fn ping_latency(config: &Config, duration: Duration) -> Result<Latency, BenchError> {
    let client = connect(config).await?;
    let select = client.prepare("SELECT 1").await.map_err(pg_err)?;
    let mut h = histogram();
    let start = Instant::now();
    while start.elapsed() < duration {
        let sent = Instant::now();
        client.execute(&select, &[]).await.map_err(pg_err)?;
        record(&mut h, sent.elapsed());
    }
    Ok(Latency::from_histogram(&h))
}

/// What the contended workers share (all on this thread).
struct Contention {
    start: Instant,
    deadline: Instant,
    grants: Vec<u64>,
    regrants: u64,
    handover: Histogram<u64>,
    released_at: Option<(usize, Instant)>,
}

/// Counts worker `i`'s grant at `now`, and that it releases at once;
/// false once past the deadline (the worker then unlocks and stops).
fn granted_at(s: &mut Contention, i: usize, now: Instant) -> bool {
    if now >= s.deadline {
        return false;
    }
    if now >= s.start {
        s.grants[i] += 1;
        if let Some((previous, at)) = s.released_at {
            record(&mut s.handover, now - at);
            s.regrants += u64::from(previous == i);
        }
    }
    s.released_at = Some((i, Instant::now()));
    true
}

/// One contended worker: lock `key`; once granted, unlock and lock again
/// (sent together, as the pklock holders do); after the deadline, unlock
/// and stop.
async fn contend(
    locker: Locker,
    i: usize,
    key: i64,
    shared: Rc<RefCell<Contention>>,
) -> Result<(), BenchError> {
    let mut granted = locker.lock(key).await;
    loop {
        granted?;
        if !granted_at(&mut shared.borrow_mut(), i, Instant::now()) {
            return locker.unlock(key).await;
        }
        let (unlocked, locked) = tokio::join!(locker.unlock(key), locker.lock(key));
        unlocked?;
        granted = locked;
    }
}

impl super::Backend for Postgres {
    fn name(&self) -> &str {
        "postgres"
    }

    fn target(&self) -> String {
        match self.postmaster {
            Some(pid) => format!("{} (postmaster pid {pid})", self.where_),
            None => self.where_.clone(),
        }
    }

    fn uncontended(&mut self, options: &BenchOptions) -> Result<Uncontended, BenchError> {
        let base = self.next_keys();
        let rt = runtime()?;
        rt.block_on(async {
            let mut lockers = Vec::with_capacity(options.connections);
            for _ in 0..options.connections {
                lockers.push(Locker::connect(&self.config).await?);
            }
            // After connecting: the backends of these connections count.
            let cpu_before = self.cpu_ms();
            let start = Instant::now();
            let deadline = start + options.duration;
            let workers: Vec<_> = lockers
                .into_iter()
                .enumerate()
                .map(|(i, locker)| {
                    let key = base + i as i64;
                    tokio::spawn(async move {
                        let mut latency = histogram();
                        let mut cycles = 0u64;
                        loop {
                            let sent = Instant::now();
                            locker.lock(key).await?;
                            record(&mut latency, sent.elapsed());
                            locker.unlock(key).await?;
                            if Instant::now() >= deadline {
                                return Ok::<_, BenchError>((cycles, latency, locker));
                            }
                            cycles += 1;
                        }
                    })
                })
                .collect();
            let mut latency = histogram();
            let mut cycles = 0;
            let mut lockers = Vec::with_capacity(workers.len());
            for worker in workers {
                let (n, h, locker) = worker.await.map_err(|e| e.to_string())??;
                cycles += n;
                let _ = latency.add(&h);
                lockers.push(locker);
            }
            // Before the connections close and their backends exit.
            let cpu_after = self.cpu_ms();
            drop(lockers);
            let elapsed = deadline
                .saturating_duration_since(start)
                .max(Duration::from_millis(1));
            Ok(Uncontended::from_counts(
                cycles, &latency, elapsed, cpu_before, cpu_after,
            ))
        })
    }

    fn contended(&mut self, options: &BenchOptions) -> Result<Contended, BenchError> {
        let key = self.next_keys();
        let rt = runtime()?;
        let local = LocalSet::new();
        local.block_on(&rt, async {
            let ping = ping_latency(&self.config, Duration::from_secs(1)).await?;
            let mut lockers = Vec::with_capacity(options.connections);
            for _ in 0..options.connections {
                lockers.push(Locker::connect(&self.config).await?);
            }
            // Let every first lock request queue before timing starts.
            let start = Instant::now() + Duration::from_millis(100);
            let deadline = start + options.duration;
            let shared = Rc::new(RefCell::new(Contention {
                start,
                deadline,
                grants: vec![0; lockers.len()],
                regrants: 0,
                handover: histogram(),
                released_at: None,
            }));
            let workers: Vec<_> = lockers
                .into_iter()
                .enumerate()
                .map(|(i, locker)| {
                    tokio::task::spawn_local(contend(locker, i, key, shared.clone()))
                })
                .collect();
            // Every worker stops at its first grant after the deadline; a
            // worker that failed would leave the others waiting for ever.
            let all = async {
                for worker in workers {
                    worker.await.map_err(|e| e.to_string())??;
                }
                Ok::<_, BenchError>(())
            };
            tokio::time::timeout(options.duration + Duration::from_secs(30), all)
                .await
                .map_err(|_| "the contended workers did not stop".to_string())??;
            let s = shared.borrow();
            let elapsed = deadline.saturating_duration_since(start);
            Ok(Contended::from_counts(
                &s.grants,
                s.regrants,
                &s.handover,
                ping,
                elapsed,
            ))
        })
    }

    fn idle_holders(&mut self, options: &BenchOptions) -> Result<IdleHolders, BenchError> {
        let base = self.next_keys();
        let rt = runtime()?;
        rt.block_on(async {
            let probe = Locker::connect(&self.config).await?;
            // max_connections caps the holders: use what is free, less a few.
            let max = show(&probe.client, "max_connections").await?;
            let reserved = show(&probe.client, "superuser_reserved_connections").await?;
            let row = probe
                .client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'",
                    &[],
                )
                .await
                .map_err(pg_err)?;
            let in_use: i64 = row.get(0);
            let free = max - reserved - in_use - SPARE_CONNECTIONS;
            let n = usize::try_from(free).unwrap_or(0).min(options.holders);
            if n == 0 {
                return Err(format!(
                    "no connections free for holders (max_connections {max}, {reserved} reserved, {in_use} in use)"
                ));
            }
            raise_fd_limit(n as u64 + 256)?;
            let probe_key = base + (1 << 20) - 1;
            let probe_alone = probe.cycles(probe_key, PROBE_CYCLES).await?;
            let rss_before = self.rss_kib();
            let mut holders = Vec::with_capacity(n);
            for batch_start in (0..n).step_by(CONNECT_BATCH) {
                let batch: Vec<_> = (batch_start..n.min(batch_start + CONNECT_BATCH))
                    .map(|i| {
                        let config = self.config.clone();
                        tokio::spawn(async move {
                            let client = connect(&config)
                                .await
                                .map_err(|e| format!("holder {i}: {e}"))?;
                            client
                                .execute("SELECT pg_advisory_lock($1)", &[&(base + i as i64)])
                                .await
                                .map_err(|e| format!("holder {i}: {}", pg_err(e)))?;
                            Ok::<_, BenchError>(client)
                        })
                    })
                    .collect();
                for holder in batch {
                    holders.push(holder.await.map_err(|e| e.to_string())??);
                }
            }
            // Let the server settle before reading its memory.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let rss_with = self.rss_kib();
            let probe_with_holders = probe.cycles(probe_key, PROBE_CYCLES).await?;
            drop(holders);
            Ok(IdleHolders {
                holders: n,
                probe_alone,
                probe_with_holders,
                rss_before_kib: rss_before,
                rss_with_holders_kib: rss_with,
                bytes_per_holder: rss_before
                    .zip(rss_with)
                    .map(|(b, a)| (a.saturating_sub(b) * 1024) as f64 / n as f64),
            })
        })
    }

    fn dead_holder(&mut self, options: &BenchOptions) -> Result<DeadHolder, BenchError> {
        let base = self.next_keys();
        let rt = runtime()?;
        rt.block_on(async {
            let monitor = connect(&self.config).await?;
            let waiting = monitor
                .prepare_typed(
                    "SELECT count(*) FROM pg_locks \
                     WHERE pid = $1 AND locktype = 'advisory' AND NOT granted",
                    &[Type::INT4],
                )
                .await
                .map_err(pg_err)?;
            let mut kill_to_grant = histogram();
            for round in 0..options.rounds {
                let key = base + round as i64;
                let mut holder = spawn_holder(&["hold-postgres", &self.url, &key.to_string()])?;
                let waiter = Locker::connect(&self.config).await?;
                let row = waiter
                    .client
                    .query_one("SELECT pg_backend_pid()", &[])
                    .await
                    .map_err(pg_err)?;
                let waiter_pid: i32 = row.get(0);
                let granted = tokio::spawn(async move {
                    let locked = waiter.lock(key).await;
                    (locked, Instant::now(), waiter)
                });
                // Kill the holder only once the waiter waits in the server.
                let queued_by = Instant::now() + Duration::from_secs(10);
                loop {
                    let row = monitor
                        .query_one(&waiting, &[&waiter_pid])
                        .await
                        .map_err(pg_err)?;
                    if row.get::<_, i64>(0) > 0 {
                        break;
                    }
                    if Instant::now() > queued_by {
                        let _ = holder.kill();
                        let _ = holder.wait();
                        return Err(format!("the waiter never waited for key {key}"));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let killed_at = Instant::now();
                holder.kill().map_err(|e| e.to_string())?;
                let (locked, granted_at, waiter) = granted.await.map_err(|e| e.to_string())?;
                locked?;
                record(&mut kill_to_grant, granted_at - killed_at);
                let _ = holder.wait();
                waiter.unlock(key).await?;
            }
            Ok(DeadHolder {
                rounds: options.rounds,
                kill_to_grant: Latency::from_histogram(&kill_to_grant),
            })
        })
    }
}

/// The holder process's side (`pklock-bench hold-postgres URL KEY`): take
/// the advisory lock `key`, say `held`, and keep the session open, idle,
/// until killed; its backend then sees the connection close and lets go.
pub fn hold(url: &str, key: i64) -> Result<(), BenchError> {
    let config: Config = url.parse().map_err(|e| format!("{url}: {e}"))?;
    runtime()?.block_on(async {
        let client = connect(&config).await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&key])
            .await
            .map_err(pg_err)?;
        println!("held");
        io::stdout().flush().map_err(|e| e.to_string())?;
        std::future::pending::<()>().await;
        drop(client);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert_eq!(
            parent_of(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
        assert!(pss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[test]
    fn keys_are_positive_and_distinct() {
        let mut pg = Postgres::new("postgres://postgres@127.0.0.1:1/postgres").unwrap();
        let a = pg.next_keys();
        let b = pg.next_keys();
        assert!(a > 0 && b > a + (1 << 20) - 1);
    }
}
