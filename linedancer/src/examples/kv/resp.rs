//! RESP2, the Redis protocol, as a codec: requests are arrays of bulk strings (or
//! inline commands, a line of words, as typed into netcat), replies are the five RESP2
//! types.
//!
//! Parsing is bounded: a bulk string over [`MAX_BULK`] bytes, an array of more than
//! [`MAX_ARGS`] elements or an inline command over [`MAX_INLINE`] bytes is a protocol
//! error, found from the header alone, before any of it is buffered. A protocol error is
//! decoded as a [`Request::Invalid`] for the protocol to answer (`-ERR Protocol
//! error: ...`, as Redis does) before it closes the connection.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The longest bulk string accepted, in bytes.
pub const MAX_BULK: usize = 1024 * 1024;

/// The most elements a request's array may have.
pub const MAX_ARGS: usize = 64 * 1024;

/// The longest inline command (or RESP header line) accepted, in bytes.
pub const MAX_INLINE: usize = 64 * 1024;

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A command: its name and arguments, binary-safe.
    Command(Vec<Bytes>),
    /// Bytes that are not RESP, with what is wrong with them; the connection cannot
    /// go on, as where the next request starts is not known.
    Invalid(&'static str),
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+text`: a status such as `OK` or `PONG`.
    Simple(&'static str),
    /// `-text`: an error, such as `ERR unknown command`.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$len` and the bytes.
    Bulk(Bytes),
    /// `$-1`: no value.
    Null,
    /// `*n` and the elements.
    Array(Vec<Reply>),
}

impl Reply {
    /// `-ERR text`.
    pub fn error(text: impl std::fmt::Display) -> Self {
        Reply::Error(format!("ERR {text}"))
    }
}

/// The RESP2 codec: [`Request`]s in, [`Reply`]s out.
#[derive(Debug, Clone, Default)]
pub struct Resp {
    /// A protocol error was decoded: nothing more is.
    failed: bool,
}

impl Decoder for Resp {
    type Item = Request;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Request>> {
        if self.failed || src.is_empty() {
            return Ok(None);
        }
        let parsed = if src[0] == b'*' {
            parse_array(src)
        } else {
            parse_inline(src)
        };
        match parsed {
            Ok(Some(request)) => Ok(Some(request)),
            Ok(None) => Ok(None),
            Err(why) => {
                self.failed = true;
                Ok(Some(Request::Invalid(why)))
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> io::Result<Option<Request>> {
        match self.decode(src)? {
            Some(request) => Ok(Some(request)),
            None if src.is_empty() || self.failed => Ok(None),
            None => {
                // The peer stopped in the middle of a request.
                self.failed = true;
                src.clear();
                Ok(Some(Request::Invalid("unexpected end of stream")))
            }
        }
    }
}

/// Parses `*n\r\n` and `n` bulk strings from the start of `src`, taking them out of it
/// when all have arrived.
fn parse_array(src: &mut BytesMut) -> Result<Option<Request>, &'static str> {
    let Some((count, mut at)) = header(src, 0)? else {
        return Ok(None);
    };
    if count > MAX_ARGS as i64 {
        return Err("invalid multibulk length");
    }
    // Zero or fewer elements is no command, as Redis has it.
    let count = usize::try_from(count).unwrap_or(0);
    let mut spans = Vec::with_capacity(count);
    for _ in 0..count {
        match src.get(at) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(_) => return Err("expected '$' before a bulk string"),
        }
        let Some((len, start)) = header(src, at)? else {
            return Ok(None);
        };
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= MAX_BULK)
            .ok_or("invalid bulk length")?;
        let end = start + len;
        if src.len() < end + 2 {
            return Ok(None);
        }
        if &src[end..end + 2] != b"\r\n" {
            return Err("a bulk string is longer than its length");
        }
        spans.push((start, end));
        at = end + 2;
    }
    let request = src.split_to(at).freeze();
    let args = spans
        .iter()
        .map(|&(start, end)| request.slice(start..end))
        .collect();
    Ok(Some(Request::Command(args)))
}

/// Reads the number in a header line (`*n\r\n` or `$n\r\n`) that starts at `at`:
/// the number and where the line's end leaves off, or `None` if the line is not whole.
fn header(src: &[u8], at: usize) -> Result<Option<(i64, usize)>, &'static str> {
    let line = &src[at + 1..];
    let Some(cr) = line.iter().take(24).position(|b| *b == b'\r') else {
        return if line.len() >= 24 {
            Err("invalid length in a header")
        } else {
            Ok(None)
        };
    };
    if line.len() < cr + 2 {
        return Ok(None);
    }
    if line[cr + 1] != b'\n' {
        return Err("expected '\\n' after '\\r'");
    }
    let number = std::str::from_utf8(&line[..cr])
        .ok()
        .and_then(|digits| digits.parse().ok())
        .ok_or(if src[at] == b'*' {
            "invalid multibulk length"
        } else {
            "invalid bulk length"
        })?;
    Ok(Some((number, at + 1 + cr + 2)))
}

/// Parses an inline command, a line of words (double quotes around a word with
/// spaces), from the start of `src`.
fn parse_inline(src: &mut BytesMut) -> Result<Option<Request>, &'static str> {
    let Some(newline) = src.iter().take(MAX_INLINE + 1).position(|b| *b == b'\n') else {
        return if src.len() > MAX_INLINE {
            Err("too big inline request")
        } else {
            Ok(None)
        };
    };
    let line = src.split_to(newline + 1);
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let args = split_words(line)?;
    Ok(Some(Request::Command(args)))
}

/// Splits an inline command into words: runs of non-blanks, or text in double quotes
/// with `\"`, `\\`, `\n`, `\r` and `\t` escapes.
fn split_words(line: &[u8]) -> Result<Vec<Bytes>, &'static str> {
    let mut words = Vec::new();
    let mut rest = line;
    loop {
        while let [b' ' | b'\t', tail @ ..] = rest {
            rest = tail;
        }
        let Some(&first) = rest.first() else {
            return Ok(words);
        };
        let mut word = Vec::new();
        if first == b'"' {
            rest = &rest[1..];
            loop {
                match rest {
                    [] => return Err("unbalanced quotes in request"),
                    [b'"', tail @ ..] => {
                        rest = tail;
                        break;
                    }
                    [b'\\', escaped, tail @ ..] => {
                        word.push(match escaped {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            other => *other,
                        });
                        rest = tail;
                    }
                    [byte, tail @ ..] => {
                        word.push(*byte);
                        rest = tail;
                    }
                }
            }
            if !matches!(rest, [] | [b' ' | b'\t', ..]) {
                return Err("unbalanced quotes in request");
            }
        } else {
            let end = rest
                .iter()
                .position(|b| matches!(b, b' ' | b'\t'))
                .unwrap_or(rest.len());
            word.extend_from_slice(&rest[..end]);
            rest = &rest[end..];
        }
        words.push(Bytes::from(word));
    }
}

impl Encoder<Reply> for Resp {
    type Error = io::Error;

    fn encode(&mut self, reply: Reply, dst: &mut BytesMut) -> io::Result<()> {
        encode(&reply, dst);
        Ok(())
    }
}

fn encode(reply: &Reply, dst: &mut BytesMut) {
    match reply {
        Reply::Simple(text) => {
            dst.reserve(text.len() + 3);
            dst.put_u8(b'+');
            dst.put_slice(text.as_bytes());
            dst.put_slice(b"\r\n");
        }
        Reply::Error(text) => {
            dst.reserve(text.len() + 3);
            dst.put_u8(b'-');
            // A line break would end the error early and start a reply of its own.
            for byte in text.bytes() {
                dst.put_u8(if matches!(byte, b'\r' | b'\n') {
                    b' '
                } else {
                    byte
                });
            }
            dst.put_slice(b"\r\n");
        }
        Reply::Integer(n) => number(b':', *n, dst),
        Reply::Bulk(bytes) => {
            dst.reserve(bytes.len() + 16);
            number(b'$', bytes.len() as i64, dst);
            dst.put_slice(bytes);
            dst.put_slice(b"\r\n");
        }
        Reply::Null => dst.put_slice(b"$-1\r\n"),
        Reply::Array(items) => {
            number(b'*', items.len() as i64, dst);
            for item in items {
                encode(item, dst);
            }
        }
    }
}

/// Writes `kind`, `n` in decimal, and `\r\n`.
fn number(kind: u8, n: i64, dst: &mut BytesMut) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    dst.reserve(24);
    dst.put_u8(kind);
    if n < 0 {
        dst.put_u8(b'-');
    }
    dst.put_slice(&digits[at..]);
    dst.put_slice(b"\r\n");
}

/// Parses a decimal integer as Redis does: optional `-`, digits, nothing else, within
/// `i64`.
pub(crate) fn parse_int(bytes: &[u8]) -> Option<i64> {
    if bytes.is_empty() || bytes.len() > 20 || bytes[0] == b'+' {
        return None;
    }
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

/// Formats `n` in decimal, as stored by `INCR`.
pub(crate) fn format_int(n: i64) -> Bytes {
    let mut out = BytesMut::with_capacity(24);
    number(b':', n, &mut out);
    out.advance(1);
    out.truncate(out.len() - 2);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> (Option<Request>, usize) {
        let mut buf = BytesMut::from(input);
        let request = Resp::default().decode(&mut buf).unwrap();
        (request, buf.len())
    }

    fn command(words: &[&[u8]]) -> Option<Request> {
        Some(Request::Command(
            words.iter().map(|w| Bytes::copy_from_slice(w)).collect(),
        ))
    }

    #[test]
    fn arrays_of_bulk_strings_are_binary_safe_and_wait_for_the_whole() {
        let full = b"*2\r\n$3\r\nGET\r\n$5\r\na\r\nb\0\r\n*1\r\n$4\r\nPING\r\n";
        assert_eq!(decode(full), (command(&[b"GET", b"a\r\nb\0"]), 14));
        for cut in 1..24 {
            assert_eq!(decode(&full[..cut]), (None, cut), "cut at {cut}");
        }
    }

    #[test]
    fn inline_commands_split_into_words() {
        assert_eq!(decode(b"set k  v\r\n"), (command(&[b"set", b"k", b"v"]), 0));
        assert_eq!(
            decode(b"echo \"a b\\n\" c\n"),
            (command(&[b"echo", b"a b\n", b"c"]), 0)
        );
        assert_eq!(decode(b"ping"), (None, 4));
        assert_eq!(decode(b"\r\n"), (command(&[]), 0));
    }

    #[test]
    fn malformed_requests_are_invalid_not_errors() {
        let invalid = |input: &[u8]| decode(input).0;
        let refused = |why| Some(Request::Invalid(why));
        assert_eq!(
            invalid(b"*99999999\r\n"),
            refused("invalid multibulk length")
        );
        assert_eq!(invalid(b"*x\r\n"), refused("invalid multibulk length"));
        assert_eq!(invalid(b"*1\r\n$-1\r\n"), refused("invalid bulk length"));
        assert_eq!(
            invalid(b"*1\r\n$99999999\r\n"),
            refused("invalid bulk length")
        );
        assert_eq!(
            invalid(b"*1\r\n$2\r\nabc\r\n"),
            refused("a bulk string is longer than its length")
        );
        assert_eq!(
            invalid(b"*1\r\n:1\r\n"),
            refused("expected '$' before a bulk string")
        );
        assert_eq!(
            invalid(b"echo \"a\n"),
            refused("unbalanced quotes in request")
        );
        assert_eq!(
            invalid(&vec![b'a'; MAX_INLINE + 1]),
            refused("too big inline request")
        );
        // Negative counts are no command, as in Redis.
        assert_eq!(decode(b"*-5\r\n"), (command(&[]), 0));
    }

    #[test]
    fn replies_encode_as_resp2() {
        let mut out = BytesMut::new();
        let mut codec = Resp::default();
        for reply in [
            Reply::Simple("OK"),
            Reply::error("bad\r\nthing"),
            Reply::Integer(-42),
            Reply::Integer(i64::MIN),
            Reply::Bulk(Bytes::from_static(b"a\r\nb")),
            Reply::Null,
            Reply::Array(vec![Reply::Null, Reply::Integer(0)]),
        ] {
            codec.encode(reply, &mut out).unwrap();
        }
        assert_eq!(
            &out[..],
            b"+OK\r\n-ERR bad  thing\r\n:-42\r\n:-9223372036854775808\r\n$4\r\na\r\nb\r\n\
              $-1\r\n*2\r\n$-1\r\n:0\r\n"
        );
        assert_eq!(format_int(-17), "-17");
        assert_eq!(parse_int(b"-17"), Some(-17));
        assert_eq!(parse_int(b"+1"), None);
        assert_eq!(parse_int(b"9223372036854775808"), None);
    }
}
