//! What every collector answers on `control.collector.<id>` and sends on
//! `control.health.heartbeat.<id>`, over a model of the collector ([`Collector`]): status,
//! health check, heartbeat, metrics, configuration (get, validate, update: applied whole or
//! refused with every reason), capabilities and shutdown. The collector supplies what it
//! measured; nothing here is assumed.

use crate::rpc::{
    CollectorCall, CollectorConfig, CollectorHandler, CollectorOperation, ConfigValidationError,
    HealthStatus, rpc_request, rpc_response,
};
use crate::tables::Table;
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

/// Where a collector's events come from: the kernel's own interface (procmond: the
/// process-events connector; netmond: the socket dump) or `/proc`. Chosen at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum SourceChoice {
    /// The kernel's interface when the collector may use it, `/proc` otherwise.
    #[default]
    Auto,
    /// The kernel's interface, or the collector does not start.
    Kernel,
    /// `/proc` only.
    Proc,
}

/// A collector's settings as the configuration service changes them.
pub trait CollectorSettings: Clone + Send + Sync + 'static {
    /// As sent over RPC.
    fn to_config(&self) -> CollectorConfig;
    /// These settings with what `config` (from RPC) names changed, the rest kept: applied
    /// whole, or every field that cannot be applied, with why.
    ///
    /// # Errors
    ///
    /// Each field that cannot be applied.
    fn updated(&self, config: &CollectorConfig) -> Result<Self, Vec<ConfigValidationError>>;
    /// How often the collector heartbeats with these settings.
    fn heartbeat_interval(&self) -> Duration;
}

/// Reads a configuration sent over RPC for one collector, collecting every problem with its
/// field: a collector applies a configuration whole or not at all, and what it cannot change
/// is refused, never acknowledged and ignored.
#[derive(Debug)]
pub struct ConfigReader<'a> {
    config: &'a CollectorConfig,
    program: &'static str,
    errors: Vec<ConfigValidationError>,
}

impl<'a> ConfigReader<'a> {
    /// Starts reading `config` for `program`, a collector of type `collector_type` (a
    /// configuration for another type is refused).
    #[must_use]
    pub fn new(config: &'a CollectorConfig, program: &'static str, collector_type: &str) -> Self {
        let mut r = Self {
            config,
            program,
            errors: Vec::new(),
        };
        if !config.collector_type.is_empty() && config.collector_type != collector_type {
            r.refuse(
                "collector_type",
                format!(
                    "{program} is a {collector_type:?} collector, not {:?}",
                    config.collector_type
                ),
            );
        }
        r
    }

    /// Counts a problem with `field`.
    pub fn refuse(&mut self, field: &str, message: impl Into<String>) {
        self.errors.push(ConfigValidationError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// `scan_interval_ms` (50 to 60000; 0 leaves `current`).
    pub fn scan_interval(&mut self, current: Duration) -> Duration {
        match self.config.scan_interval_ms {
            0 => current,
            ms if (50..=60_000).contains(&ms) => Duration::from_millis(u64::from(ms)),
            ms => {
                self.refuse(
                    "scan_interval_ms",
                    format!("{ms} is out of range: 50 to 60000 ms"),
                );
                current
            }
        }
    }

    /// Setting `key` = `value` in milliseconds, at least `min`.
    pub fn millis(&mut self, key: &str, value: &str, min: u64) -> Option<Duration> {
        match value.parse::<u64>() {
            Ok(ms) if ms >= min => Some(Duration::from_millis(ms)),
            Ok(_) => {
                self.refuse(
                    &format!("settings.{key}"),
                    format!("{value:?} must be at least {min} ms"),
                );
                None
            }
            Err(_) => {
                self.refuse(
                    &format!("settings.{key}"),
                    format!("{value:?} is not a number of milliseconds"),
                );
                None
            }
        }
    }

    /// Setting `key` = `value`, `true` or `false`.
    pub fn flag(&mut self, key: &str, value: &str) -> Option<bool> {
        let b = value.parse::<bool>().ok();
        if b.is_none() {
            self.refuse(
                &format!("settings.{key}"),
                format!("{value:?} is not true or false"),
            );
        }
        b
    }

    /// A setting the collector does not have; `known` lists those it has.
    pub fn unknown(&mut self, key: &str, known: &str) {
        self.refuse(
            &format!("settings.{key}"),
            format!("unknown setting (known: {known})"),
        );
    }

    /// Refuses what a collector cannot change itself: its resource limits (the supervisor
    /// applies them) and the topics it publishes on (`topics`, all of them; `how` says how
    /// parts are turned off).
    pub fn fixed(&mut self, topics: &[String], how: &str) {
        let program = self.program;
        if self.config.limits.is_some() {
            self.refuse(
                "limits",
                format!(
                    "{program} cannot change its own resource limits: the supervisor applies \
                     them when it starts {program} (collectors[].limits in the agent's \
                     configuration)"
                ),
            );
        }
        if !self.config.enabled_topics.is_empty() && self.config.enabled_topics != topics {
            self.refuse(
                "enabled_topics",
                format!(
                    "{program} publishes on {} and cannot turn one off ({how})",
                    topics.join(", ")
                ),
            );
        }
    }

    /// `value` if nothing was refused, else every problem.
    ///
    /// # Errors
    ///
    /// Every field refused.
    pub fn finish<T>(self, value: T) -> Result<T, Vec<ConfigValidationError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// What every collector keeps the same way: its id, when it started, its settings with their
/// version, the events it published and could not, its heartbeats, and a stop request.
#[derive(Debug)]
pub struct Basics<S> {
    id: String,
    started: Instant,
    settings: Mutex<(S, u64)>,
    /// Events published.
    pub published: AtomicU64,
    /// Events that could not be published.
    pub publish_failures: Loss,
    heartbeats: AtomicU64,
    answers: AtomicU64,
    tasks_refused: std::sync::atomic::AtomicBool,
    stop: tokio::sync::Notify,
}

impl<S: CollectorSettings> Basics<S> {
    /// A collector `id` starting now with `settings` (version 1).
    pub fn new(id: &str, settings: S) -> Self {
        Self {
            id: id.to_owned(),
            started: Instant::now(),
            settings: Mutex::new((settings, 1)),
            published: AtomicU64::new(0),
            publish_failures: Loss::default(),
            heartbeats: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            tasks_refused: std::sync::atomic::AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
        }
    }

    /// Its id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its settings now.
    pub fn settings(&self) -> S {
        self.settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Heartbeats sent.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    /// Counts the result of a publish: published, or a failure (logged).
    pub fn count_publish<T, E: std::fmt::Display>(&self, result: Result<T, E>) {
        match result {
            Ok(_) => {
                self.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.publish_failures.add(1);
                tracing::warn!(error = %e, "event not published");
            }
        }
    }

    /// Completes when a shutdown was requested ([`Collector::stop`]).
    pub async fn stopped(&self) {
        self.stop.notified().await;
    }
}

/// A collector as its services see it. The required methods are what it measured; the
/// others come from its [`Basics`].
pub trait Collector: Send + Sync + 'static {
    /// Its settings.
    type Settings: CollectorSettings;
    /// What it keeps the same way as every collector.
    fn basics(&self) -> &Basics<Self::Settings>;
    /// Its program's name, for messages (`procmond`).
    fn program(&self) -> &'static str;
    /// Its type, announced in capabilities and configuration (`procmond`, `netmond`).
    fn collector_type(&self) -> &'static str;
    /// What it can do (`process-lifecycle`, `network-connections`, …).
    fn capabilities(&self) -> Vec<String>;
    /// Its health from what it measured, and why.
    fn health(&self) -> (HealthStatus, String);
    /// Its parts' health (e.g. its event source), for health checks.
    fn components(&self) -> HashMap<String, pb::ComponentHealth>;
    /// Its counters.
    fn metrics(&self) -> HashMap<String, f64>;
    /// The tables it answers collection tasks for (each also among its capabilities).
    fn tables(&self) -> &'static [Table] {
        &[]
    }
    /// Collection tasks it takes at once (announced in its capabilities): none without
    /// tables, else what its queue holds ([`crate::tables::task_queue`]).
    fn task_capacity(&self) -> u32 {
        if self.tables().is_empty() {
            0
        } else {
            crate::tables::TASKS_WAITING as u32
        }
    }
    /// The rows of `table` (one of [`Collector::tables`]) as it sees them now, at most
    /// `max_rows` (0: its own bound).
    ///
    /// # Errors
    ///
    /// Why it cannot answer now.
    fn rows(
        &self,
        table: Table,
        max_rows: usize,
    ) -> impl std::future::Future<Output = Result<pb::TableRows, String>> + Send {
        let _ = max_rows;
        let program = self.program();
        async move { Err(format!("{program} does not answer table {table}")) }
    }

    /// Its id (its RPC address is `control.collector.<id>`).
    fn id(&self) -> &str {
        self.basics().id()
    }
    /// When it started.
    fn started(&self) -> Instant {
        self.basics().started
    }
    /// Events published since it started.
    fn events_published(&self) -> u64 {
        self.basics().published.load(Ordering::Relaxed)
    }
    /// Its configuration now and its version.
    fn config(&self) -> (CollectorConfig, u64) {
        let g = self
            .basics()
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (g.0.to_config(), g.1)
    }
    /// The problems of `config`, each with its field; none if it can be applied whole.
    fn validate(&self, config: &CollectorConfig) -> Vec<ConfigValidationError> {
        self.basics()
            .settings()
            .updated(config)
            .err()
            .unwrap_or_default()
    }
    /// Applies `config` whole and returns the new version, or applies nothing and returns
    /// every problem.
    ///
    /// # Errors
    ///
    /// Each field that cannot be applied, with why.
    fn apply(&self, config: &CollectorConfig) -> Result<u64, Vec<ConfigValidationError>> {
        let mut g = self
            .basics()
            .settings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0 = g.0.updated(config)?;
        g.1 += 1;
        Ok(g.1)
    }
    /// How often it heartbeats now.
    fn heartbeat_interval(&self) -> Duration {
        self.basics().settings().heartbeat_interval()
    }
    /// Counts an answer to a task and returns its sequence number (from 1).
    fn next_answer(&self) -> u64 {
        self.basics().answers.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Counts a heartbeat and returns its sequence number (from 1).
    fn next_heartbeat(&self) -> u64 {
        self.basics().heartbeats.fetch_add(1, Ordering::Relaxed) + 1
    }
    /// Asks it to stop (a shutdown request).
    fn stop(&self) {
        self.basics().stop.notify_one();
    }
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

/// The operations every collector served through [`Services`] answers (collection tasks
/// too when it has [`Collector::tables`]).
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
    fn tasks_refused(&self) {
        self.0.basics().tasks_refused.store(true, Ordering::Relaxed);
    }

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
                operations: OPERATIONS
                    .into_iter()
                    .chain((!c.tables().is_empty()).then_some(O::ExecuteTask))
                    .map(|o| o as i32)
                    .collect(),
                version: env!("CARGO_PKG_VERSION").into(),
                // None when the broker's policy keeps tasks from it.
                task_capacity: if c.basics().tasks_refused.load(Ordering::Relaxed) {
                    0
                } else {
                    c.task_capacity()
                },
            })),
            (O::ExecuteTask, Q::Task(t)) => {
                let mut tables = Vec::with_capacity(t.tables.len());
                for name in &t.tables {
                    let Some(table) =
                        Table::from_name(name).filter(|table| c.tables().contains(table))
                    else {
                        let answers: Vec<&str> = c.tables().iter().map(|t| t.name()).collect();
                        return Err(ReplyStatus::invalid_operation(format!(
                            "{} does not answer table {name:?} (it answers: {})",
                            c.program(),
                            if answers.is_empty() {
                                "none".to_owned()
                            } else {
                                answers.join(", ")
                            }
                        )));
                    };
                    let rows = c
                        .rows(table, t.max_rows as usize)
                        .await
                        .map_err(ReplyStatus::unavailable)?;
                    tables.push(rows);
                }
                Ok(A::Task(pb::TaskResponse {
                    task_id: t.task_id,
                    collector_id: c.id().to_owned(),
                    sequence: c.next_answer(),
                    tables,
                }))
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use daemoneye_eventbus_core::{Header, Message, Topic};

    /// Settings with one field a configuration may change: the heartbeat interval.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Every(Duration);

    impl CollectorSettings for Every {
        fn to_config(&self) -> CollectorConfig {
            CollectorConfig {
                settings: [(
                    "heartbeat_interval_ms".to_owned(),
                    self.0.as_millis().to_string(),
                )]
                .into(),
                ..Default::default()
            }
        }

        fn updated(&self, c: &CollectorConfig) -> Result<Self, Vec<ConfigValidationError>> {
            let refuse = |field: &str| ConfigValidationError {
                field: field.into(),
                message: "no".into(),
            };
            let mut errors: Vec<_> = c
                .settings
                .keys()
                .filter(|k| *k != "heartbeat_interval_ms")
                .map(|k| refuse(k))
                .collect();
            if c.limits.is_some() {
                errors.push(refuse("limits"));
            }
            let every = c
                .settings
                .get("heartbeat_interval_ms")
                .and_then(|v| v.parse().ok())
                .map_or(self.0, Duration::from_millis);
            if errors.is_empty() {
                Ok(Self(every))
            } else {
                Err(errors)
            }
        }

        fn heartbeat_interval(&self) -> Duration {
            self.0
        }
    }

    struct Fake(Basics<Every>);

    impl Collector for Fake {
        type Settings = Every;
        fn basics(&self) -> &Basics<Every> {
            &self.0
        }
        fn program(&self) -> &'static str {
            "fakemond"
        }
        fn collector_type(&self) -> &'static str {
            "fakemond"
        }
        fn capabilities(&self) -> Vec<String> {
            vec!["nothing".into()]
        }
        fn health(&self) -> (HealthStatus, String) {
            (HealthStatus::Degraded, "measured".into())
        }
        fn components(&self) -> HashMap<String, pb::ComponentHealth> {
            HashMap::new()
        }
        fn metrics(&self) -> HashMap<String, f64> {
            HashMap::new()
        }
    }

    fn call(operation: CollectorOperation, body: rpc_request::Body) -> CollectorCall {
        CollectorCall {
            operation,
            body,
            client_id: "test".into(),
            message: Message::new(
                Topic::new("control.collector.fake").unwrap(),
                Header::default(),
                bytes::Bytes::new(),
            ),
        }
    }

    fn update(
        s: &Services<Fake>,
        config: CollectorConfig,
        validate_only: bool,
    ) -> pb::UpdateConfigResponse {
        let body = rpc_request::Body::UpdateConfig(pb::UpdateConfigRequest {
            new_config: Some(config),
            validate_only,
            ..Default::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        match rt.block_on(s.handle(call(CollectorOperation::UpdateConfig, body))) {
            Ok(rpc_response::Body::UpdateConfig(u)) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_configuration_is_applied_whole_or_not_at_all_and_versions_count() {
        let s = Services(Arc::new(Fake(Basics::new(
            "fake",
            Every(Duration::from_secs(5)),
        ))));
        let mut good = Every(Duration::from_millis(250)).to_config();
        // Validating applies nothing.
        let v = update(&s, good.clone(), true);
        assert!(v.success && !v.applied && v.version == 1, "{v:?}");
        assert_eq!(s.0.heartbeat_interval(), Duration::from_secs(5));
        let u = update(&s, good.clone(), false);
        assert!(u.success && u.applied && u.version == 2, "{u:?}");
        assert_eq!(s.0.heartbeat_interval(), Duration::from_millis(250));
        // One field it cannot apply: nothing applied, every problem named.
        good.settings
            .insert("heartbeat_interval_ms".into(), "900".into());
        good.settings.insert("colour".into(), "blue".into());
        good.limits = Some(pb::ResourceLimits::default());
        let r = update(&s, good, false);
        assert!(!r.success && !r.applied, "{r:?}");
        let mut fields: Vec<&str> = r
            .validation_errors
            .iter()
            .map(|e| e.field.as_str())
            .collect();
        fields.sort_unstable();
        assert_eq!(fields, ["colour", "limits"]);
        assert_eq!(
            (s.0.config().1, s.0.heartbeat_interval()),
            (2, Duration::from_millis(250))
        );
        // An update that names nothing changes nothing (but the version).
        let u = update(&s, CollectorConfig::default(), false);
        assert!(u.success && u.version == 3, "{u:?}");
        assert_eq!(s.0.heartbeat_interval(), Duration::from_millis(250));
    }

    #[test]
    fn lifecycle_requests_go_to_the_agent_and_health_is_what_was_measured() {
        let s = Services(Arc::new(Fake(Basics::new(
            "fake",
            Every(Duration::from_secs(5)),
        ))));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let stop = call(
            CollectorOperation::Stop,
            rpc_request::Body::Lifecycle(pb::LifecycleRequest::default()),
        );
        let e = rt.block_on(s.handle(stop)).unwrap_err();
        assert!(e.message.contains("fakemond cannot start, stop"), "{e:?}");
        let status = call(
            CollectorOperation::Status,
            rpc_request::Body::Lifecycle(pb::LifecycleRequest::default()),
        );
        let Ok(rpc_response::Body::Lifecycle(l)) = rt.block_on(s.handle(status)) else {
            panic!("no status");
        };
        let st = l.status.unwrap();
        assert_eq!(
            (
                st.health,
                st.health_message.as_str(),
                st.collector_type.as_str()
            ),
            (HealthStatus::Degraded as i32, "measured", "fakemond")
        );
        // Heartbeats count from 1; a shutdown request is seen by `stopped`.
        assert_eq!((s.0.next_heartbeat(), s.0.next_heartbeat()), (1, 2));
        s.0.stop();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), s.0.basics().stopped())
                .await
                .unwrap();
        });
    }
}
