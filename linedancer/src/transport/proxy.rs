//! The PROXY protocol, v1 (text) and v2 (binary): a load balancer in front of the server
//! starts each connection with a header that names the client, and the server takes the
//! client's address from it.
//!
//! The header is parsed by `ppp`, inside our own limits: the version is told by its
//! signature alone, a v1 header longer than the spec's 107 bytes or a v2 header longer
//! than [`MAX_V2_HEADER`] is refused as soon as it is seen to be, and the reader takes
//! from the socket only the header's own bytes (it peeks, then reads what belongs to
//! the header), so whatever the peer sent after it is left for the protocol.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;

use crate::close::ProxyError;
use crate::error::Error;
use crate::transport::{Address, Peek};

/// The v2 signature, its first 12 bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 signature.
const V1_SIGNATURE: &[u8; 6] = b"PROXY ";
/// The longest v1 header the protocol allows, CRLF included.
pub const MAX_V1_HEADER: usize = 107;
/// The longest v2 header accepted, TLVs included: far more than the 232 bytes of the
/// largest address block, and than what HAProxy sends with its SSL and unique-id TLVs.
pub const MAX_V2_HEADER: usize = 4096;

/// The default time a PROXY header may take to arrive in full.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

/// The PROXY protocol settings of a server ([`Builder::proxy_protocol`]): every
/// connection must start with a v1 or v2 header, from one of the trusted peers.
///
/// ```
/// use linedancer::ProxyProtocol;
///
/// // Only the load balancers at 10.0.0.0/24 and ::1 may connect.
/// let proxy = ProxyProtocol::new().trust("10.0.0.0/24").trust("::1");
/// ```
///
/// [`Builder::proxy_protocol`]: crate::Builder::proxy_protocol
#[derive(Debug, Clone, Default)]
pub struct ProxyProtocol {
    trusted: Vec<String>,
}

impl ProxyProtocol {
    /// Every peer must send a header; none is refused for its address.
    pub fn new() -> Self {
        ProxyProtocol::default()
    }

    /// Allows the peers in `network` (`10.0.0.0/8`, `2001:db8::/32`, or one address)
    /// to connect; once any network is given, a connection from anywhere else is
    /// closed at once, before it can send anything, with the reason logged
    /// ([`ProxyError::Untrusted`]). Checked when the server starts: a value that is not
    /// an address or a network fails it with [`Error::Config`].
    pub fn trust(mut self, network: impl Into<String>) -> Self {
        self.trusted.push(network.into());
        self
    }

    /// The trusted networks, parsed.
    pub(crate) fn networks(&self) -> Result<Vec<IpNet>, Error> {
        self.trusted
            .iter()
            .map(|text| {
                let text = text.trim();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| Error::Config {
                        setting: "proxy_protocol trust",
                        value: text.to_owned(),
                        reason: "not an IP address or network (such as 10.0.0.0/8)",
                    })
            })
            .collect()
    }
}

/// Whether `peer` may send a header: any peer when no network is trusted.
pub(crate) fn trusts(networks: &[IpNet], peer: &SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    networks.is_empty() || networks.iter().any(|net| net.contains(&ip))
}

/// A PROXY protocol header, as the load balancer sent it: where the client is, and
/// for v2 its type-length-value fields (the TLS details, the authority).
///
/// ```
/// use linedancer::{Address, ProxyHeader};
///
/// let (header, len) = ProxyHeader::parse(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\nhello")
///     .unwrap()
///     .expect("complete");
/// assert_eq!(len, 42); // "hello" is the protocol's
/// assert_eq!(header.version(), 1);
/// assert_eq!(header.source().to_string(), "192.0.2.7:51000");
///
/// // Not yet complete: more bytes are needed.
/// assert_eq!(ProxyHeader::parse(b"PROXY TCP4 192.0.2.7").unwrap(), None);
/// // Not a PROXY header at all.
/// assert!(ProxyHeader::parse(b"GET / HTTP/1.1\r\n").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    version: u8,
    local: bool,
    source: Address,
    destination: Address,
    tlvs: Vec<(u8, Box<[u8]>)>,
}

/// The v2 TLV types of HAProxy's specification that [`ProxyHeader`] reads for you.
mod tlv {
    pub(super) const ALPN: u8 = 0x01;
    pub(super) const AUTHORITY: u8 = 0x02;
    pub(super) const SSL: u8 = 0x20;
    pub(super) const SSL_VERSION: u8 = 0x21;
    pub(super) const SSL_CN: u8 = 0x22;
    pub(super) const SSL_CIPHER: u8 = 0x23;
}

impl ProxyHeader {
    /// Parses the header at the start of `bytes`: `Ok(Some((header, length)))` once it
    /// is complete (the bytes past `length` are not the header's), `Ok(None)` while it
    /// may still become one, and an error as soon as it cannot: no signature, too
    /// long, or malformed. The version is told by the signature only.
    ///
    /// # Errors
    ///
    /// [`ProxyError::BadSignature`], [`ProxyError::TooLong`] or
    /// [`ProxyError::Malformed`].
    pub fn parse(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
        if bytes.starts_with(V2_SIGNATURE) {
            parse_v2(bytes)
        } else if bytes.starts_with(V1_SIGNATURE) {
            parse_v1(bytes)
        } else if V2_SIGNATURE.starts_with(bytes) || V1_SIGNATURE.starts_with(bytes) {
            Ok(None)
        } else {
            Err(ProxyError::BadSignature)
        }
    }

    /// 1 or 2.
    pub fn version(&self) -> u8 {
        self.version
    }

    /// Whether this is a `LOCAL` header (v2), sent by the load balancer for its own
    /// health checks: the connection keeps its real peer address.
    pub fn is_local(&self) -> bool {
        self.local
    }

    /// The client's address, [`Address::None`] when the header gives none (`LOCAL`,
    /// `UNKNOWN`, an unspecified family).
    pub fn source(&self) -> &Address {
        &self.source
    }

    /// The address the client connected to, at the load balancer; [`Address::None`]
    /// when the header gives none.
    pub fn destination(&self) -> &Address {
        &self.destination
    }

    /// The value of the first v2 TLV of type `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        (self.tlvs.iter())
            .find(|(k, _)| *k == kind)
            .map(|(_, value)| &value[..])
    }

    /// Every v2 TLV, type and value, in the order sent.
    pub fn tlvs(&self) -> impl Iterator<Item = (u8, &[u8])> {
        self.tlvs.iter().map(|(kind, value)| (*kind, &value[..]))
    }

    /// The ALPN protocol the client negotiated with the load balancer (`PP2_TYPE_ALPN`).
    pub fn alpn(&self) -> Option<&[u8]> {
        self.tlv(tlv::ALPN)
    }

    /// The host name the client asked for (`PP2_TYPE_AUTHORITY`, the TLS SNI).
    pub fn authority(&self) -> Option<&str> {
        self.tlv(tlv::AUTHORITY)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// How the client connected to the load balancer, if over TLS (`PP2_TYPE_SSL`).
    pub fn ssl(&self) -> Option<ProxySsl<'_>> {
        let value = self.tlv(tlv::SSL)?;
        let (&client, rest) = value.split_first()?;
        let verify = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let mut ssl = ProxySsl {
            client,
            verified: verify == 0,
            version: None,
            common_name: None,
            cipher: None,
        };
        let mut sub = &rest[4..];
        while let [kind, high, low, tail @ ..] = sub {
            let len = usize::from(u16::from_be_bytes([*high, *low]));
            let Some(value) = tail.get(..len) else { break };
            let text = std::str::from_utf8(value).ok();
            match *kind {
                tlv::SSL_VERSION => ssl.version = text,
                tlv::SSL_CN => ssl.common_name = text,
                tlv::SSL_CIPHER => ssl.cipher = text,
                _ => {}
            }
            sub = &tail[len..];
        }
        Some(ssl)
    }
}

/// The client's TLS connection to the load balancer, from a v2 header's
/// `PP2_TYPE_SSL` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxySsl<'a> {
    /// The `PP2_CLIENT_*` bits: 0x01 SSL, 0x02 a client certificate was sent on this
    /// connection, 0x04 on this TLS session.
    pub client: u8,
    /// Whether the client's certificate, if any, was verified.
    pub verified: bool,
    /// The TLS version, such as `TLSv1.3`.
    pub version: Option<&'a str>,
    /// The common name of the client certificate's subject.
    pub common_name: Option<&'a str>,
    /// The cipher, such as `ECDHE-RSA-AES128-GCM-SHA256`.
    pub cipher: Option<&'a str>,
}

fn malformed(version: u8, reason: impl ToString) -> ProxyError {
    ProxyError::Malformed {
        version,
        reason: reason.to_string(),
    }
}

/// What may follow `PROXY ` in a v1 header.
const V1_PROTOCOLS: [&[u8]; 4] = [b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r"];

fn parse_v1(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Refused as soon as the protocol word cannot be one of the three.
    let word = &bytes[V1_SIGNATURE.len()..];
    let possible = |protocol: &&[u8]| {
        let common = word.len().min(protocol.len());
        word[..common] == protocol[..common]
    };
    if !V1_PROTOCOLS.iter().any(possible) {
        return Err(malformed(1, "the protocol is not TCP4, TCP6 or UNKNOWN"));
    }
    let too_long = ProxyError::TooLong {
        version: 1,
        limit: MAX_V1_HEADER,
    };
    // The line ends at its first CR, which must be followed by LF, within the limit.
    let window = &bytes[..bytes.len().min(MAX_V1_HEADER)];
    let len = match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        None if bytes.len() >= MAX_V1_HEADER => return Err(too_long),
        None => return Ok(None),
        Some(at) if bytes[at] == b'\n' => {
            return Err(malformed(1, "the line does not end with CRLF"))
        }
        Some(at) => match bytes.get(at + 1) {
            _ if at + 2 > MAX_V1_HEADER => return Err(too_long),
            None => return Ok(None),
            Some(b'\n') => at + 2,
            Some(_) => return Err(malformed(1, "a CR inside the line")),
        },
    };
    let unknown = ProxyHeader {
        version: 1,
        local: false,
        source: Address::None,
        destination: Address::None,
        tlvs: Vec::new(),
    };
    // The spec has the receiver ignore whatever follows UNKNOWN on the line.
    let after_unknown = bytes[V1_SIGNATURE.len()..].strip_prefix(b"UNKNOWN");
    if after_unknown.is_some_and(|rest| rest[0] == b' ' || rest[0] == b'\r') {
        return Ok(Some((unknown, len)));
    }
    // Ports are plain decimal numbers, which Rust's parser alone would take with a sign.
    let fields = bytes[V1_SIGNATURE.len()..len - 2].split(|&b| b == b' ');
    let plain =
        |port: &[u8]| port.iter().all(u8::is_ascii_digit) && (port == b"0" || port[0] != b'0');
    if !fields
        .skip(3)
        .all(|field| !field.is_empty() && plain(field))
    {
        return Err(malformed(1, "a port that is not a plain decimal number"));
    }
    let header = ppp::v1::Header::try_from(&bytes[..len]).map_err(|e| malformed(1, e))?;
    let (source, destination) = match header.addresses {
        ppp::v1::Addresses::Unknown => (Address::None, Address::None),
        ppp::v1::Addresses::Tcp4(ip) => endpoints(
            ip.source_address,
            ip.source_port,
            ip.destination_address,
            ip.destination_port,
        ),
        ppp::v1::Addresses::Tcp6(ip) => endpoints(
            ip.source_address,
            ip.source_port,
            ip.destination_address,
            ip.destination_port,
        ),
    };
    let header = ProxyHeader {
        source,
        destination,
        ..unknown
    };
    Ok(Some((header, len)))
}

fn parse_v2(bytes: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    // Refused as soon as the version and command, or the family and protocol, are
    // none the spec defines, rather than once the length it gives has come.
    if let Some(&version_command) = bytes.get(12) {
        if version_command >> 4 != 2 || version_command & 0x0f > 1 {
            let reason = format!("version and command byte {version_command:#04x}");
            return Err(malformed(2, reason));
        }
    }
    if let Some(&family_protocol) = bytes.get(13) {
        if family_protocol >> 4 > 3 || family_protocol & 0x0f > 2 {
            let reason = format!("address family and protocol byte {family_protocol:#04x}");
            return Err(malformed(2, reason));
        }
    }
    let Some(&[high, low]) = bytes.get(14..16) else {
        return Ok(None);
    };
    let len = 16 + usize::from(u16::from_be_bytes([high, low]));
    // The address block each family needs: IPv4, IPv6, Unix.
    let addresses = [0, 12, 36, 216][usize::from(bytes[13] >> 4)];
    if len - 16 < addresses {
        let reason = format!("{} bytes cannot hold the addresses", len - 16);
        return Err(malformed(2, reason));
    }
    if len > MAX_V2_HEADER {
        return Err(ProxyError::TooLong {
            version: 2,
            limit: MAX_V2_HEADER,
        });
    }
    let Some(bytes) = bytes.get(..len) else {
        return Ok(None);
    };
    let header = ppp::v2::Header::try_from(bytes).map_err(|e| malformed(2, e))?;
    let tlvs = (header.tlvs())
        .map(|tlv| tlv.map(|tlv| (tlv.kind, Box::from(&tlv.value[..]))))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| malformed(2, e))?;
    let local = header.command == ppp::v2::Command::Local;
    let (source, destination) = match header.addresses {
        _ if local => (Address::None, Address::None),
        ppp::v2::Addresses::Unspecified => (Address::None, Address::None),
        ppp::v2::Addresses::IPv4(ip) => endpoints(
            ip.source_address,
            ip.source_port,
            ip.destination_address,
            ip.destination_port,
        ),
        ppp::v2::Addresses::IPv6(ip) => endpoints(
            ip.source_address,
            ip.source_port,
            ip.destination_address,
            ip.destination_port,
        ),
        ppp::v2::Addresses::Unix(unix) => {
            (unix_address(&unix.source), unix_address(&unix.destination))
        }
    };
    let header = ProxyHeader {
        version: 2,
        local,
        source,
        destination,
        tlvs,
    };
    Ok(Some((header, len)))
}

/// The source and destination of a TCP header.
fn endpoints(
    source: impl Into<IpAddr>,
    source_port: u16,
    destination: impl Into<IpAddr>,
    destination_port: u16,
) -> (Address, Address) {
    (
        Address::Ip(SocketAddr::new(source.into(), source_port)),
        Address::Ip(SocketAddr::new(destination.into(), destination_port)),
    )
}

/// A Unix socket path from a v2 header's NUL-padded field.
fn unix_address(field: &[u8; 108]) -> Address {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if end == 0 {
        return Address::Unix(None);
    }
    let path: Cow<'_, str> = String::from_utf8_lossy(&field[..end]);
    Address::Unix(Some(Arc::from(Path::new(path.as_ref()))))
}

/// Reads the PROXY header at the start of `stream`, taking no byte past it: it peeks
/// at what has arrived, and reads only what belongs to the header, so bytes the peer
/// sent after it (in the same packet or not) stay in the socket for the protocol.
/// Waits as long as it takes: the caller bounds it with the header timeout.
pub(crate) async fn read_header<S: Peek>(stream: &mut S) -> Result<ProxyHeader, ProxyError> {
    let io_error = |e: std::io::Error| ProxyError::Io(e.to_string());
    // Large enough for any header accepted; only the header's bytes are taken from it.
    let mut buf = vec![0; MAX_V2_HEADER];
    let mut taken = 0;
    loop {
        let peeked = stream.peek(&mut buf[taken..]).await.map_err(io_error)?;
        if peeked == 0 {
            return Err(ProxyError::PeerClosed);
        }
        let seen = taken + peeked;
        let (header, end) = match ProxyHeader::parse(&buf[..seen])? {
            Some((header, len)) => (Some(header), len),
            None => (None, seen),
        };
        // Bytes already peeked are in the socket: this read returns at once.
        stream
            .read_exact(&mut buf[taken..end])
            .await
            .map_err(io_error)?;
        taken = end;
        if let Some(header) = header {
            return Ok(header);
        }
        if taken == buf.len() {
            // `parse` refuses a header this long before it gets here.
            return Err(ProxyError::TooLong {
                version: 2,
                limit: MAX_V2_HEADER,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_headers_are_refused_before_they_end() {
        for bytes in [
            &b"PROXY ?"[..],
            b"PROXY TCP5",
            b"PROXY UNKNOWNX",
            b"PROXY UNKNOWN\r ",
        ] {
            let err = ProxyHeader::parse(bytes).unwrap_err();
            assert!(
                matches!(err, ProxyError::Malformed { version: 1, .. }),
                "{err}"
            );
        }
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.push(0x11); // version 1: not v2
        assert!(ProxyHeader::parse(&v2).is_err());
        v2[12] = 0x21;
        v2.push(0x41); // family 4: none
        assert!(ProxyHeader::parse(&v2).is_err());
        v2[13] = 0x11;
        assert_eq!(ProxyHeader::parse(&v2).unwrap(), None);
        v2.extend_from_slice(&[0, 4]); // 4 bytes: too few for two IPv4 addresses
        assert!(ProxyHeader::parse(&v2).is_err());
        let signed = b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n";
        assert!(ProxyHeader::parse(signed).is_err());
    }

    #[test]
    fn unknown_ignores_the_rest_of_its_line() {
        let line = b"PROXY UNKNOWN whatever \xff follows\r\nhi";
        let (header, len) = ProxyHeader::parse(line).unwrap().unwrap();
        assert_eq!(len, line.len() - 2);
        assert_eq!(header.source(), &Address::None);
        assert_eq!(
            ProxyHeader::parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().1,
            15
        );
    }

    #[test]
    fn trusted_networks_include_ipv4_mapped_peers() {
        let networks = ProxyProtocol::new()
            .trust("10.0.0.0/8")
            .trust("::1")
            .networks()
            .unwrap();
        assert!(trusts(&networks, &"10.1.2.3:5".parse().unwrap()));
        assert!(trusts(&networks, &"[::ffff:10.1.2.3]:5".parse().unwrap()));
        assert!(trusts(&networks, &"[::1]:5".parse().unwrap()));
        assert!(!trusts(&networks, &"127.0.0.1:5".parse().unwrap()));
        assert!(trusts(&[], &"127.0.0.1:5".parse().unwrap()));
        let bad = ProxyProtocol::new().trust("10.0.0.0/33").networks();
        assert!(bad.unwrap_err().to_string().contains("10.0.0.0/33"));
    }
}
