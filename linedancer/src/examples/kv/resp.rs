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

use bytes::{BufMut, Bytes, BytesMut};
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
    /// A bulk string of the decimal digits of a number: a counter's value, read.
    BulkInt(i64),
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
    /// How far an array that has not all arrived was parsed: each read goes on from
    /// there, so that a request sent a byte at a time costs no more than one sent whole.
    partial: Option<Partial>,
}

/// An array request parsed in part.
#[derive(Debug, Clone, Default)]
struct Partial {
    /// The elements it has.
    count: usize,
    /// Where each element parsed so far lies in the buffer.
    spans: Vec<(usize, usize)>,
    /// Where the next element starts.
    at: usize,
}

impl Decoder for Resp {
    type Item = Request;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Request>> {
        if self.failed || src.is_empty() {
            return Ok(None);
        }
        let parsed = if src[0] == b'*' {
            parse_array(src, &mut self.partial)
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
fn parse_array(
    src: &mut BytesMut,
    partial: &mut Option<Partial>,
) -> Result<Option<Request>, &'static str> {
    let progress = match partial {
        Some(progress) => progress,
        None => {
            let Some((count, at)) = header(src, 0)? else {
                return Ok(None);
            };
            if count > MAX_ARGS as i64 {
                return Err("invalid multibulk length");
            }
            // Zero or fewer elements is no command, as Redis has it.
            let count = usize::try_from(count).unwrap_or(0);
            partial.insert(Partial {
                count,
                // Grown as elements arrive, not reserved from what the header claims.
                spans: Vec::with_capacity(count.min(16)),
                at,
            })
        }
    };
    while progress.spans.len() < progress.count {
        let at = progress.at;
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
        progress.spans.push((start, end));
        progress.at = end + 2;
    }
    let Some(Partial { spans, at, .. }) = partial.take() else {
        return Ok(None);
    };
    let request = src.split_to(at).freeze();
    let args = spans
        .iter()
        .map(|&(start, end)| request.slice(start..end))
        .collect();
    Ok(Some(Request::Command(args)))
}

/// Reads the number in a header line (`*n\r\n` or `$n\r\n`) that starts at `at`:
/// the number and where the line's end leaves off, or `None` if the line is not whole.
/// One pass over the digits; more than 18 of them is an invalid length (no limit here
/// comes near), so the value cannot overflow.
fn header(src: &[u8], at: usize) -> Result<Option<(i64, usize)>, &'static str> {
    let invalid = if src[at] == b'*' {
        "invalid multibulk length"
    } else {
        "invalid bulk length"
    };
    let mut i = at + 1;
    let negative = src.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let start = i;
    let mut value: i64 = 0;
    loop {
        match src.get(i) {
            None => return Ok(None),
            Some(b'\r') => break,
            Some(digit @ b'0'..=b'9') if i - start < 18 => {
                value = value * 10 + i64::from(digit - b'0');
                i += 1;
            }
            Some(_) => return Err(invalid),
        }
    }
    if i == start {
        return Err(invalid);
    }
    match src.get(i + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some((if negative { -value } else { value }, i + 2))),
        Some(_) => Err("expected '\\n' after '\\r'"),
    }
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
        Reply::BulkInt(n) => {
            let mut digits = [0u8; 20];
            let text = decimal(*n, &mut digits);
            number(b'$', text.len() as i64, dst);
            dst.put_slice(text);
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
    let text = decimal(n, &mut digits);
    dst.reserve(text.len() + 3);
    dst.put_u8(kind);
    dst.put_slice(text);
    dst.put_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buf`.
pub(crate) fn decimal(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut at = buf.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        at -= 1;
        buf[at] = b'-';
    }
    &buf[at..]
}

/// Parses a decimal integer as Redis does: an optional `-`, then digits and nothing
/// else, within `i64`.
pub(crate) fn parse_int(bytes: &[u8]) -> Option<i64> {
    let (negative, digits) = match bytes {
        [b'-', digits @ ..] => (true, digits),
        digits => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    // Accumulated as a negative number, which reaches i64::MIN.
    let mut value: i64 = 0;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?.checked_sub(i64::from(digit))?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
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
    fn a_request_sent_a_byte_at_a_time_is_parsed_where_it_left_off() {
        let full = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n*1\r\n$4\r\nPING\r\n";
        let mut codec = Resp::default();
        let mut buf = BytesMut::new();
        let mut requests = Vec::new();
        for byte in full {
            buf.extend_from_slice(&[*byte]);
            while let Some(request) = codec.decode(&mut buf).unwrap() {
                requests.push(request);
            }
            // Never more elements than have arrived.
            let parsed = codec.partial.as_ref().map_or(0, |p| p.spans.len());
            assert!(parsed <= 3);
        }
        assert_eq!(
            requests,
            vec![
                command(&[b"SET", b"k", b"value"]).unwrap(),
                command(&[b"PING"]).unwrap()
            ]
        );
        assert!(buf.is_empty());
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
        assert_eq!(parse_int(b"-17"), Some(-17));
        assert_eq!(parse_int(b"0"), Some(0));
        assert_eq!(parse_int(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int(b"9223372036854775807"), Some(i64::MAX));
        for bad in [
            &b"+1"[..],
            b"9223372036854775808",
            b"",
            b"-",
            b"1x",
            b" 1",
            b"1.5",
        ] {
            assert_eq!(parse_int(bad), None, "{bad:?}");
        }
        let mut out = BytesMut::new();
        codec.encode(Reply::BulkInt(-17), &mut out).unwrap();
        assert_eq!(&out[..], b"$3\r\n-17\r\n");
    }
}
