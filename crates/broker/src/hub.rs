//! What every session shares: configuration, the routing table, the memory cap, the
//! counters, the tokens of the one shutdown path. And the step between the router and the
//! queues: applying a [`Plan`] to the connections' [`Outlet`]s ([`Hub::route`]), with the
//! broker's own messages, re-offers and statistics.

use crate::config::BrokerConfig;
use crate::conn::Conn;
use crate::delivery::{
    AckedLimits, AckedSub, Attachment, DiskStore, DropCause, GroupCommit, Item, KeptStore, Memory,
    Outlet, Pushed, SubPushed, SyncWait, Want,
};
use crate::router::{Class, Member, PlanCache, Router, Slot, SubscribeRefusal};
use crate::stats::{BrokerStats, ConnectionStats, Counters, SubscriptionStats, load};
use bytes::Bytes;
use daemoneye_eventbus_core::codec::{
    ErrorCode, ErrorFrame, Lent, Nack, SubEnd, SubId, Subscribe, SubscribeAcked, Version, Welcome,
};
use daemoneye_eventbus_core::{
    ByteStr, DurableName, Frame, Header, Message, MessageId, Qos, QueueGroup, ReplyStatus,
    StatusCode, Topic, TopicFilter, catalog,
};
use daemoneye_eventbus_transport::{PeerInfo, TransportKind};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes charged to the memory cap for each subscription on top of its filter's length: an
/// estimate of what the routing table keeps for it (trie nodes, table entries).
pub const SUBSCRIPTION_CHARGE: usize = 512;

fn subscription_charge(filter: &TopicFilter) -> usize {
    SUBSCRIPTION_CHARGE + filter.as_str().len()
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Whether routing may leave a message waiting for a full Processed queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// A client's publish: its session waits (backpressure).
    Allowed,
    /// The broker's own messages and re-offers: every connection gets them in its Realtime
    /// queue, whose slow-reader policy applies, so a miss is counted per connection and topic
    /// and noticed in-band.
    Never,
}

/// Result of routing one message or run.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Routed {
    /// Recipients matched: connections with a plain subscription plus one member per queue
    /// group. Zero means nobody could answer a request.
    pub(crate) matched: u64,
    /// Deliveries not made because their connection or subscription was closing (the other
    /// drops, evictions included, are counted by the queues themselves).
    pub(crate) closed: u64,
    /// Set when nothing was queued: a Processed publish a durable subscription on disk
    /// would keep, while the store cannot write ([`Hub::store_trouble`]).
    pub(crate) refused: Option<StoreTrouble>,
}

/// Why the disk store cannot keep Processed publishes now: the last write to a durable
/// subscription's log failed, and none has succeeded since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreTrouble {
    /// The disk (or the user's quota) is full.
    Full,
    /// Another write error (the disk failing, the directory removed).
    Failing,
}

impl StoreTrouble {
    const OK: u8 = 0;

    fn to_u8(self) -> u8 {
        match self {
            Self::Full => 1,
            Self::Failing => 2,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Full),
            2 => Some(Self::Failing),
            _ => None,
        }
    }

    /// The refusal a publisher gets.
    pub(crate) fn nack(self, id: daemoneye_eventbus_core::MessageId) -> Nack {
        let (code, reason) = match self {
            Self::Full => (
                ErrorCode::StoreFull,
                "the broker's disk is full: a durable subscription would keep this and cannot \
                 write it, so it was not delivered; publish it again once there is room",
            ),
            Self::Failing => (
                ErrorCode::StoreFailed,
                "the broker cannot write its durable subscriptions' logs (see its log): this \
                 was not delivered; publish it again once the store is mended",
            ),
        };
        Nack {
            id,
            code,
            reason: reason.into(),
        }
    }
}

/// A session's routing buffers, reused so routing allocates nothing.
#[derive(Default)]
pub(crate) struct RouteScratch {
    /// The plans of the topics this session routed lately.
    plans: PlanCache,
    pub(crate) effects: Effects,
}

/// The routing table as the broker instantiates it.
pub(crate) type Table = Router<Arc<Conn>, Arc<AckedSub>>;

/// A queue without room that a publisher waits for.
#[derive(Clone)]
pub(crate) enum Blocked {
    /// A connection's Processed queue, and the group the message went to it in.
    Conn(Arc<Conn>, Option<QueueGroup>),
    /// An acknowledged subscription whose subscriber keeps up.
    Sub(Arc<AckedSub>),
}

/// What routing left for the session to do.
#[derive(Default)]
pub(crate) struct Effects {
    /// Queues without room: the publisher waits for them.
    pub(crate) blocked: Vec<Blocked>,
    /// Outlets that got their first delivery: their writers are woken once, after the whole
    /// batch is routed ([`RouteScratch::wake_writers`]).
    wake: Vec<Arc<Outlet>>,
    /// Subscriptions on disk that kept something: written before the publisher's ACK
    /// ([`Hub::persist`]).
    pub(crate) persist: Vec<Arc<AckedSub>>,
}

impl RouteScratch {
    /// Wakes every writer that got its first delivery of this batch.
    pub(crate) fn wake_writers(&mut self) {
        self.effects.wake_writers();
    }
}

impl Effects {
    fn wake_writers(&mut self) {
        for outlet in self.wake.drain(..) {
            outlet.wake();
        }
    }
}

/// See the module documentation.
pub(crate) struct Hub {
    pub(crate) config: BrokerConfig,
    pub(crate) router: RwLock<Table>,
    /// Durable subscriptions by name (each also in the routing table).
    durables: parking_lot::Mutex<HashMap<DurableName, Arc<AckedSub>>>,
    pub(crate) counters: Counters,
    pub(crate) memory: Memory,
    /// Bytes of the memory cap held by subscriptions.
    subscription_bytes: AtomicUsize,
    pub(crate) next_session: AtomicU64,
    pub(crate) tracker: TaskTracker,
    /// Stops the accept loops.
    pub(crate) stop_accepting: CancellationToken,
    /// Tells sessions to stop reading and drain.
    pub(crate) drain: CancellationToken,
    /// Tears every connection down at once (after the drain deadline).
    pub(crate) kill: CancellationToken,
    pub(crate) limit: Arc<Semaphore>,
    /// TLS handshakes in progress, at most [`MAX_PENDING_HANDSHAKES`]: they hold no
    /// `max_connections` slot, so network peers that never finish one cannot lock local
    /// clients out.
    pub(crate) handshakes: Arc<Semaphore>,
    allowed_uids: Vec<u32>,
    /// Open sessions (id → name), listed in the shutdown report when they overrun.
    pub(crate) sessions: parking_lot::Mutex<std::collections::BTreeMap<u64, String>>,
    started: Instant,
    sys_seq: AtomicU64,
    /// When a failed write to a durable subscription's log was last logged (ms since start).
    store_error_logged_ms: AtomicU64,
    /// [`StoreTrouble`] since the last failed write, or [`StoreTrouble::OK`] once one
    /// succeeds.
    store_trouble: std::sync::atomic::AtomicU8,
    /// The policy in force (`acl_file`), `None` without one: every allowed client may do
    /// anything. Sessions resolve their grants again when `acl_generation` moves.
    acl: RwLock<Option<Arc<crate::acl::Policy>>>,
    pub(crate) acl_generation: AtomicU64,
    /// Connections each identity holds now ([`Hub::admit_identity`]).
    identities: parking_lot::Mutex<HashMap<String, usize>>,
    /// Reply inboxes, each kept to the connection that subscribed to it first: token →
    /// session id (bounded by the subscriptions connections may hold).
    inboxes: parking_lot::Mutex<HashMap<String, u64>>,
    /// The audit trail (`audit_log`).
    audit: std::sync::OnceLock<crate::audit::AuditLog>,
    /// Identities whose first connection was recorded (bounded: past it, every connection
    /// of a new identity is recorded).
    seen_identities: parking_lot::Mutex<std::collections::HashSet<String>>,
    /// Control requests waiting for their answer, by reply topic (bounded, oldest first
    /// forgotten): their answers are recorded in the audit trail.
    pending_control: parking_lot::Mutex<PendingControl>,
    /// Collector processes the supervisor started: pid → collector id
    /// ([`crate::Broker::register_collector`]).
    collectors: parking_lot::RwLock<HashMap<i32, Arc<str>>>,
    /// The event topics the supervisor declared for each registered collector, by id.
    collector_events: parking_lot::RwLock<HashMap<Arc<str>, Arc<[TopicFilter]>>>,
    /// Connections refused per identity (for the per-identity limit, a disallowed uid or a
    /// kept name), bounded like drop counts.
    refused_by_identity: parking_lot::Mutex<crate::stats::IdentityCounts>,
}

impl Hub {
    pub(crate) fn new(config: BrokerConfig, allowed_uids: Vec<u32>) -> Self {
        Self {
            router: RwLock::new(Router::new(
                config.max_subscriptions_per_connection,
                config.max_subscribers,
            )),
            durables: parking_lot::Mutex::new(HashMap::new()),
            counters: Counters::default(),
            memory: Memory::new(config.max_memory_bytes),
            subscription_bytes: AtomicUsize::new(0),
            next_session: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            drain: CancellationToken::new(),
            kill: CancellationToken::new(),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            handshakes: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
            allowed_uids,
            sessions: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            started: Instant::now(),
            sys_seq: AtomicU64::new(0),
            store_error_logged_ms: AtomicU64::new(0),
            store_trouble: std::sync::atomic::AtomicU8::new(StoreTrouble::OK),
            acl: RwLock::new(None),
            acl_generation: AtomicU64::new(0),
            identities: parking_lot::Mutex::new(HashMap::new()),
            collectors: parking_lot::RwLock::new(HashMap::new()),
            collector_events: parking_lot::RwLock::new(HashMap::new()),
            inboxes: parking_lot::Mutex::new(HashMap::new()),
            audit: std::sync::OnceLock::new(),
            seen_identities: parking_lot::Mutex::new(std::collections::HashSet::new()),
            pending_control: parking_lot::Mutex::new(PendingControl::default()),
            refused_by_identity: parking_lot::Mutex::new(crate::stats::IdentityCounts::default()),
            config,
        }
    }

    /// Puts `policy` in force (`None`: no topic ACL).
    pub(crate) fn set_policy(&self, policy: Option<crate::acl::Policy>) {
        let policy = policy.unwrap_or_else(crate::acl::Policy::default_policy);
        *self.acl.write() = Some(Arc::new(policy));
        self.acl_generation.fetch_add(1, Ordering::Release);
    }

    /// See [`crate::Broker::reload_acl`].
    pub(crate) fn reload_acl(&self) -> Result<usize, crate::acl::PolicyError> {
        let Some(path) = &self.config.acl_file else {
            return Err(crate::acl::PolicyError(
                "the broker has no acl_file to read again".into(),
            ));
        };
        match crate::acl::Policy::load(path) {
            Ok(p) => {
                let rules = p.len();
                self.set_policy(Some(p));
                tracing::info!(file = %path.display(), rules, "reloaded the ACL policy");
                self.audit(|| {
                    serde_json::json!({"kind": "policy_reload", "file": path.display().to_string(), "ok": true, "rules": rules})
                });
                Ok(rules)
            }
            Err(e) => {
                tracing::error!(error = %e, "the ACL policy was not reloaded; the one in force stays");
                self.audit(|| {
                    serde_json::json!({"kind": "policy_reload", "file": path.display().to_string(), "ok": false, "error": e.to_string()})
                });
                Err(e)
            }
        }
    }

    /// Puts the audit trail in place (at start).
    pub(crate) fn set_audit(&self, audit: Option<crate::audit::AuditLog>) {
        if let Some(a) = audit {
            let _ = self.audit.set(a);
        }
    }

    /// Records an event in the audit trail, if there is one (`event` is only made then).
    pub(crate) fn audit(&self, event: impl FnOnce() -> serde_json::Value) {
        if let Some(a) = self.audit.get() {
            a.record(event());
        }
    }

    /// Records the first connection of `conn`'s identity.
    pub(crate) fn audit_connection(&self, conn: &Conn) {
        if self.audit.get().is_none() {
            return;
        }
        let key = identity_key(&conn.peer);
        let first = {
            let mut seen = self.seen_identities.lock();
            if seen.len() >= SEEN_IDENTITIES {
                !seen.contains(&key)
            } else {
                seen.insert(key)
            }
        };
        if first {
            self.audit(|| {
                serde_json::json!({"kind": "first_connection", "who": audit_identity(&conn.peer, &conn.name, conn.collector.lock().as_deref(), Some(conn.session_id))})
            });
        }
    }

    /// Records a refused connection.
    pub(crate) fn audit_refusal(&self, peer: &PeerInfo, why: &str) {
        self.audit(|| {
            serde_json::json!({"kind": "connection_refused", "who": audit_identity(peer, "", None, None), "reason": why})
        });
    }

    /// Records a publish on a control topic with a reply topic (a control request), and the
    /// answer to one recorded before.
    pub(crate) fn audit_publish(&self, conn: &Conn, msg: &Lent<'_, Message>) {
        if self.audit.get().is_none() {
            return;
        }
        let topic = msg.topic();
        if let Some(reply_to) = &msg.header().reply_to {
            if topic.as_str().starts_with("control.") {
                self.pending_control
                    .lock()
                    .insert(reply_to.clone(), topic.clone());
                self.audit(|| {
                    serde_json::json!({"kind": "control_request", "who": audit_identity(&conn.peer, &conn.name, conn.collector.lock().as_deref(), Some(conn.session_id)), "topic": topic.as_str(), "reply_to": reply_to.as_str(), "payload_bytes": msg.payload_len()})
                });
            }
        } else if topic.is_inbox() {
            let request = self.pending_control.lock().take(topic);
            if let Some(request) = request {
                self.audit(|| {
                    serde_json::json!({"kind": "control_reply", "who": audit_identity(&conn.peer, &conn.name, conn.collector.lock().as_deref(), Some(conn.session_id)), "request_topic": request.as_str(), "reply_to": topic.as_str(), "status": msg.header().status.as_ref().map_or_else(|| "ok".to_owned(), |s| format!("{:?}: {}", s.code, s.message))})
                });
            }
        }
    }

    /// What a connection of identity `id` may do under the policy in force, with the
    /// policy's generation.
    pub(crate) fn grants(&self, id: &crate::acl::Identity<'_>) -> (Arc<crate::acl::Grants>, u64) {
        // A collector's declared event topics complete its identity.
        let events = id
            .collector
            .and_then(|c| self.collector_events.read().get(c).cloned());
        let id = &crate::acl::Identity {
            collector_events: events.as_deref().unwrap_or(&[]),
            ..*id
        };
        let acl = self.acl.read();
        let generation = self.acl_generation.load(Ordering::Acquire);
        let grants = match acl.as_deref() {
            Some(p) => p.grants(id),
            None => crate::acl::Grants::everything(),
        };
        (Arc::new(grants), generation)
    }

    /// Whether `id` may use its client name under the policy in force.
    pub(crate) fn check_name(&self, id: &crate::acl::Identity<'_>) -> Result<(), ErrorFrame> {
        let acl = self.acl.read();
        let Some(p) = acl.as_deref() else {
            return Ok(());
        };
        p.check_name(id).map_err(|message| ErrorFrame {
            request_id: 0,
            code: ErrorCode::NotAuthorized,
            fatal: true,
            message,
        })
    }

    /// Binds collector `id` to the process `pid` the supervisor started (see
    /// [`crate::Broker::register_collector`]).
    pub(crate) fn register_collector(&self, id: &str, pid: i32, events: &[TopicFilter]) {
        let id: Arc<str> = Arc::from(id);
        {
            let mut c = self.collectors.write();
            c.retain(|_, have| **have != *id);
            c.insert(pid, Arc::clone(&id));
        }
        self.collector_events
            .write()
            .insert(Arc::clone(&id), Arc::from(events));
        // A collector may have connected before it was registered: its connections become
        // the collector; another process's connection under its name goes.
        for conn in self.router.read().connections().map(|(_, c)| c) {
            if conn.peer.transport != TransportKind::Unix {
                continue;
            }
            if conn.peer.pid == Some(pid) {
                *conn.collector.lock() = Some(Arc::clone(&id));
            } else if conn.name == *id {
                conn.impostor(format!(
                    "the client name {id:?} belongs to the collector the supervisor started (pid {pid})"
                ));
            }
        }
        // Their grants are resolved again.
        self.acl_generation.fetch_add(1, Ordering::Release);
    }

    /// Forgets the collector process `pid` (it ended).
    pub(crate) fn unregister_collector(&self, pid: i32) {
        if let Some(id) = self.collectors.write().remove(&pid) {
            self.collector_events.write().remove(&id);
        }
    }

    /// The supervised collector a peer is, by its pid.
    pub(crate) fn collector_of(&self, peer: &PeerInfo) -> Option<Arc<str>> {
        if peer.transport != TransportKind::Unix {
            return None;
        }
        self.collectors.read().get(&peer.pid?).cloned()
    }

    /// Whether `name` is a supervised collector's id that `peer` is not: only the process the
    /// supervisor started may connect under its collector's name.
    pub(crate) fn check_collector_name(
        &self,
        peer: &PeerInfo,
        name: &str,
    ) -> Result<(), ErrorFrame> {
        let c = self.collectors.read();
        let Some((pid, _)) = c.iter().find(|(_, id)| &***id == name) else {
            return Ok(());
        };
        if peer.transport == TransportKind::InProc || peer.pid == Some(*pid) {
            return Ok(());
        }
        Err(ErrorFrame {
            request_id: 0,
            code: ErrorCode::NotAuthorized,
            fatal: true,
            message: format!(
                "the client name {name:?} belongs to the collector the supervisor started (pid {pid}); connect under another name"
            ),
        })
    }

    /// Counts a connection of `peer`'s identity against `max_connections_per_identity`;
    /// the returned key is given back with [`Hub::release_identity`]. The broker's own
    /// in-process clients are not counted (`Ok(None)`).
    pub(crate) fn admit_identity(&self, peer: &PeerInfo) -> Result<Option<String>, ErrorFrame> {
        if peer.transport == TransportKind::InProc || self.collector_of(peer).is_some() {
            return Ok(None);
        }
        let key = identity_key(peer);
        let max = self.config.max_connections_per_identity;
        let mut held = self.identities.lock();
        let n = held.entry(key.clone()).or_insert(0);
        if *n >= max {
            drop(held);
            self.refused(&key);
            return Err(ErrorFrame {
                request_id: 0,
                code: ErrorCode::ConnectionLimit,
                fatal: true,
                message: format!(
                    "{key} already holds max_connections_per_identity ({max}) connections; close some or retry later"
                ),
            });
        }
        *n += 1;
        Ok(Some(key))
    }

    /// Gives back a connection counted by [`Hub::admit_identity`].
    pub(crate) fn release_identity(&self, key: &str) {
        let mut held = self.identities.lock();
        if let Some(n) = held.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                held.remove(key);
            }
        }
    }

    /// Counts a refused connection of identity `key`.
    pub(crate) fn refused(&self, key: &str) {
        self.refused_by_identity.lock().add(key);
    }

    /// Unix peers must present credentials whose uid is allowed; other transports are
    /// in-process or loopback-only.
    pub(crate) fn authorize(&self, peer: &PeerInfo) -> Result<(), ErrorFrame> {
        if peer.transport != TransportKind::Unix {
            return Ok(());
        }
        let refuse = |message: String| ErrorFrame {
            request_id: 0,
            code: ErrorCode::NotAuthorized,
            fatal: true,
            message,
        };
        match peer.uid {
            None => Err(refuse(
                "peer credentials could not be read; refusing the connection".into(),
            )),
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(()),
            Some(uid) => Err(refuse(format!(
                "uid {uid} is not allowed to connect (allowed: {:?}); add it to allowed_uids",
                self.allowed_uids
            ))),
        }
    }

    pub(crate) fn welcome(&self, session_id: u64) -> Welcome {
        Welcome {
            version: Version::CURRENT,
            session_id,
            capabilities: 0,
            max_message_size: u32::try_from(self.config.max_message_size).unwrap_or(u32::MAX),
            keepalive_ms: u32::try_from(self.config.keepalive_interval_ms).unwrap_or(u32::MAX),
            broker: concat!("daemoneye-eventbus ", env!("CARGO_PKG_VERSION")).into(),
        }
    }

    /// Registers a connection in the routing table.
    pub(crate) fn connect(&self, conn: &Arc<Conn>) {
        let slot = self.router.write().add(Arc::clone(conn));
        conn.slot.store(slot, Ordering::Relaxed);
    }

    /// Removes a connection and its subscriptions from the routing table, giving their
    /// memory back.
    /// Keeps reply inbox `token` to `conn`, the first connection to subscribe to it: another
    /// is refused while `conn` lives (a caller's replies are its own).
    fn claim_inbox(&self, conn: &Conn, token: &str) -> Result<(), SubscribeRefusal> {
        let mut inboxes = self.inboxes.lock();
        match inboxes.get(token) {
            Some(owner) if *owner != conn.session_id => Err(SubscribeRefusal::Inbox(format!(
                "_inbox.{token} is another connection's reply inbox"
            ))),
            Some(_) => Ok(()),
            None => {
                let mut held = conn.inboxes.lock();
                let max = self.config.max_subscriptions_per_connection;
                if held.len() >= max {
                    return Err(SubscribeRefusal::Limit(format!(
                        "this connection claimed {max} reply inboxes (max_subscriptions_per_connection)"
                    )));
                }
                inboxes.insert(token.to_owned(), conn.session_id);
                held.push(token.to_owned());
                Ok(())
            }
        }
    }

    pub(crate) fn disconnect(&self, conn: &Conn) {
        {
            let mut inboxes = self.inboxes.lock();
            for token in conn.inboxes.lock().drain(..) {
                inboxes.remove(&token);
            }
        }
        let filters = self.router.write().remove(conn.slot());
        let charge: usize = filters.iter().map(subscription_charge).sum();
        self.release_subscriptions(charge);
    }

    /// Subscribes, charging the subscription to the memory cap; `Ok(false)` when the
    /// connection held the filter already.
    pub(crate) fn subscribe(&self, conn: &Conn, s: &Subscribe) -> Result<bool, SubscribeRefusal> {
        if let Some(token) = crate::acl::inbox_token(&s.filter) {
            self.claim_inbox(conn, token)?;
        }
        let charge = subscription_charge(&s.filter);
        if !self.memory.try_reserve(charge) {
            return Err(SubscribeRefusal::Memory(format!(
                "the broker's memory cap ({} bytes, max_memory_bytes) is reached; retry later",
                self.memory.cap()
            )));
        }
        let elsewhere = conn.acked_filters();
        let outcome = self.router.write().subscribe_besides(
            conn.slot(),
            &s.filter,
            s.qos,
            s.group.as_ref(),
            elsewhere,
        );
        if outcome == Ok(true) {
            self.subscription_bytes.fetch_add(charge, Ordering::Relaxed);
        } else {
            self.memory.release(charge);
        }
        outcome
    }

    /// Unsubscribes; `false` when the connection did not hold the filter.
    pub(crate) fn unsubscribe(&self, slot: Slot, filter: &TopicFilter) -> bool {
        let removed = self.router.write().unsubscribe(slot, filter);
        if removed {
            self.release_subscriptions(subscription_charge(filter));
        }
        removed
    }

    fn release_subscriptions(&self, charge: usize) {
        self.subscription_bytes.fetch_sub(charge, Ordering::Relaxed);
        self.memory.release(charge);
    }

    /// Milliseconds since the broker started: the clock acknowledged deliveries are timed by.
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Opens (or, for an existing durable subscription, attaches) an acknowledged
    /// subscription on `conn`. `Ok(true)` when it resumed a durable subscription.
    pub(crate) fn subscribe_acked(
        &self,
        conn: &Arc<Conn>,
        s: &SubscribeAcked,
    ) -> Result<bool, (ErrorCode, String)> {
        for token in s.filters.iter().filter_map(crate::acl::inbox_token) {
            self.claim_inbox(conn, token).map_err(|e| match e {
                SubscribeRefusal::Inbox(why) => (ErrorCode::NotAuthorized, why),
                SubscribeRefusal::Conflict(why) => (ErrorCode::SubscriptionConflict, why),
                SubscribeRefusal::Limit(why) | SubscribeRefusal::Memory(why) => {
                    (ErrorCode::ResourceExhausted, why)
                }
            })?;
        }
        if conn.acked.lock().contains_key(&s.sub) {
            return Err((
                ErrorCode::SubscriptionConflict,
                format!(
                    "subscription id {} is already open on this connection",
                    s.sub
                ),
            ));
        }
        let c = &self.config;
        let window = match s.window {
            0 => c.ack_window,
            w => (w as usize).min(c.ack_window),
        };
        let attachment = || Attachment {
            outlet: Arc::downgrade(&conn.outlet),
            sub: s.sub,
            session_id: conn.session_id,
            client: conn.name.clone(),
            window,
        };
        // A new subscription is a new subscriber of each of its filters (a durable one
        // resumed already was one).
        let resuming = s
            .durable
            .as_ref()
            .is_some_and(|name| self.durables.lock().contains_key(name));
        if !resuming {
            self.router
                .read()
                .room_for_subscribers(&s.filters)
                .map_err(|why| (ErrorCode::ResourceExhausted, why))?;
        }
        let (sub, resumed) = match &s.durable {
            Some(name) => {
                let mut durables = self.durables.lock();
                match durables.get(name) {
                    Some(sub) => {
                        if !same_filters(&sub.filters, &s.filters) {
                            return Err((
                                ErrorCode::SubscriptionConflict,
                                format!(
                                    "durable subscription {name} has the filters {}; delete it \
                                     to use others",
                                    list(&sub.filters)
                                ),
                            ));
                        }
                        sub.attach(attachment())
                            .map_err(|m| (ErrorCode::DurableInUse, m))?;
                        (Arc::clone(sub), true)
                    }
                    None => {
                        if durables.len() >= c.max_durables {
                            return Err((
                                ErrorCode::ResourceExhausted,
                                format!(
                                    "the broker keeps {} durable subscriptions, its \
                                     max_durables; delete one first",
                                    durables.len()
                                ),
                            ));
                        }
                        let limits = AckedLimits {
                            msgs: c.durable_max_messages,
                            bytes: c.durable_max_bytes,
                            window,
                        };
                        let store = self.durable_store(name, &s.filters)?;
                        let sub =
                            self.create_acked(Some(name.clone()), &s.filters, limits, store)?;
                        durables.insert(name.clone(), Arc::clone(&sub));
                        (sub, false)
                    }
                }
            }
            None => {
                let held = self.router.read().filter_count_of(conn.slot()) + conn.acked_filters();
                if held + s.filters.len() > c.max_subscriptions_per_connection {
                    return Err((
                        ErrorCode::ResourceExhausted,
                        format!(
                            "this connection holds {held} subscriptions, the broker's \
                             max_subscriptions_per_connection is {}; unsubscribe some first",
                            c.max_subscriptions_per_connection
                        ),
                    ));
                }
                let limits = AckedLimits {
                    msgs: c.message_buffer_size,
                    bytes: c.subscriber_buffer_bytes,
                    window,
                };
                let store = KeptStore::default();
                (self.create_acked(None, &s.filters, limits, store)?, false)
            }
        };
        if !resumed && sub.attach(attachment()).is_err() {
            unreachable!("a new subscription is attached to nobody");
        }
        conn.acked.lock().insert(s.sub, Arc::clone(&sub));
        if !conn.outlet.attach(Arc::clone(&sub)) {
            // The connection is closing: leave it as if never attached.
            conn.acked.lock().remove(&s.sub);
            self.release_acked(&sub, conn.session_id, false);
            return Err((ErrorCode::ShuttingDown, "the connection is closing".into()));
        }
        Ok(resumed)
    }

    /// Makes an acknowledged subscription and puts it in the routing table, charging its
    /// filters to the memory cap.
    fn create_acked(
        &self,
        name: Option<DurableName>,
        filters: &[TopicFilter],
        limits: AckedLimits,
        store: KeptStore,
    ) -> Result<Arc<AckedSub>, (ErrorCode, String)> {
        let charge: usize = filters.iter().map(subscription_charge).sum();
        if !self.memory.try_reserve(charge) {
            return Err((
                ErrorCode::ResourceExhausted,
                format!(
                    "the broker's memory cap ({} bytes, max_memory_bytes) is reached; retry later",
                    self.memory.cap()
                ),
            ));
        }
        self.subscription_bytes.fetch_add(charge, Ordering::Relaxed);
        let policy = self.config.durable_full_policy;
        let mut made = None;
        self.router.write().add_acked(filters, |index| {
            let sub = Arc::new(AckedSub::new(
                index,
                name,
                filters.to_vec(),
                limits,
                policy,
                store,
                Arc::clone(&self.counters.drops),
            ));
            made = Some(Arc::clone(&sub));
            sub
        });
        Ok(made.expect("add_acked makes the subscription"))
    }

    /// Lets an acknowledged subscription go from connection `session_id`: a durable one is
    /// detached and kept (unless `delete`), any other is removed, what it kept counted as
    /// dropped.
    fn release_acked(&self, sub: &Arc<AckedSub>, session_id: u64, delete: bool) {
        self.release_acked_for(sub, session_id, delete, DropCause::Closed);
    }

    /// [`Hub::release_acked`], counting what it held as dropped for `cause`.
    fn release_acked_for(
        &self,
        sub: &Arc<AckedSub>,
        session_id: u64,
        delete: bool,
        cause: DropCause,
    ) {
        if sub.name.is_some() && !delete {
            sub.detach(session_id);
            return;
        }
        if let Some(name) = &sub.name {
            self.durables.lock().remove(name);
        }
        let removed = self
            .router
            .write()
            .remove_acked(sub.index, |a| Arc::ptr_eq(a, sub));
        if removed.is_some() {
            let charge: usize = sub.filters.iter().map(subscription_charge).sum();
            self.release_subscriptions(charge);
        }
        self.counters.drops.add(cause, sub.close(&self.memory));
        if let (Some(name), true) = (&sub.name, sub.on_disk)
            && let Some(dir) = self.durable_dir(name)
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a deleted durable subscription's files");
        }
    }

    /// Where durable subscription `name` keeps its files (with a data directory).
    fn durable_dir(&self, name: &DurableName) -> Option<std::path::PathBuf> {
        let dir = self.config.data_dir.as_ref()?;
        Some(dir.join("durable").join(name.as_str()))
    }

    /// The store of a new durable subscription: on disk with a data directory (its
    /// definition written first), in memory otherwise.
    fn durable_store(
        &self,
        name: &DurableName,
        filters: &[TopicFilter],
    ) -> Result<KeptStore, (ErrorCode, String)> {
        let Some(dir) = self.durable_dir(name) else {
            return Ok(KeptStore::default());
        };
        let fail = |e: String| {
            (
                ErrorCode::StoreFailed,
                format!("durable subscription {name} cannot be kept on disk: {e}"),
            )
        };
        // No durable subscription has this name: files left under it (a deletion whose
        // removal failed) are not this one's.
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        }
        crate::durable::write_meta(&dir, name, filters).map_err(|e| fail(e.to_string()))?;
        let opened = DiskStore::open(&dir.join("log"), self.config.store_segment_bytes)
            .map_err(|e| fail(e.to_string()))?;
        Ok(KeptStore::Disk(Box::new(opened.store)))
    }

    /// Reads back the durable subscriptions of the data directory (detached, with what they
    /// kept); a damaged one is set aside and reported, never a reason not to start.
    ///
    /// # Errors
    ///
    /// The data directory is unsafe, held by another broker, or was written by a newer build.
    pub(crate) fn restore_durables(&self) -> Result<(), daemoneye_eventbus_store::StoreError> {
        let Some(data) = &self.config.data_dir else {
            return Ok(());
        };
        let found = crate::durable::restore(data, self.config.store_segment_bytes)?;
        let c = &self.config;
        for r in found.damaged {
            Counters::add(&self.counters.store_damaged, 1);
            tracing::error!(what = %r, "set aside a damaged part of the data directory");
        }
        for d in found.durables {
            Counters::add(&self.counters.store_torn_bytes, d.recovery.torn_bytes);
            Counters::add(
                &self.counters.store_damaged,
                d.recovery.damaged.len() as u64,
            );
            for damaged in &d.recovery.damaged {
                tracing::error!(
                    durable = %d.name,
                    moved_to = %damaged.moved_to.display(),
                    lost_bytes = damaged.lost_bytes,
                    reason = damaged.reason,
                    "set aside a damaged log segment"
                );
            }
            let limits = AckedLimits {
                msgs: c.durable_max_messages,
                bytes: c.durable_max_bytes,
                window: c.ack_window,
            };
            let (kept, bytes) = d.store.kept();
            if !self.memory.try_reserve(bytes) {
                tracing::error!(durable = %d.name, bytes, "no room under max_memory_bytes for what a durable subscription kept; it starts empty");
                continue;
            }
            let store = KeptStore::Disk(Box::new(d.store));
            match self.create_acked(Some(d.name.clone()), &d.filters, limits, store) {
                Ok(sub) => {
                    tracing::info!(durable = %d.name, kept, torn_bytes = d.recovery.torn_bytes, undecodable = d.undecodable, "restored a durable subscription");
                    self.durables.lock().insert(d.name, sub);
                }
                Err((_, why)) => {
                    self.memory.release(bytes);
                    tracing::error!(durable = %d.name, %why, "could not restore a durable subscription");
                }
            }
        }
        Ok(())
    }

    /// Writes what the durable subscriptions on disk kept and had acknowledged; with `sync`,
    /// to the disk itself. Then keeps their logs within `store_max_bytes`.
    ///
    /// With `sync`, the waits for the disk are returned, to be run on a blocking thread (the
    /// broker's own thread never waits for the disk on this path).
    pub(crate) fn persist_durables(&self, sync: bool) -> Vec<daemoneye_eventbus_store::SyncJob> {
        let subs: Vec<_> = self.durables.lock().values().cloned().collect();
        let mut jobs = Vec::new();
        for sub in subs.iter().filter(|s| s.on_disk) {
            // A failure is counted; sessions holding an acknowledgement ask again.
            if !sync {
                let _failed = self.persist_one(sub, false);
                continue;
            }
            match sub.persist_for_sync() {
                Ok(job) => {
                    self.store_mended();
                    jobs.extend(job);
                }
                Err(e) => self.store_failed(sub, &e),
            }
        }
        self.keep_store_within_bounds(&subs);
        jobs
    }

    /// Counts a failed write or sync of a log, logging it at most every few seconds.
    pub(crate) fn store_failed(&self, sub: &AckedSub, e: &daemoneye_eventbus_store::StoreError) {
        Counters::add(&self.counters.store_errors, 1);
        let trouble = if e.is_full() {
            StoreTrouble::Full
        } else {
            StoreTrouble::Failing
        };
        self.store_trouble.store(trouble.to_u8(), Ordering::Relaxed);
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.store_error_logged_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 5_000)
            && self
                .store_error_logged_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(subscription = %sub.describe(), error = %e, "could not write a durable subscription's log; its publishers are not acknowledged until it is written");
        }
    }

    /// Notes that a log was written (or synced): the store takes publishes again.
    pub(crate) fn store_mended(&self) {
        if self.store_trouble.load(Ordering::Relaxed) != StoreTrouble::OK {
            self.store_trouble
                .store(StoreTrouble::OK, Ordering::Relaxed);
            tracing::info!("durable subscriptions' logs can be written again");
        }
    }

    /// Why Processed publishes for durable subscriptions on disk are refused now, if they are.
    pub(crate) fn store_trouble(&self) -> Option<StoreTrouble> {
        StoreTrouble::from_u8(self.store_trouble.load(Ordering::Relaxed))
    }

    /// While the logs take more than `store_max_bytes` together, gives back the oldest
    /// segment of the largest (its messages dropped, counted, reported to its subscriber).
    fn keep_store_within_bounds(&self, subs: &[Arc<AckedSub>]) {
        let max = self.config.store_max_bytes;
        loop {
            let sizes: Vec<(u64, &Arc<AckedSub>)> = subs
                .iter()
                .filter(|s| s.on_disk)
                .map(|s| (s.disk_bytes(), s))
                .collect();
            let total: u64 = sizes.iter().map(|(b, _)| b).sum();
            let Some((_, largest)) = sizes.iter().max_by_key(|(b, _)| *b) else {
                return;
            };
            if total <= max {
                return;
            }
            match largest.give_back_segment(&self.memory) {
                // Counted by the subscription (a full backlog).
                Ok((freed, dropped)) if freed > 0 => {
                    tracing::warn!(subscription = %largest.describe(), dropped, freed, "the data directory reached store_max_bytes: dropped the oldest segment of the largest durable subscription");
                }
                Ok(_) => return,
                Err(e) => {
                    Counters::add(&self.counters.store_errors, 1);
                    tracing::error!(subscription = %largest.describe(), error = %e, "could not give back a log segment");
                    return;
                }
            }
        }
    }

    /// Writes what `subs` kept before their publishers are acknowledged: to the operating
    /// system, and under `fsync = always` to the disk. Returns whether all of it was written;
    /// the subscriptions whose logs could not be written stay in `subs`, to be asked again.
    pub(crate) fn persist(&self, subs: &mut Vec<Arc<AckedSub>>) -> bool {
        let sync = self.config.fsync == crate::config::FsyncPolicy::Always;
        // Kept: those that failed.
        subs.retain(|sub| self.persist_one(sub, sync));
        subs.is_empty()
    }

    /// Under `fsync = always`, writes what `subs` kept to the operating system and returns
    /// what to wait for before their publishers are acknowledged: each log's group sync
    /// ([`SyncPoint`]), started here when none runs (on a blocking thread). `None`, `subs`
    /// kept whole to be asked again, when a log could not be written.
    pub(crate) fn write_for_sync(
        self: &Arc<Self>,
        subs: &mut Vec<Arc<AckedSub>>,
    ) -> Option<Vec<(tokio::sync::watch::Receiver<GroupCommit>, SyncWait)>> {
        let mut waits = Vec::with_capacity(subs.len());
        let mut failed = false;
        for sub in subs.iter() {
            let target = match sub.write_for_sync() {
                Ok(Some(target)) => target,
                Ok(None) => continue,
                Err(e) => {
                    self.store_failed(sub, &e);
                    failed = true;
                    continue;
                }
            };
            self.store_mended();
            let (want, rx) = sub.sync.want(target);
            match want {
                Want::Done => {}
                Want::Follow(w) => waits.push((rx, w)),
                Want::Lead(w) => {
                    waits.push((rx, w));
                    let (hub, sub) = (Arc::clone(self), Arc::clone(sub));
                    drop(tokio::task::spawn_blocking(move || hub.sync_group(&sub)));
                }
            }
        }
        if failed {
            return None;
        }
        subs.clear();
        Some(waits)
    }

    /// Syncs `sub`'s log for every session waiting on it, until none waits for more (group
    /// commit). Blocks: runs on a blocking thread.
    fn sync_group(&self, sub: &AckedSub) {
        sub.sync.run(|| {
            let synced = match sub.sync_job() {
                Ok(Some((job, through))) => job.run().map(|()| through),
                Ok(None) => return Some(u64::MAX),
                Err(e) => Err(e),
            };
            match synced {
                Ok(through) => {
                    Counters::add(&self.counters.store_syncs, 1);
                    Some(through)
                }
                Err(e) => {
                    self.store_failed(sub, &e);
                    None
                }
            }
        });
    }

    /// Writes one subscription's log; returns whether that failed (counted; logged at most
    /// every few seconds, since a full disk fails every attempt).
    fn persist_one(&self, sub: &AckedSub, sync: bool) -> bool {
        let Err(e) = sub.persist(sync) else {
            self.store_mended();
            return false;
        };
        self.store_failed(sub, &e);
        true
    }

    /// Acknowledges deliveries of one of `conn`'s subscriptions (an unknown id is one closed
    /// meanwhile: nothing to do).
    pub(crate) fn ack(&self, conn: &Conn, sub: SubId, ranges: &[(u64, u64)]) {
        let Some(s) = conn.acked.lock().get(&sub).cloned() else {
            return;
        };
        if let Some(outlet) = s.ack(ranges, &self.memory) {
            outlet.wake();
        }
        // On disk at once (to the operating system; to the disk itself with the next sync):
        // a message its subscriber acknowledged does not come back after the broker is killed.
        if s.on_disk {
            // A failure is counted; the removals are written with the next write.
            let _failed = self.persist_one(&s, false);
        }
    }

    /// Closes (or for a durable subscription, detaches; with `delete`, deletes) one of
    /// `conn`'s acknowledged subscriptions.
    pub(crate) fn close_acked(
        &self,
        conn: &Conn,
        sub: SubId,
        delete: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(s) = conn.acked.lock().remove(&sub) else {
            return Err((
                ErrorCode::UnknownSubscription,
                format!("no subscription {sub} is open on this connection"),
            ));
        };
        conn.outlet.detach(&s);
        self.release_acked(&s, conn.session_id, delete);
        Ok(())
    }

    /// Deletes a durable subscription no connection holds.
    pub(crate) fn delete_durable(&self, name: &DurableName) -> Result<(), (ErrorCode, String)> {
        let Some(sub) = self.durables.lock().get(name).cloned() else {
            return Err((
                ErrorCode::UnknownSubscription,
                format!("no durable subscription {name}"),
            ));
        };
        if sub.is_attached() {
            return Err((
                ErrorCode::DurableInUse,
                format!(
                    "{} is attached; close it there, or delete it from there",
                    sub.describe()
                ),
            ));
        }
        self.release_acked(&sub, u64::MAX, true);
        Ok(())
    }

    /// Lets go of every acknowledged subscription of a connection that is ending.
    pub(crate) fn release_all(&self, conn: &Conn) {
        let subs: Vec<_> = conn.acked.lock().drain().map(|(_, s)| s).collect();
        for s in subs {
            conn.outlet.detach(&s);
            self.release_acked(&s, conn.session_id, false);
        }
    }

    /// Sends again what `conn`'s acknowledged subscriptions have had in flight for
    /// `ack_timeout_ms`.
    pub(crate) fn expire(&self, conn: &Conn) {
        let now = self.now_ms();
        for sub in conn.outlet.attached() {
            if let Some(outlet) = sub.expire(now, self.config.ack_timeout_ms) {
                outlet.wake();
            }
        }
    }

    /// An acknowledged subscription held a publisher back for `processed_stall_timeout_ms`: a
    /// durable one stalls (its publishers go on, its backlog keeps the newest), any other is
    /// closed and its subscriber told (SUB_END).
    pub(crate) fn stall(&self, sub: &Arc<AckedSub>) {
        Counters::add(&self.counters.stalled, 1);
        let timeout = self.config.processed_stall_timeout_ms;
        if sub.name.is_some() {
            tracing::warn!(subscription = %sub.describe(), timeout_ms = timeout, "stalled; its publishers go on");
            sub.stall();
            return;
        }
        let message = format!(
            "{} made no room for {timeout} ms (processed_stall_timeout_ms) and was closed so \
             its publishers could go on; what it had not acknowledged was dropped",
            sub.describe()
        );
        tracing::warn!(%message, "closing a stalled subscription");
        if let Some((outlet, id, session_id)) = sub.attached_at() {
            // Out of its connection's table too: it no longer counts there, and its id is free.
            let router = self.router.read();
            if let Some((_, conn)) = router
                .connections()
                .find(|(_, c)| c.session_id == session_id)
            {
                let mut acked = conn.acked.lock();
                if acked.get(&id).is_some_and(|a| Arc::ptr_eq(a, sub)) {
                    acked.remove(&id);
                }
            }
            drop(router);
            outlet.detach(sub);
            outlet.push_frame(Frame::SubEnd(SubEnd {
                sub: id,
                code: ErrorCode::Stalled,
                message,
            }));
        }
        // Its subscriber did not keep up: what it held is a slow reader's loss.
        self.release_acked_for(sub, u64::MAX, true, DropCause::SlowReader);
    }

    /// Routes a message or run: applies the router's plan to the matching connections'
    /// queues. A Processed queue without room (under [`Waiting::Allowed`]) lands in
    /// `scratch.blocked` for the publisher to wait on. Returns `None`, queueing nothing, for a
    /// run whose topic a queue group subscribes to: each message must then go to one member
    /// in turn, so the caller routes the run's messages one by one. Allocates nothing.
    pub(crate) fn route(
        &self,
        item: Item<'_>,
        scratch: &mut RouteScratch,
        waiting: Waiting,
    ) -> Option<Routed> {
        let router = self.router.read();
        let RouteScratch { plans, effects } = scratch;
        let plan = router.plan(item.topic(), plans);
        let mut routed = Routed::default();
        if let Some(trouble) = self.store_trouble()
            && item.qos() == Qos::Processed
            && plan
                .acked
                .iter()
                .any(|index| router.acked(*index).is_some_and(|s| s.on_disk))
        {
            // Refused whole, delivered to nobody: the publisher hears why at once.
            routed.refused = Some(trouble);
            return Some(routed);
        }
        match item {
            Item::Run(run)
                if !plan.members.is_empty()
                    || plan.acked.iter().any(|index| {
                        router
                            .acked(*index)
                            .is_some_and(|s| !s.takes_whole(run.len(), run.accounted_size()))
                    }) =>
            {
                return None;
            }
            Item::Msg(msg) => {
                for members in plan.groups() {
                    self.route_group(&router, members, msg, effects, waiting, &mut routed);
                }
            }
            Item::Run(_) => {}
        }
        if !plan.acked.is_empty() {
            // One copy, kept by every acknowledged subscription.
            let kept = item.kept();
            for index in &plan.acked {
                let Some(sub) = router.acked(*index) else {
                    continue;
                };
                routed.matched += 1;
                let pushed = sub.push(kept.clone(), &self.memory, waiting == Waiting::Allowed);
                account_sub(pushed, item.count() as u64, sub, effects, &mut routed);
            }
        }
        for target in &plan.plain {
            routed.matched += 1;
            let Some(conn) = router.conn(target.slot) else {
                continue;
            };
            let pushed = match (target.class, waiting) {
                (Class::Processed, Waiting::Allowed) => {
                    conn.outlet.push_processed(item, &self.memory, None)
                }
                _ => conn.outlet.push_realtime(item, &self.memory, None),
            };
            account(
                pushed,
                item.count() as u64,
                conn,
                None,
                effects,
                &mut routed,
            );
        }
        Some(routed)
    }

    /// Gives `msg` to one member of a group (`members`: the group's matching members).
    fn route_group(
        &self,
        router: &Table,
        members: &[Member],
        msg: &Lent<'_, Message>,
        effects: &mut Effects,
        waiting: Waiting,
        routed: &mut Routed,
    ) {
        let Some(name) = router.group_name(members[0].group) else {
            return;
        };
        let Some((conn, class)) = self.pick(router, members, msg.accounted_size(), waiting) else {
            return;
        };
        routed.matched += 1;
        let item = Item::Msg(msg);
        let pushed = match class {
            Class::Processed => conn.outlet.push_processed(item, &self.memory, Some(name)),
            Class::Realtime => conn.outlet.push_realtime(item, &self.memory, Some(name)),
        };
        account(pushed, 1, conn, Some(name), effects, routed);
    }

    /// Chooses the member of one group that gets a message of `size` bytes: round robin,
    /// skipping members that are closing and, when another has room, members whose queue is
    /// full (so a stalled instance does not hold requests others could answer).
    fn pick<'r>(
        &self,
        router: &'r Table,
        members: &[Member],
        size: usize,
        waiting: Waiting,
    ) -> Option<(&'r Arc<Conn>, Class)> {
        let n = members.len();
        let start = router.turn(members[0].group, n);
        let mut fallback = None;
        for i in 0..n {
            let m = members[(start + i) % n];
            let Some(conn) = router.conn(m.slot) else {
                continue;
            };
            if conn.cancel.is_cancelled() || conn.outlet.is_closed() {
                continue;
            }
            let class = match waiting {
                Waiting::Allowed => m.class,
                Waiting::Never => Class::Realtime,
            };
            if conn
                .outlet
                .has_room(class == Class::Processed, size, &self.memory)
            {
                return Some((conn, class));
            }
            fallback.get_or_insert((conn, class));
        }
        fallback
    }

    /// Whether `conn` still holds a subscription in `group` matching `topic`.
    pub(crate) fn holds_group(&self, conn: &Arc<Conn>, group: &QueueGroup, topic: &Topic) -> bool {
        let router = self.router.read();
        let slot = conn.slot();
        // Slots are reused: the entry must be this very connection.
        router.conn(slot).is_some_and(|c| Arc::ptr_eq(c, conn))
            && router.holds_group(slot, group, topic)
    }

    /// Gives queue group deliveries of a departed member to other members of their group;
    /// what no member can take is counted as dropped.
    pub(crate) fn reoffer(&self, deliveries: Vec<(Message, QueueGroup)>) {
        if deliveries.is_empty() {
            return;
        }
        let mut effects = Effects::default();
        let mut members = Vec::new();
        let (mut taken, mut lost) = (0, 0);
        let mut routed = Routed::default();
        {
            let router = self.router.read();
            for (msg, group) in &deliveries {
                router.members_of(group, msg.topic(), &mut members);
                let picked = (!members.is_empty())
                    .then(|| self.pick(&router, &members, msg.accounted_size(), Waiting::Never))
                    .flatten();
                let Some((conn, _)) = picked else {
                    lost += 1;
                    continue;
                };
                let lent = Lent::owned(msg.clone());
                let pushed = conn
                    .outlet
                    .push_realtime(Item::Msg(&lent), &self.memory, Some(group));
                if matches!(pushed, Pushed::Queued { .. }) {
                    taken += 1;
                }
                // A miss there is counted by that member's queue, or as closed.
                account(pushed, 1, conn, Some(group), &mut effects, &mut routed);
            }
        }
        effects.blocked.clear();
        effects.wake_writers();
        Counters::add(&self.counters.reoffered, taken);
        // No member left to take them.
        self.counters
            .drops
            .add(DropCause::Closed, lost + routed.closed);
    }

    /// The header of a message the broker itself sends.
    fn sys_header(&self) -> Header {
        Header {
            id: MessageId {
                publisher: 0,
                sequence: self.sys_seq.fetch_add(1, Ordering::Relaxed) + 1,
            },
            timestamp_ns: now_ns(),
            source: ByteStr::from_static("broker"),
            ..Header::default()
        }
    }

    fn sys_message(&self, topic: Topic, payload: Bytes) -> Message {
        Message::new(topic, self.sys_header(), payload)
    }

    /// Answers a request nobody subscribes to: a reply with status `NoResponders` goes to its
    /// reply-to topic at once, so the caller fails fast instead of waiting for its deadline.
    pub(crate) fn no_responders(&self, request: &Lent<'_, Message>) {
        let Some(reply_to) = request.header().reply_to.clone() else {
            return;
        };
        Counters::add(&self.counters.no_responders, 1);
        let header = Header {
            correlation: request.header().correlation.as_ref().map(|c| {
                let id = format!("{}.no-responders", c.correlation_id);
                Box::new(c.child(id, now_ns()))
            }),
            status: Some(Box::new(ReplyStatus {
                code: StatusCode::NoResponders,
                message: format!("no responders for {}", request.topic()),
            })),
            ..self.sys_header()
        };
        self.route_own(Message::new(reply_to, header, Bytes::new()));
    }

    /// Answers a request on `control.broker.admin`, the broker's own service (the ACL let it
    /// through): `acl reload` reads `acl_file` again. Anything else is an invalid operation.
    pub(crate) fn admin(&self, request: &Lent<'_, Message>) {
        let Some(reply_to) = request.header().reply_to.clone() else {
            return;
        };
        let kept = request.keep();
        let asked = std::str::from_utf8(kept.payload()).unwrap_or("").trim();
        let (payload, status) = match asked {
            "acl reload" => match self.reload_acl() {
                Ok(rules) => (format!("ACL policy reloaded: {rules} rules"), None),
                Err(e) => (
                    String::new(),
                    Some(ReplyStatus {
                        code: StatusCode::ExecutionError,
                        message: format!("ACL policy not reloaded, the one in force stays: {e}"),
                    }),
                ),
            },
            other => (
                String::new(),
                Some(ReplyStatus {
                    code: StatusCode::InvalidOperation,
                    message: format!(
                        "{other:?} is not an operation of control.broker.admin (known: \"acl reload\")"
                    ),
                }),
            ),
        };
        let header = Header {
            correlation: request.header().correlation.as_ref().map(|c| {
                let id = format!("{}.admin", c.correlation_id);
                Box::new(c.child(id, now_ns()))
            }),
            status: status.map(Box::new),
            ..self.sys_header()
        };
        self.route_own(Message::new(reply_to, header, Bytes::from(payload)));
    }

    /// Publishes a broker message on a `$sys` topic to every matching subscriber.
    pub(crate) fn publish_sys(&self, topic: Topic, payload: Bytes) {
        self.route_own(self.sys_message(topic, payload));
    }

    /// Routes a message the broker made itself. It never waits: each connection's
    /// slow-reader policy applies, so a miss is counted per connection and topic and noticed
    /// in-band.
    fn route_own(&self, msg: Message) {
        let mut scratch = RouteScratch::default();
        let msg = Lent::owned(msg);
        let routed = self.route(Item::Msg(&msg), &mut scratch, Waiting::Never);
        scratch.wake_writers();
        self.counters
            .drops
            .add(DropCause::Closed, routed.map_or(0, |r| r.closed));
    }

    /// Announces a connect or disconnect on `$sys.broker.clients.*`.
    pub(crate) fn announce(&self, conn: &Conn, connected: bool) {
        let topic = if connected {
            catalog::sys::client_connected()
        } else {
            catalog::sys::client_disconnected()
        };
        let body = serde_json::json!({
            "session_id": conn.session_id,
            "name": conn.name,
            "peer": conn.peer.to_string(),
            "pid": conn.peer.pid,
            "uid": conn.peer.uid,
            "gid": conn.peer.gid,
            "exe": conn.peer.exe.as_ref().map(|e| e.display().to_string()),
            "collector": conn.collector.lock().as_deref(),
            "tls_subject": conn.peer.tls_subject.as_deref(),
        });
        self.publish_sys(topic, Bytes::from(body.to_string()));
    }

    /// Sends a fresh statistics snapshot to one connection (on subscribe).
    pub(crate) fn send_stats_to(&self, conn: &Arc<Conn>) {
        let msg = Lent::owned(self.sys_message(catalog::sys::stats(), self.stats_json()));
        let pushed = conn
            .outlet
            .push_realtime(Item::Msg(&msg), &self.memory, None);
        let mut effects = Effects::default();
        let mut routed = Routed::default();
        account(pushed, 1, conn, None, &mut effects, &mut routed);
        effects.wake_writers();
        self.counters.drops.add(DropCause::Closed, routed.closed);
    }

    pub(crate) fn stats_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.stats()).unwrap_or_default())
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let c = &self.counters;
        let router = self.router.read();
        let connections = router
            .connections()
            .map(|(slot, conn)| {
                let ob = conn.outlet.stats();
                ConnectionStats {
                    session_id: conn.session_id,
                    name: conn.name.clone(),
                    peer: conn.peer.to_string(),
                    uid: conn.peer.uid,
                    gid: conn.peer.gid,
                    pid: conn.peer.pid,
                    exe: conn.peer.exe.as_ref().map(|e| e.display().to_string()),
                    denied: load(&conn.counters.denied),
                    collector: conn.collector.lock().as_deref().map(str::to_owned),
                    tls_subject: conn.peer.tls_subject.clone(),
                    subscriptions: (router.filter_count_of(slot) + conn.acked_filters()) as u64,
                    published: load(&conn.counters.published),
                    delivered: load(&conn.counters.delivered),
                    dropped: ob.dropped,
                    queued_messages: ob.queued_msgs as u64,
                    queued_bytes: ob.queued_bytes as u64,
                    dropped_by_topic: ob
                        .dropped_by_topic
                        .into_iter()
                        .map(|(t, n)| (t.to_string(), n))
                        .collect(),
                }
            })
            .collect::<Vec<_>>();
        let subscriptions = router
            .acked_subs()
            .map(|sub| {
                let st = sub.stats();
                SubscriptionStats {
                    durable: sub.name.as_ref().map(ToString::to_string),
                    filters: sub.filters.iter().map(ToString::to_string).collect(),
                    session_id: st.attached.as_ref().map(|(id, _)| *id),
                    client: st.attached.map(|(_, name)| name),
                    pending: st.pending,
                    unacked: st.unacked,
                    kept_bytes: st.kept_bytes,
                    delivered: st.delivered,
                    redelivered: st.redelivered,
                    acked: st.acked,
                    dropped: st.dropped,
                    stalled: st.stalled,
                    disk_bytes: if sub.on_disk { sub.disk_bytes() } else { 0 },
                }
            })
            .collect::<Vec<SubscriptionStats>>();
        let subscription_bytes = self.subscription_bytes.load(Ordering::Relaxed);
        let drops = c.drops.get();
        let store_bytes = subscriptions.iter().map(|s| s.disk_bytes).sum();
        BrokerStats {
            store_bytes,
            uptime_secs: self.started.elapsed().as_secs(),
            published: load(&c.published),
            delivered: load(&c.delivered),
            dropped: drops.iter().map(|(_, n)| n).sum(),
            dropped_by_cause: drops
                .iter()
                .map(|(cause, n)| (cause.as_str().to_owned(), *n))
                .collect(),
            bytes_in: load(&c.bytes_in),
            bytes_out: load(&c.bytes_out),
            active_connections: connections.len() as u64,
            total_connections: load(&c.connections_total),
            refused_connections: load(&c.connections_refused),
            protocol_errors: load(&c.protocol_errors),
            rejected_publishes: load(&c.rejected_publishes),
            no_responders: load(&c.no_responders),
            reoffered: load(&c.reoffered),
            runs: load(&c.runs),
            active_subscriptions: router.subscription_count() as u64,
            active_topics: router.topic_count() as u64,
            queued_bytes: self.memory.used().saturating_sub(subscription_bytes) as u64,
            subscription_bytes: subscription_bytes as u64,
            memory_cap_bytes: self.memory.cap() as u64,
            stalled: load(&c.stalled),
            store_errors: load(&c.store_errors),
            store_torn_bytes: load(&c.store_torn_bytes),
            store_syncs: load(&c.store_syncs),
            acl_denials: load(&c.acl_denials),
            tls_refused: load(&c.tls_refused),
            audit_records: self.audit.get().map_or(0, |a| load(&a.counts.records)),
            audit_dropped: self.audit.get().map_or(0, |a| load(&a.counts.dropped)),
            audit_errors: self.audit.get().map_or(0, |a| load(&a.counts.errors)),
            audit_head: self.audit.get().map(|a| a.counts.head.lock().clone()),
            acl_rules: self.acl.read().as_ref().map(|p| p.len() as u64),
            refused_by_identity: self.refused_by_identity.lock().snapshot(),
            store_damaged: load(&c.store_damaged),
            connections,
            subscriptions,
        }
    }
}

/// Books the outcome of one push of `n` messages to `conn`.
fn account(
    pushed: Pushed,
    n: u64,
    conn: &Arc<Conn>,
    group: Option<&QueueGroup>,
    effects: &mut Effects,
    routed: &mut Routed,
) {
    match pushed {
        // Evictions and drops are counted by the queue (with their cause).
        Pushed::Queued { wake, .. } => {
            if wake {
                effects.wake.push(Arc::clone(&conn.outlet));
            }
        }
        Pushed::Dropped => {}
        Pushed::Overflow => conn.overflowed(),
        Pushed::Full => effects
            .blocked
            .push(Blocked::Conn(Arc::clone(conn), group.cloned())),
        // Closed since it was planned (not possible while routing holds the read lock on one
        // thread); counted rather than lost silently.
        Pushed::Closed => routed.closed += n,
    }
}

/// Books the outcome of one push to an acknowledged subscription.
/// Counts what offering `n` messages to an acknowledged subscription did.
fn account_sub(
    pushed: SubPushed,
    n: u64,
    sub: &Arc<AckedSub>,
    effects: &mut Effects,
    routed: &mut Routed,
) {
    match pushed {
        // Drops are counted by the subscription (with their cause).
        SubPushed::Kept { wake, .. } => {
            effects.wake.extend(wake);
            if sub.on_disk && !effects.persist.iter().any(|s| Arc::ptr_eq(s, sub)) {
                effects.persist.push(Arc::clone(sub));
            }
        }
        SubPushed::Full => effects.blocked.push(Blocked::Sub(Arc::clone(sub))),
        SubPushed::Dropped => {}
        SubPushed::Closed => routed.closed += n,
    }
}

/// Whether two filter lists hold the same filters, in any order.
fn same_filters(a: &[TopicFilter], b: &[TopicFilter]) -> bool {
    let mut a: Vec<_> = a.iter().map(TopicFilter::as_str).collect();
    let mut b: Vec<_> = b.iter().map(TopicFilter::as_str).collect();
    a.sort_unstable();
    a.dedup();
    b.sort_unstable();
    b.dedup();
    a == b
}

fn list(filters: &[TopicFilter]) -> String {
    let names: Vec<_> = filters.iter().map(TopicFilter::as_str).collect();
    format!("[{}]", names.join(", "))
}

/// The identity `max_connections_per_identity` counts: a Unix peer's uid and executable, a
/// TCP peer's address, a named pipe client's executable.
pub(crate) fn identity_key(peer: &PeerInfo) -> String {
    match (peer.transport, peer.uid, &peer.exe, peer.addr) {
        (TransportKind::Tls, ..) => match &peer.tls_subject {
            Some(subject) => format!("tls {subject}"),
            None => format!(
                "tls {}",
                peer.addr.map(|a| a.ip().to_string()).unwrap_or_default()
            ),
        },
        (_, _, _, Some(addr)) => format!("tcp {}", addr.ip()),
        (TransportKind::NamedPipe, None, Some(exe), _) => format!("pipe {}", exe.display()),
        (_, Some(uid), Some(exe), _) => format!("uid {uid} {}", exe.display()),
        (_, Some(uid), None, _) => format!("uid {uid}"),
        (kind, ..) => format!("{kind:?} peer"),
    }
}

/// TLS handshakes in progress at once; a connection beyond is closed at once, counted in
/// `tls_refused`.
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 64;

/// Identities whose first connection the audit trail remembers.
const SEEN_IDENTITIES: usize = 4096;

/// Control requests whose answer the audit trail waits for at most.
const PENDING_CONTROL: usize = 1024;

/// Who, as the audit trail records it.
pub(crate) fn audit_identity(
    peer: &PeerInfo,
    name: &str,
    collector: Option<&str>,
    session: Option<u64>,
) -> serde_json::Value {
    serde_json::json!({
        "transport": format!("{:?}", peer.transport),
        "uid": peer.uid,
        "gid": peer.gid,
        "pid": peer.pid,
        "exe": peer.exe.as_ref().map(|e| e.display().to_string()),
        "addr": peer.addr.map(|a| a.to_string()),
        "tls_subject": peer.tls_subject.as_deref(),
        "name": name,
        "collector": collector,
        "session": session,
    })
}

/// Control requests waiting for their answer (`Hub::audit_publish`): request topic by reply
/// topic, at most [`PENDING_CONTROL`], the oldest forgotten first. An answer is found without
/// a scan (every RPC answer is looked up while the trail is on).
#[derive(Default)]
pub(crate) struct PendingControl {
    by_reply: HashMap<Topic, Topic>,
    order: std::collections::VecDeque<Topic>,
}

impl PendingControl {
    fn insert(&mut self, reply_to: Topic, request: Topic) {
        if self.by_reply.len() >= PENDING_CONTROL {
            // Forget the oldest still waiting (answered ones are skipped).
            while let Some(old) = self.order.pop_front() {
                if self.by_reply.remove(&old).is_some() {
                    break;
                }
            }
        }
        if self.by_reply.insert(reply_to.clone(), request).is_none() {
            self.order.push_back(reply_to);
        }
        // Answered entries leave `order` lazily: keep it within twice the bound.
        if self.order.len() > 2 * PENDING_CONTROL {
            let by_reply = &self.by_reply;
            self.order.retain(|t| by_reply.contains_key(t));
        }
    }

    fn take(&mut self, reply_to: &Topic) -> Option<Topic> {
        self.by_reply.remove(reply_to)
    }
}

#[cfg(test)]
mod pending_control_tests {
    use super::*;

    fn t(s: String) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn answers_are_found_and_the_oldest_unanswered_go_past_the_bound() {
        let mut p = PendingControl::default();
        for i in 0..PENDING_CONTROL + 10 {
            p.insert(t(format!("_inbox.a.{i}")), t(format!("control.x.{i}")));
        }
        assert_eq!(p.by_reply.len(), PENDING_CONTROL);
        assert_eq!(p.take(&t("_inbox.a.9".into())), None, "the oldest went");
        let last = PENDING_CONTROL + 9;
        assert_eq!(
            p.take(&t(format!("_inbox.a.{last}"))),
            Some(t(format!("control.x.{last}")))
        );
        // Calls answered as they come leave nothing behind.
        for i in 0..10 * PENDING_CONTROL {
            p.insert(t(format!("_inbox.b.{i}")), t("control.y".into()));
            assert!(p.take(&t(format!("_inbox.b.{i}"))).is_some());
        }
        assert!(p.order.len() <= 2 * PENDING_CONTROL);
        assert_eq!(p.by_reply.len(), PENDING_CONTROL - 1);
    }
}
