//! Listening sockets (TCP and Unix), the accept loop, and the [`Gate`] that suspends,
//! resumes and stops accepting.
//!
//! Sockets are made with `socket2` (`SO_REUSEADDR`, our own backlog) and every accepted
//! TCP socket gets `TCP_NODELAY`. The accept loop takes a connection slot for each
//! connection it accepts; at the limit, the connection in hand waits for a slot and no
//! other is accepted meanwhile (nothing is accepted and closed). No accept error ends
//! it: each is sorted by kind in [`accept_failed`].

use std::cell::Cell;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol as IpProtocol, SockAddr, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tracing::{debug, warn};

use crate::close::CloseReason;
use crate::connections::{Connection, Connections, Reservation};
use crate::handler::Service;
use crate::stats::AcceptError;
use crate::transport::{Address, Front, Peek, PeerCredentials, TransportInfo};

/// How long the acceptor pauses after an error that says the process or the system is
/// out of a resource (file descriptors, buffers, memory), before it tries again.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// A listening socket of the server, before a runtime takes it.
#[derive(Debug)]
pub(crate) enum Listening {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Listening {
    /// Takes a socket handed to the process, by a supervisor (socket activation) or by
    /// the server it takes over from, once it is checked to be a listening stream
    /// socket, TCP or Unix; says what it is instead otherwise.
    pub(crate) fn adopt(fd: OwnedFd) -> Result<Self, String> {
        let socket = Socket::from(fd);
        let not_socket = |e: io::Error| format!("not a socket ({e})");
        let domain = socket.domain().map_err(not_socket)?;
        if socket.r#type().map_err(not_socket)? != Type::STREAM {
            return Err("not a stream socket".into());
        }
        if !socket.is_listener().map_err(not_socket)? {
            return Err("a stream socket that is not listening".into());
        }
        let setup = |e: io::Error| format!("cannot be set up: {e}");
        socket.set_nonblocking(true).map_err(setup)?;
        socket.set_cloexec(true).map_err(setup)?;
        match domain {
            Domain::IPV4 | Domain::IPV6 => Ok(Listening::Tcp(socket.into())),
            Domain::UNIX => Ok(Listening::Unix(socket.into())),
            other => Err(format!(
                "a socket of family {other:?}, neither TCP nor Unix"
            )),
        }
    }

    /// The address it listens on.
    pub(crate) fn address(&self) -> io::Result<Address> {
        Ok(match self {
            Listening::Tcp(socket) => Address::Ip(socket.local_addr()?),
            Listening::Unix(socket) => {
                Address::Unix(socket.local_addr()?.as_pathname().map(Arc::from))
            }
        })
    }

    /// Another handle on the same socket.
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Listening::Tcp(socket) => Listening::Tcp(socket.try_clone()?),
            Listening::Unix(socket) => Listening::Unix(socket.try_clone()?),
        })
    }

    /// Hands the socket to the tokio runtime of the calling thread.
    pub(crate) fn into_acceptor(self) -> io::Result<Acceptor> {
        Ok(match self {
            Listening::Tcp(socket) => Acceptor::Tcp(TcpListener::from_std(socket)?),
            Listening::Unix(socket) => Acceptor::Unix(UnixListener::from_std(socket)?),
        })
    }
}

impl AsFd for Listening {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listening::Tcp(socket) => socket.as_fd(),
            Listening::Unix(socket) => socket.as_fd(),
        }
    }
}

/// A listening socket in a runtime.
#[derive(Debug)]
pub(crate) enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection just accepted.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Acceptor {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Acceptor::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                Ok(Accepted::Tcp(stream, peer))
            }
            Acceptor::Unix(listener) => Ok(Accepted::Unix(listener.accept().await?.0)),
        }
    }

    fn local_address(&self) -> io::Result<Address> {
        Ok(match self {
            Acceptor::Tcp(listener) => Address::Ip(listener.local_addr()?),
            Acceptor::Unix(listener) => Address::from(listener.local_addr()?),
        })
    }
}

/// Binds a listening TCP socket on `addr`; with `reuse_port`, one of several sockets
/// that share the port. Converted to tokio's listener inside the runtime that runs it.
pub(crate) fn bind(
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(addr)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// Binds a listening Unix socket at `path`, its file's permissions set to `mode` (when
/// given) before it listens, so that no peer connects under looser ones. A socket file
/// left by a server that is gone (connecting to it is refused) is replaced; one that a
/// server listens on fails ("in use"); any other file in the way is left alone, and
/// fails.
pub(crate) fn bind_unix(
    path: &Path,
    backlog: u32,
    mode: Option<u32>,
) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    let addr = SockAddr::unix(path)?;
    match socket.bind(&addr) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            remove_stale(path)?;
            socket.bind(&addr)?;
        }
        bound => bound?,
    }
    let file = SocketFile::of(path)?;
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok((socket.into(), file))
}

/// Removes the socket file at `path` if no server listens on it.
fn remove_stale(path: &Path) -> io::Result<()> {
    if !fs::symlink_metadata(path)?.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a file that is not a socket is in the way",
        ));
    }
    // Without blocking: a server whose backlog is full is live too.
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&SockAddr::unix(path)?) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!(path = %path.display(), "replacing a stale socket file");
            fs::remove_file(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "in use: a server is listening on it",
        )),
    }
}

/// A socket file the server made, removed when it stops, unless it has since been
/// replaced by another file.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        let meta = fs::symlink_metadata(path)?;
        Ok(SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Removes the file, if it is still the one the server made.
    pub(crate) fn remove(&self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!(path = %self.path.display(), "cannot remove the socket file: {e}");
            }
        }
    }
}

/// Turns TCP keepalive on a listening socket on (probing a peer silent for `time`,
/// then every quarter of it, four times) or off (`None`). Sockets accepted from it
/// inherit the setting (Linux copies the listener's options to them), which costs the
/// accept path nothing; a peer that vanished without a FIN (a NAT that forgot it, a
/// pulled cable) is then found, and its connection closed, within about twice `time`.
pub(crate) fn set_keepalive(
    socket: &std::net::TcpListener,
    time: Option<Duration>,
) -> io::Result<()> {
    let socket = SockRef::from(socket);
    match time {
        None => socket.set_keepalive(false),
        Some(time) => {
            let interval = (time / 4).max(Duration::from_secs(1));
            let keepalive = TcpKeepalive::new()
                .with_time(time)
                .with_interval(interval)
                .with_retries(4);
            socket.set_tcp_keepalive(&keepalive)
        }
    }
}

/// Checks that nobody listens on `addr`, or picks a free port when its port is 0, and
/// returns the address to give [`bind`]. Per-core listeners share their port through
/// `SO_REUSEPORT`, which would also let them join the listeners of another server of
/// the same user on that port, and silently take part of its connections: this plain
/// bind fails instead, as any server's would.
pub(crate) fn free_address(addr: SocketAddr) -> io::Result<SocketAddr> {
    let probe = tcp_socket(addr)?;
    probe.bind(&addr.into())?;
    probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an internet address"))
}

/// A TCP socket for `addr` that may bind while connections of an earlier server on the
/// same address sit in TIME_WAIT.
fn tcp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(IpProtocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// Whether the acceptors accept: shared by every accept loop of a server and its handle.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// [`OPEN`], [`SUSPENDED`] or [`STOPPED`].
    state: AtomicU8,
    changed: Notify,
}

/// [`Gate`] state: accepting.
const OPEN: u8 = 0;
/// [`Gate`] state: not accepting for now; the listening sockets stay open.
const SUSPENDED: u8 = 1;
/// [`Gate`] state: stopped for good; the listening sockets are closed.
const STOPPED: u8 = 2;

impl Gate {
    /// Stops accepting for now. Returns whether it was accepting.
    pub(crate) fn suspend(&self) -> bool {
        self.change(OPEN, SUSPENDED)
    }

    /// Accepts again after [`suspend`](Gate::suspend). Returns whether it was suspended.
    pub(crate) fn resume(&self) -> bool {
        self.change(SUSPENDED, OPEN)
    }

    /// Stops accepting for good.
    pub(crate) fn stop(&self) {
        self.state.store(STOPPED, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.state.load(Ordering::Acquire) == STOPPED
    }

    pub(crate) fn is_suspended(&self) -> bool {
        self.state.load(Ordering::Acquire) == SUSPENDED
    }

    fn change(&self, from: u8, to: u8) -> bool {
        let changed = (self.state)
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// Completes once the gate is stopped.
    pub(crate) async fn stopped(&self) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.state.load(Ordering::Acquire) == STOPPED {
                return;
            }
            changed.await;
        }
    }
}

/// Accepts connections while `gate` is open, running `service` on each, until it is
/// stopped. The listening socket is closed when this returns, so new connects are then
/// refused (unless another process holds it too); while the gate is suspended they wait
/// in the backlog.
pub(crate) async fn accept_loop<H: Service>(
    acceptor: Acceptor,
    connections: Arc<Connections<H::Message>>,
    service: Arc<H>,
    front: Option<Arc<Front>>,
    gate: Arc<Gate>,
) {
    let local = match acceptor.local_address() {
        Ok(addr) => addr,
        Err(e) => {
            warn!("cannot read the listener's address: {e}");
            return;
        }
    };
    let opener = Opener {
        connections: &connections,
        service: &service,
        front: front.as_ref(),
        gate: &gate,
        local: &local,
    };
    loop {
        // One future for as long as the gate stays as it is: making a new one for every
        // accept costs a lock.
        let mut changed = pin!(gate.changed.notified());
        changed.as_mut().enable();
        match gate.state.load(Ordering::Acquire) {
            STOPPED => return,
            SUSPENDED => {
                changed.await;
                continue;
            }
            _ => {}
        }
        loop {
            let accepted = tokio::select! {
                biased;
                () = &mut changed => break,
                accepted = acceptor.accept() => accepted,
            };
            match accepted {
                Ok(accepted) => {
                    // A slot at once below the limit; at it, this connection waits for
                    // one and no other is accepted meanwhile. A slot is taken only with
                    // a connection in hand: one held while waiting for a connection
                    // could be the last, kept from a client queued at another of the
                    // listening sockets or from a stream handed to the server.
                    let reservation = match connections.try_reserve() {
                        Some(reservation) => reservation,
                        None => {
                            connections.limit_wait();
                            tokio::select! {
                                biased;
                                // Never served: closed with the listener.
                                () = gate.stopped() => return,
                                reservation = connections.reserve() => reservation,
                            }
                        }
                    };
                    ACCEPTED.with(|accepted| accepted.set(accepted.get() + 1));
                    let opened = match accepted {
                        Accepted::Tcp(stream, peer) => {
                            if let Err(e) = stream.set_nodelay(true) {
                                // The peer is already gone; the connection task will
                                // find out.
                                debug!(%peer, "cannot set TCP_NODELAY: {e}");
                            }
                            let peer = Address::Ip(peer);
                            opener.open(reservation, stream, peer, None).await
                        }
                        Accepted::Unix(stream) => {
                            let credentials = stream.peer_cred().ok().map(PeerCredentials::from);
                            let peer = Address::Unix(None);
                            opener.open(reservation, stream, peer, credentials).await
                        }
                    };
                    if opened == Opened::Stopped {
                        return;
                    }
                }
                Err(e) => {
                    let class = accept_failed(&e);
                    connections.accept_error(class);
                    if class != AcceptError::Connection {
                        tokio::select! {
                            () = &mut changed => break,
                            () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                        }
                    }
                }
            }
        }
    }
}

/// What an accept loop needs to start a connection's task.
struct Opener<'a, H: Service> {
    connections: &'a Arc<Connections<H::Message>>,
    service: &'a Arc<H>,
    front: Option<&'a Arc<Front>>,
    gate: &'a Gate,
    local: &'a Address,
}

/// Whether the accept loop goes on after [`Opener::open`].
#[derive(Debug, PartialEq, Eq)]
enum Opened {
    Spawned,
    /// The server stopped while the connection waited to open; it is dropped.
    Stopped,
}

impl<H: Service> Opener<'_, H> {
    /// Starts the task of a connection just accepted: it opens (PROXY header, TLS), if
    /// the server has a front, then is served. At the cap on openings in progress, it
    /// waits here for a permit, and no other is accepted meanwhile.
    async fn open<S: Peek>(
        &self,
        reservation: Reservation<'_, H::Message>,
        stream: S,
        peer: Address,
        credentials: Option<PeerCredentials>,
    ) -> Opened {
        let service = Arc::clone(self.service);
        let local = self.local.clone();
        let Some(front) = self.front else {
            self.connections.spawn(
                reservation,
                peer,
                local,
                false,
                move |mut conn| async move {
                    if credentials.is_some() {
                        conn.set_transport(TransportInfo {
                            credentials,
                            ..TransportInfo::default()
                        });
                    }
                    service.serve(stream, conn).await
                },
            );
            return Opened::Spawned;
        };
        let handshakes = Arc::clone(&front.handshakes);
        let permit = match handshakes.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::select! {
                biased;
                () = self.gate.stopped() => return Opened::Stopped,
                permit = handshakes.acquire_owned() => {
                    permit.expect("the handshake semaphore is never closed")
                }
            },
        };
        let front = Arc::clone(front);
        let proxied = front.proxy.is_some();
        let transport = TransportInfo {
            credentials,
            ..TransportInfo::default()
        };
        let connections = self.connections;
        connections.spawn(
            reservation,
            peer.clone(),
            local,
            proxied,
            move |conn| async move {
                open_and_serve(&front, stream, peer, transport, conn, permit, &*service).await
            },
        );
        Opened::Spawned
    }
}

/// Opens a connection (its PROXY header, then its TLS handshake, as the server has
/// them), then serves it. A connection that fails to open is closed with the reason,
/// and its protocol never sees it; so is one still opening when the server drains.
async fn open_and_serve<H: Service, S: Peek>(
    front: &Front,
    mut stream: S,
    peer: Address,
    mut transport: TransportInfo,
    mut conn: Connection<H::Message>,
    permit: OwnedSemaphorePermit,
    service: &H,
) -> io::Result<()> {
    if let Some(proxy) = &front.proxy {
        let header = tokio::select! {
            biased;
            () = conn.shutdown_requested() => Err(CloseReason::Shutdown),
            header = proxy.read(&mut stream, &peer) => header,
        };
        match header {
            Ok(header) => {
                conn.set_peer_from(&header);
                transport.proxy = Some(header);
            }
            Err(reason) => return not_opened(&conn, reason),
        }
    }
    let Some(tls) = &front.tls else {
        drop(permit);
        conn.set_transport(transport);
        return service.serve(stream, conn).await;
    };
    let handshake = tokio::select! {
        biased;
        () = conn.shutdown_requested() => Err(CloseReason::Shutdown),
        handshake = tls.handshake(stream) => handshake,
    };
    match handshake {
        Ok((stream, info)) => {
            drop(permit);
            transport.tls = Some(info);
            conn.set_transport(transport);
            service.serve(stream, conn).await
        }
        Err(reason) => not_opened(&conn, reason),
    }
}

/// Ends a connection that failed to open, for `reason`.
fn not_opened<M>(conn: &Connection<M>, reason: CloseReason) -> io::Result<()> {
    conn.record_close(reason);
    Ok(())
}

thread_local! {
    /// Connections accepted on this thread, and that count when its runtime last went
    /// to sleep.
    static ACCEPTED: Cell<u64> = const { Cell::new(0) };
    static ACCEPTED_AT_LAST_SLEEP: Cell<u64> = const { Cell::new(0) };
}

/// How long a server thread that has just accepted connections keeps running before
/// it sleeps, in [`spin_before_sleep`].
const SPIN: Duration = Duration::from_micros(10);

/// Called by a server thread's runtime just before it sleeps waiting for events. If it
/// accepted connections since it last slept, more are likely on their way: it spins
/// for [`SPIN`] first, so that they find it awake. Waking a sleeping thread costs
/// the connecting side dearly (an inter-processor interrupt, a VM exit on a virtual
/// machine); spinning costs this thread a little CPU, and only while connections
/// arrive: a thread serving established connections never spins.
pub(crate) fn spin_before_sleep() {
    let accepted = ACCEPTED.with(Cell::get);
    if ACCEPTED_AT_LAST_SLEEP.with(|last| last.replace(accepted)) == accepted {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < SPIN {
        std::hint::spin_loop();
    }
}

/// Sorts an accept error and logs it. After a [`AcceptError::Connection`] the acceptor
/// accepts the next connection at once; after the others it pauses, then tries again.
fn accept_failed(error: &io::Error) -> AcceptError {
    match error.raw_os_error() {
        // Out of file descriptors (the process's or the system's), socket buffers or
        // memory: the pending connection stays in the backlog and the next accept would
        // fail the same way, so retrying at once is a busy loop. Pause until
        // connections close and free what is missing; retry for as long as it takes.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            warn!("accept failed, pausing {RESOURCE_BACKOFF:?}: {error}");
            AcceptError::Resource
        }
        // That one connection failed before we got it (reset or aborted by the peer,
        // a protocol error, refused by a firewall rule): skip it.
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => {
            debug!("accept failed for one connection, skipped: {error}");
            AcceptError::Connection
        }
        // Anything else is unexpected: pause as for exhaustion rather than risk
        // spinning on an error that repeats.
        _ => {
            warn!("accept failed, pausing {RESOURCE_BACKOFF:?}: {error}");
            AcceptError::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_exhaustion_backs_off_and_peer_errors_are_skipped() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(
                accept_failed(&io::Error::from_raw_os_error(errno)),
                AcceptError::Resource
            );
        }
        for errno in [libc::ECONNABORTED, libc::ECONNRESET, libc::EPROTO] {
            assert_eq!(
                accept_failed(&io::Error::from_raw_os_error(errno)),
                AcceptError::Connection
            );
        }
    }
}
