//! procmond across processes: a broker (`eventbus serve`), procmond, and `eventbus sub --json`
//! watching a `sleep` the test starts.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, wait_line};
use std::process::Command;
use std::time::{Duration, Instant};

/// The policy a standalone procmond needs (the agent's supervised one has the default
/// collector grants): procmond, by its executable and under its name, publishes process
/// events and its health and serves its control topic; root's tools read and call it.
fn procmond_policy(dir: &std::path::Path) -> String {
    let exe = std::fs::canonicalize(common::collector_bin("procmond")).unwrap();
    let policy = dir.join("acl.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n\
             [[rule]]\nexe = \"{}\"\nname = \"procmond\"\n\
             publish = [\"events.process.#\", \"control.health.#\"]\n\
             reply = [\"control.collector.procmond\"]\nsubscribe = [\"$sys.#\"]\n\
             [[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"control.health.#\", \"$sys.#\"]\n\
             request = [\"control.collector.+\"]\n",
            exe.display()
        ),
    )
    .unwrap();
    policy.display().to_string()
}

/// Scanning `/proc` (`--source proc`, the fallback): a process that lives a few scan
/// intervals is reported, start and exit, from the scans.
#[test]
fn procmond_reports_a_process_start_and_exit_and_answers_health_checks() {
    let dir = TempDir::new("procmond");
    let config = format!("[broker]\nacl_file = \"{}\"\n", procmond_policy(dir.path()));
    let broker = Broker::start(dir.path(), Some(&config));
    let sub = broker.sub(&[
        "--json",
        "events.process.lifecycle",
        "events.process.integrity",
        "control.health.heartbeat.+",
    ]);
    let mut cmd = Command::new(common::collector_bin("procmond"));
    cmd.args([
        "--scan-interval-ms",
        "200",
        "--heartbeat-secs",
        "1",
        "--id",
        "procmond",
        "--hash-executables",
        "--source",
        "proc",
    ])
    .env("EVENTBUS_SOCKET", &broker.socket);
    let mut procmond = Proc::spawn(cmd);
    let rx = sub.stdout.as_ref().unwrap();
    // procmond is up once its first heartbeat arrives.
    let beat = wait_line(rx, "a heartbeat", |l| {
        l.contains("control.health.heartbeat.procmond")
    });
    let beat: serde_json::Value = serde_json::from_str(&beat).unwrap();
    assert_eq!(beat["event"]["collector_id"], "procmond");
    assert_eq!(beat["event"]["status"], "HEALTHY");

    // A process living about a second: its start and its exit are both reported.
    let started = Instant::now();
    let mut sleeper = Command::new("sleep").arg("1.2").spawn().unwrap();
    let pid = sleeper.id();
    sleeper.wait().unwrap();
    let mut seen = Vec::new();
    let mut digest = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 || digest.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) if l.contains("events.process.") && l.contains(&format!("\"pid\":{pid}")) => l,
            Ok(_) => continue,
            Err(_) => panic!("the sleep's events: seen {seen:?}, digest {digest:?}"),
        };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let e = &v["event"];
        if v["topic"] == "events.process.integrity" {
            digest = Some(e.clone());
            continue;
        }
        assert_eq!(e["ppid"], std::process::id());
        assert!(e["metadata"]["uid"].as_str().is_some());
        assert_eq!(e["metadata"]["source"], "proc");
        let what = e["metadata"]["event"].as_str().unwrap().to_owned();
        if what == "exit" {
            // Seen last after its exec (a start may be seen between fork and exec, still
            // carrying the test's own name).
            assert_eq!(e["name"], "sleep");
            assert_eq!(e["command_line"], "sleep 1.2");
            assert!(e["executable_path"].as_str().unwrap().ends_with("sleep"));
        }
        seen.push(what);
    }
    assert_eq!(seen, ["start", "exit"]);
    // Its executable's digest, read through the process's own link, matches sha256sum's.
    let digest = digest.unwrap();
    let path = digest["executable_path"].as_str().unwrap().to_owned();
    let sum = Command::new("sha256sum").arg(&path).output().unwrap();
    let expected = String::from_utf8(sum.stdout).unwrap();
    assert_eq!(
        digest["sha256"].as_str().unwrap(),
        expected.split_whitespace().next().unwrap()
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // A shell that then runs another program: the same pid reports an exec. The shell waits
    // until its start was reported, and the program until its exec was, so no timing of
    // procmond's scans can miss either.
    let go = dir.path().join("exec-now");
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while [ ! -e '{}' ]; do sleep 0.05; done; exec sleep 30",
            go.display()
        ))
        .spawn()
        .unwrap();
    let sh = u64::from(shell.id());
    let event_of = |l: &str, what: &str| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
        v["event"]["pid"] == sh && v["event"]["metadata"]["event"] == what
    };
    wait_line(rx, "the shell's start", |l| event_of(l, "start"));
    std::fs::write(&go, b"").unwrap();
    let line = wait_line(rx, "the shell's exec", |l| event_of(l, "exec"));
    shell.kill().unwrap();
    shell.wait().unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"]["name"], "sleep");
    assert_eq!(v["event"]["command_line"], "sleep 30");

    // The collector services answer: a health check through the CLI is a typed request, so
    // here an undecodable one is refused with the right kind.
    let out = broker.run(&["request", "control.collector.procmond", "not protobuf"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr[0].contains("invalid_operation"), "{out:?}");

    procmond.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(procmond.wait(), 0);
}

/// With `--spool-dir`, a process that starts and ends while the broker is down is reported
/// once it is back, even though that procmond was killed meanwhile: its events went to the
/// spool, and the next procmond on it sends them (into a durable subscription that survived
/// the broker's restart on its data directory).
#[test]
fn procmond_with_a_spool_loses_no_event_to_a_broker_restart_and_its_own_death() {
    let dir = TempDir::new("procmond-spool");
    let data = dir.path().join("data");
    let spool = dir.path().join("spool");
    let config = format!(
        "[broker]\ndata_dir = \"{}\"\nacl_file = \"{}\"\n",
        data.display(),
        procmond_policy(dir.path())
    );
    let socket = dir.path().join("bus.sock");
    let mut broker = Broker::start_at(&socket, dir.path(), Some(&config));
    // A durable subscription for process events, left detached.
    let mut maker = broker.sub(&["--durable", "procs", "events.process.lifecycle"]);
    maker.signal(nix::sys::signal::Signal::SIGTERM);
    maker.wait();
    let procmond = |socket: &std::path::Path| {
        let mut cmd = Command::new(common::collector_bin("procmond"));
        // Scanning /proc: the kernel's events would also fill the spool with every short
        // process of the tests running beside this one, which is not what this test is about.
        cmd.args([
            "--scan-interval-ms",
            "100",
            "--heartbeat-secs",
            "1",
            "--source",
            "proc",
            "--spool-dir",
        ])
        .arg(&spool)
        .env("EVENTBUS_SOCKET", socket);
        Proc::spawn(cmd)
    };
    let beats = broker.sub(&["control.health.heartbeat.procmond"]);
    let mut first = procmond(&socket);
    wait_line(beats.stdout.as_ref().unwrap(), "a heartbeat", |l| {
        l.contains("control.health.heartbeat.procmond")
    });
    drop(beats);
    // The broker goes; a process lives and ends meanwhile.
    broker.proc.signal(nix::sys::signal::Signal::SIGKILL);
    broker.proc.wait();
    let marker = format!("0.{}", 3000 + std::process::id() % 1000);
    let mut sleeper = Command::new("sleep").arg(&marker).spawn().unwrap();
    let pid = sleeper.id();
    sleeper.wait().unwrap();
    // Both its events are in the spool (its command line is in each), then procmond dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spooled = || -> usize {
        let Ok(entries) = std::fs::read_dir(&spool) else {
            return 0;
        };
        entries
            .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
            .map(|b| {
                b.windows(marker.len())
                    .filter(|w| *w == marker.as_bytes())
                    .count()
            })
            .sum()
    };
    while spooled() < 2 {
        assert!(
            Instant::now() < deadline,
            "the sleep's events never reached the spool"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait();
    // The broker and a new procmond on the same spool come back.
    let broker = Broker::start_at(&socket, dir.path(), Some(&config));
    let _second = procmond(&socket);
    let sub = broker.sub(&["--durable", "procs", "--json", "events.process.lifecycle"]);
    let rx = sub.stdout.as_ref().unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"exit".to_owned()) {
        let line = wait_line(rx, "the sleep's events", |l| {
            l.contains(&format!("\"pid\":{pid}"))
        });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        seen.push(v["event"]["metadata"]["event"].as_str().unwrap().to_owned());
    }
    assert!(seen.contains(&"start".to_owned()), "{seen:?}");
}

/// The subscriber's next `events.process.lifecycle` event, within `deadline`.
fn next_event(rx: &std::sync::mpsc::Receiver<String>, deadline: Instant) -> serde_json::Value {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("an event before the deadline");
        if line.contains("events.process.lifecycle") {
            return serde_json::from_str::<serde_json::Value>(&line).unwrap()["event"].clone();
        }
    }
}

/// From the kernel (`--source kernel`, as root): 200 processes that each live about a
/// millisecond are every one reported, start and exit, and the source is in the events.
#[test]
fn procmond_from_the_kernel_sees_processes_that_live_a_millisecond() {
    let dir = TempDir::new("procmond-kernel");
    let config = format!("[broker]\nacl_file = \"{}\"\n", procmond_policy(dir.path()));
    let broker = Broker::start(dir.path(), Some(&config));
    let sub = broker.sub(&[
        "--json",
        "events.process.lifecycle",
        "control.health.heartbeat.+",
    ]);
    let mut cmd = Command::new(common::collector_bin("procmond"));
    cmd.args(["--heartbeat-secs", "1", "--source", "kernel"])
        .env("EVENTBUS_SOCKET", &broker.socket);
    let mut procmond = Proc::spawn(cmd);
    let rx = sub.stdout.as_ref().unwrap();
    wait_line(rx, "a heartbeat", |l| {
        l.contains("control.health.heartbeat.procmond")
    });
    let mut pids = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let mut child = Command::new("/bin/true").spawn().unwrap();
        pids.insert(child.id(), (false, false));
        child.wait().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pids.values().any(|seen| *seen != (true, true)) {
        let e = next_event(rx, deadline);
        let Some(seen) = e["pid"]
            .as_u64()
            .and_then(|p| pids.get_mut(&u32::try_from(p).unwrap()))
        else {
            continue;
        };
        assert_eq!(e["metadata"]["source"], "kernel", "{e}");
        match e["metadata"]["event"].as_str().unwrap() {
            "start" => seen.0 = true,
            "exit" => {
                assert!(seen.0, "an exit before its start: {e}");
                assert_eq!(e["metadata"]["exit_code"], "0", "{e}");
                seen.1 = true;
            }
            _ => {}
        }
    }
    procmond.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(procmond.wait(), 0);
    // The kernel took the socket filter that drops threads' events.
    let err = procmond.stderr_lines().join("\n");
    assert!(!err.contains("not the kernel"), "{err}");
}
