//! Subscriptions: the client-side table that demultiplexes deliveries, and the
//! [`Subscription`] stream handed to the application.

use crate::error::SubscribeError;
use crate::idmap::IdMap;
use crate::queue::{self, Taken};
use crate::rpc::Inbox;
use daemoneye_eventbus_core::codec::DropReason;
use daemoneye_eventbus_core::{CorrelationFilter, QueueGroup};
use daemoneye_eventbus_core::{Message, Qos, SubscriptionTrie, Topic, TopicCache, TopicFilter};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Why messages were missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissedReason {
    /// The broker's queue for this connection was full.
    SlowReader,
    /// The broker's memory cap was reached.
    MemoryCap,
    /// Another broker-reported reason.
    Other,
}

impl From<DropReason> for MissedReason {
    fn from(r: DropReason) -> Self {
        match r {
            DropReason::SlowReader => Self::SlowReader,
            DropReason::MemoryCap => Self::MemoryCap,
            _ => Self::Other,
        }
    }
}

/// Something other than a message on a subscription. Nothing is lost silently: each gap is
/// reported here before the messages that follow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The broker dropped `count` messages for this subscription.
    #[error("missed {count} messages ({reason:?})")]
    Missed {
        /// How many.
        count: u64,
        /// Why.
        reason: MissedReason,
    },
    /// The connection was lost for `outage` and restored; messages published meanwhile were
    /// not received and cannot be counted by the subscriber.
    #[error(
        "connection to the broker was lost for {outage:?}; messages published meanwhile were missed"
    )]
    Reconnected {
        /// How long the client was disconnected.
        outage: Duration,
    },
    /// The subscription or client is closed; no more messages will come.
    #[error("subscription closed")]
    Closed,
}

pub(crate) enum Item {
    Msg(Message),
    Gap(RecvError),
}

/// A stream of messages matching the subscription's filters (each message once, even when
/// several filters match). Dropping it unsubscribes.
pub struct Subscription {
    pub(crate) id: u64,
    pub(crate) filters: Vec<TopicFilter>,
    pub(crate) rx: queue::Receiver,
    pub(crate) client: Option<crate::Client>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("filters", &self.filters)
            .finish()
    }
}

impl Subscription {
    /// The next message.
    ///
    /// # Errors
    ///
    /// [`RecvError::Missed`] / [`RecvError::Reconnected`] report a gap (call again to go on);
    /// [`RecvError::Closed`] ends the stream.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        match self.rx.take().await {
            Some(Item::Msg(m)) => Ok(m),
            Some(Item::Gap(e)) => Err(e),
            None => Err(RecvError::Closed),
        }
    }

    /// The next message if one is already queued, without waiting: `None` when the queue is
    /// empty. Lets a consumer drain a burst without arming a timer per message.
    ///
    /// # Errors
    ///
    /// As [`Subscription::recv`].
    pub fn try_recv(&mut self) -> Option<Result<Message, RecvError>> {
        match self.rx.try_take() {
            Taken::Item(Item::Msg(m)) => Some(Ok(m)),
            Taken::Item(Item::Gap(e)) => Some(Err(e)),
            Taken::Empty => None,
            Taken::Closed => Some(Err(RecvError::Closed)),
        }
    }

    /// Whether no message is queued right now.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// The filters of this subscription.
    pub fn filters(&self) -> &[TopicFilter] {
        &self.filters
    }

    /// Unsubscribes and waits for the broker's acknowledgement.
    ///
    /// # Errors
    ///
    /// As [`crate::Client::subscribe`].
    pub async fn unsubscribe(mut self) -> Result<(), crate::SubscribeError> {
        match self.client.take() {
            Some(client) => client.remove_subscription(self.id, true).await,
            None => Ok(()),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            client.forget_subscription(self.id);
        }
    }
}

/// Where a subscription's messages go.
pub(crate) enum Sink {
    /// To the application, through the subscription's queue.
    Queue(queue::Sender),
    /// Replies to this client's requests, completed by the reader directly.
    Inbox(Arc<Inbox>),
}

struct SubEntry {
    filters: Vec<TopicFilter>,
    group: Option<QueueGroup>,
    correlation: Option<CorrelationFilter>,
    sink: Sink,
}

impl Drop for SubEntry {
    /// A subscription leaving the table ends its stream.
    fn drop(&mut self) {
        if let Sink::Queue(tx) = &self.sink {
            tx.close();
        }
    }
}

/// One active filter: how many subscriptions use it, the strongest QoS asked for, and the
/// queue group it is held in (a connection holds a filter once: plainly or in one group).
struct FilterRef {
    count: usize,
    qos: Qos,
    group: Option<QueueGroup>,
}

/// Most delivered topics one connection remembers the matching subscriptions of.
pub(crate) const MATCHED_TOPICS: usize = 4096;

/// The subscriptions matching the topics delivered lately, reused while the table stays the
/// same: a topic is matched against the trie once per table generation, not per message.
pub(crate) struct Matched(TopicCache<Vec<u64>>);

impl Default for Matched {
    fn default() -> Self {
        Self(TopicCache::new(MATCHED_TOPICS))
    }
}

/// What a new subscription asks for.
pub(crate) struct NewSub {
    pub(crate) filters: Vec<TopicFilter>,
    pub(crate) qos: Qos,
    pub(crate) group: Option<QueueGroup>,
    pub(crate) correlation: Option<CorrelationFilter>,
    pub(crate) sink: Sink,
}

/// Subscriptions of one client: id → entry, filter → use, and tries for demultiplexing
/// plain deliveries and queue group deliveries.
#[derive(Default)]
pub(crate) struct SubTable {
    subs: IdMap<SubEntry>,
    refs: HashMap<TopicFilter, FilterRef>,
    trie: SubscriptionTrie<u64>,
    grouped: SubscriptionTrie<u64>,
    next_id: u64,
    /// Bumped by every change of the table (invalidates [`Matched`] caches).
    generation: u64,
    /// Filters of application subscriptions that could match a reply inbox topic (first
    /// segment `#`, `+`, `*` or `_inbox`). While there are none, replies skip the tries.
    inbox_overlap: usize,
    /// Turns among several local subscriptions of one group matching a delivery.
    group_turn: usize,
}

/// Whether `f` could match a topic under `_inbox.`.
fn overlaps_inbox(f: &TopicFilter) -> bool {
    matches!(
        f.as_str().split('.').next(),
        Some("#" | "+" | "*" | "_inbox")
    )
}

impl SubTable {
    /// Registers a subscription; returns its id and the filters the broker must be asked
    /// for: newly active ones (0 → 1) and ones upgraded from `Realtime` to `Processed`.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Conflict`] when a filter is already held plainly and asked for in a
    /// group (or the reverse, or in another group); nothing is registered then.
    pub(crate) fn add(&mut self, new: NewSub) -> Result<(u64, Vec<TopicFilter>), SubscribeError> {
        for f in &new.filters {
            if let Some(r) = self.refs.get(f)
                && r.group != new.group
            {
                let held = r.group.as_ref().map_or_else(
                    || "without a queue group".to_owned(),
                    |g| format!("in queue group {g}"),
                );
                return Err(SubscribeError::Conflict(format!(
                    "{f} is already subscribed {held} on this connection"
                )));
            }
        }
        self.generation += 1;
        self.next_id += 1;
        let id = self.next_id;
        let mut fresh = Vec::new();
        let is_queue = matches!(new.sink, Sink::Queue(_));
        for f in &new.filters {
            match &new.group {
                None => self.trie.insert(f, id),
                Some(_) => self.grouped.insert(f, id),
            };
            if is_queue && overlaps_inbox(f) {
                self.inbox_overlap += 1;
            }
            let r = self.refs.entry(f.clone()).or_insert(FilterRef {
                count: 0,
                qos: Qos::Realtime,
                group: new.group.clone(),
            });
            r.count += 1;
            if r.count == 1 || (new.qos == Qos::Processed && r.qos != Qos::Processed) {
                fresh.push(f.clone());
            }
            if new.qos == Qos::Processed {
                r.qos = Qos::Processed;
            }
        }
        self.subs.insert(
            id,
            SubEntry {
                filters: new.filters,
                group: new.group,
                correlation: new.correlation.filter(|c| !c.is_empty()),
                sink: new.sink,
            },
        );
        Ok((id, fresh))
    }

    /// Removes a subscription; returns the filters that became inactive (1 → 0).
    pub(crate) fn remove(&mut self, id: u64) -> Vec<TopicFilter> {
        self.generation += 1;
        let Some(mut entry) = self.subs.remove(&id) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        let is_queue = matches!(entry.sink, Sink::Queue(_));
        for f in std::mem::take(&mut entry.filters) {
            if is_queue && overlaps_inbox(&f) {
                self.inbox_overlap -= 1;
            }
            match entry.group {
                None => self.trie.remove(&f, id),
                Some(_) => self.grouped.remove(&f, id),
            };
            if let Some(r) = self.refs.get_mut(&f) {
                r.count -= 1;
                if r.count == 0 {
                    self.refs.remove(&f);
                    gone.push(f);
                }
            }
        }
        gone
    }

    /// Whether a delivery under `_inbox.` can only be a reply to this client's calls (no
    /// application subscription could match it), so it may skip the tries.
    pub(crate) fn inbox_is_exclusive(&self) -> bool {
        self.inbox_overlap == 0
    }

    /// The filters of subscription `id` that no other subscription uses.
    pub(crate) fn only_user_of(&self, id: u64) -> Vec<TopicFilter> {
        self.subs.get(&id).map_or_else(Vec::new, |e| {
            e.filters
                .iter()
                .filter(|f| self.refs.get(*f).is_some_and(|r| r.count == 1))
                .cloned()
                .collect()
        })
    }

    /// The QoS and group a filter is held with (for the SUBSCRIBE frame).
    pub(crate) fn held(&self, filter: &TopicFilter) -> (Qos, Option<QueueGroup>) {
        self.refs
            .get(filter)
            .map_or((Qos::Realtime, None), |r| (r.qos, r.group.clone()))
    }

    /// Every active filter with its QoS and group (re-subscribed after a reconnect).
    pub(crate) fn active_filters(&self) -> Vec<(TopicFilter, Qos, Option<QueueGroup>)> {
        self.refs
            .iter()
            .map(|(f, r)| (f.clone(), r.qos, r.group.clone()))
            .collect()
    }

    /// Every subscription id.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.subs.keys().copied().collect()
    }

    /// Offers `msg` to one subscription; a full queue is pushed to `blocked`.
    fn offer(entry: &SubEntry, msg: &Message, blocked: &mut Vec<queue::Sender>) {
        if let Some(c) = &entry.correlation
            && !c.matches(msg.header().correlation.as_deref())
        {
            return;
        }
        match &entry.sink {
            Sink::Queue(tx) => {
                if tx.try_send(Item::Msg(msg.clone())).is_err() {
                    blocked.push(tx.clone());
                }
            }
            Sink::Inbox(inbox) => inbox.complete(msg),
        }
    }

    /// Offers a plain delivery to every plain subscription matching its topic without
    /// waiting. Subscriptions whose queue is full are pushed to `blocked` so the caller can
    /// wait on them outside the table's lock. Allocates nothing when no queue is full.
    pub(crate) fn dispatch(
        &self,
        msg: &Message,
        matched: &mut Matched,
        blocked: &mut Vec<queue::Sender>,
    ) {
        let ids = matched.0.derived(msg.topic(), self.generation, |ids| {
            self.trie.matches_into(msg.topic(), ids);
        });
        for id in ids {
            if let Some(entry) = self.subs.get(id) {
                Self::offer(entry, msg, blocked);
            }
        }
    }

    /// Gives a queue group delivery to **one** of this connection's subscriptions in that
    /// group matching its topic (in turn, when several match: the broker chose this
    /// connection once, so the message must be handled once). Returns `false` when none
    /// matches (the subscription left while the message was on its way).
    pub(crate) fn dispatch_group(
        &mut self,
        group: &QueueGroup,
        msg: &Message,
        scratch: &mut Vec<u64>,
        blocked: &mut Vec<queue::Sender>,
    ) -> bool {
        self.grouped.matches_into(msg.topic(), scratch);
        scratch.retain(|id| {
            self.subs
                .get(id)
                .is_some_and(|e| e.group.as_ref() == Some(group))
        });
        if scratch.is_empty() {
            return false;
        }
        self.group_turn = self.group_turn.wrapping_add(1);
        let id = scratch[self.group_turn % scratch.len()];
        if let Some(entry) = self.subs.get(&id) {
            Self::offer(entry, msg, blocked);
        }
        true
    }

    /// Ids of the subscriptions matching `topic`.
    pub(crate) fn ids_for(&self, topic: &Topic, scratch: &mut Vec<u64>) {
        self.trie.matches_into(topic, scratch);
        let mut grouped = Vec::new();
        self.grouped.matches_into(topic, &mut grouped);
        scratch.extend(grouped);
    }

    /// The queue of one subscription (`None` for the reply inbox).
    pub(crate) fn sender(&self, id: u64) -> Option<queue::Sender> {
        match &self.subs.get(&id)?.sink {
            Sink::Queue(tx) => Some(tx.clone()),
            Sink::Inbox(_) => None,
        }
    }

    /// Drops every sender, ending all subscription streams.
    pub(crate) fn close_all(&mut self) {
        self.generation += 1;
        self.inbox_overlap = 0;
        self.subs.clear();
    }
}
