//! Fault injection over real sockets: whatever a peer does, the server keeps serving
//! everyone else, stays within its limits, and says why each connection ended. Every
//! test ends with a healthy client served and the connection count back at zero.

mod common;

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{bounded, exchange, LineClient};
use linedancer::codec::{LengthPrefixed, Lines};
use linedancer::examples::{Echo, LineEcho};
use linedancer::{Builder, Ctx, Error, Next, Protocol, Server, ServerHandle, Threading};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Barrier};
use tokio::task::JoinSet;

/// A builder on a free port.
fn builder() -> Builder<()> {
    Server::builder().port(0)
}

/// Checks that a new client is served (a line echoed) and that every connection has
/// ended: the server is healthy after the fault.
async fn assert_healthy(server: &ServerHandle) {
    let mut client = LineClient::connect(server.local_addr()).await;
    client.send("still there?").await;
    assert_eq!(client.expect_line().await, "still there?");
    drop(client);
    server.wait_connections(|n| n == 0).await;
}

/// Reads until the server closes; returns what came, or the error that ended it.
async fn read_to_close(stream: &mut TcpStream) -> Result<Vec<u8>, std::io::Error> {
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await.map(|_| received)
}

/// Ensure a burst of five times `max_connections` never has more connections open than
/// the limit, keeps the rest waiting unaccepted, and serves every one in the end.
#[tokio::test]
async fn a_burst_of_five_times_the_limit_is_held_to_the_limit_and_all_are_served() {
    const LIMIT: usize = 20;
    const CLIENTS: usize = 5 * LIMIT;
    bounded(async {
        let server = builder()
            .max_connections(LIMIT)
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let addr = server.local_addr();
        // Every client has connected and sent its request once this opens.
        let connected = Arc::new(Barrier::new(CLIENTS + 1));
        let (release, released) = watch::channel(false);
        let mut clients = JoinSet::new();
        for i in 0..CLIENTS {
            let (connected, mut released) = (Arc::clone(&connected), released.clone());
            clients.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let message = format!("client {i} ").repeat(100);
                stream.write_all(message.as_bytes()).await.unwrap();
                connected.wait().await;
                let mut reply = vec![0; message.len()];
                stream.read_exact(&mut reply).await.expect("the echo");
                assert_eq!(reply, message.as_bytes());
                // Held open until the limit has been seen to hold.
                released.wait_for(|r| *r).await.unwrap();
            });
        }
        connected.wait().await;
        server.wait_connections(|n| n == LIMIT).await;
        let stats = server.stats();
        assert_eq!(stats.accepted, LIMIT as u64, "accepted past the limit");
        release.send(true).unwrap();
        while let Some(client) = clients.join_next().await {
            client.expect("every client is served");
        }
        assert_healthy(&server).await;
        let stats = server.stats();
        assert_eq!(stats.accepted, CLIENTS as u64 + 1);
        assert!(stats.peak_active <= LIMIT, "peak {}", stats.peak_active);
        assert_eq!(stats.closed.peer_closed, CLIENTS as u64 + 1);
        server.shutdown().await;
    })
    .await;
}

/// Ensure every slot up to the limit can be used with per-core listening sockets: the
/// last free slot is not kept by one thread's acceptor, with nobody queued at its
/// socket, from a client the kernel queued at the other's. Ten rounds, each filling the
/// server to its limit one client at a time: a slot held that way would leave the last
/// client of about every other round unserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_servers_serve_up_to_their_limit() {
    const LIMIT: usize = 8;
    bounded(async {
        let server = builder()
            .threading(Threading::PerCore(2))
            .max_connections(LIMIT)
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        for round in 0..10 {
            let mut clients = Vec::with_capacity(LIMIT);
            for i in 0..LIMIT {
                let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
                let message = format!("round {round} client {i}");
                assert_eq!(
                    exchange(&mut client, message.as_bytes()).await,
                    message.as_bytes()
                );
                clients.push(client);
            }
            assert_eq!(server.connections(), LIMIT);
            drop(clients);
            server.wait_connections(|n| n == 0).await;
        }
        server.shutdown().await;
    })
    .await;
}

/// Ensure a peer that drips bytes which never make a frame is closed by the frame
/// timeout (it is never idle), while one that sends its lines slowly, each complete
/// within the timeout, is served for as long as it likes. Virtual time.
#[tokio::test(start_paused = true)]
async fn the_frame_timeout_cuts_off_a_drip_but_not_slow_lines() {
    bounded(async {
        let server = builder()
            .frame_timeout(Duration::from_secs(2))
            .protocol::<LineEcho>()
            .start()
            .await
            .unwrap();
        let mut dripper = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut slow = LineClient::connect(server.local_addr()).await;
        dripper.write_all(b"never ").await.unwrap();
        for n in 0..20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let piece = if n % 2 == 0 { "half a " } else { "line\n" };
            slow.writer.write_all(piece.as_bytes()).await.unwrap();
            if n % 2 == 1 {
                assert_eq!(slow.expect_line().await, "half a line");
            }
            // Dripping on: the writes may fail once the server has closed.
            let _ = dripper.write_all(b"x").await;
        }
        // Returns only once the server has ended the connection (a close or a reset).
        let _ = read_to_close(&mut dripper).await;
        server.wait_connections(|n| n == 1).await;
        assert_eq!(server.stats().closed.frame_timeout, 1);
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}

/// Ensure the connection limit can be raised and lowered while running: raised, the
/// waiting clients are accepted at once; lowered below the open connections, none is
/// closed and no more are accepted until enough have ended.
#[tokio::test]
async fn the_connection_limit_changes_while_running() {
    bounded(async {
        let server = builder()
            .max_connections(5)
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let mut clients = Vec::new();
        // One at a time, so that the backlog hands them over in this order.
        for _ in 0..10 {
            clients.push(TcpStream::connect(server.local_addr()).await.unwrap());
        }
        server.wait_connections(|n| n == 5).await;
        assert_eq!(server.stats().accepted, 5);

        server.set_max_connections(7).unwrap();
        assert_eq!(server.max_connections(), 7);
        server.wait_connections(|n| n == 7).await;
        assert_eq!(server.stats().accepted, 7);

        server.set_max_connections(3).unwrap();
        assert_eq!(server.connections(), 7, "lowering the limit closes nothing");
        // Four of the seven must end before the eighth client gets in.
        for client in clients.drain(..5) {
            drop(client);
        }
        let eighth = &mut clients[2];
        assert_eq!(exchange(eighth, b"in at last").await, b"in at last");
        server.wait_connections(|n| n == 3).await;
        assert_eq!(
            server.stats().accepted,
            8,
            "accepted past the lowered limit"
        );

        assert!(server.set_max_connections(0).is_err());
        assert_eq!(server.max_connections(), 3);
        drop(clients);
        server.set_max_connections(10).unwrap();
        assert_healthy(&server).await;
        assert_eq!(server.stats().accepted, 11);
        server.shutdown().await;
    })
    .await;
}

/// Ensure a suspended server keeps serving its connections, leaves new clients waiting
/// in the backlog, and serves them once resumed.
#[tokio::test]
async fn suspend_holds_new_clients_and_resume_serves_them() {
    bounded(async {
        let server = builder().protocol::<Echo>().start().await.unwrap();
        let mut established = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut established, b"before").await, b"before");

        server.suspend();
        assert!(server.is_suspended());
        // The kernel completes the connect; the server does not accept it.
        let mut waiting = TcpStream::connect(server.local_addr()).await.unwrap();
        waiting.write_all(b"waiting").await.unwrap();
        assert_eq!(exchange(&mut established, b"during").await, b"during");
        let mut reply = [0; 7];
        let early =
            tokio::time::timeout(Duration::from_millis(200), waiting.read_exact(&mut reply));
        assert!(early.await.is_err(), "a suspended server answered");
        assert_eq!(server.stats().accepted, 1);

        server.resume();
        assert!(!server.is_suspended());
        waiting.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"waiting");
        drop((established, waiting));
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure two servers run side by side in one process, and stopping one leaves the
/// other serving.
#[tokio::test]
async fn several_listeners_in_one_process() {
    bounded(async {
        let echo = builder().protocol::<Echo>().start().await.unwrap();
        let lines = builder().protocol::<LineEcho>().start().await.unwrap();
        assert_ne!(echo.local_addr(), lines.local_addr());
        assert_healthy(&echo).await;
        assert_healthy(&lines).await;
        lines.shutdown().await;
        assert!(TcpStream::connect(lines.local_addr()).await.is_err());
        assert_healthy(&echo).await;
        echo.shutdown().await;
    })
    .await;
}

/// Ensure a server asked to listen on a port another server already listens on fails
/// at start, naming the address, with either threading model, and leaves the first
/// one serving: per-core listeners share their port through `SO_REUSEPORT`, which must
/// not let them join another server's.
#[tokio::test]
async fn a_port_in_use_fails_at_start() {
    bounded(async {
        let first = (builder().threading(Threading::PerCore(2)))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let addr = first.local_addr();
        for threading in [Threading::PerCore(2), Threading::Shared] {
            let second = Server::builder()
                .bind(addr.ip())
                .port(addr.port())
                .threading(threading)
                .protocol::<Echo>()
                .start()
                .await;
            match second {
                Err(Error::Bind { addr: at, source }) => {
                    assert_eq!(at, addr);
                    assert_eq!(source.kind(), ErrorKind::AddrInUse);
                }
                Err(e) => panic!("{threading:?}: unexpected error {e}"),
                Ok(second) => panic!("{threading:?}: started on {}", second.local_addr()),
            }
        }
        assert_healthy(&first).await;
        first.shutdown().await;
    })
    .await;
}

/// Ensure a client that connects and says nothing is closed by the idle timeout, while
/// one that keeps talking at shorter intervals stays.
#[tokio::test]
async fn silent_clients_are_closed_by_the_idle_timeout() {
    bounded(async {
        let server = builder()
            .idle_timeout(Duration::from_millis(300))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut talker = TcpStream::connect(server.local_addr()).await.unwrap();
        let talking = async {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert_eq!(exchange(&mut talker, b"tick").await, b"tick");
            }
        };
        let (closed, ()) = tokio::join!(read_to_close(&mut silent), talking);
        assert_eq!(closed.unwrap(), b"", "closed with no reply");
        // The server closed gently, and waits for the silent client's end.
        drop(silent);
        server.wait_connections(|n| n == 1).await;
        assert_eq!(
            server.stats().closed.idle_timeout,
            1,
            "the talker was closed too"
        );
        drop(talker);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// A line protocol that gives a client a fixed time for each line: a client that
/// trickles bytes without finishing a line runs out of it.
struct Deadline;

/// How long [`Deadline`] waits for each line.
const LINE_TIME: Duration = Duration::from_millis(300);

impl Protocol for Deadline {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        ctx.set_timeout(LINE_TIME);
        Deadline
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(line);
        ctx.set_timeout(LINE_TIME);
        Next::Continue
    }

    fn state_name(&self) -> &'static str {
        "AWAITING_LINE"
    }
}

/// Ensure a client trickling one byte at a time (never idle, never finishing a line)
/// is closed by the protocol's per-state timeout, with that reason.
#[tokio::test]
async fn trickling_clients_are_closed_by_the_state_timeout() {
    bounded(async {
        let server = builder()
            .idle_timeout(Duration::from_secs(10))
            .protocol::<Deadline>()
            .start()
            .await
            .unwrap();
        let mut trickler = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut wrote = 0;
        // 300 ms of line time at one byte every 20 ms: closed after about 15 bytes.
        for _ in 0..200 {
            if trickler.write_all(b"a").await.is_err() {
                break;
            }
            wrote += 1;
            let mut byte = [0; 1];
            match tokio::time::timeout(Duration::from_millis(20), trickler.read(&mut byte)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => panic!("a reply to an unfinished line"),
                Err(_) => {}
            }
        }
        assert!(wrote < 100, "still open after {wrote} bytes");
        drop(trickler);
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.state_timeout, 1);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure a client that sends without ever reading is held back (the server stops
/// reading once replies wait) and then closed by the send timeout.
#[tokio::test]
async fn a_client_that_never_reads_is_closed_by_the_send_timeout() {
    bounded(async {
        let server = builder()
            .send_timeout(Duration::from_millis(300))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        // Far more than the socket buffers of both sides hold; the writes stop with an
        // error once the server gives up on us.
        let error = loop {
            assert!(sent < 512 * 1024 * 1024, "never held back");
            match client.write_all(&chunk).await {
                Ok(()) => sent += chunk.len(),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(
                error.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
            ),
            "{error}"
        );
        server.wait_connections(|n| n == 0).await;
        let stats = server.stats();
        assert_eq!(stats.closed.send_timeout, 1);
        assert!(stats.bytes_in > 0 && stats.bytes_out > 0);
        assert!(stats.bytes_in >= stats.bytes_out);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// A protocol that pushes 64 KiB to its client every 5 ms, whatever the client does,
/// like a feed.
struct Feed;

impl Protocol for Feed {
    type Codec = linedancer::codec::Raw;
    type Reply = Bytes;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        ctx.set_timeout(Duration::from_millis(5));
        Feed
    }

    fn frame(&mut self, _: bytes::BytesMut, _: &mut Ctx<'_, Self>) -> Next {
        Next::Continue
    }

    fn timeout(&mut self, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(Bytes::from(vec![b'f'; 64 * 1024]));
        ctx.set_timeout(Duration::from_millis(5));
        Next::Continue
    }
}

/// Ensure replies the server pushes to a client that has stopped reading pile up only
/// to the output limit: the connection is closed with that reason well before the send
/// timeout, and memory stays bounded.
#[tokio::test]
async fn pushed_replies_past_the_output_limit_close_the_connection() {
    bounded(async {
        let server = builder()
            .max_output(1024 * 1024)
            .send_timeout(Duration::from_secs(600))
            .protocol::<Feed>()
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        // The feed has begun; from now on the client reads nothing more.
        let mut first = [0; 1];
        client.read_exact(&mut first).await.unwrap();
        server.wait_connections(|n| n == 0).await;
        let stats = server.stats();
        assert_eq!(stats.closed.output_overflow, 1);
        // The socket buffers took some; the rest was dropped at the limit.
        assert!(stats.bytes_out > 0);
        let received = read_to_close(&mut client).await.unwrap_or_default();
        assert!(received.iter().all(|b| *b == b'f'));
        drop(client);
        let echo = builder().protocol::<Echo>().start().await.unwrap();
        assert_healthy(&echo).await;
        echo.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure frames over the codec's limit close the connection with a bad-frame reason,
/// for lines and for length-prefixed frames, and nothing else is disturbed.
#[tokio::test]
async fn oversize_frames_close_the_connection() {
    /// Echoes length-prefixed frames.
    struct Frames;
    impl Protocol for Frames {
        type Codec = LengthPrefixed;
        type Reply = Bytes;
        type Message = ();
        fn connect(_: &mut Ctx<'_, Self>) -> Self {
            Frames
        }
        fn frame(&mut self, frame: bytes::BytesMut, ctx: &mut Ctx<'_, Self>) -> Next {
            ctx.send(frame.freeze());
            Next::Continue
        }
    }

    bounded(async {
        // A line of 1 MiB against the default 64 KiB limit: refused long before the
        // server has buffered it all.
        let lines = builder().protocol::<LineEcho>().start().await.unwrap();
        let mut client = TcpStream::connect(lines.local_addr()).await.unwrap();
        let long_line = vec![b'a'; 1024 * 1024];
        // The server may close while we still write.
        let _ = client.write_all(&long_line).await;
        let _ = read_to_close(&mut client).await;
        lines.wait_connections(|n| n == 0).await;
        assert_eq!(lines.stats().closed.bad_frame, 1);
        assert!(lines.stats().bytes_in < 1024 * 1024);
        assert_healthy(&lines).await;
        lines.shutdown().await;

        // A length-prefixed frame announcing 1 GiB, against a 1 KiB limit.
        let codec = LengthPrefixed::builder().max_frame_length(1024).new_codec();
        let frames = builder()
            .protocol_with_codec::<Frames>(codec)
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(frames.local_addr()).await.unwrap();
        let mut small = 5u32.to_be_bytes().to_vec();
        small.extend_from_slice(b"hello");
        assert_eq!(exchange(&mut client, &small).await, small);
        client.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let _ = read_to_close(&mut client).await;
        frames.wait_connections(|n| n == 0).await;
        assert_eq!(frames.stats().closed.bad_frame, 1);
        frames.shutdown().await;
    })
    .await;
}

/// A line echo that panics on connect for its second connection, and on the line
/// `panic`.
struct Fragile;

impl Protocol for Fragile {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        assert_ne!(ctx.id().0, 2, "the second connection");
        Fragile
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        assert_ne!(line, "panic", "asked to panic");
        ctx.send(line);
        Next::Continue
    }

    fn state_name(&self) -> &'static str {
        "FRAGILE"
    }
}

/// Ensure a protocol that panics, at connect or mid-stream, ends only that connection:
/// the panic is counted, and other clients keep being echoed meanwhile.
#[tokio::test]
async fn a_panicking_protocol_ends_only_its_connection() {
    bounded(async {
        let server = builder().protocol::<Fragile>().start().await.unwrap();
        let addr = server.local_addr();
        // Connected one after the other, so that they get ids 1, 2 and 3.
        let mut steady = TcpStream::connect(addr).await.unwrap();
        assert_eq!(exchange(&mut steady, b"one\n").await, b"one\n");

        let mut at_connect = TcpStream::connect(addr).await.unwrap();
        assert_eq!(
            read_to_close(&mut at_connect).await.unwrap_or_default(),
            b""
        );
        assert_eq!(exchange(&mut steady, b"two\n").await, b"two\n");

        let mut mid_stream = TcpStream::connect(addr).await.unwrap();
        assert_eq!(exchange(&mut mid_stream, b"fine\n").await, b"fine\n");
        mid_stream.write_all(b"panic\n").await.unwrap();
        assert_eq!(
            read_to_close(&mut mid_stream).await.unwrap_or_default(),
            b""
        );
        assert_eq!(exchange(&mut steady, b"three\n").await, b"three\n");

        drop((steady, at_connect, mid_stream));
        server.wait_connections(|n| n == 0).await;
        let stats = server.stats();
        assert_eq!(stats.closed.panic, 2);
        assert_eq!(stats.closed.peer_closed, 1);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// A raw handler that panics when its peer sends `panic`, and echoes anything else.
struct Touchy;

impl linedancer::Handler for Touchy {
    async fn handle<T: linedancer::Stream>(
        &self,
        mut stream: T,
        _: linedancer::Connection,
    ) -> std::io::Result<()> {
        let mut buf = [0; 64];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            assert_ne!(&buf[..n], b"panic", "asked to panic");
            stream.write_all(&buf[..n]).await?;
        }
    }
}

/// Ensure a raw handler that panics is isolated and counted like a protocol.
#[tokio::test]
async fn a_panicking_raw_handler_ends_only_its_connection() {
    bounded(async {
        let server = builder().handler(Touchy).start().await.unwrap();
        let mut steady = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut steady, b"one").await, b"one");
        let mut touchy = TcpStream::connect(server.local_addr()).await.unwrap();
        touchy.write_all(b"panic").await.unwrap();
        assert_eq!(read_to_close(&mut touchy).await.unwrap_or_default(), b"");
        assert_eq!(exchange(&mut steady, b"two").await, b"two");
        drop((steady, touchy));
        server.wait_connections(|n| n == 0).await;
        let closed = server.stats().closed;
        assert_eq!((closed.panic, closed.closed), (1, 1));
        server.shutdown().await;
    })
    .await;
}

/// Ensure a client that resets its connection mid-stream ends only that connection,
/// counted as a reset.
#[tokio::test]
async fn a_peer_reset_mid_stream_is_counted_and_harmless() {
    bounded(async {
        let server = builder().protocol::<Echo>().start().await.unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut client, b"hello").await, b"hello");
        // Unread data in our receive buffer plus SO_LINGER 0: close sends a reset.
        client.write_all(b"unread echo").await.unwrap();
        client.set_zero_linger().unwrap();
        let mut byte = [0; 1];
        client.read_exact(&mut byte).await.unwrap();
        drop(client);
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.peer_reset, 1);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure a client that shuts its write side right after sending still gets the whole
/// reply before the server closes.
#[tokio::test]
async fn a_half_closed_client_still_gets_its_reply() {
    bounded(async {
        let server = builder().protocol::<LineEcho>().start().await.unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        let request: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        client.write_all(request.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        let reply = read_to_close(&mut client).await.unwrap();
        assert_eq!(reply, request.as_bytes());
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.peer_closed, 1);
        assert_healthy(&server).await;
        server.shutdown().await;
    })
    .await;
}

/// Ensure a server can be started and stopped again and again on the same fixed port,
/// with either threading model, with clients served each time: connections left in
/// TIME_WAIT by the last round do not make the port busy.
#[tokio::test]
async fn repeated_start_and_stop_on_a_fixed_port() {
    bounded(async {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        for round in 0..20 {
            let threading = match round % 4 {
                0 | 1 => Threading::Shared,
                _ => Threading::PerCore(2),
            };
            let server = Server::builder()
                .port(port)
                .threading(threading)
                .protocol::<Echo>()
                .start()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(server.local_addr().port(), port);
            let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
            let message = format!("round {round}");
            assert_eq!(
                exchange(&mut client, message.as_bytes()).await,
                message.as_bytes()
            );
            // Sometimes the client leaves first, sometimes the server closes on it.
            if round % 2 == 0 {
                drop(client);
                server.wait_connections(|n| n == 0).await;
            }
            let report = server
                .shutdown_with_timeout(Duration::from_millis(100))
                .await;
            assert_eq!(
                report.drained + report.force_closed,
                1 - (round % 2 == 0) as usize
            );
        }
    })
    .await;
}

/// Answers every line with 64 KiB: a small request, a large reply.
struct Amplify;

impl Protocol for Amplify {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(_: &mut Ctx<'_, Self>) -> Self {
        Amplify
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(line.repeat(64 * 1024 / line.len().max(1)));
        Next::Continue
    }
}

/// Ensure a reading client that pipelines many requests whose replies together far
/// exceed the output limit gets every reply, in order: decoding pauses at the limit
/// and goes on once the replies are written, instead of closing.
#[tokio::test]
async fn pipelined_requests_with_large_replies_are_paced_not_closed() {
    bounded(async {
        let server = builder()
            .max_output(256 * 1024)
            .protocol::<Amplify>()
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        let lines: Vec<String> = (0..200).map(|i| format!("{i:08}")).collect();
        let (mut reader, mut writer) = client.split();
        let send = async {
            writer.write_all(lines.join("\n").as_bytes()).await.unwrap();
            writer.write_all(b"\n").await.unwrap();
        };
        let receive = async {
            for line in &lines {
                let mut reply = vec![0; 64 * 1024 + 1];
                reader.read_exact(&mut reply).await.unwrap();
                let expected = format!("{}\n", line.repeat(8 * 1024));
                assert!(reply == expected.as_bytes(), "reply to {line} garbled");
            }
        };
        tokio::join!(send, receive);
        drop(client);
        server.wait_connections(|n| n == 0).await;
        assert_eq!(server.stats().closed.peer_closed, 1);
        let mut fresh = TcpStream::connect(server.local_addr()).await.unwrap();
        let expected = format!("{}\n", "ok".repeat(32 * 1024));
        assert_eq!(exchange(&mut fresh, b"ok\n").await.len(), 3);
        let mut rest = vec![0; expected.len() - 3];
        fresh.read_exact(&mut rest).await.unwrap();
        drop(fresh);
        server.wait_connections(|n| n == 0).await;
        server.shutdown().await;
    })
    .await;
}

/// Answers every line, even an unfinished last one, with 32 MiB: more than the socket
/// buffers hold.
struct Huge;

impl Protocol for Huge {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(_: &mut Ctx<'_, Self>) -> Self {
        Huge
    }

    fn frame(&mut self, _: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send("h".repeat(32 * 1024 * 1024));
        Next::Continue
    }
}

/// Ensure a client that sends a request, shuts its side and never reads the reply is
/// closed by the send timeout and counted so, not as a peer that closed after getting
/// its replies.
#[tokio::test]
async fn a_half_closed_client_that_never_reads_meets_the_send_timeout() {
    bounded(async {
        let server = builder()
            .send_timeout(Duration::from_millis(300))
            .max_output(64 * 1024 * 1024)
            .protocol::<Huge>()
            .start()
            .await
            .unwrap();
        let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
        // An unfinished line: decoded, and answered, at the end of the stream.
        client.write_all(b"give me everything").await.unwrap();
        client.shutdown().await.unwrap();
        let mut first = [0; 1];
        client.read_exact(&mut first).await.unwrap();
        server.wait_connections(|n| n == 0).await;
        let closed = server.stats().closed;
        assert_eq!((closed.send_timeout, closed.peer_closed), (1, 0));
        server.shutdown().await;
    })
    .await;
}
