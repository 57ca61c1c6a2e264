//! Splitting frames off a byte stream.

use super::types::Frame;
use super::{FrameError, LEN_PREFIX};
use bytes::{Buf, Bytes, BytesMut};

/// The most a partial frame makes [`FrameDecoder`] reserve at once.
const GROW_STEP: usize = 256 * 1024;

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
            // Grow as bytes arrive, not by the announced length: four header bytes must not
            // make the receiver reserve a whole maximum-size frame.
            buf.reserve((LEN_PREFIX + len - buf.len()).min(GROW_STEP));
            return Ok(None);
        }
        buf.advance(LEN_PREFIX);
        let mut frame = buf.split_to(len).freeze();
        let kind = frame.get_u8();
        Ok(Some((kind, frame)))
    }
}
