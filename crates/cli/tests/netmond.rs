//! netmond across processes: a broker (`eventbus serve`), netmond, and `eventbus sub --json`
//! watching a TCP connection the test opens and closes.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, wait_line};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// The policy a standalone netmond needs (the agent's supervised one has the default
/// collector grants).
fn netmond_policy(dir: &std::path::Path) -> String {
    let exe = std::fs::canonicalize(common::collector_bin("netmond")).unwrap();
    let policy = dir.join("acl.toml");
    std::fs::write(
        &policy,
        format!(
            "version = 1\n\
             [[rule]]\nexe = \"{}\"\nname = \"netmond\"\n\
             publish = [\"events.network.#\", \"control.health.#\"]\n\
             reply = [\"control.collector.netmond\"]\nsubscribe = [\"$sys.#\"]\n\
             [[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"control.health.#\", \"$sys.#\"]\n\
             request = [\"control.collector.+\"]\n",
            exe.display()
        ),
    )
    .unwrap();
    policy.display().to_string()
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

/// A TCP connection the test opens is reported opened with the test's pid and the ports,
/// observed within two scan intervals of being opened, then closed; snapshots carry the
/// listening socket; SIGTERM ends it cleanly. From both sources: the kernel's socket dump
/// and the /proc/net tables.
#[test]
fn netmond_reports_a_connection_with_its_process_and_ports() {
    for source in ["kernel", "proc"] {
        reports_a_connection(source);
    }
}

fn reports_a_connection(source: &str) {
    const SCAN_MS: u64 = 500;
    let dir = TempDir::new("netmond");
    let config = format!("[broker]\nacl_file = \"{}\"\n", netmond_policy(dir.path()));
    let broker = Broker::start(dir.path(), Some(&config));
    let sub = broker.sub(&[
        "--json",
        "events.network.connections",
        "events.network.batch",
        "control.health.heartbeat.+",
    ]);
    let mut cmd = Command::new(common::collector_bin("netmond"));
    cmd.args([
        "--scan-interval-ms",
        &SCAN_MS.to_string(),
        "--heartbeat-secs",
        "1",
        "--batch-interval-secs",
        "1",
        "--source",
        source,
    ])
    .env("EVENTBUS_SOCKET", &broker.socket);
    let mut netmond = Proc::spawn(cmd);
    let rx = sub.stdout.as_ref().unwrap();
    let beat = wait_line(rx, "a heartbeat", |l| {
        l.contains("control.health.heartbeat.netmond")
    });
    let beat: serde_json::Value = serde_json::from_str(&beat).unwrap();
    assert_eq!(beat["event"]["status"], "HEALTHY", "{source}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u64::from(listener.local_addr().unwrap().port());
    let opened_at = now_ns();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    let client_port = u64::from(client.local_addr().unwrap().port());
    let me = u64::from(std::process::id());
    let event = |l: &str| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_default()["event"].clone()
    };
    // The client's end: opened, held by this process, towards the listener's port.
    let line = wait_line(rx, "the connection opened", |l| {
        let e = event(l);
        e["change"] == "opened" && e["local_port"] == client_port
    });
    let e = event(&line);
    assert_eq!(
        (&e["protocol"], &e["pid"], &e["remote_port"], &e["state"]),
        (
            &"tcp".into(),
            &me.into(),
            &port.into(),
            &"ESTABLISHED".into()
        ),
        "{e}"
    );
    assert_eq!(e["local_address"], "127.0.0.1");
    assert!(e["process_name"].as_str().is_some_and(|n| !n.is_empty()));
    let observed = e["observed_at_ns"].as_u64().unwrap();
    assert!(
        observed <= opened_at + 2 * SCAN_MS * 1_000_000,
        "observed {} ms after it opened",
        (observed - opened_at) / 1_000_000
    );
    // A snapshot lists the listening socket with its holder.
    let line = wait_line(rx, "a snapshot with the listener", |l| {
        let e = event(l);
        e["sockets"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["local_port"] == port && s["state"] == "LISTEN" && s["pid"] == me)
        })
    });
    assert!(line.contains("events.network.batch"));
    // Closed: both ends are reported gone, with the holder they had.
    drop(client);
    drop(server);
    let line = wait_line(rx, "the connection closed", |l| {
        let e = event(l);
        e["change"] == "closed" && e["local_port"] == client_port
    });
    assert_eq!(event(&line)["pid"], me);

    netmond.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(netmond.wait(), 0);
}
