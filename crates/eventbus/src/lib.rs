//! daemoneye-eventbus facade (being assembled).
pub use daemoneye_eventbus_broker as broker;
pub use daemoneye_eventbus_client as client;
pub use daemoneye_eventbus_core as core;
pub use daemoneye_eventbus_transport as transport;
