//! Subscriptions: the client-side table that demultiplexes deliveries, and the
//! [`Subscription`] stream handed to the application.

use crate::acked::{AckState, Delivery, Verdict};
use crate::error::SubscribeError;
use crate::idmap::IdMap;
use crate::queue::{self, Taken};
use crate::rpc::Inbox;
use daemoneye_eventbus_core::codec::{DropReason, MAX_ACK_RANGES, SubAck, SubId, SubscribeAcked};
use daemoneye_eventbus_core::{CorrelationFilter, DurableName, Frame, QueueGroup};
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
    /// A durable subscription's backlog was full while nobody was attached, or its
    /// subscriber had stalled (its full policy dropped these).
    BacklogFull,
    /// Another broker-reported reason.
    Other,
}

impl From<DropReason> for MissedReason {
    fn from(r: DropReason) -> Self {
        match r {
            DropReason::SlowReader => Self::SlowReader,
            DropReason::MemoryCap => Self::MemoryCap,
            DropReason::BacklogFull => Self::BacklogFull,
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
    /// The broker ended the subscription (for example, it stopped acknowledging for longer
    /// than the broker's `processed_stall_timeout_ms`); no more messages will come.
    #[error("the broker ended the subscription: {0}")]
    Ended(String),
    /// The subscription or client is closed; no more messages will come.
    #[error("subscription closed")]
    Closed,
}

pub(crate) enum Item {
    Msg(Message),
    /// A delivery of an acknowledged subscription: its sequence number, how often it was
    /// delivered before, and the connection (epoch) it came on.
    Acked {
        msg: Message,
        seq: u64,
        redelivered: u16,
        epoch: u64,
    },
    Gap(RecvError),
}

/// A stream of messages matching the subscription's filters (each message once, even when
/// several filters match). Dropping it unsubscribes.
///
/// A Processed subscription on a broker speaking protocol 1.3 acknowledges what it receives
/// ([`crate::AckMode`]): the broker keeps each message until then, sends it again if the
/// acknowledgement does not come in time or the connection is lost (a durable subscription
/// across connections), and the subscription drops duplicates (by message id, within a
/// bounded window, counted in [`crate::ClientStats::duplicates`]).
pub struct Subscription {
    pub(crate) id: u64,
    pub(crate) filters: Vec<TopicFilter>,
    pub(crate) rx: queue::Receiver,
    pub(crate) client: Option<crate::Client>,
    /// Acknowledgement bookkeeping of a Processed subscription (protocol 1.3).
    pub(crate) acked: Option<AckState>,
}

/// Acknowledgements are sent at the latest when this many wait.
const ACK_BATCH: usize = 256;

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("filters", &self.filters)
            .finish()
    }
}

impl Subscription {
    /// The next message. On a Processed subscription in [`crate::AckMode::Auto`], asking for
    /// it acknowledges the message received before.
    ///
    /// # Errors
    ///
    /// [`RecvError::Missed`] / [`RecvError::Reconnected`] report a gap (call again to go on);
    /// [`RecvError::Closed`] and [`RecvError::Ended`] end the stream.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Result<Message, RecvError> {
        self.recv_delivery().await.map(|d| d.message)
    }

    /// The next message with its redelivery count ([`Delivery`]); as [`Subscription::recv`].
    ///
    /// # Errors
    ///
    /// As [`Subscription::recv`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe.
    pub async fn recv_delivery(&mut self) -> Result<Delivery, RecvError> {
        self.acknowledge_handed();
        loop {
            let item = match self.rx.try_take() {
                Taken::Item(item) => item,
                Taken::Empty | Taken::Closed => {
                    // Caught up: what was acknowledged goes to the broker before waiting.
                    self.flush_acks();
                    match self.rx.take().await {
                        Some(item) => item,
                        None => return Err(RecvError::Closed),
                    }
                }
            };
            if let Some(result) = self.accept(item) {
                return result;
            }
        }
    }

    /// The next message if one is already queued, without waiting: `None` when the queue is
    /// empty. Lets a consumer drain a burst without arming a timer per message.
    ///
    /// # Errors
    ///
    /// As [`Subscription::recv`].
    pub fn try_recv(&mut self) -> Option<Result<Message, RecvError>> {
        self.acknowledge_handed();
        loop {
            let item = match self.rx.try_take() {
                Taken::Item(item) => item,
                Taken::Empty => {
                    self.flush_acks();
                    return None;
                }
                Taken::Closed => {
                    self.flush_acks();
                    return Some(Err(RecvError::Closed));
                }
            };
            if let Some(result) = self.accept(item) {
                return Some(result.map(|d| d.message));
            }
        }
    }

    /// What a queued item gives the application (`None`: a duplicate, dropped).
    fn accept(&mut self, item: Item) -> Option<Result<Delivery, RecvError>> {
        match item {
            Item::Msg(message) => Some(Ok(Delivery {
                message,
                redelivered: 0,
            })),
            Item::Gap(e) => Some(Err(e)),
            Item::Acked {
                msg,
                seq,
                redelivered,
                epoch,
            } => {
                let Some(a) = &mut self.acked else {
                    return Some(Ok(Delivery {
                        message: msg,
                        redelivered,
                    }));
                };
                match a.arrive(msg.id(), epoch, seq) {
                    Verdict::Deliver if !a.wants(&msg) => {
                        // Filtered out by correlation: processed, as far as the broker goes.
                        a.ack(msg.id());
                        self.flush_acks_if_many();
                        None
                    }
                    Verdict::Deliver => Some(Ok(Delivery {
                        message: msg,
                        redelivered,
                    })),
                    Verdict::Duplicate => {
                        if let Some(c) = &self.client {
                            c.inner
                                .counters
                                .duplicates
                                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        self.flush_acks_if_many();
                        None
                    }
                }
            }
        }
    }

    /// Acknowledges `msg` (a Processed subscription's message it received): the broker
    /// forgets it. In [`crate::AckMode::Auto`] this only acknowledges it earlier than the
    /// next receive would. Returns `false` when `msg` was not received here unacknowledged.
    pub fn ack(&mut self, msg: &Message) -> bool {
        let acked = self.acked.as_mut().is_some_and(|a| a.ack(msg.id()));
        self.flush_acks_if_many();
        acked
    }

    /// Sends the acknowledgements made so far now (they otherwise go when the subscription
    /// has caught up with its queue, or in batches).
    pub fn flush_acks(&mut self) {
        let (Some(a), Some(client)) = (&mut self.acked, &self.client) else {
            return;
        };
        if !a.has_due() {
            return;
        }
        let epoch = client
            .inner
            .epoch
            .load(std::sync::atomic::Ordering::Relaxed);
        let ranges = a.take_ranges(epoch);
        for chunk in ranges.chunks(MAX_ACK_RANGES) {
            client.inner.push_control(Frame::SubAck(SubAck {
                sub: a.sub,
                ranges: chunk.to_vec(),
            }));
        }
    }

    /// The application asks for the next message: in automatic mode the one handed last is
    /// acknowledged, and acknowledgements go to the broker once [`ACK_BATCH`] are due.
    fn acknowledge_handed(&mut self) {
        if let Some(a) = &mut self.acked {
            a.next();
            self.flush_acks_if_many();
        }
    }

    fn flush_acks_if_many(&mut self) {
        if self
            .acked
            .as_ref()
            .is_some_and(|a| a.due_len() >= ACK_BATCH)
        {
            self.flush_acks();
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

    /// Unsubscribes and waits for the broker's acknowledgement. A durable subscription is
    /// detached: the broker keeps it for the next subscriber of its name.
    ///
    /// # Errors
    ///
    /// As [`crate::Client::subscribe`].
    pub async fn unsubscribe(mut self) -> Result<(), crate::SubscribeError> {
        self.flush_acks();
        match self.client.take() {
            Some(client) => client.remove_subscription(self.id, true, false).await,
            None => Ok(()),
        }
    }

    /// Deletes this durable subscription (its backlog too) and ends the stream; for another
    /// subscription, the same as [`Subscription::unsubscribe`].
    ///
    /// # Errors
    ///
    /// As [`crate::Client::subscribe`].
    pub async fn delete(mut self) -> Result<(), crate::SubscribeError> {
        self.flush_acks();
        match self.client.take() {
            Some(client) => client.remove_subscription(self.id, true, true).await,
            None => Ok(()),
        }
    }
}

impl Drop for Subscription {
    /// Unsubscribes without waiting. What was acknowledged is sent first; a message received
    /// and not acknowledged is sent again by the broker (to the next subscriber of a durable
    /// subscription).
    fn drop(&mut self) {
        self.flush_acks();
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
    /// An acknowledged subscription's id at the broker, durable name and window (protocol
    /// 1.3): its deliveries are dispatched by that id, not by topic.
    acked: Option<AckedInfo>,
}

/// What the broker knows an acknowledged subscription by.
#[derive(Clone)]
pub(crate) struct AckedInfo {
    pub(crate) sub: SubId,
    pub(crate) durable: Option<DurableName>,
    pub(crate) window: u32,
}

/// What removing a subscription leaves for the broker to be told.
#[derive(Default)]
pub(crate) struct Removed {
    /// Filters no other subscription uses (UNSUBSCRIBE).
    pub(crate) filters: Vec<TopicFilter>,
    /// An acknowledged subscription's id (SUB_CLOSE).
    pub(crate) acked: Option<SubId>,
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
    /// Acknowledged subscriptions: their broker-side id → table id.
    by_sub: HashMap<SubId, u64>,
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
                acked: None,
            },
        );
        Ok((id, fresh))
    }

    /// Registers an acknowledged subscription (protocol 1.3); returns its table id and the
    /// frame that opens it at the broker (its request id to be set).
    pub(crate) fn add_acked(
        &mut self,
        filters: Vec<TopicFilter>,
        durable: Option<DurableName>,
        window: u32,
        sink: Sink,
    ) -> (u64, SubscribeAcked) {
        self.next_id += 1;
        let id = self.next_id;
        // Unique among this client's open subscriptions: ids 2^32 apart are never open at once.
        let sub = SubId(id as u32);
        let info = AckedInfo {
            sub,
            durable,
            window,
        };
        let open = Self::open_frame(&filters, &info);
        self.by_sub.insert(sub, id);
        self.subs.insert(
            id,
            SubEntry {
                filters,
                group: None,
                // Applied where its deliveries are acknowledged (`AckState::wants`).
                correlation: None,
                sink,
                acked: Some(info),
            },
        );
        (id, open)
    }

    fn open_frame(filters: &[TopicFilter], info: &AckedInfo) -> SubscribeAcked {
        SubscribeAcked {
            request_id: 0,
            sub: info.sub,
            durable: info.durable.clone(),
            window: info.window,
            filters: filters.to_vec(),
        }
    }

    /// The frames that open every acknowledged subscription again (after a reconnect).
    pub(crate) fn active_acked(&self) -> Vec<SubscribeAcked> {
        self.subs
            .values()
            .filter_map(|e| e.acked.as_ref().map(|a| Self::open_frame(&e.filters, a)))
            .collect()
    }

    /// The queue of the acknowledged subscription the broker knows as `sub`.
    pub(crate) fn acked_sender(&self, sub: SubId) -> Option<queue::Sender> {
        self.sender(*self.by_sub.get(&sub)?)
    }

    /// Ends the acknowledged subscription `sub` (the broker ended it): its stream reports
    /// `why`, then closes.
    pub(crate) fn end_acked(&mut self, sub: SubId, why: String) {
        let Some(id) = self.by_sub.remove(&sub) else {
            return;
        };
        self.generation += 1;
        if let Some(entry) = self.subs.remove(&id)
            && let Sink::Queue(tx) = &entry.sink
        {
            tx.report(RecvError::Ended(why));
        }
    }

    /// Removes a subscription; returns what the broker must be told: the filters that
    /// became inactive (1 → 0), or an acknowledged subscription's id.
    pub(crate) fn remove(&mut self, id: u64) -> Removed {
        self.generation += 1;
        let Some(mut entry) = self.subs.remove(&id) else {
            return Removed::default();
        };
        if let Some(a) = entry.acked.take() {
            self.by_sub.remove(&a.sub);
            return Removed {
                filters: Vec::new(),
                acked: Some(a.sub),
            };
        }
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
        Removed {
            filters: gone,
            acked: None,
        }
    }

    /// Whether a delivery under `_inbox.` can only be a reply to this client's calls (no
    /// application subscription could match it), so it may skip the tries.
    pub(crate) fn inbox_is_exclusive(&self) -> bool {
        self.inbox_overlap == 0
    }

    /// The filters of subscription `id` that no other subscription uses.
    pub(crate) fn only_user_of(&self, id: u64) -> Vec<TopicFilter> {
        self.subs
            .get(&id)
            .filter(|e| e.acked.is_none())
            .map_or_else(Vec::new, |e| {
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

    /// The ids of the subscriptions that miss what is published while the client is
    /// disconnected: all but durable ones, whose messages the broker keeps meanwhile.
    pub(crate) fn forgetful_ids(&self) -> Vec<u64> {
        self.subs
            .iter()
            .filter(|(_, e)| e.acked.as_ref().is_none_or(|a| a.durable.is_none()))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The ids of the subscriptions that are not acknowledged ones.
    pub(crate) fn plain_ids(&self) -> Vec<u64> {
        self.subs
            .iter()
            .filter(|(_, e)| e.acked.is_none())
            .map(|(id, _)| *id)
            .collect()
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

    /// Ids of the subscriptions (not acknowledged ones: they get notices of their own)
    /// matching `topic`.
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
        self.by_sub.clear();
        self.subs.clear();
    }
}
