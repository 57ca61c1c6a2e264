//! Detection rules end to end, across real processes: `eventbus agent --rules DIR` with its
//! bundled procmond and netmond, alerts read with `eventbus sub --json 'events.alert.#'`, and
//! `eventbus rules check`.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Proc, TempDir, eventbus, wait_line};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Seconds between the test rules' evaluations.
const INTERVAL: u64 = 2;

/// The shipped example rule, evaluated every [`INTERVAL`] seconds.
fn example_rule() -> String {
    include_str!("../../agent/rules/process-from-temp-dir.yaml").replace(
        "interval_seconds: 10",
        &format!("interval_seconds: {INTERVAL}"),
    )
}

fn start_agent(dir: &Path, rules: &Path) -> (Proc, std::path::PathBuf) {
    let socket = dir.join("agent.sock");
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "broker:\n  socket_path: {}\nrpc:\n  health_check_interval_seconds: 1\n\
             agent:\n  status_interval_seconds: 1\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--rules")
        .arg(rules);
    let agent = Proc::spawn(cmd);
    wait_line(agent.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.starts_with("agent ready")
    });
    (agent, socket)
}

fn alerts_sub(socket: &Path) -> Proc {
    let mut cmd = eventbus();
    cmd.args(["sub", "--json", "events.alert.#"])
        .env("EVENTBUS_SOCKET", socket);
    let p = Proc::spawn(cmd);
    wait_line(p.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
    p
}

/// The next alert of rule `id` within `wait`, if any.
fn next_alert(sub: &Proc, id: &str, wait: Duration) -> Option<serde_json::Value> {
    let rx = sub.stdout.as_ref().unwrap();
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["event"]["rule_id"] == id {
            return Some(v);
        }
    }
}

/// The next alert of rule `id` with a row of process `pid` within `wait`, and that row.
fn alert_naming(
    sub: &Proc,
    id: &str,
    pid: u32,
    wait: Duration,
) -> Option<(serde_json::Value, serde_json::Value)> {
    let deadline = Instant::now() + wait;
    let pid = pid.to_string();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let a = next_alert(sub, id, left)?;
        let row = a["event"]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["pid"].as_str() == Some(pid.as_str()))
            .cloned();
        if let Some(row) = row {
            return Some((a, row));
        }
    }
}

/// The pid of collector `id` in status report `r`.
fn pid_of(r: &serde_json::Value, id: &str) -> nix::unistd::Pid {
    let pid = r["collectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .and_then(|c| c["pid"].as_u64())
        .unwrap();
    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap())
}

fn now_ns() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    )
    .unwrap()
}

/// A program run from a temporary directory raises exactly one alert of the shipped example
/// rule within two intervals, none while it runs on, and another once it is gone and runs
/// again; a rule over both tables (this test's listening socket) is answered by both
/// collectors and aggregated.
#[test]
fn rules_raise_one_alert_per_new_match_from_both_collectors_answers() {
    let dir = TempDir::new("rules");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("temp.yaml"), example_rule()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::fs::write(
        rules.join("listener.toml"),
        format!(
            "id = \"test-listener\"\nname = \"This test's listener\"\nseverity = \"low\"\n\
             interval_seconds = {INTERVAL}\n\
             sql = \"\"\"SELECT p.pid, p.name, n.local_port FROM processes p \
             JOIN network_connections n ON n.pid = p.pid \
             WHERE n.state = 'LISTEN' AND n.local_port = {port}\"\"\"\n"
        ),
    )
    .unwrap();
    let (mut agent, socket) = start_agent(dir.path(), &rules);
    let sub = alerts_sub(&socket);

    // Over both tables: procmond's processes joined with netmond's sockets.
    let a = next_alert(&sub, "test-listener", Duration::from_secs(30))
        .expect("an alert for this test's listener");
    let e = &a["event"];
    assert_eq!(a["topic"], "events.alert.low");
    assert_eq!(e["rows"][0]["pid"], std::process::id().to_string(), "{e}");
    assert_eq!(e["rows"][0]["local_port"], port.to_string(), "{e}");
    let mut answered: Vec<&str> = e["answered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    answered.sort_unstable();
    assert_eq!(answered, ["netmond", "procmond"], "{e}");
    assert_eq!(e["missing"], serde_json::json!([]), "{e}");

    // A program under /tmp (named so: TMPDIR may be elsewhere): one alert within two
    // intervals. Other programs may run from /tmp too (this very test, in a clone under /tmp):
    // only the alerts naming the program's pid are this program's.
    let payload_dir = TempDir(std::path::PathBuf::from(format!(
        "/tmp/eb-rules-{}-{}",
        std::process::id(),
        now_ns()
    )));
    std::fs::create_dir_all(payload_dir.path()).unwrap();
    let payload = payload_dir.path().join("payload");
    std::fs::copy("/bin/sleep", &payload).unwrap();
    let started = now_ns();
    let mut run = std::process::Command::new(&payload)
        .arg("60")
        .spawn()
        .unwrap();
    let (a, row) = alert_naming(
        &sub,
        "process-from-temp-dir",
        run.id(),
        Duration::from_secs(30),
    )
    .expect("an alert for the program run from a temporary directory");
    let e = &a["event"];
    assert_eq!(a["topic"], "events.alert.high");
    assert_eq!(e["severity"], "high");
    assert_eq!(row["executable_path"], payload.display().to_string(), "{e}");
    assert_eq!(row["name"], "payload", "{e}");
    assert!(
        e["raised_at_ns"].as_u64().unwrap() - started <= 2 * INTERVAL * 1_000_000_000,
        "raised {} ns after the start",
        e["raised_at_ns"].as_u64().unwrap() - started
    );
    assert!(
        e["task_correlation_id"]
            .as_str()
            .unwrap()
            .contains("process-from-temp-dir."),
        "{e}"
    );
    // While it runs on: no second alert naming it.
    let quiet = Duration::from_secs(3 * INTERVAL);
    assert!(alert_naming(&sub, "process-from-temp-dir", run.id(), quiet).is_none());
    // Gone, the match clears; run again, it is new: one more alert.
    run.kill().unwrap();
    run.wait().unwrap();
    std::thread::sleep(Duration::from_secs(2 * INTERVAL));
    let mut again = std::process::Command::new(&payload)
        .arg("60")
        .spawn()
        .unwrap();
    alert_naming(
        &sub,
        "process-from-temp-dir",
        again.id(),
        Duration::from_secs(30),
    )
    .expect("an alert for the program's second run");
    again.kill().unwrap();
    again.wait().unwrap();
    drop(listener);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait(), 0);
}

/// `eventbus rules check`: the built-in examples pass; a directory with a syntax error, a
/// write, an unknown table and an unknown column fails with each file, rule and reason.
#[test]
fn rules_check_names_each_bad_rule_and_fails() {
    let mut ok = eventbus();
    ok.args(["rules", "check"]);
    let mut ok = Proc::spawn(ok);
    assert_eq!(ok.wait(), 0);
    assert!(ok.stdout_lines().iter().any(|l| l == "3 rules, valid"));
    let dir = TempDir::new("rules-check");
    let rule = |id: &str, sql: &str| {
        format!("id: {id}\nname: n\nseverity: low\ninterval_seconds: 5\nsql: \"{sql}\"\n")
    };
    for (file, id, sql) in [
        ("a.yaml", "syntax", "SELEC pid FROM processes"),
        ("b.yaml", "write", "DELETE FROM processes"),
        ("c.yaml", "table", "SELECT * FROM files"),
        ("d.yaml", "column", "SELECT nope FROM processes"),
        ("e.yaml", "good", "SELECT pid FROM processes"),
    ] {
        std::fs::write(dir.path().join(file), rule(id, sql)).unwrap();
    }
    let mut bad = eventbus();
    bad.args(["rules", "check"]).arg(dir.path());
    let mut bad = Proc::spawn(bad);
    assert_eq!(bad.wait(), 1);
    let out = bad.stdout_lines().join("\n");
    for (file, id, why) in [
        ("a.yaml", "syntax", "SQL syntax"),
        ("b.yaml", "write", "only a read-only SELECT"),
        ("c.yaml", "table", "unknown table \"files\""),
        ("d.yaml", "column", "no such column: nope"),
    ] {
        assert!(
            out.lines().any(|l| l.contains(file)
                && l.contains(&format!("(rule {id})"))
                && l.contains(why)),
            "{file}: {out}"
        );
    }
    assert!(out.contains("rule good"), "{out}");
}

/// A policy file: collectors as the default policy has them, and `eventbus` (the CLI) may
/// query the agent.
fn query_policy(dir: &Path) -> std::path::PathBuf {
    let policy = dir.join("acl.toml");
    let cli = std::fs::canonicalize(env!("CARGO_BIN_EXE_eventbus")).unwrap();
    std::fs::write(
        &policy,
        format!(
            "version = 1\n\
             [[rule]]\ncollector = \"*\"\npublish = [\"events.#\", \"control.health.+.{{collector}}\"]\n\
             subscribe = [\"events.#\", \"$sys.#\"]\n\
             reply = [\"control.collector.{{collector}}\", \"control.collector.task.{{collector}}\"]\n\
             [[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"control.agent.status\"]\n\
             [[rule]]\nexe = \"{}\"\nrequest = [\"control.agent.query\"]\n",
            cli.display()
        ),
    )
    .unwrap();
    policy
}

fn query(socket: &Path, args: &[&str]) -> (i32, Vec<String>) {
    let mut cmd = eventbus();
    cmd.arg("query").args(args).env("EVENTBUS_SOCKET", socket);
    let mut p = Proc::spawn(cmd);
    let code = p.wait();
    (code, p.stdout_lines())
}

/// `eventbus query` against a running agent: a join over both tables answered by both
/// collectors, as a table and as JSON; a write, an unknown column and SQLite's own table
/// refused with the reason (exit 5), a query that runs on stopped at its deadline (exit 4),
/// and the agent serving on.
#[test]
fn a_query_is_answered_through_the_agent_by_both_collectors() {
    let dir = TempDir::new("query");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "broker:\n  socket_path: {}\n  acl_file: {}\nrpc:\n  health_check_interval_seconds: 1\n\
             agent:\n  task_timeout_seconds: 2\n",
            socket.display(),
            query_policy(dir.path()).display()
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent").arg("--config").arg(&config);
    let mut agent = Proc::spawn(cmd);
    wait_line(agent.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.starts_with("agent ready")
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let sql = format!(
        "SELECT p.pid, n.local_port FROM network_connections n JOIN processes p USING (pid) \
         WHERE n.state = 'LISTEN' AND n.local_port = {port}"
    );
    // Until both collectors were checked and netmond read this listener.
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let (code, lines) = query(&socket, &["--json", &sql]);
        if code == 0 {
            let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
            if v["rows"].as_array().is_some_and(|r| !r.is_empty()) {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer with the listener: {lines:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        answer["rows"],
        serde_json::json!([[std::process::id().to_string(), port.to_string()]])
    );
    assert_eq!(answer["columns"], serde_json::json!(["pid", "local_port"]));
    let mut answered: Vec<String> = serde_json::from_value(answer["answered"].clone()).unwrap();
    answered.sort();
    assert_eq!(answered, ["netmond", "procmond"]);
    let (code, lines) = query(&socket, &[&sql]);
    assert_eq!(code, 0);
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["pid", "local_port"]
    );
    assert!(
        lines.last().unwrap().starts_with("(1 rows; answered by"),
        "{lines:?}"
    );
    for (bad, code, why) in [
        ("DELETE FROM processes", 5, "only a read-only SELECT"),
        ("SELECT nope FROM processes", 5, "no such column: nope"),
        (
            "SELECT * FROM sqlite_master, processes",
            5,
            "unknown table \"sqlite_master\"",
        ),
        // Runs until the agent stops it at its deadline (agent.task_timeout_seconds).
        (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
             SELECT count(*) FROM n, processes",
            4,
            "ran past its deadline",
        ),
    ] {
        let mut cmd = eventbus();
        cmd.args(["query", bad]).env("EVENTBUS_SOCKET", &socket);
        let mut p = Proc::spawn(cmd);
        assert_eq!(p.wait(), code, "{bad}");
        let err = p.stderr_lines().join("\n");
        assert!(err.contains(why), "{bad}: {err}");
    }
    assert_eq!(query(&socket, &["--json", &sql]).0, 0);
    drop(listener);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait(), 0);
}

/// Two procmond instances under one agent: tasks take turns between them; one that stops
/// answering (SIGSTOP) has its tasks taken over by the other, and once it is killed
/// (SIGKILL) the other answers alone: every aggregate complete, none partial. When the last
/// one is silent too, the aggregate is partial at its deadline and its answer, once it goes
/// on, is counted late.
#[test]
fn a_silent_or_killed_instance_has_its_tasks_redistributed() {
    let dir = TempDir::new("redistribute");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.toml");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("all.yaml"),
        "id: every-process\nname: Every process\nseverity: low\ninterval_seconds: 1\n\
         sql: SELECT pid FROM processes WHERE pid = 1\n",
    )
    .unwrap();
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
            "[broker]\nsocket_path = \"{}\"\n[process_manager]\nenable_auto_restart = false\n\
             [rpc]\nhealth_check_interval_seconds = 1\n[agent]\nstatus_interval_seconds = 1\n\
             task_timeout_seconds = 4\n{}{}",
            socket.display(),
            entry("procmond-a"),
            entry("procmond-b")
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("agent")
        .arg("--config")
        .arg(&config)
        .arg("--rules")
        .arg(&rules);
    let mut agent = Proc::spawn(cmd);
    wait_line(agent.stdout.as_ref().unwrap(), "agent ready", |l| {
        l.ends_with("collectors: procmond-a, procmond-b")
    });
    let mut sub = eventbus();
    sub.args(["sub", "--json", "control.agent.status"])
        .env("EVENTBUS_SOCKET", &socket);
    let sub = Proc::spawn(sub);
    wait_line(sub.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
    let report = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let line = wait_line(sub.stdout.as_ref().unwrap(), what, |l| {
                l.contains("control.agent.status")
            });
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if pred(&v["event"]) {
                return v["event"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no report with {what}: {}",
                v["event"]
            );
        }
    };
    let tasks = |r: &serde_json::Value, k: &str| r["detection"]["tasks"][k].as_u64().unwrap();
    let r = report("tasks answered by both", &|r| tasks(r, "complete") >= 4);
    assert_eq!(tasks(&r, "partial"), 0, "{r}");
    assert_eq!(tasks(&r, "redistributed"), 0, "{r}");
    let pid_a = pid_of(&r, "procmond-a");
    nix::sys::signal::kill(pid_a, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = report("a task redistributed", &|r| tasks(r, "redistributed") >= 1);
    assert_eq!(tasks(&r, "partial"), 0, "{r}");
    assert!(tasks(&r, "failed_calls") >= 1, "{r}");
    nix::sys::signal::kill(pid_a, nix::sys::signal::Signal::SIGKILL).unwrap();
    let before = tasks(&r, "complete");
    let r = report("tasks answered by procmond-b alone", &|r| {
        tasks(r, "complete") >= before + 3
    });
    assert_eq!(tasks(&r, "partial"), 0, "{r}");
    let rule = &r["detection"]["rules"][0];
    assert_eq!(rule["id"], "every-process");
    assert_eq!(rule["alerts"], 1, "{r}");
    // The last instance silent: the aggregate completes as partial at its deadline, naming
    // the type; its answer, once it goes on, is late: counted, not merged.
    let pid_b = pid_of(&r, "procmond-b");
    nix::sys::signal::kill(pid_b, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = report("a partial task", &|r| tasks(r, "partial") >= 1);
    nix::sys::signal::kill(pid_b, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(
        r["detection"]["rules"][0]["last_problem"]
            .as_str()
            .is_some_and(|p| p.contains("no answer from procmond")),
        "{r}"
    );
    let r = report("a late answer", &|r| tasks(r, "late") >= 1);
    assert_eq!(r["detection"]["rules"][0]["alerts"], 1, "{r}");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(agent.wait(), 0);
}
