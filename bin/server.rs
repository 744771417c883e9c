//! `server`: runs the pklock lock server. Argument parsing and wiring only.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use log::{info, warn};
use pklock::proof::ProofKey;
use pklock::state_location::{self, Located, StateDirs};
use pklock::{Config, Server, log_level};

/// The pklock lock server: a lock is held exactly as long as its client's
/// TCP connection lives.
#[derive(Parser)]
#[command(
    name = "server",
    version,
    after_help = "\
State file: unless the configuration sets state_file, the fencing-token state is kept in
$STATE_DIRECTORY (systemd's StateDirectory=), else $XDG_STATE_HOME/pklock, else
~/.local/state/pklock (created, mode 0700), in a file named after the first listen port,
such as state-20934 (none when that port is 0), with the key that signs grants beside it
(state-20934.key). It also lists the locks held at a clean stop, for their holders to
reclaim after the restart. state_file = \"\" turns it off: fencing tokens then follow the
clock only, locks cannot be reclaimed, and every start waits restart_grace_ms.

Cluster mode: with a [cluster] section, several servers share an etcd election; the
leader serves and the others answer notLeader. The token ceiling, the grant key and the
locks held at a clean stop then live in etcd, and no state file is used.

TLS and access: [tls] adds listeners that speak only TLS (with client_ca_file, only to
clients with a certificate that CA signed); [auth] tokens_file names principals by token;
[[acl]] rules give principals rights on lock-name prefixes (config/locked-down.example.toml).

SIGHUP re-reads the --config file: allowed, the limits, log_level, [keepalive] (for
connections accepted from then on), the [tls] certificate, key and client CA (for new
connections), the tokens file and the [[acl]] rules change at once; listen, [tls] listen,
state_file, restart_grace_ms and [cluster] need a restart. A file that does not check out
changes nothing."
)]
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
    let dirs = StateDirs::from_env();
    if let Some(path) = &args.check_config {
        let (config, located) = read_config(path, &dirs)?;
        // The default place's directory is made at start; a named one must exist.
        if !matches!(located, Located::DefaultPlace(_)) {
            config.check_paths()?;
        } else if let Some(state) = &config.state_file {
            ProofKey::check(&ProofKey::path_beside(state))?;
        }
        pklock::server::check_security(&config)?;
        println!("{}: valid", path.display());
        for line in config.summary() {
            println!("  {line}");
        }
        if let Some(note) = state_file_note(&located) {
            println!("  note: {note}");
        }
        return Ok(());
    }
    let (config, located) = match &args.config {
        Some(path) => read_config(path, &dirs)?,
        None => state_location::locate(Config::default(), &dirs)?,
    };
    log_level::install_as(config.log_level, config.log_format)?;
    match &args.config {
        Some(path) => info!("configuration read from {}", path.display()),
        None => info!("no --config given: using the built-in defaults"),
    }
    if let Some(note) = state_file_note(&located) {
        info!("{note}");
    }
    if let Located::DefaultPlace(dir) = &located {
        state_location::prepare(dir)?;
    }
    let mut server = Server::bind(config)?;
    server.handle_signals()?;
    if let Some(path) = args.config {
        server.reload_from(Box::new(move || {
            info!("SIGHUP: re-reading {}", path.display());
            read_config(&path, &dirs)
                .map(|(config, _)| config)
                .map_err(|e| e.to_string())
        }));
    }
    // Under systemd (Type=notify): the listeners are bound, clients can connect.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!("cannot tell the service manager we are ready: {e}");
    }
    server.run()?;
    Ok(())
}

/// Reads a configuration file and locates its state file, as a start, a
/// reload and `--check-config` all do.
fn read_config(path: &Path, dirs: &StateDirs) -> Result<(Config, Located), Box<dyn Error>> {
    let config = Config::load(path)?;
    Ok(state_location::locate(config, dirs)?)
}

/// A word on where the state file came from, when the configuration did
/// not name it.
fn state_file_note(located: &Located) -> Option<String> {
    match located {
        Located::Configured | Located::TurnedOff | Located::InEtcd => None,
        Located::DefaultPlace(dir) => Some(format!(
            "state_file is not set: the state file is kept in the default place, {} \
             (STATE_DIRECTORY, else XDG_STATE_HOME/pklock, else ~/.local/state/pklock), \
             named after the first listen port",
            dir.display()
        )),
        Located::EphemeralPort => Some(
            "state_file is not set and the first listen port is 0: no state file, as a port \
             the kernel picks names no lasting server"
                .to_string(),
        ),
    }
}
