//! The supervisor with real child processes: restart until the limit, kill escalation,
//! graceful stop over RPC, pause / resume, resource limits, heartbeats, and no orphans when
//! the supervising process is killed.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{Client, ClientOptions};
use daemoneye_eventbus::core::ReplyStatus;
use daemoneye_eventbus::rpc::{CollectorCall, CollectorHandler, rpc_response, serve_collector};
use daemoneye_eventbus::schema::rpc as pb;
use daemoneye_eventbus::supervisor::{
    CollectorSpec, CollectorState, CollectorStatus, ProcessManagerConfig, Supervisor,
};
use daemoneye_eventbus::{Endpoint, Topic};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);
const SOCKET_ENV: &str = "EVENTBUS_TEST_SUP_SOCKET";
const ROLE_ENV: &str = "EVENTBUS_TEST_SUP_ROLE";

fn fast() -> ProcessManagerConfig {
    ProcessManagerConfig {
        graceful_shutdown_timeout_seconds: 5,
        force_shutdown_timeout_seconds: 1,
        health_check_interval_seconds: 1,
        enable_auto_restart: true,
        max_restart_attempts: 2,
        restart_backoff_seconds: 0,
    }
}

fn sh(id: &str, script: &str) -> CollectorSpec {
    let mut spec = CollectorSpec::new(id, "/bin/sh");
    spec.args = vec!["-c".into(), script.into()];
    spec.heartbeats = false;
    spec
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("eb-sup-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls the status of `id` until `pred` holds (bounded by `WAIT`).
async fn wait_for(
    sup: &Supervisor,
    id: &str,
    pred: impl Fn(&CollectorStatus) -> bool,
) -> CollectorStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = sup
            .status()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.id == id)
            .unwrap();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out; last status {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The process state letter from /proc (R, S, T stopped, Z zombie), `None` when gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    after.chars().next()
}

fn gone(pid: u32) -> bool {
    matches!(proc_state(pid), None | Some('Z' | 'X'))
}

#[tokio::test]
async fn a_crashing_collector_is_restarted_until_the_limit_then_failed() {
    let sup = Supervisor::start(fast(), vec![sh("crashy", "exit 3")], None)
        .await
        .unwrap();
    let s = wait_for(&sup, "crashy", |s| s.state == CollectorState::Failed).await;
    assert_eq!(s.restart_count, 2, "{s:?}");
    let why = s.last_exit.unwrap();
    assert!(
        why.contains("exited with status 3") && why.contains("gave up after 2 restarts"),
        "{why}"
    );
    // A failed collector can be started again by hand.
    let s = sup.start_collector("crashy").await.unwrap();
    assert_eq!(s.state, CollectorState::Running);
    sup.shutdown().await;
}

#[tokio::test]
async fn a_collector_that_ignores_sigterm_is_killed_after_the_timeout() {
    let dir = TempDir::new("stubborn");
    let armed = dir.0.join("armed");
    let script = format!(
        "trap '' TERM; touch {}; while true; do sleep 0.05; done",
        armed.display()
    );
    let sup = Supervisor::start(fast(), vec![sh("stubborn", &script)], None)
        .await
        .unwrap();
    let running = wait_for(&sup, "stubborn", |s| s.pid.is_some()).await;
    let pid = running.pid.unwrap();
    // Only once the shell ignores SIGTERM.
    let deadline = Instant::now() + WAIT;
    while !armed.exists() {
        assert!(Instant::now() < deadline, "the script never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let stopping = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.stop_collector("stubborn", true).await })
    };
    // The supervisor keeps answering while the stop waits out the timeouts.
    wait_for(&sup, "stubborn", |s| s.state == CollectorState::Stopping).await;
    let s = stopping.await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited the force timeout"
    );
    assert_eq!(s.state, CollectorState::Stopped);
    let how = s.last_exit.unwrap();
    assert!(
        how.starts_with("killed with SIGKILL after ignoring SIGTERM"),
        "{how}"
    );
    assert!(gone(pid));
    // Stopped by request: not restarted.
    assert_eq!(
        sup.status().await.unwrap()[0].state,
        CollectorState::Stopped
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn pause_resume_and_resource_limits_are_applied() {
    let dir = TempDir::new("limits");
    let out = dir.0.join("limits.txt");
    let ticks = dir.0.join("ticks.txt");
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let script = format!(
        "ulimit -n > {0}; ulimit -v >> {0}; ulimit -t >> {0}; \
         while true; do echo . >> {1}; sleep 0.05; done",
        out.display(),
        ticks.display()
    );
    let mut spec = sh("limited", &script);
    spec.limits.max_open_files = Some(64);
    spec.limits.max_memory_bytes = Some(512 << 20);
    spec.limits.max_cpu_seconds = Some(3600);
    let sup = Supervisor::start(fast(), vec![spec], None).await.unwrap();
    let pid = wait_for(&sup, "limited", |s| s.pid.is_some())
        .await
        .pid
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let limits = loop {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if text.lines().count() == 3 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the child never wrote its limits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = limits.lines().collect();
    assert_eq!(lines, ["64", &(512 * 1024).to_string(), "3600"]);

    let s = sup.pause("limited").await.unwrap();
    assert_eq!(s.state, CollectorState::Paused);
    // Stopped: the loop writes nothing more (the shell shows T, or D when stopped while
    // starting its `sleep`).
    let deadline = Instant::now() + WAIT;
    while !matches!(proc_state(pid), Some('T' | 'D')) {
        assert!(
            Instant::now() < deadline,
            "not stopped: {:?}",
            proc_state(pid)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frozen = size(&ticks);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(size(&ticks), frozen, "a paused collector makes no progress");
    let s = sup.resume("limited").await.unwrap();
    assert_eq!(s.state, CollectorState::Running);
    let deadline = Instant::now() + WAIT;
    while size(&ticks) == frozen {
        assert!(Instant::now() < deadline, "no progress after resume");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = sup.start_collector("limited").await.unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    sup.shutdown().await;
    assert!(gone(pid));
}

/// A collector that answers the shutdown request by exiting.
struct Cooperative(tokio::sync::mpsc::Sender<()>);

impl CollectorHandler for Cooperative {
    async fn handle(&self, call: CollectorCall) -> Result<rpc_response::Body, ReplyStatus> {
        let _ = self.0.send(()).await;
        Ok(rpc_response::Body::Shutdown(pb::ShutdownResponse {
            accepted: true,
            message: format!("{:?} accepted", call.operation),
        }))
    }
}

/// Child roles, run only when re-executed by the tests below.
#[tokio::test]
async fn child_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let socket = std::env::var(SOCKET_ENV).unwrap();
    let id = std::env::var("DAEMONEYE_COLLECTOR_ID").unwrap_or_else(|_| "child".into());
    match role.as_str() {
        "cooperative" => {
            let client = Client::connect(
                &Endpoint::parse(&socket).unwrap(),
                ClientOptions::named(&id),
            )
            .await
            .unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let service = serve_collector(&client, &id, Cooperative(tx))
                .await
                .unwrap();
            println!("ready");
            rx.recv().await;
            service.drain(WAIT).await;
            client.drain().await;
            std::process::exit(0);
        }
        "accepts-but-stays" => {
            // Says yes to the shutdown request, then carries on until signalled.
            let client = Client::connect(
                &Endpoint::parse(&socket).unwrap(),
                ClientOptions::named(&id),
            )
            .await
            .unwrap();
            let (tx, _rx) = tokio::sync::mpsc::channel(1);
            let _service = serve_collector(&client, &id, Cooperative(tx))
                .await
                .unwrap();
            println!("ready");
            tokio::time::sleep(Duration::from_secs(300)).await;
        }
        "heartbeat-once" => {
            let client = Client::connect(
                &Endpoint::parse(&socket).unwrap(),
                ClientOptions::named(&id),
            )
            .await
            .unwrap();
            let topic = Topic::new(format!("control.health.heartbeat.{id}")).unwrap();
            client.publish(&topic, "alive").await.unwrap();
            client.flush().await.unwrap();
            // Then silence, while staying alive.
            tokio::time::sleep(Duration::from_secs(300)).await;
        }
        "agent" => {
            // Supervises a long sleep, prints its pid, and waits to be killed.
            let sup = Supervisor::start(fast(), vec![sh("sleeper", "exec sleep 300")], None)
                .await
                .unwrap();
            let pid = wait_for(&sup, "sleeper", |s| s.pid.is_some())
                .await
                .pid
                .unwrap();
            println!("child {pid}");
            tokio::time::sleep(Duration::from_secs(300)).await;
        }
        other => panic!("unknown role {other}"),
    }
}

fn child_spec(id: &str, role: &str, socket: &str) -> CollectorSpec {
    let mut spec = CollectorSpec::new(id, std::env::current_exe().unwrap());
    spec.args = vec![
        "--exact".into(),
        "child_role".into(),
        "--nocapture".into(),
        "--test-threads=1".into(),
    ];
    spec.env.insert(ROLE_ENV.into(), role.into());
    spec.env.insert(SOCKET_ENV.into(), socket.into());
    spec
}

async fn broker(dir: &Path) -> (Broker, String, Client) {
    let path = dir.join("bus.sock");
    let broker = Broker::start_on(
        common::open(BrokerConfig::default()),
        &[Endpoint::Unix(path.clone())],
    )
    .await
    .unwrap();
    let socket = format!("unix://{}", path.display());
    let client = Client::connect(broker.inproc_endpoint(), ClientOptions::named("supervisor"))
        .await
        .unwrap();
    (broker, socket, client)
}

/// Waits until collector `id` answers on its RPC address (anything but "no responders").
async fn wait_serving(client: &Client, id: &str) {
    let deadline = Instant::now() + WAIT;
    let topic = Topic::new(format!("control.collector.{id}")).unwrap();
    loop {
        match client.request(&topic, "", Duration::from_millis(200)).await {
            Err(e) if e.kind == daemoneye_eventbus::rpc::RpcErrorKind::NoResponders => {}
            _ => return,
        }
        assert!(Instant::now() < deadline, "collector {id} never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_cooperating_collector_stops_on_request() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("graceful");
    let (broker, socket, client) = broker(&dir.0).await;
    let mut spec = child_spec("coop", "cooperative", &socket);
    spec.heartbeats = false;
    let sup = Supervisor::start(fast(), vec![spec], Some(client.clone()))
        .await
        .unwrap();
    wait_serving(&client, "coop").await;
    let s = sup.stop_collector("coop", true).await.unwrap();
    let how = s.last_exit.unwrap();
    assert_eq!(how, "stopped on request (exited with status 0)");
    sup.shutdown().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn silent_heartbeats_make_a_collector_unhealthy_then_restarted() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("heartbeat");
    let (broker, socket, client) = broker(&dir.0).await;
    let spec = child_spec("quiet", "heartbeat-once", &socket);
    let config = ProcessManagerConfig {
        max_restart_attempts: 1,
        ..fast()
    };
    let sup = Supervisor::start(config, vec![spec], Some(client))
        .await
        .unwrap();
    let first = wait_for(&sup, "quiet", |s| s.last_heartbeat.is_some()).await;
    // Its heartbeats stop: restarted once, then Failed with the reason.
    let s = wait_for(&sup, "quiet", |s| s.state == CollectorState::Failed).await;
    assert!(s.restart_count >= 1);
    assert!(s.last_exit.unwrap().contains("no heartbeat"));
    assert!(gone(first.pid.unwrap()));
    sup.shutdown().await;
    broker.shutdown().await;
}

#[test]
fn no_collector_survives_the_supervisor_killed_with_sigkill() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, "agent")
        .env(SOCKET_ENV, "unused")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stdout.take().unwrap()).lines();
    let child: u32 = loop {
        let line = lines.next().expect("the agent printed its child").unwrap();
        if let Some(pid) = line.split("child ").nth(1) {
            break pid.trim().parse().unwrap();
        }
    };
    assert!(!gone(child), "the collector runs");
    agent.kill().unwrap(); // SIGKILL: no chance to clean up
    agent.wait().unwrap();
    let deadline = Instant::now() + WAIT;
    while !gone(child) {
        assert!(
            Instant::now() < deadline,
            "collector {child} outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_forced_stop_cuts_a_graceful_stop_short() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("force");
    let (broker, socket, client) = broker(&dir.0).await;
    let mut spec = child_spec("lingers", "accepts-but-stays", &socket);
    spec.heartbeats = false;
    let config = ProcessManagerConfig {
        graceful_shutdown_timeout_seconds: 60,
        ..fast()
    };
    let sup = Supervisor::start(config, vec![spec], Some(client.clone()))
        .await
        .unwrap();
    wait_serving(&client, "lingers").await;
    let started = Instant::now();
    let graceful = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.stop_collector("lingers", true).await })
    };
    wait_for(&sup, "lingers", |s| s.state == CollectorState::Stopping).await;
    let e = sup.stop_collector("lingers", true).await.unwrap_err();
    assert!(e.to_string().contains("already in progress"), "{e}");
    let forced = sup.stop_collector("lingers", false).await.unwrap();
    let graceful = graceful.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the 60 s grace"
    );
    for s in [forced, graceful] {
        assert_eq!(s.state, CollectorState::Stopped);
        assert!(s.last_exit.unwrap().starts_with("stopped by SIGTERM"));
    }
    sup.shutdown().await;
    broker.shutdown().await;
}

/// What a registry saw: for each start, the pid and the program that pid ran at that moment.
#[derive(Default)]
struct Seen {
    started: Vec<(String, u32, Option<PathBuf>)>,
    ended: Vec<(String, u32)>,
}

struct Recording(std::sync::Mutex<Seen>);

impl daemoneye_eventbus::supervisor::CollectorRegistry for Recording {
    fn started(&self, id: &str, pid: u32, _events: &[daemoneye_eventbus::core::TopicFilter]) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        self.0.lock().unwrap().started.push((id.into(), pid, exe));
    }

    fn ended(&self, id: &str, pid: u32) {
        self.0.lock().unwrap().ended.push((id.into(), pid));
    }
}

/// The registry (the broker) hears of a collector's pid before the collector runs its
/// program, so it cannot connect, publish or serve before the broker knows it; a program that
/// cannot be started is registered and then forgotten.
#[tokio::test]
async fn the_registry_knows_a_collector_before_its_program_runs() {
    let seen = std::sync::Arc::new(Recording(std::sync::Mutex::default()));
    let mut missing = sh("missing", "");
    missing.binary = PathBuf::from("/nonexistent/collector");
    let mut config = fast();
    config.enable_auto_restart = false;
    let sup = Supervisor::start_registered(
        config,
        vec![sh("quick", "exit 0"), missing],
        None,
        daemoneye_eventbus::rpc::RpcConfig::default(),
        Some(seen.clone()),
    )
    .await
    .unwrap();
    wait_for(&sup, "quick", |s| s.state != CollectorState::Running).await;
    wait_for(&sup, "missing", |s| s.state == CollectorState::Failed).await;
    sup.shutdown().await;
    let seen = seen.0.lock().unwrap();
    let me = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    let quick = seen.started.iter().find(|s| s.0 == "quick").unwrap();
    // Still the forked copy of this test, not yet /bin/sh.
    assert_eq!(quick.2.as_deref(), Some(me.as_path()), "{:?}", seen.started);
    let missing = seen.started.iter().find(|s| s.0 == "missing").unwrap();
    let mut ended = seen.ended.clone();
    ended.sort();
    assert_eq!(
        ended,
        vec![("missing".into(), missing.1), ("quick".into(), quick.1)]
    );
}

/// A stop's own grace replaces `graceful_shutdown_timeout_seconds`; a start's environment is
/// its runs' (restarts included) and a refused start changes nothing.
#[tokio::test]
async fn lifecycle_requests_act_on_their_grace_and_environment() {
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let dir = TempDir::new("grace-env");
    let (broker, socket, client) = broker(&dir.0).await;
    let mut lingers = child_spec("lingers", "accepts-but-stays", &socket);
    lingers.heartbeats = false;
    let out = dir.0.join("foo");
    let mut env = sh(
        "env",
        &format!("echo \"$FOO\" > '{}'; exec sleep 30", out.display()),
    );
    env.heartbeats = false;
    let config = ProcessManagerConfig {
        graceful_shutdown_timeout_seconds: 60,
        ..fast()
    };
    let sup = Supervisor::start(config, vec![lingers, env], Some(client.clone()))
        .await
        .unwrap();
    wait_serving(&client, "lingers").await;
    let started = Instant::now();
    let s = sup
        .stop_collector_within("lingers", true, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(
        s.last_exit
            .as_deref()
            .unwrap()
            .starts_with("stopped by SIGTERM"),
        "{s:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not the 60 s grace"
    );

    let written = |what: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            if std::fs::read_to_string(&out).is_ok_and(|t| t.trim() == what) {
                return;
            }
            assert!(Instant::now() < deadline, "{out:?} never said {what:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    written("");
    // Running: a start is refused, and its environment is not kept.
    let env = |v: &str| Some(vec![("FOO".to_owned(), v.to_owned())]);
    assert!(
        sup.start_collector_with("env", env("refused"))
            .await
            .is_err()
    );
    std::fs::remove_file(&out).unwrap();
    sup.restart_collector_with("env", env("bar")).await.unwrap();
    written("bar");
    // A restart without one keeps it.
    std::fs::remove_file(&out).unwrap();
    sup.restart_collector("env").await.unwrap();
    written("bar");
    sup.shutdown().await;
    broker.shutdown().await;
}
