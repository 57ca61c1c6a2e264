//! The agent's health: the broker's, RPC's and the collectors', each with its reason,
//! combined to the worst. Pure: statistics in, verdicts out.

use daemoneye_eventbus::broker::BrokerStats;
use daemoneye_eventbus::supervisor::{CollectorState, CollectorStatus};
use serde::Serialize;

/// Overall health, combined from the broker, RPC and the collectors (the worst wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Health {
    /// Everything works.
    Healthy,
    /// Working, with a problem named in the reason.
    Degraded,
    /// Not doing its job.
    Unhealthy,
}

/// One part's health and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Part {
    /// Its health.
    pub health: Health,
    /// Why.
    pub reason: String,
}

fn part(health: Health, reason: impl Into<String>) -> Part {
    Part {
        health,
        reason: reason.into(),
    }
}

/// The broker's counters at the last report, for what happened since.
#[derive(Debug, Default, Clone, Copy)]
pub struct Before {
    /// Deliveries dropped then.
    pub dropped: u64,
    /// Subscriptions stalled then.
    pub stalled: u64,
}

impl Before {
    /// The counters of `stats`.
    #[must_use]
    pub fn of(stats: &BrokerStats) -> Self {
        Self {
            dropped: stats.dropped,
            stalled: stats.stalled,
        }
    }
}

/// The broker's health from its statistics: Degraded when a Processed subscription is
/// stalled now (named) or stalled since the last report, when queues hold over 80 % of the
/// memory cap, or when deliveries were dropped since the last report.
pub fn broker_health(now: &BrokerStats, before: Before) -> Part {
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
pub fn collectors_health(statuses: &[CollectorStatus]) -> Part {
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
pub fn rpc_health(failures: u64) -> Part {
    if failures > 0 {
        part(
            Health::Degraded,
            format!("{failures} calls timed out or found no responder"),
        )
    } else {
        part(Health::Healthy, "calls answered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: &str, state: CollectorState) -> CollectorStatus {
        CollectorStatus {
            id: id.into(),
            collector_type: id.into(),
            heartbeats: true,
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
