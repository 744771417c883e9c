//! Checks shared by the fuzz targets. Each panics on a broken promise,
//! which libFuzzer reports as a crash.

#![allow(dead_code)]

use std::collections::BTreeMap;

use pklock::frame::{self, PREFIX_LEN, TooLarge};
use pklock::protocol::{self, Outcome, Reply, Request, UnlockForm, UnlockResult};
use serde_json::Value;
use serde_json::value::RawValue;

/// What feeding a stream to the decoder gave: the bodies cut out, in order,
/// then either the bytes left waiting for more or the oversized prefix that
/// stopped it.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub bodies: Vec<Vec<u8>>,
    pub end: Result<Vec<u8>, TooLarge>,
}

/// Feeds `stream` to `frame::decode` as the server reads a socket: the
/// stream arrives in chunks ending at `cuts` (taken modulo its length);
/// each chunk is appended to the bytes not yet consumed, every whole frame
/// is cut out, the rest is kept.
pub fn decode_in_chunks(stream: &[u8], cuts: &[u16], max_body: usize) -> Decoded {
    let mut ends: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (stream.len() + 1))
        .collect();
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
/// returns the body. As in tests/fuzz_properties.rs: a strict JSON parser
/// must read it, unless it echoes an id that parser cannot read either
/// (`1E400`), in which case it must still be valid JSON grammar.
pub fn encode_one(reply: &Reply) -> Vec<u8> {
    let mut out = Vec::new();
    reply.encode(&mut out);
    let frame = match frame::decode(&out, usize::MAX) {
        Ok(Some(frame)) => frame,
        other => panic!("{reply:?} framed as {other:?}"),
    };
    assert_eq!(frame.consumed, out.len(), "{reply:?} is not one frame");
    let body = frame.body;
    let text = String::from_utf8_lossy(body);
    if let Err(e) = serde_json::from_slice::<BTreeMap<String, Box<RawValue>>>(body) {
        panic!("{reply:?} encoded as {text:?}: {e}");
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(value) => assert!(value.is_object(), "{reply:?} encoded as {text:?}"),
        Err(e) => {
            let excused =
                echoed(reply).is_some_and(|raw| serde_json::from_str::<Value>(raw).is_err());
            assert!(excused, "{reply:?} encoded as {text:?}: {e}");
        }
    }
    body.to_vec()
}

/// Parses `body`: a bad message gets a reply that encodes as a JSON object;
/// a good one has fields within their limits, and a reply echoing its id or
/// lock name encodes as a JSON object too.
pub fn check_parse(body: &[u8]) {
    let request = match protocol::parse(body) {
        Ok(request) => request,
        Err(bad) => {
            assert!(!bad.detail().is_empty(), "an error without a detail");
            encode_one(&bad.into_reply());
            return;
        }
    };
    let name_ok = |name: &str| (1..=protocol::MAX_LOCK_NAME_BYTES).contains(&name.len());
    let reply = match request {
        Request::Lock { id, lock, .. } => {
            assert!(name_ok(&lock), "lock name {lock:?}");
            Reply::Rpc {
                id,
                result: Outcome::Granted { token: 1 },
            }
        }
        Request::Unlock { form, lock } => {
            assert!(name_ok(&lock), "lock name {lock:?}");
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
            assert!(client.len() <= protocol::MAX_CLIENT_NAME_BYTES);
            Reply::Rpc {
                id,
                result: Outcome::Ok,
            }
        }
        Request::Status { id, limit, .. } => {
            assert!((1..=protocol::MAX_STATUS_LIMIT).contains(&limit));
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
    encode_one(&reply);
}
