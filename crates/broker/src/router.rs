//! The routing table: the subscription trie plus the live connections it points at.
//!
//! Owned by the broker behind one `RwLock`: publishes take the read side (no allocation, no
//! await), subscribe / unsubscribe / connect / disconnect take the write side.

use crate::outbox::{Admission, Item, Memory, Pushed};
use crate::session::ConnShared;
use daemoneye_eventbus_core::codec::MessageRun;
use daemoneye_eventbus_core::{
    Message, Qos, QueueGroup, SubscriptionTrie, Topic, TopicCache, TopicFilter,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

type Slot = u32;
type GroupIdx = u32;

/// A queue group subscription in the trie: group index in the high half, slot in the low.
type Member = u64;

fn member(group: GroupIdx, slot: Slot) -> Member {
    (u64::from(group) << 32) | u64::from(slot)
}

fn split(m: Member) -> (GroupIdx, Slot) {
    ((m >> 32) as GroupIdx, m as Slot)
}

/// A plain subscription in the trie: the slot, and in the lowest bit whether the filter is
/// `Processed`. One trie serves both QoS: sorted values put a slot's entries side by side.
type Plain = u64;

fn plain(slot: Slot, qos: Qos) -> Plain {
    (u64::from(slot) << 1) | u64::from(qos == Qos::Processed)
}

struct Entry {
    conn: Arc<ConnShared>,
    filters: HashSet<TopicFilter>,
    /// The subset subscribed with [`Qos::Processed`]: deliveries never dropped.
    processed: HashSet<TopicFilter>,
    /// Filters subscribed in a queue group: the group and the QoS asked for.
    grouped: HashMap<TopicFilter, (GroupIdx, Qos)>,
}

impl Entry {
    /// Whether this connection holds a `Processed` subscription in `group`.
    fn processed_in(&self, group: GroupIdx) -> bool {
        self.grouped
            .values()
            .any(|(g, q)| *g == group && *q == Qos::Processed)
    }
}

/// A queue group: its name, how many subscriptions it has, and the round-robin cursor.
struct Group {
    name: QueueGroup,
    subscriptions: usize,
    cursor: AtomicU32,
}

/// Why a subscribe request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubscribeRefusal {
    /// The connection already holds this filter in another way (plain vs. group, or another
    /// group).
    Conflict(String),
}

/// Most topics one session remembers the matches of ([`RouteScratch`]).
pub(crate) const ROUTE_TOPICS: usize = 4096;

/// The subscriptions matching one topic.
#[derive(Default)]
struct Matches {
    slots: Vec<Plain>,
    members: Vec<Member>,
}

/// Reusable buffers for [`Router::route`], owned by one session so routing allocates nothing.
pub(crate) struct RouteScratch {
    /// Plain subscriptions matching the topic being routed, sorted (a connection's entries
    /// adjacent, its Processed one, if any, last).
    slots: Vec<Plain>,
    /// Queue group members matching the topic being routed, sorted (so grouped by group).
    members: Vec<Member>,
    /// The topics this session published lately and their matches: a topic is matched
    /// against the tries once per router generation, not once per message.
    matches: TopicCache<Matches>,
    /// Connections whose `Processed` queue was full, with the group the message went to them
    /// in: the publisher waits for them.
    pub(crate) blocked: Vec<(Arc<ConnShared>, Option<QueueGroup>)>,
    /// Connections whose queue went from empty to non-empty: their writers are woken once,
    /// after the whole batch is routed ([`RouteScratch::wake_writers`]).
    wake: Vec<Arc<ConnShared>>,
}

impl Default for RouteScratch {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            members: Vec::new(),
            matches: TopicCache::new(ROUTE_TOPICS),
            blocked: Vec::new(),
            wake: Vec::new(),
        }
    }
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
    /// Recipients matched: connections with a plain subscription plus one member per queue
    /// group. Zero means nobody could answer a request.
    pub(crate) matched: u64,
    /// Queues the message entered.
    pub(crate) queued: u64,
    /// Deliveries dropped (evicted older messages or this one).
    pub(crate) dropped: u64,
}

/// Filters → connections.
#[derive(Default)]
pub(crate) struct Router {
    trie: SubscriptionTrie<Plain>,
    /// Queue group subscriptions.
    grouped: SubscriptionTrie<Member>,
    groups: Vec<Option<Group>>,
    group_index: HashMap<QueueGroup, GroupIdx>,
    free_groups: Vec<GroupIdx>,
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
            grouped: HashMap::new(),
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
                let qos = if entry.processed.contains(f) {
                    Qos::Processed
                } else {
                    Qos::Realtime
                };
                self.trie.remove(f, plain(slot, qos));
            }
            for (f, (g, _)) in &entry.grouped {
                self.grouped.remove(f, member(*g, slot));
                self.release_group(*g);
            }
            self.free.push(slot);
        }
    }

    /// Subscribes, in a queue group when `group` is given; returns `Ok(false)` when the
    /// connection already had this subscription (a `Processed` request still upgrades a
    /// `Realtime` one).
    ///
    /// A connection holds a filter once: plainly or in one group. Asking for it the other way
    /// is refused (unsubscribe first).
    pub(crate) fn subscribe(
        &mut self,
        slot: Slot,
        filter: &TopicFilter,
        qos: Qos,
        group: Option<&QueueGroup>,
    ) -> Result<bool, SubscribeRefusal> {
        let Some(entry) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return Ok(false);
        };
        let held_in = entry
            .grouped
            .get(filter)
            .and_then(|(g, _)| self.groups[*g as usize].as_ref())
            .map(|g| g.name.clone());
        let held_plain = entry.filters.contains(filter);
        match (group, held_in, held_plain) {
            (None, Some(g), _) => {
                return Err(SubscribeRefusal::Conflict(format!(
                    "{filter} is already subscribed in queue group {g}; unsubscribe it first"
                )));
            }
            (Some(want), Some(g), _) if *want != g => {
                return Err(SubscribeRefusal::Conflict(format!(
                    "{filter} is already subscribed in queue group {g}; unsubscribe it first"
                )));
            }
            (Some(_), _, true) => {
                return Err(SubscribeRefusal::Conflict(format!(
                    "{filter} is already subscribed without a queue group; unsubscribe it first"
                )));
            }
            _ => {}
        }
        self.generation += 1;
        match group {
            None => Ok(self.subscribe_plain(slot, filter, qos)),
            Some(name) => Ok(self.subscribe_grouped(slot, filter, qos, name)),
        }
    }

    fn subscribe_grouped(
        &mut self,
        slot: Slot,
        filter: &TopicFilter,
        qos: Qos,
        name: &QueueGroup,
    ) -> bool {
        let g = self.group_of(name);
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        match entry.grouped.get_mut(filter) {
            Some((_, q)) => {
                if qos == Qos::Processed {
                    *q = Qos::Processed;
                }
                false
            }
            None => {
                entry.grouped.insert(filter.clone(), (g, qos));
                self.grouped.insert(filter, member(g, slot));
                if let Some(group) = self.groups[g as usize].as_mut() {
                    group.subscriptions += 1;
                }
                true
            }
        }
    }

    /// The index of group `name`, created when new.
    fn group_of(&mut self, name: &QueueGroup) -> GroupIdx {
        if let Some(g) = self.group_index.get(name) {
            return *g;
        }
        let group = Group {
            name: name.clone(),
            subscriptions: 0,
            cursor: AtomicU32::new(0),
        };
        let g = match self.free_groups.pop() {
            Some(g) => {
                self.groups[g as usize] = Some(group);
                g
            }
            None => {
                self.groups.push(Some(group));
                GroupIdx::try_from(self.groups.len() - 1).expect("fewer than 2^32 groups")
            }
        };
        self.group_index.insert(name.clone(), g);
        g
    }

    /// Drops one subscription of group `g`; forgets the group with its last one.
    fn release_group(&mut self, g: GroupIdx) {
        let Some(group) = self.groups[g as usize].as_mut() else {
            return;
        };
        group.subscriptions -= 1;
        if group.subscriptions == 0 {
            let name = group.name.clone();
            self.groups[g as usize] = None;
            self.group_index.remove(&name);
            self.free_groups.push(g);
        }
    }

    fn subscribe_plain(&mut self, slot: Slot, filter: &TopicFilter, qos: Qos) -> bool {
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        if !entry.filters.insert(filter.clone()) {
            // Held already: a Processed request upgrades a Realtime filter, never the reverse.
            if qos == Qos::Processed && entry.processed.insert(filter.clone()) {
                self.trie.remove(filter, plain(slot, Qos::Realtime));
                self.trie.insert(filter, plain(slot, Qos::Processed));
            }
            return false;
        }
        if qos == Qos::Processed {
            entry.processed.insert(filter.clone());
        }
        self.trie.insert(filter, plain(slot, qos))
    }

    /// Unsubscribes (plainly or from its group); returns `false` when the connection did not
    /// have this filter.
    pub(crate) fn unsubscribe(&mut self, slot: Slot, filter: &TopicFilter) -> bool {
        self.generation += 1;
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else {
            return false;
        };
        if let Some((g, _)) = entry.grouped.remove(filter) {
            self.grouped.remove(filter, member(g, slot));
            self.release_group(g);
            return true;
        }
        let qos = if entry.processed.remove(filter) {
            Qos::Processed
        } else {
            Qos::Realtime
        };
        if !entry.filters.remove(filter) {
            return false;
        }
        self.trie.remove(filter, plain(slot, qos))
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
        self.match_topic(msg.topic(), scratch);
        let mut routed = Routed::default();
        if !scratch.members.is_empty() {
            self.route_groups(msg, scratch, memory, waiting, &mut routed);
        }
        self.route_plain(Item::Msg(msg), scratch, memory, waiting, &mut routed);
        routed
    }

    /// Queues a run once for every connection with a matching plain filter, like
    /// [`Router::route`]. Returns `None`, queueing nothing, when a queue group subscribes to
    /// the topic: each message must then go to one member in turn, so the caller routes the
    /// run's messages one by one.
    pub(crate) fn route_run(
        &self,
        run: &MessageRun,
        scratch: &mut RouteScratch,
        memory: &Memory,
    ) -> Option<Routed> {
        self.match_topic(run.topic(), scratch);
        if !scratch.members.is_empty() {
            return None;
        }
        let mut routed = Routed::default();
        self.route_plain(
            Item::Run(run),
            scratch,
            memory,
            Waiting::Allowed,
            &mut routed,
        );
        Some(routed)
    }

    /// Fills `scratch.slots` and `scratch.members` with the subscriptions matching `topic`:
    /// from the session's cache when it matched the topic in this generation already.
    fn match_topic(&self, topic: &Topic, scratch: &mut RouteScratch) {
        let found = scratch.matches.derived(topic, self.generation, |found| {
            self.trie.matches_into(topic, &mut found.slots);
            if self.grouped.is_empty() {
                found.members.clear();
            } else {
                self.grouped.matches_into(topic, &mut found.members);
            }
        });
        scratch.slots.clear();
        scratch.slots.extend_from_slice(&found.slots);
        scratch.members.clear();
        scratch.members.extend_from_slice(&found.members);
    }

    /// Queues `item` once for every connection in `scratch.slots`.
    fn route_plain(
        &self,
        item: Item<'_>,
        scratch: &mut RouteScratch,
        memory: &Memory,
        waiting: Waiting,
        routed: &mut Routed,
    ) {
        let slots = std::mem::take(&mut scratch.slots);
        for run in slots.chunk_by(|a, b| a >> 1 == b >> 1) {
            let slot = (run[0] >> 1) as Slot;
            let processed = run.iter().any(|v| v & 1 == 1);
            routed.matched += 1;
            let Some(entry) = &self.slots[slot as usize] else {
                continue;
            };
            let admission = if waiting == Waiting::Allowed && processed {
                Admission::Wait
            } else {
                Admission::Shed
            };
            let pushed = entry.conn.outbox.push(item, memory, admission, None);
            Self::account(
                pushed,
                item.count() as u64,
                &entry.conn,
                None,
                scratch,
                routed,
            );
        }
        scratch.slots = slots;
    }

    /// Books the outcome of one push of `n` messages.
    fn account(
        pushed: Pushed,
        n: u64,
        conn: &Arc<ConnShared>,
        group: Option<&QueueGroup>,
        scratch: &mut RouteScratch,
        routed: &mut Routed,
    ) {
        match pushed {
            Pushed::Queued { evicted, wake } => {
                routed.queued += 1;
                routed.dropped += evicted;
                if wake {
                    scratch.wake.push(Arc::clone(conn));
                }
            }
            Pushed::Dropped => routed.dropped += n,
            Pushed::Overflow => {
                routed.dropped += n;
                conn.overflowed();
            }
            Pushed::Full => scratch.blocked.push((Arc::clone(conn), group.cloned())),
            Pushed::Closed => {}
        }
    }

    /// Gives `msg` to one member of every queue group in `scratch.members`: round robin,
    /// skipping members that are closing and, when another has room, members whose queue is
    /// full (so a stalled instance does not hold requests others could answer).
    fn route_groups(
        &self,
        msg: &Message,
        scratch: &mut RouteScratch,
        memory: &Memory,
        waiting: Waiting,
        routed: &mut Routed,
    ) {
        let members = std::mem::take(&mut scratch.members);
        for run in members.chunk_by(|a, b| split(*a).0 == split(*b).0) {
            let g = split(run[0]).0;
            let Some(group) = self.groups[g as usize].as_ref() else {
                continue;
            };
            if let Some((slot, admission)) = self.pick(group, run, msg, memory, waiting) {
                let Some(entry) = &self.slots[slot as usize] else {
                    continue;
                };
                routed.matched += 1;
                let pushed =
                    entry
                        .conn
                        .outbox
                        .push_message(msg, memory, admission, Some(&group.name));
                if pushed == Pushed::Closed {
                    // Closed since the pick (not possible while routing holds the read lock on
                    // one thread); counted rather than lost silently.
                    routed.dropped += 1;
                }
                Self::account(pushed, 1, &entry.conn, Some(&group.name), scratch, routed);
            }
        }
        scratch.members = members;
    }

    /// Chooses the member of one group (`run`: its matching members) that gets `msg`.
    fn pick(
        &self,
        group: &Group,
        run: &[Member],
        msg: &Message,
        memory: &Memory,
        waiting: Waiting,
    ) -> Option<(Slot, Admission)> {
        let n = run.len();
        let start = group.cursor.fetch_add(1, Ordering::Relaxed) as usize % n;
        let mut fallback = None;
        for i in 0..n {
            let (g, slot) = split(run[(start + i) % n]);
            let Some(entry) = &self.slots[slot as usize] else {
                continue;
            };
            if entry.conn.cancel.is_cancelled() || entry.conn.outbox.is_closed() {
                continue;
            }
            let admission = if waiting == Waiting::Allowed && entry.processed_in(g) {
                Admission::Wait
            } else {
                Admission::Shed
            };
            if entry.conn.outbox.has_room_for(msg.accounted_size(), memory) {
                return Some((slot, admission));
            }
            fallback.get_or_insert((slot, admission));
        }
        fallback
    }

    /// Offers `msg` again to group `group` (a member that was given it went away before
    /// writing it). Returns whether another member took it.
    pub(crate) fn reoffer(
        &self,
        msg: &Message,
        group: &QueueGroup,
        scratch: &mut RouteScratch,
        memory: &Memory,
    ) -> bool {
        let Some(&g) = self.group_index.get(group) else {
            return false;
        };
        let Some(grp) = self.groups[g as usize].as_ref() else {
            return false;
        };
        self.grouped.matches_into(msg.topic(), &mut scratch.members);
        scratch.members.retain(|m| split(*m).0 == g);
        let members = std::mem::take(&mut scratch.members);
        // Never waits: the session re-offering is going away.
        let picked = self.pick(grp, &members, msg, memory, Waiting::Never);
        scratch.members = members;
        let Some((slot, admission)) = picked else {
            return false;
        };
        let Some(entry) = &self.slots[slot as usize] else {
            return false;
        };
        let mut routed = Routed::default();
        let pushed = entry
            .conn
            .outbox
            .push_message(msg, memory, admission, Some(group));
        Self::account(pushed, 1, &entry.conn, None, scratch, &mut routed);
        scratch.blocked.clear();
        routed.queued > 0
    }

    /// Whether `conn` still holds a subscription in `group` matching `topic`.
    pub(crate) fn holds_group(&self, conn: &ConnShared, group: &QueueGroup, topic: &Topic) -> bool {
        let slot = conn.slot.load(Ordering::Relaxed);
        // Slots are reused: the entry must be this very connection.
        let Some(entry) = self
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .filter(|e| std::ptr::eq(Arc::as_ptr(&e.conn), conn))
        else {
            return false;
        };
        let Some(&g) = self.group_index.get(group) else {
            return false;
        };
        entry
            .grouped
            .iter()
            .any(|(f, (eg, _))| *eg == g && f.matches(topic))
    }

    /// Number of filters held by a connection.
    pub(crate) fn filter_count_of(&self, slot: Slot) -> usize {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map_or(0, |e| e.filters.len() + e.grouped.len())
    }

    /// Live connections.
    pub(crate) fn connections(&self) -> impl Iterator<Item = (Slot, &Arc<ConnShared>)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as Slot, &e.conn)))
    }

    /// (filter, connection) entries, plain and grouped.
    pub(crate) fn subscription_count(&self) -> usize {
        self.trie.len() + self.grouped.len()
    }

    /// Distinct filters (a filter used plainly and in a group counts twice).
    pub(crate) fn topic_count(&self) -> usize {
        self.trie.filter_count() + self.grouped.filter_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Out;
    use bytes::Bytes;
    use daemoneye_eventbus_core::Header;
    use std::collections::VecDeque;

    fn msg(topic: &str) -> Message {
        Message::new(Topic::new(topic).unwrap(), Header::default(), Bytes::new())
    }

    fn filter(f: &str) -> TopicFilter {
        TopicFilter::new(f).unwrap()
    }

    fn group(g: &str) -> QueueGroup {
        QueueGroup::new(g).unwrap()
    }

    struct Fixture {
        router: Router,
        memory: Memory,
        scratch: RouteScratch,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                router: Router::default(),
                memory: Memory::new(1 << 30),
                scratch: RouteScratch::default(),
            }
        }

        fn connect(&mut self, name: &str, max_msgs: usize) -> (Arc<ConnShared>, Slot) {
            let conn = Arc::new(ConnShared::for_test(name, max_msgs));
            let slot = self.router.add(Arc::clone(&conn));
            conn.slot.store(slot, Ordering::Relaxed);
            (conn, slot)
        }

        fn route(&mut self, topic: &str) -> Routed {
            let routed = self.router.route(
                &msg(topic),
                &mut self.scratch,
                &self.memory,
                Waiting::Allowed,
            );
            self.scratch.blocked.clear();
            routed
        }
    }

    /// Group names of the messages queued for `conn` (`-` for a plain delivery).
    fn taken(conn: &ConnShared) -> Vec<String> {
        let mut q = VecDeque::new();
        conn.outbox.take(&mut q);
        q.into_iter()
            .filter_map(|o| match o {
                Out::Msg(_, _, g) => Some(g.map_or_else(|| "-".to_owned(), |g| g.to_string())),
                Out::Run(..) => Some("run".to_owned()),
                Out::Encoded(_) => Some("encoded".to_owned()),
                Out::Frame(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_group_gives_each_message_to_one_member_in_turn() {
        let mut f = Fixture::new();
        let (a, sa) = f.connect("a", 100);
        let (b, sb) = f.connect("b", 100);
        let (watcher, sw) = f.connect("watcher", 100);
        let g = group("workers");
        assert_eq!(
            f.router
                .subscribe(sa, &filter("job.+"), Qos::Realtime, Some(&g)),
            Ok(true)
        );
        assert_eq!(
            f.router
                .subscribe(sb, &filter("job.#"), Qos::Realtime, Some(&g)),
            Ok(true)
        );
        assert_eq!(
            f.router
                .subscribe(sw, &filter("job.#"), Qos::Realtime, None),
            Ok(true)
        );
        for _ in 0..6 {
            assert_eq!(
                f.route("job.x").matched,
                2,
                "one member plus the plain watcher"
            );
        }
        let (ta, tb) = (taken(&a), taken(&b));
        assert_eq!((ta.len(), tb.len()), (3, 3), "alternating: {ta:?} {tb:?}");
        assert!(ta.iter().chain(&tb).all(|g| g == "workers"));
        assert_eq!(taken(&watcher), vec!["-"; 6]);
        // Nobody at all: matched is zero (the no-responders case).
        assert_eq!(f.route("other").matched, 0);
    }

    #[test]
    fn closing_and_full_members_are_passed_over() {
        let mut f = Fixture::new();
        let (a, sa) = f.connect("a", 1);
        let (b, sb) = f.connect("b", 100);
        let g = group("g");
        for s in [sa, sb] {
            f.router
                .subscribe(s, &filter("t"), Qos::Realtime, Some(&g))
                .unwrap();
        }
        for _ in 0..5 {
            f.route("t");
        }
        // `a` holds one message (full after it); the others went to `b`.
        assert_eq!((taken(&a).len(), taken(&b).len()), (1, 4));
        a.cancel.cancel();
        for _ in 0..4 {
            f.route("t");
        }
        assert_eq!((taken(&a).len(), taken(&b).len()), (0, 4));
        // A departed member's message goes to another member of its group.
        let m = msg("t");
        assert!(f.router.reoffer(&m, &g, &mut f.scratch, &f.memory));
        assert_eq!(taken(&b).len(), 1);
        assert!(
            !f.router
                .reoffer(&m, &group("nobody"), &mut f.scratch, &f.memory)
        );
    }

    #[test]
    fn a_filter_is_held_once_and_groups_are_reclaimed() {
        let mut f = Fixture::new();
        let (a, sa) = f.connect("a", 100);
        let g = group("g");
        f.router
            .subscribe(sa, &filter("t"), Qos::Realtime, Some(&g))
            .unwrap();
        assert!(matches!(
            f.router.subscribe(sa, &filter("t"), Qos::Realtime, None),
            Err(SubscribeRefusal::Conflict(_))
        ));
        assert!(matches!(
            f.router
                .subscribe(sa, &filter("t"), Qos::Realtime, Some(&group("h"))),
            Err(SubscribeRefusal::Conflict(_))
        ));
        assert_eq!(
            f.router
                .subscribe(sa, &filter("t"), Qos::Processed, Some(&g)),
            Ok(false)
        );
        assert!(f.router.holds_group(&a, &g, &Topic::new("t").unwrap()));
        assert!(f.router.unsubscribe(sa, &filter("t")));
        assert!(!f.router.holds_group(&a, &g, &Topic::new("t").unwrap()));
        assert!(
            f.router.group_index.is_empty(),
            "the last subscription frees the group"
        );
        // The freed index serves the next group.
        f.router
            .subscribe(sa, &filter("u"), Qos::Realtime, Some(&group("k")))
            .unwrap();
        assert_eq!(f.router.groups.len(), 1);
        f.router.remove(sa);
        assert_eq!(f.router.subscription_count(), 0);
        assert!(f.router.group_index.is_empty());
    }
}
