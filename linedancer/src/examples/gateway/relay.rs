//! Moving bytes both ways between a client and its upstream, as tokio's
//! `copy_bidirectional` does (a half-close is passed on, the write side flushed before
//! the relay waits), but holding a buffer only while bytes are in flight: an idle
//! relay holds none. Buffers come from a pool of the thread's, so that a relay, however
//! short, neither allocates nor zeroes one.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size of a relay's buffers: what one read takes at most.
const BUFFER: usize = 8 * 1024;

/// Idle buffers a thread keeps for its relays (2 MiB); more are freed.
const POOLED: usize = 256;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from the thread's pool, or a new one.
fn take() -> Box<[u8]> {
    POOL.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| vec![0; BUFFER].into_boxed_slice())
}

/// Gives a buffer back to the thread's pool.
fn give(buffer: Box<[u8]>) {
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOLED {
            pool.push(buffer);
        }
    });
}

/// Relays between `a` and `b` until both directions have ended: what one side reads
/// is written to the other, and the end of one side's bytes shuts the other's write
/// side down. Returns the bytes moved from `a` to `b` and from `b` to `a`, or the
/// first error of either direction.
pub(super) async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut up, mut down) = (Pipe::default(), Pipe::default());
    poll_fn(|cx| {
        let up_done = up.poll(cx, &mut *a, &mut *b)?.is_ready();
        let down_done = down.poll(cx, &mut *b, &mut *a)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok((up.moved, down.moved)))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a relay.
#[derive(Default)]
struct Pipe {
    /// Bytes read and not all written yet: the buffer, and the part of it still to go.
    pending: Option<(Box<[u8]>, usize, usize)>,
    /// Written since the last flush.
    unflushed: bool,
    /// The reading side has ended.
    read_done: bool,
    /// The writing side is shut down: the direction has ended.
    done: bool,
    moved: u64,
}

impl Pipe {
    /// Moves what `from` has to `to`; ready once `from` has ended and `to` is shut
    /// down.
    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            if let Some((buffer, start, end)) = &mut self.pending {
                while start < end {
                    let n = ready!(Pin::new(&mut *to).poll_write(cx, &buffer[*start..*end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    *start += n;
                    self.moved += n as u64;
                }
                if let Some((buffer, ..)) = self.pending.take() {
                    give(buffer);
                }
                self.unflushed = true;
            }
            if self.read_done {
                ready!(self.flush(cx, to))?;
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                break;
            }
            let mut buffer = take();
            let mut read = ReadBuf::new(&mut buffer);
            let polled = Pin::new(&mut *from).poll_read(cx, &mut read);
            let n = read.filled().len();
            if matches!(polled, Poll::Ready(Ok(()))) && n > 0 {
                self.pending = Some((buffer, 0, n));
                continue;
            }
            give(buffer);
            match polled {
                Poll::Ready(Ok(())) => self.read_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    ready!(self.flush(cx, to))?;
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Flushes `to` if bytes were written to it since it last was.
    fn flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(Pin::new(to).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if let Some((buffer, ..)) = self.pending.take() {
            give(buffer);
        }
    }
}
