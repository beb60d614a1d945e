//! The PROXY protocol over real sockets: v1 and v2 headers whole and a byte at a time,
//! with data in the same packet, LOCAL, TLVs, every way a header can be bad, untrusted
//! peers, the header timeout, and TLS after the header.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::pki::{self, Pki};
use common::{bounded, LineClient};
use linedancer::codec::Lines;
use linedancer::{Address, Ctx, Next, Protocol, ProxyProtocol, Server, ServerHandle, TlsConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Says who the peer is and what the header carried, then echoes lines.
struct Whois;

impl Protocol for Whois {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        let header = ctx.proxy_header().expect("a PROXY header");
        let ssl = header.ssl().map(|ssl| {
            format!(
                "{}/{}",
                ssl.version.unwrap_or("-"),
                ssl.cipher.unwrap_or("-")
            )
        });
        let sni = ctx
            .tls()
            .and_then(|tls| tls.server_name())
            .map(str::to_owned);
        ctx.send(format!(
            "peer={} v{} local={} authority={} alpn={} ssl={} tls-sni={}",
            ctx.peer_addr(),
            header.version(),
            header.is_local(),
            header.authority().unwrap_or("-"),
            header
                .alpn()
                .map(String::from_utf8_lossy)
                .as_deref()
                .unwrap_or("-"),
            ssl.as_deref().unwrap_or("-"),
            sni.as_deref().unwrap_or("-"),
        ));
        Whois
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(line);
        Next::Continue
    }

    fn shutdown(&mut self, _: &mut Ctx<'_, Self>) -> Next {
        Next::Close
    }
}

async fn server(proxy: ProxyProtocol) -> ServerHandle {
    Server::builder()
        .port(0)
        .proxy_protocol(proxy)
        .proxy_header_timeout(Duration::from_millis(300))
        .protocol::<Whois>()
        .start()
        .await
        .expect("start")
}

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 header: `command` 0x20 LOCAL or 0x21 PROXY, `family` 0x11 TCP4, 0x21 TCP6 or
/// 0x00 unspecified, then the address block and the TLVs.
fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut body = addresses.to_vec();
    for (kind, value) in tlvs {
        body.push(*kind);
        body.extend_from_slice(&(value.len() as u16).to_be_bytes());
        body.extend_from_slice(value);
    }
    let mut header = V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[command, family]);
    header.extend_from_slice(&(body.len() as u16).to_be_bytes());
    header.extend_from_slice(&body);
    header
}

/// The TCP4 address block: 192.0.2.7:51000 → 10.0.0.1:7000.
fn tcp4_block() -> Vec<u8> {
    let mut block = vec![192, 0, 2, 7, 10, 0, 0, 1];
    block.extend_from_slice(&51000u16.to_be_bytes());
    block.extend_from_slice(&7000u16.to_be_bytes());
    block
}

/// Sends `bytes` one write per byte, then reads the greeting line.
async fn send_bytewise_then_greeting(addr: SocketAddr, bytes: &[u8]) -> (LineClient, String) {
    let mut client = LineClient::connect(addr).await;
    for byte in bytes {
        client.writer.write_all(&[*byte]).await.unwrap();
        client.writer.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let greeting = client.expect_line().await;
    (client, greeting)
}

/// Reads until the server closes, and returns what it sent.
async fn closed_by_server(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    rest
}

#[tokio::test]
async fn v1_with_data_in_the_same_packet() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        let mut client = LineClient::connect(server.local_addr()).await;
        client
            .writer
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\nfirst line\n")
            .await
            .unwrap();
        assert_eq!(
            client.expect_line().await,
            "peer=192.0.2.7:51000 v1 local=false authority=- alpn=- ssl=- tls-sni=-"
        );
        assert_eq!(client.expect_line().await, "first line", "not lost");
        let listed = server.connections_info();
        assert_eq!(listed[0].peer_addr.to_string(), "192.0.2.7:51000");
        drop(client);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn v1_tcp6_and_unknown_a_byte_at_a_time() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        let addr = server.local_addr();
        let header = b"PROXY TCP6 2001:db8::7 2001:db8::1 443 7000\r\n";
        let (mut client, greeting) = send_bytewise_then_greeting(addr, header).await;
        assert!(
            greeting.starts_with("peer=[2001:db8::7]:443 v1 "),
            "{greeting}"
        );
        client.send("after").await;
        assert_eq!(client.expect_line().await, "after");

        // UNKNOWN: the connection keeps its real peer.
        let (unknown, greeting) = send_bytewise_then_greeting(addr, b"PROXY UNKNOWN\r\n").await;
        let own = unknown.writer.local_addr().unwrap();
        assert!(
            greeting.starts_with(&format!("peer={own} v1 ")),
            "{greeting}"
        );
        drop((client, unknown));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn v2_with_tlvs_a_byte_at_a_time_then_data() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        // PP2_TYPE_SSL: client bits, verify (0: ok), then sub-TLVs version and cipher.
        let mut ssl = vec![0x01, 0, 0, 0, 0];
        for (kind, value) in [(0x21u8, &b"TLSv1.3"[..]), (0x23, b"TLS_AES_128_GCM_SHA256")] {
            ssl.push(kind);
            ssl.extend_from_slice(&(value.len() as u16).to_be_bytes());
            ssl.extend_from_slice(value);
        }
        let mut bytes = v2(
            0x21,
            0x11,
            &tcp4_block(),
            &[(0x02, b"chat.example.com"), (0x01, b"line"), (0x20, &ssl)],
        );
        bytes.extend_from_slice(b"hello\n");
        let (mut client, greeting) = send_bytewise_then_greeting(server.local_addr(), &bytes).await;
        assert_eq!(
            greeting,
            "peer=192.0.2.7:51000 v2 local=false authority=chat.example.com alpn=line \
             ssl=TLSv1.3/TLS_AES_128_GCM_SHA256 tls-sni=-"
        );
        assert_eq!(client.expect_line().await, "hello");
        drop(client);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn v2_tcp6_whole_and_local_keeps_the_real_peer() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        let addr = server.local_addr();
        let mut block = Vec::new();
        block.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        block.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        block.extend_from_slice(&[0x01, 0xbb, 0x1b, 0x58]);
        let mut client = LineClient::connect(addr).await;
        client
            .writer
            .write_all(&v2(0x21, 0x21, &block, &[]))
            .await
            .unwrap();
        let greeting = client.expect_line().await;
        assert!(
            greeting.starts_with("peer=[2001:db8::7]:443 v2 local=false"),
            "{greeting}"
        );

        // A health check: LOCAL, with an address block the receiver must ignore.
        let mut check = LineClient::connect(addr).await;
        let own = check.writer.local_addr().unwrap();
        check
            .writer
            .write_all(&v2(0x20, 0x11, &tcp4_block(), &[]))
            .await
            .unwrap();
        let greeting = check.expect_line().await;
        assert!(
            greeting.starts_with(&format!("peer={own} v2 local=true")),
            "{greeting}"
        );
        let listed: Vec<Address> = server
            .connections_info()
            .into_iter()
            .map(|c| c.peer_addr)
            .collect();
        assert!(listed.contains(&Address::Ip(own)), "{listed:?}");
        assert!(
            listed.iter().any(|a| a.to_string() == "[2001:db8::7]:443"),
            "{listed:?}"
        );
        drop((client, check));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bad_headers_are_closed_without_reaching_the_protocol() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        let addr = server.local_addr();
        let mut overlong_v1 = b"PROXY TCP4 ".to_vec();
        overlong_v1.extend(std::iter::repeat_n(b'1', 120));
        let mut overlong_v2 = V2_SIGNATURE.to_vec();
        overlong_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let mut short_block = V2_SIGNATURE.to_vec();
        short_block.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        let cases: [(&str, Vec<u8>); 7] = [
            ("wrong signature", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
            (
                "v2 signature, one byte off",
                b"\r\n\r\n\0\r\nQUIX\n\x21\x11\0\0".to_vec(),
            ),
            ("overlong v1", overlong_v1),
            ("overlong v2", overlong_v2),
            (
                "v1 with a bad address",
                b"PROXY TCP4 999.0.0.1 10.0.0.1 1 2\r\n".to_vec(),
            ),
            (
                "v1 ended by LF alone",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
            ),
            ("v2 address block too short", short_block),
        ];
        for (case, bytes) in &cases {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            let answer = closed_by_server(&mut stream).await;
            assert!(
                answer.is_empty(),
                "{case}: the protocol answered {answer:?}"
            );
        }
        // Truncated: half a v2 header, then the client goes away.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let header = v2(0x21, 0x11, &tcp4_block(), &[]);
        stream.write_all(&header[..20]).await.unwrap();
        stream.shutdown().await.unwrap();
        assert!(closed_by_server(&mut stream).await.is_empty());

        server.wait_connections(|n| n == 0).await;
        let stats = server.stats();
        assert_eq!(stats.closed.proxy_header, cases.len() as u64 + 1);
        assert_eq!(stats.closed.total(), cases.len() as u64 + 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_header_not_complete_within_the_timeout_is_closed() {
    bounded(async {
        let server = server(ProxyProtocol::new()).await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        // Part of a header, then nothing: the 300 ms timeout ends it.
        stream.write_all(b"PROXY TCP4 192.0.2.7").await.unwrap();
        assert!(closed_by_server(&mut stream).await.is_empty());
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.proxy_header, 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_peer_outside_the_trusted_networks_is_closed_at_once() {
    bounded(async {
        let server = server(ProxyProtocol::new().trust("10.0.0.0/8")).await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        // Even a valid header: the peer (127.0.0.1) may not send one.
        stream
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\n")
            .await
            .unwrap();
        assert!(closed_by_server(&mut stream).await.is_empty());
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.proxy_header, 1);
        server.shutdown().await;

        // Trusted, the same header is taken.
        let server = server_trusting("127.0.0.0/8").await;
        let mut client = LineClient::connect(server.local_addr()).await;
        client
            .writer
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\n")
            .await
            .unwrap();
        assert!(client
            .expect_line()
            .await
            .starts_with("peer=192.0.2.7:51000"));
        drop(client);
        server.shutdown().await;
    })
    .await;
}

async fn server_trusting(network: &str) -> ServerHandle {
    server(ProxyProtocol::new().trust(network)).await
}

#[tokio::test]
async fn an_untrusted_network_that_is_not_one_fails_the_start() {
    let err = Server::builder()
        .port(0)
        .proxy_protocol(
            ProxyProtocol::new()
                .trust("10.0.0.0/8")
                .trust("not-a-network"),
        )
        .protocol::<Whois>()
        .start()
        .await
        .expect_err("a bad network must fail the start");
    assert!(err.to_string().contains("not-a-network"), "{err}");
}

#[tokio::test]
async fn tls_after_a_v2_header_delivered_a_byte_at_a_time() {
    bounded(async {
        let pki = Pki::new();
        let cert = pki.server("localhost", &["localhost"], false);
        let server = Server::builder()
            .port(0)
            .proxy_protocol(ProxyProtocol::new())
            .tls(TlsConfig::pem_files(&cert.cert, &cert.key))
            .protocol::<Whois>()
            .start()
            .await
            .unwrap();
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        for byte in v2(0x21, 0x11, &tcp4_block(), &[(0x02, b"localhost")]) {
            tcp.write_all(&[byte]).await.unwrap();
            tokio::task::yield_now().await;
        }
        let tls = pki::handshake(pki.client(&[]), tcp, "localhost")
            .await
            .unwrap();
        let mut lines = BufReader::new(tls);
        let mut greeting = String::new();
        lines.read_line(&mut greeting).await.unwrap();
        assert_eq!(
            greeting,
            "peer=192.0.2.7:51000 v2 local=false authority=localhost alpn=- ssl=- \
             tls-sni=localhost\n"
        );
        lines.get_mut().write_all(b"secret\n").await.unwrap();
        let mut echoed = String::new();
        lines.read_line(&mut echoed).await.unwrap();
        assert_eq!(echoed, "secret\n");
        drop(lines);
        server.shutdown().await;
    })
    .await;
}
