//! The client's outgoing queue: encoded bytes for byte-stream transports, frames for
//! in-process ones (so payloads are never serialised there).

use bytes::{Bytes, BytesMut};
use daemoneye_eventbus_core::codec::encode_publish;
use daemoneye_eventbus_core::{Frame, Header, Message, Topic};
use daemoneye_eventbus_transport::FrameWriter;
use std::mem;

pub(crate) enum Buf {
    Encoded(BytesMut),
    Frames(Vec<Frame>),
}

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
            Buf::Encoded(BytesMut::new())
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
        self.bytes += payload.len()
            + topic.as_str().len()
            + daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
        match &mut self.buf {
            Buf::Encoded(b) => encode_publish(b, topic, &header, &payload),
            Buf::Frames(f) => f.push(Frame::Publish(Message::new(topic.clone(), header, payload))),
        }
        self.publishes += 1;
        self.frames += 1;
    }

    pub(crate) fn push_frame(&mut self, frame: Frame) {
        match &mut self.buf {
            Buf::Encoded(b) => {
                let before = b.len();
                frame.encode(b);
                self.bytes += b.len() - before;
            }
            Buf::Frames(f) => {
                self.bytes += 64;
                f.push(frame);
            }
        }
        self.frames += 1;
    }

    /// Takes everything, leaving an empty buffer.
    pub(crate) fn take(&mut self) -> Self {
        let empty = self.empty_like();
        mem::replace(self, empty)
    }

    /// Hands the contents to a connection writer.
    pub(crate) fn write_into(self, writer: &mut FrameWriter) {
        match self.buf {
            Buf::Encoded(mut b) => {
                writer
                    .push_encoded(&mut b)
                    .expect("the client's own buffer holds only complete frames");
            }
            Buf::Frames(frames) => {
                for f in &frames {
                    writer.push(f);
                }
            }
        }
    }
}
