//! Conformance suite: the same behaviour checked on every transport (Unix socket, loopback
//! TCP, TCP with mutual TLS, in-process). Named pipes share this code path on Windows, where this suite runs for
//! them too.

#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{
    AckMode, Client, ClientOptions, Publish, PublishError, RecvError, Request, RpcErrorKind,
    ServeOptions, Service, SubscribeError, SubscribeOptions, Subscription,
};
use daemoneye_eventbus::core::codec::ErrorCode;
use daemoneye_eventbus::core::{CorrelationFilter, CorrelationMetadata, QueueGroup, ReplyStatus};
use daemoneye_eventbus::{Endpoint, Message, Qos, Topic, catalog};
use std::path::PathBuf;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
enum Kind {
    #[cfg(unix)]
    Unix,
    #[cfg(windows)]
    Pipe,
    Tcp,
    Tls,
    InProc,
}

struct Bus {
    broker: Broker,
    endpoint: Endpoint,
    /// A client certificate the broker accepts (TLS).
    tls: Option<daemoneye_eventbus::client::ClientTls>,
    _dir: Option<TempDir>,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> TempDir {
    let p = std::env::temp_dir().join(format!(
        "eb-conf-{}-{:x}",
        std::process::id(),
        fastrand_u64()
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

async fn bus(kind: Kind, mut config: BrokerConfig) -> Bus {
    let mut tls = None;
    let (endpoints, dir) = match kind {
        #[cfg(unix)]
        Kind::Unix => {
            let d = temp_dir();
            (vec![Endpoint::Unix(d.0.join("bus.sock"))], Some(d))
        }
        #[cfg(windows)]
        Kind::Pipe => (
            vec![Endpoint::NamedPipe(format!(
                "eb-conf-{}-{:x}",
                std::process::id(),
                fastrand_u64()
            ))],
            None,
        ),
        Kind::Tcp => (vec![Endpoint::Tcp("127.0.0.1:0".parse().unwrap())], None),
        Kind::Tls => {
            let d = temp_dir();
            let pki = common::pki::Pki::new(&d.0);
            let listen = daemoneye_eventbus::broker::TlsListen {
                listen: "127.0.0.1:0".into(),
                cert: pki.broker.cert.clone(),
                key: pki.broker.key.clone(),
                client_ca: pki.ca.clone(),
            };
            let endpoint = listen.endpoint().unwrap();
            config.tls = Some(listen);
            tls = Some(pki.client_a.client());
            (vec![endpoint], Some(d))
        }
        Kind::InProc => (vec![], None),
    };
    // Routing is what this suite checks; the ACL has tests of its own.
    let broker = Broker::start_on(common::open(config), &endpoints)
        .await
        .unwrap();
    let endpoint = match kind {
        Kind::InProc => broker.inproc_endpoint().clone(),
        _ => broker.endpoints()[0].clone(),
    };
    Bus {
        broker,
        endpoint,
        tls,
        _dir: dir,
    }
}

impl Bus {
    async fn client(&self, name: &str) -> Client {
        Client::connect(&self.endpoint, self.tls(ClientOptions::named(name)))
            .await
            .unwrap()
    }

    /// `options` with the client certificate of a TLS bus.
    fn tls(&self, mut options: ClientOptions) -> ClientOptions {
        options.tls.clone_from(&self.tls);
        options
    }
}

fn t(s: &str) -> Topic {
    Topic::new(s).unwrap()
}

async fn next(sub: &mut Subscription) -> Message {
    tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("a message within the deadline")
        .unwrap()
}

/// Receives until `n` messages arrived, returning their topics.
async fn topics(sub: &mut Subscription, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next(sub).await.topic().to_string());
    }
    out
}

/// Proves nothing more is queued for `sub`: a marker published after everything else is the
/// next message.
async fn assert_nothing_else(publisher: &Client, sub: &mut Subscription, marker: &str) {
    publisher.publish(&t(marker), "end").await.unwrap();
    assert_eq!(next(sub).await.topic().as_str(), marker);
}

async fn publish_and_receive_in_order(kind: Kind) {
    // The queue holds the whole burst, so a slow test reader loses nothing.
    let config = BrokerConfig {
        message_buffer_size: 10_000,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let sub = bus.client("sub").await;
    let mut s = sub.subscribe(["events.process.lifecycle"]).await.unwrap();
    let publ = bus.client("pub").await;
    for i in 0..5000u32 {
        publ.publish(&t("events.process.lifecycle"), i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..5000u32 {
        let m = next(&mut s).await;
        assert_eq!(m.payload().as_ref(), i.to_le_bytes(), "per-publisher order");
        assert_eq!(m.header().source.as_str(), "pub");
        assert_eq!(m.id().sequence, u64::from(i) + 1);
    }
    publ.flush().await.unwrap();
    let stats = bus.broker.stats();
    assert_eq!(stats.published, 5000);
    assert_eq!(stats.dropped, 0);
    assert!(bus.broker.shutdown().await.drained);
}

/// A burst travels as message runs (byte streams, protocol 1.2) and arrives exactly as single
/// messages would: complete and in order for plain and `Processed` subscribers, each message
/// to one queue group member.
async fn bursts_travel_as_runs(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10_000,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let watcher = bus.client("watcher").await;
    let mut all = watcher.subscribe(["burst.#"]).await.unwrap();
    let careful = bus.client("careful").await;
    let mut processed = careful
        .subscribe_with(["burst.a"], Qos::Processed)
        .await
        .unwrap();
    let mut members = Vec::new();
    for name in ["m1", "m2"] {
        let c = bus.client(name).await;
        let s = c
            .subscribe_with_options(
                ["burst.g"],
                SubscribeOptions::default().group(group("workers")),
            )
            .await
            .unwrap();
        members.push((c, s));
    }
    let publ = bus.client("pub").await;
    let mut sent = Vec::new();
    for i in 0..3000u32 {
        let topic = match i % 100 {
            99 => "burst.b",
            _ if i < 2000 => "burst.a",
            _ => "burst.g",
        };
        publ.publish(&t(topic), i.to_le_bytes().to_vec())
            .await
            .unwrap();
        sent.push((topic, i));
    }
    let index = |m: &Message| u32::from_le_bytes(m.payload()[..].try_into().unwrap());
    for &(topic, i) in &sent {
        let m = next(&mut all).await;
        assert_eq!((m.topic().as_str(), index(&m)), (topic, i));
        assert_eq!(m.id().sequence, u64::from(i) + 1);
    }
    for &(_, i) in sent.iter().filter(|(topic, _)| *topic == "burst.a") {
        assert_eq!(index(&next(&mut processed).await), i);
    }
    let grouped: Vec<u32> = sent
        .iter()
        .filter(|(topic, _)| *topic == "burst.g")
        .map(|&(_, i)| i)
        .collect();
    let mut given = Vec::new();
    for (_, s) in &mut members {
        let mut last = None;
        // Round robin: each member gets every other message, in order.
        for _ in 0..grouped.len() / 2 {
            let i = index(&next(s).await);
            assert!(last < Some(i), "order within a member");
            last = Some(i);
            given.push(i);
        }
    }
    given.sort_unstable();
    assert_eq!(given, grouped);
    let stats = bus.broker.stats();
    assert_eq!((stats.published, stats.dropped), (3000, 0));
    match kind {
        Kind::InProc => assert_eq!(stats.runs, 0, "in process, frames travel as values"),
        _ => assert!(
            (1..=300).contains(&stats.runs),
            "{} runs for 3000 messages",
            stats.runs
        ),
    }
}

async fn wildcard_matrix(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("sub").await;
    let publ = bus.client("pub").await;
    let cases: [(&str, &[&str]); 6] = [
        (
            "events.process.+",
            &["events.process.lifecycle", "events.process.batch"],
        ),
        (
            "events.process.*",
            &["events.process.lifecycle", "events.process.batch"],
        ),
        (
            "events.#",
            &[
                "events",
                "events.process.lifecycle",
                "events.process.batch",
                "events.network.dns",
            ],
        ),
        ("+.network.+", &["events.network.dns"]),
        ("events.process.lifecycle", &["events.process.lifecycle"]),
        (
            "#",
            &[
                "events",
                "events.process.lifecycle",
                "events.process.batch",
                "events.network.dns",
                "control.x",
            ],
        ),
    ];
    let published = [
        "events",
        "events.process.lifecycle",
        "events.process.batch",
        "events.network.dns",
        "control.x",
    ];
    for (filter, expected) in cases {
        let mut s = c.subscribe([filter]).await.unwrap();
        for topic in published {
            publ.publish(&t(topic), "x").await.unwrap();
        }
        assert_eq!(
            topics(&mut s, expected.len()).await,
            expected,
            "filter {filter}"
        );
        let mut end = c.subscribe(["zz.end"]).await.unwrap();
        publ.publish(&t("zz.end"), "x").await.unwrap();
        next(&mut end).await;
        s.unsubscribe().await.unwrap();
    }
}

async fn one_copy_when_several_filters_match(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("sub").await;
    let mut s = c
        .subscribe([
            "events.#",
            "events.process.+",
            "events.process.lifecycle",
            "a.end",
        ])
        .await
        .unwrap();
    let publ = bus.client("pub").await;
    publ.publish(&t("events.process.lifecycle"), "once")
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.payload().as_ref(), b"once");
    assert_nothing_else(&publ, &mut s, "a.end").await;
    // A second subscription on the same connection gets its own copy.
    let mut other = c.subscribe(["events.process.lifecycle"]).await.unwrap();
    publ.publish(&t("events.process.lifecycle"), "both")
        .await
        .unwrap();
    assert_eq!(next(&mut s).await.payload().as_ref(), b"both");
    assert_eq!(next(&mut other).await.payload().as_ref(), b"both");
}

async fn large_payloads_and_the_limit(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("sub").await;
    let mut s = c.subscribe(["big"]).await.unwrap();
    let publ = bus.client("pub").await;
    for size in [65_535, 65_536, 65_537, 1 << 20] {
        let payload = Bytes::from((0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        publ.publish(&t("big"), payload.clone()).await.unwrap();
        assert_eq!(next(&mut s).await.payload(), &payload, "size {size}");
    }
    let err = publ
        .publish(&t("big"), vec![0u8; (1 << 20) + 1])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PublishError::TooLarge {
                size: 1_048_577,
                max: 1_048_576
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("exceeds max_message_size"),
        "{err}"
    );
}

async fn unsubscribe_stops_delivery(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("sub").await;
    let s = c.subscribe(["a.b"]).await.unwrap();
    let mut keep = c.subscribe(["a.end"]).await.unwrap();
    s.unsubscribe().await.unwrap();
    let publ = bus.client("pub").await;
    publ.publish(&t("a.b"), "gone").await.unwrap();
    publ.publish(&t("a.end"), "end").await.unwrap();
    assert_eq!(next(&mut keep).await.topic().as_str(), "a.end");
    assert_eq!(bus.broker.stats().active_subscriptions, 1);
}

async fn sys_topics(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("watcher").await;
    let mut wild = c.subscribe(["#"]).await.unwrap();
    let mut stats = c.subscribe(["$sys.broker.stats"]).await.unwrap();
    let m = next(&mut stats).await;
    let snapshot = daemoneye_eventbus::broker::parse_stats(m.payload()).unwrap();
    assert_eq!(snapshot.active_connections, 1);
    let mut joins = c.subscribe(["$sys.broker.clients.+"]).await.unwrap();
    let other = bus.client("newcomer").await;
    let joined = next(&mut joins).await;
    assert_eq!(joined.topic(), &catalog::sys::client_connected());
    assert!(String::from_utf8_lossy(joined.payload()).contains("newcomer"));
    let err = other
        .publish(&t("$sys.broker.stats"), "forged")
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Reserved(_)));
    other.publish(&t("plain"), "x").await.unwrap();
    assert_eq!(
        next(&mut wild).await.topic().as_str(),
        "plain",
        "# does not match $sys"
    );
}

async fn ping_and_drain(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let c = bus.client("c").await;
    c.ping().await.unwrap();
    let mut s = c.subscribe(["x"]).await.unwrap();
    c.publish(&t("x"), "self").await.unwrap();
    assert_eq!(next(&mut s).await.payload().as_ref(), b"self");
    c.drain().await;
    assert!(matches!(s.recv().await, Err(RecvError::Closed)));
    assert!(matches!(
        c.publish(&t("x"), "late").await,
        Err(PublishError::Closed)
    ));
}

async fn shutdown_sends_going_away_and_ends_streams(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let mut options = ClientOptions::named("c");
    options.reconnect.enabled = false;
    let c = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let mut s = c.subscribe(["x"]).await.unwrap();
    let report = bus.broker.shutdown().await;
    assert!(report.drained, "{report:?}");
    let end = tokio::time::timeout(WAIT, s.recv()).await.unwrap();
    assert!(matches!(end, Err(RecvError::Closed)), "{end:?}");
}

/// A client named `slow` whose subscription queue holds one message, subscribed to `filters`.
async fn slow_reader(bus: &Bus, filters: &[&str]) -> (Client, Subscription) {
    let mut options = ClientOptions::named("slow");
    options.subscription_buffer = 1;
    let slow = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let s = slow.subscribe(filters.iter().copied()).await.unwrap();
    (slow, s)
}

/// Messages received and reported missed until one on topic `end`.
async fn missed_of(s: &mut Subscription, end: &str) -> (u64, u64) {
    let (mut received, mut missed) = (0u64, 0u64);
    loop {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(m) if m.topic().as_str() == end => return (received, missed),
            Ok(_) => received += 1,
            Err(RecvError::Missed { count, .. }) => missed += count,
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

/// Reads a burst of `n` into a 10-message queue until a message on topic `end`: every message
/// is received or reported missed, and some are missed. Returns how many.
async fn missed_of_burst(s: &mut Subscription, end: &str, n: u64) -> u64 {
    let (received, missed) = missed_of(s, end).await;
    assert_eq!(
        received + missed,
        n,
        "every message is either received or reported missed"
    );
    assert!(
        missed > 0,
        "a burst of {n} into a 10-message queue must drop"
    );
    missed
}

async fn slow_reader_drops_are_counted_and_reported(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let (slow, mut s) = slow_reader(&bus, &["burst", "burst.end"]).await;
    let publ = bus.client("pub").await;
    let n = 20_000u64;
    for i in 0..n {
        publ.publish(&t("burst"), vec![0u8; 512 + (i % 2) as usize])
            .await
            .unwrap();
    }
    publ.ping().await.unwrap();
    publ.publish(&t("burst.end"), "end").await.unwrap();
    let missed = missed_of_burst(&mut s, "burst.end", n).await;
    let stats = bus.broker.stats();
    let conn = stats.connections.iter().find(|c| c.name == "slow").unwrap();
    assert_eq!(conn.dropped, missed);
    assert_eq!(
        conn.dropped_by_topic.get("burst").copied().unwrap_or(0),
        missed
    );
    // The broker-wide count, by cause.
    assert_eq!(stats.dropped, missed);
    assert_eq!(stats.dropped_by_cause["slow_reader"], missed);
    assert_eq!(stats.dropped_by_cause.values().sum::<u64>(), stats.dropped);
    assert_eq!(slow.stats().missed, missed);
}

/// Four subscribers that fall behind the same burst hold one copy of each message between
/// them: the memory cap, which four copies would overflow, drops nothing. (A frame read from a
/// socket is kept once and charged once; in-process messages are not read from a socket and
/// are charged per queue.)
async fn subscribers_behind_one_burst_share_its_copies(kind: Kind) {
    if matches!(kind, Kind::InProc) {
        return;
    }
    let n = 10_000u32;
    let one = 256 + "burst".len() + daemoneye_eventbus::core::message::MESSAGE_OVERHEAD;
    // Room for one copy of everything (and the queues' encoded heads and slots), not for four.
    let cap = 8 << 20;
    assert!(4 * one * n as usize > cap && one * n as usize * 2 < cap);
    let config = BrokerConfig {
        max_memory_bytes: cap,
        subscriber_buffer_bytes: 4 << 20,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let mut readers = Vec::new();
    for i in 0..4 {
        let mut options = ClientOptions::named(format!("behind{i}"));
        options.subscription_buffer = 1;
        let c = Client::connect(&bus.endpoint, bus.tls(options))
            .await
            .unwrap();
        let s = c.subscribe(["burst", "end"]).await.unwrap();
        readers.push((c, s));
    }
    let publ = bus.client("pub").await;
    for i in 0..n {
        let mut payload = vec![0u8; 256];
        payload[..4].copy_from_slice(&i.to_le_bytes());
        publ.publish(&t("burst"), payload).await.unwrap();
    }
    publ.ping().await.unwrap();
    publ.publish(&t("end"), "end").await.unwrap();
    publ.ping().await.unwrap();
    let stats = bus.broker.stats();
    assert!(
        stats.queued_bytes < (2 * one * n as usize) as u64,
        "{} bytes charged for {n} messages held by four queues",
        stats.queued_bytes
    );
    for (_, s) in &mut readers {
        assert_eq!(missed_of(s, "end").await, (u64::from(n), 0));
    }
    assert_eq!(bus.broker.stats().dropped, 0);
}

/// A stalled reader of many topics: the broker's per-topic counts stay bounded, and every drop
/// is still in exactly one entry of the notices and the statistics.
async fn drops_of_many_topics_are_bounded_and_all_reported(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let (slow, mut s) = slow_reader(&bus, &["burst.+", "end"]).await;
    let publ = bus.client("pub").await;
    let (n, distinct) = (20_000u64, 1_000u64);
    let topics: Vec<Topic> = (0..distinct).map(|i| t(&format!("burst.t{i}"))).collect();
    for i in 0..n {
        let topic = &topics[(i % distinct) as usize];
        publ.publish(topic, vec![0u8; 256]).await.unwrap();
    }
    publ.ping().await.unwrap();
    publ.publish(&t("end"), "end").await.unwrap();
    let missed = missed_of_burst(&mut s, "end", n).await;
    let stats = bus.broker.stats();
    let conn = stats.connections.iter().find(|c| c.name == "slow").unwrap();
    assert_eq!(conn.dropped, missed);
    assert!(
        conn.dropped_by_topic.len() <= daemoneye_eventbus::broker::DROP_TOPICS + 1,
        "{} topics counted one by one",
        conn.dropped_by_topic.len()
    );
    assert_eq!(conn.dropped_by_topic.values().sum::<u64>(), missed);
    assert!(
        conn.dropped_by_topic
            .contains_key(catalog::sys::dropped_other().as_str()),
        "the topics past the bound are summed"
    );
    assert_eq!(slow.stats().missed, missed);
}

/// A connection holds at most `max_subscriptions_per_connection` filters; each is charged to
/// the memory cap and given back when it goes.
/// `max_subscribers`: a filter has that many subscribers at most (plain and acknowledged
/// alike); one more is refused, naming it, and is let in once one has gone.
async fn a_filter_has_max_subscribers_at_most(kind: Kind) {
    let config = BrokerConfig {
        max_subscribers: 2,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let (a, b, c) = (
        bus.client("a").await,
        bus.client("b").await,
        bus.client("c").await,
    );
    let first = a.subscribe(["jobs.x"]).await.unwrap();
    let _second = b.subscribe(["jobs.x"]).await.unwrap();
    let refused = |r: Result<Subscription, SubscribeError>| match r {
        Err(SubscribeError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::ResourceExhausted);
            assert!(
                message.contains("jobs.x") && message.contains("max_subscribers"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    refused(c.subscribe(["jobs.x"]).await);
    refused(
        c.subscribe_with_options(
            ["jobs.x"],
            SubscribeOptions {
                qos: Qos::Processed,
                ..SubscribeOptions::default()
            },
        )
        .await,
    );
    // Other filters are not limited by this one.
    let _y = c.subscribe(["jobs.y"]).await.unwrap();
    first.unsubscribe().await.unwrap();
    let _third = c.subscribe(["jobs.x"]).await.unwrap();
}

async fn subscriptions_are_limited_and_charged(kind: Kind) {
    let config = BrokerConfig {
        max_subscriptions_per_connection: 3,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let c = bus.client("many").await;
    let held = c.subscribe(["a.one", "a.two", "a.three"]).await.unwrap();
    let charged = bus.broker.stats().subscription_bytes;
    assert_eq!(
        charged,
        3 * daemoneye_eventbus::broker::SUBSCRIPTION_CHARGE as u64 + 5 + 5 + 7
    );
    match c.subscribe(["a.four"]).await {
        Err(SubscribeError::Refused { code, message }) => {
            assert_eq!(
                code,
                daemoneye_eventbus::core::codec::ErrorCode::ResourceExhausted
            );
            assert!(
                message.contains("max_subscriptions_per_connection"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another connection is not limited by this one.
    let other = bus.client("other").await;
    let _fourth = other.subscribe(["a.four"]).await.unwrap();
    held.unsubscribe().await.unwrap();
    assert_eq!(
        bus.broker.stats().subscription_bytes,
        daemoneye_eventbus::broker::SUBSCRIPTION_CHARGE as u64 + 6
    );
    let _again = c.subscribe(["a.four", "a.five"]).await.unwrap();
    // An acknowledged subscription's filters count against the same limit, either way round.
    let p = bus.client("processed").await;
    let _acked = p
        .subscribe_with(["b.one", "b.two"], Qos::Processed)
        .await
        .unwrap();
    let _plain = p.subscribe(["b.three"]).await.unwrap();
    let stats = bus.broker.stats();
    let held = stats.connections.iter().find(|c| c.name == "processed");
    assert_eq!(
        held.map(|c| c.subscriptions),
        Some(3),
        "as the limit counts"
    );
    for refused in [
        p.subscribe(["b.four"]).await.map(drop),
        p.subscribe_with(["b.five"], Qos::Processed).await.map(drop),
    ] {
        assert!(
            matches!(
                &refused,
                Err(SubscribeError::Refused { message, .. })
                    if message.contains("max_subscriptions_per_connection")
            ),
            "{refused:?}"
        );
    }
    other.close().await;
    c.close().await;
}

async fn disconnect_policy_closes_a_slow_reader(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let mut options = ClientOptions::named("strict");
    options.subscription_buffer = 1;
    options.reconnect.enabled = false;
    options.slow_reader = daemoneye_eventbus::core::codec::SlowReaderPolicy::Disconnect;
    let strict = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let mut s = strict.subscribe(["burst"]).await.unwrap();
    let publ = bus.client("pub").await;
    for _ in 0..20_000 {
        if publ.publish(&t("burst"), vec![0u8; 512]).await.is_err() {
            break;
        }
    }
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(_) => received += 1,
            Err(RecvError::Closed) => break,
            Err(e) => panic!("no drops under the disconnect policy, got {e}"),
        }
    }
    assert!(received < 20_000);
    assert_eq!(
        strict.state(),
        daemoneye_eventbus::client::ConnState::Closed
    );
    publ.ping().await.unwrap();
    assert!(
        bus.broker
            .stats()
            .connections
            .iter()
            .all(|c| c.name != "strict")
    );
    // The message that overflowed its queue is a slow reader's drop; what the queue held
    // when the connection closed, a closed one's.
    let stats = bus.broker.stats();
    assert!(stats.dropped_by_cause["slow_reader"] >= 1, "{stats:?}");
    assert_eq!(stats.dropped_by_cause.values().sum::<u64>(), stats.dropped);
}

async fn processed_subscriptions_lose_nothing(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let mut options = ClientOptions::named("careful");
    options.subscription_buffer = 1;
    let careful = Client::connect(&bus.endpoint, bus.tls(options.clone()))
        .await
        .unwrap();
    let mut s = careful
        .subscribe_with(["burst"], Qos::Processed)
        .await
        .unwrap();
    options.name = "careless".into();
    let careless = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let mut r = careless.subscribe(["burst"]).await.unwrap();
    let publ = bus.client("pub").await;
    let n = 20_000u32;
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            publ.publish(&t("burst"), i.to_le_bytes().to_vec())
                .await
                .unwrap();
        }
        publ.ping().await.unwrap();
        publ
    });
    for i in 0..n {
        let m = next(&mut s).await;
        assert_eq!(
            m.payload().as_ref(),
            i.to_le_bytes(),
            "every message, in order"
        );
    }
    let publ = tokio::time::timeout(WAIT, publisher)
        .await
        .unwrap()
        .unwrap();
    publ.publish(&t("burst"), "end").await.unwrap();
    let (mut received, mut missed) = (0u64, 0u64);
    loop {
        match tokio::time::timeout(WAIT, r.recv()).await.unwrap() {
            Ok(m) if m.payload().as_ref() == b"end" => break,
            Ok(_) => received += 1,
            Err(RecvError::Missed { count, .. }) => missed += count,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(
        received + missed,
        u64::from(n),
        "the realtime subscriber accounts for all"
    );
    let stats = bus.broker.stats();
    let c = stats
        .connections
        .iter()
        .find(|c| c.name == "careful")
        .unwrap();
    assert_eq!(c.dropped, 0);
}

async fn recv(s: &mut Subscription) -> daemoneye_eventbus::client::Delivery {
    tokio::time::timeout(WAIT, s.recv_delivery())
        .await
        .expect("a delivery within the deadline")
        .unwrap()
}

fn payload_u32(m: &Message) -> u32 {
    u32::from_le_bytes(m.payload().as_ref().try_into().unwrap())
}

async fn publish_processed(c: &Client, topic: &str, from: u32, to: u32) {
    for i in from..to {
        let p = Publish::new(t(topic), i.to_le_bytes().to_vec()).qos(Qos::Processed);
        c.publish_with(p).await.unwrap();
    }
}

/// A delivery not acknowledged within `ack_timeout_ms` comes again, marked, and an
/// acknowledgement ends it; the publisher's ACK comes once the subscription holds the message.
/// By default the subscription drops the redelivery of a message it still holds (a duplicate,
/// counted) and acknowledges both together.
async fn unacknowledged_deliveries_come_again(kind: Kind) {
    let config = BrokerConfig {
        ack_timeout_ms: 300,
        keepalive_interval_ms: 100,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let c = bus.client("manual").await;
    let manual = SubscribeOptions::default()
        .qos(Qos::Processed)
        .ack_mode(AckMode::Manual);
    let mut s = c
        .subscribe_with_options(["job"], manual.clone().keep_duplicates(true))
        .await
        .unwrap();
    let mut dedup = c.subscribe_with_options(["job"], manual).await.unwrap();
    let publ = bus.client("pub").await;
    publish_processed(&publ, "job", 1, 3).await;
    let report = publ.wait_acked(WAIT).await;
    assert_eq!((report.acked, report.outstanding), (2, 0));
    let first = recv(&mut s).await;
    let second = recv(&mut s).await;
    assert_eq!((payload_u32(&first.message), first.redelivered), (1, 0));
    assert_eq!(payload_u32(&second.message), 2);
    assert!(s.ack(&second.message));
    s.flush_acks();
    // The first was never acknowledged: it comes again, marked.
    let again = recv(&mut s).await;
    assert_eq!((payload_u32(&again.message), again.redelivered), (1, 1));
    assert!(s.ack(&again.message));
    s.flush_acks();
    // The other subscription holds both unacknowledged past the timeout: the redeliveries
    // are duplicates of what it holds, dropped and counted; acknowledging them once is enough.
    let (a, b) = (recv(&mut dedup).await, recv(&mut dedup).await);
    while c.stats().duplicates < 2 {
        assert!(dedup.try_recv().is_none(), "duplicates are not handed over");
        tokio::task::yield_now().await;
        c.ping().await.unwrap();
    }
    assert!(dedup.ack(&a.message) && dedup.ack(&b.message));
    dedup.flush_acks();
    assert_nothing_else_acked(&publ, &c, &mut s).await;
    let stats = bus.broker.stats();
    let total: u64 = stats.subscriptions.iter().map(|s| s.acked).sum();
    assert_eq!(total, 2 + 2 + 1, "{:?}", stats.subscriptions);
    assert!(stats.subscriptions.iter().all(|s| s.redelivered >= 1));
}

/// A marker published after everything is the next message (acknowledged at once).
async fn assert_nothing_else_acked(
    publisher: &Client,
    subscriber: &Client,
    sub: &mut Subscription,
) {
    publish_processed(publisher, "job", 99, 100).await;
    let m = next(sub).await;
    assert_eq!(payload_u32(&m), 99);
    sub.ack(&m);
    sub.flush_acks();
    // The broker reads a connection's frames in order: once the ping is answered, so are the
    // acknowledgements queued before it.
    subscriber.ping().await.unwrap();
}

/// A durable subscription outlives its subscriber: what it had not acknowledged, and what was
/// published while nobody was attached, reaches the next subscriber of its name, in order,
/// before anything newer.
async fn a_durable_subscription_outlives_its_subscriber(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let publ = bus.client("pub").await;
    let first = bus.client("first").await;
    let mut s = first.subscribe_durable("audit", ["ev.#"]).await.unwrap();
    publish_processed(&publ, "ev.a", 0, 10).await;
    for i in 0..5 {
        assert_eq!(payload_u32(&next(&mut s).await), i);
    }
    // Received 0..=4; 4 was never acknowledged (auto mode acknowledges on the next receive).
    drop(s);
    // A graceful end writes what was queued: the acknowledgements too (a close would discard
    // them, and the broker would send those messages again).
    first.drain().await;
    publish_processed(&publ, "ev.b", 10, 20).await;
    let report = publ.wait_acked(WAIT).await;
    assert_eq!(report.outstanding, 0, "the durable subscription holds them");
    let stats = bus.broker.stats();
    let d = stats
        .subscriptions
        .iter()
        .find(|d| d.durable.as_deref() == Some("audit"))
        .unwrap();
    assert!(d.session_id.is_none(), "detached");
    assert_eq!(d.pending, 16, "4 again, 5..9, 10..19");
    // Another subscriber of the name: 4 (redelivered), then the rest, in order.
    let second = bus.client("second").await;
    let mut s = second.subscribe_durable("audit", ["ev.#"]).await.unwrap();
    let again = tokio::time::timeout(WAIT, s.recv_delivery())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((payload_u32(&again.message), again.redelivered), (4, 1));
    for i in 5..20 {
        assert_eq!(payload_u32(&next(&mut s).await), i);
    }
    // One subscriber at a time; the filters are fixed.
    let third = bus.client("third").await;
    match third.subscribe_durable("audit", ["ev.#"]).await {
        Err(SubscribeError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::DurableInUse);
            assert!(message.contains("second"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match third.delete_durable("audit").await {
        Err(SubscribeError::Refused { code, .. }) => assert_eq!(code, ErrorCode::DurableInUse),
        other => panic!("{other:?}"),
    }
    s.delete().await.unwrap();
    assert!(bus.broker.stats().subscriptions.is_empty());
    match third.subscribe_durable("audit", ["other"]).await {
        Ok(_) => {}
        Err(e) => panic!("deleted: the name is free for other filters: {e}"),
    }
    assert!(matches!(
        third.subscribe_durable("Bad Name", ["x"]).await,
        Err(SubscribeError::Refused {
            code: ErrorCode::InvalidName,
            ..
        })
    ));
}

/// A durable backlog that outgrew its bound while nobody was attached: the next subscriber,
/// whose queue is smaller than the broker's window, is told what was dropped first, then gets
/// the newest in order. (The broker may send a window of deliveries and the drop notice before
/// the REPLY that opens the subscription; the client must not stop reading for them.)
async fn a_dropped_backlog_reaches_a_small_subscriber(kind: Kind) {
    let config = BrokerConfig {
        durable_max_messages: 50,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let publ = bus.client("pub").await;
    let mut options = ClientOptions::named("small");
    options.subscription_buffer = 8;
    let small = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let s = small.subscribe_durable("backlog", ["ev"]).await.unwrap();
    drop(s);
    small.drain().await;
    publish_processed(&publ, "ev", 0, 120).await;
    assert_eq!(publ.wait_acked(WAIT).await.outstanding, 0);
    let mut options = ClientOptions::named("small-again");
    options.subscription_buffer = 8;
    let again = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let mut s = tokio::time::timeout(WAIT, again.subscribe_durable("backlog", ["ev"]))
        .await
        .expect("the subscription is answered")
        .unwrap();
    match tokio::time::timeout(WAIT, s.recv_delivery()).await.unwrap() {
        Err(RecvError::Missed { count, reason }) => {
            assert_eq!(
                (count, reason),
                (70, daemoneye_eventbus::client::MissedReason::BacklogFull)
            );
        }
        other => panic!("the drop comes first: {other:?}"),
    }
    for i in 70..120 {
        assert_eq!(payload_u32(&next(&mut s).await), i);
    }
    s.delete().await.unwrap();
}

/// A Processed subscription that stops acknowledging holds its publishers back for at most
/// `processed_stall_timeout_ms`: then it is closed and its subscriber told, and a durable one
/// stalls and keeps the newest; the publisher is never held longer.
async fn a_stalled_subscription_releases_its_publishers(kind: Kind) {
    let config = BrokerConfig {
        message_buffer_size: 10,
        durable_max_messages: 10,
        processed_stall_timeout_ms: 300,
        ..BrokerConfig::default()
    };
    let bus = bus(kind, config).await;
    let stuck = bus.client("stuck").await;
    let manual = SubscribeOptions::default()
        .qos(Qos::Processed)
        .ack_mode(AckMode::Manual);
    let mut s = stuck
        .subscribe_with_options(["job"], manual.clone())
        .await
        .unwrap();
    let mut d = stuck
        .subscribe_with_options(
            ["job"],
            manual.durable(daemoneye_eventbus::core::DurableName::new("kept").unwrap()),
        )
        .await
        .unwrap();
    let publ = bus.client("pub").await;
    let n = 100;
    tokio::time::timeout(
        Duration::from_secs(20),
        publish_processed(&publ, "job", 0, n),
    )
    .await
    .expect("the publisher is held back for a bounded time");
    let report = publ.wait_acked(WAIT).await;
    assert_eq!(report.acked, u64::from(n));
    // The plain subscription was closed, and said so after what it had received.
    let mut got = 0;
    loop {
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Ok(_) => got += 1,
            Err(RecvError::Ended(why)) => {
                assert!(why.contains("processed_stall_timeout_ms"), "{why}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(got <= 10, "it never acknowledged: at most its window");
    let stats = bus.broker.stats();
    assert!(stats.stalled >= 2, "{}", stats.stalled);
    // What the closed subscription held is a slow reader's loss, not a closed connection's.
    assert!(stats.dropped_by_cause["slow_reader"] > 0, "{stats:?}");
    assert_eq!(stats.dropped_by_cause.values().sum::<u64>(), stats.dropped);
    let kept = stats
        .subscriptions
        .iter()
        .find(|d| d.durable.as_deref() == Some("kept"))
        .unwrap();
    assert!(kept.stalled);
    assert!(
        kept.dropped > 0,
        "the stalled durable subscription dropped its oldest, counted"
    );
    // The durable subscriber gets the newest, told of what was dropped.
    let (mut last, mut missed) = (0, 0);
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(500), d.recv()).await {
        match r {
            Ok(m) => {
                last = payload_u32(&m);
                d.ack(&m);
            }
            Err(RecvError::Missed { count, reason }) => {
                assert_eq!(
                    reason,
                    daemoneye_eventbus::client::MissedReason::BacklogFull
                );
                missed += count;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(missed, kept.dropped);
    assert!(
        bus.broker.stats().dropped_by_cause["backlog_full"] >= kept.dropped,
        "the durable subscription's drops are counted broker-wide as a full backlog"
    );
    assert_eq!(
        last,
        n - 1,
        "the newest was kept: {:?}",
        bus.broker.stats().subscriptions
    );
    // The closed subscription is gone from its connection too: a subscription opened since
    // (which may reuse its place in the broker) outlives that connection.
    let fresh = bus.client("fresh").await;
    let mut f = fresh.subscribe_with(["job"], Qos::Processed).await.unwrap();
    drop((s, d));
    stuck.drain().await;
    drop(stuck);
    publish_processed(&publ, "job", 1000, 1001).await;
    assert_eq!(payload_u32(&next(&mut f).await), 1000);
}

async fn repeated_topic_follows_subscription_changes(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let publ = bus.client("pub").await;
    let a = bus.client("a").await;
    let mut first = a.subscribe(["same.topic"]).await.unwrap();
    publ.publish(&t("same.topic"), "1").await.unwrap();
    assert_eq!(next(&mut first).await.payload().as_ref(), b"1");
    // A new connection subscribes: the publisher's next message on the same topic reaches it.
    let b = bus.client("b").await;
    let mut second = b.subscribe(["same.+"]).await.unwrap();
    publ.publish(&t("same.topic"), "2").await.unwrap();
    assert_eq!(next(&mut first).await.payload().as_ref(), b"2");
    assert_eq!(next(&mut second).await.payload().as_ref(), b"2");
    // A second subscription on an existing connection gets its copy too.
    let mut third = a.subscribe(["same.#"]).await.unwrap();
    publ.publish(&t("same.topic"), "3").await.unwrap();
    assert_eq!(next(&mut first).await.payload().as_ref(), b"3");
    assert_eq!(next(&mut third).await.payload().as_ref(), b"3");
    assert_eq!(next(&mut second).await.payload().as_ref(), b"3");
    // Unsubscribing stops delivery at once.
    second.unsubscribe().await.unwrap();
    drop(first);
    a.ping().await.unwrap();
    publ.publish(&t("same.topic"), "4").await.unwrap();
    assert_eq!(next(&mut third).await.payload().as_ref(), b"4");
    b.ping().await.unwrap();
    let stats = bus.broker.stats();
    let conn_b = stats.connections.iter().find(|c| c.name == "b").unwrap();
    assert_eq!(conn_b.delivered, 2, "b got exactly messages 2 and 3");
}

fn group(name: &str) -> QueueGroup {
    QueueGroup::new(name).unwrap()
}

async fn echo_service(c: &Client, topic: &str, options: ServeOptions) -> Service {
    c.serve([topic], options, |m: Message| async move {
        Ok(m.payload().clone())
    })
    .await
    .unwrap()
}

async fn request_reply_and_typed_errors(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let responder = bus.client("responder").await;
    let _echo = echo_service(&responder, "svc.echo", ServeOptions::default()).await;
    let _failing = responder
        .serve(
            ["svc.fail"],
            ServeOptions::default(),
            |m: Message| async move {
                match m.payload().as_ref() {
                    b"bad" => Err(ReplyStatus::invalid_operation("unknown operation 'bad'")),
                    _ => Err(ReplyStatus::execution_error(
                        "disk full while writing the report",
                    )),
                }
            },
        )
        .await
        .unwrap();
    let caller = bus.client("caller").await;
    let reply = caller.request(&t("svc.echo"), "hello", WAIT).await.unwrap();
    assert_eq!(reply.payload().as_ref(), b"hello");
    let e = caller.request(&t("svc.fail"), "x", WAIT).await.unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::ExecutionError);
    assert_eq!(e.message, "disk full while writing the report");
    let e = caller
        .request(&t("svc.fail"), "bad", WAIT)
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::InvalidOperation);
    // Nobody serves this topic: the broker answers at once, long before the deadline.
    let started = std::time::Instant::now();
    let e = caller
        .request(
            &t("control.collector.procmond"),
            "x",
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::NoResponders);
    assert_eq!(e.message, "no responders for control.collector.procmond");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(caller.pending_requests(), 0);
    // A caller whose own subscription also matches its inbox still gets its replies, and the
    // subscription sees them too.
    let watcher = bus.client("watching-caller").await;
    let mut everything = watcher.subscribe(["#"]).await.unwrap();
    let r = watcher.request(&t("svc.echo"), "seen", WAIT).await.unwrap();
    assert_eq!(r.payload().as_ref(), b"seen");
    let seen = topics(&mut everything, 2).await;
    assert_eq!(seen[0], "svc.echo");
    assert!(seen[1].starts_with("_inbox."), "{seen:?}");
    let m = caller.rpc_metrics();
    assert_eq!(m.operations["svc.echo"].ok, 1);
    assert_eq!(m.operations["svc.fail"].errors["execution_error"], 1);
    assert_eq!(m.errors_of("no_responders"), 1);
    assert_eq!(bus.broker.stats().no_responders, 1);
}

async fn deadlines_and_cancellation(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let responder = bus.client("slow").await;
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let _slow = responder
        .serve(
            ["svc.slow"],
            ServeOptions::default().concurrency(8),
            move |m: Message| {
                let mut release = release_rx.clone();
                async move {
                    let _ = release.wait_for(|r| *r).await;
                    Ok(m.payload().clone())
                }
            },
        )
        .await
        .unwrap();
    let caller = bus.client("caller").await;
    let e = caller
        .request(&t("svc.slow"), "x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::Timeout);
    assert_eq!(
        caller.pending_requests(),
        0,
        "a timed-out call leaves the map"
    );
    // A bounded pending map: the second concurrent call is refused at once.
    let mut options = ClientOptions::named("tight");
    options.max_pending_requests = 1;
    let tight = Client::connect(&bus.endpoint, bus.tls(options))
        .await
        .unwrap();
    let first = {
        let tight = tight.clone();
        tokio::spawn(async move { tight.request(&t("svc.slow"), "1", WAIT).await })
    };
    while tight.pending_requests() == 0 {
        tokio::task::yield_now().await;
    }
    let e = tight.request(&t("svc.slow"), "2", WAIT).await.unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::Busy);
    // Closing the client completes the waiting call with Cancelled.
    tight.close().await;
    let e = tokio::time::timeout(WAIT, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::Cancelled);
    release_tx.send(true).unwrap();
}

async fn queue_group_gives_each_request_to_one_instance(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let a = bus.client("inst-a").await;
    let b = bus.client("inst-b").await;
    let tag = |name: &'static str| {
        move |_m: Message| async move { Ok(Bytes::from_static(name.as_bytes())) }
    };
    let opts = ServeOptions::default().group(group("workers"));
    let svc_a = a.serve(["svc.work"], opts.clone(), tag("a")).await.unwrap();
    let _svc_b = b.serve(["svc.work"], opts, tag("b")).await.unwrap();
    // An observer without a group sees every request too.
    let watcher = bus.client("watcher").await;
    let mut seen = watcher.subscribe(["svc.work"]).await.unwrap();
    let caller = bus.client("caller").await;
    let mut by = std::collections::BTreeMap::new();
    for i in 0..40 {
        let r = caller
            .request(&t("svc.work"), format!("{i}"), WAIT)
            .await
            .unwrap();
        *by.entry(r.payload().clone()).or_insert(0) += 1;
    }
    assert_eq!(
        by.values().sum::<i32>(),
        40,
        "every request answered exactly once"
    );
    assert!(
        by.len() == 2 && by.values().all(|n| *n >= 10),
        "shared: {by:?}"
    );
    assert_eq!(topics(&mut seen, 40).await.len(), 40);
    // One instance stops gracefully; every later request goes to the other, none is lost.
    svc_a.drain(WAIT).await;
    for i in 0..20 {
        let r = caller
            .request(&t("svc.work"), format!("{i}"), WAIT)
            .await
            .unwrap();
        assert_eq!(r.payload().as_ref(), b"b");
    }
    // A plain subscription and a group one cannot share a filter on one connection.
    let e = b
        .subscribe_with_options(["svc.work"], SubscribeOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(e, SubscribeError::Conflict(_)), "{e}");
}

async fn correlation_travels_and_filters_apply(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let responder = bus.client("responder").await;
    let _echo = echo_service(&responder, "svc.echo", ServeOptions::default()).await;
    let watcher = bus.client("watcher").await;
    let mut all = watcher.subscribe(["events.#"]).await.unwrap();
    let mut scan_only = watcher
        .subscribe_with_options(
            ["events.process.+"],
            SubscribeOptions::default().correlation(
                CorrelationFilter::any()
                    .id_pattern("scan.*")
                    .stage("enrich")
                    .tag("host", "web-*"),
            ),
        )
        .await
        .unwrap();
    // The same filter on an acknowledged (Processed) subscription.
    let mut scan_processed = watcher
        .subscribe_with_options(
            ["events.process.+"],
            SubscribeOptions::default()
                .qos(Qos::Processed)
                .correlation(CorrelationFilter::any().id_pattern("scan.*")),
        )
        .await
        .unwrap();
    let caller = bus.client("caller").await;
    let mut meta = CorrelationMetadata::root("scan.42", 1_000);
    meta.workflow_stage = Some("enrich".into());
    meta.with_tag("host", "web-01");
    let reply = caller
        .call(
            Request::new(t("svc.echo"), "x")
                .timeout(WAIT)
                .correlation(meta.clone()),
        )
        .await
        .unwrap();
    let child = reply.header().correlation.as_deref().unwrap();
    assert_eq!(child.parent_correlation_id.as_deref(), Some("scan.42"));
    assert_eq!(child.root_correlation_id, "scan.42");
    assert_eq!(child.sequence_number, 1);
    assert_eq!(child.tags, meta.tags);
    // Sent metadata arrives intact; the filter lets through only what matches.
    let other = CorrelationMetadata::root("other.1", 5);
    for m in [&other, &meta] {
        caller
            .publish_with(Publish::new(t("events.process.lifecycle"), "e").correlation(m.clone()))
            .await
            .unwrap();
    }
    let first = next(&mut all).await;
    assert_eq!(first.header().correlation.as_deref(), Some(&other));
    assert_eq!(
        next(&mut all).await.header().correlation.as_deref(),
        Some(&meta)
    );
    let got = next(&mut scan_only).await;
    assert_eq!(got.header().correlation.as_deref(), Some(&meta));
    assert_eq!(
        next(&mut scan_processed)
            .await
            .header()
            .correlation
            .as_deref(),
        Some(&meta)
    );
    // A derived event is a child of its cause without the caller building it.
    caller
        .publish_with(Publish::new(t("events.process.tree"), "d").caused_by(&got))
        .await
        .unwrap();
    let derived = next(&mut all).await;
    let d = derived.header().correlation.as_deref().unwrap();
    assert_eq!(d.parent_correlation_id.as_deref(), Some("scan.42"));
    assert_eq!(
        (d.root_correlation_id.as_str(), d.sequence_number),
        ("scan.42", 1)
    );
    // The derived event has the cause's stage and tags but a new random id, which the id
    // pattern refuses: the next message through the filter is this marker.
    caller
        .publish_with(Publish::new(t("events.process.end"), "m").correlation(meta.clone()))
        .await
        .unwrap();
    assert_eq!(
        next(&mut scan_only).await.topic().as_str(),
        "events.process.end"
    );
}

async fn concurrent_callers_get_only_their_replies(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let responder = bus.client("responder").await;
    let _echo = echo_service(
        &responder,
        "svc.echo",
        ServeOptions::default().concurrency(16),
    )
    .await;
    let mut tasks = Vec::new();
    for c in 0..4 {
        let client = bus.client(&format!("caller-{c}")).await;
        tasks.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            for i in 0..50 {
                let client = client.clone();
                calls.push(tokio::spawn(async move {
                    let body = format!("{c}/{i}");
                    let r = client
                        .request(&t("svc.echo"), body.clone(), WAIT)
                        .await
                        .unwrap();
                    assert_eq!(r.payload().as_ref(), body.as_bytes());
                }));
            }
            for call in calls {
                call.await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn rpc_edges(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let responder = bus.client("responder").await;
    // Two local subscriptions of one group both match: the request is handled once.
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let count = |n: std::sync::Arc<std::sync::atomic::AtomicU32>| {
        move |_m: Message| {
            let n = std::sync::Arc::clone(&n);
            async move {
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Bytes::from_static(b"ok"))
            }
        }
    };
    let g = ServeOptions::default().group(group("twice"));
    let _wide = responder
        .serve(["svc.+"], g.clone(), count(handled.clone()))
        .await
        .unwrap();
    let _narrow = responder
        .serve(["svc.once"], g, count(handled.clone()))
        .await
        .unwrap();
    let _panics = responder
        .serve(
            ["boom.now"],
            ServeOptions::default(),
            |_m: Message| async move {
                if true {
                    panic!("index out of range");
                }
                Ok(Bytes::new())
            },
        )
        .await
        .unwrap();
    let caller = bus.client("caller").await;
    for _ in 0..4 {
        caller.request(&t("svc.once"), "x", WAIT).await.unwrap();
    }
    // A later call on the same service proves no extra reply or handling is on its way.
    caller.request(&t("svc.other"), "x", WAIT).await.unwrap();
    assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 5);
    // A handler that panics fails its request, and the service goes on.
    let e = caller.request(&t("boom.now"), "x", WAIT).await.unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::ExecutionError);
    assert!(e.message.contains("index out of range"), "{e}");
    let e = caller.request(&t("boom.now"), "x", WAIT).await.unwrap_err();
    assert_eq!(
        e.kind,
        RpcErrorKind::ExecutionError,
        "still serving after a panic"
    );
    // Replies cannot be sent to $sys.
    let sys = Publish::new(t("svc.once"), "x").reply_to(catalog::sys::stats());
    assert!(matches!(
        caller.publish_with(sys).await,
        Err(PublishError::Reserved(_))
    ));
    // A first call cancelled before anything completed leaves nothing behind.
    let fresh = bus.client("fresh").await;
    let _ = tokio::time::timeout(Duration::ZERO, fresh.request(&t("svc.once"), "x", WAIT)).await;
    assert_eq!(fresh.pending_requests(), 0);
    let r = fresh.request(&t("svc.once"), "y", WAIT).await.unwrap();
    assert_eq!(r.payload().as_ref(), b"ok");
    assert_eq!(fresh.pending_requests(), 0);
}

/// Polls `fut` once: its output if it completes without waiting.
fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(fut).poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

/// While connected, a publisher ahead of its writer waits once `connected_outbox_bytes` are
/// queued, not at the `outbox_bytes` kept for an outage.
async fn a_connected_publisher_waits_at_the_connected_bound(kind: Kind) {
    let bus = bus(kind, BrokerConfig::default()).await;
    let payload = Bytes::from(vec![7u8; 1024]);
    let need = payload.len() + "a.b".len() + daemoneye_eventbus::core::message::MESSAGE_OVERHEAD;
    for bound in [64 * 1024, 1024 * 1024] {
        let mut options = ClientOptions::named("ahead");
        options.connected_outbox_bytes = bound;
        let client = Client::connect(&bus.endpoint, bus.tls(options))
            .await
            .unwrap();
        // Each publish is polled once and this task never yields, so the client's writer
        // never runs: nothing leaves the queue.
        let mut accepted = 0;
        while accepted < 10_000 && poll_once(client.publish(&t("a.b"), payload.clone())).is_some() {
            accepted += 1;
        }
        assert_eq!(accepted, bound / need, "bound {bound}");
        client.close().await;
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        #[cfg(unix)]
        mod unix { use super::*; $( #[tokio::test] async fn $name() { super::$name(Kind::Unix).await } )* }
        #[cfg(windows)]
        mod pipe { use super::*; $( #[tokio::test] async fn $name() { super::$name(Kind::Pipe).await } )* }
        mod tcp { use super::*; $( #[tokio::test] async fn $name() { super::$name(Kind::Tcp).await } )* }
        mod tls { use super::*; $( #[tokio::test] async fn $name() { super::$name(Kind::Tls).await } )* }
        mod inproc { use super::*; $( #[tokio::test] async fn $name() { super::$name(Kind::InProc).await } )* }
    };
}

conformance!(
    publish_and_receive_in_order,
    a_connected_publisher_waits_at_the_connected_bound,
    bursts_travel_as_runs,
    wildcard_matrix,
    one_copy_when_several_filters_match,
    large_payloads_and_the_limit,
    unsubscribe_stops_delivery,
    sys_topics,
    ping_and_drain,
    shutdown_sends_going_away_and_ends_streams,
    slow_reader_drops_are_counted_and_reported,
    drops_of_many_topics_are_bounded_and_all_reported,
    subscribers_behind_one_burst_share_its_copies,
    subscriptions_are_limited_and_charged,
    a_filter_has_max_subscribers_at_most,
    disconnect_policy_closes_a_slow_reader,
    processed_subscriptions_lose_nothing,
    unacknowledged_deliveries_come_again,
    a_durable_subscription_outlives_its_subscriber,
    a_dropped_backlog_reaches_a_small_subscriber,
    a_stalled_subscription_releases_its_publishers,
    repeated_topic_follows_subscription_changes,
    request_reply_and_typed_errors,
    deadlines_and_cancellation,
    queue_group_gives_each_request_to_one_instance,
    correlation_travels_and_filters_apply,
    concurrent_callers_get_only_their_replies,
    rpc_edges,
);

/// The agent's usual arrangement: a collector publishes over a socket, the embedding process
/// subscribes in process. Runs reach the in-process subscriber as frames it reads message by
/// message.
#[cfg(unix)]
#[tokio::test]
async fn runs_from_a_socket_reach_an_in_process_subscriber() {
    let bus = bus(Kind::Unix, BrokerConfig::default()).await;
    let inproc = Client::connect(bus.broker.inproc_endpoint(), ClientOptions::named("agent"))
        .await
        .unwrap();
    let mut s = inproc.subscribe(["events.process.+"]).await.unwrap();
    let collector = bus.client("procmond").await;
    for i in 0..500u32 {
        collector
            .publish(&t("events.process.lifecycle"), i.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    for i in 0..500u32 {
        let m = next(&mut s).await;
        assert_eq!(m.payload().as_ref(), i.to_le_bytes());
        assert_eq!(m.header().source.as_str(), "procmond");
    }
    let stats = bus.broker.stats();
    assert!(stats.runs >= 1 && stats.runs < 500, "{} runs", stats.runs);
}
