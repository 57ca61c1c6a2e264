//! The seed topic catalogue (`docs/topics.md`) as typed constants and builders.
//!
//! Constants are [`Topic`]s built without allocation; builders validate the caller's segment.

use crate::topic::{Topic, TopicError, TopicFilter};

macro_rules! topics {
    ($( $(#[$doc:meta])* $name:ident = $value:literal; )*) => {
        $( $(#[$doc])* pub fn $name() -> Topic { Topic::from_static($value) } )*

        /// Every constant of this module, for validation and listing.
        pub fn all() -> Vec<Topic> {
            vec![$( $name() ),*]
        }
    };
}

/// Process events (`events.process.*`), published by `procmond`.
pub mod process {
    use super::*;
    topics! {
        /// Process start and exit.
        lifecycle = "events.process.lifecycle";
        /// Process metadata updates.
        metadata = "events.process.metadata";
        /// Process tree relationships.
        tree = "events.process.tree";
        /// Executable integrity (hashes).
        integrity = "events.process.integrity";
        /// Process anomalies.
        anomaly = "events.process.anomaly";
        /// Periodic process snapshots.
        batch = "events.process.batch";
    }
}

/// Network events (`events.network.*`).
pub mod network {
    use super::*;
    topics! {
        /// Connection events: a socket opened or closed.
        connections = "events.network.connections";
        /// Periodic socket snapshots.
        batch = "events.network.batch";
        /// Traffic analysis.
        traffic = "events.network.traffic";
        /// DNS queries.
        dns = "events.network.dns";
        /// Network anomalies.
        anomaly = "events.network.anomaly";
    }
}

/// Filesystem events (`events.filesystem.*`).
pub mod filesystem {
    use super::*;
    topics! {
        /// File operations.
        operations = "events.filesystem.operations";
        /// Access patterns.
        access = "events.filesystem.access";
        /// Metadata changes.
        metadata = "events.filesystem.metadata";
        /// Filesystem anomalies.
        anomaly = "events.filesystem.anomaly";
    }
}

/// Performance events (`events.performance.*`).
pub mod performance {
    use super::*;
    topics! {
        /// System metrics.
        metrics = "events.performance.metrics";
        /// Resource utilisation.
        resources = "events.performance.resources";
        /// Threshold violations.
        thresholds = "events.performance.thresholds";
        /// Performance anomalies.
        anomaly = "events.performance.anomaly";
    }
}

/// Alerts raised by the agent's detection rules (`events.alert.<severity>`).
pub mod alert {
    use super::*;
    topics! {
        /// Low severity.
        low = "events.alert.low";
        /// Medium severity.
        medium = "events.alert.medium";
        /// High severity.
        high = "events.alert.high";
        /// Critical severity.
        critical = "events.alert.critical";
    }
}

/// Collector control (`control.collector.*`).
pub mod collector {
    use super::*;
    topics! {
        /// Start / stop / restart commands.
        lifecycle = "control.collector.lifecycle";
        /// Configuration updates.
        config = "control.collector.config";
        /// Task distribution.
        task = "control.collector.task";
    }

    /// `control.collector.<collector_id>`: the RPC address of one collector.
    ///
    /// # Errors
    ///
    /// When `collector_id` is not a valid segment.
    pub fn addressed(collector_id: &str) -> Result<Topic, TopicError> {
        Topic::from_static("control.collector").child(collector_id)
    }

    /// `control.collector.task.<collector_id>`: where one collector takes collection tasks.
    ///
    /// # Errors
    ///
    /// When `collector_id` is not a valid segment.
    pub fn tasks_of(collector_id: &str) -> Result<Topic, TopicError> {
        task().child(collector_id)
    }
}

/// Health (`control.health.*`).
pub mod health {
    use super::*;
    topics! {
        /// Heartbeats (collectors publish on `control.health.heartbeat.<id>`).
        heartbeat = "control.health.heartbeat";
        /// Status reports.
        status = "control.health.status";
        /// Diagnostics.
        diagnostics = "control.health.diagnostics";
    }

    /// `control.health.heartbeat.<collector_id>`.
    ///
    /// # Errors
    ///
    /// When `collector_id` is not a valid segment.
    pub fn heartbeat_of(collector_id: &str) -> Result<Topic, TopicError> {
        heartbeat().child(collector_id)
    }
}

/// Agent coordination (`control.agent.*`).
pub mod agent {
    use super::*;
    topics! {
        /// Detection task distribution.
        tasks = "control.agent.tasks";
        /// Multi-collector coordination.
        coordination = "control.agent.coordination";
        /// Agent status.
        status = "control.agent.status";
        /// Lifecycle requests for the agent's supervisor (start, stop, restart, status of a
        /// collector; the agent's health check).
        lifecycle = "control.agent.lifecycle";
        /// Graceful shutdown coordination.
        shutdown = "control.agent.shutdown";
        /// Ad-hoc queries (`eventbus query`): a SELECT answered through collection tasks.
        query = "control.agent.query";
    }
}

/// Broker administration (`control.broker.*`).
pub mod broker {
    use super::*;
    topics! {
        /// Broker statistics requests.
        stats = "control.broker.stats";
        /// Administrative commands.
        admin = "control.broker.admin";
        /// Diagnostics.
        diagnostics = "control.broker.diagnostics";
    }
}

/// Topics published only by the broker (`$sys.*`); not matched by a leading wildcard.
pub mod sys {
    use super::*;
    topics! {
        /// Broker statistics (JSON), published every `stats_interval_secs` and to each new
        /// subscriber at once.
        stats = "$sys.broker.stats";
        /// A client connected (JSON).
        client_connected = "$sys.broker.clients.connected";
        /// A client disconnected (JSON).
        client_disconnected = "$sys.broker.clients.disconnected";
        /// Never published: in a drop notice and in statistics, the entry under this topic
        /// sums the drops of every topic not listed one by one (the per-topic counts are
        /// bounded, so a stalled reader of many topics costs bounded memory).
        dropped_other = "$sys.broker.dropped.other";
    }
}

/// `_inbox.<client>`: the parent of the reply-to topics of one client's requests
/// (`_inbox.<client>.<call number>`).
///
/// # Errors
///
/// When `client` is not a valid segment.
pub fn inbox(client: &str) -> Result<Topic, TopicError> {
    Topic::new(format!("{}.{client}", crate::topic::INBOX_ROOT))
}

/// `_inbox.<client>.+`: the one filter under which a client receives its RPC replies.
///
/// # Errors
///
/// When `client` is not a valid segment.
pub fn inbox_filter(client: &str) -> Result<TopicFilter, TopicError> {
    TopicFilter::new(format!("{}.{client}.+", crate::topic::INBOX_ROOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_constant_is_valid() {
        let groups = [
            process::all(),
            network::all(),
            alert::all(),
            filesystem::all(),
            performance::all(),
            collector::all(),
            health::all(),
            agent::all(),
            broker::all(),
            sys::all(),
        ];
        for t in groups.iter().flatten() {
            assert_eq!(Topic::new(t.as_str()).as_ref(), Ok(t));
        }
        assert_eq!(
            health::heartbeat_of("procmond").unwrap().as_str(),
            "control.health.heartbeat.procmond"
        );
        assert!(collector::addressed("Bad").is_err());
        assert_eq!(inbox("c1").unwrap().as_str(), "_inbox.c1");
        assert_eq!(inbox_filter("c1").unwrap().as_str(), "_inbox.c1.+");
    }
}
