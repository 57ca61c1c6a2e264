//! The seed-compatible API: [`DaemoneyeBroker`], [`DaemoneyeEventBus`] and the [`EventBus`]
//! trait, built on the broker and client crates.

use daemoneye_eventbus_broker::{Broker, BrokerConfig, BrokerError, BrokerStats, ShutdownReport};
use daemoneye_eventbus_client::{
    Client, ClientOptions, ConnectError, Publish, PublishError, RecvError, SubscribeError,
};
use daemoneye_eventbus_collector::{CollectionEvent, EventDecodeError};
use daemoneye_eventbus_core::{CorrelationMetadata, MessageId, Topic, catalog};
use daemoneye_eventbus_transport::Endpoint;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Errors of the [`EventBus`] API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventBusError {
    /// The broker could not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The connection could not be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A publish failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A subscribe or unsubscribe failed.
    #[error(transparent)]
    Subscribe(#[from] SubscribeError),
    /// No subscription has this subscriber id.
    #[error("no subscription with subscriber id {0:?}")]
    UnknownSubscriber(String),
    /// A subscription with this subscriber id already exists.
    #[error("a subscription with subscriber id {0:?} already exists")]
    DuplicateSubscriber(String),
    /// Statistics could not be obtained.
    #[error("broker statistics unavailable: {0}")]
    Statistics(String),
}

/// An embedded broker listening on a Unix socket (and in process).
#[derive(Debug, Clone)]
pub struct DaemoneyeBroker {
    broker: Broker,
    socket_path: PathBuf,
}

impl DaemoneyeBroker {
    /// Starts a broker with default settings on `socket_path`. A stale socket there is
    /// replaced; a live broker's socket is never taken.
    ///
    /// # Errors
    ///
    /// [`EventBusError::Broker`] naming the path and the reason.
    pub async fn new(socket_path: impl AsRef<Path>) -> Result<Self, EventBusError> {
        let config = BrokerConfig {
            socket_path: Some(socket_path.as_ref().to_owned()),
            ..BrokerConfig::default()
        };
        Self::with_config(config).await
    }

    /// Starts a broker with `config` (its `socket_path`, or the default private path).
    ///
    /// # Errors
    ///
    /// As [`DaemoneyeBroker::new`].
    pub async fn with_config(config: BrokerConfig) -> Result<Self, EventBusError> {
        let broker = Broker::start(config).await?;
        let socket_path = broker
            .endpoints()
            .iter()
            .find_map(|e| match e {
                Endpoint::Unix(p) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Self {
            broker,
            socket_path,
        })
    }

    /// The Unix socket path clients in other processes connect to.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The underlying broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// A statistics snapshot.
    pub fn statistics(&self) -> BrokerStats {
        self.broker.stats()
    }

    /// Drains and stops the broker.
    pub async fn shutdown(&self) -> ShutdownReport {
        self.broker.shutdown().await
    }
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventSubscription {
    /// Identifies the subscription for [`EventBus::unsubscribe`].
    pub subscriber_id: String,
    /// Topic filters (`+`, `*`, `#` wildcards).
    pub topic_patterns: Vec<String>,
}

impl EventSubscription {
    /// A subscription named `subscriber_id` on `patterns`.
    pub fn new<I, S>(subscriber_id: impl Into<String>, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            subscriber_id: subscriber_id.into(),
            topic_patterns: patterns.into_iter().map(Into::into).collect(),
        }
    }
}

/// An event received through [`EventBus::subscribe`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BusEvent {
    /// The topic it was published on.
    pub topic: Topic,
    /// The event, or why its payload could not be decoded.
    pub event: Result<CollectionEvent, EventDecodeError>,
    /// The publisher's correlation id, if any.
    pub correlation_id: Option<String>,
    /// The message id.
    pub message_id: MessageId,
    /// The publisher's name.
    pub source: String,
    /// When it was published.
    pub timestamp: SystemTime,
    /// Messages missed just before this one (slow reader or reconnect), if any.
    pub missed_before: Option<String>,
}

/// Broker statistics in the seed's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct EventBusStatistics {
    /// Messages accepted by the broker.
    pub messages_published: u64,
    /// Deliveries written to subscribers.
    pub messages_delivered: u64,
    /// Deliveries dropped.
    pub messages_dropped: u64,
    /// Open connections.
    pub active_subscribers: u64,
    /// Subscriptions.
    pub active_subscriptions: u64,
    /// Seconds since the broker started.
    pub uptime_seconds: u64,
}

impl From<&BrokerStats> for EventBusStatistics {
    fn from(s: &BrokerStats) -> Self {
        Self {
            messages_published: s.published,
            messages_delivered: s.delivered,
            messages_dropped: s.dropped,
            active_subscribers: s.active_connections,
            active_subscriptions: s.active_subscriptions,
            uptime_seconds: s.uptime_secs,
        }
    }
}

/// The event bus as the agent and collectors use it.
pub trait EventBus {
    /// Publishes `event` with a correlation id (carried as root correlation metadata).
    fn publish(
        &mut self,
        event: CollectionEvent,
        correlation_id: String,
    ) -> impl Future<Output = Result<(), EventBusError>> + Send;

    /// Subscribes; events arrive on the returned channel until unsubscribe or shutdown.
    fn subscribe(
        &mut self,
        subscription: EventSubscription,
    ) -> impl Future<Output = Result<mpsc::Receiver<BusEvent>, EventBusError>> + Send;

    /// Ends the subscription named `subscriber_id`.
    fn unsubscribe(
        &mut self,
        subscriber_id: &str,
    ) -> impl Future<Output = Result<(), EventBusError>> + Send;

    /// Broker statistics.
    fn statistics(&self) -> impl Future<Output = Result<EventBusStatistics, EventBusError>> + Send;

    /// Flushes and closes; an owned embedded broker is shut down too.
    fn shutdown(&mut self) -> impl Future<Output = Result<(), EventBusError>> + Send;
}

/// The [`EventBus`] implementation: a client of an embedded or remote broker.
#[derive(Debug)]
pub struct DaemoneyeEventBus {
    client: Client,
    broker: Option<DaemoneyeBroker>,
    forwarders: HashMap<String, JoinHandle<()>>,
}

/// Capacity of an [`EventBus::subscribe`] channel, in events.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

impl DaemoneyeEventBus {
    /// An event bus over the broker in this process (in-process transport, no serialisation
    /// of payloads on the way in). The bus owns the broker: [`EventBus::shutdown`] stops it.
    ///
    /// # Errors
    ///
    /// [`EventBusError::Connect`] if the broker is shutting down.
    pub async fn from_broker(broker: DaemoneyeBroker) -> Result<Self, EventBusError> {
        let client = Client::connect(
            broker.broker().inproc_endpoint(),
            ClientOptions::named("daemoneye-agent"),
        )
        .await?;
        Ok(Self {
            client,
            broker: Some(broker),
            forwarders: HashMap::new(),
        })
    }

    /// An event bus over a broker in another process, by its Unix socket path.
    ///
    /// # Errors
    ///
    /// [`EventBusError::Connect`] naming the path.
    pub async fn connect(socket_path: impl AsRef<Path>, name: &str) -> Result<Self, EventBusError> {
        let endpoint = Endpoint::Unix(socket_path.as_ref().to_owned());
        let client = Client::connect(&endpoint, ClientOptions::named(name)).await?;
        Ok(Self {
            client,
            broker: None,
            forwarders: HashMap::new(),
        })
    }

    /// The underlying client, for everything beyond the [`EventBus`] trait.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn remote_statistics(&self) -> Result<EventBusStatistics, EventBusError> {
        let mut sub = self
            .client
            .subscribe([catalog::sys::stats().as_str()])
            .await?;
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .map_err(|_| {
                EventBusError::Statistics("no $sys.broker.stats snapshot within 5 s".into())
            })?
            .map_err(|e| EventBusError::Statistics(e.to_string()))?;
        let stats: BrokerStats =
            serde_json_from(msg.payload()).map_err(EventBusError::Statistics)?;
        Ok((&stats).into())
    }
}

fn serde_json_from(bytes: &[u8]) -> Result<BrokerStats, String> {
    daemoneye_eventbus_broker::parse_stats(bytes).map_err(|e| e.to_string())
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

async fn forward(mut sub: daemoneye_eventbus_client::Subscription, tx: mpsc::Sender<BusEvent>) {
    let mut missed: Option<String> = None;
    loop {
        let msg = match sub.recv().await {
            Ok(m) => m,
            Err(RecvError::Closed) => return,
            Err(gap) => {
                missed = Some(gap.to_string());
                continue;
            }
        };
        let h = msg.header();
        let event = BusEvent {
            topic: msg.topic().clone(),
            event: CollectionEvent::decode(msg.payload()),
            correlation_id: h.correlation.as_ref().map(|c| c.correlation_id.clone()),
            message_id: h.id,
            source: h.source.to_string(),
            timestamp: UNIX_EPOCH + Duration::from_nanos(h.timestamp_ns),
            missed_before: missed.take(),
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

impl EventBus for DaemoneyeEventBus {
    async fn publish(
        &mut self,
        event: CollectionEvent,
        correlation_id: String,
    ) -> Result<(), EventBusError> {
        let meta = CorrelationMetadata::root(correlation_id, now_ns());
        let publish = Publish::new(event.topic(), event.encode()).correlation(meta);
        self.client.publish_with(publish).await?;
        Ok(())
    }

    async fn subscribe(
        &mut self,
        subscription: EventSubscription,
    ) -> Result<mpsc::Receiver<BusEvent>, EventBusError> {
        let id = subscription.subscriber_id;
        if self.forwarders.get(&id).is_some_and(|h| !h.is_finished()) {
            return Err(EventBusError::DuplicateSubscriber(id));
        }
        let sub = self.client.subscribe(&subscription.topic_patterns).await?;
        let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        self.forwarders.insert(id, tokio::spawn(forward(sub, tx)));
        Ok(rx)
    }

    async fn unsubscribe(&mut self, subscriber_id: &str) -> Result<(), EventBusError> {
        let handle = self
            .forwarders
            .remove(subscriber_id)
            .ok_or_else(|| EventBusError::UnknownSubscriber(subscriber_id.to_owned()))?;
        handle.abort();
        let _ = handle.await;
        self.client.ping().await?;
        Ok(())
    }

    async fn statistics(&self) -> Result<EventBusStatistics, EventBusError> {
        match &self.broker {
            Some(b) => Ok((&b.statistics()).into()),
            None => self.remote_statistics().await,
        }
    }

    async fn shutdown(&mut self) -> Result<(), EventBusError> {
        for (_, handle) in self.forwarders.drain() {
            handle.abort();
            let _ = handle.await;
        }
        self.client.drain().await;
        if let Some(b) = self.broker.take() {
            b.shutdown().await;
        }
        Ok(())
    }
}
