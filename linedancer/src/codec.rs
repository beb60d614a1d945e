//! Framing: how a connection's bytes become frames and replies become bytes.
//!
//! These are [`tokio_util::codec`] codecs, re-exported so that a protocol can name them
//! without depending on tokio-util itself. Any type implementing [`Decoder`] and
//! [`Encoder`] works as a [`Protocol::Codec`](crate::Protocol::Codec), including your
//! own. Every codec used on the network should bound its frames: an unbounded line is a
//! memory-exhaustion attack, which is why [`Lines`] exists beside [`LinesCodec`].

use bytes::BytesMut;

pub use tokio_util::codec::{
    length_delimited, BytesCodec, Decoder, Encoder, LengthDelimitedCodec, LinesCodec,
    LinesCodecError,
};

/// Raw bytes: each frame is whatever arrived in one read, and replies are written as
/// they are. Replies are [`Bytes`](bytes::Bytes) or [`BytesMut`].
pub type Raw = BytesCodec;

/// Length-prefixed frames: a 4-byte big-endian length, then that many bytes. Frames over
/// 8 MiB are refused by default; see [`LengthDelimitedCodec::builder`] for other
/// header layouts and limits.
///
/// A protocol with this codec gets each frame as a [`BytesMut`] (the payload, without
/// its length) and sends [`Bytes`](bytes::Bytes) replies, to which the length is
/// prefixed:
///
/// ```
/// use bytes::{Bytes, BytesMut};
/// use linedancer::codec::LengthPrefixed;
/// use linedancer::{Ctx, Next, Protocol};
///
/// /// Answers every frame with its payload reversed.
/// struct Reverse;
///
/// impl Protocol for Reverse {
///     type Codec = LengthPrefixed;
///     type Reply = Bytes;
///     type Message = ();
///
///     fn connect(_ctx: &mut Ctx<'_, Self>) -> Self {
///         Reverse
///     }
///
///     fn frame(&mut self, frame: BytesMut, ctx: &mut Ctx<'_, Self>) -> Next {
///         let mut payload = frame.to_vec();
///         payload.reverse();
///         ctx.send(Bytes::from(payload));
///         Next::Continue
///     }
/// }
///
/// let mut conn = linedancer::testing::Harness::<Reverse>::connect();
/// conn.feed(b"\0\0\0\x03abc");
/// assert_eq!(&conn.take_output()[..], b"\0\0\0\x03cba");
/// ```
pub type LengthPrefixed = LengthDelimitedCodec;

/// The default maximum length of a line, in bytes, without its line ending.
pub const DEFAULT_MAX_LINE_LENGTH: usize = 64 * 1024;

/// Lines of UTF-8 text, bounded in length: the framing of chat and telnet-style
/// protocols.
///
/// A frame is one line without its ending; `\n` and `\r\n` are both accepted. Replies are
/// anything that is `AsRef<str>` and get a `\n` appended. A line longer than the maximum
/// (default [`DEFAULT_MAX_LINE_LENGTH`]; a `\r` before the `\n` counts) or one that is not UTF-8 is an error, which
/// closes the connection with [`CloseReason::BadFrame`](crate::CloseReason::BadFrame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines(LinesCodec);

impl Lines {
    /// Lines of at most [`DEFAULT_MAX_LINE_LENGTH`] bytes.
    pub fn new() -> Self {
        Self::with_max_length(DEFAULT_MAX_LINE_LENGTH)
    }

    /// Lines of at most `max_length` bytes.
    pub fn with_max_length(max_length: usize) -> Self {
        Lines(LinesCodec::new_with_max_length(max_length))
    }

    /// The maximum length of a line.
    pub fn max_length(&self) -> usize {
        self.0.max_length()
    }
}

impl Default for Lines {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for Lines {
    type Item = String;
    type Error = LinesCodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<String>, LinesCodecError> {
        self.0.decode(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<String>, LinesCodecError> {
        self.0.decode_eof(src)
    }
}

impl<T: AsRef<str>> Encoder<T> for Lines {
    type Error = LinesCodecError;

    fn encode(&mut self, line: T, dst: &mut BytesMut) -> Result<(), LinesCodecError> {
        self.0.encode(line, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_accept_crlf_and_refuse_overlong_lines() {
        let mut lines = Lines::with_max_length(9);
        let mut input = BytesMut::from("login:42\r\nthis is too long\n");
        assert_eq!(
            lines.decode(&mut input).unwrap().as_deref(),
            Some("login:42")
        );
        assert!(matches!(
            lines.decode(&mut input),
            Err(LinesCodecError::MaxLineLengthExceeded)
        ));
    }
}
