//! `pklock run`: takes a lock (or several together, or a semaphore's
//! permits), runs a command in its own process group with `PKLOCK_TOKEN`,
//! `PKLOCK_NAMES` and, for one name, `PKLOCK_NAME` set, releases the lock
//! when it exits and passes its exit code on. If the lock is lost first,
//! the command's group gets SIGTERM, then SIGKILL after the grace period,
//! and the connection (so the lock) is kept until the whole group is dead,
//! its leader reaped. INT, TERM and HUP sent to pklock are passed on to the
//! command.
//!
//! With a terminal on stdin, the command gets it (it becomes the terminal's
//! foreground process group, as a shell does) and pklock takes it back after.
//! Ctrl-Z stops the command and pklock with it, as one job; `fg` or `bg`
//! resume it once the server has confirmed the lock is still held.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, WaitOptions, kill_process_group, test_kill_process_group};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGTSTP};
use signal_hook::iterator::Signals;

use super::{Acquire, Failure, StopTime, exit, human, say};
use crate::client::{Client, LossReason};

/// `--kill-grace` when none is given; less against a server whose release
/// time leaves less room beside the default lease (half of it).
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// How soon to look again whether the rest of a lost command's group has
/// gone; doubled each time up to GROUP_POLL_MAX.
const GROUP_POLL: Duration = Duration::from_millis(10);
const GROUP_POLL_MAX: Duration = Duration::from_millis(320);

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
    acquire.check()?;
    // The lease leaves room for the grace period: the command is dead
    // before the server may release the lock (docs/SAFETY.md).
    let stop_time = match options.kill_grace {
        Some(grace) => StopTime::Exactly(grace),
        None => StopTime::AtMost(DEFAULT_KILL_GRACE),
    };
    let client = super::connect(
        &acquire.server,
        &acquire.access,
        &format!("pklock run {}", acquire.listed()),
        stop_time,
    )?;
    let kill_grace = client.stop_time();
    let guard = super::take(&client, acquire)?;

    // Inherited as ignored, SIGCHLD would make the kernel reap the command
    // behind our back, and waiting for it fail.
    // SAFETY: restoring a default disposition races with no handler.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let (tx, events) = mpsc::channel();
    // Set up before the command starts, so no signal slips past.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGTSTP])
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
    let terminal = Terminal::controlling();

    // The command inherits the connection: if pklock itself is killed, the
    // lock stays held until the command is done, as with flock(1).
    client
        .set_inheritable(true)
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("cannot share the connection: {e}")))?;
    let mut command = Command::new(program);
    command.args(args);
    for (key, value) in command_env(&acquire.names, guard.token()) {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    // The terminal goes to the command only if pklock's job has it now.
    let terminal_fd = terminal
        .as_ref()
        .filter(|t| t.is_ours())
        .map(|t| t.fd.as_raw_fd());
    // SAFETY: the closure only makes async-signal-safe calls (setpgid,
    // signal, tcsetpgrp, getpid), as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = terminal_fd {
                // The command's own group becomes the terminal's foreground
                // before it can read, so it is never stopped by SIGTTIN.
                libc::tcsetpgrp(fd, libc::getpid());
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
    if let Some(terminal) = terminal.as_ref().filter(|_| terminal_fd.is_some()) {
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
        what: &acquire.what(),
        several: acquire.several(),
        kill_grace,
        client: &client,
        terminal: terminal.as_ref(),
    };
    let outcome = supervisor.supervise();
    if let Some(terminal) = &terminal {
        terminal.take_back_from(group);
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
    /// `lock "a"`, or `locks "a", "b"`.
    what: &'a str,
    /// Whether several locks are held (for the verbs).
    several: bool,
    kill_grace: Duration,
    client: &'a Client,
    terminal: Option<&'a Terminal>,
}

/// Where the supervision of a lost command is.
struct Stopping {
    /// When SIGKILL is due, until it is sent.
    kill_at: Option<Instant>,
    /// The leader's end, once reaped: the rest of its group must go too
    /// before the connection may close.
    leader: Option<ExitStatus>,
    /// How long to wait before looking at the group again.
    poll: Duration,
    /// Already said that part of the group cannot be signalled.
    told_unreachable: bool,
}

impl Supervisor<'_> {
    fn noun(&self) -> &'static str {
        match self.several {
            true => "locks",
            false => "lock",
        }
    }

    fn is(&self) -> &'static str {
        match self.several {
            true => "are",
            false => "is",
        }
    }

    fn it(&self) -> &'static str {
        match self.several {
            true => "them",
            false => "it",
        }
    }

    fn supervise(&mut self) -> Supervised {
        let mut stopping: Option<Stopping> = None;
        loop {
            let now = Instant::now();
            let wait = stopping.as_ref().and_then(|st| {
                let kill = st.kill_at.map(|at| at.saturating_duration_since(now));
                let poll = st.leader.map(|_| st.poll);
                match (kill, poll) {
                    (Some(k), Some(p)) => Some(k.min(p)),
                    (k, p) => k.or(p),
                }
            });
            let event = match wait {
                Some(wait) => self.events.recv_timeout(wait),
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok(Event::Exited(status)) => match &mut stopping {
                    Some(st) => st.leader = Some(status),
                    None => match self.client.loss() {
                        // Lost just as it ended: its group may live on.
                        Some(reason) => {
                            let mut st = self.stop_group(Signal::TERM);
                            st.leader = Some(status);
                            stopping = Some(st);
                            self.report_loss(
                                &reason,
                                "it has ended; waiting for the rest of its process group",
                            );
                        }
                        None => return Supervised::Exited(status),
                    },
                },
                Ok(Event::WaitFailed(e)) => return Supervised::Failed(e),
                Ok(Event::Stopped(_)) if stopping.is_some() => {
                    // It must run to die of SIGTERM.
                    signal_group(self.group, Signal::CONT);
                }
                Ok(Event::Stopped(signal)) => {
                    if let Err(reason) = self.suspend_with(signal) {
                        // Stopped all along: it did no work since the lease
                        // was last confirmed, and must do none now.
                        stopping = Some(self.stop_group(Signal::KILL));
                        self.report_loss(&reason, "it was stopped meanwhile: sent SIGKILL");
                    }
                }
                Ok(Event::Lost(reason)) if stopping.is_none() => {
                    // Signals first: nothing may come between the loss and them.
                    stopping = Some(self.stop_group(Signal::TERM));
                    let doing = format!(
                        "sent SIGTERM to the command (SIGKILL in {})",
                        human(self.kill_grace)
                    );
                    self.report_loss(&reason, &doing);
                }
                Ok(Event::Lost(_)) => {}
                Ok(Event::Signal(SIGTSTP)) if stopping.is_none() => {
                    // Ctrl-Z while pklock's job has the terminal, or a
                    // TSTP for pklock: the command stops first, and its
                    // stop stops pklock (Event::Stopped).
                    signal_group(self.group, Signal::STOP);
                }
                Ok(Event::Signal(SIGTSTP)) => {}
                Ok(Event::Signal(number)) => {
                    if let Some(signal) = Signal::from_named_raw(number) {
                        signal_group(self.group, signal);
                        // A stopped command acts on it only once continued.
                        signal_group(self.group, Signal::CONT);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Supervised::Failed(io::Error::other("lost track of the command"));
                }
            }
            let Some(st) = &mut stopping else {
                continue;
            };
            if st.kill_at.is_some_and(|at| at <= Instant::now()) {
                st.kill_at = None;
                say(format_args!(
                    "the command ignored SIGTERM for {}; sending SIGKILL",
                    human(self.kill_grace)
                ));
                signal_group(self.group, Signal::KILL);
            }
            if let Some(status) = st.leader {
                match group_state(self.group) {
                    GroupState::Gone => {
                        say(format_args!(
                            "the command ended ({}) after losing the {}; releasing {}",
                            describe(status),
                            self.what,
                            self.it(),
                        ));
                        return Supervised::Lost;
                    }
                    GroupState::Unreachable if !st.told_unreachable => {
                        st.told_unreachable = true;
                        say(format_args!(
                            "part of the command's process group cannot be signalled by \
                             pklock (another user's process); the {} {} kept until it ends",
                            self.what,
                            self.is(),
                        ));
                    }
                    _ => {}
                }
                if st.kill_at.is_none() {
                    // Members that were stopped, or started since.
                    signal_group(self.group, Signal::KILL);
                }
                st.poll = (st.poll * 2).min(GROUP_POLL_MAX);
            }
        }
    }

    /// Starts stopping the command's group after a loss: `first` now
    /// (SIGTERM, or SIGKILL when it must not run again), SIGKILL after the
    /// grace.
    fn stop_group(&self, first: Signal) -> Stopping {
        signal_group(self.group, first);
        signal_group(self.group, Signal::CONT);
        Stopping {
            kill_at: (first != Signal::KILL).then(|| Instant::now() + self.kill_grace),
            leader: None,
            poll: GROUP_POLL,
            told_unreachable: false,
        }
    }

    /// Says the lock is lost, and what is done about it. Printed after the
    /// signals are sent, and never failing: stderr may be a closed pipe.
    fn report_loss(&self, reason: &LossReason, doing: &str) {
        let kept = match reason {
            LossReason::Closed(_) | LossReason::Broken(_) => String::new(),
            // The connection may be whole: nobody else gets the lock before
            // the command is gone, unless the server itself drops it.
            _ => format!(
                "; the {} {} kept until the command is gone (or the server drops {})",
                self.noun(),
                self.is(),
                self.it()
            ),
        };
        say(format_args!(
            "lost the {}: {reason}; {doing}{kept}",
            self.what
        ));
    }

    /// The command was stopped by `signal`. With a terminal, stops pklock's
    /// job too, so the shell sees one stopped job; when continued, resumes
    /// the command once the server has confirmed the connection lasted.
    /// Without one, nothing is paused: the lease goes on being kept while
    /// the command is stopped, and whoever stopped it resumes it.
    fn suspend_with(&mut self, signal: i32) -> Result<(), LossReason> {
        let Some(terminal) = self.terminal else {
            if matches!(signal, libc::SIGTTIN | libc::SIGTTOU) {
                say(format_args!(
                    "the command was stopped by {} and pklock has no terminal to give it; \
                     it holds the {} while stopped (a signal to pklock ends it)",
                    signal_name(signal),
                    self.what
                ));
            }
            return Ok(());
        };
        if let Some(reason) = self.client.loss() {
            return Err(reason);
        }
        // All of it, not only the leader whose stop was seen.
        signal_group(self.group, Signal::STOP);
        self.client.pause_lease();
        terminal.take_back_from(self.group);
        if rustix::process::getsid(None).ok() == Some(rustix::process::getpid()) {
            // A session leader has no shell to return to: resume at once.
            say(format_args!(
                "the command was stopped ({}), but pklock has no job control to stop with it; \
                 resuming it",
                signal_name(signal)
            ));
        } else {
            say(format_args!(
                "the command was stopped ({}); the {} {} held",
                signal_name(signal),
                self.what,
                match self.several {
                    true => "stay",
                    false => "stays",
                }
            ));
            // Stops here (with the shell or script that started pklock)
            // until continued by fg, bg or SIGCONT.
            signal_group(rustix::process::getpgrp(), Signal::STOP);
        }
        self.client.resume_lease()?;
        if terminal.is_ours() {
            terminal.give_to(self.group);
        }
        signal_group(self.group, Signal::CONT);
        Ok(())
    }
}

/// The controlling terminal, for handing its foreground to the command.
struct Terminal {
    fd: OwnedFd,
}

impl Terminal {
    /// `/dev/tty`, if pklock has a controlling terminal.
    fn controlling() -> Option<Terminal> {
        let fd: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/tty")
            .ok()?
            .into();
        // Taking the terminal back from the command's group happens while
        // pklock is in the background; SIGTTOU would stop it then.
        // SAFETY: setting a signal to ignored has no handler to race with.
        unsafe { libc::signal(libc::SIGTTOU, libc::SIG_IGN) };
        Some(Terminal { fd })
    }

    /// Whether pklock's own group has the terminal's foreground.
    fn is_ours(&self) -> bool {
        rustix::termios::tcgetpgrp(&self.fd).is_ok_and(|pg| pg == rustix::process::getpgrp())
    }

    fn give_to(&self, group: Pid) {
        let _ = rustix::termios::tcsetpgrp(&self.fd, group);
    }

    /// Takes the foreground back for pklock's group, if the command's group
    /// has it (never from the shell or anyone else).
    fn take_back_from(&self, group: Pid) {
        if rustix::termios::tcgetpgrp(&self.fd).is_ok_and(|pg| pg == group) {
            let _ = rustix::termios::tcsetpgrp(&self.fd, rustix::process::getpgrp());
        }
    }
}

/// Whether a lost command's process group is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupState {
    /// No process of it runs (zombies do nothing, and one whose parent
    /// never reaps it would otherwise keep the lock for ever).
    Gone,
    /// Some process of it runs.
    Running,
    /// Some process of it runs that pklock may not signal.
    Unreachable,
}

fn group_state(group: Pid) -> GroupState {
    match test_kill_process_group(group) {
        Err(rustix::io::Errno::SRCH) => return GroupState::Gone,
        Err(_) if !any_running_in(group).unwrap_or(true) => return GroupState::Gone,
        Err(_) => return GroupState::Unreachable,
        Ok(()) => {}
    }
    // Seen by the kernel, but nothing of it in our /proc (one of another
    // PID namespace): assume it runs.
    match any_running_in(group) {
        Some(false) => GroupState::Gone,
        _ => GroupState::Running,
    }
}

/// Whether /proc shows a live process of `group`: `None` when it shows no
/// process of the group at all, not even a zombie.
fn any_running_in(group: Pid) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let mut seen = false;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        match member_state(&stat, group.as_raw_nonzero().get()) {
            Some(Member::Running) => return Some(true),
            Some(Member::Zombie) => {
                seen = true;
                // A leader thread gone while other threads run shows as a
                // zombie too.
                if threads(&path).is_some_and(|n| n > 1) {
                    return Some(true);
                }
            }
            None => {}
        }
    }
    seen.then_some(false)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Member {
    Running,
    Zombie,
}

/// From a /proc/PID/stat line, whether it is a process of `group` and in
/// what state (`pid (comm) state ppid pgrp ...`; comm may hold spaces and
/// parentheses).
fn member_state(stat: &str, group: i32) -> Option<Member> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?;
    let pgrp = fields.nth(1)?.parse::<i32>().ok()?;
    (pgrp == group).then_some(match state {
        "Z" | "X" => Member::Zombie,
        _ => Member::Running,
    })
}

fn threads(proc_dir: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(proc_dir.join("status"))
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
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

/// The environment the command gets: `PKLOCK_TOKEN`, the grant's token;
/// `PKLOCK_NAMES`, the names one per line, in the order given; and
/// `PKLOCK_NAME`, the name when there is one only, else removed (not
/// inherited from an enclosing `pklock run`).
fn command_env(names: &[String], token: u64) -> [(&'static str, Option<String>); 3] {
    let only = match names {
        [name] => Some(name.clone()),
        _ => None,
    };
    [
        ("PKLOCK_TOKEN", Some(token.to_string())),
        ("PKLOCK_NAME", only),
        ("PKLOCK_NAMES", Some(names.join("\n"))),
    ]
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
    use super::{Member, command_env, member_state};

    #[test]
    fn the_command_gets_the_token_and_the_names() {
        let one = command_env(&["backup".to_string()], 42);
        assert_eq!(
            one,
            [
                ("PKLOCK_TOKEN", Some("42".to_string())),
                ("PKLOCK_NAME", Some("backup".to_string())),
                ("PKLOCK_NAMES", Some("backup".to_string())),
            ]
        );
        let names = ["db".to_string(), "cache x".to_string()];
        let several = command_env(&names, 7);
        assert_eq!(
            several,
            [
                ("PKLOCK_TOKEN", Some("7".to_string())),
                // Not one of them, nor an enclosing run's.
                ("PKLOCK_NAME", None),
                ("PKLOCK_NAMES", Some("db\ncache x".to_string())),
            ]
        );
    }

    #[test]
    fn stat_lines_are_read_past_odd_command_names() {
        let of = |line: &str| member_state(line, 4242);
        assert_eq!(of("42 (sh) S 1 4242 4242 0"), Some(Member::Running));
        assert_eq!(of("42 (a (b) c) R 1 4242 4242 0"), Some(Member::Running));
        assert_eq!(of("42 (sh) Z 1 4242 4242 0"), Some(Member::Zombie));
        assert_eq!(of("42 (sh) S 1 4243 4243 0"), None);
        assert_eq!(of("garbage"), None);
    }
}
