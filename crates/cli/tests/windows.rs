//! The CLI on Windows, between separate processes over a named pipe: `serve`, `pub`, `sub`,
//! `reply`, `request` and `stats`. CI runs it under Wine (`.ci/wine/run-tests`); what Wine
//! cannot show is listed in `docs/operations.md`.

#![cfg(windows)]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every wait is bounded by this (Wine starts processes slowly).
const WAIT: Duration = Duration::from_secs(60);

/// A child killed on drop, its output read on threads.
struct Proc {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

fn lines(stream: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Proc {
    fn spawn(pipe: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(args)
            .env("EVENTBUS_SOCKET", format!("pipe://{pipe}"))
            .env_remove("EVENTBUS_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = lines(child.stdout.take().unwrap());
        let err = lines(child.stderr.take().unwrap());
        Self { child, out, err }
    }

    /// Waits for a line of `rx` satisfying `pred`.
    fn wait_line(rx: &mpsc::Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }

    /// Waits for the exit (bounded), returning the code and every line of stdout.
    fn finish(mut self) -> (i32, Vec<String>) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the command did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = self.out.try_iter().collect();
        (status.code().unwrap_or(-1), out)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(pipe: &str, args: &[&str]) -> (i32, Vec<String>) {
    let p = Proc::spawn(pipe, args);
    let (code, out) = p.finish();
    (code, out)
}

#[test]
fn pub_sub_request_and_stats_across_processes_over_a_named_pipe() {
    let pipe = format!("eb-cli-{}", std::process::id());
    let broker = Proc::spawn(&pipe, &["serve", "--socket", &format!("pipe://{pipe}")]);
    let ready = Proc::wait_line(&broker.out, "the broker", |l| l.starts_with("listening on"));
    assert_eq!(ready, format!("listening on pipe:{pipe}"));

    // A subscriber and a publisher, each its own process.
    let sub = Proc::spawn(&pipe, &["sub", "demo.+", "--count", "3"]);
    Proc::wait_line(&sub.err, "the subscriber", |l| l == "ready");
    // The broker knows the subscriber's process from the pipe.
    let (code, out) = run(&pipe, &["stats", "--json"]);
    assert_eq!(code, 0);
    let stats: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    let subscriber = stats["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "eventbus-sub")
        .unwrap_or_else(|| panic!("no subscriber in {stats}"))
        .clone();
    assert_eq!(subscriber["pid"], serde_json::json!(sub.child.id()));
    assert!(
        subscriber["exe"]
            .as_str()
            .is_some_and(|e| e.to_ascii_lowercase().ends_with("eventbus.exe")),
        "{subscriber}"
    );
    let (code, _) = run(&pipe, &["pub", "demo.windows", "hello", "--count", "3"]);
    assert_eq!(code, 0);
    let (code, got) = sub.finish();
    assert_eq!(code, 0);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|l| l.contains("hello")), "{got:?}");

    // Request and reply between two more processes.
    let reply = Proc::spawn(&pipe, &["reply", "svc.echo", "--echo", "--count", "1"]);
    Proc::wait_line(&reply.err, "the responder", |l| {
        l.starts_with("replying on svc.echo")
    });
    let (code, answer) = run(&pipe, &["request", "svc.echo", "ping", "--timeout", "30"]);
    assert_eq!(code, 0);
    assert!(answer.iter().any(|l| l.contains("ping")), "{answer:?}");
    assert_eq!(reply.finish().0, 0);
    // Nobody serves this one: the typed error, its exit status.
    let (code, _) = run(&pipe, &["request", "svc.nobody", "ping", "--timeout", "5"]);
    assert_ne!(code, 0);
}
