//! netmond, the network collector (Linux): reads the kernel's TCP and UDP sockets every scan
//! interval — from the kernel's socket dump (`NETLINK_SOCK_DIAG`, [`diag`]) when it answers,
//! else from the tables `/proc/net/{tcp,tcp6,udp,udp6}` ([`procnet`]) — finds the process holding each new
//! socket through `/proc/<pid>/fd`, publishes each socket opened and closed on
//! `events.network.connections` and a snapshot of every socket on `events.network.batch`
//! (protobuf `NetworkEvent` / `NetworkBatch`), heartbeats on
//! `control.health.heartbeat.<id>`, and answers the collector services on
//! `control.collector.<id>`.
//!
//! A socket is reported if it is open at one scan: one opened and closed between two scans
//! is not seen (the documented minimum lifetime is one scan interval, default 500 ms). A
//! socket left to the kernel (TIME_WAIT, inode 0) counts as closed. Health is measured:
//! Unhealthy while the tables cannot be read, Degraded for a minute after lines did not parse
//! or events could not be published.

pub mod diag;
pub mod owners;
pub mod procnet;
pub mod tracker;

use daemoneye_eventbus_client::{Client, Publish};
use daemoneye_eventbus_collector::rpc::{CollectorConfig, HealthStatus, serve_collector};
pub use daemoneye_eventbus_collector::services::SourceChoice;
use daemoneye_eventbus_collector::services::{
    Basics, Collector, CollectorSettings, ConfigReader, Loss, Losses, Services, heartbeats, now_ns,
};
use daemoneye_eventbus_collector::tables::{Table, TableAsk, TaskSender, task_queue};
use daemoneye_eventbus_core::{Qos, catalog};
use daemoneye_eventbus_schema::{events as epb, rpc as pb};
use owners::Owner;
use procnet::{Proto, Socket};
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracker::Tracker;

/// The collector type announced in capabilities and configuration.
pub const COLLECTOR_TYPE: &str = "netmond";

/// What netmond can do, announced in capabilities (`network_connections`: it answers that
/// table).
pub const CAPABILITIES: [&str; 3] = [
    "network-connections",
    "network-snapshot",
    "network_connections",
];

/// Largest `events.network.batch` message (one snapshot may take several).
pub const BATCH_BYTES: usize = 512 * 1024;

/// The source in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The kernel's socket dump.
    Kernel,
    /// The `/proc/net` tables, and why not the dump (if it was tried).
    Proc {
        /// Why the dump is not used.
        why: Option<String>,
    },
}

impl Source {
    /// In words, for health messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Kernel => "sockets from the kernel's socket dump (sock_diag)".into(),
            Self::Proc { why: None } => "sockets from /proc/net".into(),
            Self::Proc { why: Some(w) } => {
                format!("sockets from /proc/net (the kernel's socket dump: {w})")
            }
        }
    }
}

/// netmond's settings (changeable at run time with the configuration service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How often the socket tables are read.
    pub scan_interval: Duration,
    /// How often a snapshot of every socket is published (zero: never).
    pub batch_interval: Duration,
    /// How often a heartbeat is published.
    pub heartbeat_interval: Duration,
    /// Where sockets are read from (chosen at start).
    pub source: SourceChoice,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            scan_interval: Duration::from_millis(500),
            batch_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            source: SourceChoice::Auto,
        }
    }
}

/// The topics netmond publishes on.
fn topics() -> Vec<String> {
    vec![
        catalog::network::connections().to_string(),
        catalog::network::batch().to_string(),
    ]
}

impl CollectorSettings for Settings {
    fn to_config(&self) -> CollectorConfig {
        let settings = [
            ("batch_interval_ms", self.batch_interval.as_millis()),
            ("heartbeat_interval_ms", self.heartbeat_interval.as_millis()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect();
        CollectorConfig {
            collector_type: COLLECTOR_TYPE.into(),
            scan_interval_ms: u32::try_from(self.scan_interval.as_millis()).unwrap_or(u32::MAX),
            settings,
            limits: None,
            enabled_topics: topics(),
        }
    }

    /// What netmond cannot change is refused, not acknowledged and ignored.
    fn updated(&self, c: &CollectorConfig) -> Result<Self, Vec<pb::ConfigValidationError>> {
        let mut r = ConfigReader::new(c, "netmond", COLLECTOR_TYPE);
        let mut s = self.clone();
        s.scan_interval = r.scan_interval(s.scan_interval);
        for (k, v) in &c.settings {
            match k.as_str() {
                "batch_interval_ms" => {
                    if let Some(d) = r.millis(k, v, 0) {
                        s.batch_interval = d;
                    }
                }
                "heartbeat_interval_ms" => {
                    if let Some(d) = r.millis(k, v, 100) {
                        s.heartbeat_interval = d;
                    }
                }
                other => r.unknown(other, "batch_interval_ms, heartbeat_interval_ms"),
            }
        }
        r.fixed(&topics(), "snapshots off with batch_interval_ms = 0");
        r.finish(s)
    }

    fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }
}

/// What netmond measured, for its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The last reading failed with this, and none succeeded since.
    pub scan_failing: Option<String>,
    /// Table lines that did not parse.
    pub malformed: Losses,
    /// Events that could not be published.
    pub publish_failures: Losses,
    /// How often the sockets are read.
    pub scan_interval: Duration,
    /// Sockets open at the last reading.
    pub sockets: u64,
    /// Where they are read from.
    pub source: Source,
}

/// The status and its reason, from what was measured (pure).
#[must_use]
pub fn assess(o: &Observed) -> (HealthStatus, String) {
    let what = format!(
        "{} every {} ms, {} open",
        o.source.describe(),
        o.scan_interval.as_millis(),
        o.sockets
    );
    if let Some(e) = &o.scan_failing {
        return (
            HealthStatus::Unhealthy,
            format!("reading sockets fails: {e}; {what}"),
        );
    }
    let mut problems = Vec::new();
    if o.malformed.recent() {
        problems.push(format!(
            "{} socket table lines did not parse, the last {} s ago",
            o.malformed.count,
            o.malformed.ago_secs()
        ));
    }
    if o.publish_failures.recent() {
        problems.push(format!(
            "{} events could not be published, the last {} s ago",
            o.publish_failures.count,
            o.publish_failures.ago_secs()
        ));
    }
    if problems.is_empty() {
        (HealthStatus::Healthy, what)
    } else {
        (
            HealthStatus::Degraded,
            format!("{}; {what}", problems.join("; ")),
        )
    }
}

/// Errors that stop netmond.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetmondError {
    /// `--source kernel` was asked for and the kernel's socket dump cannot be used.
    #[error("cannot use the kernel's socket dump: {0} (use --source auto or proc)")]
    Kernel(String),
    /// The kernel's socket dump failed.
    #[error("the kernel's socket dump failed: {0}")]
    Dump(String),
    /// The socket tables cannot be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The collector services could not be served.
    #[error("cannot serve control.collector.{id}: {message}")]
    Serve {
        /// The collector id.
        id: String,
        /// Why.
        message: String,
    },
}

struct Shared {
    basics: Basics<Settings>,
    scans: AtomicU64,
    sockets: AtomicU64,
    last_scan_us: AtomicU64,
    owners_found: AtomicU64,
    owners_missing: AtomicU64,
    descriptors_read: AtomicU64,
    malformed: Loss,
    scan_failing: Mutex<Option<String>>,
    source: Mutex<Source>,
    watching: tokio::sync::watch::Sender<bool>,
    /// Collection tasks for the scan loop, which owns the socket table.
    tasks: TaskSender,
}

impl Shared {
    fn settings(&self) -> Settings {
        self.basics.settings()
    }

    fn observed(&self) -> Observed {
        Observed {
            scan_failing: self
                .scan_failing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            malformed: self.malformed.seen(),
            publish_failures: self.basics.publish_failures.seen(),
            scan_interval: self.settings().scan_interval,
            sockets: self.sockets.load(Ordering::Relaxed),
            source: self
                .source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

impl Collector for Shared {
    type Settings = Settings;

    fn basics(&self) -> &Basics<Settings> {
        &self.basics
    }

    fn program(&self) -> &'static str {
        "netmond"
    }

    fn collector_type(&self) -> &'static str {
        COLLECTOR_TYPE
    }

    fn capabilities(&self) -> Vec<String> {
        CAPABILITIES.iter().map(|&c| c.to_owned()).collect()
    }

    fn health(&self) -> (HealthStatus, String) {
        assess(&self.observed())
    }

    fn tables(&self) -> &'static [Table] {
        &[Table::NetworkConnections]
    }

    // Its one table (the services pass only tables it lists).
    async fn rows(&self, _: Table, max_rows: usize) -> Result<pb::TableRows, String> {
        self.tasks.ask(max_rows).await
    }

    fn components(&self) -> HashMap<String, pb::ComponentHealth> {
        let (status, message) = self.health();
        [(
            "socket_tables".to_owned(),
            pb::ComponentHealth {
                status: status as i32,
                message,
            },
        )]
        .into()
    }

    fn metrics(&self) -> HashMap<String, f64> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        [
            ("sockets", l(&self.sockets)),
            ("scans", l(&self.scans)),
            ("events_published", l(&self.basics.published)),
            ("last_scan_ms", l(&self.last_scan_us) / 1000.0),
            ("heartbeats", self.basics.heartbeats() as f64),
            ("owners_found", l(&self.owners_found)),
            ("owners_missing", l(&self.owners_missing)),
            ("descriptors_read", l(&self.descriptors_read)),
            ("malformed_lines", self.malformed.count() as f64),
            (
                "publish_failures",
                self.basics.publish_failures.count() as f64,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// One reading of the four tables: the sockets, and the lines that did not parse.
fn read_tables(root: &Path) -> Result<(Vec<Socket>, usize), NetmondError> {
    let mut sockets = Vec::new();
    let mut bad = 0;
    for (name, proto) in procnet::TABLES {
        let path = root.join("net").join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6 / udp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name.ends_with('6') => {
                continue;
            }
            Err(source) => return Err(NetmondError::Proc { path, source }),
        };
        let (mut s, errors) = procnet::parse_table(&text, proto);
        if let Some(first) = errors.first() {
            tracing::warn!(file = %path.display(), error = %first, count = errors.len(), "socket table lines not parsed");
        }
        bad += errors.len();
        sockets.append(&mut s);
    }
    Ok((sockets, bad))
}

/// Where the scanner reads sockets.
enum Reader {
    #[cfg(target_os = "linux")]
    Kernel(diag::Dumper),
    Proc,
}

impl Reader {
    /// The reader `choice` asks for and the system allows, and the source it is.
    fn choose(choice: SourceChoice) -> Result<(Self, Source), NetmondError> {
        if choice == SourceChoice::Proc {
            return Ok((Self::Proc, Source::Proc { why: None }));
        }
        #[cfg(target_os = "linux")]
        let tried = diag::Dumper::open().map_err(|e| e.to_string());
        #[cfg(not(target_os = "linux"))]
        let tried: Result<std::convert::Infallible, String> =
            Err("not available on this system".into());
        match (tried, choice) {
            #[cfg(target_os = "linux")]
            (Ok(d), _) => Ok((Self::Kernel(d), Source::Kernel)),
            (Err(e), SourceChoice::Kernel) => Err(NetmondError::Kernel(e)),
            (Err(e), _) => Ok((Self::Proc, Source::Proc { why: Some(e) })),
        }
    }
}

/// The scanner's state, owned by the blocking reader between scans.
struct Scanner {
    reader: Reader,
    root: PathBuf,
    tracker: Tracker,
    /// Holders of the open sockets (pruned to them at each reading: bounded by the table).
    owners: HashMap<(Proto, u64), Owner>,
}

/// What one scan found.
struct Scan {
    opened: Vec<(Socket, Option<Owner>)>,
    closed: Vec<(Socket, Option<Owner>)>,
    malformed: usize,
    found: u64,
    missing: u64,
    descriptors: u64,
    open: u64,
}

impl Scanner {
    /// Reads the tables, finds the holders of new sockets, and says what changed.
    fn scan(&mut self) -> Result<Scan, NetmondError> {
        let (now, malformed) = match &mut self.reader {
            #[cfg(target_os = "linux")]
            Reader::Kernel(d) => (d.read().map_err(|e| NetmondError::Dump(e.to_string()))?, 0),
            Reader::Proc => read_tables(&self.root)?,
        };
        let changes = self.tracker.update(now);
        let wanted: HashSet<u64> = changes.opened.iter().map(|s| s.inode).collect();
        let (found, walk) =
            owners::find(&self.root, &wanted).map_err(|source| NetmondError::Proc {
                path: self.root.clone(),
                source,
            })?;
        let mut scan = Scan {
            opened: Vec::with_capacity(changes.opened.len()),
            closed: Vec::with_capacity(changes.closed.len()),
            malformed,
            found: 0,
            missing: 0,
            descriptors: walk.descriptors,
            open: self.tracker.len() as u64,
        };
        for s in changes.opened {
            let owner = found.get(&s.inode).cloned();
            if let Some(o) = &owner {
                scan.found += 1;
                self.owners.insert((s.proto, s.inode), o.clone());
            } else {
                scan.missing += 1;
            }
            scan.opened.push((s, owner));
        }
        for s in changes.closed {
            let owner = self.owners.remove(&(s.proto, s.inode));
            scan.closed.push((s, owner));
        }
        Ok(scan)
    }
}

fn event(
    s: &Socket,
    owner: Option<&Owner>,
    change: epb::SocketChange,
    at: u64,
) -> epb::NetworkEvent {
    epb::NetworkEvent {
        change: change as i32,
        protocol: match s.proto {
            Proto::Tcp => epb::Protocol::Tcp,
            Proto::Udp => epb::Protocol::Udp,
        } as i32,
        ip_version: if s.local.is_ipv4() { 4 } else { 6 },
        local_address: s.local.ip().to_string(),
        local_port: u32::from(s.local.port()),
        remote_address: s.remote.ip().to_string(),
        remote_port: u32::from(s.remote.port()),
        state: s.state_name().into(),
        inode: s.inode,
        uid: s.uid,
        pid: owner.map(|o| o.pid),
        process_name: owner.map(|o| o.name.clone()),
        observed_at_ns: at,
    }
}

/// The `network_connections` table: the sockets of the last reading, with their holders.
fn rows(id: &str, scanner: &Scanner, max_rows: usize) -> pb::TableRows {
    use daemoneye_eventbus_collector::tables::{Rows, int, null, text};
    let mut rows = Rows::new(Table::NetworkConnections, max_rows);
    for s in scanner.tracker.open() {
        let owner = scanner.owners.get(&(s.proto, s.inode));
        rows.push(vec![
            text(match s.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            }),
            text(if s.local.is_ipv4() { "ipv4" } else { "ipv6" }),
            text(s.local.ip().to_string()),
            int(s.local.port()),
            text(s.remote.ip().to_string()),
            int(s.remote.port()),
            text(s.state_name()),
            int(i64::try_from(s.inode).unwrap_or(i64::MAX)),
            int(s.uid),
            owner.map_or_else(null, |o| int(o.pid)),
            owner.map_or_else(null, |o| text(o.name.as_str())),
            text(id),
        ]);
    }
    rows.finish()
}

async fn send(client: &Client, shared: &Shared, p: Publish) {
    shared
        .basics
        .count_publish(client.publish_with(p.qos(Qos::Realtime)).await);
}

/// Publishes a snapshot of every open socket, in messages of at most [`BATCH_BYTES`].
async fn publish_batch(client: &Client, shared: &Shared, scanner: &Scanner) {
    let at = now_ns();
    let all: Vec<epb::NetworkEvent> = scanner
        .tracker
        .open()
        .map(|s| {
            event(
                s,
                scanner.owners.get(&(s.proto, s.inode)),
                epb::SocketChange::Present,
                at,
            )
        })
        .collect();
    let mut sockets = Vec::new();
    let mut bytes = 0;
    let send_batch = |sockets: Vec<epb::NetworkEvent>| {
        let batch = epb::NetworkBatch {
            collector_id: shared.basics.id().to_owned(),
            collected_at_ns: at,
            sockets,
        };
        send(
            client,
            shared,
            Publish::new(catalog::network::batch(), batch.encode_to_vec()),
        )
    };
    for e in all {
        let len = e.encoded_len() + 8;
        if bytes + len > BATCH_BYTES && !sockets.is_empty() {
            send_batch(std::mem::take(&mut sockets)).await;
            bytes = 0;
        }
        bytes += len;
        sockets.push(e);
    }
    send_batch(sockets).await;
}

/// Runs netmond as collector `id` on `client` until asked to shut down (RPC) or until
/// `stop` completes, reading the tables under `proc_root` (normally `/proc`).
///
/// # Errors
///
/// [`NetmondError`] when the tables cannot be read at start or the services cannot be
/// served.
pub async fn run(
    client: Client,
    id: &str,
    settings: Settings,
    proc_root: PathBuf,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), NetmondError> {
    let (tasks, asks) = task_queue("netmond");
    let shared = Arc::new(Shared {
        basics: Basics::new(id, settings),
        scans: AtomicU64::new(0),
        sockets: AtomicU64::new(0),
        last_scan_us: AtomicU64::new(0),
        owners_found: AtomicU64::new(0),
        owners_missing: AtomicU64::new(0),
        descriptors_read: AtomicU64::new(0),
        malformed: Loss::default(),
        scan_failing: Mutex::new(None),
        source: Mutex::new(Source::Proc { why: None }),
        watching: tokio::sync::watch::Sender::new(false),
        tasks,
    });
    let (reader, source) = Reader::choose(shared.settings().source)?;
    tracing::info!(source = %source.describe(), "sockets");
    *shared
        .source
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = source;
    // The first reading: what is open when netmond starts is its baseline, published in the
    // first snapshot, not as opened.
    let mut scanner = Scanner {
        reader,
        root: proc_root,
        tracker: Tracker::default(),
        owners: HashMap::new(),
    };
    let first = scanner.scan()?;
    shared.sockets.store(first.open, Ordering::Relaxed);
    let service = serve_collector(&client, id, Services(Arc::clone(&shared)))
        .await
        .map_err(|e| NetmondError::Serve {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
    shared.watching.send_replace(true);
    let scanning = scan_loop(client.clone(), Arc::clone(&shared), scanner, asks);
    tokio::select! {
        () = scanning => {}
        () = heartbeats(client.clone(), Arc::clone(&shared), shared.watching.subscribe()) => {}
        () = shared.basics.stopped() => tracing::info!("shutdown requested"),
        () = stop => {}
    }
    service.drain(Duration::from_secs(5)).await;
    client.drain().await;
    Ok(())
}

/// Reads the tables every scan interval (on a blocking thread), publishes what opened and
/// closed, and a snapshot every batch interval; between readings, answers collection tasks
/// from the last one.
async fn scan_loop(
    client: Client,
    shared: Arc<Shared>,
    scanner: Scanner,
    mut asks: tokio::sync::mpsc::Receiver<TableAsk>,
) {
    let mut scanner = Some(scanner);
    let mut last_batch: Option<Instant> = None;
    loop {
        let settings = shared.settings();
        let batch_due = !settings.batch_interval.is_zero()
            && last_batch.is_none_or(|t| t.elapsed() >= settings.batch_interval);
        if batch_due && let Some(s) = &scanner {
            publish_batch(&client, &shared, s).await;
            last_batch = Some(Instant::now());
        }
        let wake = tokio::time::Instant::now() + settings.scan_interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(wake) => break,
                Some((max_rows, answer)) = asks.recv() => {
                    if let Some(s) = &scanner {
                        let _ = answer.send(rows(shared.basics.id(), s, max_rows));
                    }
                }
            }
        }
        let Some(mut s) = scanner.take() else {
            return;
        };
        let began = Instant::now();
        let Ok((back, result)) = tokio::task::spawn_blocking(move || {
            let r = s.scan();
            (s, r)
        })
        .await
        else {
            tracing::error!("the socket table reader panicked");
            return;
        };
        scanner = Some(back);
        shared.scans.fetch_add(1, Ordering::Relaxed);
        shared.last_scan_us.store(
            u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let scan = match result {
            Ok(scan) => {
                *shared
                    .scan_failing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                scan
            }
            Err(e) => {
                tracing::warn!(error = %e, "socket tables not read");
                *shared
                    .scan_failing
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                continue;
            }
        };
        shared.malformed.add(scan.malformed as u64);
        shared.sockets.store(scan.open, Ordering::Relaxed);
        shared.owners_found.fetch_add(scan.found, Ordering::Relaxed);
        shared
            .owners_missing
            .fetch_add(scan.missing, Ordering::Relaxed);
        shared
            .descriptors_read
            .fetch_add(scan.descriptors, Ordering::Relaxed);
        let at = now_ns();
        let changes = scan
            .opened
            .iter()
            .map(|(s, o)| (s, o, epb::SocketChange::Opened))
            .chain(
                scan.closed
                    .iter()
                    .map(|(s, o)| (s, o, epb::SocketChange::Closed)),
            );
        for (s, o, change) in changes {
            let e = event(s, o.as_ref(), change, at);
            send(
                &client,
                &shared,
                Publish::new(catalog::network::connections(), e.encode_to_vec()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_is_applied_whole_or_refused_with_every_reason() {
        let mut c = Settings::default().to_config();
        c.scan_interval_ms = 200;
        assert_eq!(
            Settings::default().updated(&c).unwrap().scan_interval,
            Duration::from_millis(200)
        );
        c.scan_interval_ms = 10;
        c.settings.insert("colour".into(), "blue".into());
        c.limits = Some(pb::ResourceLimits::default());
        c.enabled_topics = vec!["events.network.connections".into()];
        let fields: Vec<String> = Settings::default()
            .updated(&c)
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(
            fields,
            [
                "scan_interval_ms",
                "settings.colour",
                "limits",
                "enabled_topics"
            ]
        );
    }

    #[test]
    fn health_is_measured() {
        let fine = Observed {
            scan_failing: None,
            malformed: Losses::default(),
            publish_failures: Losses::default(),
            scan_interval: Duration::from_millis(500),
            sockets: 3,
            source: Source::Kernel,
        };
        assert_eq!(assess(&fine).0, HealthStatus::Healthy);
        assert!(
            assess(&fine).1.contains("(sock_diag) every 500 ms, 3 open"),
            "{}",
            assess(&fine).1
        );
        let failing = Observed {
            scan_failing: Some("permission denied".into()),
            ..fine.clone()
        };
        assert_eq!(assess(&failing).0, HealthStatus::Unhealthy);
        let lossy = Observed {
            publish_failures: Losses {
                count: 2,
                since_last: Some(Duration::from_secs(1)),
            },
            ..fine.clone()
        };
        assert_eq!(assess(&lossy).0, HealthStatus::Degraded);
        let old = Observed {
            publish_failures: Losses {
                count: 2,
                since_last: Some(Duration::from_secs(600)),
            },
            ..fine
        };
        assert_eq!(assess(&old).0, HealthStatus::Healthy);
    }
}
