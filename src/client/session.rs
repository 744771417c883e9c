//! One client connection's moving parts: the write side behind a lock, the
//! requests waiting for replies (matched by id), the reader thread that owns
//! the read side, and the watchdog thread that pings and declares the
//! connection lost when the lease runs out.
//!
//! Declaring a loss is not releasing: the socket stays open, and with it any
//! lock the server still counts as ours, until every guard is dropped or the
//! client is. Only then can the server hand the locks on, so a holder told
//! to stop is never running beside the next one on a network that healed.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::frame;

/// Largest reply the client accepts.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Why a connection, and with it every lock it held, is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// The server closed the connection (or the network reset it).
    Closed(String),
    /// Reading or writing the socket failed.
    Broken(String),
    /// Nothing was heard from the server for the whole lease: it may have
    /// released the locks by now, or soon will.
    LeaseExpired {
        /// How long since the last request the server answered was sent.
        silent_for: Duration,
    },
    /// The client was dropped.
    ClientClosed,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::Closed(detail) => write!(f, "the server closed the connection{detail}"),
            LossReason::Broken(e) => write!(f, "the connection broke: {e}"),
            LossReason::LeaseExpired { silent_for } => write!(
                f,
                "no answer from the server for {} ms, longer than the lease",
                silent_for.as_millis()
            ),
            LossReason::ClientClosed => f.write_str("the client was closed"),
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    sent_at: Instant,
    reply: Option<SyncSender<Value>>,
}

struct State {
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// When the latest request the server has answered was sent: the server
    /// heard from us after this, so it cannot release our locks before this
    /// plus its earliest release time.
    confirmed_at: Instant,
    last_ping: Instant,
    lost: Option<LossReason>,
    /// Names this client holds through guards; after a loss, the guards not
    /// yet dropped, whose work may still be running.
    held: HashSet<String>,
    /// While set, the caller's work is known to be stopped, so the lease may
    /// run out without a loss (see [`Session::pause_lease`]).
    lease_paused: bool,
    /// The socket has been shut down: the server may release everything.
    closed: bool,
    /// An error message the server sent without an id, kept for the loss reason.
    server_error: Option<String>,
}

type LossCallback = Box<dyn FnOnce(&LossReason) + Send>;

/// Shared by the client, its guards, and its two threads.
pub(crate) struct Session {
    writer: Mutex<TcpStream>,
    /// For shutting the socket down without waiting for the writer.
    control: TcpStream,
    state: Mutex<State>,
    changed: Condvar,
    callbacks: Mutex<Vec<LossCallback>>,
    lease: Duration,
    heartbeat: Duration,
}

/// A lock that does not care about poisoning: the state stays consistent
/// because every critical section is short and does not panic.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Session {
    /// Wraps a connected stream; `confirmed_at` is when the first answered
    /// request was sent.
    pub(crate) fn new(
        stream: TcpStream,
        lease: Duration,
        heartbeat: Duration,
        confirmed_at: Instant,
    ) -> io::Result<Session> {
        Ok(Session {
            control: stream.try_clone()?,
            writer: Mutex::new(stream),
            state: Mutex::new(State {
                next_id: 1,
                pending: HashMap::new(),
                confirmed_at,
                last_ping: confirmed_at,
                lost: None,
                held: HashSet::new(),
                lease_paused: false,
                closed: false,
                server_error: None,
            }),
            changed: Condvar::new(),
            callbacks: Mutex::new(Vec::new()),
            lease,
            heartbeat,
        })
    }

    /// Lets processes started from now on inherit the connection (or not):
    /// while any of them keeps it open, the server keeps this client's locks.
    pub(crate) fn set_inheritable(&self, inheritable: bool) -> io::Result<()> {
        let flags = match inheritable {
            true => rustix::io::FdFlags::empty(),
            false => rustix::io::FdFlags::CLOEXEC,
        };
        rustix::io::fcntl_setfd(&self.control, flags).map_err(io::Error::from)
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Starts the reader and the watchdog.
    pub(crate) fn spawn_threads(self: &Arc<Self>, reader: TcpStream) -> io::Result<()> {
        let session = Arc::clone(self);
        std::thread::Builder::new()
            .name("pklock-reader".into())
            .spawn(move || session.read_loop(reader))?;
        let session = Arc::clone(self);
        std::thread::Builder::new()
            .name("pklock-watchdog".into())
            .spawn(move || session.watch())?;
        Ok(())
    }

    /// Sends a request; the receiver gets the whole reply message. Fails if
    /// the connection is already lost.
    pub(crate) fn send(
        &self,
        command: &str,
        parameters: Value,
    ) -> Result<Receiver<Value>, LossReason> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_tracked(command, parameters, Some(tx))?;
        Ok(rx)
    }

    /// Sends a request whose reply nobody waits for (it still confirms the lease).
    pub(crate) fn send_untracked(
        &self,
        command: &str,
        parameters: Value,
    ) -> Result<(), LossReason> {
        self.send_tracked(command, parameters, None)
    }

    fn send_tracked(
        &self,
        command: &str,
        parameters: Value,
        reply: Option<SyncSender<Value>>,
    ) -> Result<(), LossReason> {
        let id = {
            let mut state = locked(&self.state);
            if let Some(reason) = &state.lost {
                return Err(reason.clone());
            }
            let id = state.next_id;
            state.next_id += 1;
            state.pending.insert(
                id,
                Pending {
                    sent_at: Instant::now(),
                    reply,
                },
            );
            id
        };
        let body = json!({"command": command, "id": id, "parameters": parameters}).to_string();
        let written = frame::write_blocking(&mut *locked(&self.writer), body.as_bytes());
        if let Err(e) = written {
            let reason = LossReason::Broken(e.to_string());
            self.declare_lost(reason.clone());
            return Err(reason);
        }
        Ok(())
    }

    /// Waits for a reply, or for the connection to be lost.
    pub(crate) fn wait_reply(&self, rx: &Receiver<Value>) -> Result<Value, LossReason> {
        rx.recv()
            .map_err(|_| self.loss().unwrap_or(LossReason::ClientClosed))
    }

    /// Why the connection is gone, if it is.
    pub(crate) fn loss(&self) -> Option<LossReason> {
        locked(&self.state).lost.clone()
    }

    /// Waits until the connection is lost or `timeout` passes (`None`: for ever).
    pub(crate) fn wait_lost(&self, timeout: Option<Duration>) -> Option<LossReason> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut state = locked(&self.state);
        loop {
            if let Some(reason) = &state.lost {
                return Some(reason.clone());
            }
            state = match deadline {
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.changed
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// Runs `callback` once when the connection is lost (at once if it is).
    pub(crate) fn on_lost(&self, callback: LossCallback) {
        let lost = {
            let state = locked(&self.state);
            if state.lost.is_none() {
                locked(&self.callbacks).push(callback);
                return;
            }
            state.lost.clone()
        };
        if let Some(reason) = lost {
            callback(&reason);
        }
    }

    /// Records that a guard holds `name`; false if one already does.
    pub(crate) fn claim(&self, name: &str) -> bool {
        locked(&self.state).held.insert(name.to_string())
    }

    /// Forgets that a guard holds `name`. After a loss, the last guard to go
    /// closes the connection: its work is over, the server may hand on.
    pub(crate) fn release(&self, name: &str) {
        let mut state = locked(&self.state);
        state.held.remove(name);
        if state.lost.is_some() && state.held.is_empty() {
            self.close(&mut state);
        }
    }

    /// Marks the connection lost for `reason` (the first reason wins), fails
    /// every waiting request and runs the callbacks. The socket is closed
    /// only once no guard is left (at once if there is none), so that the
    /// server cannot grant our locks to another while our work still runs.
    pub(crate) fn declare_lost(&self, reason: LossReason) {
        {
            let mut state = locked(&self.state);
            if state.lost.is_some() {
                return;
            }
            state.lost = Some(reason.clone());
            // Dropping the senders wakes every waiter with an error.
            state.pending.clear();
            if state.held.is_empty() {
                self.close(&mut state);
            }
        }
        self.changed.notify_all();
        let callbacks = std::mem::take(&mut *locked(&self.callbacks));
        for callback in callbacks {
            callback(&reason);
        }
    }

    /// Declares the connection lost if it is not yet, and closes it whatever
    /// guards remain: the client is gone.
    pub(crate) fn shut(&self) {
        self.declare_lost(LossReason::ClientClosed);
        self.close(&mut locked(&self.state));
    }

    /// Shuts the socket down for real, also for processes that inherited it:
    /// the server then releases everything this connection held.
    fn close(&self, state: &mut State) {
        if !state.closed {
            state.closed = true;
            let _ = self.control.shutdown(Shutdown::Both);
        }
    }

    /// Lets the lease run out without a loss, for a caller whose guarded
    /// work is stopped (a command suspended by job control): nothing runs
    /// that the lock protects, so nothing can overlap the next holder. The
    /// caller must not let the work go on before [`Session::resume_lease`]
    /// succeeds.
    pub(crate) fn pause_lease(&self) {
        locked(&self.state).lease_paused = true;
        self.changed.notify_all();
    }

    /// Ends a pause once the server has answered a request sent after this
    /// call: the connection, and so every lock on it, is then known to have
    /// lasted through the pause. Declares the loss when no answer comes
    /// within the lease.
    pub(crate) fn resume_lease(&self) -> Result<(), LossReason> {
        let asked_at = Instant::now();
        let rx = self.send("ping", Value::Null)?;
        let answered = rx.recv_timeout(self.lease).is_ok();
        let mut state = locked(&self.state);
        if let Some(reason) = &state.lost {
            return Err(reason.clone());
        }
        if answered && state.confirmed_at >= asked_at {
            state.lease_paused = false;
            drop(state);
            self.changed.notify_all();
            return Ok(());
        }
        let silent_for = asked_at.elapsed();
        drop(state);
        let reason = LossReason::LeaseExpired { silent_for };
        self.declare_lost(reason.clone());
        Err(reason)
    }

    fn read_loop(&self, mut reader: TcpStream) {
        let reason = loop {
            let body = match frame::read_blocking(&mut reader, MAX_REPLY_BYTES) {
                Ok(body) => body,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    ) =>
                {
                    let detail = locked(&self.state)
                        .server_error
                        .take()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    break LossReason::Closed(detail);
                }
                Err(e) => break LossReason::Broken(e.to_string()),
            };
            let Ok(message) = serde_json::from_slice::<Value>(&body) else {
                break LossReason::Broken("the server sent a message that is not JSON".to_string());
            };
            self.dispatch(message);
        };
        self.declare_lost(reason);
    }

    fn dispatch(&self, message: Value) {
        let mut state = locked(&self.state);
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            if let Some(error) = message.get("error").and_then(Value::as_str) {
                state.server_error = Some(error.to_string());
            }
            return;
        };
        let Some(pending) = state.pending.remove(&id) else {
            return;
        };
        state.confirmed_at = state.confirmed_at.max(pending.sent_at);
        drop(state);
        if let Some(reply) = pending.reply {
            // The waiter may have given up; that is fine.
            let _ = reply.send(message);
        }
    }

    /// Pings every heartbeat; declares the connection lost once no request
    /// sent within the last lease has been answered.
    fn watch(&self) {
        let mut state = locked(&self.state);
        loop {
            if state.lost.is_some() {
                return;
            }
            let now = Instant::now();
            let lease_end = match state.lease_paused {
                // Pings go on; their answers end the pause (resume_lease).
                true => now + self.heartbeat,
                false => state.confirmed_at + self.lease,
            };
            if now >= lease_end {
                let silent_for = now - state.confirmed_at;
                drop(state);
                self.declare_lost(LossReason::LeaseExpired { silent_for });
                return;
            }
            let next_ping = state.last_ping + self.heartbeat;
            if now >= next_ping {
                state.last_ping = now;
                drop(state);
                let _ = self.send_untracked("ping", Value::Null);
                state = locked(&self.state);
                continue;
            }
            let wake = lease_end.min(next_ping) - now;
            state = self
                .changed
                .wait_timeout(state, wake)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}
