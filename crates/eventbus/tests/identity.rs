//! Supervised collectors' names are bound to the processes the supervisor started
//! (`Broker::register_collector`), whether they connected before or after the registration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TempDir, WAIT};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{Client, ClientOptions, ConnectError};
use std::time::Duration;

fn options(name: &str) -> ClientOptions {
    let mut o = ClientOptions::named(name);
    // A torn-down impostor must not come back by itself.
    o.reconnect.max_attempts = Some(0);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_name_belongs_to_the_registered_process() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-ident-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ep = Endpoint::Unix(dir.0.join("bus.sock"));
    let broker = Broker::start_on(BrokerConfig::default(), std::slice::from_ref(&ep))
        .await
        .unwrap();
    let me = std::process::id();
    let collector_of = |broker: &Broker, name: &str| {
        broker
            .stats()
            .connections
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.collector.clone())
    };
    // Connected before its registration: it becomes the collector.
    let early = Client::connect(&ep, options("procmond")).await.unwrap();
    assert_eq!(collector_of(&broker, "procmond"), Some(None));
    broker.register_collector("procmond", me, &[]);
    assert_eq!(
        collector_of(&broker, "procmond"),
        Some(Some("procmond".into()))
    );
    // Another process's connection under a collector's name goes when the collector is
    // registered, and a new one is refused.
    let squatter = Client::connect(&ep, options("netmond")).await.unwrap();
    broker.register_collector("netmond", 1, &[]);
    let deadline = tokio::time::Instant::now() + WAIT;
    while collector_of(&broker, "netmond").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the squatter stayed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match Client::connect(&ep, options("netmond")).await {
        Err(ConnectError::Refused { message, .. }) => {
            assert!(
                message.contains("belongs to the collector the supervisor started (pid 1)"),
                "{message}"
            );
        }
        other => panic!("refused: {other:?}"),
    }
    // Ended: the name is free again.
    broker.unregister_collector(1);
    let later = Client::connect(&ep, options("netmond")).await.unwrap();
    later.close().await;
    squatter.close().await;
    early.close().await;
    broker.shutdown().await;
}

/// A reply inbox belongs to the connection that subscribed to it first: another is refused
/// while it lives, and may have it once it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_inbox_is_kept_to_its_first_subscriber() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-inbox-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ep = Endpoint::Unix(dir.0.join("bus.sock"));
    let broker = Broker::start_on(BrokerConfig::default(), std::slice::from_ref(&ep))
        .await
        .unwrap();
    let owner = Client::connect(&ep, options("caller")).await.unwrap();
    let _mine = owner.subscribe(["_inbox.feed.+"]).await.unwrap();
    let other = Client::connect(&ep, options("snoop")).await.unwrap();
    match other.subscribe(["_inbox.feed.#"]).await {
        Err(daemoneye_eventbus::client::SubscribeError::Refused { message, .. }) => {
            assert!(
                message.contains("another connection's reply inbox"),
                "{message}"
            );
        }
        other => panic!("refused: {other:?}"),
    }
    owner.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while other.subscribe(["_inbox.feed.#"]).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    other.close().await;
    broker.shutdown().await;
}
