//! Messages: topic + header + opaque payload, shared by every subscriber without copying.

use crate::budget::{Budget, Charge};
use crate::bytestr::ByteStr;
use crate::topic::Topic;
use bytes::Bytes;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// Unique message id: a random 64-bit publisher id the client picks once for its lifetime
/// (kept across reconnects) and a per-publisher sequence number. Duplicates are detectable by
/// comparing ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId {
    /// Random id of the publishing client, fixed for its lifetime.
    pub publisher: u64,
    /// Per-publisher sequence number, starting at 1.
    pub sequence: u64,
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.publisher, self.sequence)
    }
}

/// Delivery guarantee requested for a message or subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Qos {
    /// At most once; never blocks a publisher. Slow readers lose the oldest messages, counted.
    #[default]
    Realtime,
    /// At least once. On a subscription: the broker never drops a message for it and makes
    /// publishers wait while its queue is full. On a publish: the broker acknowledges it once
    /// routed, after every matching `Processed` subscription's queue holds it (`Realtime`
    /// subscribers may still drop it under their slow-reader policy). Redelivery after a
    /// reconnect is not implemented yet.
    Processed,
}

impl Qos {
    pub(crate) fn to_bits(self) -> u8 {
        match self {
            Self::Realtime => 0,
            Self::Processed => 1,
        }
    }

    pub(crate) fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Realtime),
            1 => Some(Self::Processed),
            _ => None,
        }
    }
}

/// Maximum length of a correlation id (and parent / root ids), in bytes.
pub const MAX_CORRELATION_ID_LEN: usize = 256;
/// Maximum number of correlation tags.
pub const MAX_TAGS: usize = 64;
/// Maximum length of a tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 128;
/// Maximum length of a tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 1024;
/// Maximum length of a workflow stage, in bytes.
pub const MAX_STAGE_LEN: usize = 256;

/// Cuts `s` to at most `max` bytes on a UTF-8 character boundary.
pub fn truncate_utf8(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Correlation metadata that lets an analyst follow a chain of events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CorrelationMetadata {
    /// Id of this step of the chain (at most [`MAX_CORRELATION_ID_LEN`] bytes).
    pub correlation_id: String,
    /// Id of the cause, if any.
    pub parent_correlation_id: Option<String>,
    /// Id of the first step of the chain.
    pub root_correlation_id: String,
    /// Position in the chain.
    pub sequence_number: u64,
    /// Free-form workflow stage.
    pub workflow_stage: Option<String>,
    /// Tags (at most [`MAX_TAGS`], keys ≤ [`MAX_TAG_KEY_LEN`], values ≤ [`MAX_TAG_VALUE_LEN`]).
    pub tags: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the Unix epoch.
    pub created_at_ns: u64,
}

impl CorrelationMetadata {
    /// Metadata for the root of a new chain; `id` is cut to the length limit on a UTF-8
    /// boundary.
    pub fn root(id: impl Into<String>, created_at_ns: u64) -> Self {
        let id = truncate_utf8(id.into(), MAX_CORRELATION_ID_LEN);
        Self {
            root_correlation_id: id.clone(),
            correlation_id: id,
            created_at_ns,
            ..Self::default()
        }
    }

    /// Adds a tag, enforcing the limits by cutting key and value on UTF-8 boundaries. Returns
    /// `false` (and adds nothing) when [`MAX_TAGS`] tags are already present.
    pub fn with_tag(&mut self, key: impl Into<String>, value: impl Into<String>) -> bool {
        if self.tags.len() >= MAX_TAGS {
            return false;
        }
        let key = truncate_utf8(key.into(), MAX_TAG_KEY_LEN);
        let value = truncate_utf8(value.into(), MAX_TAG_VALUE_LEN);
        self.tags.insert(key, value);
        true
    }
}

impl CorrelationMetadata {
    /// Metadata for a step caused by this one: `id` is the new step, the parent is this
    /// step, the root is kept, the sequence number is the next one, the workflow stage and tags
    /// are inherited. `id` is cut to the length limit on a UTF-8 boundary.
    #[must_use]
    pub fn child(&self, id: impl Into<String>, created_at_ns: u64) -> Self {
        let root = if self.root_correlation_id.is_empty() {
            self.correlation_id.clone()
        } else {
            self.root_correlation_id.clone()
        };
        Self {
            correlation_id: truncate_utf8(id.into(), MAX_CORRELATION_ID_LEN),
            parent_correlation_id: Some(self.correlation_id.clone()),
            root_correlation_id: root,
            sequence_number: self.sequence_number.saturating_add(1),
            workflow_stage: self.workflow_stage.clone(),
            tags: self.tags.clone(),
            created_at_ns,
        }
    }
}

/// Correlation metadata over a documented limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("correlation metadata: {field} is {len}, the limit is {max}")]
pub struct CorrelationError {
    /// The field.
    pub field: &'static str,
    /// Its length in bytes (or count, for tags).
    pub len: usize,
    /// The limit.
    pub max: usize,
}

impl CorrelationMetadata {
    /// Checks every documented limit, so the metadata encodes and decodes unchanged.
    ///
    /// # Errors
    ///
    /// A [`CorrelationError`] naming the first field over its limit.
    pub fn validate(&self) -> Result<(), CorrelationError> {
        let check = |field, len, max| {
            if len > max {
                return Err(CorrelationError { field, len, max });
            }
            Ok(())
        };
        let id_max = MAX_CORRELATION_ID_LEN;
        check("correlation_id", self.correlation_id.len(), id_max)?;
        check(
            "root_correlation_id",
            self.root_correlation_id.len(),
            id_max,
        )?;
        let parent = self.parent_correlation_id.as_ref().map_or(0, String::len);
        check("parent_correlation_id", parent, id_max)?;
        let stage = self.workflow_stage.as_ref().map_or(0, String::len);
        check("workflow_stage", stage, MAX_STAGE_LEN)?;
        check("tags", self.tags.len(), MAX_TAGS)?;
        for (k, v) in &self.tags {
            check("tag key", k.len(), MAX_TAG_KEY_LEN)?;
            check("tag value", v.len(), MAX_TAG_VALUE_LEN)?;
        }
        Ok(())
    }
}

/// Maximum length of a [`ReplyStatus`] message, in bytes.
pub const MAX_STATUS_MESSAGE_LEN: usize = 4096;

/// Why a request failed, as carried by the reply (or sent by the broker for a request
/// nobody can answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusCode {
    /// No subscription matched the request's topic (sent by the broker at once).
    NoResponders,
    /// The responder does not support this operation or could not decode the request.
    InvalidOperation,
    /// The responder's handler failed.
    ExecutionError,
    /// The responder gave up: the request's deadline had passed.
    Timeout,
    /// The responder is overloaded or shutting down.
    Unavailable,
    /// A code this version does not know.
    Other(u8),
}

impl StatusCode {
    /// The code's wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::NoResponders => 1,
            Self::InvalidOperation => 2,
            Self::ExecutionError => 3,
            Self::Timeout => 4,
            Self::Unavailable => 5,
            Self::Other(v) => v,
        }
    }

    /// The code for a wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::NoResponders,
            2 => Self::InvalidOperation,
            3 => Self::ExecutionError,
            4 => Self::Timeout,
            5 => Self::Unavailable,
            v => Self::Other(v),
        }
    }
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::NoResponders => "no responders",
            Self::InvalidOperation => "invalid operation",
            Self::ExecutionError => "execution error",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Other(v) => return write!(f, "status {v}"),
        };
        f.write_str(s)
    }
}

/// The failure a reply reports (a reply without one is a success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyStatus {
    /// What kind of failure.
    pub code: StatusCode,
    /// A sentence a user can act on (at most [`MAX_STATUS_MESSAGE_LEN`] bytes; longer ones are
    /// cut on a UTF-8 boundary when encoded).
    pub message: String,
}

impl ReplyStatus {
    /// A failure of this kind with this explanation.
    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The responder does not support the operation, or the request was malformed.
    pub fn invalid_operation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::InvalidOperation, message)
    }

    /// The handler failed while executing the request.
    pub fn execution_error(message: impl Into<String>) -> Self {
        Self::new(StatusCode::ExecutionError, message)
    }

    /// The responder is overloaded or shutting down; the caller may retry elsewhere or later.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::Unavailable, message)
    }
}

impl fmt::Display for ReplyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Message metadata carried in the compact wire header (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// Unique id.
    pub id: MessageId,
    /// Publish time, nanoseconds since the Unix epoch (set by the publisher).
    pub timestamp_ns: u64,
    /// Requested delivery guarantee.
    pub qos: Qos,
    /// Name the publisher gave in its handshake (checked by the broker).
    pub source: ByteStr,
    /// Where replies go (RPC).
    pub reply_to: Option<Topic>,
    /// Deadline, nanoseconds since the Unix epoch.
    pub deadline_ns: Option<u64>,
    /// Correlation metadata, when the publisher attached any.
    pub correlation: Option<Box<CorrelationMetadata>>,
    /// On a reply: the failure it reports (`None`: success, or not a reply).
    pub status: Option<Box<ReplyStatus>>,
}

/// Fixed per-message overhead, in bytes, charged by [`Message::accounted_size`].
pub const MESSAGE_OVERHEAD: usize = 64;

#[derive(Debug)]
struct Inner {
    topic: Topic,
    header: Header,
    payload: Bytes,
    /// The encoded message body as received from the wire, shared by every socket subscriber.
    received: Option<Bytes>,
    /// The body of a message made in process, encoded once on first need. (Kept apart from
    /// `received` because filling a `OnceLock` costs a synchronised state change per message.)
    encoded: OnceLock<Bytes>,
    /// What this copy holds of a [`Budget`] (see [`Message::copied_charged`]).
    charge: Option<Charge>,
}

impl Inner {
    fn new(topic: Topic, header: Header, payload: Bytes, received: Option<Bytes>) -> Self {
        Self {
            topic,
            header,
            payload,
            received,
            encoded: OnceLock::new(),
            charge: None,
        }
    }

    /// Its payload and received body in a buffer of their own (exactly the body's length): a
    /// copy of the body and the payload as its tail, or of the payload alone.
    fn own_body(&self) -> (Bytes, Option<Bytes>) {
        match &self.received {
            Some(wire) => {
                let copy = crate::codec::pool::copy(wire);
                (copy.slice(wire.len() - self.payload.len()..), Some(copy))
            }
            None => (crate::codec::pool::copy(&self.payload), None),
        }
    }

    /// An empty message holding nothing alive (what a recycled allocation contains).
    fn vacant() -> Self {
        Self::new(
            Topic::from_static("vacant"),
            Header::default(),
            Bytes::new(),
            None,
        )
    }
}

/// Most message allocations one thread keeps for reuse.
const RECYCLED_MAX: usize = 4096;

thread_local! {
    /// Allocations of dropped messages, reused by the next messages made on this thread. A
    /// broker or client decodes messages in bursts of hundreds per read and drops them in
    /// bursts after writing or handing them over; through the general-purpose allocator that
    /// pattern was a third of the broker's instructions.
    static RECYCLED: RefCell<Vec<Arc<Inner>>> = const { RefCell::new(Vec::new()) };
}

/// A message: topic, header and opaque payload. Cloning is one reference-count increment; the
/// payload is never copied by the bus.
#[derive(Clone)]
pub struct Message(
    /// `None` only while the message is being dropped.
    Option<Arc<Inner>>,
);

impl Message {
    /// Builds a message.
    pub fn new(topic: Topic, header: Header, payload: Bytes) -> Self {
        Self::make(Inner::new(topic, header, payload, None))
    }

    /// A decoded message: `payload` is the tail of `wire`, the body as received.
    pub(crate) fn with_wire(topic: Topic, header: Header, payload: Bytes, wire: Bytes) -> Self {
        Self::make(Inner::new(topic, header, payload, Some(wire)))
    }

    /// A message read from a run, sharing its bytes.
    pub(crate) fn from_run(topic: Topic, header: Header, payload: Bytes) -> Self {
        Self::make(Inner::new(topic, header, payload, None))
    }

    /// This message holding only its own bytes: its body (or, read from a run, its payload)
    /// is copied, exactly its length. Its other fields are never slices of a read buffer.
    /// What [`crate::codec::Lent::keep`] gives for a message lent from a read buffer.
    pub(crate) fn copied(&self) -> Self {
        self.copy_with(None)
    }

    /// [`Message::copied`], charged to `budget` for its [`Message::accounted_size`]: the copy
    /// holds the charge until its last clone is dropped. `None` when the budget has no room.
    pub(crate) fn copied_charged(&self, budget: &Arc<Budget>) -> Option<Self> {
        let charge = Charge::take(budget, self.accounted_size())?;
        Some(self.copy_with(Some(charge)))
    }

    /// Makes this message hold only its own bytes ([`Message::copied`]), in place when no
    /// other clone shares it: the same allocation, header and topic, with its body copied.
    pub(crate) fn detach(&mut self) {
        let Some(inner) = self.0.as_mut().and_then(Arc::get_mut) else {
            *self = self.copied();
            return;
        };
        (inner.payload, inner.received) = inner.own_body();
    }

    fn copy_with(&self, charge: Option<Charge>) -> Self {
        let inner = self.inner();
        let (payload, received) = inner.own_body();
        let mut contents = Inner::new(inner.topic.clone(), inner.header.clone(), payload, received);
        contents.charge = charge;
        Self::make(contents)
    }

    /// Whether this message holds a charge against a [`Budget`] (made by
    /// [`crate::codec::Lent::keep_charged`]): whoever keeps a clone need not charge it again.
    pub fn is_charged(&self) -> bool {
        self.inner().charge.is_some()
    }

    fn make(contents: Inner) -> Self {
        let spare = RECYCLED
            .try_with(|r| r.try_borrow_mut().ok().and_then(|mut r| r.pop()))
            .ok()
            .flatten();
        let arc = match spare {
            Some(mut arc) => {
                // Only unshared allocations are recycled, and nothing else holds them.
                match Arc::get_mut(&mut arc) {
                    Some(inner) => {
                        *inner = contents;
                        arc
                    }
                    None => Arc::new(contents),
                }
            }
            None => Arc::new(contents),
        };
        Self(Some(arc))
    }

    fn inner(&self) -> &Inner {
        self.0
            .as_deref()
            .expect("a message holds its contents until it is dropped")
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.inner().topic
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.inner().header
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        &self.inner().payload
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.inner().header.id
    }

    /// Bytes the broker charges to queues for this message: payload, topic and a fixed
    /// [`MESSAGE_OVERHEAD`] for the header and bookkeeping. Computing it never encodes.
    pub fn accounted_size(&self) -> usize {
        let inner = self.inner();
        inner.payload.len() + inner.topic.as_str().len() + MESSAGE_OVERHEAD
    }

    /// The encoded body (topic, header, payload), encoded at most once.
    pub fn wire(&self) -> &Bytes {
        let inner = self.inner();
        match &inner.received {
            Some(wire) => wire,
            None => inner
                .encoded
                .get_or_init(|| crate::codec::encode_message_body(self)),
        }
    }
}

impl Drop for Message {
    /// The last clone of a message gives its allocation back for reuse (its contents are
    /// released at once).
    fn drop(&mut self) {
        let Some(mut arc) = self.0.take() else {
            return;
        };
        if let Some(inner) = Arc::get_mut(&mut arc) {
            *inner = Inner::vacant();
            // During thread exit the list may be gone: the allocation is then simply freed.
            let _ = RECYCLED.try_with(|r| {
                if let Ok(mut r) = r.try_borrow_mut()
                    && r.len() < RECYCLED_MAX
                {
                    r.push(arc);
                }
            });
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("topic", self.topic())
            .field("header", self.header())
            .field("payload_len", &self.payload().len())
            .finish()
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.topic() == other.topic()
            && self.header() == other.header()
            && self.payload() == other.payload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recycled() -> usize {
        RECYCLED.with_borrow(Vec::len)
    }

    #[test]
    fn the_last_clone_recycles_the_allocation_and_releases_the_contents() {
        let payload = Bytes::from(vec![7u8; 100]);
        let m = Message::new(
            Topic::new("a.b").unwrap(),
            Header::default(),
            payload.clone(),
        );
        let clone = m.clone();
        let before = recycled();
        drop(m);
        assert_eq!(recycled(), before, "a clone still holds it");
        assert_eq!(clone.payload(), &payload, "and sees the contents unchanged");
        drop(clone);
        assert_eq!(recycled(), before + 1);
        assert!(
            payload.is_unique(),
            "the recycled allocation released the payload"
        );
        let next = Message::new(Topic::new("c.d").unwrap(), Header::default(), Bytes::new());
        assert_eq!(recycled(), before, "the next message reuses it");
        assert_eq!(next.topic().as_str(), "c.d");
        assert!(next.payload().is_empty());
    }

    #[test]
    fn validate_names_the_field_over_its_limit() {
        let mut meta = CorrelationMetadata::root("c", 1);
        assert_eq!(meta.validate(), Ok(()));
        meta.tags
            .insert("k".into(), "v".repeat(MAX_TAG_VALUE_LEN + 1));
        let e = meta.validate().unwrap_err();
        assert_eq!((e.field, e.max), ("tag value", MAX_TAG_VALUE_LEN));
        let mut many = CorrelationMetadata::root("c", 1);
        for i in 0..=MAX_TAGS {
            many.tags.insert(format!("k{i}"), String::new());
        }
        assert_eq!(many.validate().unwrap_err().field, "tags");
        let long = CorrelationMetadata::root("é".repeat(200), 1);
        assert!(
            long.correlation_id.len() <= MAX_CORRELATION_ID_LEN,
            "root() cuts on a boundary"
        );
        assert_eq!(long.validate(), Ok(()));
    }
}
