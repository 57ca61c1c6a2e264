//! Message runs: consecutive messages of one QoS on one topic from one publisher, carried in
//! one PUBLISH_RUN or DELIVER_RUN frame (protocol 1.2; Processed runs, and DELIVER_ACKED_RUN,
//! since 1.4).
//!
//! A publisher whose outgoing queue holds several messages for the same topic sends them as a
//! run; the broker routes the run once and forwards its bytes verbatim to every subscriber, and
//! the subscriber reads the messages back one by one. Nothing waits to form a run: a message
//! published while the queue is empty leaves alone, as a run of one.
//!
//! Body layout (after the kind byte): `topic16`, `count: u16`, then `count` entries of
//! `header_len: u32`, header (as in a message body), `payload_len: u32`, payload.

use super::body::{DecodeCache, check_run_header, decode_header, decode_source, encode_header};
use super::wire::{Cursor, begin, encode_frame_head, finish};
use super::{FrameError, LEN_PREFIX, kind};
use crate::bytestr::ByteStr;
use crate::message::{Header, MESSAGE_OVERHEAD, Message, MessageId, Qos};
use crate::topic::Topic;
use bytes::{BufMut, Bytes, BytesMut};

/// Whether a message may travel in a run: not a request, not a reply, and Realtime, or
/// Processed when the peer reads Processed runs (`processed`: protocol 1.4).
pub fn may_run(header: &Header, processed: bool) -> bool {
    header.reply_to.is_none()
        && header.status.is_none()
        && (header.qos == Qos::Realtime || processed && header.qos == Qos::Processed)
}

/// A contiguous part of a run's entries: `count` entries that fill bytes `start..end` of the
/// run's body. What a broker sends of a run an acknowledged subscription kept, when the
/// subscriber's window, or acknowledgements, leave only part of it to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunPart {
    /// Entries in the part (at least one).
    pub count: u16,
    /// Offset of the part's first entry in the body.
    pub start: u32,
    /// Offset just past its last entry.
    pub end: u32,
}

/// A run of messages on one topic, as received: the frame body is kept and forwarded verbatim,
/// the messages are read from it on demand ([`MessageRun::messages`]).
#[derive(Clone, Debug)]
pub struct MessageRun {
    topic: Topic,
    count: u32,
    /// The first message's source (in a PUBLISH_RUN, every message's).
    source: ByteStr,
    /// The first message's QoS (in a PUBLISH_RUN, every message's).
    qos: Qos,
    /// The last message's id; read only for a PUBLISH_RUN (see [`MessageRun::last_id`]).
    last_id: Option<MessageId>,
    body: Bytes,
    /// Offset of the first entry in `body`.
    entries_at: usize,
    payload_bytes: usize,
    max_payload: usize,
    /// What this copy holds of a budget, shared by its clones (see
    /// [`MessageRun::is_charged`]).
    charge: Option<std::sync::Arc<crate::budget::Charge>>,
}

impl PartialEq for MessageRun {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
    }
}

impl MessageRun {
    /// The topic every message of the run carries.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The publisher's name, from the first message (the broker checks that every message of
    /// a PUBLISH_RUN has the same).
    pub fn source(&self) -> &ByteStr {
        &self.source
    }

    /// The first message's QoS; in a PUBLISH_RUN, which the broker checks, every message's.
    pub fn qos(&self) -> Qos {
        self.qos
    }

    /// The last message's id, read for a run a broker decoded from a PUBLISH_RUN (its
    /// publisher's acknowledgement of a Processed run names it); `None` for a delivered run.
    pub fn last_id(&self) -> Option<MessageId> {
        self.last_id
    }

    /// Number of messages (at least one).
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Always `false`: a run holds at least one message.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frame body (topic, count, entries), forwarded verbatim.
    pub fn wire(&self) -> &Bytes {
        &self.body
    }

    /// Sum of the payload sizes.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    /// The largest payload in the run.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Bytes charged to queues: what [`Message::accounted_size`] charges for each message.
    pub fn accounted_size(&self) -> usize {
        self.payload_bytes + self.len() * (self.topic.as_str().len() + MESSAGE_OVERHEAD)
    }

    /// This run holding only its own bytes: the body is copied (exactly its length). What
    /// [`super::Lent::keep`] gives for a run lent from a read buffer.
    pub(crate) fn copied(&self) -> Self {
        let mut run = self.clone();
        run.body = super::pool::copy(&self.body);
        run.charge = None;
        run
    }

    /// [`MessageRun::copied`], charged to `budget` for its [`MessageRun::accounted_size`]
    /// until its last clone is dropped. `None` when the budget has no room.
    pub(crate) fn copied_charged(
        &self,
        budget: &std::sync::Arc<crate::budget::Budget>,
    ) -> Option<Self> {
        let charge = crate::budget::Charge::take(budget, self.accounted_size())?;
        let mut run = self.copied();
        run.charge = Some(std::sync::Arc::new(charge));
        Some(run)
    }

    /// Whether this run holds a charge against a budget (made by
    /// [`super::Lent::keep_charged`]): whoever keeps a clone need not charge it again.
    pub fn is_charged(&self) -> bool {
        self.charge.is_some()
    }

    /// The whole run as a [`RunPart`].
    pub fn whole(&self) -> RunPart {
        RunPart {
            count: u16::try_from(self.count).expect("a run holds at most 65535 messages"),
            start: u32::try_from(self.entries_at).expect("a frame is below 4 GiB"),
            end: u32::try_from(self.body.len()).expect("a frame is below 4 GiB"),
        }
    }

    /// Where each entry starts in the body, and (last) where the body ends: `len() + 1`
    /// offsets. With [`MessageRun::entry_charge`], what a keeper of single entries needs.
    pub fn entry_starts(&self) -> Vec<u32> {
        let mut starts = Vec::with_capacity(self.len() + 1);
        let mut at = self.entries_at;
        // The decoder checked every entry's lengths against the body.
        for _ in 0..self.count {
            starts.push(u32::try_from(at).expect("a frame is below 4 GiB"));
            at += 4 + self.len_at(at);
            at += 4 + self.len_at(at);
        }
        starts.push(u32::try_from(at).expect("a frame is below 4 GiB"));
        starts
    }

    /// What [`Message::accounted_size`] charges for the entry at `start..end` (two
    /// consecutive [`MessageRun::entry_starts`]).
    pub fn entry_charge(&self, start: u32, end: u32) -> usize {
        let header = 4 + self.len_at(start as usize);
        (end - start) as usize - header - 4 + self.topic.as_str().len() + MESSAGE_OVERHEAD
    }

    /// The run made of `part` of its entries alone, in a body of its own (copied).
    pub fn slice(&self, part: RunPart) -> Self {
        if part == self.whole() {
            return self.clone();
        }
        let topic = &self.body[..self.entries_at - 2];
        let entries = &self.body[part.start as usize..part.end as usize];
        let mut body = BytesMut::with_capacity(topic.len() + 2 + entries.len());
        body.put_slice(topic);
        body.put_u16_le(part.count);
        body.put_slice(entries);
        let mut run = self.clone();
        run.body = body.freeze();
        run.count = u32::from(part.count);
        run.charge = None;
        run.last_id = None;
        let (mut payload_bytes, mut max_payload) = (0, 0);
        let starts = run.entry_starts();
        for w in starts.windows(2) {
            let plen = run.entry_charge(w[0], w[1]) - run.topic.as_str().len() - MESSAGE_OVERHEAD;
            payload_bytes += plen;
            max_payload = max_payload.max(plen);
        }
        (run.payload_bytes, run.max_payload) = (payload_bytes, max_payload);
        run
    }

    fn len_at(&self, at: usize) -> usize {
        let mut le = [0u8; 4];
        le.copy_from_slice(&self.body[at..at + 4]);
        u32::from_le_bytes(le) as usize
    }

    /// The messages, in order, each sharing the run's bytes (the payload is not copied).
    pub fn messages(&self) -> RunMessages<'_> {
        let mut cursor = Cursor::new(self.body.clone());
        cursor.skip(self.entries_at);
        RunMessages {
            run: self,
            cursor,
            left: self.count,
            cache: DecodeCache::with_source(Some(self.source.clone())),
        }
    }

    /// Reads a run body. Every entry's lengths are checked; with `strict` (a PUBLISH_RUN, read
    /// by the broker) every header is decoded too and must have the first one's QoS
    /// (Realtime or Processed) and `source`, and no `reply_to` or status. Of a delivered run's
    /// headers only the first QoS and source are read here; the headers are decoded when the
    /// messages are read.
    pub(super) fn decode(
        body: Bytes,
        strict: bool,
        cache: &mut DecodeCache,
    ) -> Result<Self, FrameError> {
        let mut c = Cursor::new(body);
        let own = cache.lends(c.body());
        let topic = c.topic_cached("run.topic", &mut cache.topics, own)?;
        let count = c.u16("run.count")?;
        if count == 0 {
            return Err(FrameError::InvalidValue {
                field: "run.count",
                value: 0,
            });
        }
        let entries_at = c.position();
        let (mut payload_bytes, mut max_payload) = (0, 0);
        let mut source = None;
        let (mut qos, mut last_id) = (None, None);
        for _ in 0..count {
            let hlen = c.u32("run.header_len")? as usize;
            if strict {
                let outer = c.narrow(hlen, "run.header")?;
                last_id = Some(check_run_header(&mut c, cache, &mut source, &mut qos)?);
                c.widen(outer);
            } else if source.is_none() {
                let outer = c.narrow(hlen, "run.header")?;
                let (q, s) = decode_source(&mut c, cache)?;
                (qos, source) = (Some(q), Some(s));
                c.widen(outer);
            } else {
                c.need(hlen, "run.header")?;
                c.skip(hlen);
            }
            let plen = c.u32("run.payload_len")? as usize;
            c.need(plen, "run.payload")?;
            c.skip(plen);
            payload_bytes += plen;
            max_payload = max_payload.max(plen);
        }
        let body = c.finish()?;
        let source = source.ok_or(FrameError::InvalidRun("a run holds at least one message"))?;
        Ok(Self {
            topic,
            count: u32::from(count),
            source,
            qos: qos.unwrap_or_default(),
            last_id,
            body,
            entries_at,
            payload_bytes,
            max_payload,
            charge: None,
        })
    }
}

/// The messages of a [`MessageRun`], decoded one by one.
pub struct RunMessages<'a> {
    run: &'a MessageRun,
    cursor: Cursor,
    left: u32,
    cache: DecodeCache,
}

impl Iterator for RunMessages<'_> {
    type Item = Result<Message, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let c = &mut self.cursor;
        let entry = (|| {
            let hlen = c.u32("run.header_len")? as usize;
            let outer = c.narrow(hlen, "run.header")?;
            let header = decode_header(c, &mut self.cache)?;
            c.widen(outer);
            let plen = c.u32("run.payload_len")? as usize;
            let payload = c.take(plen, "run.payload")?;
            Ok(Message::from_run(self.run.topic.clone(), header, payload))
        })();
        if entry.is_err() {
            // The rest cannot be trusted once one entry failed.
            self.left = 0;
        }
        Some(entry)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

/// A PUBLISH_RUN being written into a buffer: messages are appended while it stays open, and
/// its length prefix and count are kept up to date, so the buffer always holds complete frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunWriter {
    /// Offset of the frame's length prefix in the buffer.
    start: usize,
    /// Length of the topic, which the buffer holds right after the frame's kind byte and
    /// its own length (the writer keeps no copy of it).
    topic_len: usize,
    /// The QoS of every message of the run.
    qos: Qos,
    count: u16,
}

/// Offset of a run's topic from the start of its frame: length prefix, kind, topic length.
const RUN_TOPIC_AT: usize = LEN_PREFIX + 1 + 2;

impl RunWriter {
    /// Starts a PUBLISH_RUN of `qos` messages on `topic` at the end of `dst`, holding no
    /// message yet (append one before the buffer is sent: a run of zero messages is malformed).
    pub fn begin(dst: &mut BytesMut, topic: &Topic, qos: Qos) -> Self {
        let start = begin(dst, kind::PUBLISH_RUN);
        super::wire::put_str16(dst, topic.as_str());
        dst.put_u16_le(0);
        finish(dst, start);
        Self {
            start,
            topic_len: topic.as_str().len(),
            qos,
            count: 0,
        }
    }

    /// Turns the PUBLISH frame at the end of `dst` (from offset `start`: exactly one frame,
    /// as [`super::encode_publish`] writes it) into a PUBLISH_RUN holding that one message,
    /// which `qos` must be, open for more. A writer that sends a lone message as a PUBLISH
    /// (read with less work than a run of one) calls this when a second one can join it.
    ///
    /// # Panics
    ///
    /// When `dst[start..]` is not one whole PUBLISH frame.
    pub fn from_publish(dst: &mut BytesMut, start: usize, qos: Qos) -> Self {
        let kind_at = start + LEN_PREFIX;
        assert_eq!(dst[kind_at], kind::PUBLISH, "a PUBLISH frame");
        let read_u16 = |b: &[u8], at: usize| usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
        let topic_len = read_u16(dst, kind_at + 1);
        let topic_end = kind_at + 3 + topic_len;
        let mut le = [0u8; 4];
        le.copy_from_slice(&dst[topic_end..topic_end + 4]);
        let header_end = topic_end + 4 + u32::from_le_bytes(le) as usize;
        // Header and payload move up to make room for the count and the payload's length.
        let tail = dst[topic_end..].to_vec();
        dst.truncate(topic_end);
        dst.put_u16_le(1);
        let (header, payload) = tail.split_at(header_end - topic_end);
        dst.put_slice(header);
        dst.put_u32_le(u32::try_from(payload.len()).expect("payload below 4 GiB"));
        dst.put_slice(payload);
        dst[kind_at] = kind::PUBLISH_RUN;
        finish(dst, start);
        Self {
            start,
            topic_len,
            qos,
            count: 1,
        }
    }

    /// Whether the run holds `qos` messages on `topic`; `dst` is the buffer it is written
    /// into.
    pub fn is_on(&self, dst: &[u8], topic: &Topic, qos: Qos) -> bool {
        let at = self.start + RUN_TOPIC_AT;
        self.qos == qos && dst.get(at..at + self.topic_len) == Some(topic.as_str().as_bytes())
    }

    /// Messages appended so far.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    /// Offset of the frame in the buffer it is written into.
    pub fn start(&self) -> usize {
        self.start
    }

    /// Whether no message was appended yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The frame's size so far, length prefix included.
    pub fn frame_len(&self, dst: &BytesMut) -> usize {
        dst.len() - self.start
    }

    /// Whether the run can take another message (at most `u16::MAX`).
    pub fn has_room(&self) -> bool {
        self.count < u16::MAX
    }

    /// Appends one message; `dst` must end with this run (nothing written after it).
    ///
    /// # Panics
    ///
    /// When the run already holds `u16::MAX` messages ([`RunWriter::has_room`]), or `header`
    /// has another QoS than the run.
    pub fn push(&mut self, dst: &mut BytesMut, header: &Header, payload: &[u8]) {
        assert!(self.has_room(), "a run holds at most 65535 messages");
        assert_eq!(header.qos, self.qos, "a run holds messages of one QoS");
        let len_at = dst.len();
        dst.put_u32_le(0);
        encode_header(dst, header);
        let hlen = u32::try_from(dst.len() - len_at - 4).expect("header below 4 GiB");
        dst[len_at..len_at + 4].copy_from_slice(&hlen.to_le_bytes());
        dst.put_u32_le(u32::try_from(payload.len()).expect("payload below 4 GiB"));
        dst.put_slice(payload);
        self.count += 1;
        let count_at = self.start + RUN_TOPIC_AT + self.topic_len;
        dst[count_at..count_at + 2].copy_from_slice(&self.count.to_le_bytes());
        finish(dst, self.start);
    }
}

/// Appends the run's messages as DELIVER frames, one per message, each made of the run's topic
/// and the message's header and payload bytes copied verbatim (header fields of a later minor
/// version included). For a client before protocol 1.2, and for a run of one message, which a
/// subscriber reads faster as a plain DELIVER.
pub fn encode_run_as_delivers(dst: &mut BytesMut, run: &MessageRun) {
    let body = run.wire();
    // `topic16`: everything before the count.
    let topic = &body[..run.entries_at - 2];
    let len_at = |at: usize| {
        let mut le = [0u8; 4];
        le.copy_from_slice(&body[at..at + 4]);
        u32::from_le_bytes(le) as usize
    };
    dst.reserve(body.len() + run.len() * (LEN_PREFIX + 1 + topic.len()));
    let mut at = run.entries_at;
    // The decoder checked every entry's lengths against the body.
    for _ in 0..run.count {
        let header = &body[at..at + 4 + len_at(at)];
        at += header.len();
        let plen = len_at(at);
        let payload = &body[at + 4..at + 4 + plen];
        at += 4 + plen;
        encode_frame_head(
            dst,
            kind::DELIVER,
            topic.len() + header.len() + payload.len(),
        );
        dst.put_slice(topic);
        dst.put_slice(header);
        dst.put_slice(payload);
    }
}

/// Appends a run as a subscriber receives it: one DELIVER_RUN frame, or one DELIVER frame per
/// message for a run of one (which a subscriber reads with less work) and for a peer before
/// protocol 1.2 (`runs` false).
pub fn encode_run_delivery(dst: &mut BytesMut, run: &MessageRun, runs: bool) {
    if runs && run.len() > 1 {
        encode_run_frame(dst, kind::DELIVER_RUN, run);
    } else {
        encode_run_as_delivers(dst, run);
    }
}

/// Appends a run frame of `kind` ([`kind::PUBLISH_RUN`] or [`kind::DELIVER_RUN`]) carrying the
/// run's bytes.
pub fn encode_run_frame(dst: &mut BytesMut, kind: u8, run: &MessageRun) {
    dst.reserve(LEN_PREFIX + 1 + run.wire().len());
    encode_frame_head(dst, kind, run.wire().len());
    dst.put_slice(run.wire());
}

/// Appends `part` of a run an acknowledged subscription kept, numbered from `seq`: one
/// DELIVER_ACKED_RUN frame (protocol 1.4) when the subscriber reads them (`runs`) and the part
/// holds several messages, otherwise one DELIVER_ACKED frame per message, numbered `seq`,
/// `seq + 1`, …, each made of the run's topic and the entry's header and payload bytes
/// verbatim.
pub fn encode_acked_run(
    dst: &mut BytesMut,
    head: AckedHead,
    run: &MessageRun,
    part: RunPart,
    runs: bool,
) {
    let body = run.wire();
    let topic = &body[..run.entries_at - 2];
    let entries = &body[part.start as usize..part.end as usize];
    if runs && part.count > 1 {
        let len = super::body::ACKED_HEAD + topic.len() + 2 + entries.len();
        dst.reserve(LEN_PREFIX + 1 + len);
        encode_frame_head(dst, kind::DELIVER_ACKED_RUN, len);
        dst.put_u32_le(head.sub.0);
        dst.put_u64_le(head.seq);
        dst.put_u16_le(head.redelivered);
        dst.put_slice(topic);
        dst.put_u16_le(part.count);
        dst.put_slice(entries);
        return;
    }
    dst.reserve(
        entries.len()
            + usize::from(part.count) * (LEN_PREFIX + 1 + super::body::ACKED_HEAD + topic.len()),
    );
    let mut at = part.start as usize;
    for i in 0..u64::from(part.count) {
        let header = &body[at..at + 4 + run.len_at(at)];
        at += header.len();
        let plen = run.len_at(at);
        let payload = &body[at + 4..at + 4 + plen];
        at += 4 + plen;
        super::body::encode_acked_frame_head(
            dst,
            head.sub,
            head.seq + i,
            head.redelivered,
            topic.len() + header.len() + payload.len(),
        );
        dst.put_slice(topic);
        dst.put_slice(header);
        dst.put_slice(payload);
    }
}

/// The fields of a DELIVER_ACKED or DELIVER_ACKED_RUN frame before the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckedHead {
    /// The subscription.
    pub sub: super::SubId,
    /// The (first) message's delivery sequence number; the next messages of a run get the
    /// next numbers.
    pub seq: u64,
    /// How many times the messages were delivered before.
    pub redelivered: u16,
}
