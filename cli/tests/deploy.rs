//! `linedancer serve` deployed: on a Unix socket, started by a supervisor with socket
//! activation (the tests set `LISTEN_FDS` and `LISTEN_PID` themselves) and told of
//! readiness on `NOTIFY_SOCKET`, and upgraded in place with `--upgrade-socket` and
//! `--upgrade` while clients connect in a tight loop.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::Command;

use common::{fails, serve, serve_command, Serving, TEST_TIMEOUT};

/// Sends `message` and reads back as many bytes.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, message: &[u8]) {
    stream.write_all(message).await.unwrap();
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, message);
}

/// Waits for the process to exit, and returns its exit code.
async fn exit_code(serving: &mut Serving) -> i32 {
    let status = tokio::time::timeout(TEST_TIMEOUT, serving.child.wait())
        .await
        .expect("the server ran too long")
        .unwrap();
    status.code().expect("an exit code, not a signal")
}

/// Ensure `--unix` alone serves on the socket only, with the `--unix-mode`
/// permissions, that a second server on the same path fails as "in use", and that the
/// file is gone after a clean exit.
#[tokio::test]
async fn unix_socket_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let path_text = path.to_str().unwrap();
    let mut server = serve(&["serve", "echo", "--unix", path_text, "--unix-mode", "600"]).await;
    assert_eq!(server.addr, format!("unix:{path_text}"));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut client = UnixStream::connect(&path).await.unwrap();
    echo(&mut client, b"hello over unix").await;
    // The first address is the only one: a TCP listener would come first.

    let (code, stderr) = fails(&["serve", "echo", "--unix", path_text]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("cannot listen on unix:{path_text}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
    echo(&mut client, b"the first one serves on").await;

    let (code, stderr) = fails(&["serve", "echo", "--unix", path_text, "--unix-mode", "800"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("octal"), "{stderr}");

    drop(client);
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server).await, 0);
    assert!(!path.exists(), "the socket file is removed on exit");
}

/// `linedancer serve echo ARGS` started as a supervisor starts it: `socket` as fd 3,
/// `LISTEN_FDS=1` and `LISTEN_PID` its own pid (set by the shell that execs it).
fn activated(socket: &impl AsRawFd, args: &[&str]) -> Command {
    let fd = socket.as_raw_fd();
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_linedancer"))
        .args(["serve", "echo"])
        .args(args)
        .env("LISTEN_FDS", "1")
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: dup2 and fcntl are async-signal-safe.
    unsafe {
        shell.pre_exec(move || {
            let done = if fd == 3 {
                // dup2 onto itself would leave it close-on-exec.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if done == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    shell
}

/// Ensure a server started with a listening socket passed as by systemd serves it
/// (ignoring its own --port), says `READY=1` with its pid on `NOTIFY_SOCKET` once it
/// accepts and `STOPPING=1` when it drains, and leaves the socket to its supervisor.
#[tokio::test]
async fn socket_activation_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    let mut command = activated(&socket, &["--port", "1"]);
    command.env("NOTIFY_SOCKET", &notify_path);
    let mut server = serve_command(command).await;
    assert_eq!(server.addr, addr.to_string());
    let mut said = vec![0; 256];
    let n = tokio::time::timeout(TEST_TIMEOUT, notify.recv(&mut said))
        .await
        .unwrap()
        .unwrap();
    let ready = String::from_utf8_lossy(&said[..n]).into_owned();
    assert_eq!(ready, format!("MAINPID={}\nREADY=1\n", server.pid()));
    let mut client = TcpStream::connect(addr).await.unwrap();
    echo(&mut client, b"activated").await;
    drop(client);
    server.signal(libc::SIGTERM);
    let n = tokio::time::timeout(TEST_TIMEOUT, notify.recv(&mut said))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&said[..n], b"STOPPING=1\n");
    assert_eq!(exit_code(&mut server).await, 0);
}

/// Ensure a passed Unix socket is served too, and its file left to the supervisor.
#[tokio::test]
async fn socket_activation_of_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let socket = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut server = serve_command(activated(&socket, &[])).await;
    assert_eq!(server.addr, format!("unix:{}", path.display()));
    let mut client = UnixStream::connect(&path).await.unwrap();
    echo(&mut client, b"activated over unix").await;
    drop(client);
    server.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut server).await, 0);
    assert!(path.exists(), "the supervisor's file, not the server's");
}

/// Ensure a passed descriptor that is not a listening socket fails at start, naming it.
#[tokio::test]
async fn socket_activation_refuses_what_is_not_listening() {
    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    bound
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let output = tokio::time::timeout(TEST_TIMEOUT, activated(&bound, &[]).output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("socket activation: fd 3: a stream socket that is not listening"),
        "{stderr}"
    );
}

/// What a client connecting in a loop saw.
#[derive(Default)]
struct Tally {
    served: AtomicU64,
    refused: AtomicU64,
    reset: AtomicU64,
    other: AtomicU64,
    /// Woken at every connection served.
    progress: tokio::sync::Notify,
}

impl Tally {
    fn errors(&self) -> u64 {
        [&self.refused, &self.reset, &self.other]
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until `count` connections in all have been served; fails on an error.
    async fn served(&self, count: u64) {
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            assert_eq!(self.errors(), 0);
            if self.served.load(Ordering::Relaxed) >= count {
                return;
            }
            progress.await;
        }
    }
}

/// Connects to `addr`, sends a line and reads its echo, closes, and again, until told
/// to stop; counts what happens.
async fn connect_in_a_loop(addr: String, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let count = |error: std::io::Error| {
        let counter = match error.kind() {
            std::io::ErrorKind::ConnectionRefused => &tally.refused,
            std::io::ErrorKind::ConnectionReset => &tally.reset,
            _ => &tally.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    };
    // Bounded: at most this many connections, however fast the machine.
    for _ in 0..200_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut stream = match TcpStream::connect(&addr).await {
            Ok(stream) => stream,
            Err(e) => {
                count(e);
                continue;
            }
        };
        let mut reply = [0; 5];
        let exchanged = async {
            stream.write_all(b"ping\n").await?;
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(())
        };
        match exchanged.await {
            Ok(()) if &reply == b"ping\n" => {
                tally.served.fetch_add(1, Ordering::Relaxed);
                tally.progress.notify_waiters();
            }
            Ok(()) => count(std::io::Error::other("wrong echo")),
            Err(e) => count(e),
        }
    }
}

/// Starts a `serve echo` with `args` plus the upgrade socket at `upgrade`.
async fn upgradable(upgrade: &Path, args: &[&str]) -> Serving {
    let mut all = vec![
        "serve",
        "echo",
        "--upgrade-socket",
        upgrade.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    serve(&all).await
}

/// What a swap looked like from the clients' side.
struct Swap {
    /// Connections served by the loops in all, and between starting the successor and
    /// the old process's exit.
    served: u64,
    during: u64,
    /// How long the old process took to exit, from the successor's start.
    old_exited: Duration,
    /// The new server, and the arguments that started it.
    new: Serving,
}

/// Serves the echo on TCP and a Unix socket in `dir`, with `loops` clients connecting
/// in a tight loop, and `held` clients connected before the swap (half on each
/// socket); then starts a successor with `--upgrade`. The held clients go on echoing
/// with the old process for `hold` after the hand-over, then leave, and it exits 0.
/// Fails if any connection is refused or reset, or misses its echo.
async fn swap(dir: &Path, loops: usize, held: usize, hold: Duration) -> Swap {
    let upgrade = dir.join("upgrade.sock");
    let unix = dir.join("echo.sock");
    let unix_text = unix.to_str().unwrap();
    let mut old = upgradable(&upgrade, &["--port", "0", "--unix", unix_text]).await;
    let addr = old.addr.clone();
    let port = addr.rsplit_once(':').unwrap().1.to_owned();
    let args = ["--port", port.as_str(), "--unix", unix_text, "--upgrade"];

    let mut clients = Vec::with_capacity(held);
    for n in 0..held {
        let mut stream: Box<dyn Stream> = if n % 2 == 0 {
            Box::new(TcpStream::connect(&addr).await.unwrap())
        } else {
            Box::new(UnixStream::connect(&unix).await.unwrap())
        };
        echo(&mut stream, b"before\n").await;
        clients.push(stream);
    }

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let looping: Vec<_> = (0..loops)
        .map(|_| {
            let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
            tokio::spawn(connect_in_a_loop(addr.clone(), tally, stop))
        })
        .collect();
    // Some connections before the swap.
    tally.served(200).await;

    let start = Instant::now();
    let served_at_start = tally.served.load(Ordering::Relaxed);
    let new = upgradable(&upgrade, &args).await;
    assert_eq!(new.addr, addr);
    old.log
        .wait_for("a successor took the listening sockets")
        .await;
    // The old process serves its own clients while they stay.
    let until = tokio::time::Instant::now() + hold;
    loop {
        for client in &mut clients {
            echo(client, b"during the drain\n").await;
        }
        if tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(clients);
    assert_eq!(exit_code(&mut old).await, 0);
    let old_exited = start.elapsed();
    let during = tally.served.load(Ordering::Relaxed) - served_at_start;
    // And some after.
    let served_at_exit = tally.served.load(Ordering::Relaxed);
    tally.served(served_at_exit + 200).await;
    stop.store(true, Ordering::Relaxed);
    for task in looping {
        tokio::time::timeout(TEST_TIMEOUT, task)
            .await
            .unwrap()
            .unwrap();
    }
    let served = tally.served.load(Ordering::Relaxed);
    eprintln!(
        "upgrade: {loops} loops, {held} clients held {hold:?}: {served} connections in all, \
         {during} between starting the successor and the old process's exit after \
         {old_exited:?}; refused {}, reset {}, other errors {}",
        tally.refused.load(Ordering::Relaxed),
        tally.reset.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed),
    );
    assert_eq!(tally.errors(), 0);
    assert!(during > 0);
    assert!(
        unix.exists() && upgrade.exists(),
        "the files are the new server's"
    );
    Swap {
        served,
        during,
        old_exited,
        new,
    }
}

/// A stream either kind of client is.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Ensure a server is replaced in place: with clients connecting in a tight loop all
/// through the swap, none is refused or reset; clients connected before it are served
/// by the old process until they leave, after which it exits 0; and the new one can
/// be replaced in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_in_place_refuses_no_connection() {
    let dir = tempfile::tempdir().unwrap();
    let swapped = tokio::time::timeout(TEST_TIMEOUT, swap(dir.path(), 2, 2, Duration::ZERO));
    let Swap { mut new, .. } = swapped.await.expect("the swap took too long");

    // The new one hands over in turn.
    let (upgrade, unix) = (
        dir.path().join("upgrade.sock"),
        dir.path().join("echo.sock"),
    );
    let port = new.addr.rsplit_once(':').unwrap().1.to_owned();
    let unix_text = unix.to_str().unwrap();
    let args = ["--port", port.as_str(), "--unix", unix_text, "--upgrade"];
    let mut third = upgradable(&upgrade, &args).await;
    assert_eq!(exit_code(&mut new).await, 0);
    let mut client = UnixStream::connect(&unix).await.unwrap();
    echo(&mut client, b"third\n").await;
    drop(client);
    third.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut third).await, 0);
    assert!(
        !unix.exists() && !upgrade.exists(),
        "removed by the last one"
    );
}

/// The figures of the README and of the closing note: 8 clients connecting in a loop,
/// and 100 held through a drain of a second. Run it with the release build:
/// `cargo test --release -p linedancer-cli --test deploy -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a longer run, for the figures"]
async fn upgrade_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let swapped = swap(dir.path(), 8, 100, Duration::from_secs(1));
    let mut swapped = (tokio::time::timeout(TEST_TIMEOUT, swapped).await).expect("too long");
    assert!(swapped.served > swapped.during && swapped.old_exited >= Duration::from_secs(1));
    swapped.new.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut swapped.new).await, 0);
}

/// Ensure a server with an admin endpoint is replaced in place too: the successor
/// serves the endpoint on the same address once the old one has handed over.
#[tokio::test]
async fn upgrade_with_an_admin_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let upgrade = dir.path().join("upgrade.sock");
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let mut old = upgradable(&upgrade, &["--port", "0", "--admin", &admin]).await;
    old.log.wait_for("admin endpoint listening").await;
    let port = old.addr.rsplit_once(':').unwrap().1.to_owned();
    let args = [
        "--port",
        port.as_str(),
        "--admin",
        admin.as_str(),
        "--upgrade",
    ];
    let mut new = upgradable(&upgrade, &args).await;
    assert_eq!(exit_code(&mut old).await, 0);
    let listening =
        tokio::time::timeout(TEST_TIMEOUT, new.log.wait_for("admin endpoint listening"));
    listening.await.expect("the successor's admin endpoint");
    let mut health = TcpStream::connect(&admin).await.unwrap();
    health
        .write_all(b"GET /health HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    health.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("accepting\n"),
        "{answer}"
    );
    new.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut new).await, 0);
}

/// Ensure a successor that fails after taking the sockets (here: a Unix path it cannot
/// bind) leaves the old server serving as if nothing happened, and that one started
/// with no server at the upgrade socket fails with a clear error.
#[tokio::test]
async fn a_failed_successor_leaves_the_old_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let upgrade = dir.path().join("upgrade.sock");
    let mut old = upgradable(&upgrade, &["--port", "0"]).await;
    let port = old.addr.rsplit_once(':').unwrap().1.to_owned();
    let mut client = TcpStream::connect(&old.addr).await.unwrap();
    echo(&mut client, b"before\n").await;

    let upgrade_text = upgrade.to_str().unwrap();
    let bad_unix = dir.path().join("missing-dir").join("echo.sock");
    let (code, stderr) = fails(&[
        "serve",
        "echo",
        "--upgrade-socket",
        upgrade_text,
        "--upgrade",
        "--port",
        &port,
        "--unix",
        bad_unix.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("took over the listening sockets"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot listen on unix:"), "{stderr}");
    old.log
        .wait_for("a successor failed before it was ready")
        .await;
    echo(&mut client, b"still here\n").await;
    let mut fresh = TcpStream::connect(&old.addr).await.unwrap();
    echo(&mut fresh, b"and accepting\n").await;

    let nobody = dir.path().join("nobody.sock");
    let (code, stderr) = fails(&[
        "serve",
        "echo",
        "--upgrade-socket",
        nobody.to_str().unwrap(),
        "--upgrade",
    ])
    .await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains("cannot take over from the server at"),
        "{stderr}"
    );
    assert!(stderr.contains("no server to take over from"), "{stderr}");

    let (code, stderr) = fails(&["serve", "echo", "--upgrade"]).await;
    assert_eq!(code, 1);
    assert!(stderr.contains("--upgrade-socket"), "{stderr}");

    drop((client, fresh));
    old.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut old).await, 0);
    assert!(!upgrade.exists());
}
