//! The storage both queue kinds share: queued deliveries in order, their count and charged
//! bytes, and the encoding of small deliveries into chunks when they are queued.

use super::{Drops, Encoding, Item, Memory};
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

    /// What a queue keeps: one copy of exactly the item's own bytes, made by the first queue
    /// that keeps it and shared by the others, charged to `memory` once
    /// ([`daemoneye_eventbus_core::codec::Lent::keep_charged`]). `None` when the memory cap
    /// has no room for the copy.
    fn keep(self, group: Option<&QueueGroup>, memory: &Memory) -> Option<Out> {
        let budget = memory.budget();
        Some(match self {
            Self::Msg(m) => Out::Msg(m.keep_charged(budget)?, group.cloned()),
            Self::Run(r) => Out::Run(r.keep_charged(budget)?),
        })
    }

    /// What a queue for an in-process peer keeps: a copy of its own, charged to the queue
    /// until written. (The peer takes the message itself; a shared copy would carry its charge
    /// into the application for as long as the application holds it.)
    fn keep_own(self, group: Option<&QueueGroup>) -> Out {
        match self {
            Self::Msg(m) => Out::Msg(m.keep(), group.cloned()),
            Self::Run(r) => Out::Run(r.keep()),
        }
    }
}

/// Budget bytes one queue entry is charged when the copy it holds carries its own charge (the
/// entry's slot in the queue).
const ENTRY_CHARGE: usize = std::mem::size_of::<Out>();

impl Out {
    /// What this entry itself holds of the memory cap: its charged size, or only its slot
    /// when the kept copy carries its own charge (shared with other queues).
    fn own_charge(&self, size: usize) -> usize {
        let carried = match self {
            Self::Msg(m, _) => m.is_charged(),
            Self::Run(r) => r.is_charged(),
            Self::Encoded(_) => false,
        };
        if carried { ENTRY_CHARGE } else { size }
    }
}

/// How a queue will hold an item it takes: encoded into the chunk at its tail, or kept.
pub(crate) enum Prepared {
    Encode { runs: bool },
    Keep(Out),
}

/// Deliveries in order, with their count and charged bytes.
#[derive(Default)]
pub(crate) struct Lane {
    items: VecDeque<Out>,
    pub(crate) msgs: usize,
    /// Charged bytes of the deliveries, against the queue's bounds.
    pub(crate) bytes: usize,
    /// What the deliveries hold of the broker-wide memory cap themselves (kept copies that
    /// carry their own charge count only their slot).
    cap: usize,
}

impl Lane {
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How `item` would be queued, and what the queue must reserve of the memory cap for it:
    /// encoded into the chunk at the tail when `encoding` says so (its charged size), otherwise
    /// kept (its slot when the kept copy carries its charge, else its charged size). A
    /// byte-stream peer's queues share one kept copy of a lent frame; an in-process peer's
    /// queue keeps its own, since the message itself goes to the application. Queue
    /// group deliveries are always kept, so that another member can be given them if this one
    /// goes away. `None` when the memory cap has no room for the kept copy.
    pub(crate) fn prepare(
        &self,
        item: Item<'_>,
        encoding: Encoding,
        group: Option<&QueueGroup>,
        memory: &Memory,
    ) -> Option<(Prepared, usize)> {
        let size = item.size();
        match encoding {
            Encoding::Bytes { runs }
                if group.is_none()
                    && self.bytes < ENCODE_BELOW
                    && item.wire_len() < VECTORED_MIN =>
            {
                Some((Prepared::Encode { runs }, size))
            }
            Encoding::Shared => {
                let out = item.keep_own(group);
                let charge = out.own_charge(size);
                Some((Prepared::Keep(out), charge))
            }
            Encoding::Bytes { .. } => {
                let out = item.keep(group, memory)?;
                let charge = out.own_charge(size);
                Some((Prepared::Keep(out), charge))
            }
        }
    }

    /// Appends `item` as `prepared` said, with `charge` bytes of the memory cap already
    /// reserved for it.
    pub(crate) fn append(&mut self, item: Item<'_>, prepared: Prepared, charge: usize) {
        let size = item.size();
        match prepared {
            Prepared::Encode { runs } => self.append_encoded(item, runs, size),
            Prepared::Keep(out) => self.items.push_back(out),
        }
        self.msgs += item.count();
        self.bytes += size;
        self.cap += charge;
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
    /// returns its charged size, its message count and what it held of the memory cap
    /// (released by the caller; a shared copy gives its own charge back when its last holder
    /// goes), or `None` when the lane is empty.
    pub(crate) fn evict_oldest(
        &mut self,
        drops: &mut Drops,
        reason: DropReason,
    ) -> Option<Evicted> {
        let out = self.items.pop_front()?;
        let (size, count) = match &out {
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
        let charge = out.own_charge(size);
        self.msgs -= count;
        self.bytes -= size;
        self.cap -= charge;
        Some(Evicted {
            msgs: count as u64,
            charge,
            shared: charge != size,
        })
    }

    /// Moves every delivery into `into` (which must be empty); returns what they held of the
    /// memory cap (to release once written) and the messages taken.
    pub(crate) fn take(&mut self, into: &mut VecDeque<Out>) -> (usize, usize) {
        std::mem::swap(&mut self.items, into);
        self.bytes = 0;
        (
            std::mem::take(&mut self.cap),
            std::mem::take(&mut self.msgs),
        )
    }

    /// Empties the lane; returns what the deliveries held of the memory cap and the messages
    /// discarded. Queue group deliveries are added to `regroup` so another member of their
    /// group can be given them.
    pub(crate) fn discard(&mut self, regroup: &mut Vec<(Message, QueueGroup)>) -> (usize, usize) {
        for out in self.items.drain(..) {
            if let Out::Msg(m, Some(g)) = out {
                regroup.push((m, g));
            }
        }
        self.bytes = 0;
        (
            std::mem::take(&mut self.cap),
            std::mem::take(&mut self.msgs),
        )
    }
}

/// What [`Lane::evict_oldest`] took out.
pub(crate) struct Evicted {
    pub(crate) msgs: u64,
    /// What it held of the memory cap, to release.
    pub(crate) charge: usize,
    /// It held a copy carrying its own charge (given back only by the copy's last holder).
    pub(crate) shared: bool,
}
