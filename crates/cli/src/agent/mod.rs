//! `eventbus agent`: the embedded broker, the collector supervisor, the agent's lifecycle
//! services, an overall health report, statistics in the log, and a live status view on a
//! terminal.

pub(crate) mod config;

use crate::SocketArg;
use crate::commands::Signals;
use anyhow::{Context, Result};
use config::AgentConfig;
use daemoneye_eventbus::broker::BrokerStats;
use daemoneye_eventbus::client::{Client, ClientOptions, Subscription};
use daemoneye_eventbus::core::{QueueGroup, ReplyStatus, catalog};
use daemoneye_eventbus::rpc::{
    CollectorCall, CollectorHandler, CollectorOperation, HealthStatus, rpc_request, rpc_response,
    serve_services_at,
};
use daemoneye_eventbus::schema::rpc as pb;
use daemoneye_eventbus::supervisor::{CollectorState, CollectorStatus, Supervisor};
use daemoneye_eventbus::{Broker, Endpoint};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

/// Overall health, combined from the broker, RPC and the collectors (the worst wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) enum Health {
    Healthy,
    Degraded,
    Unhealthy,
}

/// One part's health and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Part {
    pub(crate) health: Health,
    pub(crate) reason: String,
}

fn part(health: Health, reason: impl Into<String>) -> Part {
    Part {
        health,
        reason: reason.into(),
    }
}

/// The broker's counters at the last report, for what happened since.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Before {
    pub(crate) dropped: u64,
    pub(crate) stalled: u64,
}

impl Before {
    pub(crate) fn of(stats: &BrokerStats) -> Self {
        Self {
            dropped: stats.dropped,
            stalled: stats.stalled,
        }
    }
}

/// The broker's health from its statistics: Degraded when a Processed subscription is
/// stalled now (named) or stalled since the last report, when queues hold over 80 % of the
/// memory cap, or when deliveries were dropped since the last report.
pub(crate) fn broker_health(now: &BrokerStats, before: Before) -> Part {
    let stalled: Vec<String> = now
        .subscriptions
        .iter()
        .filter(|s| s.stalled)
        .map(|s| match (&s.durable, &s.client) {
            (Some(d), _) => format!("durable subscription {d}"),
            (None, Some(c)) => format!("a subscription of {c}"),
            (None, None) => "a subscription".into(),
        })
        .collect();
    if !stalled.is_empty() {
        return part(
            Health::Degraded,
            format!(
                "stalled (not acknowledging; its publishers no longer wait): {}",
                stalled.join(", ")
            ),
        );
    }
    let newly = now.stalled.saturating_sub(before.stalled);
    if newly > 0 {
        return part(
            Health::Degraded,
            format!(
                "{newly} Processed subscriptions stalled since the last report (closed, or \
                 durable and no longer waited for) so their publishers could go on"
            ),
        );
    }
    let used = now.queued_bytes.saturating_mul(100) / now.memory_cap_bytes.max(1);
    if used >= 80 {
        return part(
            Health::Degraded,
            format!("queues hold {used} % of the memory cap"),
        );
    }
    let dropped = now.dropped.saturating_sub(before.dropped);
    if dropped > 0 {
        return part(
            Health::Degraded,
            format!("{dropped} deliveries dropped (slow readers)"),
        );
    }
    part(
        Health::Healthy,
        format!("{} connections", now.active_connections),
    )
}

/// The collectors' health: Unhealthy when every collector has Failed (the supervisor gave
/// up on all of them), Degraded when one is not running normally (heartbeats stopped,
/// restarting, paused, stopped, failed).
pub(crate) fn collectors_health(statuses: &[CollectorStatus]) -> Part {
    if statuses.is_empty() {
        return part(Health::Healthy, "no collectors configured");
    }
    let bad: Vec<String> = statuses
        .iter()
        .filter(|s| s.state != CollectorState::Running)
        .map(|s| format!("{} {}", s.id, s.state))
        .collect();
    if statuses.iter().all(|s| s.state == CollectorState::Failed) {
        return part(
            Health::Unhealthy,
            format!("every collector failed ({})", bad.join(", ")),
        );
    }
    if bad.is_empty() {
        return part(Health::Healthy, format!("{} running", statuses.len()));
    }
    part(Health::Degraded, bad.join(", "))
}

/// RPC health: Degraded when calls timed out or found no responder since the last report.
pub(crate) fn rpc_health(failures: u64) -> Part {
    if failures > 0 {
        part(
            Health::Degraded,
            format!("{failures} calls timed out or found no responder"),
        )
    } else {
        part(Health::Healthy, "calls answered")
    }
}

#[derive(Debug, Serialize)]
struct CollectorView {
    id: String,
    state: String,
    pid: Option<u32>,
    uptime_secs: Option<u64>,
    restart_count: u32,
    last_exit: Option<String>,
    heartbeat_age_secs: Option<f64>,
    /// The last health check over RPC: `ok`, or the failure.
    health_check: Option<String>,
}

/// Events counted per topic by a task of their own (the agent's reports must never let the
/// subscription's queue fill: the client would stop reading, heartbeats included).
type Counts = std::sync::Arc<parking_lot::Mutex<BTreeMap<String, u64>>>;

/// Last health check per collector: the pid it was of (a check speaks only for the run it
/// checked), the status, and `ok` or the reason (a collector that did not answer is
/// Unhealthy, with the error).
type Checks = std::sync::Arc<parking_lot::Mutex<BTreeMap<String, (u32, HealthStatus, String)>>>;

/// The last check of `s`'s current run, if it is running and was checked.
fn check_of(
    checks: &BTreeMap<String, (u32, HealthStatus, String)>,
    s: &CollectorStatus,
) -> Option<(HealthStatus, String)> {
    checks
        .get(&s.id)
        .filter(|(pid, ..)| s.state == CollectorState::Running && s.pid == Some(*pid))
        .map(|(_, h, m)| (*h, m.clone()))
}

async fn count_events(mut events: Subscription, counts: Counts) {
    loop {
        match events.recv().await {
            Ok(m) => *counts.lock().entry(m.topic().to_string()).or_default() += 1,
            Err(daemoneye_eventbus::client::RecvError::Closed) => return,
            // A gap: the counts are a little low, and counting goes on.
            Err(_) => {}
        }
    }
}

/// Health-checks every running collector over RPC every `every`, once it has been heard
/// (its first heartbeat: before, it may not serve yet, and a check would only fail).
async fn health_checks(
    rpc: daemoneye_eventbus::rpc::CollectorRpcClient,
    supervisor: Supervisor,
    every: Duration,
    checks: Checks,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok(statuses) = supervisor.status().await else {
            return;
        };
        for s in statuses.iter().filter(|s| {
            s.state == CollectorState::Running && s.last_heartbeat.is_some() && s.pid.is_some()
        }) {
            // The operation's policy (rpc.policies.health_check) times each attempt, and
            // rpc.default_timeout_seconds the whole call.
            let request = daemoneye_eventbus::rpc::RpcRequest::health_check(
                String::new(),
                format!("control.collector.{}", s.id),
                rpc.config().policies.health_check.timeout(),
            );
            let (status, message) = match rpc.call(request, Duration::ZERO).await {
                Ok(r) => match r.health_check() {
                    Some(h) if h.status == HealthStatus::Healthy as i32 => {
                        (HealthStatus::Healthy, "ok".to_owned())
                    }
                    Some(h) => (
                        HealthStatus::try_from(h.status).unwrap_or(HealthStatus::Unknown),
                        h.message.clone(),
                    ),
                    None => (
                        HealthStatus::Unhealthy,
                        "the reply is not a health check".to_owned(),
                    ),
                },
                Err(e) => (HealthStatus::Unhealthy, e.to_string()),
            };
            checks
                .lock()
                .insert(s.id.clone(), (s.pid.unwrap_or(0), status, message));
        }
    }
}

/// The report published on `control.agent.status` (JSON).
#[derive(Debug, Serialize)]
struct Report {
    health: Health,
    broker: Part,
    rpc: Part,
    collectors_health: Part,
    collectors: Vec<CollectorView>,
    published: u64,
    delivered: u64,
    dropped: u64,
    connections: u64,
    events_per_sec: BTreeMap<String, f64>,
}

struct Agent {
    broker: Broker,
    client: Client,
    supervisor: Supervisor,
    counts: Counts,
    checks: Checks,
    before: Before,
    rpc_failures_before: u64,
    last: Instant,
}

impl Agent {
    async fn report(&mut self) -> Result<Report> {
        let stats = self.broker.stats();
        let statuses = self.supervisor.status().await?;
        let secs = self.last.elapsed().as_secs_f64().max(0.001);
        self.last = Instant::now();
        let counted = std::mem::take(&mut *self.counts.lock());
        let events_per_sec = counted
            .into_iter()
            .map(|(t, n)| (t, (n as f64 / secs * 10.0).round() / 10.0))
            .collect();
        let metrics = self.client.rpc_metrics();
        let failures = metrics.errors_of("timeout") + metrics.errors_of("no_responders");
        let broker = broker_health(&stats, self.before);
        let rpc = rpc_health(failures.saturating_sub(self.rpc_failures_before));
        self.before = Before::of(&stats);
        self.rpc_failures_before = failures;
        let checks = self.checks.lock().clone();
        let mut collectors_health = collectors_health(&statuses);
        let shown = |s: &CollectorStatus| {
            check_of(&checks, s).map(|(h, m)| match h {
                HealthStatus::Healthy => Ok(m),
                other => Err(format!("{}: {m}", other.as_str_name())),
            })
        };
        let failed: Vec<String> = statuses
            .iter()
            .filter_map(|s| match shown(s) {
                Some(Err(e)) => Some(format!("{} health check: {e}", s.id)),
                _ => None,
            })
            .collect();
        if !failed.is_empty() && collectors_health.health == Health::Healthy {
            collectors_health = part(Health::Degraded, failed.join("; "));
        }
        let health = broker.health.max(rpc.health).max(collectors_health.health);
        let now = SystemTime::now();
        let collectors = statuses
            .iter()
            .map(|s| CollectorView {
                id: s.id.clone(),
                state: s.state.to_string(),
                pid: s.pid,
                uptime_secs: s.uptime.map(|u| u.as_secs()),
                restart_count: s.restart_count,
                last_exit: s.last_exit.clone(),
                heartbeat_age_secs: s
                    .last_heartbeat
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
                health_check: shown(s).map(|r| r.unwrap_or_else(|e| e)),
            })
            .collect();
        Ok(Report {
            health,
            broker,
            rpc,
            collectors_health,
            collectors,
            published: stats.published,
            delivered: stats.delivered,
            dropped: stats.dropped,
            connections: stats.active_connections,
            events_per_sec,
        })
    }
}

/// The lifecycle services of the agent: act on the supervisor.
struct Lifecycle {
    supervisor: Supervisor,
    checks: Checks,
    /// Sends a start's or restart's configuration to the collector.
    rpc: daemoneye_eventbus::rpc::CollectorRpcClient,
}

/// How long a started collector has to serve its configuration service.
const CONFIG_WITHIN: Duration = Duration::from_secs(10);

impl Lifecycle {
    /// What a running collector it has heard is and can do (its GET_CAPABILITIES), or
    /// nothing if it does not answer within a second.
    async fn describe(&self, status: &mut pb::CollectorStatus, s: &CollectorStatus) {
        if s.state != CollectorState::Running || s.last_heartbeat.is_none() {
            return;
        }
        let ask = daemoneye_eventbus::rpc::RpcRequest::capabilities(
            String::new(),
            format!("control.collector.{}", s.id),
            Duration::from_secs(1),
        );
        if let Ok(r) = self.rpc.call(ask, Duration::from_secs(1)).await
            && let Some(c) = r.capabilities()
        {
            status.collector_type.clone_from(&c.collector_type);
            status.capabilities.clone_from(&c.capabilities);
        }
    }

    /// Applies `config` to collector `id` just started: its configuration service is asked
    /// until it serves (within [`CONFIG_WITHIN`]); `Err` says what it refused, or why it was
    /// not asked.
    async fn apply_config(&self, id: &str, config: pb::CollectorConfig) -> Result<(), String> {
        let deadline = Instant::now() + CONFIG_WITHIN;
        loop {
            let ask = daemoneye_eventbus::rpc::RpcRequest::update_config(
                String::new(),
                format!("control.collector.{id}"),
                config.clone(),
                false,
                Duration::from_secs(5),
            );
            match self.rpc.call(ask, Duration::from_secs(5)).await {
                Ok(r) => {
                    let Some(u) = r.update() else {
                        return Err("the collector's answer is not a configuration update".into());
                    };
                    if u.success && u.applied {
                        return Ok(());
                    }
                    let fields: Vec<String> = u
                        .validation_errors
                        .iter()
                        .map(|e| format!("{}: {}", e.field, e.message))
                        .collect();
                    return Err(format!(
                        "the collector refused the configuration: {} {}",
                        u.error_message,
                        fields.join("; ")
                    ));
                }
                Err(e)
                    if e.kind == daemoneye_eventbus::rpc::RpcErrorKind::NoResponders
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(format!("the configuration was not applied: {e}")),
            }
        }
    }
}

fn status_pb(s: &CollectorStatus, check: Option<(HealthStatus, String)>) -> pb::CollectorStatus {
    let (health, health_message) = check.unwrap_or((HealthStatus::Unknown, String::new()));
    let state = match s.state {
        CollectorState::Stopped => pb::CollectorState::Stopped,
        CollectorState::Running => pb::CollectorState::Running,
        CollectorState::Paused => pb::CollectorState::Paused,
        CollectorState::Stopping => pb::CollectorState::Stopping,
        CollectorState::BackingOff => pb::CollectorState::Starting,
        CollectorState::Unhealthy => pb::CollectorState::UnhealthyState,
        CollectorState::Failed => pb::CollectorState::Failed,
    };
    pb::CollectorStatus {
        collector_id: s.id.clone(),
        state: state as i32,
        pid: s.pid.unwrap_or(0),
        uptime_seconds: s.uptime.map_or(0, |u| u.as_secs()),
        restart_count: s.restart_count,
        last_exit_reason: s.last_exit.clone().unwrap_or_default(),
        last_heartbeat_ns: s
            .last_heartbeat
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        health: health as i32,
        health_message,
        ..Default::default()
    }
}

impl CollectorHandler for Lifecycle {
    async fn handle(&self, call: CollectorCall) -> Result<rpc_response::Body, ReplyStatus> {
        use CollectorOperation as O;
        let sup = &self.supervisor;
        match (call.operation, call.body) {
            // Every collector: STATUS of none.
            (O::Status, rpc_request::Body::Lifecycle(l)) if l.collector_id.is_empty() => {
                let all = sup
                    .status()
                    .await
                    .map_err(|e| ReplyStatus::unavailable(e.to_string()))?;
                let checks = self.checks.lock().clone();
                let mut collectors = Vec::with_capacity(all.len());
                for s in &all {
                    let mut status = status_pb(s, check_of(&checks, s));
                    self.describe(&mut status, s).await;
                    collectors.push(status);
                }
                Ok(rpc_response::Body::Lifecycle(pb::LifecycleResponse {
                    success: true,
                    collectors,
                    ..Default::default()
                }))
            }
            (
                O::Start | O::Stop | O::Restart | O::Status | O::Pause | O::Resume,
                rpc_request::Body::Lifecycle(l),
            ) => {
                let id = l.collector_id.as_str();
                let started = Instant::now();
                // Every field of the request acts: the environment for the runs it starts,
                // the graceful stop's timeout, and the configuration once it serves.
                let env = (!l.environment.is_empty()).then(|| {
                    l.environment
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect::<Vec<_>>()
                });
                let grace = (l.timeout_seconds > 0)
                    .then(|| Duration::from_secs(u64::from(l.timeout_seconds)));
                let r = match call.operation {
                    O::Start => sup.start_collector_with(id, env).await,
                    O::Stop => sup.stop_collector_within(id, !l.force, grace).await,
                    O::Restart => sup.restart_collector_with(id, env).await,
                    O::Pause => sup.pause(id).await,
                    O::Resume => sup.resume(id).await,
                    _ => sup.status().await.and_then(|all| {
                        all.into_iter().find(|s| s.id == id).ok_or_else(|| {
                            daemoneye_eventbus::supervisor::SupervisorError::UnknownCollector(
                                id.to_owned(),
                            )
                        })
                    }),
                };
                let s = r.map_err(|e| match e {
                    daemoneye_eventbus::supervisor::SupervisorError::UnknownCollector(_)
                    | daemoneye_eventbus::supervisor::SupervisorError::WrongState { .. } => {
                        ReplyStatus::invalid_operation(e.to_string())
                    }
                    other => ReplyStatus::execution_error(other.to_string()),
                })?;
                let applied = match (call.operation, l.config) {
                    (O::Start | O::Restart, Some(config)) => self.apply_config(id, config).await,
                    _ => Ok(()),
                };
                let check = check_of(&self.checks.lock(), &s);
                let mut status = status_pb(&s, check);
                if call.operation == O::Status {
                    self.describe(&mut status, &s).await;
                }
                Ok(rpc_response::Body::Lifecycle(pb::LifecycleResponse {
                    success: applied.is_ok(),
                    error_message: applied.err().unwrap_or_default(),
                    collector_id: s.id.clone(),
                    status: Some(status),
                    shutdown_duration_ms: u32::try_from(started.elapsed().as_millis())
                        .unwrap_or(u32::MAX),
                    ..Default::default()
                }))
            }
            (O::HealthCheck, _) => {
                let statuses = sup
                    .status()
                    .await
                    .map_err(|e| ReplyStatus::unavailable(e.to_string()))?;
                let c = collectors_health(&statuses);
                let status = match c.health {
                    Health::Healthy => HealthStatus::Healthy,
                    Health::Degraded => HealthStatus::Degraded,
                    Health::Unhealthy => HealthStatus::Unhealthy,
                };
                let components = statuses
                    .iter()
                    .map(|s| {
                        let h = if s.state == CollectorState::Running {
                            HealthStatus::Healthy
                        } else {
                            HealthStatus::Degraded
                        };
                        (
                            s.id.clone(),
                            pb::ComponentHealth {
                                status: h as i32,
                                message: s.state.to_string(),
                            },
                        )
                    })
                    .collect();
                Ok(rpc_response::Body::HealthCheck(pb::HealthCheckResponse {
                    status: status as i32,
                    message: c.reason,
                    components,
                    ..Default::default()
                }))
            }
            (op, _) => Err(ReplyStatus::invalid_operation(format!(
                "the agent answers start, stop, restart, pause, resume, status and health check, not {}",
                op.as_str_name()
            ))),
        }
    }
}

fn endpoint_arg(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Unix(p) => p.display().to_string(),
        other => other.to_string(),
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub(crate) async fn run(socket: &SocketArg, config_path: Option<&Path>) -> Result<()> {
    let config = match config_path {
        Some(p) => AgentConfig::load(&config::absolute(p))?,
        None => AgentConfig::default(),
    };
    let endpoint = match (&socket.socket, &config.broker.socket_path) {
        (None, Some(p)) => Endpoint::Unix(p.clone()),
        _ => crate::commands::endpoint(socket)?,
    };
    let signals = Signals::install()?;
    let mut reload = crate::commands::Reload::install()?;
    let mut broker_config = config.broker.clone();
    if broker_config.data_dir.is_none()
        && let Endpoint::Unix(path) = &endpoint
        && let Some(dir) = path.parent()
    {
        // Durable subscriptions outlive the agent: kept beside its private socket.
        broker_config.data_dir = Some(dir.join("state"));
    }
    // Besides the local socket: loopback TCP (broker.tcp_listen) and other hosts'
    // collectors over mutual TLS (broker.tls).
    let mut endpoints = vec![endpoint.clone()];
    if let Some(addr) = broker_config.tcp_listen {
        endpoints.push(Endpoint::Tcp(addr));
    }
    if let Some(tls) = &broker_config.tls {
        endpoints.push(tls.endpoint()?);
    }
    let broker = Broker::start_on(broker_config, &endpoints)
        .await
        .with_context(|| format!("starting the broker on {endpoint}"))?;
    let listening = broker
        .endpoints()
        .iter()
        .filter(|e| !matches!(e, Endpoint::InProc(_)))
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" and ");
    let mut options = ClientOptions::named("agent");
    config.rpc.apply_to(&mut options);
    let client = Client::connect(broker.inproc_endpoint(), options)
        .await
        .context("connecting the agent to its broker")?;
    let mut collectors = config.collectors(&endpoint_arg(&endpoint))?;
    if config.collectors.is_none() {
        // The bundled procmond heartbeats well within the configured interval.
        let every = (config.process_manager.health_check_interval_seconds / 4).max(1);
        if let Some(p) = collectors.first_mut() {
            p.args
                .extend(["--heartbeat-secs".into(), every.to_string()]);
        }
    }
    for c in &mut collectors {
        // Every collector learns where the broker is (unless its configuration says).
        c.env
            .entry("EVENTBUS_SOCKET".into())
            .or_insert_with(|| endpoint_arg(&endpoint));
    }
    let names: Vec<String> = collectors.iter().map(|c| c.id.clone()).collect();
    // The broker learns which process each collector is: only it may use the collector's name.
    let registry: std::sync::Arc<dyn daemoneye_eventbus::supervisor::CollectorRegistry> =
        std::sync::Arc::new(broker.clone());
    let supervisor = Supervisor::start_registered(
        config.process_manager.clone(),
        collectors,
        Some(client.clone()),
        config.rpc.clone(),
        Some(registry),
    )
    .await?;
    let checks = Checks::default();
    let lifecycle = serve_services_at(
        &client,
        &catalog::agent::lifecycle(),
        QueueGroup::new("agent")?,
        Lifecycle {
            supervisor: supervisor.clone(),
            checks: checks.clone(),
            rpc: daemoneye_eventbus::rpc::CollectorRpcClient::new(
                client.clone(),
                "agent",
                config.rpc.clone(),
            ),
        },
    )
    .await?;
    let counts = Counts::default();
    let events = client.subscribe(["events.#"]).await?;
    let counter = tokio::spawn(count_events(events, counts.clone()));
    let checker = tokio::spawn(health_checks(
        daemoneye_eventbus::rpc::CollectorRpcClient::new(
            client.clone(),
            "agent",
            config.rpc.clone(),
        ),
        supervisor.clone(),
        Duration::from_secs(config.rpc.health_check_interval_seconds),
        checks.clone(),
    ));
    println!(
        "agent ready: broker on {listening}, collectors: {}",
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    );
    let _ = std::io::stdout().flush();
    let mut agent = Agent {
        broker,
        client: client.clone(),
        supervisor: supervisor.clone(),
        counts,
        checks,
        before: Before::default(),
        rpc_failures_before: 0,
        last: Instant::now(),
    };
    let live = config.agent.live_view && std::io::stdout().is_terminal();
    let every = Duration::from_secs(config.agent.status_interval_seconds);
    let mut redraw = tokio::time::interval(if live { Duration::from_secs(1) } else { every });
    redraw.tick().await;
    let mut last_health = None;
    // The first report waits until every running collector was heard (at most a heartbeat
    // timeout): before, it would only say that they are starting.
    let heard_by =
        Instant::now() + Duration::from_secs(config.process_manager.health_check_interval_seconds);
    let mut heard = false;
    let wait = signals.wait();
    tokio::pin!(wait);
    loop {
        tokio::select! {
            r = &mut wait => {
                r?;
                break;
            }
            () = reload.next() => crate::commands::reload_acl(&agent.broker),
            _ = redraw.tick() => {
                if !heard {
                    let statuses = agent.supervisor.status().await?;
                    heard = Instant::now() >= heard_by
                        || statuses.iter().all(|s| {
                            s.state != CollectorState::Running || s.last_heartbeat.is_some()
                        });
                    if !heard {
                        // Looked at again soon, not a whole interval later.
                        redraw.reset_after(Duration::from_millis(100));
                        continue;
                    }
                }
                let report = agent.report().await?;
                publish_report(&agent.client, &report).await;
                if live {
                    draw(&report);
                } else {
                    log_line(&report);
                }
                if last_health != Some(report.health) {
                    tracing::info!(health = ?report.health, "agent health changed");
                    last_health = Some(report.health);
                }
            }
        }
    }
    println!("agent stopping: collectors first, then the broker");
    checker.abort();
    counter.abort();
    lifecycle.drain(Duration::from_secs(2)).await;
    for s in supervisor.shutdown().await {
        println!(
            "collector {}: {}",
            s.id,
            s.last_exit.unwrap_or_else(|| s.state.to_string())
        );
    }
    client.close().await;
    let report = agent.broker.shutdown().await;
    if report.drained {
        println!("agent stopped");
    } else {
        let overran: Vec<String> = report
            .overran
            .iter()
            .map(|(name, id)| format!("{name} (session {id})"))
            .collect();
        println!(
            "agent stopped; sessions torn down after the drain deadline: {}",
            overran.join(", ")
        );
    }
    Ok(())
}

async fn publish_report(client: &Client, report: &Report) {
    match serde_json::to_vec(report) {
        Ok(body) => {
            if let Err(e) = client.publish(&catalog::agent::status(), body).await {
                tracing::warn!(error = %e, "status report not published");
            }
        }
        Err(e) => tracing::warn!(error = %e, "status report not encoded"),
    }
}

fn collector_line(c: &CollectorView) -> String {
    let pid = c.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
    let beat = c
        .heartbeat_age_secs
        .map_or_else(|| "never".to_owned(), |a| format!("{a:.1} s ago"));
    let mut line = format!(
        "{:<12} {:<10} pid {:<8} restarts {:<3} heartbeat {}",
        c.id, c.state, pid, c.restart_count, beat
    );
    if let Some(e) = &c.last_exit
        && c.state != "running"
    {
        line.push_str(&format!("  ({e})"));
    }
    line
}

fn log_line(r: &Report) {
    let collectors: Vec<String> = r
        .collectors
        .iter()
        .map(|c| format!("{} {}", c.id, c.state))
        .collect();
    println!(
        "agent: health {:?} | published {} delivered {} dropped {} connections {} | collectors: {} | events/s: {}",
        r.health,
        r.published,
        r.delivered,
        r.dropped,
        r.connections,
        collectors.join(", "),
        r.events_per_sec
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn draw(r: &Report) {
    let mut out = String::from("\x1b[H\x1b[2J");
    out.push_str(&format!(
        "daemoneye agent — health {:?}   (Ctrl-C to stop)\n\n",
        r.health
    ));
    for (name, p) in [
        ("broker", &r.broker),
        ("rpc", &r.rpc),
        ("collectors", &r.collectors_health),
    ] {
        out.push_str(&format!(
            "  {name:<11} {:<10} {}\n",
            format!("{:?}", p.health),
            p.reason
        ));
    }
    out.push_str(&format!(
        "\nbroker: {} connections, {} published, {} delivered, {} dropped\n\ncollectors:\n",
        r.connections, r.published, r.delivered, r.dropped
    ));
    for c in &r.collectors {
        out.push_str(&format!("  {}\n", collector_line(c)));
    }
    out.push_str("\nevents/s by topic:\n");
    if r.events_per_sec.is_empty() {
        out.push_str("  (none yet)\n");
    }
    for (t, n) in &r.events_per_sec {
        out.push_str(&format!("  {t:<40} {n:>10.1}\n"));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// `eventbus config check FILE` / `eventbus config default`.
pub(crate) fn config_command(check: Option<&Path>) -> Result<()> {
    match check {
        Some(p) => {
            println!("{}", config::check(&config::absolute(p))?);
            Ok(())
        }
        None => {
            print!("{}", AgentConfig::default_toml());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: &str, state: CollectorState) -> CollectorStatus {
        CollectorStatus {
            id: id.into(),
            state,
            pid: None,
            uptime: None,
            restart_count: 0,
            last_exit: None,
            last_heartbeat: None,
        }
    }

    #[test]
    fn health_combines_to_the_worst() {
        let ok = collectors_health(&[st("a", CollectorState::Running)]);
        assert_eq!(ok.health, Health::Healthy);
        let degraded = collectors_health(&[
            st("a", CollectorState::Running),
            st("b", CollectorState::Unhealthy),
        ]);
        assert_eq!(degraded.health, Health::Degraded);
        assert_eq!(degraded.reason, "b unhealthy");
        let down = collectors_health(&[st("a", CollectorState::Failed)]);
        assert_eq!(down.health, Health::Unhealthy);
        let silent = collectors_health(&[st("a", CollectorState::Unhealthy)]);
        assert_eq!(
            silent.health,
            Health::Degraded,
            "heartbeats stopped: degraded"
        );
        assert!(Health::Unhealthy > Health::Degraded && Health::Degraded > Health::Healthy);
        assert_eq!(rpc_health(2).health, Health::Degraded);
        let mut v = serde_json::to_value(BrokerStats::default()).unwrap();
        v["queued_bytes"] = 90.into();
        v["memory_cap_bytes"] = 100.into();
        let stats: BrokerStats = serde_json::from_value(v).unwrap();
        assert_eq!(
            broker_health(&stats, Before::default()).health,
            Health::Degraded
        );
        // A stalled durable subscription is named; one closed since the last report counts.
        let mut v = serde_json::to_value(BrokerStats::default()).unwrap();
        v["memory_cap_bytes"] = 100.into();
        v["stalled"] = 1.into();
        v["subscriptions"] = serde_json::json!([{
            "durable": "audit", "filters": ["events.#"], "session_id": 3, "client": "siem",
            "pending": 10, "unacked": 5, "kept_bytes": 900, "delivered": 5, "redelivered": 0,
            "acked": 0, "dropped": 2, "stalled": true
        }]);
        let stats: BrokerStats = serde_json::from_value(v).unwrap();
        let h = broker_health(&stats, Before::default());
        assert_eq!(h.health, Health::Degraded);
        assert!(
            h.reason.contains("durable subscription audit"),
            "{}",
            h.reason
        );
        let mut v = serde_json::to_value(&stats).unwrap();
        v["subscriptions"] = serde_json::json!([]);
        let closed: BrokerStats = serde_json::from_value(v).unwrap();
        assert!(
            broker_health(&closed, Before::default())
                .reason
                .contains("closed")
        );
        assert_eq!(
            broker_health(&closed, Before::of(&closed)).health,
            Health::Healthy
        );
    }
}
