//! The whole core (`commands::Core`), driven as `server.rs` drives it:
//! frames from three clients (requests from a small vocabulary, garbage
//! bodies, raw bytes that break the framing) with connects, disconnects and
//! clock advances in between. After every step the lock table's invariants
//! hold; every reply goes to a live connection and encodes as a JSON
//! object; grants carry strictly increasing tokens (or, asked again, the
//! token the client already holds).

#![no_main]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock::commands::{Core, Outgoing, Settings};
use pklock::frame;
use pklock::keepalive::Keepalive;
use pklock::lock_table::ClientId;
use pklock::protocol::{Outcome, Reply};
use serde_json::Value;

const CLIENTS: usize = 3;
const FIRST_TOKEN: u64 = 1_000_000;
const MAX_MESSAGE_BYTES: usize = 512;

const NAMES: [&str; 5] = [r#""a""#, r#""b""#, r#""c""#, r#""5""#, "5"];
const IDS: [&str; 8] = ["0", "1", "2", r#""x""#, r#""y""#, "true", "1.5", "null"];
const TIMEOUTS: [&str; 9] = [
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
const MODES: [&str; 4] = [
    "",
    r#","mode":"exclusive""#,
    r#","mode":"shared""#,
    r#","mode":"read""#,
];
const STATUS: [&str; 6] = [
    "{}",
    r#"{"lockName":"a"}"#,
    r#"{"prefix":""}"#,
    r#"{"prefix":"b"}"#,
    r#"{"limit":1}"#,
    r#"{"limit":0}"#,
];

fn pick<'a>(list: &[&'a str], i: u8) -> &'a str {
    list[usize::from(i) % list.len()]
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Lock {
        name: u8,
        id: u8,
        timeout: u8,
        mode: u8,
    },
    Unlock {
        name: u8,
        id: u8,
    },
    UnlockV1 {
        name: u8,
    },
    Status {
        id: u8,
        params: u8,
    },
    Hello {
        id: u8,
    },
    Ping {
        id: u8,
    },
    Stats {
        id: u8,
    },
    /// A framed body of garbage.
    Garbage(Vec<u8>),
    /// Raw bytes, which may break the framing.
    Raw(Vec<u8>),
}

impl Piece {
    fn append_to(&self, input: &mut Vec<u8>) {
        let text = match *self {
            Piece::Lock {
                name,
                id,
                timeout,
                mode,
            } => format!(
                r#"{{"command":"lock","id":{},"parameters":{{"lockName":{}{}{}}}}}"#,
                pick(&IDS, id),
                pick(&NAMES, name),
                pick(&TIMEOUTS, timeout),
                pick(&MODES, mode)
            ),
            Piece::Unlock { name, id } => format!(
                r#"{{"command":"unlock","id":{},"parameters":{{"lockName":{}}}}}"#,
                pick(&IDS, id),
                pick(&NAMES, name)
            ),
            Piece::UnlockV1 { name } => {
                format!(
                    r#"{{"command":"unlock","lockName":{}}}"#,
                    pick(&NAMES, name)
                )
            }
            Piece::Status { id, params } => format!(
                r#"{{"command":"status","id":{},"parameters":{}}}"#,
                pick(&IDS, id),
                pick(&STATUS, params)
            ),
            Piece::Hello { id } => format!(
                r#"{{"command":"hello","id":{},"parameters":{{"client":"worker"}}}}"#,
                pick(&IDS, id)
            ),
            Piece::Ping { id } => format!(r#"{{"command":"ping","id":{}}}"#, pick(&IDS, id)),
            Piece::Stats { id } => format!(r#"{{"command":"stats","id":{}}}"#, pick(&IDS, id)),
            Piece::Garbage(ref bytes) => return frame::encode(bytes, input).unwrap(),
            Piece::Raw(ref bytes) => return input.extend_from_slice(bytes),
        };
        frame::encode(text.as_bytes(), input).unwrap();
    }
}

#[derive(Arbitrary, Debug)]
enum Step {
    Connect(u8),
    Disconnect(u8),
    Send(u8, Vec<Piece>),
    Advance(u8),
    WakeAtNextDeadline,
}

#[derive(Arbitrary, Debug)]
struct Input {
    hold_ms: Option<u8>,
    limit: u8,
    steps: Vec<Step>,
}

struct Harness {
    core: Core,
    now: Instant,
    slots: [Option<(ClientId, Vec<u8>)>; CLIENTS],
    live: HashSet<ClientId>,
    issued: HashMap<u64, ClientId>,
    highest: Option<u64>,
    out: Vec<Outgoing>,
    next_port: u16,
}

impl Harness {
    fn new(hold_ms: Option<u8>, limit: usize) -> Harness {
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
            status_budget_bytes: 250,
        };
        let mut core = Core::new(settings, FIRST_TOKEN, now);
        if let Some(ms) = hold_ms {
            core.hold_grants_until(now + Duration::from_millis(u64::from(ms)));
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
        self.next_port = self.next_port.wrapping_add(1);
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

    fn send(&mut self, slot: usize, pieces: &[Piece]) {
        let client = self.connect(slot);
        let Some((_, input)) = self.slots[slot].as_mut() else {
            unreachable!("just connected");
        };
        for piece in pieces {
            piece.append_to(input);
        }
        let input = std::mem::take(input);
        let mut offset = 0;
        loop {
            match frame::decode(&input[offset..], MAX_MESSAGE_BYTES) {
                Ok(Some(frame)) => {
                    self.core
                        .handle(client, frame.body, self.now, &mut self.out);
                    offset += frame.consumed;
                    self.check_replies();
                }
                Ok(None) => break,
                Err(too_large) => {
                    self.core
                        .message_too_large(client, too_large, self.now, &mut self.out);
                    self.check_replies();
                    self.disconnect(slot);
                    return;
                }
            }
        }
        if let Some((_, kept)) = self.slots[slot].as_mut() {
            *kept = input[offset..].to_vec();
        }
    }

    fn check_replies(&mut self) {
        for Outgoing { to, reply } in self.out.drain(..) {
            assert!(self.live.contains(&to), "reply to closed {to}: {reply:?}");
            let body = common::encode_one(&reply);
            let json: Value = serde_json::from_slice(&body).expect("strict JSON");
            let Reply::Rpc {
                result: Outcome::Granted { token },
                ..
            } = reply
            else {
                continue;
            };
            let sent = json.get("result").and_then(|r| r.get("token"));
            assert_eq!(sent.and_then(Value::as_u64), Some(token), "{json:?}");
            assert!(
                token < self.core.next_token(),
                "token {token} not issued yet"
            );
            match self.issued.get(&token) {
                Some(&holder) => assert_eq!(holder, to, "token {token} granted to two clients"),
                None => {
                    let floor = self.highest.map_or(FIRST_TOKEN, |h| h + 1);
                    assert!(token >= floor, "token {token} not above {:?}", self.highest);
                    self.issued.insert(token, to);
                    self.highest = Some(token);
                }
            }
        }
    }

    fn step(&mut self, step: &Step) {
        match step {
            Step::Connect(slot) => {
                self.connect(usize::from(*slot) % CLIENTS);
            }
            Step::Disconnect(slot) => self.disconnect(usize::from(*slot) % CLIENTS),
            Step::Send(slot, pieces) => self.send(usize::from(*slot) % CLIENTS, pieces),
            Step::Advance(ms) => {
                self.now += Duration::from_millis(u64::from(*ms));
                self.core.expire(self.now, &mut self.out);
            }
            Step::WakeAtNextDeadline => {
                if let Some(at) = self.core.next_deadline() {
                    self.now = self.now.max(at);
                }
                self.core.expire(self.now, &mut self.out);
            }
        }
        self.check_replies();
        if let Err(broken) = self.core.table().check_invariants() {
            panic!("after {step:?}: {broken}");
        }
    }
}

fuzz_target!(|input: Input| {
    let mut harness = Harness::new(input.hold_ms, usize::from(input.limit % 3) + 1);
    for step in &input.steps {
        harness.step(step);
    }
});
