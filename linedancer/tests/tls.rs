//! TLS over real sockets: echo and the handshake example against a rustls client and
//! `openssl s_client`, SNI, ALPN, failed handshakes by reason, the handshake timeout
//! and cap, and certificate reload. Every certificate is made here (rcgen).

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::bounded;
use common::pki::{self, Pki};
use linedancer::codec::Lines;
use linedancer::examples::{Echo, Handshake};
use linedancer::{
    Builder, Ctx, Error, Next, Protocol, Server, ServerHandle, TlsConfig, TlsFailure,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Says what the TLS handshake settled, then echoes lines.
struct Whoami;

impl Protocol for Whoami {
    type Codec = Lines;
    type Reply = String;
    type Message = ();

    fn connect(ctx: &mut Ctx<'_, Self>) -> Self {
        let tls = ctx.tls().expect("served over TLS");
        let alpn = tls.alpn().map(|p| String::from_utf8_lossy(p).into_owned());
        ctx.send(format!(
            "sni={} alpn={} version={}",
            tls.server_name().unwrap_or("-"),
            alpn.as_deref().unwrap_or("-"),
            tls.version().unwrap_or("-"),
        ));
        Whoami
    }

    fn frame(&mut self, line: String, ctx: &mut Ctx<'_, Self>) -> Next {
        ctx.send(line);
        Next::Continue
    }
}

async fn echo_server(tls: TlsConfig) -> ServerHandle {
    Server::builder()
        .port(0)
        .tls(tls)
        .protocol::<Echo>()
        .start()
        .await
        .expect("start")
}

/// A CA, and a certificate for localhost that it signed.
fn localhost() -> (Pki, pki::ServerCert) {
    let pki = Pki::new();
    let cert = pki.server("localhost", &["localhost"], false);
    (pki, cert)
}

/// The echo server over TLS with `cert`, with the settings `configure` adds.
async fn echo_with(
    cert: &pki::ServerCert,
    configure: impl FnOnce(Builder<()>) -> Builder<()>,
) -> ServerHandle {
    let builder = Server::builder()
        .port(0)
        .tls(TlsConfig::pem_files(&cert.cert, &cert.key));
    configure(builder)
        .protocol::<Echo>()
        .start()
        .await
        .expect("start")
}

/// Waits until every connection has closed, then returns the failed handshakes of
/// `kind`.
async fn failures(server: &ServerHandle, kind: TlsFailure) -> u64 {
    server.wait_connections(|n| n == 0).await;
    server.stats().tls_handshake_failures.get(kind)
}

#[tokio::test]
async fn echo_over_tls_with_a_rustls_client() {
    bounded(async {
        let (pki, cert) = localhost();
        let server = echo_with(&cert, |b| b).await;
        let mut client = pki::connect(pki.client(&[]), server.local_addr(), "localhost")
            .await
            .expect("handshake");
        client.write_all(b"over tls\n").await.unwrap();
        let mut echoed = [0; 9];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"over tls\n");
        drop(client);
        assert_eq!(failures(&server, TlsFailure::Other).await, 0);
        let stats = server.stats();
        assert_eq!(stats.tls_handshake_failures.total(), 0);
        assert_eq!(stats.closed.tls_handshake, 0);
        assert_eq!(stats.bytes_in, 9, "the protocol's bytes, not TLS records");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn sni_picks_the_certificate_and_the_first_is_the_default() {
    bounded(async {
        let pki = Pki::new();
        let main = pki.server("main", &["localhost"], false);
        let api = pki.server("api", &["api.test", "*.api.test"], false);
        let tls = TlsConfig::pem_files(&main.cert, &main.key)
            .add_pem_files(&api.cert, &api.key)
            .alpn(["h2", "line"]);
        let server = Server::builder()
            .port(0)
            .tls(tls)
            .protocol::<Whoami>()
            .start()
            .await
            .unwrap();
        let addr = server.local_addr();
        for (name, expected, alpn) in [
            ("api.test", &api.der, "line"),
            ("eu.api.test", &api.der, "h2"),
            ("localhost", &main.der, "h2"),
            // An IP address: no SNI at all, so the default.
            ("127.0.0.1", &main.der, "line"),
        ] {
            let stream = pki::connect(pki.client(&[alpn]), addr, name)
                .await
                .unwrap_or_else(|e| panic!("handshake as {name}: {e}"));
            assert_eq!(&pki::presented(&stream), expected, "certificate for {name}");
            let mut lines = BufReader::new(stream);
            let mut hello = String::new();
            lines.read_line(&mut hello).await.unwrap();
            let sni = if name == "127.0.0.1" { "-" } else { name };
            assert_eq!(hello, format!("sni={sni} alpn={alpn} version=TLSv1_3\n"));
        }
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_client_that_rejects_the_certificate_fails_cleanly_and_is_counted() {
    bounded(async {
        let pki = Pki::new();
        let expired = pki.server("expired", &["localhost"], true);
        let server = echo_with(&expired, |b| b).await;
        let err = pki::connect(pki.client(&[]), server.local_addr(), "localhost")
            .await
            .expect_err("an expired certificate must be refused");
        assert!(err.to_string().contains("expired"), "{err}");
        assert_eq!(failures(&server, TlsFailure::CertificateRejected).await, 1);
        assert_eq!(server.stats().closed.tls_handshake, 1);
        server.shutdown().await;

        let valid = pki.server("valid", &["localhost"], false);
        let server = echo_with(&valid, |b| b).await;
        let err = pki::connect(pki::untrusting_client(), server.local_addr(), "localhost")
            .await
            .expect_err("an unknown CA must be refused");
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        assert_eq!(failures(&server, TlsFailure::CertificateRejected).await, 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn plain_text_on_a_tls_port_is_a_bad_message() {
    bounded(async {
        let (_pki, cert) = localhost();
        let server = echo_with(&cert, |b| b).await;
        let mut tcp = TcpStream::connect(server.local_addr()).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        // The server answers with an alert, or nothing, and closes: never an echo.
        let _ = tcp.read_to_end(&mut rest).await;
        assert!(!rest.starts_with(b"GET"), "plain text was echoed");
        assert_eq!(failures(&server, TlsFailure::BadMessage).await, 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_handshake_not_done_within_the_timeout_is_closed() {
    bounded(async {
        let (_pki, cert) = localhost();
        let server = echo_with(&cert, |b| {
            b.tls_handshake_timeout(Duration::from_millis(200))
        })
        .await;
        // Connects, and never says hello.
        let mut silent = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut buf = [0; 16];
        assert_eq!(
            silent.read(&mut buf).await.unwrap(),
            0,
            "closed by the server"
        );
        assert_eq!(failures(&server, TlsFailure::Timeout).await, 1);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn at_the_handshake_cap_new_connections_wait_until_one_finishes() {
    bounded(async {
        let (pki, cert) = localhost();
        let server = echo_with(&cert, |b| b.max_handshakes(1)).await;
        let addr = server.local_addr();
        // Holds the only handshake slot: connected, silent.
        let stalled = TcpStream::connect(addr).await.unwrap();
        server.wait_connections(|n| n == 1).await;
        let waiting = tokio::spawn(pki::connect(pki.client(&[]), addr, "localhost"));
        // While the stalled one holds the slot, the next is accepted but not served.
        let early = tokio::time::timeout(Duration::from_millis(300), async {
            server.wait_connections(|n| n == 2).await
        })
        .await;
        assert!(early.is_err(), "a second handshake started at a cap of 1");
        assert!(!waiting.is_finished());
        drop(stalled);
        let mut client = waiting
            .await
            .unwrap()
            .expect("handshake once the slot is free");
        client.write_all(b"in\n").await.unwrap();
        let mut echoed = [0; 3];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"in\n");
        drop(client);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reload_serves_new_certificates_keeps_connections_and_refuses_bad_files() {
    bounded(async {
        let pki = Pki::new();
        let first = pki.server("site", &["localhost"], false);
        let server = echo_with(&first, |b| b).await;
        let addr = server.local_addr();
        let mut old = pki::connect(pki.client(&[]), addr, "localhost")
            .await
            .unwrap();
        assert_eq!(pki::presented(&old), first.der);

        // New files in the same place.
        let second = pki.server("site", &["localhost"], false);
        assert_ne!(second.der, first.der);
        assert_eq!(server.reload_tls().unwrap(), 1);
        let new = pki::connect(pki.client(&[]), addr, "localhost")
            .await
            .unwrap();
        assert_eq!(pki::presented(&new), second.der);

        // A broken file: the reload fails naming it, and the certificate in use stays.
        std::fs::write(&second.key, "not a key").unwrap();
        let err = server.reload_tls().expect_err("a bad key must be refused");
        assert!(
            matches!(&err, Error::Certificate { path, .. } if *path == second.key),
            "{err}"
        );
        let again = pki::connect(pki.client(&[]), addr, "localhost")
            .await
            .unwrap();
        assert_eq!(pki::presented(&again), second.der);

        // The connection made before the reloads goes on.
        old.write_all(b"still\n").await.unwrap();
        let mut echoed = [0; 6];
        old.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"still\n");
        drop((old, new, again));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bad_files_fail_the_start_naming_the_file() {
    let pki = Pki::new();
    let cert = pki.server("a", &["localhost"], false);
    let other = pki.server("b", &["localhost"], false);
    let missing = pki.dir.path().join("missing.pem");
    for (tls, at_fault, why) in [
        (
            TlsConfig::pem_files(&missing, &cert.key),
            &missing,
            "No such file",
        ),
        (
            TlsConfig::pem_files(&cert.key, &cert.key),
            &cert.key,
            "no CERTIFICATE",
        ),
        (
            TlsConfig::pem_files(&cert.cert, &cert.cert),
            &cert.cert,
            "no PRIVATE KEY",
        ),
        (
            TlsConfig::pem_files(&cert.cert, &other.key),
            &other.key,
            "cannot use this key",
        ),
    ] {
        let err = Server::builder()
            .port(0)
            .tls(tls)
            .protocol::<Echo>()
            .start()
            .await
            .expect_err("bad TLS files must fail the start");
        let text = err.to_string();
        assert!(
            matches!(&err, Error::Certificate { path, .. } if path == at_fault),
            "{text}"
        );
        assert!(text.contains(why), "{text}");
        assert!(text.contains(&at_fault.display().to_string()), "{text}");
    }
}

#[tokio::test]
async fn a_server_config_of_your_own_is_used_as_it_is() {
    bounded(async {
        let (pki, cert) = localhost();
        let chain = vec![cert.der.clone()];
        let key = linedancer::rustls::pki_types::PrivateKeyDer::from_pem_file(&cert.key);
        use linedancer::rustls::pki_types::pem::PemObject;
        let config = linedancer::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key.unwrap())
            .unwrap();
        let server = echo_server(TlsConfig::server_config(Arc::new(config))).await;
        let mut client = pki::connect(pki.client(&[]), server.local_addr(), "localhost")
            .await
            .unwrap();
        client.write_all(b"own\n").await.unwrap();
        let mut echoed = [0; 4];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"own\n");
        assert_eq!(server.reload_tls().unwrap(), 0, "nothing to reload");
        drop(client);
        server.shutdown().await;
    })
    .await;
}

/// Runs `openssl s_client` against `port`, verifying the server's certificate with
/// `ca`, writes `input` and returns what it printed once `until` appeared.
async fn s_client(port: u16, ca: &std::path::Path, input: &str, until: &str) -> String {
    let mut child = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-servername",
            "localhost",
        ])
        .arg("-connect")
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl must be installed (.ci/run installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).await.unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains(until) {
        let mut line = String::new();
        if stdout.read_line(&mut line).await.unwrap() == 0 {
            break;
        }
        printed.push_str(&line);
    }
    drop(stdin);
    printed
}

#[tokio::test]
async fn echo_and_handshake_answer_openssl_s_client() {
    bounded(async {
        let (pki, cert) = localhost();
        let ca = pki.ca_file();
        let tls = TlsConfig::pem_files(&cert.cert, &cert.key);

        let echo = echo_server(tls.clone()).await;
        let printed = s_client(echo.local_addr().port(), &ca, "from openssl\n", "openssl").await;
        assert_eq!(printed, "from openssl\n");
        echo.shutdown().await;

        let handshake = Server::builder()
            .port(0)
            .tls(tls)
            .protocol::<Handshake>()
            .start()
            .await
            .unwrap();
        let printed = s_client(handshake.local_addr().port(), &ca, "", "auth-req:").await;
        assert!(printed.starts_with("Welcome to the stateful"), "{printed}");
        assert!(printed.contains("auth-req:"), "{printed}");
        handshake.shutdown().await;
    })
    .await;
}
