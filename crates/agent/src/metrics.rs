//! Prometheus metrics: one [`Scrape`] (the broker's statistics, the agent client's RPC
//! metrics, the collectors, detection, events by topic, the process's CPU and memory) encoded
//! in the OpenMetrics text format by `prometheus-client`. Pure: a scrape in, text out; what
//! reads the figures and serves them is [`crate::http`].
//!
//! Cardinality is bounded: per-topic series for at most [`EVENT_TOPICS`] topics (the rest
//! summed under `other`), per-rule and per-collector series for at most [`SERIES`] of each,
//! per-operation RPC series as the client bounds them (64 and `other`). Nothing is labelled by
//! connection, message or client name.

use crate::CollectorView;
use crate::detection::DetectionView;
use daemoneye_eventbus::broker::BrokerStats;
use daemoneye_eventbus::client::RpcMetrics;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::fmt::Error;

/// Topics counted one by one in `eventbus_events_total` (the others under `other`).
pub const EVENT_TOPICS: usize = 64;

/// Series of one family labelled by rule or collector at most (the rest summed under
/// `other`, or left out where a sum means nothing).
pub const SERIES: usize = 256;

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// States a supervised collector can be in (its `state` label), in the supervisor's words.
pub const COLLECTOR_STATES: [&str; 7] = [
    "stopped",
    "running",
    "paused",
    "stopping",
    "restarting",
    "unhealthy",
    "failed",
];

/// A collector's measured health (its `health` label).
pub const COLLECTOR_HEALTH: [&str; 4] =
    ["HEALTH_STATUS_UNKNOWN", "HEALTHY", "DEGRADED", "UNHEALTHY"];

/// Events by topic since the agent started, shared by the counting task and scrapes.
pub(crate) type EventTotals = std::sync::Arc<parking_lot::Mutex<TopicTotals>>;

/// Events seen by topic since the agent started, bounded: past [`EVENT_TOPICS`] topics the
/// others are summed under `other`.
#[derive(Debug, Default, Clone)]
pub struct TopicTotals {
    counts: BTreeMap<String, u64>,
    other: u64,
}

impl TopicTotals {
    /// Counts one event of `topic`.
    pub fn add(&mut self, topic: &str) {
        if let Some(n) = self.counts.get_mut(topic) {
            *n += 1;
        } else if self.counts.len() < EVENT_TOPICS {
            self.counts.insert(topic.to_owned(), 1);
        } else {
            self.other += 1;
        }
    }

    /// Each topic with its count, and `other` when it counted any.
    #[must_use]
    pub fn entries(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(t, n)| (t.clone(), *n)).collect();
        if self.other > 0 {
            v.push(("other".into(), self.other));
        }
        v
    }
}

/// What the process uses, as the operating system counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// CPU time, user and system, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory in bytes (Linux).
    pub resident_bytes: Option<u64>,
    /// Open file descriptors (Linux).
    pub open_fds: Option<u64>,
}

/// What the agent adds to the broker's figures.
#[derive(Debug, Clone, Default)]
pub struct AgentScrape {
    /// Each supervised collector.
    pub collectors: Vec<CollectorView>,
    /// Rules, alerts and collection tasks.
    pub detection: DetectionView,
    /// Events by topic since the agent started.
    pub events: Vec<(String, u64)>,
    /// The NATS bridge, when one runs.
    pub bridge: Option<daemoneye_eventbus_nats::BridgeStats>,
}

/// Everything one scrape encodes, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// The broker's statistics.
    pub broker: BrokerStats,
    /// The RPC metrics of the agent's own client (calls to collectors).
    pub rpc: Option<RpcMetrics>,
    /// The agent's part (absent under `eventbus serve`).
    pub agent: Option<AgentScrape>,
    /// The process's CPU and memory.
    pub process: Option<ProcessUsage>,
}

/// The scrape in the OpenMetrics text format (ending in `# EOF`).
#[must_use]
pub fn encode(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::with_capacity(16 * 1024);
    // Writing into a String never fails; an encoder error would be ours.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::error!(error = %e, "metrics were not encoded");
    }
    text
}

impl prometheus_client::collector::Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), Error> {
        broker(&mut enc, &self.broker)?;
        if let Some(rpc) = &self.rpc {
            rpc_metrics(&mut enc, rpc)?;
        }
        if let Some(agent) = &self.agent {
            collectors(&mut enc, &agent.collectors)?;
            detection(&mut enc, &agent.detection)?;
            let events: Vec<_> = agent
                .events
                .iter()
                .map(|(t, n)| (vec![("topic", t.clone())], *n))
                .collect();
            counters(
                &mut enc,
                "eventbus_events",
                "Events the agent received, by topic (at most 64 topics, the rest under other)",
                &events,
            )?;
            if let Some(b) = &agent.bridge {
                bridge(&mut enc, b)?;
            }
        }
        if let Some(p) = &self.process {
            counter_f(
                &mut enc,
                "process_cpu_seconds",
                "CPU time of this process, user and system, in seconds",
                p.cpu_seconds,
            )?;
            if let Some(rss) = p.resident_bytes {
                gauge(
                    &mut enc,
                    "process_resident_memory_bytes",
                    "Resident memory of this process in bytes",
                    rss,
                )?;
            }
            if let Some(fds) = p.open_fds {
                gauge(
                    &mut enc,
                    "process_open_fds",
                    "Open file descriptors of this process",
                    fds,
                )?;
            }
        }
        Ok(())
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn counter_f(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: f64) -> Result<(), Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> Result<(), Error> {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter family; nothing is written when it has no series.
fn counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Labels, u64)],
) -> Result<(), Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A gauge family; nothing is written when it has no series.
fn gauges(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(Labels, f64)],
) -> Result<(), Error> {
    if series.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn broker(enc: &mut DescriptorEncoder<'_>, s: &BrokerStats) -> Result<(), Error> {
    gauge(
        enc,
        "eventbus_uptime_seconds",
        "Seconds since the broker started",
        s.uptime_secs,
    )?;
    counter(
        enc,
        "eventbus_messages_published",
        "Messages accepted from publishers",
        s.published,
    )?;
    counter(
        enc,
        "eventbus_messages_delivered",
        "Deliveries written to subscribers",
        s.delivered,
    )?;
    let drops: Vec<_> = s
        .dropped_by_cause
        .iter()
        .map(|(cause, n)| (vec![("cause", cause.clone())], *n))
        .collect();
    counters(
        enc,
        "eventbus_messages_dropped",
        "Deliveries dropped, by cause (slow_reader, memory_cap, backlog_full, closed)",
        &drops,
    )?;
    counter(
        enc,
        "eventbus_received_bytes",
        "Payload bytes accepted from publishers",
        s.bytes_in,
    )?;
    counter(
        enc,
        "eventbus_sent_bytes",
        "Payload bytes written to subscribers",
        s.bytes_out,
    )?;
    counter(
        enc,
        "eventbus_message_runs",
        "Message runs received (bursts on one topic routed as one unit)",
        s.runs,
    )?;
    gauge(
        enc,
        "eventbus_connections",
        "Open connections",
        s.active_connections,
    )?;
    counter(
        enc,
        "eventbus_connections_accepted",
        "Connections that completed the handshake",
        s.total_connections,
    )?;
    counter(
        enc,
        "eventbus_connections_refused",
        "Connections refused (limits, handshake, authorisation, TLS)",
        s.refused_connections,
    )?;
    counter(
        enc,
        "eventbus_tls_refused",
        "TLS connections refused at the handshake",
        s.tls_refused,
    )?;
    counter(
        enc,
        "eventbus_protocol_errors",
        "Connections closed for a protocol violation",
        s.protocol_errors,
    )?;
    counter(
        enc,
        "eventbus_publishes_rejected",
        "Publishes refused (too large, reserved topic, bad source)",
        s.rejected_publishes,
    )?;
    counter(
        enc,
        "eventbus_requests_no_responders",
        "Requests nobody could answer",
        s.no_responders,
    )?;
    counter(
        enc,
        "eventbus_deliveries_reoffered",
        "Queue group deliveries given to another member after theirs disconnected",
        s.reoffered,
    )?;
    counter(
        enc,
        "eventbus_acl_denials",
        "Publishes and subscriptions the ACL refused",
        s.acl_denials,
    )?;
    if let Some(rules) = s.acl_rules {
        gauge(
            enc,
            "eventbus_acl_rules",
            "Rules of the ACL policy in force",
            rules,
        )?;
    }
    gauge(
        enc,
        "eventbus_subscriptions",
        "Subscriptions (filter, connection), and one per filter of each acknowledged one",
        s.active_subscriptions,
    )?;
    gauge(
        enc,
        "eventbus_subscribed_filters",
        "Distinct subscribed filters",
        s.active_topics,
    )?;
    let queued_msgs: u64 = s.connections.iter().map(|c| c.queued_messages).sum();
    gauge(
        enc,
        "eventbus_queued_messages",
        "Messages waiting in connections' outbound queues",
        queued_msgs,
    )?;
    gauge(
        enc,
        "eventbus_queued_bytes",
        "Bytes held in outbound queues",
        s.queued_bytes,
    )?;
    gauge(
        enc,
        "eventbus_largest_queue_bytes",
        "Bytes waiting in the fullest connection's queue",
        s.connections
            .iter()
            .map(|c| c.queued_bytes)
            .max()
            .unwrap_or(0),
    )?;
    gauge(
        enc,
        "eventbus_subscription_bytes",
        "Bytes of the memory cap held by subscriptions",
        s.subscription_bytes,
    )?;
    gauge(
        enc,
        "eventbus_memory_cap_bytes",
        "The broker-wide cap on queued bytes (max_memory_bytes)",
        s.memory_cap_bytes,
    )?;
    let durable = s
        .subscriptions
        .iter()
        .filter(|d| d.durable.is_some())
        .count();
    gauges(
        enc,
        "eventbus_acknowledged_subscriptions",
        "Acknowledged subscriptions, durable or living with their connection",
        &[
            (vec![("kind", "durable".into())], durable as f64),
            (
                vec![("kind", "connection".into())],
                (s.subscriptions.len() - durable) as f64,
            ),
        ],
    )?;
    gauge(
        enc,
        "eventbus_stalled_subscriptions",
        "Acknowledged subscriptions stalled now (their publishers no longer wait)",
        s.subscriptions.iter().filter(|d| d.stalled).count() as u64,
    )?;
    gauge(
        enc,
        "eventbus_detached_durable_subscriptions",
        "Durable subscriptions nobody is attached to",
        s.subscriptions
            .iter()
            .filter(|d| d.durable.is_some() && d.session_id.is_none())
            .count() as u64,
    )?;
    gauge(
        enc,
        "eventbus_acknowledged_pending_messages",
        "Messages acknowledged subscriptions hold, not yet sent",
        s.subscriptions.iter().map(|d| d.pending).sum(),
    )?;
    gauge(
        enc,
        "eventbus_acknowledged_unacked_messages",
        "Deliveries sent to acknowledged subscriptions and not yet acknowledged",
        s.subscriptions.iter().map(|d| d.unacked).sum(),
    )?;
    counter(
        enc,
        "eventbus_stalls",
        "Times a Processed subscription held its publishers back too long and stalled",
        s.stalled,
    )?;
    gauge(
        enc,
        "eventbus_store_bytes",
        "Bytes the durable subscriptions' logs hold on disk",
        s.store_bytes,
    )?;
    counter(
        enc,
        "eventbus_store_errors",
        "Failed writes of durable subscriptions' logs",
        s.store_errors,
    )?;
    counter(
        enc,
        "eventbus_store_syncs",
        "Syncs of durable subscriptions' logs",
        s.store_syncs,
    )?;
    counter(
        enc,
        "eventbus_store_torn_bytes",
        "Bytes of records cut short by a crash, truncated at start",
        s.store_torn_bytes,
    )?;
    counter(
        enc,
        "eventbus_store_damaged",
        "Damaged log segments or subscription directories set aside at start",
        s.store_damaged,
    )?;
    if s.audit_head.is_some() {
        counter(
            enc,
            "eventbus_audit_records",
            "Records written to the audit trail",
            s.audit_records,
        )?;
        counter(
            enc,
            "eventbus_audit_dropped",
            "Audit records dropped because the writer fell behind (each gap recorded)",
            s.audit_dropped,
        )?;
        counter(
            enc,
            "eventbus_audit_errors",
            "Failed writes or rotations of the audit trail",
            s.audit_errors,
        )?;
    }
    Ok(())
}

fn rpc_metrics(enc: &mut DescriptorEncoder<'_>, m: &RpcMetrics) -> Result<(), Error> {
    let calls: Vec<_> = m
        .operations
        .iter()
        .map(|(op, o)| (vec![("operation", op.clone())], o.calls))
        .collect();
    counters(
        enc,
        "eventbus_rpc_calls",
        "RPC calls the agent made, by operation",
        &calls,
    )?;
    let errors: Vec<_> = m
        .operations
        .iter()
        .flat_map(|(op, o)| {
            o.errors
                .iter()
                .map(move |(kind, n)| (vec![("operation", op.clone()), ("kind", kind.clone())], *n))
        })
        .collect();
    counters(
        enc,
        "eventbus_rpc_errors",
        "RPC calls that failed, by operation and kind",
        &errors,
    )?;
    if m.operations.is_empty() {
        return Ok(());
    }
    let mut family = enc.encode_descriptor(
        "eventbus_rpc_latency_seconds",
        "RPC call latency, by operation",
        None,
        MetricType::Histogram,
    )?;
    for (op, o) in &m.operations {
        let h = &o.latency;
        // The client's buckets are cumulative; the encoder wants each bucket's own count.
        let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
        let mut below = 0;
        for &(bound_us, cumulative) in &h.buckets {
            let cumulative = cumulative.min(h.count);
            buckets.push((bound_us as f64 / 1e6, cumulative.saturating_sub(below)));
            below = below.max(cumulative);
        }
        buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
        let labels: Labels = vec![("operation", op.clone())];
        family
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_us as f64 / 1e6,
                h.count,
                &buckets,
                None,
            )?;
    }
    Ok(())
}

fn bridge(
    enc: &mut DescriptorEncoder<'_>,
    b: &daemoneye_eventbus_nats::BridgeStats,
) -> Result<(), Error> {
    gauge(
        enc,
        "eventbus_bridge_connected",
        "Whether the NATS bridge is connected (1) or not (0)",
        u64::from(b.connected),
    )?;
    counter(
        enc,
        "eventbus_bridge_sent",
        "Publishes the bridge sent to JetStream, resends included",
        b.sent,
    )?;
    counter(
        enc,
        "eventbus_bridge_stored",
        "Messages JetStream stored (then acknowledged locally)",
        b.stored,
    )?;
    counter(
        enc,
        "eventbus_bridge_duplicates",
        "Resends JetStream recognised as stored already",
        b.duplicates,
    )?;
    counter(
        enc,
        "eventbus_bridge_failures",
        "Publishes to JetStream that failed (each followed by a resync)",
        b.failures,
    )?;
    counter(
        enc,
        "eventbus_bridge_resyncs",
        "Times the bridge asked the stream where it stands (at start and after failures)",
        b.resyncs,
    )?;
    counter(
        enc,
        "eventbus_bridge_dropped",
        "Messages the NATS server can never take (over its max_payload): dropped",
        b.dropped,
    )?;
    gauge(
        enc,
        "eventbus_bridge_pending_messages",
        "Messages taken from the local broker and not yet stored by JetStream",
        b.pending,
    )?;
    counters(
        enc,
        "eventbus_bridge_inbound",
        "NATS messages received on inbound subjects, by outcome (loops skipped counted apart)",
        &[
            (vec![("outcome", "published".into())], b.inbound_published),
            (vec![("outcome", "refused".into())], b.inbound_refused),
        ],
    )?;
    counter(
        enc,
        "eventbus_bridge_inbound_received",
        "NATS messages received on inbound subjects",
        b.inbound_received,
    )?;
    counter(
        enc,
        "eventbus_bridge_loops_skipped",
        "Messages not bridged because the bridge had brought them",
        b.loops_skipped,
    )
}

fn collectors(enc: &mut DescriptorEncoder<'_>, list: &[CollectorView]) -> Result<(), Error> {
    let list = &list[..list.len().min(SERIES)];
    let id = |c: &CollectorView| {
        vec![
            ("collector", c.id.clone()),
            ("type", c.collector_type.clone()),
        ]
    };
    let mut states = Vec::new();
    let mut health = Vec::new();
    for c in list {
        for s in COLLECTOR_STATES {
            let mut l = id(c);
            l.push(("state", s.into()));
            states.push((l, f64::from(u8::from(c.state == s))));
        }
        for h in COLLECTOR_HEALTH {
            let mut l = id(c);
            l.push(("health", h.into()));
            health.push((l, f64::from(u8::from(c.health == h))));
        }
    }
    gauges(
        enc,
        "eventbus_collector_state",
        "Each supervised collector's state (1 for the one it is in)",
        &states,
    )?;
    gauges(
        enc,
        "eventbus_collector_health",
        "Each collector's measured health (1 for the one it has)",
        &health,
    )?;
    let restarts: Vec<_> = list
        .iter()
        .map(|c| (id(c), u64::from(c.restart_count)))
        .collect();
    counters(
        enc,
        "eventbus_collector_restarts",
        "Restarts of each collector since the agent started",
        &restarts,
    )?;
    let ages: Vec<_> = list
        .iter()
        .filter_map(|c| c.heartbeat_age_secs.map(|a| (id(c), a)))
        .collect();
    gauges(
        enc,
        "eventbus_collector_heartbeat_age_seconds",
        "Seconds since each collector's last heartbeat",
        &ages,
    )
}

fn detection(enc: &mut DescriptorEncoder<'_>, d: &DetectionView) -> Result<(), Error> {
    let rules = &d.rules[..d.rules.len().min(SERIES)];
    let rule = |id: &str| vec![("rule", id.to_owned())];
    let of = |f: fn(&crate::detection::RuleView) -> u64| -> Vec<(Labels, u64)> {
        rules.iter().map(|r| (rule(&r.id), f(r))).collect()
    };
    counters(
        enc,
        "eventbus_rule_evaluations",
        "Evaluations of each detection rule",
        &of(|r| r.evaluations),
    )?;
    counters(
        enc,
        "eventbus_rule_errors",
        "Failed evaluations of each detection rule",
        &of(|r| r.errors),
    )?;
    let matches: Vec<_> = rules
        .iter()
        .map(|r| (rule(&r.id), r.matches as f64))
        .collect();
    gauges(
        enc,
        "eventbus_rule_matches",
        "Rows each rule matched at its last evaluation",
        &matches,
    )?;
    let mut by_severity: BTreeMap<&str, u64> = ["low", "medium", "high", "critical"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for r in &d.rules {
        *by_severity.entry(r.severity.as_str()).or_default() += r.alerts;
    }
    let alerts: Vec<_> = by_severity
        .into_iter()
        .map(|(s, n)| (vec![("severity", s.to_owned())], n))
        .collect();
    counters(
        enc,
        "eventbus_alerts",
        "Alerts raised, by severity",
        &alerts,
    )?;
    gauge(
        enc,
        "eventbus_rules_refused",
        "Rule files refused when loaded",
        d.refused.len() as u64,
    )?;
    let t = &d.tasks;
    counter(
        enc,
        "eventbus_tasks_started",
        "Collection tasks started",
        t.started,
    )?;
    gauge(
        enc,
        "eventbus_tasks_in_flight",
        "Collection tasks in flight",
        t.in_flight,
    )?;
    counters(
        enc,
        "eventbus_tasks_completed",
        "Collection tasks completed, whole or partial (an answer missing at the deadline)",
        &[
            (vec![("outcome", "complete".into())], t.complete),
            (vec![("outcome", "partial".into())], t.partial),
        ],
    )?;
    counter(
        enc,
        "eventbus_task_calls_failed",
        "Calls of collection tasks that failed or timed out",
        t.failed_calls,
    )?;
    counter(
        enc,
        "eventbus_tasks_redistributed",
        "Collection tasks moved to another collector instance",
        t.redistributed,
    )?;
    counter(
        enc,
        "eventbus_task_answers_late",
        "Answers that came after their task's deadline (counted, not merged)",
        t.late,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn the_broker_alone_is_encoded_and_ends_in_eof() {
        let mut broker = BrokerStats::default();
        broker.published = 7;
        broker.dropped_by_cause.insert("slow_reader".into(), 3);
        let text = encode(Scrape {
            broker,
            ..Scrape::default()
        });
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            sample(&text, "eventbus_messages_published_total"),
            Some(7.0)
        );
        assert!(
            text.contains("eventbus_messages_dropped_total{cause=\"slow_reader\"} 3"),
            "{text}"
        );
        assert!(
            !text.contains("eventbus_rpc"),
            "no RPC without the agent's client"
        );
    }

    #[test]
    fn label_values_are_escaped_and_series_bounded() {
        let mut totals = TopicTotals::default();
        for i in 0..(EVENT_TOPICS + 5) {
            totals.add(&format!("events.t{i}"));
        }
        totals.add("events.t0");
        let entries = totals.entries();
        assert_eq!(entries.len(), EVENT_TOPICS + 1);
        assert_eq!(
            entries.last().map(|(t, n)| (t.as_str(), *n)),
            Some(("other", 5))
        );
        let collectors = (0..SERIES + 3)
            .map(|i| CollectorView {
                id: format!("c\"{i}\\\n"),
                collector_type: "procmond".into(),
                capabilities: Vec::new(),
                state: "running".into(),
                pid: None,
                uptime_secs: None,
                restart_count: 1,
                last_exit: None,
                heartbeat_age_secs: Some(0.5),
                health: "HEALTHY".into(),
                health_reason: "ok".into(),
            })
            .collect();
        let text = encode(Scrape {
            agent: Some(AgentScrape {
                collectors,
                events: entries,
                ..AgentScrape::default()
            }),
            ..Scrape::default()
        });
        assert!(text.contains(r#"collector="c\"0\\\n""#), "escaped: {text}");
        let restarts = text
            .lines()
            .filter(|l| l.starts_with("eventbus_collector_restarts_total{"))
            .count();
        assert_eq!(restarts, SERIES);
        assert!(text.contains("eventbus_events_total{topic=\"other\"} 5"));
    }

    #[test]
    fn rpc_latency_is_a_histogram_in_seconds_with_cumulative_buckets() {
        let mut rpc = RpcMetrics::default();
        let mut op = daemoneye_eventbus::client::OperationMetrics::default();
        op.calls = 3;
        op.errors.insert("timeout".into(), 1);
        op.latency.count = 3;
        op.latency.sum_us = 1_500_000;
        op.latency.buckets = vec![(1_000, 1), (1_000_000, 2)];
        rpc.operations.insert("health_check".into(), op);
        let text = encode(Scrape {
            rpc: Some(rpc),
            ..Scrape::default()
        });
        for line in [
            "eventbus_rpc_latency_seconds_sum{operation=\"health_check\"} 1.5",
            "eventbus_rpc_latency_seconds_count{operation=\"health_check\"} 3",
            "eventbus_rpc_latency_seconds_bucket{le=\"0.001\",operation=\"health_check\"} 1",
            "eventbus_rpc_latency_seconds_bucket{le=\"1.0\",operation=\"health_check\"} 2",
            "eventbus_rpc_latency_seconds_bucket{le=\"+Inf\",operation=\"health_check\"} 3",
            "eventbus_rpc_errors_total{operation=\"health_check\",kind=\"timeout\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
