//! The built `linedancer serve` under faults: out of file descriptors, and a graceful
//! shutdown with a hundred clients mid-conversation.

mod common;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

use common::{cpu_ticks, fd_numbers, linedancer, open_fds, serve, serve_command, TEST_TIMEOUT};

/// The server's file descriptor limit in the exhaustion test: room for a few dozen
/// connections besides its own descriptors.
const FD_LIMIT: libc::rlim_t = 64;

/// Clients in each test: more than [`FD_LIMIT`] leaves room for.
const CLIENTS: usize = 100;

/// Ensure a server out of file descriptors serves the clients it has, waits for
/// descriptors without spinning (about one `accept` a backoff of 100 ms, little CPU),
/// then serves the clients that waited in the backlog and new ones, and ends with the
/// descriptors it started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_backs_off_then_serves_the_backlog() {
    timeout(TEST_TIMEOUT, async {
        let args = ["serve", "echo", "--port", "0", "--threads", "1"];
        let mut command = linedancer(&args);
        command.env("RUST_LOG", "warn");
        // SAFETY: runs in the forked child before exec, and only calls setrlimit(2),
        // which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: FD_LIMIT,
                    rlim_max: FD_LIMIT,
                };
                match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(io::Error::last_os_error()),
                }
            });
        }
        let mut server = serve_command(command).await;
        let pid = server.pid();
        let baseline = open_fds(pid);
        let limit = usize::try_from(FD_LIMIT).unwrap();
        assert!(baseline < limit / 2, "{baseline} descriptors at start");

        // Every connect completes in the kernel: the backlog (1024) has room for all.
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        let mut clients = JoinSet::new();
        for id in 0..CLIENTS {
            let stream = TcpStream::connect(&server.addr).await.unwrap();
            let (served_tx, released) = (served_tx.clone(), released.clone());
            clients.spawn(echo_then_hold(id, stream, served_tx, released));
        }

        // Out of descriptors: every one is in use, and those beyond the server's own
        // hold the first clients, which are served.
        server.log.wait_for("accept failed").await;
        let fds = fd_numbers(pid);
        // Counted, not compared with the limit: the child may inherit a descriptor
        // numbered above it, from whatever ran the tests.
        assert!((0..limit).all(|fd| fds.contains(&fd)), "{fds:?}");
        let first = fds.len() - baseline;
        assert!(first < CLIENTS, "{first} clients got in");
        for _ in 0..first {
            served.recv().await.unwrap();
        }

        // Exhausted, the acceptor retries about every 100 ms and uses little CPU.
        let window = Duration::from_secs(1);
        let cpu_before = cpu_ticks(pid);
        let warnings = server.log.count_for("accept failed", window).await;
        let cpu = cpu_ticks(pid) - cpu_before;
        assert!(
            (3..=30).contains(&warnings),
            "{warnings} accept warnings in {window:?}"
        );
        // SAFETY: sysconf(3) has no memory effects.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let cpu_seconds = cpu as f64 / ticks_per_second as f64;
        assert!(
            cpu_seconds < 0.25 * window.as_secs_f64(),
            "{cpu_seconds}s of CPU in {window:?}"
        );
        assert!(served.is_empty(), "a client got in without a descriptor");

        // The first clients close; those in the backlog get in, are served, and close.
        release.send(true).unwrap();
        for _ in first..CLIENTS {
            served.recv().await.unwrap();
        }
        while let Some(client) = clients.join_next().await {
            client.unwrap().unwrap();
        }
        let (fresh_tx, mut fresh) = mpsc::unbounded_channel();
        let stream = TcpStream::connect(&server.addr).await.unwrap();
        echo_then_hold(CLIENTS, stream, fresh_tx, released)
            .await
            .unwrap();
        assert_eq!(fresh.recv().await, Some(CLIENTS));

        // Every connection closed, the server has the descriptors it started with.
        let mut polls = 0;
        while open_fds(pid) != baseline {
            polls += 1;
            assert!(
                polls < 250,
                "{} descriptors open, not {baseline}",
                open_fds(pid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        server.signal(libc::SIGTERM);
        let status = server.child.wait().await.unwrap();
        assert_eq!(status.code(), Some(0));
        let log = server.log.rest().await;
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .expect("bounded");
}

/// A client of the exhaustion test: echoes one message, says so on `served`, holds the
/// connection until `released`, then closes and reads to the server's close.
async fn echo_then_hold(
    id: usize,
    mut stream: TcpStream,
    served: mpsc::UnboundedSender<usize>,
    mut released: watch::Receiver<bool>,
) -> io::Result<()> {
    let message = format!("client {id}\n");
    stream.write_all(message.as_bytes()).await?;
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).await?;
    assert_eq!(reply, message.as_bytes(), "client {id}");
    served.send(id).unwrap();
    released.wait_for(|&released| released).await.unwrap();
    stream.shutdown().await?;
    assert_eq!(stream.read(&mut [0; 1]).await?, 0, "client {id}: EOF");
    Ok(())
}

/// Ensure SIGTERM with a hundred clients mid-conversation closes the listener at once
/// (a new connect is refused), lets every client finish its request with the whole reply
/// and close, exits 0 within the drain timeout, and logs a report of 100 drained,
/// none force-closed, and the byte counts the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_hundred_conversations() {
    timeout(TEST_TIMEOUT, async {
        let drain_timeout = Duration::from_secs(5);
        let args = ["serve", "echo", "--port", "0", "--drain-timeout", "5s"];
        let mut server = serve(&args).await;

        let (talking_tx, mut talking) = mpsc::unbounded_channel();
        let rounds = Arc::new(watch::Sender::new(0_usize));
        let (finish, finished) = watch::channel(false);
        let mut clients = JoinSet::new();
        for id in 0..CLIENTS {
            let stream = TcpStream::connect(&server.addr).await.unwrap();
            let (talking_tx, rounds) = (talking_tx.clone(), Arc::clone(&rounds));
            clients.spawn(converse(id, stream, talking_tx, rounds, finished.clone()));
        }
        for _ in 0..CLIENTS {
            talking.recv().await.unwrap();
        }

        server.signal(libc::SIGTERM);
        let signalled = Instant::now();
        server.log.wait_for("listener closed").await;
        let refused = TcpStream::connect(&server.addr).await.unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        // The conversations go on while the server drains.
        let draining_from = *rounds.borrow();
        let mut during_drain = rounds.subscribe();
        during_drain
            .wait_for(|&n| n >= draining_from + CLIENTS)
            .await
            .unwrap();

        finish.send(true).unwrap();
        let mut bytes = 0;
        while let Some(client) = clients.join_next().await {
            bytes += client.unwrap().unwrap();
        }
        let slack = Duration::from_secs(2);
        let exited = timeout_at(signalled + drain_timeout + slack, server.child.wait()).await;
        let status = exited.expect("exits within the drain timeout").unwrap();
        assert_eq!(status.code(), Some(0));

        let log = server.log.rest().await;
        assert!(
            log.contains("shutdown finished drained=100 force_closed=0"),
            "{log}"
        );
        let stats = format!(
            "final stats accepted=100 closed=100 (peer closed 100) accept_errors=0 \
             bytes_in={bytes} bytes_out={bytes}"
        );
        assert!(log.contains(&stats), "{stats}\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    })
    .await
    .expect("bounded");
}

/// A client of the shutdown test: sends requests of 1 to 4096 random bytes and checks
/// each whole reply, says so on `talking` after the first, counts each on `rounds`;
/// once `finish` is set, completes the request under way, closes its side, and reads
/// to the server's close. Returns the bytes it sent.
async fn converse(
    id: usize,
    mut stream: TcpStream,
    talking: mpsc::UnboundedSender<()>,
    rounds: Arc<watch::Sender<usize>>,
    finish: watch::Receiver<bool>,
) -> io::Result<usize> {
    let mut rng = fastrand::Rng::with_seed(id as u64);
    let (mut request, mut reply) = (Vec::new(), Vec::new());
    let (mut done, mut bytes) = (0, 0);
    while !*finish.borrow() {
        request.clear();
        request.extend((0..rng.usize(1..=4096)).map(|_| rng.u8(..)));
        stream.write_all(&request).await?;
        reply.resize(request.len(), 0);
        stream.read_exact(&mut reply).await?;
        assert!(reply == request, "client {id}: reply {done} differs");
        done += 1;
        bytes += request.len();
        if done == 1 {
            talking.send(()).unwrap();
        }
        rounds.send_modify(|n| *n += 1);
    }
    stream.shutdown().await?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await?;
    assert!(
        rest.is_empty(),
        "client {id}: {} bytes after the end",
        rest.len()
    );
    Ok(bytes)
}

/// Ensure a second signal during the drain closes the connections left at once: with a
/// drain timeout of a minute and an idle client, the server exits 0 in a few seconds
/// and reports the client force-closed.
#[tokio::test]
async fn second_signal_closes_at_once() {
    timeout(TEST_TIMEOUT, async {
        let args = ["serve", "echo", "--port", "0", "--drain-timeout", "1m"];
        let mut server = serve(&args).await;
        let mut client = TcpStream::connect(&server.addr).await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut reply = [0; 4];
        client.read_exact(&mut reply).await.unwrap();

        server.signal(libc::SIGTERM);
        server.log.wait_for("listener closed").await;
        server.signal(libc::SIGINT);
        let exited = timeout(Duration::from_secs(5), server.child.wait()).await;
        let status = exited
            .expect("exits long before the drain timeout")
            .unwrap();
        assert_eq!(status.code(), Some(0));
        let cut = client
            .read(&mut reply)
            .await
            .expect_err("reset by the server");
        assert_eq!(cut.kind(), std::io::ErrorKind::ConnectionReset);

        let log = server.log.rest().await;
        assert!(
            log.contains("shutdown finished drained=0 force_closed=1"),
            "{log}"
        );
        assert!(log.contains("closed=1 (server shutdown 1)"), "{log}");
    })
    .await
    .expect("bounded");
}
