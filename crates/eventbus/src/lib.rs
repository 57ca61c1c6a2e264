//! # daemoneye-eventbus
//!
//! An embedded, cross-platform IPC event bus for a host security agent: the agent embeds the
//! [`Broker`]; collectors in other processes connect over a Unix socket (named pipe on
//! Windows, loopback TCP for tests), publish events on dotted topics with `+` / `#`
//! wildcards, and subscribe. See ARCHITECTURE.md for the design and `docs/` for the
//! normative protocol and topic rules.
//!
//! Crates, from the pure core outwards:
//!
//! | module | crate | what |
//! |---|---|---|
//! | [`core`] | `daemoneye-eventbus-core` | topics, trie, messages, frame codec (no I/O) |
//! | [`transport`] | `daemoneye-eventbus-transport` | Unix, TCP, in-process, named pipes |
//! | [`broker`] | `daemoneye-eventbus-broker` | the broker |
//! | [`client`] | `daemoneye-eventbus-client` | the client |
//! | [`schema`] | `daemoneye-eventbus-schema` | protobuf schemas |
//! | [`collector`] | `daemoneye-eventbus-collector` | typed events, collector services over RPC ([`rpc`]), retry policies |
//!
//! ## Basic usage (the seed example, unchanged)
//!
//! ```rust
//! use daemoneye_eventbus::{
//!     CollectionEvent, DaemoneyeBroker, DaemoneyeEventBus, EventBus, ProcessEvent,
//! };
//! use std::collections::HashMap;
//! use std::time::SystemTime;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Start embedded broker
//!     let broker = DaemoneyeBroker::new("/tmp/daemoneye.sock").await?;
//!     let mut event_bus = DaemoneyeEventBus::from_broker(broker).await?;
//!
//!     // Create a process event
//!     let process_event = ProcessEvent {
//!         pid: 1234,
//!         name: "example_process".to_string(),
//!         command_line: Some("example_process --arg".to_string()),
//!         executable_path: Some("/usr/bin/example_process".to_string()),
//!         ppid: Some(1000),
//!         start_time: Some(SystemTime::now()),
//!         metadata: HashMap::new(),
//!     };
//!
//!     // Publish the event - returns Result and uses ? operator for error propagation
//!     event_bus
//!         .publish(
//!             CollectionEvent::Process(process_event),
//!             "correlation-123".to_string(),
//!         )
//!         .await?;
//!
//!     Ok(())
//! }
//! ```

mod bus;
pub mod supervisor;

pub use bus::{
    BusEvent, DaemoneyeBroker, DaemoneyeEventBus, EVENT_CHANNEL_CAPACITY, EventBus, EventBusError,
    EventBusStatistics, EventSubscription,
};
pub use daemoneye_eventbus_collector::{CollectionEvent, EventDecodeError, ProcessEvent, rpc};

pub use daemoneye_eventbus_broker as broker;
pub use daemoneye_eventbus_client as client;
pub use daemoneye_eventbus_collector as collector;
pub use daemoneye_eventbus_core as core;
pub use daemoneye_eventbus_schema as schema;
pub use daemoneye_eventbus_transport as transport;

pub use daemoneye_eventbus_broker::{Broker, BrokerConfig, BrokerStats};
pub use daemoneye_eventbus_client::{Client, ClientOptions, Publish, RecvError, Subscription};
pub use daemoneye_eventbus_core::{
    CorrelationMetadata, Message, MessageId, Qos, Topic, TopicFilter, catalog,
};
pub use daemoneye_eventbus_transport::Endpoint;
