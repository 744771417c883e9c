//! `server`: runs the pklock lock server. Argument parsing and wiring only.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::info;
use pklock::{Config, Server};

/// The pklock lock server: a lock is held exactly as long as its client's
/// TCP connection lives.
#[derive(Parser)]
#[command(name = "server", version)]
struct Args {
    /// TOML configuration (every key: config/settings.example.toml). Without
    /// it the built-in defaults serve 127.0.0.1:20934 to loopback peers.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => {
            info!("no --config given: using the built-in defaults");
            Config::default()
        }
    };
    let mut server = Server::bind(config)?;
    server.handle_signals()?;
    server.run()?;
    Ok(())
}
