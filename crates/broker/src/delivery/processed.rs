//! A connection's Processed queue: deliveries of its Processed subscriptions. Nothing in it is
//! ever evicted or dropped for lack of room: a push that does not fit is [`Pushed::Full`] and
//! the publisher waits.

use super::lane::Lane;
use super::{Bounds, Encoding, Item, Memory, Pushed};
use daemoneye_eventbus_core::QueueGroup;

/// See the module documentation.
pub(crate) struct ProcessedQueue {
    pub(super) lane: Lane,
    bounds: Bounds,
}

impl ProcessedQueue {
    pub(crate) fn new(bounds: Bounds) -> Self {
        Self {
            lane: Lane::default(),
            bounds,
        }
    }

    /// Whether `n` messages of `size` bytes in all fit the bounds (one message or run always
    /// fits an empty queue).
    fn fits(&self, size: usize, n: usize) -> bool {
        self.lane.is_empty()
            || (self.lane.msgs + n <= self.bounds.msgs
                && self.lane.bytes + size <= self.bounds.bytes)
    }

    /// Whether `n` messages of `size` bytes would be queued now.
    pub(crate) fn has_room(&self, size: usize, n: usize, memory: &Memory) -> bool {
        self.fits(size, n) && memory.has_room(size)
    }

    /// Queues `item` if the bounds and the broker-wide cap have room; otherwise
    /// [`Pushed::Full`], with nothing queued or dropped.
    pub(crate) fn push(
        &mut self,
        item: Item<'_>,
        memory: &Memory,
        encoding: Encoding,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        if !self.fits(item.size(), item.count()) {
            return Pushed::Full;
        }
        match self.lane.prepare(item, encoding, group, memory) {
            Some((prepared, charge)) if memory.try_reserve(charge) => {
                self.lane.append(item, prepared, charge);
                Pushed::Queued {
                    evicted: 0,
                    wake: false,
                }
            }
            _ => Pushed::Full,
        }
    }
}
