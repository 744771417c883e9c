//! The checks shared by the property tests (`tests/fuzz_properties.rs`,
//! `tests/lock_table_model.rs`) and the fuzz targets (`fuzz/`), each written
//! once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;

use crate::lock_model::{LockState, Model};
use pklock::commands::{Core, Outgoing, Settings};
use pklock::frame::{self, PREFIX_LEN, TooLarge};
use pklock::keepalive::Keepalive;
use pklock::lock_table::{
    ClientId, Effect, LockRequest, LockTable, Mode, MultiLockRequest, Permits,
};
use pklock::protocol::{self, Outcome, Reply, Request, UnlockForm, UnlockResult};

// A broken promise comes back as `Err` with a message: the property tests
// turn it into a failing case (which proptest shrinks), the fuzz targets into
// a panic (which libFuzzer reports as a crash).

/// Returns the message as an `Err` unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

/// Returns the message and both values as an `Err` unless they are equal.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($msg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if left != right {
                    return Err(format!(
                        "{}\n  left: {:?}\n right: {:?}",
                        format_args!($($msg)+),
                        left,
                        right
                    ));
                }
            }
        }
    };
}

// ---------------------------------------------------------------------------
// The frame decoder
// ---------------------------------------------------------------------------

/// What feeding a stream to the decoder gave.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The bodies cut out, in order.
    pub bodies: Vec<Vec<u8>>,
    /// The bytes left waiting for more, or the oversized prefix that stopped
    /// the decoder.
    pub end: Result<Vec<u8>, TooLarge>,
}

/// `bodies` encoded as frames, back to back.
///
/// # Panics
///
/// If a body is too long for a frame.
pub fn encode_all(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = Vec::new();
    for body in bodies {
        frame::encode(body, &mut stream).expect("a body that fits a frame");
    }
    stream
}

/// Feeds `stream` to `frame::decode` as the server reads a socket: the
/// stream arrives in chunks, one ending at `place(cut, stream.len() + 1)`
/// for each of `cuts` (`place` returns a position below its second
/// argument) and the last at the end of the stream; each chunk is appended
/// to the bytes not yet consumed, every whole frame is cut out, the rest is
/// kept. Checks that each frame took its prefix and body and no body is
/// over `max_body`.
pub fn decode_in_chunks<C>(
    stream: &[u8],
    cuts: &[C],
    place: impl Fn(&C, usize) -> usize,
    max_body: usize,
) -> Result<Decoded, String> {
    let mut ends: Vec<usize> = cuts.iter().map(|c| place(c, stream.len() + 1)).collect();
    ends.push(stream.len());
    ends.sort_unstable();
    ends.dedup();
    let mut input = Vec::new();
    let mut bodies = Vec::new();
    let mut start = 0;
    for end in ends {
        input.extend_from_slice(&stream[start..end]);
        start = end;
        let mut offset = 0;
        loop {
            match frame::decode(&input[offset..], max_body) {
                Ok(Some(frame)) => {
                    ensure_eq!(
                        frame.consumed,
                        PREFIX_LEN + frame.body.len(),
                        "a frame's size"
                    );
                    ensure!(frame.body.len() <= max_body, "body over the limit");
                    bodies.push(frame.body.to_vec());
                    offset += frame.consumed;
                }
                Ok(None) => break,
                Err(too_large) => {
                    return Ok(Decoded {
                        bodies,
                        end: Err(too_large),
                    });
                }
            }
        }
        input.drain(..offset);
    }
    Ok(Decoded {
        bodies,
        end: Ok(input),
    })
}

/// `frame::decode` written out as its documentation says.
pub fn decode_spec(buf: &[u8], max_body: usize) -> Result<Option<(&[u8], usize)>, TooLarge> {
    if buf.len() < PREFIX_LEN {
        return Ok(None);
    }
    let announced = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if announced as usize > max_body {
        return Err(TooLarge {
            announced,
            limit: max_body,
        });
    }
    let end = PREFIX_LEN + announced as usize;
    Ok((buf.len() >= end).then(|| (&buf[PREFIX_LEN..end], end)))
}

/// Bodies encoded back to back and read in chunks cut at `cuts` (see
/// [`decode_in_chunks`]) come back exactly, in order, with nothing left
/// over, under a limit `slack` bytes above the longest body (so, with no
/// slack, a body of the limit's size is accepted).
///
/// # Panics
///
/// If a body is too long for a frame.
pub fn check_frames_come_back<C>(
    bodies: &[Vec<u8>],
    slack: usize,
    cuts: &[C],
    place: impl Fn(&C, usize) -> usize,
) -> Result<(), String> {
    let max_body = bodies.iter().map(Vec::len).max().unwrap_or(0) + slack;
    let stream = encode_all(bodies);
    let decoded = decode_in_chunks(&stream, cuts, place, max_body)?;
    let sent = Decoded {
        bodies: bodies.to_vec(),
        end: Ok(Vec::new()),
    };
    ensure_eq!(decoded, sent, "frames read in chunks");
    Ok(())
}

/// On arbitrary bytes `frame::decode` does what its documentation says
/// ([`decode_spec`]).
pub fn check_decode_as_documented(bytes: &[u8], max_body: usize) -> Result<(), String> {
    let got = frame::decode(bytes, max_body).map(|f| f.map(|f| (f.body, f.consumed)));
    ensure_eq!(got, decode_spec(bytes, max_body), "decoding {bytes:?}");
    Ok(())
}

/// Reading `stream` in chunks cut at `cuts` gives what reading it at once
/// gives.
pub fn check_chunking_changes_nothing<C>(
    stream: &[u8],
    cuts: &[C],
    place: impl Fn(&C, usize) -> usize,
    max_body: usize,
) -> Result<(), String> {
    let no_cuts: &[C] = &[];
    let in_chunks = decode_in_chunks(stream, cuts, &place, max_body)?;
    let at_once = decode_in_chunks(stream, no_cuts, &place, max_body)?;
    ensure_eq!(in_chunks, at_once, "read in chunks, then at once");
    Ok(())
}

// ---------------------------------------------------------------------------
// The request parser
// ---------------------------------------------------------------------------

/// The request text a reply echoes verbatim: the id, the v1 lock name.
fn echoed(reply: &Reply) -> Option<&str> {
    match reply {
        Reply::Rpc { id, .. } | Reply::Error { id: Some(id), .. } => Some(id.get()),
        Reply::Unlock {
            lock_name: Some(name),
            ..
        } => Some(name.get()),
        _ => None,
    }
}

/// Encodes `reply`, checks that it is one frame holding a JSON object, and
/// returns the body.
///
/// The object must parse with serde_json's ordinary (strict) parser, with
/// one exception: ids are echoed verbatim, so an id the strict parser cannot
/// read either (`1E400`, out of range for an f64, though valid JSON grammar)
/// comes back as sent; then the reply must still be valid JSON grammar.
pub fn encode_one(reply: &Reply) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    let frame = match frame::decode(&out, usize::MAX) {
        Ok(Some(frame)) => frame,
        other => return Err(format!("{reply:?} framed as {other:?}")),
    };
    ensure_eq!(frame.consumed, out.len(), "{reply:?} is not one frame");
    let body = frame.body;
    let text = String::from_utf8_lossy(body);
    if let Err(e) = serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(body) {
        return Err(format!("{reply:?} encoded as {text:?}: {e}"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => ensure!(value.is_object(), "{reply:?} encoded as {text:?}"),
        Err(e) => {
            let excused =
                echoed(reply).is_some_and(|raw| serde_json::from_str::<Value>(raw).is_err());
            ensure!(excused, "{reply:?} encoded as {text:?}: {e}");
        }
    }
    Ok(body.to_vec())
}

/// Parses `body` and checks the outcome: a bad message gets a reply that
/// encodes as a JSON object ([`encode_one`]); a good one has fields within
/// their limits, and a reply echoing its id or lock name encodes as a JSON
/// object too.
pub fn check_parse(body: &[u8]) -> Result<(), String> {
    let request = match protocol::parse(body) {
        Ok(request) => request,
        Err(bad) => {
            ensure!(!bad.detail().is_empty(), "an error without a detail");
            encode_one(&bad.into_reply())?;
            return Ok(());
        }
    };
    let name_ok = |name: &str| (1..=protocol::MAX_LOCK_NAME_BYTES).contains(&name.len());
    let id_ok = |id: &protocol::RequestId| id.get().len() <= protocol::MAX_ID_BYTES;
    match &request {
        Request::Lock { id, .. }
        | Request::LockAll { id, .. }
        | Request::UnlockAll { id, .. }
        | Request::Hello { id, .. }
        | Request::Ping { id }
        | Request::Status { id, .. }
        | Request::Stats { id }
        | Request::ForceRelease { id, .. }
        | Request::Unlock {
            form: UnlockForm::Rpc { id },
            ..
        } => ensure!(id_ok(id), "id of {} bytes", id.get().len()),
        Request::Unlock {
            form: UnlockForm::V1 { .. },
            ..
        } => {}
    }
    let reply = match request {
        Request::Lock { id, lock, .. } => {
            ensure!(name_ok(&lock), "lock name {lock:?}");
            Reply::Rpc {
                id,
                result: Outcome::Granted {
                    token: 1,
                    proof: None,
                },
            }
        }
        Request::LockAll { id, locks, .. } => {
            ensure!(
                (1..=protocol::MAX_LOCK_NAMES).contains(&locks.len()),
                "{} lockNames",
                locks.len()
            );
            for (index, (lock, _)) in locks.iter().enumerate() {
                ensure!(name_ok(lock), "lock name {lock:?}");
                ensure!(
                    !locks[..index].iter().any(|(earlier, _)| earlier == lock),
                    "{lock:?} named twice"
                );
            }
            Reply::Rpc {
                id,
                result: Outcome::GrantedAll {
                    token: 1,
                    proofs: Some(
                        locks
                            .iter()
                            .map(|(lock, _)| (lock.to_string(), "00".to_string()))
                            .collect(),
                    ),
                },
            }
        }
        Request::UnlockAll { id, locks } => {
            ensure!(
                (1..=protocol::MAX_LOCK_NAMES).contains(&locks.len()),
                "{} lockNames",
                locks.len()
            );
            for lock in &locks {
                ensure!(name_ok(lock), "lock name {lock:?}");
            }
            Reply::Rpc {
                id,
                result: Outcome::NotFound,
            }
        }
        Request::Unlock { form, lock } => {
            ensure!(name_ok(&lock), "lock name {lock:?}");
            match form {
                UnlockForm::V1 { lock_name } => Reply::Unlock {
                    result: UnlockResult::Ok,
                    lock_name: Some(lock_name),
                },
                UnlockForm::Rpc { id } => Reply::Rpc {
                    id,
                    result: Outcome::NotFound,
                },
            }
        }
        Request::Hello {
            id, client, auth, ..
        } => {
            ensure!(
                client.len() <= protocol::MAX_CLIENT_NAME_BYTES,
                "client name {client:?}"
            );
            ensure!(
                auth.is_none_or(|token| token.len() <= protocol::MAX_AUTH_BYTES),
                "auth token over the limit"
            );
            Reply::Rpc {
                id,
                result: Outcome::Ok,
            }
        }
        Request::Status { id, limit, .. } => {
            ensure!(
                (1..=protocol::MAX_STATUS_LIMIT).contains(&limit),
                "status limit {limit}"
            );
            Reply::Rpc {
                id,
                result: Outcome::Ok,
            }
        }
        Request::ForceRelease { id, lock } => {
            ensure!(name_ok(&lock), "lock name {lock:?}");
            Reply::Rpc {
                id,
                result: Outcome::NotFound,
            }
        }
        Request::Ping { id } | Request::Stats { id } => Reply::Rpc {
            id,
            result: Outcome::Ok,
        },
    };
    encode_one(&reply)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The whole core
// ---------------------------------------------------------------------------

/// The clients [`CoreCheck`] drives (slots `0..CORE_CLIENTS`).
pub const CORE_CLIENTS: usize = 3;
/// The token of the core's first grant.
pub const CORE_FIRST_TOKEN: u64 = 1_000_000;
/// The largest frame body the core is handed, as the server's limit.
pub const CORE_MAX_MESSAGE_BYTES: usize = 512;

/// Lock names (JSON text) for the requests [`CoreCheck`] is sent; `5` is
/// not a string.
pub const LOCK_NAMES: [&str; 5] = [r#""a""#, r#""b""#, r#""c""#, r#""5""#, "5"];
/// Request ids (JSON text), the valid kinds and some the parser refuses.
pub const IDS: [&str; 8] = ["0", "1", "2", r#""x""#, r#""y""#, "true", "1.5", "null"];
/// `timeoutMs` members of a lock request, with a leading comma; the first
/// leaves it out.
pub const TIMEOUTS: [&str; 9] = [
    "",
    r#","timeoutMs":null"#,
    r#","timeoutMs":0"#,
    r#","timeoutMs":1"#,
    r#","timeoutMs":5"#,
    r#","timeoutMs":20"#,
    r#","timeoutMs":100"#,
    r#","timeoutMs":18446744073709551615"#,
    r#","timeoutMs":-1"#,
];
/// `mode` members of a lock request, with a leading comma; the first leaves
/// it out.
pub const MODES: [&str; 4] = [
    "",
    r#","mode":"exclusive""#,
    r#","mode":"shared""#,
    r#","mode":"read""#,
];
/// `parameters` of a status request.
pub const STATUS_PARAMETERS: [&str; 6] = [
    "{}",
    r#"{"lockName":"a"}"#,
    r#"{"prefix":""}"#,
    r#"{"prefix":"b"}"#,
    r#"{"limit":1}"#,
    r#"{"limit":0}"#,
];

/// A request in the text a client sends; the fields are JSON text, mostly
/// taken from [`LOCK_NAMES`], [`IDS`], [`TIMEOUTS`], [`MODES`] and
/// [`STATUS_PARAMETERS`].
#[derive(Clone, Copy, Debug)]
pub enum Rpc<'a> {
    /// `lock`.
    Lock {
        /// The id.
        id: &'a str,
        /// The lock name.
        name: &'a str,
        /// The `timeoutMs` member, as in [`TIMEOUTS`].
        timeout: &'a str,
        /// The `mode` member, as in [`MODES`].
        mode: &'a str,
    },
    /// `unlock`.
    Unlock {
        /// The id.
        id: &'a str,
        /// The lock name.
        name: &'a str,
    },
    /// `unlock` in the v1 form (no id).
    UnlockV1 {
        /// The lock name.
        name: &'a str,
    },
    /// `status`.
    Status {
        /// The id.
        id: &'a str,
        /// The parameters object.
        parameters: &'a str,
    },
    /// `hello`.
    Hello {
        /// The id.
        id: &'a str,
    },
    /// `ping`.
    Ping {
        /// The id.
        id: &'a str,
    },
    /// `stats`.
    Stats {
        /// The id.
        id: &'a str,
    },
}

impl Rpc<'_> {
    /// The request's JSON text.
    pub fn text(&self) -> String {
        match *self {
            Rpc::Lock {
                id,
                name,
                timeout,
                mode,
            } => format!(
                r#"{{"command":"lock","id":{id},"parameters":{{"lockName":{name}{timeout}{mode}}}}}"#
            ),
            Rpc::Unlock { id, name } => {
                format!(r#"{{"command":"unlock","id":{id},"parameters":{{"lockName":{name}}}}}"#)
            }
            Rpc::UnlockV1 { name } => format!(r#"{{"command":"unlock","lockName":{name}}}"#),
            Rpc::Status { id, parameters } => {
                format!(r#"{{"command":"status","id":{id},"parameters":{parameters}}}"#)
            }
            Rpc::Hello { id } => {
                format!(r#"{{"command":"hello","id":{id},"parameters":{{"client":"worker"}}}}"#)
            }
            Rpc::Ping { id } => format!(r#"{{"command":"ping","id":{id}}}"#),
            Rpc::Stats { id } => format!(r#"{{"command":"stats","id":{id}}}"#),
        }
    }
}

/// Bytes a client sends.
#[derive(Clone, Debug)]
pub enum Piece {
    /// A framed, well-formed request.
    Request(String),
    /// A framed body of garbage.
    Garbage(Vec<u8>),
    /// Raw bytes, which may break the framing.
    Raw(Vec<u8>),
}

impl Piece {
    /// Appends the piece's bytes to `input`.
    ///
    /// # Panics
    ///
    /// If a body is too long for a frame.
    pub fn append_to(&self, input: &mut Vec<u8>) {
        match self {
            Piece::Request(text) => frame::encode(text.as_bytes(), input).expect("a frame"),
            Piece::Garbage(bytes) => frame::encode(bytes, input).expect("a frame"),
            Piece::Raw(bytes) => input.extend_from_slice(bytes),
        }
    }
}

/// One step of a session with the core.
#[derive(Clone, Debug)]
pub enum Step {
    /// The client in this slot connects (if it is not connected).
    Connect(usize),
    /// The client in this slot disconnects (if it is connected).
    Disconnect(usize),
    /// Bytes arriving from a client (connected first if it is not), cut
    /// into frames as the server would.
    Send(usize, Vec<Piece>),
    /// The clock moves this many milliseconds and expired waits are answered.
    Advance(u64),
    /// The clock moves to the next deadline the core asked to be woken for.
    WakeAtNextDeadline,
}

/// Drives a `commands::Core` the way `server.rs` does, checking after every
/// step that the lock table's invariants hold, every reply goes to a live
/// connection and encodes as one frame of strict JSON, and every grant's
/// token is either the token that client already holds (asked again) or
/// above every token granted before.
#[derive(Debug)]
pub struct CoreCheck {
    core: Core,
    now: Instant,
    /// Each client's connection and the bytes it sent not yet cut into frames.
    slots: [Option<(ClientId, Vec<u8>)>; CORE_CLIENTS],
    live: HashSet<ClientId>,
    /// Every token granted, and to whom.
    issued: HashMap<u64, ClientId>,
    highest: Option<u64>,
    out: Vec<Outgoing>,
    next_port: u16,
}

impl CoreCheck {
    /// A core whose first grant carries [`CORE_FIRST_TOKEN`], that grants
    /// nothing for `hold_ms` milliseconds if given (the hold after a
    /// restart), and where a connection may hold or wait for `limit` locks
    /// and all connections together for one more (so that both limits are
    /// met).
    pub fn new(hold_ms: Option<u64>, limit: usize) -> CoreCheck {
        let now = Instant::now();
        let keepalive = Keepalive {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            probes: 5,
            user_timeout: Some(Duration::from_secs(10)),
        };
        let settings = Settings {
            max_locks_per_connection: limit,
            max_lock_entries: limit + 1,
            detect_deadlocks: true,
            keepalive,
            // Small enough that `status` is sometimes cut.
            status_budget_bytes: 250,
        };
        let mut core = Core::new(settings, CORE_FIRST_TOKEN, now);
        if let Some(ms) = hold_ms {
            core.hold_grants_until(now + Duration::from_millis(ms));
        }
        CoreCheck {
            core,
            now,
            slots: [None, None, None],
            live: HashSet::new(),
            issued: HashMap::new(),
            highest: None,
            out: Vec::new(),
            next_port: 40000,
        }
    }

    fn connect(&mut self, slot: usize) -> Result<ClientId, String> {
        if let Some((client, _)) = &self.slots[slot] {
            return Ok(*client);
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.next_port));
        self.next_port = self.next_port.wrapping_add(1);
        let client = self.core.connect(addr);
        ensure!(self.live.insert(client), "client id {client} reused");
        self.slots[slot] = Some((client, Vec::new()));
        Ok(client)
    }

    fn disconnect(&mut self, slot: usize) {
        if let Some((client, _)) = self.slots[slot].take() {
            self.live.remove(&client);
            self.core.disconnect(client, self.now, &mut self.out);
        }
    }

    /// Appends the bytes to the client's input and hands every whole frame
    /// to the core; an oversized prefix is answered and closes the
    /// connection, as in `Server::handle_input`.
    fn send(&mut self, slot: usize, pieces: &[Piece]) -> Result<(), String> {
        let client = self.connect(slot)?;
        let Some((_, input)) = self.slots[slot].as_mut() else {
            unreachable!("just connected");
        };
        for piece in pieces {
            piece.append_to(input);
        }
        let input = std::mem::take(input);
        let mut offset = 0;
        loop {
            match frame::decode(&input[offset..], CORE_MAX_MESSAGE_BYTES) {
                Ok(Some(frame)) => {
                    self.core
                        .handle(client, frame.body, self.now, &mut self.out);
                    offset += frame.consumed;
                    self.check_replies()?;
                }
                Ok(None) => break,
                Err(too_large) => {
                    self.core
                        .message_too_large(client, too_large, self.now, &mut self.out);
                    self.check_replies()?;
                    self.disconnect(slot);
                    return Ok(());
                }
            }
        }
        if let Some((_, kept)) = self.slots[slot].as_mut() {
            *kept = input[offset..].to_vec();
        }
        Ok(())
    }

    /// Every reply goes to a live connection and encodes as a JSON object;
    /// every grant's token is either the token that client already holds
    /// (asked again) or above every token granted before.
    fn check_replies(&mut self) -> Result<(), String> {
        for Outgoing { to, reply } in self.out.drain(..) {
            ensure!(self.live.contains(&to), "reply to closed {to}: {reply:?}");
            let body = encode_one(&reply)?;
            // The ids sent are all within what a strict parser reads.
            let json: Value =
                serde_json::from_slice(&body).map_err(|e| format!("{reply:?}: {e}"))?;
            let Reply::Rpc {
                result: Outcome::Granted { token, proof },
                ..
            } = reply
            else {
                continue;
            };
            let sent = json.get("result").and_then(|r| r.get("token"));
            ensure_eq!(sent.and_then(Value::as_u64), Some(token), "{json:?}");
            let sent_proof = json.get("result").and_then(|r| r.get("proof"));
            ensure_eq!(
                sent_proof.and_then(Value::as_str),
                proof.as_deref(),
                "{json:?}"
            );
            ensure!(
                token < self.core.next_token(),
                "token {token} not issued yet"
            );
            match self.issued.get(&token) {
                Some(&holder) => ensure_eq!(holder, to, "token {token} granted to two clients"),
                None => {
                    let floor = self.highest.map_or(CORE_FIRST_TOKEN, |h| h + 1);
                    ensure!(token >= floor, "token {token} not above {:?}", self.highest);
                    self.issued.insert(token, to);
                    self.highest = Some(token);
                }
            }
        }
        Ok(())
    }

    /// Takes one step, then checks the replies and the table's invariants.
    ///
    /// # Panics
    ///
    /// If a slot is not below [`CORE_CLIENTS`].
    pub fn step(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::Connect(slot) => {
                self.connect(*slot)?;
            }
            Step::Disconnect(slot) => self.disconnect(*slot),
            Step::Send(slot, pieces) => self.send(*slot, pieces)?,
            Step::Advance(ms) => {
                self.now += Duration::from_millis(*ms);
                self.core.expire(self.now, &mut self.out);
            }
            Step::WakeAtNextDeadline => {
                if let Some(at) = self.core.next_deadline() {
                    self.now = self.now.max(at);
                }
                self.core.expire(self.now, &mut self.out);
            }
        }
        self.check_replies()?;
        self.core.table().check_invariants()
    }
}

/// Runs `steps` on a fresh [`CoreCheck::new`]`(hold_ms, limit)`; the error
/// names the step that broke a promise.
///
/// # Panics
///
/// If a slot is not below [`CORE_CLIENTS`].
pub fn run_core(hold_ms: Option<u64>, limit: usize, steps: &[Step]) -> Result<(), String> {
    let mut check = CoreCheck::new(hold_ms, limit);
    for (i, step) in steps.iter().enumerate() {
        check
            .step(step)
            .map_err(|e| format!("step {i} ({step:?}): {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The lock table against the model
// ---------------------------------------------------------------------------

/// An operation on the lock table and the model. Locks are named by their
/// index in the list given to [`check_against_model`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableOp {
    /// A lock request.
    Lock {
        /// Who asks.
        client: ClientId,
        /// The lock's index.
        name: usize,
        /// Exclusive or shared.
        mode: Mode,
        /// How long to wait, `None` for ever.
        timeout: Option<Duration>,
    },
    /// A semaphore request: `take` of the semaphore's `of` permits.
    Take {
        /// Who asks.
        client: ClientId,
        /// The lock's index.
        name: usize,
        /// The semaphore's permits.
        of: u32,
        /// How many the request takes.
        take: u32,
        /// How long to wait, `None` for ever.
        timeout: Option<Duration>,
    },
    /// A multi-lock request.
    LockAll {
        /// Who asks.
        client: ClientId,
        /// The locks' indexes, each with its mode, in the request's order
        /// (a name twice is refused).
        locks: Vec<(usize, Mode)>,
        /// How long to wait for all of them, `None` for ever.
        timeout: Option<Duration>,
    },
    /// An unlock.
    Unlock {
        /// Who unlocks.
        client: ClientId,
        /// The lock's index.
        name: usize,
    },
    /// An unlock of several locks, one after the other (as the server does
    /// for `lockNames`).
    UnlockAll {
        /// Who unlocks.
        client: ClientId,
        /// The locks' indexes.
        names: Vec<usize>,
    },
    /// The client's connection closes.
    Disconnect {
        /// Whose.
        client: ClientId,
    },
    /// The clock moves and expired waits are answered.
    Advance {
        /// By how much.
        by: Duration,
    },
}

/// Each of `names` with a holder or a waiter, as the table shows it.
fn table_snapshot(table: &LockTable<u32>, names: &[&str]) -> BTreeMap<String, LockState> {
    names
        .iter()
        .filter_map(|&name| {
            let view = table.get(name)?;
            let state = LockState {
                permits: view.permits(),
                holders: view
                    .holders()
                    .map(|h| (h.client, h.mode, h.token, h.take))
                    .collect(),
                waiters: view.waiters().map(|w| (w.client, w.mode, w.take)).collect(),
            };
            Some((name.to_string(), state))
        })
        .collect()
}

/// Every lock of every [`Effect::GrantedAll`] in `effects` shows the client
/// as a holder, in the lock's mode, with the grant's token.
fn check_granted_all(table: &LockTable<u32>, effects: &[Effect<u32>]) -> Result<(), String> {
    for effect in effects {
        let Effect::GrantedAll {
            client,
            locks,
            token,
            ..
        } = effect
        else {
            continue;
        };
        for (name, mode) in locks {
            let held = table.get(name).is_some_and(|view| {
                view.holders()
                    .any(|h| h.client == *client && h.token == *token && h.mode == *mode)
            });
            ensure!(held, "{effect:?}: {name:?} is not held so");
        }
    }
    Ok(())
}

/// A wait the asker of a deadlocked request asked for: the lock, its mode,
/// its permits (`None` for a mutex) and its take.
type Asked<'a> = (&'a str, Mode, Option<u32>, u32);

/// Checks the cycle of a deadlock answered to `asker`, who asked to wait for
/// `asked`, against `before`, the table just before the request: it starts
/// with the asker and a lock it asked for; no connection is in it twice, and
/// each is stuck (`stuck`, the model's); each entry's connection waits for
/// the entry's lock (the asker: asks for it), and the next entry's
/// connection (after the last, the first's) holds that lock in a way that
/// excludes the wait, or waits for it ahead.
fn check_cycle(
    cycle: &[(ClientId, Arc<str>)],
    asker: ClientId,
    asked: &[Asked<'_>],
    before: &BTreeMap<String, LockState>,
    stuck: &BTreeSet<ClientId>,
) -> Result<(), String> {
    ensure!(
        cycle.first().is_some_and(|(c, _)| *c == asker),
        "{cycle:?} does not start with the asker {asker}"
    );
    let conns: BTreeSet<ClientId> = cycle.iter().map(|(c, _)| *c).collect();
    ensure_eq!(conns.len(), cycle.len(), "a connection twice in {cycle:?}");
    ensure!(
        conns.is_subset(stuck),
        "{cycle:?} has connections not stuck (stuck: {stuck:?})"
    );
    for (i, (conn, lock)) in cycle.iter().enumerate() {
        let next = cycle[(i + 1) % cycle.len()].0;
        let state = before.get(&**lock);
        let holders = state.map_or(&[][..], |s| &s.holders[..]);
        let waiters = state.map_or(&[][..], |s| &s.waiters[..]);
        let (mode, ahead) = if i == 0 {
            let Some(&(_, mode, _, _)) = asked.iter().find(|(name, ..)| *name == &**lock) else {
                return Err(format!("{cycle:?} starts with a lock not asked for"));
            };
            (mode, waiters)
        } else {
            let Some(place) = waiters.iter().position(|w| w.0 == *conn) else {
                return Err(format!("{cycle:?}: {conn} does not wait for {lock:?}"));
            };
            (waiters[place].1, &waiters[..place])
        };
        let semaphore = state.is_some_and(|s| s.permits.is_some());
        let in_the_way = holders.iter().any(|&(holder, held, _, _)| {
            holder == next && (semaphore || held == Mode::Exclusive || mode == Mode::Exclusive)
        }) || ahead.iter().any(|w| w.0 == next);
        ensure!(
            in_the_way,
            "{cycle:?}: {next} neither holds {lock:?} against {conn} nor waits ahead of it"
        );
    }
    Ok(())
}

/// Runs `ops` on a `LockTable` and on the naive [`Model`], both with
/// `first_token`, `limit` locks per client, `max_entries` over all clients,
/// and no grant for `hold_ms` milliseconds if given. After every step: the
/// table emitted exactly the model's effects (a deadlock's cycle aside) and
/// has the same next token; so a request is answered deadlock exactly when
/// the model finds that it would leave its asker stuck for good; the cycle
/// of a deadlock is one in the table as it was (see [`check_cycle`]); every
/// request is answered once, to the client that asked; a token is never
/// granted to two clients, and new grants get strictly increasing tokens,
/// from `first_token` on; every lock of a multi-lock grant is held by its
/// client with its token right after; the table's invariants hold; each
/// lock's holders and waiters are the model's; no semaphore has more
/// permits held than it has; no connection is stuck for good; every
/// unanswered request is still waiting in the table. The error names the
/// step.
///
/// # Panics
///
/// If an operation names a lock past the end of `names`.
pub fn check_against_model(
    first_token: u64,
    limit: usize,
    max_entries: usize,
    hold_ms: Option<u64>,
    names: &[&str],
    ops: &[TableOp],
) -> Result<(), String> {
    let start = Instant::now();
    let mut now = start;
    let mut table: LockTable<u32> = LockTable::new(first_token, limit, max_entries);
    let mut model: Model<u32> = Model::new(first_token, limit, max_entries);
    if let Some(ms) = hold_ms {
        let until = start + Duration::from_millis(ms);
        table.hold_grants_until(until);
        model.hold_grants_until(until);
    }
    let mut out = Vec::new();
    let mut pending: HashMap<u32, ClientId> = HashMap::new();
    let mut issued: HashMap<u64, ClientId> = HashMap::new();
    let mut highest: Option<u64> = None;
    for (step, op) in ops.iter().enumerate() {
        let tag = step as u32;
        let before = table_snapshot(&table, names);
        // The asker and what it asks to wait for, for a lock request.
        let mut asked: Option<(ClientId, Vec<Asked<'_>>)> = None;
        let expected = match op {
            &TableOp::Lock {
                client,
                name,
                mode,
                timeout,
            } => {
                let request = LockRequest {
                    client,
                    lock: names[name],
                    mode,
                    semaphore: None,
                    timeout,
                    tag,
                };
                table.lock(request, now, &mut out);
                pending.insert(tag, client);
                asked = Some((client, vec![(names[name], mode, None, 1)]));
                model.lock(client, names[name], mode, timeout, tag, now)
            }
            &TableOp::Take {
                client,
                name,
                of,
                take,
                timeout,
            } => {
                let permits = Permits { of, take };
                let request = LockRequest {
                    client,
                    lock: names[name],
                    mode: Mode::Shared,
                    semaphore: Some(permits),
                    timeout,
                    tag,
                };
                table.lock(request, now, &mut out);
                pending.insert(tag, client);
                asked = Some((client, vec![(names[name], Mode::Shared, Some(of), take)]));
                model.take(client, names[name], permits, timeout, tag, now)
            }
            TableOp::LockAll {
                client,
                locks,
                timeout,
            } => {
                let (client, timeout) = (*client, *timeout);
                let locks: Vec<(&str, Mode)> = locks
                    .iter()
                    .map(|&(name, mode)| (names[name], mode))
                    .collect();
                let request = MultiLockRequest {
                    client,
                    locks: &locks,
                    timeout,
                    tag,
                };
                table.lock_all(request, now, &mut out);
                pending.insert(tag, client);
                let waits = locks.iter().map(|&(name, mode)| (name, mode, None, 1));
                asked = Some((client, waits.collect()));
                model.lock_all(client, &locks, timeout, tag, now)
            }
            &TableOp::Unlock { client, name } => {
                let got = table.unlock(client, names[name], now, &mut out);
                let (want, effects) = model.unlock(client, names[name], now);
                ensure_eq!(got, want, "unlock result at step {step}");
                effects
            }
            TableOp::UnlockAll { client, names: all } => {
                let mut effects = Vec::new();
                for &name in all {
                    let from = out.len();
                    let got = table.unlock(*client, names[name], now, &mut out);
                    // A multi-lock granted here may lose a lock to the next
                    // unlock: its grant is checked at once.
                    check_granted_all(&table, &out[from..])
                        .map_err(|e| format!("at step {step} ({op:?}): {e}"))?;
                    let (want, more) = model.unlock(*client, names[name], now);
                    ensure_eq!(got, want, "unlock {name} result at step {step}");
                    effects.extend(more);
                }
                effects
            }
            &TableOp::Disconnect { client } => {
                table.disconnect(client, now, &mut out);
                pending.retain(|_, c| *c != client);
                model.disconnect(client, now)
            }
            &TableOp::Advance { by } => {
                now += by;
                table.expire(now, &mut out);
                model.expire(now)
            }
        };
        // A deadlock's cycle is checked apart, not against the model's.
        let mut cycles = Vec::new();
        let got: Vec<Effect<u32>> = out
            .drain(..)
            .map(|effect| match effect {
                Effect::Deadlock { client, tag, cycle } => {
                    cycles.push((client, cycle));
                    Effect::Deadlock {
                        client,
                        tag,
                        cycle: Vec::new(),
                    }
                }
                other => other,
            })
            .collect();
        // `left` is the table, `right` the model.
        ensure_eq!(got, expected, "effects at step {step} ({op:?})");
        ensure_eq!(
            table.next_token(),
            model.next_token(),
            "next token at step {step}"
        );
        match &asked {
            Some((asker, asked)) if !cycles.is_empty() => {
                // The model's effects were the table's: the model has not moved.
                let stuck = model.stuck_if_waiting(*asker, asked);
                for (_, cycle) in &cycles {
                    check_cycle(cycle, *asker, asked, &before, &stuck)
                        .map_err(|e| format!("deadlock at step {step} ({op:?}): {e}"))?;
                }
            }
            _ => {
                // Found on a recheck, in the middle of the step: the state it
                // was found in is gone; the model agreed that there was one.
                for (client, cycle) in &cycles {
                    let conns: BTreeSet<ClientId> = cycle.iter().map(|(c, _)| *c).collect();
                    ensure!(
                        cycle.first().is_some_and(|(c, _)| c == client)
                            && conns.len() == cycle.len(),
                        "deadlock at step {step} ({op:?}): {cycle:?} for {client}"
                    );
                }
            }
        }
        if !matches!(op, TableOp::UnlockAll { .. }) {
            check_granted_all(&table, &got).map_err(|e| format!("at step {step} ({op:?}): {e}"))?;
        }
        for effect in &got {
            let (tag, client, token) = match *effect {
                Effect::Granted {
                    tag, client, token, ..
                }
                | Effect::GrantedAll {
                    tag, client, token, ..
                } => (tag, client, Some(token)),
                Effect::TimedOut { tag, client }
                | Effect::Cancelled { tag, client }
                | Effect::Deadlock { tag, client, .. }
                | Effect::Refused { tag, client, .. } => (tag, client, None),
            };
            // Every request is answered once, to the client that asked.
            ensure_eq!(pending.remove(&tag), Some(client), "answer to tag {tag}");
            if let Some(token) = token {
                match issued.get(&token) {
                    // Asking again for a held lock returns its token.
                    Some(&holder) => {
                        ensure_eq!(holder, client, "token {token} reused for another client")
                    }
                    None => {
                        ensure!(
                            highest.is_none_or(|h| token > h) && token >= first_token,
                            "token {token} not above {highest:?}"
                        );
                        issued.insert(token, client);
                        highest = Some(token);
                    }
                }
            }
        }
        if let Err(broken) = table.check_invariants() {
            return Err(format!("after step {step} ({op:?}): {broken}"));
        }
        let after = table_snapshot(&table, names);
        ensure_eq!(after, model.snapshot(), "locks after step {step} ({op:?})");
        for (name, state) in &after {
            if let Some(permits) = state.permits {
                let held: u64 = state.holders.iter().map(|h| u64::from(h.3)).sum();
                ensure!(
                    held <= u64::from(permits),
                    "{held} of {permits} permits of {name:?} held after step {step}"
                );
            }
        }
        let stuck = model.stuck();
        ensure!(
            stuck.is_empty(),
            "{stuck:?} stuck for good after step {step} ({op:?})"
        );
        // Whoever is still unanswered is really waiting in the table.
        for (&tag, &client) in &pending {
            let waiting = names.iter().any(|n| {
                table
                    .get(n)
                    .is_some_and(|v| v.waiters().any(|w| w.client == client))
            });
            ensure!(waiting, "request {tag} of client {client} was forgotten");
        }
    }
    Ok(())
}
