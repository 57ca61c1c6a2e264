//! The collector services across processes: this test embeds the broker (the agent side)
//! and re-executes itself as collector instances that serve `control.collector.procmond` in
//! one queue group. Typed requests and responses with maps and nested fields round-trip,
//! handler errors come back typed, metadata arrives intact, calls are shared between
//! instances, and an instance that stops (gracefully or killed) loses no request.

#![allow(clippy::unwrap_used)]

mod common;

use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{Client, ClientOptions};
use daemoneye_eventbus::core::{CorrelationMetadata, ReplyStatus};
use daemoneye_eventbus::rpc::{
    CollectorCall, CollectorConfig, CollectorHandler, CollectorLifecycleRequest,
    CollectorOperation, CollectorRpcClient, HealthStatus, ResourceLimits, RpcConfig, RpcErrorKind,
    RpcRequest, rpc_request, rpc_response, serve_collector,
};
use daemoneye_eventbus::schema::rpc as pb;
use daemoneye_eventbus::{Endpoint, Topic};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SOCKET_ENV: &str = "EVENTBUS_TEST_RPC_SOCKET";
const INSTANCE_ENV: &str = "EVENTBUS_TEST_RPC_INSTANCE";
const WAIT: Duration = Duration::from_secs(10);

/// One collector instance's services.
struct Procmond {
    instance: String,
    config: Mutex<Option<CollectorConfig>>,
    shutdown: Arc<tokio::sync::Notify>,
}

impl CollectorHandler for Procmond {
    async fn handle(&self, call: CollectorCall) -> Result<rpc_response::Body, ReplyStatus> {
        use rpc_response::Body as R;
        match (call.operation, call.body) {
            (CollectorOperation::HealthCheck, _) => {
                // Echo what arrived, so the caller can compare it with what it sent.
                let meta = call.message.header().correlation.as_deref().cloned();
                let mut components = std::collections::HashMap::new();
                components.insert(
                    "scanner".to_owned(),
                    pb::ComponentHealth {
                        status: HealthStatus::Healthy as i32,
                        message: format!("instance {}", self.instance),
                    },
                );
                Ok(R::HealthCheck(pb::HealthCheckResponse {
                    status: HealthStatus::Healthy as i32,
                    message: format!("{meta:?}"),
                    metrics: [("processes".to_owned(), 42.5)].into_iter().collect(),
                    uptime_seconds: 1,
                    components,
                }))
            }
            (CollectorOperation::UpdateConfig, rpc_request::Body::UpdateConfig(u)) => {
                let cfg = u.new_config.unwrap_or_default();
                let mut errors = Vec::new();
                if cfg.scan_interval_ms == 0 {
                    errors.push(pb::ConfigValidationError {
                        field: "scan_interval_ms".into(),
                        message: "must be at least 1".into(),
                    });
                }
                let applied = errors.is_empty() && !u.validate_only;
                if applied {
                    *self.config.lock().unwrap() = Some(cfg);
                }
                Ok(R::UpdateConfig(pb::UpdateConfigResponse {
                    success: errors.is_empty(),
                    validation_errors: errors,
                    applied,
                    ..Default::default()
                }))
            }
            (CollectorOperation::GetConfig, _) => Ok(R::Config(pb::ConfigResponse {
                config: self.config.lock().unwrap().clone(),
                version: 1,
            })),
            (CollectorOperation::Start, _) => Err(ReplyStatus::execution_error(
                "procmond is already running (pid 4242); stop it first",
            )),
            (CollectorOperation::Shutdown, _) => {
                self.shutdown.notify_one();
                Ok(R::Shutdown(pb::ShutdownResponse {
                    accepted: true,
                    message: format!("instance {} stopping", self.instance),
                }))
            }
            (op, _) => Err(ReplyStatus::invalid_operation(format!(
                "{} is not supported by this test collector",
                op.as_str_name()
            ))),
        }
    }
}

/// The collector side: runs only when re-executed by the tests below.
#[tokio::test]
async fn collector_instance() {
    let (Ok(socket), Ok(instance)) = (std::env::var(SOCKET_ENV), std::env::var(INSTANCE_ENV))
    else {
        return;
    };
    let endpoint = Endpoint::parse(&socket).unwrap();
    let client = Client::connect(
        &endpoint,
        ClientOptions::named(format!("procmond-{instance}")),
    )
    .await
    .unwrap();
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let procmond = Procmond {
        instance: instance.clone(),
        config: Mutex::new(None),
        shutdown: Arc::clone(&shutdown),
    };
    let service = serve_collector(&client, "procmond", procmond)
        .await
        .unwrap();
    // A second service only this instance answers, for stateful calls.
    let solo = Procmond {
        instance: instance.clone(),
        config: Mutex::new(None),
        shutdown: Arc::clone(&shutdown),
    };
    let solo_service = serve_collector(&client, &format!("solo-{instance}"), solo)
        .await
        .unwrap();
    println!("ready");
    shutdown.notified().await;
    // Graceful: leave the group (acknowledged), answer what arrived, then go.
    service.drain(WAIT).await;
    solo_service.drain(WAIT).await;
    client.drain().await;
}

struct Instance {
    child: Child,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_instance(socket: &str, name: &str) -> Instance {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "collector_instance",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SOCKET_ENV, socket)
        .env(INSTANCE_ENV, name)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let name = name.to_owned();
    // Read off the runtime: the broker this test embeds must keep serving meanwhile.
    tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        // The harness prints its own lines first; "ready" comes once the services are up. A
        // child that dies ends the stream, so this read is bounded.
        loop {
            match lines.next() {
                // The harness may print "test collector_instance ... " on the same line.
                Some(Ok(l)) if l.trim_end().ends_with("ready") => break,
                Some(Ok(_)) => {}
                other => panic!("collector instance {name} did not start: {other:?}"),
            }
        }
        // Keep draining its stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
    })
    .await
    .unwrap();
    Instance { child }
}

struct Agent {
    _broker: Broker,
    socket: String,
    rpc: CollectorRpcClient,
    _dir: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

async fn agent(tag: &str) -> Agent {
    let dir = std::env::temp_dir().join(format!("eb-rpc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let broker = Broker::start_on(
        common::open(BrokerConfig::default()),
        &[Endpoint::Unix(path.clone())],
    )
    .await
    .unwrap();
    let socket = format!("unix://{}", path.display());
    let client = Client::connect(
        &Endpoint::parse(&socket).unwrap(),
        ClientOptions::named("agent"),
    )
    .await
    .unwrap();
    Agent {
        _broker: broker,
        socket,
        rpc: CollectorRpcClient::new(client, "agent", RpcConfig::default()),
        _dir: tempdir::Dir(dir),
    }
}

const PROCMOND: &str = "control.collector.procmond";

#[tokio::test]
async fn typed_calls_errors_and_metadata_across_processes() {
    if std::env::var(SOCKET_ENV).is_ok() {
        return;
    }
    let agent = agent("typed").await;
    let _a = spawn_instance(&agent.socket, "a").await;
    // Maps and nested messages round-trip: set a configuration, read it back.
    let mut settings = std::collections::HashMap::new();
    settings.insert("hash_executables".to_owned(), "true".to_owned());
    settings.insert("exclude".to_owned(), "kworker/*".to_owned());
    let config = CollectorConfig {
        collector_type: "process".into(),
        scan_interval_ms: 500,
        settings,
        limits: Some(ResourceLimits {
            max_memory_bytes: 64 << 20,
            max_open_files: 256,
            max_cpu_seconds: 0,
        }),
        enabled_topics: vec!["events.process.lifecycle".into()],
    };
    let solo = "control.collector.solo-a".to_owned();
    let invalid = CollectorConfig {
        scan_interval_ms: 0,
        ..config.clone()
    };
    let r = agent
        .rpc
        .call(
            RpcRequest::update_config(String::new(), solo.clone(), invalid, true, WAIT),
            WAIT,
        )
        .await
        .unwrap();
    let u = r.update().unwrap();
    assert!(!u.success && !u.applied);
    assert_eq!(u.validation_errors[0].field, "scan_interval_ms");
    let r = agent
        .rpc
        .call(
            RpcRequest::update_config(String::new(), solo.clone(), config.clone(), false, WAIT),
            WAIT,
        )
        .await
        .unwrap();
    assert!(r.update().unwrap().applied);
    let r = agent
        .rpc
        .call(RpcRequest::get_config(String::new(), solo, WAIT), WAIT)
        .await
        .unwrap();
    assert_eq!(r.config().unwrap().config.as_ref(), Some(&config));

    // Metadata read by the collector equals what was sent.
    let mut meta = CorrelationMetadata::root("investigation-7", 1_700_000_000_000);
    meta.workflow_stage = Some("triage".into());
    meta.with_tag("analyst", "ana");
    meta.with_tag("host", "web-01");
    let r = agent
        .rpc
        .call(
            RpcRequest::health_check(String::new(), PROCMOND.into(), WAIT)
                .with_correlation(meta.clone()),
            WAIT,
        )
        .await
        .unwrap();
    let h = r.health_check().unwrap();
    assert_eq!(h.message, format!("{:?}", Some(meta)));
    assert_eq!(h.status, HealthStatus::Healthy as i32);
    assert_eq!(h.metrics["processes"], 42.5);
    assert_eq!(h.components["scanner"].message, "instance a");

    // A handler error comes back typed, with its message.
    let e = agent
        .rpc
        .call(
            RpcRequest::lifecycle(
                String::new(),
                PROCMOND.into(),
                CollectorOperation::Start,
                CollectorLifecycleRequest::start("procmond", None),
                WAIT,
            ),
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::ExecutionError);
    assert_eq!(
        e.message,
        "procmond is already running (pid 4242); stop it first"
    );
    // Unsupported operations and undecodable requests are refused as invalid.
    let e = agent
        .rpc
        .call(
            RpcRequest::capabilities(String::new(), PROCMOND.into(), WAIT),
            WAIT,
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::InvalidOperation);
    let garbage = agent
        .rpc
        .client()
        .request(&Topic::new(PROCMOND).unwrap(), vec![0xff, 0xff, 0xff], WAIT)
        .await
        .unwrap_err();
    assert_eq!(garbage.kind, RpcErrorKind::InvalidOperation);
    assert!(garbage.message.contains("not an RpcRequest"), "{garbage}");
    // A collector nobody serves fails fast (the health policy's retries included).
    let started = Instant::now();
    let e = agent
        .rpc
        .call(
            RpcRequest::health_check(String::new(), "control.collector.netmond".into(), WAIT),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, RpcErrorKind::NoResponders);
    assert_eq!(e.message, "no responders for control.collector.netmond");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Which instance answered a health check.
async fn health_from(agent: &Agent) -> String {
    let r = agent
        .rpc
        .call(
            RpcRequest::health_check(String::new(), PROCMOND.into(), WAIT),
            WAIT,
        )
        .await
        .unwrap();
    r.health_check().unwrap().components["scanner"]
        .message
        .clone()
}

#[tokio::test]
async fn instances_share_calls_and_a_stopped_one_loses_nothing() {
    if std::env::var(SOCKET_ENV).is_ok() {
        return;
    }
    let agent = agent("group").await;
    let _a = spawn_instance(&agent.socket, "a").await;
    let b = spawn_instance(&agent.socket, "b").await;
    let mut c = spawn_instance(&agent.socket, "c").await;
    let mut by = BTreeMap::new();
    for _ in 0..60 {
        *by.entry(health_from(&agent).await).or_insert(0) += 1;
    }
    assert_eq!(by.len(), 3, "every instance took a share: {by:?}");
    assert!(by.values().all(|n| *n >= 10), "{by:?}");

    // Killed outright: requests routed to it before the broker noticed go to the others.
    c.child.kill().unwrap();
    c.child.wait().unwrap();
    for _ in 0..30 {
        let who = health_from(&agent).await;
        assert_ne!(who, "instance c");
    }
    // Stopped gracefully over RPC while calls keep coming: every call is answered.
    let stopper = agent.rpc.clone();
    let stop = tokio::spawn(async move {
        stopper
            .call(
                RpcRequest::shutdown(
                    String::new(),
                    "control.collector.solo-b".into(),
                    "test",
                    WAIT,
                    WAIT,
                ),
                WAIT,
            )
            .await
    });
    let mut answered = 0;
    for _ in 0..40 {
        health_from(&agent).await;
        answered += 1;
    }
    assert!(stop.await.unwrap().unwrap().shutdown().unwrap().accepted);
    assert_eq!(answered, 40);
    let mut b = b;
    let status = tokio::task::spawn_blocking(move || {
        let s = b.child.wait().unwrap();
        drop(b);
        s
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "instance b exits cleanly after draining: {status}"
    );
    for _ in 0..20 {
        assert_eq!(health_from(&agent).await, "instance a");
    }
}
