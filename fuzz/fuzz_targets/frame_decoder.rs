//! The frame decoder: bodies encoded back to back and fed in arbitrary
//! chunks come back exactly; arbitrary bytes decode as documented (an
//! oversized prefix is refused as soon as it is complete) and chunking never
//! changes what comes out. The checks are in `pklock_testkit::harness`.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock_testkit::harness;

#[derive(Arbitrary, Debug)]
struct Input {
    /// The limit for `raw`; `u16::MAX` stands for no limit.
    max_body: u16,
    /// Added to the longest body to give the limit for `bodies`.
    slack: u8,
    bodies: Vec<Vec<u8>>,
    cuts: Vec<u16>,
    raw: Vec<u8>,
}

/// Where a cut falls in a stream with `ends` possible chunk ends.
fn place(cut: &u16, ends: usize) -> usize {
    usize::from(*cut) % ends
}

fuzz_target!(|input: Input| {
    let Input {
        max_body,
        slack,
        bodies,
        cuts,
        raw,
    } = input;

    let slack = usize::from(slack % 4);
    harness::check_frames_come_back(&bodies, slack, &cuts, place)
        .unwrap_or_else(|broken| panic!("{broken}"));

    let max_body = if max_body == u16::MAX {
        usize::MAX
    } else {
        usize::from(max_body)
    };
    harness::check_decode_as_documented(&raw, max_body).unwrap_or_else(|broken| panic!("{broken}"));
    harness::check_chunking_changes_nothing(&raw, &cuts, place, max_body)
        .unwrap_or_else(|broken| panic!("{broken}"));
});
