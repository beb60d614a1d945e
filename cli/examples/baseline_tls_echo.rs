//! The TLS echo server a user would write by hand with tokio-rustls, as the baseline
//! for linedancer's TLS: one task per connection, the handshake with a
//! `TlsAcceptor` (rustls, the ring provider, one certificate), then a 1 KiB buffer,
//! `read` then `write_all`, as `baseline_echo` does over TCP.
//!
//! `cargo run --release --example baseline_tls_echo -- --port 7002 --threads 1 \
//!     --tls-cert cert.pem --tls-key key.pem`

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// A plain tokio-rustls echo server on 127.0.0.1.
#[derive(Parser)]
struct Args {
    /// The port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 7002)]
    port: u16,
    /// Worker threads: 0 for tokio's default, 1 for a current-thread runtime.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// The certificate chain, PEM.
    #[arg(long)]
    tls_cert: PathBuf,
    /// Its private key, PEM.
    #[arg(long)]
    tls_key: PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let chain = CertificateDer::pem_file_iter(&args.tls_cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
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
            tokio::spawn(echo(acceptor.clone(), socket));
        }
    })
}

/// Does the handshake, then echoes until the peer closes or an error.
async fn echo(acceptor: TlsAcceptor, socket: TcpStream) {
    let Ok(mut tls) = acceptor.accept(socket).await else {
        return;
    };
    let mut buf = [0u8; 1024];
    while let Ok(n @ 1..) = tls.read(&mut buf).await {
        if tls.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
