//! # daemoneye-agent
//!
//! The agent as a library: the embedded broker, the collector supervisor, the lifecycle
//! service on `control.agent.lifecycle`, health checks of every collector over RPC, and a
//! measured status report. `eventbus agent` is a thin shell over it (signals, printing);
//! an embedder starts an [`Agent`] the same way.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use daemoneye_agent::{Agent, AgentConfig, AgentOptions};
//! use daemoneye_eventbus::Endpoint;
//!
//! let config = AgentConfig::load(std::path::Path::new("/etc/daemoneye/agent.toml"))?;
//! let endpoint = Endpoint::Unix("/run/daemoneye/eventbus.sock".into());
//! let mut agent = Agent::start(config, endpoint, AgentOptions::beside_this_program()?).await?;
//! agent.wait_until_heard().await?;
//! let report = agent.report().await?;
//! println!("{:?}: {}", report.health, report.collectors_health.reason);
//! agent.publish(&report).await;
//! agent.shutdown().await;
//! # Ok(()) }
//! ```

pub mod config;
pub mod detection;
pub mod engine;
mod health;
#[cfg(feature = "http")]
pub mod http;
mod lifecycle;
pub mod metrics;
pub mod query;
pub mod rules;
pub mod tasks;

pub use config::{AgentConfig, AgentSection, BUNDLED, ConfigError, DEFAULT_METRICS_LISTEN};
pub use daemoneye_eventbus_nats as nats;
pub use health::{Before, Health, Part, broker_health, collectors_health, rpc_health};
#[cfg(feature = "http")]
pub use http::{MetricsServer, Probe};

use daemoneye_eventbus::broker::{BrokerError, ShutdownReport};
use daemoneye_eventbus::client::{
    Client, ClientOptions, ConnectError, SubscribeError, Subscription,
};
use daemoneye_eventbus::core::{QueueGroup, catalog};
use daemoneye_eventbus::rpc::{CollectorRpcClient, serve_services_at};
use daemoneye_eventbus::supervisor::{
    CollectorRegistry, CollectorState, CollectorStatus, Supervisor, SupervisorError,
};
use daemoneye_eventbus::{Broker, Endpoint};
use lifecycle::{Checks, Lifecycle, check_of};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Why the agent could not start or report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker did not start.
    #[error("starting the broker on {endpoint}: {source}")]
    Broker {
        /// Its main endpoint.
        endpoint: Endpoint,
        /// Why.
        source: Box<BrokerError>,
    },
    /// The agent's own client could not connect to its broker.
    #[error("connecting the agent to its broker: {0}")]
    Connect(#[from] ConnectError),
    /// A subscription or service of the agent was refused.
    #[error("subscribing the agent: {0}")]
    Subscribe(#[from] SubscribeError),
    /// The supervisor refused or has stopped.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    /// Where the bundled collectors are could not be found out.
    #[error("cannot locate this program (the bundled collectors are looked for beside it): {0}")]
    Locate(std::io::Error),
    /// The NATS bridge (`agent.bridge`) did not start.
    #[error(transparent)]
    Bridge(#[from] daemoneye_eventbus_nats::BridgeError),
    /// The metrics endpoint could not listen on its configured address.
    #[error("serving metrics on {addr} (agent.metrics_listen): {source}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// How an embedder runs the agent, besides its configuration.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Where the bundled collectors' programs are (used when no `[[collectors]]` is
    /// configured).
    pub bundled_dir: PathBuf,
    /// The name the agent's own client connects with.
    pub client_name: String,
}

impl AgentOptions {
    /// The bundled collectors beside the running program (`eventbus`, `procmond` and
    /// `netmond` are installed side by side).
    ///
    /// # Errors
    ///
    /// [`AgentError::Locate`] if the running program cannot be found.
    pub fn beside_this_program() -> Result<Self, AgentError> {
        let exe = std::env::current_exe().map_err(AgentError::Locate)?;
        Ok(Self {
            bundled_dir: exe
                .parent()
                .map_or_else(|| PathBuf::from("."), ToOwned::to_owned),
            client_name: "agent".into(),
        })
    }
}

/// One collector in a [`Report`].
#[derive(Debug, Clone, Serialize)]
pub struct CollectorView {
    /// Its id.
    pub id: String,
    /// Its type (as configured).
    pub collector_type: String,
    /// What it said it can do (GET_CAPABILITIES of its current run; empty until asked).
    pub capabilities: Vec<String>,
    /// Its state in the supervisor (`running`, `paused`, `failed`, …).
    pub state: String,
    /// Its process id while it runs.
    pub pid: Option<u32>,
    /// Seconds since its last start, while it runs.
    pub uptime_secs: Option<u64>,
    /// Restarts since the agent started.
    pub restart_count: u32,
    /// How it last ended.
    pub last_exit: Option<String>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: Option<f64>,
    /// Its health as last measured: its health check's answer while it runs and was
    /// checked; else what its state says (`Unhealthy` when failed, stopped or silent,
    /// `Degraded` when paused or restarting, `Unknown` before its first check).
    pub health: String,
    /// Why: `ok`, the collector's own reason, or the state's.
    pub health_reason: String,
}

/// The agent's status report, published on `control.agent.status` (JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Overall health: the worst of the parts.
    pub health: Health,
    /// The broker's health.
    pub broker: Part,
    /// RPC's health.
    pub rpc: Part,
    /// The collectors' health.
    pub collectors_health: Part,
    /// Each collector.
    pub collectors: Vec<CollectorView>,
    /// Messages published since the broker started.
    pub published: u64,
    /// Deliveries since the broker started.
    pub delivered: u64,
    /// Deliveries dropped since the broker started.
    pub dropped: u64,
    /// Connections now.
    pub connections: u64,
    /// Events per second by topic since the previous report.
    pub events_per_sec: BTreeMap<String, f64>,
    /// Detection: rules, alerts, collection tasks.
    pub detection: detection::DetectionView,
    /// The NATS bridge, when `agent.bridge` runs one.
    pub bridge: Option<daemoneye_eventbus_nats::BridgeStats>,
}

/// Events counted per topic by a task of their own (the agent's reports must never let the
/// subscription's queue fill: the client would stop reading, heartbeats included). One entry
/// per topic seen since the last report.
type Counts = Arc<parking_lot::Mutex<BTreeMap<String, u64>>>;

async fn count_events(mut events: Subscription, counts: Counts, totals: metrics::EventTotals) {
    loop {
        match events.recv().await {
            Ok(m) => {
                *counts.lock().entry(m.topic().to_string()).or_default() += 1;
                totals.lock().add(m.topic().as_str());
            }
            Err(daemoneye_eventbus::client::RecvError::Closed) => return,
            // A gap: the counts are a little low, and counting goes on.
            Err(_) => {}
        }
    }
}

/// The endpoint as a collector's `--socket` argument.
fn endpoint_arg(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Unix(p) => p.display().to_string(),
        other => other.to_string(),
    }
}

/// A running agent. Dropping it without [`Agent::shutdown`] leaves the collectors to the
/// supervisor's own teardown; call `shutdown` for the orderly path.
pub struct Agent {
    broker: Broker,
    client: Client,
    supervisor: Supervisor,
    counts: Counts,
    checks: Checks,
    before: Before,
    rpc_failures_before: u64,
    last: Instant,
    heartbeat_timeout: Duration,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lifecycle: daemoneye_eventbus::client::Service,
    detection: detection::SharedView,
    collection: tasks::Tasks,
    queries: daemoneye_eventbus::client::Service,
    #[cfg(feature = "http")]
    metrics: Option<MetricsServer>,
    bridge: Option<daemoneye_eventbus_nats::Bridge>,
}

impl Agent {
    /// Starts the broker on `endpoint` (and on `broker.tcp_listen` and `broker.tls` when
    /// configured), connects the agent's client, starts the collectors under the supervisor
    /// (each bound to the pid it runs as), serves the lifecycle service and starts health
    /// checks and event counting.
    ///
    /// # Errors
    ///
    /// [`AgentError`] saying which step failed and why.
    pub async fn start(
        config: AgentConfig,
        endpoint: Endpoint,
        options: AgentOptions,
    ) -> Result<Self, AgentError> {
        config.validate()?;
        // Bound first: an address not available stops the start before anything runs.
        #[cfg(feature = "http")]
        let metrics_listener = bind_metrics(&config.agent).await?;
        let mut broker_config = config.broker.clone();
        if broker_config.data_dir.is_none()
            && let Endpoint::Unix(path) = &endpoint
            && let Some(dir) = path.parent()
        {
            // Durable subscriptions outlive the agent: kept beside its private socket.
            broker_config.data_dir = Some(dir.join("state"));
        }
        let mut collectors = config.collectors(&endpoint_arg(&endpoint), &options.bundled_dir)?;
        // Besides the local socket: loopback TCP (broker.tcp_listen) and other hosts'
        // collectors over mutual TLS (broker.tls).
        let mut endpoints = vec![endpoint.clone()];
        if let Some(addr) = broker_config.tcp_listen {
            endpoints.push(Endpoint::Tcp(addr));
        }
        if let Some(tls) = &broker_config.tls {
            endpoints.push(tls.endpoint().map_err(|e| {
                AgentError::Config(ConfigError::Invalid {
                    path: None,
                    reason: format!("broker.tls: {e}"),
                })
            })?);
        }
        let broker = Broker::start_on(broker_config, &endpoints)
            .await
            .map_err(|source| AgentError::Broker {
                endpoint: endpoint.clone(),
                source: Box::new(source),
            })?;
        let mut client_options = ClientOptions::named(options.client_name.clone());
        config.rpc.apply_to(&mut client_options);
        let client = Client::connect(broker.inproc_endpoint(), client_options).await?;
        for c in &mut collectors {
            // Every collector learns where the broker is (unless its configuration says).
            c.env
                .entry("EVENTBUS_SOCKET".into())
                .or_insert_with(|| endpoint_arg(&endpoint));
        }
        // The broker learns which process each collector is: only it may use the
        // collector's name.
        let registry: Arc<dyn CollectorRegistry> = Arc::new(broker.clone());
        let supervisor = Supervisor::start_registered(
            config.process_manager.clone(),
            collectors,
            Some(client.clone()),
            config.rpc.clone(),
            Some(registry),
        )
        .await?;
        let rpc = CollectorRpcClient::new(client.clone(), &options.client_name, config.rpc.clone());
        let checks = Checks::default();
        let lifecycle = serve_services_at(
            &client,
            &[catalog::agent::lifecycle()],
            QueueGroup::new("agent").map_err(|e| {
                AgentError::Config(ConfigError::Invalid {
                    path: None,
                    reason: e.to_string(),
                })
            })?,
            Lifecycle {
                supervisor: supervisor.clone(),
                checks: checks.clone(),
                rpc: rpc.clone(),
            },
        )
        .await?;
        let counts = Counts::default();
        let events = client.subscribe(["events.#"]).await?;
        let rules_engine = |e: engine::EngineError| {
            AgentError::Config(ConfigError::Invalid {
                path: None,
                reason: format!("the rules' SQL engine: {e}"),
            })
        };
        let (rules, refused) =
            detection::load_rules(config.agent.rules_dir.as_deref()).map_err(rules_engine)?;
        let collection = tasks::Tasks::new(rpc.clone());
        let view = detection::SharedView::default();
        let detection = detection::Detection::new(
            rules,
            refused,
            collection.clone(),
            client.clone(),
            supervisor.clone(),
            checks.clone(),
            Duration::from_secs(config.agent.task_timeout_seconds),
            view.clone(),
        )
        .map_err(rules_engine)?;
        let queries = query::serve(
            &client,
            collection.clone(),
            supervisor.clone(),
            checks.clone(),
            Duration::from_secs(config.agent.task_timeout_seconds),
        )
        .await?;
        // The bridge connects like any other peer (not in process), so the broker's policy
        // decides what its inbound side may publish.
        let bridge = match &config.agent.bridge {
            Some(b) => Some(daemoneye_eventbus_nats::Bridge::start(b.clone(), &endpoint).await?),
            None => None,
        };
        let totals = metrics::EventTotals::default();
        #[cfg(feature = "http")]
        let probe = Probe::agent(
            broker.clone(),
            http::AgentParts {
                client: client.clone(),
                supervisor: supervisor.clone(),
                checks: checks.clone(),
                detection: view.clone(),
                collection: collection.clone(),
                events: totals.clone(),
                bridge: bridge
                    .as_ref()
                    .map(daemoneye_eventbus_nats::Bridge::stats_handle),
            },
        );
        #[cfg(feature = "http")]
        let metrics = match metrics_listener {
            Some((listener, addr)) => {
                let m = MetricsServer::serve(listener, addr, probe);
                tracing::info!(addr = %m.local_addr(), "serving /metrics, /healthz and /readyz");
                Some(m)
            }
            None => None,
        };
        let tasks = vec![
            tokio::spawn(detection.run()),
            tokio::spawn(count_events(events, counts.clone(), totals)),
            tokio::spawn(lifecycle::health_checks(
                rpc,
                supervisor.clone(),
                Duration::from_secs(config.rpc.health_check_interval_seconds),
                checks.clone(),
            )),
        ];
        Ok(Self {
            broker,
            client,
            supervisor,
            counts,
            checks,
            before: Before::default(),
            rpc_failures_before: 0,
            last: Instant::now(),
            heartbeat_timeout: Duration::from_secs(
                config.process_manager.health_check_interval_seconds,
            ),
            tasks,
            lifecycle,
            detection: view,
            collection,
            queries,
            #[cfg(feature = "http")]
            metrics,
            bridge,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, if they are (never without the
    /// feature `http`).
    #[must_use]
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "http")]
        return self.metrics.as_ref().map(MetricsServer::local_addr);
        #[cfg(not(feature = "http"))]
        None
    }

    /// The embedded broker.
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The agent's own client (in-process).
    #[must_use]
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The collector supervisor.
    #[must_use]
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Waits until every running collector was heard (its first heartbeat) and health-checked
    /// once, at most a heartbeat timeout (`process_manager.health_check_interval_seconds`): a
    /// report before would only say that they are starting.
    ///
    /// # Errors
    ///
    /// [`AgentError::Supervisor`] if the supervisor has stopped.
    pub async fn wait_until_heard(&self) -> Result<(), AgentError> {
        let by = tokio::time::Instant::now() + self.heartbeat_timeout;
        loop {
            let statuses = self.supervisor.status().await?;
            let checks = self.checks.lock().clone();
            if statuses.iter().all(|s| {
                s.state != CollectorState::Running || (s.heard() && check_of(&checks, s).is_some())
            }) || tokio::time::Instant::now() >= by
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status report: each part's health measured now, the broker's counters, each
    /// collector, and events per second by topic since the previous report.
    ///
    /// # Errors
    ///
    /// [`AgentError::Supervisor`] if the supervisor has stopped.
    pub async fn report(&mut self) -> Result<Report, AgentError> {
        let stats = self.broker.stats();
        let statuses = self.supervisor.status().await?;
        let secs = self.last.elapsed().as_secs_f64().max(0.001);
        self.last = Instant::now();
        let counted = std::mem::take(&mut *self.counts.lock());
        let events_per_sec = counted
            .into_iter()
            .map(|(t, n)| (t, (n as f64 / secs * 10.0).round() / 10.0))
            .collect();
        let metrics = self.client.rpc_metrics();
        let failures = metrics.errors_of("timeout") + metrics.errors_of("no_responders");
        let broker = broker_health(&stats, self.before);
        let rpc = rpc_health(failures.saturating_sub(self.rpc_failures_before));
        self.before = Before::of(&stats);
        self.rpc_failures_before = failures;
        let checks = self.checks.lock().clone();
        let collectors_health = lifecycle::collectors_part(&statuses, &checks);
        let health = broker.health.max(rpc.health).max(collectors_health.health);
        let now = SystemTime::now();
        let collectors = statuses
            .iter()
            .map(|s| view(s, check_of(&checks, s), now))
            .collect();
        Ok(Report {
            health,
            broker,
            rpc,
            collectors_health,
            collectors,
            published: stats.published,
            delivered: stats.delivered,
            dropped: stats.dropped,
            connections: stats.active_connections,
            events_per_sec,
            detection: {
                let mut d = self.detection.lock().clone();
                d.tasks = self.collection.view();
                d
            },
            bridge: self
                .bridge
                .as_ref()
                .map(daemoneye_eventbus_nats::Bridge::stats),
        })
    }

    /// Publishes `report` on `control.agent.status` (JSON); a failure is logged.
    pub async fn publish(&self, report: &Report) {
        match serde_json::to_vec(report) {
            Ok(body) => {
                if let Err(e) = self.client.publish(&catalog::agent::status(), body).await {
                    tracing::warn!(error = %e, "status report not published");
                }
            }
            Err(e) => tracing::warn!(error = %e, "status report not encoded"),
        }
    }

    /// Stops in order: the lifecycle service, the collectors (graceful shutdown, then
    /// signals), the agent's client, then the broker (draining sessions). Returns each
    /// collector's last status and the broker's shutdown report.
    pub async fn shutdown(self) -> (Vec<CollectorStatus>, ShutdownReport) {
        for t in &self.tasks {
            t.abort();
        }
        #[cfg(feature = "http")]
        if let Some(m) = &self.metrics {
            m.stop();
        }
        if let Some(b) = self.bridge {
            b.shutdown().await;
        }
        self.lifecycle.drain(Duration::from_secs(2)).await;
        self.queries.drain(Duration::from_secs(2)).await;
        let collectors = self.supervisor.shutdown().await;
        self.client.close().await;
        let report = self.broker.shutdown().await;
        (collectors, report)
    }
}

#[cfg(feature = "http")]
/// Binds the metrics endpoint where `agent.metrics_listen` says. The default address taken
/// by another process (a second agent on the host) is logged and the agent runs without it;
/// an address configured and not available is an error.
async fn bind_metrics(
    agent: &AgentSection,
) -> Result<Option<(tokio::net::TcpListener, std::net::SocketAddr)>, AgentError> {
    let Some(addr) = agent.metrics_addr()? else {
        return Ok(None);
    };
    let bound = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if agent.metrics_listen.is_none() && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "metrics not served: the default address is in use (set agent.metrics_listen)");
            return Ok(None);
        }
        Err(source) => return Err(AgentError::Metrics { addr, source }),
    };
    // The port actually bound (`:0` asks for any).
    let local = bound
        .local_addr()
        .map_err(|source| AgentError::Metrics { addr, source })?;
    Ok(Some((bound, local)))
}

/// A collector as the report shows it: its health from its last check of this run, or from
/// its state when it is not running or not checked yet.
fn view(s: &CollectorStatus, check: Option<lifecycle::Check>, now: SystemTime) -> CollectorView {
    let (health, health_reason, capabilities) = lifecycle::measured(s, check);
    CollectorView {
        id: s.id.clone(),
        collector_type: s.collector_type.clone(),
        capabilities,
        state: s.state.to_string(),
        pid: s.pid,
        uptime_secs: s.uptime.map(|u| u.as_secs()),
        restart_count: s.restart_count,
        last_exit: s.last_exit.clone(),
        heartbeat_age_secs: s
            .last_heartbeat
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
        health: health.as_str_name().to_owned(),
        health_reason,
    }
}
