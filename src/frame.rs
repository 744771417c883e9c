//! Length-prefix framing: a 4-byte big-endian length, then that many bytes.
//! Cuts frames out of a byte buffer and appends frames to one; knows nothing
//! of JSON, sockets or mio (the blocking helpers take any `Read`/`Write`).

use std::fmt;
use std::io::{self, Read, Write};

/// Bytes in the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A complete frame found at the start of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The frame's body, without the prefix.
    pub body: &'a [u8],
    /// Bytes of the buffer the frame took, prefix included.
    pub consumed: usize,
}

/// A length prefix over the limit: the stream cannot be resynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The length the peer announced.
    pub announced: u32,
    /// The largest length accepted.
    pub limit: usize,
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frame of {} bytes announced, limit is {}",
            self.announced, self.limit
        )
    }
}

impl std::error::Error for TooLarge {}

/// Cuts the first frame out of `buf`.
///
/// `Ok(None)` means more bytes are needed. The announced length is checked
/// against `max_body` before anything is sized from it.
pub fn decode(buf: &[u8], max_body: usize) -> Result<Option<Frame<'_>>, TooLarge> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(None);
    };
    let announced = u32::from_be_bytes(*prefix);
    let len = announced as usize;
    if len > max_body {
        return Err(TooLarge {
            announced,
            limit: max_body,
        });
    }
    let end = PREFIX_LEN + len;
    Ok(buf.get(PREFIX_LEN..end).map(|body| Frame {
        body,
        consumed: end,
    }))
}

/// Appends one frame holding `body` to `out`.
///
/// Fails, leaving `out` as it was, when the body does not fit in the prefix.
pub fn encode(body: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| too_long(body.len()))?;
    out.reserve(PREFIX_LEN + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Appends a frame whose body `write_body` writes straight into `out`,
/// so that no intermediate buffer is needed.
pub fn encode_with<E>(
    out: &mut Vec<u8>,
    write_body: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), FrameWriteError<E>> {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX_LEN]);
    if let Err(e) = write_body(out) {
        out.truncate(start);
        return Err(FrameWriteError::Body(e));
    }
    let body_len = out.len() - start - PREFIX_LEN;
    let Ok(len) = u32::try_from(body_len) else {
        out.truncate(start);
        return Err(FrameWriteError::TooLong(body_len));
    };
    out[start..start + PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Why [`encode_with`] wrote nothing.
#[derive(Debug)]
pub enum FrameWriteError<E> {
    /// The body writer failed.
    Body(E),
    /// The body does not fit in a 4-byte length.
    TooLong(usize),
}

/// Reads one whole frame from a blocking reader; its body must not exceed `max_body`.
pub fn read_blocking(reader: &mut impl Read, max_body: usize) -> io::Result<Vec<u8>> {
    let mut prefix = [0u8; PREFIX_LEN];
    reader.read_exact(&mut prefix)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max_body {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer announced a {len}-byte frame, limit is {max_body}"),
        ));
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// Writes one frame holding `body` to a blocking writer.
pub fn write_blocking(writer: &mut impl Write, body: &[u8]) -> io::Result<()> {
    let mut framed = Vec::with_capacity(PREFIX_LEN + body.len());
    encode(body, &mut framed)?;
    writer.write_all(&framed)
}

fn too_long(len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("a {len}-byte body does not fit in a frame"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(body, &mut out).unwrap();
        out
    }

    #[test]
    fn incomplete_prefix_and_body_ask_for_more() {
        let bytes = framed(b"{\"a\":1}");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut], 100), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn whole_frame_is_cut_and_the_rest_left() {
        let mut bytes = framed(b"one");
        bytes.extend(framed(b"two"));
        let first = decode(&bytes, 100).unwrap().unwrap();
        assert_eq!(first.body, b"one");
        assert_eq!(first.consumed, 7);
        let second = decode(&bytes[first.consumed..], 100).unwrap().unwrap();
        assert_eq!(second.body, b"two");
    }

    #[test]
    fn prefix_is_big_endian() {
        assert_eq!(framed(b"abc")[..4], [0, 0, 0, 3]);
        let mut bytes = vec![0, 0, 1, 0];
        bytes.extend(vec![b'x'; 256]);
        assert_eq!(decode(&bytes, 1000).unwrap().unwrap().body.len(), 256);
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let err = decode(&[0xff, 0xff, 0xff, 0xff], 65536).unwrap_err();
        assert_eq!(
            err,
            TooLarge {
                announced: u32::MAX,
                limit: 65536
            }
        );
        assert!(decode(&[0, 0, 0, 11], 10).is_err());
        assert_eq!(decode(&[0, 0, 0, 10], 10), Ok(None));
    }

    #[test]
    fn empty_body_is_a_frame() {
        let frame = decode(&[0, 0, 0, 0], 10).unwrap().unwrap();
        assert_eq!(frame.body, b"");
        assert_eq!(frame.consumed, 4);
    }

    #[test]
    fn encode_with_patches_the_length_and_undoes_a_failed_body() {
        let mut out = b"keep".to_vec();
        encode_with(&mut out, |buf| {
            buf.extend_from_slice(b"hello");
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(out, b"keep\x00\x00\x00\x05hello");
        let failed = encode_with(&mut out, |buf| {
            buf.extend_from_slice(b"partial");
            Err("no")
        });
        assert!(matches!(failed, Err(FrameWriteError::Body("no"))));
        assert_eq!(out, b"keep\x00\x00\x00\x05hello");
    }

    #[test]
    fn blocking_round_trip_and_limit() {
        let bytes = framed(b"payload");
        assert_eq!(
            read_blocking(&mut &bytes[..], 100).unwrap(),
            b"payload".to_vec()
        );
        let err = read_blocking(&mut &bytes[..], 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut written = Vec::new();
        write_blocking(&mut written, b"payload").unwrap();
        assert_eq!(written, bytes);
    }
}
