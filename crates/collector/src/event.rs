//! Typed collection events and their protobuf encoding (`daemoneye.events.v1`).

use daemoneye_eventbus_core::{Topic, catalog};
use daemoneye_eventbus_schema::events as pb;
use prost::Message as _;
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A process observed by a collector (the seed's struct, unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEvent {
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub name: String,
    /// Full command line.
    pub command_line: Option<String>,
    /// Path of the executable.
    pub executable_path: Option<String>,
    /// Parent process id.
    pub ppid: Option<u32>,
    /// When the process started.
    pub start_time: Option<SystemTime>,
    /// Further attributes (uid, user, …).
    pub metadata: HashMap<String, String>,
}

/// An event published by a collector.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CollectionEvent {
    /// A process event, published on `events.process.lifecycle`.
    Process(ProcessEvent),
}

/// A payload that is not a valid `CollectionEvent` protobuf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("payload is not a daemoneye.events.v1.CollectionEvent: {0}")]
pub struct EventDecodeError(String);

fn to_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl From<&ProcessEvent> for pb::ProcessEvent {
    fn from(p: &ProcessEvent) -> Self {
        p.clone().into()
    }
}

impl From<ProcessEvent> for pb::ProcessEvent {
    fn from(p: ProcessEvent) -> Self {
        Self {
            pid: p.pid,
            name: p.name,
            command_line: p.command_line,
            executable_path: p.executable_path,
            ppid: p.ppid,
            start_time_ns: p.start_time.map(to_ns),
            metadata: p.metadata,
        }
    }
}

impl From<pb::ProcessEvent> for ProcessEvent {
    fn from(p: pb::ProcessEvent) -> Self {
        Self {
            pid: p.pid,
            name: p.name,
            command_line: p.command_line,
            executable_path: p.executable_path,
            ppid: p.ppid,
            start_time: p
                .start_time_ns
                .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns)),
            metadata: p.metadata,
        }
    }
}

impl CollectionEvent {
    /// The topic this event is published on.
    pub fn topic(&self) -> Topic {
        match self {
            Self::Process(_) => catalog::process::lifecycle(),
        }
    }

    /// Encodes the event as a `daemoneye.events.v1.CollectionEvent`.
    pub fn encode(&self) -> Vec<u8> {
        self.clone().into_encoded()
    }

    /// Encodes the event as [`CollectionEvent::encode`] does, without copying it first.
    pub fn into_encoded(self) -> Vec<u8> {
        let event = match self {
            Self::Process(p) => pb::collection_event::Event::Process(p.into()),
        };
        pb::CollectionEvent { event: Some(event) }.encode_to_vec()
    }

    /// Decodes a `daemoneye.events.v1.CollectionEvent` (unknown fields are ignored).
    ///
    /// # Errors
    ///
    /// [`EventDecodeError`] when the bytes are not such a message or carry no event.
    pub fn decode(bytes: &[u8]) -> Result<Self, EventDecodeError> {
        let env =
            pb::CollectionEvent::decode(bytes).map_err(|e| EventDecodeError(e.to_string()))?;
        match env.event {
            Some(pb::collection_event::Event::Process(p)) => Ok(Self::Process(p.into())),
            None => Err(EventDecodeError("no event set".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_event_round_trips_with_metadata() {
        let mut metadata = HashMap::new();
        metadata.insert("uid".to_string(), "1000".to_string());
        let e = CollectionEvent::Process(ProcessEvent {
            pid: 42,
            name: "sleep".into(),
            command_line: Some("sleep 5".into()),
            executable_path: None,
            ppid: Some(1),
            start_time: Some(UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789)),
            metadata,
        });
        assert_eq!(CollectionEvent::decode(&e.encode()).unwrap(), e);
        // Each field where the schema has it.
        let CollectionEvent::Process(p) = &e;
        let wire = pb::ProcessEvent::from(p);
        assert_eq!(
            (wire.pid, wire.name.as_str(), wire.ppid),
            (42, "sleep", Some(1))
        );
        assert_eq!(wire.command_line.as_deref(), Some("sleep 5"));
        assert_eq!(wire.start_time_ns, Some(1_700_000_000_123_456_789));
        assert_eq!(wire.metadata["uid"], "1000");
        assert_eq!(e.clone().into_encoded(), e.encode());
        assert!(CollectionEvent::decode(b"\xff\xff").is_err());
    }
}
