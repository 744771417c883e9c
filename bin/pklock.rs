//! `pklock`: the lock server from the shell, and the server itself (`pklock
//! server`). Argument parsing and wiring only; the subcommands live in
//! pklock::cli.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use pklock::cli::{self, Access, Acquire, Failure, exit};
use pklock::duration;

const EXIT_CODES: &str = "\
Exit codes:
  0    success (run: the command's own exit code is passed on)
  1    the lock was not granted in time (change with --conflict-exit-code)
  35   deadlock: waiting would close a cycle of clients waiting for each
       other (the message names it); nothing was taken
  64   bad arguments, or a --kill-grace too long for the server
  69   the server cannot be reached (TLS with it failed), or refused the request
  70   the server answered something unexpected
  75   the lock was lost while held: server gone, connection broken or lease
       expired (change with --lost-exit-code); run stops the command first
  77   the server refused the auth token, or denied the request (outside
       this client's rights)
  126  the command could not be run; 127 the command was not found
  128+N  the command was killed by signal N (or pklock was, while it waited
         for the lock)";

const LOCK_EXIT_CODES: &str = "\
Exit codes:
  0    the lock was held until stdin closed or a signal came
  1    the lock was not granted in time (change with --conflict-exit-code)
  35   deadlock: waiting would close a cycle of clients waiting for each
       other (the message names it); nothing was taken
  64   bad arguments
  69   the server cannot be reached (TLS with it failed), or refused the request
  70   the server answered something unexpected
  75   the lock was lost while held (change with --lost-exit-code): pklock
       printed `lost` and kept the connection until stdin closed
  77   the server refused the auth token, or denied the lock
  128+N  pklock was killed by signal N while it waited for the lock";

const QUERY_EXIT_CODES: &str = "\
Exit codes:
  0    the server answered
  64   bad arguments
  69   the server cannot be reached (TLS with it failed), or refused the request
  70   the server answered something unexpected
  77   the server refused the auth token, or denied the request";

const RELEASE_EXIT_CODES: &str = "\
Exit codes:
  0    the holders' connections were closed: the lock is released
  1    nobody held the lock
  64   bad arguments (or no --force)
  69   the server cannot be reached (TLS with it failed), or refused the request
  70   the server answered something unexpected
  77   the server refused the auth token, or denied the request (the admin
       right is needed)";

/// Take named locks on a pklock server from scripts and cron jobs, or run
/// the server (pklock server).
#[derive(Parser)]
#[command(name = "pklock", version, after_help = EXIT_CODES)]
struct Cli {
    /// Server address (HOST:PORT), or a cluster's addresses separated by
    /// commas (HOST:PORT,HOST:PORT,...): the leader among them is used.
    #[arg(long, global = true, env = "PKLOCK_SERVER", default_value = cli::DEFAULT_SERVER, value_parser = cli::server_list)]
    server: String,
    /// Speak TLS to every server (an address written tls://HOST:PORT
    /// speaks TLS without it).
    #[arg(long, global = true)]
    tls: bool,
    /// The CA certificate(s), PEM, that sign the servers' certificates
    /// (needed for TLS).
    #[arg(long, global = true, value_name = "FILE", env = "PKLOCK_CA")]
    ca: Option<PathBuf>,
    /// A client certificate (PEM) for servers that require one; with --key.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM); with --cert.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// A file whose first line is the auth token to present (never the
    /// token itself on the command line).
    #[arg(long, global = true, value_name = "FILE", env = "PKLOCK_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command while holding a lock; stop it if the lock is lost.
    ///
    /// Several names are taken together, all at once or none, under one
    /// token. The command gets PKLOCK_TOKEN (the grant's fencing token),
    /// PKLOCK_NAMES (the names, one per line) and, for one name,
    /// PKLOCK_NAME.
    #[command(after_help = EXIT_CODES)]
    Run {
        #[command(flatten)]
        lock: LockArgs,
        /// Between SIGTERM and SIGKILL when the lock is lost [default: 2s,
        /// or 30% of the server's release time if that is less].
        #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
        kill_grace: Option<Duration>,
        /// The command and its arguments (after --).
        #[arg(required = true, last = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Take a lock, print its token, hold it until stdin closes.
    ///
    /// Several names are taken together, all at once or none, under one
    /// token. Holds the lock until stdin closes or INT, TERM or HUP arrives. If the
    /// lock is lost meanwhile, prints `lost` and keeps it all the same until
    /// then: stop the work, then close stdin.
    #[command(after_help = LOCK_EXIT_CODES)]
    Lock {
        #[command(flatten)]
        lock: LockArgs,
    },
    /// List locks with their holders and waiters.
    #[command(after_help = QUERY_EXIT_CODES)]
    Status {
        /// Only locks whose names start with this.
        prefix: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the server's counters.
    #[command(after_help = QUERY_EXIT_CODES)]
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the server answers (for health checks).
    #[command(after_help = QUERY_EXIT_CODES)]
    Ping,
    /// Release a lock held elsewhere, by closing its holders' connections
    /// (--force; needs the server's admin right).
    ///
    /// A lock belongs to its holder's connection. --force has the server
    /// close the connection of every holder of NAME, which releases
    /// everything else those connections held too, and prints whose.
    #[command(after_help = RELEASE_EXIT_CODES)]
    Release {
        /// The lock's name.
        name: String,
        /// Close the holders' connections.
        #[arg(long)]
        force: bool,
    },
    /// Run the lock server (its own flags only: pklock server --help).
    Server(cli::server::ServerArgs),
    /// Print a shell completion script on stdout.
    ///
    /// bash: pklock completions bash > /etc/bash_completion.d/pklock (or
    /// source it); zsh: into a directory of $fpath as _pklock; fish: into
    /// ~/.config/fish/completions/pklock.fish.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write the man pages (pklock.1, pklock-server.1, ...) into a directory.
    #[command(hide = true)]
    Man {
        /// Where to write them (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct LockArgs {
    /// The lock's name; several names are taken together, all at once or
    /// none, with one fencing token.
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
    /// Wait at most this long for the lock (30s, 500ms, 2m); default: for ever.
    #[arg(short, long, value_name = "DURATION", value_parser = duration::parse, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Fail at once if the lock is held elsewhere.
    #[arg(short, long)]
    no_wait: bool,
    /// Take a shared lock instead of an exclusive one (every name).
    #[arg(short, long)]
    shared: bool,
    /// Take the lock as a semaphore of N permits (1 to 1000000; one name
    /// only): at most N held at once. Everyone using the name must give the
    /// same N.
    #[arg(long, value_name = "N", conflicts_with = "shared", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    permits: Option<u32>,
    /// How many of the semaphore's permits to take [default: 1].
    #[arg(long, value_name = "K", requires = "permits", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    take: Option<u32>,
    /// Exit code when the lock is not granted.
    #[arg(short = 'E', long, value_name = "N", default_value_t = exit::CONFLICT)]
    conflict_exit_code: u8,
    /// Exit code when the lock is lost while held.
    #[arg(long, value_name = "N", default_value_t = exit::LOST)]
    lost_exit_code: u8,
}

impl LockArgs {
    fn acquire(self, server: String, access: Access) -> Acquire {
        Acquire {
            server,
            access,
            names: self.names,
            wait: if self.no_wait {
                Some(Duration::ZERO)
            } else {
                self.wait
            },
            shared: self.shared,
            permits: self.permits,
            take: self.take.unwrap_or(1),
            conflict_code: self.conflict_exit_code,
            lost_code: self.lost_exit_code,
        }
    }
}

fn main() -> ExitCode {
    // `pklock server ...` is the server's own command line, with its flags
    // only (none of the client's), its help and its exit codes, as the
    // `server` binary's.
    let first: Vec<OsString> = std::env::args_os().skip(1).take(2).collect();
    match first.as_slice() {
        [command, ..] if command == "server" => {
            return cli::server::main("pklock server", std::env::args_os().skip(1));
        }
        [help, command] if help == "help" && command == "server" => {
            return cli::server::main("pklock server", ["server", "--help"].map(OsString::from));
        }
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            cli::say(format_args!("{failure}"));
            ExitCode::from(failure.code)
        }
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    let server = cli.server;
    let access = Access {
        tls: cli.tls,
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
        auth_file: cli.auth_file,
    };
    let printed = |text: String| {
        let mut stdout = std::io::stdout();
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map(|()| 0)
            .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot write to stdout: {e}")))
    };
    match cli.command {
        Command::Run {
            lock,
            kill_grace,
            command,
        } => cli::run::run(&cli::run::RunOptions {
            acquire: lock.acquire(server, access),
            kill_grace,
            command,
        }),
        Command::Lock { lock } => cli::hold::hold(&lock.acquire(server, access)),
        Command::Status { prefix, json } => printed(cli::report::status(
            &server,
            &access,
            prefix.as_deref(),
            json,
        )?),
        Command::Stats { json } => printed(cli::report::stats(&server, &access, json)?),
        Command::Ping => printed(cli::report::ping(&server, &access)?),
        Command::Release { name, force } => {
            printed(cli::release::release(&server, &access, &name, force)?)
        }
        // Only a client flag before it gets `server` here.
        Command::Server(_) => Err(Failure::new(
            exit::USAGE,
            "the server takes none of the client's flags (--server, --tls, --ca, --cert, \
             --key, --auth-file): write `pklock server [--config FILE]`",
        )),
        Command::Completions { shell } => printed(cli::manual::completions(Cli::command(), shell)),
        Command::Man { dir } => {
            let server = cli::server::command("pklock server");
            let written = cli::manual::write_man_pages(Cli::command(), &[server], &dir)?;
            printed(
                written
                    .iter()
                    .map(|path| format!("{}\n", path.display()))
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(args: &[&str]) -> Result<Acquire, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("pklock").chain(args.iter().copied()))?;
        match cli.command {
            Command::Run { lock, .. } | Command::Lock { lock } => {
                Ok(lock.acquire(cli.server, Access::default()))
            }
            _ => panic!("not run or lock: {args:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn names_come_before_the_command_and_flags_apply_to_all() {
        let acquire = parsed(&["run", "db", "cache", "--shared", "--", "cp", "a", "b"]).unwrap();
        assert_eq!(acquire.names, ["db", "cache"]);
        assert!(acquire.shared);
        assert_eq!(acquire.permits, None);
        let cli = Cli::try_parse_from(["pklock", "run", "db", "--", "db", "x"]).unwrap();
        let Command::Run { command, lock, .. } = cli.command else {
            panic!("not run")
        };
        assert_eq!(lock.names, ["db"]);
        assert_eq!(command, ["db", "x"].map(OsString::from));
        let acquire = parsed(&["lock", "a", "b", "c", "-n"]).unwrap();
        assert_eq!(acquire.names, ["a", "b", "c"]);
        assert_eq!(acquire.wait, Some(Duration::ZERO));
    }

    #[test]
    fn permits_and_take_are_checked_as_parsed() {
        let acquire = parsed(&["run", "--permits", "5", "--take", "2", "api", "--", "x"]).unwrap();
        assert_eq!((acquire.permits, acquire.take), (Some(5), 2));
        let acquire = parsed(&["lock", "--permits", "5", "api"]).unwrap();
        assert_eq!((acquire.permits, acquire.take), (Some(5), 1));
        for bad in [
            &["run", "--take", "2", "api", "--", "x"][..],
            &["run", "--permits", "0", "api", "--", "x"],
            &["run", "--permits", "1000001", "api", "--", "x"],
            &["run", "--permits", "2", "--shared", "api", "--", "x"],
            &["run", "--", "x"],
        ] {
            let error = parsed(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} parsed"));
            // main exits 64 for these.
            assert!(error.use_stderr(), "{bad:?}: {error}");
        }
    }

    #[test]
    fn help_lists_the_deadlock_exit_code() {
        for help in [EXIT_CODES, LOCK_EXIT_CODES] {
            assert!(help.contains("\n  35   deadlock:"), "{help}");
        }
    }
}
