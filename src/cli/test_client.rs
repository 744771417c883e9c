//! `test_client`, the original testClient.php, on the client library: the
//! `test_client` binary runs it. Takes a lock, prints `Got lock`, holds it,
//! prints `Offering to unlock`, unlocks, lingers, exits; prints `Did not get
//! lock` (and exits 0) when not granted in time.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::client::{self, Client, ClientOptions, LockOptions};
use crate::{cli, duration};

/// Takes a lock, holds it, gives it up: run several at once to watch the
/// lock pass from one to the next in order.
#[derive(Parser, Debug)]
#[command(name = "test_client", version)]
pub struct TestClientArgs {
    /// Server address (HOST:PORT), or a cluster's addresses separated by
    /// commas; instead of --host and --port. Default: PKLOCK_SERVER, when
    /// neither --host nor --port is given.
    #[arg(long, value_name = "HOST:PORT,...", value_parser = cli::server_list, conflicts_with_all = ["host", "port"])]
    server: Option<String>,
    /// Server host [default: localhost].
    #[arg(long)]
    host: Option<String>,
    /// Server port [default: 20934].
    #[arg(long)]
    port: Option<u16>,
    /// Lock name.
    #[arg(long = "lock", default_value = "test")]
    lock: String,
    /// Take the lock as a semaphore of N permits (one of them), so that up
    /// to N test clients hold it at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    permits: Option<u32>,
    /// How long to hold the lock (30s, 500ms, or seconds).
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    hold: Duration,
    /// How long to stay connected after unlocking.
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    linger: Duration,
    /// How long to wait for the lock before giving up.
    #[arg(long, default_value = "30", value_parser = duration::parse)]
    wait: Duration,
    /// Speak TLS to the server (as does an address written tls://HOST:PORT).
    #[arg(long)]
    tls: bool,
    /// The CA certificate(s), PEM, that sign the server's certificate.
    #[arg(long, value_name = "FILE", env = "PKLOCK_CA")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM); with --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// A file whose first line is the auth token to present.
    #[arg(long, value_name = "FILE", env = "PKLOCK_AUTH_FILE")]
    auth_file: Option<PathBuf>,
}

/// Exit codes, as `pklock`'s: the server cannot be reached or refused us.
const UNAVAILABLE: u8 = 69;
/// The server answered something unexpected.
const SOFTWARE: u8 = 70;
/// The lock was lost while held.
const LOST: u8 = 75;
/// The server refused the auth token or denied the lock.
const NOPERM: u8 = 77;
/// Bad arguments: the code clap exits with for the others.
const USAGE: u8 = 2;

/// Parses `args` (the first one standing for the program, as `argv[0]`) and
/// runs the client: exits 0 (also when not granted in time), or with the
/// codes above after a message on stderr, or clap's 2 for bad arguments.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    match run(TestClientArgs::parse_from(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            super::say_as("test_client", format_args!("{message}"));
            ExitCode::from(code)
        }
    }
}

/// The server list: `--server`; else `--host` and `--port` as the original
/// took them; else PKLOCK_SERVER, as `pklock` reads it; else localhost.
fn server(args: &TestClientArgs) -> Result<String, (u8, String)> {
    if let Some(list) = &args.server {
        return Ok(list.clone());
    }
    if args.host.is_none() && args.port.is_none() {
        if let Some(list) = std::env::var_os("PKLOCK_SERVER") {
            let list = list.to_string_lossy();
            return cli::server_list(&list).map_err(|e| (USAGE, format!("PKLOCK_SERVER: {e}")));
        }
    }
    let host = args.host.as_deref().unwrap_or("localhost");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = args.port.unwrap_or(crate::config::DEFAULT_PORT);
    Ok(match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    })
}

fn run(args: TestClientArgs) -> Result<(), (u8, String)> {
    let server = server(&args)?;
    let mut options = ClientOptions::named(format!("test_client pid {}", std::process::id()));
    let access = cli::Access {
        tls: args.tls,
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
        auth_file: args.auth_file.clone(),
    };
    access
        .apply(&server, &mut options)
        .map_err(|failure| (USAGE, failure.message))?;
    let client = Client::connect(&server, &options).map_err(|e| match e {
        client::Error::Connect { .. } => (
            UNAVAILABLE,
            format!("{e} (is the server running? `cargo run --release --bin server`)"),
        ),
        client::Error::AuthFailed { .. } => (NOPERM, e.to_string()),
        client::Error::TlsConfig(_) => (USAGE, e.to_string()),
        client::Error::Denied(_)
        | client::Error::Refused { .. }
        | client::Error::Tls { .. }
        | client::Error::TlsRequired { .. } => (UNAVAILABLE, e.to_string()),
        _ => (SOFTWARE, e.to_string()),
    })?;
    let mut options = LockOptions::exclusive().wait(args.wait);
    if let Some(permits) = args.permits {
        options = options.permits(permits);
    }
    let guard = match client.lock(&args.lock, &options) {
        Ok(guard) => guard,
        Err(client::Error::NotGranted) => {
            println!("Did not get lock");
            return Ok(());
        }
        Err(e @ client::Error::Protocol(_)) => return Err((SOFTWARE, e.to_string())),
        Err(e @ client::Error::PermissionDenied { .. }) => return Err((NOPERM, e.to_string())),
        Err(e) => return Err((UNAVAILABLE, e.to_string())),
    };
    let say = |line: &str| {
        println!("{line}");
        std::io::stdout()
            .flush()
            .map_err(|e| (SOFTWARE, format!("cannot write to stdout: {e}")))
    };
    say("Got lock")?;
    if let Some(reason) = guard.wait_lost(Some(args.hold)) {
        return Err((LOST, format!("lost the lock: {reason}")));
    }
    say("Offering to unlock")?;
    guard.unlock().map_err(|e| (LOST, format!("unlock: {e}")))?;
    std::thread::sleep(args.linger);
    Ok(())
}
