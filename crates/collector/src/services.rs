//! What every collector answers on `control.collector.<id>` and sends on
//! `control.health.heartbeat.<id>`, over a model of the collector ([`Collector`]): status,
//! health check, heartbeat, metrics, configuration (get, validate, update: applied whole or
//! refused with every reason), capabilities and shutdown. The collector supplies what it
//! measured; nothing here is assumed.

use crate::rpc::{
    CollectorCall, CollectorConfig, CollectorHandler, CollectorOperation, ConfigValidationError,
    HealthStatus, rpc_request, rpc_response,
};
use daemoneye_eventbus_client::Client;
use daemoneye_eventbus_core::{ReplyStatus, catalog};
use daemoneye_eventbus_schema::rpc as pb;
use prost::Message as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a loss keeps a collector Degraded.
pub const RECENT: Duration = Duration::from_secs(60);

/// A loss of some kind as measured: how many, and how long ago the last one was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Losses {
    /// Since the collector started.
    pub count: u64,
    /// Time since the last one; `None` if none.
    pub since_last: Option<Duration>,
}

impl Losses {
    /// The last one was within [`RECENT`].
    #[must_use]
    pub fn recent(&self) -> bool {
        self.since_last.is_some_and(|d| d < RECENT)
    }

    /// Seconds since the last one (0 if none).
    #[must_use]
    pub fn ago_secs(&self) -> u64 {
        self.since_last.map_or(0, |d| d.as_secs())
    }
}

/// A kind of loss, counted as it happens, with when the last one happened.
#[derive(Debug, Default)]
pub struct Loss {
    count: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl Loss {
    /// Counts `n` more (nothing if zero).
    pub fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// How many so far.
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// What was measured.
    #[must_use]
    pub fn seen(&self) -> Losses {
        Losses {
            count: self.count(),
            since_last: self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .map(|t| t.elapsed()),
        }
    }
}

/// A collector as its services see it.
pub trait Collector: Send + Sync + 'static {
    /// Its id (its RPC address is `control.collector.<id>`).
    fn id(&self) -> &str;
    /// Its program's name, for messages (`procmond`).
    fn program(&self) -> &'static str;
    /// Its type, announced in capabilities and configuration (`process`, `network`).
    fn collector_type(&self) -> &'static str;
    /// What it can do (`process-lifecycle`, `network-connections`, …).
    fn capabilities(&self) -> Vec<String>;
    /// When it started.
    fn started(&self) -> Instant;
    /// Its health from what it measured, and why.
    fn health(&self) -> (HealthStatus, String);
    /// Its parts' health (e.g. its event source), for health checks.
    fn components(&self) -> HashMap<String, pb::ComponentHealth>;
    /// Its counters.
    fn metrics(&self) -> HashMap<String, f64>;
    /// Events published since it started.
    fn events_published(&self) -> u64;
    /// Its configuration now and its version.
    fn config(&self) -> (CollectorConfig, u64);
    /// The problems of `config`, each with its field; none if it can be applied whole.
    fn validate(&self, config: &CollectorConfig) -> Vec<ConfigValidationError>;
    /// Applies `config` whole and returns the new version, or applies nothing and returns
    /// every problem.
    ///
    /// # Errors
    ///
    /// Each field that cannot be applied, with why.
    fn apply(&self, config: &CollectorConfig) -> Result<u64, Vec<ConfigValidationError>>;
    /// How often it heartbeats now.
    fn heartbeat_interval(&self) -> Duration;
    /// Counts a heartbeat and returns its sequence number (from 1).
    fn next_heartbeat(&self) -> u64;
    /// Asks it to stop (a shutdown request).
    fn stop(&self);
}

/// Nanoseconds since the Unix epoch.
#[must_use]
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn heartbeat_of<C: Collector>(c: &C, sequence: u64) -> pb::Heartbeat {
    pb::Heartbeat {
        collector_id: c.id().to_owned(),
        sequence,
        timestamp_ns: now_ns(),
        status: c.health().0 as i32,
        pid: std::process::id(),
    }
}

/// Publishes `collector`'s heartbeats on `control.health.heartbeat.<id>`, each with its
/// measured health, once `ready` is true (a collector is heard only once it watches), then
/// every [`Collector::heartbeat_interval`]. Returns if `ready` is dropped unset or the id
/// makes no topic.
pub async fn heartbeats<C: Collector>(
    client: Client,
    collector: Arc<C>,
    mut ready: tokio::sync::watch::Receiver<bool>,
) {
    let Ok(topic) = catalog::health::heartbeat_of(collector.id()) else {
        return;
    };
    if ready.wait_for(|r| *r).await.is_err() {
        return;
    }
    loop {
        let beat = heartbeat_of(&*collector, collector.next_heartbeat());
        if let Err(e) = client.publish(&topic, beat.encode_to_vec()).await {
            tracing::warn!(error = %e, "heartbeat not sent");
        }
        tokio::time::sleep(collector.heartbeat_interval()).await;
    }
}

/// The collector services of `C` (serve with [`crate::rpc::serve_collector`]).
pub struct Services<C>(pub Arc<C>);

impl<C: Collector> Services<C> {
    fn status(&self) -> pb::CollectorStatus {
        let c = &self.0;
        let (health, health_message) = c.health();
        pb::CollectorStatus {
            collector_id: c.id().to_owned(),
            state: pb::CollectorState::Running as i32,
            pid: std::process::id(),
            uptime_seconds: c.started().elapsed().as_secs(),
            health: health as i32,
            health_message,
            collector_type: c.collector_type().to_owned(),
            capabilities: c.capabilities(),
            ..Default::default()
        }
    }
}

/// The operations every collector served through [`Services`] answers.
pub const OPERATIONS: [CollectorOperation; 9] = [
    CollectorOperation::Status,
    CollectorOperation::HealthCheck,
    CollectorOperation::Heartbeat,
    CollectorOperation::GetMetrics,
    CollectorOperation::GetConfig,
    CollectorOperation::ValidateConfig,
    CollectorOperation::UpdateConfig,
    CollectorOperation::GetCapabilities,
    CollectorOperation::Shutdown,
];

impl<C: Collector> CollectorHandler for Services<C> {
    async fn handle(&self, call: CollectorCall) -> Result<rpc_response::Body, ReplyStatus> {
        use CollectorOperation as O;
        use rpc_request::Body as Q;
        use rpc_response::Body as A;
        let c = &self.0;
        match (call.operation, call.body) {
            (O::Status, _) => Ok(A::Lifecycle(pb::LifecycleResponse {
                success: true,
                collector_id: c.id().to_owned(),
                status: Some(self.status()),
                ..Default::default()
            })),
            (O::Start | O::Stop | O::Restart | O::Pause | O::Resume, _) => {
                Err(ReplyStatus::invalid_operation(format!(
                    "{} cannot start, stop, restart, pause or resume itself; send lifecycle \
                     requests to the agent (control.agent.lifecycle), which supervises it",
                    c.program()
                )))
            }
            (O::HealthCheck, Q::HealthCheck(h)) => {
                let (status, message) = c.health();
                Ok(A::HealthCheck(pb::HealthCheckResponse {
                    status: status as i32,
                    message,
                    metrics: if h.include_metrics {
                        c.metrics()
                    } else {
                        HashMap::new()
                    },
                    uptime_seconds: c.started().elapsed().as_secs(),
                    components: c.components(),
                }))
            }
            (O::Heartbeat, Q::Heartbeat(h)) => Ok(A::Heartbeat(heartbeat_of(&**c, h.sequence))),
            (O::GetMetrics, _) => Ok(A::Metrics(pb::MetricsResponse {
                metrics: c.metrics(),
                events_published: c.events_published(),
                uptime_seconds: c.started().elapsed().as_secs(),
            })),
            (O::GetConfig, _) => {
                let (config, version) = c.config();
                Ok(A::Config(pb::ConfigResponse {
                    config: Some(config),
                    version,
                }))
            }
            (O::ValidateConfig, Q::ValidateConfig(v)) => {
                let errors = c.validate(&v.config.unwrap_or_default());
                Ok(A::ValidateConfig(pb::ValidateConfigResponse {
                    valid: errors.is_empty(),
                    errors,
                }))
            }
            (O::UpdateConfig, Q::UpdateConfig(u)) => {
                let config = u.new_config.unwrap_or_default();
                let result = if u.validate_only {
                    let errors = c.validate(&config);
                    if errors.is_empty() {
                        Ok(c.config().1)
                    } else {
                        Err(errors)
                    }
                } else {
                    c.apply(&config)
                };
                Ok(A::UpdateConfig(match result {
                    Ok(version) => pb::UpdateConfigResponse {
                        success: true,
                        applied: !u.validate_only,
                        version,
                        ..Default::default()
                    },
                    Err(errors) => pb::UpdateConfigResponse {
                        success: false,
                        error_message: format!(
                            "{} invalid field(s); nothing applied",
                            errors.len()
                        ),
                        validation_errors: errors,
                        ..Default::default()
                    },
                }))
            }
            (O::GetCapabilities, _) => Ok(A::Capabilities(pb::CapabilitiesResponse {
                collector_id: c.id().to_owned(),
                collector_type: c.collector_type().into(),
                capabilities: c.capabilities(),
                topics: c.config().0.enabled_topics,
                operations: OPERATIONS.into_iter().map(|o| o as i32).collect(),
                version: env!("CARGO_PKG_VERSION").into(),
            })),
            (O::Shutdown, Q::Shutdown(s)) => {
                tracing::info!(reason = %s.reason, "shutdown requested over RPC");
                c.stop();
                Ok(A::Shutdown(pb::ShutdownResponse {
                    accepted: true,
                    message: format!("{} is stopping", c.program()),
                }))
            }
            (op, _) => Err(ReplyStatus::invalid_operation(format!(
                "{} is not supported by {}",
                op.as_str_name(),
                c.program()
            ))),
        }
    }
}
