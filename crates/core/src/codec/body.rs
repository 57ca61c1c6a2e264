//! The message body shared by PUBLISH and DELIVER: topic, compact header, payload.

use super::types::GroupDelivery;
use super::wire::{Cursor, begin, encode_frame_head, finish, put_opt_str16, put_str8, put_str16};
use super::{
    FLAG_CORRELATION, FLAG_DEADLINE, FLAG_QOS_MASK, FLAG_REPLY_TO, FLAG_STATUS, FrameError,
    LEN_PREFIX, MAX_NAME_LEN, kind,
};
use crate::bytestr::ByteStr;
use crate::message::{
    CorrelationMetadata, Header, MAX_CORRELATION_ID_LEN, MAX_STAGE_LEN, MAX_STATUS_MESSAGE_LEN,
    MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, MAX_TAGS, Message, MessageId, Qos, ReplyStatus, StatusCode,
    truncate_utf8,
};
use crate::topic::Topic;
use crate::topic_cache::TopicCache;
use bytes::{BufMut, Bytes, BytesMut};

pub(super) fn encode_header(dst: &mut BytesMut, h: &Header) {
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
    if h.status.is_some() {
        flags |= FLAG_STATUS;
    }
    // The fixed fields in one copy.
    let mut fixed = [0u8; HEADER_BEFORE_SOURCE];
    fixed[0] = flags;
    fixed[1..9].copy_from_slice(&h.id.publisher.to_le_bytes());
    fixed[9..17].copy_from_slice(&h.id.sequence.to_le_bytes());
    fixed[17..].copy_from_slice(&h.timestamp_ns.to_le_bytes());
    dst.put_slice(&fixed);
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
    if let Some(st) = &h.status {
        dst.put_u8(st.code.to_u8());
        if st.message.len() > MAX_STATUS_MESSAGE_LEN {
            put_str16(
                dst,
                &truncate_utf8(st.message.clone(), MAX_STATUS_MESSAGE_LEN),
            );
        } else {
            put_str16(dst, &st.message);
        }
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
    dst.reserve(LEN_PREFIX + 1 + msg.wire().len());
    encode_frame_head(dst, kind, msg.wire().len());
    dst.put_slice(msg.wire());
}

/// Bytes of a DELIVER_ACKED frame before the message body: subscription, sequence,
/// redelivery count.
pub const ACKED_HEAD: usize = 4 + 8 + 2;

/// Appends a DELIVER_ACKED frame (protocol 1.3) of `d`: its fields, then the message's shared
/// wire encoding.
pub fn encode_acked_frame(dst: &mut BytesMut, d: &super::AckedDelivery) {
    let wire = d.message.wire();
    encode_acked_frame_head(dst, d.sub, d.seq, d.redelivered, wire.len());
    dst.put_slice(wire);
}

/// Appends a DELIVER_ACKED frame without the message body, which the caller sends next from
/// the message's own buffer (`body_len` bytes).
pub fn encode_acked_frame_head(
    dst: &mut BytesMut,
    sub: super::SubId,
    seq: u64,
    redelivered: u16,
    body_len: usize,
) {
    dst.reserve(LEN_PREFIX + 1 + ACKED_HEAD + body_len.min(super::decoder::COPY_BELOW));
    encode_frame_head(dst, kind::DELIVER_ACKED, ACKED_HEAD + body_len);
    dst.put_u32_le(sub.0);
    dst.put_u64_le(seq);
    dst.put_u16_le(redelivered);
}

/// Appends a DELIVER_GROUP frame: the group name, then the message's shared wire encoding.
pub fn encode_group_frame(dst: &mut BytesMut, d: &GroupDelivery) {
    let wire = d.message.wire();
    encode_group_frame_head(dst, d, wire.len());
    dst.put_slice(wire);
}

/// Appends a DELIVER_GROUP frame without the message body, which the caller sends next from
/// the message's own buffer ([`Message::wire`], `body_len` bytes).
pub fn encode_group_frame_head(dst: &mut BytesMut, d: &GroupDelivery, body_len: usize) {
    let group = d.group.as_str();
    let len = u32::try_from(1 + 1 + group.len() + body_len).expect("frame below 4 GiB");
    dst.reserve(LEN_PREFIX + 2 + group.len());
    dst.put_u32_le(len);
    dst.put_u8(kind::DELIVER_GROUP);
    put_str8(dst, group);
}

/// Topics decoded lately on one connection, and the source of its last message.
///
/// A connection cycles through a bounded set of topics, and its messages usually repeat one
/// source. A topic seen lately is recognised with one hash and one comparison and shared
/// (a [`TopicCache`] of at most [`DECODE_TOPICS`] copies), instead of being validated and
/// sliced again; a repeated source with one comparison. Topics and the source are
/// remembered as copies, so the cache never holds a read buffer (or a chunk) alive.
///
/// It also says what becomes of small frames (`Small`): each copied into a buffer of its
/// own (the default), carved from a shared chunk ([`DecodeCache::carving`]), or lent from the
/// read buffer ([`DecodeCache::lending`]).
#[derive(Debug)]
pub struct DecodeCache {
    pub(super) topics: TopicCache<()>,
    source: Option<ByteStr>,
    pub(super) small: Small,
}

/// Where a small frame's bytes (below [`super::decoder::COPY_BELOW`]) live once it is split off the
/// read buffer. (Larger frames are always slices of the read buffer, which then holds
/// mostly their own bytes.)
#[derive(Debug)]
pub(super) enum Small {
    /// Copied into a recycled buffer of its own (`pool`).
    Own,
    /// Copied into the shared chunk (see [`DecodeCache::carving`]).
    Carve(BytesMut),
    /// Left in the read buffer (see [`DecodeCache::lending`]).
    Lend,
}

/// Bytes of the chunks [`DecodeCache::carving`] carves frames from.
pub const CARVE_CHUNK: usize = 16 * 1024;

/// Most topics one connection's [`DecodeCache`] remembers.
pub const DECODE_TOPICS: usize = 4096;

impl Default for DecodeCache {
    fn default() -> Self {
        Self::with_source(None)
    }
}

impl DecodeCache {
    /// A cache that knows the source the next message probably carries.
    pub(super) fn with_source(source: Option<ByteStr>) -> Self {
        Self {
            topics: TopicCache::new(DECODE_TOPICS),
            source,
            small: Small::Own,
        }
    }

    /// A cache whose connection copies small frames into shared chunks of [`CARVE_CHUNK`]
    /// bytes instead of one buffer each: a copy then costs no allocation and no pool, and a
    /// chunk whose frames are all dropped is reused in place. For a reader that hands messages
    /// to an application (the client): a message the application keeps holds its whole chunk
    /// (16 KiB at most) alive, which a broker, accounting queued bytes exactly, must not do.
    pub fn carving() -> Self {
        Self {
            small: Small::Carve(BytesMut::new()),
            ..Self::default()
        }
    }

    /// A cache whose connection copies nothing: small frames stay slices of the read buffer,
    /// and so do the payloads and bodies of the messages and runs decoded from them; every
    /// other field is a copy. For a reader that is done with each frame before it reads
    /// again (the broker), through [`super::FrameDecoder::decode_lent`]: its messages and
    /// runs come as [`super::Lent`] values, which cannot outlive the read and give an owned
    /// copy of exactly their own bytes only through [`super::Lent::keep`]. The buffer is then
    /// reclaimed in place.
    pub fn lending() -> Self {
        Self {
            small: Small::Lend,
            ..Self::default()
        }
    }

    /// Whether messages decoded from a `body` of this length share the read buffer.
    pub(super) fn lends(&self, body: &Bytes) -> bool {
        matches!(self.small, Small::Lend) && body.len() < super::decoder::COPY_BELOW
    }
}

/// Bytes of a header before its source: flags, message id, timestamp.
const HEADER_BEFORE_SOURCE: usize = 1 + 16 + 8;

/// Reads only the source of a header, from a cursor narrowed to it.
pub(super) fn decode_source(
    c: &mut Cursor,
    cache: &mut DecodeCache,
) -> Result<(Qos, ByteStr), FrameError> {
    c.need(HEADER_BEFORE_SOURCE, "header")?;
    let flags = c.u8("header.flags")?;
    let qos = c.qos(flags & FLAG_QOS_MASK)?;
    c.skip(HEADER_BEFORE_SOURCE - 1);
    Ok((
        qos,
        c.str8_cached(MAX_NAME_LEN, "header.source", &mut cache.source)?,
    ))
}

/// Checks the header of a PUBLISH_RUN entry, from a cursor narrowed to it, without building
/// it: what [`decode_header`] checks, and the rules of a run (`docs/protocol.md` §3.10): no
/// reply_to or status, and the QoS (`qos`) and source (`source`) of the first entry (set by
/// the first). Returns the message's id.
pub(super) fn check_run_header(
    c: &mut Cursor,
    cache: &mut DecodeCache,
    source: &mut Option<ByteStr>,
    qos: &mut Option<Qos>,
) -> Result<MessageId, FrameError> {
    let flags = c.u8("header.flags")?;
    if flags & (FLAG_REPLY_TO | FLAG_STATUS) != 0 {
        return Err(FrameError::InvalidRun(
            "a run carries no request (reply_to) and no reply (status)",
        ));
    }
    let this = c.qos(flags & FLAG_QOS_MASK)?;
    if *qos.get_or_insert(this) != this {
        return Err(FrameError::InvalidRun(
            "every message of a run must have the same QoS",
        ));
    }
    let id = c.id()?;
    c.need(HEADER_BEFORE_SOURCE - 17, "header")?;
    c.skip(HEADER_BEFORE_SOURCE - 17);
    match source {
        None => *source = Some(c.str8_cached(MAX_NAME_LEN, "header.source", &mut cache.source)?),
        Some(first) => {
            let len = usize::from(c.u8("header.source")?);
            c.need(len, "header.source")?;
            if !c.skip_if_equal(len, first.as_str().as_bytes()) {
                return Err(FrameError::InvalidRun(
                    "every message of a run must have the same source",
                ));
            }
        }
    }
    if flags & FLAG_DEADLINE != 0 {
        c.u64("header.deadline")?;
    }
    if flags & FLAG_CORRELATION != 0 {
        decode_correlation(c)?;
    }
    Ok(id)
}

/// Decodes a header from a cursor narrowed to it.
pub(super) fn decode_header(c: &mut Cursor, cache: &mut DecodeCache) -> Result<Header, FrameError> {
    let flags = c.u8("header.flags")?;
    let qos = c.qos(flags & FLAG_QOS_MASK)?;
    let id = c.id()?;
    let timestamp_ns = c.u64("header.timestamp")?;
    let source = c.str8_cached(MAX_NAME_LEN, "header.source", &mut cache.source)?;
    let reply_to = if flags & FLAG_REPLY_TO != 0 {
        let topic = c.topic("header.reply_to")?;
        // A lending reader's messages hold no slice of its buffer but body and payload.
        Some(if cache.lends(c.body()) {
            topic.detached()
        } else {
            topic
        })
    } else {
        None
    };
    let deadline_ns = if flags & FLAG_DEADLINE != 0 {
        Some(c.u64("header.deadline")?)
    } else {
        None
    };
    let correlation = if flags & FLAG_CORRELATION != 0 {
        Some(Box::new(decode_correlation(c)?))
    } else {
        None
    };
    let status = if flags & FLAG_STATUS != 0 {
        Some(Box::new(ReplyStatus {
            code: StatusCode::from_u8(c.u8("header.status.code")?),
            message: c.string16(MAX_STATUS_MESSAGE_LEN, "header.status.message")?,
        }))
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
        status,
    })
}

fn decode_correlation(c: &mut Cursor) -> Result<CorrelationMetadata, FrameError> {
    let correlation_id = c.string16(MAX_CORRELATION_ID_LEN, "correlation.id")?;
    let parent_correlation_id = c.opt_str16(MAX_CORRELATION_ID_LEN, "correlation.parent")?;
    let root_correlation_id = c.string16(MAX_CORRELATION_ID_LEN, "correlation.root")?;
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
        let k = c.string8(MAX_TAG_KEY_LEN, "correlation.tag.key")?;
        let v = c.string16(MAX_TAG_VALUE_LEN, "correlation.tag.value")?;
        tags.insert(k, v);
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
///
/// `cache` remembers the topic and source for the next message of the same connection
/// (a fresh [`DecodeCache::default`] when there is no connection to speak of).
pub fn decode_message_body(body: Bytes, cache: &mut DecodeCache) -> Result<Message, FrameError> {
    let mut c = Cursor::new(body);
    let own = cache.lends(c.body());
    let topic = c.topic_cached("topic", &mut cache.topics, own)?;
    let hlen = c.u32("header_len")? as usize;
    let outer = c.narrow(hlen, "header")?;
    let header = decode_header(&mut c, cache)?;
    c.widen(outer);
    let (payload, wire) = c.into_rest();
    Ok(Message::with_wire(topic, header, payload, wire))
}
