//! procmond, the process collector: scans `/proc`, publishes process starts and exits on
//! `events.process.lifecycle`, periodic snapshots on `events.process.batch`, optional
//! executable digests on `events.process.integrity`, heartbeats on
//! `control.health.heartbeat.<id>`, and answers the collector services on
//! `control.collector.<id>` (health, heartbeat, metrics, configuration, capabilities,
//! shutdown).
//!
//! Process events come from the kernel's process-events connector when procmond may listen
//! to it (Linux, `CAP_NET_ADMIN`, the initial namespaces: [`connector`]): every fork, exec
//! and exit as it happens, so even a process that lives a millisecond is reported, with what
//! `/proc` still shows of it; `/proc` is read again every [`RECONCILE_SCANS`] scan intervals
//! to fill in and to catch what was lost. Otherwise procmond scans `/proc`: a process that
//! lives at least one scan interval is seen, its start reported at the first scan after it
//! appeared and its exit at the first scan after it was gone, so both within one interval
//! (default 500 ms). A process that runs another program (`exec`) is reported with
//! `metadata.event = "exec"`. Every event says its `metadata.source` (`kernel` or `proc`).
//!
//! Health is measured ([`health`]): Unhealthy while `/proc` cannot be read, Degraded for a
//! minute after events were lost, could not be published, or executables went unhashed.

pub mod coalesce;
pub mod connector;
pub mod health;
pub mod procfs;

use connector::Seen;
use daemoneye_eventbus_client::{Client, Publish};
use daemoneye_eventbus_collector::rpc::{CollectorConfig, HealthStatus, serve_collector};
pub use daemoneye_eventbus_collector::services::SourceChoice;
use daemoneye_eventbus_collector::services::{
    Basics, Collector, CollectorSettings, ConfigReader, Loss, Services, heartbeats, now_ns,
};
use daemoneye_eventbus_collector::tables::{Table, TableAsk, TaskSender, task_queue};
use daemoneye_eventbus_collector::{CollectionEvent, ProcessEvent};
use daemoneye_eventbus_core::{Qos, catalog};
use daemoneye_eventbus_schema::{events as epb, rpc as pb};
use procfs::{ProcInfo, Snapshot};
use prost::Message as _;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

/// Largest `events.process.batch` message (one snapshot may take several).
pub const BATCH_BYTES: usize = 512 * 1024;

/// The collector type announced in capabilities and configuration.
pub const COLLECTOR_TYPE: &str = "procmond";

/// What procmond can do, announced in capabilities (`processes`: it answers that table).
pub const CAPABILITIES: [&str; 4] = [
    "process-lifecycle",
    "process-snapshot",
    "executable-hash",
    "processes",
];

/// procmond's settings (changeable at run time with the configuration service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How often `/proc` is scanned.
    pub scan_interval: Duration,
    /// How often a snapshot of every process is published (zero: never).
    pub batch_interval: Duration,
    /// How often a heartbeat is published.
    pub heartbeat_interval: Duration,
    /// Publish the SHA-256 of each new process's executable.
    pub hash_executables: bool,
    /// Where process events come from (chosen at start).
    pub source: SourceChoice,
}

/// With the kernel's events, `/proc` is read again every this many scan intervals.
pub const RECONCILE_SCANS: u32 = 10;

impl Default for Settings {
    fn default() -> Self {
        Self {
            scan_interval: Duration::from_millis(500),
            batch_interval: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            hash_executables: false,
            source: SourceChoice::Auto,
        }
    }
}

impl CollectorSettings for Settings {
    fn to_config(&self) -> CollectorConfig {
        let mut settings = HashMap::new();
        settings.insert(
            "batch_interval_ms".into(),
            self.batch_interval.as_millis().to_string(),
        );
        settings.insert(
            "heartbeat_interval_ms".into(),
            self.heartbeat_interval.as_millis().to_string(),
        );
        settings.insert("hash_executables".into(), self.hash_executables.to_string());
        CollectorConfig {
            collector_type: COLLECTOR_TYPE.into(),
            scan_interval_ms: u32::try_from(self.scan_interval.as_millis()).unwrap_or(u32::MAX),
            settings,
            limits: None,
            enabled_topics: vec![
                catalog::process::lifecycle().to_string(),
                catalog::process::batch().to_string(),
                catalog::process::integrity().to_string(),
            ],
        }
    }

    /// What procmond cannot change is refused, not acknowledged and ignored.
    fn updated(&self, c: &CollectorConfig) -> Result<Self, Vec<pb::ConfigValidationError>> {
        let mut r = ConfigReader::new(c, "procmond", COLLECTOR_TYPE);
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
                "hash_executables" => {
                    if let Some(b) = r.flag(k, v) {
                        s.hash_executables = b;
                    }
                }
                other => r.unknown(
                    other,
                    "batch_interval_ms, heartbeat_interval_ms, hash_executables",
                ),
            }
        }
        r.fixed(
            &Self::default().to_config().enabled_topics,
            "process events, snapshots with batch_interval_ms = 0, digests with hash_executables",
        );
        r.finish(s)
    }

    fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }
}

/// Errors that stop procmond.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcmondError {
    /// `/proc` cannot be read.
    #[error("cannot read {path}: {source}")]
    Proc {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--source kernel` was asked for and the connector cannot be used.
    #[error(
        "cannot listen to the kernel's process events: {0} (run as root, in the initial namespaces, or use --source auto)"
    )]
    Connector(std::io::Error),
    /// The scanner's task ended abnormally (a bug: it panicked).
    #[error("the scanner stopped: {0}")]
    Scanner(String),
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
    /// The QoS of process events (starts, exits, snapshots, digests): `Processed` when they
    /// must survive a broker restart (with the client's spool), `Realtime` otherwise.
    /// Heartbeats are always `Realtime`: their worth is that they are recent.
    events: Qos,
    scans: AtomicU64,
    processes: AtomicU64,
    last_scan_us: AtomicU64,
    /// Executables not hashed because the hasher's queue was full.
    hashes_skipped: Loss,
    /// Times process events were lost.
    events_lost: Loss,
    /// Kernel events received.
    kernel_events: AtomicU64,
    /// The last read of `/proc` failed with this (none succeeded since).
    scan_failing: Mutex<Option<String>>,
    /// Where process events come from.
    source: Mutex<health::Source>,
    /// Set once the first reading of `/proc` is done: procmond watches from then on, and its
    /// heartbeats say so (none before).
    watching: tokio::sync::watch::Sender<bool>,
    /// Collection tasks for the scanner, which owns the process table.
    tasks: TaskSender,
}

impl Shared {
    fn settings(&self) -> Settings {
        self.basics.settings()
    }

    fn source(&self) -> health::Source {
        self.source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_source(&self, source: health::Source) {
        tracing::info!(source = %source.describe(), "process events");
        *self
            .source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = source;
    }

    /// The status and its reason, from what was measured.
    fn health(&self) -> (HealthStatus, String) {
        health::assess(&health::Observed {
            source: self.source(),
            scan_failing: self
                .scan_failing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
            events_lost: self.events_lost.seen(),
            publish_failures: self.basics.publish_failures.seen(),
            hashes_skipped: self.hashes_skipped.seen(),
        })
    }
}

/// Runs procmond as collector `id` on `client` until asked to shut down (RPC) or until
/// `stop` completes; publishes from `proc_root` (normally `/proc`), process events with QoS
/// `events` (`Processed` to have the broker acknowledge each, and the client's spool keep
/// them while the broker is away).
///
/// # Errors
///
/// [`ProcmondError`] when `/proc` cannot be read at start or the services cannot be served.
pub async fn run(
    client: Client,
    id: &str,
    settings: Settings,
    proc_root: PathBuf,
    events: Qos,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ProcmondError> {
    let (tasks, asks) = task_queue("procmond");
    let shared = Arc::new(Shared {
        basics: Basics::new(id, settings.clone()),
        events,
        scans: AtomicU64::new(0),
        processes: AtomicU64::new(0),
        last_scan_us: AtomicU64::new(0),
        hashes_skipped: Loss::default(),
        events_lost: Loss::default(),
        kernel_events: AtomicU64::new(0),
        scan_failing: Mutex::new(None),
        source: Mutex::new(health::Source::Proc {
            every: settings.scan_interval,
            why: None,
        }),
        watching: tokio::sync::watch::Sender::new(false),
        tasks,
    });
    // Before subscribing: a process that starts later has a start time at least this.
    let before_subscribing = boot_ticks();
    let kernel = kernel_events(&shared, &settings, &proc_root)?;
    let subscribed = kernel.as_ref().and(before_subscribing);
    let boot = procfs::parse_boot_time(&std::fs::read_to_string(proc_root.join("stat")).map_err(
        |source| ProcmondError::Proc {
            path: proc_root.join("stat"),
            source,
        },
    )?)
    .unwrap_or(0);
    let service = serve_collector(&client, id, Services(Arc::clone(&shared)))
        .await
        .map_err(|e| ProcmondError::Serve {
            id: id.to_owned(),
            message: e.to_string(),
        })?;
    let (hash_jobs, jobs) = tokio::sync::mpsc::channel(HASH_QUEUE);
    let hasher = Hasher {
        client: client.clone(),
        shared: Arc::clone(&shared),
        jobs,
        hashed: HashMap::new(),
    };
    let scanner = Scanner {
        client: client.clone(),
        shared: Arc::clone(&shared),
        root: proc_root,
        boot_secs: boot,
        ticks_per_sec: clock_ticks(),
        users: HashMap::new(),
        hash_jobs,
        recent_exits: HashMap::new(),
        exit_code: None,
        after_subscription: HashSet::new(),
        asks,
    };
    // The scanner on a task of its own: a batch of the kernel's events wakes it alone.
    let mut scanning = tokio::spawn(scanner.run(kernel, subscribed));
    let hashing = tokio::spawn(hasher.run());
    tokio::select! {
        r = &mut scanning => r.map_err(|e| ProcmondError::Scanner(e.to_string()))??,
        () = heartbeats(client.clone(), Arc::clone(&shared), shared.watching.subscribe()) => {}
        () = shared.basics.stopped() => tracing::info!("shutdown requested"),
        () = stop => {}
    }
    scanning.abort();
    hashing.abort();
    service.drain(Duration::from_secs(5)).await;
    client.drain().await;
    Ok(())
}

/// The kernel's process events, as `settings.source` asks and the system allows; the source
/// in use is set in `shared` either way.
#[cfg(target_os = "linux")]
fn kernel_events(
    shared: &Shared,
    settings: &Settings,
    proc_root: &std::path::Path,
) -> Result<Option<connector::Listener>, ProcmondError> {
    if settings.source == SourceChoice::Proc {
        return Ok(None);
    }
    match connector::Listener::start(proc_root, settings.hash_executables) {
        Ok(l) => {
            shared.set_source(health::Source::Kernel {
                reconcile: settings.scan_interval * RECONCILE_SCANS,
            });
            Ok(Some(l))
        }
        Err(e) if settings.source == SourceChoice::Kernel => Err(ProcmondError::Connector(e)),
        Err(e) => {
            shared.set_source(health::Source::Proc {
                every: settings.scan_interval,
                why: Some(e.to_string()),
            });
            Ok(None)
        }
    }
}

/// Off Linux there is no connector: `/proc` scanning, or (asked for the kernel) an error.
#[cfg(not(target_os = "linux"))]
fn kernel_events(
    shared: &Shared,
    settings: &Settings,
    _proc_root: &std::path::Path,
) -> Result<Option<std::convert::Infallible>, ProcmondError> {
    let why = "the proc connector exists on Linux only".to_owned();
    if settings.source == SourceChoice::Kernel {
        return Err(ProcmondError::Connector(std::io::Error::other(why)));
    }
    shared.set_source(health::Source::Proc {
        every: settings.scan_interval,
        why: (settings.source == SourceChoice::Auto).then_some(why),
    });
    Ok(None)
}

#[cfg(unix)]
fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

#[cfg(not(unix))]
fn clock_ticks() -> u64 {
    100
}

#[cfg(target_os = "linux")]
type KernelSource = connector::Listener;
#[cfg(not(target_os = "linux"))]
type KernelSource = std::convert::Infallible;

/// The kernel's events as the scanner reads them, with the losses it has reported.
struct Kernel {
    #[cfg(target_os = "linux")]
    listener: connector::Listener,
    reported_lost: u64,
}

#[cfg(target_os = "linux")]
impl From<connector::Listener> for Kernel {
    fn from(listener: connector::Listener) -> Self {
        Self {
            listener,
            reported_lost: 0,
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl From<std::convert::Infallible> for Kernel {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

impl Kernel {
    /// Whether starts are handed over at once (see [`connector::Listener::starts_at_once`]).
    fn set_starts_at_once(&self, at_once: bool) {
        #[cfg(target_os = "linux")]
        self.listener
            .starts_at_once
            .store(at_once, Ordering::Relaxed);
        #[cfg(not(target_os = "linux"))]
        let _ = at_once;
    }

    /// Losses since the last call (each one means `/proc` must be read again).
    fn new_losses(&mut self) -> u64 {
        #[cfg(target_os = "linux")]
        {
            let c = &self.listener.counts;
            c.resync.store(false, Ordering::Release);
            let lost = c.lost.load(Ordering::Relaxed);
            let new = lost - self.reported_lost;
            self.reported_lost = lost;
            new
        }
        #[cfg(not(target_os = "linux"))]
        self.reported_lost
    }
}

/// The next batch of kernel events; never, without them; `None` when they stopped.
async fn next_batch(kernel: &mut Option<Kernel>) -> Option<Vec<connector::Observed>> {
    match kernel {
        #[cfg(target_os = "linux")]
        Some(k) => k.listener.events.recv().await,
        _ => std::future::pending().await,
    }
}

/// Clock ticks since boot now (what `/proc/PID/stat` counts a process's start in).
#[cfg(target_os = "linux")]
fn boot_ticks() -> Option<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let ticks = clock_ticks();
    Some(
        u64::try_from(t.tv_sec()).ok()? * ticks
            + u64::try_from(t.tv_nsec()).ok()? * ticks / 1_000_000_000,
    )
}

#[cfg(not(target_os = "linux"))]
fn boot_ticks() -> Option<u64> {
    None
}

/// The key of the process `pid` in `known`, if there is one.
fn known_pid(known: &Snapshot, pid: u32) -> Option<(u32, u64)> {
    known
        .range((pid, 0)..=(pid, u64::MAX))
        .next()
        .map(|(k, _)| *k)
}

struct Scanner {
    client: Client,
    shared: Arc<Shared>,
    root: PathBuf,
    boot_secs: u64,
    ticks_per_sec: u64,
    users: HashMap<u32, Option<String>>,
    /// Executables to hash, for the [`Hasher`].
    hash_jobs: tokio::sync::mpsc::Sender<HashJob>,
    /// Processes whose exit was reported: pid → start ticks (0 when unknown) and when. Their
    /// exit is not reported again, nor the same process (pid and start) as a start while a
    /// scan still lists it; another process that reuses the pid is a start like any other.
    recent_exits: HashMap<u32, (u64, Instant)>,
    /// The wait status of the exit being published (kernel events).
    exit_code: Option<u32>,
    /// Pids of the first reading of `/proc` that began after the kernel's events were
    /// subscribed to (until the first reconciliation).
    after_subscription: HashSet<u32>,
    /// Collection tasks' questions ([`Shared::tasks`]).
    asks: tokio::sync::mpsc::Receiver<TableAsk>,
}

/// Most executables waiting to be hashed; when full, a new one is skipped and counted
/// (`hashes_skipped`): a scan never waits for hashing.
const HASH_QUEUE: usize = 256;

/// An executable to hash: the path a process reported, and the file itself, opened through
/// its `/proc/<pid>/exe` link when the process was seen (so it is hashed even if the
/// process has exited by the time the hasher gets to it).
struct HashJob {
    pid: u32,
    path: String,
    file: std::fs::File,
}

/// Hashes executables off the scan loop (a large file takes long to hash) and publishes
/// their digests on the integrity topic.
struct Hasher {
    client: Client,
    shared: Arc<Shared>,
    jobs: tokio::sync::mpsc::Receiver<HashJob>,
    /// Digests already computed, by (path, size, modification time); bounded.
    hashed: HashMap<(String, u64, i64), String>,
}

impl Hasher {
    async fn run(mut self) {
        while let Some(job) = self.jobs.recv().await {
            self.hash(job).await;
        }
        // The scanner ended first; the select that drives both returns with it.
        std::future::pending::<()>().await;
    }

    async fn hash(&mut self, job: HashJob) {
        let HashJob { pid, path, file } = job;
        let Ok(meta) = file.metadata() else {
            return;
        };
        #[cfg(unix)]
        let mtime = std::os::unix::fs::MetadataExt::mtime(&meta);
        #[cfg(not(unix))]
        let mtime = 0;
        let key = (path.clone(), meta.len(), mtime);
        let digest = match self.hashed.get(&key) {
            Some(d) => d.clone(),
            None => {
                let Ok(Ok(d)) = tokio::task::spawn_blocking(move || sha256_file(file)).await else {
                    return;
                };
                if self.hashed.len() >= 4096 {
                    self.hashed.clear();
                }
                self.hashed.insert(key, d.clone());
                d
            }
        };
        let msg = epb::ExecutableHash {
            pid,
            executable_path: path,
            sha256: digest,
            size_bytes: meta.len(),
        };
        let publish = Publish::new(catalog::process::integrity(), msg.encode_to_vec());
        send(&self.client, &self.shared, publish).await;
    }
}

async fn send(client: &Client, shared: &Shared, p: Publish) {
    shared
        .basics
        .count_publish(client.publish_with(p.qos(shared.events)).await);
}

impl Scanner {
    async fn snapshot(&self) -> Result<Snapshot, ProcmondError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || procfs::snapshot(&root))
            .await
            .map_err(|e| ProcmondError::Proc {
                path: self.root.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| ProcmondError::Proc {
                path: self.root.clone(),
                source,
            })
    }

    /// Reads `/proc`, keeping the living (a zombie has exited): `Err` with the reason when it
    /// cannot be read, noted for the health report.
    async fn living(&self) -> Result<Snapshot, ProcmondError> {
        let read = self.snapshot().await;
        *self
            .shared
            .scan_failing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            read.as_ref().err().map(ToString::to_string);
        let mut snap = read?;
        snap.retain(|_, p| !matches!(p.state, 'Z' | 'X'));
        Ok(snap)
    }

    async fn run(
        mut self,
        kernel: Option<KernelSource>,
        subscribed: Option<u64>,
    ) -> Result<(), ProcmondError> {
        // Processes of the first reading that began after the kernel's events were subscribed
        // to: their fork is among the events, and is reported as their start.
        let mut known = self.living().await?;
        self.after_subscription = subscribed.map_or_else(HashSet::new, |t| {
            known
                .keys()
                .filter(|(_, start)| *start >= t)
                .map(|(pid, _)| *pid)
                .collect()
        });
        self.shared.watching.send_replace(true);
        self.shared
            .processes
            .store(known.len() as u64, Ordering::Relaxed);
        let mut last_batch = Instant::now();
        self.learn_users(&known).await;
        self.publish_batch(&known).await;
        let mut kernel = kernel.map(Kernel::from);
        let mut next_scan = tokio::time::Instant::now();
        // One timer, moved only when the next scan moves (not re-armed for every batch of
        // the kernel's events).
        let timer = tokio::time::sleep_until(next_scan);
        tokio::pin!(timer);
        loop {
            let settings = self.shared.settings();
            // Hashing opens a new process's executable when its start is handed over: at
            // once, before a short process is gone.
            if let Some(k) = &kernel {
                k.set_starts_at_once(settings.hash_executables);
            }
            let every = match kernel {
                Some(_) => settings.scan_interval * RECONCILE_SCANS,
                None => settings.scan_interval,
            };
            next_scan = next_scan.max(tokio::time::Instant::now() - every) + every;
            if timer.deadline() != next_scan {
                timer.as_mut().reset(next_scan);
            }
            tokio::select! {
                () = &mut timer => {}
                Some((max_rows, answer)) = self.asks.recv() => {
                    let _ = answer.send(self.rows(&known, max_rows));
                    continue;
                }
                batch = next_batch(&mut kernel) => {
                    match batch {
                        Some(batch) => {
                            self.on_kernel(&mut known, batch, &settings).await;
                            // Events were lost: read /proc now to catch up.
                            let lost = kernel.as_mut().map_or(0, Kernel::new_losses);
                            if lost > 0 {
                                self.shared.events_lost.add(lost);
                                next_scan = tokio::time::Instant::now() - every;
                            } else {
                                next_scan -= every;
                            }
                        }
                        None => {
                            kernel = None;
                            self.shared.set_source(health::Source::Proc {
                                every: settings.scan_interval,
                                why: Some("the kernel's process events stopped".into()),
                            });
                            next_scan -= every;
                        }
                    }
                    continue;
                }
            }
            let began = Instant::now();
            let next = match self.living().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "scan failed");
                    continue;
                }
            };
            self.learn_users(&next).await;
            self.reconcile(&mut known, next, &settings).await;
            self.shared.scans.fetch_add(1, Ordering::Relaxed);
            self.shared
                .processes
                .store(known.len() as u64, Ordering::Relaxed);
            self.shared.last_scan_us.store(
                u64::try_from(began.elapsed().as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            if !settings.batch_interval.is_zero() && last_batch.elapsed() >= settings.batch_interval
            {
                self.publish_batch(&known).await;
                last_batch = Instant::now();
            }
        }
    }

    /// Reports what a scan shows changed since `known` (everything, without the kernel's
    /// events; what they missed, with them), and makes the scan the new `known`.
    async fn reconcile(&mut self, known: &mut Snapshot, next: Snapshot, settings: &Settings) {
        self.after_subscription.clear();
        let (started, exited) = procfs::diff(known, &next);
        let execs: Vec<ProcInfo> = procfs::execs(known, &next).into_iter().cloned().collect();
        let started: Vec<ProcInfo> = started
            .into_iter()
            .filter(|p| {
                self.recent_exits
                    .get(&p.pid)
                    .is_none_or(|(start, _)| *start != p.start_ticks)
            })
            .cloned()
            .collect();
        let exited: Vec<ProcInfo> = exited.into_iter().cloned().collect();
        for p in &execs {
            self.publish(p, "exec", "proc").await;
            if settings.hash_executables {
                self.publish_hash(p);
            }
        }
        for p in &started {
            self.publish(p, "start", "proc").await;
            if settings.hash_executables {
                self.publish_hash(p);
            }
        }
        for p in &exited {
            self.publish(p, "exit", "proc").await;
            // Its exit may still be queued among the kernel's events: reported once.
            self.recent_exits
                .insert(p.pid, (p.start_ticks, Instant::now()));
        }
        // A pid the kernel said exited stays refused as a start while /proc still lists it
        // (a zombie not yet reaped shows as one at most a scan later).
        self.recent_exits
            .retain(|_, (_, at)| at.elapsed() < settings.scan_interval * (2 * RECONCILE_SCANS));
        *known = next;
    }

    /// Reports the kernel's events: a new process at its fork (running its parent's program
    /// until it execs: command line, executable and user are its parent's; or, when its exec
    /// came with it, the new program), a new program at its exec (as `/proc` showed it at
    /// once), an exit; each as soon as the connector's thread hands it over ([`coalesce`]: a
    /// start after a quiet spell at once, other starts and execs within about 20 ms, exits
    /// within 20 ms). A process gone before `/proc` could be read is reported by its pid and
    /// parent.
    async fn on_kernel(
        &mut self,
        known: &mut Snapshot,
        batch: Vec<connector::Observed>,
        settings: &Settings,
    ) {
        use connector::KernelEvent as K;
        self.shared
            .kernel_events
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for (event, seen) in batch {
            match event {
                K::Fork {
                    parent_tgid,
                    child_pid,
                    ..
                } => {
                    if let Some(k) = known_pid(known, child_pid) {
                        // Known from the first reading, begun after subscribing: its start.
                        if self.after_subscription.remove(&child_pid)
                            && let Some(p) = known.get(&k).cloned()
                        {
                            self.publish(&p, "start", "kernel").await;
                        }
                        continue;
                    }
                    let p = match seen {
                        Seen::Forked(mut p) => {
                            // Its parent's program until it execs.
                            if let Some(parent) =
                                known_pid(known, parent_tgid).and_then(|k| known.get(&k))
                            {
                                p.command_line.clone_from(&parent.command_line);
                                p.executable_path.clone_from(&parent.executable_path);
                                p.uid = parent.uid;
                            }
                            known.insert((p.pid, p.start_ticks), p.clone());
                            p
                        }
                        // Its exec came with its fork: one start, with the new program.
                        Seen::Execed(p) => {
                            self.learn_user(p.uid).await;
                            known.insert((p.pid, p.start_ticks), p.clone());
                            if settings.hash_executables {
                                self.publish_hash(&p);
                            }
                            p
                        }
                        Seen::Nothing => ProcInfo::gone(child_pid, parent_tgid),
                    };
                    self.recent_exits.remove(&child_pid);
                    self.publish(&p, "start", "kernel").await;
                }
                K::Exec { tgid, .. } => {
                    let (Seen::Execed(now) | Seen::Forked(now)) = seen else {
                        // Gone before /proc could be read: its new program is unknown (what
                        // was known is its parent's), so it is reported by pid and parent.
                        let ppid = known_pid(known, tgid)
                            .and_then(|k| known.remove(&k))
                            .map_or(0, |p| p.ppid);
                        self.publish(&ProcInfo::gone(tgid, ppid), "exec", "kernel")
                            .await;
                        continue;
                    };
                    self.learn_user(now.uid).await;
                    let fresh = known
                        .insert((now.pid, now.start_ticks), now.clone())
                        .is_none();
                    self.publish(&now, if fresh { "start" } else { "exec" }, "kernel")
                        .await;
                    if settings.hash_executables {
                        self.publish_hash(&now);
                    }
                }
                K::Exit {
                    pid,
                    exit_code,
                    parent_tgid,
                    ..
                } => {
                    let gone = match known_pid(known, pid) {
                        Some(k) => known.remove(&k),
                        None if self.recent_exits.contains_key(&pid) => continue,
                        None => None,
                    };
                    let p = gone.unwrap_or_else(|| ProcInfo::gone(pid, parent_tgid));
                    self.recent_exits
                        .insert(pid, (p.start_ticks, Instant::now()));
                    self.exit_code = Some(exit_code);
                    self.publish(&p, "exit", "kernel").await;
                    self.exit_code = None;
                }
                K::Comm { pid, comm, .. } => {
                    // A new name (`prctl(PR_SET_NAME)`, a write to /proc/PID/comm): kept for
                    // the process's next events (its exit's; a scan's).
                    if let Some(p) = known_pid(known, pid).and_then(|k| known.get_mut(&k)) {
                        let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
                        p.name = String::from_utf8_lossy(&comm[..end]).into_owned();
                    }
                }
                K::Uid { tgid, ruid, .. } => {
                    // setuid and its kin: what the process runs as from now on.
                    self.learn_user(Some(ruid)).await;
                    if let Some(p) = known_pid(known, tgid).and_then(|k| known.get_mut(&k)) {
                        p.uid = Some(ruid);
                    }
                }
                K::Ack { .. } => {}
            }
        }
        self.shared
            .processes
            .store(known.len() as u64, Ordering::Relaxed);
    }

    fn user(&self, uid: u32) -> Option<String> {
        self.users.get(&uid).cloned().flatten()
    }

    /// Looks up the name of `uid` if not seen before (off this thread).
    async fn learn_user(&mut self, uid: Option<u32>) {
        let Some(uid) = uid.filter(|u| !self.users.contains_key(u)) else {
            return;
        };
        let name = tokio::task::spawn_blocking(move || user_name(uid))
            .await
            .unwrap_or_default();
        if self.users.len() > 65_536 {
            self.users.clear();
        }
        self.users.insert(uid, name);
    }

    /// Looks up the names of the uids of `snap` not seen before, off this thread (a user
    /// directory may be remote and slow; heartbeats and RPC must not wait for it).
    async fn learn_users(&mut self, snap: &Snapshot) {
        let unknown: Vec<u32> = snap
            .values()
            .filter_map(|p| p.uid)
            .filter(|uid| !self.users.contains_key(uid))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if unknown.is_empty() {
            return;
        }
        let found = tokio::task::spawn_blocking(move || {
            unknown
                .into_iter()
                .map(|uid| (uid, user_name(uid)))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if self.users.len() > 65_536 {
            self.users.clear();
        }
        self.users.extend(found);
    }

    /// The `processes` table: every process known now.
    fn rows(&self, known: &Snapshot, max_rows: usize) -> pb::TableRows {
        use daemoneye_eventbus_collector::tables::{Rows, Table, int, null, text};
        let mut rows = Rows::new(Table::Processes, max_rows);
        let opt_text = |v: Option<&str>| v.map_or_else(null, text);
        for p in known.values() {
            let (exe, deleted) = match p.executable_path.as_deref() {
                Some(e) => match e.strip_suffix(" (deleted)") {
                    Some(path) => (Some(path), 1),
                    None => (Some(e), 0),
                },
                None => (None, 0),
            };
            let start_secs =
                (!p.is_gone()).then(|| self.boot_secs + p.start_ticks / self.ticks_per_sec.max(1));
            rows.push(vec![
                int(p.pid),
                int(p.ppid),
                text(p.name.as_str()),
                opt_text(p.command_line.as_deref()),
                opt_text(exe),
                int(deleted),
                p.uid.map_or_else(null, int),
                opt_text(p.uid.and_then(|u| self.user(u)).as_deref()),
                text(p.state.to_string()),
                start_secs.map_or_else(null, |s| int(i64::try_from(s).unwrap_or(i64::MAX))),
                text(self.shared.basics.id()),
            ]);
        }
        rows.finish()
    }

    fn event(&mut self, p: &ProcInfo, what: &str, source: &str) -> ProcessEvent {
        let mut metadata = HashMap::with_capacity(6);
        metadata.insert("event".to_owned(), what.to_owned());
        metadata.insert("collector".to_owned(), self.shared.basics.id().to_owned());
        metadata.insert("source".to_owned(), source.to_owned());
        if p.is_gone() {
            metadata.insert(
                "details".to_owned(),
                "unavailable: the process ended before /proc could be read".to_owned(),
            );
        } else {
            metadata.insert("state".to_owned(), p.state.to_string());
        }
        if let Some(status) = self.exit_code {
            // A wait status: the code in bits 8-15, or the signal that ended it.
            match status & 0x7f {
                0 => metadata.insert("exit_code".to_owned(), ((status >> 8) & 0xff).to_string()),
                signal => metadata.insert("exit_signal".to_owned(), signal.to_string()),
            };
        }
        if let Some(uid) = p.uid {
            metadata.insert("uid".to_owned(), uid.to_string());
            if let Some(name) = self.user(uid) {
                metadata.insert("user".to_owned(), name);
            }
        }
        let start_ns = u128::from(self.boot_secs) * 1_000_000_000
            + u128::from(p.start_ticks) * 1_000_000_000 / u128::from(self.ticks_per_sec);
        ProcessEvent {
            pid: p.pid,
            name: p.name.clone(),
            command_line: p.command_line.clone(),
            executable_path: p.executable_path.clone(),
            ppid: (p.ppid != 0 || !p.is_gone()).then_some(p.ppid),
            start_time: u64::try_from(start_ns)
                .ok()
                .filter(|_| !p.is_gone())
                .map(|ns| UNIX_EPOCH + Duration::from_nanos(ns)),
            metadata,
        }
    }

    async fn publish(&mut self, p: &ProcInfo, what: &str, source: &str) {
        let event = CollectionEvent::Process(self.event(p, what, source));
        let topic = event.topic();
        self.send(Publish::new(topic, event.into_encoded())).await;
    }

    async fn send(&self, p: Publish) {
        send(&self.client, &self.shared, p).await;
    }

    /// Publishes a snapshot, split into messages of at most [`BATCH_BYTES`] so a host with
    /// many processes or long command lines stays under the broker's message limit.
    async fn publish_batch(&mut self, snap: &Snapshot) {
        let collected_at_ns = now_ns();
        let mut processes = Vec::new();
        let mut bytes = 0;
        let all: Vec<epb::ProcessEvent> = snap
            .values()
            .map(|p| epb::ProcessEvent::from(self.event(p, "snapshot", "proc")))
            .collect();
        for p in all {
            let len = p.encoded_len() + 8;
            if bytes + len > BATCH_BYTES && !processes.is_empty() {
                self.send_batch(collected_at_ns, std::mem::take(&mut processes))
                    .await;
                bytes = 0;
            }
            bytes += len;
            processes.push(p);
        }
        self.send_batch(collected_at_ns, processes).await;
    }

    async fn send_batch(&self, collected_at_ns: u64, processes: Vec<epb::ProcessEvent>) {
        let batch = epb::ProcessBatch {
            collector_id: self.shared.basics.id().to_owned(),
            collected_at_ns,
            processes,
        };
        self.send(Publish::new(
            catalog::process::batch(),
            batch.encode_to_vec(),
        ))
        .await;
    }

    /// Hands `p`'s executable to the hasher (skipped, and counted, when its queue is full).
    fn publish_hash(&self, p: &ProcInfo) {
        let Some(path) = p.executable_path.clone() else {
            return;
        };
        // Through the process's own link: the very file it runs, even in another mount
        // namespace or after the path was replaced.
        let Ok(file) = std::fs::File::open(self.root.join(p.pid.to_string()).join("exe")) else {
            return;
        };
        let job = HashJob {
            pid: p.pid,
            path,
            file,
        };
        if self.hash_jobs.try_send(job).is_err() {
            self.shared.hashes_skipped.add(1);
        }
    }
}

fn sha256_file(mut file: std::fs::File) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(unix)]
fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

#[cfg(not(unix))]
fn user_name(_uid: u32) -> Option<String> {
    None
}

impl Collector for Shared {
    type Settings = Settings;

    fn basics(&self) -> &Basics<Settings> {
        &self.basics
    }

    fn program(&self) -> &'static str {
        "procmond"
    }

    fn collector_type(&self) -> &'static str {
        COLLECTOR_TYPE
    }

    fn capabilities(&self) -> Vec<String> {
        CAPABILITIES.iter().map(|&c| c.to_owned()).collect()
    }

    fn health(&self) -> (HealthStatus, String) {
        Shared::health(self)
    }

    fn tables(&self) -> &'static [Table] {
        &[Table::Processes]
    }

    // Its one table (the services pass only tables it lists).
    async fn rows(&self, _: Table, max_rows: usize) -> Result<pb::TableRows, String> {
        self.tasks.ask(max_rows).await
    }

    fn components(&self) -> HashMap<String, pb::ComponentHealth> {
        let (status, _) = Shared::health(self);
        [(
            "source".to_owned(),
            pb::ComponentHealth {
                status: status as i32,
                message: self.source().describe(),
            },
        )]
        .into()
    }

    fn metrics(&self) -> HashMap<String, f64> {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        [
            ("processes", l(&self.processes)),
            ("scans", l(&self.scans)),
            ("events_published", l(&self.basics.published)),
            ("last_scan_ms", l(&self.last_scan_us) / 1000.0),
            ("heartbeats", self.basics.heartbeats() as f64),
            ("hashes_skipped", self.hashes_skipped.count() as f64),
            (
                "publish_failures",
                self.basics.publish_failures.count() as f64,
            ),
            ("events_lost", self.events_lost.count() as f64),
            ("kernel_events", l(&self.kernel_events)),
            (
                "source_kernel",
                f64::from(u8::from(self.source().name() == "kernel")),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configuration_is_applied_whole_or_refused_with_every_reason() {
        let mut c = Settings::default().to_config();
        c.scan_interval_ms = 250;
        c.settings.insert("hash_executables".into(), "true".into());
        let s = Settings::default().updated(&c).unwrap();
        assert_eq!(s.scan_interval, Duration::from_millis(250));
        assert!(s.hash_executables);
        // Its own topics, as it reports them, are accepted; others and limits are not.
        c.enabled_topics = vec!["events.process.lifecycle".into()];
        c.limits = Some(pb::ResourceLimits::default());
        c.settings.insert("colour".into(), "blue".into());
        let errors = Settings::default().updated(&c).unwrap_err();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields.len(), 3, "{errors:?}");
        for f in ["limits", "enabled_topics", "settings.colour"] {
            assert!(fields.contains(&f), "{f}: {errors:?}");
        }
    }
}
