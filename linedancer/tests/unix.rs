//! Unix-domain sockets: serving the echo and the chat on them (alone and beside TCP),
//! what happens to a socket file left in the way, the file's permissions and its
//! removal, the peer's credentials, the PROXY protocol over a Unix socket, and a
//! zero-downtime hand-over between two servers of one process.

mod common;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use common::{bounded, exchange, LineClient};
use linedancer::examples::{Chat, Echo, Rooms};
use linedancer::{Address, Connection, Error, Handler, ProxyProtocol, Server, Stream, Threading};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

/// Sends `message` over a Unix stream and reads back as many bytes.
async fn echoed(stream: &mut UnixStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.unwrap();
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).await.unwrap();
    reply
}

/// Ensure the echo serves a Unix socket, alone: the peer shows as `unix`, the server's
/// only address is the socket's (absolute) path, and the file goes when it stops.
#[tokio::test]
async fn echo_on_a_unix_socket_alone() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("echo.sock");
        let server = Server::builder()
            .unix(&path)
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        assert_eq!(
            server.addresses(),
            &[Address::Unix(Some(Arc::from(path.as_path())))]
        );
        assert_eq!(
            server.addresses()[0].to_string(),
            format!("unix:{}", path.display())
        );
        let mut client = UnixStream::connect(&path).await.unwrap();
        assert_eq!(
            echoed(&mut client, b"over a unix socket").await,
            b"over a unix socket"
        );
        assert_eq!(server.connections_info()[0].peer_addr.to_string(), "unix");
        drop(client);
        server.shutdown().await;
        assert!(!path.exists(), "the socket file is removed on shutdown");
        assert!(UnixStream::connect(&path).await.is_err());
    })
    .await;
}

/// Tells its peer who it is, as the server sees it.
struct WhoAmI;

impl Handler for WhoAmI {
    async fn handle<S: Stream>(&self, mut stream: S, conn: Connection) -> io::Result<()> {
        let credentials = match conn.peer_credentials() {
            Some(cred) => format!("{} {} {:?}", cred.uid, cred.gid, cred.pid),
            None => "none".into(),
        };
        let text = format!("{} {credentials}\n", conn.peer_addr());
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await
    }
}

/// Ensure the peer's credentials (user, group, process) reach a handler on a Unix
/// socket, and that a TCP connection to the same server has none.
#[tokio::test]
async fn the_peers_credentials_are_known() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("who.sock");
        let server = Server::builder()
            .port(0)
            .unix(&path)
            .handler(WhoAmI)
            .start()
            .await
            .unwrap();
        let mut told = String::new();
        let mut client = UnixStream::connect(&path).await.unwrap();
        client.read_to_string(&mut told).await.unwrap();
        // SAFETY: no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let pid = std::process::id();
        let ours = format!("{uid} {gid} Some({pid})");
        assert_eq!(told, format!("unix {ours}\n"));
        told.clear();
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.read_to_string(&mut told).await.unwrap();
        assert!(
            told.starts_with("127.0.0.1:") && told.ends_with(" none\n"),
            "{told}"
        );
        server.shutdown().await;
    })
    .await;
}

/// A line client on a Unix socket.
struct UnixLines {
    stream: BufReader<UnixStream>,
}

impl UnixLines {
    async fn connect(path: &Path) -> Self {
        UnixLines {
            stream: BufReader::new(UnixStream::connect(path).await.unwrap()),
        }
    }

    async fn send(&mut self, line: &str) {
        let line = format!("{line}\n");
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .unwrap();
    }

    async fn expect_line(&mut self) -> String {
        let mut line = String::new();
        assert_ne!(self.stream.read_line(&mut line).await.unwrap(), 0, "closed");
        line.trim_end_matches('\n').to_owned()
    }
}

/// Ensure the chat serves a Unix socket beside its TCP port, per core, with both
/// kinds of client in one room.
#[tokio::test]
async fn chat_on_a_unix_socket_beside_tcp() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.sock");
        let server = Server::builder()
            .port(0)
            .unix(&path)
            .threading(Threading::PerCore(2))
            .state(Arc::new(Rooms::default()))
            .protocol::<Chat>()
            .start()
            .await
            .unwrap();
        assert_eq!(server.addresses().len(), 2);
        let mut ann = UnixLines::connect(&path).await;
        ann.expect_line().await;
        ann.send("/nick ann").await;
        assert_eq!(ann.expect_line().await, "* you are now ann");
        let mut bob = LineClient::connect(server.local_addr()).await;
        bob.expect_line().await;
        assert_eq!(ann.expect_line().await, "* guest2 joined lobby");
        bob.send("hello from tcp").await;
        assert_eq!(ann.expect_line().await, "<guest2> hello from tcp");
        ann.send("hello from unix").await;
        assert_eq!(bob.expect_line().await, "<ann> hello from unix");
        server.shutdown().await;
        assert!(!path.exists());
    })
    .await;
}

/// Ensure a socket file left by a server that is gone is replaced, one a server
/// listens on fails at start with "in use" (and still works for its owner), and a file
/// that is not a socket is left alone.
#[tokio::test]
async fn stale_live_and_foreign_files() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let server = Server::builder()
            .unix(&stale)
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let mut client = UnixStream::connect(&stale).await.unwrap();
        assert_eq!(
            echoed(&mut client, b"stale no more").await,
            b"stale no more"
        );

        let live = Server::builder()
            .unix(&stale)
            .protocol::<Echo>()
            .start()
            .await;
        match live {
            Err(Error::Unix { path, source }) => {
                assert_eq!(path, stale);
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
                let message = Error::Unix { path, source }.to_string();
                assert!(message.contains("in use"), "{message}");
            }
            other => panic!("expected an in-use error, got {other:?}"),
        }
        assert_eq!(echoed(&mut client, b"still served").await, b"still served");

        let foreign = dir.path().join("notes.txt");
        std::fs::write(&foreign, "keep me").unwrap();
        let refused = Server::builder()
            .unix(&foreign)
            .protocol::<Echo>()
            .start()
            .await;
        assert!(matches!(refused, Err(Error::Unix { .. })), "{refused:?}");
        assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "keep me");
        drop(client);
        server.shutdown().await;
    })
    .await;
}

/// Ensure `unix_mode` sets the socket file's permissions.
#[tokio::test]
async fn the_socket_files_permissions() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o660, 0o666] {
            let path = dir.path().join(format!("{mode:o}.sock"));
            let server = Server::builder()
                .unix(&path)
                .unix_mode(mode)
                .protocol::<Echo>()
                .start()
                .await
                .unwrap();
            let permissions = std::fs::metadata(&path).unwrap().permissions();
            assert_eq!(permissions.mode() & 0o777, mode);
            server.shutdown().await;
        }
    })
    .await;
}

/// Ensure a server behind a local proxy takes its PROXY header over a Unix socket:
/// the client's address from the header is the peer's.
#[tokio::test]
async fn the_proxy_protocol_over_a_unix_socket() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxied.sock");
        let server = Server::builder()
            .unix(&path)
            .proxy_protocol(ProxyProtocol::new().trust("10.0.0.0/8"))
            .handler(WhoAmI)
            .start()
            .await
            .unwrap();
        let mut client = UnixStream::connect(&path).await.unwrap();
        client
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 7000\r\n")
            .await
            .unwrap();
        let mut told = String::new();
        client.read_to_string(&mut told).await.unwrap();
        // The peer is the header's client, the credentials the proxy's, from the
        // socket; `--proxy-from` is for TCP peers, a Unix socket's file mode says who
        // may connect.
        // SAFETY: no preconditions.
        let uid = unsafe { libc::geteuid() };
        assert!(
            told.starts_with(&format!("192.0.2.7:40000 {uid} ")),
            "{told}"
        );
        server.shutdown().await;
    })
    .await;
}

/// Ensure a server hands its sockets to a successor in the same process: the
/// successor serves the same TCP port and Unix path, a client connected before is
/// served by the old one until it drains, and the old one's files are left for the
/// successor; a successor that cannot reach the upgrade socket fails with the path.
#[tokio::test]
async fn a_successor_takes_over_the_sockets() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let (path, upgrade) = (
            dir.path().join("echo.sock"),
            dir.path().join("upgrade.sock"),
        );
        let old = Server::builder()
            .port(0)
            .unix(&path)
            .upgrade_socket(&upgrade)
            .threading(Threading::PerCore(2))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        let port = old.local_addr().port();
        let mode = std::fs::metadata(&upgrade).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut before = TcpStream::connect(old.local_addr()).await.unwrap();
        assert_eq!(exchange(&mut before, b"before").await, b"before");

        let missing = Server::builder()
            .port(port)
            .upgrade_from(dir.path().join("nobody.sock"))
            .protocol::<Echo>()
            .start()
            .await;
        assert!(matches!(missing, Err(Error::Upgrade { .. })), "{missing:?}");

        let new = Server::builder()
            .port(port)
            .unix(&path)
            .upgrade_socket(&upgrade)
            .upgrade_from(&upgrade)
            .threading(Threading::PerCore(1))
            .protocol::<Echo>()
            .start()
            .await
            .unwrap();
        old.handed_over().await;
        assert_eq!(new.addresses(), old.addresses());
        // The old one serves its own clients while they last.
        assert_eq!(exchange(&mut before, b"during").await, b"during");
        let report = tokio::join!(old.shutdown(), async {
            assert_eq!(exchange(&mut before, b"draining").await, b"draining");
            drop(before);
        })
        .0;
        // Counted as drained if it was still open when the listeners closed; it may
        // have left before.
        assert_eq!(report.force_closed, 0);
        assert!(report.drained <= 1);
        assert!(path.exists() && upgrade.exists(), "the successor's now");
        let mut after = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        assert_eq!(exchange(&mut after, b"after").await, b"after");
        let mut unix = UnixStream::connect(&path).await.unwrap();
        assert_eq!(echoed(&mut unix, b"after, unix").await, b"after, unix");
        assert_eq!(new.stats().accepted, 2);
        drop((after, unix));
        new.shutdown().await;
        assert!(!path.exists() && !upgrade.exists());
    })
    .await;
}
