//! The storage both queue kinds share: queued deliveries in order, their count and charged
//! bytes, and the encoding of small deliveries into chunks when they are queued.

use super::{Drops, Encoding, Item};
use bytes::BytesMut;
use daemoneye_eventbus_core::codec::{DropReason, LEN_PREFIX, MessageRun, kind};
use daemoneye_eventbus_core::{Message, QueueGroup};
use daemoneye_eventbus_transport::VECTORED_MIN;
use std::collections::VecDeque;

/// A queue below this many bytes encodes small deliveries when they are queued.
pub(crate) const ENCODE_BELOW: usize = 256 * 1024;

/// A chunk takes no more frames once it holds this many bytes (and never grows past its
/// capacity): written in one piece, and evicted as a unit.
const CHUNK_BYTES: usize = 16 * 1024;

/// A delivery waiting to be written.
pub(crate) enum Out {
    /// A message, and the queue group it was given to this connection in, if any.
    Msg(Message, Option<QueueGroup>),
    /// A run of messages on one topic (protocol 1.2), queued, evicted and written as a unit;
    /// it counts as its number of messages against the bounds.
    Run(MessageRun),
    /// Deliveries already encoded (see [`Encoding::Bytes`]), written as they are and evicted
    /// as a unit.
    Encoded(Chunk),
}

/// Encoded DELIVER and DELIVER_RUN frames (see [`Encoding::Bytes`]).
pub(crate) struct Chunk {
    pub(crate) buf: BytesMut,
    /// Messages it holds.
    msgs: usize,
    /// Bytes charged to the bounds (the messages' accounted sizes).
    size: usize,
    /// Payload bytes, for the statistics.
    pub(crate) payload: usize,
}

impl Chunk {
    /// The topics of the frames held, with the number of messages of each frame.
    pub(crate) fn topics(&self) -> impl Iterator<Item = (&[u8], u64)> {
        let mut at = 0;
        let buf = &self.buf[..];
        std::iter::from_fn(move || {
            let field = |at: usize, n: usize| buf.get(at..at + n);
            let len = u32::from_le_bytes(field(at, LEN_PREFIX)?.try_into().ok()?) as usize;
            let frame = at + LEN_PREFIX;
            let topic_len = u16::from_le_bytes(field(frame + 1, 2)?.try_into().ok()?) as usize;
            let topic = field(frame + 3, topic_len)?;
            let count = if buf[frame] == kind::DELIVER_RUN {
                u64::from(u16::from_le_bytes(
                    field(frame + 3 + topic_len, 2)?.try_into().ok()?,
                ))
            } else {
                1
            };
            at = frame + len;
            Some((topic, count))
        })
    }
}

impl Item<'_> {
    /// Bytes of its wire form.
    fn wire_len(&self) -> usize {
        match self {
            Self::Msg(m) => m.wire_len(),
            Self::Run(r) => r.wire_len(),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Msg(m) => m.payload_len(),
            Self::Run(r) => r.payload_bytes(),
        }
    }

    /// Bytes its encoding as deliveries takes at most (frame heads included).
    fn encoded_len(&self) -> usize {
        let head = LEN_PREFIX + 1;
        match self {
            Self::Msg(m) => head + m.wire_len(),
            Self::Run(r) => r.wire_len() + r.len() * (head + 2 + r.topic().as_str().len()),
        }
    }

    /// What a queue keeps: exactly the item's own bytes ([`daemoneye_eventbus_core::codec::Lent::keep`]).
    fn keep(self, group: Option<&QueueGroup>) -> Out {
        match self {
            Self::Msg(m) => Out::Msg(m.keep(), group.cloned()),
            Self::Run(r) => Out::Run(r.keep()),
        }
    }
}

/// Deliveries in order, with their count and charged bytes.
#[derive(Default)]
pub(crate) struct Lane {
    items: VecDeque<Out>,
    pub(crate) msgs: usize,
    pub(crate) bytes: usize,
}

impl Lane {
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Appends `item` (charged `size` bytes, already reserved): encoded into the chunk at the
    /// tail when `encoding` says so, otherwise kept. Queue group deliveries are always kept,
    /// so that another member can be given them if this one goes away.
    pub(crate) fn append(
        &mut self,
        item: Item<'_>,
        encoding: Encoding,
        group: Option<&QueueGroup>,
    ) {
        let size = item.size();
        match encoding {
            Encoding::Bytes { runs }
                if group.is_none()
                    && self.bytes < ENCODE_BELOW
                    && item.wire_len() < VECTORED_MIN =>
            {
                self.append_encoded(item, runs, size);
            }
            _ => self.items.push_back(item.keep(group)),
        }
        self.msgs += item.count();
        self.bytes += size;
    }

    /// Appends `item`'s deliveries to the chunk at the tail (a new one when the tail is not a
    /// chunk or has no room left).
    fn append_encoded(&mut self, item: Item<'_>, runs: bool, size: usize) {
        let need = item.encoded_len();
        let fits = |c: &Chunk| c.buf.len() < CHUNK_BYTES && c.buf.capacity() - c.buf.len() >= need;
        if !matches!(self.items.back(), Some(Out::Encoded(c)) if fits(c)) {
            self.items.push_back(Out::Encoded(Chunk {
                buf: BytesMut::with_capacity(CHUNK_BYTES.max(need)),
                msgs: 0,
                size: 0,
                payload: 0,
            }));
        }
        let Some(Out::Encoded(chunk)) = self.items.back_mut() else {
            unreachable!("the tail is a chunk with room")
        };
        match item {
            Item::Msg(m) => m.encode_delivery(&mut chunk.buf),
            Item::Run(r) => r.encode_delivery(&mut chunk.buf, runs),
        }
        chunk.msgs += item.count();
        chunk.size += size;
        chunk.payload += item.payload_len();
    }

    /// Evicts the oldest delivery (a message, a run or a chunk), counting it in `drops`;
    /// returns its charged size and message count, or `None` when the lane is empty.
    pub(crate) fn evict_oldest(
        &mut self,
        drops: &mut Drops,
        reason: DropReason,
    ) -> Option<(usize, u64)> {
        let (size, count) = match self.items.pop_front()? {
            Out::Msg(m, _) => {
                drops.record(m.topic(), reason, 1);
                (m.accounted_size(), 1)
            }
            Out::Run(r) => {
                drops.record(r.topic(), reason, r.len() as u64);
                (r.accounted_size(), r.len())
            }
            Out::Encoded(c) => {
                for (topic, n) in c.topics() {
                    drops.record_bytes(topic, reason, n);
                }
                (c.size, c.msgs)
            }
        };
        self.msgs -= count;
        self.bytes -= size;
        Some((size, count as u64))
    }

    /// Moves every delivery into `into` (which must be empty); returns the charged bytes and
    /// messages taken.
    pub(crate) fn take(&mut self, into: &mut VecDeque<Out>) -> (usize, usize) {
        std::mem::swap(&mut self.items, into);
        (
            std::mem::take(&mut self.bytes),
            std::mem::take(&mut self.msgs),
        )
    }

    /// Empties the lane; returns the charged bytes and messages discarded. Queue group
    /// deliveries are added to `regroup` so another member of their group can be given them.
    pub(crate) fn discard(&mut self, regroup: &mut Vec<(Message, QueueGroup)>) -> (usize, usize) {
        for out in self.items.drain(..) {
            if let Out::Msg(m, Some(g)) = out {
                regroup.push((m, g));
            }
        }
        (
            std::mem::take(&mut self.bytes),
            std::mem::take(&mut self.msgs),
        )
    }
}
