//! A connection's at-most-once queue: its Realtime subscriptions' deliveries and the broker's
//! own `$sys` messages. It never makes a publisher wait: when full, the connection's
//! slow-reader policy applies.

use super::lane::Lane;
use super::{Bounds, Drops, Encoding, Item, Memory, Pushed};
use daemoneye_eventbus_core::QueueGroup;
use daemoneye_eventbus_core::codec::{DropReason, SlowReaderPolicy};

/// See the module documentation.
pub(crate) struct RealtimeQueue {
    pub(super) lane: Lane,
    pub(super) drops: Drops,
    bounds: Bounds,
    policy: SlowReaderPolicy,
}

impl RealtimeQueue {
    pub(crate) fn new(bounds: Bounds, policy: SlowReaderPolicy) -> Self {
        Self {
            lane: Lane::default(),
            drops: Drops::default(),
            bounds,
            policy,
        }
    }

    fn over_bounds(&self, size: usize, n: usize) -> bool {
        !self.lane.is_empty()
            && (self.lane.msgs + n > self.bounds.msgs || self.lane.bytes + size > self.bounds.bytes)
    }

    /// Whether `size` bytes would enter without evicting anything.
    pub(crate) fn has_room(&self, size: usize, memory: &Memory) -> bool {
        !self.over_bounds(size, 1) && memory.has_room(size)
    }

    /// Queues `item` under the bounds and the broker-wide cap. `DropOldest`: the oldest
    /// deliveries are evicted until it fits (counted per topic, announced); should the cap
    /// leave no room even then, `item` is dropped instead. `Disconnect`: a full queue is
    /// [`Pushed::Overflow`] (`item` counted as dropped, never announced).
    pub(crate) fn push(
        &mut self,
        item: Item<'_>,
        memory: &Memory,
        encoding: Encoding,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        let (size, n) = (item.size(), item.count());
        let mut evicted = 0;
        let mut freed = 0;
        while self.over_bounds(size, n) {
            if self.policy == SlowReaderPolicy::Disconnect {
                self.drops.record_unannounced(item.topic(), n as u64);
                return Pushed::Overflow;
            }
            let Some((bytes, msgs)) = self
                .lane
                .evict_oldest(&mut self.drops, DropReason::SlowReader)
            else {
                break;
            };
            freed += bytes;
            evicted += msgs;
        }
        memory.release(freed);
        while !memory.try_reserve(size) {
            match self
                .lane
                .evict_oldest(&mut self.drops, DropReason::MemoryCap)
            {
                Some((bytes, msgs)) => {
                    memory.release(bytes);
                    evicted += msgs;
                }
                None => {
                    self.drops
                        .record(item.topic(), DropReason::MemoryCap, n as u64);
                    return Pushed::Dropped;
                }
            }
        }
        self.lane.append(item, encoding, group);
        Pushed::Queued {
            evicted,
            wake: false,
        }
    }
}
