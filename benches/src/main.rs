//! `pklock-bench`: lock workloads against pklock and, side by side, against a
//! Redis lock and PostgreSQL advisory locks. Argument parsing and wiring only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use pklock::duration;
use pklock_bench::tls::TlsClient;
use pklock_bench::{self as bench, Backend, BenchOptions, Workload};

/// Benchmark pklock, alone or against a Redis lock and PostgreSQL advisory
/// locks in the same run (--compare; build with
/// `cargo build --release -p pklock-bench --features compare`).
#[derive(Parser)]
#[command(name = "pklock-bench", version)]
struct Args {
    /// The pklock server (with --tls, one of its TLS listeners).
    #[arg(long, default_value = "127.0.0.1:20934")]
    server: SocketAddr,
    /// Speak TLS to the pklock server, on every connection.
    #[arg(long, requires = "ca")]
    tls: bool,
    /// With --tls: the CA certificate(s) to trust, PEM.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// With --tls: the name the server's certificate must carry (default:
    /// the IP address of --server).
    #[arg(long, value_name = "NAME", requires = "tls")]
    tls_name: Option<String>,
    /// With --tls: offer only this key exchange group (x25519, secp256r1,
    /// secp384r1); default: those of pklock's TLS provider, in its order.
    #[arg(long, value_name = "GROUP", requires = "tls")]
    tls_group: Option<String>,
    /// The pklock server's process id, for its CPU time and memory (found
    /// from the port when left out).
    #[arg(long)]
    pid: Option<u32>,
    /// Also run against redis://HOST:PORT or postgres://USER@HOST/DB (repeatable).
    #[arg(long, value_name = "URL")]
    compare: Vec<String>,
    /// Workloads to run (repeatable; default: all).
    #[arg(long, value_enum)]
    workload: Vec<WorkloadArg>,
    /// How long each timed workload runs (seconds, or 10s, 500ms).
    #[arg(long, default_value = "5", value_parser = duration::parse)]
    seconds: Duration,
    /// Connections for uncontended, contended and hold-and-wait.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Holders for idle-holders.
    #[arg(long, default_value_t = 10_000)]
    holders: usize,
    /// Rounds for dead-holder.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Locks held for many-locks.
    #[arg(long, default_value_t = 100_000)]
    many_locks: usize,
    /// TTL of the Redis lock (its PX): how long a dead holder keeps it.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    redis_ttl: Duration,
    /// How often a Redis waiter retries.
    #[arg(long, default_value = "10ms", value_parser = duration::parse)]
    redis_retry: Duration,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    holder: Option<Holder>,
}

#[derive(Clone, Copy, ValueEnum)]
enum WorkloadArg {
    Uncontended,
    Contended,
    IdleHolders,
    DeadHolder,
    ManyLocks,
    Handshakes,
    HoldAndWait,
}

/// The holder processes dead-holder starts and kills.
#[derive(Subcommand)]
enum Holder {
    #[command(name = "hold-pklock", hide = true)]
    Pklock {
        addr: SocketAddr,
        name: String,
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long)]
        tls_name: Option<String>,
        #[arg(long)]
        tls_group: Option<String>,
    },
    #[cfg(feature = "compare")]
    #[command(name = "hold-redis", hide = true)]
    Redis {
        url: String,
        name: String,
        ttl_ms: u64,
    },
    #[cfg(feature = "compare")]
    #[command(name = "hold-postgres", hide = true)]
    Postgres { url: String, key: i64 },
}

/// A backend and the workloads it is to run.
type Planned = (Box<dyn Backend>, Vec<Workload>);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(holder) = args.holder {
        let held = match holder {
            Holder::Pklock {
                addr,
                name,
                ca,
                tls_name,
                tls_group,
            } => ca
                .map(|ca| {
                    let tls_name = tls_name.unwrap_or_else(|| addr.ip().to_string());
                    TlsClient::new(&ca, &tls_name, tls_group.as_deref())
                })
                .transpose()
                .and_then(|tls| bench::pklock::hold(addr, tls.as_ref(), &name)),
            #[cfg(feature = "compare")]
            Holder::Redis { url, name, ttl_ms } => bench::redis::hold(&url, &name, ttl_ms),
            #[cfg(feature = "compare")]
            Holder::Postgres { url, key } => bench::postgres::hold(&url, key),
        };
        if let Err(e) = held {
            eprintln!("pklock-bench holder: {e}");
        }
        return ExitCode::FAILURE;
    }
    let workloads: Vec<Workload> = if args.workload.is_empty() {
        Workload::ALL.to_vec()
    } else {
        args.workload
            .iter()
            .map(|w| match w {
                WorkloadArg::Uncontended => Workload::Uncontended,
                WorkloadArg::Contended => Workload::Contended,
                WorkloadArg::IdleHolders => Workload::IdleHolders,
                WorkloadArg::DeadHolder => Workload::DeadHolder,
                WorkloadArg::ManyLocks => Workload::ManyLocks,
                WorkloadArg::Handshakes => Workload::Handshakes,
                WorkloadArg::HoldAndWait => Workload::HoldAndWait,
            })
            .collect()
    };
    let options = BenchOptions {
        duration: args.seconds,
        connections: args.connections,
        holders: args.holders,
        rounds: args.rounds,
        many_locks: args.many_locks,
        redis_ttl: args.redis_ttl,
        redis_retry: args.redis_retry,
    };
    let mut pklock = bench::pklock::Pklock::new(args.server, args.pid);
    if let (true, Some(ca)) = (args.tls, &args.ca) {
        let tls_name = args
            .tls_name
            .clone()
            .unwrap_or_else(|| args.server.ip().to_string());
        match TlsClient::new(ca, &tls_name, args.tls_group.as_deref()) {
            Ok(client) => {
                let mut holder_args = vec![
                    "--ca".to_string(),
                    ca.display().to_string(),
                    "--tls-name".to_string(),
                    tls_name,
                ];
                if let Some(group) = &args.tls_group {
                    holder_args.extend(["--tls-group".to_string(), group.clone()]);
                }
                pklock = pklock.with_tls(client, holder_args);
            }
            Err(e) => {
                eprintln!("pklock-bench: {e}");
                return ExitCode::from(64);
            }
        }
    }
    let mut backends: Vec<Planned> = vec![(Box::new(pklock), workloads.clone())];
    for url in &args.compare {
        match compared(url, &workloads) {
            Ok(mut more) => backends.append(&mut more),
            Err(e) => {
                eprintln!("pklock-bench: {e}");
                return ExitCode::from(64);
            }
        }
    }
    let results: Vec<bench::Results> = backends
        .iter_mut()
        .map(|(backend, workloads)| bench::run(backend.as_mut(), workloads, &options))
        .collect();
    if args.json {
        match serde_json::to_string_pretty(&results) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("pklock-bench: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", bench::report(&results));
    }
    if results.iter().any(|r| !r.errors.is_empty()) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The backends for one --compare URL, each with the workloads it runs:
/// Redis twice, the second time with waiters retrying every 100 ms
/// (contended only), as slower real clients do.
#[cfg(feature = "compare")]
fn compared(url: &str, workloads: &[Workload]) -> Result<Vec<Planned>, String> {
    if url.starts_with("redis://") {
        let mut backends: Vec<Planned> =
            vec![(Box::new(bench::redis::Redis::new(url)?), workloads.to_vec())];
        if workloads.contains(&Workload::Contended) {
            let slow = bench::redis::Redis::new(url)?.with_retry(Duration::from_millis(100));
            backends.push((Box::new(slow), vec![Workload::Contended]));
        }
        Ok(backends)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(vec![(
            Box::new(bench::postgres::Postgres::new(url)?),
            workloads.to_vec(),
        )])
    } else {
        Err(format!(
            "--compare {url}: expected redis://HOST:PORT or postgres://USER@HOST/DB"
        ))
    }
}

#[cfg(not(feature = "compare"))]
fn compared(url: &str, _workloads: &[Workload]) -> Result<Vec<Planned>, String> {
    Err(format!(
        "--compare {url}: this build has no comparisons; build with `-p pklock-bench --features compare`"
    ))
}
