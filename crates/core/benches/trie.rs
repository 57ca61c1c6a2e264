//! Trie matching with 1 k and 100 k filters in a realistic mix
//! (`cargo bench -p daemoneye-eventbus-core --bench trie`).
//!
//! Mix: 70 % exact filters, 20 % with `+` in the middle, 10 % ending in `#`, spread over
//! four domains like the seed catalogue (`events.<domain>.<kind>.<id>`).

#![allow(missing_docs, clippy::unwrap_used)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use daemoneye_eventbus_core::{SubscriptionTrie, Topic, TopicFilter};
use std::hint::black_box;

const DOMAINS: [&str; 4] = ["process", "network", "filesystem", "performance"];

fn filter(i: usize) -> TopicFilter {
    let d = DOMAINS[i % 4];
    let s = match i % 10 {
        0 => format!("events.{d}.k{}.#", i / 10),
        1 | 2 => format!("events.{d}.+.id{i}"),
        _ => format!("events.{d}.k{}.id{i}", i / 10),
    };
    TopicFilter::new(s).unwrap()
}

fn build(n: usize) -> SubscriptionTrie<u32> {
    let mut trie = SubscriptionTrie::new();
    for i in 0..n {
        trie.insert(&filter(i), (i % 64) as u32);
    }
    trie
}

fn matching(c: &mut Criterion) {
    let mut g = c.benchmark_group("trie_match");
    g.throughput(Throughput::Elements(1));
    for n in [1_000usize, 100_000] {
        let trie = build(n);
        // An exact hit deep in the trie, a `+` hit, and a topic nothing matches.
        let exact = Topic::new(format!("events.process.k{}.id{}", 40 / 10, 40)).unwrap();
        let plus = Topic::new(format!("events.network.zz.id{}", 21)).unwrap();
        let miss = Topic::new("events.unknown.x.y").unwrap();
        let mut out = Vec::with_capacity(16);
        for (name, topic) in [("exact", &exact), ("plus", &plus), ("miss", &miss)] {
            g.bench_function(format!("{n}_filters_{name}"), |b| {
                b.iter(|| {
                    trie.matches_into(black_box(topic), &mut out);
                    black_box(out.len())
                });
            });
        }
    }
    g.finish();
}

fn churn(c: &mut Criterion) {
    let mut g = c.benchmark_group("trie_update");
    let mut trie = build(100_000);
    let f = TopicFilter::new("events.process.+.churn").unwrap();
    g.bench_function("insert_remove_100k", |b| {
        b.iter(|| {
            trie.insert(black_box(&f), 7);
            trie.remove(black_box(&f), 7);
        });
    });
    g.finish();
}

criterion_group!(benches, matching, churn);
criterion_main!(benches);
