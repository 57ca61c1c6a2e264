//! # daemoneye-eventbus-nats
//!
//! Bridges the local bus to NATS for fleets that outgrow one host (we never write our own
//! clustering). The only crate that depends on `async-nats`.
//!
//! - **Outbound**: local topics matching `outbound` filters are published to JetStream as
//!   `<subject_prefix>.<topic>` into `stream` (made if missing, `subject_prefix.>`), each with
//!   `<name>:<our message id>` as `Nats-Msg-Id` (a resend is deduplicated by the stream). The bridge
//!   reads them through a durable subscription of the local broker and acknowledges each one
//!   locally only once JetStream has acknowledged it: with NATS down, messages wait in the
//!   broker's durable store under its bounds and `durable_full_policy`, counted, and flow
//!   again on reconnect. The stream receives them in the order of the local broker (see
//!   `outflow.rs`); each bridge owns its stream.
//! - **Inbound**: NATS subjects (`inbound`) are published on local topics
//!   `<topic_prefix>.<subject>` by the bridge's client, so the broker's ACL decides what it
//!   may publish.
//! - **No loops**: what the bridge publishes locally (its inbound client's messages) is
//!   never sent out, and what it sent out (its `Nats-Msg-Id` starts with its name) is never
//!   taken in.

mod outflow;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use daemoneye_eventbus_client::{
    AckMode, Client, ClientOptions, ConnectError, Publish, RecvError, SubscribeError,
    SubscribeOptions, Subscription,
};
use daemoneye_eventbus_core::{Message, Qos, Topic};
use daemoneye_eventbus_transport::Endpoint;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use outflow::{Expect, Outflow};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The bridge's configuration (`agent.bridge`, also read by `eventbus bridge --config`).
/// Its `Debug` leaves the password and the token out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// The NATS server, `nats://HOST:PORT` (`tls://` for TLS).
    pub url: String,
    /// This bridge's name: its local durable subscription (`bridge-<name>`), its clients'
    /// names, and the start of every `Nats-Msg-Id` it sends (`<name>:`). 1 to 48 bytes of
    /// `a-z 0-9 _ -`.
    #[serde(default = "default_name")]
    pub name: String,
    /// A NATS credentials file (JWT and NKey seed).
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// User and password (both or neither).
    #[serde(default)]
    pub user: Option<String>,
    /// The password of `user`.
    #[serde(default)]
    pub password: Option<String>,
    /// A token.
    #[serde(default)]
    pub token: Option<String>,
    /// TLS to the server: its CA, and a client certificate if it asks for one.
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// The JetStream stream outbound messages go to (made if missing, with subjects
    /// `<subject_prefix>.>`). Owned by this bridge: another publisher into it is tolerated,
    /// but the order the bridge keeps is its own.
    pub stream: String,
    /// Outbound subjects are `<subject_prefix>.<local topic>`.
    pub subject_prefix: String,
    /// Local filters whose messages go out (`+` and `#` wildcards); none: nothing goes out.
    #[serde(default)]
    pub outbound: Vec<String>,
    /// NATS subjects taken in.
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    /// JetStream's duplicate window of the stream the bridge makes, seconds.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window_seconds: u64,
    /// Outbound publishes in flight at most (and the local subscription's window).
    #[serde(default = "default_window")]
    pub window: u32,
    /// How long a JetStream acknowledgement is waited for, seconds.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_seconds: u64,
}

impl std::fmt::Debug for BridgeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |set: bool| if set { "<hidden>" } else { "<none>" };
        f.debug_struct("BridgeConfig")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("credentials_file", &self.credentials_file)
            .field("user", &self.user)
            .field("password", &hidden(self.password.is_some()))
            .field("token", &hidden(self.token.is_some()))
            .field("tls", &self.tls)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("outbound", &self.outbound)
            .field("inbound", &self.inbound)
            .field("duplicate_window_seconds", &self.duplicate_window_seconds)
            .field("window", &self.window)
            .field("ack_timeout_seconds", &self.ack_timeout_seconds)
            .finish()
    }
}

fn default_name() -> String {
    "bridge".into()
}
fn default_duplicate_window() -> u64 {
    120
}
fn default_window() -> u32 {
    256
}
fn default_ack_timeout() -> u64 {
    5
}

/// TLS to the NATS server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    /// The CA that signed the server's certificate.
    pub ca: PathBuf,
    /// A client certificate (with `key`), if the server asks for one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// One inbound mapping: NATS `subject` (`*`, `>` wildcards) to local
/// `<topic_prefix>.<subject of the message>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// The NATS subject subscribed to.
    pub subject: String,
    /// Local topics are this, a dot, and the message's subject.
    pub topic_prefix: String,
}

/// Why the bridge's configuration was refused or the bridge could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// A setting is invalid.
    #[error("bridge: {0}")]
    Config(String),
    /// The local broker refused the connection.
    #[error("bridge: connecting to the local broker: {0}")]
    Connect(#[from] ConnectError),
    /// The local broker refused a subscription.
    #[error("bridge: subscribing locally: {0}")]
    Subscribe(#[from] SubscribeError),
}

fn bad(reason: impl Into<String>) -> BridgeError {
    BridgeError::Config(reason.into())
}

/// A NATS subject token list: non-empty tokens of no whitespace.
fn valid_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && !t.contains(char::is_whitespace))
}

impl BridgeConfig {
    /// Checks every setting.
    ///
    /// # Errors
    ///
    /// [`BridgeError::Config`] naming the setting and why.
    pub fn validate(&self) -> Result<(), BridgeError> {
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            return Err(bad(format!(
                "url must be nats://HOST:PORT or tls://HOST:PORT, not {:?}",
                self.url
            )));
        }
        if self.name.is_empty()
            || self.name.len() > 48
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            return Err(bad(format!(
                "name must be 1 to 48 bytes of a-z 0-9 _ -, not {:?}",
                self.name
            )));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(bad("user and password go together"));
        }
        let methods = usize::from(self.credentials_file.is_some())
            + usize::from(self.user.is_some())
            + usize::from(self.token.is_some());
        if methods > 1 {
            return Err(bad(
                "credentials_file, user and password, and token: one of them at most",
            ));
        }
        if let Some(tls) = &self.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            return Err(bad("tls.cert and tls.key go together"));
        }
        if self.stream.is_empty()
            || self
                .stream
                .contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace())
        {
            return Err(bad(format!(
                "stream must be a name without . * > or spaces, not {:?}",
                self.stream
            )));
        }
        if !valid_subject(&self.subject_prefix) || self.subject_prefix.contains(['*', '>']) {
            return Err(bad(format!(
                "subject_prefix must be dotted tokens without wildcards, not {:?}",
                self.subject_prefix
            )));
        }
        for f in &self.outbound {
            daemoneye_eventbus_core::TopicFilter::new(f.as_str())
                .map_err(|e| bad(format!("outbound filter {f:?}: {e}")))?;
            // The broker's own messages restart their ids with each run: JetStream would
            // take a later one for a resend.
            if f.starts_with('$') {
                return Err(bad(format!(
                    "outbound filter {f:?}: the broker's $sys topics are not bridged"
                )));
            }
        }
        for i in &self.inbound {
            if !valid_subject(&i.subject) {
                return Err(bad(format!(
                    "inbound subject {:?} is not a subject",
                    i.subject
                )));
            }
            if i.topic_prefix.starts_with('$') {
                return Err(bad(format!(
                    "inbound topic_prefix {:?}: the broker's $sys topics are its own",
                    i.topic_prefix
                )));
            }
            let sample = format!("{}.x", i.topic_prefix);
            Topic::new(sample.as_str())
                .map_err(|e| bad(format!("inbound topic_prefix {:?}: {e}", i.topic_prefix)))?;
        }
        if !(1..=4096).contains(&self.window) {
            return Err(bad("window must be 1 to 4096"));
        }
        if !(1..=300).contains(&self.ack_timeout_seconds) {
            return Err(bad("ack_timeout_seconds must be 1 to 300"));
        }
        if self.duplicate_window_seconds == 0 {
            return Err(bad("duplicate_window_seconds must be at least 1"));
        }
        Ok(())
    }

    fn durable_name(&self) -> String {
        format!("bridge-{}", self.name)
    }

    /// What every `Nats-Msg-Id` this bridge sends starts with.
    fn id_prefix(&self) -> String {
        format!("{}:", self.name)
    }

    fn inbound_client(&self) -> String {
        format!("bridge-{}-in", self.name)
    }
}

/// What the bridge counts.
#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    stored: AtomicU64,
    duplicates: AtomicU64,
    failures: AtomicU64,
    dropped: AtomicU64,
    resyncs: AtomicU64,
    pending: AtomicU64,
    connected: AtomicU64,
    inbound_received: AtomicU64,
    inbound_published: AtomicU64,
    inbound_refused: AtomicU64,
    loops_skipped: AtomicU64,
}

/// The bridge's figures (all measured).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BridgeStats {
    /// Whether the NATS connection is up now.
    pub connected: bool,
    /// Publishes sent to JetStream (resends included).
    pub sent: u64,
    /// Messages JetStream acknowledged as stored (then acknowledged locally).
    pub stored: u64,
    /// Resends JetStream recognised as stored already (by `Nats-Msg-Id`).
    pub duplicates: u64,
    /// Publishes that failed (refused, timed out, connection lost); each led to a resync.
    pub failures: u64,
    /// Messages the NATS server can never take (larger than its `max_payload`): dropped,
    /// acknowledged locally.
    pub dropped: u64,
    /// Times the bridge asked the stream which message it holds last.
    pub resyncs: u64,
    /// Messages taken from the local broker and not yet stored by JetStream.
    pub pending: u64,
    /// NATS messages received on inbound subjects.
    pub inbound_received: u64,
    /// Of those, published locally.
    pub inbound_published: u64,
    /// Of those, refused (no valid local topic, or the broker refused the publish).
    pub inbound_refused: u64,
    /// Messages not bridged because the bridge itself had brought them (loops).
    pub loops_skipped: u64,
}

/// Reads a bridge's figures (cloned freely; they stay readable after it stopped).
#[derive(Clone)]
pub struct StatsHandle(Arc<Counters>);

impl std::fmt::Debug for StatsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.stats().fmt(f)
    }
}

impl StatsHandle {
    /// The figures now.
    #[must_use]
    pub fn stats(&self) -> BridgeStats {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BridgeStats {
            connected: get(&c.connected) == 1,
            sent: get(&c.sent),
            stored: get(&c.stored),
            duplicates: get(&c.duplicates),
            failures: get(&c.failures),
            dropped: get(&c.dropped),
            resyncs: get(&c.resyncs),
            pending: get(&c.pending),
            inbound_received: get(&c.inbound_received),
            inbound_published: get(&c.inbound_published),
            inbound_refused: get(&c.inbound_refused),
            loops_skipped: get(&c.loops_skipped),
        }
    }
}

/// A running bridge.
pub struct Bridge {
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    nats: async_nats::Client,
    local: Vec<Client>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Connects to NATS (in the background: a server down now is retried for ever).
async fn connect_nats(
    config: &BridgeConfig,
    counters: &Arc<Counters>,
) -> Result<async_nats::Client, BridgeError> {
    let c = Arc::clone(counters);
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("daemoneye-{}", config.name))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let c = Arc::clone(&c);
            async move {
                match event {
                    async_nats::Event::Connected => c.connected.store(1, Ordering::Relaxed),
                    async_nats::Event::Disconnected => c.connected.store(0, Ordering::Relaxed),
                    other => tracing::info!(event = %other, "nats"),
                }
            }
        });
    if let Some(file) = &config.credentials_file {
        options = options
            .credentials_file(file)
            .await
            .map_err(|e| bad(format!("credentials_file {}: {e}", file.display())))?;
    }
    if let (Some(u), Some(p)) = (&config.user, &config.password) {
        options = options.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &config.token {
        options = options.token(t.clone());
    }
    if let Some(tls) = &config.tls {
        options = options
            .add_root_certificates(tls.ca.clone())
            .require_tls(true);
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    options
        .connect(config.url.as_str())
        .await
        .map_err(|e| bad(format!("connecting to {}: {e}", config.url)))
}

impl Bridge {
    /// Starts the bridge between the broker at `local` and the NATS server of `config`.
    /// NATS being down is not an error: outbound messages wait in the local durable
    /// subscription, and the bridge connects when it can.
    ///
    /// # Errors
    ///
    /// [`BridgeError`]: an invalid setting, or the local broker refused the bridge.
    pub async fn start(config: BridgeConfig, local: &Endpoint) -> Result<Self, BridgeError> {
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let nats = connect_nats(&config, &counters).await?;
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        let inbound_name = config.inbound_client();
        if !config.outbound.is_empty() {
            let client = Client::connect(
                local,
                ClientOptions::named(format!("bridge-{}-out", config.name)),
            )
            .await?;
            let name = daemoneye_eventbus_core::DurableName::new(&config.durable_name())
                .map_err(|e| bad(format!("name: {e}")))?;
            let sub = client
                .subscribe_with_options(
                    config.outbound.iter().map(String::as_str),
                    SubscribeOptions::default()
                        .durable(name)
                        .ack_mode(AckMode::Manual)
                        .window(config.window),
                )
                .await?;
            let out = Outbound {
                js: jetstream::ContextBuilder::new()
                    .timeout(Duration::from_secs(config.ack_timeout_seconds))
                    .max_ack_inflight(config.window as usize)
                    .build(nats.clone()),
                config: config.clone(),
                counters: Arc::clone(&counters),
                skip_source: inbound_name.clone(),
                id_prefix: config.id_prefix(),
            };
            tasks.push(tokio::spawn(out.run(sub)));
            clients.push(client);
        }
        if !config.inbound.is_empty() {
            let client = Client::connect(local, ClientOptions::named(inbound_name)).await?;
            for i in &config.inbound {
                let sub = nats
                    .subscribe(i.subject.clone())
                    .await
                    .map_err(|e| bad(format!("subscribing to {}: {e}", i.subject)))?;
                tasks.push(tokio::spawn(inbound(
                    sub,
                    i.topic_prefix.clone(),
                    client.clone(),
                    config.id_prefix(),
                    Arc::clone(&counters),
                )));
            }
            clients.push(client);
        }
        Ok(Self {
            counters,
            tasks,
            nats,
            local: clients,
        })
    }

    /// The bridge's figures now.
    #[must_use]
    pub fn stats(&self) -> BridgeStats {
        self.stats_handle().stats()
    }

    /// A handle that reads the bridge's figures, for whoever reports them (metrics).
    #[must_use]
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(Arc::clone(&self.counters))
    }

    /// Stops: what was not stored by JetStream stays in the local durable subscription for
    /// the next run.
    pub async fn shutdown(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        for c in std::mem::take(&mut self.local) {
            c.close().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.nats.flush()).await;
    }
}

impl Drop for Bridge {
    /// Dropped without [`Bridge::shutdown`]: its tasks end with it (what JetStream did not
    /// store stays in the local durable subscription).
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The outbound task's parts.
struct Outbound {
    js: jetstream::Context,
    config: BridgeConfig,
    counters: Arc<Counters>,
    /// Local messages from this client came in from NATS: never sent back.
    skip_source: String,
    /// `<name>:`, before each local message id in `Nats-Msg-Id`.
    id_prefix: String,
}

/// Outbound subjects by local topic, made once per topic (at most [`SUBJECTS`] kept).
struct Subjects {
    prefix: String,
    made: std::collections::HashMap<Topic, async_nats::Subject>,
}

/// Topics whose subjects are kept at most (then the table starts again).
const SUBJECTS: usize = 1024;

impl Subjects {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            made: std::collections::HashMap::new(),
        }
    }

    fn of(&mut self, topic: &Topic) -> async_nats::Subject {
        if let Some(s) = self.made.get(topic) {
            return s.clone();
        }
        if self.made.len() >= SUBJECTS {
            self.made.clear();
        }
        let s = async_nats::Subject::from(format!("{}.{topic}", self.prefix));
        self.made.insert(topic.clone(), s.clone());
        s
    }
}

/// The answer to one publish.
type AckFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (String, Result<bool, PublishErrorKind>)> + Send>,
>;

/// How long the bridge waits between attempts to reach the stream.
const RETRY: Duration = Duration::from_millis(250);

/// The pause before the next attempt after `streak` failed publishes in a row: from 250 ms,
/// doubling, at most 8 s.
fn backoff(streak: u32) -> Duration {
    RETRY.saturating_mul(1 << streak.saturating_sub(1).min(5))
}

impl Outbound {
    async fn run(self, mut sub: Subscription) {
        let mut flow: Outflow<Message> = Outflow::new(self.config.window as usize);
        // Failures in a row: the pause before the next attempt doubles with each.
        let mut streak = 0u32;
        let mut acks: FuturesOrdered<AckFuture> = FuturesOrdered::new();
        let window = self.config.window as usize;
        let mut subjects = Subjects::new(&self.config.subject_prefix);
        loop {
            if flow.needs_resync() {
                // Answers of the failed round are dropped: resync decides what is stored.
                acks = FuturesOrdered::new();
                if streak > 1 {
                    tokio::time::sleep(backoff(streak)).await;
                }
                let stored = self.resync(&mut flow).await;
                for e in stored {
                    sub.ack(&e.item);
                    self.counters.stored.fetch_add(1, Ordering::Relaxed);
                }
            }
            while let Some(next) = flow.next() {
                let id = next.entry.id.clone();
                let m = &next.entry.item;
                let publish = jetstream::message::PublishMessage::build()
                    .payload(m.payload().clone())
                    .message_id(&id);
                let publish = match next.expect {
                    Expect::Sequence(n) => publish.expected_last_sequence(n),
                    Expect::Id(last) => publish.expected_last_message_id(last),
                };
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                // Sent here, one after the other (the order the stream must see); only the
                // acknowledgements are awaited together.
                let sent = self.js.send_publish(subjects.of(m.topic()), publish).await;
                acks.push_back(Box::pin(async move {
                    let ack = match sent {
                        Ok(f) => f.await.map(|a| a.duplicate).map_err(|e| e.kind()),
                        Err(e) => Err(e.kind()),
                    };
                    (id, ack)
                }));
            }
            self.counters
                .pending
                .store(flow.pending() as u64, Ordering::Relaxed);
            tokio::select! {
                // Taking more from the broker only while there is room for them; a burst is
                // taken whole.
                d = sub.recv(), if flow.pending() < window => {
                    let mut next = Some(d);
                    while let Some(d) = next {
                        if !self.take(&mut sub, &mut flow, d) {
                            return;
                        }
                        next = (flow.pending() < window).then(|| sub.try_recv()).flatten();
                    }
                }
                Some(answer) = acks.next(), if !acks.is_empty() => {
                    // Every answer already there, in order.
                    let mut next = Some(answer);
                    while let Some((id, result)) = next {
                        self.answered(&mut sub, &mut flow, &id, result, &mut streak);
                        if flow.needs_resync() {
                            break;
                        }
                        next = acks.next().now_or_never().flatten();
                    }
                }
            }
        }
    }

    /// One delivery of the local subscription; `false` when it ended.
    fn take(
        &self,
        sub: &mut Subscription,
        flow: &mut Outflow<Message>,
        d: Result<Message, RecvError>,
    ) -> bool {
        match d {
            Ok(m) => {
                if m.header().source.as_str() == self.skip_source {
                    self.counters.loops_skipped.fetch_add(1, Ordering::Relaxed);
                    sub.ack(&m);
                } else {
                    flow.offer(format!("{}{}", self.id_prefix, m.id()), m);
                }
                true
            }
            Err(RecvError::Closed | RecvError::Ended(_)) => {
                tracing::warn!("bridge: the local subscription ended");
                false
            }
            // Gaps are the broker's to count (a full durable backlog).
            Err(e) => {
                tracing::warn!(error = %e, "bridge: local subscription");
                true
            }
        }
    }

    /// JetStream's answer to the publish of `id`.
    fn answered(
        &self,
        sub: &mut Subscription,
        flow: &mut Outflow<Message>,
        id: &str,
        result: Result<bool, PublishErrorKind>,
        streak: &mut u32,
    ) {
        match result {
            Ok(duplicate) => {
                if let Some(e) = flow.stored(id) {
                    *streak = 0;
                    sub.ack(&e.item);
                    self.counters.stored.fetch_add(1, Ordering::Relaxed);
                    if duplicate {
                        self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(kind) => {
                // It can never be stored: dropped (acknowledged locally), counted, and said.
                if kind == PublishErrorKind::MaxPayloadExceeded
                    && let Some(e) = flow.give_up(id)
                {
                    sub.ack(&e.item);
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        id,
                        "bridge: a message larger than the NATS server's max_payload was dropped"
                    );
                    return;
                }
                *streak = streak.saturating_add(1);
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                // The first of a streak, then every tenth: an outage is said, not repeated.
                if *streak == 1 || streak.is_multiple_of(10) {
                    tracing::warn!(error = %kind, failures_in_a_row = *streak, "bridge: publishing to JetStream failed; asking the stream where it stands");
                }
                flow.failed();
            }
        }
    }

    /// Finds the stream's last message (making the stream if missing), retrying until NATS
    /// answers; returns what is stored of what waits.
    async fn resync(&self, flow: &mut Outflow<Message>) -> Vec<outflow::Entry<Message>> {
        loop {
            self.counters.resyncs.fetch_add(1, Ordering::Relaxed);
            match self.last_stored().await {
                Ok((sequence, last)) => return flow.resync(sequence, last.as_deref()),
                Err(e) => {
                    tracing::debug!(error = %e, "bridge: the stream is not reachable yet");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// The stream's last sequence (0: empty) and its last message's `Nats-Msg-Id`.
    async fn last_stored(&self) -> Result<(u64, Option<String>), String> {
        let config = stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![format!("{}.>", self.config.subject_prefix)],
            duplicate_window: Duration::from_secs(self.config.duplicate_window_seconds),
            storage: stream::StorageType::File,
            ..stream::Config::default()
        };
        let within = Duration::from_secs(self.config.ack_timeout_seconds);
        let stream = tokio::time::timeout(within, self.js.get_or_create_stream(config))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let info = tokio::time::timeout(within, stream.get_info())
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if info.state.messages == 0 {
            return Ok((info.state.last_sequence, None));
        }
        let last = tokio::time::timeout(within, stream.get_raw_message(info.state.last_sequence))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        Ok((
            info.state.last_sequence,
            last.headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_owned()),
        ))
    }
}

/// Takes one inbound subject in: each message on `<topic_prefix>.<subject>`, unless this
/// bridge sent it.
async fn inbound(
    mut sub: async_nats::Subscriber,
    topic_prefix: String,
    client: Client,
    id_prefix: String,
    counters: Arc<Counters>,
) {
    while let Some(m) = sub.next().await {
        counters.inbound_received.fetch_add(1, Ordering::Relaxed);
        let ours = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .is_some_and(|v| v.as_str().starts_with(id_prefix.as_str()));
        if ours {
            counters.loops_skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let topic = format!("{topic_prefix}.{}", m.subject);
        let Ok(topic) = Topic::new(topic.as_str()) else {
            counters.inbound_refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(subject = %m.subject, "bridge: no valid local topic for this subject");
            continue;
        };
        let payload: Bytes = m.payload;
        match client
            .publish_with(Publish::new(topic, payload).qos(Qos::Realtime))
            .await
        {
            Ok(_) => counters.inbound_published.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(error = %e, "bridge: the local broker refused an inbound message");
                counters.inbound_refused.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<BridgeConfig, String> {
        let text = format!(
            "url = \"nats://127.0.0.1:4222\"\nstream = \"S\"\nsubject_prefix = \"fleet.h\"\n{extra}"
        );
        let c: BridgeConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn settings_are_checked_and_named_in_the_refusal() {
        assert!(config("outbound = [\"events.#\"]").is_ok());
        for (extra, named) in [
            ("outbound = [\"$sys.#\"]", "$sys topics are not bridged"),
            ("outbound = [\"a.#.b\"]", "outbound filter"),
            ("user = \"u\"", "user and password go together"),
            (
                "token = \"t\"\ncredentials_file = \"/x\"",
                "one of them at most",
            ),
            ("window = 0", "window must be 1 to 4096"),
            ("name = \"Host One\"", "name must be"),
            (
                "[[inbound]]\nsubject = \"a b\"\ntopic_prefix = \"x\"",
                "inbound subject",
            ),
            (
                "[[inbound]]\nsubject = \"a.>\"\ntopic_prefix = \"$sys\"",
                "inbound topic_prefix",
            ),
        ] {
            let e = config(extra).unwrap_err();
            assert!(e.contains(named), "{extra}: {e}");
        }
    }

    #[test]
    fn debug_hides_the_password_and_the_token() {
        let c = config("user = \"u\"\npassword = \"s3cret\"").unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("<hidden>"),
            "{shown}"
        );
    }
}
