//! The collector supervisor: starts collector processes, stops them gracefully (shutdown
//! request, then SIGTERM, then SIGKILL), restarts them when they crash or stop sending
//! heartbeats, pauses and resumes them, and reports their status.
//!
//! One task owns every collector's state (`Supervisor` is a handle that sends it commands).
//! Restart decisions are pure ([`RestartPolicy::decide`]); the task only moves processes and
//! timers. Children run in their own process group and, on Linux, die with the supervisor's
//! process even when it is killed with SIGKILL (parent-death signal); [`Supervisor::shutdown`]
//! stops and reaps them all.

mod policy;
mod spawn;

pub use policy::{Decision, ProcessManagerConfig, RestartPolicy};

use crate::client::Client;
use crate::core::TopicFilter;
use crate::rpc::{CollectorRpcClient, RpcConfig, RpcErrorKind, RpcRequest};
use serde::{Deserialize, Serialize};
use spawn::{Sig, Spawned, Spawner};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Resource limits applied to a collector process (`setrlimit` in the child).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceLimits {
    /// Address space, bytes (`RLIMIT_AS`).
    pub max_memory_bytes: Option<u64>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub max_open_files: Option<u64>,
    /// CPU time, seconds (`RLIMIT_CPU`; SIGXCPU, then SIGKILL, when exceeded).
    pub max_cpu_seconds: Option<u64>,
}

/// How to run one collector (an entry of the `collectors` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorSpec {
    /// The collector's id: its RPC address is `control.collector.<id>`, its heartbeats come
    /// on `control.health.heartbeat.<id>`.
    pub id: String,
    /// Its type (`procmond`, `netmond`, …), shared by the instances of one collector
    /// (`None`: the id is the type). Lifecycle requests that name a type must name this one.
    #[serde(default)]
    pub collector_type: Option<String>,
    /// The program.
    pub binary: PathBuf,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables added to the supervisor's own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the supervisor's).
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    /// Resource limits.
    #[serde(default)]
    pub limits: ResourceLimits,
    /// Whether the collector sends heartbeats (default true). When it does, heartbeats that
    /// stop for `health_check_interval_seconds` make it Unhealthy.
    #[serde(default = "yes")]
    pub heartbeats: bool,
    /// Start it with the supervisor (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The event topics it publishes on (filters, such as `events.process.#`): what the
    /// broker's default policy lets it publish, besides its own health topics (the `{events}`
    /// of a policy file's collector rule). Default: none.
    #[serde(default)]
    pub events: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Time a collector has, on top of the health check interval, to send its first heartbeat.
const STARTUP_GRACE: Duration = Duration::from_secs(10);

impl CollectorSpec {
    /// Its type: `collector_type`, or the id when unset.
    #[must_use]
    pub fn kind(&self) -> &str {
        self.collector_type.as_deref().unwrap_or(&self.id)
    }

    /// A collector running `binary` with the defaults.
    pub fn new(id: &str, binary: impl Into<PathBuf>) -> Self {
        Self {
            id: id.to_owned(),
            collector_type: None,
            binary: binary.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: None,
            limits: ResourceLimits::default(),
            heartbeats: true,
            enabled: true,
            events: Vec::new(),
        }
    }
}

/// Where a collector is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectorState {
    /// Not running, by request (or never started).
    Stopped,
    /// Running.
    Running,
    /// Stopped with SIGSTOP.
    Paused,
    /// Being stopped.
    Stopping,
    /// Ended on its own (or was killed for missing heartbeats); restarting after a delay.
    BackingOff,
    /// Heartbeats stopped; being restarted (or left alone when auto restart is off).
    Unhealthy,
    /// Gave up restarting it (see `last_exit`).
    Failed,
}

impl std::fmt::Display for CollectorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Self::Stopped => "stopped",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::BackingOff => "restarting",
            Self::Unhealthy => "unhealthy",
            Self::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// A collector's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CollectorStatus {
    /// Its id.
    pub id: String,
    /// Its type ([`CollectorSpec::kind`]).
    pub collector_type: String,
    /// Whether it sends heartbeats ([`CollectorSpec::heartbeats`]).
    pub heartbeats: bool,
    /// Its state.
    pub state: CollectorState,
    /// Process id while it runs.
    pub pid: Option<u32>,
    /// Time since its last start, while it runs.
    pub uptime: Option<Duration>,
    /// Restarts since the supervisor started.
    pub restart_count: u32,
    /// How it last ended, and for Failed why the supervisor gave up.
    pub last_exit: Option<String>,
    /// When its last heartbeat arrived.
    pub last_heartbeat: Option<SystemTime>,
}

impl CollectorStatus {
    /// Running and heard from: its first heartbeat of this run came, or it sends none. Before,
    /// it may not serve its services yet.
    #[must_use]
    pub fn heard(&self) -> bool {
        self.state == CollectorState::Running && (self.last_heartbeat.is_some() || !self.heartbeats)
    }
}

/// Why a supervisor command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SupervisorError {
    /// No collector with this id is configured.
    #[error("no collector {0:?} is configured")]
    UnknownCollector(String),
    /// The command does not apply in the collector's current state.
    #[error("collector {id} is {state}: {what}")]
    WrongState {
        /// The collector.
        id: String,
        /// Its state.
        state: CollectorState,
        /// What was refused and why.
        what: String,
    },
    /// The process could not be started or signalled.
    #[error("collector {id}: {message}")]
    Process {
        /// The collector.
        id: String,
        /// What failed.
        message: String,
    },
    /// The supervisor has shut down.
    #[error("the supervisor has shut down")]
    ShutDown,
    /// What was asked cannot be done on this platform.
    #[error("collector {id}: {what}")]
    Unsupported {
        /// The collector.
        id: String,
        /// What, and why not.
        what: String,
    },
}

/// Extra environment for a collector's runs (`None`: keep what it has).
type Env = Option<Vec<(String, String)>>;

enum Cmd {
    Start(
        String,
        Env,
        oneshot::Sender<Result<CollectorStatus, SupervisorError>>,
    ),
    Stop(
        String,
        bool,
        Option<Duration>,
        oneshot::Sender<Result<CollectorStatus, SupervisorError>>,
    ),
    Restart(
        String,
        Env,
        oneshot::Sender<Result<CollectorStatus, SupervisorError>>,
    ),
    Pause(
        String,
        bool,
        oneshot::Sender<Result<CollectorStatus, SupervisorError>>,
    ),
    Status(oneshot::Sender<Vec<CollectorStatus>>),
    Heartbeat(String, SystemTime),
    Shutdown(oneshot::Sender<Vec<CollectorStatus>>),
}

/// Told when a collector's process starts and when it ends, so that the broker can bind the
/// collector's id to that process ([`crate::broker::Broker::register_collector`]): only it
/// may then connect under the collector's name.
pub trait CollectorRegistry: Send + Sync + 'static {
    /// Collector `id` runs as process `pid` and publishes on `events` (told before it can
    /// connect).
    fn started(&self, id: &str, pid: u32, events: &[TopicFilter]);
    /// The process `pid` of collector `id` ended.
    fn ended(&self, id: &str, pid: u32);
}

impl CollectorRegistry for crate::broker::Broker {
    fn started(&self, id: &str, pid: u32, events: &[TopicFilter]) {
        self.register_collector(id, pid, events);
    }

    fn ended(&self, _id: &str, pid: u32) {
        self.unregister_collector(pid);
    }
}

/// A handle on the supervisor task. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Supervisor {
    cmds: mpsc::Sender<Cmd>,
}

impl Supervisor {
    /// Starts the supervisor with these collectors (the enabled ones are started at once).
    /// With `bus`, graceful stops first ask the collector to shut down over RPC, and
    /// heartbeats on `control.health.heartbeat.+` are watched.
    ///
    /// # Errors
    ///
    /// When the spawner thread cannot be started, or two collectors share an id.
    pub async fn start(
        config: ProcessManagerConfig,
        collectors: Vec<CollectorSpec>,
        bus: Option<Client>,
    ) -> Result<Self, SupervisorError> {
        Self::start_with_rpc(config, collectors, bus, RpcConfig::default()).await
    }

    /// [`Supervisor::start`] with the RPC policies its shutdown requests follow.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::start`].
    pub async fn start_with_rpc(
        config: ProcessManagerConfig,
        collectors: Vec<CollectorSpec>,
        bus: Option<Client>,
        rpc_config: RpcConfig,
    ) -> Result<Self, SupervisorError> {
        Self::start_registered(config, collectors, bus, rpc_config, None).await
    }

    /// [`Supervisor::start_with_rpc`], telling `registry` (the embedded broker) which process
    /// each collector runs as.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::start`].
    pub async fn start_registered(
        config: ProcessManagerConfig,
        collectors: Vec<CollectorSpec>,
        bus: Option<Client>,
        rpc_config: RpcConfig,
        registry: Option<Arc<dyn CollectorRegistry>>,
    ) -> Result<Self, SupervisorError> {
        let mut seen = std::collections::BTreeSet::new();
        let mut events = Vec::with_capacity(collectors.len());
        for c in &collectors {
            if !seen.insert(c.id.clone()) {
                return Err(SupervisorError::Process {
                    id: c.id.clone(),
                    message: "two collectors have this id; ids must be unique".into(),
                });
            }
            let filters = c
                .events
                .iter()
                .map(TopicFilter::new)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SupervisorError::Process {
                    id: c.id.clone(),
                    message: format!("events: {e}"),
                })?;
            events.push(filters);
        }
        let spawner = Spawner::start().map_err(|e| SupervisorError::Process {
            id: "supervisor".into(),
            message: format!("cannot start the spawner thread: {e}"),
        })?;
        let (cmds, rx) = mpsc::channel(64);
        let (exits, exit_rx) = mpsc::unbounded_channel();
        let rpc = bus
            .clone()
            .map(|c| CollectorRpcClient::new(c, "supervisor", rpc_config));
        let actor = Actor {
            stopping: tokio::task::JoinSet::new(),
            pending_starts: Vec::new(),
            policy: config.restart_policy(),
            config,
            slots: collectors
                .into_iter()
                .zip(events)
                .map(|(spec, events)| (spec.id.clone(), Slot::new(spec, events)))
                .collect(),
            spawner,
            rpc,
            exits,
            registry,
        };
        if let Some(client) = bus {
            tokio::spawn(watch_heartbeats(client, cmds.clone()));
        }
        tokio::spawn(actor.run(rx, exit_rx));
        Ok(Self { cmds })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .await
            .map_err(|_| SupervisorError::ShutDown)?;
        rx.await.map_err(|_| SupervisorError::ShutDown)
    }

    /// Starts a stopped, failed or unhealthy collector.
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn start_collector(&self, id: &str) -> Result<CollectorStatus, SupervisorError> {
        self.start_collector_with(id, None).await
    }

    /// [`Supervisor::start_collector`], with `env` added to the collector's environment for
    /// this run and the later ones (restarts included) until another request sets it
    /// (`None`: keep what it has).
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn start_collector_with(
        &self,
        id: &str,
        env: Option<Vec<(String, String)>>,
    ) -> Result<CollectorStatus, SupervisorError> {
        self.ask(|tx| Cmd::Start(id.to_owned(), env, tx)).await?
    }

    /// Stops a collector: gracefully (shutdown request, then SIGTERM after
    /// `graceful_shutdown_timeout_seconds`, then SIGKILL after
    /// `force_shutdown_timeout_seconds`) or at once (SIGTERM, then SIGKILL). Returns once it
    /// has ended.
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn stop_collector(
        &self,
        id: &str,
        graceful: bool,
    ) -> Result<CollectorStatus, SupervisorError> {
        self.stop_collector_within(id, graceful, None).await
    }

    /// [`Supervisor::stop_collector`], the graceful phase lasting `grace` instead of
    /// `graceful_shutdown_timeout_seconds` (`None`: that).
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn stop_collector_within(
        &self,
        id: &str,
        graceful: bool,
        grace: Option<Duration>,
    ) -> Result<CollectorStatus, SupervisorError> {
        self.ask(|tx| Cmd::Stop(id.to_owned(), graceful, grace, tx))
            .await?
    }

    /// Stops (gracefully) and starts a collector again.
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn restart_collector(&self, id: &str) -> Result<CollectorStatus, SupervisorError> {
        self.restart_collector_with(id, None).await
    }

    /// [`Supervisor::restart_collector`], with `env` as in
    /// [`Supervisor::start_collector_with`].
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn restart_collector_with(
        &self,
        id: &str,
        env: Option<Vec<(String, String)>>,
    ) -> Result<CollectorStatus, SupervisorError> {
        self.ask(|tx| Cmd::Restart(id.to_owned(), env, tx)).await?
    }

    /// Pauses a running collector (SIGSTOP to its process group).
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn pause(&self, id: &str) -> Result<CollectorStatus, SupervisorError> {
        self.ask(|tx| Cmd::Pause(id.to_owned(), true, tx)).await?
    }

    /// Resumes a paused collector (SIGCONT).
    ///
    /// # Errors
    ///
    /// [`SupervisorError`].
    pub async fn resume(&self, id: &str) -> Result<CollectorStatus, SupervisorError> {
        self.ask(|tx| Cmd::Pause(id.to_owned(), false, tx)).await?
    }

    /// Every collector's status.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::ShutDown`].
    pub async fn status(&self) -> Result<Vec<CollectorStatus>, SupervisorError> {
        self.ask(Cmd::Status).await
    }

    /// Records a heartbeat of `id` (the supervisor also watches the bus itself when given a
    /// client).
    pub async fn heartbeat(&self, id: &str) {
        let _ = self
            .cmds
            .send(Cmd::Heartbeat(id.to_owned(), SystemTime::now()))
            .await;
    }

    /// Stops every collector (gracefully, all at once) and waits until all have ended;
    /// returns their final status (empty when the supervisor had already shut down).
    pub async fn shutdown(&self) -> Vec<CollectorStatus> {
        self.ask(Cmd::Shutdown).await.unwrap_or_default()
    }
}

async fn watch_heartbeats(client: Client, cmds: mpsc::Sender<Cmd>) {
    let Ok(mut sub) = client.subscribe(["control.health.heartbeat.+"]).await else {
        tracing::warn!("cannot subscribe to heartbeats; collectors' liveness is not checked");
        return;
    };
    while let Ok(m) = sub.recv().await {
        let id = m.topic().as_str().rsplit('.').next().unwrap_or_default();
        if cmds
            .send(Cmd::Heartbeat(id.to_owned(), SystemTime::now()))
            .await
            .is_err()
        {
            return;
        }
    }
}

struct Running {
    pid: u32,
    handle: spawn::Handle,
    started: Instant,
    exit: watch::Receiver<Option<ExitStatus>>,
    paused: bool,
}

struct Slot {
    spec: CollectorSpec,
    /// `spec.events`, checked.
    events: Vec<TopicFilter>,
    state: CollectorState,
    running: Option<Running>,
    /// Restarts in a row (for the policy) and in total (reported).
    in_a_row: u32,
    total: u32,
    last_exit: Option<String>,
    last_heartbeat: Option<(SystemTime, Instant)>,
    restart_at: Option<Instant>,
    /// Bumped per start, so the exit report of an earlier run is recognised.
    run: u64,
    /// Cuts short the graceful phase of a stop in progress (a forced stop asked meanwhile).
    force: std::sync::Arc<tokio::sync::Notify>,
    /// Requests waiting for the stop in progress to end.
    waiters: Vec<Then>,
    /// Environment a start or restart request added for its runs.
    env: Vec<(String, String)>,
}

impl Slot {
    fn new(spec: CollectorSpec, events: Vec<TopicFilter>) -> Self {
        Self {
            spec,
            events,
            state: CollectorState::Stopped,
            running: None,
            in_a_row: 0,
            total: 0,
            last_exit: None,
            last_heartbeat: None,
            restart_at: None,
            run: 0,
            force: std::sync::Arc::new(tokio::sync::Notify::new()),
            waiters: Vec::new(),
            env: Vec::new(),
        }
    }

    fn status(&self) -> CollectorStatus {
        CollectorStatus {
            id: self.spec.id.clone(),
            collector_type: self.spec.kind().to_owned(),
            heartbeats: self.spec.heartbeats,
            state: self.state,
            pid: self.running.as_ref().map(|r| r.pid),
            uptime: self.running.as_ref().map(|r| r.started.elapsed()),
            restart_count: self.total,
            last_exit: self.last_exit.clone(),
            last_heartbeat: self.last_heartbeat.map(|(t, _)| t),
        }
    }
}

/// How a process ended, in words.
fn describe(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "ended (status unknown)".into();
    };
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            let name = nix::sys::signal::Signal::try_from(sig)
                .map_or_else(|_| format!("signal {sig}"), |s| s.as_str().to_owned());
            return format!("killed by {name}");
        }
    }
    match status.code() {
        Some(0) => "exited with status 0".into(),
        Some(c) => format!("exited with status {c}"),
        None => "ended".into(),
    }
}

/// What to do once a stop has ended.
enum Then {
    Reply(oneshot::Sender<Result<CollectorStatus, SupervisorError>>),
    Start(oneshot::Sender<Result<CollectorStatus, SupervisorError>>),
    Nothing,
}

impl Then {
    fn fail(self, e: SupervisorError) {
        match self {
            Self::Reply(tx) | Self::Start(tx) => {
                let _ = tx.send(Err(e));
            }
            Self::Nothing => {}
        }
    }
}

struct Actor {
    /// Stops in progress, each in its own task.
    stopping: tokio::task::JoinSet<(String, String, Then)>,
    /// Restarts whose stop has ended, waiting to start.
    pending_starts: Vec<(
        String,
        oneshot::Sender<Result<CollectorStatus, SupervisorError>>,
    )>,
    config: ProcessManagerConfig,
    policy: RestartPolicy,
    slots: BTreeMap<String, Slot>,
    spawner: Spawner,
    rpc: Option<CollectorRpcClient>,
    exits: mpsc::UnboundedSender<(String, u64, Option<ExitStatus>)>,
    registry: Option<Arc<dyn CollectorRegistry>>,
}

impl Actor {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut exit_rx: mpsc::UnboundedReceiver<(String, u64, Option<ExitStatus>)>,
    ) {
        let ids: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.spec.enabled)
            .map(|s| s.spec.id.clone())
            .collect();
        for id in ids {
            if let Err(e) = self.start(&id).await {
                tracing::error!(error = %e, "collector did not start");
            }
        }
        let check_every = Duration::from_millis(
            (self.config.health_check_interval_seconds * 1000 / 4).clamp(100, 5_000),
        );
        let mut tick = tokio::time::interval(check_every);
        loop {
            let next_restart = self.slots.values().filter_map(|s| s.restart_at).min();
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    None => {
                        self.stop_all().await;
                        return;
                    }
                    Some(Cmd::Shutdown(done)) => {
                        self.stop_all().await;
                        let _ = done.send(self.slots.values().map(Slot::status).collect());
                        return;
                    }
                    Some(cmd) => self.on_cmd(cmd).await,
                },
                Some((id, run, status)) = exit_rx.recv() => self.on_exit(&id, run, status),
                Some(Ok((id, how, then))) = self.stopping.join_next() => {
                    self.finish(&id, Some(how), then);
                    self.run_pending_starts().await;
                }
                () = sleep_until(next_restart) => self.restart_due().await,
                _ = tick.tick() => self.check_health().await,
            }
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Start(id, env, tx) => {
                // The environment is the run's only if the start is accepted.
                let before = match (env, self.slots.get_mut(&id)) {
                    (Some(env), Some(slot)) => Some(std::mem::replace(&mut slot.env, env)),
                    _ => None,
                };
                let r = self.start(&id).await;
                if let (Err(_), Some(before), Some(slot)) = (&r, before, self.slots.get_mut(&id)) {
                    slot.env = before;
                }
                let _ = tx.send(r);
            }
            Cmd::Stop(id, graceful, grace, tx) => {
                self.stop(&id, graceful, grace, Then::Reply(tx));
            }
            Cmd::Restart(id, env, tx) => {
                if let (Some(env), Some(slot)) = (env, self.slots.get_mut(&id)) {
                    slot.env = env;
                }
                self.stop(&id, true, None, Then::Start(tx));
            }
            Cmd::Pause(id, pause, tx) => {
                let _ = tx.send(self.pause(&id, pause));
            }
            Cmd::Status(tx) => {
                let _ = tx.send(self.slots.values().map(Slot::status).collect());
            }
            Cmd::Heartbeat(id, at) => {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.last_heartbeat = Some((at, Instant::now()));
                    if slot.state == CollectorState::Unhealthy && slot.running.is_some() {
                        slot.state = CollectorState::Running;
                    }
                }
            }
            Cmd::Shutdown(_) => unreachable!("handled by run"),
        }
        // A restart of a collector that was not running has nothing to wait for.
        self.run_pending_starts().await;
    }

    fn slot(&mut self, id: &str) -> Result<&mut Slot, SupervisorError> {
        self.slots
            .get_mut(id)
            .ok_or_else(|| SupervisorError::UnknownCollector(id.to_owned()))
    }

    async fn start(&mut self, id: &str) -> Result<CollectorStatus, SupervisorError> {
        let slot = self.slot(id)?;
        if slot.running.is_some() || slot.state == CollectorState::Stopping {
            return Err(SupervisorError::WrongState {
                id: id.to_owned(),
                state: slot.state,
                what: "it is already running or still stopping; stop or restart it".into(),
            });
        }
        let spec = slot.spec.clone();
        let events = slot.events.clone();
        let mut env = slot.env.clone();
        env.push(("DAEMONEYE_COLLECTOR_ID".to_owned(), spec.id.clone()));
        // The broker learns the collector's pid before the collector runs its program.
        let before_exec = self.registry.clone().map(|r| {
            let owner = id.to_owned();
            Box::new(move |pid| r.started(&owner, pid, &events)) as spawn::BeforeExec
        });
        match self.spawner.spawn(&spec, env, before_exec).await {
            Ok(spawned) => Ok(self.started(id, spawned)),
            Err(spawn::SpawnError { error: e, pid }) => {
                if let (Some(r), Some(pid)) = (&self.registry, pid) {
                    r.ended(id, pid);
                }
                let slot = self.slot(id)?;
                slot.state = CollectorState::Failed;
                slot.last_exit = Some(format!("could not start: {e}"));
                slot.restart_at = None;
                Err(SupervisorError::Process {
                    id: id.to_owned(),
                    message: e.to_string(),
                })
            }
        }
    }

    fn started(&mut self, id: &str, spawned: Spawned) -> CollectorStatus {
        let registry = self.registry.clone();
        let exits = self.exits.clone();
        let slot = self.slots.get_mut(id).expect("checked by the caller");
        slot.run += 1;
        let run = slot.run;
        let mut exit = spawned.exit.clone();
        let owner = id.to_owned();
        let pid = spawned.pid;
        // Reports the end of this run to the actor (and the registry).
        tokio::spawn(async move {
            let status = exit.wait_for(Option::is_some).await.ok().and_then(|s| *s);
            if let Some(r) = registry {
                r.ended(&owner, pid);
            }
            let _ = exits.send((owner, run, status));
        });
        slot.running = Some(Running {
            pid: spawned.pid,
            handle: spawned.handle,
            started: Instant::now(),
            exit: spawned.exit,
            paused: false,
        });
        slot.state = CollectorState::Running;
        slot.restart_at = None;
        slot.last_heartbeat = None;
        tracing::info!(collector = id, pid = spawned.pid, "collector started");
        slot.status()
    }

    /// A run ended on its own (a requested stop clears `running` first).
    fn on_exit(&mut self, id: &str, run: u64, status: Option<ExitStatus>) {
        let policy = self.policy.clone();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        if slot.run != run || slot.running.is_none() {
            return;
        }
        let Some(ended) = slot.running.take() else {
            return;
        };
        // What the collector started in its process group goes with it.
        ended.handle.signal(Sig::Kill);
        let ran = ended.started.elapsed();
        let why = describe(status);
        tracing::warn!(collector = id, how = %why, "collector ended");
        let cause = match slot.state {
            CollectorState::Unhealthy => format!("no heartbeat; {why}"),
            _ => why,
        };
        match policy.decide(slot.in_a_row, ran, &cause) {
            Decision::Restart { after, attempt } => {
                slot.in_a_row = attempt;
                slot.state = CollectorState::BackingOff;
                slot.restart_at = Some(Instant::now() + after);
                slot.last_exit = Some(cause);
            }
            Decision::GiveUp(reason) => {
                tracing::error!(collector = id, %reason, "collector failed");
                slot.state = CollectorState::Failed;
                slot.restart_at = None;
                slot.last_exit = Some(reason);
            }
        }
    }

    async fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .slots
            .values()
            .filter(|s| s.restart_at.is_some_and(|t| t <= now))
            .map(|s| s.spec.id.clone())
            .collect();
        for id in due {
            if let Ok(slot) = self.slot(&id) {
                slot.restart_at = None;
                slot.total += 1;
            }
            if let Err(e) = self.start(&id).await {
                tracing::error!(error = %e, "restart failed");
            }
        }
    }

    /// Marks collectors whose heartbeats stopped Unhealthy, and kills them for a restart
    /// when auto restart is on.
    async fn check_health(&mut self) {
        if self.rpc.is_none() {
            // Without a bus no heartbeat can arrive: liveness is not checked.
            return;
        }
        let limit = Duration::from_secs(self.config.health_check_interval_seconds);
        let mut stale = Vec::new();
        for slot in self.slots.values_mut() {
            let Some(run) = &slot.running else { continue };
            if !slot.spec.heartbeats || run.paused || slot.state != CollectorState::Running {
                continue;
            }
            // Before its first heartbeat a collector gets a start-up grace on top.
            let (since, allowed) = match slot.last_heartbeat {
                Some((_, at)) => (at.max(run.started), limit),
                None => (run.started, limit + STARTUP_GRACE),
            };
            if since.elapsed() >= allowed {
                slot.state = CollectorState::Unhealthy;
                tracing::warn!(collector = %slot.spec.id, "no heartbeat for {} s", limit.as_secs());
                stale.push((slot.spec.id.clone(), run.handle.clone()));
            }
        }
        if !self.config.enable_auto_restart {
            return;
        }
        for (id, handle) in stale {
            // Killed; its end goes through `on_exit`, which applies the restart policy.
            handle.signal(Sig::Kill);
            tracing::warn!(collector = %id, "killed for a restart");
        }
    }

    fn pause(&mut self, id: &str, pause: bool) -> Result<CollectorStatus, SupervisorError> {
        let slot = self.slot(id)?;
        let Some(run) = slot.running.as_mut() else {
            return Err(SupervisorError::WrongState {
                id: id.to_owned(),
                state: slot.state,
                what: "only a running collector can be paused or resumed".into(),
            });
        };
        if run.exit.borrow().is_some() {
            return Err(SupervisorError::WrongState {
                id: id.to_owned(),
                state: slot.state,
                what: "it has just ended".into(),
            });
        }
        let sig = if pause { Sig::Stop } else { Sig::Continue };
        if !run.handle.signal(sig) {
            return Err(SupervisorError::Unsupported {
                id: id.to_owned(),
                what: "pausing and resuming a collector (SIGSTOP, SIGCONT) work on Unix only"
                    .into(),
            });
        }
        if pause {
            run.paused = true;
            slot.state = CollectorState::Paused;
        } else {
            run.paused = false;
            slot.state = CollectorState::Running;
            // Heartbeats could not come while it was stopped.
            slot.last_heartbeat = Some((SystemTime::now(), Instant::now()));
        }
        Ok(slot.status())
    }

    /// Starts stopping a collector in a task of its own (a graceful stop may take a minute;
    /// meanwhile the supervisor keeps answering and checking the others). `then` runs when
    /// it has ended.
    fn stop(&mut self, id: &str, graceful: bool, grace: Option<Duration>, then: Then) {
        let slot = match self.slot(id) {
            Ok(s) => s,
            Err(e) => return then.fail(e),
        };
        if slot.state == CollectorState::Stopping {
            if graceful {
                let e = SupervisorError::WrongState {
                    id: id.to_owned(),
                    state: slot.state,
                    what: "a stop is already in progress (a forced stop cuts it short)".into(),
                };
                return then.fail(e);
            }
            // Forced while a graceful stop waits: go to SIGTERM now; answer when it ends.
            slot.force.notify_one();
            slot.waiters.push(then);
            return;
        }
        slot.restart_at = None;
        slot.in_a_row = 0;
        let Some(run) = slot.running.take() else {
            slot.state = CollectorState::Stopped;
            return self.finish(id, None, then);
        };
        slot.state = CollectorState::Stopping;
        let force = std::sync::Arc::clone(&slot.force);
        let (owner, rpc, mut cfg) = (id.to_owned(), self.rpc.clone(), self.config.clone());
        if let Some(grace) = grace {
            cfg.graceful_shutdown_timeout_seconds = grace.as_secs();
        }
        self.stopping.spawn(async move {
            let how = stop_process(&owner, run, graceful, rpc, &cfg, &force).await;
            (owner, how, then)
        });
    }

    /// A stop has ended (`how`: how the process ended, `None` when it was not running).
    fn finish(&mut self, id: &str, how: Option<String>, then: Then) {
        let mut waiters = Vec::new();
        if let Some(slot) = self.slots.get_mut(id) {
            slot.state = CollectorState::Stopped;
            if let Some(how) = how {
                slot.last_exit = Some(how);
            }
            waiters = std::mem::take(&mut slot.waiters);
            // A force asked too late must not cut short the next stop.
            slot.force = std::sync::Arc::new(tokio::sync::Notify::new());
        }
        for w in waiters {
            self.answer(id, w);
        }
        self.answer(id, then);
    }

    fn answer(&mut self, id: &str, then: Then) {
        match then {
            Then::Reply(tx) => {
                let _ = tx.send(self.slot(id).map(|s| s.status()));
            }
            Then::Start(tx) => {
                // Started from the task loop: `start` awaits the spawner.
                self.pending_starts.push((id.to_owned(), tx));
            }
            Then::Nothing => {}
        }
    }

    /// Starts the collectors whose restart (stop, then start) has finished stopping.
    async fn run_pending_starts(&mut self) {
        for (id, tx) in std::mem::take(&mut self.pending_starts) {
            let r = self.start(&id).await;
            if r.is_ok()
                && let Ok(slot) = self.slot(&id)
            {
                slot.total += 1;
            }
            let _ = tx.send(
                r.map(|_| ())
                    .and_then(|()| self.slot(&id).map(|s| s.status())),
            );
        }
    }

    async fn stop_all(&mut self) {
        let ids: Vec<String> = self.slots.keys().cloned().collect();
        for id in ids {
            if self.slots[&id].state != CollectorState::Stopping {
                self.stop(&id, true, None, Then::Nothing);
            }
        }
        while let Some(done) = self.stopping.join_next().await {
            if let Ok((id, how, then)) = done {
                self.finish(&id, Some(how), then);
            }
        }
        // Restarts asked for meanwhile do not start: the supervisor is going away.
        for (id, tx) in std::mem::take(&mut self.pending_starts) {
            let _ = tx.send(Err(SupervisorError::WrongState {
                id,
                state: CollectorState::Stopped,
                what: "the supervisor is shutting down".into(),
            }));
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Waits until the run has ended, at most `limit`; returns how it ended.
async fn ended_within(run: &mut Running, limit: Duration) -> Option<Option<ExitStatus>> {
    match tokio::time::timeout(limit, run.exit.wait_for(Option::is_some)).await {
        Ok(Ok(s)) => Some(*s),
        // The waiter thread is gone without a status: the process has been reaped.
        Ok(Err(_)) => Some(None),
        Err(_) => None,
    }
}

/// Stops one process: shutdown request (graceful), SIGTERM, SIGKILL; returns how it ended.
async fn stop_process(
    id: &str,
    mut run: Running,
    graceful: bool,
    rpc: Option<CollectorRpcClient>,
    config: &ProcessManagerConfig,
    force: &tokio::sync::Notify,
) -> String {
    if let Some(status) = *run.exit.borrow() {
        return format!("had already ended ({})", describe(Some(status)));
    }
    if run.paused {
        run.handle.signal(Sig::Continue);
    }
    let how = stop_escalating(id, &mut run, graceful, rpc, config, force).await;
    // Whatever the collector started in its process group goes with it.
    run.handle.signal(Sig::Kill);
    how
}

async fn stop_escalating(
    id: &str,
    run: &mut Running,
    graceful: bool,
    rpc: Option<CollectorRpcClient>,
    config: &ProcessManagerConfig,
    cut_short: &tokio::sync::Notify,
) -> String {
    let grace = Duration::from_secs(config.graceful_shutdown_timeout_seconds);
    let force = Duration::from_secs(config.force_shutdown_timeout_seconds);
    if graceful && let Some(rpc) = rpc {
        let target = format!("control.collector.{id}");
        // The answer to the request is awaited as the lifecycle policy says
        // (rpc.policies.lifecycle), within the grace.
        let answer_within = rpc
            .config()
            .policies
            .lifecycle
            .timeout()
            .min(grace.max(Duration::from_secs(1)));
        let ask = RpcRequest::shutdown(
            String::new(),
            target,
            "stopped by the supervisor",
            grace,
            answer_within,
        );
        match rpc.call(ask, answer_within).await {
            Ok(_) => {
                let ended = tokio::select! {
                    e = ended_within(run, grace) => e,
                    () = cut_short.notified() => None,
                };
                if let Some(status) = ended {
                    return format!("stopped on request ({})", describe(status));
                }
            }
            Err(e) if e.kind == RpcErrorKind::NoResponders => {}
            Err(e) => tracing::warn!(collector = id, error = %e, "shutdown request failed"),
        }
    }
    if let Some(status) = *run.exit.borrow() {
        return format!("ended before SIGTERM ({})", describe(Some(status)));
    }
    run.handle.signal(Sig::Terminate);
    if let Some(status) = ended_within(run, force).await {
        return format!("stopped by SIGTERM ({})", describe(status));
    }
    run.handle.signal(Sig::Kill);
    let status = ended_within(run, Duration::from_secs(10)).await;
    format!(
        "killed with SIGKILL after ignoring SIGTERM for {} s ({})",
        force.as_secs(),
        describe(status.flatten())
    )
}
