//! Client options and the reconnect backoff (a pure function, tested without a clock).

use daemoneye_eventbus_core::codec::{DEFAULT_MAX_MESSAGE_SIZE, SlowReaderPolicy};
use daemoneye_eventbus_transport::tls::ClientTls;
use std::time::Duration;

/// How the client reconnects after losing its broker.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// Reconnect at all (default true).
    pub enabled: bool,
    /// First delay (default 50 ms).
    pub initial_delay: Duration,
    /// Largest delay (default 5 s).
    pub max_delay: Duration,
    /// Growth factor per attempt (default 2).
    pub multiplier: f64,
    /// Relative jitter in `[0, 1)`: each delay is scaled by a random factor in
    /// `[1 - jitter, 1 + jitter]` (default 0.2).
    pub jitter: f64,
    /// Give up after this many consecutive failed attempts (`None`: never).
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// Delay before attempt `attempt` (0-based) given a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let multiplier = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        let exp = multiplier.powi(i32::try_from(attempt.min(64)).unwrap_or(64));
        let base = (self.initial_delay.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 0.99)
        } else {
            0.0
        };
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let scale = 1.0 - jitter + 2.0 * jitter * unit;
        Duration::try_from_secs_f64(base * scale).unwrap_or(self.max_delay)
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name sent in the handshake; the `source` of every message published (default
    /// `eventbus-client`).
    pub name: String,
    /// Keepalive interval: a ping is sent after this long without writing, and the broker is
    /// considered gone after three intervals without hearing from it (default 10 s).
    pub keepalive: Duration,
    /// Deadline for connecting and the handshake (default 5 s).
    pub connect_timeout: Duration,
    /// Deadline for a subscribe / unsubscribe acknowledgement (default 10 s).
    pub request_timeout: Duration,
    /// Reconnect behaviour.
    pub reconnect: ReconnectPolicy,
    /// Bound of the outgoing queue in bytes while disconnected (default 8 MiB): what is kept
    /// for the reconnection. When full, publishers are refused (counted as lost).
    pub outbox_bytes: usize,
    /// Bound of the outgoing queue in bytes while connected (default 256 KiB; at most
    /// `outbox_bytes`). When full, publishers wait for the writer to take the queue. The
    /// writer keeps the socket busy with batches this large; a deeper queue would only add
    /// latency and memory (a publisher ahead of the broker would fill it and write from
    /// memory it has never touched).
    pub connected_outbox_bytes: usize,
    /// Bound of each subscription's queue, in messages (default 4096). When full, the
    /// connection stops reading until the application catches up, so the broker's slow-reader
    /// policy applies. The application takes queued messages in batches, so a subscription
    /// holds at most twice this many (the queue and the batch being read). A Processed
    /// subscription asks the broker for a window of unacknowledged deliveries no larger than
    /// this.
    pub subscription_buffer: usize,
    /// Calls allowed to wait for a reply at once (default 1000, the seed's
    /// `max_pending_requests`); a further call fails at once with `Busy`.
    pub max_pending_requests: usize,
    /// What the broker does when this client reads too slowly.
    pub slow_reader: SlowReaderPolicy,
    /// Largest payload this client publishes (the broker's limit applies too). Incoming
    /// messages are bounded by the broker's limit, at most 64 MiB.
    pub max_message_size: usize,
    /// Charged bytes of Processed publishes kept until the broker acknowledges them (default
    /// 8 MiB; protocol 1.3). When full, a Processed publish waits for acknowledgements while
    /// connected, and is refused (`PublishError::Backlogged`, counted lost) while not.
    pub unacked_bytes: usize,
    /// Message ids each Processed subscription remembers to recognise duplicates (default
    /// 4096; 0 remembers none).
    pub dedup_window: usize,
    /// Store-and-forward: a directory where Processed publishes made while the broker is
    /// unreachable are kept on disk (made private if missing), to be sent in order when it is
    /// back, and by the next client on this directory if this process ends first, with the
    /// same message ids (the clients on one spool share its publisher id). One client at a
    /// time uses a spool. `None` (default): they wait in memory, within `unacked_bytes` and
    /// `outbox_bytes`.
    pub spool_dir: Option<std::path::PathBuf>,
    /// Charged bytes the spool holds at most (default 64 MiB).
    pub spool_max_bytes: usize,
    /// What a Processed publish finds a full spool does (default [`SpoolFull::Refuse`]).
    pub spool_full: SpoolFull,
    /// The certificate, key and CA for a `tls://` endpoint ([`ClientTls::load`]); ignored by
    /// other endpoints. `None` (default): a `tls://` endpoint is refused.
    pub tls: Option<ClientTls>,
}

/// What a publish made while the broker is unreachable does when the spool is full
/// ([`ClientOptions::spool_full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpoolFull {
    /// It is refused: `PublishError::Backlogged`, counted in `ClientStats::lost` (default).
    #[default]
    Refuse,
    /// The oldest spooled publish is dropped to make room, counted in `ClientStats::lost`.
    DropOldest,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            name: "eventbus-client".into(),
            keepalive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            outbox_bytes: 8 * 1024 * 1024,
            connected_outbox_bytes: 256 * 1024,
            subscription_buffer: 4096,
            max_pending_requests: 1000,
            slow_reader: SlowReaderPolicy::DropOldest,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            unacked_bytes: 8 * 1024 * 1024,
            dedup_window: 4096,
            spool_dir: None,
            spool_max_bytes: 64 * 1024 * 1024,
            spool_full: SpoolFull::Refuse,
            tls: None,
        }
    }
}

impl ClientOptions {
    /// Default options with this client name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let p = ReconnectPolicy::default();
        assert_eq!(p.delay(0, 0.5), Duration::from_millis(50));
        assert_eq!(p.delay(1, 0.5), Duration::from_millis(100));
        assert_eq!(p.delay(30, 0.5), Duration::from_secs(5));
        assert!(p.delay(2, 0.0) < p.delay(2, 0.5));
        assert!(p.delay(2, 0.99) > p.delay(2, 0.5));
        let odd = ReconnectPolicy {
            multiplier: f64::NAN,
            jitter: -1.0,
            ..ReconnectPolicy::default()
        };
        assert_eq!(
            odd.delay(5, f64::NAN),
            Duration::from_millis(50),
            "odd settings never panic"
        );
        let lo = p.delay(3, 0.0).as_secs_f64();
        assert!((lo - 0.4 * 0.8).abs() < 1e-9);
    }
}
