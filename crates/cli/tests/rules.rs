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

    // A program under the temporary directory: one alert within two intervals.
    let payload = dir.path().join("payload");
    std::fs::copy("/bin/sleep", &payload).unwrap();
    let started = now_ns();
    let mut run = std::process::Command::new(&payload)
        .arg("60")
        .spawn()
        .unwrap();
    let a = next_alert(&sub, "process-from-temp-dir", Duration::from_secs(30))
        .expect("an alert for the program run from a temporary directory");
    let e = &a["event"];
    assert_eq!(a["topic"], "events.alert.high");
    assert_eq!(e["severity"], "high");
    let rows = e["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{e}");
    assert_eq!(rows[0]["pid"], run.id().to_string(), "{e}");
    assert_eq!(rows[0]["executable_path"], payload.display().to_string());
    assert!(
        e["raised_at_ns"].as_u64().unwrap() - started <= 2 * INTERVAL * 1_000_000_000,
        "raised {} ns after the start",
        e["raised_at_ns"].as_u64().unwrap() - started
    );
    assert!(
        e["task_correlation_id"]
            .as_str()
            .unwrap()
            .starts_with("process-from-temp-dir.")
    );
    // While it runs on: no second alert, from either rule.
    let quiet = Duration::from_secs(3 * INTERVAL);
    assert!(next_alert(&sub, "process-from-temp-dir", quiet).is_none());
    // Gone, the match clears; run again, it is new: one more alert.
    run.kill().unwrap();
    run.wait().unwrap();
    std::thread::sleep(Duration::from_secs(2 * INTERVAL));
    let mut again = std::process::Command::new(&payload)
        .arg("60")
        .spawn()
        .unwrap();
    let a = next_alert(&sub, "process-from-temp-dir", Duration::from_secs(30))
        .expect("an alert for the program's second run");
    assert_eq!(a["event"]["rows"][0]["pid"], again.id().to_string());
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
