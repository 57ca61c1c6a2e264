//! Frame encode / decode costs (`cargo bench -p daemoneye-eventbus-core --bench codec`).

#![allow(missing_docs, clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use daemoneye_eventbus_core::codec::{
    DecodeCache, FrameDecoder, encode_publish, kind, max_frame_len,
};
use daemoneye_eventbus_core::{ByteStr, Frame, Header, Message, MessageId, Topic};
use std::hint::black_box;

fn header() -> Header {
    Header {
        id: MessageId {
            publisher: 0x1234_5678,
            sequence: 42,
        },
        timestamp_ns: 1_700_000_000_000_000_000,
        source: ByteStr::from("procmond"),
        ..Header::default()
    }
}

/// `n` encoded publish frames of `size`-byte payloads.
fn frames(n: usize, size: usize) -> BytesMut {
    let topic = Topic::new("events.process.lifecycle").unwrap();
    let payload = vec![0xA5; size];
    let mut buf = BytesMut::new();
    for _ in 0..n {
        encode_publish(&mut buf, &topic, &header(), &payload);
    }
    buf
}

fn encode(c: &mut Criterion) {
    let topic = Topic::new("events.process.lifecycle").unwrap();
    let mut g = c.benchmark_group("encode");
    for size in [256usize, 65_536] {
        let payload = vec![0xA5; size];
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("publish_{size}B"), |b| {
            let mut buf = BytesMut::with_capacity(1 << 20);
            b.iter(|| {
                if buf.len() > (1 << 19) {
                    buf.clear();
                }
                encode_publish(&mut buf, &topic, &header(), black_box(&payload));
            });
        });
    }
    let wire = frames(1, 256);
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    let msg = match dec.decode(&mut wire.clone()).unwrap().unwrap() {
        Frame::Publish(m) => m,
        _ => unreachable!(),
    };
    g.bench_function("deliver_256B_from_wire", |b| {
        let mut buf = BytesMut::with_capacity(1 << 20);
        b.iter(|| {
            if buf.len() > (1 << 19) {
                buf.clear();
            }
            daemoneye_eventbus_core::codec::encode_message_frame(
                &mut buf,
                kind::DELIVER,
                black_box(&msg),
            );
        });
    });
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for size in [256usize, 65_536] {
        let n = 1024;
        let wire = frames(n, size).freeze();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("publish_{size}B_x1024"), |b| {
            let dec = FrameDecoder::new(max_frame_len(1 << 20));
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    while let Some(f) = dec.decode(&mut buf).unwrap() {
                        black_box(f);
                    }
                },
                BatchSize::LargeInput,
            );
        });
        // As a connection's reader decodes: the topic and source repeat (`DecodeCache`).
        g.bench_function(format!("publish_{size}B_x1024_one_connection"), |b| {
            let dec = FrameDecoder::new(max_frame_len(1 << 20));
            let mut cache = DecodeCache::default();
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    while let Some(f) = dec.decode_cached(&mut buf, &mut cache).unwrap() {
                        black_box(f);
                    }
                },
                BatchSize::LargeInput,
            );
        });
    }
    // A message built in process (not decoded) is encoded once, on first socket delivery.
    let topic = Topic::new("events.process.lifecycle").unwrap();
    g.bench_function("inproc_message_first_wire_encode_256B", |b| {
        b.iter_batched(
            || Message::new(topic.clone(), header(), Bytes::from_static(&[0; 256])),
            |m| black_box(m.wire().len()),
            BatchSize::SmallInput,
        );
    });
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
