//! The seed `EventBus` API across processes: the agent (this test) embeds the broker and
//! subscribes; a collector in another process (this test binary, re-executed) connects by
//! socket path and publishes `CollectionEvent`s with correlation ids.

#![allow(clippy::unwrap_used)]

use daemoneye_eventbus::{
    CollectionEvent, DaemoneyeBroker, DaemoneyeEventBus, EventBus, EventSubscription, ProcessEvent,
};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const CHILD_ENV: &str = "EVENTBUS_TEST_COLLECTOR_SOCKET";
const EVENTS: u32 = 50;

fn event(pid: u32) -> CollectionEvent {
    let mut metadata = HashMap::new();
    metadata.insert("uid".to_string(), "1000".to_string());
    CollectionEvent::Process(ProcessEvent {
        pid,
        name: format!("proc-{pid}"),
        command_line: Some(format!("proc-{pid} --flag")),
        executable_path: Some("/usr/bin/proc".into()),
        ppid: Some(1),
        start_time: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000 + u64::from(pid))),
        metadata,
    })
}

/// The collector side: runs only when re-executed by `agent_receives_events_from_a_collector_process`.
#[tokio::test]
async fn collector_process() {
    let Ok(socket) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut bus = DaemoneyeEventBus::connect(&socket, "procmond")
        .await
        .unwrap();
    for pid in 0..EVENTS {
        bus.publish(event(pid), format!("corr-{pid}"))
            .await
            .unwrap();
    }
    let stats = bus.statistics().await.unwrap();
    assert!(stats.messages_published >= u64::from(EVENTS));
    bus.shutdown().await.unwrap();
}

#[tokio::test]
async fn agent_receives_events_from_a_collector_process() {
    let dir = std::env::temp_dir().join(format!("eb-seed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    // A collector the agent did not start publishes events only where a policy lets it:
    // this one, by its executable.
    let policy = dir.join("acl.toml");
    let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    std::fs::write(
        &policy,
        format!(
            "version = 1\n[[rule]]\nexe = \"{}\"\npublish = [\"events.process.#\"]\nsubscribe = [\"$sys.#\"]\n",
            exe.display()
        ),
    )
    .unwrap();
    let broker = DaemoneyeBroker::with_config(daemoneye_eventbus::broker::BrokerConfig {
        socket_path: Some(socket.clone()),
        acl_file: Some(policy),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut bus = DaemoneyeEventBus::from_broker(broker).await.unwrap();
    let mut rx = bus
        .subscribe(EventSubscription::new("detection", ["events.process.*"]))
        .await
        .unwrap();

    let exe = std::env::current_exe().unwrap();
    let child = tokio::task::spawn_blocking(move || {
        Command::new(exe)
            .args(["--exact", "collector_process", "--nocapture"])
            .env(CHILD_ENV, &socket)
            .status()
            .unwrap()
    });
    for pid in 0..EVENTS {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.event.as_ref().unwrap(), &event(pid));
        assert_eq!(
            got.correlation_id.as_deref(),
            Some(format!("corr-{pid}").as_str())
        );
        assert_eq!(got.source, "procmond");
        assert_eq!(got.topic.as_str(), "events.process.lifecycle");
        assert!(got.timestamp <= SystemTime::now());
        assert!(got.missed_before.is_none());
    }
    assert!(child.await.unwrap().success(), "collector process failed");
    let stats = bus.statistics().await.unwrap();
    assert!(stats.messages_published >= u64::from(EVENTS));
    assert!(stats.messages_delivered >= u64::from(EVENTS));
    bus.unsubscribe("detection").await.unwrap();
    assert!(bus.unsubscribe("detection").await.is_err());
    bus.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
