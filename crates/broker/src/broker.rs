//! The broker: listeners, sessions, statistics and the one shutdown path.

use crate::config::{BrokerConfig, ConfigError};
use crate::hub::Hub;
use crate::session;
use crate::stats::BrokerStats;
use crate::stats::Counters;
use daemoneye_eventbus_core::{TopicFilter, catalog};
use daemoneye_eventbus_transport::{Endpoint, Listener, TransportError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
    /// The data directory cannot be used (unsafe, held by another broker, or written by a
    /// newer build).
    #[error("cannot use the data directory")]
    Store(#[from] daemoneye_eventbus_store::StoreError),
    /// `acl_file` could not be read or is not a policy.
    #[error("cannot use broker.acl_file: {0}")]
    Acl(#[from] crate::acl::PolicyError),
    /// The runtime stopped while the broker was starting.
    #[error("the async runtime stopped while the broker was starting")]
    Interrupted,
    /// The start took longer than `startup_timeout_seconds`.
    #[error(
        "the broker did not start within startup_timeout_seconds ({secs} s): {doing}; raise \
         it, or see why (a slow disk, or another broker holding the data directory)"
    )]
    StartupTimeout {
        /// The limit.
        secs: u64,
        /// What it was doing.
        doing: &'static str,
    },
    /// `tls` could not be used: a certificate, key or CA file is missing or wrong.
    #[error("cannot use broker.tls: {0}")]
    Tls(#[source] TransportError),
    /// `audit_log` could not be opened.
    #[error("cannot use broker.audit_log {path}: {source}")]
    Audit {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Gives the socket at `path` to group `gid`, mode 0660 (`BrokerConfig::socket_group`).
#[cfg(unix)]
fn share_socket(path: &std::path::Path, gid: u32) -> Result<(), TransportError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error, what: &str| TransportError::UnsafePath {
        path: path.to_path_buf(),
        reason: format!("{what}: {e}"),
    };
    nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
        io(
            e.into(),
            &format!("could not give the socket to group {gid} (socket_group)"),
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| io(e, "could not make the socket mode 0660 (socket_group)"))
}

#[cfg(unix)]
fn own_uid() -> Option<u32> {
    Some(nix::unistd::geteuid().as_raw())
}

#[cfg(not(unix))]
fn own_uid() -> Option<u32> {
    None
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
    hub: Arc<Hub>,
    endpoints: Arc<Vec<Endpoint>>,
    _stop_on_drop: Arc<StopOnDrop>,
}

/// Starts the shutdown sequence when the last [`Broker`] handle goes away.
struct StopOnDrop(Arc<Hub>);

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
    /// address, the optional mutual TLS address (`tls`), and an in-process endpoint.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Config`] for values that cannot work, [`BrokerError::Bind`] when an
    /// endpoint cannot be bound (for example a live broker already owns the socket).
    pub async fn start(config: BrokerConfig) -> Result<Self, BrokerError> {
        let mut endpoints = vec![match &config.socket_path {
            Some(path) => Endpoint::Unix(path.clone()),
            None => daemoneye_eventbus_transport::default_endpoint().map_err(|source| {
                BrokerError::Bind {
                    endpoint: Endpoint::Unix(std::path::PathBuf::from("(default)")),
                    source,
                }
            })?,
        }];
        if let Some(addr) = config.tcp_listen {
            endpoints.push(Endpoint::Tcp(addr));
        }
        if let Some(tls) = &config.tls {
            endpoints.push(tls.endpoint()?);
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
        let started = std::time::Instant::now();
        config.validate()?;
        // Read before anything listens: a broker never runs without the policy it was given.
        let policy = config
            .acl_file
            .as_deref()
            .map(crate::acl::Policy::load)
            .transpose()?;
        let mut all = endpoints.to_vec();
        let n = INPROC_SEQ.fetch_add(1, Ordering::Relaxed);
        all.push(Endpoint::InProc(format!(
            "broker-{}-{n}",
            std::process::id()
        )));
        // A `tls://` endpoint listens with `config.tls`'s certificates, read before anything
        // listens.
        let tls = match (
            &config.tls,
            all.iter().find(|e| matches!(e, Endpoint::Tls(_))),
        ) {
            (_, None) => None,
            (Some(tls), Some(_)) => Some(
                daemoneye_eventbus_transport::tls::ServerTls::load(&tls.files())
                    .map_err(BrokerError::Tls)?,
            ),
            (None, Some(endpoint)) => {
                return Err(BrokerError::Tls(TransportError::TlsNotConfigured(
                    endpoint.clone(),
                )));
            }
        };
        let mut listeners = Vec::with_capacity(all.len());
        for endpoint in &all {
            let l = Listener::bind_with(endpoint, tls.as_ref())
                .await
                .map_err(|source| BrokerError::Bind {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            #[cfg(unix)]
            if let (Some(gid), Endpoint::Unix(path)) = (config.socket_group, endpoint) {
                share_socket(path, gid).map_err(|source| BrokerError::Bind {
                    endpoint: endpoint.clone(),
                    source,
                })?;
            }
            listeners.push(l);
        }
        let allowed_uids = if config.allowed_uids.is_empty() {
            own_uid().into_iter().chain([0]).collect()
        } else {
            config.allowed_uids.clone()
        };
        let audit = match &config.audit_log {
            Some(path) => Some(
                crate::audit::AuditLog::open(
                    path,
                    crate::audit::Rotation {
                        max_bytes: config.audit_max_bytes,
                    },
                )
                .map_err(|source| BrokerError::Audit {
                    path: path.clone(),
                    source,
                })?,
            ),
            None => None,
        };
        let hub = Arc::new(Hub::new(config, allowed_uids));
        hub.set_policy(policy);
        hub.set_audit(audit);
        // Reading back the durable subscriptions may take a while (a large data directory, a
        // log another broker still holds): off this thread, within the startup deadline.
        let limit = Duration::from_secs(hub.config.startup_timeout_seconds);
        let left = limit.saturating_sub(started.elapsed());
        let restoring = tokio::task::spawn_blocking({
            let hub = Arc::clone(&hub);
            move || hub.restore_durables()
        });
        match tokio::time::timeout(left, restoring).await {
            Ok(Ok(restored)) => restored?,
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(_)) => return Err(BrokerError::Interrupted),
            Err(_) => {
                return Err(BrokerError::StartupTimeout {
                    secs: limit.as_secs(),
                    doing: "reading back the durable subscriptions of data_dir",
                });
            }
        }
        let endpoints = listeners.iter().map(|l| l.endpoint().clone()).collect();
        for listener in listeners {
            hub.tracker.spawn(accept_loop(Arc::clone(&hub), listener));
        }
        if hub.config.enable_statistics {
            hub.tracker.spawn(stats_loop(Arc::clone(&hub)));
        }
        if hub.config.data_dir.is_some() {
            hub.tracker.spawn(persist_loop(Arc::clone(&hub)));
        }
        Ok(Self {
            _stop_on_drop: Arc::new(StopOnDrop(Arc::clone(&hub))),
            hub,
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
        &self.hub.config
    }

    /// A statistics snapshot.
    pub fn stats(&self) -> BrokerStats {
        self.hub.stats()
    }

    /// Reads `acl_file` again and puts it in force for every connection (their next frames
    /// are checked against it). Returns how many rules it has.
    ///
    /// # Errors
    ///
    /// The file could not be read or is not a policy: the policy in force stays, and the
    /// error says why. A broker without `acl_file` has nothing to read.
    pub fn reload_acl(&self) -> Result<usize, crate::acl::PolicyError> {
        self.hub.reload_acl()
    }

    /// Binds collector `id` to the process `pid` a supervisor started: only that process may
    /// connect under the name `id`; its connections are the identity `collector = id` for
    /// the policy, which lets it publish on `events` (the `{events}` of a rule), and are
    /// outside `max_connections` and `max_connections_per_identity` (a collector always has
    /// room). A new pid for the same id replaces the old.
    pub fn register_collector(&self, id: &str, pid: u32, events: &[TopicFilter]) {
        if let Ok(pid) = i32::try_from(pid) {
            self.hub.register_collector(id, pid, events);
        }
    }

    /// Forgets the collector process `pid` (it ended): its name is free again.
    pub fn unregister_collector(&self, pid: u32) {
        if let Ok(pid) = i32::try_from(pid) {
            self.hub.unregister_collector(pid);
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.hub.drain.is_cancelled()
    }

    /// Shuts down: stop accepting (the socket file is removed), tell every session to drain
    /// (each gets a going-away frame after its queued messages), wait up to
    /// `shutdown_timeout_ms`, then tear down what overran and report it.
    pub async fn shutdown(&self) -> ShutdownReport {
        let s = &self.hub;
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

async fn accept_loop(hub: Arc<Hub>, mut listener: Listener) {
    loop {
        let accepted = tokio::select! {
            () = hub.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(incoming) => {
                hub.tracker
                    .spawn(session::serve(Arc::clone(&hub), incoming));
            }
            Err(e) => {
                // Usually descriptor exhaustion: back off briefly instead of spinning.
                tracing::warn!(endpoint = %listener.endpoint(), error = %e, "accept failed");
                tokio::select! {
                    () = hub.stop_accepting.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// Writes what durable subscriptions kept and had acknowledged to their logs: to the disk
/// every `fsync_interval_ms` under `fsync = interval`; at the same pace, to the operating system
/// only, under `never` (acknowledgements; kept messages are written before their publisher's
/// ACK); and a last time at shutdown.
async fn persist_loop(hub: Arc<Hub>) {
    let every = Duration::from_millis(hub.config.fsync_interval_ms);
    let sync = hub.config.fsync != crate::config::FsyncPolicy::Never;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = hub.drain.cancelled() => break,
            _ = tick.tick() => {
                let jobs = hub.persist_durables(sync);
                if jobs.is_empty() {
                    continue;
                }
                // The broker's thread goes on routing while the disk syncs.
                let n = jobs.len() as u64;
                let synced = tokio::task::spawn_blocking(move || {
                    jobs.into_iter().map(|j| j.run()).filter_map(Result::err).collect::<Vec<_>>()
                })
                .await
                .unwrap_or_default();
                Counters::add(&hub.counters.store_syncs, n - synced.len() as u64);
                for e in synced {
                    Counters::add(&hub.counters.store_errors, 1);
                    tracing::error!(error = %e, "could not sync a durable subscription's log");
                }
            }
        }
    }
    // Sessions persist what they route before each ACK; what was acknowledged since the
    // last tick is written once more.
    for job in hub.persist_durables(sync) {
        if let Err(e) = job.run() {
            Counters::add(&hub.counters.store_errors, 1);
            tracing::error!(error = %e, "could not sync a durable subscription's log");
        }
    }
}

async fn stats_loop(hub: Arc<Hub>) {
    let every = Duration::from_secs(hub.config.stats_interval_secs);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            () = hub.drain.cancelled() => break,
            _ = tick.tick() => hub.publish_sys(catalog::sys::stats(), hub.stats_json()),
        }
    }
}
