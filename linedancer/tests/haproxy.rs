//! A real HAProxy (Debian's `haproxy`, installed by `.ci/run`) with `send-proxy-v2` in
//! front of the chat server: each client's own address, not HAProxy's, reaches the
//! server and its connection list.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{bounded, free_port, LineClient};
use linedancer::examples::{Chat, Rooms};
use linedancer::{Address, ProxyProtocol, Server};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Command;

/// Connects to `to` from the loopback address `from`, as a client of its own.
async fn client_from(from: Ipv4Addr, to: SocketAddr) -> LineClient {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let stream = socket.connect(to).await.unwrap();
    LineClient::from_stream(stream)
}

#[tokio::test]
async fn haproxy_send_proxy_v2_in_front_of_chat_passes_each_clients_address() {
    bounded(async {
        let server = Server::builder()
            .port(0)
            // HAProxy connects from 127.0.0.1; nobody else may send a header.
            .proxy_protocol(ProxyProtocol::new().trust("127.0.0.1"))
            .state(Arc::new(Rooms::default()))
            .protocol::<Chat>()
            .start()
            .await
            .unwrap();
        let front = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
                 timeout server 30s\n\
                 frontend chat\n  bind {front}\n  default_backend linedancer\n\
                 backend linedancer\n  server chat {backend} send-proxy-v2\n",
                backend = server.local_addr(),
            ),
        )
        .unwrap();
        let mut haproxy = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy must be installed (.ci/run installs it)");

        // HAProxy says nothing when it is ready: wait until its port takes connections
        // (each try reaches the chat server, which the checks below allow for).
        let mut tries = 0;
        while TcpStream::connect(front).await.is_err() {
            if let Ok(Some(status)) = haproxy.try_wait() {
                let mut err = String::new();
                use tokio::io::AsyncReadExt;
                let _ = haproxy
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .await;
                panic!("haproxy exited with {status}: {err}");
            }
            tries += 1;
            assert!(tries < 200, "haproxy did not listen on {front}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }

        let mut ann = client_from(Ipv4Addr::new(127, 0, 0, 2), front).await;
        let mut bob = client_from(Ipv4Addr::new(127, 0, 0, 3), front).await;
        ann.expect_line().await; // welcome
        bob.expect_line().await;
        ann.send("/nick ann").await;
        bob.send("hello through haproxy").await;
        // Ann hears her new nick and bob's line, in either order, among the comings and
        // goings of bob and of the connections that checked HAProxy was up.
        let mut heard: Vec<String> = Vec::new();
        while !(heard.iter().any(|l| l.ends_with("> hello through haproxy"))
            && heard.iter().any(|l| l == "* you are now ann"))
        {
            heard.push(ann.expect_line().await);
            assert!(heard.len() <= 20, "{heard:?}");
        }

        let peers: Vec<Address> = server
            .connections_info()
            .into_iter()
            .map(|c| c.peer_addr)
            .collect();
        // HAProxy connects from 127.0.0.1: these addresses came in the headers.
        for client in [&ann, &bob] {
            let own = client.writer.local_addr().unwrap();
            assert!(peers.contains(&Address::Ip(own)), "{own} not in {peers:?}");
        }
        drop((ann, bob));
        server.shutdown().await;
    })
    .await;
}
