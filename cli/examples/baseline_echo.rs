//! The echo server a user would write by hand with tokio, as a baseline for
//! `linedancer bench`: one task per connection, a 1 KiB buffer, `read` then `write_all`;
//! with `--lines`, a `Framed` stream of `LinesCodec` lines, each sent back.
//!
//! `cargo run --release --example baseline_echo -- --port 7001 --threads 1`

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, LinesCodec};

/// A plain tokio echo server on 127.0.0.1.
#[derive(Parser)]
struct Args {
    /// The port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 7001)]
    port: u16,
    /// Worker threads: 0 for tokio's default, 1 for a current-thread runtime.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Echo lines (at most 64 KiB) instead of bytes.
    #[arg(long)]
    lines: bool,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let mut builder = match args.threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if args.threads > 1 {
        builder.worker_threads(args.threads);
    }
    builder.enable_all().build()?.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", args.port)).await?;
        eprintln!("listening on {}", listener.local_addr()?);
        loop {
            let (socket, _) = listener.accept().await?;
            let _ = socket.set_nodelay(true);
            if args.lines {
                tokio::spawn(echo_lines(socket));
            } else {
                tokio::spawn(echo(socket));
            }
        }
    })
}

/// Echoes until the peer closes or an error.
async fn echo(mut socket: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = socket.read(&mut buf).await {
        if socket.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Echoes lines until the peer closes or an error.
async fn echo_lines(socket: TcpStream) {
    let mut lines = Framed::new(socket, LinesCodec::new_with_max_length(64 * 1024));
    while let Some(Ok(line)) = lines.next().await {
        if lines.send(line).await.is_err() {
            return;
        }
    }
}
