//! Broker configuration (seed `BrokerConfig` defaults plus the bounds DESIGN §5 asks for).

use crate::delivery::DurableFullPolicy;
use daemoneye_eventbus_core::codec::{DEFAULT_MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE_LIMIT};
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Broker settings. Every field has a default; unknown keys in a file are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Unix socket path; `None` uses the default private path.
    pub socket_path: Option<PathBuf>,
    /// Also listen on this loopback TCP address (plain TCP, loopback only).
    pub tcp_listen: Option<SocketAddr>,
    /// Also serve other hosts: TCP with mutual TLS (`SECURITY.md`). `None` (default).
    pub tls: Option<TlsListen>,
    /// Let this group (gid) reach the Unix socket: the socket is given to it with mode 0660
    /// (0600 otherwise, the broker's user alone). Its members must also be in
    /// `allowed_uids`, and able to search the socket's directory (the default directory is
    /// 0700: give `socket_path` in a directory the group can search). `None` (default).
    pub socket_group: Option<u32>,
    /// Maximum concurrent connections (default 64). Extra connections are refused with a
    /// `ConnectionLimit` error. The broker's own in-process clients are not counted.
    pub max_connections: usize,
    /// Connections one identity may hold at once (default 32): a Unix peer's uid and
    /// executable, a TCP peer's address. More are refused with `ConnectionLimit`, counted per
    /// identity (`BrokerStats.refused_by_identity`), so one identity cannot take every
    /// connection; the broker's own in-process clients are not counted.
    pub max_connections_per_identity: usize,
    /// Who may do what: a policy file (TOML, or YAML for `.yaml` / `.yml`) of rules keyed by
    /// identity granting publish, subscribe, request and reply on topic filters; anything not
    /// granted is denied (`SECURITY.md`). Read at start (a bad file stops the broker) and
    /// again on `Broker::reload_acl` (SIGHUP for `eventbus serve` and the agent; a bad file
    /// keeps the policy in force). `None` (default): the default policy
    /// ([`crate::acl::Policy::default_policy`]): control topics and events are the agent's and
    /// its supervised collectors'; other clients may read events and `$sys` and use topics of
    /// their own.
    pub acl_file: Option<PathBuf>,
    /// The audit trail: control requests and their answers, ACL denials, policy reloads,
    /// refused connections and the first connection of each identity, one SHA-256-chained
    /// JSON record per line, synced as written (`SECURITY.md`; check it with `eventbus audit
    /// verify`). `None` (default): no trail.
    pub audit_log: Option<PathBuf>,
    /// Size at which the audit trail moves to `audit_log.N` and starts a new file, the chain
    /// going on (default 16 MiB, at least 4 KiB).
    pub audit_max_bytes: u64,
    /// Bound of each queue (a connection's Realtime and Processed queues, an acknowledged
    /// subscription), in messages (default 1,000,000: the byte bound binds first).
    pub message_buffer_size: usize,
    /// Bound of each queue in charged bytes (default 256 MiB: a burst of a million 256-byte
    /// messages to subscribers slower than their publisher, one to one and one to four, on the
    /// 2-core machine of `docs/benchmarks.md`, with nothing dropped; queues that keep the same
    /// frame share one copy, charged once to `max_memory_bytes`).
    pub subscriber_buffer_bytes: usize,
    /// Broker-wide cap on queued message bytes and subscriptions (default 512 MiB).
    pub max_memory_bytes: usize,
    /// Filters one connection may hold (default 10,000); more are refused with
    /// `ResourceExhausted`.
    pub max_subscriptions_per_connection: usize,
    /// Subscribers one topic filter may have (connections holding it plainly or in a queue
    /// group, and acknowledged subscriptions; default 10,000; the seed's `max_subscribers`).
    /// One more is refused with `ResourceExhausted`, naming the filter.
    pub max_subscribers: usize,
    /// A connection silent for this long is closed (default 30 s).
    pub connection_timeout_secs: u64,
    /// Deadline for the client's handshake (default 5000 ms).
    pub handshake_timeout_ms: u64,
    /// How long the broker's start may take (default 30 s, the seed's): binding its
    /// endpoints and reading back the durable subscriptions kept in `data_dir` (about a
    /// second per GiB; a log another broker still holds is waited for). Past it the start
    /// fails with `BrokerError::StartupTimeout`.
    pub startup_timeout_seconds: u64,
    /// Keepalive interval announced to clients; the broker pings a silent client after it
    /// (default 10000 ms).
    pub keepalive_interval_ms: u64,
    /// Publish statistics on `$sys.broker.stats` (default true; the seed's
    /// `enable_metrics` is the same key).
    #[serde(alias = "enable_metrics")]
    pub enable_statistics: bool,
    /// Interval between `$sys.broker.stats` publications (default 30 s).
    pub stats_interval_secs: u64,
    /// Largest payload accepted, in bytes (default 1 MiB, at most 64 MiB).
    pub max_message_size: usize,
    /// Unix peers allowed to connect, by uid. Empty means the broker's own uid and root.
    pub allowed_uids: Vec<u32>,
    /// How long shutdown waits for sessions to drain (default 5000 ms).
    pub shutdown_timeout_ms: u64,
    /// How long a Processed subscription without room may hold its publishers back (default
    /// 10,000 ms). Then a durable subscription stalls (its publishers go on, its backlog
    /// keeps the newest under `durable_full_policy`), an acknowledged one is closed
    /// (SUB_END), and a connection's Processed queue (a client before protocol 1.3) closes
    /// its connection.
    pub processed_stall_timeout_ms: u64,
    /// An acknowledged delivery not acknowledged within this is sent again (default 30,000
    /// ms).
    pub ack_timeout_ms: u64,
    /// Deliveries an acknowledged subscription has unacknowledged at once, at most; a client
    /// may ask for fewer (default 4096).
    pub ack_window: usize,
    /// Durable subscriptions the broker keeps at most (default 1024).
    pub max_durables: usize,
    /// Messages one durable subscription keeps at most (default 100,000).
    pub durable_max_messages: usize,
    /// Charged bytes one durable subscription keeps at most (default 64 MiB: room for the
    /// default 100,000 messages up to about 500 bytes each).
    pub durable_max_bytes: usize,
    /// What a full durable subscription does with a new message while nobody is attached or
    /// its subscriber stalled: `drop_oldest` (default) or `drop_new`. Counted either way.
    pub durable_full_policy: DurableFullPolicy,
    /// Where durable subscriptions keep their messages and acknowledgements, so that they
    /// survive the broker process (`docs/storage.md`). `None` (default): in memory only, and
    /// they die with the process.
    pub data_dir: Option<PathBuf>,
    /// When what durable subscriptions keep is made durable on the disk (with `data_dir`):
    /// `always` (before the publisher's ACK: survives a power loss), `interval` (default:
    /// written before the ACK, so it survives a killed broker; on the disk every
    /// `fsync_interval_ms`), `never` (written before the ACK; the disk is left to the
    /// operating system).
    pub fsync: FsyncPolicy,
    /// `fsync = interval`: how often, in milliseconds (default 100).
    pub fsync_interval_ms: u64,
    /// Bytes the durable subscriptions' logs may take on disk together (default 1 GiB).
    /// Beyond, the oldest segment of the largest log is dropped, its messages counted as
    /// dropped by that subscription (reason backlog full) and reported to its subscriber.
    pub store_max_bytes: u64,
    /// Size of one log segment, the unit in which disk space is given back (default 64 MiB,
    /// at least 64 KiB; `store_max_bytes` must hold two).
    pub store_segment_bytes: u64,
}

/// TCP with mutual TLS (`BrokerConfig::tls`): every client must present a certificate that
/// chains to `client_ca`; its subject is the identity the ACL's `tls_subject` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListen {
    /// Where to listen, `HOST:PORT` (`[IPV6]:PORT`); any address, port 0 for any free port.
    pub listen: String,
    /// The broker's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The broker's private key, PEM.
    pub key: PathBuf,
    /// The CA certificates (PEM) its clients' certificates must chain to.
    pub client_ca: PathBuf,
}

impl TlsListen {
    /// The endpoint to listen on.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] if `listen` is not `HOST:PORT`.
    pub fn endpoint(&self) -> Result<daemoneye_eventbus_transport::Endpoint, ConfigError> {
        daemoneye_eventbus_transport::Endpoint::parse(&format!("tls://{}", self.listen)).map_err(
            |e| ConfigError {
                field: "tls.listen",
                value: self.listen.clone(),
                reason: e.to_string(),
            },
        )
    }

    /// The files, as the transport takes them.
    pub fn files(&self) -> daemoneye_eventbus_transport::tls::TlsFiles {
        daemoneye_eventbus_transport::tls::TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.client_ca.clone(),
        }
    }
}

/// When a durable subscription's log is made durable on the disk (`BrokerConfig::fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Before the publisher's ACK: an acknowledged message survives a power loss.
    Always,
    /// Every `fsync_interval_ms`: an acknowledged message survives a killed broker; a power
    /// loss can take the last interval's.
    #[default]
    Interval,
    /// Left to the operating system: an acknowledged message survives a killed broker.
    Never,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            socket_path: None,
            tls: None,
            socket_group: None,
            tcp_listen: None,
            max_connections: 64,
            max_connections_per_identity: 32,
            acl_file: None,
            audit_log: None,
            audit_max_bytes: 16 * 1024 * 1024,
            message_buffer_size: 1_000_000,
            subscriber_buffer_bytes: 256 * 1024 * 1024,
            max_memory_bytes: 512 * 1024 * 1024,
            max_subscriptions_per_connection: 10_000,
            max_subscribers: 10_000,
            connection_timeout_secs: 30,
            handshake_timeout_ms: 5000,
            startup_timeout_seconds: 30,
            keepalive_interval_ms: 10_000,
            enable_statistics: true,
            stats_interval_secs: 30,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            allowed_uids: Vec::new(),
            shutdown_timeout_ms: 5000,
            processed_stall_timeout_ms: 10_000,
            ack_timeout_ms: 30_000,
            ack_window: 4096,
            max_durables: 1024,
            durable_max_messages: 100_000,
            durable_max_bytes: 64 * 1024 * 1024,
            durable_full_policy: DurableFullPolicy::DropOldest,
            data_dir: None,
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 100,
            store_max_bytes: 1024 * 1024 * 1024,
            store_segment_bytes: 64 * 1024 * 1024,
        }
    }
}

/// A configuration value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker configuration: {field} = {value}: {reason}")]
pub struct ConfigError {
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// Why it is refused.
    pub reason: String,
}

fn check(
    ok: bool,
    field: &'static str,
    value: impl ToString,
    reason: String,
) -> Result<(), ConfigError> {
    if ok {
        return Ok(());
    }
    Err(ConfigError {
        field,
        value: value.to_string(),
        reason,
    })
}

impl BrokerConfig {
    /// Checks that the values can work together.
    ///
    /// # Errors
    ///
    /// A [`ConfigError`] naming the field and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = self.max_message_size;
        check(
            m > 0 && m <= MAX_MESSAGE_SIZE_LIMIT,
            "max_message_size",
            m,
            format!("must be between 1 and {MAX_MESSAGE_SIZE_LIMIT} bytes"),
        )?;
        check(
            self.max_subscribers > 0,
            "max_subscribers",
            self.max_subscribers,
            "must be at least 1".into(),
        )?;
        check(
            self.startup_timeout_seconds > 0,
            "startup_timeout_seconds",
            self.startup_timeout_seconds,
            "must be at least 1".into(),
        )?;
        check(
            self.max_connections > 0,
            "max_connections",
            self.max_connections,
            "must be at least 1".into(),
        )?;
        if let Some(tls) = &self.tls {
            tls.endpoint()?;
        }
        check(
            self.audit_max_bytes >= 4096,
            "audit_max_bytes",
            self.audit_max_bytes,
            "must be at least 4096".into(),
        )?;
        check(
            self.max_connections_per_identity > 0,
            "max_connections_per_identity",
            self.max_connections_per_identity,
            "must be at least 1".into(),
        )?;
        check(
            self.max_subscriptions_per_connection > 0,
            "max_subscriptions_per_connection",
            self.max_subscriptions_per_connection,
            "must be at least 1".into(),
        )?;
        check(
            self.message_buffer_size > 0,
            "message_buffer_size",
            self.message_buffer_size,
            "must be at least 1".into(),
        )?;
        let need = m + MESSAGE_OVERHEAD + 256;
        check(
            self.subscriber_buffer_bytes >= need,
            "subscriber_buffer_bytes",
            self.subscriber_buffer_bytes,
            format!("must hold one message of max_message_size ({need} bytes)"),
        )?;
        check(
            self.max_memory_bytes >= self.subscriber_buffer_bytes,
            "max_memory_bytes",
            self.max_memory_bytes,
            "must be at least subscriber_buffer_bytes".into(),
        )?;
        check(
            self.store_segment_bytes >= 64 * 1024,
            "store_segment_bytes",
            self.store_segment_bytes,
            "must be at least 65536".into(),
        )?;
        check(
            self.store_max_bytes >= 2 * self.store_segment_bytes,
            "store_max_bytes",
            self.store_max_bytes,
            "must hold two segments (2 × store_segment_bytes)".into(),
        )?;
        let need = m + MESSAGE_OVERHEAD + 256;
        check(
            self.durable_max_bytes >= need,
            "durable_max_bytes",
            self.durable_max_bytes,
            format!("must hold one message of max_message_size ({need} bytes)"),
        )?;
        for (field, v) in [
            ("ack_window", self.ack_window),
            ("max_durables", self.max_durables),
            ("durable_max_messages", self.durable_max_messages),
        ] {
            check(v > 0, field, v, "must be at least 1".into())?;
        }
        for (field, v) in [
            ("connection_timeout_secs", self.connection_timeout_secs),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("keepalive_interval_ms", self.keepalive_interval_ms),
            ("stats_interval_secs", self.stats_interval_secs),
            (
                "processed_stall_timeout_ms",
                self.processed_stall_timeout_ms,
            ),
            ("ack_timeout_ms", self.ack_timeout_ms),
            ("fsync_interval_ms", self.fsync_interval_ms),
        ] {
            check(v > 0, field, v, "must be greater than 0".into())?;
        }
        Ok(())
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub(crate) fn keepalive(&self) -> Duration {
        Duration::from_millis(self.keepalive_interval_ms)
    }
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.connection_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bound_queues_in_bytes_first() {
        let c = BrokerConfig::default();
        assert_eq!(c.max_connections, 64);
        // The seed's 1,000 messages dropped bursts that NATS and Mosquitto keep: bytes bind
        // first (a million 256-byte messages charge 320 MB, more than a queue's 256 MiB).
        assert!(c.message_buffer_size * (256 + 64) > c.subscriber_buffer_bytes);
        assert_eq!(c.subscriber_buffer_bytes, 256 << 20);
        assert_eq!(c.max_message_size, 1024 * 1024);
        assert_eq!(c.connection_timeout_secs, 30);
        assert_eq!(c.stats_interval_secs, 30);
        assert!(c.enable_statistics);
        c.validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_field() {
        let c = BrokerConfig {
            max_message_size: 65 * 1024 * 1024,
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "max_message_size");
        let c = BrokerConfig {
            subscriber_buffer_bytes: 10,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "subscriber_buffer_bytes");
    }
}
