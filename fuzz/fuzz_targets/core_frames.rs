//! The whole core (`commands::Core`), driven as `server.rs` drives it:
//! frames from three clients (requests from a small vocabulary, garbage
//! bodies, raw bytes that break the framing) with connects, disconnects and
//! clock advances in between. After every step the lock table's invariants
//! hold; every reply goes to a live connection and encodes as a JSON
//! object; grants carry strictly increasing tokens (or, asked again, the
//! token the client already holds). The checks are
//! `pklock_testkit::harness::run_core`.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock_testkit::harness::{
    self, CORE_CLIENTS, IDS, LOCK_NAMES, MODES, Rpc, STATUS_PARAMETERS, TIMEOUTS,
};

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
    /// The piece as the harness sends it, requests picked from its
    /// vocabulary.
    fn to_harness(&self) -> harness::Piece {
        let id = |i| pick(&IDS, i);
        let name = |n| pick(&LOCK_NAMES, n);
        let rpc = match *self {
            Piece::Lock {
                name: n,
                id: i,
                timeout,
                mode,
            } => Rpc::Lock {
                id: id(i),
                name: name(n),
                timeout: pick(&TIMEOUTS, timeout),
                mode: pick(&MODES, mode),
            },
            Piece::Unlock { name: n, id: i } => Rpc::Unlock {
                id: id(i),
                name: name(n),
            },
            Piece::UnlockV1 { name: n } => Rpc::UnlockV1 { name: name(n) },
            Piece::Status { id: i, params } => Rpc::Status {
                id: id(i),
                parameters: pick(&STATUS_PARAMETERS, params),
            },
            Piece::Hello { id: i } => Rpc::Hello { id: id(i) },
            Piece::Ping { id: i } => Rpc::Ping { id: id(i) },
            Piece::Stats { id: i } => Rpc::Stats { id: id(i) },
            Piece::Garbage(ref bytes) => return harness::Piece::Garbage(bytes.clone()),
            Piece::Raw(ref bytes) => return harness::Piece::Raw(bytes.clone()),
        };
        harness::Piece::Request(rpc.text())
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

impl Step {
    /// The step as the harness takes it, on slots `0..CORE_CLIENTS`.
    fn to_harness(&self) -> harness::Step {
        let slot = |s: u8| usize::from(s) % CORE_CLIENTS;
        match self {
            Step::Connect(s) => harness::Step::Connect(slot(*s)),
            Step::Disconnect(s) => harness::Step::Disconnect(slot(*s)),
            Step::Send(s, pieces) => {
                harness::Step::Send(slot(*s), pieces.iter().map(Piece::to_harness).collect())
            }
            Step::Advance(ms) => harness::Step::Advance(u64::from(*ms)),
            Step::WakeAtNextDeadline => harness::Step::WakeAtNextDeadline,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    hold_ms: Option<u8>,
    limit: u8,
    steps: Vec<Step>,
}

fuzz_target!(|input: Input| {
    let steps: Vec<harness::Step> = input.steps.iter().map(Step::to_harness).collect();
    let hold_ms = input.hold_ms.map(u64::from);
    let limit = usize::from(input.limit % 3) + 1;
    harness::run_core(hold_ms, limit, &steps).unwrap_or_else(|broken| panic!("{broken}"));
});
