//! The frame types of protocol v1.

use crate::group::{DurableName, QueueGroup};
use crate::message::{Message, MessageId, Qos};
use crate::topic::{Topic, TopicFilter};

use super::{PROTOCOL_MAJOR, PROTOCOL_MINOR};

/// A protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major version; a different major is incompatible.
    pub major: u16,
    /// Minor version; minors are backward compatible.
    pub minor: u16,
}

impl Version {
    /// The version this crate speaks.
    pub const CURRENT: Self = Self {
        major: PROTOCOL_MAJOR,
        minor: PROTOCOL_MINOR,
    };
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What the broker does when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowReaderPolicy {
    /// Drop the oldest queued messages, count them and tell the subscriber (default).
    #[default]
    DropOldest,
    /// Close the connection with a `SlowReader` error.
    Disconnect,
}

/// First frame from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Version the client speaks.
    pub version: Version,
    /// Capability bits (none defined in 1.0; reserved).
    pub capabilities: u32,
    /// Largest payload the client accepts.
    pub max_message_size: u32,
    /// Keepalive interval the client uses, milliseconds.
    pub keepalive_ms: u32,
    /// What the broker does when this connection reads too slowly.
    pub slow_reader: SlowReaderPolicy,
    /// Client name (≤ [`MAX_NAME_LEN`](super::MAX_NAME_LEN) bytes), used as the `source` of its messages.
    pub client_name: String,
}

/// The broker's answer to a successful [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Version the broker speaks.
    pub version: Version,
    /// Broker-assigned session id (identifies the connection in statistics and logs).
    pub session_id: u64,
    /// Capability bits (reserved).
    pub capabilities: u32,
    /// Largest payload the broker accepts.
    pub max_message_size: u32,
    /// Keepalive interval the broker expects, milliseconds.
    pub keepalive_ms: u32,
    /// Broker name and version.
    pub broker: String,
}

/// Subscribe request, acknowledged by a [`Reply`] with the same request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Correlates the [`Reply`].
    pub request_id: u32,
    /// Requested delivery guarantee.
    pub qos: Qos,
    /// The filter.
    pub filter: TopicFilter,
    /// The queue group this subscription joins, if any: each message matching the group's
    /// subscriptions goes to one of its members only (protocol 1.1).
    pub group: Option<QueueGroup>,
}

/// Unsubscribe request, acknowledged by a [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Correlates the [`Reply`].
    pub request_id: u32,
    /// The filter to remove.
    pub filter: TopicFilter,
}

/// Answer to a request frame (subscribe, unsubscribe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The request this answers.
    pub request_id: u32,
    /// `None` on success.
    pub error: Option<ErrorCode>,
    /// Human-readable detail (empty on success).
    pub message: String,
}

/// Error codes carried by [`ErrorFrame`], [`Reply`] and [`Nack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer broke the protocol (bad frame, wrong frame at this point).
    Protocol,
    /// A frame exceeded the receiver's frame limit.
    FrameTooLarge,
    /// A payload exceeded `max_message_size`.
    MessageTooLarge,
    /// A topic was invalid.
    InvalidTopic,
    /// A filter was invalid.
    InvalidFilter,
    /// The protocol major version is not supported.
    UnsupportedVersion,
    /// The broker is at `max_connections`.
    ConnectionLimit,
    /// No handshake arrived before the deadline.
    HandshakeTimeout,
    /// The peer is not allowed to do this.
    NotAuthorized,
    /// Clients may not publish under `$sys`.
    ReservedTopic,
    /// Nothing was heard from the peer for too long.
    KeepaliveTimeout,
    /// The connection read too slowly and its policy is to disconnect.
    SlowReader,
    /// The broker is shutting down.
    ShuttingDown,
    /// The broker's memory cap or another resource is exhausted.
    ResourceExhausted,
    /// No subscriber or responder for a topic.
    NoResponders,
    /// A queue group name was invalid (protocol 1.1).
    InvalidGroup,
    /// The connection already holds the filter another way: plainly, or in another queue
    /// group (protocol 1.1); or a durable subscription exists with other filters (1.3).
    SubscriptionConflict,
    /// A durable subscription name was invalid (protocol 1.3).
    InvalidName,
    /// The durable subscription is attached to another connection (protocol 1.3).
    DurableInUse,
    /// No such subscription (protocol 1.3).
    UnknownSubscription,
    /// The subscription stopped acknowledging and was closed or parked (protocol 1.3).
    Stalled,
    /// The broker's disk store could not keep it (protocol 1.4).
    StoreFailed,
    /// The broker's disk is full: Processed publishes that durable subscriptions would keep
    /// are refused until there is room (protocol 1.4).
    StoreFull,
    /// A code this version does not know.
    Other(u16),
}

impl ErrorCode {
    /// The code's wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::Protocol => 1,
            Self::FrameTooLarge => 2,
            Self::MessageTooLarge => 3,
            Self::InvalidTopic => 4,
            Self::InvalidFilter => 5,
            Self::UnsupportedVersion => 6,
            Self::ConnectionLimit => 7,
            Self::HandshakeTimeout => 8,
            Self::NotAuthorized => 9,
            Self::ReservedTopic => 10,
            Self::KeepaliveTimeout => 11,
            Self::SlowReader => 12,
            Self::ShuttingDown => 13,
            Self::ResourceExhausted => 14,
            Self::NoResponders => 15,
            Self::InvalidGroup => 16,
            Self::SubscriptionConflict => 17,
            Self::InvalidName => 18,
            Self::DurableInUse => 19,
            Self::UnknownSubscription => 20,
            Self::Stalled => 21,
            Self::StoreFailed => 22,
            Self::StoreFull => 23,
            Self::Other(c) => c,
        }
    }

    /// Decodes a wire value (0 is "no error" and is handled by callers).
    pub fn from_u16(v: u16) -> Self {
        const ALL: [ErrorCode; 23] = [
            ErrorCode::Protocol,
            ErrorCode::FrameTooLarge,
            ErrorCode::MessageTooLarge,
            ErrorCode::InvalidTopic,
            ErrorCode::InvalidFilter,
            ErrorCode::UnsupportedVersion,
            ErrorCode::ConnectionLimit,
            ErrorCode::HandshakeTimeout,
            ErrorCode::NotAuthorized,
            ErrorCode::ReservedTopic,
            ErrorCode::KeepaliveTimeout,
            ErrorCode::SlowReader,
            ErrorCode::ShuttingDown,
            ErrorCode::ResourceExhausted,
            ErrorCode::NoResponders,
            ErrorCode::InvalidGroup,
            ErrorCode::SubscriptionConflict,
            ErrorCode::InvalidName,
            ErrorCode::DurableInUse,
            ErrorCode::UnknownSubscription,
            ErrorCode::Stalled,
            ErrorCode::StoreFailed,
            ErrorCode::StoreFull,
        ];
        ALL.into_iter()
            .find(|c| c.to_u16() == v)
            .unwrap_or(Self::Other(v))
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Protocol => "protocol violation",
            Self::FrameTooLarge => "frame too large",
            Self::MessageTooLarge => "message too large",
            Self::InvalidTopic => "invalid topic",
            Self::InvalidFilter => "invalid filter",
            Self::UnsupportedVersion => "unsupported protocol version",
            Self::ConnectionLimit => "connection limit reached",
            Self::HandshakeTimeout => "handshake timeout",
            Self::NotAuthorized => "not authorized",
            Self::ReservedTopic => "reserved topic",
            Self::KeepaliveTimeout => "keepalive timeout",
            Self::SlowReader => "slow reader",
            Self::ShuttingDown => "shutting down",
            Self::ResourceExhausted => "resource exhausted",
            Self::NoResponders => "no responders",
            Self::InvalidGroup => "invalid queue group",
            Self::SubscriptionConflict => "subscription conflict",
            Self::InvalidName => "invalid durable subscription name",
            Self::DurableInUse => "durable subscription in use",
            Self::UnknownSubscription => "unknown subscription",
            Self::Stalled => "subscription stalled",
            Self::StoreFailed => "disk store failed",
            Self::StoreFull => "disk store full",
            Self::Other(c) => return write!(f, "error code {c}"),
        };
        f.write_str(s)
    }
}

/// Negative acknowledgement of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The message refused.
    pub id: MessageId,
    /// Why.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub reason: String,
}

/// An error report. When `fatal`, the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Request the error answers, or 0.
    pub request_id: u32,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Whether the connection is being closed.
    pub fatal: bool,
    /// A sentence a user can act on.
    pub message: String,
}

/// Why messages were dropped for a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// The connection's queue was full (messages or bytes).
    SlowReader,
    /// The broker-wide memory cap was reached.
    MemoryCap,
    /// A durable subscription's backlog was full while nobody was attached or its subscriber
    /// had stalled (protocol 1.3).
    BacklogFull,
    /// A reason this version does not know.
    Other(u8),
}

impl DropReason {
    /// Its wire value (NOTICE `reason`).
    pub fn to_u8(self) -> u8 {
        match self {
            Self::SlowReader => 1,
            Self::MemoryCap => 2,
            Self::BacklogFull => 3,
            Self::Other(v) => v,
        }
    }
    /// Reads a wire value (unknown ones are kept as [`DropReason::Other`]).
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SlowReader,
            2 => Self::MemoryCap,
            3 => Self::BacklogFull,
            v => Self::Other(v),
        }
    }
}

/// In-band status from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notice {
    /// Messages for this connection were dropped; counts per topic since the last notice.
    Dropped {
        /// Why.
        reason: DropReason,
        /// (topic, count) pairs.
        topics: Vec<(Topic, u64)>,
    },
    /// Messages kept for one acknowledged subscription were dropped (its full policy, or the
    /// memory cap); counts per topic since the last such notice (protocol 1.3).
    SubDropped {
        /// The subscription.
        sub: SubId,
        /// Why.
        reason: DropReason,
        /// (topic, count) pairs.
        topics: Vec<(Topic, u64)>,
    },
}

/// The sender is going away; the receiver should finish what it is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoingAway {
    /// How long the sender keeps draining, milliseconds.
    pub drain_ms: u32,
    /// Why.
    pub reason: String,
}

/// A message the broker gives to this connection as the chosen member of a queue group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupDelivery {
    /// The group the connection was chosen in.
    pub group: QueueGroup,
    /// The message.
    pub message: Message,
}

/// The id a client gives one of its acknowledged subscriptions on a connection (protocol
/// 1.3): the broker tags each delivery with it, and acknowledgements name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubId(pub u32);

impl std::fmt::Display for SubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Opens an acknowledged subscription (protocol 1.3): Processed deliveries that the client
/// acknowledges, redelivered when it does not. Answered by a [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeAcked {
    /// Correlates the [`Reply`].
    pub request_id: u32,
    /// The id deliveries will carry (unique among this connection's open acknowledged
    /// subscriptions).
    pub sub: SubId,
    /// A durable subscription's name: it outlives the connection; attaching to an existing
    /// one resumes it.
    pub durable: Option<DurableName>,
    /// Deliveries the client accepts unacknowledged at once; 0 lets the broker choose.
    pub window: u32,
    /// The filters (1 to 255).
    pub filters: Vec<TopicFilter>,
}

/// A delivery of an acknowledged subscription (protocol 1.3).
#[derive(Debug, Clone, PartialEq)]
pub struct AckedDelivery {
    /// The subscription.
    pub sub: SubId,
    /// The delivery's sequence number in the subscription, increasing; a redelivery gets a
    /// new one.
    pub seq: u64,
    /// How many times this message was delivered before (0 the first time).
    pub redelivered: u16,
    /// The message.
    pub message: Message,
}

/// Deliveries of an acknowledged subscription in one run (protocol 1.4): the run's messages
/// are numbered `seq`, `seq + 1`, ….
#[derive(Debug, Clone, PartialEq)]
pub struct AckedRun {
    /// The subscription, the first message's sequence number, the redelivery count of all.
    pub head: super::AckedHead,
    /// The messages.
    pub run: super::MessageRun,
}

/// Acknowledges deliveries of an acknowledged subscription (protocol 1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// The subscription.
    pub sub: SubId,
    /// Inclusive ranges of delivery sequence numbers.
    pub ranges: Vec<(u64, u64)>,
}

/// Closes one of this connection's acknowledged subscriptions (protocol 1.3); answered by a
/// [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubClose {
    /// Correlates the [`Reply`].
    pub request_id: u32,
    /// The subscription.
    pub sub: SubId,
    /// For a durable subscription: delete it (its backlog too) instead of detaching.
    pub delete: bool,
}

/// Deletes a durable subscription that no connection holds (protocol 1.3); answered by a
/// [`Reply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurableDelete {
    /// Correlates the [`Reply`].
    pub request_id: u32,
    /// The durable subscription.
    pub name: DurableName,
}

/// The broker ended one of this connection's acknowledged subscriptions (protocol 1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubEnd {
    /// The subscription.
    pub sub: SubId,
    /// Why, as a code.
    pub code: ErrorCode,
    /// A sentence a user can act on.
    pub message: String,
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Frame {
    /// Client handshake.
    Hello(Hello),
    /// Broker handshake answer.
    Welcome(Welcome),
    /// Subscribe request.
    Subscribe(Subscribe),
    /// Unsubscribe request.
    Unsubscribe(Unsubscribe),
    /// Answer to a request.
    Reply(Reply),
    /// Client → broker message.
    Publish(Message),
    /// Broker → client message (same body layout as publish).
    Deliver(Message),
    /// Broker → client message for one member of a queue group (protocol 1.1).
    DeliverGroup(GroupDelivery),
    /// Client → broker run of realtime messages on one topic (protocol 1.2).
    PublishRun(super::MessageRun),
    /// Broker → client run, the publisher's bytes verbatim (protocol 1.2).
    DeliverRun(super::MessageRun),
    /// Positive acknowledgement of a message id.
    Ack(MessageId),
    /// Negative acknowledgement.
    Nack(Nack),
    /// Keepalive probe carrying a nonce.
    Ping(u64),
    /// Keepalive answer echoing the nonce.
    Pong(u64),
    /// Error report.
    Error(ErrorFrame),
    /// In-band status.
    Notice(Notice),
    /// Drain notice.
    GoingAway(GoingAway),
    /// Client → broker: open an acknowledged subscription (protocol 1.3).
    SubscribeAcked(SubscribeAcked),
    /// Broker → client: a delivery of an acknowledged subscription (protocol 1.3).
    DeliverAcked(AckedDelivery),
    /// Broker → client: a run of deliveries of an acknowledged subscription (protocol 1.4).
    DeliverAckedRun(AckedRun),
    /// Client → broker: acknowledge deliveries (protocol 1.3).
    SubAck(SubAck),
    /// Client → broker: close an acknowledged subscription (protocol 1.3).
    SubClose(SubClose),
    /// Client → broker: delete a durable subscription (protocol 1.3).
    DurableDelete(DurableDelete),
    /// Broker → client: an acknowledged subscription ended (protocol 1.3).
    SubEnd(SubEnd),
}
