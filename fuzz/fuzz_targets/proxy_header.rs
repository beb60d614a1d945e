//! Fuzzes `ProxyHeader::parse` (linedancer/src/transport/proxy.rs) and checks the
//! properties the server relies on, not only that it does not panic:
//!
//! - a complete header is at most `MAX_V1_HEADER` (v1) or `MAX_V2_HEADER` (v2) bytes,
//!   within the input, of the version its signature tells, and its value does not depend
//!   on the bytes after it;
//! - what it holds is what the bytes say (addresses, LOCAL, TLVs), read here by an
//!   independent decoder, and every accessor works on it;
//! - prefix consistency, which the socket reader (`read_header`, which peeks and parses
//!   growing prefixes) relies on: a prefix of a header is `Ok(None)`, an error stays the
//!   same error whatever follows, `Ok(None)` never comes at a length the reader cannot
//!   grow past; a simulated reader fed the input in chunks ends as `parse` does.
//! - conformance to the specification: an impossible prefix is refused at once, every
//!   valid v1 line is accepted (`check_spec`).

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use linedancer::{Address, ProxyError, ProxyHeader, MAX_V1_HEADER, MAX_V2_HEADER};

const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version and command, family and
/// protocol, length.
const V2_FIXED: usize = 16;

type Parsed = Result<Option<(ProxyHeader, usize)>, ProxyError>;

fuzz_target!(|data: &[u8]| {
    let parsed = ProxyHeader::parse(data);
    assert_eq!(
        parsed,
        ProxyHeader::parse(data),
        "parse is not deterministic"
    );
    match &parsed {
        Ok(Some((header, len))) => check_header(data, header, *len),
        Ok(None) => check_incomplete(data),
        Err(error) => check_error(data, error),
    }
    check_prefixes(data, &parsed);
    check_reader(data, &parsed);
    check_spec(data, &parsed);
});

/// The version the input's signature tells, if it starts with one.
fn signature(data: &[u8]) -> Option<u8> {
    if data.starts_with(V2_SIGNATURE) {
        Some(2)
    } else if data.starts_with(V1_SIGNATURE) {
        Some(1)
    } else {
        None
    }
}

/// The v2 header's length as its fixed part declares it.
fn v2_declared_len(data: &[u8]) -> Option<usize> {
    let length = data.get(14..16)?;
    Some(V2_FIXED + usize::from(u16::from_be_bytes([length[0], length[1]])))
}

/// The size of a v2 address block of `family` (the high nibble of byte 13).
fn v2_address_len(family: u8) -> Option<usize> {
    match family {
        0x0 => Some(0),
        0x1 => Some(12),
        0x2 => Some(36),
        0x3 => Some(216),
        _ => None,
    }
}

fn check_header(data: &[u8], header: &ProxyHeader, len: usize) {
    assert!(
        len > 0 && len <= data.len(),
        "length {len} of {}",
        data.len()
    );
    assert!(len <= MAX_V2_HEADER, "length {len} > MAX_V2_HEADER");
    let version = header.version();
    assert!(version == 1 || version == 2, "version {version}");
    assert_eq!(
        Some(version),
        signature(data),
        "version is not the signature's"
    );

    // The header is its own bytes only: the bytes after it change nothing.
    let own = &data[..len];
    let expected = Ok(Some((header.clone(), len)));
    assert_eq!(
        ProxyHeader::parse(own),
        expected,
        "differs without the bytes after it"
    );
    for tail in [&b"\r\n"[..], V2_SIGNATURE, V1_SIGNATURE, &[0xff; 8]] {
        let other = [own, tail].concat();
        assert_eq!(
            ProxyHeader::parse(&other),
            expected,
            "differs with {tail:?} after it"
        );
    }

    check_accessors(header);
    match version {
        1 => check_v1(own, header),
        _ => check_v2(own, header),
    }
}

/// Every accessor works and agrees with `tlvs()`.
fn check_accessors(header: &ProxyHeader) {
    let _ = format!("{header:?} {} {}", header.source(), header.destination());
    let _ = (
        header.source().ip(),
        header.destination().ip(),
        header.is_local(),
    );
    let tlvs: Vec<(u8, &[u8])> = header.tlvs().collect();
    // The kinds sent, those the accessors read, and one more (tlv() is a linear scan).
    let kinds = tlvs
        .iter()
        .map(|(k, _)| *k)
        .chain([0x00, 0x01, 0x02, 0x20, 0x21, 0xff]);
    for kind in kinds {
        let first = tlvs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        assert_eq!(
            header.tlv(kind),
            first,
            "tlv({kind:#x}) is not the first of tlvs()"
        );
    }
    assert_eq!(header.alpn(), header.tlv(0x01));
    let authority = header.tlv(0x02).and_then(|v| std::str::from_utf8(v).ok());
    assert_eq!(header.authority(), authority);
    let ssl = header.ssl();
    let _ = format!("{ssl:?}");
    match (header.tlv(0x20), ssl) {
        (Some(value), Some(ssl)) => {
            assert!(value.len() >= 5, "ssl() from a {}-byte TLV", value.len());
            assert_eq!(ssl.client, value[0]);
            assert_eq!(ssl.verified, value[1..5] == [0, 0, 0, 0]);
            for text in [ssl.version, ssl.common_name, ssl.cipher]
                .into_iter()
                .flatten()
            {
                let inside = value
                    .windows(text.len().max(1))
                    .any(|w| w == text.as_bytes());
                assert!(
                    text.is_empty() || inside,
                    "ssl text {text:?} not in the TLV"
                );
            }
        }
        (Some(value), None) => assert!(value.len() < 5, "no ssl() from {value:?}"),
        (None, Some(ssl)) => panic!("ssl() {ssl:?} without an SSL TLV"),
        (None, None) => {}
    }
}

/// A v1 header: one CRLF-terminated line of at most 107 bytes, whose fields an
/// independent split on spaces reads the same.
fn check_v1(own: &[u8], header: &ProxyHeader) {
    let len = own.len();
    assert!(len <= MAX_V1_HEADER, "v1 header of {len} bytes");
    assert!(own.ends_with(b"\r\n"), "v1 header does not end with CRLF");
    let line = &own[V1_SIGNATURE.len()..len - 2];
    assert!(
        !line.contains(&b'\n') && !line.contains(&b'\r'),
        "CR or LF inside the line"
    );
    assert!(!header.is_local(), "v1 LOCAL");
    assert_eq!(header.tlvs().count(), 0, "v1 TLVs");

    // UNKNOWN: the spec has the receiver ignore the rest of the line, whatever it is.
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        assert_eq!(header.source(), &Address::None, "UNKNOWN with a source");
        assert_eq!(
            header.destination(),
            &Address::None,
            "UNKNOWN with a destination"
        );
        return;
    }
    let line = std::str::from_utf8(line).expect("a v1 header that is not UTF-8");
    let fields: Vec<&str> = line.split(' ').collect();
    let (source, destination) = match fields[..] {
        ["UNKNOWN", ..] => (Address::None, Address::None),
        [family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let ip = |text: &str| -> IpAddr {
                if family == "TCP4" {
                    IpAddr::V4(text.parse::<Ipv4Addr>().expect("TCP4 address"))
                } else {
                    IpAddr::V6(text.parse::<Ipv6Addr>().expect("TCP6 address"))
                }
            };
            let port = |text: &str| text.parse::<u16>().expect("port");
            (
                Address::Ip(SocketAddr::new(ip(source), port(source_port))),
                Address::Ip(SocketAddr::new(ip(destination), port(destination_port))),
            )
        }
        _ => panic!("accepted v1 line {line:?}"),
    };
    assert_eq!(header.source(), &source, "v1 source of {line:?}");
    assert_eq!(
        header.destination(),
        &destination,
        "v1 destination of {line:?}"
    );
}

/// A v2 header: the declared length, a valid version, command, family and protocol,
/// the addresses the address block holds, and TLVs that are exactly the bytes after
/// it.
fn check_v2(own: &[u8], header: &ProxyHeader) {
    let len = own.len();
    assert_eq!(
        Some(len),
        v2_declared_len(own),
        "v2 length is not the declared one"
    );
    let (version, command) = (own[12] >> 4, own[12] & 0x0f);
    let (family, protocol) = (own[13] >> 4, own[13] & 0x0f);
    assert_eq!(version, 2, "v2 header with version nibble {version}");
    assert!(command <= 1, "v2 header with command {command}");
    assert!(protocol <= 2, "v2 header with protocol {protocol}");
    let address_len = v2_address_len(family).expect("v2 header with an unknown family");
    assert!(len - V2_FIXED >= address_len, "v2 address block cut short");
    assert_eq!(
        header.is_local(),
        command == 0,
        "is_local() but command {command}"
    );

    let block = &own[V2_FIXED..];
    let (source, destination) = match family {
        _ if command == 0 => (Address::None, Address::None),
        0x1 => {
            let ip = |at: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&block[at..at + 4]).unwrap());
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            (
                Address::Ip(SocketAddr::new(IpAddr::V4(ip(0)), port(8))),
                Address::Ip(SocketAddr::new(IpAddr::V4(ip(4)), port(10))),
            )
        }
        0x2 => {
            let ip = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&block[at..at + 16]).unwrap());
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            (
                Address::Ip(SocketAddr::new(IpAddr::V6(ip(0)), port(32))),
                Address::Ip(SocketAddr::new(IpAddr::V6(ip(16)), port(34))),
            )
        }
        0x3 => (unix(&block[..108]), unix(&block[108..216])),
        _ => (Address::None, Address::None),
    };
    assert_eq!(header.source(), &source, "v2 source");
    assert_eq!(header.destination(), &destination, "v2 destination");

    // The TLVs, written back, are the bytes after the address block. (ppp reads no TLV
    // when the family is unspecified: the whole payload is then taken as addresses.)
    let mut written = Vec::new();
    for (kind, value) in header.tlvs() {
        written.push(kind);
        written.extend_from_slice(&u16::try_from(value.len()).unwrap().to_be_bytes());
        written.extend_from_slice(value);
    }
    let after = &block[address_len..];
    assert!(
        written == after || (family == 0 && written.is_empty()),
        "TLVs {written:?} are not the bytes {after:?}"
    );
}

/// A Unix socket path from a NUL-padded field, as the spec puts it.
fn unix(field: &[u8]) -> Address {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    if end == 0 {
        return Address::Unix(None);
    }
    let path = String::from_utf8_lossy(&field[..end]);
    Address::Unix(Some(Path::new(path.as_ref()).into()))
}

/// `Ok(None)`: the input may still become a header, and is shorter than the reader's
/// buffer (the reader refuses as too long an input that fills it).
fn check_incomplete(data: &[u8]) {
    match signature(data) {
        None => assert!(
            V1_SIGNATURE.starts_with(data) || V2_SIGNATURE.starts_with(data),
            "Ok(None) without a signature"
        ),
        Some(1) => {
            assert!(
                data.len() < MAX_V1_HEADER,
                "v1 Ok(None) at {} bytes",
                data.len()
            );
            assert!(!data.contains(&b'\n'), "v1 Ok(None) with a complete line");
        }
        Some(_) => {
            assert!(
                data.len() < MAX_V2_HEADER,
                "v2 Ok(None) at {} bytes",
                data.len()
            );
            if let Some(declared) = v2_declared_len(data) {
                assert!(
                    data.len() < declared,
                    "v2 Ok(None) with the declared length in"
                );
            }
        }
    }
}

/// An error: the one that fits the input, and the same whatever bytes follow.
fn check_error(data: &[u8], error: &ProxyError) {
    let _ = format!("{error} {error:?}");
    match (error, signature(data)) {
        (ProxyError::BadSignature, None) => assert!(
            !V1_SIGNATURE.starts_with(data) && !V2_SIGNATURE.starts_with(data),
            "BadSignature for a prefix of a signature"
        ),
        (ProxyError::TooLong { version: 1, limit }, Some(1)) => {
            assert_eq!(*limit, MAX_V1_HEADER);
            assert!(
                data.len() >= MAX_V1_HEADER,
                "v1 TooLong at {} bytes",
                data.len()
            );
            let window = &data[..MAX_V1_HEADER];
            assert!(
                !window.contains(&b'\n'),
                "v1 TooLong with a newline in the limit"
            );
        }
        (ProxyError::TooLong { version: 2, limit }, Some(2)) => {
            assert_eq!(*limit, MAX_V2_HEADER);
            let declared = v2_declared_len(data).expect("v2 TooLong before the length");
            assert!(declared > MAX_V2_HEADER, "v2 TooLong for {declared} bytes");
        }
        (ProxyError::Malformed { version, .. }, Some(signed)) => assert_eq!(*version, signed),
        (error, signed) => panic!("{error:?} for an input signed {signed:?}"),
    }

    // Nothing that follows can make it a header, nor change the error.
    let tails: [&[u8]; 6] = [b"\r\n", b"\n", b" 1 2\r\n", &[0; 64], V2_SIGNATURE, data];
    for tail in tails {
        let longer = [data, tail].concat();
        assert_eq!(
            ProxyHeader::parse(&longer).as_ref().err(),
            Some(error),
            "an error becomes something else with {tail:?} after it"
        );
    }
}

/// Parses prefixes of the input: all of them up to the point where the outcome is
/// decided (the cheap ones), then a sample of the others.
fn check_prefixes(data: &[u8], parsed: &Parsed) {
    let n = data.len();
    let decided = match signature(data) {
        Some(2) => v2_declared_len(data).unwrap_or(n),
        _ => MAX_V1_HEADER + 1,
    };
    let mut first_error = None;
    for k in 0..n {
        if !(k <= decided + 1 || k + 2 >= n || k % 61 == 0) {
            continue;
        }
        let prefix = ProxyHeader::parse(&data[..k]);
        match (parsed, &prefix) {
            (Ok(Some((header, len))), _) if k < *len => {
                assert_eq!(prefix, Ok(None), "prefix {k} of a {len}-byte header")
            }
            (Ok(Some(_)), _) => assert_eq!(&prefix, parsed, "prefix {k} past the header"),
            (Ok(None), _) => assert_eq!(prefix, Ok(None), "prefix {k} of an incomplete input"),
            (Err(_), Ok(None)) => assert!(first_error.is_none(), "Ok(None) after an error"),
            (Err(error), Err(e)) => {
                assert_eq!(e, error, "prefix {k} has another error");
                first_error.get_or_insert(k);
            }
            (Err(_), Ok(Some(_))) => panic!("prefix {k} is a header, the whole is an error"),
        }
    }
}

/// Runs the socket reader's loop on the input arriving in chunks: it peeks at what has
/// arrived, parses it and takes the header's bytes, or all of them while incomplete;
/// it must end as `parse` on the whole does, having taken exactly the header.
fn check_reader(data: &[u8], parsed: &Parsed) {
    let mut seed = data.iter().fold(0x9e37_79b9_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let mut arrived = 0;
    let mut taken = 0;
    let outcome = loop {
        if arrived == data.len() {
            break None; // The peer is done: PeerClosed, or Timeout, in the server.
        }
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let chunk = 1 + (seed as usize % 97);
        arrived = (arrived + chunk).min(data.len()).min(MAX_V2_HEADER);
        let result = ProxyHeader::parse(&data[..arrived]);
        match result {
            Ok(Some((header, len))) => {
                assert!(
                    taken <= len,
                    "header of {len} bytes after {taken} were taken"
                );
                taken = len;
                break Some(Ok(Some((header, len))));
            }
            Ok(None) => {
                taken = arrived;
                assert!(
                    taken < MAX_V2_HEADER,
                    "Ok(None) with the reader's buffer full"
                );
            }
            Err(error) => break Some(Err(error)),
        }
    };
    match (outcome, parsed) {
        (Some(Ok(Some((header, len)))), Ok(Some(whole))) => {
            assert_eq!(
                (&header, len),
                (&whole.0, whole.1),
                "reader took another header"
            );
            assert_eq!(
                taken, len,
                "reader took {taken} bytes of a {len}-byte header"
            );
        }
        (Some(outcome), _) => assert_eq!(&outcome, parsed, "reader ended otherwise"),
        (None, parsed) => assert_eq!(parsed, &Ok(None), "reader saw no end"),
    }
}

/// The specification's rules beyond what ppp 2.3 checks, which linedancer adds: a v2
/// prefix with a bad version, command, family or protocol byte, or a length shorter
/// than its addresses, and a v1 prefix whose protocol is not TCP4, TCP6 or UNKNOWN,
/// are refused at once; `PROXY UNKNOWN` ignores the rest of its line, whatever it is;
/// ports are plain decimal numbers (no sign, no leading zero).
fn check_spec(data: &[u8], parsed: &Parsed) {
    match signature(data) {
        Some(2) if data.len() >= V2_FIXED => {
            // A v2 prefix whose fixed part is already invalid is refused at once.
            let invalid = data[12] >> 4 != 2
                || data[12] & 0x0f > 1
                || data[13] & 0x0f > 2
                || match v2_address_len(data[13] >> 4) {
                    Some(need) => v2_declared_len(data).unwrap() - V2_FIXED < need,
                    None => true,
                };
            assert!(
                !invalid || parsed.is_err(),
                "invalid v2 fixed part not refused"
            );
        }
        Some(1) => {
            // A v1 line whose protocol cannot be TCP4, TCP6 or UNKNOWN is refused at once.
            let rest = &data[V1_SIGNATURE.len()..];
            let possible = [&b"TCP4 "[..], b"TCP6 ", b"UNKNOWN"]
                .iter()
                .any(|p| p.starts_with(rest) || rest.starts_with(p));
            assert!(
                possible || parsed.is_err(),
                "impossible v1 protocol not refused"
            );

            // A valid v1 line is accepted: for UNKNOWN, anything up to the CRLF is ignored.
            let Some(newline) = data.iter().position(|&b| b == b'\n') else {
                return;
            };
            if newline + 1 > MAX_V1_HEADER || data[newline - 1] != b'\r' {
                return;
            }
            let line = &data[V1_SIGNATURE.len()..newline - 1];
            if line.contains(&b'\r') {
                return;
            }
            let unknown = line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ");
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let canonical_port = |p: &[u8]| {
                !p.is_empty()
                    && p.iter().all(u8::is_ascii_digit)
                    && (p == b"0" || p[0] != b'0')
                    && std::str::from_utf8(p).unwrap().parse::<u16>().is_ok()
            };
            let address = |text: &[u8], v4: bool| {
                let text = std::str::from_utf8(text).unwrap_or("-");
                if v4 {
                    text.parse::<Ipv4Addr>().is_ok()
                } else {
                    text.parse::<Ipv6Addr>().is_ok()
                }
            };
            let tcp = match fields[..] {
                [family @ (b"TCP4" | b"TCP6"), source, destination, sp, dp] => {
                    let v4 = family == b"TCP4";
                    address(source, v4)
                        && address(destination, v4)
                        && canonical_port(sp)
                        && canonical_port(dp)
                }
                _ => false,
            };
            if unknown || tcp {
                assert!(
                    matches!(parsed, Ok(Some(_))),
                    "valid v1 line {:?} refused: {parsed:?}",
                    String::from_utf8_lossy(line)
                );
            }
            // And ports are plain decimal: no sign, no leading zero.
            if let (Ok(Some(_)), [b"TCP4" | b"TCP6", _, _, sp, dp]) = (parsed, &fields[..]) {
                assert!(
                    canonical_port(sp) && canonical_port(dp),
                    "port not plain decimal"
                );
            }
        }
        _ => {}
    }
}
