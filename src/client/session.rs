//! One client session's moving parts: the write side behind a lock, the
//! requests waiting for replies (matched by id), the reader thread that owns
//! the read side and reconnects when the server closes it, and the watchdog
//! thread that pings and declares the session lost when the lease runs out.
//!
//! A close is not a loss: the server may have restarted, or a cluster's
//! leader stepped down. The reader dials again (finding the leader anew),
//! reclaims every lock held with its token and proof, and sends the waiting
//! requests again; the lease keeps running meanwhile, and is confirmed again
//! only once every lock is back. A `notLeader` answer is taken as such a
//! close: the leader changed under the connection, which the client then
//! closes itself; the request is sent again to the new leader.
//!
//! Declaring a loss is not releasing: the socket stays open, and with it any
//! lock the server still counts as ours, until every guard is dropped or the
//! client is. Only then can the server hand the locks on, so a holder told
//! to stop is never running beside the next one on a network that healed.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::transport::{Reader, Writer};
use crate::frame;
use crate::lock_table::Mode;

/// First pause between attempts to reconnect (each a round of the server
/// list); it doubles up to [`MAX_REDIAL_PAUSE`] (or the heartbeat, if shorter).
pub(crate) const FIRST_REDIAL_PAUSE: Duration = Duration::from_millis(20);
/// Longest pause between attempts to reconnect: a restarted server, or a
/// newly elected leader, is found within this of its start.
pub(crate) const MAX_REDIAL_PAUSE: Duration = Duration::from_millis(250);

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
    /// The server restarted and did not give a lock back.
    NotReclaimed {
        /// The lock.
        lock: String,
        /// The server's reason.
        detail: String,
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
            LossReason::NotReclaimed { lock, detail } => write!(
                f,
                "the connection closed, and the server did not give back {lock:?}: {detail}"
            ),
            LossReason::ClientClosed => f.write_str("the client was closed"),
        }
    }
}

/// A request waiting for its reply.
struct Pending {
    sent_at: Instant,
    /// The connection it was registered on; a reconnect sends it again.
    generation: u64,
    awaiting: Awaiting,
    /// What to send again on a new connection; `None` for requests that
    /// matter only on the connection they were sent on (pings, the unlock
    /// of a dropped guard).
    resend: Option<Resend>,
    /// Sent again on a new connection after the first was closed.
    resent: bool,
}

/// Whether a send may wait for the writer.
enum Kind {
    /// The watchdog's ping: never.
    Ping,
    /// Anything else.
    Request,
}

/// Who the reply goes to.
enum Awaiting {
    /// A caller, through this channel (dropped: nobody any more).
    Caller(SyncSender<Value>),
    /// Nobody; the answer only confirms the lease.
    Nobody,
    /// The reconnect, for the reclaim of this lock.
    Reclaim(String),
}

/// A request as it can be sent again.
struct Resend {
    command: String,
    parameters: Value,
    /// When the caller stops waiting (`timeoutMs` from the first send).
    deadline: Option<Instant>,
}

/// How a lock was asked for, which its reclaim repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ask {
    /// A mutex, in this mode (each name of a multi-lock in its own).
    Mode(Mode),
    /// `take` of a semaphore's `permits`.
    Permits {
        /// The semaphore's number of permits.
        permits: u32,
        /// How many of them.
        take: u32,
    },
}

/// A lock held through a guard, as needed to reclaim it.
#[derive(Clone, Debug)]
struct Held {
    ask: Ask,
    /// `None` while the request is on its way (a reconnect sends it again).
    token: Option<u64>,
    proof: Option<String>,
}

/// The names a `lock` request asks for, each with the proof its grant
/// (`result`) carries: `proof` for one `lockName`, `proofs[name]` for each
/// of `lockNames` (a name, or `{"lockName": name, "mode": ...}`).
fn granted_names<'a>(parameters: &'a Value, result: &'a Value) -> Vec<(&'a str, Option<&'a str>)> {
    if let Some(name) = parameters.get("lockName").and_then(Value::as_str) {
        return vec![(name, result.get("proof").and_then(Value::as_str))];
    }
    let Some(names) = parameters.get("lockNames").and_then(Value::as_array) else {
        return Vec::new();
    };
    names
        .iter()
        .filter_map(|entry| entry.as_str().or_else(|| entry.get("lockName")?.as_str()))
        .map(|name| {
            let proof = result
                .get("proofs")
                .and_then(|proofs| proofs.get(name))
                .and_then(Value::as_str);
            (name, proof)
        })
        .collect()
}

/// The parameters that reclaim `name`, held as `ask` asked, with its
/// grant's token and proof.
fn reclaim_parameters(name: &str, ask: Ask, token: u64, proof: &str) -> Value {
    let mut parameters = json!({"lockName": name, "reclaim": {"token": token, "proof": proof}});
    match ask {
        Ask::Mode(mode) => parameters["mode"] = json!(mode),
        Ask::Permits { permits, take } => {
            parameters["permits"] = json!(permits);
            parameters["take"] = json!(take);
        }
    }
    parameters
}

/// Dials a server to use again, within the time given and trying the
/// leader a `notLeader` answer named first: a connection that has said
/// `hello` (over TLS and with the token when the first one did), the time the hello was sent, its `earliestReleaseMs`, and
/// how long the server still holds grants back. `Err` carries whether to
/// try again.
pub(crate) type Dialer =
    Box<dyn Fn(Duration, Option<&str>) -> Result<Dialed, (bool, String)> + Send + Sync + 'static>;

/// A new connection, ready for requests.
pub(crate) struct Dialed {
    /// The address it was made to.
    pub(crate) server: String,
    /// The read side, for the reader thread.
    pub(crate) reader: Reader,
    /// The write side, behind the session's lock.
    pub(crate) writer: Writer,
    /// The socket itself, for shutting it down.
    pub(crate) control: TcpStream,
    pub(crate) hello_sent_at: Instant,
    /// Who the server takes the client for (`principal` in the hello).
    pub(crate) principal: String,
    pub(crate) earliest_release: Duration,
    pub(crate) grants_resume_in: Duration,
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
    held: HashMap<String, Held>,
    /// The connection requests go to, counted from 1; bumped by a reconnect.
    generation: u64,
    /// The server closed the connection and the reader is dialing again.
    reconnecting: bool,
    /// Reclaims sent on a new connection and not answered yet: until none
    /// is left, no answer confirms the lease.
    reclaims_left: usize,
    /// When those reclaims were sent.
    reclaims_sent_at: Instant,
    /// The connection being replaced, until every reclaim is answered.
    resuming: Option<Resuming>,
    /// The address requests go to.
    server: String,
    /// Where a `notLeader` answer said the leader is, for the next dial.
    leader_hint: Option<String>,
    /// When the server's restart grace ends, if it had not at the last hello.
    grace_ends: Option<Instant>,
    /// The socket requests go to, for shutting it down without waiting for
    /// the writer.
    control: TcpStream,
    /// While set, the caller's work is known to be stopped, so the lease may
    /// run out without a loss (see [`Session::pause_lease`]).
    lease_paused: bool,
    /// The connection the pause began on.
    paused_generation: u64,
    /// The socket has been shut down: the server may release everything.
    closed: bool,
    /// An error message the server sent without an id, kept for the loss reason.
    server_error: Option<String>,
}

/// A connection being replaced.
struct Resuming {
    /// When it closed (the first close, if the next connection closed too
    /// before every lock was back).
    closed_at: Instant,
    /// The address it was made to.
    previous: String,
    /// The locks reclaimed so far.
    reclaimed: Vec<String>,
}

type LossCallback = Box<dyn FnOnce(&LossReason) + Send>;
type ResumeCallback = Box<dyn Fn(&Resumed) + Send>;

/// A session carried over to a new connection after the server closed the
/// old one: every lock held was reclaimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// How long after the close every lock was back.
    pub after: Duration,
    /// The locks reclaimed, by name.
    pub reclaimed: Vec<String>,
    /// The address of the server the session went on with.
    pub server: String,
    /// The address of the server whose connection closed: another one when
    /// a cluster's leader changed.
    pub previous: String,
}

/// Shared by the client, its guards, and its two threads.
pub(crate) struct Session {
    /// The write side, with the generation of its connection.
    writer: Mutex<(u64, Writer)>,
    state: Mutex<State>,
    changed: Condvar,
    callbacks: Mutex<Vec<LossCallback>>,
    resume_callbacks: Mutex<Vec<ResumeCallback>>,
    lease: Duration,
    heartbeat: Duration,
    /// The server's earliest release time the lease was fitted to: a
    /// server found after a reconnect must not release sooner.
    earliest_release: Duration,
    dialer: Dialer,
}

/// A lock that does not care about poisoning: the state stays consistent
/// because every critical section is short and does not panic.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A number from 0 to 999, different in every process and every call.
fn jitter_permille() -> u32 {
    let mut bytes = [0u8; 2];
    match rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty()) {
        Ok(2) => u32::from(u16::from_le_bytes(bytes)) % 1000,
        // No randomness: the process id still spreads processes apart.
        _ => std::process::id() % 1000,
    }
}

/// `pause`, between a half and the whole of it: many clients of one
/// restarted server (or one new leader) then do not all dial at the same
/// instants.
pub(crate) fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(0.5 + f64::from(jitter_permille()) / 2000.0)
}

fn grace_end(hello_sent_at: Instant, grants_resume_in: Duration) -> Option<Instant> {
    (!grants_resume_in.is_zero()).then(|| hello_sent_at + grants_resume_in)
}

impl Session {
    /// Wraps a connection that has said `hello` (the hello's sending time
    /// is when the first answered request was sent); returns the read side
    /// for [`Session::spawn_threads`].
    pub(crate) fn new(
        dialed: Dialed,
        lease: Duration,
        heartbeat: Duration,
        dialer: Dialer,
    ) -> (Session, Reader) {
        let Dialed {
            server,
            reader,
            writer,
            control,
            hello_sent_at,
            earliest_release,
            grants_resume_in,
            principal: _,
        } = dialed;
        let session = Session {
            writer: Mutex::new((1, writer)),
            state: Mutex::new(State {
                next_id: 1,
                pending: HashMap::new(),
                confirmed_at: hello_sent_at,
                last_ping: hello_sent_at,
                lost: None,
                held: HashMap::new(),
                generation: 1,
                reconnecting: false,
                reclaims_left: 0,
                reclaims_sent_at: hello_sent_at,
                resuming: None,
                server,
                leader_hint: None,
                grace_ends: grace_end(hello_sent_at, grants_resume_in),
                control,
                lease_paused: false,
                paused_generation: 1,
                closed: false,
                server_error: None,
            }),
            changed: Condvar::new(),
            callbacks: Mutex::new(Vec::new()),
            resume_callbacks: Mutex::new(Vec::new()),
            lease,
            heartbeat,
            earliest_release,
            dialer,
        };
        (session, reader)
    }

    /// The address requests go to now.
    pub(crate) fn server(&self) -> String {
        locked(&self.state).server.clone()
    }

    /// When the server's restart grace ends, as of the last hello.
    pub(crate) fn grace_ends(&self) -> Option<Instant> {
        locked(&self.state).grace_ends
    }

    /// Lets processes started from now on inherit the connection (or not):
    /// while any of them keeps it open, the server keeps this client's locks.
    pub(crate) fn set_inheritable(&self, inheritable: bool) -> io::Result<()> {
        let flags = match inheritable {
            true => rustix::io::FdFlags::empty(),
            false => rustix::io::FdFlags::CLOEXEC,
        };
        rustix::io::fcntl_setfd(&locked(&self.state).control, flags).map_err(io::Error::from)
    }

    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Starts the reader and the watchdog.
    pub(crate) fn spawn_threads(self: &Arc<Self>, reader: Reader) -> io::Result<()> {
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
    /// the session is already lost. Sent again on a new connection if the
    /// server closes this one before answering.
    pub(crate) fn send(
        &self,
        command: &str,
        parameters: Value,
    ) -> Result<Receiver<Value>, LossReason> {
        let (tx, rx) = mpsc::sync_channel(1);
        let deadline = parameters
            .get("timeoutMs")
            .and_then(Value::as_u64)
            .and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)));
        let resend = Resend {
            command: command.to_string(),
            parameters: parameters.clone(),
            deadline,
        };
        self.send_tracked(command, parameters, Awaiting::Caller(tx), Some(resend))?;
        Ok(rx)
    }

    /// Sends a request whose reply nobody waits for (it still confirms the
    /// lease), on this connection only.
    /// Like [`Session::send`], but never sent again after a reconnect: for
    /// requests that must not be carried out twice. Should the connection
    /// break first, the receiver ends without an answer.
    pub(crate) fn send_once(
        &self,
        command: &str,
        parameters: Value,
    ) -> Result<Receiver<Value>, LossReason> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send_tracked(command, parameters, Awaiting::Caller(tx), None)?;
        Ok(rx)
    }

    pub(crate) fn send_untracked(
        &self,
        command: &str,
        parameters: Value,
    ) -> Result<(), LossReason> {
        self.send_tracked(command, parameters, Awaiting::Nobody, None)
    }

    fn send_tracked(
        &self,
        command: &str,
        parameters: Value,
        awaiting: Awaiting,
        resend: Option<Resend>,
    ) -> Result<(), LossReason> {
        let awaiting_kind = match (command, &awaiting) {
            ("ping", Awaiting::Nobody) => Kind::Ping,
            _ => Kind::Request,
        };
        let (id, generation) = {
            let mut state = locked(&self.state);
            if let Some(reason) = &state.lost {
                return Err(reason.clone());
            }
            if state.reconnecting && resend.is_none() {
                // Meant for the connection that is gone.
                return Ok(());
            }
            let id = state.next_id;
            state.next_id += 1;
            let generation = state.generation;
            state.pending.insert(
                id,
                Pending {
                    sent_at: Instant::now(),
                    generation,
                    awaiting,
                    resend,
                    resent: false,
                },
            );
            if state.reconnecting {
                // Sent once the new connection is up.
                return Ok(());
            }
            (id, generation)
        };
        let body = json!({"command": command, "id": id, "parameters": parameters}).to_string();
        let mut writer = match (self.writer.try_lock(), &awaiting_kind) {
            (Ok(writer), _) => writer,
            (Err(TryLockError::Poisoned(poisoned)), _) => poisoned.into_inner(),
            // The watchdog's ping: someone else is writing, which will
            // bring an answer too; never wait behind a blocked write, or
            // the lease could not run out.
            (Err(TryLockError::WouldBlock), Kind::Ping) => {
                locked(&self.state).pending.remove(&id);
                return Ok(());
            }
            (Err(TryLockError::WouldBlock), Kind::Request) => locked(&self.writer),
        };
        if writer.0 != generation {
            // A reconnect came in between, and sent it on the new connection.
            return Ok(());
        }
        if let Err(e) = writer.1.write_frame(body.as_bytes()) {
            drop(writer);
            // The reader sees the connection end too, and dials again.
            self.connection_broke(generation, &e);
        }
        Ok(())
    }

    /// A write failed: shuts the connection down so that the reader sees
    /// it end (and reconnects), unless it is already a newer one.
    fn connection_broke(&self, generation: u64, error: &io::Error) {
        let state = locked(&self.state);
        if state.generation == generation && !state.reconnecting {
            log::debug!("writing to the server failed: {error}");
            let _ = state.control.shutdown(Shutdown::Both);
        }
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

    /// Records that a guard holds each of `locks`, asked for as said: all
    /// of them, or none if a guard already holds one (its name is the
    /// error). The names are distinct.
    pub(crate) fn claim(&self, locks: &[(&str, Ask)]) -> Result<(), String> {
        let mut state = locked(&self.state);
        if let Some((held, _)) = locks
            .iter()
            .find(|(name, _)| state.held.contains_key(*name))
        {
            return Err(held.to_string());
        }
        for &(name, ask) in locks {
            let held = Held {
                ask,
                token: None,
                proof: None,
            };
            state.held.insert(name.to_string(), held);
        }
        Ok(())
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
            let _ = state.control.shutdown(Shutdown::Both);
        }
    }

    /// Lets the lease run out without a loss, for a caller whose guarded
    /// work is stopped (a command suspended by job control): nothing runs
    /// that the lock protects, so nothing can overlap the next holder. The
    /// caller must not let the work go on before [`Session::resume_lease`]
    /// succeeds.
    pub(crate) fn pause_lease(&self) {
        let mut state = locked(&self.state);
        state.lease_paused = true;
        state.paused_generation = state.generation;
        drop(state);
        self.changed.notify_all();
    }

    /// Ends a pause once the server has answered a request sent after this
    /// call on the connection the pause began on: that connection, and so
    /// every lock on it, is then known to have lasted through the pause.
    /// Declares the loss when no answer comes within the lease, or when the
    /// connection was replaced meanwhile (a lock reclaimed after a restart
    /// may have been someone else's while the work was stopped).
    pub(crate) fn resume_lease(&self) -> Result<(), LossReason> {
        let asked_at = Instant::now();
        let rx = self.send("ping", Value::Null)?;
        let answered = rx.recv_timeout(self.lease).is_ok();
        let mut state = locked(&self.state);
        if let Some(reason) = &state.lost {
            return Err(reason.clone());
        }
        if state.generation != state.paused_generation || state.reconnecting {
            drop(state);
            let reason = LossReason::Closed(
                " while the work was stopped; the locks may have been someone else's since"
                    .to_string(),
            );
            self.declare_lost(reason.clone());
            return Err(reason);
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

    fn read_loop(&self, mut reader: Reader) {
        loop {
            let reason = loop {
                let body = match frame::read_blocking(&mut reader, MAX_REPLY_BYTES) {
                    Ok(body) => body,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                        ) =>
                    {
                        break None;
                    }
                    Err(e) => break Some(LossReason::Broken(e.to_string())),
                };
                let Ok(message) = serde_json::from_slice::<Value>(&body) else {
                    break Some(LossReason::Broken(
                        "the server sent a message that is not JSON".to_string(),
                    ));
                };
                if message.get("error").and_then(Value::as_str) == Some("notLeader") {
                    // The leader changed under this connection: nothing it
                    // answers counts any more. The request stays pending, to
                    // go to the new leader with the reclaims.
                    let leader = message.get("leader").and_then(Value::as_str);
                    log::debug!("the server answered notLeader (leader: {leader:?})");
                    locked(&self.state).leader_hint = leader.map(str::to_string);
                    let _ = reader.shutdown();
                    break None;
                }
                self.dispatch(message);
            };
            let reason = reason.or_else(|| {
                // The server said why before closing (refused, or a bad
                // message of ours): dialing again would not change it.
                let said = locked(&self.state).server_error.take();
                said.map(|e| LossReason::Closed(format!(": {e}")))
            });
            if let Some(reason) = reason {
                self.declare_lost(reason);
                return;
            }
            match self.reconnect() {
                Some(new_reader) => reader = new_reader,
                None => return,
            }
        }
    }

    /// Dials until a server answers, then reclaims every lock held and
    /// sends the waiting requests again; returns the new read side. Gives
    /// up (`None`) once the session is lost: the lease ran out (the
    /// watchdog says so), or the server found is not one to trust with it.
    fn reconnect(&self) -> Option<Reader> {
        {
            let mut state = locked(&self.state);
            if state.lost.is_some() {
                return None;
            }
            state.reconnecting = true;
            // A connection that closes before every lock was back on it
            // counts from the first close, and from the server before.
            let (closed_at, previous) = match state.resuming.take() {
                Some(resuming) => (resuming.closed_at, resuming.previous),
                None => (Instant::now(), state.server.clone()),
            };
            state.resuming = Some(Resuming {
                closed_at,
                previous,
                reclaimed: Vec::new(),
            });
        }
        let mut pause = FIRST_REDIAL_PAUSE;
        let most = MAX_REDIAL_PAUSE.min(self.heartbeat);
        loop {
            let (left, hint) = {
                let mut state = locked(&self.state);
                if state.lost.is_some() {
                    return None;
                }
                let left = match state.lease_paused {
                    true => self.lease,
                    false => {
                        (state.confirmed_at + self.lease).saturating_duration_since(Instant::now())
                    }
                };
                // Tried once: a stale hint must not lead every round.
                (left, state.leader_hint.take())
            };
            match (self.dialer)(left.max(Duration::from_millis(1)), hint.as_deref()) {
                Ok(dialed) => return self.resume_on(dialed),
                Err((false, detail)) => {
                    self.declare_lost(LossReason::Closed(format!(
                        ", and the server found again refused us: {detail}"
                    )));
                    return None;
                }
                Err((true, detail)) => log::debug!("reconnecting: {detail}"),
            }
            let state = locked(&self.state);
            if state.lost.is_some() {
                return None;
            }
            let wait = jittered(pause);
            let _ = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner);
            pause = (pause * 2).min(most);
        }
    }

    /// Moves the session onto a new connection: reclaims, then the waiting
    /// requests, in the order they were first sent.
    fn resume_on(&self, dialed: Dialed) -> Option<Reader> {
        if dialed.earliest_release < self.earliest_release {
            self.declare_lost(LossReason::Closed(format!(
                ", and the server found again may release locks after {} ms, sooner than \
                 the {} ms the lease was fitted to",
                dialed.earliest_release.as_millis(),
                self.earliest_release.as_millis()
            )));
            return None;
        }
        let Dialed {
            server,
            reader,
            writer: new_writer,
            control,
            hello_sent_at,
            grants_resume_in,
            ..
        } = dialed;
        let mut writer = locked(&self.writer);
        let mut state = locked(&self.state);
        if state.lost.is_some() {
            return None;
        }
        let now = Instant::now();
        state.generation += 1;
        let generation = state.generation;
        state.reconnecting = false;
        state.control = control;
        state.server = server;
        state.server_error = None;
        state.grace_ends = grace_end(hello_sent_at, grants_resume_in);
        *writer = (generation, new_writer);

        let mut bodies = Vec::new();
        let mut reclaims = Vec::new();
        for (name, held) in &state.held {
            match (held.token, &held.proof) {
                (Some(token), Some(proof)) => {
                    reclaims.push((name.clone(), held.ask, token, proof.clone()));
                }
                // Still on its way: the request is sent again below.
                (None, _) => {}
                (Some(_), None) => {
                    let lock = name.clone();
                    drop(state);
                    drop(writer);
                    self.declare_lost(LossReason::NotReclaimed {
                        lock,
                        detail: "the server sent no proof with the grant".to_string(),
                    });
                    return None;
                }
            }
        }
        let resumed = match reclaims.is_empty() {
            // Nothing to take back: the hello's answer confirms the lease.
            true => {
                state.confirmed_at = state.confirmed_at.max(hello_sent_at);
                state.resuming.take()
            }
            false => None,
        };
        state.reclaims_left = reclaims.len();
        state.reclaims_sent_at = now;
        // One per name: a semaphore's with its permits and take, each
        // name of a multi-lock on its own with the common token.
        for (name, ask, token, proof) in reclaims {
            let id = state.next_id;
            state.next_id += 1;
            let parameters = reclaim_parameters(&name, ask, token, &proof);
            bodies.push(json!({"command": "lock", "id": id, "parameters": parameters}));
            state.pending.insert(
                id,
                Pending {
                    sent_at: now,
                    generation,
                    awaiting: Awaiting::Reclaim(name),
                    resend: None,
                    resent: false,
                },
            );
        }
        let mut waiting: Vec<u64> = state
            .pending
            .iter()
            .filter(|(_, p)| p.generation != generation)
            .map(|(&id, _)| id)
            .collect();
        waiting.sort_unstable();
        for id in waiting {
            let Some(mut pending) = state.pending.remove(&id) else {
                continue;
            };
            let Some(resend) = &pending.resend else {
                continue;
            };
            // Unlocks too, after the requests and reclaims before them: an
            // unlock may be meant to withdraw a wait sent again above.
            let mut parameters = resend.parameters.clone();
            if let Some(deadline) = resend.deadline {
                let left = deadline.saturating_duration_since(now);
                parameters["timeoutMs"] = json!(u64::try_from(left.as_millis()).unwrap_or(0));
            }
            bodies.push(json!({"command": resend.command, "id": id, "parameters": parameters}));
            pending.sent_at = now;
            pending.generation = generation;
            pending.resent = true;
            state.pending.insert(id, pending);
        }
        drop(state);
        for body in bodies {
            if let Err(e) = writer.1.write_frame(body.to_string().as_bytes()) {
                drop(writer);
                self.connection_broke(generation, &e);
                return Some(reader);
            }
        }
        drop(writer);
        self.changed.notify_all();
        if let Some(resuming) = resumed {
            self.tell_resumed(resuming);
        }
        Some(reader)
    }

    /// Runs `callback` each time the session moves to a new connection with
    /// every lock reclaimed.
    pub(crate) fn on_resumed(&self, callback: ResumeCallback) {
        locked(&self.resume_callbacks).push(callback);
    }

    fn tell_resumed(&self, mut resuming: Resuming) {
        resuming.reclaimed.sort_unstable();
        let resumed = Resumed {
            after: resuming.closed_at.elapsed(),
            reclaimed: resuming.reclaimed,
            server: self.server(),
            previous: resuming.previous,
        };
        for callback in locked(&self.resume_callbacks).iter() {
            callback(&resumed);
        }
    }

    fn dispatch(&self, message: Value) {
        let mut state = locked(&self.state);
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            if let Some(error) = message.get("error").and_then(Value::as_str) {
                // `forceReleased` says who closed it and why: keep the why.
                let detail = message.get("detail").and_then(Value::as_str);
                state.server_error = Some(match detail {
                    Some(detail) if !detail.is_empty() => format!("{error} ({detail})"),
                    _ => error.to_string(),
                });
            }
            return;
        };
        let Some(pending) = state.pending.remove(&id) else {
            return;
        };
        let result = message.get("result");
        let granted = result.and_then(|r| r.get("status")).and_then(Value::as_str) == Some("ok");
        match pending.awaiting {
            Awaiting::Reclaim(name) => {
                if !granted {
                    let detail = result
                        .and_then(|r| r.get("error"))
                        .and_then(Value::as_str)
                        .unwrap_or("refused")
                        .to_string();
                    drop(state);
                    self.declare_lost(LossReason::NotReclaimed { lock: name, detail });
                    return;
                }
                state.reclaims_left = state.reclaims_left.saturating_sub(1);
                if let Some(resuming) = &mut state.resuming {
                    resuming.reclaimed.push(name);
                }
                if state.reclaims_left == 0 {
                    // Every lock is held on this connection again, since
                    // the reclaims were sent at the latest.
                    state.confirmed_at = state.confirmed_at.max(state.reclaims_sent_at);
                    if let Some(resuming) = state.resuming.take() {
                        drop(state);
                        self.tell_resumed(resuming);
                    }
                }
            }
            Awaiting::Caller(reply) => {
                let resent_unlock = pending.resent
                    && pending
                        .resend
                        .as_ref()
                        .is_some_and(|r| r.command == "unlock");
                let status = result.and_then(|r| r.get("status")).and_then(Value::as_str);
                // The closed connection took the lock, or the wait, with it:
                // what a re-sent unlock asked for is done.
                let done_by_the_close = resent_unlock && status == Some("notFound");
                if let Some(resend) = pending.resend.as_ref().filter(|r| r.command == "lock") {
                    // Noted here, before the caller can see it, so that a
                    // reconnect from now on reclaims it (every name of a
                    // multi-lock with the one token and its own proof).
                    if let (true, Some(result)) = (granted, result) {
                        let token = result.get("token").and_then(Value::as_u64);
                        for (name, proof) in granted_names(&resend.parameters, result) {
                            if let Some(held) = state.held.get_mut(name) {
                                held.token = token;
                                held.proof = proof.map(str::to_string);
                            }
                        }
                    }
                }
                if state.reclaims_left == 0 {
                    state.confirmed_at = state.confirmed_at.max(pending.sent_at);
                }
                drop(state);
                let message = match done_by_the_close {
                    true => json!({"id": id, "result": {"status": "ok"}}),
                    false => message,
                };
                // The waiter may have given up; that is fine.
                let _ = reply.send(message);
            }
            Awaiting::Nobody => {
                if state.reclaims_left == 0 {
                    state.confirmed_at = state.confirmed_at.max(pending.sent_at);
                }
            }
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
