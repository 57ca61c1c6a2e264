//! busrt 0.5 through W1, W2 and W3 of `eventbus bench`, measured the same way: every subscriber
//! (W3: the responder and the requester) a separate process with its own connection, the
//! broker a separate process (busrt's own broker, embedded as `busrtd` embeds it, on a Unix
//! socket), subscribers confirmed before the first publish, throughput from the first publish
//! to the last receive, losses counted after 3 s without a message, one JSON object per line
//! in the fields of `eventbus bench --json` with `peer` = "busrt".
//!
//! busrt disconnects a client whose broker-side queue fills ("force unregistering") or whose
//! socket takes more than the write timeout (1 s by default) to accept a write, which is where
//! its loss under default settings comes from; `run` sizes the broker's and clients' queues for
//! the whole run (`--queue`) and sets a 30 s write timeout, so the figures are for lossless
//! delivery. Publishes use `QoS::No` (fire and forget, buffered); RPC calls `QoS::Realtime`
//! (written at once: busrt's lowest latency).

use anyhow::{Context, Result, bail};
use busrt::QoS;
use busrt::borrow::Cow;
use busrt::client::AsyncClient;
use busrt::ipc::{Client, Config};
use busrt::rpc::{Rpc, RpcClient, RpcEvent, RpcHandlers, RpcResult};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Every wait of the controller is bounded by this.
const WAIT: Duration = Duration::from_secs(60);
/// A subscriber stops after this long without a message.
const IDLE: Duration = Duration::from_secs(3);
const RESPONDER: &str = "bench.responder";

fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn arg<'a>(args: &'a [String], name: &str) -> Result<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .with_context(|| format!("missing {name}"))
}

fn num(args: &[String], name: &str) -> Result<u64> {
    Ok(arg(args, name)?.parse()?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let role = args.first().map(String::as_str).unwrap_or("run");
    // Clients on one thread, like the workers of `eventbus bench`; the broker on the two
    // worker threads `busrtd` would use here.
    let mut rt = match role {
        "broker" => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let rt = rt.enable_all().build()?;
    match role {
        "broker" => rt.block_on(broker(&args)),
        "sub" => rt.block_on(sub(&args)),
        "pub" => rt.block_on(publisher(&args)),
        "responder" => rt.block_on(responder(&args)),
        "requester" => rt.block_on(requester(&args)),
        "run" => run(&args),
        other => bail!("unknown role {other}: broker | sub | pub | responder | requester | run"),
    }
}

async fn broker(args: &[String]) -> Result<()> {
    let mut broker = busrt::broker::Broker::new();
    broker.set_queue_size(usize::try_from(num(args, "--queue")?)?);
    broker
        .spawn_unix_server(
            arg(args, "--socket")?,
            busrt::broker::ServerConfig::default().timeout(Duration::from_secs(30)),
        )
        .await?;
    println!("ready");
    std::future::pending::<()>().await;
    Ok(())
}

async fn connect(args: &[String], name: &str) -> Result<Client> {
    let config = Config::new(arg(args, "--socket")?, name)
        .queue_size(usize::try_from(num(args, "--queue")?)?);
    Ok(Client::connect(&config).await?)
}

fn wait_go() -> Result<()> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}

async fn sub(args: &[String]) -> Result<()> {
    let expect = num(args, "--expect")?;
    let mut client = connect(args, arg(args, "--name")?).await?;
    let confirm = client
        .subscribe(arg(args, "--topic")?, QoS::Processed)
        .await?;
    confirm.context("no confirmation")?.await??;
    let rx = client.take_event_channel().context("event channel")?;
    println!("ready");
    std::io::stdout().flush()?;
    let (mut received, mut first, mut last) = (0u64, 0u64, 0u64);
    while received < expect {
        match tokio::time::timeout(IDLE, rx.recv()).await {
            Ok(Ok(_frame)) => received += 1,
            _ => break,
        }
        // Drain what is already queued, then read the clock once for the batch.
        while received < expect {
            match rx.try_recv() {
                Ok(_frame) => received += 1,
                Err(_) => break,
            }
        }
        last = mono_ns();
        if first == 0 {
            first = last;
        }
    }
    println!(
        "{}",
        json!({"received": received, "first_ns": first, "last_ns": last})
    );
    Ok(())
}

async fn publisher(args: &[String]) -> Result<()> {
    let count = num(args, "--count")?;
    let payload = vec![0x5au8; usize::try_from(num(args, "--size")?)?];
    let topic = arg(args, "--topic")?;
    let mut client = connect(args, "bench.publisher").await?;
    println!("ready");
    std::io::stdout().flush()?;
    wait_go()?;
    let start = mono_ns();
    for _ in 0..count {
        client
            .publish(topic, Cow::Borrowed(&payload), QoS::No)
            .await?;
    }
    // A last acknowledged publish: everything before it has reached the broker.
    let done = client
        .publish(topic, Cow::Borrowed(&[]), QoS::Processed)
        .await?;
    done.context("no confirmation")?.await??;
    println!("{}", json!({"start_ns": start, "end_ns": mono_ns()}));
    Ok(())
}

struct Echo;

#[busrt::async_trait]
impl RpcHandlers for Echo {
    async fn handle_call(&self, event: RpcEvent) -> RpcResult {
        Ok(Some(event.payload().to_vec()))
    }
}

async fn responder(args: &[String]) -> Result<()> {
    let client = connect(args, RESPONDER).await?;
    let _rpc = RpcClient::new(client, Echo);
    println!("ready");
    std::io::stdout().flush()?;
    std::future::pending::<()>().await;
    Ok(())
}

async fn requester(args: &[String]) -> Result<()> {
    let (count, warmup) = (num(args, "--count")?, num(args, "--warmup")?);
    let payload = vec![0x5au8; usize::try_from(num(args, "--size")?)?];
    let rpc = RpcClient::new0(connect(args, "bench.requester").await?);
    println!("ready");
    std::io::stdout().flush()?;
    wait_go()?;
    let mut lost = 0u64;
    for _ in 0..warmup {
        if rpc
            .call(RESPONDER, "echo", Cow::Borrowed(&payload), QoS::Realtime)
            .await
            .is_err()
        {
            lost += 1;
        }
    }
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let start = mono_ns();
    for _ in 0..count {
        let t = Instant::now();
        match rpc
            .call(RESPONDER, "echo", Cow::Borrowed(&payload), QoS::Realtime)
            .await
        {
            Ok(reply) if reply.payload() == payload.as_slice() => {
                hist.record(u64::try_from(t.elapsed().as_micros())?.max(1))?;
            }
            _ => lost += 1,
        }
    }
    let end = mono_ns();
    println!(
        "{}",
        json!({
            "count": count, "lost": lost, "start_ns": start, "end_ns": end,
            "p50_us": hist.value_at_quantile(0.5), "p99_us": hist.value_at_quantile(0.99),
            "p999_us": hist.value_at_quantile(0.999), "max_us": hist.max(),
        })
    );
    Ok(())
}

/// A role in its own process, its stdout read line by line on a thread so waits are bounded.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    what: String,
}

impl Worker {
    fn spawn(role: &str, args: &[&str], what: &str) -> Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg(role)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            lines,
            what: what.into(),
        })
    }

    fn line(&self) -> Result<String> {
        self.lines
            .recv_timeout(WAIT)
            .with_context(|| format!("{} said nothing in {WAIT:?}", self.what))
    }

    fn ready(&self) -> Result<()> {
        match self.line()?.as_str() {
            "ready" => Ok(()),
            other => bail!("{}: {other}", self.what),
        }
    }

    fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin")?;
        writeln!(stdin, "go")?;
        Ok(stdin.flush()?)
    }

    fn result(&self) -> Result<Value> {
        Ok(serde_json::from_str(&self.line()?)?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

fn run(args: &[String]) -> Result<()> {
    let scale: f64 = arg(args, "--scale").unwrap_or("1").parse()?;
    let queue = arg(args, "--queue").unwrap_or("2000000");
    let dir = std::env::temp_dir().join(format!("busrt-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // busrt tells Unix sockets from TCP addresses by the `.sock` ending.
    let socket = dir.join("busrt.sock").display().to_string();
    let common = ["--socket", socket.as_str(), "--queue", queue];
    let broker = Worker::spawn("broker", &common, "busrt broker")?;
    broker.ready()?;
    let result = workloads(&common, scale);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn workloads(common: &[&str], scale: f64) -> Result<()> {
    let topic = "events/process/lifecycle";
    for (workload, subs, filter, n) in [
        ("w1", 1, topic, scaled(1_000_000, scale)),
        ("w2", 4, "events/process/+", scaled(250_000, scale)),
    ] {
        let subs = (0..subs)
            .map(|i| {
                let (n, name) = (n.to_string(), format!("bench.sub{i}"));
                let args = [
                    common,
                    &["--topic", filter, "--expect", &n, "--name", &name],
                ];
                Worker::spawn("sub", &args.concat(), &name)
            })
            .collect::<Result<Vec<_>>>()?;
        subs.iter().try_for_each(Worker::ready)?;
        let count = n.to_string();
        let extra = ["--topic", topic, "--count", &count, "--size", "256"];
        let mut publisher = Worker::spawn("pub", &[common, &extra].concat(), "publisher")?;
        publisher.ready()?;
        publisher.go()?;
        let p = publisher.result()?;
        let results = subs
            .iter()
            .map(Worker::result)
            .collect::<Result<Vec<_>>>()?;
        let start = p["start_ns"].as_u64().unwrap_or(0);
        let last = results.iter().filter_map(|r| r["last_ns"].as_u64()).max();
        let received: u64 = results.iter().filter_map(|r| r["received"].as_u64()).sum();
        let secs = last.unwrap_or(start).saturating_sub(start) as f64 / 1e9;
        let rate = (secs > 0.0).then(|| received as f64 / secs);
        let per_sub: Vec<f64> = results
            .iter()
            .map(|r| {
                let s = r["last_ns"].as_u64().unwrap_or(0).saturating_sub(start) as f64 / 1e9;
                r["received"].as_u64().unwrap_or(0) as f64 / s.max(1e-9)
            })
            .collect();
        let expected = n * subs.len() as u64;
        println!(
            "{}",
            json!({
                "peer": "busrt", "workload": workload, "variant": "uds,proc,qos-no,lossless-queues",
                "payload_bytes": 256, "messages": expected, "seconds": secs,
                "msgs_per_sec": rate, "mb_per_sec": rate.map(|r| r * 256.0 / 1e6),
                "lost": expected.saturating_sub(received), "p50_us": null, "p99_us": null,
                "p999_us": null, "max_us": null, "per_sub_msgs_per_sec": per_sub,
            })
        );
    }
    let responder = Worker::spawn("responder", common, "responder")?;
    responder.ready()?;
    let count = scaled(20_000, scale).to_string();
    let extra = ["--count", &count, "--warmup", "1000", "--size", "256"];
    let mut requester = Worker::spawn("requester", &[common, &extra].concat(), "requester")?;
    requester.ready()?;
    requester.go()?;
    let r = requester.result()?;
    let secs = r["end_ns"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(r["start_ns"].as_u64().unwrap_or(0)) as f64
        / 1e9;
    println!(
        "{}",
        json!({
            "peer": "busrt", "workload": "w3", "variant": "uds,proc,rpc",
            "payload_bytes": 256, "messages": r["count"], "seconds": secs,
            "msgs_per_sec": r["count"].as_f64().map(|c| c / secs), "mb_per_sec": null,
            "lost": r["lost"], "p50_us": r["p50_us"], "p99_us": r["p99_us"],
            "p999_us": r["p999_us"], "max_us": r["max_us"],
        })
    );
    Ok(())
}
