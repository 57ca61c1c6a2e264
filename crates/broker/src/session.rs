//! One client connection: handshake, the read loop (routing) and the write loop (batched
//! delivery).
//!
//! The session task owns the read half and the routing scratch space; a writer task owns the
//! write half and drains the connection's [`Outbox`], flushing once per batch (when the queue
//! goes empty), never on a timer.

use crate::broker::Shared;
use crate::outbox::{Admission, Encoding, Item, Out, Outbox, Pushed};
use crate::router::{RouteScratch, SubscribeRefusal, Waiting};
use crate::stats::{ConnCounters, Counters};
use daemoneye_eventbus_core::codec::{
    ErrorCode, ErrorFrame, GoingAway, Hello, MessageRun, Nack, PROTOCOL_MAJOR, RUNS_SINCE_MINOR,
    Reply, Version, Welcome,
};
use daemoneye_eventbus_core::{Frame, FrameError, Message, Qos};
use daemoneye_eventbus_transport::{
    Connection, FrameReader, FrameWriter, PeerInfo, ReadError, TransportKind,
};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

/// How long a refusal or a last error frame may take to write.
const LAST_WORDS: Duration = Duration::from_millis(500);

/// State shared between a session, its writer and the router.
pub(crate) struct ConnShared {
    pub(crate) session_id: u64,
    pub(crate) name: String,
    pub(crate) peer: PeerInfo,
    pub(crate) outbox: Outbox,
    /// Whether the client reads message runs (protocol 1.2); older clients get a run's
    /// messages as single deliveries.
    pub(crate) runs: bool,
    pub(crate) counters: ConnCounters,
    /// Cancelled to tear the connection down at once (overflow, forced shutdown).
    pub(crate) cancel: CancellationToken,
    /// The error frame to write, best effort, when the connection is torn down.
    last_error: Mutex<Option<ErrorFrame>>,
    /// The connection's slot in the router (`u32::MAX` until registered).
    pub(crate) slot: std::sync::atomic::AtomicU32,
}

impl ConnShared {
    /// A connection for unit tests of the routing table (no socket behind it).
    #[cfg(test)]
    pub(crate) fn for_test(name: &str, max_msgs: usize) -> Self {
        Self {
            session_id: 0,
            name: name.to_owned(),
            peer: PeerInfo::default(),
            outbox: Outbox::new(
                max_msgs,
                1 << 20,
                daemoneye_eventbus_core::codec::SlowReaderPolicy::DropOldest,
                Encoding::Shared,
            ),
            runs: true,
            counters: ConnCounters::default(),
            cancel: CancellationToken::new(),
            last_error: Mutex::new(None),
            slot: std::sync::atomic::AtomicU32::new(u32::MAX),
        }
    }

    /// The outbox overflowed under the `Disconnect` policy.
    pub(crate) fn overflowed(&self) {
        self.tear_down(ErrorFrame {
            request_id: 0,
            code: ErrorCode::SlowReader,
            fatal: true,
            message: format!(
                "connection {:?} read too slowly and its slow-reader policy is disconnect",
                self.name
            ),
        });
    }

    fn tear_down(&self, error: ErrorFrame) {
        self.last_error.lock().get_or_insert(error);
        self.cancel.cancel();
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame {
        request_id: 0,
        code,
        fatal: true,
        message: message.into(),
    }
}

/// Why the read loop ended.
enum Exit {
    ClientClosed,
    Shutdown,
    Cancelled,
    Fatal(ErrorFrame),
}

/// Serves one accepted connection to the end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    conn: Connection,
    permit: Option<OwnedSemaphorePermit>,
) {
    let Connection {
        mut reader,
        mut writer,
        peer,
    } = conn;
    let Some(permit) = permit else {
        Counters::add(&shared.counters.connections_refused, 1);
        let max = shared.config.max_connections;
        let msg = format!("broker is at max_connections ({max}); retry later");
        refuse(
            &mut reader,
            &mut writer,
            error(ErrorCode::ConnectionLimit, msg),
        )
        .await;
        return;
    };
    if let Err(refusal) = shared.authorize(&peer) {
        Counters::add(&shared.counters.connections_refused, 1);
        refuse(&mut reader, &mut writer, refusal).await;
        return;
    }
    let hello = tokio::select! {
        r = handshake(&shared, &mut reader) => r,
        () = shared.drain.cancelled() => return,
    };
    let hello = match hello {
        Ok(Some(h)) => h,
        Ok(None) => return,
        Err(refusal) => {
            Counters::add(&shared.counters.connections_refused, 1);
            refuse(&mut reader, &mut writer, refusal).await;
            return;
        }
    };
    reader.set_max_message_size(shared.config.max_message_size);
    run_session(shared, hello, reader, writer, peer).await;
    drop(permit);
}

async fn run_session(
    shared: Arc<Shared>,
    hello: Hello,
    mut reader: FrameReader,
    writer: FrameWriter,
    peer: PeerInfo,
) {
    let runs = hello.version.minor >= RUNS_SINCE_MINOR;
    let encoding = if peer.transport == TransportKind::InProc {
        Encoding::Shared
    } else {
        Encoding::Bytes { runs }
    };
    let conn = Arc::new(ConnShared {
        session_id: shared.next_session.fetch_add(1, Ordering::Relaxed),
        name: hello.client_name.clone(),
        peer,
        outbox: Outbox::new(
            shared.config.message_buffer_size,
            shared.config.subscriber_buffer_bytes,
            hello.slow_reader,
            encoding,
        ),
        runs,
        counters: ConnCounters::default(),
        cancel: shared.kill.child_token(),
        last_error: Mutex::new(None),
        slot: std::sync::atomic::AtomicU32::new(u32::MAX),
    });
    shared
        .sessions
        .lock()
        .insert(conn.session_id, conn.name.clone());
    conn.outbox
        .push_frame(Frame::Welcome(shared.welcome(conn.session_id)));
    let slot = shared.router.write().add(Arc::clone(&conn));
    conn.slot.store(slot, Ordering::Relaxed);
    Counters::add(&shared.counters.connections_total, 1);
    let writer_task =
        shared
            .tracker
            .spawn(write_loop(Arc::clone(&shared), Arc::clone(&conn), writer));
    shared.announce(&conn, true);
    tracing::debug!(session = conn.session_id, name = %conn.name, peer = %conn.peer, "connected");

    // Every frame is routed before the next read, and a queue that keeps one takes a copy
    // (`Item::to_out`): nothing is copied for the subscribers that encode deliveries at once.
    reader.lend_small_frames();
    let exit = ReadLoop::new(&shared, &conn, slot).run(&mut reader).await;
    shared.router.write().remove(slot);
    match exit {
        Exit::Fatal(e) => {
            Counters::add(&shared.counters.protocol_errors, 1);
            tracing::debug!(session = conn.session_id, error = %e.message, "closing connection");
            conn.outbox.close_with(Some(Frame::Error(e)));
        }
        Exit::Shutdown => conn.outbox.close_with(Some(Frame::GoingAway(GoingAway {
            drain_ms: u32::try_from(shared.config.shutdown_timeout_ms).unwrap_or(u32::MAX),
            reason: "broker shutting down".into(),
        }))),
        Exit::ClientClosed | Exit::Cancelled => conn.outbox.close_with(None),
    }
    let drain = Duration::from_millis(shared.config.shutdown_timeout_ms);
    if tokio::time::timeout(drain, writer_task).await.is_err() {
        conn.cancel.cancel();
    }
    let mut regroup = Vec::new();
    let discarded = conn.outbox.discard(&shared.memory, &mut regroup) as u64;
    // Queue group deliveries go to another member (or are counted as dropped there).
    let regrouped = regroup.len() as u64;
    shared.reoffer(regroup);
    Counters::add(&shared.counters.dropped, discarded - regrouped);
    shared.announce(&conn, false);
    shared.sessions.lock().remove(&conn.session_id);
    tracing::debug!(session = conn.session_id, "disconnected");
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

async fn handshake(shared: &Shared, reader: &mut FrameReader) -> Result<Option<Hello>, ErrorFrame> {
    // Until the handshake completes only small frames are accepted.
    reader.set_max_message_size(0);
    let deadline = shared.config.handshake_timeout();
    let frame = match tokio::time::timeout(deadline, reader.read_frame()).await {
        Err(_) => {
            let ms = deadline.as_millis();
            let msg = format!("no handshake received within {ms} ms; closing");
            return Err(error(ErrorCode::HandshakeTimeout, msg));
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
        return Err(error(ErrorCode::Protocol, msg));
    };
    if hello.version.major != PROTOCOL_MAJOR {
        let msg = format!(
            "protocol version {} is not supported; this broker speaks {}.x",
            hello.version, PROTOCOL_MAJOR
        );
        return Err(error(ErrorCode::UnsupportedVersion, msg));
    }
    if hello.client_name.is_empty() || hello.client_name.chars().any(char::is_control) {
        let msg = "client name must be non-empty printable text";
        return Err(error(ErrorCode::Protocol, msg));
    }
    Ok(Some(hello))
}

fn read_error(e: &ReadError) -> ErrorFrame {
    let code = match e {
        ReadError::Frame(FrameError::TooLarge { .. }) => ErrorCode::FrameTooLarge,
        _ => ErrorCode::Protocol,
    };
    error(code, format!("{e}; closing the connection"))
}

/// A publish waiting for room in `Processed` subscribers' queues.
enum Pending {
    Msg(Message),
    Run(MessageRun),
}

impl Pending {
    fn item(&self) -> Item<'_> {
        match self {
            Self::Msg(m) => Item::Msg(m),
            Self::Run(r) => Item::Run(r),
        }
    }

    fn message(&self) -> Option<&Message> {
        match self {
            Self::Msg(m) => Some(m),
            Self::Run(_) => None,
        }
    }
}

/// Per-session read state: routing scratch space and counters flushed once per batch.
struct ReadLoop<'a> {
    shared: &'a Shared,
    conn: &'a ConnShared,
    slot: u32,
    scratch: RouteScratch,
    /// A publish still waiting for room in `Processed` subscribers' queues; nothing more is
    /// read from this connection until it is delivered (backpressure, order kept).
    pending: Option<Pending>,
    /// The rest of a run being routed message by message (a queue group subscribes to its
    /// topic), held while `pending` waits. Empty whenever `pending` is.
    backlog: VecDeque<Message>,
    published: u64,
    runs: u64,
    bytes_in: u64,
    dropped: u64,
    rejected: u64,
    last_heard: Instant,
    ping_nonce: u64,
}

impl<'a> ReadLoop<'a> {
    fn new(shared: &'a Shared, conn: &'a ConnShared, slot: u32) -> Self {
        Self {
            shared,
            conn,
            slot,
            scratch: RouteScratch::default(),
            pending: None,
            backlog: VecDeque::new(),
            published: 0,
            runs: 0,
            bytes_in: 0,
            dropped: 0,
            rejected: 0,
            last_heard: Instant::now(),
            ping_nonce: 0,
        }
    }

    async fn run(&mut self, reader: &mut FrameReader) -> Exit {
        let keepalive = self.shared.config.keepalive();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
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
            let read = tokio::select! {
                biased;
                () = self.conn.cancel.cancelled() => return Exit::Cancelled,
                () = self.shared.drain.cancelled() => return Exit::Shutdown,
                r = reader.read_frame() => r,
                _ = tick.tick() => match self.keepalive() {
                    Some(exit) => return exit,
                    None => continue,
                },
            };
            let exit = match read {
                Ok(Some(frame)) => self.on_batch(frame, reader),
                Ok(None) => Some(Exit::ClientClosed),
                Err(e) => self.on_read_error(e),
            };
            // One wake per subscriber per batch: each writer takes the whole batch at once.
            self.scratch.wake_writers();
            self.flush_counters();
            if let Some(exit) = exit {
                return exit;
            }
        }
    }

    /// Handles `first` and every frame already buffered behind it.
    fn on_batch(&mut self, first: Frame, reader: &mut FrameReader) -> Option<Exit> {
        self.last_heard = Instant::now();
        let mut exit = self.on_frame(first);
        while exit.is_none() && self.pending.is_none() {
            exit = match reader.try_read_buffered() {
                Ok(Some(frame)) => self.on_frame(frame),
                Ok(None) => return None,
                Err(e) => self.on_read_error(e),
            };
        }
        exit
    }

    /// Answers a frame whose content was refused while the stream stays in sync
    /// ([`FrameError::is_recoverable`]: invalid topic, filter or field) and goes on; anything
    /// else ends the connection.
    fn on_read_error(&mut self, e: ReadError) -> Option<Exit> {
        match e {
            ReadError::Frame(FrameError::InvalidFilter { request_id, error }) => {
                self.control(Frame::Reply(Reply {
                    request_id,
                    error: Some(ErrorCode::InvalidFilter),
                    message: error.to_string(),
                }))
            }
            ReadError::Frame(FrameError::InvalidGroup { request_id, error }) => {
                self.control(Frame::Reply(Reply {
                    request_id,
                    error: Some(ErrorCode::InvalidGroup),
                    message: error.to_string(),
                }))
            }
            ReadError::Frame(FrameError::Topic(error)) => {
                self.rejected += 1;
                self.control(Frame::Error(ErrorFrame {
                    request_id: 0,
                    code: ErrorCode::InvalidTopic,
                    fatal: false,
                    message: format!("{error}; the message was discarded"),
                }))
            }
            ReadError::Frame(e) if e.is_recoverable() => {
                self.rejected += 1;
                self.control(Frame::Error(ErrorFrame {
                    request_id: 0,
                    code: ErrorCode::Protocol,
                    fatal: false,
                    message: format!("{e}; the frame was discarded"),
                }))
            }
            other => Some(Exit::Fatal(read_error(&other))),
        }
    }

    fn keepalive(&mut self) -> Option<Exit> {
        let idle = self.last_heard.elapsed();
        let timeout = self.shared.config.idle_timeout();
        if idle >= timeout {
            let msg = format!("nothing received for {} s; closing", timeout.as_secs());
            return Some(Exit::Fatal(error(ErrorCode::KeepaliveTimeout, msg)));
        }
        if idle >= self.shared.config.keepalive() {
            self.ping_nonce += 1;
            return self.control(Frame::Ping(self.ping_nonce));
        }
        None
    }

    fn flush_counters(&mut self) {
        let c = &self.shared.counters;
        Counters::add(&c.published, std::mem::take(&mut self.published));
        Counters::add(&c.runs, std::mem::take(&mut self.runs));
        Counters::add(&c.bytes_in, std::mem::take(&mut self.bytes_in));
        Counters::add(&c.dropped, std::mem::take(&mut self.dropped));
        Counters::add(&c.rejected_publishes, std::mem::take(&mut self.rejected));
    }

    /// Queues a control frame; a peer that stopped reading them is disconnected.
    fn control(&self, frame: Frame) -> Option<Exit> {
        if self.conn.outbox.push_frame(frame) {
            return None;
        }
        let msg = "too many unread control frames (replies, pongs); the client is not reading";
        Some(Exit::Fatal(error(ErrorCode::SlowReader, msg)))
    }

    fn on_frame(&mut self, frame: Frame) -> Option<Exit> {
        match frame {
            Frame::Publish(msg) => self.on_publish(msg),
            Frame::PublishRun(run) => self.on_publish_run(run),
            Frame::Subscribe(s) => {
                let outcome = self.shared.router.write().subscribe(
                    self.slot,
                    &s.filter,
                    s.qos,
                    s.group.as_ref(),
                );
                let accepted = outcome.is_ok();
                let (error, message) = match outcome {
                    Ok(true) => (None, String::new()),
                    Ok(false) => (None, "already subscribed".into()),
                    Err(SubscribeRefusal::Conflict(why)) => {
                        (Some(ErrorCode::SubscriptionConflict), why)
                    }
                };
                let reply = Frame::Reply(Reply {
                    request_id: s.request_id,
                    error,
                    message,
                });
                let exit = self.control(reply);
                if exit.is_none()
                    && accepted
                    && s.filter
                        .matches(&daemoneye_eventbus_core::catalog::sys::stats())
                {
                    // The snapshot must include this batch's earlier publishes.
                    self.flush_counters();
                    self.shared.send_stats_to(self.conn);
                }
                exit
            }
            Frame::Unsubscribe(u) => {
                let removed = self.shared.router.write().unsubscribe(self.slot, &u.filter);
                let message = if removed {
                    String::new()
                } else {
                    "was not subscribed".into()
                };
                self.control(Frame::Reply(Reply {
                    request_id: u.request_id,
                    error: None,
                    message,
                }))
            }
            Frame::Ping(n) => self.control(Frame::Pong(n)),
            // Subscriber acknowledgements and client notices carry nothing the broker must act
            // on in protocol 1.0; a client's going-away is followed by its end of stream.
            Frame::Pong(_) | Frame::Ack(_) | Frame::Nack(_) | Frame::GoingAway(_) => None,
            Frame::Error(e) => {
                tracing::debug!(session = self.conn.session_id, error = %e.message, "client error");
                None
            }
            other => {
                let msg = format!("unexpected frame kind 0x{:02x} from a client", other.kind());
                Some(Exit::Fatal(error(ErrorCode::Protocol, msg)))
            }
        }
    }

    fn nack(&mut self, msg: &Message, code: ErrorCode, reason: String) -> Option<Exit> {
        self.rejected += 1;
        self.control(Frame::Nack(Nack {
            id: msg.id(),
            code,
            reason,
        }))
    }

    fn on_publish(&mut self, msg: Message) -> Option<Exit> {
        let max = self.shared.config.max_message_size;
        let len = msg.payload().len();
        if len > max {
            let reason = format!("message of {len} bytes exceeds max_message_size ({max} bytes)");
            return self.nack(&msg, ErrorCode::MessageTooLarge, reason);
        }
        if msg.topic().is_sys() {
            let reason = format!(
                "clients cannot publish to {}: $sys is reserved",
                msg.topic()
            );
            return self.nack(&msg, ErrorCode::ReservedTopic, reason);
        }
        if let Some(reply_to) = msg.header().reply_to.as_ref().filter(|r| r.is_sys()) {
            let reason = format!(
                "replies cannot go to {reply_to}: $sys is reserved for the broker; use an _inbox topic"
            );
            return self.nack(&msg, ErrorCode::ReservedTopic, reason);
        }
        if msg.header().source.as_str() != self.conn.name {
            let reason = format!(
                "message source {:?} does not match the connection's name {:?}",
                msg.header().source.as_str(),
                self.conn.name
            );
            return self.nack(&msg, ErrorCode::NotAuthorized, reason);
        }
        let routed = self.shared.router.read().route(
            &msg,
            &mut self.scratch,
            &self.shared.memory,
            Waiting::Allowed,
        );
        self.published += 1;
        self.bytes_in += len as u64;
        self.dropped += routed.dropped;
        self.conn.counters.published.fetch_add(1, Ordering::Relaxed);
        if routed.matched == 0 && msg.header().reply_to.is_some() {
            self.shared.no_responders(&msg);
        }
        if !self.scratch.blocked.is_empty() {
            // Acknowledged once every queue holds it (`deliver_pending`).
            self.pending = Some(Pending::Msg(msg));
            return None;
        }
        if msg.header().qos == Qos::Processed {
            return self.control(Frame::Ack(msg.id()));
        }
        None
    }

    /// Routes a run as a unit when it can be: every message passes the checks a PUBLISH gets
    /// and no queue group subscribes to its topic. Otherwise its messages go through
    /// [`ReadLoop::on_publish`] one by one, so each is refused or given to a group member
    /// exactly as if it had come alone.
    fn on_publish_run(&mut self, run: MessageRun) -> Option<Exit> {
        self.runs += 1;
        let whole = run.max_payload() <= self.shared.config.max_message_size
            && !run.topic().is_sys()
            && run.source().as_str() == self.conn.name;
        let routed = if whole {
            self.shared
                .router
                .read()
                .route_run(&run, &mut self.scratch, &self.shared.memory)
        } else {
            None
        };
        let Some(routed) = routed else {
            // The decoder checked every entry, so every message reads back.
            self.backlog.extend(run.messages().map_while(Result::ok));
            return self.route_backlog();
        };
        let n = run.len() as u64;
        self.published += n;
        self.bytes_in += run.payload_bytes() as u64;
        self.dropped += routed.dropped;
        self.conn.counters.published.fetch_add(n, Ordering::Relaxed);
        if !self.scratch.blocked.is_empty() {
            self.pending = Some(Pending::Run(run));
        }
        None
    }

    /// Routes the messages of a split run, until one has to wait for room.
    fn route_backlog(&mut self) -> Option<Exit> {
        while self.pending.is_none() {
            let msg = self.backlog.pop_front()?;
            if let Some(exit) = self.on_publish(msg) {
                return Some(exit);
            }
        }
        None
    }

    /// Gives up the pending publish of `n` messages (shutdown, teardown): the subscribers
    /// still waited for never get them, and that is counted as dropped. The rest of a split
    /// run was never routed, like frames left unread in the socket.
    fn abandon(&mut self, exit: Exit, n: usize) -> Exit {
        self.dropped += (self.scratch.blocked.len() * n) as u64;
        self.backlog.clear();
        self.scratch.blocked.clear();
        self.flush_counters();
        exit
    }

    /// Offers the pending publish to the `Processed` subscribers whose queues were full,
    /// waiting for each to make room. A subscriber that disconnects stops being waited for.
    async fn deliver_pending(&mut self) -> Option<Exit> {
        let pending = self.pending.take()?;
        // The writers we are about to wait on must be running.
        self.scratch.wake_writers();
        let keepalive = self.shared.config.keepalive();
        let mut ping_at = tokio::time::Instant::now() + keepalive;
        while let Some((target, group)) = self.scratch.blocked.last() {
            if let (Some(g), Some(msg)) = (group, pending.message())
                && !self
                    .shared
                    .router
                    .read()
                    .holds_group(target, g, msg.topic())
            {
                // The member left the group while we waited (a graceful drain): another
                // member gets the request.
                if let Some((_, Some(g))) = self.scratch.blocked.pop() {
                    self.shared.reoffer(vec![(msg.clone(), g)]);
                }
                continue;
            }
            match target.outbox.push(
                pending.item(),
                &self.shared.memory,
                Admission::Wait,
                group.as_ref(),
            ) {
                Pushed::Queued { wake: true, .. } => {
                    target.outbox.wake();
                    self.scratch.blocked.pop();
                }
                Pushed::Full => {
                    tokio::select! {
                        biased;
                        () = self.conn.cancel.cancelled() => return Some(self.abandon(Exit::Cancelled, pending.item().count())),
                        () = self.shared.drain.cancelled() => return Some(self.abandon(Exit::Shutdown, pending.item().count())),
                        () = target.outbox.wait_for_room(pending.item(), &self.shared.memory) => {}
                        // The publisher hears from us while it waits, so it does not take the
                        // wait for a dead broker.
                        () = tokio::time::sleep_until(ping_at) => {
                            ping_at += keepalive;
                            self.ping_nonce += 1;
                            if let Some(exit) = self.control(Frame::Ping(self.ping_nonce)) {
                                return Some(self.abandon(exit, pending.item().count()));
                            }
                        }
                    }
                }
                Pushed::Closed => {
                    // The member waited for went away: another member of its group gets it.
                    if let (Some((_, Some(group))), Some(msg)) =
                        (self.scratch.blocked.pop(), pending.message())
                    {
                        self.shared.reoffer(vec![(msg.clone(), group)]);
                    }
                }
                _ => {
                    self.scratch.blocked.pop();
                }
            }
        }
        match pending {
            Pending::Msg(msg) if msg.header().qos == Qos::Processed => {
                self.control(Frame::Ack(msg.id()))
            }
            _ => None,
        }
    }
}

/// Drains the outbox into the socket, one write per batch.
async fn write_loop(shared: Arc<Shared>, conn: Arc<ConnShared>, mut writer: FrameWriter) {
    let mut batch_items = VecDeque::new();
    // Queue group deliveries of the batch being written, re-offered if the write fails.
    let mut in_flight = Vec::new();
    // A flush that failed or was cancelled leaves a partial batch behind: nothing more may be
    // written after it, or the peer would read a corrupt stream.
    let mut intact = true;
    // Whether the last batch held more than one message.
    let mut streaming = false;
    loop {
        let batch = conn.outbox.take(&mut batch_items);
        if batch_items.is_empty() && batch.notice.is_none() {
            if conn.outbox.is_closed() {
                break;
            }
            tokio::select! {
                () = conn.outbox.notified() => {}
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
        if let Some(notice) = &batch.notice {
            writer.push(notice);
        }
        let mut bytes_out = 0u64;
        for item in batch_items.drain(..) {
            match item {
                Out::Msg(m, _, None) => {
                    bytes_out += m.payload().len() as u64;
                    writer.push_deliver(&m);
                }
                Out::Msg(m, _, Some(group)) => {
                    bytes_out += m.payload().len() as u64;
                    writer.push_group_deliver(&m, &group);
                    in_flight.push((m, group));
                }
                Out::Run(run, _) if conn.runs => {
                    bytes_out += run.payload_bytes() as u64;
                    writer.push_deliver_run(&run);
                }
                Out::Run(run, _) => {
                    // A client before 1.2 gets the messages one by one.
                    bytes_out += run.payload_bytes() as u64;
                    writer.push_run_as_delivers(&run);
                }
                Out::Encoded(chunk) => {
                    bytes_out += chunk.payload as u64;
                    writer
                        .push_segment(chunk.buf.freeze())
                        .expect("only byte-stream connections queue encoded frames");
                }
                Out::Frame(f) => writer.push(&f),
            }
        }
        let flushed = tokio::select! {
            r = writer.flush() => r.is_ok(),
            () = conn.cancel.cancelled() => false,
        };
        shared.memory.release(batch.bytes);
        if !flushed {
            intact = false;
            // Cancelled first, so the group deliveries of this batch go to another member.
            conn.cancel.cancel();
            shared.reoffer(std::mem::take(&mut in_flight));
            break;
        }
        in_flight.clear();
        let msgs = batch.msgs as u64;
        streaming = msgs > 1;
        conn.counters.delivered.fetch_add(msgs, Ordering::Relaxed);
        Counters::add(&shared.counters.delivered, msgs);
        Counters::add(&shared.counters.bytes_out, bytes_out);
    }
    if !intact {
        return;
    }
    if let Some(e) = conn.last_error.lock().take() {
        writer.push(&Frame::Error(e));
    }
    let _ = tokio::time::timeout(LAST_WORDS, writer.shutdown()).await;
}

impl Shared {
    fn welcome(&self, session_id: u64) -> Welcome {
        Welcome {
            version: Version::CURRENT,
            session_id,
            capabilities: 0,
            max_message_size: u32::try_from(self.config.max_message_size).unwrap_or(u32::MAX),
            keepalive_ms: u32::try_from(self.config.keepalive_interval_ms).unwrap_or(u32::MAX),
            broker: concat!("daemoneye-eventbus ", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}
