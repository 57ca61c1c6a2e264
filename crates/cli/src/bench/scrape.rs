//! W9: the metrics endpoint. A broker (`eventbus serve --metrics`) with 64 connections
//! holding 1,024 filters: `/metrics` fetched over HTTP one scrape after another (each a new
//! connection, as Prometheus's scrapes are), then W1 on the same broker in pairs, without and
//! with a scrape every second.

use super::process::{READY_WAIT, Worker};
use super::report::Row;
use super::{Ctx, FanOut, scaled};
use anyhow::{Context, Result, anyhow, bail};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Connections held open, and the filters each subscribes to.
const CONNECTIONS: usize = 64;
const FILTERS_PER_CONNECTION: usize = 16;

/// Scrapes timed (after [`WARMUP`] untimed).
const SCRAPES: u64 = 500;
const WARMUP: u64 = 20;

/// W1 pairs, without and with scrapes.
const PAIRS: u32 = 3;

/// One scrape: the time from connecting to the last byte, and the body's length.
fn scrape(addr: SocketAddr) -> Result<(Duration, usize)> {
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let mut body = Vec::with_capacity(64 * 1024);
    s.read_to_end(&mut body)?;
    let took = start.elapsed();
    if !body.starts_with(b"HTTP/1.1 200") {
        bail!(
            "/metrics answered {:?}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
    }
    Ok((took, body.len()))
}

fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(((last as f64) * q).round() as usize).copied()
}

pub(super) fn w9(ctx: &Ctx) -> Result<Vec<Row>> {
    let dir = ctx.dir.join("w9");
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("w9.sock").display().to_string();
    // Every bench worker is one executable of one uid: one identity, which the default
    // `max_connections_per_identity` (32) would hold to half the connections wanted; and
    // W1's two more would pass the default `max_connections` (64). Nothing else is changed.
    let config = dir.join("broker.toml");
    std::fs::write(
        &config,
        "[broker]\nmax_connections = 128\nmax_connections_per_identity = 128\n",
    )?;
    let serve = [
        "serve",
        "--socket",
        &socket,
        "--config",
        &config.display().to_string(),
        "--metrics",
        "127.0.0.1:0",
    ];
    let broker = Worker::spawn(&serve.map(String::from), "w9 broker")?;
    let addr: SocketAddr = loop {
        let line = broker.line(READY_WAIT)?;
        if let Some(a) = line.strip_prefix("metrics on http://") {
            break a
                .trim_end_matches("/metrics")
                .parse()
                .with_context(|| format!("the broker printed {line:?}"))?;
        }
        if !line.starts_with("listening on") {
            bail!("the w9 broker printed {line:?}");
        }
    };
    let idle = [
        "bench-worker",
        "idle",
        "--socket",
        &socket,
        "--connections",
        &CONNECTIONS.to_string(),
        "--filters",
        &FILTERS_PER_CONNECTION.to_string(),
    ];
    let idle = Worker::spawn(&idle.map(String::from), "idle clients")?;
    idle.ready()?;
    let mut rows = Vec::new();
    let mut size = 0;
    for _ in 0..WARMUP {
        size = scrape(addr)?.1;
    }
    let mut lat = Vec::with_capacity(SCRAPES as usize);
    let start = Instant::now();
    for _ in 0..SCRAPES {
        let (took, _) = scrape(addr)?;
        lat.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let mut row = Row::empty(
        "daemoneye-eventbus",
        "w9",
        &format!(
            "scrape,{CONNECTIONS}conns,{}filters,{}KiB",
            CONNECTIONS * FILTERS_PER_CONNECTION,
            size / 1024
        ),
        size,
        SCRAPES,
    );
    row.seconds = Some(secs);
    row.msgs_per_sec = Some(SCRAPES as f64 / secs);
    row.p50_us = percentile(&lat, 0.5);
    row.p99_us = percentile(&lat, 0.99);
    row.p999_us = percentile(&lat, 0.999);
    row.max_us = lat.last().copied();
    rows.push(row);

    // W1 on this broker (its 64 idle connections included), without and with a scrape
    // every second, in alternating pairs.
    let w1 = Ctx {
        socket: socket.clone(),
        broker_pid: Some(broker.child.id()),
        dir: dir.clone(),
        ..ctx.clone()
    };
    for run in 1..=PAIRS {
        for scraped in [false, true] {
            let stop = Arc::new(AtomicBool::new(false));
            let scrapes = Arc::new(AtomicU64::new(0));
            let scraper = scraped.then(|| {
                let (stop, scrapes) = (Arc::clone(&stop), Arc::clone(&scrapes));
                std::thread::spawn(move || -> Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        scrape(addr)?;
                        scrapes.fetch_add(1, Ordering::Relaxed);
                        // Every second, woken early to stop (bounded either way).
                        for _ in 0..10 {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                    Ok(())
                })
            });
            // W1 starts once the first scrape is done: every scraped run has at least one.
            let by = Instant::now() + READY_WAIT;
            while scraped && scrapes.load(Ordering::Relaxed) == 0 && Instant::now() < by {
                std::thread::sleep(Duration::from_millis(5));
            }
            let result = w1.fan_out(&FanOut {
                workload: "w9",
                variant: w1.variant(if scraped { "w1,scraped-every-1s" } else { "w1" }),
                subs: 1,
                filter: "bench.process.lifecycle",
                messages: scaled(1_000_000, ctx.scale),
                size: 256,
                stalled: false,
            });
            stop.store(true, Ordering::Relaxed);
            if let Some(s) = scraper {
                s.join()
                    .map_err(|_| anyhow!("the scraper panicked"))?
                    .context("scraping during W1")?;
                if scrapes.load(Ordering::Relaxed) == 0 {
                    bail!("no scrape answered during W1");
                }
            }
            let mut row = result?;
            row.run = Some(run);
            rows.push(row);
        }
    }
    drop(idle);
    drop(broker);
    Ok(rows)
}
