//! One client connection's shell: the handshake, the read loop that feeds each frame to the
//! session state machine ([`core`]) and carries out its steps, and the writer task that moves
//! the connection's queued frames to the socket, one write per batch (when the queues go
//! empty, never on a timer).

mod core;

use self::core::{Exit, Limits, SessionCore, Step, check_hello, fatal, read_error};
use crate::conn::Conn;
use crate::delivery::{
    AckedOut, Batch, Bounds, DropCause, Encoding, Item, Out, Outlet, Pushed, SubPushed,
};
use crate::hub::{Blocked, Hub, RouteScratch, Routed, Waiting};
use crate::stats::Counters;
use daemoneye_eventbus_core::codec::{
    ACKED_SINCE_MINOR, ErrorCode, ErrorFrame, GoingAway, Hello, Lent, MessageRun,
    PROCESSED_RUNS_SINCE_MINOR, RUNS_SINCE_MINOR,
};
use daemoneye_eventbus_core::{Frame, Message, Qos, catalog};
use daemoneye_eventbus_transport::{
    Connection, FrameReader, FrameWriter, Incoming, PeerInfo, TransportKind,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a refusal or a last error frame may take to write.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// Serves one accepted connection to the end: a TLS connection first finishes its handshake
/// within the handshake deadline.
pub(crate) async fn serve(hub: Arc<Hub>, incoming: Incoming) {
    // For a TLS connection that fails its handshake, what is known of it (its address); a
    // Unix connection is established already.
    let before = incoming.needs_handshake().then(|| incoming.peer());
    let tls = before.is_some();
    let tls_slot = tls.then(|| Arc::clone(&hub.handshakes).try_acquire_owned());
    let deadline = hub.config.handshake_timeout();
    let established = match tls_slot {
        Some(Err(_)) => Err(format!(
            "{} TLS handshakes are in progress already; closing",
            crate::hub::MAX_PENDING_HANDSHAKES
        )),
        _ => tokio::select! {
            r = tokio::time::timeout(deadline, incoming.establish()) => match r {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no TLS handshake within {} ms; closing",
                    deadline.as_millis()
                )),
            },
            () = hub.drain.cancelled() => return,
        },
    };
    drop(tls_slot);
    // A connection takes a `max_connections` slot once established.
    let permit = Arc::clone(&hub.limit).try_acquire_owned().ok();
    let conn = match established {
        Ok(conn) => conn,
        Err(why) => {
            let before = before.unwrap_or_default();
            Counters::add(&hub.counters.connections_refused, 1);
            Counters::add(&hub.counters.tls_refused, 1);
            hub.refused(&crate::hub::identity_key(&before));
            hub.audit_refusal(&before, &why);
            tracing::info!(peer = %before, error = %why, "refused a TLS connection");
            return;
        }
    };
    let Connection {
        mut reader,
        mut writer,
        peer,
    } = conn;
    // The broker's own in-process clients and supervised collectors always have room.
    let collector = hub.collector_of(&peer);
    if permit.is_none() && peer.transport != TransportKind::InProc && collector.is_none() {
        Counters::add(&hub.counters.connections_refused, 1);
        hub.refused(&crate::hub::identity_key(&peer));
        let max = hub.config.max_connections;
        let msg = format!("broker is at max_connections ({max}); retry later");
        hub.audit_refusal(&peer, &msg);
        refuse(
            &mut reader,
            &mut writer,
            fatal(ErrorCode::ConnectionLimit, msg),
        )
        .await;
        return;
    }
    let admitted = hub
        .authorize(&peer)
        .and_then(|()| hub.admit_identity(&peer));
    let key = match admitted {
        Ok(key) => key,
        Err(refusal) => {
            Counters::add(&hub.counters.connections_refused, 1);
            if refusal.code != ErrorCode::ConnectionLimit {
                hub.refused(&crate::hub::identity_key(&peer));
            }
            hub.audit_refusal(&peer, &refusal.message);
            refuse(&mut reader, &mut writer, refusal).await;
            return;
        }
    };
    // Given back however the session ends.
    struct Held(Arc<Hub>, Option<String>);
    impl Drop for Held {
        fn drop(&mut self) {
            if let Some(key) = &self.1 {
                self.0.release_identity(key);
            }
        }
    }
    let _held = Held(Arc::clone(&hub), key);
    let hello = tokio::select! {
        r = handshake(&hub, &mut reader) => r,
        () = hub.drain.cancelled() => return,
    };
    let hello = match hello.and_then(|h| match h {
        Some(h) => hub
            .check_collector_name(&peer, &h.client_name)
            .and_then(|()| {
                hub.check_name(&crate::conn::identity_of(
                    &peer,
                    &h.client_name,
                    collector.as_deref(),
                ))
            })
            .map(|()| Some(h)),
        None => Ok(None),
    }) {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(refusal) => {
            Counters::add(&hub.counters.connections_refused, 1);
            hub.refused(&crate::hub::identity_key(&peer));
            hub.audit_refusal(&peer, &refusal.message);
            refuse(&mut reader, &mut writer, refusal).await;
            return;
        }
    };
    reader.set_max_message_size(hub.config.max_message_size);
    run_session(hub, hello, reader, writer, peer, collector).await;
    drop(permit);
}

/// Writes a fatal error to a peer that never became a session, then closes.
///
/// The peer's input is read and discarded until it closes (bounded by [`LAST_WORDS`]):
/// closing a socket with unread input can reset it and destroy the error in flight.
async fn refuse(reader: &mut FrameReader, writer: &mut FrameWriter, e: ErrorFrame) {
    tracing::debug!(error = %e.message, "refusing connection");
    writer.push(&Frame::Error(e));
    let _ = tokio::time::timeout(LAST_WORDS, async {
        let _ = writer.shutdown().await;
        while let Ok(Some(_)) = reader.read_frame().await {}
    })
    .await;
}

async fn handshake(hub: &Hub, reader: &mut FrameReader) -> Result<Option<Hello>, ErrorFrame> {
    // Until the handshake completes only small frames are accepted.
    reader.set_max_message_size(0);
    let deadline = hub.config.handshake_timeout();
    let frame = match tokio::time::timeout(deadline, reader.read_frame()).await {
        Err(_) => {
            let ms = deadline.as_millis();
            let msg = format!("no handshake received within {ms} ms; closing");
            return Err(fatal(ErrorCode::HandshakeTimeout, msg));
        }
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(e)) => return Err(read_error(&e)),
        Ok(Ok(Some(f))) => f,
    };
    let Frame::Hello(hello) = frame else {
        let msg = format!(
            "expected a hello frame first, got kind 0x{:02x}",
            frame.kind()
        );
        return Err(fatal(ErrorCode::Protocol, msg));
    };
    check_hello(&hello)?;
    Ok(Some(hello))
}

async fn run_session(
    hub: Arc<Hub>,
    hello: Hello,
    mut reader: FrameReader,
    writer: FrameWriter,
    peer: PeerInfo,
    collector: Option<Arc<str>>,
) {
    let runs = hello.version.minor >= RUNS_SINCE_MINOR;
    let encoding = if peer.transport == TransportKind::InProc {
        Encoding::Shared
    } else {
        Encoding::Bytes { runs }
    };
    let bounds = Bounds {
        msgs: hub.config.message_buffer_size,
        bytes: hub.config.subscriber_buffer_bytes,
    };
    let conn = Arc::new(Conn::new(
        hub.next_session.fetch_add(1, Ordering::Relaxed),
        hello.client_name.clone(),
        peer,
        Outlet::new(
            bounds,
            hello.slow_reader,
            encoding,
            Arc::clone(&hub.counters.drops),
        ),
        hello.version.minor,
        hub.kill.child_token(),
        collector,
    ));
    hub.sessions
        .lock()
        .insert(conn.session_id, conn.name.clone());
    conn.outlet
        .push_frame(Frame::Welcome(hub.welcome(conn.session_id)));
    hub.connect(&conn);
    // A collector registered since the accept is seen here, or sees this connection.
    if let Some(id) = hub.collector_of(&conn.peer) {
        *conn.collector.lock() = Some(id);
    }
    if let Err(e) = hub.check_collector_name(&conn.peer, &conn.name) {
        conn.impostor(e.message);
    }
    hub.audit_connection(&conn);
    Counters::add(&hub.counters.connections_total, 1);
    let writer_task = hub
        .tracker
        .spawn(write_loop(Arc::clone(&hub), Arc::clone(&conn), writer));
    hub.announce(&conn, true);
    tracing::debug!(session = conn.session_id, name = %conn.name, peer = %conn.peer, "connected");

    // Every frame is routed before the next read, and a queue that keeps one takes a copy
    // (`Lent::keep`): nothing is copied for the subscribers that encode deliveries at once.
    reader.lend_small_frames();
    let limits = Limits {
        max_message_size: hub.config.max_message_size,
        keepalive: hub.config.keepalive(),
        idle_timeout: hub.config.idle_timeout(),
    };
    let (grants, generation) = conn.with_identity(|id| hub.grants(id));
    let core = SessionCore::new(hello.client_name, limits, Instant::now(), grants);
    let exit = ReadLoop::new(&hub, &conn, core, generation)
        .run(&mut reader)
        .await;
    hub.disconnect(&conn);
    // Durable subscriptions wait for their next subscriber, with what was in flight first.
    hub.release_all(&conn);
    match exit {
        Exit::Fatal(e) => {
            Counters::add(&hub.counters.protocol_errors, 1);
            tracing::debug!(session = conn.session_id, error = %e.message, "closing connection");
            conn.outlet.close_with(Some(Frame::Error(e)));
        }
        Exit::Shutdown => conn.outlet.close_with(Some(Frame::GoingAway(GoingAway {
            drain_ms: u32::try_from(hub.config.shutdown_timeout_ms).unwrap_or(u32::MAX),
            reason: "broker shutting down".into(),
        }))),
        Exit::ClientClosed | Exit::Cancelled => conn.outlet.close_with(None),
    }
    let drain = Duration::from_millis(hub.config.shutdown_timeout_ms);
    if tokio::time::timeout(drain, writer_task).await.is_err() {
        conn.cancel.cancel();
    }
    let mut regroup = Vec::new();
    let discarded = conn.outlet.discard(&hub.memory, &mut regroup) as u64;
    // Queue group deliveries go to another member (or are counted as dropped there).
    let regrouped = regroup.len() as u64;
    hub.reoffer(regroup);
    hub.counters
        .drops
        .add(DropCause::Closed, discarded - regrouped);
    hub.announce(&conn, false);
    hub.sessions.lock().remove(&conn.session_id);
    tracing::debug!(session = conn.session_id, "disconnected");
}

/// A publish waiting for room in Processed queues: a kept copy, since reading goes on only
/// once it is delivered.
enum Pending {
    Msg(Lent<'static, Message>),
    Run(Box<Lent<'static, MessageRun>>),
}

impl Pending {
    fn item(&self) -> Item<'_> {
        match self {
            Self::Msg(m) => Item::Msg(m),
            Self::Run(r) => Item::Run(r),
        }
    }
}

/// The read loop: reads batches of frames, runs each through the [`SessionCore`], and
/// carries out its steps. Routing scratch space and counters are flushed once per batch.
struct ReadLoop<'a> {
    hub: &'a Arc<Hub>,
    conn: &'a Arc<Conn>,
    core: SessionCore,
    scratch: RouteScratch,
    /// A publish still waiting for room in Processed queues; nothing more is read from this
    /// connection until it is delivered (backpressure, order kept).
    pending: Option<Pending>,
    /// The rest of a run being routed message by message, held while `pending` waits. Empty
    /// whenever `pending` is.
    backlog: VecDeque<Lent<'static, Message>>,
    published: u64,
    runs: u64,
    bytes_in: u64,
    /// Deliveries not made because their connection or subscription was closing, or this
    /// session ended while it waited for them.
    closed: u64,
    rejected: u64,
    /// The last Processed publish acknowledged and not yet answered: a client of protocol 1.3
    /// reads an ACK as covering every earlier one, so one ACK answers a batch.
    ack_due: Option<daemoneye_eventbus_core::MessageId>,
    /// `ack_due` waits for durable subscriptions' logs that could not be written: asked
    /// again every [`STORE_RETRY`].
    store_retry: bool,
    /// The ACL policy generation the core's grants were resolved in.
    acl_generation: u64,
    /// Under `fsync = always`: the wait for the disk to hold what durable subscriptions kept,
    /// and the ACK (with the subscriptions) that waits for it. The session reads on
    /// meanwhile; what it routes waits for a later sync. One sync of a log serves every
    /// session that wrote to it meanwhile (group commit, [`crate::delivery::SyncPoint`]).
    syncing: Option<Syncing>,
}

/// A sync waited for (see [`ReadLoop::syncing`]).
struct Syncing {
    ack: daemoneye_eventbus_core::MessageId,
    subs: Vec<Arc<crate::delivery::AckedSub>>,
    /// `true` once every log is on the disk; `false` if a sync failed (counted by it).
    done: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
}

/// How often a session holding an acknowledgement asks again for a log that could not be
/// written.
const STORE_RETRY: Duration = Duration::from_millis(100);

impl<'a> ReadLoop<'a> {
    fn new(hub: &'a Arc<Hub>, conn: &'a Arc<Conn>, core: SessionCore, acl_generation: u64) -> Self {
        Self {
            hub,
            conn,
            core,
            acl_generation,
            scratch: RouteScratch::default(),
            pending: None,
            backlog: VecDeque::new(),
            published: 0,
            runs: 0,
            bytes_in: 0,
            closed: 0,
            rejected: 0,
            ack_due: None,
            store_retry: false,
            syncing: None,
        }
    }

    async fn run(&mut self, reader: &mut FrameReader) -> Exit {
        // Checked twice per keepalive period, so a peer silent in either direction is pinged
        // within 1.5 periods.
        let every = (self.hub.config.keepalive() / 2).max(Duration::from_millis(1));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            while self.pending.is_some() {
                if let Some(exit) = self.deliver_pending().await {
                    return exit;
                }
                if let Some(exit) = self.route_backlog() {
                    return exit;
                }
            }
            if let Some(exit) = self.send_ack() {
                return exit;
            }
            let filled = tokio::select! {
                biased;
                () = self.conn.cancel.cancelled() => return Exit::Cancelled,
                () = self.hub.drain.cancelled() => return Exit::Shutdown,
                r = reader.fill() => r,
                () = tokio::time::sleep(STORE_RETRY), if self.store_retry => continue,
                on_disk = async { (&mut self.syncing.as_mut().expect("checked").done).await },
                    if self.syncing.is_some() =>
                {
                    let synced = self.syncing.take().expect("checked");
                    if on_disk {
                        if let Some(exit) = self.control(Frame::Ack(synced.ack)) {
                            return exit;
                        }
                    } else {
                        // Written, not on the disk: synced again before the ACK.
                        self.scratch.effects.persist.extend(synced.subs);
                        self.ack_due = Some(self.ack_due.map_or(synced.ack, |a| {
                            if a.sequence >= synced.ack.sequence { a } else { synced.ack }
                        }));
                        self.store_retry = true;
                    }
                    continue;
                }
                _ = tick.tick() => {
                    self.hub.expire(self.conn);
                    let step = self.core.on_tick(Instant::now(), self.conn.written_at());
                    match self.apply(step) {
                        Some(exit) => return exit,
                        None => continue,
                    }
                }
            };
            let exit = match filled {
                Ok(true) => self.on_batch(reader).or_else(|| self.send_ack()),
                Ok(false) => Some(Exit::ClientClosed),
                Err(e) => {
                    let step = self.core.on_read_error(e);
                    self.apply(step)
                }
            };
            // One wake per subscriber per batch: each writer takes the whole batch at once.
            self.scratch.wake_writers();
            self.flush_counters();
            if let Some(exit) = exit {
                return exit;
            }
        }
    }

    /// Handles every frame buffered, until one has to wait for room.
    fn on_batch(&mut self, reader: &mut FrameReader) -> Option<Exit> {
        self.core.heard(Instant::now());
        if self.hub.acl_generation.load(Ordering::Acquire) != self.acl_generation {
            // A reloaded policy: this batch is checked against it.
            let (grants, generation) = self.conn.with_identity(|id| self.hub.grants(id));
            self.core.set_grants(grants);
            self.acl_generation = generation;
        }
        while self.pending.is_none() {
            let step = match reader.next_lent() {
                Ok(Some(frame)) => self.core.on_frame(frame),
                Ok(None) => return None,
                Err(e) => self.core.on_read_error(e),
            };
            if let Some(exit) = self.apply(step) {
                return Some(exit);
            }
        }
        None
    }

    /// Carries out one step of the state machine.
    fn apply(&mut self, step: Step<'_>) -> Option<Exit> {
        match step {
            Step::Route(mut msg) => {
                if msg.header().qos == Qos::Processed {
                    // Every queue that takes it keeps it: one copy, made in place.
                    msg.own();
                }
                self.publish(&msg)
            }
            Step::RouteRun(run) => {
                self.runs += 1;
                self.publish_run(&run)
            }
            Step::SplitRun(run) => {
                self.runs += 1;
                self.split_run(&run)
            }
            Step::Answer { frame, refused } => {
                self.rejected += u64::from(refused);
                if refused {
                    // A refusal must not overtake the acknowledgement of earlier publishes.
                    if let Some(exit) = self.send_ack() {
                        return Some(exit);
                    }
                }
                self.control(frame)
            }
            Step::Subscribe(s) => {
                let outcome = self.hub.subscribe(self.conn, &s);
                let exit = self.control(SessionCore::subscribed(s.request_id, &outcome));
                if exit.is_none() && outcome.is_ok() && s.filter.matches(&catalog::sys::stats()) {
                    // The snapshot must include this batch's earlier publishes.
                    self.flush_counters();
                    self.hub.send_stats_to(self.conn);
                }
                exit
            }
            Step::Unsubscribe(u) => {
                let removed = self.hub.unsubscribe(self.conn.slot(), &u.filter);
                self.control(SessionCore::unsubscribed(u.request_id, removed))
            }
            Step::SubscribeAcked(s) => {
                let outcome = self.hub.subscribe_acked(self.conn, &s);
                let note = outcome.map(|resumed| if resumed { "resumed" } else { "" });
                self.control(SessionCore::answered(s.request_id, note))
            }
            Step::Ack(a) => {
                self.hub.ack(self.conn, a.sub, &a.ranges);
                None
            }
            Step::CloseSub(c) => {
                let outcome = self.hub.close_acked(self.conn, c.sub, c.delete);
                self.control(SessionCore::answered(c.request_id, outcome.map(|()| "")))
            }
            Step::DeleteDurable(d) => {
                let outcome = self.hub.delete_durable(&d.name);
                self.control(SessionCore::answered(d.request_id, outcome.map(|()| "")))
            }
            Step::Nothing => None,
            Step::Close(exit) => Some(exit),
        }
    }

    /// Routes a publish that passed its checks.
    fn publish(&mut self, msg: &Lent<'_, Message>) -> Option<Exit> {
        if msg.header().reply_to.is_some() || msg.topic().is_inbox() {
            // Control requests and their answers go to the audit trail.
            self.hub.audit_publish(self.conn, msg);
            if msg.header().reply_to.is_some() && *msg.topic() == catalog::broker::admin() {
                // The broker's own service: answered here, after the earlier publishes.
                if let Some(exit) = self.send_ack() {
                    return Some(exit);
                }
                self.hub.admin(msg);
                return None;
            }
        }
        let routed = self
            .hub
            .route(Item::Msg(msg), &mut self.scratch, Waiting::Allowed)
            .unwrap_or_default();
        if let Some(trouble) = routed.refused {
            return self.refuse(trouble, std::iter::once(msg.id()));
        }
        self.count(1, msg.payload_len(), routed);
        if routed.matched == 0 && msg.header().reply_to.is_some() {
            self.hub.no_responders(msg);
        }
        if !self.scratch.effects.blocked.is_empty() {
            // Acknowledged once every queue holds it (`deliver_pending`).
            self.pending = Some(Pending::Msg(Lent::owned(msg.keep())));
            return None;
        }
        if msg.header().qos == Qos::Processed {
            return self.ack(msg.id());
        }
        None
    }

    /// Acknowledges a Processed publish: at once for a client before protocol 1.3 (one ACK
    /// per publish), otherwise with the batch (one cumulative ACK, [`ReadLoop::send_ack`]).
    fn ack(&mut self, id: daemoneye_eventbus_core::MessageId) -> Option<Exit> {
        if self.conn.minor < ACKED_SINCE_MINOR {
            // One answer per publish: refused outright when its durable subscription's log
            // cannot be written.
            if !self.hub.persist(&mut self.scratch.effects.persist) {
                self.scratch.effects.persist.clear();
                self.rejected += 1;
                return self.control(Frame::Nack(daemoneye_eventbus_core::codec::Nack {
                    id,
                    code: ErrorCode::StoreFailed,
                    reason: "the broker could not write it to a durable subscription's log \
                             (is its disk full?); it was not kept durably"
                        .into(),
                }));
            }
            return self.control(Frame::Ack(id));
        }
        self.ack_due = Some(id);
        None
    }

    /// Refuses Processed publishes the disk store cannot keep now, one NACK each, after the
    /// acknowledgement of earlier publishes (unless that is itself held for the store).
    fn refuse(
        &mut self,
        trouble: crate::hub::StoreTrouble,
        ids: impl Iterator<Item = daemoneye_eventbus_core::MessageId>,
    ) -> Option<Exit> {
        if let Some(exit) = self.send_ack() {
            return Some(exit);
        }
        for id in ids {
            self.rejected += 1;
            if let Some(exit) = self.control(Frame::Nack(trouble.nack(id))) {
                return Some(exit);
            }
        }
        None
    }

    /// Sends the cumulative ACK due, if any.
    fn send_ack(&mut self) -> Option<Exit> {
        let id = self.ack_due?;
        if self.syncing.is_some() {
            // The next sync starts when the one in flight ends.
            return None;
        }
        let always = self.hub.config.fsync == crate::config::FsyncPolicy::Always;
        if always && !self.scratch.effects.persist.is_empty() {
            // Written now; on the disk when the logs' syncs reach it, and then the ACK.
            let subs = self.scratch.effects.persist.clone();
            let Some(waits) = self.hub.write_for_sync(&mut self.scratch.effects.persist) else {
                self.store_retry = true;
                return None;
            };
            self.store_retry = false;
            self.ack_due = None;
            if waits.is_empty() {
                return self.control(Frame::Ack(id));
            }
            let done = Box::pin(async move {
                let mut on_disk = true;
                for (rx, w) in waits {
                    on_disk &= crate::delivery::SyncPoint::wait(rx, w).await;
                }
                on_disk
            });
            self.syncing = Some(Syncing {
                ack: id,
                subs,
                done,
            });
            return None;
        }
        // What durable subscriptions kept goes to their logs first. Not written (a full
        // disk): the publisher is not told it is kept, and the write is tried again.
        self.store_retry = !self.hub.persist(&mut self.scratch.effects.persist);
        if self.store_retry {
            return None;
        }
        self.ack_due = None;
        self.control(Frame::Ack(id))
    }

    /// Routes a run as a unit, or message by message when a queue group subscribes to its
    /// topic (each message must then go to one member in turn).
    fn publish_run(&mut self, run: &Lent<'_, MessageRun>) -> Option<Exit> {
        if run.topic().is_inbox() {
            // Answers to control requests go to the audit trail (a run holds no requests).
            for msg in run.messages().map_while(Result::ok) {
                self.hub.audit_publish(self.conn, &msg);
            }
        }
        let Some(routed) = self
            .hub
            .route(Item::Run(run), &mut self.scratch, Waiting::Allowed)
        else {
            return self.split_run(run);
        };
        if let Some(trouble) = routed.refused {
            // The decoder checked every entry, so every message reads back.
            let ids = run.messages().map_while(Result::ok).map(|m| m.id());
            return self.refuse(trouble, ids);
        }
        self.count(run.len() as u64, run.payload_bytes(), routed);
        if !self.scratch.effects.blocked.is_empty() {
            // Acknowledged once every queue holds it (`deliver_pending`).
            self.pending = Some(Pending::Run(Box::new(Lent::owned(run.keep()))));
            return None;
        }
        self.ack_run(run)
    }

    /// Acknowledges a run of Processed publishes (protocol 1.4): with its last message's id,
    /// which covers every earlier one.
    fn ack_run(&mut self, run: &Lent<'_, MessageRun>) -> Option<Exit> {
        match run.last_id() {
            Some(id) if run.qos() == Qos::Processed => self.ack(id),
            _ => None,
        }
    }

    /// Routes a run's messages one by one, each checked and refused or given to a group
    /// member exactly as if it had come alone; once one has to wait, the rest are kept.
    fn split_run(&mut self, run: &Lent<'_, MessageRun>) -> Option<Exit> {
        // The decoder checked every entry, so every message reads back.
        for msg in run.messages().map_while(Result::ok) {
            if self.pending.is_some() {
                self.backlog.push_back(Lent::owned(msg.keep()));
                continue;
            }
            if let Some(exit) = self.check_and_publish(&msg) {
                return Some(exit);
            }
        }
        None
    }

    fn check_and_publish(&mut self, msg: &Lent<'_, Message>) -> Option<Exit> {
        match self.core.check(msg) {
            Ok(()) => self.publish(msg),
            Err(nack) => {
                self.rejected += 1;
                if let Some(exit) = self.send_ack() {
                    return Some(exit);
                }
                self.control(Frame::Nack(nack))
            }
        }
    }

    /// Routes the kept messages of a split run, until one has to wait for room.
    fn route_backlog(&mut self) -> Option<Exit> {
        while self.pending.is_none() {
            let msg = self.backlog.pop_front()?;
            if let Some(exit) = self.check_and_publish(&msg) {
                return Some(exit);
            }
        }
        None
    }

    fn count(&mut self, n: u64, payload: usize, routed: Routed) {
        self.published += n;
        self.bytes_in += payload as u64;
        self.closed += routed.closed;
        self.conn.counters.published.fetch_add(n, Ordering::Relaxed);
    }

    fn flush_counters(&mut self) {
        let c = &self.hub.counters;
        let (denied, details) = self.core.take_denials();
        if denied > 0 {
            Counters::add(&c.acl_denials, denied);
            Counters::add(&self.conn.counters.denied, denied);
            self.audit_denials(denied, details);
        }
        Counters::add(&c.published, std::mem::take(&mut self.published));
        Counters::add(&c.runs, std::mem::take(&mut self.runs));
        Counters::add(&c.bytes_in, std::mem::take(&mut self.bytes_in));
        c.drops
            .add(DropCause::Closed, std::mem::take(&mut self.closed));
        Counters::add(&c.rejected_publishes, std::mem::take(&mut self.rejected));
    }

    /// Records ACL refusals in the audit trail: each one kept, and how many more.
    fn audit_denials(&self, denied: u64, details: Vec<crate::acl::Denied>) {
        let more = denied - details.len() as u64;
        let who = || {
            crate::hub::audit_identity(
                &self.conn.peer,
                &self.conn.name,
                self.conn.collector.lock().as_deref(),
                Some(self.conn.session_id),
            )
        };
        for d in details {
            self.hub.audit(|| {
                serde_json::json!({"kind": "acl_denied", "who": who(), "operation": d.operation.to_string(), "target": d.target})
            });
        }
        if more > 0 {
            self.hub.audit(
                || serde_json::json!({"kind": "acl_denied_more", "who": who(), "count": more}),
            );
        }
    }

    /// Queues a control frame; a peer that stopped reading them is disconnected.
    fn control(&self, frame: Frame) -> Option<Exit> {
        if self.conn.outlet.push_frame(frame) {
            return None;
        }
        let msg = "too many unread control frames (replies, pongs); the client is not reading";
        Some(Exit::Fatal(fatal(ErrorCode::SlowReader, msg)))
    }

    /// Gives up the pending publish of `n` messages (shutdown, teardown): the subscribers
    /// still waited for never get them, and that is counted as dropped. The rest of a split
    /// run was never routed, like frames left unread in the socket.
    fn abandon(&mut self, exit: Exit, n: usize) -> Exit {
        self.closed += (self.scratch.effects.blocked.len() * n) as u64;
        self.backlog.clear();
        self.scratch.effects.blocked.clear();
        self.flush_counters();
        exit
    }

    /// Holds the publisher of the pending `n` messages back until `room` is made or
    /// `deadline` (its stall timeout) passes, pinging it every keepalive interval so that it
    /// does not take the wait for a dead broker. `Some` when the session must end instead.
    async fn held(
        &mut self,
        room: impl Future<Output = ()>,
        deadline: tokio::time::Instant,
        ping_at: &mut tokio::time::Instant,
        n: usize,
    ) -> Option<Exit> {
        tokio::select! {
            biased;
            () = self.conn.cancel.cancelled() => Some(self.abandon(Exit::Cancelled, n)),
            () = self.hub.drain.cancelled() => Some(self.abandon(Exit::Shutdown, n)),
            () = room => None,
            () = tokio::time::sleep_until(deadline) => None,
            () = tokio::time::sleep_until(*ping_at) => {
                *ping_at += self.hub.config.keepalive();
                let ping = self.core.ping();
                self.control(ping).map(|exit| self.abandon(exit, n))
            }
        }
    }

    /// Offers the pending publish to the Processed queues that were full, waiting for each to
    /// make room, each for at most `processed_stall_timeout_ms`: then it stalls (a durable
    /// subscription), is closed (an acknowledged one), or its connection is (a connection's
    /// Processed queue), and the publisher goes on. A subscriber that disconnects stops being
    /// waited for.
    async fn deliver_pending(&mut self) -> Option<Exit> {
        let pending = self.pending.take()?;
        // The writers we are about to wait on must be running.
        self.scratch.wake_writers();
        let keepalive = self.hub.config.keepalive();
        let stall = Duration::from_millis(self.hub.config.processed_stall_timeout_ms);
        let mut ping_at = tokio::time::Instant::now() + keepalive;
        let n = pending.item().count();
        let size = pending.item().size();
        // When the wait for the queue at the top of `blocked` began.
        let mut since: Option<tokio::time::Instant> = None;
        while let Some(blocked) = self.scratch.effects.blocked.last().cloned() {
            let (target, group) = match blocked {
                Blocked::Sub(sub) => {
                    let pushed = sub.push(pending.item().kept(), &self.hub.memory, true);
                    match pushed {
                        // Drops are counted by the subscription.
                        SubPushed::Kept { wake, .. } => {
                            if let Some(outlet) = wake {
                                outlet.wake();
                            }
                            if sub.on_disk {
                                self.scratch.effects.persist.push(Arc::clone(&sub));
                            }
                            self.scratch.effects.blocked.pop();
                            since = None;
                        }
                        SubPushed::Full => {
                            let started = *since.get_or_insert_with(tokio::time::Instant::now);
                            if started.elapsed() >= stall {
                                self.hub.stall(&sub);
                                since = None;
                                if sub.name.is_none() {
                                    // Closed for its stall: this message is a slow reader's
                                    // loss too (a durable one stalls and keeps taking).
                                    self.hub.counters.drops.add(DropCause::SlowReader, n as u64);
                                    self.scratch.effects.blocked.pop();
                                }
                                continue;
                            }
                            let room = sub.wait_for_room(n, size, &self.hub.memory);
                            let held = self.held(room, started + stall, &mut ping_at, n).await;
                            if held.is_some() {
                                return held;
                            }
                        }
                        // A drop is counted by the subscription; a closed one's here.
                        SubPushed::Dropped | SubPushed::Closed => {
                            if matches!(pushed, SubPushed::Closed) {
                                self.closed += n as u64;
                            }
                            self.scratch.effects.blocked.pop();
                            since = None;
                        }
                    }
                    continue;
                }
                Blocked::Conn(target, group) => (target, group),
            };
            if let (Some(g), Pending::Msg(msg)) = (&group, &pending)
                && !self.hub.holds_group(&target, g, msg.topic())
            {
                // The member left the group while we waited (a graceful drain): another
                // member gets the request.
                self.scratch.effects.blocked.pop();
                self.hub.reoffer(vec![(msg.keep(), g.clone())]);
                since = None;
                continue;
            }
            match target
                .outlet
                .push_processed(pending.item(), &self.hub.memory, group.as_ref())
            {
                Pushed::Queued { wake, .. } => {
                    if wake {
                        target.outlet.wake();
                    }
                    self.scratch.effects.blocked.pop();
                    since = None;
                }
                Pushed::Full => {
                    let started = *since.get_or_insert_with(tokio::time::Instant::now);
                    if started.elapsed() >= stall {
                        // It never made room: it is closed, and the publisher goes on.
                        Counters::add(&self.hub.counters.stalled, 1);
                        target.stalled(self.hub.config.processed_stall_timeout_ms);
                        self.hub.counters.drops.add(DropCause::SlowReader, n as u64);
                        self.scratch.effects.blocked.pop();
                        since = None;
                        continue;
                    }
                    let room = target
                        .outlet
                        .wait_for_room(pending.item(), &self.hub.memory);
                    let held = self.held(room, started + stall, &mut ping_at, n).await;
                    if held.is_some() {
                        return held;
                    }
                }
                Pushed::Closed => {
                    // The member waited for went away: another member of its group gets it.
                    self.scratch.effects.blocked.pop();
                    since = None;
                    if let (Some(group), Pending::Msg(msg)) = (group, &pending) {
                        self.hub.reoffer(vec![(msg.keep(), group)]);
                    }
                }
                Pushed::Dropped | Pushed::Overflow => {
                    self.scratch.effects.blocked.pop();
                    since = None;
                }
            }
        }
        match pending {
            Pending::Msg(msg) if msg.header().qos == Qos::Processed => self.ack(msg.id()),
            Pending::Run(run) => self.ack_run(&run),
            Pending::Msg(_) => None,
        }
    }
}

/// Moves the connection's queued frames to the socket, one write per batch.
async fn write_loop(hub: Arc<Hub>, conn: Arc<Conn>, mut writer: FrameWriter) {
    let mut batch = Batch::default();
    // Queue group deliveries of the batch being written, re-offered if the write fails.
    let mut in_flight = Vec::new();
    // A flush that failed or was cancelled leaves a partial batch behind: nothing more may be
    // written after it, or the peer would read a corrupt stream.
    let mut intact = true;
    // Whether the last batch held more than one message.
    let mut streaming = false;
    loop {
        conn.outlet.take(&mut batch, hub.now_ms());
        if batch.is_empty() {
            if conn.outlet.is_closed() {
                break;
            }
            tokio::select! {
                () = conn.outlet.notified() => {}
                () = conn.cancel.cancelled() => break,
            }
            if streaming {
                // Lets the sessions routing into this queue read what arrived meanwhile
                // first (the runtime polls the sockets before running a yielded task): one
                // larger write, and one wake-up of the subscriber instead of several. A
                // request/reply peer (one message per batch) is written at once.
                tokio::task::yield_now().await;
            }
            continue;
        }
        for notice in batch.notices.drain(..) {
            writer.push(&notice);
        }
        let mut bytes_out = 0u64;
        for out in batch.realtime.drain(..).chain(batch.processed.drain(..)) {
            bytes_out += write_out(&mut writer, &conn, out, &mut in_flight);
        }
        for out in batch.acked.drain(..) {
            bytes_out += match out {
                AckedOut::One(d) => {
                    writer.push_acked_deliver(&d);
                    d.message.payload().len() as u64
                }
                AckedOut::Run { head, run, part } => {
                    let runs = conn.minor >= PROCESSED_RUNS_SINCE_MINOR;
                    writer.push_acked_run(head, &run.run, part, runs);
                    run.payload_bytes(part) as u64
                }
            };
        }
        for frame in batch.controls.drain(..) {
            writer.push(&frame);
        }
        let flushed = tokio::select! {
            r = writer.flush() => r.is_ok(),
            () = conn.cancel.cancelled() => false,
        };
        hub.memory.release(batch.bytes);
        if !flushed {
            intact = false;
            // Cancelled first, so the group deliveries of this batch go to another member.
            conn.cancel.cancel();
            hub.reoffer(std::mem::take(&mut in_flight));
            break;
        }
        conn.wrote(Instant::now());
        in_flight.clear();
        let msgs = batch.msgs as u64;
        streaming = msgs > 1;
        conn.counters.delivered.fetch_add(msgs, Ordering::Relaxed);
        Counters::add(&hub.counters.delivered, msgs);
        Counters::add(&hub.counters.bytes_out, bytes_out);
    }
    if !intact {
        return;
    }
    if let Some(e) = conn.take_last_error() {
        writer.push(&Frame::Error(e));
    }
    let _ = tokio::time::timeout(LAST_WORDS, writer.shutdown()).await;
}

/// Hands one queued delivery to the writer; returns its payload bytes.
fn write_out(
    writer: &mut FrameWriter,
    conn: &Conn,
    out: Out,
    in_flight: &mut Vec<(Message, daemoneye_eventbus_core::QueueGroup)>,
) -> u64 {
    match out {
        Out::Msg(m, None) => {
            writer.push_deliver(&m);
            m.payload().len() as u64
        }
        Out::Msg(m, Some(group)) => {
            writer.push_group_deliver(&m, &group);
            let n = m.payload().len() as u64;
            in_flight.push((m, group));
            n
        }
        Out::Run(run) => {
            if conn.runs {
                writer.push_deliver_run(&run);
            } else {
                // A client before 1.2 gets the messages one by one.
                writer.push_run_as_delivers(&run);
            }
            run.payload_bytes() as u64
        }
        Out::Encoded(chunk) => {
            let n = chunk.payload as u64;
            writer
                .push_segment(chunk.buf.freeze())
                .expect("only byte-stream connections queue encoded frames");
            n
        }
    }
}
