//! Splitting frames off a byte stream.

use super::body::{CARVE_CHUNK, DecodeCache, Small};
use super::lent::LentFrame;
use super::types::Frame;
use super::{FrameError, LEN_PREFIX};
use bytes::{Buf, Bytes, BytesMut};

/// Frames shorter than this are copied out of the read buffer (unless its reader lends them:
/// [`DecodeCache::lending`]); longer ones are sliced.
pub const COPY_BELOW: usize = 16 * 1024;

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
    /// needed (after reserving room for more of the frame, at most 256 KiB at a time).
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] is returned from the length prefix alone, before any
    /// allocation; other errors come from [`Frame::decode`].
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        self.decode_cached(buf, &mut DecodeCache::default())
    }

    /// [`FrameDecoder::decode`] for one connection's stream, carrying the last message's
    /// topic and source over in `cache` ([`Frame::decode_cached`]).
    ///
    /// # Errors
    ///
    /// As [`FrameDecoder::decode`].
    pub fn decode_cached(
        &self,
        buf: &mut BytesMut,
        cache: &mut DecodeCache,
    ) -> Result<Option<Frame>, FrameError> {
        let Some((kind, body)) = self.split(buf, &mut cache.small)? else {
            return Ok(None);
        };
        Frame::decode_cached(kind, body, cache).map(Some)
    }

    /// [`FrameDecoder::decode_cached`] for a lending reader ([`DecodeCache::lending`]): a
    /// PUBLISH or PUBLISH_RUN comes as a [`super::Lent`] borrowing `buf`, so it cannot be
    /// kept past the next read without a copy ([`super::Lent::keep`]).
    ///
    /// # Errors
    ///
    /// As [`FrameDecoder::decode`].
    pub fn decode_lent<'buf>(
        &self,
        buf: &'buf mut BytesMut,
        cache: &mut DecodeCache,
    ) -> Result<Option<LentFrame<'buf>>, FrameError> {
        let Some((kind, body)) = self.split(buf, &mut cache.small)? else {
            return Ok(None);
        };
        let shares = cache.lends(&body);
        let frame = Frame::decode_cached(kind, body, cache)?;
        Ok(Some(LentFrame::wrap(frame, shares)))
    }

    /// Whether `buf` holds a whole frame. When it holds only part of one, room for more of it
    /// is reserved (at most 256 KiB at a time, never the whole announced length).
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] or [`FrameError::Empty`], from the length prefix alone.
    pub fn complete(&self, buf: &mut BytesMut) -> Result<bool, FrameError> {
        let Some(whole) = self.announced(buf)? else {
            return Ok(false);
        };
        if buf.len() < whole {
            buf.reserve((whole - buf.len()).min(GROW_STEP));
            return Ok(false);
        }
        Ok(true)
    }

    /// Like [`FrameDecoder::decode`] but returns the raw kind and body without parsing it.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] or [`FrameError::Empty`].
    pub fn split_frame(&self, buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, FrameError> {
        self.split(buf, &mut Small::Own)
    }

    /// The whole length (prefix included) of the frame `buf` starts with, once its prefix is
    /// there, checked against the limit: a reader can tell how much a frame will take before
    /// any of its body arrived.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] or [`FrameError::Empty`].
    pub fn announced(&self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(*prefix) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_len,
            });
        }
        Ok(Some(LEN_PREFIX + len))
    }

    /// [`FrameDecoder::split_frame`], placing small frames as `small` says.
    fn split(
        &self,
        buf: &mut BytesMut,
        small: &mut Small,
    ) -> Result<Option<(u8, Bytes)>, FrameError> {
        let Some(whole) = self.announced(buf)? else {
            return Ok(None);
        };
        let len = whole - LEN_PREFIX;
        if buf.len() < whole {
            // Grow as bytes arrive, not by the announced length: four header bytes must not
            // make the receiver reserve a whole maximum-size frame.
            buf.reserve((LEN_PREFIX + len - buf.len()).min(GROW_STEP));
            return Ok(None);
        }
        let kind = buf[LEN_PREFIX];
        let body = LEN_PREFIX + 1..LEN_PREFIX + len;
        let copied = match small {
            // A large frame (mostly its own bytes) stays a zero-copy slice of the buffer.
            _ if len >= COPY_BELOW => None,
            // A small frame gets its own buffer (recycled, `pool`): what a queued message
            // holds is then exactly its bytes, and the read buffer is never shared.
            Small::Own => Some(super::pool::copy(&buf[body])),
            Small::Carve(chunk) => {
                // Reclaims the chunk in place once every frame carved from it is gone.
                if chunk.capacity() - chunk.len() < len {
                    chunk.reserve(CARVE_CHUNK.max(len));
                }
                chunk.extend_from_slice(&buf[body]);
                Some(chunk.split().freeze())
            }
            Small::Lend => None,
        };
        let frame = match copied {
            Some(frame) => {
                buf.advance(LEN_PREFIX + len);
                frame
            }
            None => {
                buf.advance(LEN_PREFIX + 1);
                buf.split_to(len - 1).freeze()
            }
        };
        Ok(Some((kind, frame)))
    }
}
