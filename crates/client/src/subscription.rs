//! Subscriptions: the client-side table that demultiplexes deliveries, and the
//! [`Subscription`] stream handed to the application.

use crate::queue::{self, Taken};
use daemoneye_eventbus_core::codec::DropReason;
use daemoneye_eventbus_core::{Message, Qos, SubscriptionTrie, Topic, TopicFilter};
use std::collections::HashMap;
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

struct SubEntry {
    filters: Vec<TopicFilter>,
    tx: queue::Sender,
}

impl Drop for SubEntry {
    /// A subscription leaving the table ends its stream.
    fn drop(&mut self) {
        self.tx.close();
    }
}

/// The subscriptions matched for the last delivered topic, reused while the topic and the
/// table stay the same (a burst on one topic is matched once).
#[derive(Default)]
pub(crate) struct Matched {
    ids: Vec<u64>,
    key: Option<(Topic, u64)>,
}

/// Subscriptions of one client: id → entry, filter → refcount, and a trie for demultiplexing.
#[derive(Default)]
pub(crate) struct SubTable {
    subs: HashMap<u64, SubEntry>,
    /// Active filters: how many subscriptions use each, and the strongest QoS asked for.
    refs: HashMap<TopicFilter, (usize, Qos)>,
    trie: SubscriptionTrie<u64>,
    next_id: u64,
    /// Bumped by every change of the table (invalidates [`Matched`] caches).
    generation: u64,
}

impl SubTable {
    /// Registers a subscription; returns its id and the filters the broker must be asked
    /// for: newly active ones (0 → 1) and ones upgraded from `Realtime` to `Processed`.
    pub(crate) fn add(
        &mut self,
        filters: Vec<TopicFilter>,
        qos: Qos,
        tx: queue::Sender,
    ) -> (u64, Vec<TopicFilter>) {
        self.generation += 1;
        self.next_id += 1;
        let id = self.next_id;
        let mut fresh = Vec::new();
        for f in &filters {
            self.trie.insert(f, id);
            let (n, q) = self.refs.entry(f.clone()).or_insert((0, Qos::Realtime));
            *n += 1;
            if *n == 1 || (qos == Qos::Processed && *q != Qos::Processed) {
                fresh.push(f.clone());
            }
            if qos == Qos::Processed {
                *q = Qos::Processed;
            }
        }
        self.subs.insert(id, SubEntry { filters, tx });
        (id, fresh)
    }

    /// Removes a subscription; returns the filters that became inactive (1 → 0).
    pub(crate) fn remove(&mut self, id: u64) -> Vec<TopicFilter> {
        self.generation += 1;
        let Some(mut entry) = self.subs.remove(&id) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        for f in std::mem::take(&mut entry.filters) {
            self.trie.remove(&f, id);
            if let Some((n, _)) = self.refs.get_mut(&f) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(&f);
                    gone.push(f);
                }
            }
        }
        gone
    }

    /// Every active filter with its QoS (re-subscribed after a reconnect).
    pub(crate) fn active_filters(&self) -> Vec<(TopicFilter, Qos)> {
        self.refs
            .iter()
            .map(|(f, (_, q))| (f.clone(), *q))
            .collect()
    }

    /// Every subscription id.
    pub(crate) fn ids(&self) -> Vec<u64> {
        self.subs.keys().copied().collect()
    }

    /// Offers `msg` to every subscription matching its topic without waiting. Subscriptions
    /// whose queue is full are pushed to `blocked` so the caller can wait on them outside the
    /// table's lock. Allocates nothing when no queue is full.
    pub(crate) fn dispatch(
        &self,
        msg: &Message,
        matched: &mut Matched,
        blocked: &mut Vec<queue::Sender>,
    ) {
        let fresh =
            matches!(&matched.key, Some((t, g)) if *g == self.generation && t == msg.topic());
        if !fresh {
            self.trie.matches_into(msg.topic(), &mut matched.ids);
            matched.key = Some((msg.topic().clone(), self.generation));
        }
        for id in matched.ids.iter() {
            let Some(entry) = self.subs.get(id) else {
                continue;
            };
            if entry.tx.try_send(Item::Msg(msg.clone())).is_err() {
                blocked.push(entry.tx.clone());
            }
        }
    }

    /// Ids of the subscriptions matching `topic`.
    pub(crate) fn ids_for(&self, topic: &Topic, scratch: &mut Vec<u64>) {
        self.trie.matches_into(topic, scratch);
    }

    /// Sender of one subscription.
    pub(crate) fn sender(&self, id: u64) -> Option<queue::Sender> {
        self.subs.get(&id).map(|e| e.tx.clone())
    }

    /// Drops every sender, ending all subscription streams.
    pub(crate) fn close_all(&mut self) {
        self.generation += 1;
        self.subs.clear();
    }
}
