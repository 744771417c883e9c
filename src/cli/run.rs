//! `pklock run`: takes a lock, runs a command in its own process group with
//! `PKLOCK_TOKEN` and `PKLOCK_NAME` set, releases the lock when it exits and
//! passes its exit code on. If the lock is lost first, the command's group
//! gets SIGTERM, then SIGKILL after the grace period, and the connection (so
//! the lock) is kept until the whole group is dead, its leader reaped. INT,
//! TERM and HUP sent to pklock are passed on to the command.
//!
//! With a terminal on stdin, the command gets it (it becomes the terminal's
//! foreground process group, as a shell does) and pklock takes it back after.
//! Ctrl-Z stops the command and pklock with it, as one job; `fg` or `bg`
//! resume it once the server has confirmed the lock is still held.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions, kill_process_group, test_kill_process_group};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::{Acquire, Failure, StopTime, exit, human};
use crate::client::{Client, LossReason};

/// `--kill-grace` when none is given; less against a server whose release
/// time leaves less room beside the default lease (half of it).
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// How often to look whether the rest of a lost command's group has gone.
const GROUP_POLL: Duration = Duration::from_millis(10);

/// What `pklock run` was asked to do.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Which lock, and how to wait for it.
    pub acquire: Acquire,
    /// Between SIGTERM and SIGKILL when the lock is lost; `None`: the
    /// default, shortened to what the server allows.
    pub kill_grace: Option<Duration>,
    /// The command and its arguments.
    pub command: Vec<OsString>,
}

enum Event {
    /// The command's leader stopped (job control) with this signal.
    Stopped(i32),
    /// The command's leader ended and was reaped.
    Exited(ExitStatus),
    WaitFailed(io::Error),
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
    let stop_time = match options.kill_grace {
        Some(grace) => StopTime::Exactly(grace),
        None => StopTime::AtMost(DEFAULT_KILL_GRACE),
    };
    let client = super::connect(
        &acquire.server,
        &format!("pklock run {}", acquire.name),
        stop_time,
    )?;
    let kill_grace = client.stop_time();
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
    let terminal = Terminal::of_stdin();

    // The command inherits the connection: if pklock itself is killed, the
    // lock stays held until the command is done, as with flock(1).
    client
        .set_inheritable(true)
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot share the connection: {e}")))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env("PKLOCK_TOKEN", guard.token().to_string())
        .env("PKLOCK_NAME", &acquire.name);
    let take_terminal = terminal.as_ref().is_some_and(Terminal::is_ours);
    // SAFETY: the closure only makes async-signal-safe calls (setpgid,
    // signal, tcsetpgrp, getpid), as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if take_terminal {
                // The command's own group becomes the terminal's foreground
                // before it can read, so it is never stopped by SIGTTIN.
                libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, libc::getpid());
            }
            // pklock ignores SIGTTOU to take the terminal back; the command
            // must not inherit that.
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
            Ok(())
        });
    }
    let spawned = command.spawn();
    // Later children (none today) must not keep the lock alive.
    let _ = client.set_inheritable(false);
    let child = spawned.map_err(|e| {
        let code = match e.kind() {
            io::ErrorKind::NotFound => exit::NOT_FOUND,
            _ => exit::CANNOT_RUN,
        };
        Failure::new(
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    })?;
    let Some(group) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) else {
        return Err(Failure::new(
            exit::SOFTWARE,
            "the command has no process id",
        ));
    };
    if let Some(terminal) = terminal.as_ref().filter(|_| take_terminal) {
        terminal.give_to(group);
    }
    watch_child(group, tx.clone());
    let lost_tx = tx;
    client.on_lost(move |reason| {
        let _ = lost_tx.send(Event::Lost(reason.clone()));
    });

    let mut supervisor = Supervisor {
        events: &events,
        group,
        name: &acquire.name,
        kill_grace,
        client: &client,
        terminal: terminal.as_ref(),
    };
    let outcome = supervisor.supervise();
    if let Some(terminal) = &terminal {
        terminal.take_back();
    }
    signal_handle.close();
    match outcome {
        Supervised::Exited(status) => {
            // Released as soon as the command is done.
            let _ = guard.unlock();
            Ok(exit_code(status))
        }
        // The whole group is gone: only now may the connection close.
        Supervised::Lost => Ok(acquire.lost_code),
        Supervised::Failed(e) => Err(Failure::new(
            exit::SOFTWARE,
            format!("waiting for the command: {e}"),
        )),
    }
}

/// Reports the command leader's stops and its end, from a thread of its own.
fn watch_child(leader: Pid, tx: Sender<Event>) {
    std::thread::spawn(move || {
        loop {
            let event = match rustix::process::waitpid(Some(leader), WaitOptions::UNTRACED) {
                Ok(Some((_, status))) if status.stopped() => {
                    Event::Stopped(status.stopping_signal().unwrap_or(libc::SIGSTOP))
                }
                Ok(Some((_, status))) => Event::Exited(ExitStatus::from_raw(status.as_raw())),
                Ok(None) => continue,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => Event::WaitFailed(e.into()),
            };
            let done = !matches!(event, Event::Stopped(_));
            if tx.send(event).is_err() || done {
                return;
            }
        }
    });
}

enum Supervised {
    Exited(ExitStatus),
    Lost,
    Failed(io::Error),
}

struct Supervisor<'a> {
    events: &'a Receiver<Event>,
    group: Pid,
    name: &'a str,
    kill_grace: Duration,
    client: &'a Client,
    terminal: Option<&'a Terminal>,
}

impl Supervisor<'_> {
    fn supervise(&mut self) -> Supervised {
        let name = self.name;
        // Set once the lock is lost: when SIGKILL is due.
        let mut kill_at: Option<Instant> = None;
        let mut killed = false;
        // Set once the leader has been reaped after a loss: the rest of its
        // group must go too before the connection may close.
        let mut leader_status: Option<ExitStatus> = None;
        loop {
            let now = Instant::now();
            let kill_due = kill_at.filter(|_| !killed);
            let wait = match (kill_due, leader_status) {
                (Some(at), None) => Some(at.saturating_duration_since(now)),
                (Some(at), Some(_)) => Some(at.saturating_duration_since(now).min(GROUP_POLL)),
                (None, Some(_)) => Some(GROUP_POLL),
                (None, None) => None,
            };
            let event = match wait {
                Some(wait) => self.events.recv_timeout(wait),
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(Event::Exited(status)) if kill_at.is_some() => leader_status = Some(status),
                Ok(Event::Exited(status)) => return Supervised::Exited(status),
                Ok(Event::WaitFailed(e)) => return Supervised::Failed(e),
                Ok(Event::Stopped(_)) if kill_at.is_some() => {
                    // It must run to die of SIGTERM.
                    signal_group(self.group, Signal::CONT);
                }
                Ok(Event::Stopped(signal)) => {
                    if let Err(reason) = self.suspend_with(signal) {
                        self.report_loss(&reason);
                        // Stopped all along: it did no work since the lease
                        // was last confirmed, and must do none now.
                        signal_group(self.group, Signal::KILL);
                        signal_group(self.group, Signal::CONT);
                        killed = true;
                        kill_at = Some(Instant::now());
                    }
                }
                Ok(Event::Lost(reason)) if kill_at.is_none() => {
                    self.report_loss(&reason);
                    signal_group(self.group, Signal::TERM);
                    signal_group(self.group, Signal::CONT);
                    kill_at = Some(Instant::now() + self.kill_grace);
                }
                Ok(Event::Lost(_)) => {}
                Ok(Event::Signal(number)) => {
                    if let Some(signal) = Signal::from_named_raw(number) {
                        signal_group(self.group, signal);
                        // A stopped command acts on it only once continued.
                        signal_group(self.group, Signal::CONT);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if kill_at.is_some_and(|at| at <= Instant::now()) && !killed {
                        eprintln!(
                            "pklock: the command ignored SIGTERM for {}; sending SIGKILL",
                            human(self.kill_grace)
                        );
                        signal_group(self.group, Signal::KILL);
                        killed = true;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Supervised::Failed(io::Error::other("lost track of the command"));
                }
            }
            if let Some(status) = leader_status {
                if !group_alive(self.group) {
                    let how = if killed { "was killed" } else { "stopped" };
                    eprintln!(
                        "pklock: the command {how} ({}) after losing the lock {name:?}; \
                         releasing it",
                        describe(status)
                    );
                    return Supervised::Lost;
                }
                if killed {
                    // Members that were stopped, or started since.
                    signal_group(self.group, Signal::KILL);
                }
            }
        }
    }

    fn report_loss(&self, reason: &LossReason) {
        eprintln!(
            "pklock: lost the lock {:?}: {reason}; sending SIGTERM to the command (SIGKILL in \
             {}); the lock is kept until it has stopped",
            self.name,
            human(self.kill_grace)
        );
    }

    /// The command was stopped by `signal`. From a terminal, stops pklock
    /// too, so the shell sees one stopped job; when continued, resumes the
    /// command once the server has confirmed the connection lasted.
    /// Without a terminal, nothing is paused: the lease goes on being kept
    /// while the command is stopped, and whoever stopped it resumes it.
    fn suspend_with(&mut self, signal: i32) -> Result<(), LossReason> {
        let Some(terminal) = self.terminal else {
            return Ok(());
        };
        terminal.take_back();
        self.client.pause_lease();
        eprintln!(
            "pklock: the command was stopped ({}); the lock {:?} stays held",
            signal_name(signal),
            self.name
        );
        // Stops here until the shell continues us (fg, bg).
        let _ = rustix::process::kill_process(rustix::process::getpid(), Signal::TSTP);
        self.client.resume_lease()?;
        if terminal.is_ours() {
            terminal.give_to(self.group);
        }
        signal_group(self.group, Signal::CONT);
        Ok(())
    }
}

/// The terminal on stdin, for handing its foreground to the command.
struct Terminal {
    stdin: rustix::fd::BorrowedFd<'static>,
}

impl Terminal {
    fn of_stdin() -> Option<Terminal> {
        let stdin = rustix::stdio::stdin();
        if !rustix::termios::isatty(stdin) {
            return None;
        }
        // Taking the terminal back from the command's group happens while
        // pklock is in the background; SIGTTOU would stop it then.
        // SAFETY: setting a signal to ignored has no handler to race with.
        unsafe { libc::signal(libc::SIGTTOU, libc::SIG_IGN) };
        Some(Terminal { stdin })
    }

    /// Whether pklock's own group has the terminal's foreground.
    fn is_ours(&self) -> bool {
        rustix::termios::tcgetpgrp(self.stdin).is_ok_and(|pg| pg == rustix::process::getpgrp())
    }

    fn give_to(&self, group: Pid) {
        let _ = rustix::termios::tcsetpgrp(self.stdin, group);
    }

    /// Takes the foreground back for pklock's group, if the command had it.
    fn take_back(&self) {
        let ours = rustix::process::getpgrp();
        if rustix::termios::tcgetpgrp(self.stdin).is_ok_and(|pg| pg != ours) {
            let _ = rustix::termios::tcsetpgrp(self.stdin, ours);
        }
    }
}

/// Whether any process of the group still runs. Zombies do not count: they
/// do nothing, and one whose parent never reaps (a PID 1 in a container that
/// does not) would otherwise keep the lock for ever.
fn group_alive(group: Pid) -> bool {
    if test_kill_process_group(group).is_err() {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries.flatten().any(|entry| {
        std::fs::read_to_string(entry.path().join("stat"))
            .is_ok_and(|stat| runs_in_group(&stat, group.as_raw_nonzero().get()))
    })
}

/// From a /proc/PID/stat line: whether it is a live process of `group`
/// (`pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses).
fn runs_in_group(stat: &str, group: i32) -> bool {
    let Some((_, after_comm)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = after_comm.split_whitespace();
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
    pgrp == Some(group) && !matches!(state, Some("Z" | "X"))
}

fn signal_group(group: Pid, signal: Signal) {
    // The group may be gone already; nothing to do then.
    let _ = kill_process_group(group, signal);
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGTSTP => "SIGTSTP".to_string(),
        libc::SIGTTIN => "SIGTTIN: it read from the terminal in the background".to_string(),
        libc::SIGTTOU => "SIGTTOU".to_string(),
        libc::SIGSTOP => "SIGSTOP".to_string(),
        n => format!("signal {n}"),
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

#[cfg(test)]
mod tests {
    use super::runs_in_group;

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        assert!(runs_in_group("42 (sh) S 1 4242 4242 0", 4242));
        assert!(runs_in_group("42 (a (b) c) R 1 4242 4242 0", 4242));
        assert!(!runs_in_group("42 (sh) Z 1 4242 4242 0", 4242));
        assert!(!runs_in_group("42 (sh) S 1 4243 4243 0", 4242));
        assert!(!runs_in_group("garbage", 4242));
    }
}
