//! The v1 wire codec: length-prefixed frames (normative spec: `docs/protocol.md`).
//!
//! Every frame is `len: u32 LE | kind: u8 | body`, where `len` counts the kind byte and the
//! body. The decoder checks `len` against its limit before reserving any memory, and keeps
//! partial frames in the caller's buffer so a read can be cancelled safely.

mod body;
mod decoder;
mod frame;
mod lent;
pub(crate) mod pool;
mod run;
mod types;
mod wire;

pub(crate) use body::encode_message_body;
pub use body::{
    ACKED_HEAD, CARVE_CHUNK, DECODE_TOPICS, DecodeCache, decode_message_body, encode_acked_frame,
    encode_acked_frame_head, encode_group_frame, encode_group_frame_head, encode_message_frame,
    encode_publish, encode_publish_head,
};
pub use decoder::FrameDecoder;
pub use lent::{ChargedCopy, Lent, LentFrame};
pub use run::{
    AckedHead, MessageRun, RunMessages, RunPart, RunWriter, encode_acked_run,
    encode_run_as_delivers, encode_run_delivery, encode_run_frame, may_run,
};
pub use types::*;
pub use wire::encode_frame_head;

use crate::group::GroupError;
use crate::topic::TopicError;

/// Protocol major version spoken by this crate. A peer with another major is refused.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Protocol minor version spoken by this crate. Minor versions only add optional fields.
pub const PROTOCOL_MINOR: u16 = 4;
/// The first minor version with message runs (PUBLISH_RUN and DELIVER_RUN frames).
pub const RUNS_SINCE_MINOR: u16 = 2;
/// The first minor version with acknowledged and durable subscriptions (SUBSCRIBE_ACKED,
/// DELIVER_ACKED, SUB_ACK, SUB_CLOSE, DURABLE_DELETE, SUB_END).
pub const ACKED_SINCE_MINOR: u16 = 3;
/// The first minor version with runs of Processed messages (PUBLISH_RUN of Processed
/// messages, DELIVER_ACKED_RUN).
pub const PROCESSED_RUNS_SINCE_MINOR: u16 = 4;
/// Most filters one acknowledged subscription holds.
pub const MAX_ACKED_FILTERS: usize = 255;
/// Most ranges one SUB_ACK carries.
pub const MAX_ACK_RANGES: usize = 1024;
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
    pub const DELIVER_GROUP: u8 = 0x0F;
    pub const PUBLISH_RUN: u8 = 0x10;
    pub const DELIVER_RUN: u8 = 0x11;
    pub const SUBSCRIBE_ACKED: u8 = 0x12;
    pub const DELIVER_ACKED: u8 = 0x13;
    pub const SUB_ACK: u8 = 0x14;
    pub const SUB_CLOSE: u8 = 0x15;
    pub const DURABLE_DELETE: u8 = 0x16;
    pub const SUB_END: u8 = 0x17;
    pub const DELIVER_ACKED_RUN: u8 = 0x18;
}

pub(crate) const FLAG_QOS_MASK: u8 = 0b0000_0011;
pub(crate) const FLAG_REPLY_TO: u8 = 0b0000_0100;
pub(crate) const FLAG_DEADLINE: u8 = 0b0000_1000;
pub(crate) const FLAG_CORRELATION: u8 = 0b0001_0000;
pub(crate) const FLAG_STATUS: u8 = 0b0010_0000;
/// In SUBSCRIBE's `qos` byte: a queue group name follows the filter.
pub(crate) const SUBSCRIBE_GROUP: u8 = 0b1000_0000;

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
    /// A queue group name is invalid; the stream is still in sync and a subscribe request
    /// can be answered with its id (0 for a delivery).
    #[error("request {request_id}: {error}")]
    InvalidGroup {
        /// The request.
        request_id: u32,
        /// Why the name was refused.
        error: GroupError,
    },
    /// Bytes were left over after a fixed-layout frame.
    #[error("{0} unexpected trailing bytes in frame")]
    Trailing(usize),
    /// A message run breaks one of its rules (protocol 1.2); the frame was consumed whole.
    #[error("invalid message run: {0}")]
    InvalidRun(&'static str),
    /// A durable subscription name is invalid; the stream is still in sync and the request
    /// can be answered with its id (protocol 1.3).
    #[error("request {request_id}: {error}")]
    InvalidName {
        /// The request.
        request_id: u32,
        /// Why the name was refused.
        error: crate::group::DurableNameError,
    },
}

impl FrameError {
    /// Whether the stream is still in sync after this error: the frame was consumed whole and
    /// only its content was refused (an invalid topic, filter or field). An unknown frame kind,
    /// an empty frame and an oversized length prefix are not recoverable.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            Self::Topic(_)
                | Self::InvalidFilter { .. }
                | Self::InvalidGroup { .. }
                | Self::FieldTooLong { .. }
                | Self::InvalidUtf8(_)
                | Self::InvalidValue { .. }
                | Self::Truncated(_)
                | Self::Trailing(_)
                | Self::InvalidRun(_)
                | Self::InvalidName { .. }
        )
    }
}
