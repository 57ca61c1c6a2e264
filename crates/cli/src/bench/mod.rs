//! `eventbus bench`: the W1–W5 workloads and the raw-socket floor, every participant a
//! separate process with its own connection (see `docs/benchmarks.md`).
//!
//! The controller starts a broker (`eventbus serve`) unless `--socket` names one, spawns
//! workers (`eventbus bench-worker …`), waits until every subscriber is subscribed, starts the
//! publisher, and computes figures from CLOCK_MONOTONIC timestamps the workers report.

mod collector;
mod floor;
mod process;
mod report;
mod scrape;
mod tasks;
mod worker;

use anyhow::{Context, Result, bail};
use daemoneye_eventbus::Topic;
use process::{READY_WAIT, Worker};
use report::Row;
use serde_json::Value;
use std::time::Instant;

pub(crate) use worker::run as run_worker;

/// Hidden worker roles.
#[derive(clap::Subcommand, Debug, Clone)]
pub(crate) enum Role {
    /// Subscribe to comma-separated filters and count `expect` messages.
    Sub {
        #[arg(long)]
        socket: String,
        #[arg(long)]
        filters: String,
        #[arg(long)]
        expect: u64,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        qos: crate::QosArg,
        /// Attach to this durable subscription (Processed) instead.
        #[arg(long)]
        durable: Option<String>,
    },
    /// Publish `count` messages of `size` bytes over the workload's topics; Processed ones
    /// are waited for until the broker acknowledged them all.
    Pub {
        #[arg(long)]
        socket: String,
        #[arg(long)]
        workload: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        size: usize,
        #[arg(long, value_enum)]
        qos: crate::QosArg,
    },
    /// Echo requests (an RPC service) until stdin closes.
    Responder {
        #[arg(long)]
        socket: String,
    },
    /// Timed RPC round trips, `inflight` at a time.
    Requester {
        #[arg(long)]
        socket: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        warmup: u64,
        #[arg(long)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        inflight: u64,
    },
    /// Hold `connections` idle client connections (each with one subscription) until stdin
    /// closes.
    Idle {
        #[arg(long)]
        socket: String,
        #[arg(long)]
        connections: usize,
        /// Filters each connection subscribes to (`bench.idle.c<i>.f<j>`).
        #[arg(long, default_value_t = 1)]
        filters: usize,
    },
    /// Raw socket floor: the receiving side.
    FloorServer {
        #[arg(long)]
        path: String,
    },
    /// Raw socket floor: the sending side.
    FloorClient {
        #[arg(long)]
        path: String,
        #[arg(long)]
        count: u64,
        #[arg(long)]
        pingpong: u64,
        #[arg(long)]
        size: usize,
    },
}

/// Which workloads to run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Workload {
    W1,
    W2,
    W3,
    W4,
    W5,
    /// A durable subscription's backlog of 100,000 messages redelivered to the subscriber
    /// that attaches.
    W6,
    /// procmond under the agent: its CPU idle and with 200 process starts per second, and
    /// the time from a process's exec to its event at a subscriber.
    W7,
    /// Collection tasks and rule SQL under the agent: a query over 2,000 processes through
    /// `control.agent.query`, one at a time and eight in flight.
    W8,
    /// The metrics endpoint: `/metrics` scraped with 64 connections and 1,024 filters, and
    /// W1 without and with a scrape every second.
    W9,
    Floor,
    All,
}

/// `eventbus bench` options.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Use a running broker instead of starting one.
    #[arg(long, value_name = "PATH")]
    socket: Option<String>,
    /// Workload to run.
    #[arg(long, value_enum, default_value = "all")]
    workload: Workload,
    /// Delivery guarantee of the streaming workloads (W1, W2, W4, W5): `realtime` (at most
    /// once: a subscriber slower than the publisher loses the oldest, counted in `lost`),
    /// `processed` (at least once: the publisher publishes Processed and waits for every
    /// acknowledgement, the subscribers acknowledge, nothing is dropped), or `both` (default:
    /// each workload in both).
    #[arg(long, value_enum, default_value = "both")]
    qos: BenchQos,
    /// Multiply message counts (for quick runs).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// Start the broker with this data directory (durable subscriptions on disk, W6 rows
    /// labelled `disk`); without it the broker keeps them in memory.
    #[arg(long, value_name = "DIR", conflicts_with = "socket")]
    data_dir: Option<std::path::PathBuf>,
    /// The broker's `fsync` with `--data-dir` (default: the broker's, `interval`); W6 rows
    /// are labelled with it.
    #[arg(long, value_enum, value_name = "MODE", requires = "data_dir")]
    fsync: Option<crate::FsyncArg>,
    /// Connect every worker over TCP with mutual TLS (rows labelled `tls`) instead of the
    /// Unix socket: the broker listens on 127.0.0.1 with a development PKI made for the run
    /// (`eventbus tls dev-pki`).
    #[arg(long, conflicts_with = "socket")]
    tls: bool,
}

/// The guarantees the streaming workloads run in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BenchQos {
    Realtime,
    Processed,
    Both,
}

impl BenchQos {
    fn each(self) -> Vec<crate::QosArg> {
        match self {
            Self::Realtime => vec![crate::QosArg::Realtime],
            Self::Processed => vec![crate::QosArg::Processed],
            Self::Both => vec![crate::QosArg::Realtime, crate::QosArg::Processed],
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable between processes on one machine.
pub(crate) fn mono_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

/// W4: 1,000 (topic, filter) pairs, each topic matching exactly one filter: 500 exact, then
/// `x.+`, `x.#` and `+` in mid-topic in rotation.
pub(crate) fn w4_plan() -> Vec<(String, String)> {
    (0..1000)
        .map(|i| match (i < 500, i % 3) {
            (true, _) => (format!("bench.w4.e{i}.data"), format!("bench.w4.e{i}.data")),
            (false, 0) => (format!("bench.w4.p{i}.data"), format!("bench.w4.p{i}.+")),
            (false, 1) => (
                format!("bench.w4.h{i}.data.more"),
                format!("bench.w4.h{i}.#"),
            ),
            (false, _) => (format!("bench.w4.any.m{i}"), format!("bench.w4.+.m{i}")),
        })
        .collect()
}

/// Topics a publisher cycles through for a workload.
pub(crate) fn workload_topics(workload: &str) -> Result<Vec<Topic>> {
    match workload {
        "w4" => w4_plan()
            .into_iter()
            .map(|(t, _)| Ok(Topic::new(t)?))
            .collect(),
        _ => Ok(vec![Topic::new("bench.process.lifecycle")?]),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

/// Connections of W2 crowded: as many as one identity may hold by default, less one.
const CROWDED: usize = 31;

/// Everything a workload needs to know about the run.
#[derive(Clone)]
struct Ctx {
    socket: String,
    scale: f64,
    qos: crate::QosArg,
    broker_pid: Option<u32>,
    /// The broker keeps durable subscriptions on disk (`--data-dir`), with this `fsync`.
    disk: Option<&'static str>,
    /// How workers reach the broker: `uds` or `tls`.
    transport: &'static str,
    /// The run's temporary directory.
    dir: std::path::PathBuf,
}

impl Ctx {
    fn sub(&self, filters: &str, expect: u64, name: &str, qos: &str) -> Result<Worker> {
        let args = [
            "bench-worker",
            "sub",
            "--socket",
            &self.socket,
            "--filters",
            filters,
            "--expect",
            &expect.to_string(),
            "--name",
            name,
            "--qos",
            qos,
        ];
        Worker::spawn(&args.map(String::from), name)
    }

    fn qos_name(&self) -> &'static str {
        match self.qos {
            crate::QosArg::Realtime => "realtime",
            crate::QosArg::Processed => "processed",
        }
    }

    /// Variant label: transport, process model, QoS, and an optional detail.
    fn variant(&self, detail: &str) -> String {
        let base = format!("{},proc,{}", self.transport, self.qos_name());
        if detail.is_empty() {
            base
        } else {
            format!("{base},{detail}")
        }
    }

    fn publisher(&self, workload: &str, count: u64, size: usize) -> Result<Worker> {
        let args = [
            "bench-worker",
            "pub",
            "--socket",
            &self.socket,
            "--workload",
            workload,
            "--count",
            &count.to_string(),
            "--size",
            &size.to_string(),
            "--qos",
            self.qos_name(),
        ];
        Worker::spawn(&args.map(String::from), "publisher")
    }

    fn peak_rss_kb(&self) -> Option<u64> {
        self.broker_pid
            .and_then(|pid| report::status_kb(pid, "VmHWM"))
    }

    /// One publisher, `subs` subscribers on `filter`, `n` messages of `size` bytes.
    /// One publisher and `spec.subs` subscribers on `spec.filter`; with `spec.stalled`, a
    /// further at-most-once subscriber that is frozen (SIGSTOP) before the first publish and
    /// never reads, to measure what a stalled reader costs the others.
    fn fan_out(&self, spec: &FanOut<'_>) -> Result<Row> {
        let n = spec.messages;
        let subscribers = (0..spec.subs)
            .map(|i| self.sub(spec.filter, n, &format!("sub{i}"), self.qos_name()))
            .collect::<Result<Vec<_>>>()?;
        subscribers.iter().try_for_each(Worker::ready)?;
        let stalled = match spec.stalled {
            true => {
                let w = self.sub(spec.filter, n, "stalled", "realtime")?;
                w.ready()?;
                let pid = nix::unistd::Pid::from_raw(i32::try_from(w.child.id())?);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
                Some(w)
            }
            false => None,
        };
        let mut publisher = self.publisher(spec.workload, n, spec.size)?;
        publisher.ready()?;
        publisher.go()?;
        let p = publisher.result()?;
        let results = subscribers
            .iter()
            .map(Worker::result)
            .collect::<Result<Vec<_>>>()?;
        drop(stalled);
        Ok(Row::throughput(
            spec.workload,
            &spec.variant,
            spec.size,
            n * spec.subs as u64,
            &p,
            &results,
            self.peak_rss_kb(),
        ))
    }
}

/// What [`Ctx::fan_out`] runs.
struct FanOut<'a> {
    workload: &'a str,
    variant: String,
    subs: usize,
    filter: &'a str,
    messages: u64,
    size: usize,
    stalled: bool,
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    if args.scale <= 0.0 || !args.scale.is_finite() {
        bail!("--scale must be a positive number");
    }
    let dir = std::env::temp_dir().join(format!("eventbus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_in(&args, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(args: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    let mut broker = None;
    let (socket, pid, ready_ms) = match &args.socket {
        Some(s) => (s.clone(), None, None),
        None => {
            let socket = dir.join("bench.sock").display().to_string();
            let start = Instant::now();
            let mut serve = vec!["serve".into(), "--socket".into(), socket.clone()];
            if let Some(d) = &args.data_dir {
                serve.extend(["--data-dir".into(), d.display().to_string()]);
            }
            if let Some(f) = args.fsync {
                serve.extend(["--fsync".into(), f.as_str().into()]);
            }
            if args.tls {
                let pki = crate::tls_cmd::dev_pki(&dir.join("pki"), &[], &["bench".into()])?;
                let (_, cert, key) = &pki.clients[0];
                let env = [
                    ("EVENTBUS_TLS_CERT", cert),
                    ("EVENTBUS_TLS_KEY", key),
                    ("EVENTBUS_TLS_CA", &pki.ca),
                ];
                let _ =
                    process::WORKER_ENV.set(env.map(|(k, v)| (k.to_owned(), v.clone())).to_vec());
                serve.extend(["--tls-listen".into(), "127.0.0.1:0".into()]);
                for (flag, path) in [
                    ("--tls-cert", &pki.broker_cert),
                    ("--tls-key", &pki.broker_key),
                    ("--tls-client-ca", &pki.ca),
                ] {
                    serve.extend([flag.into(), path.display().to_string()]);
                }
            }
            let w = Worker::spawn(&serve, "broker")?;
            let mut line = w.line(READY_WAIT)?;
            if !line.starts_with("listening on") {
                bail!("broker printed {line:?}");
            }
            if args.tls {
                line = w.line(READY_WAIT)?;
            }
            let socket = match line.strip_prefix("listening on tls:") {
                Some(addr) => format!("tls://{addr}"),
                None => socket,
            };
            let ready = start.elapsed().as_secs_f64() * 1000.0;
            let pid = w.child.id();
            broker = Some(w);
            (socket, Some(pid), Some(ready))
        }
    };
    let mut ctx = Ctx {
        socket,
        scale: args.scale,
        qos: crate::QosArg::Realtime,
        broker_pid: pid,
        disk: args
            .data_dir
            .is_some()
            .then(|| args.fsync.map_or(crate::FsyncArg::Interval, |f| f).as_str()),
        transport: if args.tls { "tls" } else { "uds" },
        dir: dir.to_path_buf(),
    };
    let idle_rss = pid.and_then(|p| report::status_kb(p, "VmRSS"));
    let steps = plan(args.workload, args.qos);
    let progress = report::progress(steps.len() as u64, args.json);
    let mut rows = Vec::new();
    for (step, qos) in steps {
        ctx.qos = qos;
        progress.set_message(format!("{} {}", step.label(), ctx.qos_name()));
        let row = step
            .run(&ctx)
            .with_context(|| format!("workload {}", step.label()))?;
        if args.json {
            report::print_json(&row)?;
        }
        rows.extend(row);
        progress.inc(1);
    }
    progress.finish_and_clear();
    // The isolation figure is what a stalled Realtime reader costs the others.
    let realtime: Vec<_> = rows
        .iter()
        .filter(|r| !r.variant.contains(",processed"))
        .cloned()
        .collect();
    let isolation = report::stalled_reader_drop(&realtime);
    let summary = report::Summary {
        broker_ready_ms: ready_ms,
        broker_idle_rss_kb: idle_rss,
        broker_peak_rss_kb: ctx.peak_rss_kb(),
        stalled_reader_drop_pct: isolation.as_ref().map(|i| i.0),
        stalled_reader_drop_pct_by_pair: isolation.map(|i| i.1),
    };
    if args.json {
        report::print_summary_json(&summary)?;
    } else {
        report::print_table(&rows, &summary)?;
    }
    drop(broker);
    Ok(())
}

/// Pairs of W2 runs, without and with a stalled subscriber, behind the slow-reader
/// isolation figure ([`report::stalled_reader_drop`]).
const ISOLATION_PAIRS: u32 = 3;

/// One measured step.
#[derive(Debug, Clone, Copy)]
enum Step {
    Floor,
    W1,
    /// W2 and W2 plus a fifth, stalled subscriber (slow-reader isolation), run in
    /// [`ISOLATION_PAIRS`] alternating pairs so the comparison does not rest on one sample
    /// of each on a machine whose speed drifts between runs.
    W2Isolation,
    /// W2 with more connected clients: as many connections as one executable may hold by
    /// default (`max_connections_per_identity`, 32), less one, with the publisher and the
    /// four subscribers, for the broker's RSS under load.
    W2Crowded,
    W3,
    W4,
    W5(usize, u64, &'static str),
    W6,
    W7,
    W8,
    W9,
}

/// The steps to run, each with the guarantee it runs in (the floor, W3 and W6 once).
fn plan(w: Workload, qos: BenchQos) -> Vec<(Step, crate::QosArg)> {
    let w5 = [
        (64, 1_000_000, "64B"),
        (1024, 1_000_000, "1KiB"),
        (16 * 1024, 65_536, "16KiB"),
        (256 * 1024, 4096, "256KiB"),
    ]
    .map(|(s, n, l)| Step::W5(s, n, l));
    let streaming = |steps: Vec<Step>| -> Vec<(Step, crate::QosArg)> {
        qos.each()
            .into_iter()
            .flat_map(|q| steps.iter().map(move |s| (*s, q)))
            .collect()
    };
    let once = |s: Step| vec![(s, crate::QosArg::Processed)];
    match w {
        Workload::Floor => once(Step::Floor),
        Workload::W1 => streaming(vec![Step::W1]),
        Workload::W2 => streaming(vec![Step::W2Isolation, Step::W2Crowded]),
        Workload::W3 => once(Step::W3),
        Workload::W4 => streaming(vec![Step::W4]),
        Workload::W5 => streaming(w5.to_vec()),
        Workload::W6 => once(Step::W6),
        Workload::W7 => once(Step::W7),
        Workload::W8 => once(Step::W8),
        Workload::W9 => vec![(Step::W9, crate::QosArg::Realtime)],
        Workload::All => [
            once(Step::Floor),
            streaming(
                [
                    vec![Step::W1, Step::W2Isolation, Step::W2Crowded, Step::W4],
                    w5.to_vec(),
                ]
                .concat(),
            ),
            once(Step::W3),
            once(Step::W6),
            once(Step::W7),
            once(Step::W8),
            vec![(Step::W9, crate::QosArg::Realtime)],
        ]
        .concat(),
    }
}

impl Step {
    fn label(&self) -> String {
        match self {
            Self::Floor => "floor".into(),
            Self::W1 => "w1".into(),
            Self::W2Isolation => "w2 and w2 + stalled subscriber".into(),
            Self::W2Crowded => format!("w2 with {CROWDED} connections"),
            Self::W3 => "w3".into(),
            Self::W4 => "w4".into(),
            Self::W5(_, _, l) => format!("w5 {l}"),
            Self::W6 => "w6".into(),
            Self::W7 => "w7".into(),
            Self::W8 => "w8".into(),
            Self::W9 => "w9".into(),
        }
    }

    fn run(&self, ctx: &Ctx) -> Result<Vec<Row>> {
        let s = ctx.scale;
        match *self {
            Self::Floor => floor_rows(ctx),
            Self::W1 => Ok(vec![ctx.fan_out(&FanOut {
                workload: "w1",
                variant: ctx.variant(""),
                subs: 1,
                filter: "bench.process.lifecycle",
                messages: scaled(1_000_000, s),
                size: 256,
                stalled: false,
            })?]),
            Self::W2Isolation => {
                let mut rows = Vec::new();
                for run in 1..=ISOLATION_PAIRS {
                    for stalled in [false, true] {
                        let mut row = ctx.fan_out(&FanOut {
                            workload: "w2",
                            variant: ctx.variant(if stalled { "+1stalled" } else { "" }),
                            subs: 4,
                            filter: "bench.process.+",
                            messages: scaled(250_000, s),
                            size: 256,
                            stalled,
                        })?;
                        row.run = Some(run);
                        rows.push(row);
                    }
                }
                Ok(rows)
            }
            Self::W2Crowded => {
                // Every worker is the same executable of the same uid: one identity.
                let idle_connections = (CROWDED - 5).to_string();
                let args = [
                    "bench-worker",
                    "idle",
                    "--socket",
                    &ctx.socket,
                    "--connections",
                    &idle_connections,
                ];
                let idle = Worker::spawn(&args.map(String::from), "idle clients")?;
                idle.ready()?;
                let row = ctx.fan_out(&FanOut {
                    workload: "w2",
                    variant: ctx.variant(&format!("{CROWDED}conns")),
                    subs: 4,
                    filter: "bench.process.+",
                    messages: scaled(250_000, s),
                    size: 256,
                    stalled: false,
                });
                drop(idle);
                Ok(vec![row?])
            }
            Self::W3 => w3(ctx),
            Self::W4 => Ok(vec![w4(ctx)?]),
            Self::W6 => w6(ctx),
            Self::W7 => collector::w7(&ctx.dir, s),
            Self::W8 => tasks::w8(&ctx.dir, s),
            Self::W9 => scrape::w9(ctx),
            Self::W5(size, n, label) => {
                let row = ctx.fan_out(&FanOut {
                    workload: "w5",
                    variant: ctx.variant(label),
                    subs: 1,
                    filter: "bench.process.lifecycle",
                    messages: scaled(n, s),
                    size,
                    stalled: false,
                })?;
                Ok(vec![row])
            }
        }
    }
}

/// W3 through RPC: sequential round trips (latency), then 64 calls in flight (calls/s).
fn w3(ctx: &Ctx) -> Result<Vec<Row>> {
    let responder = Worker::spawn(
        &[
            "bench-worker".into(),
            "responder".into(),
            "--socket".into(),
            ctx.socket.clone(),
        ],
        "responder",
    )?;
    responder.ready()?;
    let mut rows = Vec::new();
    let t = ctx.transport;
    for (inflight, count, variant) in [
        (1, scaled(20_000, ctx.scale), format!("{t},proc,rpc")),
        (
            64,
            scaled(200_000, ctx.scale),
            format!("{t},proc,rpc,64inflight"),
        ),
    ] {
        let args = [
            "bench-worker",
            "requester",
            "--socket",
            &ctx.socket,
            "--count",
            &count.to_string(),
            "--warmup",
            "1000",
            "--size",
            "256",
            "--inflight",
            &inflight.to_string(),
        ];
        let mut requester = Worker::spawn(&args.map(String::from), "requester")?;
        requester.ready()?;
        requester.go()?;
        let r = requester.result()?;
        rows.push(Row::latency(
            "daemoneye-eventbus",
            "w3",
            &variant,
            count,
            &r,
            ctx.peak_rss_kb(),
        ));
    }
    drop(responder);
    Ok(rows)
}

/// W6: a durable subscription's backlog, made while nobody is attached: published (timed
/// from the first publish to the last acknowledgement), then redelivered to the subscriber
/// that attaches (timed from its first message to its last).
fn w6(ctx: &Ctx) -> Result<Vec<Row>> {
    let n = scaled(100_000, ctx.scale);
    let name = format!("bench-w6-{}", std::process::id());
    let durable = |expect: u64, label: &str| {
        let args = [
            "bench-worker",
            "sub",
            "--socket",
            &ctx.socket,
            "--filters",
            "bench.process.lifecycle",
            "--expect",
            &expect.to_string(),
            "--name",
            label,
            "--qos",
            "processed",
            "--durable",
            &name,
        ];
        Worker::spawn(&args.map(String::from), label)
    };
    // Made, then left: the backlog builds while nobody is attached.
    let maker = durable(0, "w6-maker")?;
    maker.ready()?;
    maker.result()?;
    let mut publisher = ctx.publisher("w6", n, 256)?;
    publisher.ready()?;
    publisher.go()?;
    let p = publisher.result()?;
    if num(&p, "lost") > 0 {
        bail!("the backlog was not acknowledged whole: {p}");
    }
    let published = num(&p, "end_ns").saturating_sub(num(&p, "start_ns")) as f64 / 1e9;
    let publish = Row::durable(
        ctx.transport,
        "durable-publish",
        ctx.disk,
        n,
        n,
        published,
        ctx.peak_rss_kb(),
    );
    let sub = durable(n, "w6-sub")?;
    sub.ready()?;
    let r = sub.result()?;
    let secs = num(&r, "last_ns").saturating_sub(num(&r, "first_ns")) as f64 / 1e9;
    let backlog = Row::durable(
        ctx.transport,
        "durable-backlog",
        ctx.disk,
        n,
        num(&r, "received"),
        secs,
        ctx.peak_rss_kb(),
    );
    Ok(vec![publish, backlog])
}

fn w4(ctx: &Ctx) -> Result<Row> {
    let plan = w4_plan();
    let n = scaled(200_000, ctx.scale);
    let subs = (0..10)
        .map(|s| {
            let filters: Vec<&str> = plan
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 10 == s)
                .map(|(_, (_, f))| f.as_str())
                .collect();
            let expect = (0..n).filter(|i| (i % 1000) % 10 == s as u64).count() as u64;
            ctx.sub(
                &filters.join(","),
                expect,
                &format!("sub{s}"),
                ctx.qos_name(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    subs.iter().try_for_each(Worker::ready)?;
    let mut publisher = ctx.publisher("w4", n, 256)?;
    publisher.ready()?;
    publisher.go()?;
    let p = publisher.result()?;
    let results = subs
        .iter()
        .map(Worker::result)
        .collect::<Result<Vec<_>>>()?;
    Ok(Row::throughput(
        "w4",
        &ctx.variant("1000subs"),
        256,
        n,
        &p,
        &results,
        ctx.peak_rss_kb(),
    ))
}

fn floor_rows(ctx: &Ctx) -> Result<Vec<Row>> {
    let path = std::env::temp_dir()
        .join(format!("eventbus-floor-{}.sock", std::process::id()))
        .display()
        .to_string();
    let server = Worker::spawn(
        &[
            "bench-worker".into(),
            "floor-server".into(),
            "--path".into(),
            path.clone(),
        ],
        "floor server",
    )?;
    server.ready()?;
    let count = scaled(1_000_000, ctx.scale);
    let pingpong = scaled(20_000, ctx.scale);
    let args = [
        "bench-worker",
        "floor-client",
        "--path",
        &path,
        "--count",
        &count.to_string(),
        "--pingpong",
        &pingpong.to_string(),
        "--size",
        "256",
    ];
    let client = Worker::spawn(&args.map(String::from), "floor client")?;
    let c = client.result()?;
    let s = server.result()?;
    let secs = (num(&s, "last_ns").saturating_sub(num(&c, "start_ns"))) as f64 / 1e9;
    let received = num(&s, "received");
    let stream = Row::floor_stream(count, received, secs);
    let latency = Row::latency("floor", "w3", "uds,proc,pingpong", pingpong, &c, None);
    Ok(vec![stream, latency])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_crowded_workload_fits_one_identity_by_default() {
        let limit =
            daemoneye_eventbus::broker::BrokerConfig::default().max_connections_per_identity;
        assert!(
            super::CROWDED < limit,
            "{} connections, limit {limit}",
            super::CROWDED
        );
    }
}
