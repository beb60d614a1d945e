//! Helpers shared by the socket tests: a line client and a time bound.

#![allow(dead_code)] // each test file uses its own subset

pub mod pki;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The most any one test may take.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `test` and fails if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<T>(test: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test took longer than its time bound")
}

/// A client of a line protocol.
pub struct LineClient {
    reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect(addr).await.expect("connect"))
    }

    /// A line client on a stream already connected.
    pub fn from_stream(stream: TcpStream) -> Self {
        stream.set_nodelay(true).expect("nodelay");
        let (reader, writer) = stream.into_split();
        LineClient {
            reader: BufReader::new(reader),
            writer,
        }
    }

    /// Sends `line` and its `\n`.
    pub async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
    }

    /// Reads one line, without its `\n`; `None` at the end of the stream.
    pub async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line).await.expect("read") {
            0 => None,
            _ => Some(
                line.strip_suffix('\n')
                    .expect("replies end in \\n")
                    .to_owned(),
            ),
        }
    }

    /// Reads one line and fails at the end of the stream.
    pub async fn expect_line(&mut self) -> String {
        self.line()
            .await
            .expect("a line, not the end of the stream")
    }
}

/// Sends `data` through `stream` in random-sized chunks while reading what comes
/// back, shuts the write side when all is sent, and returns everything read until the
/// other side closes.
pub async fn round_trip<T>(stream: T, data: &[u8]) -> Vec<u8>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let sent = data.to_vec();
    let write = tokio::spawn(async move {
        let mut rest = &sent[..];
        while !rest.is_empty() {
            let n = fastrand::usize(1..=rest.len().min(70_000));
            writer.write_all(&rest[..n]).await.unwrap();
            rest = &rest[n..];
        }
        writer.shutdown().await.unwrap();
    });
    let mut received = Vec::with_capacity(data.len());
    reader.read_to_end(&mut received).await.unwrap();
    write.await.unwrap();
    received
}

/// Starts a server running the protocol `P` on a free port.
pub async fn serve<P>() -> linedancer::ServerHandle<P::Message>
where
    P: linedancer::Protocol,
    P::Codec: Default + Clone + Sync,
{
    linedancer::Server::builder()
        .port(0)
        .protocol::<P>()
        .start()
        .await
        .expect("start the server")
}

/// Sends `message` and reads back as many bytes.
pub async fn exchange(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    let mut reply = vec![0; message.len()];
    stream.read_exact(&mut reply).await.expect("read the echo");
    reply
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
