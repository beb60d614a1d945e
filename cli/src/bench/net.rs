//! What every mode does on the wire: connect from a spread of source addresses, and
//! run a checked exchange, each within a timeout.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tracing::debug;

/// How long one connect or one exchange may take before it counts as a timeout.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Source addresses to spread connections over when the server is on 127.0.0.0/8:
/// 127.0.0.1 to 127.0.0.16, each with its own ephemeral ports.
const SOURCES: usize = 16;

/// Why a connect or an exchange failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server refused the connection.
    Refused,
    /// The connection was reset or aborted, or the server stopped reading.
    Reset,
    /// It took longer than [`OP_TIMEOUT`].
    Timeout,
    /// An echoed byte differs from the one sent.
    Mismatch,
    /// The server closed the connection before echoing everything.
    Eof,
    /// Any other error (such as running out of ports or file descriptors).
    Other,
}

impl From<io::Error> for Failure {
    fn from(error: io::Error) -> Self {
        debug!(%error, "socket error");
        match error.kind() {
            io::ErrorKind::ConnectionRefused => Failure::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Failure::Reset,
            io::ErrorKind::TimedOut => Failure::Timeout,
            io::ErrorKind::UnexpectedEof => Failure::Eof,
            _ => Failure::Other,
        }
    }
}

/// Runs a socket operation, failing with [`Failure::Timeout`] after [`OP_TIMEOUT`].
pub async fn within<T>(op: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    timeout(OP_TIMEOUT, op)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Like [`within`], but gives up quietly at `end`, the end of the run: `None` then.
pub async fn before<T>(
    end: Instant,
    op: impl Future<Output = Result<T, Failure>>,
) -> Option<Result<T, Failure>> {
    timeout_at(end, within(op)).await.ok()
}

/// The server under load.
pub struct Target {
    /// Its address.
    addr: SocketAddr,
    /// Whether it is on 127.0.0.0/8, so that connections can come from many sources.
    spread: bool,
    /// With `--tls-ca`: the TLS client, and the name it asks for and verifies.
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("spread", &self.spread)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

/// A TLS client that trusts the certificates in a PEM file, asks for `name`, and
/// never resumes a session: every connection makes a full handshake.
pub fn tls_client(ca: &Path, name: &str) -> Result<(TlsConnector, ServerName<'static>), String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE in the file".into());
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    let name = ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// A connection to the server: TCP, or TLS over TCP.
pub enum Conn {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Target {
    /// The server at `addr`, spoken to over `tls` if given.
    pub fn new(addr: SocketAddr, tls: Option<(TlsConnector, ServerName<'static>)>) -> Self {
        let spread = matches!(addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
        Target { addr, spread, tls }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connects the `index`th connection, with TCP_NODELAY, and does the TLS handshake
    /// over it with `--tls-ca`.
    pub async fn connect(&self, index: usize) -> Result<Conn, Failure> {
        let tcp = self.connect_tcp(index).await?;
        match &self.tls {
            None => Ok(Conn::Tcp(tcp)),
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), tcp).await?;
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }

    /// Connects the `index`th connection's TCP socket, with TCP_NODELAY.
    ///
    /// When the server is on 127.0.0.0/8, the socket is first bound to
    /// 127.0.0.(1 + index % 16), port 0, so that many connections do not run out of
    /// ephemeral ports; the port is picked at connect time (IP_BIND_ADDRESS_NO_PORT),
    /// which lets ports in TIME_WAIT be reused towards the same server.
    async fn connect_tcp(&self, index: usize) -> Result<TcpStream, Failure> {
        let socket = Socket::new(
            Domain::for_address(self.addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_nonblocking(true)?;
        if self.spread {
            let host = 1 + (index % SOURCES) as u8;
            #[cfg(target_os = "linux")]
            bind_address_no_port(&socket)?;
            socket.bind(&SocketAddr::from(([127, 0, 0, host], 0)).into())?;
        }
        let stream = TcpSocket::from_std_stream(socket.into())
            .connect(self.addr)
            .await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Sets IP_BIND_ADDRESS_NO_PORT, which socket2 does not offer.
#[cfg(target_os = "linux")]
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open for as long as `socket` is borrowed, and the option
    // value is a c_int whose size is the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One connection's exchanges: each sends a batch of messages and reads it back,
/// checking every byte.
///
/// Every batch has fresh contents, drawn from the connection's index and the batch's
/// sequence number, so that a byte that is wrong, lost, repeated or out of order (even
/// a whole message, or a stale batch) is caught.
#[derive(Debug)]
pub struct Exchange {
    /// The batch being sent.
    sent: Vec<u8>,
    /// Where its echo is read into.
    received: Vec<u8>,
    /// Bytes per message.
    size: usize,
    /// When each message of the current batch was fully echoed, in order.
    done: Vec<Instant>,
    /// The connection's index, part of every batch's seed.
    conn: u64,
    /// The batch's sequence number on this connection.
    seq: u64,
    /// Whether each message is a line.
    lines: bool,
}

impl Exchange {
    /// Exchanges of `count` messages of `size` bytes for the `conn`th connection; with
    /// `lines`, each message is printable text ending in `\n`.
    pub fn new(conn: usize, size: usize, count: usize, lines: bool) -> Self {
        Exchange {
            sent: vec![0; size * count],
            received: vec![0; size * count],
            size,
            done: Vec::with_capacity(count),
            conn: conn as u64,
            seq: 0,
            lines,
        }
    }

    /// When each message of the last batch came back in full, as far as it got.
    pub fn done(&self) -> &[Instant] {
        &self.done
    }

    /// Sends the next batch and reads it back, checking every byte. The writing and the
    /// reading go on together, so that a batch larger than the socket buffers cannot
    /// deadlock.
    pub async fn run(&mut self, stream: &mut Conn) -> Result<(), Failure> {
        match stream {
            Conn::Tcp(tcp) => {
                let (mut reader, mut writer) = tcp.split();
                self.run_on(&mut reader, &mut writer).await
            }
            Conn::Tls(tls) => {
                let (mut reader, mut writer) = tokio::io::split(&mut **tls);
                self.run_on(&mut reader, &mut writer).await
            }
        }
    }

    /// [`Exchange::run`] on any pair of halves.
    async fn run_on<R, W>(&mut self, reader: &mut R, writer: &mut W) -> Result<(), Failure>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        fill_pattern(&mut self.sent, (self.conn << 40) ^ self.seq);
        if self.lines {
            as_lines(&mut self.sent, self.size);
        }
        self.seq += 1;
        self.done.clear();
        let Exchange {
            sent,
            received,
            size,
            done,
            ..
        } = self;
        let write = async { writer.write_all(sent).await.map_err(Failure::from) };
        let read = read_checked(reader, sent, received, *size, done);
        tokio::try_join!(write, read)?;
        Ok(())
    }
}

/// Reads `sent.len()` bytes into `received`, checking each read's bytes against `sent`,
/// and notes when each message of `size` bytes is complete.
async fn read_checked<R: AsyncRead + Unpin>(
    reader: &mut R,
    sent: &[u8],
    received: &mut [u8],
    size: usize,
    done: &mut Vec<Instant>,
) -> Result<(), Failure> {
    let mut filled = 0;
    while filled < sent.len() {
        let n = reader.read(&mut received[filled..]).await?;
        if n == 0 {
            return Err(Failure::Eof);
        }
        let end = filled + n;
        if let Some(at) = first_mismatch(&sent[filled..end], &received[filled..end]) {
            debug!(
                offset = filled + at,
                "an echoed byte differs from the byte sent"
            );
            return Err(Failure::Mismatch);
        }
        let now = Instant::now();
        done.extend(std::iter::repeat_n(now, end / size - filled / size));
        filled = end;
    }
    Ok(())
}

/// The first offset at which `got` differs from `expected`.
fn first_mismatch(expected: &[u8], got: &[u8]) -> Option<usize> {
    if expected == got {
        return None;
    }
    expected.iter().zip(got).position(|(a, b)| a != b)
}

/// Fills `buf` with the pseudo-random bytes of `seed` (splitmix64).
fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in buf.chunks_mut(8) {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Turns every message of `size` bytes in `buf` into printable ASCII ending in `\n`.
fn as_lines(buf: &mut [u8], size: usize) {
    for message in buf.chunks_mut(size) {
        let (end, text) = message.split_last_mut().expect("messages are not empty");
        for byte in text {
            *byte = b'!' + *byte % 94;
        }
        *end = b'\n';
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, split, DuplexStream};

    use super::*;

    /// A server on the other end of `stream` that echoes a batch of `len` bytes after
    /// passing it through `tamper`.
    fn serve(
        mut stream: DuplexStream,
        len: usize,
        tamper: fn(&mut Vec<u8>),
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut batch = vec![0; len];
            stream
                .read_exact(&mut batch)
                .await
                .expect("the batch arrives");
            tamper(&mut batch);
            let _ = stream.write_all(&batch).await;
        })
    }

    /// Runs one exchange of `count` messages of `size` bytes against a server that
    /// tampers with its echo.
    async fn exchange_with(
        size: usize,
        count: usize,
        tamper: fn(&mut Vec<u8>),
    ) -> (Result<(), Failure>, usize) {
        let (client, server) = duplex(64);
        let server = serve(server, size * count, tamper);
        let (mut reader, mut writer) = split(client);
        let mut exchange = Exchange::new(3, size, count, false);
        let result = within(exchange.run_on(&mut reader, &mut writer)).await;
        // Closing the client's end lets a server blocked on a full pipe finish.
        drop((reader, writer));
        server.await.expect("the server task ends");
        (result, exchange.done().len())
    }

    #[tokio::test]
    async fn a_faithful_echo_passes_and_times_every_message() {
        assert_eq!(exchange_with(100, 4, |_| {}).await, (Ok(()), 4));
    }

    #[tokio::test]
    async fn a_corrupted_byte_is_a_mismatch() {
        let (result, done) = exchange_with(100, 4, |batch| batch[250] ^= 0x01).await;
        assert_eq!(result, Err(Failure::Mismatch));
        assert!(done <= 2, "the message with the bad byte is not counted");
    }

    #[tokio::test]
    async fn messages_out_of_order_are_a_mismatch() {
        let (result, _) = exchange_with(16, 2, |batch| batch.rotate_left(16)).await;
        assert_eq!(result, Err(Failure::Mismatch));
    }

    #[tokio::test]
    async fn a_short_echo_is_an_eof() {
        let (result, _) = exchange_with(10, 1, |batch| batch.truncate(5)).await;
        assert_eq!(result, Err(Failure::Eof));
    }

    #[test]
    fn line_messages_are_printable_and_end_in_a_newline() {
        let mut buf = vec![0; 96];
        fill_pattern(&mut buf, 5);
        as_lines(&mut buf, 32);
        for message in buf.chunks(32) {
            assert_eq!(message[31], b'\n');
            assert!(message[..31].iter().all(|b| b.is_ascii_graphic()));
        }
    }

    #[test]
    fn every_batch_differs_from_the_last_and_from_other_connections() {
        let pattern = |seed| {
            let mut buf = [0; 13];
            fill_pattern(&mut buf, seed);
            buf
        };
        assert_ne!(pattern(0), pattern(1));
        assert_ne!(pattern(1 << 40), pattern(0));
        assert_eq!(pattern(7), pattern(7));
        assert_eq!(first_mismatch(&pattern(7), &pattern(7)), None);
    }
}
