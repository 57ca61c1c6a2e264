//! Request / reply over the bus.
//!
//! Each client has one reply inbox, `_inbox.<id>.+`, subscribed at its first request. A
//! request is a publish whose header carries the reply-to topic `_inbox.<id>.<n>`, a
//! deadline and correlation metadata; the reader completes the waiting call straight from the
//! delivered reply (no queue hop). A request nobody subscribes to is answered at once by the
//! broker with status `NoResponders`. A failed handler's [`ReplyStatus`] comes back as a
//! typed [`RpcError`].
//!
//! Responders use [`Client::serve`]: a subscription (in a queue group, so instances share
//! the load) whose requests are given to a handler; its result becomes the reply, with child
//! correlation metadata (parent = the request) set automatically.

use crate::client::{Client, Inner, Publish, now_ns};
use crate::error::{PublishError, SubscribeError};
use crate::idmap::IdMap;
use crate::metrics::{Recorder, RpcMetrics};
use crate::subscription::{NewSub, Sink, Subscription};
use bytes::Bytes;
use daemoneye_eventbus_core::topic::INBOX_ROOT;
use daemoneye_eventbus_core::{
    CorrelationMetadata, Message, Qos, QueueGroup, ReplyStatus, StatusCode, Topic, catalog,
};
use futures_util::FutureExt as _;
use parking_lot::Mutex;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RpcErrorKind {
    /// No reply before the deadline.
    Timeout,
    /// Nobody subscribes to the request's topic (the seed's `NotFound`); reported by the
    /// broker at once.
    NoResponders,
    /// The responder does not support the operation or could not read the request.
    InvalidOperation,
    /// The responder's handler failed.
    ExecutionError,
    /// The request could not be sent or the reply could not be read (connection lost,
    /// client closed before sending, request too large…).
    CommunicationError,
    /// The call was abandoned because the client shut down.
    Cancelled,
    /// Too many calls in flight on this client (`max_pending_requests`), or the responder
    /// reported it is overloaded or stopping.
    Busy,
    /// The broker refused the request itself (its access policy, its size…): sent nowhere,
    /// reported at once.
    Refused,
}

impl RpcErrorKind {
    /// A stable lower-case name (used in metrics and the CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoResponders => "no_responders",
            Self::InvalidOperation => "invalid_operation",
            Self::ExecutionError => "execution_error",
            Self::CommunicationError => "communication_error",
            Self::Cancelled => "cancelled",
            Self::Busy => "busy",
            Self::Refused => "refused",
        }
    }

    /// Whether trying again may succeed (timeouts, missing responders, transport failures and
    /// overload; not a refused or failed operation).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::Timeout | Self::NoResponders | Self::CommunicationError | Self::Busy
        )
    }
}

impl std::fmt::Display for RpcErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call: what kind of failure and a sentence a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct RpcError {
    /// The kind.
    pub kind: RpcErrorKind,
    /// What happened and what to do about it.
    pub message: String,
}

impl RpcError {
    /// An error of `kind`.
    pub fn new(kind: RpcErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    fn from_status(status: &ReplyStatus) -> Self {
        let kind = match status.code {
            StatusCode::NoResponders => RpcErrorKind::NoResponders,
            StatusCode::InvalidOperation => RpcErrorKind::InvalidOperation,
            StatusCode::Timeout => RpcErrorKind::Timeout,
            StatusCode::Unavailable => RpcErrorKind::Busy,
            _ => RpcErrorKind::ExecutionError,
        };
        Self::new(kind, status.message.clone())
    }
}

impl From<PublishError> for RpcError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Closed => Self::new(RpcErrorKind::Cancelled, "the client is closed"),
            other => Self::new(
                RpcErrorKind::CommunicationError,
                format!("the request could not be sent: {other}"),
            ),
        }
    }
}

type Waiter = oneshot::Sender<Result<Message, RpcError>>;

/// This client's reply inbox and the calls waiting on it.
pub(crate) struct Inbox {
    prefix: String,
    /// `_inbox.<id>`, the parent of every reply-to topic.
    topic: Topic,
    /// Calls waiting, by number: who waits, and the sequence of the request once sent (a
    /// request the broker refuses fails at once: [`Inbox::refused`]).
    pending: Mutex<IdMap<(Waiter, Arc<AtomicU64>)>>,
    next: AtomicU64,
    subscribed: OnceCell<()>,
}

impl Inbox {
    /// A fresh inbox for a client with this random id.
    pub(crate) fn new(id: u64) -> Self {
        let name = format!("{id:016x}");
        let topic = catalog::inbox(&name).expect("hex digits make a valid segment");
        Self {
            prefix: topic.as_str().to_owned(),
            topic,
            pending: Mutex::new(IdMap::default()),
            next: AtomicU64::new(1),
            subscribed: OnceCell::new(),
        }
    }

    /// Completes the call a reply is for (replies to calls that gave up are ignored).
    pub(crate) fn complete(&self, msg: &Message) {
        let topic = msg.topic().as_str();
        let Some(n) = topic
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        let Some((waiter, _)) = self.pending.lock().remove(&n) else {
            return;
        };
        let outcome = match &msg.header().status {
            None => Ok(msg.clone()),
            Some(status) => Err(RpcError::from_status(status)),
        };
        let _ = waiter.send(outcome);
    }

    /// Fails every waiting call with `Cancelled` (the client is shutting down).
    pub(crate) fn cancel_all(&self) {
        let waiters: Vec<Waiter> = self.pending.lock().drain().map(|(_, (w, _))| w).collect();
        for w in waiters {
            let _ = w.send(Err(RpcError::new(
                RpcErrorKind::Cancelled,
                "the client shut down before the reply arrived",
            )));
        }
    }

    /// Calls waiting now.
    pub(crate) fn pending(&self) -> usize {
        self.pending.lock().len()
    }
}

/// `n` in decimal, written into `buf`.
fn itoa(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("digits are ASCII")
}

/// Removes a call from the pending map however the call ends (reply, timeout, drop).
struct PendingGuard<'a> {
    inbox: &'a Inbox,
    n: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.inbox.pending.lock().remove(&self.n);
    }
}

impl Inbox {
    /// The broker refused the message of sequence `sequence`: the call that sent it, if any,
    /// fails at once with the broker's reason. Returns whether one did.
    pub(crate) fn refused(&self, sequence: u64, reason: &str) -> bool {
        // Refusals are rare, and the calls waiting bounded (`max_pending_requests`).
        let tx = {
            let mut pending = self.pending.lock();
            let Some(n) = pending
                .iter()
                .find_map(|(n, (_, seq))| (seq.load(Ordering::Relaxed) == sequence).then_some(*n))
            else {
                return false;
            };
            pending.remove(&n).map(|(tx, _)| tx)
        };
        let Some(tx) = tx else {
            return false;
        };
        let _ = tx.send(Err(RpcError::new(
            RpcErrorKind::Refused,
            format!("the broker refused the request: {reason}"),
        )));
        true
    }
}

/// A request to send with [`Client::call`].
#[derive(Debug, Clone)]
pub struct Request {
    topic: Topic,
    payload: Bytes,
    timeout: Duration,
    operation: Option<String>,
    correlation: Option<CorrelationMetadata>,
    qos: Qos,
}

impl Request {
    /// A request on `topic` with a 30 s deadline.
    pub fn new(topic: Topic, payload: impl Into<Bytes>) -> Self {
        Self {
            topic,
            payload: payload.into(),
            timeout: Duration::from_secs(30),
            operation: None,
            correlation: None,
            qos: Qos::Realtime,
        }
    }

    /// Sets how long to wait for the reply (the deadline sent with the request).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Labels the call in [`Client::rpc_metrics`] (default: the topic).
    #[must_use]
    pub fn operation(mut self, name: impl Into<String>) -> Self {
        self.operation = Some(name.into());
        self
    }

    /// Sends this correlation metadata (default: a new root with a random id).
    #[must_use]
    pub fn correlation(mut self, meta: CorrelationMetadata) -> Self {
        self.correlation = Some(meta);
        self
    }

    /// Sets the QoS of the request message.
    #[must_use]
    pub fn qos(mut self, qos: Qos) -> Self {
        self.qos = qos;
        self
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }
}

/// A new random correlation id: 32 hex digits.
pub fn new_correlation_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (half, word) in [fastrand::u64(..), fastrand::u64(..)]
        .into_iter()
        .enumerate()
    {
        for (i, b) in buf[half * 16..][..16].iter_mut().enumerate() {
            *b = HEX[((word >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    String::from_utf8(buf.to_vec()).expect("hex digits are ASCII")
}

impl Client {
    /// Sends `payload` to `topic` and waits up to `timeout` for the reply.
    ///
    /// # Errors
    ///
    /// An [`RpcError`]: `NoResponders` at once when nobody subscribes to `topic`, `Timeout`
    /// after `timeout`, the responder's failure as `InvalidOperation` / `ExecutionError` /
    /// `Busy`, `Cancelled` when the client closes first, `CommunicationError` when the
    /// request cannot be sent.
    pub async fn request(
        &self,
        topic: &Topic,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, RpcError> {
        self.call(Request::new(topic.clone(), payload).timeout(timeout))
            .await
    }

    /// Sends a request and waits for its reply (see [`Client::request`]). The call leaves
    /// the pending map however it ends, including when this future is dropped.
    ///
    /// # Errors
    ///
    /// As [`Client::request`].
    pub async fn call(&self, req: Request) -> Result<Message, RpcError> {
        let started = Instant::now();
        let label = req
            .operation
            .clone()
            .unwrap_or_else(|| req.topic.as_str().to_owned());
        let (topic, timeout) = (req.topic.clone(), req.timeout);
        // One deadline for the whole call: subscribing the inbox, waiting for room to publish
        // (a broker holding publishers back) and waiting for the reply.
        let outcome = match tokio::time::timeout(timeout, self.call_once(req)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(RpcError::new(
                RpcErrorKind::Timeout,
                format!("no reply from {topic} within {timeout:?}"),
            )),
        };
        self.inner.rpc_metrics.record(
            &label,
            started.elapsed(),
            outcome.as_ref().err().map(|e| e.kind.as_str()),
        );
        outcome
    }

    async fn call_once(&self, req: Request) -> Result<Message, RpcError> {
        let inner = &self.inner;
        self.ensure_inbox().await?;
        let inbox = &inner.inbox;
        let (tx, rx) = oneshot::channel();
        // Where the request's sequence goes once sent, without taking the lock again.
        let sent = Arc::new(AtomicU64::new(0));
        let n = inbox.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = inbox.pending.lock();
            let max = inner.options.max_pending_requests;
            if pending.len() >= max {
                return Err(RpcError::new(
                    RpcErrorKind::Busy,
                    format!(
                        "{max} calls are already waiting for replies (max_pending_requests); \
                         wait for some to finish or raise the limit"
                    ),
                ));
            }
            pending.insert(n, (tx, Arc::clone(&sent)));
        }
        let _guard = PendingGuard { inbox, n };
        let reply_to = inbox
            .topic
            .child(itoa(n, &mut [0; 20]))
            .map_err(|e| RpcError::new(RpcErrorKind::CommunicationError, e.to_string()))?;
        let now = now_ns();
        let timeout_ns = u64::try_from(req.timeout.as_nanos()).unwrap_or(u64::MAX);
        let correlation = req
            .correlation
            .unwrap_or_else(|| CorrelationMetadata::root(new_correlation_id(), now));
        // Boxed: the publish future would otherwise make every call future (and every task
        // spawned around one) larger.
        let id = Box::pin(
            self.publish_with(
                Publish::new(req.topic, req.payload)
                    .qos(req.qos)
                    .reply_to(reply_to)
                    .deadline_ns(now.saturating_add(timeout_ns))
                    .correlation(correlation),
            ),
        )
        .await?;
        // A refusal read before this line finds no entry; the reply wait then ends at the
        // deadline as before. Refusals come after the write, so this is almost always first.
        sent.store(id.sequence, Ordering::Relaxed);
        tokio::select! {
            r = rx => match r {
                Ok(outcome) => outcome,
                Err(_) => Err(RpcError::new(
                    RpcErrorKind::Cancelled,
                    "the client shut down before the reply arrived",
                )),
            },
            () = inner.closed.cancelled() => Err(RpcError::new(
                RpcErrorKind::Cancelled,
                "the client shut down before the reply arrived",
            )),
        }
    }

    /// Subscribes the reply inbox once (and again after every reconnect, with the rest).
    async fn ensure_inbox(&self) -> Result<(), RpcError> {
        let inbox = &self.inner.inbox;
        inbox
            .subscribed
            .get_or_try_init(|| async {
                let id = &inbox.prefix[INBOX_ROOT.len() + 1..];
                let filter = catalog::inbox_filter(id)
                    .map_err(|e| RpcError::new(RpcErrorKind::CommunicationError, e.to_string()))?;
                let sink = Sink::Inbox(Arc::clone(inbox));
                self.subscribe_sink(NewSub {
                    filters: vec![filter],
                    qos: Qos::Realtime,
                    group: None,
                    correlation: None,
                    sink,
                })
                .await
                .map(|_| ())
                .map_err(|e| {
                    RpcError::new(
                        RpcErrorKind::CommunicationError,
                        format!("could not subscribe the reply inbox: {e}"),
                    )
                })
            })
            .await?;
        Ok(())
    }

    /// Calls waiting for a reply right now.
    pub fn pending_requests(&self) -> usize {
        self.inner.inbox.pending()
    }

    /// Metrics of the calls made by this client, by operation.
    pub fn rpc_metrics(&self) -> RpcMetrics {
        self.inner.rpc_metrics.snapshot()
    }

    /// Answers `request` (a message with a reply-to topic): `Ok(payload)` or a failure. The
    /// reply carries child correlation metadata (parent = the request, same root, next
    /// sequence number). A request without reply-to is not answered (`Ok(false)`).
    ///
    /// # Errors
    ///
    /// [`PublishError`] when the reply cannot be queued.
    pub async fn reply(
        &self,
        request: &Message,
        outcome: Result<Bytes, ReplyStatus>,
    ) -> Result<bool, PublishError> {
        let Some(reply_to) = request.header().reply_to.clone() else {
            return Ok(false);
        };
        let (payload, status) = match outcome {
            Ok(p) => (p, None),
            Err(s) => (Bytes::new(), Some(s)),
        };
        let mut p = Publish::new(reply_to, payload).caused_by(request);
        p.extras.status = status.map(Box::new);
        self.publish_with(p).await?;
        Ok(true)
    }

    /// Serves requests on `filters`: each request is given to `handler`, and its result is
    /// sent back as the reply. With [`ServeOptions::group`], every instance serving the same
    /// group shares the requests (each goes to one instance only).
    ///
    /// # Errors
    ///
    /// As [`Client::subscribe`].
    pub async fn serve<I, S, H, F>(
        &self,
        filters: I,
        options: ServeOptions,
        handler: H,
    ) -> Result<Service, SubscribeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
        H: Fn(Message) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Bytes, ReplyStatus>> + Send + 'static,
    {
        let sub = self
            .subscribe_with_options(
                filters,
                crate::SubscribeOptions {
                    qos: options.qos,
                    group: options.group.clone(),
                    ..crate::SubscribeOptions::default()
                },
            )
            .await?;
        let shared = Arc::new(ServiceShared {
            metrics: Recorder::default(),
            expired: AtomicU64::new(0),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let id = sub.id;
        let task = tokio::spawn(service_loop(
            self.clone(),
            sub,
            Arc::new(handler),
            options.concurrency.max(1),
            Arc::clone(&shared),
        ));
        Ok(Service {
            client: self.clone(),
            sub_id: id,
            shared,
            task: Mutex::new(Some(task)),
        })
    }
}

impl Inner {
    /// Used by `close`: waiting calls end with `Cancelled`.
    pub(crate) fn cancel_calls(&self) {
        self.inbox.cancel_all();
    }
}

/// How a [`Service`] receives and handles requests.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Queue group shared by the instances of this service (default: none, every instance
    /// gets every request).
    pub group: Option<QueueGroup>,
    /// Requests handled at the same time (default 1: one after the other, in order).
    pub concurrency: usize,
    /// QoS of the request subscription (default `Processed`: requests are never dropped
    /// for a slow handler; callers wait instead).
    pub qos: Qos,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            group: None,
            concurrency: 1,
            qos: Qos::Processed,
        }
    }
}

impl ServeOptions {
    /// Joins queue group `group`.
    #[must_use]
    pub fn group(mut self, group: QueueGroup) -> Self {
        self.group = Some(group);
        self
    }

    /// Handles up to `n` requests at once.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }
}

struct ServiceShared {
    metrics: Recorder,
    expired: AtomicU64,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// A running responder (see [`Client::serve`]). Dropping it stops serving at once;
/// [`Service::drain`] stops gracefully.
pub struct Service {
    client: Client,
    sub_id: u64,
    shared: Arc<ServiceShared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("sub_id", &self.sub_id)
            .finish()
    }
}

impl Service {
    /// Requests handled so far, by topic, with outcome and handler latency.
    pub fn metrics(&self) -> RpcMetrics {
        self.shared.metrics.snapshot()
    }

    /// Requests skipped because their deadline had passed when they arrived.
    pub fn expired(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Stops gracefully: unsubscribes (waiting for the broker's acknowledgement, so every
    /// request routed to this instance before has arrived), answers every request received,
    /// then returns. Requests published afterwards go to the other instances of the group.
    /// Bounded by `timeout`; what is still running then is abandoned.
    pub async fn drain(self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let _ = tokio::time::timeout_at(deadline, self.client.unsubscribe_then_forget(self.sub_id))
            .await;
        let handle = self.task.lock().take();
        if let Some(h) = handle
            && tokio::time::timeout_at(deadline, h).await.is_err()
        {
            self.shared.stop.cancel();
        }
        self.shared.tracker.close();
        let _ = tokio::time::timeout_at(deadline, self.shared.tracker.wait()).await;
        self.shared.stop.cancel();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

async fn service_loop<H, F>(
    client: Client,
    mut sub: Subscription,
    handler: Arc<H>,
    concurrency: usize,
    shared: Arc<ServiceShared>,
) where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Bytes, ReplyStatus>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(concurrency));
    loop {
        let msg = tokio::select! {
            r = sub.recv() => match r {
                Ok(m) => m,
                Err(crate::RecvError::Closed) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "service missed requests");
                    continue;
                }
            },
            () = shared.stop.cancelled() => break,
        };
        if msg.header().reply_to.is_none() {
            continue;
        }
        if msg.header().deadline_ns.is_some_and(|d| d <= now_ns()) {
            shared.expired.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if concurrency == 1 {
            tokio::select! {
                () = handle_one(&client, handler.as_ref(), msg, &shared) => {}
                () = shared.stop.cancelled() => break,
            }
            continue;
        }
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let (client, handler, shared2) =
            (client.clone(), Arc::clone(&handler), Arc::clone(&shared));
        shared.tracker.spawn(async move {
            tokio::select! {
                () = handle_one(&client, handler.as_ref(), msg, &shared2) => {}
                () = shared2.stop.cancelled() => {}
            }
            drop(permit);
        });
    }
    drop(sub);
}

async fn handle_one<H, F>(client: &Client, handler: &H, msg: Message, shared: &ServiceShared)
where
    H: Fn(Message) -> F,
    F: Future<Output = Result<Bytes, ReplyStatus>>,
{
    let started = Instant::now();
    // A panicking handler fails its request (ExecutionError) instead of the whole service.
    let outcome = match AssertUnwindSafe(handler(msg.clone())).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            tracing::error!(topic = %msg.topic(), panic = %what, "request handler panicked");
            Err(ReplyStatus::execution_error(format!(
                "the handler panicked: {what}"
            )))
        }
    };
    let kind = outcome
        .as_ref()
        .err()
        .map(|s| RpcError::from_status(s).kind.as_str());
    shared
        .metrics
        .record(msg.topic().as_str(), started.elapsed(), kind);
    if let Err(e) = client.reply(&msg, outcome).await {
        tracing::warn!(error = %e, topic = %msg.topic(), "could not send a reply");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_numbers_and_ids_are_formatted_by_hand_correctly() {
        for n in [0, 7, 10, 1234, u64::MAX] {
            assert_eq!(itoa(n, &mut [0; 20]), n.to_string());
        }
        let id = new_correlation_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(id, new_correlation_id());
        let inbox = Inbox::new(0xabc);
        assert_eq!(inbox.topic.as_str(), "_inbox.0000000000000abc");
    }
}
