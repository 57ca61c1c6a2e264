//! The agent's lifecycle service on `control.agent.lifecycle` (start, stop, restart, pause,
//! resume, status of one or every collector, the agent's health), and the health checks
//! that ask each running collector over RPC what it is and how it is.

use crate::health::{Health, collectors_health};
use daemoneye_eventbus::core::ReplyStatus;
use daemoneye_eventbus::rpc::{
    CollectorCall, CollectorHandler, CollectorOperation, CollectorRpcClient, HealthStatus,
    RpcRequest, rpc_request, rpc_response,
};
use daemoneye_eventbus::schema::rpc as pb;
use daemoneye_eventbus::supervisor::{
    CollectorState, CollectorStatus, Supervisor, SupervisorError,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

/// What the agent last learned of one run of a collector over RPC: the pid it was of (it
/// speaks only for that run), its health check (`ok`, or the reason; a collector that did not
/// answer is Unhealthy, with the error), and what it said it is and can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) pid: u32,
    /// When it was made.
    pub(crate) at: Instant,
    pub(crate) health: HealthStatus,
    pub(crate) message: String,
    pub(crate) collector_type: String,
    pub(crate) capabilities: Vec<String>,
    /// Collection tasks it takes at once, as it said.
    pub(crate) task_capacity: u32,
}

/// What a collector says it is and can do (GET_CAPABILITIES).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Said {
    pub(crate) collector_type: String,
    pub(crate) capabilities: Vec<String>,
    pub(crate) task_capacity: u32,
}

/// The last [`Check`] per collector id (one entry per configured collector: bounded).
pub(crate) type Checks = std::sync::Arc<parking_lot::Mutex<BTreeMap<String, Check>>>;

/// The last check of `s`'s current run, if it is running and was checked.
pub(crate) fn check_of(checks: &BTreeMap<String, Check>, s: &CollectorStatus) -> Option<Check> {
    checks
        .get(&s.id)
        .filter(|c| s.state == CollectorState::Running && s.pid == Some(c.pid))
        .cloned()
}

/// A collector's health as the agent measured it, why, and what it can do: its health check's
/// answer while it runs and was checked; else what its state says (Unhealthy when failed,
/// stopped or silent, Degraded when paused, restarting or stopping, Unknown before its first
/// check).
pub(crate) fn measured(
    s: &CollectorStatus,
    check: Option<Check>,
) -> (HealthStatus, String, Vec<String>) {
    match (s.state, check) {
        (CollectorState::Running, Some(c)) => (c.health, c.message, c.capabilities),
        (CollectorState::Running, None) => (
            HealthStatus::Unknown,
            if s.heard() {
                "not checked yet".to_owned()
            } else {
                "no heartbeat yet".to_owned()
            },
            Vec::new(),
        ),
        (state, _) => {
            let health = match state {
                CollectorState::Paused | CollectorState::BackingOff | CollectorState::Stopping => {
                    HealthStatus::Degraded
                }
                _ => HealthStatus::Unhealthy,
            };
            let reason = match &s.last_exit {
                Some(e) => format!("{state}: {e}"),
                None => state.to_string(),
            };
            (health, reason, Vec::new())
        }
    }
}

/// The collectors' part of the agent's health: from their states ([`collectors_health`]),
/// Degraded too when a running collector's last health check failed (naming it).
pub(crate) fn collectors_part(
    statuses: &[CollectorStatus],
    checks: &BTreeMap<String, Check>,
) -> crate::Part {
    let part = collectors_health(statuses);
    let failed: Vec<String> = statuses
        .iter()
        .filter_map(|s| {
            check_of(checks, s)
                .filter(|c| c.health != HealthStatus::Healthy)
                .map(|c| {
                    format!(
                        "{} health check: {}: {}",
                        s.id,
                        c.health.as_str_name(),
                        c.message
                    )
                })
        })
        .collect();
    if !failed.is_empty() && part.health == Health::Healthy {
        return crate::Part {
            health: Health::Degraded,
            reason: failed.join("; "),
        };
    }
    part
}

/// What collector `id` says it is and can do (GET_CAPABILITIES), timed by the health-check
/// policy; empty if it does not say.
async fn capabilities_of(rpc: &CollectorRpcClient, id: &str) -> Said {
    let ask = RpcRequest::capabilities(
        String::new(),
        format!("control.collector.{id}"),
        rpc.config().policies.health_check.timeout(),
    );
    match rpc.call(ask, Duration::ZERO).await {
        Ok(r) => r.capabilities().map_or_else(Default::default, |c| Said {
            collector_type: c.collector_type.clone(),
            capabilities: c.capabilities.clone(),
            task_capacity: c.task_capacity,
        }),
        Err(_) => Default::default(),
    }
}

/// How often the health checker looks whether a collector is due: a run just heard is
/// checked within this, not an interval later.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Health-checks every running collector over RPC once it has been heard (its first
/// heartbeat: before, it may not serve yet, and a check would only fail), and then every
/// `every`; asks each new run once what it is and can do.
pub(crate) async fn health_checks(
    rpc: CollectorRpcClient,
    supervisor: Supervisor,
    every: Duration,
    checks: Checks,
) {
    let mut tick = tokio::time::interval(LOOK_EVERY.min(every));
    loop {
        tick.tick().await;
        let Ok(statuses) = supervisor.status().await else {
            return;
        };
        checks
            .lock()
            .retain(|id, _| statuses.iter().any(|s| &s.id == id));
        for s in statuses.iter().filter(|s| s.heard() && s.pid.is_some()) {
            let pid = s.pid.unwrap_or(0);
            let due = checks
                .lock()
                .get(&s.id)
                .is_none_or(|c| c.pid != pid || c.at.elapsed() >= every);
            if !due {
                continue;
            }
            let known = checks
                .lock()
                .get(&s.id)
                .filter(|c| c.pid == pid && !c.collector_type.is_empty())
                .map(|c| Said {
                    collector_type: c.collector_type.clone(),
                    capabilities: c.capabilities.clone(),
                    task_capacity: c.task_capacity,
                });
            let said = match known {
                Some(k) => k,
                None => capabilities_of(&rpc, &s.id).await,
            };
            // The operation's policy (rpc.policies.health_check) times each attempt, and
            // rpc.default_timeout_seconds the whole call.
            let request = RpcRequest::health_check(
                String::new(),
                format!("control.collector.{}", s.id),
                rpc.config().policies.health_check.timeout(),
            );
            let (health, message) = match rpc.call(request, Duration::ZERO).await {
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
            checks.lock().insert(
                s.id.clone(),
                Check {
                    pid,
                    at: Instant::now(),
                    health,
                    message,
                    collector_type: said.collector_type,
                    capabilities: said.capabilities,
                    task_capacity: said.task_capacity,
                },
            );
        }
    }
}

/// The lifecycle services of the agent: act on the supervisor.
pub(crate) struct Lifecycle {
    pub(crate) supervisor: Supervisor,
    pub(crate) checks: Checks,
    /// Sends a start's or restart's configuration to the collector.
    pub(crate) rpc: CollectorRpcClient,
}

/// How long a started collector has to serve its configuration service.
const CONFIG_WITHIN: Duration = Duration::from_secs(10);

impl Lifecycle {
    /// What a running collector it has heard is and can do (its GET_CAPABILITIES), or
    /// nothing if it does not answer within a second.
    async fn describe(&self, status: &mut pb::CollectorStatus, s: &CollectorStatus) {
        if !s.heard() {
            return;
        }
        let known = check_of(&self.checks.lock(), s).filter(|c| !c.collector_type.is_empty());
        let (said_type, capabilities) = match known {
            Some(c) => (c.collector_type, c.capabilities),
            None => {
                let said = capabilities_of(&self.rpc, &s.id).await;
                (said.collector_type, said.capabilities)
            }
        };
        if !said_type.is_empty() && said_type != s.collector_type {
            // What it says it is, beside what the supervisor was told it is.
            let said = format!(
                "configured as {} but says it is {said_type}",
                s.collector_type
            );
            status.health_message = if status.health_message.is_empty() {
                said
            } else {
                format!("{said}; {}", status.health_message)
            };
        }
        status.capabilities = capabilities;
    }

    /// Applies `config` to collector `id` just started: asked once it was heard (its first
    /// heartbeat: then it serves), within [`CONFIG_WITHIN`]; `Err` says what it refused, or
    /// why it was not asked.
    async fn apply_config(&self, id: &str, config: pb::CollectorConfig) -> Result<(), String> {
        let deadline = Instant::now() + CONFIG_WITHIN;
        loop {
            let all = self
                .supervisor
                .status()
                .await
                .map_err(|e| format!("the configuration was not applied: {e}"))?;
            match all.iter().find(|s| s.id == id) {
                Some(s) if s.heard() => break,
                Some(s) if s.state == CollectorState::Running && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(s) => {
                    return Err(format!(
                        "the configuration was not applied: collector {id} is {} and was not \
                         heard within {} s",
                        s.state,
                        CONFIG_WITHIN.as_secs()
                    ));
                }
                None => return Err(format!("no collector {id:?} is configured")),
            }
        }
        let policy = self.rpc.config().policies.configuration.timeout();
        let ask = RpcRequest::update_config(
            String::new(),
            format!("control.collector.{id}"),
            config,
            false,
            policy,
        );
        match self.rpc.call(ask, Duration::ZERO).await {
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
                Err(format!(
                    "the collector refused the configuration: {} {}",
                    u.error_message,
                    fields.join("; ")
                ))
            }
            Err(e) => Err(format!("the configuration was not applied: {e}")),
        }
    }
}

pub(crate) fn status_pb(s: &CollectorStatus, check: Option<Check>) -> pb::CollectorStatus {
    let (health, health_message) = check.map_or((HealthStatus::Unknown, String::new()), |c| {
        (c.health, c.message)
    });
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
        collector_type: s.collector_type.clone(),
        capabilities: Vec::new(),
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
                // A type named: the collectors of that type.
                for s in all
                    .iter()
                    .filter(|s| l.collector_type.is_empty() || s.collector_type == l.collector_type)
                {
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
                // A request naming a type acts only on a collector of that type.
                if !l.collector_type.is_empty() {
                    let all = sup
                        .status()
                        .await
                        .map_err(|e| ReplyStatus::unavailable(e.to_string()))?;
                    if let Some(s) = all.iter().find(|s| s.id == id)
                        && s.collector_type != l.collector_type
                    {
                        return Err(ReplyStatus::invalid_operation(format!(
                            "collector {id} is a {}, not a {}",
                            s.collector_type, l.collector_type
                        )));
                    }
                }
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
                        all.into_iter()
                            .find(|s| s.id == id)
                            .ok_or_else(|| SupervisorError::UnknownCollector(id.to_owned()))
                    }),
                };
                let s = r.map_err(|e| match e {
                    SupervisorError::UnknownCollector(_) | SupervisorError::WrongState { .. } => {
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
                // The same verdicts as the status reports (control.agent.status).
                let statuses = sup
                    .status()
                    .await
                    .map_err(|e| ReplyStatus::unavailable(e.to_string()))?;
                let checks = self.checks.lock().clone();
                let c = collectors_part(&statuses, &checks);
                let status = match c.health {
                    Health::Healthy => HealthStatus::Healthy,
                    Health::Degraded => HealthStatus::Degraded,
                    Health::Unhealthy => HealthStatus::Unhealthy,
                };
                let components = statuses
                    .iter()
                    .map(|s| {
                        let (h, message, _) = measured(s, check_of(&checks, s));
                        (
                            s.id.clone(),
                            pb::ComponentHealth {
                                status: h as i32,
                                message,
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
