//! The frame decoder: bodies encoded back to back and fed in arbitrary
//! chunks come back exactly; arbitrary bytes decode as documented (an
//! oversized prefix is refused as soon as it is complete) and chunking never
//! changes what comes out.

#![no_main]

mod common;

use common::{Decoded, decode_in_chunks, decode_spec};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use pklock::frame;

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

fuzz_target!(|input: Input| {
    let Input {
        max_body,
        slack,
        bodies,
        cuts,
        raw,
    } = input;

    let limit = bodies.iter().map(Vec::len).max().unwrap_or(0) + usize::from(slack % 4);
    let mut stream = Vec::new();
    for body in &bodies {
        frame::encode(body, &mut stream).unwrap();
    }
    assert_eq!(
        decode_in_chunks(&stream, &cuts, limit),
        Decoded {
            bodies,
            end: Ok(Vec::new())
        }
    );

    let max_body = if max_body == u16::MAX {
        usize::MAX
    } else {
        usize::from(max_body)
    };
    let got = frame::decode(&raw, max_body).map(|f| f.map(|f| (f.body, f.consumed)));
    assert_eq!(got, decode_spec(&raw, max_body));
    assert_eq!(
        decode_in_chunks(&raw, &cuts, max_body),
        decode_in_chunks(&raw, &[], max_body)
    );
});
