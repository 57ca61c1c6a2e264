//! Field-level encoding and the zero-copy read cursor shared by every frame.

use super::FrameError;
use crate::bytestr::ByteStr;
use crate::group::{DurableName, QueueGroup};
use crate::message::{MessageId, Qos};
use crate::topic::{Topic, TopicFilter};
use crate::topic_cache::TopicCache;
use bytes::{BufMut, Bytes, BytesMut};

use super::LEN_PREFIX;

pub(super) fn put_str8(dst: &mut BytesMut, s: &str) {
    let len = s.len().min(u8::MAX as usize);
    dst.put_u8(len as u8);
    dst.put_slice(&s.as_bytes()[..len]);
}

pub(super) fn put_str16(dst: &mut BytesMut, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    dst.put_u16_le(len as u16);
    dst.put_slice(&s.as_bytes()[..len]);
}

pub(super) fn put_opt_str16(dst: &mut BytesMut, s: Option<&str>) {
    put_str16(dst, s.unwrap_or(""));
}

/// Starts a frame: reserves the length prefix and writes the kind; returns the frame start.
pub(super) fn begin(dst: &mut BytesMut, kind: u8) -> usize {
    let start = dst.len();
    dst.put_u32_le(0);
    dst.put_u8(kind);
    start
}

/// Appends the length prefix and kind of a frame whose body of `body_len` bytes the caller
/// sends next (in the same buffer, or as its own `writev` segment).
pub fn encode_frame_head(dst: &mut BytesMut, kind: u8, body_len: usize) {
    let len = u32::try_from(body_len + 1).expect("frame below 4 GiB");
    dst.put_u32_le(len);
    dst.put_u8(kind);
}

/// Back-fills the length prefix of the frame begun at `start`.
pub(super) fn finish(dst: &mut BytesMut, start: usize) {
    let len = u32::try_from(dst.len() - start - LEN_PREFIX).expect("frame below 4 GiB");
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

pub(super) fn put_id(dst: &mut BytesMut, id: MessageId) {
    dst.put_u64_le(id.publisher);
    dst.put_u64_le(id.sequence);
}

/// A read position in a shared body. Fields are read by offset; a `Bytes` slice (one
/// reference-count increment) is made only for what a message keeps: topic, source, payload.
pub(super) struct Cursor {
    base: Bytes,
    pos: usize,
    /// Reads stop here (narrowed while a header is parsed).
    end: usize,
}

impl Cursor {
    pub(super) fn new(base: Bytes) -> Self {
        let end = base.len();
        Self { base, pos: 0, end }
    }
    pub(super) fn need(&self, n: usize, field: &'static str) -> Result<(), FrameError> {
        if self.end - self.pos < n {
            return Err(FrameError::Truncated(field));
        }
        Ok(())
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        self.need(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.base[self.pos..self.pos + N]);
        self.pos += N;
        Ok(out)
    }
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// The next `n` bytes as a shared slice.
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, FrameError> {
        self.need(n, field)?;
        let b = self.base.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }
    /// The next `len` bytes as `&str`, without making a slice.
    fn str_ref(&mut self, len: usize, max: usize, field: &'static str) -> Result<&str, FrameError> {
        if len > max {
            return Err(FrameError::FieldTooLong { field, len, max });
        }
        self.need(len, field)?;
        let start = self.pos;
        self.pos += len;
        std::str::from_utf8(&self.base[start..start + len])
            .map_err(|_| FrameError::InvalidUtf8(field))
    }
    /// A `u8`-length-prefixed string, owned.
    pub(super) fn string8(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<String, FrameError> {
        let len = self.u8(field)? as usize;
        Ok(self.str_ref(len, max, field)?.to_owned())
    }
    /// A `u16`-length-prefixed string, owned.
    pub(super) fn string16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<String, FrameError> {
        let len = self.u16(field)? as usize;
        Ok(self.str_ref(len, max, field)?.to_owned())
    }
    /// A `u16`-length-prefixed string where empty means absent.
    pub(super) fn opt_str16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Option<String>, FrameError> {
        let s = self.string16(max, field)?;
        Ok((!s.is_empty()).then_some(s))
    }
    pub(super) fn topic(&mut self, field: &'static str) -> Result<Topic, FrameError> {
        let len = self.u16(field)? as usize;
        Ok(Topic::from_bytes(self.take(len, field)?)?)
    }
    /// Whether the next `len` bytes equal `known`; if so they are skipped.
    pub(super) fn skip_if_equal(&mut self, len: usize, known: &[u8]) -> bool {
        let hit = known.len() == len && self.base[self.pos..self.pos + len] == *known;
        if hit {
            self.pos += len;
        }
        hit
    }
    /// A topic, shared with the connection's `topics` (and not validated again) when it was
    /// seen lately; otherwise validated and remembered (as a copy). A topic that is not
    /// remembered (a reply inbox) is a slice of the body, or with `own` a copy.
    pub(super) fn topic_cached(
        &mut self,
        field: &'static str,
        topics: &mut TopicCache<()>,
        own: bool,
    ) -> Result<Topic, FrameError> {
        let len = self.u16(field)? as usize;
        self.need(len, field)?;
        let bytes = &self.base[self.pos..self.pos + len];
        let hash = TopicCache::<()>::hash(bytes);
        if let Some((t, ())) = topics.get(hash, bytes) {
            self.pos += len;
            return Ok(t.clone());
        }
        let topic = Topic::from_bytes(self.take(len, field)?)?;
        if topic.is_inbox() {
            // A reply topic is used once: remembering it would only evict topics that repeat.
            return Ok(if own { topic.detached() } else { topic });
        }
        Ok(topics.insert(hash, &topic).0.clone())
    }
    /// A `u8`-length-prefixed string kept as shared bytes, shared with `last` (and not
    /// validated again) when it repeats it.
    pub(super) fn str8_cached(
        &mut self,
        max: usize,
        field: &'static str,
        last: &mut Option<ByteStr>,
    ) -> Result<ByteStr, FrameError> {
        let len = self.u8(field)? as usize;
        if len > max {
            return Err(FrameError::FieldTooLong { field, len, max });
        }
        self.need(len, field)?;
        if let Some(s) = last.as_ref()
            && self.skip_if_equal(len, s.as_str().as_bytes())
        {
            return Ok(s.clone());
        }
        let s = ByteStr::from_utf8(self.take(len, field)?)
            .map_err(|_| FrameError::InvalidUtf8(field))?;
        // Remembered, and returned, as a copy: a slice would keep this frame's buffer (or the
        // chunk it was carved from) alive for as long as the source repeats.
        Ok(last.insert(ByteStr::from(s.as_str())).clone())
    }
    pub(super) fn filter(&mut self, field: &'static str) -> Result<TopicFilter, FrameError> {
        let len = self.u16(field)? as usize;
        Ok(TopicFilter::new(self.str_ref(
            len,
            u16::MAX as usize,
            field,
        )?)?)
    }
    pub(super) fn request_filter(&mut self, request_id: u32) -> Result<TopicFilter, FrameError> {
        self.filter("filter").map_err(|e| match e {
            FrameError::Topic(error) => FrameError::InvalidFilter { request_id, error },
            other => other,
        })
    }
    /// A `u8`-length-prefixed queue group name.
    pub(super) fn group(&mut self, request_id: u32) -> Result<QueueGroup, FrameError> {
        let len = self.u8("group")? as usize;
        let name = self.str_ref(len, u8::MAX as usize, "group")?;
        QueueGroup::new(name).map_err(|error| FrameError::InvalidGroup { request_id, error })
    }
    /// A `u8`-length-prefixed durable subscription name.
    pub(super) fn durable(&mut self, request_id: u32) -> Result<DurableName, FrameError> {
        let len = self.u8("name")? as usize;
        let name = self.str_ref(len, u8::MAX as usize, "name")?;
        DurableName::new(name).map_err(|error| FrameError::InvalidName { request_id, error })
    }
    pub(super) fn id(&mut self) -> Result<MessageId, FrameError> {
        Ok(MessageId {
            publisher: self.u64("message_id.publisher")?,
            sequence: self.u64("message_id.sequence")?,
        })
    }
    pub(super) fn qos(&mut self, bits: u8) -> Result<Qos, FrameError> {
        Qos::from_bits(bits).ok_or(FrameError::InvalidValue {
            field: "qos",
            value: u64::from(bits),
        })
    }
    /// Limits reads to the next `n` bytes (which must be there); returns the limit to give
    /// back to [`Cursor::widen`].
    pub(super) fn narrow(&mut self, n: usize, field: &'static str) -> Result<usize, FrameError> {
        self.need(n, field)?;
        let outer = self.end;
        self.end = self.pos + n;
        Ok(outer)
    }
    /// Skips what is left of the narrowed window (fields of a later minor version) and
    /// restores the outer limit.
    pub(super) fn widen(&mut self, outer: usize) {
        self.pos = self.end;
        self.end = outer;
    }
    /// The whole body being read.
    pub(super) fn body(&self) -> &Bytes {
        &self.base
    }
    /// The rest as a shared slice, and the whole body it came from.
    pub(super) fn into_rest(self) -> (Bytes, Bytes) {
        let rest = self.base.slice(self.pos..self.end);
        (rest, self.base)
    }
    /// Skips `n` bytes (the caller checked they are there with [`Cursor::need`]).
    pub(super) fn skip(&mut self, n: usize) {
        self.pos += n;
    }
    /// The read position.
    pub(super) fn position(&self) -> usize {
        self.pos
    }
    /// Checks that everything was read and gives the whole body back.
    pub(super) fn finish(self) -> Result<Bytes, FrameError> {
        match self.end - self.pos {
            0 => Ok(self.base),
            n => Err(FrameError::Trailing(n)),
        }
    }
    pub(super) fn end(self) -> Result<(), FrameError> {
        match self.end - self.pos {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}
