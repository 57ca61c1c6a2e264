//! The broker: listeners, sessions, statistics and the one shutdown path.

use crate::config::{BrokerConfig, ConfigError};
use crate::outbox::{Admission, Memory, Pushed};
use crate::router::{RouteScratch, Router, Waiting};
use crate::session::{self, ConnShared};
use crate::stats::{BrokerStats, ConnectionStats, Counters, load};
use bytes::Bytes;
use daemoneye_eventbus_core::codec::{ErrorCode, ErrorFrame};
use daemoneye_eventbus_core::{
    ByteStr, Header, Message, MessageId, QueueGroup, ReplyStatus, StatusCode, Topic, catalog,
};
use daemoneye_eventbus_transport::{Endpoint, Listener, PeerInfo, TransportError, TransportKind};
use parking_lot::RwLock;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Errors starting a broker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// An endpoint could not be bound.
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: Endpoint,
        /// Why.
        #[source]
        source: TransportError,
    },
}

/// State shared by the accept loops, sessions and the handle. Each field has one owner of
/// its mutations: the router lock, the atomics, or the tokens.
pub(crate) struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) router: RwLock<Router>,
    pub(crate) counters: Counters,
    pub(crate) memory: Memory,
    pub(crate) next_session: AtomicU64,
    pub(crate) tracker: TaskTracker,
    /// Stops the accept loops.
    stop_accepting: CancellationToken,
    /// Tells sessions to stop reading and drain.
    pub(crate) drain: CancellationToken,
    /// Tears every connection down at once (after the drain deadline).
    pub(crate) kill: CancellationToken,
    limit: Arc<Semaphore>,
    allowed_uids: Vec<u32>,
    /// Open sessions (id → name), listed in the shutdown report when they overrun.
    pub(crate) sessions: parking_lot::Mutex<std::collections::BTreeMap<u64, String>>,
    started: Instant,
    sys_seq: AtomicU64,
}

#[cfg(unix)]
fn own_uid() -> Option<u32> {
    Some(nix::unistd::geteuid().as_raw())
}

#[cfg(not(unix))]
fn own_uid() -> Option<u32> {
    None
}

/// Nanoseconds since the Unix epoch, now.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Shared {
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
    pub(crate) fn no_responders(&self, request: &Message) {
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
        self.route_own(&Message::new(reply_to, header, Bytes::new()));
    }

    /// Gives queue group deliveries of a departed member to other members of their group;
    /// what no member can take is counted as dropped.
    pub(crate) fn reoffer(&self, deliveries: Vec<(Message, QueueGroup)>) {
        if deliveries.is_empty() {
            return;
        }
        let mut scratch = RouteScratch::default();
        let mut taken = 0;
        let lost = {
            let router = self.router.read();
            deliveries
                .iter()
                .filter(|(msg, group)| {
                    let ok = router.reoffer(msg, group, &mut scratch, &self.memory);
                    taken += u64::from(ok);
                    !ok
                })
                .count() as u64
        };
        scratch.wake_writers();
        Counters::add(&self.counters.reoffered, taken);
        Counters::add(&self.counters.dropped, lost);
    }

    /// Publishes a broker message on a `$sys` topic to every matching subscriber.
    fn publish_sys(&self, topic: Topic, payload: Bytes) {
        self.route_own(&self.sys_message(topic, payload));
    }

    /// Routes a message the broker made itself. It never waits: each connection's
    /// slow-reader policy applies, so a miss is counted per connection and topic and noticed
    /// in-band.
    fn route_own(&self, msg: &Message) {
        let mut scratch = RouteScratch::default();
        let routed = self
            .router
            .read()
            .route(msg, &mut scratch, &self.memory, Waiting::Never);
        scratch.wake_writers();
        Counters::add(&self.counters.dropped, routed.dropped);
    }

    /// Announces a connect or disconnect on `$sys.broker.clients.*`.
    pub(crate) fn announce(&self, conn: &ConnShared, connected: bool) {
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
        });
        self.publish_sys(topic, Bytes::from(body.to_string()));
    }

    /// Sends a fresh statistics snapshot to one connection (on subscribe).
    pub(crate) fn send_stats_to(&self, conn: &ConnShared) {
        let msg = self.sys_message(catalog::sys::stats(), self.stats_json());
        let dropped = match conn
            .outbox
            .push_message(&msg, &self.memory, Admission::Shed, None)
        {
            Pushed::Queued { evicted, wake } => {
                if wake {
                    conn.outbox.wake();
                }
                evicted
            }
            Pushed::Dropped => 1,
            Pushed::Overflow => {
                conn.overflowed();
                1
            }
            Pushed::Closed | Pushed::Full => 0,
        };
        Counters::add(&self.counters.dropped, dropped);
    }

    fn stats_json(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.stats()).unwrap_or_default())
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let c = &self.counters;
        let router = self.router.read();
        let connections = router
            .connections()
            .map(|(slot, conn)| {
                let ob = conn.outbox.stats();
                ConnectionStats {
                    session_id: conn.session_id,
                    name: conn.name.clone(),
                    peer: conn.peer.to_string(),
                    subscriptions: router.filter_count_of(slot) as u64,
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
        BrokerStats {
            uptime_secs: self.started.elapsed().as_secs(),
            published: load(&c.published),
            delivered: load(&c.delivered),
            dropped: load(&c.dropped),
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
            queued_bytes: self.memory.used() as u64,
            memory_cap_bytes: self.memory.cap() as u64,
            connections,
        }
    }
}

/// What [`Broker::shutdown`] observed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether every session drained before the deadline.
    pub drained: bool,
    /// Sessions still open at the deadline (name and session id), torn down by force.
    pub overran: Vec<(String, u64)>,
}

/// A running broker. Cheap to clone; every clone controls the same broker. When the last
/// clone is dropped without [`Broker::shutdown`], the broker stops accepting and its sessions
/// drain in the background.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
    endpoints: Arc<Vec<Endpoint>>,
    _stop_on_drop: Arc<StopOnDrop>,
}

/// Starts the shutdown sequence when the last [`Broker`] handle goes away.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop_accepting.cancel();
        self.0.drain.cancel();
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

static INPROC_SEQ: AtomicU64 = AtomicU64::new(0);

impl Broker {
    /// Starts a broker on the configured Unix socket (`socket_path`, or the platform default:
    /// the private socket path on Unix, a named pipe on Windows), the optional loopback TCP
    /// address, and an in-process endpoint.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] for values that cannot work, [`BrokerError::Bind`] when an
    /// endpoint cannot be bound (for example a live broker already owns the socket).
    pub async fn start(config: BrokerConfig) -> Result<Self, BrokerError> {
        let mut endpoints = vec![match &config.socket_path {
            Some(path) => Endpoint::Unix(path.clone()),
            None => daemoneye_eventbus_transport::default_endpoint(),
        }];
        if let Some(addr) = config.tcp_listen {
            endpoints.push(Endpoint::Tcp(addr));
        }
        Self::start_on(config, &endpoints).await
    }

    /// Starts a broker on exactly `endpoints`, plus an in-process endpoint (see
    /// [`Broker::inproc_endpoint`]).
    ///
    /// # Errors
    ///
    /// As [`Broker::start`].
    pub async fn start_on(
        config: BrokerConfig,
        endpoints: &[Endpoint],
    ) -> Result<Self, BrokerError> {
        config.validate()?;
        let mut all = endpoints.to_vec();
        let n = INPROC_SEQ.fetch_add(1, Ordering::Relaxed);
        all.push(Endpoint::InProc(format!(
            "broker-{}-{n}",
            std::process::id()
        )));
        let mut listeners = Vec::with_capacity(all.len());
        for endpoint in &all {
            let l = Listener::bind(endpoint)
                .await
                .map_err(|source| BrokerError::Bind {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            listeners.push(l);
        }
        let allowed_uids = if config.allowed_uids.is_empty() {
            own_uid().into_iter().chain([0]).collect()
        } else {
            config.allowed_uids.clone()
        };
        let kill = CancellationToken::new();
        let shared = Arc::new(Shared {
            router: RwLock::new(Router::default()),
            counters: Counters::default(),
            memory: Memory::new(config.max_memory_bytes),
            next_session: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            drain: CancellationToken::new(),
            limit: Arc::new(Semaphore::new(config.max_connections)),
            allowed_uids,
            sessions: parking_lot::Mutex::new(std::collections::BTreeMap::new()),
            started: Instant::now(),
            sys_seq: AtomicU64::new(0),
            kill,
            config,
        });
        let endpoints = listeners.iter().map(|l| l.endpoint().clone()).collect();
        for listener in listeners {
            shared
                .tracker
                .spawn(accept_loop(Arc::clone(&shared), listener));
        }
        if shared.config.enable_statistics {
            shared.tracker.spawn(stats_loop(Arc::clone(&shared)));
        }
        Ok(Self {
            _stop_on_drop: Arc::new(StopOnDrop(Arc::clone(&shared))),
            shared,
            endpoints: Arc::new(endpoints),
        })
    }

    /// Every endpoint the broker listens on (TCP with its real port).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The in-process endpoint: clients in this process connect here without serialisation.
    pub fn inproc_endpoint(&self) -> &Endpoint {
        self.endpoints
            .iter()
            .find(|e| matches!(e, Endpoint::InProc(_)))
            .expect("start_on always adds an in-process endpoint")
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.shared.config
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> BrokerStats {
        self.shared.stats()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.drain.is_cancelled()
    }

    /// Shuts down: stop accepting (the socket file is removed), tell every session to drain
    /// (each gets a going-away frame after its queued messages), wait up to
    /// `shutdown_timeout_ms`, then tear down what overran and report it.
    pub async fn shutdown(&self) -> ShutdownReport {
        let s = &self.shared;
        s.stop_accepting.cancel();
        s.drain.cancel();
        s.tracker.close();
        let deadline = Duration::from_millis(s.config.shutdown_timeout_ms);
        let drained = tokio::time::timeout(deadline, s.tracker.wait())
            .await
            .is_ok();
        let overran = if drained {
            Vec::new()
        } else {
            let names = s
                .sessions
                .lock()
                .iter()
                .map(|(id, name)| (name.clone(), *id))
                .collect();
            s.kill.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), s.tracker.wait()).await;
            names
        };
        ShutdownReport { drained, overran }
    }
}

async fn accept_loop(shared: Arc<Shared>, mut listener: Listener) {
    loop {
        let accepted = tokio::select! {
            () = shared.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(conn) => {
                let permit = Arc::clone(&shared.limit).try_acquire_owned().ok();
                shared
                    .tracker
                    .spawn(session::serve(Arc::clone(&shared), conn, permit));
            }
            Err(e) => {
                // Usually descriptor exhaustion: back off briefly instead of spinning.
                tracing::warn!(endpoint = %listener.endpoint(), error = %e, "accept failed");
                tokio::select! {
                    () = shared.stop_accepting.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

async fn stats_loop(shared: Arc<Shared>) {
    let every = Duration::from_secs(shared.config.stats_interval_secs);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            () = shared.drain.cancelled() => break,
            _ = tick.tick() => shared.publish_sys(catalog::sys::stats(), shared.stats_json()),
        }
    }
}
