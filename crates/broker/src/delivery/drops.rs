//! Drop accounting of one queue: a total, counts per topic for the statistics and for the
//! next in-band notice, both bounded.
//!
//! A stalled reader of many distinct topics must not make the broker's memory grow with them:
//! each table keeps at most [`DROP_TOPICS`] topics, the largest counts, and sums the rest under
//! [`catalog::sys::dropped_other`]. Every drop is in the total and in exactly one entry, so a
//! notice never loses a count.

use daemoneye_eventbus_core::codec::{DropReason, Notice};
use daemoneye_eventbus_core::{Frame, Topic, catalog};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why deliveries were dropped, as the broker-wide statistics count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum DropCause {
    /// A subscriber's queue was full (messages or bytes): older deliveries evicted, or the
    /// connection closed under the `disconnect` policy.
    SlowReader,
    /// The broker-wide memory cap (`max_memory_bytes`) left no room.
    MemoryCap,
    /// An acknowledged or durable subscription's backlog was full (or its disk store reached
    /// `store_max_bytes`).
    BacklogFull,
    /// Queued for a connection or subscription that closed before they were written.
    Closed,
}

impl DropCause {
    /// Every cause, in a fixed order.
    pub const ALL: [Self; 4] = [
        Self::SlowReader,
        Self::MemoryCap,
        Self::BacklogFull,
        Self::Closed,
    ];

    /// Its name in statistics and metrics (`slow_reader`, `memory_cap`, `backlog_full`,
    /// `closed`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowReader => "slow_reader",
            Self::MemoryCap => "memory_cap",
            Self::BacklogFull => "backlog_full",
            Self::Closed => "closed",
        }
    }

    fn of(reason: DropReason) -> Self {
        match reason {
            DropReason::SlowReader => Self::SlowReader,
            DropReason::MemoryCap => Self::MemoryCap,
            DropReason::BacklogFull => Self::BacklogFull,
            // The broker records only the reasons above; another would be a newer peer's.
            _ => Self::SlowReader,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::SlowReader => 0,
            Self::MemoryCap => 1,
            Self::BacklogFull => 2,
            Self::Closed => 3,
        }
    }
}

/// Drops counted broker-wide by cause, shared by every queue's [`Drops`] (and added to by the
/// hub for deliveries of closed connections and subscriptions).
#[derive(Debug, Default)]
pub(crate) struct DropTotals([AtomicU64; 4]);

impl DropTotals {
    pub(crate) fn add(&self, cause: DropCause, n: u64) {
        if n > 0 {
            self.0[cause.index()].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Each cause with its count.
    pub(crate) fn get(&self) -> [(DropCause, u64); 4] {
        DropCause::ALL.map(|c| (c, self.0[c.index()].load(Ordering::Relaxed)))
    }
}

/// Topics one table counts one by one; the rest are summed under
/// [`catalog::sys::dropped_other`].
pub const DROP_TOPICS: usize = 256;

/// Drops per topic: at most [`DROP_TOPICS`] topics, plus the sum of the others.
#[derive(Debug, Default, Clone)]
pub(crate) struct TopicCounts {
    counts: BTreeMap<Topic, u64>,
    other: u64,
}

impl TopicCounts {
    /// Adds `n` drops of `topic`. When the table is full, the smallest count (this one or a
    /// listed one) joins the others' sum: the table keeps the largest it has seen.
    pub(crate) fn add(&mut self, topic: &Topic, n: u64) {
        if let Some(c) = self.counts.get_mut(topic) {
            *c += n;
            return;
        }
        if self.counts.len() < DROP_TOPICS {
            self.counts.insert(topic.clone(), n);
            return;
        }
        let smallest = self
            .counts
            .iter()
            .min_by_key(|(_, c)| **c)
            .map(|(t, c)| (t.clone(), *c));
        match smallest {
            Some((t, c)) if c < n => {
                self.counts.remove(&t);
                self.other += c;
                self.counts.insert(topic.clone(), n);
            }
            _ => self.other += n,
        }
    }

    /// Every entry, the largest first, and the others' sum last (when there are any).
    pub(crate) fn entries(&self) -> Vec<(Topic, u64)> {
        let mut v: Vec<_> = self.counts.iter().map(|(t, c)| (t.clone(), *c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if self.other > 0 {
            v.push((catalog::sys::dropped_other(), self.other));
        }
        v
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.other == 0
    }
}

/// The drops of one queue.
#[derive(Debug, Default)]
pub(crate) struct Drops {
    total: u64,
    /// Since the queue was made (statistics).
    by_topic: TopicCounts,
    /// Since the last notice.
    pending: TopicCounts,
    reason: Option<DropReason>,
    /// Drops of one topic not yet added to the tables.
    run: Option<(Topic, u64)>,
    /// Changes to what is to be announced (a drop, a notice taken): a durable subscription
    /// on disk writes [`Drops::unannounced`] when this moved.
    changes: u64,
    /// The broker-wide counts by cause this queue adds to.
    totals: Arc<DropTotals>,
}

impl Drops {
    /// Drops that add to the broker-wide `totals` too.
    pub(crate) fn counted_in(totals: Arc<DropTotals>) -> Self {
        Self {
            totals,
            ..Self::default()
        }
    }

    /// Counts `n` drops of `topic`, to be announced. Consecutive drops of one topic (a
    /// stalled reader's usual pattern) are accumulated and added to the tables only when the
    /// topic changes or the counts are read, so a drop costs a comparison and an increment.
    pub(crate) fn record(&mut self, topic: &Topic, reason: DropReason, n: u64) {
        self.totals.add(DropCause::of(reason), n);
        self.count(topic, reason, n);
    }

    fn count(&mut self, topic: &Topic, reason: DropReason, n: u64) {
        self.total += n;
        self.changes += 1;
        if self.reason.is_none() || reason == DropReason::MemoryCap {
            self.reason = Some(reason);
        }
        match &mut self.run {
            Some((t, dropped)) if t == topic => *dropped += n,
            _ => {
                self.fold();
                self.run = Some((topic.clone(), n));
            }
        }
    }

    /// [`Drops::record`] for a topic read back from an encoded frame (made a [`Topic`] only
    /// when it differs from the last one dropped).
    pub(crate) fn record_bytes(&mut self, topic: &[u8], reason: DropReason, n: u64) {
        let topic = match &self.run {
            Some((t, _)) if t.as_str().as_bytes() == topic => t.clone(),
            // The frame was encoded from a checked topic; should it not read back, the drop
            // is still counted, among the others.
            _ => std::str::from_utf8(topic)
                .ok()
                .and_then(|t| Topic::new(t).ok())
                .unwrap_or_else(catalog::sys::dropped_other),
        };
        self.record(&topic, reason, n);
    }

    /// Counts drops that are never announced (a full queue under the `disconnect` policy: the
    /// connection is closing instead).
    pub(crate) fn record_unannounced(&mut self, topic: &Topic, n: u64) {
        self.totals.add(DropCause::SlowReader, n);
        self.fold();
        self.total += n;
        self.by_topic.add(topic, n);
    }

    fn fold(&mut self) {
        if let Some((topic, n)) = self.run.take() {
            self.by_topic.add(&topic, n);
            self.pending.add(&topic, n);
        }
    }

    /// The notice of the drops since the last one, if any.
    pub(crate) fn take_notice(&mut self) -> Option<Frame> {
        let reason = self.reason.take()?;
        self.fold();
        self.changes += 1;
        let pending = std::mem::take(&mut self.pending);
        if pending.is_empty() {
            return None;
        }
        Some(Frame::Notice(Notice::Dropped {
            reason,
            topics: pending.entries(),
        }))
    }

    /// How often what is to be announced changed (a drop, a notice taken).
    pub(crate) fn changes(&self) -> u64 {
        self.changes
    }

    /// The drops not yet announced: why, and how many per topic (`None`: none).
    pub(crate) fn unannounced(&mut self) -> Option<(DropReason, Vec<(Topic, u64)>)> {
        let reason = self.reason?;
        self.fold();
        (!self.pending.is_empty()).then(|| (reason, self.pending.entries()))
    }

    /// Takes back drops a previous broker process counted and did not announce (to be
    /// announced; the broker-wide totals, this process's, do not count them again).
    pub(crate) fn restore(&mut self, reason: DropReason, topics: &[(Topic, u64)]) {
        for (topic, n) in topics {
            self.count(topic, reason, *n);
        }
        self.fold();
    }

    /// Total drops.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Drops per topic since the queue was made (at most [`DROP_TOPICS`] + 1 entries).
    pub(crate) fn by_topic(&mut self) -> Vec<(Topic, u64)> {
        self.fold();
        self.by_topic.entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(i: usize) -> Topic {
        Topic::new(format!("t.{i}")).unwrap()
    }

    #[test]
    fn many_topics_stay_bounded_and_every_drop_is_in_one_entry() {
        let mut d = Drops::default();
        let mut expected = 0;
        for i in 0..10_000 {
            // Topic i dropped (i % 7 + 1) times, in a run.
            let n = (i % 7 + 1) as u64;
            d.record(&topic(i), DropReason::SlowReader, n);
            expected += n;
        }
        assert_eq!(d.total(), expected);
        let stats = d.by_topic();
        assert!(stats.len() <= DROP_TOPICS + 1);
        assert_eq!(stats.iter().map(|(_, n)| n).sum::<u64>(), expected);
        assert_eq!(stats.last().unwrap().0, catalog::sys::dropped_other());
        // The listed ones are the largest counts (7 each).
        assert!(stats[..DROP_TOPICS].iter().all(|(_, n)| *n == 7));
        let Some(Frame::Notice(Notice::Dropped { topics, reason })) = d.take_notice() else {
            panic!("a notice")
        };
        assert_eq!(reason, DropReason::SlowReader);
        assert!(topics.len() <= DROP_TOPICS + 1);
        assert_eq!(topics.iter().map(|(_, n)| n).sum::<u64>(), expected);
        assert!(d.take_notice().is_none(), "nothing since");
    }

    #[test]
    fn a_run_is_folded_before_it_is_read_and_the_memory_cap_reason_wins() {
        let mut d = Drops::default();
        d.record(&topic(1), DropReason::SlowReader, 2);
        d.record(&topic(1), DropReason::MemoryCap, 3);
        d.record(&topic(2), DropReason::SlowReader, 1);
        d.record_bytes(b"t.2", DropReason::SlowReader, 1);
        d.record_unannounced(&topic(3), 4);
        let Some(Frame::Notice(Notice::Dropped { topics, reason })) = d.take_notice() else {
            panic!("a notice")
        };
        assert_eq!(reason, DropReason::MemoryCap);
        assert_eq!(topics, [(topic(1), 5), (topic(2), 2)]);
        assert_eq!(d.total(), 11);
        assert_eq!(d.by_topic(), [(topic(1), 5), (topic(3), 4), (topic(2), 2)]);
    }

    #[test]
    fn broker_wide_totals_count_each_cause_once_and_not_what_is_restored() {
        let totals = Arc::new(DropTotals::default());
        let mut d = Drops::counted_in(Arc::clone(&totals));
        d.record(&topic(1), DropReason::SlowReader, 2);
        d.record(&topic(1), DropReason::MemoryCap, 3);
        d.record_bytes(b"t.2", DropReason::BacklogFull, 4);
        d.record_unannounced(&topic(3), 5);
        // A previous process's drops: announced again, not counted again.
        d.restore(DropReason::SlowReader, &[(topic(4), 100)]);
        totals.add(DropCause::Closed, 6);
        let got: Vec<_> = totals.get().iter().map(|(c, n)| (c.as_str(), *n)).collect();
        assert_eq!(
            got,
            [
                ("slow_reader", 7),
                ("memory_cap", 3),
                ("backlog_full", 4),
                ("closed", 6)
            ]
        );
        assert_eq!(d.total(), 114);
    }
}
