//! `server`: runs the pklock lock server. Argument parsing and wiring only.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use log::{info, warn};
use pklock::{Config, Server, log_level};

/// The pklock lock server: a lock is held exactly as long as its client's
/// TCP connection lives.
#[derive(Parser)]
#[command(name = "server", version)]
struct Args {
    /// TOML configuration (every key: config/settings.example.toml). Without
    /// it the built-in defaults serve 127.0.0.1:20934 to loopback peers.
    #[arg(long, value_name = "PATH", conflicts_with = "check_config")]
    config: Option<PathBuf>,
    /// Check a configuration file, print what it sets, and exit (0 when valid).
    #[arg(long, value_name = "PATH")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn Error>> {
    if let Some(path) = &args.check_config {
        let config = Config::load(path)?;
        config.check_paths()?;
        println!("{}: valid", path.display());
        for line in config.summary() {
            println!("  {line}");
        }
        return Ok(());
    }
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    log_level::install(config.log_level)?;
    match &args.config {
        Some(path) => info!("configuration read from {}", path.display()),
        None => info!("no --config given: using the built-in defaults"),
    }
    let mut server = Server::bind(config)?;
    server.handle_signals()?;
    // Under systemd (Type=notify): the listeners are bound, clients can connect.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("cannot tell the service manager we are ready: {e}");
    }
    server.run()?;
    Ok(())
}
