//! The daemoneye-eventbus broker, embedded in a process or run standalone (`eventbus serve`).
//!
//! - [`Broker`]: start on endpoints, read [`BrokerStats`], [`Broker::shutdown`].
//! - [`BrokerConfig`]: every bound and timeout, with the seed defaults.
//!
//! Inside, in three layers (ARCHITECTURE.md §3):
//!
//! - `session`: a connection's state machine (`session/core.rs`: frames and time in, steps
//!   out, no I/O) and its shell (the read loop that carries out the steps, the writer task
//!   that only moves frames);
//! - `router`: filters → connections, answering a plan of who gets a message, never touching
//!   a queue; `hub` applies plans to the queues and holds what every session shares;
//! - `delivery`: the bounded queues, one per kind of subscription, each owning its QoS
//!   policy, and the broker-wide memory cap.
//!
//! `conn` is what the broker records about one connection; `broker` the public handle, the
//! accept loops and the one shutdown path; `durable` the durable subscriptions kept in the
//! data directory (their definitions, and their logs through `daemoneye-eventbus-store`).

pub mod acl;
pub mod audit;
mod broker;
mod config;
mod conn;
mod delivery;
mod durable;
mod hub;
mod router;
mod session;
mod stats;

pub use broker::{Broker, BrokerError, ShutdownReport};
pub use config::{BrokerConfig, ConfigError, FsyncPolicy, TlsListen};
pub use delivery::{DROP_TOPICS, DropCause, DurableFullPolicy, MAX_QUEUED_CONTROL};
pub use hub::SUBSCRIPTION_CHARGE;
pub use stats::{BrokerStats, ConnectionStats, SubscriptionStats};

/// Parses a `$sys.broker.stats` payload (JSON) into [`BrokerStats`].
///
/// # Errors
///
/// When the payload is not such a JSON document.
pub fn parse_stats(payload: &[u8]) -> Result<BrokerStats, serde_json::Error> {
    serde_json::from_slice(payload)
}
