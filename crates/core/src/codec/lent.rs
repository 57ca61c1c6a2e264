//! Messages and runs a lending reader left in its read buffer, as a type: they can be looked
//! at, routed and encoded, but never kept. Keeping one takes [`Lent::keep`], which copies
//! exactly its own bytes when it shares the buffer.
//!
//! A broker reads a batch of frames and routes each before it reads again
//! ([`super::DecodeCache::lending`]). Copying each small frame out of the read buffer first
//! cost more than routing it; leaving it there is safe only if nothing keeps it past the
//! batch (a kept slice would pin the whole read buffer, which no queue accounts for). The
//! lifetime `'buf` ties a [`Lent`] to the borrow of the buffer it was read from, so the
//! compiler refuses code that stores one, and [`Lent`] gives out no [`Message`] or
//! [`MessageRun`] that could be cloned past it: queues must call [`Lent::keep`].

use super::body::encode_message_frame;
use super::run::{MessageRun, encode_run_delivery};
use super::types::Frame;
use super::{FrameError, kind};
use crate::budget::Budget;
use crate::bytestr::ByteStr;
use crate::message::{Header, Message, MessageId};
use crate::topic::Topic;
use bytes::BytesMut;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::OnceLock;

/// A message or run read from a buffer it may share. See the module documentation.
pub struct Lent<'buf, T> {
    value: T,
    /// Whether `value`'s bytes are a slice of the reader's buffer.
    shares_buffer: bool,
    /// The charged copy [`Lent::keep_charged`] made, shared by every later keeper.
    kept: OnceLock<T>,
    _buffer: PhantomData<&'buf mut [u8]>,
}

impl<T> Lent<'static, T> {
    /// A value that shares no read buffer (made in process, or already kept): keeping it is
    /// a reference-count increment.
    pub fn owned(value: T) -> Self {
        Self {
            value,
            shares_buffer: false,
            kept: OnceLock::new(),
            _buffer: PhantomData,
        }
    }
}

impl<T> Lent<'_, T> {
    pub(super) fn new(value: T, shares_buffer: bool) -> Self {
        Self {
            value,
            shares_buffer,
            kept: OnceLock::new(),
            _buffer: PhantomData,
        }
    }

    /// Whether this value's bytes are a slice of the reader's buffer (for tests and
    /// statistics; [`Lent::keep`] already acts on it).
    pub fn shares_buffer(&self) -> bool {
        self.shares_buffer
    }
}

/// What can be copied out of a read buffer with a charge (a message, a run).
pub trait ChargedCopy: Clone + sealed::Sealed {
    /// A copy of exactly its own bytes, charged to `budget`; `None` when it has no room.
    #[doc(hidden)]
    fn charged_copy(&self, budget: &Arc<Budget>) -> Option<Self>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::message::Message {}
    impl Sealed for super::MessageRun {}
}

impl ChargedCopy for Message {
    fn charged_copy(&self, budget: &Arc<Budget>) -> Option<Self> {
        self.copied_charged(budget)
    }
}

impl ChargedCopy for MessageRun {
    fn charged_copy(&self, budget: &Arc<Budget>) -> Option<Self> {
        self.copied_charged(budget)
    }
}

impl<T: ChargedCopy> Lent<'_, T> {
    /// Keeps it for several holders: a value that shares the read buffer is copied once,
    /// charged to `budget` ([`Message::is_charged`], [`MessageRun::is_charged`]), and every
    /// later call returns that copy (a reference-count increment). A value that shares no
    /// buffer is returned as it is, charged or not: its holder charges it if need be. `None`
    /// when the budget has no room for the copy (a later call tries again).
    pub fn keep_charged(&self, budget: &Arc<Budget>) -> Option<T> {
        if !self.shares_buffer {
            return Some(self.value.clone());
        }
        if let Some(kept) = self.kept.get() {
            return Some(kept.clone());
        }
        let kept = self.value.charged_copy(budget)?;
        Some(self.kept.get_or_init(|| kept).clone())
    }
}

impl std::fmt::Debug for Lent<'_, Message> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("message", &self.value)
            .field("shares_buffer", &self.shares_buffer)
            .finish()
    }
}

impl std::fmt::Debug for Lent<'_, MessageRun> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("run", &self.value)
            .field("shares_buffer", &self.shares_buffer)
            .finish()
    }
}

impl Lent<'_, Message> {
    /// The topic (always a copy, never a slice of the buffer).
    pub fn topic(&self) -> &Topic {
        self.value.topic()
    }

    /// The header (every field a copy).
    pub fn header(&self) -> &Header {
        self.value.header()
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.value.id()
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.value.payload().len()
    }

    /// Length of the encoded body (topic, header, payload).
    pub fn wire_len(&self) -> usize {
        self.value.wire().len()
    }

    /// What queues charge for it ([`Message::accounted_size`]).
    pub fn accounted_size(&self) -> usize {
        self.value.accounted_size()
    }

    /// Appends it as a DELIVER frame to `dst` (a copy of its bytes).
    pub fn encode_delivery(&self, dst: &mut BytesMut) {
        encode_message_frame(dst, kind::DELIVER, &self.value);
    }

    /// Stops sharing the read buffer: the message's body is copied into its own buffer, in
    /// place (no second message is made). Every later keep is a reference-count increment.
    /// For a message every holder will keep anyway (a Processed publish).
    pub fn own(&mut self) {
        if self.shares_buffer {
            self.value.detach();
            self.shares_buffer = false;
        }
    }

    /// The message holding only its own bytes: a copy of exactly its body when it shares the
    /// read buffer, otherwise a reference-count increment.
    pub fn keep(&self) -> Message {
        if self.shares_buffer {
            self.value.copied()
        } else {
            self.value.clone()
        }
    }
}

impl<'buf> Lent<'buf, MessageRun> {
    /// The topic every message of the run carries.
    pub fn topic(&self) -> &Topic {
        self.value.topic()
    }

    /// The source of its messages.
    pub fn source(&self) -> &ByteStr {
        self.value.source()
    }

    /// Number of messages.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Always `false`: a run holds at least one message.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// Sum of the payload sizes.
    pub fn payload_bytes(&self) -> usize {
        self.value.payload_bytes()
    }

    /// Its messages' QoS ([`MessageRun::qos`]).
    pub fn qos(&self) -> crate::message::Qos {
        self.value.qos()
    }

    /// The last message's id ([`MessageRun::last_id`]).
    pub fn last_id(&self) -> Option<crate::message::MessageId> {
        self.value.last_id()
    }

    /// The largest payload.
    pub fn max_payload(&self) -> usize {
        self.value.max_payload()
    }

    /// Length of the frame body.
    pub fn wire_len(&self) -> usize {
        self.value.wire().len()
    }

    /// What queues charge for it ([`MessageRun::accounted_size`]).
    pub fn accounted_size(&self) -> usize {
        self.value.accounted_size()
    }

    /// Appends its delivery to `dst`: a DELIVER_RUN, or for a reader without runs (`runs`
    /// false) or a run of one, plain DELIVER frames ([`encode_run_delivery`]).
    pub fn encode_delivery(&self, dst: &mut BytesMut, runs: bool) {
        encode_run_delivery(dst, &self.value, runs);
    }

    /// The run holding only its own bytes (see [`Lent::<Message>::keep`]).
    pub fn keep(&self) -> MessageRun {
        if self.shares_buffer {
            self.value.copied()
        } else {
            self.value.clone()
        }
    }

    /// Its messages, in order, lent from the same buffer.
    pub fn messages(&self) -> impl Iterator<Item = Result<Lent<'_, Message>, FrameError>> {
        let shares = self.shares_buffer;
        self.value
            .messages()
            .map(move |m| m.map(|m| Lent::new(m, shares)))
    }
}

/// A frame read by a lending reader ([`super::FrameDecoder::decode_lent`]). Only PUBLISH and
/// PUBLISH_RUN bodies are lent; every other frame is owned.
#[derive(Debug)]
pub enum LentFrame<'buf> {
    /// A PUBLISH.
    Publish(Lent<'buf, Message>),
    /// A PUBLISH_RUN.
    PublishRun(Lent<'buf, MessageRun>),
    /// Any other frame, holding no slice of the read buffer.
    Other(Frame),
}

impl LentFrame<'static> {
    /// A frame that shares no read buffer (an in-process connection's).
    pub fn owned(frame: Frame) -> Self {
        match frame {
            Frame::Publish(m) => Self::Publish(Lent::owned(m)),
            Frame::PublishRun(r) => Self::PublishRun(Lent::owned(r)),
            other => Self::Other(other),
        }
    }
}

impl LentFrame<'_> {
    /// Wraps a decoded frame whose message bytes share the read buffer when `shares_buffer`.
    /// Deliveries (which a broker never accepts from a client) are copied instead of lent.
    pub(super) fn wrap(frame: Frame, shares_buffer: bool) -> Self {
        match frame {
            Frame::Publish(m) => Self::Publish(Lent::new(m, shares_buffer)),
            Frame::PublishRun(r) => Self::PublishRun(Lent::new(r, shares_buffer)),
            Frame::Deliver(m) if shares_buffer => Self::Other(Frame::Deliver(m.copied())),
            Frame::DeliverRun(r) if shares_buffer => Self::Other(Frame::DeliverRun(r.copied())),
            Frame::DeliverGroup(mut d) if shares_buffer => {
                d.message = d.message.copied();
                Self::Other(Frame::DeliverGroup(d))
            }
            Frame::DeliverAcked(mut d) if shares_buffer => {
                d.message = d.message.copied();
                Self::Other(Frame::DeliverAcked(d))
            }
            Frame::DeliverAckedRun(mut d) if shares_buffer => {
                d.run = d.run.copied();
                Self::Other(Frame::DeliverAckedRun(d))
            }
            other => Self::Other(other),
        }
    }

    /// The frame's kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Self::Publish(_) => kind::PUBLISH,
            Self::PublishRun(_) => kind::PUBLISH_RUN,
            Self::Other(f) => f.kind(),
        }
    }
}
