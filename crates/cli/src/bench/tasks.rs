//! W8: collection tasks and rule SQL under the agent, with default options. Two procmond
//! instances of one type read a `/proc` of 2,000 processes made for the run; a client asks
//! the agent the shipped rule `process-from-temp-dir`'s query through `control.agent.query`
//! (a task out to one instance, its 2,000 rows back, aggregated, loaded into SQLite, the
//! query run, the answer back): one at a time for the end-to-end latency, then eight in
//! flight for the rate.

use super::report::Row;
use super::scaled;
use anyhow::{Context, Result, bail};
use daemoneye_eventbus::client::{Client, ClientOptions, Request};
use daemoneye_eventbus::core::catalog;
use daemoneye_eventbus::{Endpoint, Message};
use std::path::Path;
use std::time::{Duration, Instant};

/// Processes in the made `/proc`.
const PROCESSES: u32 = 2_000;

/// Queries in flight for the rate.
const IN_FLIGHT: usize = 8;

/// The shipped rule's query (`crates/agent/rules/process-from-temp-dir.yaml`).
const SQL: &str = "SELECT pid, ppid, name, executable_path, command_line, uid, user \
                   FROM processes WHERE executable_path LIKE '/tmp/%' \
                   OR executable_path LIKE '/var/tmp/%' OR executable_path LIKE '/dev/shm/%'";

/// A `/proc` under `root` with `n` processes (every 100th runs from /tmp).
fn fake_proc(root: &Path, n: u32) -> Result<()> {
    std::fs::create_dir_all(root)?;
    std::fs::write(root.join("stat"), "cpu 0 0 0 0\nbtime 1700000000\n")?;
    for i in 0..n {
        let pid = 1000 + i;
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir)?;
        let name = format!("worker{}", i % 50);
        std::fs::write(
            dir.join("stat"),
            format!(
                "{pid} ({name}) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {} 0 0",
                4242 + i
            ),
        )?;
        std::fs::write(
            dir.join("cmdline"),
            format!("/usr/lib/app/{name}\0--serve\0--port={pid}\0"),
        )?;
        std::fs::write(
            dir.join("status"),
            format!("Name:\t{name}\nUid:\t1000\t1000\t1000\t1000\n"),
        )?;
        let exe = if i % 100 == 0 {
            format!("/tmp/{name}")
        } else {
            format!("/usr/lib/app/{name}")
        };
        std::os::unix::fs::symlink(exe, dir.join("exe"))?;
    }
    Ok(())
}

fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
        .copied()
}

async fn ask(client: &Client) -> Result<Message> {
    client
        .call(
            Request::new(catalog::agent::query(), SQL.as_bytes().to_vec())
                .timeout(Duration::from_secs(10))
                .operation("query"),
        )
        .await
        .map_err(|e| anyhow::anyhow!("query: {e}"))
}

/// The rows of an answer (`rows` of its JSON).
fn rows(m: &Message) -> usize {
    serde_json::from_slice::<serde_json::Value>(m.payload())
        .ok()
        .and_then(|v| v["rows"].as_array().map(Vec::len))
        .unwrap_or(0)
}

pub(super) fn w8(dir: &Path, scale: f64) -> Result<Vec<Row>> {
    let proc_root = dir.join("w8-proc");
    fake_proc(&proc_root, PROCESSES)?;
    let rules = dir.join("w8-rules");
    std::fs::create_dir_all(&rules)?;
    let socket = dir.join("w8.sock");
    let policy = dir.join("w8-acl.toml");
    let me = std::fs::canonicalize(std::env::current_exe()?)?;
    std::fs::write(
        &policy,
        format!(
            "version = 1\n\
             [[rule]]\ncollector = \"*\"\npublish = [\"events.#\", \"control.health.+.{{collector}}\"]\n\
             subscribe = [\"events.#\", \"$sys.#\"]\n\
             reply = [\"control.collector.{{collector}}\", \"control.collector.task.{{collector}}\"]\n\
             [[rule]]\nexe = \"{}\"\nrequest = [\"control.agent.query\"]\n",
            me.display()
        ),
    )?;
    let procmond = me.with_file_name("procmond");
    let entry = |id: &str| {
        format!(
            "[[collectors]]\nid = \"{id}\"\ncollector_type = \"procmond\"\nbinary = \"{}\"\n\
             args = [\"--source\", \"proc\", \"--proc-root\", \"{}\"]\n\
             events = [\"events.process.#\"]\n",
            procmond.display(),
            proc_root.display()
        )
    };
    let config = dir.join("w8.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nsocket_path = \"{}\"\nacl_file = \"{}\"\n[agent]\nrules_dir = \"{}\"\n{}{}",
            socket.display(),
            policy.display(),
            rules.display(),
            entry("procmond-a"),
            entry("procmond-b")
        ),
    )?;
    let agent = super::collector::start_agent(&config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rows_out = runtime.block_on(async {
        let client = Client::connect(
            &Endpoint::Unix(socket.clone()),
            ClientOptions::named("bench-w8"),
        )
        .await
        .context("connecting to the agent")?;
        // Until both instances were checked and answer with every process.
        let ready_by = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(m) = ask(&client).await
                && rows(&m) == (PROCESSES / 100) as usize
            {
                break;
            }
            if Instant::now() > ready_by {
                bail!("the agent's collectors did not answer queries");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let n = scaled(500, scale);
        let mut lat = Vec::with_capacity(n as usize);
        let started = Instant::now();
        for _ in 0..n {
            let t = Instant::now();
            ask(&client).await?;
            lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        }
        let one_secs = started.elapsed().as_secs_f64();
        lat.sort_unstable();
        let mut one = Row::collector(
            "agent",
            "w8",
            &format!("{PROCESSES}procs,1inflight"),
            n,
            one_secs,
        );
        one.p50_us = percentile(&lat, 0.5);
        one.p99_us = percentile(&lat, 0.99);
        one.p999_us = percentile(&lat, 0.999);
        one.max_us = lat.last().copied();
        let m = scaled(2_000, scale);
        let started = Instant::now();
        let mut lat = Vec::with_capacity(m as usize);
        let mut failed = 0;
        let mut pending = tokio::task::JoinSet::new();
        let mut sent = 0;
        while sent < m || !pending.is_empty() {
            while sent < m && pending.len() < IN_FLIGHT {
                let client = client.clone();
                pending.spawn(async move {
                    let t = Instant::now();
                    (ask(&client).await, t.elapsed())
                });
                sent += 1;
            }
            if let Some(done) = pending.join_next().await {
                match done {
                    Ok((Ok(_), took)) => {
                        lat.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                    }
                    _ => failed += 1,
                }
            }
        }
        let many_secs = started.elapsed().as_secs_f64();
        lat.sort_unstable();
        let mut many = Row::collector(
            "agent",
            "w8",
            &format!("{PROCESSES}procs,{IN_FLIGHT}inflight"),
            m,
            many_secs,
        );
        many.lost = failed;
        many.p50_us = percentile(&lat, 0.5);
        many.p99_us = percentile(&lat, 0.99);
        many.p999_us = percentile(&lat, 0.999);
        many.max_us = lat.last().copied();
        client.close().await;
        Ok::<_, anyhow::Error>(vec![one, many])
    })?;
    drop(agent);
    let _ = std::fs::remove_dir_all(&proc_root);
    Ok(rows_out)
}
