//! The bridge's outbound rate against async-nats's own JetStream publish-with-ack rate, on
//! one `nats-server -js` (a process of its own, file storage in a temporary directory,
//! loopback), in one run, alternating:
//!
//! - `async-nats`: N × 256 B published straight to a stream with publish-and-ack, a window of
//!   256 acknowledgements in flight and a `Nats-Msg-Id` on each (what the bridge sends),
//!   timed from the first publish to the last acknowledgement;
//! - `bridge`: N × 256 B published Processed to a local broker (default options) by a client
//!   (default options), carried by the bridge (default options: window 256) into its stream,
//!   timed from the first local publish to the last message JetStream stored.
//!
//! `cargo run --release -p daemoneye-eventbus-nats --example bridge_bench -- [COUNT] [RUNS] [disk]`
//! (defaults 100000 and 3; `disk`: the broker keeps the durable subscription in a data
//! directory, as the agent does by default, with its default `fsync`). One line per run and
//! side, then the ratio of the medians.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use daemoneye_eventbus_broker::{Broker, BrokerConfig};
use daemoneye_eventbus_client::{Client, ClientOptions, Publish};
use daemoneye_eventbus_core::{Qos, Topic};
use daemoneye_eventbus_nats::{Bridge, BridgeConfig};
use daemoneye_eventbus_transport::Endpoint;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

const WINDOW: usize = 256;

struct Server(std::process::Child, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

async fn connect(port: u16) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = async_nats::connect(format!("127.0.0.1:{port}")).await {
            return c;
        }
        assert!(Instant::now() < deadline, "nats-server did not answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// async-nats alone: publish-and-ack with a window, a message id on each.
async fn direct(js: &jetstream::Context, run: u32, count: u64) -> f64 {
    let name = format!("DIRECT{run}");
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("direct{run}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let payload = Bytes::from(vec![7u8; 256]);
    let subject = format!("direct{run}.events.process.lifecycle");
    let mut in_flight = VecDeque::with_capacity(WINDOW);
    let start = Instant::now();
    for i in 0..count {
        if in_flight.len() == WINDOW {
            let ack: jetstream::context::PublishAckFuture = in_flight.pop_front().unwrap();
            ack.await.unwrap();
        }
        let publish = jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(format!("direct-{run}-{i}"));
        in_flight.push_back(js.send_publish(subject.clone(), publish).await.unwrap());
    }
    for ack in in_flight {
        ack.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    js.delete_stream(&name).await.unwrap();
    count as f64 / secs
}

/// The bridge: local Processed publishes carried into JetStream.
async fn bridged(port: u16, js: &jetstream::Context, run: u32, count: u64, disk: bool) -> f64 {
    let dir = std::env::temp_dir().join(format!("bridge-bench-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let local = Endpoint::Unix(dir.join("bus.sock"));
    let config = BrokerConfig {
        data_dir: disk.then(|| dir.join("state")),
        ..BrokerConfig::default()
    };
    let broker = Broker::start_on(config, std::slice::from_ref(&local))
        .await
        .unwrap();
    let name = format!("bench{run}");
    let stream_name = format!("BRIDGE{run}");
    let config: BridgeConfig = toml::from_str(&format!(
        "url = \"nats://127.0.0.1:{port}\"\nname = \"{name}\"\nstream = \"{stream_name}\"\n\
         subject_prefix = \"fleet.{name}\"\noutbound = [\"jobs.#\"]\n"
    ))
    .unwrap();
    let bridge = Bridge::start(config, &local).await.unwrap();
    // The bridge has made its stream before the clock starts.
    while js.get_stream(&stream_name).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = Client::connect(&local, ClientOptions::named("bench-publisher"))
        .await
        .unwrap();
    let topic = Topic::new("jobs.process.lifecycle").unwrap();
    let payload = Bytes::from(vec![7u8; 256]);
    let start = Instant::now();
    for _ in 0..count {
        client
            .publish_with(Publish::new(topic.clone(), payload.clone()).qos(Qos::Processed))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while bridge.stats().stored < count {
        assert!(Instant::now() < deadline, "{:?}", bridge.stats());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let stats = bridge.stats();
    assert_eq!((stats.stored, stats.failures), (count, 0), "{stats:?}");
    bridge.shutdown().await;
    client.close().await;
    broker.shutdown().await;
    js.delete_stream(&stream_name).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    count as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let count: u64 = args.next().map_or(100_000, |a| a.parse().expect("COUNT"));
    let runs: u32 = args.next().map_or(3, |a| a.parse().expect("RUNS"));
    let disk = args.next().is_some_and(|a| a == "disk");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("bridge-bench-nats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = std::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("nats-server on PATH (Debian package nats-server)");
    let _server = Server(child, dir);
    let js = jetstream::new(connect(port).await);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let rate = direct(&js, run, count).await;
        println!("async-nats  run {run}: {count} × 256 B, {rate:>9.0} msgs/s");
        a.push(rate);
        let rate = bridged(port, &js, run, count, disk).await;
        let on = if disk { "on disk" } else { "in memory" };
        println!(
            "bridge      run {run}: {count} × 256 B, {rate:>9.0} msgs/s (durable subscription {on})"
        );
        b.push(rate);
    }
    let (a, b) = (median(a), median(b));
    println!(
        "median: async-nats {a:.0} msgs/s, bridge {b:.0} msgs/s: {:.0} %",
        100.0 * b / a
    );
}
