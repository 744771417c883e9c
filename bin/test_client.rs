//! `test_client`: the original testClient.php. Takes a lock, prints
//! `Got lock`, holds it, prints `Offering to unlock`, unlocks, lingers, exits;
//! prints `Did not get lock` (and exits 0) when not granted in time.

use std::error::Error;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use pklock::client::{self, Client, ClientOptions, LockOptions};
use pklock::duration;

/// Takes a lock, holds it, gives it up: run several at once to watch the
/// lock pass from one to the next in order.
#[derive(Parser)]
#[command(name = "test_client", version)]
struct Args {
    /// Server host.
    #[arg(long, default_value = "localhost")]
    host: String,
    /// Server port.
    #[arg(long, default_value_t = pklock::config::DEFAULT_PORT)]
    port: u16,
    /// Lock name.
    #[arg(long = "lock", default_value = "test")]
    lock: String,
    /// How long to hold the lock (30s, 500ms, or seconds).
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    hold: Duration,
    /// How long to stay connected after unlocking.
    #[arg(long, default_value = "10", value_parser = duration::parse)]
    linger: Duration,
    /// How long to wait for the lock before giving up.
    #[arg(long, default_value = "30", value_parser = duration::parse)]
    wait: Duration,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test_client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let server = match args.host.contains(':') {
        true => format!("[{}]:{}", args.host, args.port),
        false => format!("{}:{}", args.host, args.port),
    };
    let options = ClientOptions::named(format!("test_client pid {}", std::process::id()));
    let client = Client::connect(&server, &options)
        .map_err(|e| format!("{e} (is the server running? `cargo run --release --bin server`)"))?;
    let guard = match client.lock(&args.lock, &LockOptions::exclusive().wait(args.wait)) {
        Ok(guard) => guard,
        Err(client::Error::NotGranted) => {
            println!("Did not get lock");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    println!("Got lock");
    std::io::stdout().flush()?;
    if let Some(reason) = guard.wait_lost(Some(args.hold)) {
        return Err(format!("lost the lock: {reason}").into());
    }
    println!("Offering to unlock");
    std::io::stdout().flush()?;
    guard.unlock()?;
    std::thread::sleep(args.linger);
    Ok(())
}
