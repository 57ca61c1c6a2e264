//! The agent as an embedder runs it: in this process, on a private socket.
#![allow(clippy::unwrap_used)]

use daemoneye_agent::{Agent, AgentConfig, AgentError, AgentOptions, ConfigError, Health};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::client::{Client, ClientOptions};
use std::path::PathBuf;

fn private_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agent-embed-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    dir
}

#[tokio::test]
async fn an_embedder_starts_reports_and_stops_the_agent() {
    let dir = private_dir("run");
    let config = AgentConfig {
        collectors: Some(Vec::new()),
        ..AgentConfig::default()
    };
    let endpoint = Endpoint::Unix(dir.join("agent.sock"));
    let options = AgentOptions {
        bundled_dir: dir.clone(),
        client_name: "embedder".into(),
    };
    let mut agent = Agent::start(config, endpoint.clone(), options)
        .await
        .unwrap();
    // Another process's view: a client publishes an event on the agent's socket.
    let client = Client::connect(&endpoint, ClientOptions::named("tool"))
        .await
        .unwrap();
    agent.wait_until_heard().await.unwrap();
    let report = agent.report().await.unwrap();
    assert_eq!(report.health, Health::Healthy, "{report:?}");
    assert_eq!(report.collectors_health.reason, "no collectors configured");
    assert!(report.connections >= 2, "{report:?}");
    // Durable state lives beside the socket unless configured.
    assert!(dir.join("state").is_dir());
    client.close().await;
    let (collectors, shutdown) = agent.shutdown().await;
    assert!(collectors.is_empty());
    assert!(shutdown.drained, "{shutdown:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn without_its_bundled_collectors_the_agent_names_what_is_missing() {
    let dir = private_dir("missing");
    let options = AgentOptions {
        bundled_dir: dir.clone(),
        client_name: "embedder".into(),
    };
    let e = Agent::start(
        AgentConfig::default(),
        Endpoint::Unix(dir.join("agent.sock")),
        options,
    )
    .await
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            AgentError::Config(ConfigError::BundledMissing {
                name: "procmond",
                ..
            })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("cargo build --release"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
