//! `pklock run`: takes a lock, runs a command in its own process group with
//! `PKLOCK_TOKEN` and `PKLOCK_NAME` set, releases the lock when it exits and
//! passes its exit code on. If the lock is lost first, the command's group
//! gets SIGTERM, then SIGKILL after the grace period. INT, TERM and HUP sent
//! to pklock are passed on to the command.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{Acquire, Failure, exit, human};
use crate::client::LossReason;

/// What `pklock run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Which lock, and how to wait for it.
    pub acquire: Acquire,
    /// Between SIGTERM and SIGKILL when the lock is lost.
    pub kill_grace: Duration,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

enum Event {
    Exited(io::Result<ExitStatus>),
    Lost(LossReason),
    Signal(i32),
}

/// Runs the command under the lock; returns the exit code for pklock.
pub fn run(options: &RunOptions) -> Result<u8, Failure> {
    let acquire = &options.acquire;
    let Some((program, args)) = options.command.split_first() else {
        return Err(Failure::new(exit::USAGE, "no command given"));
    };
    // The lease leaves room for the grace period: the command is dead
    // before the server may release the lock (docs/SAFETY.md).
    let client = super::connect(
        &acquire.server,
        &format!("pklock run {}", acquire.name),
        options.kill_grace,
    )?;
    let guard = super::take(&client, acquire)?;

    let (tx, events) = mpsc::channel();
    // Set up before the command starts, so no signal slips past.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot handle signals: {e}")))?;
    let signal_handle = signals.handle();
    let signal_tx = tx.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if signal_tx.send(Event::Signal(signal)).is_err() {
                break;
            }
        }
    });

    // The command inherits the connection: if pklock itself is killed, the
    // lock stays held until the command is done, as with flock(1).
    client
        .set_inheritable(true)
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot share the connection: {e}")))?;
    let spawned = Command::new(program)
        .args(args)
        .env("PKLOCK_TOKEN", guard.token().to_string())
        .env("PKLOCK_NAME", &acquire.name)
        .process_group(0)
        .spawn();
    // Later children (none today) must not keep the lock alive.
    let _ = client.set_inheritable(false);
    let mut child = spawned.map_err(|e| {
        let code = match e.kind() {
            io::ErrorKind::NotFound => exit::NOT_FOUND,
            _ => exit::CANNOT_RUN,
        };
        Failure::new(
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    })?;
    let group = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let exit_tx = tx.clone();
    std::thread::spawn(move || {
        let _ = exit_tx.send(Event::Exited(child.wait()));
    });
    let lost_tx = tx;
    client.on_lost(move |reason| {
        let _ = lost_tx.send(Event::Lost(reason.clone()));
    });

    let outcome = supervise(&events, group, options);
    signal_handle.close();
    match outcome {
        Supervised::Exited(status) => {
            // Released as soon as the command is done.
            let _ = guard.unlock();
            Ok(exit_code(status))
        }
        Supervised::Lost => Ok(acquire.lost_code),
        Supervised::Failed(e) => Err(Failure::new(
            exit::SOFTWARE,
            format!("waiting for the command: {e}"),
        )),
    }
}

enum Supervised {
    Exited(ExitStatus),
    Lost,
    Failed(io::Error),
}

fn supervise(events: &Receiver<Event>, group: Option<Pid>, options: &RunOptions) -> Supervised {
    let name = &options.acquire.name;
    // Set once the lock is lost: when SIGKILL is due.
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        let event = match kill_at {
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some(at) => events.recv_timeout(at.saturating_duration_since(Instant::now())),
        };
        match event {
            Ok(Event::Exited(Ok(status))) if kill_at.is_some() => {
                let how = if killed { "was killed" } else { "stopped" };
                eprintln!(
                    "pklock: the command {how} ({}) after losing the lock {name:?}",
                    describe(status)
                );
                return Supervised::Lost;
            }
            Ok(Event::Exited(Ok(status))) => return Supervised::Exited(status),
            Ok(Event::Exited(Err(e))) => return Supervised::Failed(e),
            Ok(Event::Lost(reason)) if kill_at.is_none() => {
                eprintln!(
                    "pklock: lost the lock {name:?}: {reason}; sending SIGTERM to the command (SIGKILL in {})",
                    human(options.kill_grace)
                );
                signal_group(group, Signal::TERM);
                kill_at = Some(Instant::now() + options.kill_grace);
            }
            Ok(Event::Lost(_)) => {}
            Ok(Event::Signal(number)) => {
                if let Some(signal) = Signal::from_named_raw(number) {
                    signal_group(group, signal);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if !killed {
                    eprintln!(
                        "pklock: the command ignored SIGTERM for {}; sending SIGKILL",
                        human(options.kill_grace)
                    );
                    signal_group(group, Signal::KILL);
                    killed = true;
                }
                // Wait for the exit without a deadline now.
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Supervised::Failed(io::Error::other("lost track of the command"));
            }
        }
    }
}

fn signal_group(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group {
        // The group may be gone already; nothing to do then.
        let _ = kill_process_group(group, signal);
    }
}

/// The shell's convention: the exit code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
        (None, None) => exit::SOFTWARE,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => status.to_string(),
    }
}
