//! The daemoneye-eventbus client.
//!
//! [`Client::connect`] opens a connection (`unix:///path`, `tcp://127.0.0.1:port`,
//! `inproc://name`); [`Client::publish`] queues messages that a driver task writes in batches;
//! [`Client::subscribe`] returns a [`Subscription`] once the broker acknowledged it. Lost
//! connections are re-established with exponential backoff and jitter, and every
//! subscription is restored; gaps are reported on each subscription as [`RecvError`], and
//! messages that could not be sent are counted in [`ClientStats::lost`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use daemoneye_eventbus_client::{Client, ClientOptions};
//! use daemoneye_eventbus_core::Topic;
//! use daemoneye_eventbus_transport::Endpoint;
//!
//! let endpoint = Endpoint::parse("unix:///tmp/daemoneye-1000/eventbus.sock")?;
//! let client = Client::connect(&endpoint, ClientOptions::named("demo")).await?;
//! let mut sub = client.subscribe(["events.process.+"]).await?;
//! client.publish(&Topic::new("events.process.lifecycle")?, "started").await?;
//! let msg = sub.recv().await?;
//! assert_eq!(msg.payload().as_ref(), b"started");
//! client.drain().await;
//! # Ok(()) }
//! ```

mod acked;
mod client;
mod driver;
mod error;
mod idmap;
pub mod metrics;
mod options;
mod outbuf;
mod queue;
mod rpc;
mod spool;
mod subscription;

pub use acked::{AckMode, AckReport, Delivery};
pub use client::{Client, ClientStats, ConnState, Publish, SubscribeOptions};
pub use daemoneye_eventbus_transport::tls::{ClientTls, TlsFiles};
pub use error::{ConnectError, PublishError, SubscribeError};
pub use metrics::{LatencyHistogram, OperationMetrics, RpcMetrics};
pub use options::{ClientOptions, ReconnectPolicy, SpoolFull};
pub use rpc::{Request, RpcError, RpcErrorKind, ServeOptions, Service, new_correlation_id};
pub use subscription::{MissedReason, RecvError, Subscription};
