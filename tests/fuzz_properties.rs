//! Property tests over hostile input, run by `cargo test` with a fixed seed
//! and case count so that every run checks the same cases (a failure prints
//! its shrunk input; nothing is persisted). The fuzz targets under `fuzz/`
//! check the same promises for as long as they are left to run.
//!
//! - The frame decoder, fed a stream of frames cut at arbitrary points the
//!   way a socket delivers it, returns exactly the bodies sent; arbitrary
//!   bytes never make it panic; an oversized prefix is refused at once.
//! - The request parser never panics, and every bad message gets a reply
//!   that encodes into one frame holding a JSON object.
//! - The whole core (`commands::Core`), fed frames from three clients with
//!   connects, disconnects and clock advances in between, keeps the lock
//!   table's invariants after every step, only ever encodes valid JSON, and
//!   grants strictly increasing fencing tokens.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pklock::commands::{Core, Outgoing, Settings};
use pklock::frame::{self, PREFIX_LEN, TooLarge};
use pklock::keepalive::Keepalive;
use pklock::lock_table::ClientId;
use pklock::protocol::{self, Outcome, Reply, Request, UnlockForm, UnlockResult};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::RngSeed;
use serde_json::Value;
use serde_json::value::RawValue;

/// The same cases on every run: a fixed seed, a fixed count, no
/// regression files written.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x706b_6c6f_636b),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// a. The frame decoder
// ---------------------------------------------------------------------------

/// What feeding a stream to the decoder gave: the bodies cut out, in order,
/// then either the bytes left waiting for more or the oversized prefix that
/// stopped it.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    bodies: Vec<Vec<u8>>,
    end: Result<Vec<u8>, TooLarge>,
}

/// Feeds `stream` to `frame::decode` as the server reads a socket: the
/// stream arrives in chunks ending at `cuts`; each chunk is appended to the
/// bytes not yet consumed, every whole frame is cut out, the rest is kept.
fn decode_in_chunks(stream: &[u8], cuts: &[Index], max_body: usize) -> Decoded {
    let mut ends: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
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
                    assert_eq!(frame.consumed, PREFIX_LEN + frame.body.len());
                    assert!(frame.body.len() <= max_body, "body over the limit");
                    bodies.push(frame.body.to_vec());
                    offset += frame.consumed;
                }
                Ok(None) => break,
                Err(too_large) => {
                    return Decoded {
                        bodies,
                        end: Err(too_large),
                    };
                }
            }
        }
        input.drain(..offset);
    }
    Decoded {
        bodies,
        end: Ok(input),
    }
}

fn encode_all(bodies: &[Vec<u8>]) -> Vec<u8> {
    let mut stream = Vec::new();
    for body in bodies {
        frame::encode(body, &mut stream).unwrap();
    }
    stream
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..8),
        1 => vec(any::<u8>(), 0..300),
    ]
}

/// Bytes that often start with a small length prefix, so that they are
/// sometimes whole frames, sometimes cut ones, sometimes oversized.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefixed = (
        prop_oneof![0..48u32, any::<u32>()],
        vec(any::<u8>(), 0..64),
        any::<Index>(),
    )
        .prop_map(|(len, rest, cut)| {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.extend(rest);
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes
        });
    prop_oneof![prefixed, vec(any::<u8>(), 0..64)]
}

/// `frame::decode` written out as its documentation says.
fn decode_spec(buf: &[u8], max_body: usize) -> Result<Option<(&[u8], usize)>, TooLarge> {
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

proptest! {
    #![proptest_config(config(4096))]

    /// Bodies encoded back to back and read in arbitrary chunks come back
    /// exactly, in order, with nothing left over.
    #[test]
    fn frames_cut_anywhere_come_back_whole(
        bodies in vec(body(), 0..12),
        cuts in vec(any::<Index>(), 0..24),
        slack in 0..3usize,
    ) {
        // The limit is at most a few bytes above the longest body, and
        // sometimes exactly it: a body of the limit's size is accepted.
        let max_body = bodies.iter().map(Vec::len).max().unwrap_or(0) + slack;
        let stream = encode_all(&bodies);
        let decoded = decode_in_chunks(&stream, &cuts, max_body);
        prop_assert_eq!(decoded, Decoded { bodies, end: Ok(Vec::new()) });
    }

    /// Arbitrary bytes: `decode` never panics and does what its
    /// documentation says, and chunking never changes what comes out.
    #[test]
    fn arbitrary_bytes_decode_as_documented(
        bytes in hostile_bytes(),
        more in vec(hostile_bytes(), 0..4),
        cuts in vec(any::<Index>(), 0..12),
        max_body in prop_oneof![0..64usize, Just(usize::MAX)],
    ) {
        let got = frame::decode(&bytes, max_body).map(|f| f.map(|f| (f.body, f.consumed)));
        prop_assert_eq!(got, decode_spec(&bytes, max_body));
        let mut stream = bytes.clone();
        stream.extend(more.concat());
        let at_once = decode_in_chunks(&stream, &[], max_body);
        let in_chunks = decode_in_chunks(&stream, &cuts, max_body);
        prop_assert_eq!(in_chunks, at_once);
    }

    /// A prefix announcing more than the limit is an error as soon as the
    /// prefix is complete, whatever part of the body has arrived, and the
    /// frames before it are still delivered.
    #[test]
    fn oversized_prefix_is_refused_before_the_body(
        (max_body, announced) in (0..100_000usize).prop_flat_map(|max| {
            let over = max as u32 + 1;
            (Just(max), prop_oneof![Just(over), over..over + 100, over..=u32::MAX])
        }),
        partial in vec(any::<u8>(), 0..64),
        before in vec(body(), 0..4),
        cuts in vec(any::<Index>(), 0..12),
    ) {
        let mut bytes = announced.to_be_bytes().to_vec();
        let partial = &partial[..partial.len().min(announced as usize - 1)];
        bytes.extend_from_slice(partial);
        let refused = TooLarge { announced, limit: max_body };
        prop_assert_eq!(frame::decode(&bytes, max_body), Err(refused));

        let before: Vec<Vec<u8>> = before
            .into_iter()
            .map(|mut b| { b.truncate(max_body); b })
            .collect();
        let mut stream = encode_all(&before);
        stream.extend_from_slice(&bytes);
        let decoded = decode_in_chunks(&stream, &cuts, max_body);
        prop_assert_eq!(decoded, Decoded { bodies: before, end: Err(refused) });
    }
}

// ---------------------------------------------------------------------------
// b. The request parser
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
fn encode_one(reply: &Reply) -> Result<Vec<u8>, TestCaseError> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    let frame = match frame::decode(&out, usize::MAX) {
        Ok(Some(frame)) => frame,
        other => {
            return Err(TestCaseError::fail(format!(
                "{reply:?} framed as {other:?}"
            )));
        }
    };
    prop_assert_eq!(frame.consumed, out.len(), "{:?} is not one frame", reply);
    let body = frame.body;
    let text = String::from_utf8_lossy(body);
    let grammar = serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(body);
    prop_assert!(
        grammar.is_ok(),
        "{:?} encoded as {:?}: {:?}",
        reply,
        text,
        grammar.err()
    );
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => prop_assert!(value.is_object(), "{:?} encoded as {:?}", reply, text),
        Err(e) => {
            let excused =
                echoed(reply).is_some_and(|raw| serde_json::from_str::<Value>(raw).is_err());
            prop_assert!(excused, "{:?} encoded as {:?}: {}", reply, text, e);
        }
    }
    Ok(body.to_vec())
}

/// Parses `body` and checks the outcome: a bad message gets a reply that
/// encodes as a JSON object; a good one has fields within their limits, and
/// a reply echoing its id or lock name encodes as a JSON object too.
fn check_parse(body: &[u8]) -> Result<(), TestCaseError> {
    let request = match protocol::parse(body) {
        Ok(request) => request,
        Err(bad) => {
            prop_assert!(!bad.detail().is_empty(), "an error without a detail");
            encode_one(&bad.into_reply())?;
            return Ok(());
        }
    };
    let check_name = |name: &str| (1..=protocol::MAX_LOCK_NAME_BYTES).contains(&name.len());
    let reply = match request {
        Request::Lock { id, lock, .. } => {
            prop_assert!(check_name(&lock), "lock name {:?}", lock);
            Reply::Rpc {
                id,
                result: Outcome::Granted { token: 1 },
            }
        }
        Request::Unlock { form, lock } => {
            prop_assert!(check_name(&lock), "lock name {:?}", lock);
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
        Request::Hello { id, client } => {
            prop_assert!(client.len() <= protocol::MAX_CLIENT_NAME_BYTES);
            Reply::Rpc {
                id,
                result: Outcome::Ok,
            }
        }
        Request::Status { id, limit, .. } => {
            prop_assert!((1..=protocol::MAX_STATUS_LIMIT).contains(&limit));
            Reply::Rpc {
                id,
                result: Outcome::Ok,
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

/// JSON text as a peer could write it, duplicate keys included.
#[derive(Clone, Debug)]
enum Json {
    Null,
    Bool(bool),
    /// Number text, written as is.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn render(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.render(out);
                }
                out.push(']');
            }
            Json::Obj(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(key).unwrap());
                    out.push(':');
                    value.render(out);
                }
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }
}

const KEYS: [&str; 9] = [
    "command",
    "id",
    "parameters",
    "lockName",
    "timeoutMs",
    "mode",
    "client",
    "prefix",
    "limit",
];
const COMMANDS: [&str; 7] = [
    "lock",
    "unlock",
    "hello",
    "ping",
    "status",
    "stats",
    "frobnicate",
];

fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "0",
            "1",
            "-1",
            "-0",
            "5",
            "0.5",
            "1.5",
            "1e2",
            "1E400",
            "-1e-400",
            "100000",
            "100001",
            "18446744073709551615",
            "18446744073709551616",
            "12345678901234567890123",
            "-9223372036854775809",
        ])
        .prop_map(str::to_string),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| serde_json::Number::from_f64(f).unwrap().to_string()),
    ]
}

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec![
            "lock", "unlock", "hello", "ping", "status", "stats", "exclusive", "shared",
            "a", "5", "", " ", "\u{0}", "\"", "\\", "é", "\u{1F512}", "job/",
        ])
        .prop_map(str::to_string),
        2 => "\\PC{0,12}",
        1 => any::<String>(),
        1 => (select(vec![255usize, 256, 257, 1023, 1024, 1025]), select(vec!["x", "é"]))
            .prop_map(|(n, c)| c.repeat(n / c.len())),
    ]
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(KEYS.to_vec()).prop_map(str::to_string),
        1 => "\\PC{0,6}",
    ]
}

fn json_leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        json_number().prop_map(Json::Num),
        json_string().prop_map(Json::Str),
    ]
}

fn json() -> impl Strategy<Value = Json> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Json::Arr),
            vec((json_key(), inner), 0..6).prop_map(Json::Obj),
        ]
    })
}

/// An object shaped like a request: mostly the real keys with plausible
/// values, sometimes anything at all, in any order, with junk keys.
fn request_like() -> impl Strategy<Value = Json> {
    let command = prop_oneof![
        4 => select(COMMANDS.to_vec()).prop_map(|c| Json::Str(c.to_string())),
        1 => json(),
    ];
    let id = prop_oneof![
        3 => json_leaf(),
        1 => json(),
    ];
    let params = prop_oneof![
        4 => vec((json_key(), json()), 0..6).prop_map(Json::Obj),
        1 => json(),
    ];
    (
        proptest::option::weighted(0.9, command),
        proptest::option::weighted(0.7, id),
        proptest::option::weighted(0.7, params),
        proptest::option::weighted(0.2, json()),
        vec((json_key(), json()), 0..3),
        any::<Index>(),
    )
        .prop_map(|(command, id, params, lock_name, extra, rotate)| {
            let mut entries: Vec<(String, Json)> = [
                command.map(|v| ("command".to_string(), v)),
                id.map(|v| ("id".to_string(), v)),
                params.map(|v| ("parameters".to_string(), v)),
                lock_name.map(|v| ("lockName".to_string(), v)),
            ]
            .into_iter()
            .flatten()
            .chain(extra)
            .collect();
            let by = rotate.index(entries.len() + 1);
            entries.rotate_left(by);
            Json::Obj(entries)
        })
}

/// `text` with a few bytes flipped, dropped or inserted.
fn mutated(text: String, edits: Vec<(Index, u8, u8)>) -> Vec<u8> {
    let mut bytes = text.into_bytes();
    for (at, kind, byte) in edits {
        let i = at.index(bytes.len() + 1);
        match kind % 3 {
            0 if i < bytes.len() => bytes[i] = byte,
            1 if i < bytes.len() => {
                bytes.remove(i);
            }
            _ => bytes.insert(i, byte),
        }
    }
    bytes
}

proptest! {
    #![proptest_config(config(2048))]

    /// Arbitrary bytes, strings and damaged requests.
    #[test]
    fn parser_answers_arbitrary_bytes(
        body in prop_oneof![
            vec(any::<u8>(), 0..200),
            any::<String>().prop_map(String::into_bytes),
            (request_like(), vec((any::<Index>(), any::<u8>(), any::<u8>()), 1..4))
                .prop_map(|(json, edits)| mutated(json.text(), edits)),
        ],
    ) {
        check_parse(&body)?;
    }

    /// Arbitrary JSON values, and objects shaped like requests.
    #[test]
    fn parser_answers_arbitrary_json(
        json in prop_oneof![1 => json(), 4 => request_like()],
        leading in select(vec!["", " ", "\n\t "]),
    ) {
        check_parse(format!("{leading}{}", json.text()).as_bytes())?;
    }
}

/// Not a bug, but worth knowing: an id is echoed exactly as sent, so a
/// number that is valid JSON grammar but beyond an f64 (`1E400`) comes
/// back as is, and a strict parser (serde_json, Go) refuses the reply as it
/// would have refused the request. `encode_one` allows exactly this.
#[test]
fn out_of_range_number_ids_are_echoed_verbatim() {
    let Ok(Request::Ping { id }) = protocol::parse(br#"{"command":"ping","id":1E400}"#) else {
        panic!("a 1E400 id is accepted");
    };
    let reply = Reply::Rpc {
        id,
        result: Outcome::Ok,
    };
    let body = encode_one(&reply).unwrap();
    assert_eq!(body, br#"{"id":1E400,"result":{"status":"ok"}}"#);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
}

// ---------------------------------------------------------------------------
// c. The whole core
// ---------------------------------------------------------------------------

const CLIENTS: usize = 3;
const FIRST_TOKEN: u64 = 1_000_000;
const MAX_MESSAGE_BYTES: usize = 512;

#[derive(Clone, Debug)]
enum Piece {
    /// A framed, well-formed request.
    Request(String),
    /// A framed body of garbage.
    Garbage(Vec<u8>),
    /// Raw bytes, which may break the framing.
    Raw(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Step {
    Connect(usize),
    Disconnect(usize),
    /// Bytes arriving from a client (connected first if it is not), cut
    /// into frames as the server would.
    Send(usize, Vec<Piece>),
    /// The clock moves and expired waits are answered.
    Advance(u64),
    /// The clock moves to the next deadline the core asked to be woken for.
    WakeAtNextDeadline,
}

fn rpc_request() -> impl Strategy<Value = String> {
    let name = select(vec![r#""a""#, r#""b""#, r#""c""#, r#""5""#, "5"]);
    let id = select(vec![
        "0", "1", "2", r#""x""#, r#""y""#, "true", "1.5", "null",
    ]);
    let timeout = select(vec![
        "",
        r#","timeoutMs":null"#,
        r#","timeoutMs":0"#,
        r#","timeoutMs":1"#,
        r#","timeoutMs":5"#,
        r#","timeoutMs":20"#,
        r#","timeoutMs":100"#,
        r#","timeoutMs":18446744073709551615"#,
        r#","timeoutMs":-1"#,
    ]);
    let mode = select(vec![
        "",
        r#","mode":"exclusive""#,
        r#","mode":"shared""#,
        r#","mode":"shared""#,
        r#","mode":"read""#,
    ]);
    let status = select(vec![
        "{}",
        r#"{"lockName":"a"}"#,
        r#"{"prefix":""}"#,
        r#"{"prefix":"b"}"#,
        r#"{"limit":1}"#,
        r#"{"limit":0}"#,
    ]);
    (0..10u8, name, id, timeout, mode, status).prop_map(
        |(kind, name, id, timeout, mode, status)| match kind {
            0..=3 => format!(
                r#"{{"command":"lock","id":{id},"parameters":{{"lockName":{name}{timeout}{mode}}}}}"#
            ),
            4 | 5 => format!(
                r#"{{"command":"unlock","id":{id},"parameters":{{"lockName":{name}}}}}"#
            ),
            6 => format!(r#"{{"command":"unlock","lockName":{name}}}"#),
            7 => format!(r#"{{"command":"status","id":{id},"parameters":{status}}}"#),
            8 => format!(r#"{{"command":"hello","id":{id},"parameters":{{"client":"worker"}}}}"#),
            _ => format!(r#"{{"command":"{}","id":{id}}}"#, if mode.is_empty() { "ping" } else { "stats" }),
        },
    )
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        12 => rpc_request().prop_map(Piece::Request),
        2 => prop_oneof![
            vec(any::<u8>(), 0..40),
            (rpc_request(), any::<Index>()).prop_map(|(r, cut)| {
                let mut bytes = r.into_bytes();
                bytes.truncate(cut.index(bytes.len()));
                bytes
            }),
        ]
        .prop_map(Piece::Garbage),
        1 => prop_oneof![
            vec(any::<u8>(), 1..8),
            (MAX_MESSAGE_BYTES as u32 + 1..=u32::MAX).prop_map(|n| n.to_be_bytes().to_vec()),
        ]
        .prop_map(Piece::Raw),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..CLIENTS).prop_map(Step::Connect),
        1 => (0..CLIENTS).prop_map(Step::Disconnect),
        10 => (0..CLIENTS, vec(piece(), 1..4)).prop_map(|(c, p)| Step::Send(c, p)),
        3 => (0..40u64).prop_map(Step::Advance),
        1 => Just(Step::WakeAtNextDeadline),
    ]
}

/// Drives a `Core` the way `server.rs` does, checking after every step.
struct Harness {
    core: Core,
    now: Instant,
    /// Each client's connection and the bytes it sent not yet cut into frames.
    slots: [Option<(ClientId, Vec<u8>)>; CLIENTS],
    live: HashSet<ClientId>,
    /// Every token granted, and to whom.
    issued: HashMap<u64, ClientId>,
    highest: Option<u64>,
    out: Vec<Outgoing>,
    next_port: u16,
}

impl Harness {
    fn new(hold_ms: Option<u64>, limit: usize) -> Harness {
        let now = Instant::now();
        let keepalive = Keepalive {
            idle: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            probes: 5,
            user_timeout: Some(Duration::from_secs(10)),
        };
        let settings = Settings {
            max_locks_per_connection: limit,
            keepalive,
            // Small enough that `status` is sometimes cut.
            status_budget_bytes: 250,
        };
        let mut core = Core::new(settings, FIRST_TOKEN, now);
        if let Some(ms) = hold_ms {
            core.hold_grants_until(now + Duration::from_millis(ms));
        }
        Harness {
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

    fn connect(&mut self, slot: usize) -> ClientId {
        if let Some((client, _)) = &self.slots[slot] {
            return *client;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.next_port));
        self.next_port += 1;
        let client = self.core.connect(addr);
        assert!(self.live.insert(client), "client id {client} reused");
        self.slots[slot] = Some((client, Vec::new()));
        client
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
    fn send(&mut self, slot: usize, pieces: &[Piece]) -> Result<(), TestCaseError> {
        let client = self.connect(slot);
        let Some((_, input)) = self.slots[slot].as_mut() else {
            unreachable!("just connected");
        };
        for piece in pieces {
            match piece {
                Piece::Request(text) => frame::encode(text.as_bytes(), input).unwrap(),
                Piece::Garbage(bytes) => frame::encode(bytes, input).unwrap(),
                Piece::Raw(bytes) => input.extend_from_slice(bytes),
            }
        }
        let input = std::mem::take(input);
        let mut offset = 0;
        loop {
            match frame::decode(&input[offset..], MAX_MESSAGE_BYTES) {
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

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.core.expire(self.now, &mut self.out);
    }

    fn wake_at_next_deadline(&mut self) {
        if let Some(at) = self.core.next_deadline() {
            self.now = self.now.max(at);
        }
        self.core.expire(self.now, &mut self.out);
    }

    /// Every reply goes to a live connection and encodes as a JSON object;
    /// every grant's token is either the token that client already holds
    /// (asked again) or above every token granted before.
    fn check_replies(&mut self) -> Result<(), TestCaseError> {
        for Outgoing { to, reply } in self.out.drain(..) {
            prop_assert!(
                self.live.contains(&to),
                "reply to closed {}: {:?}",
                to,
                reply
            );
            let body = encode_one(&reply)?;
            // The ids the harness sends are all within what a strict parser reads.
            let json: Value = serde_json::from_slice(&body)
                .map_err(|e| TestCaseError::fail(format!("{reply:?}: {e}")))?;
            let Reply::Rpc {
                result: Outcome::Granted { token },
                ..
            } = reply
            else {
                continue;
            };
            let sent = json.get("result").and_then(|r| r.get("token"));
            prop_assert_eq!(sent.and_then(Value::as_u64), Some(token), "{:?}", json);
            prop_assert!(
                token < self.core.next_token(),
                "token {} not issued yet",
                token
            );
            match self.issued.get(&token) {
                Some(&holder) => {
                    prop_assert_eq!(holder, to, "token {} granted to two clients", token)
                }
                None => {
                    let floor = self.highest.map_or(FIRST_TOKEN, |h| h + 1);
                    prop_assert!(
                        token >= floor,
                        "token {} not above {:?}",
                        token,
                        self.highest
                    );
                    self.issued.insert(token, to);
                    self.highest = Some(token);
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match step {
            Step::Connect(slot) => {
                self.connect(*slot);
            }
            Step::Disconnect(slot) => self.disconnect(*slot),
            Step::Send(slot, pieces) => self.send(*slot, pieces)?,
            Step::Advance(ms) => self.advance(Duration::from_millis(*ms)),
            Step::WakeAtNextDeadline => self.wake_at_next_deadline(),
        }
        self.check_replies()?;
        if let Err(broken) = self.core.table().check_invariants() {
            return Err(TestCaseError::fail(broken));
        }
        Ok(())
    }
}

fn run_core(hold_ms: Option<u64>, limit: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    let mut harness = Harness::new(hold_ms, limit);
    for (i, step) in steps.iter().enumerate() {
        harness
            .step(step)
            .map_err(|e| TestCaseError::fail(format!("step {i} ({step:?}): {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn core_survives_random_frames_from_three_clients(
        hold_ms in prop_oneof![3 => Just(None), 1 => (0..60u64).prop_map(Some)],
        limit in 1..4usize,
        steps in vec(step(), 1..80),
    ) {
        run_core(hold_ms, limit, &steps)?;
    }
}

#[test]
fn core_hand_written_session() {
    let lock = |id: u32, name: &str, extra: &str| {
        Piece::Request(format!(
            r#"{{"command":"lock","id":{id},"parameters":{{"lockName":"{name}"{extra}}}}}"#
        ))
    };
    let steps = [
        Step::Send(0, vec![lock(1, "a", "")]),
        Step::Send(1, vec![lock(2, "a", r#","timeoutMs":20"#)]),
        Step::Send(2, vec![lock(3, "a", r#","mode":"shared""#)]),
        Step::Advance(20),
        Step::Disconnect(0),
        Step::Send(
            1,
            vec![Piece::Garbage(b"{".to_vec()), Piece::Raw(vec![0, 0, 4])],
        ),
        Step::Send(1, vec![Piece::Raw(vec![1])]),
        Step::WakeAtNextDeadline,
    ];
    run_core(None, 2, &steps).unwrap();
    run_core(Some(30), 2, &steps).unwrap();
}
