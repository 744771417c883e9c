//! The lock server's command line: `pklock server` and the `server` binary
//! both run this code. It owns the server's flags and help text, reading
//! and checking the configuration, where the state file goes, telling
//! systemd the server is ready, and what a SIGHUP re-reads; the serving
//! itself is [`crate::server::Server`].

use std::error::Error;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use log::{info, warn};

use crate::proof::ProofKey;
use crate::state_location::{self, Located, StateDirs};
use crate::{Config, Server, log_level};

/// The pklock lock server: a lock is held exactly as long as its client's
/// TCP connection lives.
#[derive(Parser, Debug)]
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
[[acl]] rules give principals rights on lock-name prefixes (locked-down.example.toml).

Metrics: with metrics_listen, Prometheus metrics at http://ADDRESS/metrics; log_format =
\"json\" writes one JSON object per log line.

SIGHUP re-reads the --config file: allowed, the limits, log_level, metrics_lock_prefixes,
[keepalive] (for connections accepted from then on), the [tls] certificate, key and client
CA (for new connections), the tokens file and the [[acl]] rules change at once; listen,
[tls] listen, state_file, restart_grace_ms, metrics_listen, log_format and [cluster] need a
restart. A file that does not check out changes nothing.

Example configurations, every key with its default and why: settings.example.toml and
locked-down.example.toml, in config/ in the source, and in /usr/share/doc/pklock/ once
installed from the Debian package, whose /etc/pklock/settings.toml (the one the systemd
unit reads) starts as a copy of settings.example.toml."
)]
pub struct ServerArgs {
    /// TOML configuration (every key: settings.example.toml, below). Without
    /// it the built-in defaults serve 127.0.0.1:20934 to loopback peers.
    #[arg(long, value_name = "PATH", conflicts_with = "check_config")]
    pub config: Option<PathBuf>,
    /// Check a configuration file, print what it sets, and exit (0 when valid).
    #[arg(long, value_name = "PATH")]
    pub check_config: Option<PathBuf>,
}

/// The server's command as `program` names it (`server`, or `pklock
/// server`): its usage line, and its man page's name.
pub fn command(program: &str) -> clap::Command {
    ServerArgs::command()
        .display_name(program.replace(' ', "-"))
        .bin_name(program)
}

/// Parses `args` (the first one standing for the program, as `argv[0]`) and
/// runs the server, or checks a configuration. Exits 0, 1 when the server
/// cannot start or stops on an error (said on stderr after `program: `), or
/// clap's 2 for bad arguments.
pub fn main(program: &str, args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let parsed = command(program)
        .try_get_matches_from(args)
        .and_then(|matches| ServerArgs::from_arg_matches(&matches));
    let args = match parsed {
        Ok(args) => args,
        // --help and --version exit 0, bad arguments 2.
        Err(e) => e.exit(),
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            super::say_as(program, format_args!("{e}"));
            ExitCode::FAILURE
        }
    }
}

/// Runs the server until it is stopped (or, with `--check-config`, checks
/// the file and prints what it sets).
pub fn run(args: ServerArgs) -> Result<(), Box<dyn Error>> {
    let dirs = StateDirs::from_env();
    if let Some(path) = &args.check_config {
        return check_config(path, &dirs);
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

/// `--check-config`: reads the file as a start would, checks the files it
/// names, and prints what it sets.
fn check_config(path: &Path, dirs: &StateDirs) -> Result<(), Box<dyn Error>> {
    let (config, located) = read_config(path, dirs)?;
    // The default place's directory is made at start; a named one must exist.
    if !matches!(located, Located::DefaultPlace(_)) {
        config.check_paths()?;
    } else if let Some(state) = &config.state_file {
        ProofKey::check(&ProofKey::path_beside(state))?;
    }
    crate::server::check_security(&config)?;
    let mut report = format!("{}: valid\n", path.display());
    for line in config.summary() {
        report.push_str(&format!("  {line}\n"));
    }
    if let Some(note) = state_file_note(&located) {
        report.push_str(&format!("  note: {note}\n"));
    }
    // An error, not a panic, when stdout is a closed pipe.
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(report.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|e| format!("cannot write to stdout: {e}"))?;
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
