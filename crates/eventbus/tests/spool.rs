//! Store-and-forward (`ClientOptions::spool_dir`): Processed publishes made while the broker is
//! away wait on disk and reach a durable subscription once it is back, in order; what a client
//! leaves in its spool, the next client on the spool sends.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TempDir, WAIT, publish_numbered};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{Client, ClientOptions, ConnState};
use std::path::PathBuf;
use std::time::Duration;

fn options(name: &str, spool: PathBuf) -> ClientOptions {
    let mut o = ClientOptions::named(name);
    o.spool_dir = Some(spool);
    o.reconnect.initial_delay = Duration::from_millis(10);
    o.reconnect.max_delay = Duration::from_millis(50);
    o
}

async fn away(client: &Client) {
    let mut state = client.state_watch();
    tokio::time::timeout(
        WAIT,
        state.wait_for(|s| !matches!(s, ConnState::Connected { .. })),
    )
    .await
    .expect("the client notices its broker went")
    .unwrap();
}

/// Reads the durable subscription `kept` until it has `0..n`, in order; returns their ids.
async fn receive_all(endpoint: &Endpoint, n: u32) -> Vec<daemoneye_eventbus::MessageId> {
    let c = Client::connect(endpoint, ClientOptions::named("reader"))
        .await
        .unwrap();
    let mut s = c.subscribe_durable("kept", ["jobs.#"]).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let m = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap();
        assert_eq!(u32::from_le_bytes(m.payload()[..4].try_into().unwrap()), i);
        ids.push(m.id());
    }
    s.delete().await.unwrap();
    c.close().await;
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_made_while_the_broker_is_away_wait_on_disk_and_arrive_in_order() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-spool-it-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let endpoint = Endpoint::Unix(dir.0.join("bus.sock"));
    let config = BrokerConfig {
        data_dir: Some(dir.0.join("data")),
        ..BrokerConfig::default()
    };
    let endpoints = [endpoint.clone()];
    let broker = Broker::start_on(config.clone(), &endpoints).await.unwrap();
    let maker = Client::connect(&endpoint, ClientOptions::named("maker"))
        .await
        .unwrap();
    drop(maker.subscribe_durable("kept", ["jobs.#"]).await.unwrap());
    maker.close().await;

    // A collector publishes, its broker goes away, it goes on publishing: on disk.
    let spool = dir.0.join("spool");
    let collector = Client::connect(&endpoint, options("collector", spool.clone()))
        .await
        .unwrap();
    publish_numbered(&collector, 0..10).await;
    assert_eq!(collector.wait_acked(WAIT).await.outstanding, 0);
    broker.shutdown().await;
    drop(broker);
    away(&collector).await;
    publish_numbered(&collector, 10..60).await;
    assert_eq!(collector.stats().lost, 0);
    // The broker is back: the spool goes first, in order, and is acknowledged.
    let broker = Broker::start_on(config.clone(), &endpoints).await.unwrap();
    let report = collector.wait_acked(WAIT).await;
    assert_eq!((report.acked, report.outstanding), (60, 0), "{report:?}");
    assert!(collector.stats().resent >= 50);
    publish_numbered(&collector, 60..70).await;
    assert_eq!(collector.wait_acked(WAIT).await.outstanding, 0);

    // The broker goes again; the collector spools, then ends before it is back.
    broker.shutdown().await;
    drop(broker);
    away(&collector).await;
    let left = publish_numbered(&collector, 70..100).await;
    collector.close().await;
    drop(collector);
    // The next collector on the spool sends what the first left, before its own, with the
    // ids the first gave them (a copy a broker got before would be recognised); its own are
    // numbered after anything the first could have used.
    let broker = Broker::start_on(config, &endpoints).await.unwrap();
    let next = Client::connect(&endpoint, options("collector", spool))
        .await
        .unwrap();
    let own = publish_numbered(&next, 100..110).await;
    let report = next.wait_acked(WAIT).await;
    assert_eq!((report.acked, report.outstanding), (40, 0), "{report:?}");
    next.close().await;
    let ids = receive_all(&endpoint, 110).await;
    assert_eq!(ids[70..100], left[..], "the left publishes keep their ids");
    assert_eq!(ids[100..], own[..]);
    assert!(own.iter().all(|o| o.publisher == left[0].publisher));
    assert!(own[0].sequence > ids[..100].iter().map(|i| i.sequence).max().unwrap());
    broker.shutdown().await;
}
