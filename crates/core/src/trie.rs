//! The subscription trie: filters → subscribers, matched against topics without allocating.
//!
//! Each level has literal children (hash map), one `+` child and one `#` child. Nodes live in a
//! slab with a free list; a branch that loses its last subscriber is pruned and its nodes
//! reused, so memory follows the live subscription set.

use crate::topic::{MAX_SEGMENTS, Segment, Topic, TopicFilter};
use rustc_hash::FxHashMap;

type NodeId = u32;
const ROOT: NodeId = 0;

#[derive(Debug)]
struct Node<S> {
    literal: FxHashMap<Box<str>, NodeId>,
    single: Option<NodeId>,
    multi: Option<NodeId>,
    subscribers: Vec<S>,
}

impl<S> Node<S> {
    fn new() -> Self {
        Self {
            literal: FxHashMap::default(),
            single: None,
            multi: None,
            subscribers: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.single.is_none()
            && self.multi.is_none()
            && self.subscribers.is_empty()
    }
}

/// How a node hangs from its parent (used when pruning).
#[derive(Clone, Copy)]
enum Edge<'a> {
    Literal(&'a str),
    Single,
    Multi,
}

/// Maps [`TopicFilter`]s to subscribers `S` and finds every subscriber whose filter matches a
/// [`Topic`].
///
/// A subscriber is stored at most once per filter. Matching calls back once per
/// (filter, subscriber) pair; callers that need one delivery per subscriber deduplicate (see
/// [`SubscriptionTrie::matches_into`]).
#[derive(Debug)]
pub struct SubscriptionTrie<S> {
    nodes: Vec<Node<S>>,
    free: Vec<NodeId>,
    entries: usize,
    filters: usize,
}

impl<S: Copy + Eq> Default for SubscriptionTrie<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Copy + Eq> SubscriptionTrie<S> {
    /// An empty trie.
    pub fn new() -> Self {
        Self {
            nodes: vec![Node::new()],
            free: Vec::new(),
            entries: 0,
            filters: 0,
        }
    }

    /// Number of (filter, subscriber) entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// Whether the trie holds no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Number of distinct filters with at least one subscriber.
    pub fn filter_count(&self) -> usize {
        self.filters
    }

    /// Number of live nodes, including the root (shows that pruning reclaims memory).
    pub fn node_count(&self) -> usize {
        self.nodes.len() - self.free.len()
    }

    fn alloc(&mut self) -> NodeId {
        if let Some(id) = self.free.pop() {
            return id;
        }
        self.nodes.push(Node::new());
        NodeId::try_from(self.nodes.len() - 1).expect("fewer than 2^32 trie nodes")
    }

    fn child(&mut self, node: NodeId, seg: Segment<'_>) -> NodeId {
        let existing = match seg {
            Segment::Literal(lit) => self.nodes[node as usize].literal.get(lit).copied(),
            Segment::Single => self.nodes[node as usize].single,
            Segment::Multi => self.nodes[node as usize].multi,
        };
        if let Some(id) = existing {
            return id;
        }
        let id = self.alloc();
        let parent = &mut self.nodes[node as usize];
        match seg {
            Segment::Literal(lit) => {
                parent.literal.insert(lit.into(), id);
            }
            Segment::Single => parent.single = Some(id),
            Segment::Multi => parent.multi = Some(id),
        }
        id
    }

    /// How many subscribers `filter` has (exactly this filter, not the ones matching it).
    pub fn subscribers_of(&self, filter: &TopicFilter) -> usize {
        let mut node = ROOT;
        for seg in filter.segments() {
            let n = &self.nodes[node as usize];
            let next = match seg {
                Segment::Literal(lit) => n.literal.get(lit).copied(),
                Segment::Single => n.single,
                Segment::Multi => n.multi,
            };
            match next {
                Some(id) => node = id,
                None => return 0,
            }
        }
        self.nodes[node as usize].subscribers.len()
    }

    /// Adds `subscriber` under `filter`. Returns `false` when it was already there.
    pub fn insert(&mut self, filter: &TopicFilter, subscriber: S) -> bool {
        let mut node = ROOT;
        for seg in filter.segments() {
            node = self.child(node, seg);
        }
        let subs = &mut self.nodes[node as usize].subscribers;
        if subs.contains(&subscriber) {
            return false;
        }
        if subs.is_empty() {
            self.filters += 1;
        }
        subs.push(subscriber);
        self.entries += 1;
        true
    }

    /// Removes `subscriber` from `filter`, pruning branches left empty. Returns `false` when it
    /// was not there.
    pub fn remove(&mut self, filter: &TopicFilter, subscriber: S) -> bool {
        let mut path: Vec<(NodeId, Edge<'_>)> = Vec::with_capacity(8);
        let mut node = ROOT;
        for seg in filter.segments() {
            let n = &self.nodes[node as usize];
            let (next, edge) = match seg {
                Segment::Literal(lit) => (n.literal.get(lit).copied(), Edge::Literal(lit)),
                Segment::Single => (n.single, Edge::Single),
                Segment::Multi => (n.multi, Edge::Multi),
            };
            let Some(next) = next else { return false };
            path.push((node, edge));
            node = next;
        }
        let subs = &mut self.nodes[node as usize].subscribers;
        let Some(pos) = subs.iter().position(|s| *s == subscriber) else {
            return false;
        };
        subs.swap_remove(pos);
        self.entries -= 1;
        if subs.is_empty() {
            self.filters -= 1;
            subs.shrink_to_fit();
        }
        self.prune(node, &path);
        true
    }

    fn prune(&mut self, mut node: NodeId, path: &[(NodeId, Edge<'_>)]) {
        for &(parent, edge) in path.iter().rev() {
            if !self.nodes[node as usize].is_empty() {
                return;
            }
            self.nodes[node as usize] = Node::new();
            self.free.push(node);
            let p = &mut self.nodes[parent as usize];
            match edge {
                Edge::Literal(lit) => {
                    p.literal.remove(lit);
                    if p.literal.is_empty() {
                        p.literal.shrink_to_fit();
                    }
                }
                Edge::Single => p.single = None,
                Edge::Multi => p.multi = None,
            }
            node = parent;
        }
    }

    /// Calls `f` for every (filter, subscriber) entry whose filter matches `topic`.
    ///
    /// Allocates nothing. A leading wildcard does not match a `$sys` topic. The topic is cut
    /// into segments once, into a stack array, and the walk indexes it (splitting the rest of
    /// the topic again at every node, on every branch, cost more than the lookups).
    pub fn for_each_match(&self, topic: &Topic, mut f: impl FnMut(&S)) {
        let s = topic.as_str();
        let mut segs = [(0u16, 0u16); MAX_SEGMENTS];
        let mut n = 0;
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            if b == b'.' {
                // A valid topic has at most MAX_SEGMENTS segments and MAX_TOPIC_LEN bytes.
                let Some(slot) = segs.get_mut(n) else { return };
                *slot = (start as u16, i as u16);
                n += 1;
                start = i + 1;
            }
        }
        let Some(slot) = segs.get_mut(n) else { return };
        *slot = (start as u16, s.len() as u16);
        n += 1;
        let reserved = s.starts_with('$');
        self.walk(ROOT, s, &segs[..n], reserved, &mut f);
    }

    fn walk(
        &self,
        id: NodeId,
        topic: &str,
        segs: &[(u16, u16)],
        reserved: bool,
        f: &mut impl FnMut(&S),
    ) {
        let node = &self.nodes[id as usize];
        if let Some(multi) = node.multi.filter(|_| !reserved) {
            self.nodes[multi as usize]
                .subscribers
                .iter()
                .for_each(&mut *f);
        }
        let Some((&(a, b), tail)) = segs.split_first() else {
            node.subscribers.iter().for_each(f);
            return;
        };
        let Some(seg) = topic.get(usize::from(a)..usize::from(b)) else {
            return;
        };
        if let Some(&child) = node.literal.get(seg) {
            self.walk(child, topic, tail, false, f);
        }
        if let Some(single) = node.single.filter(|_| !reserved) {
            self.walk(single, topic, tail, false, f);
        }
    }

    /// Collects the distinct subscribers matching `topic` into `out` (cleared first), in no
    /// particular order. Reusing `out` across calls keeps matching allocation-free.
    pub fn matches_into(&self, topic: &Topic, out: &mut Vec<S>)
    where
        S: Ord,
    {
        out.clear();
        self.for_each_match(topic, |s| out.push(*s));
        if out.len() > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }
}

/// The naive reference matcher: a list of (filter, subscriber) checked one by one with
/// [`TopicFilter::matches`]. Kept as the oracle for the trie's property tests.
#[derive(Debug, Default, Clone)]
pub struct NaiveMatcher<S> {
    entries: Vec<(TopicFilter, S)>,
}

impl<S: Copy + Ord> NaiveMatcher<S> {
    /// An empty matcher.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Adds an entry; returns `false` when it was already present.
    pub fn insert(&mut self, filter: &TopicFilter, subscriber: S) -> bool {
        if self
            .entries
            .iter()
            .any(|(f, s)| f == filter && *s == subscriber)
        {
            return false;
        }
        self.entries.push((filter.clone(), subscriber));
        true
    }

    /// Removes an entry; returns `false` when it was absent.
    pub fn remove(&mut self, filter: &TopicFilter, subscriber: S) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|(f, s)| !(f == filter && *s == subscriber));
        before != self.entries.len()
    }

    /// Distinct subscribers matching `topic`, sorted.
    pub fn matches(&self, topic: &Topic) -> Vec<S> {
        let mut out: Vec<S> = self
            .entries
            .iter()
            .filter(|(f, _)| f.matches(topic))
            .map(|(_, s)| *s)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::new(s).unwrap()
    }
    fn t(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn one_copy_per_subscriber() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("events.#"), 1u32);
        trie.insert(&f("events.process.+"), 1);
        trie.insert(&f("events.process.lifecycle"), 2);
        let mut out = Vec::new();
        trie.matches_into(&t("events.process.lifecycle"), &mut out);
        out.sort();
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn sys_not_matched_by_leading_wildcards() {
        let mut trie = SubscriptionTrie::new();
        trie.insert(&f("#"), 1u32);
        trie.insert(&f("+.broker.stats"), 2);
        trie.insert(&f("$sys.#"), 3);
        let mut out = Vec::new();
        trie.matches_into(&t("$sys.broker.stats"), &mut out);
        assert_eq!(out, vec![3]);
    }

    #[test]
    fn pruning_reclaims_nodes() {
        let mut trie = SubscriptionTrie::new();
        let filters = ["a.b.c", "a.+.c", "a.#", "x.y.z.w"];
        for (i, flt) in filters.iter().enumerate() {
            assert!(trie.insert(&f(flt), i));
        }
        assert!(!trie.insert(&f("a.b.c"), 0), "duplicate insert");
        assert!(trie.node_count() > 1);
        for (i, flt) in filters.iter().enumerate() {
            assert!(trie.remove(&f(flt), i));
        }
        assert!(!trie.remove(&f("a.b.c"), 0));
        assert_eq!(trie.node_count(), 1);
        assert_eq!(trie.filter_count(), 0);
        assert!(trie.is_empty());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[abc]".prop_map(String::from),
            1 => Just("$sys".to_string()),
        ]
    }

    fn topic_strategy() -> impl Strategy<Value = Topic> {
        (segment(), prop::collection::vec("[abc]", 0..4)).prop_map(|(first, rest)| {
            let mut s = first;
            for seg in rest {
                s.push('.');
                s.push_str(&seg);
            }
            Topic::new(s).unwrap()
        })
    }

    fn filter_strategy() -> impl Strategy<Value = TopicFilter> {
        let seg = prop_oneof![
            3 => "[abc]".prop_map(String::from),
            1 => Just("+".to_string()),
            1 => Just("*".to_string()),
        ];
        (prop::collection::vec(seg, 0..4), any::<bool>(), segment()).prop_map(
            |(segs, hash, first)| {
                let mut all = vec![first];
                all.extend(segs);
                if hash {
                    all.push("#".into());
                }
                let s = all.join(".");
                TopicFilter::new(if s.is_empty() { "#".into() } else { s }).unwrap()
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(TopicFilter, u8),
        Remove(TopicFilter, u8),
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let leading = prop_oneof![
            Just(TopicFilter::new("#").unwrap()),
            Just(TopicFilter::new("+.a").unwrap()),
            Just(TopicFilter::new("+.+.#").unwrap()),
        ];
        let filter = prop_oneof![4 => filter_strategy(), 1 => leading];
        prop_oneof![
            3 => (filter.clone(), 0u8..6).prop_map(|(f, s)| Op::Insert(f, s)),
            1 => (filter, 0u8..6).prop_map(|(f, s)| Op::Remove(f, s)),
        ]
    }

    proptest! {
        #[test]
        fn trie_agrees_with_naive_oracle(
            ops in prop::collection::vec(op_strategy(), 0..60),
            topics in prop::collection::vec(topic_strategy(), 1..20),
        ) {
            let mut trie = SubscriptionTrie::new();
            let mut oracle = NaiveMatcher::new();
            for op in &ops {
                match op {
                    Op::Insert(f, s) => prop_assert_eq!(trie.insert(f, *s), oracle.insert(f, *s)),
                    Op::Remove(f, s) => prop_assert_eq!(trie.remove(f, *s), oracle.remove(f, *s)),
                }
            }
            let mut out = Vec::new();
            for topic in &topics {
                trie.matches_into(topic, &mut out);
                out.sort_unstable();
                prop_assert_eq!(&out, &oracle.matches(topic), "topic {}", topic);
            }
        }

        #[test]
        fn removing_everything_leaves_only_the_root(
            filters in prop::collection::vec(filter_strategy(), 0..40),
        ) {
            let mut trie = SubscriptionTrie::new();
            for (i, f) in filters.iter().enumerate() {
                trie.insert(f, i);
            }
            for (i, f) in filters.iter().enumerate() {
                trie.remove(f, i);
            }
            prop_assert_eq!(trie.node_count(), 1);
            prop_assert!(trie.is_empty());
        }
    }
}
