//! The handshake server over real sockets: the whole dialogue, its failures, framing
//! edge cases and shutdown.

mod common;

use std::time::Duration;

use common::{bounded, LineClient};
use linedancer::codec::Lines;
use linedancer::examples::{Handshake, WELCOME};
use linedancer::{Server, ServerHandle, ShutdownReport};
use tokio::io::AsyncWriteExt;

async fn handshake_server() -> ServerHandle {
    Server::builder()
        .port(0)
        .protocol_with_codec::<Handshake>(Lines::with_max_length(1024))
        .start()
        .await
        .expect("start the handshake server")
}

/// Reads an `auth-req:<key>` line and returns the key.
async fn challenge(client: &mut LineClient) -> u32 {
    let line = client.expect_line().await;
    let key = line
        .strip_prefix("auth-req:")
        .unwrap_or_else(|| panic!("not a challenge: {line}"));
    let key: u32 = key.parse().expect("a numeric key");
    assert!((1..=1_000_000).contains(&key), "key {key} out of range");
    key
}

/// Connects, checks the greeting, and returns the client and the first key.
async fn greeted(server: &ServerHandle) -> (LineClient, u32) {
    let mut client = LineClient::connect(server.local_addr()).await;
    for expected in WELCOME {
        assert_eq!(client.expect_line().await, expected);
    }
    let key = challenge(&mut client).await;
    (client, key)
}

/// A key that is not `key`.
fn wrong(key: u32) -> u32 {
    key % 1_000_000 + 1
}

/// Ensure the whole dialogue: greeting, a stray line and a wrong key (both failures),
/// the right key, then lines answered with the client's key, `\r\n` endings included.
#[tokio::test]
async fn the_whole_dialogue() {
    bounded(async {
        let server = handshake_server().await;
        let (mut client, _) = greeted(&server).await;

        client.send("hello?").await;
        assert_eq!(
            client.expect_line().await,
            "authentication failed, try again"
        );
        let key = challenge(&mut client).await;
        client.send(&format!("login:{}", wrong(key))).await;
        assert_eq!(
            client.expect_line().await,
            "authentication failed, try again"
        );
        let key = challenge(&mut client).await;

        client.send(&format!("login:{key}")).await;
        assert_eq!(
            client.expect_line().await,
            format!("authenticated as {key}")
        );
        client.send("G`day").await;
        assert_eq!(
            client.expect_line().await,
            format!("client[{key}] -> G`day")
        );
        client.writer.write_all(b"from telnet\r\n").await.unwrap();
        assert_eq!(
            client.expect_line().await,
            format!("client[{key}] -> from telnet")
        );
        client.send("login:1").await;
        assert_eq!(
            client.expect_line().await,
            format!("client[{key}] -> login:1")
        );
    })
    .await;
}

/// Ensure three failed logins get the server to say so and close the connection, and
/// that any line but the exact login counts as one: another line, an empty one, a
/// wrong key.
#[tokio::test]
async fn three_failed_logins_close_the_connection() {
    bounded(async {
        let server = handshake_server().await;
        let (mut client, mut key) = greeted(&server).await;
        for attempt in 1..=3 {
            match attempt {
                1 => client.send("not a login").await,
                2 => client.send("").await,
                _ => client.send(&format!("login:{}", wrong(key))).await,
            }
            if attempt < 3 {
                assert_eq!(
                    client.expect_line().await,
                    "authentication failed, try again"
                );
                key = challenge(&mut client).await;
            }
        }
        assert_eq!(
            client.expect_line().await,
            "authentication failed 3 times, closing the connection"
        );
        assert_eq!(
            client.line().await,
            None,
            "the server closes after the third failure"
        );
        drop(client);
        server.wait_connections(|n| n == 0).await;
    })
    .await;
}

/// Ensure a login sent one byte per write is assembled into one line.
#[tokio::test]
async fn a_line_sent_one_byte_at_a_time() {
    bounded(async {
        let server = handshake_server().await;
        let (mut client, key) = greeted(&server).await;
        for byte in format!("login:{key}\n").bytes() {
            client.writer.write_all(&[byte]).await.unwrap();
            client.writer.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(
            client.expect_line().await,
            format!("authenticated as {key}")
        );
    })
    .await;
}

/// Ensure many lines in one write are each answered, in order.
#[tokio::test]
async fn many_lines_in_one_write() {
    bounded(async {
        let server = handshake_server().await;
        let (mut client, key) = greeted(&server).await;
        let mut batch = format!("login:{key}\n");
        for i in 0..1000 {
            batch.push_str(&format!("line {i}\n"));
        }
        client.writer.write_all(batch.as_bytes()).await.unwrap();
        assert_eq!(
            client.expect_line().await,
            format!("authenticated as {key}")
        );
        for i in 0..1000 {
            assert_eq!(
                client.expect_line().await,
                format!("client[{key}] -> line {i}")
            );
        }
    })
    .await;
}

/// Ensure a line over the codec's limit closes that connection only.
#[tokio::test]
async fn an_overlong_line_closes_only_that_connection() {
    bounded(async {
        let server = handshake_server().await;
        let (mut other, other_key) = greeted(&server).await;
        let (mut client, _) = greeted(&server).await;
        client.send(&"x".repeat(5000)).await;
        assert_eq!(client.line().await, None, "closed after the overlong line");
        drop(client);

        other.send(&format!("login:{other_key}")).await;
        assert_eq!(
            other.expect_line().await,
            format!("authenticated as {other_key}")
        );
        assert_eq!(server.wait_connections(|n| n == 1).await, 1);
    })
    .await;
}

/// Ensure a graceful shutdown says goodbye to every line client and closes at once,
/// without waiting for the drain timeout.
#[tokio::test]
async fn shutdown_says_goodbye() {
    bounded(async {
        let server = handshake_server().await;
        let (first, _) = greeted(&server).await;
        let (mut second, key) = greeted(&server).await;
        second.send(&format!("login:{key}")).await;
        assert_eq!(
            second.expect_line().await,
            format!("authenticated as {key}")
        );

        let stopping = tokio::spawn({
            let server = server.clone();
            async move { server.shutdown_with_timeout(Duration::from_secs(20)).await }
        });
        for mut client in [first, second] {
            assert_eq!(client.expect_line().await, "server shutting down, goodbye");
            assert_eq!(client.line().await, None);
        }
        let report = stopping.await.unwrap();
        assert_eq!(
            report,
            ShutdownReport {
                drained: 2,
                force_closed: 0
            }
        );
    })
    .await;
}
