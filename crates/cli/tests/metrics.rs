//! `/metrics`, `/healthz` and `/readyz` of `eventbus serve --metrics` and of the agent, read
//! over real HTTP and parsed by a real parser of the exposition format (the Debian package
//! `python3-prometheus-client`'s OpenMetrics parser, run as `/usr/bin/python3`): counters move
//! with traffic, a stopped collector makes the agent not ready, with the reason.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, WAIT, eventbus, wait_line};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

/// One sample: its name, its labels, its value.
type Sample = (String, BTreeMap<String, String>, f64);

/// `METHOD path` over one HTTP/1.1 connection: the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The samples of an OpenMetrics text, as `prometheus_client`'s parser reads them (a text
/// it refuses fails the test).
fn parse(text: &str) -> Vec<Sample> {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as p\n\
        out = [[s.name, s.labels, s.value] for f in p(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))\n";
    let mut py = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (Debian's, with python3-prometheus-client; .ci/run installs it)");
    py.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|s| s.2)
}

fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, head, body) = http(addr, "GET", "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    parse(&body)
}

/// The address of a `metrics on http://ADDR/metrics` line.
fn metrics_addr(proc: &Proc) -> SocketAddr {
    let line = wait_line(proc.stdout.as_ref().unwrap(), "metrics line", |l| {
        l.starts_with("metrics on http://")
    });
    line.trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap()
}

#[test]
fn serve_metrics_parse_and_count_the_traffic() {
    let dir = TempDir::new("metrics-serve");
    let socket = dir.path().join("bus.sock");
    let broker = Broker::serve(&socket, &["--metrics".into(), "127.0.0.1:0".into()]);
    let addr = metrics_addr(&broker.proc);
    let before = scrape(addr);
    let published = |s: &[Sample]| value(s, "eventbus_messages_published_total", &[]).unwrap();
    let delivered = |s: &[Sample]| value(s, "eventbus_messages_delivered_total", &[]).unwrap();
    let mut sub = broker.sub(&["--count", "300", "metrics.test"]);
    let out = broker.run(&["pub", "metrics.test", "x", "--count", "300"]);
    assert_eq!(out.code, 0, "{:?}", out.stderr);
    assert_eq!(sub.wait(), 0);
    let after = scrape(addr);
    assert!(
        published(&after) >= published(&before) + 300.0,
        "{} then {}",
        published(&before),
        published(&after)
    );
    assert!(delivered(&after) >= delivered(&before) + 300.0);
    for cause in ["slow_reader", "memory_cap", "backlog_full", "closed"] {
        assert!(
            value(
                &after,
                "eventbus_messages_dropped_total",
                &[("cause", cause)]
            )
            .is_some(),
            "every cause is listed: {cause}"
        );
    }
    assert!(value(&after, "process_cpu_seconds_total", &[]).unwrap() > 0.0);
    assert!(value(&after, "process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(value(&after, "eventbus_connections", &[]).is_some());
    // The broker alone: no agent figures.
    assert!(
        after
            .iter()
            .all(|(n, ..)| !n.starts_with("eventbus_collector"))
    );

    assert_eq!(http(addr, "GET", "/healthz").0, 200);
    let (status, _, body) = http(addr, "GET", "/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _, body) = http(addr, "HEAD", "/metrics");
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(http(addr, "GET", "/nothing").0, 404);
    let (status, head, _) = http(addr, "POST", "/metrics");
    assert_eq!(status, 405);
    assert!(
        head.to_ascii_lowercase().contains("allow: get, head"),
        "{head}"
    );
    // Clients that never send a request hold a connection each, 16 at most: the next one is
    // closed unanswered, and once they go the endpoint answers again.
    let idle: Vec<_> = (0..16)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut extra = std::net::TcpStream::connect(addr).unwrap();
    extra.set_read_timeout(Some(WAIT)).unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut got = Vec::new();
    let _ = extra.read_to_end(&mut got);
    assert!(got.is_empty(), "a 17th connection was answered: {got:?}");
    drop(idle);
    let deadline = Instant::now() + WAIT;
    while std::panic::catch_unwind(|| http(addr, "GET", "/healthz").0).ok() != Some(200) {
        assert!(
            Instant::now() < deadline,
            "the endpoint never answered again"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_agent_is_ready_when_its_collectors_are_and_says_why_not() {
    let dir = TempDir::new("metrics-agent");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "broker:\n  socket_path: {}\nprocess_manager:\n  health_check_interval_seconds: 2\n\
             rpc:\n  health_check_interval_seconds: 1\nagent:\n  status_interval_seconds: 1\n",
            socket.display()
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.args(["agent", "--metrics", "127.0.0.1:0", "--config"])
        .arg(&config);
    let agent = Proc::spawn(cmd);
    let addr = metrics_addr(&agent);
    let wait_ready = |want: u16| -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _, body) = http(addr, "GET", "/readyz");
            if status == want {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never answered {want}: {status} {body}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_ready(200);
    let samples = scrape(addr);
    let state = |s: &[Sample], id: &str, state: &str| {
        value(
            s,
            "eventbus_collector_state",
            &[("collector", id), ("state", state)],
        )
    };
    assert_eq!(state(&samples, "procmond", "running"), Some(1.0));
    assert_eq!(state(&samples, "procmond", "failed"), Some(0.0));
    assert_eq!(
        value(
            &samples,
            "eventbus_collector_health",
            &[("collector", "netmond"), ("health", "HEALTHY")]
        ),
        Some(1.0)
    );
    // Health checks are RPC calls: their latency is a histogram.
    let checks = value(
        &samples,
        "eventbus_rpc_latency_seconds_count",
        &[("operation", "health_check")],
    )
    .unwrap();
    assert!(checks >= 1.0);
    assert_eq!(
        value(
            &samples,
            "eventbus_rpc_latency_seconds_bucket",
            &[("operation", "health_check"), ("le", "+Inf")]
        ),
        Some(checks)
    );
    assert!(value(&samples, "eventbus_tasks_started_total", &[]).is_some());
    assert!(value(&samples, "eventbus_alerts_total", &[("severity", "high")]).is_some());

    // procmond stopped: not ready, naming it; going on again (or restarted by the supervisor
    // for its silence): ready.
    let pid = pid_of(&socket, "procmond");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let why = wait_ready(503);
    assert!(why.contains("procmond"), "{why}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGCONT);
    wait_ready(200);
    let later = scrape(addr);
    let events: f64 = later
        .iter()
        .filter(|(n, ..)| n == "eventbus_events_total")
        .map(|s| s.2)
        .sum();
    assert!(
        events > 0.0,
        "heartbeats and process events are counted by topic"
    );
    agent.signal(Signal::SIGTERM);
}

/// The process id of the collector `id`, from the broker's statistics.
fn pid_of(socket: &std::path::Path, id: &str) -> i32 {
    let c = common::connection(socket, |c| c["collector"] == id);
    i32::try_from(c["pid"].as_i64().unwrap()).unwrap()
}
