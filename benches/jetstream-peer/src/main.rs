//! NATS JetStream through W6 of `eventbus bench`, for side-by-side figures
//! (`docs/benchmarks.md`): a `nats-server -js` of its own (a separate process, file storage in
//! a temporary directory, loopback), a stream on `events.process.lifecycle`, then
//!
//! - `durable-publish`: 100,000 × 256 B published with JetStream's publish-and-ack, a window of
//!   acknowledgements in flight (as an async JetStream publisher does, and as our client keeps
//!   its unacknowledged publishes), timed from the first publish to the last acknowledgement;
//! - `durable-backlog`: a durable pull consumer created afterwards reads the backlog,
//!   acknowledging each message, timed from its first message to its last.
//!
//! Usage: `jetstream-peer [--count N] [--window W] [--runs R]`. One JSON object per line.

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SUBJECT: &str = "events.process.lifecycle";

struct Server {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the server syncs its file store (`--sync`): its default (nats-server 2.10+: every two
/// minutes; 2.9: left to the operating system), every interval, or before every
/// acknowledgement.
#[derive(Clone, Debug)]
enum Sync {
    Default,
    Interval(String),
    Always,
}

impl Sync {
    fn label(&self) -> String {
        match self {
            Self::Default => "sync=default".into(),
            Self::Interval(i) => format!("sync={i}"),
            Self::Always => "sync=always".into(),
        }
    }
}

fn start_server(bin: &str, port: u16, sync: &Sync) -> Result<Server> {
    let dir = std::env::temp_dir().join(format!("jetstream-peer-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sync_line = match sync {
        Sync::Default => String::new(),
        Sync::Interval(i) => format!("  sync_interval: \"{i}\"\n"),
        Sync::Always => "  sync_interval: always\n".into(),
    };
    let config = dir.join("server.conf");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{sync_line}}}\n",
            dir.join("store").display()
        ),
    )?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {bin} (nats-server)"))?;
    Ok(Server { child, dir })
}

async fn connect(port: u16) -> Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match async_nats::connect(format!("127.0.0.1:{port}")).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => bail!("nats-server did not come up: {e}"),
        }
    }
}

fn row(variant: &str, count: u64, received: u64, secs: f64, run: u32) -> serde_json::Value {
    serde_json::json!({
        "peer": "nats-jetstream",
        "workload": "w6",
        "variant": variant,
        "payload_bytes": 256,
        "messages": count,
        "seconds": secs,
        "msgs_per_sec": received as f64 / secs,
        "mb_per_sec": received as f64 * 256.0 / secs / 1e6,
        "lost": count - received,
        "run": run,
    })
}

struct Setup {
    bin: String,
    sync: Sync,
    count: u64,
    window: usize,
}

async fn run_once(setup: &Setup, port: u16, run: u32) -> Result<()> {
    let (count, window) = (setup.count, setup.window);
    let _server = start_server(&setup.bin, port, &setup.sync)?;
    let label = setup.sync.label();
    let client = connect(port).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: "BENCH".into(),
            subjects: vec![SUBJECT.into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let payload = Bytes::from(vec![0xA5u8; 256]);
    let start = Instant::now();
    let mut in_flight = VecDeque::with_capacity(window);
    for _ in 0..count {
        if in_flight.len() >= window
            && let Some(ack) = in_flight.pop_front()
        {
            let _: jetstream::publish::PublishAck = ack.await?;
        }
        in_flight.push_back(js.publish(SUBJECT, payload.clone()).await?);
    }
    for ack in in_flight {
        let _: jetstream::publish::PublishAck = ack.await?;
    }
    let published = start.elapsed().as_secs_f64();
    let variant = format!("tcp,proc,file,{label},durable-publish");
    println!("{}", row(&variant, count, count, published, run));

    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("w6".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let (mut received, mut first) = (0u64, None);
    while received < count {
        let next = tokio::time::timeout(Duration::from_secs(3), messages.next()).await;
        let Ok(Some(m)) = next else { break };
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        first.get_or_insert_with(Instant::now);
        m.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        received += 1;
    }
    let secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let variant = format!("tcp,proc,file,{label},durable-backlog");
    println!("{}", row(&variant, count, received, secs, run));
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut setup = Setup {
        bin: std::env::var("NATS_SERVER").unwrap_or_else(|_| "nats-server".into()),
        sync: Sync::Default,
        count: 100_000,
        window: 4096,
    };
    let mut runs = 2u32;
    while let Some(a) = args.next() {
        let v = args.next().context("a value after each flag")?;
        match a.as_str() {
            "--count" => setup.count = v.parse()?,
            "--window" => setup.window = v.parse()?,
            "--runs" => runs = v.parse()?,
            "--nats-server" => setup.bin = v,
            "--sync" => {
                setup.sync = match v.as_str() {
                    "default" => Sync::Default,
                    "always" => Sync::Always,
                    interval => Sync::Interval(interval.to_owned()),
                }
            }
            other => bail!("unknown flag {other}"),
        }
    }
    for run in 1..=runs {
        run_once(&setup, 14300 + run as u16, run).await?;
    }
    Ok(())
}
