//! `eventbus collector`: the agent's collectors, through its lifecycle service
//! (`control.agent.lifecycle`, which the broker's policy must grant the caller).

use crate::BrokerArg;
use crate::commands::connect;
use crate::rpc_cmd::CallFailed;
use anyhow::Result;
use daemoneye_eventbus::rpc::{
    CollectorOperation, CollectorRpcClient, CollectorStatus, HealthStatus, RpcConfig, RpcRequest,
};
use daemoneye_eventbus::schema::rpc as pb;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What to do.
#[derive(clap::Subcommand, Debug)]
pub(crate) enum Action {
    /// Every collector: state, pid, restarts, last heartbeat, health and its reason, and what
    /// a running one is and can do.
    List(Common),
    /// One collector's status.
    Status(One),
    /// Start a stopped or failed collector.
    Start(Starting),
    /// Stop a collector: its shutdown service, then SIGTERM, then SIGKILL (`--force`: at once).
    Stop(Stop),
    /// Stop and start a collector.
    Restart(Starting),
    /// Pause a collector (SIGSTOP to its processes): it neither works nor heartbeats.
    Pause(One),
    /// Resume a paused collector (SIGCONT).
    Resume(One),
}

/// Where the agent is, and how to print.
#[derive(clap::Args, Debug)]
pub(crate) struct Common {
    #[command(flatten)]
    broker: BrokerArg,
    /// One JSON object per collector.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the agent's answer (a graceful stop may take the collector's
    /// shutdown timeout).
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    timeout: f64,
}

/// One collector.
#[derive(clap::Args, Debug)]
pub(crate) struct One {
    /// The collector's id.
    id: String,
    #[command(flatten)]
    common: Common,
}

/// `stop`.
#[derive(clap::Args, Debug)]
pub(crate) struct Stop {
    #[command(flatten)]
    one: One,
    /// Skip the graceful phase: SIGTERM at once, then SIGKILL.
    #[arg(long, conflicts_with = "grace")]
    force: bool,
    /// Seconds the graceful phase may take this time (default: the agent's
    /// `process_manager.graceful_shutdown_timeout_seconds`).
    #[arg(long, value_name = "SECS")]
    grace: Option<u32>,
}

/// `start` and `restart`.
#[derive(clap::Args, Debug)]
pub(crate) struct Starting {
    #[command(flatten)]
    one: One,
    /// Add `KEY=VALUE` to the collector's environment, for this run and its restarts (until
    /// another start or restart sets one). Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = key_value)]
    env: Vec<(String, String)>,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

pub(crate) async fn run(action: Action) -> Result<()> {
    use CollectorOperation as O;
    let mut request = pb::LifecycleRequest::default();
    let (op, one) = match action {
        Action::List(c) => (
            O::Status,
            One {
                id: String::new(),
                common: c,
            },
        ),
        Action::Status(o) => (O::Status, o),
        Action::Start(s) => {
            request.environment = s.env.into_iter().collect();
            (O::Start, s.one)
        }
        Action::Stop(s) => {
            request.force = s.force;
            request.timeout_seconds = s.grace.unwrap_or(0);
            (O::Stop, s.one)
        }
        Action::Restart(s) => {
            request.environment = s.env.into_iter().collect();
            (O::Restart, s.one)
        }
        Action::Pause(o) => (O::Pause, o),
        Action::Resume(o) => (O::Resume, o),
    };
    request.collector_id = one.id;
    let common = one.common;
    let timeout = Duration::try_from_secs_f64(common.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("--timeout must be a positive number of seconds"))?;
    let client = connect(&common.broker, "eventbus-collector").await?;
    let rpc = CollectorRpcClient::new(client.clone(), "eventbus-collector", RpcConfig::default());
    let request = RpcRequest::lifecycle(
        String::new(),
        daemoneye_eventbus::core::catalog::agent::lifecycle().to_string(),
        op,
        request,
        timeout,
    );
    let answer = rpc.call(request, timeout).await;
    client.close().await;
    let answer = answer.map_err(CallFailed)?;
    let Some(l) = answer.lifecycle() else {
        anyhow::bail!("the agent's answer is not a lifecycle response");
    };
    if !l.success {
        anyhow::bail!("{}", l.error_message);
    }
    let statuses: Vec<&CollectorStatus> = match &l.status {
        Some(s) => vec![s],
        None => l.collectors.iter().collect(),
    };
    let mut out = std::io::stdout().lock();
    for s in statuses {
        if common.json {
            writeln!(out, "{}", json(s))?;
        } else {
            writeln!(out, "{}", line(s))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn state(s: &CollectorStatus) -> &'static str {
    match pb::CollectorState::try_from(s.state).unwrap_or(pb::CollectorState::Unknown) {
        pb::CollectorState::Unknown => "unknown",
        pb::CollectorState::Starting => "starting",
        pb::CollectorState::Running => "running",
        pb::CollectorState::Stopping => "stopping",
        pb::CollectorState::Stopped => "stopped",
        pb::CollectorState::Failed => "failed",
        pb::CollectorState::Paused => "paused",
        pb::CollectorState::UnhealthyState => "unhealthy",
    }
}

fn health(s: &CollectorStatus) -> &'static str {
    match HealthStatus::try_from(s.health).unwrap_or(HealthStatus::Unknown) {
        HealthStatus::Healthy => "healthy",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Unhealthy => "unhealthy",
        HealthStatus::Unknown => "not checked",
    }
}

/// Seconds since the last heartbeat, if there was one.
fn heartbeat_age(s: &CollectorStatus) -> Option<f64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    (s.last_heartbeat_ns > 0)
        .then(|| now.as_secs_f64() - Duration::from_nanos(s.last_heartbeat_ns).as_secs_f64())
}

fn line(s: &CollectorStatus) -> String {
    let mut l = format!(
        "{:<12} {:<9} pid {:<8} restarts {:<3} heartbeat {:<8} health {}",
        s.collector_id,
        state(s),
        if s.pid == 0 {
            "-".to_owned()
        } else {
            s.pid.to_string()
        },
        s.restart_count,
        heartbeat_age(s).map_or("never".to_owned(), |a| format!("{a:.1}s ago")),
        health(s)
    );
    if !s.collector_type.is_empty() {
        l.push_str(&format!("; type {}", s.collector_type));
    }
    if !s.capabilities.is_empty() {
        l.push_str(&format!(" ({})", s.capabilities.join(", ")));
    }
    if !s.health_message.is_empty() && s.health_message != "ok" {
        l.push_str(&format!(" ({})", s.health_message));
    }
    if !s.last_exit_reason.is_empty() {
        l.push_str(&format!("; last exit: {}", s.last_exit_reason));
    }
    l
}

fn json(s: &CollectorStatus) -> serde_json::Value {
    serde_json::json!({
        "id": s.collector_id,
        "type": (!s.collector_type.is_empty()).then_some(&s.collector_type),
        "capabilities": s.capabilities,
        "state": state(s),
        "pid": (s.pid != 0).then_some(s.pid),
        "uptime_secs": s.uptime_seconds,
        "restart_count": s.restart_count,
        "heartbeat_age_secs": heartbeat_age(s),
        "health": health(s),
        "health_message": s.health_message,
        "last_exit": (!s.last_exit_reason.is_empty()).then_some(&s.last_exit_reason),
    })
}
