//! The client handle: publish, subscribe, flush, drain, close, statistics.

use crate::acked::{AckMode, AckReport, AckState, Unacked};
use crate::driver;
use crate::error::{ConnectError, PublishError, SubscribeError};
use crate::metrics::Recorder;
use crate::options::ClientOptions;
use crate::outbuf::{OutBuf, Runs};
use crate::rpc::{Inbox, new_correlation_id};
use crate::subscription::{NewSub, Sink};
use crate::subscription::{SubTable, Subscription};
use bytes::Bytes;
use daemoneye_eventbus_core::codec::{
    ACKED_SINCE_MINOR, DurableDelete, ErrorCode, MAX_ACKED_FILTERS, MAX_NAME_LEN, SubClose,
    Subscribe, Unsubscribe,
};
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use daemoneye_eventbus_core::{
    ByteStr, CorrelationFilter, CorrelationMetadata, DurableName, Frame, Header, Message,
    MessageId, Qos, QueueGroup, ReplyStatus, Topic, TopicFilter,
};
use daemoneye_eventbus_transport::Endpoint;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, oneshot, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Connection state, observable with [`Client::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnState {
    /// Connected; the broker's session id.
    Connected {
        /// Session id from the handshake.
        session_id: u64,
    },
    /// Lost the broker; reconnecting.
    Reconnecting,
    /// Closed for good.
    Closed,
}

/// Client counters. Everything lost is counted here, never silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Messages queued for publishing.
    pub published: u64,
    /// Messages lost: refused while the broker was unreachable and the queue full, or in a
    /// write that failed when the connection died.
    pub lost: u64,
    /// Messages the broker refused (nack), e.g. too large.
    pub rejected: u64,
    /// Messages received.
    pub received: u64,
    /// Messages the broker reported dropped for this client (slow reader, memory cap).
    pub missed: u64,
    /// Successful reconnections.
    pub reconnects: u64,
    /// Processed publishes the broker acknowledged (protocol 1.3): every matching Processed
    /// subscription holds them.
    pub acked: u64,
    /// Deliveries dropped as duplicates of a message already received (by message id).
    pub duplicates: u64,
    /// Processed publishes sent again after a reconnect, with their ids (the broker may have
    /// had them: subscribers recognise the duplicates).
    pub resent: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) missed: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) resent: AtomicU64,
}

pub(crate) struct OutState {
    pub(crate) buf: OutBuf,
    /// The header of the next publish: the publisher id and source stay, the rest is set
    /// per message (so a publish copies no source and builds no header).
    pub(crate) header: Header,
    pub(crate) connected: bool,
    /// Frames ever queued.
    pub(crate) queued_total: u64,
    /// Processed publishes not acknowledged yet (protocol 1.3), sent again after a reconnect.
    pub(crate) unacked: Unacked,
    /// The highest sequence a writer took: kept publishes up to it were handed to a
    /// connection (later ones are still queued).
    pub(crate) taken_through: u64,
}

pub(crate) type Pending = Mutex<HashMap<u32, oneshot::Sender<Result<(), SubscribeError>>>>;

/// An acknowledged subscription being restored after a reconnect ([`Inner::restored`]).
pub(crate) struct Restoring {
    /// The SUBSCRIBE_ACKED sent, to send again.
    pub(crate) open: daemoneye_eventbus_core::codec::SubscribeAcked,
    /// For a durable subscription, the outage: one the broker did not resume (it restarted,
    /// and kept nothing) missed what was published meanwhile.
    pub(crate) outage: Option<std::time::Duration>,
    /// Refusals so far because the broker still held it for this client's previous
    /// connection.
    pub(crate) attempts: u32,
}

/// State shared by client handles and the driver task.
pub(crate) struct Inner {
    pub(crate) options: ClientOptions,
    pub(crate) endpoint: Endpoint,
    sequence: AtomicU64,
    pub(crate) out: Mutex<OutState>,
    /// Wakes the writer when the queue becomes non-empty.
    pub(crate) out_ready: Notify,
    /// Wakes publishers waiting for room.
    pub(crate) out_space: Notify,
    /// Frames written or lost so far (flush waits on it).
    pub(crate) consumed: watch::Sender<u64>,
    pub(crate) subs: Mutex<SubTable>,
    pub(crate) pending: Pending,
    /// Acknowledged subscriptions being restored after a reconnect, by the request id of
    /// their SUBSCRIBE_ACKED.
    pub(crate) restored: Mutex<HashMap<u32, Restoring>>,
    /// Processed publishes made while disconnected, on disk (`ClientOptions::spool_dir`).
    /// Locked after `out`, never before.
    pub(crate) spool: Option<Mutex<crate::spool::Spool>>,
    /// Pings awaiting their pong, by nonce.
    pub(crate) pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    pub(crate) next_nonce: AtomicU64,
    pub(crate) next_request: AtomicU32,
    pub(crate) state: watch::Sender<ConnState>,
    pub(crate) counters: Counters,
    pub(crate) max_message_size: AtomicUsize,
    /// Cancelled by close / drain / the last handle's drop.
    pub(crate) closed: Closed,
    pub(crate) last_rejection: Mutex<Option<String>>,
    /// The reply inbox and the calls waiting on it.
    pub(crate) inbox: Arc<Inbox>,
    /// Metrics of the calls made.
    pub(crate) rpc_metrics: Recorder,
    /// The protocol minor version of the broker (queue groups need 1.1).
    pub(crate) broker_minor: AtomicU16,
    /// Connections made so far: what an acknowledgement's sequence numbers belong to.
    pub(crate) epoch: AtomicU64,
    /// Woken when the broker acknowledges or refuses Processed publishes.
    pub(crate) acked: Notify,
}

impl OutState {
    /// The sequence number of the last publish numbered.
    pub(crate) fn header_sequence(&self) -> u64 {
        self.header.id.sequence
    }
}

impl Inner {
    /// The next publish's sequence number (taken under the queue lock, so that ids follow
    /// the order on the wire). On a spool, crossing into the next generation's numbers
    /// names it in the spool first, so that no later client on it takes them.
    pub(crate) fn next_sequence(&self) -> u64 {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        if seq & ((1 << crate::spool::GENERATION_SHIFT) - 1) == 0
            && let Some(spool) = &self.spool
            && let Err(e) = spool.lock().next_generation()
        {
            tracing::warn!(error = %e, "could not record this client's next generation of message ids in its spool; the next client on it may reuse some");
        }
        seq
    }

    /// Queues a control frame (not subject to the outbox byte bound).
    pub(crate) fn push_control(&self, frame: Frame) {
        let mut out = self.out.lock();
        let was_empty = out.buf.is_empty();
        out.buf.push_frame(frame);
        out.queued_total += 1;
        drop(out);
        if was_empty {
            self.out_ready.notify_one();
        }
    }
}

/// Removes a subscription whose registration did not complete (error or cancellation).
struct Registration<'a> {
    client: &'a Client,
    id: u64,
    done: bool,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.client.forget_subscription(self.id);
        }
    }
}

/// Whether the client is closed: a token to wait on, and a flag for the check every publish
/// makes under the queue lock (the token's own check takes a lock of its own).
#[derive(Clone, Default)]
pub(crate) struct Closed {
    token: CancellationToken,
    flag: Arc<AtomicBool>,
}

impl Closed {
    /// Closes: every check after this sees it, then every waiter wakes.
    pub(crate) fn cancel(&self) {
        self.flag.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// A token cancelled when the client closes (or on its own).
    pub(crate) fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }
}

/// Cancels the driver when the last [`Client`] handle is dropped.
struct DropGuard(Closed);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A connection to a broker. Cheap to clone; clones share the connection. Dropping the last
/// clone (and every [`Subscription`]) closes it.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    _guard: Arc<DropGuard>,
    driver: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.inner.endpoint)
            .field("name", &self.inner.options.name)
            .finish()
    }
}

/// A message to publish, with optional metadata (see [`Client::publish_with`]).
#[derive(Debug, Clone)]
pub struct Publish {
    topic: Topic,
    payload: Bytes,
    pub(crate) extras: Extras,
}

/// What a publish carries besides its topic and payload (a plain [`Client::publish`] carries
/// the defaults).
#[derive(Debug, Clone, Default)]
pub(crate) struct Extras {
    qos: Qos,
    reply_to: Option<Topic>,
    deadline_ns: Option<u64>,
    correlation: Option<Box<CorrelationMetadata>>,
    pub(crate) status: Option<Box<ReplyStatus>>,
}

impl Extras {
    /// Sets what differs per message in `h` (a copy of the client's header template): its
    /// sequence, timestamp, and these options (taken).
    fn stamp(&mut self, h: &mut Header, sequence: u64, timestamp_ns: u64) {
        h.id.sequence = sequence;
        h.timestamp_ns = timestamp_ns;
        h.qos = self.qos;
        h.reply_to = self.reply_to.take();
        h.deadline_ns = self.deadline_ns;
        h.correlation = self.correlation.take();
        h.status = self.status.take();
    }
}

impl Publish {
    /// A message for `topic`.
    pub fn new(topic: Topic, payload: impl Into<Bytes>) -> Self {
        Self {
            topic,
            payload: payload.into(),
            extras: Extras::default(),
        }
    }
    /// Sets the delivery guarantee.
    #[must_use]
    pub fn qos(mut self, qos: Qos) -> Self {
        self.extras.qos = qos;
        self
    }
    /// Sets the reply-to topic.
    #[must_use]
    pub fn reply_to(mut self, topic: Topic) -> Self {
        self.extras.reply_to = Some(topic);
        self
    }
    /// Sets the deadline (nanoseconds since the Unix epoch).
    #[must_use]
    pub fn deadline_ns(mut self, deadline: u64) -> Self {
        self.extras.deadline_ns = Some(deadline);
        self
    }
    /// Attaches correlation metadata.
    #[must_use]
    pub fn correlation(mut self, meta: CorrelationMetadata) -> Self {
        self.extras.correlation = Some(Box::new(meta));
        self
    }

    /// Marks this message as caused by `cause`: it gets child correlation metadata (a new id,
    /// parent = the cause's id, the same root, the next sequence number, the cause's stage and
    /// tags). A cause without metadata starts a new chain rooted at this message.
    #[must_use]
    pub fn caused_by(mut self, cause: &Message) -> Self {
        let now = now_ns();
        let meta = match cause.header().correlation.as_deref() {
            Some(parent) => parent.child(new_correlation_id(), now),
            None => CorrelationMetadata::root(new_correlation_id(), now),
        };
        self.extras.correlation = Some(Box::new(meta));
        self
    }
}

/// How to subscribe (see [`Client::subscribe_with_options`]).
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Delivery guarantee (default `Realtime`).
    pub qos: Qos,
    /// Queue group to join: each message matching the group goes to one member only.
    pub group: Option<QueueGroup>,
    /// Only messages whose correlation metadata passes this filter are delivered to the
    /// subscription (applied by the client as messages arrive).
    pub correlation: Option<CorrelationFilter>,
    /// A durable subscription's name (Processed; protocol 1.3): the broker keeps what it has
    /// not acknowledged while no subscriber is attached, and gives it to the next subscriber
    /// of this name.
    pub durable: Option<DurableName>,
    /// When a Processed subscription's messages are acknowledged (default `Auto`).
    pub ack_mode: AckMode,
    /// Deliveries the broker may have unacknowledged at once: at most the client's
    /// [`ClientOptions::subscription_buffer`], which 0 (the default) asks for. The broker uses
    /// the smaller of this and its `ack_window`.
    pub window: u32,
    /// Hand duplicates (a message received again, by id) to the application instead of
    /// dropping them.
    pub keep_duplicates: bool,
}

impl SubscribeOptions {
    /// Sets the delivery guarantee.
    #[must_use]
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }
    /// Joins a queue group.
    #[must_use]
    pub fn group(mut self, group: QueueGroup) -> Self {
        self.group = Some(group);
        self
    }
    /// Filters by correlation metadata.
    #[must_use]
    pub fn correlation(mut self, filter: CorrelationFilter) -> Self {
        self.correlation = Some(filter);
        self
    }
    /// Makes it a durable subscription of this name (and Processed).
    #[must_use]
    pub fn durable(mut self, name: DurableName) -> Self {
        self.durable = Some(name);
        self.qos = Qos::Processed;
        self
    }
    /// Sets when messages are acknowledged.
    #[must_use]
    pub fn ack_mode(mut self, mode: AckMode) -> Self {
        self.ack_mode = mode;
        self
    }
    /// Sets the window of unacknowledged deliveries.
    #[must_use]
    pub fn window(mut self, window: u32) -> Self {
        self.window = window;
        self
    }
    /// Keeps duplicates instead of dropping them.
    #[must_use]
    pub fn keep_duplicates(mut self, keep: bool) -> Self {
        self.keep_duplicates = keep;
        self
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Client {
    /// Connects to `endpoint` and completes the handshake. Later losses of the connection are
    /// repaired automatically per [`ClientOptions::reconnect`].
    ///
    /// # Errors
    ///
    /// [`ConnectError`] when the first connection cannot be made or the broker refuses it.
    pub async fn connect(
        endpoint: &Endpoint,
        options: ClientOptions,
    ) -> Result<Self, ConnectError> {
        let name = &options.name;
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(ConnectError::InvalidName(name.clone()));
        }
        let fresh = fastrand::u64(1..);
        let spooled = match &options.spool_dir {
            Some(dir) => Some(crate::spool::Spool::open(
                dir,
                options.spool_max_bytes,
                options.spool_full,
                fresh,
            )?),
            None => None,
        };
        let established = driver::connect_once(endpoint, &options).await?;
        let (spool, identity, left) = match spooled {
            Some((s, identity, left)) => (Some(Mutex::new(s)), identity, left),
            None => (
                None,
                crate::spool::Identity {
                    publisher: fresh,
                    generation: 0,
                },
                Vec::new(),
            ),
        };
        let in_process = matches!(endpoint, Endpoint::InProc(_));
        let max = established.max_message_size(&options);
        let (state, _) = watch::channel(ConnState::Connected {
            session_id: established.session_id(),
        });
        let publisher_id = identity.publisher;
        let inner = Arc::new(Inner {
            endpoint: endpoint.clone(),
            inbox: Arc::new(Inbox::new(publisher_id)),
            rpc_metrics: Recorder::default(),
            broker_minor: AtomicU16::new(established.broker_minor()),
            sequence: AtomicU64::new(identity.first_sequence()),
            out: Mutex::new(OutState {
                buf: OutBuf::new(in_process),
                header: Header {
                    id: MessageId {
                        publisher: publisher_id,
                        sequence: 0,
                    },
                    source: ByteStr::from(options.name.as_str()),
                    ..Header::default()
                },
                connected: true,
                queued_total: 0,
                unacked: Unacked::default(),
                taken_through: 0,
            }),
            out_ready: Notify::new(),
            out_space: Notify::new(),
            consumed: watch::channel(0).0,
            subs: Mutex::new(SubTable::default()),
            pending: Mutex::new(HashMap::new()),
            restored: Mutex::new(HashMap::new()),
            spool,
            pings: Mutex::new(HashMap::new()),
            next_nonce: AtomicU64::new(1),
            next_request: AtomicU32::new(1),
            state,
            counters: Counters::default(),
            max_message_size: AtomicUsize::new(max),
            closed: Closed::default(),
            last_rejection: Mutex::new(None),
            epoch: AtomicU64::new(0),
            acked: Notify::new(),
            options,
        });
        let handle = tokio::spawn(driver::run(Arc::clone(&inner), established));
        let client = Self {
            _guard: Arc::new(DropGuard(inner.closed.clone())),
            inner,
            driver: Arc::new(Mutex::new(Some(handle))),
        };
        client.send_left_in_spool(left);
        Ok(client)
    }

    /// Sends what an earlier client left in the spool, before anything this one publishes,
    /// from this client's name and with their ids (this client is the same publisher, in a
    /// later generation: see `spool.rs`); the spool forgets them once the broker acknowledges
    /// them. Publishes of another publisher id (a spool written before identities were kept)
    /// are renumbered.
    fn send_left_in_spool(&self, left: Vec<Message>) {
        let (Some(spool), false) = (&self.inner.spool, left.is_empty()) else {
            return;
        };
        let inner = &self.inner;
        let runs = Runs::of_minor(inner.broker_minor.load(Ordering::Relaxed));
        let mut out = inner.out.lock();
        let out = &mut *out;
        let (mut through, n) = (0, left.len() as u64);
        let publisher = out.header.id.publisher;
        let renumber = left.iter().any(|m| m.id().publisher != publisher);
        for m in left {
            let mut h = m.header().clone();
            if renumber {
                h.id = MessageId {
                    publisher,
                    sequence: inner.next_sequence(),
                };
            }
            h.source = out.header.source.clone();
            through = h.id.sequence;
            out.buf.push_publish(m.topic(), &h, m.payload(), runs);
            out.unacked.push(m.topic(), &h, m.payload().clone());
            out.buf.kept += 1;
            out.queued_total += 1;
        }
        inner.counters.resent.fetch_add(n, Ordering::Relaxed);
        spool.lock().handed_over(through);
        inner.out_ready.notify_one();
    }

    /// Connects with default options and this client name.
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub async fn connect_named(endpoint: &Endpoint, name: &str) -> Result<Self, ConnectError> {
        Self::connect(endpoint, ClientOptions::named(name)).await
    }

    /// The client's name (the `source` of its messages).
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// The current connection state.
    pub fn state(&self) -> ConnState {
        *self.inner.state.borrow()
    }

    /// A watch of the connection state.
    pub fn state_watch(&self) -> watch::Receiver<ConnState> {
        self.inner.state.subscribe()
    }

    /// The largest payload accepted (the smaller of ours and the broker's).
    pub fn max_message_size(&self) -> usize {
        self.inner.max_message_size.load(Ordering::Relaxed)
    }

    /// The client's counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            published: l(&c.published),
            lost: l(&c.lost),
            rejected: l(&c.rejected),
            received: l(&c.received),
            missed: l(&c.missed),
            reconnects: l(&c.reconnects),
            acked: self.inner.out.lock().unacked.acked,
            duplicates: l(&c.duplicates),
            resent: l(&c.resent),
        }
    }

    /// Waits until every Processed publish made so far is acknowledged or refused by the
    /// broker, at most `timeout`, and reports the counts. Publishes kept across a reconnect
    /// are sent again meanwhile.
    pub async fn wait_acked(&self, timeout: std::time::Duration) -> AckReport {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.inner.acked.notified();
            let report = {
                let out = self.inner.out.lock();
                let spooled = self.inner.spool.as_ref().map_or(0, |s| s.lock().len());
                AckReport {
                    acked: out.unacked.acked,
                    refused: out.unacked.refused,
                    outstanding: (out.unacked.len() + spooled) as u64,
                }
            };
            if report.outstanding == 0 || self.inner.closed.is_cancelled() {
                return report;
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return report,
                () = self.inner.closed.cancelled() => {}
            }
        }
    }

    /// The broker's explanation of the last refused publish, if any.
    pub fn last_rejection(&self) -> Option<String> {
        self.inner.last_rejection.lock().clone()
    }

    /// Publishes `payload` on `topic` (at most once). Returns once the message is queued;
    /// writes are batched and flushed as soon as the queue empties.
    ///
    /// # Errors
    ///
    /// See [`PublishError`].
    pub async fn publish(
        &self,
        topic: &Topic,
        payload: impl Into<Bytes>,
    ) -> Result<MessageId, PublishError> {
        self.send(topic, payload.into(), Extras::default()).await
    }

    /// Publishes with explicit options.
    ///
    /// # Errors
    ///
    /// See [`PublishError`].
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a cancelled call has either queued the message or not touched the queue.
    pub async fn publish_with(&self, p: Publish) -> Result<MessageId, PublishError> {
        self.send(&p.topic, p.payload, p.extras).await
    }

    /// Queues one publish (both public entry points).
    async fn send(
        &self,
        topic: &Topic,
        payload: Bytes,
        mut extras: Extras,
    ) -> Result<MessageId, PublishError> {
        let max = self.max_message_size();
        if payload.len() > max {
            return Err(PublishError::TooLarge {
                size: payload.len(),
                max,
            });
        }
        if topic.is_sys() {
            return Err(PublishError::Reserved(topic.to_string()));
        }
        if let Some(reply_to) = extras.reply_to.as_ref().filter(|r| r.is_sys()) {
            return Err(PublishError::Reserved(reply_to.to_string()));
        }
        if let Some(meta) = &extras.correlation {
            meta.validate()?;
        }
        let inner = &self.inner;
        let timestamp_ns = now_ns();
        let need = payload.len() + topic.as_str().len() + MESSAGE_OVERHEAD;
        // A Processed publish is kept until the broker acknowledges it (protocol 1.3).
        let keep = extras.qos == Qos::Processed
            && inner.broker_minor.load(Ordering::Relaxed) >= ACKED_SINCE_MINOR;
        let mut payload = Some(payload);
        loop {
            let space = {
                let mut out = inner.out.lock();
                if inner.closed.is_cancelled() {
                    return Err(PublishError::Closed);
                }
                let bound = if out.connected {
                    inner
                        .options
                        .connected_outbox_bytes
                        .min(inner.options.outbox_bytes)
                } else {
                    inner.options.outbox_bytes
                };
                if keep
                    && !out.connected
                    && let Some(spool) = &inner.spool
                {
                    // Broker away, spool configured: on disk, not in memory.
                    let mut h = out.header.clone();
                    let sequence = inner.next_sequence();
                    extras.stamp(&mut h, sequence, timestamp_ns);
                    let id = h.id;
                    let payload = payload.take().expect("a publish is queued once");
                    let msg = Message::new(topic.clone(), h, payload);
                    let mut spool = spool.lock();
                    return match spool.push(msg) {
                        Ok(dropped) => {
                            inner.counters.lost.fetch_add(dropped, Ordering::Relaxed);
                            inner.counters.published.fetch_add(1, Ordering::Relaxed);
                            Ok(id)
                        }
                        Err(crate::spool::NotSpooled::Full) => {
                            inner.counters.lost.fetch_add(1, Ordering::Relaxed);
                            Err(PublishError::Backlogged {
                                queued: spool.bytes(),
                            })
                        }
                        Err(crate::spool::NotSpooled::Store(e)) => {
                            inner.counters.lost.fetch_add(1, Ordering::Relaxed);
                            Err(PublishError::Spool(e))
                        }
                    };
                }
                let unacked_room = !keep
                    || out.unacked.len() == 0
                    || out.unacked.bytes + need <= inner.options.unacked_bytes;
                if !unacked_room && !out.connected {
                    inner.counters.lost.fetch_add(1, Ordering::Relaxed);
                    return Err(PublishError::Backlogged {
                        queued: out.unacked.bytes,
                    });
                }
                if unacked_room && (out.buf.is_empty() || out.buf.bytes + need <= bound) {
                    let was_empty = out.buf.is_empty();
                    let out = &mut *out;
                    // The header template keeps this client's publisher id and source; only
                    // what differs per message is set. Numbered under the queue lock, so ids
                    // follow the order on the wire.
                    let h = &mut out.header;
                    let sequence = inner.next_sequence();
                    extras.stamp(h, sequence, timestamp_ns);
                    let id = h.id;
                    let runs = Runs::of_minor(inner.broker_minor.load(Ordering::Relaxed));
                    let payload = payload.take().expect("a publish is queued once");
                    out.buf.push_publish(topic, h, &payload, runs);
                    if keep {
                        out.unacked.push(topic, h, payload);
                        out.buf.kept += 1;
                    }
                    (h.reply_to, h.correlation, h.status) = (None, None, None);
                    out.queued_total += 1;
                    inner.counters.published.fetch_add(1, Ordering::Relaxed);
                    if was_empty {
                        inner.out_ready.notify_one();
                    }
                    return Ok(id);
                }
                if !out.connected {
                    inner.counters.lost.fetch_add(1, Ordering::Relaxed);
                    return Err(PublishError::Backlogged {
                        queued: out.buf.bytes,
                    });
                }
                // Waits for the writer to take the queue, or for acknowledgements.
                (inner.out_space.notified(), inner.acked.notified())
            };
            tokio::select! {
                () = space.0 => {}
                () = space.1 => {}
                () = inner.closed.cancelled() => return Err(PublishError::Closed),
            }
        }
    }

    /// Waits until every frame queued before this call has been written to the transport
    /// (or counted as lost). While disconnected it waits for the reconnection; bound it with a
    /// timeout if needed.
    ///
    /// # Errors
    ///
    /// [`PublishError::Closed`] when the client closes first.
    pub async fn flush(&self) -> Result<(), PublishError> {
        let target = self.inner.out.lock().queued_total;
        let mut rx = self.inner.consumed.subscribe();
        let reached = tokio::select! {
            r = rx.wait_for(|n| *n >= target) => r.is_ok(),
            () = self.inner.closed.cancelled() => false,
        };
        if reached || *self.inner.consumed.borrow() >= target {
            return Ok(());
        }
        Err(PublishError::Closed)
    }

    /// Round trip to the broker: returns once the broker has answered a ping sent after
    /// everything queued so far. Because the broker handles a connection's frames in order,
    /// every earlier publish has then been routed and any refusal of it has been received
    /// (see [`Client::stats`] and [`Client::last_rejection`]).
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Timeout`] after `request_timeout`, [`SubscribeError::Disconnected`]
    /// when the connection it was sent on is lost first, or [`SubscribeError::Closed`].
    pub async fn ping(&self) -> Result<std::time::Duration, SubscribeError> {
        let nonce = self.inner.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pings.lock().insert(nonce, tx);
        let start = std::time::Instant::now();
        self.inner.push_control(Frame::Ping(nonce));
        let timeout = self.inner.options.request_timeout;
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, rx) => match r {
                Ok(Ok(())) => Ok(start.elapsed()),
                Ok(Err(_)) if self.inner.closed.is_cancelled() => Err(SubscribeError::Closed),
                // Its connection was lost before the answer.
                Ok(Err(_)) => Err(SubscribeError::Disconnected),
                Err(_) => Err(SubscribeError::Timeout(timeout)),
            },
            () = self.inner.closed.cancelled() => Err(SubscribeError::Closed),
        };
        self.inner.pings.lock().remove(&nonce);
        result
    }

    async fn control_request(&self, make: impl FnOnce(u32) -> Frame) -> Result<(), SubscribeError> {
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().insert(id, tx);
        self.inner.push_control(make(id));
        let timeout = self.inner.options.request_timeout;
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, rx) => match r {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(SubscribeError::Closed),
                Err(_) => Err(SubscribeError::Timeout(timeout)),
            },
            () = self.inner.closed.cancelled() => Err(SubscribeError::Closed),
        };
        self.inner.pending.lock().remove(&id);
        result
    }

    /// Subscribes to one or more filters at most once ([`Qos::Realtime`]); returns once the
    /// broker has acknowledged every new filter. A message matching several filters arrives
    /// once.
    ///
    /// # Errors
    ///
    /// See [`SubscribeError`]; on error nothing stays subscribed.
    pub async fn subscribe<I, S>(&self, filters: I) -> Result<Subscription, SubscribeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.subscribe_with(filters, Qos::Realtime).await
    }

    /// Subscribes with an explicit delivery guarantee. With [`Qos::Processed`] the broker
    /// never drops a message for this subscription: when its queue is full, publishers wait
    /// (their connections stop being read) until it has room. A filter keeps the strongest
    /// QoS any subscription asked for until it is no longer subscribed.
    ///
    /// # Errors
    ///
    /// See [`SubscribeError`]; on error nothing stays subscribed.
    pub async fn subscribe_with<I, S>(
        &self,
        filters: I,
        qos: Qos,
    ) -> Result<Subscription, SubscribeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.subscribe_with_options(filters, SubscribeOptions::default().qos(qos))
            .await
    }

    /// Subscribes with every option: QoS, queue group and correlation filter.
    ///
    /// A connection holds each filter once: plainly or in one queue group. Subscribing a
    /// filter in a group while it is held plainly on this connection (or the reverse, or in
    /// another group) fails with [`SubscribeError::Conflict`].
    ///
    /// # Errors
    ///
    /// See [`SubscribeError`]; on error nothing stays subscribed.
    pub async fn subscribe_with_options<I, S>(
        &self,
        filters: I,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let filters = filters
            .into_iter()
            .map(|f| TopicFilter::new(f.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let minor = self.inner.broker_minor.load(Ordering::Relaxed);
        let acked = options.qos == Qos::Processed && options.group.is_none();
        if acked && minor >= ACKED_SINCE_MINOR {
            return self.subscribe_acked(filters, options).await;
        }
        if let Some(name) = &options.durable {
            return Err(SubscribeError::Refused {
                code: ErrorCode::Protocol,
                message: format!(
                    "the broker speaks protocol 1.{minor}, which has no durable subscriptions \
                     (1.3 or later needed for {name}); upgrade the broker"
                ),
            });
        }
        let (tx, rx) = crate::queue::channel(self.inner.options.subscription_buffer);
        let id = self
            .subscribe_sink(NewSub {
                filters: filters.clone(),
                qos: options.qos,
                group: options.group,
                correlation: options.correlation,
                sink: Sink::Queue(tx),
            })
            .await?;
        Ok(Subscription {
            id,
            filters,
            rx,
            client: Some(self.clone()),
            acked: None,
        })
    }

    /// Subscribes durably: a Processed subscription named `name` that outlives this client.
    /// While no subscriber is attached, the broker keeps what it has not acknowledged (bounded
    /// by its `durable_max_messages` and `durable_max_bytes`, under its
    /// `durable_full_policy`), and the next subscriber of this name receives it, in order,
    /// before anything newer (redeliveries marked in [`crate::Delivery::redelivered`]). One
    /// subscriber at a time: another client subscribing to the same name is refused with
    /// `DurableInUse`. Its filters are fixed when it is made: subscribing with others is
    /// refused (delete it first).
    ///
    /// # Errors
    ///
    /// See [`SubscribeError`]; a name that is not 1 to 64 bytes of `a-z 0-9 _ -` is refused
    /// before anything is sent.
    pub async fn subscribe_durable<I, S>(
        &self,
        name: &str,
        filters: I,
    ) -> Result<Subscription, SubscribeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let name = DurableName::new(name).map_err(|e| SubscribeError::Refused {
            code: ErrorCode::InvalidName,
            message: e.to_string(),
        })?;
        self.subscribe_with_options(filters, SubscribeOptions::default().durable(name))
            .await
    }

    /// Deletes durable subscription `name` and its backlog. It must not be attached: a
    /// subscriber deletes its own with [`Subscription::delete`].
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Refused`] with `UnknownSubscription` or `DurableInUse`, or as
    /// [`Client::subscribe`].
    pub async fn delete_durable(&self, name: &str) -> Result<(), SubscribeError> {
        let name = DurableName::new(name).map_err(|e| SubscribeError::Refused {
            code: ErrorCode::InvalidName,
            message: e.to_string(),
        })?;
        let minor = self.inner.broker_minor.load(Ordering::Relaxed);
        if minor < ACKED_SINCE_MINOR {
            return Err(SubscribeError::Refused {
                code: ErrorCode::Protocol,
                message: format!("the broker speaks protocol 1.{minor}: no durable subscriptions"),
            });
        }
        self.control_request(|request_id| {
            Frame::DurableDelete(DurableDelete {
                request_id,
                name: name.clone(),
            })
        })
        .await
    }

    /// Opens an acknowledged subscription (protocol 1.3).
    async fn subscribe_acked(
        &self,
        filters: Vec<TopicFilter>,
        options: SubscribeOptions,
    ) -> Result<Subscription, SubscribeError> {
        if filters.is_empty() {
            return Err(SubscribeError::NoFilters);
        }
        if filters.len() > MAX_ACKED_FILTERS {
            return Err(SubscribeError::Refused {
                code: ErrorCode::Protocol,
                message: format!(
                    "a Processed subscription holds at most {MAX_ACKED_FILTERS} filters"
                ),
            });
        }
        if self.inner.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let buffer = self.inner.options.subscription_buffer.max(1);
        // Never more unacknowledged than the queue holds: the broker may send a whole window
        // before the REPLY that opens the subscription, and the reader must not wait for
        // room then (the application has no `Subscription` to read from yet).
        let cap = u32::try_from(buffer).unwrap_or(u32::MAX);
        let window = match options.window {
            0 => cap,
            w => w.min(cap),
        };
        let (tx, rx) = crate::queue::channel(buffer);
        let (id, open) = self.inner.subs.lock().add_acked(
            filters.clone(),
            options.durable,
            window,
            Sink::Queue(tx),
        );
        let sub = open.sub;
        let mut registered = Registration {
            client: self,
            id,
            done: false,
        };
        self.control_request(|request_id| {
            Frame::SubscribeAcked(daemoneye_eventbus_core::codec::SubscribeAcked {
                request_id,
                ..open
            })
        })
        .await?;
        registered.done = true;
        Ok(Subscription {
            id,
            filters,
            rx,
            client: Some(self.clone()),
            acked: Some(
                AckState::new(
                    sub,
                    options.ack_mode,
                    options.keep_duplicates,
                    self.inner.options.dedup_window,
                )
                .filtered(options.correlation),
            ),
        })
    }

    /// Registers a subscription and asks the broker for its new filters; returns its id.
    pub(crate) async fn subscribe_sink(&self, new: NewSub) -> Result<u64, SubscribeError> {
        if new.filters.is_empty() {
            return Err(SubscribeError::NoFilters);
        }
        if self.inner.closed.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        let minor = self.inner.broker_minor.load(Ordering::Relaxed);
        if new.group.is_some() && minor < 1 {
            return Err(SubscribeError::Refused {
                code: ErrorCode::Protocol,
                message: format!(
                    "the broker speaks protocol 1.{minor}, which has no queue groups (1.1 or later \
                     needed); upgrade the broker or subscribe without a group"
                ),
            });
        }
        let (id, fresh) = self.inner.subs.lock().add(new)?;
        // Cancel-safe: if this future is dropped before every acknowledgement, the guard
        // removes the subscription again (and unsubscribes what was sent).
        let mut registered = Registration {
            client: self,
            id,
            done: false,
        };
        for filter in fresh {
            let (qos, group) = self.inner.subs.lock().held(&filter);
            let sent = self
                .control_request(|request_id| {
                    Frame::Subscribe(Subscribe {
                        request_id,
                        qos,
                        filter,
                        group,
                    })
                })
                .await;
            sent?;
        }
        registered.done = true;
        Ok(id)
    }

    /// Unsubscribes the filters only this subscription uses, waits for the broker's
    /// acknowledgements, and only then removes the subscription: every delivery the broker
    /// routed to it before reaches its queue (a queue group member leaving loses nothing).
    pub(crate) async fn unsubscribe_then_forget(&self, id: u64) {
        let last = self.inner.subs.lock().only_user_of(id);
        for filter in last {
            let _ = self
                .control_request(|request_id| {
                    Frame::Unsubscribe(Unsubscribe { request_id, filter })
                })
                .await;
        }
        // The filters are gone at the broker already; nothing more to send.
        let _removed = self.inner.subs.lock().remove(id);
    }

    /// Removes a subscription; with `wait`, waits for the broker's acknowledgements. A
    /// durable subscription is detached, or with `delete`, deleted.
    pub(crate) async fn remove_subscription(
        &self,
        id: u64,
        wait: bool,
        delete: bool,
    ) -> Result<(), SubscribeError> {
        let gone = self.inner.subs.lock().remove(id);
        if let Some(sub) = gone.acked {
            let close = |request_id| {
                Frame::SubClose(SubClose {
                    request_id,
                    sub,
                    delete,
                })
            };
            if wait {
                return self.control_request(close).await;
            }
            let request_id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
            self.inner.push_control(close(request_id));
            return Ok(());
        }
        for filter in gone.filters {
            if wait {
                self.control_request(|request_id| {
                    Frame::Unsubscribe(Unsubscribe { request_id, filter })
                })
                .await?;
            } else {
                let request_id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .push_control(Frame::Unsubscribe(Unsubscribe { request_id, filter }));
            }
        }
        Ok(())
    }

    /// Synchronous unsubscribe used when a [`Subscription`] is dropped.
    pub(crate) fn forget_subscription(&self, id: u64) {
        let gone = self.inner.subs.lock().remove(id);
        if let Some(sub) = gone.acked {
            let request_id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
            self.inner.push_control(Frame::SubClose(SubClose {
                request_id,
                sub,
                delete: false,
            }));
        }
        for filter in gone.filters {
            let request_id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
            self.inner
                .push_control(Frame::Unsubscribe(Unsubscribe { request_id, filter }));
        }
    }

    /// Gracefully finishes: unsubscribes everything, writes everything queued (bounded by
    /// `request_timeout`), then closes.
    pub async fn drain(&self) {
        let ids = self.inner.subs.lock().ids();
        for id in ids {
            let _ = self.remove_subscription(id, false, false).await;
        }
        let _ = tokio::time::timeout(self.inner.options.request_timeout, self.flush()).await;
        self.close().await;
    }

    /// Closes at once: queued messages not yet written are discarded (and counted as lost),
    /// subscriptions end with [`crate::RecvError::Closed`].
    pub async fn close(&self) {
        self.inner.closed.cancel();
        self.inner.cancel_calls();
        let handle = self.driver.lock().take();
        if let Some(h) = handle {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), h).await;
        }
    }
}

/// The refusal message for a reply carrying an error code.
pub(crate) fn refused(code: ErrorCode, message: String) -> SubscribeError {
    SubscribeError::Refused { code, message }
}
