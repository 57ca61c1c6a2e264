//! `eventbus reply` (a responder) and `eventbus request` (one call).

use crate::commands::{Signals, connect};
use crate::output;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use daemoneye_eventbus::client::{Request, RpcError, RpcErrorKind, ServeOptions};
use daemoneye_eventbus::core::{QueueGroup, ReplyStatus, StatusCode};
use daemoneye_eventbus::{Message, Topic};
use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;

/// What `reply` answers with.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// The request's own payload.
    Echo,
    /// The standard output of `sh -c CMD`, given the request payload on standard input.
    Exec(String),
}

/// `eventbus reply`.
pub(crate) struct ReplyArgs {
    pub(crate) topic: String,
    pub(crate) answer: Answer,
    pub(crate) group: Option<String>,
    pub(crate) count: Option<u64>,
    pub(crate) concurrency: usize,
    pub(crate) name: String,
}

pub(crate) async fn reply(socket: &crate::BrokerArg, a: ReplyArgs) -> Result<()> {
    let group = a
        .group
        .as_deref()
        .map(QueueGroup::new)
        .transpose()
        .context("--group")?;
    let client = connect(socket, &a.name).await?;
    let max = client.max_message_size();
    let answer = Arc::new(a.answer);
    let handled = Arc::new(tokio::sync::Semaphore::new(0));
    let counter = Arc::clone(&handled);
    let mut options = ServeOptions::default().concurrency(a.concurrency.max(1));
    if let Some(g) = group.clone() {
        options = options.group(g);
    }
    let service = client
        .serve([a.topic.as_str()], options, move |msg: Message| {
            let answer = Arc::clone(&answer);
            let counter = Arc::clone(&counter);
            async move {
                let out = match answer.as_ref() {
                    Answer::Echo => Ok(msg.payload().clone()),
                    Answer::Exec(cmd) => exec(cmd, &msg, max).await,
                };
                counter.add_permits(1);
                out
            }
        })
        .await?;
    match &group {
        Some(g) => eprintln!("replying on {} (queue group {g})", a.topic),
        None => eprintln!("replying on {}", a.topic),
    }
    let signals = Signals::install()?;
    let until_count = async {
        match a.count {
            Some(n) => {
                let n = u32::try_from(n).unwrap_or(u32::MAX);
                let _ = handled.acquire_many(n).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        r = signals.wait() => r?,
        () = until_count => {}
    }
    service.drain(Duration::from_secs(5)).await;
    client.drain().await;
    Ok(())
}

/// Runs `sh -c cmd` with the request payload on stdin, until the request's deadline. The
/// command runs in its own process group, killed whole when it overruns (so a pipeline's
/// children go too), and at most `max` bytes of its output are kept.
async fn exec(cmd: &str, msg: &Message, max: usize) -> Result<Bytes, ReplyStatus> {
    use tokio::io::AsyncReadExt;
    let deadline = msg.header().deadline_ns.map(|d| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |n| u64::try_from(n.as_nanos()).unwrap_or(u64::MAX));
        Duration::from_nanos(d.saturating_sub(now))
    });
    let mut command = tokio::process::Command::new("sh");
    command
        .args(["-c", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| ReplyStatus::execution_error(format!("cannot run {cmd:?}: {e}")))?;
    let group = GroupKiller(child.id());
    let (mut stdin, stdout, stderr) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let payload = msg.payload().clone();
    let run = async move {
        let feed = async {
            if let Some(stdin) = stdin.as_mut() {
                // A command that does not read its input is fine.
                let _ = stdin.write_all(&payload).await;
            }
            drop(stdin);
        };
        let read_out = async {
            let mut buf = Vec::new();
            if let Some(out) = stdout {
                out.take(max as u64 + 1).read_to_end(&mut buf).await?;
            }
            std::io::Result::Ok(buf)
        };
        let read_err = async {
            let mut buf = Vec::new();
            if let Some(err) = stderr {
                err.take(4096).read_to_end(&mut buf).await?;
            }
            std::io::Result::Ok(buf)
        };
        let ((), out, err, status) = tokio::join!(feed, read_out, read_err, child.wait());
        std::io::Result::Ok((out?, err?, status?))
    };
    let outcome = match deadline {
        Some(d) => tokio::time::timeout(d, run).await.map_err(|_| {
            ReplyStatus::new(
                StatusCode::Timeout,
                format!("{cmd:?} did not finish before the request's deadline; it was killed"),
            )
        })?,
        None => run.await,
    };
    let (stdout, stderr, status) =
        outcome.map_err(|e| ReplyStatus::execution_error(format!("running {cmd:?}: {e}")))?;
    drop(group);
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        return Err(ReplyStatus::execution_error(format!(
            "{cmd:?} failed ({status}): {}",
            stderr.trim()
        )));
    }
    if stdout.len() > max {
        return Err(ReplyStatus::execution_error(format!(
            "{cmd:?} wrote more than max_message_size ({max} bytes)"
        )));
    }
    Ok(Bytes::from(stdout))
}

/// Kills a command's whole process group when dropped (its leader may be gone already; off
/// Unix, nothing to do: the command is killed when it is dropped).
#[cfg_attr(not(unix), allow(dead_code))]
struct GroupKiller(Option<u32>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // Only the group we created for this command; ESRCH when it is already gone.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// `eventbus request`.
pub(crate) struct RequestArgs {
    pub(crate) topic: String,
    pub(crate) payload: Option<String>,
    pub(crate) timeout: f64,
    pub(crate) json: bool,
    pub(crate) name: String,
}

/// A failed call, with the exit code `eventbus request` ends with.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CallFailed(pub(crate) RpcError);

impl CallFailed {
    /// 3 no responders, 4 timeout, 5 the responder refused or failed, 6 other.
    pub(crate) fn exit_code(&self) -> u8 {
        match self.0.kind {
            RpcErrorKind::NoResponders => 3,
            RpcErrorKind::Timeout => 4,
            RpcErrorKind::InvalidOperation
            | RpcErrorKind::ExecutionError
            | RpcErrorKind::Refused => 5,
            _ => 6,
        }
    }
}

pub(crate) async fn request(socket: &crate::BrokerArg, a: RequestArgs) -> Result<()> {
    let timeout = Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--timeout must be a positive number of seconds")?;
    let topic = Topic::new(&a.topic)?;
    let payload = match a.payload.as_deref() {
        Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from stdin")?;
            Bytes::from(buf)
        }
        Some(p) => Bytes::copy_from_slice(p.as_bytes()),
        None => Bytes::new(),
    };
    let client = connect(socket, &a.name).await?;
    let started = Instant::now();
    let outcome = client
        .call(Request::new(topic, payload).timeout(timeout))
        .await;
    let elapsed = started.elapsed();
    client.close().await;
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(reply) if a.json => {
            let mut obj = output::message_json(&reply);
            obj.insert(
                "latency_us".into(),
                u64::try_from(elapsed.as_micros())
                    .unwrap_or(u64::MAX)
                    .into(),
            );
            writeln!(out, "{}", serde_json::Value::Object(obj))?;
        }
        Ok(reply) => {
            out.write_all(reply.payload())?;
            if !reply.payload().ends_with(b"\n") && !reply.payload().is_empty() {
                writeln!(out)?;
            }
        }
        Err(e) => {
            if a.json {
                let err =
                    serde_json::json!({"error": {"kind": e.kind.as_str(), "message": e.message}});
                writeln!(out, "{err}")?;
            }
            return Err(CallFailed(e).into());
        }
    }
    out.flush()?;
    Ok(())
}

/// Refuses `--echo` with `--exec`, or neither.
pub(crate) fn answer(echo: bool, exec: Option<String>) -> Result<Answer> {
    match (echo, exec) {
        (true, None) => Ok(Answer::Echo),
        (false, Some(cmd)) => Ok(Answer::Exec(cmd)),
        (true, Some(_)) => bail!("give either --echo or --exec CMD, not both"),
        (false, None) => bail!("give --echo or --exec CMD"),
    }
}
