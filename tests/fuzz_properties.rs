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
//!
//! The checks themselves are in `pklock_testkit::harness`, shared with the
//! fuzz targets; this file generates the cases.

use pklock::frame::{self, TooLarge};
use pklock::protocol::{self, Outcome, Reply, Request};
use pklock_testkit::harness::{
    self, CORE_CLIENTS, CORE_MAX_MESSAGE_BYTES, Decoded, IDS, LOCK_NAMES, MODES, Piece, Rpc,
    STATUS_PARAMETERS, Step, TIMEOUTS, decode_in_chunks, encode_all, encode_one,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::RngSeed;
use serde_json::Value;

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

/// A broken promise reported by `pklock_testkit::harness`, as a failed case.
fn case(checked: Result<(), String>) -> Result<(), TestCaseError> {
    checked.map_err(TestCaseError::fail)
}

// ---------------------------------------------------------------------------
// a. The frame decoder
// ---------------------------------------------------------------------------

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
        case(harness::check_frames_come_back(&bodies, slack, &cuts, Index::index))?;
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
        case(harness::check_decode_as_documented(&bytes, max_body))?;
        let mut stream = bytes.clone();
        stream.extend(more.concat());
        case(harness::check_chunking_changes_nothing(&stream, &cuts, Index::index, max_body))?;
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
        let decoded = decode_in_chunks(&stream, &cuts, Index::index, max_body)
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded, Decoded { bodies: before, end: Err(refused) });
    }
}

// ---------------------------------------------------------------------------
// b. The request parser
// ---------------------------------------------------------------------------

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
        case(harness::check_parse(&body))?;
    }

    /// Arbitrary JSON values, and objects shaped like requests.
    #[test]
    fn parser_answers_arbitrary_json(
        json in prop_oneof![1 => json(), 4 => request_like()],
        leading in select(vec!["", " ", "\n\t "]),
    ) {
        case(harness::check_parse(format!("{leading}{}", json.text()).as_bytes()))?;
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

fn rpc_request() -> impl Strategy<Value = String> {
    let name = select(LOCK_NAMES.to_vec());
    let id = select(IDS.to_vec());
    let timeout = select(TIMEOUTS.to_vec());
    // Shared twice as often as the other modes.
    let mode = select(vec![MODES[0], MODES[1], MODES[2], MODES[2], MODES[3]]);
    let status = select(STATUS_PARAMETERS.to_vec());
    (0..10u8, name, id, timeout, mode, status).prop_map(
        |(kind, name, id, timeout, mode, parameters)| {
            match kind {
                0..=3 => Rpc::Lock {
                    id,
                    name,
                    timeout,
                    mode,
                },
                4 | 5 => Rpc::Unlock { id, name },
                6 => Rpc::UnlockV1 { name },
                7 => Rpc::Status { id, parameters },
                8 => Rpc::Hello { id },
                _ if mode.is_empty() => Rpc::Ping { id },
                _ => Rpc::Stats { id },
            }
            .text()
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
            (CORE_MAX_MESSAGE_BYTES as u32 + 1..=u32::MAX).prop_map(|n| n.to_be_bytes().to_vec()),
        ]
        .prop_map(Piece::Raw),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => (0..CORE_CLIENTS).prop_map(Step::Connect),
        1 => (0..CORE_CLIENTS).prop_map(Step::Disconnect),
        10 => (0..CORE_CLIENTS, vec(piece(), 1..4)).prop_map(|(c, p)| Step::Send(c, p)),
        3 => (0..40u64).prop_map(Step::Advance),
        1 => Just(Step::WakeAtNextDeadline),
    ]
}

fn run_core(hold_ms: Option<u64>, limit: usize, steps: &[Step]) -> Result<(), TestCaseError> {
    case(harness::run_core(hold_ms, limit, steps))
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
