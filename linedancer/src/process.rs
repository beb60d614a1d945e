//! The server's life as a process among others: listening sockets passed in by a
//! supervisor (systemd's socket activation), telling the supervisor that it is ready
//! and that it stops (`sd_notify`), and handing its listening sockets to a successor
//! that takes over without a refused connection (a zero-downtime upgrade).
//!
//! The upgrade runs over a Unix socket (mode 0600, and only a peer of the same user,
//! or root, is answered). The new process connects to it, and the running one sends
//! every listening socket it has (all the per-core sockets of each address, TCP and
//! Unix, and the upgrade socket itself) with `SCM_RIGHTS`, in messages of
//! [`HEADER`] bytes: `LDU1`, the count of sockets in all, the count in this message.
//! The new process starts accepting on them and writes [`READY`]; only then does the
//! running one stop accepting and drain. If the connection ends without it, the
//! running one goes on as if nothing happened. Both processes hold the same sockets
//! meanwhile: a client connecting at any moment is queued in a socket's backlog, and
//! accepted by one or the other.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sendfd::{RecvWithFd, SendWithFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::error::Error;
use crate::listener::{Gate, Listening};

/// Where a message of the upgrade begins.
const MAGIC: &[u8; 4] = b"LDU1";
/// The length of a message's bytes: [`MAGIC`], then the count of sockets in all and
/// in this message, as little-endian `u32`s.
const HEADER: usize = 12;
/// The most sockets sent in one message (the kernel takes up to 253).
const PER_MESSAGE: usize = 200;
/// What the new process writes once it accepts on the sockets.
const READY: &[u8] = b"READY\n";
/// The most sockets a successor takes: a bound on what a confused peer can make it
/// allocate.
const MAX_SOCKETS: u32 = 65_536;

/// Whether this process has already adopted the sockets of socket activation: they
/// are adopted once, by the first server that asks.
static ACTIVATION_TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening sockets passed by a supervisor: `LISTEN_FDS` sockets from fd 3 on,
/// when `LISTEN_PID` is this process. Empty when the variables are not set (or were
/// meant for another process), or when another server of this process took them.
pub(crate) fn activated() -> Result<Vec<Listening>, Error> {
    let fds = sd_notify::listen_fds().map_err(|e| Error::Activation {
        reason: format!("LISTEN_FDS or LISTEN_PID: {e}"),
    })?;
    if fds.len() == 0 || ACTIVATION_TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(Vec::new());
    }
    // Every fd is owned (and closed on error) before any is checked.
    // SAFETY: the supervisor passed these descriptors to this process, for it to take,
    // and this runs once per process.
    let owned: Vec<(RawFd, OwnedFd)> = fds
        .map(|fd| (fd, unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect();
    let mut sockets = Vec::with_capacity(owned.len());
    for (fd, socket) in owned {
        let socket = Listening::adopt(socket).map_err(|reason| Error::Activation {
            reason: format!("fd {fd}: {reason}"),
        })?;
        sockets.push(socket);
    }
    info!(
        sockets = sockets.len(),
        "adopted the sockets passed by the supervisor"
    );
    Ok(sockets)
}

/// Tells the supervisor (systemd, through `NOTIFY_SOCKET`) that the server accepts,
/// and that this process is now the main one (for an upgrade's successor). Nothing
/// without `NOTIFY_SOCKET`.
pub(crate) fn notify_ready() {
    let pid = std::process::id();
    let states = [
        sd_notify::NotifyState::MainPid(pid),
        sd_notify::NotifyState::Ready,
    ];
    if let Err(e) = sd_notify::notify(&states) {
        warn!("cannot tell the supervisor that the server is ready: {e}");
    }
}

/// Tells the supervisor that the server is stopping.
pub(crate) fn notify_stopping() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        warn!("cannot tell the supervisor that the server stops: {e}");
    }
}

/// The new process's side of an upgrade: its connection to the server it takes over
/// from.
#[derive(Debug)]
pub(crate) struct Successor {
    stream: UnixStream,
    path: PathBuf,
}

/// Connects to the server listening for a successor at `path`, and takes every
/// listening socket it has.
pub(crate) async fn take_over(path: &Path) -> Result<(Successor, Vec<Listening>), Error> {
    let failed = |reason: String| Error::Upgrade {
        path: path.to_owned(),
        reason,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| failed(format!("no server to take over from: {e}")))?;
    let sockets = receive(&stream).await.map_err(|e| failed(e.to_string()))?;
    let mut listening = Vec::with_capacity(sockets.len());
    for socket in sockets {
        listening.push(Listening::adopt(socket).map_err(&failed)?);
    }
    info!(path = %path.display(), sockets = listening.len(), "took over the listening sockets");
    let successor = Successor {
        stream,
        path: path.to_owned(),
    };
    Ok((successor, listening))
}

/// Receives the sockets of an upgrade, every one owned as it arrives.
async fn receive(stream: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    let mut sockets = Vec::new();
    let mut total = None;
    while total != Some(sockets.len()) {
        let mut bytes = [0; HEADER];
        let mut fds = [-1; PER_MESSAGE];
        let (read, received) = loop {
            stream.readable().await?;
            // A read that finds nothing says WouldBlock, and clears the readiness.
            match stream.recv_with_fd(&mut bytes, &mut fds) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                received => break received?,
            }
        };
        // SAFETY: the kernel has just made these descriptors for this process.
        let fds = fds[..received]
            .iter()
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) });
        sockets.extend(fds);
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if read == 0 {
            return Err(bad(
                "the server closed the connection before sending its sockets",
            ));
        }
        if read != HEADER || &bytes[..4] != MAGIC {
            return Err(bad("not a linedancer server's upgrade socket"));
        }
        let count = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let (all, here) = (count(4), count(8));
        if all > MAX_SOCKETS
            || here as usize != received
            || total.is_some_and(|t| t != all as usize)
        {
            return Err(bad("the counts of sockets do not add up"));
        }
        total = Some(all as usize);
        if sockets.len() > all as usize {
            return Err(bad("more sockets than announced"));
        }
    }
    Ok(sockets)
}

impl Successor {
    /// Tells the old server that this one accepts: it stops accepting, and drains. If
    /// it cannot be told (it is gone), this server serves on all the same.
    pub(crate) async fn ready(mut self) {
        if let Err(e) = self.stream.write_all(READY).await {
            warn!(path = %self.path.display(), "cannot tell the old server that this one is ready: {e}");
            return;
        }
        info!(path = %self.path.display(), "accepting; the old server stops accepting and drains");
    }
}

/// The running server's side: answers successors on the upgrade socket, one at a time,
/// until one is ready (returns `true`: the server has handed over and must drain) or
/// the server stops (`false`).
pub(crate) async fn serve_successors(
    listener: UnixListener,
    sockets: &Mutex<Vec<Listening>>,
    gate: &Gate,
) -> bool {
    loop {
        let accepted = tokio::select! {
            biased;
            () = gate.stopped() => return false,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("upgrade socket: accept failed: {e}");
                tokio::select! {
                    () = gate.stopped() => return false,
                    () = tokio::time::sleep(std::time::Duration::from_millis(100)) => continue,
                }
            }
        };
        if let Err(reason) = same_user(&stream) {
            warn!("upgrade socket: refused a peer: {reason}");
            continue;
        }
        let handed = tokio::select! {
            biased;
            () = gate.stopped() => return false,
            handed = hand_over(&mut stream, sockets) => handed,
        };
        match handed {
            Ok(()) => {
                info!("a successor took the listening sockets and is ready; draining");
                return true;
            }
            Err(e) => warn!("a successor failed before it was ready ({e}); serving on"),
        }
    }
}

/// Whether the peer runs as this process's user, or as root.
fn same_user(stream: &UnixStream) -> Result<(), String> {
    let cred = stream.peer_cred().map_err(|e| e.to_string())?;
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if cred.uid() == ours || cred.uid() == 0 {
        Ok(())
    } else {
        Err(format!("uid {} is not this server's ({ours})", cred.uid()))
    }
}

/// Sends the sockets, then waits for the successor to say that it is ready.
async fn hand_over(stream: &mut UnixStream, sockets: &Mutex<Vec<Listening>>) -> io::Result<()> {
    // Copies, so that the server may stop meanwhile and close its own.
    let copies: Vec<OwnedFd> = {
        let sockets = sockets.lock().expect("the sockets' lock is never poisoned");
        (sockets.iter())
            .map(|socket| socket.as_fd().try_clone_to_owned())
            .collect::<io::Result<_>>()?
    };
    let all = u32::try_from(copies.len()).map_err(io::Error::other)?;
    for chunk in copies.chunks(PER_MESSAGE) {
        let mut bytes = [0; HEADER];
        bytes[..4].copy_from_slice(MAGIC);
        bytes[4..8].copy_from_slice(&all.to_le_bytes());
        bytes[8..].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        let fds: Vec<RawFd> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = loop {
            stream.writable().await?;
            match stream.send_with_fd(&bytes, &fds) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                sent => break sent?,
            }
        };
        if sent != HEADER {
            return Err(io::Error::other("the message went out in part"));
        }
    }
    let mut answer = Vec::with_capacity(READY.len());
    (&mut *stream)
        .take(READY.len() as u64)
        .read_to_end(&mut answer)
        .await?;
    if answer != READY {
        return Err(io::Error::other("it closed the connection"));
    }
    Ok(())
}
