//! Benchmark worker processes (`eventbus bench-worker ROLE`), spawned by `eventbus bench`.
//!
//! Protocol on stdio: the worker prints `ready` once connected and subscribed, waits for a
//! `go` line on stdin when it is a publisher or requester, and prints one JSON result line.
//! Times are CLOCK_MONOTONIC nanoseconds, comparable across processes.

use super::{Role, mono_ns, workload_topics};
use anyhow::{Context, Result, bail};
use daemoneye_eventbus::Topic;
use daemoneye_eventbus::client::{
    Client, ClientOptions, ConnectError, Publish, RecvError, ServeOptions,
};
use daemoneye_eventbus::core::codec::ErrorCode;
use hdrhistogram::Histogram;
use serde_json::json;
use std::io::{BufRead, Write};
use std::time::Duration;

/// A subscriber stops after this long without a message; the rest is counted as lost.
pub(crate) const IDLE: Duration = Duration::from_secs(3);

fn say(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn wait_go() -> Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != "go" {
        bail!("expected 'go' on stdin, got {line:?}");
    }
    Ok(())
}

/// Every worker uses the default client options: the bench measures what a user gets.
/// Connects with default options. A broker at `max_connections` is asked again for up to
/// [`CONNECT_PATIENCE`]: the connections of the workload before may not all be gone yet (the
/// broker sees a closed socket a little after its process exits).
async fn connect(socket: &str, name: &str) -> Result<Client> {
    // A tls:// broker: the certificate the controller made, from the environment.
    let var = |k| std::env::var_os(k).map(std::path::PathBuf::from);
    let broker = daemoneye_eventbus::collector::cli::BrokerArg {
        socket: Some(socket.to_owned()),
        tls_cert: var("EVENTBUS_TLS_CERT"),
        tls_key: var("EVENTBUS_TLS_KEY"),
        tls_ca: var("EVENTBUS_TLS_CA"),
    };
    let (ep, tls) = broker.resolve()?;
    let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE;
    loop {
        let mut options = ClientOptions::named(name);
        options.tls.clone_from(&tls);
        match Client::connect(&ep, options).await {
            Err(ConnectError::Refused {
                code: ErrorCode::ConnectionLimit,
                ..
            }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r.with_context(|| format!("connecting to {ep}")),
        }
    }
}

/// How long a worker asks again a broker at its connection limit.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

pub(crate) async fn run(role: Role) -> Result<()> {
    match role {
        Role::Sub {
            socket,
            filters,
            expect,
            name,
            qos,
            durable,
        } => subscriber(&socket, &name, &filters, expect, qos.into(), durable).await,
        Role::Pub {
            socket,
            workload,
            count,
            size,
            qos,
        } => publisher(&socket, &workload, count, size, qos.into()).await,
        Role::Responder { socket } => responder(&socket).await,
        Role::Idle {
            socket,
            connections,
            filters,
        } => idle(&socket, connections, filters).await,
        Role::Requester {
            socket,
            count,
            warmup,
            size,
            inflight,
        } => requester(&socket, count, warmup, size, inflight).await,
        Role::FloorServer { path } => super::floor::server(&path),
        Role::FloorClient {
            path,
            count,
            pingpong,
            size,
        } => super::floor::client(&path, count, pingpong, size),
    }
}

async fn subscriber(
    socket: &str,
    name: &str,
    filters: &str,
    expect: u64,
    qos: daemoneye_eventbus::Qos,
    durable: Option<String>,
) -> Result<()> {
    let client = connect(socket, name).await?;
    let mut sub = match &durable {
        Some(d) => client.subscribe_durable(d, filters.split(',')).await?,
        None => client.subscribe_with(filters.split(','), qos).await?,
    };
    say("ready")?;
    let (mut received, mut missed, mut first, mut last) = (0u64, 0u64, 0u64, 0u64);
    while received < expect {
        // Drain what is queued; arm the idle timer only when the queue is empty. The clock is
        // read once per drained burst: the last message of a burst stamps `last`.
        let next = match sub.try_recv() {
            Some(r) => r,
            None => match tokio::time::timeout(IDLE, sub.recv()).await {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        match next {
            Ok(_) => {
                received += 1;
                if received == 1 {
                    first = mono_ns();
                }
                if received == expect || sub.is_empty() {
                    last = mono_ns();
                }
            }
            Err(RecvError::Missed { count, .. }) => missed += count,
            Err(e) => bail!("subscription ended: {e}"),
        }
    }
    say(
        &json!({"received": received, "missed": missed, "first_ns": first, "last_ns": last})
            .to_string(),
    )?;
    // Acknowledges the last message and writes the acknowledgements before leaving (a durable
    // subscription keeps what was not acknowledged for its next subscriber).
    sub.flush_acks();
    if durable.is_some() && expect > 0 {
        // The measured subscriber leaves no durable subscription behind.
        sub.delete().await?;
    } else {
        drop(sub);
    }
    client.drain().await;
    Ok(())
}

async fn publisher(
    socket: &str,
    workload: &str,
    count: u64,
    size: usize,
    qos: daemoneye_eventbus::Qos,
) -> Result<()> {
    let client = connect(socket, "bench-pub").await?;
    let topics: Vec<Topic> = workload_topics(workload)?;
    // One payload for every message, as the peers' benchmarks publish one buffer: static, so
    // handing it to each publish costs no reference count (the bench measures the bus, not
    // its own sharing of a buffer). Leaked once per worker process.
    let payload = bytes::Bytes::from_static(Box::leak(vec![0xA5u8; size].into_boxed_slice()));
    say("ready")?;
    wait_go()?;
    let start = mono_ns();
    for i in 0..count {
        let topic = &topics[(i % topics.len() as u64) as usize];
        if qos == daemoneye_eventbus::Qos::Processed {
            let p = Publish::new(topic.clone(), payload.clone()).qos(qos);
            client.publish_with(p).await?;
        } else {
            client.publish(topic, payload.clone()).await?;
        }
    }
    let published = mono_ns();
    // Processed: every publish acknowledged (every subscription holds it); Realtime: routed.
    let unacked = match qos {
        daemoneye_eventbus::Qos::Processed => client.wait_acked(IDLE * 10).await.outstanding,
        _ => {
            client.ping().await?;
            0
        }
    };
    let end = mono_ns();
    let s = client.stats();
    say(
        &json!({"start_ns": start, "published_ns": published, "end_ns": end,
        "lost": s.lost + s.rejected + unacked})
        .to_string(),
    )?;
    client.close().await;
    Ok(())
}

/// Waits until the controller closes our stdin (how it stops long-lived workers).
async fn stdin_closed() -> Result<()> {
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await?;
    Ok(())
}

async fn idle(socket: &str, connections: usize, filters: usize) -> Result<()> {
    let mut held = Vec::with_capacity(connections);
    for i in 0..connections {
        let client = connect(socket, &format!("idle{i}")).await?;
        let sub = client
            .subscribe((0..filters).map(|j| format!("bench.idle.c{i}.f{j}")))
            .await?;
        held.push((client, sub));
    }
    say("ready")?;
    stdin_closed().await?;
    for (client, sub) in held {
        drop(sub);
        client.close().await;
    }
    Ok(())
}

async fn responder(socket: &str) -> Result<()> {
    let client = connect(socket, "bench-responder").await?;
    // Echo through the RPC service machinery: decode, handler, reply with child metadata.
    let service = client
        .serve(
            ["bench.w3.request"],
            ServeOptions::default(),
            |m: daemoneye_eventbus::Message| async move { Ok(m.payload().clone()) },
        )
        .await?;
    say("ready")?;
    stdin_closed().await?;
    service.drain(Duration::from_secs(5)).await;
    client.close().await;
    Ok(())
}

/// Round trips through RPC: `inflight` calls at a time (1: one after the other), after
/// `warmup` untimed ones. Every call must succeed; failures are counted as lost.
async fn requester(
    socket: &str,
    count: u64,
    warmup: u64,
    size: usize,
    inflight: u64,
) -> Result<()> {
    let client = connect(socket, "bench-requester").await?;
    let request = Topic::new("bench.w3.request")?;
    let payload = bytes::Bytes::from(vec![0x5Au8; size]);
    say("ready")?;
    wait_go()?;
    let call = |client: Client, request: Topic, payload: bytes::Bytes| async move {
        let t0 = mono_ns();
        let ok = client.request(&request, payload, IDLE).await.is_ok();
        (ok, ((mono_ns() - t0) / 1000).max(1))
    };
    for _ in 0..warmup {
        call(client.clone(), request.clone(), payload.clone()).await;
    }
    // `inflight` callers, each making its share of the calls one after the other.
    let start_all = mono_ns();
    let lanes = inflight.clamp(1, count.max(1));
    let mut running = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let share = count / lanes + u64::from(lane < count % lanes);
        let (client, request, payload) = (client.clone(), request.clone(), payload.clone());
        running.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut lost = 0u64;
            for _ in 0..share {
                let (ok, us) = call(client.clone(), request.clone(), payload.clone()).await;
                if ok {
                    hist.record(us)?;
                } else {
                    lost += 1;
                }
            }
            anyhow::Ok((hist, lost))
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut lost = 0u64;
    while let Some(done) = running.join_next().await {
        let (h, l) = done??;
        hist.add(h)?;
        lost += l;
    }
    let end = mono_ns();
    say(
        &json!({"start_ns": start_all, "end_ns": end, "lost": lost, "count": count,
        "p50_us": hist.value_at_quantile(0.5), "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999), "max_us": hist.max()})
        .to_string(),
    )?;
    client.close().await;
    Ok(())
}
