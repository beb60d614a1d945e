//! The Redis-compatible `kv` example: commands and expiry in the harness, then over
//! real sockets with raw RESP, inline commands, many connections, publish/subscribe,
//! malformed requests, and a Redis client library.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{bounded, TEST_TIMEOUT};
use linedancer::examples::kv::{Db, Published, MAX_BULK};
use linedancer::examples::Kv;
use linedancer::testing::{Harness, Outgoing};
use linedancer::{ConnectionId, Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// `words` as a RESP array of bulk strings.
fn resp(words: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for word in words {
        out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        out.extend_from_slice(word);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A harness connection to a `kv` server with the store `db`, as connection `id`.
fn connect(db: &Arc<Db>, id: u64) -> Harness<Kv, Db> {
    Harness::connect_with(Default::default(), Arc::clone(db), ConnectionId(id))
}

/// Sends one command through the harness and returns the reply's bytes.
fn call(conn: &mut Harness<Kv, Db>, words: &[&[u8]]) -> String {
    conn.feed(resp(words));
    conn.take_text()
}

/// Ensure each command answers as Redis 7 does, errors included, and that the
/// connection goes on after an error.
#[test]
fn commands_answer_as_redis_does() {
    let db = Arc::new(Db::new());
    let mut conn = connect(&db, 1);
    let cases: &[(&[&[u8]], &str)] = &[
        (&[b"PING"], "+PONG\r\n"),
        (&[b"ping", b"hi"], "$2\r\nhi\r\n"),
        (&[b"ECHO", b"a\r\nb"], "$4\r\na\r\nb\r\n"),
        (&[b"GET", b"k"], "$-1\r\n"),
        (&[b"SET", b"k", b"v\0\xff"], "+OK\r\n"),
        (&[b"GET", b"k"], "$3\r\nv\0\u{fffd}\r\n"),
        (&[b"SET", b"k", b"w", b"NX"], "$-1\r\n"),
        (&[b"SET", b"new", b"w", b"XX"], "$-1\r\n"),
        (
            &[b"SET", b"k", b"w", b"EX", b"0"],
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        (
            &[b"SET", b"k", b"w", b"EX", b"x"],
            "-ERR value is not an integer or out of range\r\n",
        ),
        (&[b"SET", b"k", b"w", b"NX", b"XX"], "-ERR syntax error\r\n"),
        (&[b"INCR", b"n"], ":1\r\n"),
        (&[b"INCRBY", b"n", b"41"], ":42\r\n"),
        (&[b"DECR", b"n"], ":41\r\n"),
        (
            &[b"INCR", b"k"],
            "-ERR value is not an integer or out of range\r\n",
        ),
        (
            &[b"INCRBY", b"n", b"1.5"],
            "-ERR value is not an integer or out of range\r\n",
        ),
        (&[b"SET", b"max", b"9223372036854775807"], "+OK\r\n"),
        (
            &[b"INCR", b"max"],
            "-ERR increment or decrement would overflow\r\n",
        ),
        (&[b"MSET", b"a", b"1", b"b", b"2"], "+OK\r\n"),
        (
            &[b"MSET", b"a", b"1", b"b"],
            "-ERR wrong number of arguments for 'mset' command\r\n",
        ),
        (
            &[b"MGET", b"a", b"nope", b"b"],
            "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n",
        ),
        (&[b"EXISTS", b"a", b"a", b"nope"], ":2\r\n"),
        (&[b"DEL", b"a", b"b", b"nope"], ":2\r\n"),
        (&[b"TTL", b"n"], ":-1\r\n"),
        (&[b"TTL", b"nope"], ":-2\r\n"),
        (&[b"EXPIRE", b"nope", b"10"], ":0\r\n"),
        (&[b"DBSIZE"], ":3\r\n"),
        (
            &[b"GET"],
            "-ERR wrong number of arguments for 'get' command\r\n",
        ),
        (
            &[b"FROB", b"x", b"y"],
            "-ERR unknown command 'FROB', with args beginning with: 'x' 'y' \r\n",
        ),
        (&[b"FLUSHDB"], "+OK\r\n"),
        (&[b"DBSIZE"], ":0\r\n"),
        (
            &[b"CONFIG", b"GET", b"save"],
            "*2\r\n$4\r\nsave\r\n$0\r\n\r\n",
        ),
    ];
    for (words, expected) in cases {
        let got = call(&mut conn, words);
        assert_eq!(
            got,
            *expected,
            "{:?}",
            words
                .iter()
                .map(|w| String::from_utf8_lossy(w))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(call(&mut conn, &[b"QUIT"]), "+OK\r\n");
    assert!(conn.is_closed());
}

/// Ensure nothing a peer sends can panic the protocol: times to live at the edge of
/// the clock, and a thousand random byte strings (bounded, with RESP's own bytes
/// mixed in) fed in random splits, each on a fresh connection to one shared store.
#[test]
fn hostile_bytes_cannot_panic_the_server() {
    let db = Arc::new(Db::new());
    let mut conn = connect(&db, 1);
    let max = i64::MAX.to_string();
    for (words, expected) in [
        (
            vec!["SET", "k", "v", "EX", max.as_str()],
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        (
            vec!["SET", "k", "v", "PX", max.as_str()],
            "-ERR invalid expire time in 'set' command\r\n",
        ),
        (vec!["SET", "k", "v"], "+OK\r\n"),
        (
            vec!["EXPIRE", "k", max.as_str()],
            "-ERR invalid expire time in 'expire' command\r\n",
        ),
        (
            vec!["INCRBY", "n", &i64::MIN.to_string()],
            ":-9223372036854775808\r\n",
        ),
        (
            vec!["DECR", "n"],
            "-ERR increment or decrement would overflow\r\n",
        ),
    ] {
        let words: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        assert_eq!(call(&mut conn, &words), expected);
    }
    let alphabet: &[u8] = b"*$:+-\r\n0123456789-SETGETINCRsubscribe \"\\\x00\xff";
    for round in 0..1000u64 {
        let mut conn = connect(&db, round + 2);
        let len = fastrand::usize(0..200);
        let bytes: Vec<u8> = (0..len)
            .map(|_| alphabet[fastrand::usize(..alphabet.len())])
            .collect();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = fastrand::usize(1..=rest.len());
            conn.feed(&rest[..n]);
            rest = &rest[n..];
        }
        conn.feed_eof();
        assert!(conn.is_closed());
        let _ = conn.take_output();
    }
}

/// Ensure keys expire in the harness's virtual time: `TTL` counts down, the key is gone
/// once due, `EXPIRE` in the past removes it, `INCR` keeps a key's time to live, and a
/// plain `SET` clears it.
#[test]
fn expiry_in_virtual_time() {
    let db = Arc::new(Db::new());
    let mut conn = connect(&db, 1);
    assert_eq!(
        call(&mut conn, &[b"SET", b"k", b"v", b"EX", b"10"]),
        "+OK\r\n"
    );
    assert_eq!(
        call(&mut conn, &[b"SET", b"p", b"1", b"PX", b"1500"]),
        "+OK\r\n"
    );
    assert_eq!(call(&mut conn, &[b"INCR", b"p"]), ":2\r\n");
    conn.advance(Duration::from_millis(1400));
    assert_eq!(call(&mut conn, &[b"TTL", b"k"]), ":9\r\n"); // 8.6 s, rounded
    assert_eq!(call(&mut conn, &[b"GET", b"p"]), "$1\r\n2\r\n");
    conn.advance(Duration::from_millis(100));
    assert_eq!(call(&mut conn, &[b"GET", b"p"]), "$-1\r\n");
    conn.advance(Duration::from_millis(8500));
    assert_eq!(call(&mut conn, &[b"GET", b"k"]), "$-1\r\n");
    assert_eq!(call(&mut conn, &[b"TTL", b"k"]), ":-2\r\n");
    assert_eq!(call(&mut conn, &[b"DBSIZE"]), ":0\r\n");

    assert_eq!(call(&mut conn, &[b"SET", b"k", b"v"]), "+OK\r\n");
    assert_eq!(call(&mut conn, &[b"EXPIRE", b"k", b"100"]), ":1\r\n");
    assert_eq!(call(&mut conn, &[b"TTL", b"k"]), ":100\r\n");
    assert_eq!(call(&mut conn, &[b"SET", b"k", b"w"]), "+OK\r\n");
    assert_eq!(call(&mut conn, &[b"TTL", b"k"]), ":-1\r\n");
    assert_eq!(call(&mut conn, &[b"EXPIRE", b"k", b"-1"]), ":1\r\n");
    assert_eq!(call(&mut conn, &[b"EXISTS", b"k"]), ":0\r\n");
    // Other connections see the same store (each harness connection has a virtual
    // clock of its own, here 10 s behind this one's).
    let mut other = connect(&db, 2);
    assert_eq!(
        call(&mut other, &[b"SET", b"shared", b"1", b"EX", b"60"]),
        "+OK\r\n"
    );
    assert_eq!(call(&mut conn, &[b"TTL", b"shared"]), ":50\r\n");
}

/// Ensure a subscriber joins its channels' groups, is held to the subscribed commands,
/// and writes each published message; a publisher broadcasts to the channel's group.
#[test]
fn publish_and_subscribe_in_the_harness() {
    let db = Arc::new(Db::new());
    let mut sub = connect(&db, 1);
    assert_eq!(
        call(&mut sub, &[b"SUBSCRIBE", b"news", b"sport"]),
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$9\r\nsubscribe\r\n$5\r\nsport\r\n:2\r\n"
    );
    assert_eq!(
        sub.take_outgoing(),
        vec![
            Outgoing::Join("kv:news".into()),
            Outgoing::Join("kv:sport".into())
        ]
    );
    assert_eq!(sub.state_name(), Some("SUBSCRIBED"));
    assert_eq!(
        call(&mut sub, &[b"GET", b"x"]),
        "-ERR Can't execute 'get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT \
         / RESET are allowed in this context\r\n"
    );
    assert_eq!(call(&mut sub, &[b"PING"]), "*2\r\n$4\r\npong\r\n$0\r\n\r\n");

    let mut publisher = connect(&db, 2);
    assert_eq!(
        call(&mut publisher, &[b"PUBLISH", b"news", b"hello"]),
        ":1\r\n"
    );
    assert_eq!(
        call(&mut publisher, &[b"PUBLISH", b"nobody", b"hello"]),
        ":0\r\n"
    );
    let published = Published {
        channel: "news".into(),
        payload: "hello".into(),
    };
    assert_eq!(
        publisher.take_outgoing()[0],
        Outgoing::Broadcast {
            group: "kv:news".into(),
            message: published.clone(),
        }
    );
    sub.deliver(published);
    assert_eq!(
        sub.take_text(),
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );

    assert_eq!(
        call(&mut sub, &[b"UNSUBSCRIBE"]),
        "*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:1\r\n*3\r\n$11\r\nunsubscribe\r\n$5\r\nsport\r\n:0\r\n"
    );
    assert_eq!(
        call(&mut publisher, &[b"PUBLISH", b"news", b"again"]),
        ":0\r\n"
    );
    assert_eq!(sub.state_name(), Some("COMMANDS"));
}

/// Starts a `kv` server on a free port.
async fn kv_server() -> ServerHandle<Published> {
    Server::builder()
        .port(0)
        .state(Arc::new(Db::new()))
        .protocol::<Kv>()
        .start()
        .await
        .expect("start the kv server")
}

/// Sends `request` and reads until `expected.len()` bytes have come back.
async fn exchange(stream: &mut TcpStream, request: &[u8], expected: &str) {
    stream.write_all(request).await.unwrap();
    let mut reply = vec![0; expected.len()];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&reply), expected);
}

/// Reads until the server closes, and returns what it sent.
async fn rest(stream: &mut TcpStream) -> String {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    String::from_utf8_lossy(&rest).into_owned()
}

/// Ensure 50 connections doing 200 `INCR n` each, at once, leave `n` at exactly 10000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_connections_incr_one_counter() {
    bounded(async {
        let server = kv_server().await;
        let addr = server.local_addr();
        let mut clients = JoinSet::new();
        for _ in 0..50 {
            clients.spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                for _ in 0..200 {
                    stream.write_all(&resp(&[b"INCR", b"n"])).await.unwrap();
                    let mut reply = [0; 64];
                    let n = stream.read(&mut reply).await.unwrap();
                    assert!(reply[..n].starts_with(b":"), "{:?}", &reply[..n]);
                }
            });
        }
        while let Some(client) = clients.join_next().await {
            client.unwrap();
        }
        let mut stream = TcpStream::connect(addr).await.unwrap();
        exchange(&mut stream, &resp(&[b"GET", b"n"]), "$5\r\n10000\r\n").await;
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}

/// Ensure inline commands work as typed into netcat, quotes included.
#[tokio::test]
async fn inline_commands_as_from_netcat() {
    bounded(async {
        let server = kv_server().await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        exchange(&mut stream, b"set greeting \"g'day mate\"\r\n", "+OK\r\n").await;
        exchange(&mut stream, b"get greeting\n", "$10\r\ng'day mate\r\n").await;
        exchange(&mut stream, b"incr visits\n", ":1\r\n").await;
        exchange(&mut stream, b"quit\n", "+OK\r\n").await;
        assert_eq!(rest(&mut stream).await, "");
        server.shutdown().await;
    })
    .await;
}

/// Ensure a message published on one connection reaches the subscribers on others, in
/// order, and not the ones of other channels.
#[tokio::test]
async fn publish_reaches_subscribers_across_connections() {
    bounded(async {
        let server = kv_server().await;
        let addr = server.local_addr();
        let mut news = TcpStream::connect(addr).await.unwrap();
        exchange(
            &mut news,
            &resp(&[b"SUBSCRIBE", b"news"]),
            "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
        )
        .await;
        let mut sport = TcpStream::connect(addr).await.unwrap();
        exchange(
            &mut sport,
            &resp(&[b"SUBSCRIBE", b"sport"]),
            "*3\r\n$9\r\nsubscribe\r\n$5\r\nsport\r\n:1\r\n",
        )
        .await;
        let mut publisher = TcpStream::connect(addr).await.unwrap();
        for n in 0..3 {
            let text = format!("story {n}");
            let publish = resp(&[b"PUBLISH", b"news", text.as_bytes()]);
            exchange(&mut publisher, &publish, ":1\r\n").await;
        }
        for n in 0..3 {
            let expected = format!("*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$7\r\nstory {n}\r\n");
            let mut got = vec![0; expected.len()];
            news.read_exact(&mut got).await.unwrap();
            assert_eq!(String::from_utf8_lossy(&got), expected);
        }
        exchange(
            &mut publisher,
            &resp(&[b"PUBLISH", b"sport", b"goal"]),
            ":1\r\n",
        )
        .await;
        let expected = "*3\r\n$7\r\nmessage\r\n$5\r\nsport\r\n$4\r\ngoal\r\n";
        let mut got = vec![0; expected.len()];
        sport.read_exact(&mut got).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&got), expected);
        drop(news);
        server.wait_connections(|n| n == 2).await;
        exchange(
            &mut publisher,
            &resp(&[b"PUBLISH", b"news", b"late"]),
            ":0\r\n",
        )
        .await;
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}

/// Ensure each kind of malformed RESP gets `-ERR Protocol error` and a close, and the
/// server goes on serving others: a wrong length, a negative bulk length, a huge
/// count, a bulk string over the limit (10 MiB, refused from its header), and a bulk
/// string cut short by the end of the stream.
#[tokio::test]
async fn malformed_requests_get_an_error_and_a_close() {
    bounded(async {
        let server = kv_server().await;
        let addr = server.local_addr();
        let ten_mib = format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n", 10 * 1024 * 1024);
        let cases: [(&[u8], &str); 4] = [
            (
                b"*1\r\n$2\r\nabc\r\n",
                "a bulk string is longer than its length",
            ),
            (b"*1\r\n$-3\r\n", "invalid bulk length"),
            (b"*99999999999\r\n", "invalid multibulk length"),
            (ten_mib.as_bytes(), "invalid bulk length"),
        ];
        for (request, why) in cases {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(request).await.unwrap();
            assert_eq!(
                rest(&mut stream).await,
                format!("-ERR Protocol error: {why}\r\n")
            );
        }
        let mut truncated = TcpStream::connect(addr).await.unwrap();
        truncated
            .write_all(b"*2\r\n$3\r\nGET\r\n$10\r\nabc")
            .await
            .unwrap();
        truncated.shutdown().await.unwrap();
        assert_eq!(
            rest(&mut truncated).await,
            "-ERR Protocol error: unexpected end of stream\r\n"
        );
        // The largest value accepted goes in and comes back whole.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let big = vec![b'x'; MAX_BULK];
        exchange(&mut stream, &resp(&[b"SET", b"big", &big]), "+OK\r\n").await;
        stream
            .write_all(&resp(&[b"STRLEN-IS-NOT-HERE"]))
            .await
            .unwrap();
        let mut reply = vec![0; 80];
        let n = stream.read(&mut reply).await.unwrap();
        assert!(reply[..n].starts_with(b"-ERR unknown command"));
        stream.write_all(&resp(&[b"GET", b"big"])).await.unwrap();
        let mut header = [0; 10];
        stream.read_exact(&mut header).await.unwrap();
        assert_eq!(&header, b"$1048576\r\n");
        let mut value = vec![0; MAX_BULK + 2];
        stream.read_exact(&mut value).await.unwrap();
        assert!(value[..MAX_BULK] == big[..]);
        assert_eq!(server.stats().closed.closed, 5);
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}

/// Ensure a Redis client library (redis-rs) works against the server: values with
/// binary bytes, counters, expiry, multiple keys.
#[tokio::test]
async fn a_redis_client_library_works() {
    bounded(async {
        let server = kv_server().await;
        let client = redis::Client::open(format!("redis://{}/", server.local_addr())).unwrap();
        let mut conn =
            tokio::time::timeout(TEST_TIMEOUT, client.get_multiplexed_async_connection())
                .await
                .unwrap()
                .unwrap();
        let binary: Vec<u8> = (0..=255).collect();
        let (): () = redis::cmd("SET")
            .arg("bin")
            .arg(&binary)
            .query_async(&mut conn)
            .await
            .unwrap();
        let back: Vec<u8> = redis::cmd("GET")
            .arg("bin")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(back, binary);
        let n: i64 = redis::cmd("INCRBY")
            .arg("n")
            .arg(5)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 5);
        let (): () = redis::cmd("SET")
            .arg("t")
            .arg("v")
            .arg("EX")
            .arg(60)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ttl: i64 = redis::cmd("TTL")
            .arg("t")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ttl, 60);
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg("n")
            .arg("none")
            .arg("t")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(values, vec![Some("5".into()), None, Some("v".into())]);
        let error = redis::cmd("INCR")
            .arg("t")
            .query_async::<i64>(&mut conn)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("not an integer"), "{error}");
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
        assert_eq!(size, 3);
        drop(conn);
        server.shutdown_with_timeout(Duration::ZERO).await;
    })
    .await;
}
