//! The store interface behind acknowledged subscriptions, and its in-memory implementation.
//!
//! A store keeps an acknowledged subscription's messages by position, from the moment a
//! publisher's ACK promises them to the moment the subscriber acknowledges them (or the
//! retention policy drops them). It knows nothing of deliveries: which positions are in flight,
//! when they were sent and how often is the queue's business ([`super::AckedQueue`]), so a
//! store that persists (the disk log of a later issue) implements only these few operations,
//! and a restart turns every kept position back into one to deliver.

use daemoneye_eventbus_core::Message;
use std::collections::VecDeque;

/// A message's position in a store: increasing, never reused.
pub(crate) type Pos = u64;

/// See the module documentation.
pub(crate) trait Store: Send {
    /// Keeps `msg` at the tail; returns its position.
    fn append(&mut self, msg: Message) -> Pos;
    /// The message at `pos`, if it is still kept.
    fn get(&self, pos: Pos) -> Option<&Message>;
    /// Forgets the message at `pos` (acknowledged, or dropped by the retention policy);
    /// returns it if it was kept.
    fn remove(&mut self, pos: Pos) -> Option<Message>;
    /// The position of the oldest message kept.
    fn oldest(&self) -> Option<Pos>;
    /// Messages kept.
    fn len(&self) -> usize;
    /// Charged bytes of the messages kept ([`Message::accounted_size`]).
    fn bytes(&self) -> usize;
}

/// A [`Store`] in memory: what a broker without a data directory keeps, and what dies with
/// its process.
#[derive(Default)]
pub(crate) struct MemoryStore {
    /// Slot `i` holds position `base + i`; removed slots are `None` until the front passes.
    slots: VecDeque<Option<Message>>,
    base: Pos,
    len: usize,
    bytes: usize,
}

impl Store for MemoryStore {
    fn append(&mut self, msg: Message) -> Pos {
        self.len += 1;
        self.bytes += msg.accounted_size();
        self.slots.push_back(Some(msg));
        self.base + self.slots.len() as u64 - 1
    }

    fn get(&self, pos: Pos) -> Option<&Message> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        self.slots.get(i)?.as_ref()
    }

    fn remove(&mut self, pos: Pos) -> Option<Message> {
        let i = usize::try_from(pos.checked_sub(self.base)?).ok()?;
        let msg = self.slots.get_mut(i)?.take()?;
        self.len -= 1;
        self.bytes -= msg.accounted_size();
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        Some(msg)
    }

    fn oldest(&self) -> Option<Pos> {
        self.slots
            .iter()
            .position(Option::is_some)
            .map(|i| self.base + i as u64)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daemoneye_eventbus_core::{Header, Topic};

    fn msg(n: u8) -> Message {
        Message::new(
            Topic::new("t").unwrap(),
            Header::default(),
            Bytes::from(vec![n; 10]),
        )
    }

    #[test]
    fn positions_survive_removal_in_any_order() {
        let mut s = MemoryStore::default();
        let p: Vec<Pos> = (0..5).map(|i| s.append(msg(i))).collect();
        assert_eq!(p, [0, 1, 2, 3, 4]);
        assert_eq!(s.len(), 5);
        let one = msg(0).accounted_size();
        assert_eq!(s.bytes(), 5 * one);
        assert!(s.remove(2).is_some());
        assert!(s.remove(2).is_none(), "removed once");
        assert_eq!(s.oldest(), Some(0));
        s.remove(0);
        s.remove(1);
        assert_eq!(s.oldest(), Some(3));
        assert_eq!(s.get(3).unwrap().payload()[0], 3);
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
