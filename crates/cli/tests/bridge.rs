//! `eventbus bridge` and the agent's `agent.bridge`, across real processes, against a real
//! `nats-server -js` (Debian's package; `.ci/run` installs it): messages published locally are
//! stored by JetStream, counted in the bridge's figures and the agent's `/metrics`; a
//! configuration without a bridge section is refused with the reason.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, WAIT, eventbus, wait_line};
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

struct NatsServer(std::process::Child);

impl NatsServer {
    fn start(port: u16, dir: &Path) -> Self {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("nats"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (Debian package nats-server; .ci/run installs it)");
        Self(child)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bridge_section(port: u16, name: &str) -> String {
    format!(
        "[agent.bridge]\nurl = \"nats://127.0.0.1:{port}\"\nname = \"{name}\"\n\
         stream = \"S_{}\"\nsubject_prefix = \"fleet.{name}\"\noutbound = [\"jobs.#\"]\n",
        name.to_uppercase()
    )
}

#[test]
fn the_standalone_bridge_carries_processed_messages_to_jetstream() {
    let dir = TempDir::new("bridge-cli");
    let port = free_port();
    let _nats = NatsServer::start(port, dir.path());
    let broker = Broker::start(dir.path(), None);
    let file = dir.path().join("bridge.toml");
    std::fs::write(&file, bridge_section(port, "cli")).unwrap();
    let mut cmd = eventbus();
    cmd.arg("bridge")
        .arg("--config")
        .arg(&file)
        .arg("--socket")
        .arg(&broker.socket);
    let mut bridge = Proc::spawn(cmd);
    wait_line(bridge.stdout.as_ref().unwrap(), "bridge ready", |l| {
        l.starts_with("bridge ready: local unix:")
    });
    let out = broker.run(&[
        "pub",
        "jobs.cli.test",
        "payload",
        "--count",
        "300",
        "--qos",
        "processed",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    // The broker's durable subscription for the bridge empties once JetStream stored all.
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = broker.stats();
        let sub = stats["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["durable"] == "bridge-cli")
            .cloned()
            .unwrap_or_else(|| panic!("no durable subscription of the bridge: {stats}"));
        if sub["acked"] == 300 && sub["pending"] == 0 && sub["unacked"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{sub}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bridge.signal(Signal::SIGTERM);
    assert_eq!(bridge.wait(), 0);
    let last = bridge.stdout_lines().pop().unwrap();
    let stats: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(stats["stored"], 300, "{stats}");
    assert_eq!(stats["pending"], 0, "{stats}");

    // A file without the section: refused, naming it.
    let empty = dir.path().join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let out = broker.run(&["bridge", "--config", empty.to_str().unwrap()]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .iter()
            .any(|l| l.contains("no [agent.bridge] section")),
        "{out:?}"
    );
    // A bad setting: refused, naming the key.
    std::fs::write(
        &empty,
        bridge_section(port, "cli").replace("nats://", "http://"),
    )
    .unwrap();
    let out = broker.run(&["bridge", "--config", empty.to_str().unwrap()]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.iter().any(|l| l.contains("agent.bridge.url")),
        "{out:?}"
    );
}

#[test]
fn the_agent_runs_its_bridge_and_counts_it_in_metrics() {
    let dir = TempDir::new("bridge-agent");
    let port = free_port();
    let _nats = NatsServer::start(port, dir.path());
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "collectors = []\n[broker]\nsocket_path = \"{}\"\n[agent]\nmetrics_listen = \"127.0.0.1:0\"\n{}",
            socket.display(),
            bridge_section(port, "agent")
        ),
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.args(["agent", "--config"]).arg(&config);
    let agent = Proc::spawn(cmd);
    let line = wait_line(agent.stdout.as_ref().unwrap(), "metrics line", |l| {
        l.starts_with("metrics on http://")
    });
    let addr: std::net::SocketAddr = line
        .trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .unwrap();
    let mut publish = eventbus();
    publish
        .args([
            "pub",
            "jobs.agent.test",
            "x",
            "--count",
            "50",
            "--qos",
            "processed",
        ])
        .env("EVENTBUS_SOCKET", &socket);
    let mut publish = Proc::spawn(publish);
    assert_eq!(publish.wait(), 0);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        if text.contains("eventbus_bridge_stored_total 50") {
            assert!(text.contains("eventbus_bridge_connected 1"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    agent.signal(Signal::SIGTERM);
}
