//! Relaying between two TCP sockets with `splice(2)`: the bytes go from one socket to a
//! pipe and from the pipe to the other socket inside the kernel, never copied to the
//! relay's memory, as HAProxy's `option splice-auto` does.
//!
//! Each direction fills a pipe from its source with what is there (64 KiB at most),
//! then empties it into its destination before reading again, so a pipe holds bytes
//! only while a destination is slow to take them. Empty pipes go back to a small
//! per-thread pool, so that idle relays hold none: a relay costs pipes only while it
//! moves bytes.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::Activity;

/// The most bytes one splice moves.
const CHUNK: usize = 64 * 1024;

/// Empty pipes each thread keeps for the next relay, at most.
const POOL: usize = 64;

/// A pipe: its read end and its write end.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe, from this thread's pool or new.
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = PIPES.with(|pool| pool.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Gives an empty pipe back to this thread's pool, or closes it.
    fn give_back(self) {
        PIPES.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOL {
                pool.push(self);
            }
        });
    }
}

/// Moves up to `len` bytes from `from` to `to` with one `splice(2)`.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: splice reads and writes only the descriptors; null offsets mean "the
    // current position", the only kind sockets and pipes have.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(moved as usize)
}

/// Relays both ways between `a` and `b` until both directions have ended, passing a
/// half-close on; returns the bytes moved from `a` to `b` and from `b` to `a`.
pub(super) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    activity: &Activity,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(one_way(a, b, activity), one_way(b, a, activity))
}

/// Moves what `from` sends to `to`, until `from` ends its side: then shuts `to`'s
/// write side.
async fn one_way(from: &TcpStream, to: &TcpStream, activity: &Activity) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let pipe = Pipe::take()?;
        let filled = loop {
            from.readable().await?;
            let moved = from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            });
            match moved {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            pipe.give_back();
            // A socket that is already gone needs no shutdown.
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(total);
        }
        activity.moved.fetch_add(1, Ordering::Relaxed);
        let mut left = filled;
        while left > 0 {
            let moved = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
            });
            match moved {
                Ok(n) => {
                    left -= n;
                    activity.written.fetch_add(1, Ordering::Relaxed);
                    activity.moved.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    activity.blocked.store(true, Ordering::Relaxed);
                    let ready = to.writable().await;
                    activity.blocked.store(false, Ordering::Relaxed);
                    ready?;
                }
                Err(e) => return Err(e),
            }
        }
        pipe.give_back();
        total += filled as u64;
    }
}
