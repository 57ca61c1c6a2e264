//! The daemoneye-eventbus broker, embedded in a process or run standalone (`eventbus serve`).
//!
//! - [`Broker`]: start on endpoints, read [`BrokerStats`], [`Broker::shutdown`].
//! - [`BrokerConfig`]: every bound and timeout, with the seed defaults.
//!
//! Inside: `session` serves one connection (handshake, read loop that routes, batched write
//! loop); `router` holds the subscription trie; `outbox` is the bounded per-connection queue
//! with the slow-reader policies and the broker-wide memory cap. See ARCHITECTURE.md.

mod broker;
mod config;
mod outbox;
mod router;
mod session;
mod stats;

pub use broker::{Broker, BrokerError, ShutdownReport};
pub use config::{BrokerConfig, ConfigError};
pub use outbox::MAX_QUEUED_CONTROL;
pub use stats::{BrokerStats, ConnectionStats};

/// Parses a `$sys.broker.stats` payload (JSON) into [`BrokerStats`].
///
/// # Errors
///
/// When the payload is not such a JSON document.
pub fn parse_stats(payload: &[u8]) -> Result<BrokerStats, serde_json::Error> {
    serde_json::from_slice(payload)
}
