//! [`TopicCache`]: a bounded table of the topics a connection has seen lately, each with a value
//! its owner derives from the topic alone.
//!
//! A connection cycles through a bounded set of topics far more often than it meets a new one.
//! Work that depends only on the topic — validating its bytes when a frame is decoded, matching
//! it against the subscription trie when a message is routed — is then done once per topic: a
//! repeat costs one hash, one comparison and a reference count.
//!
//! Bounded: at most `max` entries (a power of two). A topic lives in one of eight adjacent slots
//! chosen by its hash. The table allocates nothing until its first entry and doubles while more
//! than half full or when a new topic finds its eight slots taken, up to `max`, so a connection
//! that publishes one topic holds a handful of slots. At the bound, a new topic that finds its
//! eight slots taken replaces the one hit least recently (**full-table policy: evict the least
//! recently hit of eight**), counted in [`TopicCache::evictions`]. A replaced entry's value is handed to the new topic as it was, so a warm table
//! allocates nothing; owners overwrite it (see [`TopicCache::insert`]).
//!
//! Cached topics are copies: a cache never keeps a frame or payload buffer alive. Reply inboxes
//! (`_inbox.…`) are never cached: each is used for one call, and would only evict topics that
//! repeat.

use crate::topic::Topic;
use std::hash::Hasher;

/// Slots checked for one topic.
const WAYS: usize = 8;
/// The first table allocated.
const FIRST: usize = 16;

#[derive(Debug)]
struct Slot<V> {
    hash: u64,
    topic: Option<Topic>,
    /// The cache's clock at the last hit or insert.
    used: u64,
    /// The generation `value` was computed in ([`TopicCache::derived`]; `None`: not yet).
    generation: Option<u64>,
    value: V,
}

/// Recently seen topics, each with a value `V` (see the module documentation).
#[derive(Debug)]
pub struct TopicCache<V> {
    slots: Vec<Slot<V>>,
    /// Where the value of a topic that is not cached is derived (a reply inbox).
    uncached: V,
    len: usize,
    max: usize,
    clock: u64,
    evictions: u64,
}

impl<V: Default> TopicCache<V> {
    /// An empty cache that will hold at most `max` topics (rounded up to a power of two, at
    /// least the size of the first table).
    pub fn new(max: usize) -> Self {
        Self {
            slots: Vec::new(),
            uncached: V::default(),
            len: 0,
            max: max.max(FIRST).next_power_of_two(),
            clock: 0,
            evictions: 0,
        }
    }

    /// The hash [`TopicCache::get`] and [`TopicCache::insert`] take: computed once per lookup.
    pub fn hash(bytes: &[u8]) -> u64 {
        let mut h = rustc_hash::FxHasher::default();
        h.write(bytes);
        // A final avalanche (MurmurHash3's), so the high bits the set is taken from depend on
        // every byte: topics often differ only in a few middle characters.
        let mut x = h.finish();
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^= x >> 33;
        x = x.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        x ^ (x >> 33)
    }

    /// First slot of the set `hash` falls in.
    fn set(&self, hash: u64) -> usize {
        let bits = self.slots.len().trailing_zeros();
        ((hash >> (64 - bits)) as usize) & !(WAYS - 1)
    }

    /// The cached topic whose bytes are `bytes` (with `hash` from [`TopicCache::hash`]), and
    /// its value.
    pub fn get(&mut self, hash: u64, bytes: &[u8]) -> Option<(&Topic, &mut V)> {
        let at = self.find(hash, bytes)?;
        let slot = &mut self.slots[at];
        Some((slot.topic.as_ref()?, &mut slot.value))
    }

    /// Index of the slot holding `bytes`, marked as hit.
    fn find(&mut self, hash: u64, bytes: &[u8]) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let set = self.set(hash);
        self.clock += 1;
        let way = self.slots[set..set + WAYS].iter().position(|s| {
            s.hash == hash
                && s.topic
                    .as_ref()
                    .is_some_and(|t| t.as_str().as_bytes() == bytes)
        })?;
        self.slots[set + way].used = self.clock;
        Some(set + way)
    }

    /// Caches a copy of `topic` (`hash` from [`TopicCache::hash`]; the caller has checked it is
    /// not cached) and returns the copy with its value.
    ///
    /// The value is the one the slot held before: the default in a fresh slot, the replaced
    /// entry's otherwise (its allocations reused). The caller must overwrite it.
    pub fn insert(&mut self, hash: u64, topic: &Topic) -> (&Topic, &mut V) {
        let at = self.insert_at(hash, topic);
        let slot = &mut self.slots[at];
        (slot.topic.as_ref().expect("just inserted"), &mut slot.value)
    }

    /// [`TopicCache::insert`], returning the slot's index.
    fn insert_at(&mut self, hash: u64, topic: &Topic) -> usize {
        if (self.len + 1) * 2 > self.slots.len() && self.slots.len() < self.max {
            self.grow();
        }
        // Below the bound a full set grows the table rather than evict (sets fill unevenly).
        while self.slots.len() < self.max && self.set_is_full(hash) {
            self.grow();
        }
        let set = self.set(hash);
        self.clock += 1;
        let ways = &mut self.slots[set..set + WAYS];
        let at = match ways.iter().position(|s| s.topic.is_none()) {
            Some(free) => {
                self.len += 1;
                free
            }
            None => {
                self.evictions += 1;
                let (oldest, _) = ways
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.used)
                    .expect("a set has slots");
                oldest
            }
        };
        let slot = &mut ways[at];
        slot.hash = hash;
        slot.used = self.clock;
        slot.generation = None;
        slot.topic = Some(topic.detached());
        set + at
    }

    /// The value derived from `topic` in `generation` of whatever it is derived from (a
    /// subscription table that counts its changes): cached, or computed by `derive` into the
    /// slot's value (which holds a stale or replaced value to overwrite, its allocations
    /// reused) when the topic is new to the cache or was derived in another generation.
    /// A reply inbox (`_inbox.…`, one per call) is not cached: its value is derived every time.
    pub fn derived(&mut self, topic: &Topic, generation: u64, derive: impl FnOnce(&mut V)) -> &V {
        if topic.is_inbox() {
            derive(&mut self.uncached);
            return &self.uncached;
        }
        let bytes = topic.as_str().as_bytes();
        let hash = Self::hash(bytes);
        let at = match self.find(hash, bytes) {
            Some(at) => at,
            None => self.insert_at(hash, topic),
        };
        let slot = &mut self.slots[at];
        if slot.generation != Some(generation) {
            derive(&mut slot.value);
            slot.generation = Some(generation);
        }
        &slot.value
    }

    /// Whether every slot of the set `hash` falls in is taken.
    fn set_is_full(&self, hash: u64) -> bool {
        let set = self.set(hash);
        self.slots[set..set + WAYS]
            .iter()
            .all(|s| s.topic.is_some())
    }

    /// Doubles the table (the first time: allocates it), keeping every entry.
    fn grow(&mut self) {
        let size = (self.slots.len() * 2).clamp(FIRST, self.max);
        let old = std::mem::replace(
            &mut self.slots,
            (0..size)
                .map(|_| Slot {
                    hash: 0,
                    topic: None,
                    used: 0,
                    generation: None,
                    value: V::default(),
                })
                .collect(),
        );
        self.len = 0;
        for s in old {
            let Some(topic) = s.topic else { continue };
            let set = self.set(s.hash);
            // Twice the slots for the same entries: a set overflows only by bad luck, and
            // then the entry is not carried over (counted as evicted).
            if let Some(free) = self.slots[set..set + WAYS]
                .iter_mut()
                .find(|x| x.topic.is_none())
            {
                *free = Slot {
                    topic: Some(topic),
                    ..s
                };
                self.len += 1;
            } else {
                self.evictions += 1;
            }
        }
    }

    /// Topics cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated (grows up to the bound given to [`TopicCache::new`]).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Topics replaced because their set was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn lookup(cache: &mut TopicCache<u32>, s: &str) -> Option<u32> {
        cache
            .get(TopicCache::<u32>::hash(s.as_bytes()), s.as_bytes())
            .map(|(_, v)| *v)
    }

    fn put(cache: &mut TopicCache<u32>, s: &str, v: u32) {
        let (_, slot) = cache.insert(TopicCache::<u32>::hash(s.as_bytes()), &t(s));
        *slot = v;
    }

    #[test]
    fn a_cached_topic_is_found_with_its_value_and_others_are_not() {
        let mut cache = TopicCache::new(64);
        assert_eq!(
            cache.capacity(),
            0,
            "nothing allocated before the first topic"
        );
        assert_eq!(lookup(&mut cache, "a.b"), None);
        put(&mut cache, "a.b", 7);
        put(&mut cache, "a.c", 8);
        assert_eq!(lookup(&mut cache, "a.b"), Some(7));
        assert_eq!(lookup(&mut cache, "a.c"), Some(8));
        assert_eq!(lookup(&mut cache, "a.bb"), None);
        assert_eq!(lookup(&mut cache, "a"), None);
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_cached_topic_does_not_share_the_buffer_it_came_from() {
        let frame = bytes::Bytes::from(vec![b'x'; 4096]);
        let topic = Topic::from_bytes(frame.slice(0..3)).unwrap();
        let mut cache: TopicCache<()> = TopicCache::new(16);
        let (copy, ()) = cache.insert(TopicCache::<()>::hash(b"xxx"), &topic);
        assert_eq!(copy, &topic);
        assert!(
            !std::ptr::eq(copy.as_str().as_ptr(), topic.as_str().as_ptr()),
            "the cache keeps its own copy, not a slice of the frame"
        );
    }

    #[test]
    fn the_table_stays_within_its_bound_and_evicts_the_least_recently_hit() {
        let mut cache = TopicCache::new(64);
        let names: Vec<String> = (0..1000).map(|i| format!("t.n{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            put(&mut cache, name, i as u32);
            assert!(cache.capacity() <= 64 && cache.len() <= 64);
        }
        assert_eq!(cache.capacity(), 64);
        assert_eq!(cache.evictions(), 1000 - cache.len() as u64);
        // Whatever is still cached carries its own value.
        let kept = names
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                lookup(&mut cache, n)
                    .inspect(|v| assert_eq!(*v, *i as u32))
                    .is_some()
            })
            .count();
        assert_eq!(kept, cache.len());

        // A topic hit just now survives the next insert into its set.
        let mut fresh = TopicCache::new(16);
        for name in names.iter().take(8) {
            put(&mut fresh, name, 1);
        }
        let hot = names
            .iter()
            .take(8)
            .find(|n| lookup(&mut fresh, n).is_some())
            .unwrap();
        for name in names.iter().skip(8).take(200) {
            assert!(
                lookup(&mut fresh, hot).is_some(),
                "{hot} was evicted while hit"
            );
            put(&mut fresh, name, 2);
        }
    }

    #[test]
    fn reply_inboxes_are_derived_every_time_and_never_cached() {
        let mut cache: TopicCache<u32> = TopicCache::new(16);
        let mut calls = 0;
        for n in 0..3 {
            let v = *cache.derived(&t(&format!("_inbox.c1.{n}")), 1, |v| {
                calls += 1;
                *v = n;
            });
            assert_eq!(v, n);
        }
        assert_eq!((calls, cache.len()), (3, 0));
        assert!(!t("_inboxes.x").is_inbox() && t("_inbox.c1").is_inbox());
    }

    #[test]
    fn below_its_bound_the_table_grows_instead_of_evicting() {
        let mut cache = TopicCache::new(4096);
        let names: Vec<String> = (0..1000).map(|i| format!("bench.w4.e{i}.data")).collect();
        for (i, name) in names.iter().enumerate() {
            put(&mut cache, name, i as u32);
        }
        assert_eq!((cache.len(), cache.evictions()), (1000, 0));
        for (i, name) in names.iter().enumerate() {
            assert_eq!(lookup(&mut cache, name), Some(i as u32));
        }
    }

    #[test]
    fn a_derived_value_is_computed_once_per_topic_and_generation() {
        let mut cache: TopicCache<Vec<u32>> = TopicCache::new(16);
        let mut computed = 0;
        let mut derive = |gen_: u64, v: &mut Vec<u32>| {
            computed += 1;
            v.clear();
            v.push(gen_ as u32);
        };
        for _ in 0..3 {
            let got = cache.derived(&t("a.b"), 1, |v| derive(1, v)).clone();
            assert_eq!(got, [1]);
        }
        assert_eq!(cache.derived(&t("a.c"), 1, |v| derive(1, v)), &[1]);
        assert_eq!(cache.derived(&t("a.b"), 2, |v| derive(2, v)), &[2]);
        assert_eq!(cache.derived(&t("a.b"), 2, |v| derive(2, v)), &[2]);
        assert_eq!(computed, 3, "a.b in generation 1, a.c, a.b in generation 2");
    }

    proptest! {
        /// Against a map: a topic found is always the one asked for, with the last value put.
        #[test]
        fn agrees_with_a_map(ops in proptest::collection::vec((0u32..300, any::<bool>()), 1..400)) {
            let mut cache = TopicCache::new(32);
            let mut model = std::collections::HashMap::new();
            for (step, (n, write)) in (0u32..).zip(ops) {
                let name = format!("p.q{n}");
                match lookup(&mut cache, &name) {
                    Some(v) => prop_assert_eq!(model.get(&name), Some(&v)),
                    None if write => {
                        put(&mut cache, &name, step);
                        model.insert(name, step);
                    }
                    None => {}
                }
                prop_assert!(cache.len() <= 32);
            }
        }
    }
}
