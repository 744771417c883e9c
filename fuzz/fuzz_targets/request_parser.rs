//! The request parser: any bytes parse without a panic; every bad message
//! gets a reply that encodes into one frame holding a JSON object; a good
//! message has its fields within their limits and its id echoes as JSON.
//! The checks are `pklock_testkit::harness::check_parse`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    pklock_testkit::harness::check_parse(body).unwrap_or_else(|broken| panic!("{broken}"))
});
