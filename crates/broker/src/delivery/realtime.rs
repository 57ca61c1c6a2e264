//! A connection's at-most-once queue: its Realtime subscriptions' deliveries and the broker's
//! own `$sys` messages. It never makes a publisher wait: when full, the connection's
//! slow-reader policy applies.

use super::lane::Lane;
use super::{Bounds, DropTotals, Drops, Encoding, Item, Memory, Pushed};
use daemoneye_eventbus_core::QueueGroup;
use daemoneye_eventbus_core::codec::{DropReason, SlowReaderPolicy};
use std::sync::Arc;

/// See the module documentation.
pub(crate) struct RealtimeQueue {
    pub(super) lane: Lane,
    pub(super) drops: Drops,
    bounds: Bounds,
    policy: SlowReaderPolicy,
}

impl RealtimeQueue {
    pub(crate) fn new(bounds: Bounds, policy: SlowReaderPolicy, totals: Arc<DropTotals>) -> Self {
        Self {
            lane: Lane::default(),
            drops: Drops::counted_in(totals),
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
    /// deliveries are evicted until it fits the bounds (counted per topic, announced); when the
    /// cap has no room, the oldest are evicted while that frees memory, at most
    /// [`CAP_EVICTIONS`] of them, and then `item` is dropped instead. `Disconnect`: a full
    /// queue is [`Pushed::Overflow`] (`item` counted as dropped, never announced).
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
            let Some(e) = self
                .lane
                .evict_oldest(&mut self.drops, DropReason::SlowReader)
            else {
                break;
            };
            freed += e.charge;
            evicted += e.msgs;
        }
        memory.release(freed);
        let mut tries = 0;
        loop {
            if let Some((prepared, charge)) = self.lane.prepare(item, encoding, group, memory)
                && memory.try_reserve(charge)
            {
                self.lane.append(item, prepared, charge);
                return Pushed::Queued {
                    evicted,
                    wake: false,
                };
            }
            // The cap: the oldest of this queue go while that gives memory back (a copy other
            // queues share gives back only its slot here).
            let used = memory.used();
            let gone = (tries < CAP_EVICTIONS)
                .then(|| {
                    self.lane
                        .evict_oldest(&mut self.drops, DropReason::MemoryCap)
                })
                .flatten();
            let Some(e) = gone else {
                self.drops
                    .record(item.topic(), DropReason::MemoryCap, n as u64);
                return Pushed::Dropped;
            };
            memory.release(e.charge);
            evicted += e.msgs;
            tries += 1;
            if e.shared && used.saturating_sub(memory.used()) <= e.charge {
                // Its copy lives on in another queue: evicting more of ours frees nothing.
                tries = CAP_EVICTIONS;
            }
        }
    }
}

/// Deliveries one push evicts at most to make room under the broker-wide cap.
pub(crate) const CAP_EVICTIONS: usize = 4096;
