//! The bytes that travel between nodes: the messages a protocol sends across the
//! cluster ([`ClusterMessage`]), and the cluster's own, written with `bytes` and read
//! back without trusting a byte of them.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A protocol's message that can cross to another node: written to bytes by the node
/// that sends it, read back by the one whose member receives it. What
/// [`Builder::cluster`](crate::Builder::cluster) asks of a protocol's
/// [`Message`](crate::Protocol::Message).
///
/// ```
/// use bytes::{Bytes, BytesMut, BufMut};
/// use linedancer::cluster::ClusterMessage;
///
/// #[derive(Clone, Debug, PartialEq)]
/// struct Said(String);
///
/// impl ClusterMessage for Said {
///     fn encode(&self, out: &mut BytesMut) {
///         out.put_slice(self.0.as_bytes());
///     }
///
///     fn decode(bytes: Bytes) -> Option<Self> {
///         String::from_utf8(bytes.to_vec()).ok().map(Said)
///     }
/// }
///
/// let mut out = BytesMut::new();
/// Said("hi".into()).encode(&mut out);
/// assert_eq!(Said::decode(out.freeze()), Some(Said("hi".into())));
/// ```
pub trait ClusterMessage: Clone + Send + 'static {
    /// Appends the message to `out`.
    fn encode(&self, out: &mut BytesMut);

    /// Reads a message written by [`encode`](ClusterMessage::encode), on another node;
    /// `None` for bytes that are not one (they are dropped and counted).
    fn decode(bytes: Bytes) -> Option<Self>;

    /// What this node's members of `group` are sent, once, when members of another
    /// node went with it (it stopped answering, left, or came back as a new run)
    /// without leaving first: `labels` are what they joined as
    /// ([`Ctx::join_as`](crate::Ctx::join_as)), in the order of their connection ids.
    /// One message for them all, so that a node lost with thousands of members costs
    /// each member here one message; the chat's "* ann, bob left (their server went
    /// away)". `None`, the default: nothing is sent.
    fn members_lost(group: &str, labels: &[Arc<str>]) -> Option<Self> {
        let _ = (group, labels);
        None
    }
}

impl ClusterMessage for () {
    fn encode(&self, _: &mut BytesMut) {}

    fn decode(bytes: Bytes) -> Option<Self> {
        bytes.is_empty().then_some(())
    }
}

impl ClusterMessage for Bytes {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self);
    }

    fn decode(bytes: Bytes) -> Option<Self> {
        Some(bytes)
    }
}

impl ClusterMessage for String {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.as_bytes());
    }

    fn decode(bytes: Bytes) -> Option<Self> {
        String::from_utf8(bytes.into()).ok()
    }
}

impl ClusterMessage for Arc<str> {
    fn encode(&self, out: &mut BytesMut) {
        out.put_slice(self.as_bytes());
    }

    fn decode(bytes: Bytes) -> Option<Self> {
        std::str::from_utf8(&bytes).ok().map(Arc::from)
    }
}

/// Writes a string of up to 64 KiB with its length first.
pub(crate) fn put_str(out: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

/// Reads the cluster's own messages: every read is checked, and the first short or
/// malformed field ends the message as `None`.
pub(crate) struct Reader(pub(crate) Bytes);

impl Reader {
    pub(crate) fn u8(&mut self) -> Option<u8> {
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        (self.0.remaining() >= 2).then(|| self.0.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        (self.0.remaining() >= 4).then(|| self.0.get_u32())
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64())
    }

    pub(crate) fn str(&mut self) -> Option<Arc<str>> {
        let len = usize::from(self.u16()?);
        if self.0.remaining() < len {
            return None;
        }
        let bytes = self.0.split_to(len);
        std::str::from_utf8(&bytes).ok().map(Arc::from)
    }

    /// What is left: a protocol message's bytes.
    pub(crate) fn rest(self) -> Bytes {
        self.0
    }
}

/// A group's name as one token of a bus subject: ASCII letters, digits, `-` and `_`
/// as they are, any other byte as `~` and two hex digits (so that `.`, `*`, `>` and
/// spaces, which mean something in a subject, cannot reach it, and two names never
/// share a subject). The empty name is `~`.
pub(crate) fn subject_token(name: &str) -> String {
    if name.is_empty() {
        return "~".to_owned();
    }
    let mut token = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            token.push(char::from(byte));
        } else {
            token.push_str(&format!("~{byte:02x}"));
        }
    }
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_safe_and_distinct() {
        assert_eq!(subject_token("lobby"), "lobby");
        assert_eq!(subject_token("a.b c*>"), "a~2eb~20c~2a~3e");
        assert_eq!(subject_token("~2e"), "~7e2e");
        assert_ne!(subject_token("a.b"), subject_token("a~2eb"));
        assert_eq!(subject_token(""), "~");
    }

    #[test]
    fn short_fields_are_refused() {
        let mut out = BytesMut::new();
        put_str(&mut out, "room");
        let mut whole = Reader(out.clone().freeze());
        assert_eq!(whole.str().as_deref(), Some("room"));
        let mut cut = Reader(out.freeze().slice(..4));
        assert_eq!(cut.str(), None);
        assert_eq!(Reader(Bytes::from_static(&[1])).u16(), None);
    }
}
