//! Field-level encoding and the zero-copy read cursor shared by every frame.

use super::FrameError;
use crate::bytestr::ByteStr;
use crate::message::{MessageId, Qos};
use crate::topic::{Topic, TopicFilter};
use bytes::{Buf, BufMut, Bytes, BytesMut};

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

/// Back-fills the length prefix of the frame begun at `start`.
pub(super) fn finish(dst: &mut BytesMut, start: usize) {
    let len = u32::try_from(dst.len() - start - LEN_PREFIX).expect("frame below 4 GiB");
    dst[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
}

pub(super) fn put_id(dst: &mut BytesMut, id: MessageId) {
    dst.put_u64_le(id.publisher);
    dst.put_u64_le(id.sequence);
}

/// A read position in a shared body; slices are zero-copy.
pub(super) struct Cursor {
    pub(super) buf: Bytes,
}

impl Cursor {
    pub(super) fn need(&self, n: usize, field: &'static str) -> Result<(), FrameError> {
        if self.buf.remaining() < n {
            return Err(FrameError::Truncated(field));
        }
        Ok(())
    }
    pub(super) fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        self.need(1, field)?;
        Ok(self.buf.get_u8())
    }
    pub(super) fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.need(2, field)?;
        Ok(self.buf.get_u16_le())
    }
    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.need(4, field)?;
        Ok(self.buf.get_u32_le())
    }
    pub(super) fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.need(8, field)?;
        Ok(self.buf.get_u64_le())
    }
    pub(super) fn take(&mut self, n: usize, field: &'static str) -> Result<Bytes, FrameError> {
        self.need(n, field)?;
        Ok(self.buf.split_to(n))
    }
    pub(super) fn str_bytes(
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
    pub(super) fn str8(&mut self, max: usize, field: &'static str) -> Result<ByteStr, FrameError> {
        let len = self.u8(field)? as usize;
        self.str_bytes(len, max, field)
    }
    pub(super) fn str16(&mut self, max: usize, field: &'static str) -> Result<ByteStr, FrameError> {
        let len = self.u16(field)? as usize;
        self.str_bytes(len, max, field)
    }
    pub(super) fn opt_str16(
        &mut self,
        max: usize,
        field: &'static str,
    ) -> Result<Option<String>, FrameError> {
        let s = self.str16(max, field)?;
        Ok((!s.is_empty()).then(|| s.to_string()))
    }
    pub(super) fn topic(&mut self, field: &'static str) -> Result<Topic, FrameError> {
        let len = self.u16(field)? as usize;
        Ok(Topic::from_bytes(self.take(len, field)?)?)
    }
    pub(super) fn filter(&mut self, field: &'static str) -> Result<TopicFilter, FrameError> {
        let s = self.str16(u16::MAX as usize, field)?;
        Ok(TopicFilter::new(s.as_str())?)
    }
    pub(super) fn request_filter(&mut self, request_id: u32) -> Result<TopicFilter, FrameError> {
        self.filter("filter").map_err(|e| match e {
            FrameError::Topic(error) => FrameError::InvalidFilter { request_id, error },
            other => other,
        })
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
    pub(super) fn end(self) -> Result<(), FrameError> {
        match self.buf.remaining() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }
}
