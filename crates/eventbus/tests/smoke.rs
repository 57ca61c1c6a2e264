//! Smoke test: publish and subscribe through a broker on a Unix socket.
use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{Client, ClientOptions};
use daemoneye_eventbus::core::Topic;
use daemoneye_eventbus::transport::Endpoint;
use std::time::Duration;

#[tokio::test]
async fn smoke_unix() {
    let dir = std::env::temp_dir().join(format!("eb-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ep = Endpoint::Unix(dir.join("s.sock"));
    let broker = Broker::start_on(BrokerConfig::default(), &[ep.clone()])
        .await
        .unwrap();
    let sub = Client::connect(&ep, ClientOptions::named("sub"))
        .await
        .unwrap();
    let mut s = sub.subscribe(["events.#"]).await.unwrap();
    let publ = Client::connect(&ep, ClientOptions::named("pub"))
        .await
        .unwrap();
    for i in 0..1000u32 {
        publ.publish(
            &Topic::new("events.process.lifecycle").unwrap(),
            i.to_le_bytes().to_vec(),
        )
        .await
        .unwrap();
    }
    for i in 0..1000u32 {
        let m = tokio::time::timeout(Duration::from_secs(5), s.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload().as_ref(), i.to_le_bytes());
    }
    let stats = broker.stats();
    assert_eq!(stats.published, 1000);
    publ.drain().await;
    sub.close().await;
    let report = broker.shutdown().await;
    assert!(report.drained, "{report:?}");
}
