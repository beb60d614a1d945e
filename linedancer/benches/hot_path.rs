//! The per-connection hot path with no socket: bytes in, decode, protocol, encode,
//! bytes out, through the sans-IO harness the driver shares its session code with.
//! Catches regressions in framing and dispatch; socket performance is measured by
//! `linedancer bench`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use linedancer::examples::{Echo, LineEcho};
use linedancer::testing::Harness;
use linedancer::Protocol;

/// Feeds `input` to a connection of `P` again and again, discarding the output.
fn bench_feed<P: Protocol>(c: &mut Criterion, name: &str, input: &[u8])
where
    P::Codec: Default,
{
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("feed", |b| {
        let mut conn = Harness::<P>::connect();
        b.iter(|| {
            conn.feed(black_box(input));
            black_box(conn.clear_output())
        });
    });
    group.finish();
}

fn hot_path(c: &mut Criterion) {
    let message = [b'x'; 32];
    bench_feed::<Echo>(c, "raw/32B", &message);
    let line = b"the quick brown fox jumps over\n";
    bench_feed::<LineEcho>(c, "lines/1x32B", line);
    bench_feed::<LineEcho>(c, "lines/16x32B", &line.repeat(16));
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
