//! # daemoneye-eventbus-collector
//!
//! What a collector process links, and nothing of the broker: the typed collection events
//! and their protobuf form ([`ProcessEvent`], [`CollectionEvent`]), the collector services
//! over RPC with their retry policies ([`rpc`]), and, behind the `cli` feature, the
//! command-line arguments that name the broker (`cli`), and the tables collectors answer for
//! the agent's detection rules ([`tables`]). `procmond` and `netmond` are built
//! on it; the agent uses its caller side.

mod event;
pub mod netlink;
pub mod rpc;
pub mod services;
pub mod tables;

#[cfg(feature = "cli")]
pub mod cli;

pub use event::{CollectionEvent, EventDecodeError, ProcessEvent};
