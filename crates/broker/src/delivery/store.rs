//! The store interface behind acknowledged subscriptions, and its in-memory implementation.
//!
//! A store keeps an acknowledged subscription's messages by position, from the moment a
//! publisher's ACK promises them to the moment the subscriber acknowledges them (or the
//! retention policy drops them). It knows nothing of deliveries: which positions are in flight,
//! when they were sent and how often is the queue's business ([`super::AckedQueue`]), so a
//! store that persists (the disk log of a later issue) implements only these few operations,
//! and a restart turns every kept position back into one to deliver.

use daemoneye_eventbus_core::codec::{MessageRun, RunPart};
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use daemoneye_eventbus_core::{Message, Topic};
use std::collections::VecDeque;
use std::sync::Arc;

/// A message's position in a store: increasing, never reused.
pub(crate) type Pos = u64;

/// What a store is given to keep: a message, or a run whose messages take consecutive
/// positions.
#[derive(Clone)]
pub(crate) enum Kept {
    One(Message),
    Run(MessageRun),
}

impl Kept {
    /// Messages it holds.
    pub(crate) fn count(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Run(r) => r.len(),
        }
    }

    /// Bytes charged for it ([`Message::accounted_size`] of each message).
    pub(crate) fn size(&self) -> usize {
        match self {
            Self::One(m) => m.accounted_size(),
            Self::Run(r) => r.accounted_size(),
        }
    }

    /// The topic of its messages.
    pub(crate) fn topic(&self) -> &Topic {
        match self {
            Self::One(m) => m.topic(),
            Self::Run(r) => r.topic(),
        }
    }
}

impl Stored<'_> {
    /// The topic of the message.
    pub(crate) fn topic(&self) -> &Topic {
        match self {
            Self::One(m) => m.topic(),
            Self::InRun { run, .. } => run.run.topic(),
        }
    }
}

/// A run kept by a store, with where each of its entries lies in its body.
pub(crate) struct KeptRun {
    pub(crate) run: MessageRun,
    /// `run.len() + 1` offsets: entry `i` is `starts[i]..starts[i + 1]` of the body.
    starts: Vec<u32>,
}

impl KeptRun {
    /// Entries `first..first + count` as a [`RunPart`].
    pub(crate) fn part(&self, first: usize, count: usize) -> RunPart {
        RunPart {
            count: u16::try_from(count).expect("a run holds at most 65535 messages"),
            start: self.starts[first],
            end: self.starts[first + count],
        }
    }

    /// Payload bytes of `part`.
    pub(crate) fn payload_bytes(&self, part: RunPart) -> usize {
        let first = self.starts.partition_point(|s| *s < part.start);
        let overhead = self.run.topic().as_str().len() + MESSAGE_OVERHEAD;
        (first..first + usize::from(part.count))
            .map(|i| self.charge(i) - overhead)
            .sum()
    }

    fn charge(&self, i: usize) -> usize {
        self.run.entry_charge(self.starts[i], self.starts[i + 1])
    }
}

/// What a store holds at one position.
pub(crate) enum Stored<'a> {
    /// A message kept alone.
    One(&'a Message),
    /// Entry `index` of a run, and how many positions from this one on are kept and in the
    /// same run (at least 1).
    InRun {
        run: &'a Arc<KeptRun>,
        index: usize,
        span: usize,
    },
}

/// See the module documentation.
pub(crate) trait Store: Send {
    /// Keeps a message, or a run's messages at consecutive positions, at the tail; returns
    /// the (first) position.
    fn append(&mut self, kept: Kept) -> Pos;
    /// What is kept at `pos`, if anything.
    fn get(&self, pos: Pos) -> Option<Stored<'_>>;
    /// Forgets the message at `pos` (acknowledged, or dropped by the retention policy);
    /// returns its charged bytes if it was kept.
    fn remove(&mut self, pos: Pos) -> Option<usize>;
    /// The position of the oldest message kept.
    fn oldest(&self) -> Option<Pos>;
    /// One past the last position given out.
    fn end(&self) -> Pos;
    /// Messages kept.
    fn len(&self) -> usize;
    /// Charged bytes of the messages kept ([`Message::accounted_size`]).
    fn bytes(&self) -> usize;
}

/// One position of a [`MemoryStore`].
enum Slot {
    Gone,
    One(Message),
    /// Entry `index` of a run; its charged bytes.
    Run(Arc<KeptRun>, u16, u32),
}

/// A [`Store`] in memory: what a broker without a data directory keeps, and what dies with
/// its process.
#[derive(Default)]
pub(crate) struct MemoryStore {
    /// Slot `i` holds position `base + i`; removed slots are `Gone` until the front passes.
    slots: VecDeque<Slot>,
    base: Pos,
    len: usize,
    bytes: usize,
}

impl MemoryStore {
    /// The position the next message appended gets.
    pub(crate) fn next_pos(&self) -> Pos {
        self.base + self.slots.len() as u64
    }

    /// Keeps `kept` at `pos` (at or after [`MemoryStore::next_pos`]: the positions between are
    /// empty): a message read back from a disk log.
    pub(crate) fn place(&mut self, pos: Pos, kept: Kept) {
        self.skip_to(pos);
        self.append(kept);
    }

    /// Moves the next position to `pos` (if it is later), leaving the positions between empty.
    pub(crate) fn skip_to(&mut self, pos: Pos) {
        if self.slots.is_empty() {
            self.base = self.base.max(pos);
            return;
        }
        while self.next_pos() < pos {
            self.slots.push_back(Slot::Gone);
        }
    }
}

impl Store for MemoryStore {
    fn append(&mut self, kept: Kept) -> Pos {
        let first = self.base + self.slots.len() as u64;
        self.len += kept.count();
        self.bytes += kept.size();
        match kept {
            Kept::One(msg) => self.slots.push_back(Slot::One(msg)),
            Kept::Run(run) => {
                let starts = run.entry_starts();
                let kept = Arc::new(KeptRun { run, starts });
                for i in 0..kept.run.len() {
                    let charge = u32::try_from(kept.charge(i)).expect("a frame is below 4 GiB");
                    let index = u16::try_from(i).expect("a run holds at most 65535 messages");
                    self.slots
                        .push_back(Slot::Run(Arc::clone(&kept), index, charge));
                }
            }
        }
        first
    }

    fn get(&self, pos: Pos) -> Option<Stored<'_>> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        match self.slots.get(i)? {
            Slot::Gone => None,
            Slot::One(msg) => Some(Stored::One(msg)),
            Slot::Run(run, index, _) => {
                let index = usize::from(*index);
                // Kept entries of the same run that follow.
                let span = 1 + (i + 1..i + run.run.len() - index)
                    .take_while(|j| matches!(self.slots.get(*j), Some(Slot::Run(r, ..)) if Arc::ptr_eq(r, run)))
                    .count();
                Some(Stored::InRun { run, index, span })
            }
        }
    }

    fn remove(&mut self, pos: Pos) -> Option<usize> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        let removed = match std::mem::replace(self.slots.get_mut(i)?, Slot::Gone) {
            Slot::Gone => return None,
            Slot::One(msg) => msg.accounted_size(),
            Slot::Run(_, _, charge) => charge as usize,
        };
        self.len -= 1;
        self.bytes -= removed;
        while matches!(self.slots.front(), Some(Slot::Gone)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(removed)
    }

    fn oldest(&self) -> Option<Pos> {
        self.slots
            .iter()
            .position(|s| !matches!(s, Slot::Gone))
            .map(|i| self.base + i as u64)
    }

    fn end(&self) -> Pos {
        self.next_pos()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The store of one acknowledged subscription: in memory, or (a durable subscription of a
/// broker with a data directory) in memory and on disk.
pub(crate) enum KeptStore {
    Memory(MemoryStore),
    Disk(Box<super::disk::DiskStore>),
}

impl Default for KeptStore {
    fn default() -> Self {
        Self::Memory(MemoryStore::default())
    }
}

impl Store for KeptStore {
    fn append(&mut self, kept: Kept) -> Pos {
        match self {
            Self::Memory(s) => s.append(kept),
            Self::Disk(s) => s.append(kept),
        }
    }

    fn get(&self, pos: Pos) -> Option<Stored<'_>> {
        match self {
            Self::Memory(s) => s.get(pos),
            Self::Disk(s) => s.get(pos),
        }
    }

    fn remove(&mut self, pos: Pos) -> Option<usize> {
        match self {
            Self::Memory(s) => s.remove(pos),
            Self::Disk(s) => s.remove(pos),
        }
    }

    fn oldest(&self) -> Option<Pos> {
        match self {
            Self::Memory(s) => s.oldest(),
            Self::Disk(s) => s.oldest(),
        }
    }

    fn end(&self) -> Pos {
        match self {
            Self::Memory(s) => s.end(),
            Self::Disk(s) => s.end(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Memory(s) => s.len(),
            Self::Disk(s) => s.len(),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::Memory(s) => s.bytes(),
            Self::Disk(s) => s.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daemoneye_eventbus_core::{Header, Topic};

    fn msg(n: u8) -> Kept {
        Kept::One(Message::new(
            Topic::new("t").unwrap(),
            Header::default(),
            Bytes::from(vec![n; 10]),
        ))
    }

    #[test]
    fn positions_survive_removal_in_any_order() {
        let mut s = MemoryStore::default();
        let p: Vec<Pos> = (0..5).map(|i| s.append(msg(i))).collect();
        assert_eq!(p, [0, 1, 2, 3, 4]);
        assert_eq!(s.len(), 5);
        let one = msg(0).size();
        assert_eq!(s.bytes(), 5 * one);
        assert!(s.remove(2).is_some());
        assert!(s.remove(2).is_none(), "removed once");
        assert_eq!(s.oldest(), Some(0));
        s.remove(0);
        s.remove(1);
        assert_eq!(s.oldest(), Some(3));
        assert!(matches!(s.get(3), Some(Stored::One(m)) if m.payload()[0] == 3));
        assert!(s.get(1).is_none());
        assert_eq!(s.append(msg(9)), 5, "positions are never reused");
        assert_eq!((s.len(), s.bytes()), (3, 3 * one));
        for pos in [3, 4, 5] {
            s.remove(pos);
        }
        assert_eq!((s.len(), s.bytes(), s.oldest()), (0, 0, None));
        assert!(
            s.slots.is_empty(),
            "memory is given back as the front is removed"
        );
    }
}
