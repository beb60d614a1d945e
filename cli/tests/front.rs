//! `linedancer serve` with TLS and the PROXY protocol: the flags, SIGHUP reloading the
//! certificates, the client's address from the header in the log, and the errors a
//! user can make. Certificates are made in the test with `openssl req`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use common::{fails, serve, TEST_TIMEOUT};

/// A self-signed certificate for localhost, written to `dir/<name>.pem` and
/// `dir/<name>.key`.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        // Not a CA (openssl's default for -x509), which TLS clients refuse to talk to.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl must be installed (.ci/run installs it)");
    assert!(status.success());
    (cert, key)
}

fn der(cert: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(cert).unwrap()
}

/// Connects over TLS to `addr` as `localhost`, trusting `certs` only.
async fn connect(addr: &str, certs: &[&Path]) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(der(cert)).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

async fn echoes(stream: &mut TlsStream<TcpStream>, text: &[u8]) {
    stream.write_all(text).await.unwrap();
    let mut echoed = vec![0; text.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, text);
}

/// Ensure `serve echo --tls-cert --tls-key` serves TLS, SIGHUP swaps in new files
/// without dropping a connection, a bad file on SIGHUP keeps the old certificate and
/// logs why, and the final stats count the failed handshakes.
#[tokio::test]
async fn serve_tls_and_reload_on_sighup() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path(), "site");
        let first = der(&cert);
        let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let mut server = serve(&[
            "serve",
            "echo",
            "--port",
            "0",
            "--tls-cert",
            cert_s,
            "--tls-key",
            key_s,
        ])
        .await;
        let addr = server.addr.clone();
        let mut old = connect(&addr, &[&cert]).await.expect("handshake");
        assert_eq!(presented(&old), first);
        echoes(&mut old, b"before\n").await;

        // New files in place; a client trusting only the first certificate now fails.
        let trusted_first = dir.path().join("first.pem");
        std::fs::copy(&cert, &trusted_first).unwrap();
        let (new_cert, new_key) = certificate(dir.path(), "next");
        std::fs::copy(&new_cert, &cert).unwrap();
        std::fs::copy(&new_key, &key).unwrap();
        server.signal(libc::SIGHUP);
        server.log.wait_for("TLS certificates reloaded").await;
        let mut new = connect(&addr, &[&new_cert])
            .await
            .expect("the new certificate");
        assert_eq!(presented(&new), der(&new_cert));
        echoes(&mut new, b"after\n").await;
        assert!(connect(&addr, &[&trusted_first]).await.is_err());

        // A broken key: SIGHUP keeps what is served, and says which file is at fault.
        std::fs::write(&key, "garbage").unwrap();
        server.signal(libc::SIGHUP);
        let refused = server.log.wait_for("keeping the certificates in use").await;
        assert!(refused.contains(key_s), "{refused}");
        let mut again = connect(&addr, &[&new_cert]).await.expect("still served");
        echoes(&mut again, b"again\n").await;

        // The connection from before both reloads goes on.
        echoes(&mut old, b"still\n").await;
        drop((old, new, again));
        server.signal(libc::SIGTERM);
        assert_eq!(server.child.wait().await.unwrap().code(), Some(0));
        let log = server.log.rest().await;
        assert!(log.contains("tls handshakes"), "{log}");
        assert!(log.contains("certificate rejected 1"), "{log}");
    })
    .await
    .expect("bounded");
}

/// Ensure `serve --proxy-protocol` takes the client's address from the header: the
/// connection's log lines name it as the peer, and the load balancer as the proxy.
#[tokio::test]
async fn serve_proxy_protocol_logs_the_clients_address() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut server = serve(&[
            "-v",
            "serve",
            "line-echo",
            "--port",
            "0",
            "--proxy-protocol",
            "--proxy-from",
            "127.0.0.0/8",
        ])
        .await;
        let mut client = TcpStream::connect(&server.addr).await.unwrap();
        let own = client.local_addr().unwrap().to_string();
        client
            .write_all(b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 7000\r\nhi\n")
            .await
            .unwrap();
        let mut echoed = [0; 3];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hi\n");
        let accepted = server.log.wait_for("connection accepted").await;
        assert!(accepted.contains(&format!("proxy={own}")), "{accepted}");
        drop(client);
        let closed = server.log.wait_for("connection closed").await;
        assert!(closed.contains("peer=192.0.2.7:51000"), "{closed}");
        server.signal(libc::SIGTERM);
        assert_eq!(server.child.wait().await.unwrap().code(), Some(0));
    })
    .await
    .expect("bounded");
}

/// Ensure bad TLS and PROXY flags exit 1 at start with an error naming the value.
#[tokio::test]
async fn bad_front_flags_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path(), "ok");
    let missing = dir.path().join("missing.pem");
    let (cert, key, missing) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        missing.to_str().unwrap(),
    );
    let cases: [(&[&str], String); 7] = [
        (
            &["--tls-cert", cert],
            "error: --tls-cert and --tls-key go in pairs: got 1 --tls-cert and 0 --tls-key".into(),
        ),
        (
            &["--tls-cert", missing, "--tls-key", key],
            format!("error: cannot use {missing}: No such file or directory"),
        ),
        (
            &["--tls-cert", key, "--tls-key", key],
            format!("error: cannot use {key}: no CERTIFICATE in the file"),
        ),
        (
            &["--tls-alpn", "h2"],
            "error: --tls-alpn h2 needs --tls-cert and --tls-key".into(),
        ),
        (
            &["--proxy-from", "10.0.0.0/8"],
            "error: --proxy-from 10.0.0.0/8 needs --proxy-protocol".into(),
        ),
        (
            &["--proxy-protocol", "--proxy-from", "10.0.0.0/40"],
            "error: invalid proxy_protocol trust 10.0.0.0/40".into(),
        ),
        (
            &["--max-handshakes", "0"],
            "error: invalid max_handshakes 0: must be at least 1".into(),
        ),
    ];
    for (flags, error) in cases {
        let args = [&["serve", "echo", "--port", "0"], flags].concat();
        let (code, stderr) = fails(&args).await;
        assert_eq!(code, 1, "{flags:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with(&error), "{flags:?}: {stderr}");
        assert!(!stderr.contains("listening"), "{flags:?}: {stderr}");
    }
}
