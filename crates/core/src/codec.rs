//! The v1 wire codec: length-prefixed frames (normative spec: `docs/protocol.md`).
//!
//! Every frame is `len: u32 LE | kind: u8 | body`, where `len` counts the kind byte and the
//! body. The decoder checks `len` against its limit before reserving any memory, and keeps
//! partial frames in the caller's buffer so a read can be cancelled safely.

use crate::bytestr::ByteStr;
use crate::message::{
    CorrelationMetadata, Header, MAX_CORRELATION_ID_LEN, MAX_STAGE_LEN, MAX_TAG_KEY_LEN,
    MAX_TAG_VALUE_LEN, MAX_TAGS, Message, MessageId, Qos,
};
use crate::topic::{Topic, TopicError, TopicFilter};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol major version spoken by this crate. A peer with another major is refused.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Protocol minor version spoken by this crate. Minor versions only add optional fields.
pub const PROTOCOL_MINOR: u16 = 0;
/// Bytes allowed in a frame on top of the payload limit, for topic, header and correlation
/// metadata. `max_frame_len = max_message_size + FRAME_OVERHEAD_ALLOWANCE`.
pub const FRAME_OVERHEAD_ALLOWANCE: usize = 128 * 1024;
/// Default maximum payload size: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Largest payload limit a broker may be configured with: 64 MiB.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 64 * 1024 * 1024;
/// Maximum length of a client or broker name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Frame kind bytes.
#[allow(missing_docs)]
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const SUBSCRIBE: u8 = 0x03;
    pub const UNSUBSCRIBE: u8 = 0x04;
    pub const REPLY: u8 = 0x05;
    pub const PUBLISH: u8 = 0x06;
    pub const DELIVER: u8 = 0x07;
    pub const ACK: u8 = 0x08;
    pub const NACK: u8 = 0x09;
    pub const PING: u8 = 0x0A;
    pub const PONG: u8 = 0x0B;
    pub const ERROR: u8 = 0x0C;
    pub const NOTICE: u8 = 0x0D;
    pub const GOING_AWAY: u8 = 0x0E;
}

const FLAG_QOS_MASK: u8 = 0b0000_0011;
const FLAG_REPLY_TO: u8 = 0b0000_0100;
const FLAG_DEADLINE: u8 = 0b0000_1000;
const FLAG_CORRELATION: u8 = 0b0001_0000;

/// The largest frame (`len` field) accepted for a given payload limit.
pub const fn max_frame_len(max_message_size: usize) -> usize {
    max_message_size + FRAME_OVERHEAD_ALLOWANCE
}

/// Errors found while decoding a frame. After [`FrameError::is_recoverable`] ones the frame
/// was consumed whole and the stream is still in sync; after the others it cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the receiver's limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Receiver's limit.
        max: usize,
    },
    /// The length prefix is zero.
    #[error("frame with zero length (no kind byte)")]
    Empty,
    /// The kind byte is not defined by this protocol version.
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The body ended before a field was complete.
    #[error("frame body ended inside field {0}")]
    Truncated(&'static str),
    /// A string field is not UTF-8.
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    /// A field exceeds its documented limit.
    #[error("field {field} is {len} bytes, the limit is {max}")]
    FieldTooLong {
        /// Field name.
        field: &'static str,
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A field has a value the protocol does not define.
    #[error("field {field} has invalid value {value}")]
    InvalidValue {
        /// Field name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A topic field is invalid. The frame was consumed whole, so the stream is still in
    /// sync and the receiver may answer and go on.
    #[error("{0}")]
    Topic(#[from] TopicError),
    /// The filter of a subscribe / unsubscribe request is invalid; the stream is still in
    /// sync and the request can be answered with its id.
    #[error("request {request_id}: {error}")]
    InvalidFilter {
        /// The request.
        request_id: u32,
        /// Why the filter was refused.
        error: TopicError,
    },
    /// Bytes were left over after a fixed-layout frame.
    #[error("{0} unexpected trailing bytes in frame")]
    Trailing(usize),
}

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
    /// Client name (≤ [`MAX_NAME_LEN`] bytes), used as the `source` of its messages.
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
            Self::Other(c) => c,
        }
    }

    /// Decodes a wire value (0 is "no error" and is handled by callers).
    pub fn from_u16(v: u16) -> Self {
        const ALL: [ErrorCode; 15] = [
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
    /// A reason this version does not know.
    Other(u8),
}

impl DropReason {
    fn to_u8(self) -> u8 {
        match self {
            Self::SlowReader => 1,
            Self::MemoryCap => 2,
            Self::Other(v) => v,
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::SlowReader,
            2 => Self::MemoryCap,
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
}

/// The sender is going away; the receiver should finish what it is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoingAway {
    /// How long the sender keeps draining, milliseconds.
    pub drain_ms: u32,
    /// Why.
    pub reason: String,
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
}

// ---------------------------------------------------------------------------------------------
// Encoding

fn put_str8(dst: &mut BytesMut, s: &str) {
    let len = s.len().min(u8::MAX as usize);
    dst.put_u8(len as u8);
    dst.put_slice(&s.as_bytes()[..len]);
}

fn put_str16(dst: &mut BytesMut, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    dst.put_u16_le(len as u16);
    dst.put_slice(&s.as_bytes()[..len]);
}

fn put_opt_str16(dst: &mut BytesMut, s: Option<&str>) {
    put_str16(dst, s.unwrap_or(""));
}

/// Starts a frame: reserves the length prefix and writes the kind; returns the frame start.
fn begin(dst: &mut BytesMut, kind: u8) -> usize {
    let start = dst.len();
    dst.put_u32_le(0);
    dst.put_u8(kind);
    start
}

/// Back-fills the length prefix of the frame begun at `start`.
fn finish(dst: &mut BytesMut, start: usize) {
    let len = u32::try_from(dst.len() - start - LEN_PREFIX).expect("frame below 4 GiB");
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

fn encode_header(dst: &mut BytesMut, h: &Header) {
    let mut flags = h.qos.to_bits();
    if h.reply_to.is_some() {
        flags |= FLAG_REPLY_TO;
    }
    if h.deadline_ns.is_some() {
        flags |= FLAG_DEADLINE;
    }
    if h.correlation.is_some() {
        flags |= FLAG_CORRELATION;
    }
    dst.put_u8(flags);
    dst.put_u64_le(h.id.publisher);
    dst.put_u64_le(h.id.sequence);
    dst.put_u64_le(h.timestamp_ns);
    put_str8(dst, &h.source);
    if let Some(r) = &h.reply_to {
        put_str16(dst, r.as_str());
    }
    if let Some(d) = h.deadline_ns {
        dst.put_u64_le(d);
    }
    if let Some(c) = &h.correlation {
        encode_correlation(dst, c);
    }
}

fn encode_correlation(dst: &mut BytesMut, c: &CorrelationMetadata) {
    put_str16(dst, &c.correlation_id);
    put_opt_str16(dst, c.parent_correlation_id.as_deref());
    put_str16(dst, &c.root_correlation_id);
    dst.put_u64_le(c.sequence_number);
    put_opt_str16(dst, c.workflow_stage.as_deref());
    dst.put_u64_le(c.created_at_ns);
    let tags = c.tags.len().min(MAX_TAGS);
    dst.put_u8(tags as u8);
    for (k, v) in c.tags.iter().take(tags) {
        put_str8(dst, k);
        put_str16(dst, v);
    }
}

/// Writes a message body (topic, header, payload) without the frame prefix.
fn put_message_body(dst: &mut BytesMut, topic: &Topic, header: &Header, payload: &[u8]) {
    put_message_head(dst, topic, header);
    dst.put_slice(payload);
}

/// Writes a message body's topic and header (everything but the payload).
fn put_message_head(dst: &mut BytesMut, topic: &Topic, header: &Header) {
    put_str16(dst, topic.as_str());
    let len_at = dst.len();
    dst.put_u32_le(0);
    encode_header(dst, header);
    let hlen = u32::try_from(dst.len() - len_at - 4).expect("header below 4 GiB");
    dst[len_at..len_at + 4].copy_from_slice(&hlen.to_le_bytes());
}

/// Appends a publish frame without its payload: the length prefix already counts
/// `payload_len` bytes, which the caller must send right after (for example with `writev`
/// from the payload's own buffer, avoiding a copy).
pub fn encode_publish_head(dst: &mut BytesMut, topic: &Topic, header: &Header, payload_len: usize) {
    let start = begin(dst, kind::PUBLISH);
    put_message_head(dst, topic, header);
    let len =
        u32::try_from(dst.len() - start - LEN_PREFIX + payload_len).expect("frame below 4 GiB");
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

/// Encodes a message body into fresh bytes (used once per message, then shared).
pub(crate) fn encode_message_body(msg: &Message) -> Bytes {
    let mut dst = BytesMut::with_capacity(msg.accounted_size());
    put_message_body(&mut dst, msg.topic(), msg.header(), msg.payload());
    dst.freeze()
}

/// Appends a complete publish frame built from parts, without creating a [`Message`]
/// (the client's publish fast path).
pub fn encode_publish(dst: &mut BytesMut, topic: &Topic, header: &Header, payload: &[u8]) {
    let start = begin(dst, kind::PUBLISH);
    put_message_body(dst, topic, header, payload);
    finish(dst, start);
}

/// Appends a message frame of `kind` ([`kind::PUBLISH`] or [`kind::DELIVER`]) whose body is
/// the message's shared wire encoding.
pub fn encode_message_frame(dst: &mut BytesMut, kind: u8, msg: &Message) {
    let wire = msg.wire();
    let len = u32::try_from(wire.len() + 1).expect("frame below 4 GiB");
    dst.reserve(LEN_PREFIX + 1 + wire.len());
    dst.put_u32_le(len);
    dst.put_u8(kind);
    dst.put_slice(wire);
}

impl Frame {
    /// The frame's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Hello(_) => kind::HELLO,
            Self::Welcome(_) => kind::WELCOME,
            Self::Subscribe(_) => kind::SUBSCRIBE,
            Self::Unsubscribe(_) => kind::UNSUBSCRIBE,
            Self::Reply(_) => kind::REPLY,
            Self::Publish(_) => kind::PUBLISH,
            Self::Deliver(_) => kind::DELIVER,
            Self::Ack(_) => kind::ACK,
            Self::Nack(_) => kind::NACK,
            Self::Ping(_) => kind::PING,
            Self::Pong(_) => kind::PONG,
            Self::Error(_) => kind::ERROR,
            Self::Notice(_) => kind::NOTICE,
            Self::GoingAway(_) => kind::GOING_AWAY,
        }
    }

    /// Appends the encoded frame (length prefix included) to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Self::Publish(m) | Self::Deliver(m) = self {
            encode_message_frame(dst, self.kind(), m);
            return;
        }
        let start = begin(dst, self.kind());
        self.encode_body(dst);
        finish(dst, start);
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        match self {
            Self::Hello(h) => {
                dst.put_u16_le(h.version.major);
                dst.put_u16_le(h.version.minor);
                dst.put_u32_le(h.capabilities);
                dst.put_u32_le(h.max_message_size);
                dst.put_u32_le(h.keepalive_ms);
                dst.put_u8(match h.slow_reader {
                    SlowReaderPolicy::DropOldest => 0,
                    SlowReaderPolicy::Disconnect => 1,
                });
                put_str8(dst, &h.client_name);
            }
            Self::Welcome(w) => {
                dst.put_u16_le(w.version.major);
                dst.put_u16_le(w.version.minor);
                dst.put_u64_le(w.session_id);
                dst.put_u32_le(w.capabilities);
                dst.put_u32_le(w.max_message_size);
                dst.put_u32_le(w.keepalive_ms);
                put_str8(dst, &w.broker);
            }
            Self::Subscribe(s) => {
                dst.put_u32_le(s.request_id);
                dst.put_u8(s.qos.to_bits());
                put_str16(dst, s.filter.as_str());
            }
            Self::Unsubscribe(u) => {
                dst.put_u32_le(u.request_id);
                put_str16(dst, u.filter.as_str());
            }
            Self::Reply(r) => {
                dst.put_u32_le(r.request_id);
                dst.put_u16_le(r.error.map_or(0, ErrorCode::to_u16));
                put_str16(dst, &r.message);
            }
            Self::Ack(id) => put_id(dst, *id),
            Self::Nack(n) => {
                put_id(dst, n.id);
                dst.put_u16_le(n.code.to_u16());
                put_str16(dst, &n.reason);
            }
            Self::Ping(n) | Self::Pong(n) => dst.put_u64_le(*n),
            Self::Error(e) => {
                dst.put_u32_le(e.request_id);
                dst.put_u16_le(e.code.to_u16());
                dst.put_u8(u8::from(e.fatal));
                put_str16(dst, &e.message);
            }
            Self::Notice(Notice::Dropped { reason, topics }) => {
                dst.put_u8(1);
                dst.put_u8(reason.to_u8());
                let n = topics.len().min(u16::MAX as usize);
                dst.put_u16_le(n as u16);
                for (t, c) in topics.iter().take(n) {
                    put_str16(dst, t.as_str());
                    dst.put_u64_le(*c);
                }
            }
            Self::GoingAway(g) => {
                dst.put_u32_le(g.drain_ms);
                put_str16(dst, &g.reason);
            }
            Self::Publish(_) | Self::Deliver(_) => unreachable!("handled by encode"),
        }
    }
}

fn put_id(dst: &mut BytesMut, id: MessageId) {
    dst.put_u64_le(id.publisher);
    dst.put_u64_le(id.sequence);
}

// ---------------------------------------------------------------------------------------------
// Decoding

/// A read position in a shared body; slices are zero-copy.
struct Cursor {
    buf: Bytes,
}

impl Cursor {
    fn need(&self, n: usize, field: &'static str) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            return Err(FrameError::Truncated(field));
        }
        Ok(())
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64_le())
    }
    fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, FrameError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }
    fn str_bytes(
        &mut self,
        len: usize,
        max: usize,
        field: &'static str,
    ) -> Result<ByteStr, FrameError> {
        if len > max {
            return Err(FrameError::FieldTooLong { field, len, max });
        }
        let b = self.take(len, field)?;
        ByteStr::from_utf8(b).map_err(|_| FrameError::InvalidUtf8(field))
    }
    fn str8(&mut self, max: usize, field: &'static str) -> Result<ByteStr, FrameError> {
        let len = self.u8(field)? as usize;
        self.str_bytes(len, max, field)
    }
    fn str16(&mut self, max: usize, field: &'static str) -> Result<ByteStr, FrameError> {
        let len = self.u16(field)? as usize;
        self.str_bytes(len, max, field)
    }
    fn opt_str16(&mut self, max: usize, field: &'static str) -> Result<Option<String>, FrameError> {
        let s = self.str16(max, field)?;
        Ok((!s.is_empty()).then(|| s.to_string()))
    }
    fn topic(&mut self, field: &'static str) -> Result<Topic, FrameError> {
        let len = self.u16(field)? as usize;
        Ok(Topic::from_bytes(self.take(len, field)?)?)
    }
    fn filter(&mut self, field: &'static str) -> Result<TopicFilter, FrameError> {
        let s = self.str16(u16::MAX as usize, field)?;
        Ok(TopicFilter::new(s.as_str())?)
    }
    fn request_filter(&mut self, request_id: u32) -> Result<TopicFilter, FrameError> {
        self.filter("filter").map_err(|e| match e {
            FrameError::Topic(error) => FrameError::InvalidFilter { request_id, error },
            other => other,
        })
    }
    fn id(&mut self) -> Result<MessageId, FrameError> {
        Ok(MessageId {
            publisher: self.u64("message_id.publisher")?,
            sequence: self.u64("message_id.sequence")?,
        })
    }
    fn qos(&mut self, bits: u8) -> Result<Qos, FrameError> {
        Qos::from_bits(bits).ok_or(FrameError::InvalidValue {
            field: "qos",
            value: u64::from(bits),
        })
    }
    fn end(self) -> Result<(), FrameError> {
        match self.buf.remaining() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}

fn decode_header(buf: Bytes) -> Result<Header, FrameError> {
    let mut c = Cursor { buf };
    let flags = c.u8("header.flags")?;
    let qos = c.qos(flags & FLAG_QOS_MASK)?;
    let id = c.id()?;
    let timestamp_ns = c.u64("header.timestamp")?;
    let source = c.str8(MAX_NAME_LEN, "header.source")?;
    let reply_to = if flags & FLAG_REPLY_TO != 0 {
        Some(c.topic("header.reply_to")?)
    } else {
        None
    };
    let deadline_ns = if flags & FLAG_DEADLINE != 0 {
        Some(c.u64("header.deadline")?)
    } else {
        None
    };
    let correlation = if flags & FLAG_CORRELATION != 0 {
        Some(Box::new(decode_correlation(&mut c)?))
    } else {
        None
    };
    // Bytes after the known fields are extensions from a later minor version: tolerated.
    Ok(Header {
        id,
        timestamp_ns,
        qos,
        source,
        reply_to,
        deadline_ns,
        correlation,
    })
}

fn decode_correlation(c: &mut Cursor) -> Result<CorrelationMetadata, FrameError> {
    let correlation_id = c
        .str16(MAX_CORRELATION_ID_LEN, "correlation.id")?
        .to_string();
    let parent_correlation_id = c.opt_str16(MAX_CORRELATION_ID_LEN, "correlation.parent")?;
    let root_correlation_id = c
        .str16(MAX_CORRELATION_ID_LEN, "correlation.root")?
        .to_string();
    let sequence_number = c.u64("correlation.sequence")?;
    let workflow_stage = c.opt_str16(MAX_STAGE_LEN, "correlation.stage")?;
    let created_at_ns = c.u64("correlation.created_at")?;
    let count = c.u8("correlation.tag_count")? as usize;
    if count > MAX_TAGS {
        return Err(FrameError::FieldTooLong {
            field: "correlation.tags",
            len: count,
            max: MAX_TAGS,
        });
    }
    let mut tags = std::collections::BTreeMap::new();
    for _ in 0..count {
        let k = c.str8(MAX_TAG_KEY_LEN, "correlation.tag.key")?;
        let v = c.str16(MAX_TAG_VALUE_LEN, "correlation.tag.value")?;
        tags.insert(k.to_string(), v.to_string());
    }
    Ok(CorrelationMetadata {
        correlation_id,
        parent_correlation_id,
        root_correlation_id,
        sequence_number,
        workflow_stage,
        tags,
        created_at_ns,
    })
}

/// Decodes a message body (topic, header, payload), keeping `body` as its wire form.
pub fn decode_message_body(body: Bytes) -> Result<Message, FrameError> {
    let mut c = Cursor { buf: body.clone() };
    let topic = c.topic("topic")?;
    let hlen = c.u32("header_len")? as usize;
    let header = decode_header(c.take(hlen, "header")?)?;
    Ok(Message::with_wire(topic, header, c.buf, body))
}

fn decode_slow_reader(v: u8) -> Result<SlowReaderPolicy, FrameError> {
    match v {
        0 => Ok(SlowReaderPolicy::DropOldest),
        1 => Ok(SlowReaderPolicy::Disconnect),
        v => Err(FrameError::InvalidValue {
            field: "slow_reader",
            value: u64::from(v),
        }),
    }
}

fn decode_version(c: &mut Cursor) -> Result<Version, FrameError> {
    Ok(Version {
        major: c.u16("version.major")?,
        minor: c.u16("version.minor")?,
    })
}

impl FrameError {
    /// Whether the stream is still in sync after this error: the frame was consumed whole
    /// and only its content was refused (an invalid topic or filter).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::Topic(_) | Self::InvalidFilter { .. })
    }
}

impl Frame {
    /// Decodes one frame from its kind byte and body (everything after the kind byte).
    ///
    /// # Errors
    ///
    /// Any [`FrameError`]; the stream should be closed after one.
    pub fn decode(kind: u8, body: Bytes) -> Result<Frame, FrameError> {
        if kind == kind::PUBLISH {
            return decode_message_body(body).map(Frame::Publish);
        }
        if kind == kind::DELIVER {
            return decode_message_body(body).map(Frame::Deliver);
        }
        let mut c = Cursor { buf: body };
        let frame = match kind {
            kind::HELLO => Frame::Hello(Hello {
                version: decode_version(&mut c)?,
                capabilities: c.u32("capabilities")?,
                max_message_size: c.u32("max_message_size")?,
                keepalive_ms: c.u32("keepalive_ms")?,
                slow_reader: decode_slow_reader(c.u8("slow_reader")?)?,
                client_name: c.str8(MAX_NAME_LEN, "client_name")?.to_string(),
            }),
            kind::WELCOME => Frame::Welcome(Welcome {
                version: decode_version(&mut c)?,
                session_id: c.u64("session_id")?,
                capabilities: c.u32("capabilities")?,
                max_message_size: c.u32("max_message_size")?,
                keepalive_ms: c.u32("keepalive_ms")?,
                broker: c.str8(MAX_NAME_LEN, "broker")?.to_string(),
            }),
            kind::SUBSCRIBE => {
                let request_id = c.u32("request_id")?;
                let bits = c.u8("qos")?;
                let qos = c.qos(bits)?;
                let filter = c.request_filter(request_id)?;
                Frame::Subscribe(Subscribe {
                    request_id,
                    qos,
                    filter,
                })
            }
            kind::UNSUBSCRIBE => {
                let request_id = c.u32("request_id")?;
                let filter = c.request_filter(request_id)?;
                Frame::Unsubscribe(Unsubscribe { request_id, filter })
            }
            kind::REPLY => {
                let request_id = c.u32("request_id")?;
                let code = c.u16("code")?;
                Frame::Reply(Reply {
                    request_id,
                    error: (code != 0).then(|| ErrorCode::from_u16(code)),
                    message: c.str16(u16::MAX as usize, "message")?.to_string(),
                })
            }
            kind::ACK => Frame::Ack(c.id()?),
            kind::NACK => Frame::Nack(Nack {
                id: c.id()?,
                code: ErrorCode::from_u16(c.u16("code")?),
                reason: c.str16(u16::MAX as usize, "reason")?.to_string(),
            }),
            kind::PING => Frame::Ping(c.u64("nonce")?),
            kind::PONG => Frame::Pong(c.u64("nonce")?),
            kind::ERROR => Frame::Error(ErrorFrame {
                request_id: c.u32("request_id")?,
                code: ErrorCode::from_u16(c.u16("code")?),
                fatal: c.u8("fatal")? != 0,
                message: c.str16(u16::MAX as usize, "message")?.to_string(),
            }),
            kind::NOTICE => Frame::Notice(decode_notice(&mut c)?),
            kind::GOING_AWAY => Frame::GoingAway(GoingAway {
                drain_ms: c.u32("drain_ms")?,
                reason: c.str16(u16::MAX as usize, "reason")?.to_string(),
            }),
            other => return Err(FrameError::UnknownKind(other)),
        };
        c.end()?;
        Ok(frame)
    }
}

fn decode_notice(c: &mut Cursor) -> Result<Notice, FrameError> {
    let what = c.u8("notice.kind")?;
    if what != 1 {
        return Err(FrameError::InvalidValue {
            field: "notice.kind",
            value: u64::from(what),
        });
    }
    let reason = DropReason::from_u8(c.u8("notice.reason")?);
    let n = c.u16("notice.count")? as usize;
    let mut topics = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let t = c.topic("notice.topic")?;
        topics.push((t, c.u64("notice.dropped")?));
    }
    Ok(Notice::Dropped { reason, topics })
}

/// Splits frames off a byte stream.
///
/// Partial frames stay in the caller's buffer, so [`FrameDecoder::decode`] can be called again
/// after more bytes arrive (cancel-safe reading).
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_frame_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames whose `len` exceeds `max_frame_len`.
    pub fn new(max_frame_len: usize) -> Self {
        Self { max_frame_len }
    }

    /// The limit in force.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame_len
    }

    /// Takes the next complete frame from `buf`, or returns `Ok(None)` when more bytes are
    /// needed (after reserving room for the announced frame, which is within the limit).
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] is returned from the length prefix alone, before any
    /// allocation; other errors come from [`Frame::decode`].
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        let Some((kind, body)) = self.split_frame(buf)? else {
            return Ok(None);
        };
        Frame::decode(kind, body).map(Some)
    }

    /// Like [`FrameDecoder::decode`] but returns the raw kind and body without parsing it.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] or [`FrameError::Empty`].
    pub fn split_frame(&self, buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, FrameError> {
        if buf.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        if buf.len() < LEN_PREFIX + len {
            buf.reserve(LEN_PREFIX + len - buf.len());
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        let mut frame = buf.split_to(len).freeze();
        let kind = frame.get_u8();
        Ok(Some((kind, frame)))
    }
}
