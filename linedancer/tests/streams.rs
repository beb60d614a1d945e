//! Protocols and handlers over streams other than the listener's TCP sockets, handed
//! to a running server with `ServerHandle::serve`; listeners of the user's own and
//! addresses given as text.

mod common;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, round_trip, serve};
use linedancer::codec::Lines;
use linedancer::examples::{Echo, LineEcho};
use linedancer::{
    Address, Connection, Ctx, Error, Handler, Next, Protocol, Server, Stream, Threading,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};

/// Answers every line with the number of lines the whole server has seen, from the
/// shared state, and the peer's address.
struct Tally;

/// Tally's shared state.
#[derive(Default)]
struct Lines_ {
    seen: AtomicU32,
}

impl Protocol<Lines_> for Tally {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self, Lines_>) -> Self {
        ctx.send(format!("hello {}", ctx.peer_addr()));
        Tally
    }

    fn frame(&mut self, _line: String, ctx: &mut Ctx<'_, Self, Lines_>) -> Next {
        let seen = ctx.state().seen.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.send(seen.to_string());
        Next::Continue
    }
}

/// Ensure the echo serves a stream with no socket at all, a `tokio::io::duplex` pipe:
/// a mebibyte in random splits comes back intact, and the connection is listed,
/// counted and closed like any other.
#[tokio::test]
async fn echo_over_an_in_memory_pipe() {
    bounded(async {
        let server = serve::<Echo>().await;
        let (client, theirs) = tokio::io::duplex(64 * 1024);
        let id = server.serve(theirs, Address::None).await.unwrap();
        let listed = server.connections_info();
        assert_eq!((listed[0].id, &listed[0].peer_addr), (id, &Address::None));
        let data: Vec<u8> = (0..1024 * 1024).map(|_| fastrand::u8(..)).collect();
        assert_eq!(round_trip(client, &data).await, data);
        server.wait_connections(|n| n == 0).await;
        let stats = server.stats();
        assert_eq!((stats.accepted, stats.closed.peer_closed), (1, 1));
        assert_eq!(stats.bytes_in, data.len() as u64);
        server.shutdown().await;
    })
    .await;
}

/// Ensure a stream that holds writes until it is flushed, as TLS does, gets every
/// reply: the driver flushes after writing.
#[tokio::test]
async fn replies_are_flushed_through_a_buffering_stream() {
    bounded(async {
        let server = serve::<LineEcho>().await;
        let (client, theirs) = tokio::io::duplex(1024);
        server
            .serve(BufWriter::new(theirs), Address::None)
            .await
            .unwrap();
        let mut client = BufReader::new(client);
        for n in 0..100 {
            client
                .get_mut()
                .write_all(format!("line {n}\n").as_bytes())
                .await
                .unwrap();
            let mut line = String::new();
            client.read_line(&mut line).await.unwrap();
            assert_eq!(line, format!("line {n}\n"));
        }
        server.shutdown().await;
    })
    .await;
}

/// Ensure a protocol with shared state runs over a Unix socket pair: every connection,
/// TCP or Unix, counts in the one state, and the Unix peer is named as such.
#[tokio::test]
async fn a_stateful_protocol_over_unix_and_tcp_shares_its_state() {
    bounded(async {
        let state = Arc::new(Lines_::default());
        let server = Server::builder()
            .port(0)
            .state(Arc::clone(&state))
            .protocol::<Tally>()
            .start()
            .await
            .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let peer = Address::from(theirs.peer_addr().unwrap());
        server.serve(theirs, peer).await.unwrap();
        let mut unix = BufReader::new(ours);
        let mut tcp = BufReader::new(TcpStream::connect(server.local_addr()).await.unwrap());
        let tcp_peer = tcp.get_ref().local_addr().unwrap();

        let mut line = String::new();
        unix.read_line(&mut line).await.unwrap();
        assert_eq!(line, "hello unix\n");
        line.clear();
        tcp.read_line(&mut line).await.unwrap();
        assert_eq!(line, format!("hello {tcp_peer}\n"));

        for (n, client) in [1, 2, 3].into_iter().zip([true, false, true]) {
            line.clear();
            if client {
                unix.get_mut().write_all(b"one more\n").await.unwrap();
                unix.read_line(&mut line).await.unwrap();
            } else {
                tcp.get_mut().write_all(b"one more\n").await.unwrap();
                tcp.read_line(&mut line).await.unwrap();
            }
            assert_eq!(line, format!("{n}\n"));
        }
        assert_eq!(state.seen.load(Ordering::Relaxed), 3);
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}

/// Writes its connection's addresses, then hangs up.
struct WhoAmI;

impl Handler for WhoAmI {
    async fn handle<T: Stream>(&self, mut stream: T, conn: Connection) -> io::Result<()> {
        let text = format!("{} -> {}\n", conn.peer_addr(), conn.local_addr());
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    }
}

/// Ensure a raw handler runs over any stream too, and sees the addresses it was given.
#[tokio::test]
async fn a_raw_handler_over_a_unix_socket() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .handler(WhoAmI)
            .start()
            .await
            .unwrap();
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        server.serve(theirs, Address::Unix(None)).await.unwrap();
        let mut said = String::new();
        ours.read_to_string(&mut said).await.unwrap();
        assert_eq!(said, "unix -> none\n");
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.closed, 1);
        server.shutdown().await;
    })
    .await;
}

/// Ensure streams handed to the server wait for a slot at the connection limit, drain
/// with the rest on shutdown, and are refused once it has begun.
#[tokio::test]
async fn handed_streams_obey_the_limit_and_the_shutdown() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            .max_connections(1)
            .protocol::<LineEcho>()
            .start()
            .await
            .unwrap();
        let (first, theirs) = tokio::io::duplex(1024);
        server.serve(theirs, Address::None).await.unwrap();
        let (second, theirs) = tokio::io::duplex(1024);
        let waiting = tokio::spawn({
            let server = server.clone();
            async move { server.serve(theirs, Address::None).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "served past the limit");
        assert_eq!(server.connections(), 1);
        // Freed, the slot goes to the waiting stream, not to the listener, which has no
        // client to accept.
        drop(first);
        waiting.await.unwrap().unwrap();
        assert_eq!(server.stats().accepted, 2);

        let report = server.shutdown().await;
        assert_eq!((report.drained, report.force_closed), (1, 0));
        let mut goodbye = String::new();
        BufReader::new(second)
            .read_line(&mut goodbye)
            .await
            .unwrap();
        assert_eq!(goodbye, "server shutting down, goodbye\n");

        let (_, theirs) = tokio::io::duplex(1024);
        assert!(matches!(
            server.serve(theirs, Address::None).await,
            Err(Error::Stopped)
        ));
    })
    .await;
}

/// Ensure a server listens on a socket bound by its user, with either threading model,
/// and closes it on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_of_your_own() {
    bounded(async {
        for threading in [Threading::Shared, Threading::PerCore(2)] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let server = Server::builder()
                .listener(listener)
                .threading(threading)
                .protocol::<Echo>()
                .start()
                .await
                .unwrap();
            assert_eq!(server.local_addr(), addr);
            for _ in 0..10 {
                let stream = TcpStream::connect(addr).await.unwrap();
                assert_eq!(round_trip(stream, b"mine").await, b"mine");
            }
            server.shutdown().await;
            assert!(
                TcpStream::connect(addr).await.is_err(),
                "{threading:?}: still listening"
            );
        }
    })
    .await;
}

/// Ensure an address given as text is listened on, IPv6 included, and one that is not
/// an address fails at start, naming it.
#[tokio::test]
async fn addresses_as_text() {
    bounded(async {
        for text in ["127.0.0.1:0", "[::1]:0", "localhost:0"] {
            let server = Server::builder()
                .address(text)
                .protocol::<Echo>()
                .start()
                .await
                .unwrap();
            let stream = TcpStream::connect(server.local_addr()).await.unwrap();
            assert_eq!(round_trip(stream, b"text").await, b"text", "{text}");
            server.shutdown().await;
        }
        for bad in ["127.0.0.1", "[::1]", "300.1.2.3:80", ":::"] {
            let error = Server::builder()
                .address(bad)
                .protocol::<Echo>()
                .start()
                .await
                .unwrap_err();
            assert!(matches!(error, Error::Address { .. }), "{bad}: {error:?}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("invalid address '{bad}': ")),
                "{error}"
            );
        }
    })
    .await;
}

/// Ensure the close reason of a handed stream is its own: a protocol that closes
/// reports `closed by protocol`.
#[tokio::test]
async fn a_handed_stream_closes_with_its_reason() {
    bounded(async {
        let server = serve::<LineEcho>().await;
        let (mut client, theirs) = tokio::io::duplex(1024);
        server.serve(theirs, Address::None).await.unwrap();
        client.write_all(&[0xff, b'\n']).await.unwrap(); // not UTF-8
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.bad_frame, 1);
        server.shutdown().await;
    })
    .await;
}

/// Whether `listener` has keepalive on, and after how long it probes, as text.
fn keepalive_of(listener: &std::net::TcpListener) -> String {
    let socket = socket2::SockRef::from(listener);
    if socket.keepalive().unwrap() {
        format!("{}s", socket.tcp_keepalive_time().unwrap().as_secs())
    } else {
        "off".to_owned()
    }
}

/// Ensure TCP keepalive is set on the listening socket (whose options Linux copies to
/// every socket accepted from it): on by default, with the time asked, and off when
/// turned off; and that a zero time is refused.
#[tokio::test]
async fn listening_sockets_have_tcp_keepalive() {
    bounded(async {
        for (keepalive, expected) in [
            (None, "120s"),
            (Some(Some(Duration::from_secs(7))), "7s"),
            (Some(None), "off"),
        ] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            // The same socket, to read its options once the server has set them.
            let same = listener.try_clone().unwrap();
            let mut builder = Server::builder().listener(listener);
            if let Some(keepalive) = keepalive {
                builder = builder.tcp_keepalive(keepalive);
            }
            let server = builder.protocol::<Echo>().start().await.unwrap();
            assert_eq!(keepalive_of(&same), expected, "{keepalive:?}");
            server.shutdown().await;
        }
        let error = Server::builder()
            .port(0)
            .tcp_keepalive(Some(Duration::ZERO))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid tcp_keepalive 0s: must be above zero, or off"
        );
    })
    .await;
}
