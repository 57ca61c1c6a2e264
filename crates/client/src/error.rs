//! Client errors, one enum per operation.

use daemoneye_eventbus_core::TopicError;
use daemoneye_eventbus_core::codec::ErrorCode;
use daemoneye_eventbus_transport::TransportError;
use std::time::Duration;

/// Errors from [`crate::Client::connect`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The transport failed (no broker at that path, permission denied…).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The broker refused the connection.
    #[error("broker refused the connection ({code}): {message}")]
    Refused {
        /// Machine-readable reason.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
    },
    /// Connecting or the handshake took too long.
    #[error("no handshake answer from the broker within {0:?}")]
    Timeout(Duration),
    /// The client name cannot be sent.
    #[error("invalid client name {0:?}: it must be 1 to 255 bytes of printable text")]
    InvalidName(String),
    /// A TLS broker ended the connection after its handshake: it refused this client's
    /// certificate (TLS 1.3 tells the client only then).
    #[error(
        "the broker refused this client's TLS certificate ({0}); check that the certificate \
         (--tls-cert, EVENTBUS_TLS_CERT) chains to the broker's client CA and has not expired"
    )]
    TlsRefused(String),
    /// The broker broke the protocol during the handshake.
    #[error("handshake failed: {0}")]
    Protocol(String),
    /// The spool directory cannot be used (`ClientOptions::spool_dir`).
    #[error("cannot use the spool directory")]
    Spool(#[from] daemoneye_eventbus_store::StoreError),
}

/// Errors from publishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic is invalid.
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The payload is larger than the limit.
    #[error("message of {size} bytes exceeds max_message_size ({max} bytes)")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The correlation metadata exceeds a documented limit.
    #[error(transparent)]
    Correlation(#[from] daemoneye_eventbus_core::CorrelationError),
    /// `$sys` topics are published only by the broker.
    #[error("clients cannot publish to {0}: $sys is reserved for the broker")]
    Reserved(String),
    /// Disconnected and the outgoing queue is full: the message was not queued (counted as
    /// lost in the client statistics).
    #[error("broker unreachable and {queued} bytes already queued; message not sent")]
    Backlogged {
        /// Bytes waiting.
        queued: usize,
    },
    /// The client was closed.
    #[error("client is closed")]
    Closed,
    /// The broker is unreachable and the spool could not write the message
    /// (`ClientOptions::spool_dir`); it was not kept.
    #[error("broker unreachable and the spool could not keep the message")]
    Spool(#[source] daemoneye_eventbus_store::StoreError),
}

/// Errors from subscribe / unsubscribe.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// A filter is invalid.
    #[error(transparent)]
    Filter(#[from] TopicError),
    /// No filter was given.
    #[error("at least one topic filter is required")]
    NoFilters,
    /// A queue group name is invalid.
    #[error(transparent)]
    Group(#[from] daemoneye_eventbus_core::GroupError),
    /// The broker refused.
    #[error("broker refused the subscription ({code}): {message}")]
    Refused {
        /// Reason.
        code: ErrorCode,
        /// Explanation.
        message: String,
    },
    /// The filter is already subscribed on this connection in another way (plainly vs. in
    /// a queue group, or in another group).
    #[error("{0}; unsubscribe it first or use another connection")]
    Conflict(String),
    /// No acknowledgement before the deadline.
    #[error("no acknowledgement from the broker within {0:?}")]
    Timeout(Duration),
    /// The connection dropped before the acknowledgement.
    #[error("connection to the broker lost before the acknowledgement")]
    Disconnected,
    /// The client was closed.
    #[error("client is closed")]
    Closed,
}
