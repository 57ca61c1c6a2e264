//! `eventbus agent` with its bundled procmond, across real processes: health, lifecycle
//! requests to the agent, Degraded when heartbeats stop, clean stop on SIGTERM, and no
//! collector left behind when the agent is killed with SIGKILL.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Proc, TempDir, connection, eventbus, wait_line};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::client::{Client, ClientOptions};
use daemoneye_eventbus::rpc::{
    CollectorLifecycleRequest, CollectorOperation, CollectorRpcClient, HealthStatus, RpcConfig,
    RpcRequest,
};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Agent {
    proc: Proc,
    socket: PathBuf,
}

/// The agent with `acl_file` granting what these tests do, or (`policy` false) under the
/// default policy.
fn start_agent(dir: &Path, auto_restart: bool) -> Agent {
    start_agent_with(dir, auto_restart, true)
}

/// Supervised collectors as the default policy has them, root's tools reading, and this
/// test (by its executable) calling the agent's lifecycle service as an operator.
fn write_policy(dir: &Path) -> PathBuf {
    let policy = dir.join("acl.toml");
    let operator = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    let cli = std::fs::canonicalize(env!("CARGO_BIN_EXE_eventbus")).unwrap();
    std::fs::write(
        &policy,
        format!(
            "version = 1\n\
             [[rule]]\ncollector = \"*\"\npublish = [\"events.#\", \"control.health.+.{{collector}}\"]\n\
             subscribe = [\"events.#\", \"$sys.#\"]\nreply = [\"control.collector.{{collector}}\", \"control.collector.task.{{collector}}\"]\n\
             [[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"$sys.#\", \"control.agent.status\", \"control.health.#\", \"alerts.#\"]\n\
             publish = [\"alerts.#\"]\n\
             [[rule]]\nexe = \"{}\"\nrequest = [\"control.agent.lifecycle\"]\n\
             [[rule]]\nexe = \"{}\"\nname = \"eventbus-collector\"\nrequest = [\"control.agent.lifecycle\"]\n",
            operator.display(),
            cli.display()
        ),
    )
    .unwrap();
    policy
}

fn start_agent_with(dir: &Path, auto_restart: bool, policy_file: bool) -> Agent {
    let socket = dir.join("agent.sock");
    let config = dir.join("agent.yaml");
    let policy = write_policy(dir);
    std::fs::write(
        &config,
        format!(
            "broker:\n  socket_path: {}\n{}process_manager:\n  health_check_interval_seconds: 2\n  \
             enable_auto_restart: {auto_restart}\n  graceful_shutdown_timeout_seconds: 5\n\
             rpc:\n  health_check_interval_seconds: 1\n\
             agent:\n  status_interval_seconds: 1\n",
            socket.display(),
            if policy_file {
                format!("  acl_file: {}\n", policy.display())
            } else {
                String::new()
            }
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent").arg("--config").arg(&config);
    let proc = Proc::spawn(cmd);
    wait_line(proc.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.starts_with("agent ready: broker on unix:")
            && l.ends_with("collectors: netmond, procmond")
    });
    Agent { proc, socket }
}

/// Waits for a `control.agent.status` report satisfying `pred`.
fn wait_report(
    sub: &Proc,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let rx = sub.stdout.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = wait_line(rx, what, |l| l.contains("control.agent.status"));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if pred(&v["event"]) {
            return v["event"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no report with {what}; last {}",
            v["event"]
        );
    }
}

fn status_sub(socket: &Path) -> Proc {
    let mut cmd = eventbus();
    cmd.args(["sub", "--json", "control.agent.status"])
        .env("EVENTBUS_SOCKET", socket);
    let p = Proc::spawn(cmd);
    wait_line(p.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
    p
}

/// Runs `calls` as the operator the policy names (this test's executable) on the agent at
/// `socket`: a client and an RPC caller over it, the client closed after.
fn operator<F, Fut>(socket: &Path, calls: F)
where
    F: FnOnce(Client, CollectorRpcClient) -> Fut,
    Fut: std::future::Future<Output = Client>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = Client::connect(
            &Endpoint::Unix(socket.to_path_buf()),
            ClientOptions::named("operator"),
        )
        .await
        .unwrap();
        let rpc = CollectorRpcClient::new(client.clone(), "operator", RpcConfig::default());
        calls(client, rpc).await.close().await;
    });
}

/// Collector `id` in a status report.
fn col<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["collectors"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["id"] == id))
        .unwrap_or(&serde_json::Value::Null)
}

fn procmond_pid(report: &serde_json::Value) -> u32 {
    u32::try_from(col(report, "procmond")["pid"].as_u64().unwrap()).unwrap()
}

fn gone(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty()
        || matches!(
            stat.rsplit_once(") ").map(|(_, r)| &r[..1]),
            Some("Z" | "X")
        )
}

#[test]
fn the_agent_supervises_procmond_and_reports_its_health() {
    let dir = TempDir::new("agent");
    let mut agent = start_agent(dir.path(), false);
    // The first report waits until procmond was heard: it does not say Degraded because
    // procmond was still starting.
    let first = wait_line(
        agent.proc.stdout.as_ref().unwrap(),
        "the first report",
        |l| l.starts_with("agent: health"),
    );
    assert!(
        first.starts_with("agent: health Healthy")
            && first.contains("procmond running HEALTHY")
            && first.contains("netmond running HEALTHY"),
        "{first}"
    );
    let sub = status_sub(&agent.socket);
    // Heartbeats arrive and the health check over RPC answers.
    let healthy = wait_report(&sub, "a healthy report", |r| {
        r["health"] == "Healthy"
            && col(r, "procmond")["heartbeat_age_secs"].is_number()
            && col(r, "procmond")["health"] == "HEALTHY"
            && col(r, "procmond")["health_reason"] == "ok"
            && col(r, "netmond")["health"] == "HEALTHY"
    });
    assert_eq!(col(&healthy, "procmond")["state"], "running");
    let pid = procmond_pid(&healthy);

    // The broker knows procmond's process: its connection is the collector, and no other
    // process may connect under its name.
    let conn = connection(&agent.socket, |c| c["name"] == "procmond");
    assert_eq!(
        (conn["collector"].as_str(), conn["pid"].as_u64()),
        (Some("procmond"), Some(u64::from(pid)))
    );
    let mut impostor = eventbus();
    impostor
        .args([
            "pub",
            "events.process.lifecycle",
            "forged",
            "--name",
            "procmond",
        ])
        .env("EVENTBUS_SOCKET", &agent.socket);
    let mut impostor = Proc::spawn(impostor);
    assert_ne!(impostor.wait(), 0);
    let why = impostor.stderr_lines().join("\n");
    assert!(
        why.contains(&format!(
            "belongs to the collector the supervisor started (pid {pid})"
        )),
        "{why}"
    );

    // Lifecycle requests to the agent act on its supervisor.
    let sub = &sub;
    operator(&agent.socket, |client, rpc| async move {
        let call = |op| {
            RpcRequest::lifecycle(
                String::new(),
                "control.agent.lifecycle".into(),
                op,
                CollectorLifecycleRequest::status("procmond"),
                Duration::from_secs(20),
            )
        };
        let status = rpc
            .call(call(CollectorOperation::Status), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            status.lifecycle().unwrap().status.as_ref().unwrap().pid,
            pid
        );
        let stopped = rpc
            .call(call(CollectorOperation::Stop), Duration::from_secs(20))
            .await
            .unwrap();
        let s = stopped.lifecycle().unwrap().status.clone().unwrap();
        assert_eq!(s.pid, 0);
        assert!(
            s.last_exit_reason.starts_with("stopped on request"),
            "procmond stops gracefully over RPC: {s:?}"
        );
        assert!(gone(pid));
        // A stopped collector is reported stopped, without the health check of its last run.
        let report = wait_report(sub, "procmond stopped", |r| {
            col(r, "procmond")["state"] == "stopped"
        });
        let stopped = col(&report, "procmond");
        assert_eq!(stopped["health"], "UNHEALTHY", "{report}");
        assert!(
            stopped["health_reason"]
                .as_str()
                .unwrap()
                .starts_with("stopped: stopped on request"),
            "{report}"
        );
        assert_eq!(report["health"], "Degraded", "{report}");
        let started = rpc
            .call(call(CollectorOperation::Start), Duration::from_secs(20))
            .await
            .unwrap();
        assert_ne!(started.lifecycle().unwrap().status.as_ref().unwrap().pid, 0);
        // A restart's configuration is sent to the collector once it serves: applied, or
        // refused with the collector's reasons.
        let restart_with = |config| {
            let mut req = CollectorLifecycleRequest::status("procmond");
            req.config = Some(config);
            RpcRequest::lifecycle(
                String::new(),
                "control.agent.lifecycle".into(),
                CollectorOperation::Restart,
                req,
                Duration::from_secs(30),
            )
        };
        let applied = rpc
            .call(
                restart_with(daemoneye_eventbus::rpc::CollectorConfig {
                    scan_interval_ms: 250,
                    ..Default::default()
                }),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let l = applied.lifecycle().unwrap();
        assert!(l.success, "{l:?}");
        let refused = rpc
            .call(
                restart_with(daemoneye_eventbus::rpc::CollectorConfig {
                    limits: Some(Default::default()),
                    ..Default::default()
                }),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let l = refused.lifecycle().unwrap();
        assert!(!l.success && l.error_message.contains("limits"), "{l:?}");
        let unknown = RpcRequest::lifecycle(
            String::new(),
            "control.agent.lifecycle".into(),
            CollectorOperation::Status,
            CollectorLifecycleRequest::status("filemond"),
            Duration::from_secs(5),
        );
        let e = rpc.call(unknown, Duration::from_secs(5)).await.unwrap_err();
        assert!(e.message.contains("no collector \"filemond\""), "{e}");
        client
    });

    // Heartbeats stop (procmond frozen): the agent is Degraded.
    let report = wait_report(sub, "procmond running again", |r| {
        col(r, "procmond")["state"] == "running" && r["health"] == "Healthy"
    });
    let pid = procmond_pid(&report);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let degraded = wait_report(sub, "a degraded report", |r| r["health"] == "Degraded");
    assert_eq!(col(&degraded, "procmond")["state"], "unhealthy");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    // Heard again: running and healthy, the same process.
    let again = wait_report(sub, "procmond healthy again", |r| {
        col(r, "procmond")["state"] == "running" && r["health"] == "Healthy"
    });
    assert_eq!(procmond_pid(&again), pid);

    // SIGTERM: collectors first, then the broker; everything reaped.
    agent.proc.signal(Signal::SIGTERM);
    assert_eq!(agent.proc.wait(), 0);
    let out = agent.proc.stdout_lines();
    assert!(
        out.iter()
            .any(|l| l.starts_with("collector procmond: stopped")),
        "{out:?}"
    );
    assert!(gone(pid));
}

#[test]
fn no_collector_survives_an_agent_killed_with_sigkill() {
    let dir = TempDir::new("agent-kill");
    // The default policy: the supervised procmond's heartbeats get through.
    let mut agent = start_agent_with(dir.path(), false, false);
    let sub = status_sub(&agent.socket);
    let pid = procmond_pid(&wait_report(&sub, "procmond running and heard", |r| {
        col(r, "procmond")["pid"].is_number()
            && col(r, "procmond")["heartbeat_age_secs"].is_number()
    }));
    // Its snapshot (events.process.batch, its declared domain) and heartbeats got through.
    let procmond = connection(&agent.socket, |c| c["collector"] == "procmond");
    assert_eq!(procmond["denied"], 0, "{procmond}");
    assert!(procmond["published"].as_u64() > Some(1), "{procmond}");
    agent.proc.signal(Signal::SIGKILL);
    agent.proc.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !gone(pid) {
        assert!(
            Instant::now() < deadline,
            "procmond {pid} outlived the agent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent keeps durable subscriptions beside its socket (`state/`) by default: what was
/// acknowledged to a publisher reaches the subscriber after the agent was killed and started
/// again.
#[test]
fn durable_subscriptions_outlive_the_agent() {
    let dir = TempDir::new("agent-durable");
    let mut agent = start_agent(dir.path(), false);
    let run = |args: &[&str]| {
        let mut cmd = eventbus();
        cmd.args(args).env("EVENTBUS_SOCKET", &agent.socket);
        Proc::spawn(cmd)
    };
    let mut made = run(&["sub", "--durable", "alerts", "alerts.#"]);
    wait_line(made.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
    made.signal(Signal::SIGTERM);
    made.wait();
    let mut published = run(&[
        "pub",
        "alerts.high",
        "x",
        "--count",
        "3",
        "--qos",
        "processed",
    ]);
    assert_eq!(published.wait(), 0);
    assert!(dir.path().join("state/durable/alerts/meta.json").exists());
    agent.proc.signal(Signal::SIGKILL);
    agent.proc.wait();
    let agent = start_agent(dir.path(), false);
    let mut cmd = eventbus();
    cmd.args(["sub", "--durable", "alerts", "alerts.#", "--count", "3"])
        .env("EVENTBUS_SOCKET", &agent.socket);
    let mut sub = Proc::spawn(cmd);
    assert_eq!(sub.wait(), 0);
    let lines = sub.stdout_lines();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("alerts.high")),
        "{lines:?}"
    );
}

/// `broker.tcp_listen` acts: the agent's broker also listens on that loopback address, and a
/// client reaches it there.
#[test]
fn the_agent_listens_on_broker_tcp_listen() {
    let dir = TempDir::new("agent-tcp");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "broker:\n  socket_path: {}\n  tcp_listen: 127.0.0.1:0\ncollectors: []\n",
            dir.path().join("agent.sock").display()
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent").arg("--config").arg(&config);
    let mut agent = Proc::spawn(cmd);
    let ready = wait_line(agent.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.starts_with("agent ready")
    });
    let tcp = ready
        .split_whitespace()
        .find_map(|w| w.trim_end_matches(',').strip_prefix("tcp:"))
        .unwrap_or_else(|| panic!("no tcp endpoint: {ready}"))
        .to_owned();
    let mut stats = eventbus();
    stats
        .args(["stats", "--json", "--socket", &format!("tcp://{tcp}")])
        .env_remove("EVENTBUS_SOCKET");
    let mut stats = Proc::spawn(stats);
    assert_eq!(stats.wait(), 0, "{:?}", stats.stderr_lines());
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(), 0);
}

/// `eventbus collector` drives the supervisor through the agent's lifecycle service: list,
/// pause (the process stopped), resume, restart (a new pid), stop and start; an unknown id and
/// a client the policy does not grant are refused with exit status 5.
#[test]
fn the_collector_command_drives_the_agents_collectors() {
    let dir = TempDir::new("agent-collector");
    let mut agent = start_agent(dir.path(), false);
    let run = |args: &[&str]| {
        let mut cmd = eventbus();
        cmd.arg("collector")
            .args(args)
            .env("EVENTBUS_SOCKET", &agent.socket);
        let mut p = Proc::spawn(cmd);
        let code = p.wait();
        (code, p.stdout_lines(), p.stderr_lines())
    };
    let status = |args: &[&str]| {
        let (code, out, err) = run(args);
        assert_eq!(code, 0, "{args:?}: {err:?}");
        assert_eq!(out.len(), 1, "{out:?}");
        serde_json::from_str::<serde_json::Value>(&out[0]).unwrap()
    };
    // Once the collectors were heard, the list says what each is and can do.
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let (code, out, err) = run(&["list", "--json"]);
        assert_eq!(code, 0, "{err:?}");
        let all: Vec<serde_json::Value> = out
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(all.len(), 2, "{out:?}");
        let heard = |id: &str, can: &str| {
            all.iter().find(|c| c["id"] == id).filter(|c| {
                c["capabilities"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == can))
            })
        };
        if let (Some(p), Some(n)) = (
            heard("procmond", "process-lifecycle"),
            heard("netmond", "network-connections"),
        ) {
            assert_eq!(n["type"], "netmond");
            break p.clone();
        }
        assert!(Instant::now() < deadline, "{out:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(listed["type"], "procmond");
    assert_eq!(listed["id"], "procmond");
    assert_eq!(listed["state"], "running");
    assert!(
        listed["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "process-lifecycle"),
        "{listed}"
    );
    let pid = u32::try_from(listed["pid"].as_u64().unwrap()).unwrap();
    let proc_state = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit_once(") ").unwrap().1[..1].to_owned()
    };
    assert_eq!(status(&["pause", "procmond", "--json"])["state"], "paused");
    assert_eq!(proc_state(pid), "T");
    assert_eq!(
        status(&["resume", "procmond", "--json"])["state"],
        "running"
    );
    assert_ne!(proc_state(pid), "T");
    let restarted = status(&[
        "restart",
        "procmond",
        "--json",
        "--env",
        "DAEMONEYE_TEST=on",
    ]);
    assert_eq!(restarted["state"], "running");
    assert_ne!(restarted["pid"], pid);
    let new = restarted["pid"].as_u64().unwrap();
    let environ = std::fs::read(format!("/proc/{new}/environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|v| v == b"DAEMONEYE_TEST=on"),
        "the restart's environment"
    );
    assert_eq!(
        status(&["stop", "procmond", "--json", "--grace", "2"])["state"],
        "stopped"
    );
    let (code, out, _) = run(&["list"]);
    assert_eq!(code, 0);
    assert!(
        out.iter()
            .any(|l| l.starts_with("procmond") && l.contains("stopped")),
        "{out:?}"
    );
    assert_eq!(status(&["start", "procmond", "--json"])["state"], "running");
    let (code, _, err) = run(&["status", "filemond"]);
    assert_eq!(code, 5, "{err:?}");
    assert!(
        err.join(" ").contains("no collector \"filemond\""),
        "{err:?}"
    );
    agent.proc.signal(Signal::SIGTERM);
    assert_eq!(agent.proc.wait(), 0);

    // Under the default policy, only an operator the policy names may drive collectors.
    let dir = TempDir::new("agent-collector-default");
    let mut agent = start_agent_with(dir.path(), false, false);
    let mut cmd = eventbus();
    cmd.args(["collector", "list"])
        .env("EVENTBUS_SOCKET", &agent.socket);
    let mut p = Proc::spawn(cmd);
    assert_eq!(p.wait(), 5);
    let err = p.stderr_lines().join(" ");
    assert!(
        err.contains("not allowed to send requests on control.agent.lifecycle"),
        "{err}"
    );
    agent.proc.signal(Signal::SIGTERM);
    assert_eq!(agent.proc.wait(), 0);
}

/// Several instances of one collector type: two procmond under distinct ids, one type, each
/// its own process, heard and health-checked apart.
#[test]
fn the_agent_runs_two_instances_of_one_collector_type() {
    let dir = TempDir::new("agent-instances");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.toml");
    let procmond = common::collector_bin("procmond");
    let entry = |id: &str| {
        format!(
            "[[collectors]]\nid = \"{id}\"\ncollector_type = \"procmond\"\nbinary = \"{}\"\n\
             args = [\"--heartbeat-secs\", \"1\", \"--source\", \"proc\"]\n\
             events = [\"events.process.#\"]\n",
            procmond.display()
        )
    };
    std::fs::write(
        &config,
        format!(
            "[broker]\nsocket_path = \"{}\"\nacl_file = \"{}\"\n\
             [process_manager]\nhealth_check_interval_seconds = 2\n\
             [rpc]\nhealth_check_interval_seconds = 1\n[agent]\nstatus_interval_seconds = 1\n{}{}",
            socket.display(),
            write_policy(dir.path()).display(),
            entry("procmond-a"),
            entry("procmond-b")
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent").arg("--config").arg(&config);
    let mut agent = Proc::spawn(cmd);
    wait_line(agent.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.ends_with("collectors: procmond-a, procmond-b")
    });
    let sub = status_sub(&socket);
    let report = wait_report(&sub, "both instances healthy", |r| {
        ["procmond-a", "procmond-b"]
            .iter()
            .all(|id| col(r, id)["health"] == "HEALTHY")
    });
    let (a, b) = (col(&report, "procmond-a"), col(&report, "procmond-b"));
    assert_eq!(
        (&a["collector_type"], &b["collector_type"]),
        (&"procmond".into(), &"procmond".into())
    );
    assert_ne!(a["pid"], b["pid"]);
    assert!(
        a["capabilities"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "process-lifecycle"),
        "{report}"
    );
    // A lifecycle request naming a type acts only on a collector of that type.
    operator(&socket, |client, rpc| async move {
        let stop_as = |kind: &str| {
            let mut body = CollectorLifecycleRequest::status("procmond-b");
            body.collector_type = kind.into();
            RpcRequest::lifecycle(
                String::new(),
                "control.agent.lifecycle".into(),
                CollectorOperation::Stop,
                body,
                Duration::from_secs(10),
            )
        };
        let e = rpc
            .call(stop_as("netmond"), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            e.message
                .contains("procmond-b is a procmond, not a netmond"),
            "{e}"
        );
        let stopped = rpc
            .call(stop_as("procmond"), Duration::from_secs(10))
            .await
            .unwrap();
        let s = stopped.lifecycle().unwrap().status.clone().unwrap();
        assert_eq!((s.collector_id.as_str(), s.pid), ("procmond-b", 0));
        // The agent's own health check says what its status reports say, collector by
        // collector.
        let health = rpc
            .call(
                RpcRequest::health_check(
                    String::new(),
                    "control.agent.lifecycle".into(),
                    Duration::from_secs(10),
                ),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        let h = health.health_check().unwrap();
        assert_eq!(h.status, HealthStatus::Degraded as i32, "{h:?}");
        assert_eq!(
            h.components["procmond-a"].status,
            HealthStatus::Healthy as i32,
            "{h:?}"
        );
        let b = &h.components["procmond-b"];
        assert_eq!(b.status, HealthStatus::Unhealthy as i32, "{h:?}");
        assert!(b.message.starts_with("stopped"), "{h:?}");
        client
    });
    agent.signal(Signal::SIGTERM);
    assert_eq!(agent.wait(), 0);
}
