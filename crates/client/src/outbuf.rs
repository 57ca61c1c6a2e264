//! The client's outgoing queue: encoded bytes for byte-stream transports, frames for
//! in-process ones (so payloads are never serialised there).
//!
//! Large payloads (at least [`VECTORED_MIN`] bytes) are not copied into the encoded buffer:
//! only their frame head is encoded, and the caller's `Bytes` follows as its own `writev`
//! segment.

use bytes::{Bytes, BytesMut};
use daemoneye_eventbus_core::codec::{encode_publish, encode_publish_head};
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use daemoneye_eventbus_core::{Frame, Header, Message, Topic};
use daemoneye_eventbus_transport::{FrameWriter, VECTORED_MIN};
use std::mem;

pub(crate) enum Buf {
    /// Encoded frames, and the large payloads that go between them: each payload follows
    /// the first `offset` bytes of `head` (offsets ascending).
    Encoded {
        head: BytesMut,
        payloads: Vec<(usize, Bytes)>,
    },
    Frames(Vec<Frame>),
}

/// Largest buffer kept for reuse between batches.
const MAX_SPARE: usize = 1 << 20;

/// What is waiting to be written.
pub(crate) struct OutBuf {
    buf: Buf,
    /// Bytes accounted against `outbox_bytes`.
    pub(crate) bytes: usize,
    /// Publishes waiting (lost if the connection dies while they are written).
    pub(crate) publishes: u64,
    /// Frames waiting.
    pub(crate) frames: u64,
}

impl OutBuf {
    pub(crate) fn new(in_process: bool) -> Self {
        let buf = if in_process {
            Buf::Frames(Vec::new())
        } else {
            Buf::Encoded {
                head: BytesMut::new(),
                payloads: Vec::new(),
            }
        };
        Self {
            buf,
            bytes: 0,
            publishes: 0,
            frames: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// An empty buffer of the same kind.
    fn empty_like(&self) -> Self {
        Self::new(matches!(self.buf, Buf::Frames(_)))
    }

    pub(crate) fn push_publish(&mut self, topic: &Topic, header: Header, payload: Bytes) {
        self.bytes += payload.len() + topic.as_str().len() + MESSAGE_OVERHEAD;
        match &mut self.buf {
            Buf::Encoded { head, payloads } if payload.len() >= VECTORED_MIN => {
                encode_publish_head(head, topic, &header, payload.len());
                payloads.push((head.len(), payload));
            }
            Buf::Encoded { head, .. } => encode_publish(head, topic, &header, &payload),
            Buf::Frames(f) => f.push(Frame::Publish(Message::new(topic.clone(), header, payload))),
        }
        self.publishes += 1;
        self.frames += 1;
    }

    pub(crate) fn push_frame(&mut self, frame: Frame) {
        match &mut self.buf {
            Buf::Encoded { head, .. } => {
                let before = head.len();
                frame.encode(head);
                self.bytes += head.len() - before;
            }
            Buf::Frames(f) => {
                self.bytes += 64;
                f.push(frame);
            }
        }
        self.frames += 1;
    }

    /// Takes everything, leaving an empty buffer that reuses `spare`'s memory (the buffer
    /// [`OutBuf::write_into`] gave back last time), so a busy publisher does not grow a fresh
    /// buffer for every batch.
    pub(crate) fn take(&mut self, spare: Option<BytesMut>) -> Self {
        let mut empty = self.empty_like();
        if let (Buf::Encoded { head, .. }, Some(mut spare)) = (&mut empty.buf, spare)
            && spare.capacity() <= MAX_SPARE
        {
            spare.clear();
            *head = spare;
        }
        mem::replace(self, empty)
    }

    /// Hands the contents to a connection writer; returns an empty buffer to reuse.
    pub(crate) fn write_into(self, writer: &mut FrameWriter) -> Option<BytesMut> {
        const HOLDS: &str = "the client's own buffer holds only complete frames";
        match self.buf {
            Buf::Encoded { mut head, payloads } => {
                let mut written = 0;
                for (offset, payload) in payloads {
                    let mut part = head.split_to(offset - written);
                    written = offset;
                    writer.push_encoded(&mut part).expect(HOLDS);
                    writer
                        .push_segment(payload)
                        .expect("byte streams take segments");
                }
                // Swapped with the writer's empty buffer, or copied and cleared: empty either
                // way, with memory to reuse.
                writer.push_encoded(&mut head).expect(HOLDS);
                Some(head)
            }
            Buf::Frames(frames) => {
                for f in &frames {
                    writer.push(f);
                }
                None
            }
        }
    }
}
