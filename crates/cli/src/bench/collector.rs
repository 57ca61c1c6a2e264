//! W7: the bundled collectors under the agent, as deployed (`eventbus agent` with no
//! configuration: procmond, with process events from the kernel when it may listen to them,
//! and netmond). Measures each one's CPU on an idle host; procmond's while processes start
//! at 20 per second (each event handed over alone) and at 200 per second (several ride
//! together), with the time from a process's exec to its event reaching a subscriber;
//! netmond's while 200 TCP connections per second open (each held a second),
//! with how many of them it reported.

use super::process::{READY_WAIT, Worker};
use super::report::Row;
use super::{mono_ns, scaled};
use anyhow::{Context, Result, bail};
use daemoneye_eventbus::client::{Client, ClientOptions};
use daemoneye_eventbus::{CollectionEvent, Endpoint};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Process starts per second under load.
const STARTS_PER_SEC: u64 = 200;

/// Process starts per second on a quiet host.
const QUIET_STARTS_PER_SEC: u64 = 20;

/// Starts `/bin/true` `n` times, `per_sec` a second: each one's pid, and when it ran its
/// exec (CLOCK_MONOTONIC ns).
fn start_processes(n: u64, per_sec: u64) -> Result<Vec<(u32, u64)>> {
    let start = Instant::now();
    let mut spawned = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for i in 0..n {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / per_sec);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // `spawn` returns once the child ran exec: the time it returns is the exec's.
        let mut child = std::process::Command::new("/bin/true")
            .spawn()
            .context("starting /bin/true")?;
        spawned.push((child.id(), mono_ns()));
        child.wait()?;
    }
    Ok(spawned)
}

/// procmond's row for processes started `per_sec` a second: its CPU, the processes the
/// subscriber did not see running `true` (`lost`), and the exec-to-subscriber latency.
fn starts_row(
    source: &str,
    per_sec: u64,
    cpu: f64,
    spawned: &[(u32, u64)],
    seen: &HashMap<u32, u64>,
) -> Row {
    let mut lat: Vec<u64> = spawned
        .iter()
        .filter_map(|(pid, at)| Some(seen.get(pid)?.saturating_sub(*at) / 1000))
        .collect();
    lat.sort_unstable();
    let pct = |q: f64| {
        lat.get(((lat.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
    };
    let n = spawned.len() as u64;
    let mut row = Row::collector(
        "procmond",
        "w7",
        &format!("{source},{per_sec}starts/s"),
        n,
        n as f64 / per_sec as f64,
    );
    row.collector_cpu_pct = Some(cpu);
    row.lost = n - lat.len() as u64;
    row.p50_us = pct(0.5);
    row.p99_us = pct(0.99);
    row.p999_us = pct(0.999);
    row.max_us = lat.last().copied();
    row
}

/// The CPU time `pid` used so far, in clock ticks (user and system).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split(' ').collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

/// The child of `parent` named `name` (a collector under the agent), found through /proc.
fn child_of(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (head, rest) = stat.rsplit_once(") ")?;
        let ppid: u32 = rest.split(' ').nth(1)?.parse().ok()?;
        (ppid == parent && head.split_once(" (")?.1 == name).then_some(pid)
    })
}

/// `eventbus agent --config CONFIG`, once it says it is ready.
pub(super) fn start_agent(config: &Path) -> Result<Worker> {
    let agent = Worker::spawn(
        &[
            "agent".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        "agent",
    )?;
    let deadline = Instant::now() + READY_WAIT;
    loop {
        let line = agent.line(READY_WAIT)?;
        if line.starts_with("agent ready") {
            return Ok(agent);
        }
        if Instant::now() > deadline {
            bail!("the agent did not get ready: {line}");
        }
    }
}

/// New TCP connections per second under load.
const CONNECTIONS_PER_SEC: u64 = 200;

/// Subscribes to `topic` on the agent at `socket` (default options) and hands each message
/// with the time it arrived (CLOCK_MONOTONIC ns) to `each`, until `stop` is set.
fn watch(
    socket: &Path,
    name: &str,
    topic: &str,
    stop: &std::sync::atomic::AtomicBool,
    mut each: impl FnMut(&daemoneye_eventbus::Message, u64),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = Client::connect(
            &Endpoint::Unix(socket.to_path_buf()),
            ClientOptions::named(name),
        )
        .await?;
        let mut sub = client.subscribe([topic]).await?;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {
                each(&m, mono_ns());
            }
        }
        client.close().await;
        anyhow::Ok(())
    })
}

/// Counts the `events.network.connections` openings towards `port` on the agent at
/// `socket`, until `stop` is set.
fn connection_counter(
    socket: &Path,
    port: u16,
    seen: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    use daemoneye_eventbus::schema::events as epb;
    use prost::Message as _;
    watch(
        socket,
        "bench-w7-net",
        "events.network.connections",
        &stop,
        |m, _| {
            if let Ok(e) = epb::NetworkEvent::decode(m.payload().as_ref())
                && e.change == epb::SocketChange::Opened as i32
                && e.remote_port == u32::from(port)
            {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        },
    )
}

/// Both ends of the connections opened in the last second.
type Held = std::collections::VecDeque<(Instant, std::net::TcpStream, std::net::TcpStream)>;

/// Opens `n` loopback TCP connections at [`CONNECTIONS_PER_SEC`] to `listener`, holding each
/// (both ends) for a second; returns those opened in the last second, still open (closed
/// by the caller once netmond had time to see them).
fn open_connections(listener: &std::net::TcpListener, n: u64) -> Result<Held> {
    let addr = listener.local_addr()?;
    let start = Instant::now();
    let mut held = Held::new();
    for i in 0..n {
        let due = start + Duration::from_nanos(i * 1_000_000_000 / CONNECTIONS_PER_SEC);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let client = std::net::TcpStream::connect(addr).context("connecting")?;
        let (server, _) = listener.accept().context("accepting")?;
        held.push_back((Instant::now(), client, server));
        while held
            .front()
            .is_some_and(|(t, ..)| t.elapsed() >= Duration::from_secs(1))
        {
            held.pop_front();
        }
    }
    Ok(held)
}

/// procmond's CPU over `during` as a percentage of one core, with what `during` does.
fn cpu_pct<T>(pid: u32, during: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let out = during()?;
    let (secs, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid));
    let (Some(c0), Some(c1)) = (c0, c1) else {
        bail!("procmond (pid {pid}) ended during the measurement");
    };
    Ok(((c1 - c0) as f64 / ticks_per_sec() / secs * 100.0, out))
}

/// When each process's event showing its new program reached the subscriber
/// (CLOCK_MONOTONIC ns), by pid; and the source procmond named in them (`kernel`, `proc`).
type Seen = Arc<Mutex<(HashMap<u32, u64>, Option<String>)>>;

/// Subscribes to process events on the agent at `socket` and notes, per pid, when the first
/// event showing `/bin/true` running arrived (its exec, or its start if procmond first saw it
/// then); until `stop` is set.
fn subscriber(socket: &Path, seen: Seen, stop: Arc<std::sync::atomic::AtomicBool>) -> Result<()> {
    watch(
        socket,
        "bench-w7",
        "events.process.lifecycle",
        &stop,
        |m, at| {
            let Ok(CollectionEvent::Process(p)) = CollectionEvent::decode(m.payload()) else {
                return;
            };
            // Its new program, by executable or (an exiting process's link is gone) by name.
            let runs_true = p.name == "true"
                || p.executable_path
                    .as_deref()
                    .is_some_and(|e| e.ends_with("/true"));
            if runs_true {
                let mut s = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                s.0.entry(p.pid).or_insert(at);
                if s.1.is_none() {
                    s.1 = p.metadata.get("source").cloned();
                }
            }
        },
    )
}

pub(super) fn w7(dir: &Path, scale: f64) -> Result<Vec<Row>> {
    let socket = dir.join("w7.sock");
    let config = dir.join("w7.yaml");
    std::fs::write(
        &config,
        format!("broker:\n  socket_path: {}\n", socket.display()),
    )?;
    let agent = start_agent(&config)?;
    let collector = |name: &str| {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(pid) = child_of(agent.child.id(), name) {
                break Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("the agent started no {name}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let procmond = collector("procmond")?;
    let netmond = collector("netmond")?;
    let seen: Seen = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sub = {
        let (socket, seen, stop) = (socket.clone(), Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || subscriber(&socket, seen, stop))
    };
    // Settled: procmond's first snapshot and the subscriber are done.
    std::thread::sleep(Duration::from_secs(1));
    let idle_secs = Duration::from_secs_f64((10.0 * scale).max(1.0));
    let (net_idle_cpu, (idle_cpu, ())) = cpu_pct(netmond, || {
        cpu_pct(procmond, || {
            std::thread::sleep(idle_secs);
            Ok(())
        })
    })?;
    let quiet_n = scaled(QUIET_STARTS_PER_SEC * 5, scale);
    let (quiet_cpu, quiet) = cpu_pct(procmond, || start_processes(quiet_n, QUIET_STARTS_PER_SEC))?;
    let n = scaled(STARTS_PER_SEC * 10, scale);
    let (load_cpu, loaded) = cpu_pct(procmond, || start_processes(n, STARTS_PER_SEC))?;
    let spawned: Vec<(u32, u64)> = quiet.iter().chain(&loaded).copied().collect();
    // Events still in flight arrive within a few seconds.
    let until = Instant::now() + Duration::from_secs(5);
    let count = |seen: &Seen| {
        let s = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        spawned.iter().filter(|(p, _)| s.0.contains_key(p)).count()
    };
    while count(&seen) < spawned.len() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    // netmond under 200 new connections per second.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let opened = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = {
        let (socket, opened, stop) = (socket.clone(), Arc::clone(&opened), Arc::clone(&stop));
        std::thread::spawn(move || connection_counter(&socket, port, opened, stop))
    };
    std::thread::sleep(Duration::from_millis(200));
    let conns = scaled(CONNECTIONS_PER_SEC * 10, scale);
    let (net_load_cpu, held) = cpu_pct(netmond, || open_connections(&listener, conns))?;
    let until = Instant::now() + Duration::from_secs(3);
    while opened.load(std::sync::atomic::Ordering::Relaxed) < conns && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(held);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sub.join()
        .map_err(|_| anyhow::anyhow!("the subscriber panicked"))??;
    counter
        .join()
        .map_err(|_| anyhow::anyhow!("the connection counter panicked"))??;
    drop(agent);
    let seen = seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = seen.1.as_deref().unwrap_or("unknown");
    let mut idle = Row::collector(
        "procmond",
        "w7",
        &format!("{source},idle"),
        0,
        idle_secs.as_secs_f64(),
    );
    idle.collector_cpu_pct = Some(idle_cpu);
    let quiet = starts_row(source, QUIET_STARTS_PER_SEC, quiet_cpu, &quiet, &seen.0);
    let load = starts_row(source, STARTS_PER_SEC, load_cpu, &loaded, &seen.0);
    let mut net_idle = Row::collector("netmond", "w7", "idle", 0, idle_secs.as_secs_f64());
    net_idle.collector_cpu_pct = Some(net_idle_cpu);
    let mut net_load = Row::collector(
        "netmond",
        "w7",
        &format!("{CONNECTIONS_PER_SEC}conns/s"),
        conns,
        conns as f64 / CONNECTIONS_PER_SEC as f64,
    );
    net_load.collector_cpu_pct = Some(net_load_cpu);
    net_load.lost = conns.saturating_sub(opened.load(std::sync::atomic::Ordering::Relaxed));
    Ok(vec![idle, quiet, load, net_idle, net_load])
}
