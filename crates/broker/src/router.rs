//! The routing table: the subscription trie plus the live connections it points at.
//!
//! Owned by the broker behind one `RwLock`: publishes take the read side (no allocation, no
//! await), subscribe / unsubscribe / connect / disconnect take the write side.

use crate::outbox::{Admission, Memory, Pushed};
use crate::session::ConnShared;
use daemoneye_eventbus_core::{Message, Qos, SubscriptionTrie, Topic, TopicFilter};
use std::collections::HashSet;
use std::sync::Arc;

type Slot = u32;

struct Entry {
    conn: Arc<ConnShared>,
    filters: HashSet<TopicFilter>,
    /// The subset subscribed with [`Qos::Processed`]: deliveries never dropped.
    processed: HashSet<TopicFilter>,
}

/// Reusable buffers for [`Router::route`], owned by one session so routing allocates nothing.
#[derive(Default)]
pub(crate) struct RouteScratch {
    slots: Vec<Slot>,
    processed: Vec<Slot>,
    /// The topic `slots` / `processed` were matched for, and the router generation then:
    /// a burst on one topic is matched once.
    matched: Option<(Topic, u64)>,
    /// Connections whose `Processed` queue was full: the publisher waits for them.
    pub(crate) blocked: Vec<Arc<ConnShared>>,
    /// Connections whose queue went from empty to non-empty: their writers are woken once,
    /// after the whole batch is routed ([`RouteScratch::wake_writers`]).
    wake: Vec<Arc<ConnShared>>,
}

impl RouteScratch {
    /// Wakes every writer that got its first message of this batch.
    pub(crate) fn wake_writers(&mut self) {
        for conn in self.wake.drain(..) {
            conn.outbox.wake();
        }
    }
}

/// Whether routing may leave a message waiting for a full `Processed` queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// A client's publish: its session waits (backpressure).
    Allowed,
    /// The broker's own messages: the connection's slow-reader policy applies instead, so a
    /// miss is counted per connection and topic and noticed in-band.
    Never,
}

/// Result of routing one message.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Routed {
    /// Queues the message entered.
    pub(crate) queued: u64,
    /// Deliveries dropped (evicted older messages or this one).
    pub(crate) dropped: u64,
}

/// Filters → connections.
#[derive(Default)]
pub(crate) struct Router {
    trie: SubscriptionTrie<Slot>,
    /// Only the `Processed` subscriptions, consulted when it is not empty.
    processed: SubscriptionTrie<Slot>,
    slots: Vec<Option<Entry>>,
    free: Vec<Slot>,
    /// Bumped by every change of connections or subscriptions (invalidates cached matches).
    generation: u64,
}

impl Router {
    /// Registers a connection; returns its slot.
    pub(crate) fn add(&mut self, conn: Arc<ConnShared>) -> Slot {
        self.generation += 1;
        let entry = Entry {
            conn,
            filters: HashSet::new(),
            processed: HashSet::new(),
        };
        if let Some(slot) = self.free.pop() {
            self.slots[slot as usize] = Some(entry);
            return slot;
        }
        self.slots.push(Some(entry));
        Slot::try_from(self.slots.len() - 1).expect("fewer than 2^32 connections")
    }

    /// Removes a connection and all its subscriptions.
    pub(crate) fn remove(&mut self, slot: Slot) {
        self.generation += 1;
        if let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::take) {
            for f in &entry.filters {
                self.trie.remove(f, slot);
            }
            for f in &entry.processed {
                self.processed.remove(f, slot);
            }
            self.free.push(slot);
        }
    }

    /// Subscribes; returns `false` when the connection already had this filter (a
    /// `Processed` request still upgrades a `Realtime` one).
    pub(crate) fn subscribe(&mut self, slot: Slot, filter: &TopicFilter, qos: Qos) -> bool {
        self.generation += 1;
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        if qos == Qos::Processed && entry.processed.insert(filter.clone()) {
            self.processed.insert(filter, slot);
        }
        if !entry.filters.insert(filter.clone()) {
            return false;
        }
        self.trie.insert(filter, slot)
    }

    /// Unsubscribes; returns `false` when the connection did not have this filter.
    pub(crate) fn unsubscribe(&mut self, slot: Slot, filter: &TopicFilter) -> bool {
        self.generation += 1;
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        if entry.processed.remove(filter) {
            self.processed.remove(filter, slot);
        }
        if !entry.filters.remove(filter) {
            return false;
        }
        self.trie.remove(filter, slot)
    }

    /// Queues `msg` once for every connection with a matching filter: under its slow-reader
    /// policy, or, when a matching subscription is `Processed`, without dropping (a full queue
    /// lands in `scratch.blocked` for the publisher to wait on). Allocates nothing.
    pub(crate) fn route(
        &self,
        msg: &Message,
        scratch: &mut RouteScratch,
        memory: &Memory,
        waiting: Waiting,
    ) -> Routed {
        let any_processed = !self.processed.is_empty();
        let fresh =
            matches!(&scratch.matched, Some((t, g)) if *g == self.generation && t == msg.topic());
        if !fresh {
            self.trie.matches_into(msg.topic(), &mut scratch.slots);
            if any_processed {
                self.processed
                    .matches_into(msg.topic(), &mut scratch.processed);
                scratch.processed.sort_unstable();
            }
            scratch.matched = Some((msg.topic().clone(), self.generation));
        }
        let mut routed = Routed::default();
        for slot in &scratch.slots {
            let Some(entry) = &self.slots[*slot as usize] else {
                continue;
            };
            let admission = if waiting == Waiting::Allowed
                && any_processed
                && scratch.processed.binary_search(slot).is_ok()
            {
                Admission::Wait
            } else {
                Admission::Shed
            };
            match entry.conn.outbox.push_message(msg, memory, admission) {
                Pushed::Queued { evicted, wake } => {
                    routed.queued += 1;
                    routed.dropped += evicted;
                    if wake {
                        scratch.wake.push(Arc::clone(&entry.conn));
                    }
                }
                Pushed::Dropped => routed.dropped += 1,
                Pushed::Overflow => {
                    routed.dropped += 1;
                    entry.conn.overflowed();
                }
                Pushed::Full => scratch.blocked.push(Arc::clone(&entry.conn)),
                Pushed::Closed => {}
            }
        }
        routed
    }

    /// Number of filters held by a connection.
    pub(crate) fn filter_count_of(&self, slot: Slot) -> usize {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map_or(0, |e| e.filters.len())
    }

    /// Live connections.
    pub(crate) fn connections(&self) -> impl Iterator<Item = (Slot, &Arc<ConnShared>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as Slot, &e.conn)))
    }

    /// (filter, connection) entries.
    pub(crate) fn subscription_count(&self) -> usize {
        self.trie.len()
    }

    /// Distinct filters.
    pub(crate) fn topic_count(&self) -> usize {
        self.trie.filter_count()
    }
}
