//! Broker statistics: live counters and the snapshot served to the embedding API,
//! `$sys.broker.stats` and `eventbus stats`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Broker-wide counters, updated in batches by sessions.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    /// Deliveries dropped, by cause: every queue's [`crate::delivery::Drops`] adds to it, and
    /// the hub adds what closed connections and subscriptions held.
    pub(crate) drops: std::sync::Arc<crate::delivery::DropTotals>,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_refused: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    pub(crate) rejected_publishes: AtomicU64,
    pub(crate) no_responders: AtomicU64,
    pub(crate) reoffered: AtomicU64,
    pub(crate) runs: AtomicU64,
    pub(crate) stalled: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) store_torn_bytes: AtomicU64,
    pub(crate) store_syncs: AtomicU64,
    pub(crate) store_damaged: AtomicU64,
    pub(crate) acl_denials: AtomicU64,
    pub(crate) tls_refused: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

pub(crate) fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Per-connection counters.
#[derive(Debug, Default)]
pub(crate) struct ConnCounters {
    pub(crate) published: AtomicU64,
    pub(crate) delivered: AtomicU64,
    /// Publishes and subscriptions the ACL refused.
    pub(crate) denied: AtomicU64,
}

/// A point-in-time view of the broker. Every figure is measured, none estimated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Seconds since the broker started.
    pub uptime_secs: u64,
    /// Messages accepted from publishers.
    pub published: u64,
    /// Message deliveries written to subscribers.
    pub delivered: u64,
    /// Deliveries dropped (slow reader, memory cap, full backlog, or discarded at
    /// disconnect): the sum of `dropped_by_cause`.
    pub dropped: u64,
    /// Deliveries dropped by cause (`slow_reader`, `memory_cap`, `backlog_full`, `closed`;
    /// see [`crate::DropCause`]), every cause listed.
    #[serde(default)]
    pub dropped_by_cause: BTreeMap<String, u64>,
    /// Payload bytes accepted from publishers.
    pub bytes_in: u64,
    /// Payload bytes written to subscribers.
    pub bytes_out: u64,
    /// Open connections.
    pub active_connections: u64,
    /// Connections that completed the handshake since start.
    pub total_connections: u64,
    /// Connections refused (limit, handshake, authorisation).
    pub refused_connections: u64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: u64,
    /// Publishes refused (too large, reserved topic, bad source).
    pub rejected_publishes: u64,
    /// Requests (publishes with a reply-to) that matched no subscription and were answered
    /// at once with a "no responders" status.
    pub no_responders: u64,
    /// Queue group deliveries given to another member because the chosen one disconnected
    /// before they were written to it.
    pub reoffered: u64,
    /// Message runs received (PUBLISH_RUN frames, protocol 1.2): bursts of messages on one
    /// topic that publishers sent, and the broker routed, as one unit. Their messages are
    /// counted in `published`.
    #[serde(default)]
    pub runs: u64,
    /// (filter, connection) subscriptions, and one per filter of each acknowledged
    /// subscription.
    pub active_subscriptions: u64,
    /// Distinct subscribed filters.
    pub active_topics: u64,
    /// Bytes held in outbound queues now.
    pub queued_bytes: u64,
    /// Bytes of the memory cap held by subscriptions (each charged its filter's length and a
    /// fixed estimate of the routing table's bookkeeping).
    #[serde(default)]
    pub subscription_bytes: u64,
    /// The broker-wide cap on queued bytes.
    pub memory_cap_bytes: u64,
    /// Times a Processed subscription held its publishers back for
    /// `processed_stall_timeout_ms` and stalled (durable), was closed (acknowledged) or had its
    /// connection closed (a connection's Processed queue).
    #[serde(default)]
    pub stalled: u64,
    /// Attempts to write durable subscriptions' disk logs that failed (a full disk: the
    /// publishers' acknowledgements wait, and the write is tried again).
    #[serde(default)]
    pub store_errors: u64,
    /// Syncs of durable subscriptions' logs that publishers' acknowledgements waited for
    /// under `fsync = always` (one serves every session that wrote meanwhile), and the
    /// periodic syncs under `interval`.
    #[serde(default)]
    pub store_syncs: u64,
    /// Bytes the durable subscriptions' logs hold on disk now (`store_max_bytes` bounds it).
    #[serde(default)]
    pub store_bytes: u64,
    /// Bytes of records cut short by a crash that the broker truncated when it started.
    #[serde(default)]
    pub store_torn_bytes: u64,
    /// Damaged log segments (or durable subscription directories) set aside when it started.
    #[serde(default)]
    pub store_damaged: u64,
    /// Publishes and subscriptions the ACL (`acl_file`) refused, every connection's.
    #[serde(default)]
    pub acl_denials: u64,
    /// TLS connections refused at the handshake (no client certificate, one from another
    /// CA, expired, not TLS at all, or too slow); also counted in `refused_connections`.
    #[serde(default)]
    pub tls_refused: u64,
    /// Rules of the ACL policy in force; `None` without `acl_file` (no topic ACL).
    #[serde(default)]
    pub acl_rules: Option<u64>,
    /// Records written to the audit trail (`audit_log`), synced.
    #[serde(default)]
    pub audit_records: u64,
    /// Records the audit trail dropped because its writer fell behind (each gap is itself
    /// recorded, with its count).
    #[serde(default)]
    pub audit_dropped: u64,
    /// Failed writes or rotations of the audit trail.
    #[serde(default)]
    pub audit_errors: u64,
    /// The audit trail's last record (`eventbus audit verify --head SEQ:HASH` checks that the
    /// files end there); `None` without `audit_log`.
    #[serde(default)]
    pub audit_head: Option<crate::audit::Head>,
    /// Connections refused per identity (a uid not allowed, `max_connections`,
    /// `max_connections_per_identity`, a client name the policy keeps for others): at most
    /// 256 identities, the others summed under `other`.
    #[serde(default)]
    pub refused_by_identity: BTreeMap<String, u64>,
    /// One entry per open connection.
    pub connections: Vec<ConnectionStats>,
    /// One entry per acknowledged subscription (protocol 1.3): every durable one, attached or
    /// not, and the others while their connection lives.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionStats>,
}

/// Statistics of one acknowledged subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// The durable subscription's name (`None`: it lives with its connection).
    pub durable: Option<String>,
    /// Its filters.
    pub filters: Vec<String>,
    /// The session it is attached to, if any.
    pub session_id: Option<u64>,
    /// That session's client name.
    pub client: Option<String>,
    /// Messages waiting to be sent.
    pub pending: u64,
    /// Deliveries sent and not acknowledged.
    pub unacked: u64,
    /// Charged bytes kept.
    pub kept_bytes: u64,
    /// Deliveries sent (redeliveries included).
    pub delivered: u64,
    /// Redeliveries among them.
    pub redelivered: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages dropped by its full policy or the memory cap.
    pub dropped: u64,
    /// Whether it stalled (its publishers no longer wait for it).
    pub stalled: bool,
    /// Bytes of its log on disk (0 for one kept in memory).
    #[serde(default)]
    pub disk_bytes: u64,
}

/// Statistics of one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConnectionStats {
    /// Session id.
    pub session_id: u64,
    /// Client name from its handshake.
    pub name: String,
    /// Who the peer is (pid/uid or address).
    pub peer: String,
    /// The peer's uid (Unix sockets: from the kernel).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The peer's gid (Unix sockets: from the kernel).
    #[serde(default)]
    pub gid: Option<u32>,
    /// The peer's process id (Unix sockets: from the kernel).
    #[serde(default)]
    pub pid: Option<i32>,
    /// The peer's executable (Linux: read through the pidfd the kernel gave for it).
    #[serde(default)]
    pub exe: Option<String>,
    /// Its publishes and subscriptions the ACL refused.
    #[serde(default)]
    pub denied: u64,
    /// The supervised collector it is: its pid is the one the supervisor started.
    #[serde(default)]
    pub collector: Option<String>,
    /// The verified subject of its TLS client certificate.
    #[serde(default)]
    pub tls_subject: Option<String>,
    /// Subscribed filters, its acknowledged subscriptions' included (the durable ones it
    /// attached to are not: they outlive it), as `max_subscriptions_per_connection` counts.
    pub subscriptions: u64,
    /// Messages published by this connection.
    pub published: u64,
    /// Messages delivered to it.
    pub delivered: u64,
    /// Messages dropped for it.
    pub dropped: u64,
    /// Messages waiting in its queue.
    pub queued_messages: u64,
    /// Bytes waiting in its queue.
    pub queued_bytes: u64,
    /// Drops by topic: the largest counts, at most 256 topics, and the sum of the others under
    /// `$sys.broker.dropped.other`.
    pub dropped_by_topic: BTreeMap<String, u64>,
}

/// Identities counted apart at most (the others are summed under `other`).
pub(crate) const COUNTED_IDENTITIES: usize = 256;

/// Counts per identity, bounded: past [`COUNTED_IDENTITIES`] identities the others are summed.
#[derive(Debug, Default)]
pub(crate) struct IdentityCounts {
    counts: BTreeMap<String, u64>,
    other: u64,
}

impl IdentityCounts {
    pub(crate) fn add(&mut self, key: &str) {
        if let Some(n) = self.counts.get_mut(key) {
            *n += 1;
        } else if self.counts.len() < COUNTED_IDENTITIES {
            self.counts.insert(key.to_owned(), 1);
        } else {
            self.other += 1;
        }
    }

    /// Every count, the others' sum under `other`.
    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        let mut m = self.counts.clone();
        if self.other > 0 {
            m.insert("other".into(), self.other);
        }
        m
    }
}
