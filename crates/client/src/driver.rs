//! The driver task: owns the connection, runs the reader and the writer, reconnects with
//! backoff and restores every subscription.

use crate::client::{ConnState, Inner, Restoring, refused};
use crate::error::ConnectError;
use crate::options::ClientOptions;
use crate::subscription::{Item, Matched, MissedReason, RecvError};
use daemoneye_eventbus_core::codec::{ErrorCode, Hello, Notice, Subscribe, Version, Welcome};
use daemoneye_eventbus_core::{Frame, Message};
use daemoneye_eventbus_transport::{Endpoint, FrameReader, FrameWriter, connect_with};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often a restored subscription the broker still holds for this client's previous
/// connection is asked for again, and how long apart (doubling from the first delay, then
/// every second): about a minute in all, longer than a broker with default settings takes to
/// close a connection gone silent (`connection_timeout_secs`, 30 s).
const RESTORE_ATTEMPTS: u32 = 70;
const RESTORE_FIRST_DELAY: Duration = Duration::from_millis(50);
const RESTORE_MAX_DELAY: Duration = Duration::from_secs(1);

/// A connection that completed its handshake.
pub(crate) struct Established {
    reader: FrameReader,
    writer: FrameWriter,
    welcome: Welcome,
}

impl Established {
    pub(crate) fn session_id(&self) -> u64 {
        self.welcome.session_id
    }

    /// The protocol minor version the broker speaks.
    pub(crate) fn broker_minor(&self) -> u16 {
        self.welcome.version.minor
    }

    pub(crate) fn max_message_size(&self, options: &ClientOptions) -> usize {
        options
            .max_message_size
            .min(self.welcome.max_message_size as usize)
    }
}

/// Connects and performs the handshake within `connect_timeout`.
pub(crate) async fn connect_once(
    endpoint: &Endpoint,
    options: &ClientOptions,
) -> Result<Established, ConnectError> {
    let deadline = options.connect_timeout;
    tokio::time::timeout(deadline, handshake(endpoint, options))
        .await
        .map_err(|_| ConnectError::Timeout(deadline))?
}

async fn handshake(
    endpoint: &Endpoint,
    options: &ClientOptions,
) -> Result<Established, ConnectError> {
    let conn = connect_with(endpoint, options.tls.as_ref()).await?;
    let tls = matches!(endpoint, Endpoint::Tls(_));
    let (mut reader, mut writer) = (conn.reader, conn.writer);
    writer.push(&Frame::Hello(Hello {
        version: Version::CURRENT,
        capabilities: 0,
        max_message_size: u32::try_from(options.max_message_size).unwrap_or(u32::MAX),
        keepalive_ms: u32::try_from(options.keepalive.as_millis()).unwrap_or(u32::MAX),
        slow_reader: options.slow_reader,
        client_name: options.name.clone(),
    }));
    writer
        .flush()
        .await
        .map_err(|e| ConnectError::Protocol(format!("sending hello: {e}")))?;
    // The broker enforces its own limit on what it forwards (at most 64 MiB); our option only
    // bounds what we send.
    reader.set_max_message_size(daemoneye_eventbus_core::codec::MAX_MESSAGE_SIZE_LIMIT);
    reader.carve_small_frames();
    match reader.read_frame().await {
        Ok(Some(Frame::Welcome(welcome))) => Ok(Established {
            reader,
            writer,
            welcome,
        }),
        Ok(Some(Frame::Error(e))) => Err(ConnectError::Refused {
            code: e.code,
            message: e.message,
        }),
        Ok(Some(other)) => Err(ConnectError::Protocol(format!(
            "expected a welcome frame, got kind 0x{:02x}",
            other.kind()
        ))),
        Ok(None) if tls => Err(ConnectError::TlsRefused("the connection was closed".into())),
        Ok(None) => Err(ConnectError::Protocol(
            "broker closed the connection during the handshake".into(),
        )),
        Err(e) if tls => Err(ConnectError::TlsRefused(e.to_string())),
        Err(e) => Err(ConnectError::Protocol(e.to_string())),
    }
}

/// Runs until the client is closed or reconnection gives up.
pub(crate) async fn run(inner: Arc<Inner>, first: Established) {
    let mut next = Some(first);
    let mut outage: Option<Instant> = None;
    let mut attempt: u32 = 0;
    loop {
        if let Some(conn) = next.take() {
            attempt = 0;
            let gap = outage.take().map(|since| since.elapsed());
            let cause = serve(&inner, conn, gap).await;
            if inner.closed.is_cancelled() {
                break;
            }
            tracing::warn!(endpoint = %inner.endpoint, cause = %cause, "lost the broker; reconnecting");
            // Requests and pings written to the lost connection are never answered: their
            // callers learn it now rather than at their deadline.
            for (_, tx) in inner.pending.lock().drain() {
                let _ = tx.send(Err(crate::SubscribeError::Disconnected));
            }
            inner.pings.lock().clear();
            inner.out.lock().connected = false;
            // Publishers waiting for room now get `Backlogged` instead of waiting out the outage.
            inner.out_space.notify_waiters();
            inner.state.send_replace(ConnState::Reconnecting);
            outage = Some(Instant::now());
        }
        let policy = &inner.options.reconnect;
        if !policy.enabled || policy.max_attempts.is_some_and(|m| attempt >= m) {
            break;
        }
        let delay = policy.delay(attempt, fastrand::f64());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = inner.closed.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        match connect_once(&inner.endpoint, &inner.options).await {
            Ok(conn) => {
                inner.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                next = Some(conn);
            }
            Err(e) => tracing::debug!(error = %e, attempt, "reconnect attempt failed"),
        }
    }
    finish(&inner);
}

/// Marks the client closed: queued messages are counted lost, subscriptions and pending
/// requests end.
fn finish(inner: &Inner) {
    inner.closed.cancel();
    inner.state.send_replace(ConnState::Closed);
    let mut out = inner.out.lock();
    let left = out.buf.take(None);
    let kept = out.unacked.len() as u64;
    let written_kept = out.unacked.count_through(out.taken_through) as u64;
    // Processed publishes never acknowledged are lost with the client (those still queued are
    // counted with the queue).
    inner
        .counters
        .lost
        .fetch_add(left.publishes + (written_kept.min(kept)), Ordering::Relaxed);
    inner.consumed.send_modify(|n| *n += left.frames);
    out.connected = false;
    drop(out);
    inner.out_space.notify_waiters();
    inner.subs.lock().close_all();
    inner.cancel_calls();
    inner.pending.lock().clear();
    inner.pings.lock().clear();
}

/// Serves one connection until it fails or the client closes; returns the cause.
async fn serve(inner: &Arc<Inner>, conn: Established, gap: Option<Duration>) -> String {
    let Established {
        reader,
        mut writer,
        welcome,
    } = conn;
    inner.max_message_size.store(
        inner
            .options
            .max_message_size
            .min(welcome.max_message_size as usize),
        Ordering::Relaxed,
    );
    // Acknowledgements name deliveries of this connection from now on.
    inner.epoch.fetch_add(1, Ordering::Relaxed);
    if gap.is_some() {
        // Restore every subscription before anything else queued is written.
        let (plain, acked) = {
            let subs = inner.subs.lock();
            (subs.active_filters(), subs.active_acked())
        };
        for (filter, qos, group) in plain {
            writer.push(&Frame::Subscribe(Subscribe {
                request_id: 0,
                qos,
                filter,
                group,
            }));
        }
        let mut restored = inner.restored.lock();
        restored.clear();
        for mut open in acked {
            open.request_id = inner.next_request.fetch_add(1, Ordering::Relaxed);
            writer.push(&Frame::SubscribeAcked(open.clone()));
            let outage = gap.filter(|_| open.durable.is_some());
            restored.insert(
                open.request_id,
                Restoring {
                    open,
                    outage,
                    attempts: 0,
                },
            );
        }
        drop(restored);
        // Processed publishes a connection took and the broker never acknowledged go again,
        // with their ids, before anything queued later.
        let mut out = inner.out.lock();
        let again = out.unacked.through(out.taken_through, &out.header.source);
        // Then what was spooled while the broker was away, in order: kept in memory from
        // now on, like any publish this connection takes, and in the spool until acknowledged.
        let spooled = inner
            .spool
            .as_ref()
            .map(|s| s.lock().take())
            .unwrap_or_default();
        for m in &spooled {
            out.unacked.push(m.topic(), m.header(), m.payload().clone());
            out.taken_through = out.taken_through.max(m.id().sequence);
        }
        drop(out);
        let resent = (again.len() + spooled.len()) as u64;
        for msg in again.into_iter().chain(spooled) {
            writer.push(&Frame::Publish(msg));
        }
        inner.counters.resent.fetch_add(resent, Ordering::Relaxed);
    }
    inner.out.lock().connected = true;
    inner
        .broker_minor
        .store(welcome.version.minor, Ordering::Relaxed);
    inner.state.send_replace(established_state_from(&welcome));
    let cancel = inner.closed.child_token();
    let heard = Arc::new(Liveness::default());
    let started = Instant::now();
    let read = tokio::spawn(read_loop(
        Arc::clone(inner),
        reader,
        cancel.clone(),
        gap,
        Arc::clone(&heard),
        started,
    ));
    let cause = write_loop(inner, &mut writer, &cancel, &heard, started).await;
    cancel.cancel();
    let read_cause = read
        .await
        .unwrap_or_else(|e| format!("reader task failed: {e}"));
    if cause.is_empty() { read_cause } else { cause }
}

fn established_state_from(w: &Welcome) -> ConnState {
    ConnState::Connected {
        session_id: w.session_id,
    }
}

fn millis_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What the writer needs to tell a silent broker from a busy application.
#[derive(Default)]
struct Liveness {
    /// Milliseconds (since the connection started) when a frame last arrived.
    heard_ms: AtomicU64,
    /// Set while the reader waits for room in a subscription queue: the broker may be
    /// talking, we are just not reading.
    blocked: std::sync::atomic::AtomicBool,
}

impl Liveness {
    /// How long nothing has arrived from the broker.
    fn unheard(&self, started: Instant) -> Duration {
        let ms = millis_since(started).saturating_sub(self.heard_ms.load(Ordering::Relaxed));
        Duration::from_millis(ms)
    }

    /// The cause to report when nothing was heard for three keepalive periods (and the reader
    /// is not merely waiting on the application).
    fn silence(&self, started: Instant, keepalive: Duration) -> Option<String> {
        let silent = millis_since(started).saturating_sub(self.heard_ms.load(Ordering::Relaxed));
        let limit = 3 * u64::try_from(keepalive.as_millis()).unwrap_or(u64::MAX);
        (silent > limit && !self.blocked.load(Ordering::Relaxed))
            .then(|| format!("no frame from the broker for {silent} ms"))
    }

    /// Completes once [`Liveness::silence`] reports, checking every keepalive period.
    async fn wait_for_silence(&self, started: Instant, keepalive: Duration) -> String {
        loop {
            tokio::time::sleep(keepalive).await;
            if let Some(cause) = self.silence(started, keepalive) {
                return cause;
            }
        }
    }
}

/// Writes the client's queue in batches; sends pings while idle; detects a silent broker.
async fn write_loop(
    inner: &Inner,
    writer: &mut FrameWriter,
    cancel: &CancellationToken,
    heard: &Liveness,
    started: Instant,
) -> String {
    let keepalive = inner.options.keepalive;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let mut last_write = Instant::now();
    // A writer that is never idle checks liveness between batches instead of on the tick.
    let mut next_check = last_write + keepalive;
    if writer.pending() > 0 && writer.flush().await.is_err() {
        return "write failed while restoring subscriptions".into();
    }
    let mut spare = None;
    loop {
        let batch = {
            let mut out = inner.out.lock();
            if out.buf.is_empty() {
                None
            } else {
                // Everything numbered so far is in this batch: kept Processed publishes up to
                // here go again after a reconnect.
                out.taken_through = out.header_sequence();
                Some(out.buf.take(spare.take()))
            }
        };
        let Some(batch) = batch else {
            tokio::select! {
                () = inner.out_ready.notified() => continue,
                () = cancel.cancelled() => return String::new(),
                _ = tick.tick() => {
                    next_check = Instant::now() + keepalive;
                    if let Some(cause) = keep_alive(inner, heard, started, last_write) {
                        return cause;
                    }
                    continue;
                }
            }
        };
        inner.out_space.notify_waiters();
        let (frames, publishes) = (batch.frames, batch.publishes - batch.kept);
        spare = batch.write_into(writer);
        // A write that does not finish is bounded by the same liveness rule as an idle
        // connection: a broker that is alive keeps talking (it pings while it holds us back).
        let outcome = tokio::select! {
            r = writer.flush() => r.map_err(|e| format!("write to the broker failed: {e}")),
            () = cancel.cancelled() => Err(String::new()),
            cause = heard.wait_for_silence(started, keepalive) => Err(cause),
        };
        inner.consumed.send_modify(|n| *n += frames);
        if let Err(cause) = outcome {
            inner.counters.lost.fetch_add(publishes, Ordering::Relaxed);
            return cause;
        }
        last_write = Instant::now();
        if last_write >= next_check {
            next_check = last_write + keepalive;
            if let Some(cause) = keep_alive(inner, heard, started, last_write) {
                return cause;
            }
        }
    }
}

/// The keepalive check, once per period: the cause when the broker has been silent too long,
/// otherwise a ping when the connection was silent in either direction for a period (a
/// client that only publishes hears nothing otherwise, and would take a live broker for a
/// dead one).
fn keep_alive(
    inner: &Inner,
    heard: &Liveness,
    started: Instant,
    last_write: Instant,
) -> Option<String> {
    let keepalive = inner.options.keepalive;
    if let Some(cause) = heard.silence(started, keepalive) {
        return Some(cause);
    }
    if last_write.elapsed() >= keepalive || heard.unheard(started) >= keepalive {
        let nonce = inner.next_nonce.fetch_add(1, Ordering::Relaxed);
        inner.push_control(Frame::Ping(nonce));
    }
    None
}

/// Reads frames, dispatches deliveries to subscriptions, completes requests.
async fn read_loop(
    inner: Arc<Inner>,
    mut reader: FrameReader,
    cancel: CancellationToken,
    gap: Option<Duration>,
    heard: Arc<Liveness>,
    started: Instant,
) -> String {
    let mut ctx = ReadCtx {
        inner: &inner,
        matched: Matched::default(),
        scratch: Vec::new(),
        blocked: Vec::new(),
        run_items: std::collections::VecDeque::new(),
        liveness: &heard,
        started,
    };
    if let Some(outage) = gap {
        // A durable subscription the broker resumes missed nothing (see `Inner::restored`).
        let ids = inner.subs.lock().forgetful_ids();
        for id in ids {
            let tx = inner.subs.lock().sender(id);
            if let Some(tx) = tx {
                tx.report(RecvError::Reconnected { outage });
            }
        }
    }
    loop {
        let read = tokio::select! {
            () = cancel.cancelled() => return String::new(),
            r = reader.read_frame() => r,
        };
        heard
            .heard_ms
            .store(millis_since(started), Ordering::Relaxed);
        // Handle this frame and every frame already buffered behind it before waiting again.
        let mut next = read;
        loop {
            let frame = match next {
                Ok(Some(f)) => f,
                Ok(None) => {
                    cancel.cancel();
                    return "the broker closed the connection".into();
                }
                Err(e) => {
                    cancel.cancel();
                    return e.to_string();
                }
            };
            if let Err(cause) = ctx.on_frame(frame, &cancel).await {
                cancel.cancel();
                return cause;
            }
            next = match reader.try_read_buffered() {
                Ok(None) => break,
                other => other,
            };
        }
    }
}

struct ReadCtx<'a> {
    inner: &'a Arc<Inner>,
    matched: Matched,
    /// Reused by queue group dispatch.
    scratch: Vec<u64>,
    blocked: Vec<crate::queue::Sender>,
    /// Reused for the messages of a DELIVER_ACKED_RUN.
    run_items: std::collections::VecDeque<Item>,
    liveness: &'a Liveness,
    started: Instant,
}

impl ReadCtx<'_> {
    /// Sends to a full subscription queue, waiting (the connection stops reading meanwhile,
    /// so the broker's slow-reader policy applies).
    async fn send(&self, cancel: &CancellationToken, tx: crate::queue::Sender, item: Item) {
        self.liveness.blocked.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = tx.send(item) => {}
            () = cancel.cancelled() => {}
        }
        self.liveness
            .heard_ms
            .store(millis_since(self.started), Ordering::Relaxed);
        self.liveness.blocked.store(false, Ordering::Relaxed);
    }

    /// The broker answered the restoring of an acknowledged subscription after a reconnect.
    /// Refused because it still holds the subscription for this client's previous connection
    /// (it has not seen that one close yet), it is asked again a little later, for a bounded
    /// time; refused otherwise, the subscription ends with the broker's reason, so that its
    /// application does not wait on a stream that no longer flows.
    fn restore_answered(&self, mut r: Restoring, error: Option<ErrorCode>, message: String) {
        let inner = self.inner;
        let sub = r.open.sub;
        match error {
            None => {
                if let Some(outage) = r.outage
                    && message != "resumed"
                {
                    // Made anew: the broker kept nothing of it (it restarted).
                    if let Some(tx) = inner.subs.lock().acked_sender(sub) {
                        tx.report(RecvError::Reconnected { outage });
                    }
                }
            }
            Some(ErrorCode::DurableInUse) if r.attempts < RESTORE_ATTEMPTS => {
                let delay = RESTORE_FIRST_DELAY
                    .saturating_mul(1 << r.attempts.min(8))
                    .min(RESTORE_MAX_DELAY);
                r.attempts += 1;
                let epoch = inner.epoch.load(Ordering::Relaxed);
                let shared = Arc::clone(self.inner);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A newer connection restores it on its own; a closed one is gone.
                    if shared.epoch.load(Ordering::Relaxed) != epoch
                        || shared.closed.is_cancelled()
                        || shared.subs.lock().acked_sender(r.open.sub).is_none()
                    {
                        return;
                    }
                    r.open.request_id = shared.next_request.fetch_add(1, Ordering::Relaxed);
                    let frame = Frame::SubscribeAcked(r.open.clone());
                    shared.restored.lock().insert(r.open.request_id, r);
                    shared.push_control(frame);
                });
            }
            Some(code) => {
                tracing::warn!(%code, %message, "broker refused a restored subscription");
                inner.subs.lock().end_acked(
                    sub,
                    format!(
                        "the broker refused to restore it after a reconnect ({code}): {message}"
                    ),
                );
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame, cancel: &CancellationToken) -> Result<(), String> {
        let inner = self.inner;
        match frame {
            Frame::Deliver(msg) => self.deliver(msg, cancel).await,
            Frame::DeliverRun(run) => {
                for msg in run.messages() {
                    let msg = msg.map_err(|e| format!("undecodable message in a run: {e}"))?;
                    self.deliver(msg, cancel).await;
                }
            }
            Frame::DeliverGroup(d) => self.deliver_group(&d.group, d.message, cancel).await,
            Frame::Reply(r) => {
                if let Some(tx) = inner.pending.lock().remove(&r.request_id) {
                    let _ = tx.send(match r.error {
                        None => Ok(()),
                        Some(code) => Err(refused(code, r.message)),
                    });
                } else if let Some(restoring) = inner.restored.lock().remove(&r.request_id) {
                    self.restore_answered(restoring, r.error, r.message);
                }
            }
            Frame::Ping(n) => inner.push_control(Frame::Pong(n)),
            Frame::Pong(n) => {
                if let Some(tx) = inner.pings.lock().remove(&n) {
                    let _ = tx.send(());
                }
            }
            Frame::Ack(id) => {
                if inner.out.lock().unacked.ack_through(id) > 0 {
                    inner.acked.notify_waiters();
                }
                if let Some(spool) = &inner.spool
                    && let Err(e) = spool.lock().acked_through(id.sequence)
                {
                    tracing::warn!(error = %e, "could not record acknowledged publishes in the spool; they may be sent again after a restart");
                }
            }
            Frame::Nack(n) => {
                inner.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %n.id, code = %n.code, reason = %n.reason, "broker refused a message");
                inner.inbox.refused(n.id.sequence, &n.reason);
                if inner.out.lock().unacked.refuse(n.id) {
                    inner.acked.notify_waiters();
                }
                *inner.last_rejection.lock() = Some(n.reason);
            }
            Frame::DeliverAcked(d) => {
                inner.counters.received.fetch_add(1, Ordering::Relaxed);
                let tx = inner.subs.lock().acked_sender(d.sub);
                // None: a delivery that crossed the subscription's close; the broker takes it
                // back (or drops it, counted) with the subscription.
                if let Some(tx) = tx {
                    let item = Item::Acked {
                        msg: d.message,
                        seq: d.seq,
                        redelivered: d.redelivered,
                        epoch: inner.epoch.load(Ordering::Relaxed),
                    };
                    if let Err(item) = tx.try_send(item) {
                        self.send(cancel, tx, item).await;
                    }
                }
            }
            Frame::DeliverAckedRun(d) => {
                inner
                    .counters
                    .received
                    .fetch_add(d.run.len() as u64, Ordering::Relaxed);
                let tx = inner.subs.lock().acked_sender(d.head.sub);
                // None: as for DELIVER_ACKED.
                if let Some(tx) = tx {
                    let epoch = inner.epoch.load(Ordering::Relaxed);
                    let mut items = std::mem::take(&mut self.run_items);
                    for (seq, msg) in (d.head.seq..).zip(d.run.messages()) {
                        let msg = msg.map_err(|e| format!("undecodable message in a run: {e}"))?;
                        items.push_back(Item::Acked {
                            msg,
                            seq,
                            redelivered: d.head.redelivered,
                            epoch,
                        });
                    }
                    // One lock for what fits; the rest waits for room, in order.
                    tx.try_send_many(&mut items);
                    while let Some(item) = items.pop_front() {
                        self.send(cancel, tx.clone(), item).await;
                        tx.try_send_many(&mut items);
                    }
                    self.run_items = items;
                }
            }
            Frame::SubEnd(e) => {
                tracing::warn!(sub = %e.sub, code = %e.code, message = %e.message, "the broker ended a subscription");
                inner.subs.lock().end_acked(e.sub, e.message);
            }
            Frame::Notice(Notice::Dropped { reason, topics }) => self.missed(reason.into(), topics),
            Frame::Notice(Notice::SubDropped {
                sub,
                reason,
                topics,
            }) => {
                let count: u64 = topics.iter().map(|(_, n)| n).sum();
                inner.counters.missed.fetch_add(count, Ordering::Relaxed);
                let tx = inner.subs.lock().acked_sender(sub);
                if let Some(tx) = tx {
                    let gap = RecvError::Missed {
                        count,
                        reason: reason.into(),
                    };
                    tx.report(gap);
                }
            }
            Frame::Error(e) if e.fatal => {
                return Err(format!(
                    "broker closed the connection ({}): {}",
                    e.code, e.message
                ));
            }
            Frame::Error(e) => tracing::warn!(code = %e.code, message = %e.message, "broker error"),
            Frame::GoingAway(g) => tracing::info!(reason = %g.reason, "broker is going away"),
            other => {
                return Err(format!(
                    "unexpected frame kind 0x{:02x} from the broker",
                    other.kind()
                ));
            }
        }
        Ok(())
    }

    async fn deliver(&mut self, msg: Message, cancel: &CancellationToken) {
        self.inner.counters.received.fetch_add(1, Ordering::Relaxed);
        let reply = {
            let subs = self.inner.subs.lock();
            let reply = msg.topic().is_inbox() && subs.inbox_is_exclusive();
            if !reply {
                subs.dispatch(&msg, &mut self.matched, &mut self.blocked);
            }
            reply
        };
        if reply {
            // Every reply topic differs, so matching it would always miss the cache.
            self.inner.inbox.complete(&msg);
            return;
        }
        while let Some(tx) = self.blocked.pop() {
            self.send(cancel, tx, Item::Msg(msg.clone())).await;
        }
    }

    async fn deliver_group(
        &mut self,
        group: &daemoneye_eventbus_core::QueueGroup,
        msg: Message,
        cancel: &CancellationToken,
    ) {
        self.inner.counters.received.fetch_add(1, Ordering::Relaxed);
        let taken = self.inner.subs.lock().dispatch_group(
            group,
            &msg,
            &mut self.scratch,
            &mut self.blocked,
        );
        if !taken {
            // The broker checks membership before it gives a request to a member, so this is
            // a delivery that crossed the subscription's removal: counted, never silent.
            self.inner.counters.missed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%group, topic = %msg.topic(), "queue group delivery for a subscription that has ended");
        }
        while let Some(tx) = self.blocked.pop() {
            self.send(cancel, tx, Item::Msg(msg.clone())).await;
        }
    }

    fn missed(&mut self, reason: MissedReason, topics: Vec<(daemoneye_eventbus_core::Topic, u64)>) {
        let mut per_sub: HashMap<u64, u64> = HashMap::new();
        let mut total = 0;
        let other = daemoneye_eventbus_core::catalog::sys::dropped_other();
        for (topic, count) in topics {
            total += count;
            let mut ids = Vec::new();
            if topic == other {
                // Drops of topics the broker did not list one by one: any subscription may
                // have missed them, so every one is told.
                ids = self.inner.subs.lock().plain_ids();
            } else {
                self.inner.subs.lock().ids_for(&topic, &mut ids);
            }
            for id in &ids {
                *per_sub.entry(*id).or_default() += count;
            }
        }
        self.inner
            .counters
            .missed
            .fetch_add(total, Ordering::Relaxed);
        for (id, count) in per_sub {
            let tx = self.inner.subs.lock().sender(id);
            if let Some(tx) = tx {
                tx.report(RecvError::Missed { count, reason });
            }
        }
    }
}
