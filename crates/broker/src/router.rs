//! The routing table: which connections' subscriptions match a topic. It holds filters and
//! the connections they belong to, and answers a [`Plan`] (who gets a message, in which
//! class of queue), never touching a queue: applying the plan is the delivery layer's job
//! (`hub.rs`). Generic over what it records per connection (`C`), so it depends on nothing
//! but the core.
//!
//! Owned by the broker behind one `RwLock`: routing takes the read side (no allocation, no
//! await), subscribe / unsubscribe / connect / disconnect take the write side.

use daemoneye_eventbus_core::{Qos, QueueGroup, SubscriptionTrie, Topic, TopicCache, TopicFilter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};

/// A connection's place in the table.
pub(crate) type Slot = u32;
/// A queue group's place in the table.
pub(crate) type GroupIdx = u32;

/// A queue group subscription in the trie: group index in the high half, slot in the low.
type Grouped = u64;

fn grouped(group: GroupIdx, slot: Slot) -> Grouped {
    (u64::from(group) << 32) | u64::from(slot)
}

fn split(m: Grouped) -> (GroupIdx, Slot) {
    ((m >> 32) as GroupIdx, m as Slot)
}

/// A plain subscription in the trie: the slot, and in the lowest bit whether the filter is
/// `Processed`. One trie serves both QoS: sorted values put a slot's entries side by side.
type Plain = u64;

fn plain(slot: Slot, qos: Qos) -> Plain {
    (u64::from(slot) << 1) | u64::from(qos == Qos::Processed)
}

/// Which of a connection's queues a delivery goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// At most once, under the connection's slow-reader policy.
    Realtime,
    /// Never dropped for lack of room: the publisher waits.
    Processed,
}

impl Class {
    fn of(processed: bool) -> Self {
        if processed {
            Self::Processed
        } else {
            Self::Realtime
        }
    }
}

/// A connection with a plain subscription matching: it gets the message once, in `class`
/// (Processed when any of its matching filters is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) slot: Slot,
    pub(crate) class: Class,
}

/// A queue group member whose subscription matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) group: GroupIdx,
    pub(crate) slot: Slot,
    pub(crate) class: Class,
}

/// Who gets a message: every plain target, one member of each group (chosen when the plan is
/// applied, [`Router::turn`]), and every acknowledged subscription whose filters match.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) plain: Vec<Target>,
    /// Sorted by group.
    pub(crate) members: Vec<Member>,
    /// Acknowledged subscriptions, by index ([`Router::acked`]), each once.
    pub(crate) acked: Vec<u32>,
}

impl Plan {
    /// The matching members, one slice per group.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &[Member]> {
        self.members.chunk_by(|a, b| a.group == b.group)
    }
}

/// Most topics one session remembers the plans of ([`PlanCache`]).
pub(crate) const ROUTE_TOPICS: usize = 4096;

/// The plans of the topics one session routed lately, each valid for the router generation
/// it was made in: a topic walks the tries once while the table is unchanged, whether it
/// repeats (a burst) or comes back (a publisher cycling through many topics).
pub(crate) struct PlanCache {
    plans: TopicCache<Plan>,
    raw: Vec<u64>,
}

impl Default for PlanCache {
    fn default() -> Self {
        Self {
            plans: TopicCache::new(ROUTE_TOPICS),
            raw: Vec::new(),
        }
    }
}

struct Entry<C> {
    conn: C,
    filters: HashSet<TopicFilter>,
    /// The subset subscribed with [`Qos::Processed`].
    processed: HashSet<TopicFilter>,
    /// Filters subscribed in a queue group: the group and the QoS asked for.
    grouped: HashMap<TopicFilter, (GroupIdx, Qos)>,
}

impl<C> Entry<C> {
    /// Whether this connection holds a `Processed` subscription in `group`.
    fn processed_in(&self, group: GroupIdx) -> bool {
        self.grouped
            .values()
            .any(|(g, q)| *g == group && *q == Qos::Processed)
    }

    fn count(&self) -> usize {
        self.filters.len() + self.grouped.len()
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
    /// The connection holds `max_subscriptions_per_connection` filters already.
    Limit(String),
    /// The broker-wide memory cap leaves no room for another subscription.
    Memory(String),
    /// The filter is another connection's reply inbox.
    Inbox(String),
}

/// Filters → connections and acknowledged subscriptions. See the module documentation.
pub(crate) struct Router<C, A> {
    trie: SubscriptionTrie<Plain>,
    /// Queue group subscriptions.
    grouped: SubscriptionTrie<Grouped>,
    groups: Vec<Option<Group>>,
    group_index: HashMap<QueueGroup, GroupIdx>,
    free_groups: Vec<GroupIdx>,
    slots: Vec<Option<Entry<C>>>,
    free: Vec<Slot>,
    /// Bumped by every change of connections or subscriptions (invalidates cached plans).
    generation: u64,
    /// Filters one connection may hold.
    max_per_connection: usize,
    /// Subscribers one filter may have (plain, in groups and acknowledged).
    max_subscribers: usize,
    /// Acknowledged subscriptions' filters.
    acked_trie: SubscriptionTrie<u32>,
    /// Acknowledged subscriptions by index, with their filters.
    acked: Vec<Option<(A, Vec<TopicFilter>)>>,
    free_acked: Vec<u32>,
}

impl<C, A> Router<C, A> {
    /// An empty table allowing each connection `max_per_connection` filters, and each filter
    /// `max_subscribers` subscribers.
    pub(crate) fn new(max_per_connection: usize, max_subscribers: usize) -> Self {
        Self {
            trie: SubscriptionTrie::default(),
            grouped: SubscriptionTrie::default(),
            groups: Vec::new(),
            group_index: HashMap::new(),
            free_groups: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            generation: 0,
            max_per_connection,
            max_subscribers,
            acked_trie: SubscriptionTrie::default(),
            acked: Vec::new(),
            free_acked: Vec::new(),
        }
    }

    /// How many subscribers `filter` has: connections holding it plainly or in a group, and
    /// acknowledged subscriptions.
    pub(crate) fn subscribers_of(&self, filter: &TopicFilter) -> usize {
        self.trie.subscribers_of(filter)
            + self.grouped.subscribers_of(filter)
            + self.acked_trie.subscribers_of(filter)
    }

    /// Refuses a new subscriber of a filter that has `max_subscribers` already.
    pub(crate) fn room_for_subscribers(&self, filters: &[TopicFilter]) -> Result<(), String> {
        for f in filters {
            let n = self.subscribers_of(f);
            if n >= self.max_subscribers {
                return Err(format!(
                    "{f} has {n} subscribers, the broker's max_subscribers; retry when one has \
                     gone"
                ));
            }
        }
        Ok(())
    }

    /// Registers an acknowledged subscription made by `make` from its index; returns the
    /// index.
    pub(crate) fn add_acked(
        &mut self,
        filters: &[TopicFilter],
        make: impl FnOnce(u32) -> A,
    ) -> u32 {
        self.generation += 1;
        let index = self.free_acked.pop().unwrap_or_else(|| {
            self.acked.push(None);
            u32::try_from(self.acked.len() - 1).expect("fewer than 2^32 subscriptions")
        });
        for f in filters {
            self.acked_trie.insert(f, index);
        }
        self.acked[index as usize] = Some((make(index), filters.to_vec()));
        index
    }

    /// Removes acknowledged subscription `index` if it is the one `is_it` recognises; returns
    /// it.
    pub(crate) fn remove_acked(&mut self, index: u32, is_it: impl FnOnce(&A) -> bool) -> Option<A> {
        let entry = self.acked.get_mut(index as usize)?;
        if !entry.as_ref().is_some_and(|(a, _)| is_it(a)) {
            // Already gone, and the index perhaps given to another subscription since.
            return None;
        }
        let (sub, filters) = entry.take()?;
        self.generation += 1;
        for f in &filters {
            self.acked_trie.remove(f, index);
        }
        self.free_acked.push(index);
        Some(sub)
    }

    /// The acknowledged subscription `index`.
    pub(crate) fn acked(&self, index: u32) -> Option<&A> {
        self.acked.get(index as usize)?.as_ref().map(|(a, _)| a)
    }

    /// Every acknowledged subscription.
    pub(crate) fn acked_subs(&self) -> impl Iterator<Item = &A> {
        self.acked.iter().flatten().map(|(a, _)| a)
    }

    /// Registers a connection; returns its slot.
    pub(crate) fn add(&mut self, conn: C) -> Slot {
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

    /// Removes a connection and all its subscriptions; returns its filters.
    pub(crate) fn remove(&mut self, slot: Slot) -> Vec<TopicFilter> {
        self.generation += 1;
        let Some(entry) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
            return Vec::new();
        };
        for f in &entry.filters {
            let qos = if entry.processed.contains(f) {
                Qos::Processed
            } else {
                Qos::Realtime
            };
            self.trie.remove(f, plain(slot, qos));
        }
        for (f, (g, _)) in &entry.grouped {
            self.grouped.remove(f, grouped(*g, slot));
            self.release_group(*g);
        }
        self.free.push(slot);
        entry
            .filters
            .into_iter()
            .chain(entry.grouped.into_keys())
            .collect()
    }

    /// What the table records for the connection in `slot`.
    pub(crate) fn conn(&self, slot: Slot) -> Option<&C> {
        self.slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map(|e| &e.conn)
    }

    /// Subscribes, in a queue group when `group` is given; returns `Ok(false)` when the
    /// connection already had this subscription (a `Processed` request still upgrades a
    /// `Realtime` one).
    ///
    /// A connection holds a filter once: plainly or in one group. Asking for it the other way
    /// is refused (unsubscribe first). `elsewhere` filters it holds outside this table (its
    /// acknowledged subscriptions) count against `max_subscriptions_per_connection` too.
    pub(crate) fn subscribe_besides(
        &mut self,
        slot: Slot,
        filter: &TopicFilter,
        qos: Qos,
        group: Option<&QueueGroup>,
        elsewhere: usize,
    ) -> Result<bool, SubscribeRefusal> {
        let Some(entry) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
            return Ok(false);
        };
        let held_in: Option<QueueGroup> = entry
            .grouped
            .get(filter)
            .and_then(|(g, _)| self.groups[*g as usize].as_ref())
            .map(|g| g.name.clone());
        let held_plain = entry.filters.contains(filter);
        let is_new = held_in.is_none() && !held_plain;
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
        let held = entry.count() + elsewhere;
        if is_new && held >= self.max_per_connection {
            return Err(SubscribeRefusal::Limit(format!(
                "this connection holds {held} subscriptions, the broker's \
                 max_subscriptions_per_connection; unsubscribe some first"
            )));
        }
        if is_new {
            self.room_for_subscribers(std::slice::from_ref(filter))
                .map_err(SubscribeRefusal::Limit)?;
        }
        self.generation += 1;
        match group {
            None => Ok(self.subscribe_plain(slot, filter, qos)),
            Some(name) => Ok(self.subscribe_grouped(slot, filter, qos, name)),
        }
    }

    /// [`Router::subscribe_besides`] for a connection holding nothing elsewhere.
    #[cfg(test)]
    pub(crate) fn subscribe(
        &mut self,
        slot: Slot,
        filter: &TopicFilter,
        qos: Qos,
        group: Option<&QueueGroup>,
    ) -> Result<bool, SubscribeRefusal> {
        self.subscribe_besides(slot, filter, qos, group, 0)
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
                self.grouped.insert(filter, grouped(g, slot));
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
            self.grouped.remove(filter, grouped(g, slot));
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

    /// Who gets a message on `topic`: from the session's cache when it planned the topic in
    /// this generation already. Allocates nothing once the cache is warm.
    pub(crate) fn plan<'c>(&self, topic: &Topic, cache: &'c mut PlanCache) -> &'c Plan {
        let PlanCache { plans, raw } = cache;
        plans.derived(topic, self.generation, |plan| {
            plan.plain.clear();
            self.trie.matches_into(topic, raw);
            // A connection's entries are adjacent, its Processed one (if any) last.
            for run in raw.chunk_by(|a, b| a >> 1 == b >> 1) {
                plan.plain.push(Target {
                    slot: (run[0] >> 1) as Slot,
                    class: Class::of(run.iter().any(|v| v & 1 == 1)),
                });
            }
            plan.members.clear();
            if !self.grouped.is_empty() {
                self.grouped.matches_into(topic, raw);
                plan.members.extend(raw.iter().map(|m| self.member(*m)));
            }
            plan.acked.clear();
            if !self.acked_trie.is_empty() {
                self.acked_trie.matches_into(topic, &mut plan.acked);
            }
        })
    }

    fn member(&self, m: Grouped) -> Member {
        let (group, slot) = split(m);
        let processed = self
            .slots
            .get(slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|e| e.processed_in(group));
        Member {
            group,
            slot,
            class: Class::of(processed),
        }
    }

    /// Where a group's round robin starts this time, among `members` candidates.
    pub(crate) fn turn(&self, group: GroupIdx, members: usize) -> usize {
        self.groups
            .get(group as usize)
            .and_then(Option::as_ref)
            .map_or(0, |g| g.cursor.fetch_add(1, Ordering::Relaxed) as usize)
            % members.max(1)
    }

    /// The name of group `g`.
    pub(crate) fn group_name(&self, g: GroupIdx) -> Option<&QueueGroup> {
        self.groups.get(g as usize)?.as_ref().map(|g| &g.name)
    }

    /// The members of group `group` whose subscriptions match `topic` (re-offering a
    /// departed member's delivery), into `out`.
    pub(crate) fn members_of(&self, group: &QueueGroup, topic: &Topic, out: &mut Vec<Member>) {
        out.clear();
        let Some(&g) = self.group_index.get(group) else {
            return;
        };
        let mut raw = Vec::new();
        self.grouped.matches_into(topic, &mut raw);
        out.extend(
            raw.into_iter()
                .filter(|m| split(*m).0 == g)
                .map(|m| self.member(m)),
        );
    }

    /// Whether the connection in `slot` holds a subscription in `group` matching `topic`.
    pub(crate) fn holds_group(&self, slot: Slot, group: &QueueGroup, topic: &Topic) -> bool {
        let Some(entry) = self.slots.get(slot as usize).and_then(Option::as_ref) else {
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
            .map_or(0, Entry::count)
    }

    /// Live connections.
    pub(crate) fn connections(&self) -> impl Iterator<Item = (Slot, &C)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i as Slot, &e.conn)))
    }

    /// (filter, connection) entries, plain and grouped, and acknowledged subscriptions' filters.
    pub(crate) fn subscription_count(&self) -> usize {
        self.trie.len() + self.grouped.len() + self.acked_trie.len()
    }

    /// Distinct filters (a filter used plainly, in a group and by acknowledged subscriptions
    /// counts once for each).
    pub(crate) fn topic_count(&self) -> usize {
        self.trie.filter_count() + self.grouped.filter_count() + self.acked_trie.filter_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(f: &str) -> TopicFilter {
        TopicFilter::new(f).unwrap()
    }

    fn topic(t: &str) -> Topic {
        Topic::new(t).unwrap()
    }

    fn group(g: &str) -> QueueGroup {
        QueueGroup::new(g).unwrap()
    }

    fn plain_of(
        r: &Router<&'static str, ()>,
        t: &str,
        cache: &mut PlanCache,
    ) -> Vec<(&'static str, Class)> {
        let plan = r.plan(&topic(t), cache);
        plan.plain
            .iter()
            .map(|t| (*r.conn(t.slot).unwrap(), t.class))
            .collect()
    }

    #[test]
    fn a_connection_is_planned_once_in_its_strongest_class() {
        let mut r: Router<&str, ()> = Router::new(100, usize::MAX);
        let (a, b) = (r.add("a"), r.add("b"));
        r.subscribe(a, &filter("events.+"), Qos::Realtime, None)
            .unwrap();
        r.subscribe(a, &filter("events.#"), Qos::Processed, None)
            .unwrap();
        r.subscribe(b, &filter("events.x"), Qos::Realtime, None)
            .unwrap();
        let mut cache = PlanCache::default();
        assert_eq!(
            plain_of(&r, "events.x", &mut cache),
            [("a", Class::Processed), ("b", Class::Realtime)]
        );
        assert_eq!(
            plain_of(&r, "events", &mut cache),
            [("a", Class::Processed)]
        );
        // A change of the table is seen by the cached plan.
        assert!(r.unsubscribe(a, &filter("events.#")));
        assert_eq!(
            plain_of(&r, "events.x", &mut cache),
            [("a", Class::Realtime), ("b", Class::Realtime)]
        );
        r.remove(b);
        assert_eq!(
            plain_of(&r, "events.x", &mut cache),
            [("a", Class::Realtime)]
        );
        assert!(plain_of(&r, "other", &mut cache).is_empty());
    }

    #[test]
    fn group_members_are_planned_per_group_with_their_class_and_take_turns() {
        let mut r: Router<&str, ()> = Router::new(100, usize::MAX);
        let (a, b, c) = (r.add("a"), r.add("b"), r.add("c"));
        let (w, v) = (group("w"), group("v"));
        r.subscribe(a, &filter("job.+"), Qos::Processed, Some(&w))
            .unwrap();
        r.subscribe(b, &filter("job.#"), Qos::Realtime, Some(&w))
            .unwrap();
        r.subscribe(c, &filter("job.x"), Qos::Realtime, Some(&v))
            .unwrap();
        let mut cache = PlanCache::default();
        let plan = r.plan(&topic("job.x"), &mut cache);
        assert!(plan.plain.is_empty());
        let groups: Vec<Vec<(&str, Class)>> = plan
            .groups()
            .map(|m| {
                m.iter()
                    .map(|m| (*r.conn(m.slot).unwrap(), m.class))
                    .collect()
            })
            .collect();
        assert_eq!(
            groups,
            [
                vec![("a", Class::Processed), ("b", Class::Realtime)],
                vec![("c", Class::Realtime)]
            ]
        );
        let g = plan.members[0].group;
        assert_eq!(r.group_name(g), Some(&w));
        let turns: Vec<_> = (0..4).map(|_| r.turn(g, 2)).collect();
        assert_eq!(turns, [0, 1, 0, 1]);
        let mut members = Vec::new();
        r.members_of(&w, &topic("job.x"), &mut members);
        assert_eq!(members.len(), 2);
        assert!(r.holds_group(b, &w, &topic("job.y")));
        assert!(!r.holds_group(c, &w, &topic("job.x")));
    }

    #[test]
    fn a_filter_is_held_once_and_groups_are_reclaimed() {
        let mut r: Router<&str, ()> = Router::new(100, usize::MAX);
        let a = r.add("a");
        let g = group("g");
        r.subscribe(a, &filter("t"), Qos::Realtime, Some(&g))
            .unwrap();
        assert!(matches!(
            r.subscribe(a, &filter("t"), Qos::Realtime, None),
            Err(SubscribeRefusal::Conflict(_))
        ));
        assert!(matches!(
            r.subscribe(a, &filter("t"), Qos::Realtime, Some(&group("h"))),
            Err(SubscribeRefusal::Conflict(_))
        ));
        assert_eq!(
            r.subscribe(a, &filter("t"), Qos::Processed, Some(&g)),
            Ok(false)
        );
        assert!(r.unsubscribe(a, &filter("t")));
        assert!(
            r.group_index.is_empty(),
            "the last subscription frees the group"
        );
        // The freed index serves the next group.
        r.subscribe(a, &filter("u"), Qos::Realtime, Some(&group("k")))
            .unwrap();
        assert_eq!(r.groups.len(), 1);
        assert_eq!(r.remove(a), [filter("u")]);
        assert_eq!(r.subscription_count(), 0);
        assert!(r.group_index.is_empty());
    }

    #[test]
    fn a_connection_holds_at_most_the_limit() {
        let mut r: Router<&str, ()> = Router::new(2, usize::MAX);
        let (a, b) = (r.add("a"), r.add("b"));
        r.subscribe(a, &filter("x"), Qos::Realtime, None).unwrap();
        r.subscribe(a, &filter("y"), Qos::Realtime, Some(&group("g")))
            .unwrap();
        let refused = r.subscribe(a, &filter("z"), Qos::Realtime, None);
        assert!(
            matches!(&refused, Err(SubscribeRefusal::Limit(m)) if m.contains("max_subscriptions_per_connection")),
            "{refused:?}"
        );
        // What it holds can still be renewed or upgraded; other connections are not limited
        // by it.
        assert_eq!(
            r.subscribe(a, &filter("x"), Qos::Processed, None),
            Ok(false)
        );
        assert_eq!(r.subscribe(b, &filter("z"), Qos::Realtime, None), Ok(true));
        assert!(r.unsubscribe(a, &filter("x")));
        assert_eq!(r.subscribe(a, &filter("z"), Qos::Realtime, None), Ok(true));
        assert_eq!(r.filter_count_of(a), 2);
    }
}
