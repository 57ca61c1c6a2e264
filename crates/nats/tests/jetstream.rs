//! The bridge against a real `nats-server -js` (Debian's package; `.ci/run` installs it),
//! killed with SIGKILL and restarted twice while 10,000 Processed events are published: the
//! stream ends with exactly 10,000 messages, no duplicates, each publisher's in its order.
//! And inbound: a NATS subject reaches a local subscriber through the broker (whose default
//! policy keeps events.# to collectors, so these tests bridge jobs.#), and
//! what the bridge sent out never comes back in.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream;
use daemoneye_eventbus_broker::{Broker, BrokerConfig};
use daemoneye_eventbus_client::{Client, ClientOptions, Publish};
use daemoneye_eventbus_core::{Qos, Topic};
use daemoneye_eventbus_nats::{Bridge, BridgeConfig, Inbound};
use daemoneye_eventbus_transport::Endpoint;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> TempDir {
    let p = std::env::temp_dir().join(format!("eb-nats-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

/// A `nats-server -js` on a fixed loopback port with its store in `dir`; killed on drop.
struct NatsServer {
    child: Child,
}

impl NatsServer {
    fn start(port: u16, dir: &Path) -> Self {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server; .ci/run installs it)");
        Self { child }
    }

    /// Freezes it (SIGSTOP): what is sent to it waits unanswered.
    fn freeze(&self) {
        let status = Command::new("kill")
            .args(["-STOP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A JetStream context once the server answers (bounded).
async fn jetstream_at(port: u16) -> jetstream::Context {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(c) = async_nats::connect(format!("127.0.0.1:{port}")).await {
            return jetstream::new(c);
        }
        assert!(Instant::now() < deadline, "nats-server never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Messages in `stream` now (0 while it does not exist or the server is away).
async fn stored(js: &jetstream::Context, stream: &str) -> u64 {
    match tokio::time::timeout(Duration::from_secs(1), js.get_stream(stream)).await {
        Ok(Ok(mut s)) => match tokio::time::timeout(Duration::from_secs(1), s.info()).await {
            Ok(Ok(i)) => i.state.messages,
            _ => 0,
        },
        _ => 0,
    }
}

async fn wait_stored(js: &jetstream::Context, stream: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = stored(js, stream).await;
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the stream holds {n} of {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn config(port: u16, name: &str) -> BridgeConfig {
    let text = format!(
        "url = \"nats://127.0.0.1:{port}\"\nname = \"{name}\"\nstream = \"EVENTS_{}\"\n\
         subject_prefix = \"fleet.{name}\"\noutbound = [\"jobs.#\"]\nack_timeout_seconds = 2\n",
        name.to_uppercase().replace('-', "_")
    );
    toml::from_str(&text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_survive_two_server_crashes_once_each_and_in_order() {
    let dir = temp_dir("crash");
    let port = free_port();
    let mut server = NatsServer::start(port, &dir.0);
    let socket = dir.0.join("bus.sock");
    // Default broker options: the durable subscription holds what NATS has not taken.
    let broker = Broker::start_on(BrokerConfig::default(), &[Endpoint::Unix(socket.clone())])
        .await
        .unwrap();
    let local = Endpoint::Unix(socket);
    let cfg = config(port, "host1");
    let stream = cfg.stream.clone();
    let bridge = Bridge::start(cfg, &local).await.unwrap();

    // Two publishers, Processed, 5,000 each, in four rounds. In the middle two, the server
    // is frozen, the round published, and once the bridge has a window of publishes in flight
    // to it, the server is killed (SIGKILL) and started again on its store.
    let publishers = [
        Client::connect(&local, ClientOptions::named("pub-a"))
            .await
            .unwrap(),
        Client::connect(&local, ClientOptions::named("pub-b"))
            .await
            .unwrap(),
    ];
    // Under the default policy only collectors publish events.#: the bridge carries jobs.#.
    let topic = Topic::new("jobs.process.lifecycle").unwrap();
    let per_round = 1_250u32;
    let mut expected = 0u64;
    for round in 0..4u32 {
        let crash = round == 1 || round == 2;
        if crash {
            server.freeze();
        }
        for i in 0..per_round {
            for (k, p) in publishers.iter().enumerate() {
                let body = format!("{k}:{}", round * per_round + i);
                p.publish_with(Publish::new(topic.clone(), body).qos(Qos::Processed))
                    .await
                    .unwrap();
            }
        }
        for p in &publishers {
            let report = p.wait_acked(WAIT).await;
            assert_eq!((report.outstanding, report.refused), (0, 0), "{report:?}");
        }
        expected += u64::from(2 * per_round);
        if round == 0 {
            // The bridge has reached the stream before the server is frozen.
            let deadline = Instant::now() + WAIT;
            while bridge.stats().stored < expected {
                assert!(Instant::now() < deadline, "{:?}", bridge.stats());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if crash {
            // The window (256) is in flight to the frozen server.
            let deadline = Instant::now() + WAIT;
            while bridge.stats().sent < bridge.stats().stored + 256 {
                assert!(Instant::now() < deadline, "{:?}", bridge.stats());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            server.kill();
            server = NatsServer::start(port, &dir.0);
        }
    }
    let js = jetstream_at(port).await;
    assert_eq!(wait_stored(&js, &stream, expected).await, 10_000);
    // Nothing more comes (no late duplicates).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored(&js, &stream).await, 10_000);

    // Every message once, each publisher's in order, by the ids the bridge sent.
    let s = js.get_stream(&stream).await.unwrap();
    let info = s.get_info().await.unwrap();
    let mut seen = HashSet::new();
    let mut by_publisher: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = s.get_raw_message(seq).await.unwrap();
        let id = m
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .unwrap()
            .as_str()
            .to_owned();
        assert!(seen.insert(id.clone()), "{id} stored twice");
        let (publisher, n) = id.split_once('-').unwrap();
        by_publisher
            .entry(publisher.to_owned())
            .or_default()
            .push(n.parse().unwrap());
        assert_eq!(m.subject.as_str(), "fleet.host1.jobs.process.lifecycle");
    }
    assert_eq!(by_publisher.len(), 2);
    for (publisher, seqs) in &by_publisher {
        assert_eq!(seqs.len(), 5_000, "{publisher}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{publisher}'s messages out of order"
        );
    }
    // What was in flight at a crash is either answered by the restarted server (it was still
    // in the client's queue) or failed, and the stream was asked where it stood.
    let stats = bridge.stats();
    assert_eq!(stats.stored, 10_000, "{stats:?}");
    assert!(
        stats.sent >= 10_000 && stats.resyncs > stats.failures,
        "{stats:?}"
    );
    assert_eq!(stats.pending, 0);
    bridge.shutdown().await;
    for p in publishers {
        p.close().await;
    }
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_subjects_reach_local_subscribers_and_nothing_loops() {
    let dir = temp_dir("inbound");
    let port = free_port();
    let _server = NatsServer::start(port, &dir.0);
    let socket = dir.0.join("bus.sock");
    let broker = Broker::start_on(BrokerConfig::default(), &[Endpoint::Unix(socket.clone())])
        .await
        .unwrap();
    let local = Endpoint::Unix(socket);
    let mut cfg = config(port, "host2");
    // Outbound jobs.# goes to fleet.host2.jobs.…; inbound takes fleet.> back in as
    // jobs.fleet.…, which outbound would send out again, were it not for the loop guard.
    cfg.inbound = vec![Inbound {
        subject: "fleet.>".into(),
        topic_prefix: "jobs".into(),
    }];
    let bridge = Bridge::start(cfg, &local).await.unwrap();
    let js = jetstream_at(port).await;
    let nats = async_nats::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let local_client = Client::connect(&local, ClientOptions::named("reader"))
        .await
        .unwrap();
    let mut sub = local_client.subscribe(["jobs.fleet.#"]).await.unwrap();
    // Until the inbound subscription is in place: publish, and wait for the first.
    let deadline = Instant::now() + WAIT;
    let first = loop {
        nats.publish("fleet.rules.update", "rule-1".into())
            .await
            .unwrap();
        nats.flush().await.unwrap();
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            break m;
        }
        assert!(Instant::now() < deadline, "inbound never arrived");
    };
    assert_eq!(first.topic().as_str(), "jobs.fleet.rules.update");
    assert_eq!(first.payload().as_ref(), b"rule-1");
    // A local event goes out once; what comes back in as jobs.fleet.host2.… is not sent
    // out again.
    local_client
        .publish_with(
            Publish::new(Topic::new("jobs.local.thing").unwrap(), "x").qos(Qos::Processed),
        )
        .await
        .unwrap();
    let report = local_client.wait_acked(WAIT).await;
    assert_eq!((report.outstanding, report.refused), (0, 0), "{report:?}");
    let n = wait_stored(&js, "EVENTS_HOST2", 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = bridge.stats();
    assert!(stats.loops_skipped >= 1, "{stats:?}");
    assert_eq!(
        stored(&js, "EVENTS_HOST2").await,
        n,
        "nothing bridged back and out again: {stats:?}"
    );
    bridge.shutdown().await;
    local_client.close().await;
    broker.shutdown().await;
}

/// A restarted server remembers message ids for its duplicate window only: a bridge whose
/// last message is older than that goes on after the restart (it names the stream's last
/// sequence, not that id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_goes_on_after_a_restart_that_forgot_its_last_message_id() {
    let dir = temp_dir("window");
    let port = free_port();
    let server = NatsServer::start(port, &dir.0);
    let socket = dir.0.join("bus.sock");
    let broker = Broker::start_on(BrokerConfig::default(), &[Endpoint::Unix(socket.clone())])
        .await
        .unwrap();
    let local = Endpoint::Unix(socket);
    let mut cfg = config(port, "host3");
    cfg.duplicate_window_seconds = 1;
    let stream = cfg.stream.clone();
    let bridge = Bridge::start(cfg, &local).await.unwrap();
    let publisher = Client::connect(&local, ClientOptions::named("pub"))
        .await
        .unwrap();
    let topic = Topic::new("jobs.window").unwrap();
    let publish = |n: u32| {
        let (publisher, topic) = (&publisher, topic.clone());
        async move {
            for i in 0..n {
                publisher
                    .publish_with(Publish::new(topic.clone(), i.to_string()).qos(Qos::Processed))
                    .await
                    .unwrap();
            }
            let report = publisher.wait_acked(WAIT).await;
            assert_eq!((report.outstanding, report.refused), (0, 0), "{report:?}");
        }
    };
    publish(100).await;
    let js = jetstream_at(port).await;
    wait_stored(&js, &stream, 100).await;
    // Past the duplicate window, the server restarts: it no longer knows the last id.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    server.kill();
    let _server = NatsServer::start(port, &dir.0);
    publish(100).await;
    let js = jetstream_at(port).await;
    assert_eq!(wait_stored(&js, &stream, 200).await, 200);
    let deadline = Instant::now() + WAIT;
    while bridge.stats().stored < 200 {
        assert!(Instant::now() < deadline, "{:?}", bridge.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(bridge.stats().pending, 0);
    bridge.shutdown().await;
    publisher.close().await;
    broker.shutdown().await;
}
