//! Listening sockets, the accept loop, and the [`Gate`] that suspends, resumes and stops
//! accepting.
//!
//! Sockets are made with `socket2` (`SO_REUSEADDR`, our own backlog) and every accepted
//! socket gets `TCP_NODELAY`. The accept loop takes a connection slot for each
//! connection it accepts; at the limit, the connection in hand waits for a slot and no
//! other is accepted meanwhile (nothing is accepted and closed). No accept error ends
//! it: each is sorted by kind in [`accept_failed`].

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol as IpProtocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tracing::{debug, warn};

use crate::close::CloseReason;
use crate::connections::{Connection, Connections};
use crate::handler::Service;
use crate::transport::{Address, Front, TransportInfo};

/// How long the acceptor pauses after an error that says the process or the system is
/// out of a resource (file descriptors, buffers, memory), before it tries again.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

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
/// refused; while the gate is suspended they wait in the backlog.
pub(crate) async fn accept_loop<H: Service>(
    listener: TcpListener,
    connections: Arc<Connections<H::Message>>,
    service: Arc<H>,
    front: Option<Arc<Front>>,
    gate: Arc<Gate>,
) {
    let local_addr = match listener.local_addr() {
        Ok(addr) => Address::Ip(addr),
        Err(e) => {
            warn!("cannot read the listener's address: {e}");
            return;
        }
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
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer_addr)) => {
                    // A slot at once below the limit; at it, this connection waits for
                    // one and no other is accepted meanwhile. A slot is taken only with
                    // a connection in hand: one held while waiting for a connection
                    // could be the last, kept from a client queued at another of the
                    // per-core sockets or from a stream handed to the server.
                    let reservation = match connections.try_reserve() {
                        Some(reservation) => reservation,
                        None => tokio::select! {
                            biased;
                            // Never served: closed with the listener.
                            () = gate.stopped() => return,
                            reservation = connections.reserve() => reservation,
                        },
                    };
                    ACCEPTED.with(|accepted| accepted.set(accepted.get() + 1));
                    if let Err(e) = stream.set_nodelay(true) {
                        // The peer is already gone; the connection task will find out.
                        debug!(%peer_addr, "cannot set TCP_NODELAY: {e}");
                    }
                    let service = Arc::clone(&service);
                    let (peer, local) = (Address::Ip(peer_addr), local_addr.clone());
                    let Some(front) = &front else {
                        connections.spawn(
                            reservation,
                            peer,
                            local,
                            false,
                            move |conn| async move { service.serve(stream, conn).await },
                        );
                        continue;
                    };
                    // At the cap on openings in progress, this connection waits for a
                    // permit and no other is accepted meanwhile.
                    let handshakes = Arc::clone(&front.handshakes);
                    let permit = match handshakes.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => tokio::select! {
                            biased;
                            () = gate.stopped() => return,
                            permit = handshakes.acquire_owned() => {
                                permit.expect("the handshake semaphore is never closed")
                            }
                        },
                    };
                    let front = Arc::clone(front);
                    let proxied = front.proxy.is_some();
                    connections.spawn(reservation, peer, local, proxied, move |conn| async move {
                        open_and_serve(&front, stream, peer_addr, conn, permit, &*service).await
                    });
                }
                Err(e) => {
                    connections.accept_error();
                    if accept_failed(&e) == AfterError::Backoff {
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

/// Opens a connection (its PROXY header, then its TLS handshake, as the server has
/// them), then serves it. A connection that fails to open is closed with the reason,
/// and its protocol never sees it; so is one still opening when the server drains.
async fn open_and_serve<H: Service>(
    front: &Front,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut conn: Connection<H::Message>,
    permit: OwnedSemaphorePermit,
    service: &H,
) -> io::Result<()> {
    let mut transport = TransportInfo::default();
    if let Some(proxy) = &front.proxy {
        let header = tokio::select! {
            biased;
            () = conn.shutdown_requested() => Err(CloseReason::Shutdown),
            header = proxy.read(&mut stream, peer) => header,
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

/// What the acceptor does after a failed `accept()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterError {
    /// Accept the next connection at once.
    Retry,
    /// Pause, then try again.
    Backoff,
}

/// Sorts an accept error, logs it, and says what to do next.
fn accept_failed(error: &io::Error) -> AfterError {
    match error.raw_os_error() {
        // Out of file descriptors (the process's or the system's), socket buffers or
        // memory: the pending connection stays in the backlog and the next accept would
        // fail the same way, so retrying at once is a busy loop. Pause until
        // connections close and free what is missing; retry for as long as it takes.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            warn!("accept failed, pausing {RESOURCE_BACKOFF:?}: {error}");
            AfterError::Backoff
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
            AfterError::Retry
        }
        // Anything else is unexpected: pause as for exhaustion rather than risk
        // spinning on an error that repeats.
        _ => {
            warn!("accept failed, pausing {RESOURCE_BACKOFF:?}: {error}");
            AfterError::Backoff
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
                AfterError::Backoff
            );
        }
        for errno in [libc::ECONNABORTED, libc::ECONNRESET, libc::EPROTO] {
            assert_eq!(
                accept_failed(&io::Error::from_raw_os_error(errno)),
                AfterError::Retry
            );
        }
    }
}
