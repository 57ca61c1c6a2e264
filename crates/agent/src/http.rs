//! The metrics and health endpoints over HTTP/1.1 (`hyper`): `/metrics` (OpenMetrics text),
//! `/healthz` (the process answers) and `/readyz` (the broker is not shutting down and every
//! collector not stopped or paused by request runs and was checked healthy; 503 with the
//! reasons otherwise). A thin shell over [`Probe`] and
//! [`crate::metrics::encode`].
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once), a
//! request's head must arrive within [`HEAD_TIMEOUT`], every connection ends after one
//! response, and only `GET` and `HEAD` are served.

use crate::detection::SharedView;
use crate::lifecycle::{self, Checks};
use crate::metrics::{self, AgentScrape, EventTotals, ProcessUsage, Scrape};
use crate::tasks;
use bytes::Bytes;
use daemoneye_eventbus::Broker;
use daemoneye_eventbus::client::Client;
use daemoneye_eventbus::rpc::HealthStatus;
use daemoneye_eventbus::supervisor::{CollectorState, CollectorStatus, Supervisor};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Connections served at once at most; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 16;

/// How long a client may take to send a request's head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may last, response included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's parts a scrape reads.
#[derive(Clone)]
pub(crate) struct AgentParts {
    pub(crate) client: Client,
    pub(crate) supervisor: Supervisor,
    pub(crate) checks: Checks,
    pub(crate) detection: SharedView,
    pub(crate) collection: tasks::Tasks,
    pub(crate) events: EventTotals,
    pub(crate) bridge: Option<daemoneye_eventbus_nats::StatsHandle>,
}

impl AgentParts {
    /// Each collector's status and last health check, read now.
    async fn collectors(
        &self,
    ) -> Result<
        (
            Vec<CollectorStatus>,
            std::collections::BTreeMap<String, lifecycle::Check>,
        ),
        String,
    > {
        let statuses = self
            .supervisor
            .status()
            .await
            .map_err(|e| format!("the supervisor: {e}"))?;
        Ok((statuses, self.checks.lock().clone()))
    }
}

/// What the endpoints read: the broker alone (`eventbus serve`), or the agent's parts too.
#[derive(Clone)]
pub struct Probe {
    broker: Broker,
    agent: Option<AgentParts>,
}

impl Probe {
    /// A probe of a broker alone.
    #[must_use]
    pub fn broker(broker: Broker) -> Self {
        Self {
            broker,
            agent: None,
        }
    }

    pub(crate) fn agent(broker: Broker, parts: AgentParts) -> Self {
        Self {
            broker,
            agent: Some(parts),
        }
    }

    /// Every figure, read now.
    ///
    /// # Errors
    ///
    /// The supervisor did not answer (its collectors' figures would be missing).
    pub async fn scrape(&self) -> Result<Scrape, String> {
        let broker = self.broker.stats();
        let mut scrape = Scrape {
            broker,
            process: process_usage(),
            ..Scrape::default()
        };
        if let Some(a) = &self.agent {
            scrape.rpc = Some(a.client.rpc_metrics());
            let (statuses, checks) = a.collectors().await?;
            let now = SystemTime::now();
            let mut detection = a.detection.lock().clone();
            detection.tasks = a.collection.view();
            scrape.agent = Some(AgentScrape {
                collectors: statuses
                    .iter()
                    .map(|s| crate::view(s, lifecycle::check_of(&checks, s), now))
                    .collect(),
                detection,
                events: a.events.lock().entries(),
                bridge: a
                    .bridge
                    .as_ref()
                    .map(daemoneye_eventbus_nats::StatsHandle::stats),
            });
        }
        Ok(scrape)
    }

    /// `Ok` when the broker is not shutting down and every collector not stopped or paused by
    /// request runs and was checked healthy; else why not.
    ///
    /// # Errors
    ///
    /// The reason it is not ready, for the 503's body.
    pub async fn ready(&self) -> Result<(), String> {
        if self.broker.is_shutting_down() {
            return Err("the broker is shutting down".into());
        }
        let Some(a) = &self.agent else {
            return Ok(());
        };
        let (statuses, checks) = a.collectors().await?;
        let not = not_ready(&statuses, &checks);
        if not.is_empty() {
            Ok(())
        } else {
            Err(format!("collectors not healthy: {}", not.join("; ")))
        }
    }
}

/// The collectors that keep the agent from being ready, each with why: every collector as the
/// report measures it must run and have been checked healthy; one stopped or paused by
/// request (or not enabled) is not waited for.
fn not_ready(
    statuses: &[CollectorStatus],
    checks: &std::collections::BTreeMap<String, lifecycle::Check>,
) -> Vec<String> {
    statuses
        .iter()
        .filter(|s| !matches!(s.state, CollectorState::Stopped | CollectorState::Paused))
        .filter_map(|s| {
            let (health, reason, _) = lifecycle::measured(s, lifecycle::check_of(checks, s));
            (health != HealthStatus::Healthy)
                .then(|| format!("{} {}: {reason}", s.id, health.as_str_name()))
        })
        .collect()
}

/// The process's CPU time, resident memory and open descriptors.
fn process_usage() -> Option<ProcessUsage> {
    #[cfg(unix)]
    {
        use nix::sys::resource::{UsageWho, getrusage};
        let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb * 1024);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Some(ProcessUsage {
            cpu_seconds: secs(usage.user_time()) + secs(usage.system_time()),
            resident_bytes,
            open_fds,
        })
    }
    #[cfg(not(unix))]
    None
}

/// A running endpoint; stopped by [`MetricsServer::stop`] or when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Listens on `addr` and serves `probe`.
    ///
    /// # Errors
    ///
    /// The address cannot be bound (in use, not local, not permitted).
    pub async fn start(addr: SocketAddr, probe: Probe) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        Ok(Self::serve(listener, addr, probe))
    }

    /// Serves `probe` on a listener bound beforehand at `addr` (the agent binds before it
    /// starts anything, so an address not available stops it before any collector runs).
    pub fn serve(listener: tokio::net::TcpListener, addr: SocketAddr, probe: Probe) -> Self {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics and health are served beyond loopback, without authentication");
        }
        let task = tokio::spawn(accept_loop(listener, probe));
        Self { addr, task }
    }

    /// Where it listens.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and ends the connections being served.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, probe: Probe) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    // Dropped with this task: every connection ends with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors, usually: wait a little rather than spin.
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::debug!("metrics endpoint: too many connections; one closed");
                    continue;
                };
                let probe = probe.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    let service = hyper::service::service_fn(move |req| {
                        let probe = probe.clone();
                        async move { Ok::<_, std::convert::Infallible>(respond(&probe, &req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .keep_alive(false)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics endpoint: a connection failed"),
                        Err(_) => tracing::debug!("metrics endpoint: a connection took too long; closed"),
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn respond(probe: &Probe, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut response = match req.uri().path() {
        // A partial scrape would hide what is missing: none at all, with the reason.
        "/metrics" => match probe.scrape().await {
            Ok(scrape) => {
                let body = metrics::encode(scrape);
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(metrics::CONTENT_TYPE),
                );
                r
            }
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("no figures: {why}\n"),
            ),
        },
        "/healthz" => text(StatusCode::OK, "alive\n"),
        "/readyz" => match probe.ready().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz and /readyz are served\n",
        ),
    };
    if req.method() == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: &str, state: CollectorState, pid: Option<u32>) -> CollectorStatus {
        CollectorStatus {
            id: id.into(),
            collector_type: id.into(),
            heartbeats: true,
            state,
            pid,
            uptime: None,
            restart_count: 0,
            last_exit: None,
            last_heartbeat: None,
        }
    }

    fn check(pid: u32, health: HealthStatus) -> lifecycle::Check {
        lifecycle::Check {
            pid,
            at: std::time::Instant::now(),
            health,
            message: "said so".into(),
            collector_type: String::new(),
            capabilities: Vec::new(),
            task_capacity: 0,
        }
    }

    #[test]
    fn ready_waits_for_checked_healthy_collectors_not_for_those_stopped_by_request() {
        let mut checks = std::collections::BTreeMap::new();
        checks.insert("a".to_owned(), check(1, HealthStatus::Healthy));
        let running = st("a", CollectorState::Running, Some(1));
        assert!(not_ready(std::slice::from_ref(&running), &checks).is_empty());
        // Not checked yet, failed, unhealthy by its own word: not ready, named.
        let unchecked = st("b", CollectorState::Running, Some(2));
        let failed = st("c", CollectorState::Failed, None);
        checks.insert("d".to_owned(), check(4, HealthStatus::Unhealthy));
        let sick = st("d", CollectorState::Running, Some(4));
        let not = not_ready(&[running.clone(), unchecked, failed, sick], &checks);
        assert_eq!(not.len(), 3, "{not:?}");
        assert!(not[0].starts_with("b ") && not[1].starts_with("c ") && not[2].starts_with("d "));
        // Stopped or paused by request: not waited for.
        let stopped = st("e", CollectorState::Stopped, None);
        let paused = st("f", CollectorState::Paused, Some(6));
        assert!(not_ready(&[running, stopped, paused], &checks).is_empty());
    }
}
