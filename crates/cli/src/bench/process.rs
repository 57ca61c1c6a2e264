//! A benchmark participant process: spawned from this binary, talked to over stdio.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub(super) const READY_WAIT: Duration = Duration::from_secs(30);
const RESULT_WAIT: Duration = Duration::from_secs(600);

/// Environment every worker gets (the client certificate of a TLS run), set once by the
/// controller before it starts any.
pub(super) static WORKER_ENV: std::sync::OnceLock<Vec<(String, std::path::PathBuf)>> =
    std::sync::OnceLock::new();

/// A worker process; killed on drop if still running.
pub(super) struct Worker {
    pub(super) child: Child,
    lines: mpsc::Receiver<String>,
    stdin: Option<ChildStdin>,
    what: String,
}

impl Worker {
    pub(super) fn spawn(args: &[String], what: &str) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the eventbus binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .envs(WORKER_ENV.get().into_iter().flatten().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout for {what}"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            lines,
            stdin,
            what: what.into(),
        })
    }

    pub(super) fn line(&self, within: Duration) -> Result<String> {
        self.lines
            .recv_timeout(within)
            .map_err(|_| anyhow!("{} did not answer within {within:?}", self.what))
    }

    pub(super) fn ready(&self) -> Result<()> {
        match self.line(READY_WAIT)?.as_str() {
            "ready" => Ok(()),
            other => bail!("{} said {other:?} instead of ready", self.what),
        }
    }

    pub(super) fn go(&mut self) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("{} has no stdin", self.what))?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        Ok(())
    }

    pub(super) fn result(&self) -> Result<Value> {
        let line = self.line(RESULT_WAIT)?;
        serde_json::from_str(&line).with_context(|| format!("{} printed {line:?}", self.what))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stdin.take();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
