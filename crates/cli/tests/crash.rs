//! Crash suite: SIGKILL the subscriber, the publisher and the broker at random points, with
//! real processes, and check that at-least-once holds: every message a living broker
//! acknowledged to its publisher reaches the durable subscriber (duplicates allowed, counted),
//! and a publisher that outlives a broker restart loses nothing it was not told was refused.
//! Without a data directory, what dies with the broker process is its in-memory queues: that
//! test checks what the clients keep. With one, a durable subscription's backlog survives the
//! broker's SIGKILL too (`a_durable_backlog_on_disk_survives_broker_kills`), and a log whose
//! tail is damaged while the broker is down is cut back to exactly its whole records
//! (`a_damaged_log_tail_is_cut_back_to_its_whole_records`).
//!
//! Each test runs `EVENTBUS_CRASH_ITERATIONS` kills (20 by default, the CI setting; set it
//! higher for a long run). Every wait is bounded.

#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, WAIT, wait_line};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::client::{Client, ClientOptions, Publish, RecvError};
use daemoneye_eventbus::core::{Qos, Topic};
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROLE_SOCKET: &str = "EVENTBUS_CRASH_SOCKET";
const ROLE_FROM: &str = "EVENTBUS_CRASH_FROM";
const ROLE_SPOOL: &str = "EVENTBUS_CRASH_SPOOL";
const ROLE_COUNT: &str = "EVENTBUS_CRASH_COUNT";

fn iterations() -> usize {
    std::env::var("EVENTBUS_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// A random number in `lo..hi`.
fn random(lo: u64, hi: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    lo + h.finish() % (hi - lo).max(1)
}

fn publish_seq(seq: u64) -> Publish {
    Publish::new(Topic::new("crash.events").unwrap(), seq.to_string()).qos(Qos::Processed)
}

fn client_options(name: &str) -> ClientOptions {
    let mut o = ClientOptions::named(name);
    o.keepalive = Duration::from_millis(500);
    o.reconnect.initial_delay = Duration::from_millis(5);
    o.reconnect.max_delay = Duration::from_millis(100);
    o
}

/// Receives a durable subscription in this process until `done` says so, collecting how
/// often each sequence arrived.
async fn collect(
    sub: &mut daemoneye_eventbus::client::Subscription,
    seen: &mut BTreeMap<u64, u32>,
    done: impl Fn(&BTreeMap<u64, u32>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(seen) {
        match tokio::time::timeout_at(deadline, sub.recv()).await {
            Ok(Ok(m)) => {
                let seq: u64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
                *seen.entry(seq).or_default() += 1;
            }
            Ok(Err(RecvError::Reconnected { .. } | RecvError::Missed { .. })) => {}
            Ok(Err(e)) => panic!("subscription ended: {e}"),
            Err(_) => panic!(
                "messages missing after {WAIT:?}: have {} distinct",
                seen.len()
            ),
        }
    }
}

/// Reads `n` printed messages of `eventbus sub` (`topic payload` lines), at most for
/// [`WAIT`], counting each sequence.
fn take(p: &Proc, n: u64, seen: &mut BTreeMap<u64, u32>) {
    let rx = p.stdout.as_ref().unwrap();
    let mut got = 0;
    while got < n {
        let Ok(line) = rx.recv_timeout(WAIT) else {
            break;
        };
        let seq: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *seen.entry(seq).or_default() += 1;
        got += 1;
    }
}

/// The subscriber is `eventbus sub --durable`, killed after a random number of the messages
/// published in its round and started again, `iterations()` times.
#[test]
fn killed_durable_subscribers_lose_nothing_acknowledged() {
    let dir = TempDir::new("crash-sub");
    let broker = Broker::start(dir.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(broker.socket.clone());
    // The durable subscription exists before the first publish.
    let mut current = broker.sub(&["--durable", "crash", "crash.#"]);
    let per_round = 200u64;
    let total = per_round * iterations() as u64;
    let publisher = rt
        .block_on(Client::connect(&ep, client_options("crash-pub")))
        .unwrap();
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for round in 0..iterations() as u64 {
        rt.block_on(async {
            for seq in round * per_round..(round + 1) * per_round {
                publisher.publish_with(publish_seq(seq)).await.unwrap();
            }
        });
        take(&current, random(1, per_round), &mut seen);
        current.signal(Signal::SIGKILL);
        current.wait();
        // What it printed before it died is still in the pipe.
        while let Ok(line) = current.stdout.as_ref().unwrap().try_recv() {
            let seq: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            *seen.entry(seq).or_default() += 1;
        }
        current = broker.sub(&["--durable", "crash", "crash.#"]);
    }
    let report = rt.block_on(publisher.wait_acked(WAIT));
    assert_eq!(
        (report.acked, report.refused, report.outstanding),
        (total, 0, 0),
        "every publish acknowledged"
    );
    // The last subscriber receives the rest: nothing acknowledged is missing.
    let deadline = Instant::now() + WAIT;
    while (seen.len() as u64) < total && Instant::now() < deadline {
        let left = total - seen.len() as u64;
        take(&current, left, &mut seen);
    }
    let missing: Vec<u64> = (0..total).filter(|s| !seen.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages never reached the durable subscriber: {:?}…; the broker's \
         view of it: {}",
        missing.len(),
        &missing[..missing.len().min(10)],
        broker.stats()["subscriptions"]
    );
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "{} subscriber kills: {total} messages, all received, {duplicates} received twice \
         (printed but not yet acknowledged when killed)",
        iterations()
    );
    rt.block_on(publisher.close());
}

/// The publisher side of [`killed_publishers_lose_nothing_acknowledged`]: runs only when
/// re-executed by it. Publishes Processed messages from `ROLE_FROM` on, and prints `acked N`
/// whenever everything up to N is acknowledged, until killed.
#[tokio::test]
async fn publisher_role() {
    let (Ok(socket), Ok(from)) = (std::env::var(ROLE_SOCKET), std::env::var(ROLE_FROM)) else {
        return;
    };
    let from: u64 = from.parse().unwrap();
    let ep = Endpoint::parse(&socket).unwrap();
    let client = Client::connect(&ep, client_options("crash-pub"))
        .await
        .unwrap();
    let mut seq = from;
    loop {
        for _ in 0..50 {
            client.publish_with(publish_seq(seq)).await.unwrap();
            seq += 1;
        }
        if client.wait_acked(WAIT).await.outstanding == 0 {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "acked {}", seq - 1).unwrap();
            out.flush().unwrap();
        }
    }
}

/// The publisher is a process killed after a random number of acknowledged batches,
/// `iterations()` times; the durable subscriber lives in this process.
#[test]
fn killed_publishers_lose_nothing_acknowledged() {
    let dir = TempDir::new("crash-pub");
    let broker = Broker::start(dir.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(broker.socket.clone());
    let subscriber = rt
        .block_on(Client::connect(&ep, client_options("crash-sub")))
        .unwrap();
    let mut sub = rt
        .block_on(subscriber.subscribe_durable("pubcrash", ["crash.#"]))
        .unwrap();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    for round in 0..iterations() as u64 {
        let from = round * 1_000_000;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "publisher_role",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_SOCKET, format!("unix://{}", broker.socket.display()))
            .env(ROLE_FROM, from.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = common::lines_of(child.stdout.take().unwrap());
        let batches = random(1, 6);
        let mut last = None;
        for _ in 0..batches {
            let line = wait_line(&lines, "an acknowledged batch", |l| l.contains("acked "));
            let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            last = Some(n);
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
        acked.extend(from..=last.unwrap());
    }
    let mut seen = BTreeMap::new();
    // Done once the acknowledged ones below the highest received are all in (checked only
    // when a new highest arrives: the subscription delivers in order per publisher).
    let top = *acked.last().unwrap();
    rt.block_on(collect(&mut sub, &mut seen, |seen| {
        seen.contains_key(&top) && acked.iter().all(|s| seen.contains_key(s))
    }));
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "{} publisher kills: {} acknowledged messages, all received ({} received in all, \
         {duplicates} twice)",
        iterations(),
        acked.len(),
        seen.len()
    );
    drop(sub);
    rt.block_on(subscriber.close());
}

/// The broker is killed with SIGKILL at a random point and started again on the same socket,
/// `iterations()` times, while a publisher and a durable subscriber in this process keep
/// going. The publisher sends again what it was not acknowledged, so in the end every
/// publish is acknowledged by a broker; and everything published once the subscriber is
/// attached to the last broker reaches it.
#[test]
fn a_publisher_outlives_broker_restarts_and_loses_nothing() {
    let dir = TempDir::new("crash-broker");
    let socket = dir.path().join("eb.sock");
    let mut broker = Broker::start_at(&socket, dir.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(socket.clone());
    let subscriber = rt
        .block_on(Client::connect(&ep, client_options("crash-sub")))
        .unwrap();
    let mut sub = rt
        .block_on(subscriber.subscribe_durable("brokercrash", ["crash.#"]))
        .unwrap();
    let publisher = rt
        .block_on(Client::connect(&ep, client_options("crash-pub")))
        .unwrap();
    let mut seq = 0u64;
    let mut seen = BTreeMap::new();
    for _ in 0..iterations() {
        // Once the subscriber is attached to this broker: publish a random number of
        // messages, receive some of them, then kill.
        attached(&rt, &subscriber);
        let n = random(10, 300);
        rt.block_on(async {
            for _ in 0..n {
                publisher.publish_with(publish_seq(seq)).await.unwrap();
                seq += 1;
            }
        });
        let want = random(0, n);
        let floor = seen.len() as u64;
        rt.block_on(collect(&mut sub, &mut seen, |s| {
            s.len() as u64 >= floor + want
        }));
        broker.proc.signal(Signal::SIGKILL);
        // Not reaped first: the next broker takes the socket over at once.
        let next = Broker::start_at(&socket, dir.path(), None);
        drop(std::mem::replace(&mut broker, next));
    }
    // Everything published was acknowledged by some broker (sent again after restarts).
    let report = rt.block_on(publisher.wait_acked(WAIT));
    assert_eq!(
        (report.acked, report.refused, report.outstanding),
        (seq, 0, 0),
        "{:?}",
        publisher.stats()
    );
    let stats = publisher.stats();
    assert!(stats.reconnects >= 1);
    attached(&rt, &subscriber);
    let last: Vec<u64> = (seq..seq + 500).collect();
    rt.block_on(async {
        for s in &last {
            publisher.publish_with(publish_seq(*s)).await.unwrap();
        }
    });
    rt.block_on(collect(&mut sub, &mut seen, |seen| {
        last.iter().all(|s| seen.contains_key(s))
    }));
    println!(
        "{} broker kills: {} publishes all acknowledged, {} sent again after restarts, {} \
         received by the subscriber",
        iterations(),
        seq + 500,
        stats.resent,
        seen.len()
    );
    drop(sub);
    rt.block_on(subscriber.close());
    rt.block_on(publisher.close());
    // The statistics list the durable subscription on the last broker, waiting.
    let listed = broker.run(&["stats"]);
    assert!(
        listed
            .stdout
            .iter()
            .any(|l| l.starts_with("brokercrash") && l.contains("waiting")),
        "{listed:?}"
    );
}

/// With a data directory, a durable subscription's backlog survives SIGKILL of the broker.
/// Nobody is attached; the broker is killed `iterations()` times, at random points of a
/// publisher's stream (after everything was acknowledged, or in the middle); each time the next
/// broker starts on the same data directory. The subscriber that attaches at the end gets
/// every message the killed brokers acknowledged, first occurrences in publish order
/// (duplicates are the publishes the client sent again, whose first copy a killed broker had
/// kept without acknowledging it). Against a killed process every fsync setting keeps
/// everything acknowledged: each runs.
#[test]
fn a_durable_backlog_on_disk_survives_broker_kills() {
    for fsync in ["interval", "always", "never"] {
        durable_backlog_survives_broker_kills(fsync);
    }
}

fn durable_backlog_survives_broker_kills(fsync: &str) {
    let scene = DiskScene::new("crash-disk", &format!("fsync = \"{fsync}\"\n"));
    let (rt, ep) = (&scene.rt, &scene.ep);
    let start = || scene.start();
    let mut broker = start();
    make_durable(rt, ep, "ondisk");
    let publisher = rt
        .block_on(Client::connect(ep, client_options("crash-pub")))
        .unwrap();
    let mut seq = 0u64;
    let mut restored = Vec::new();
    for i in 0..iterations() {
        let n = random(10, 300);
        rt.block_on(async {
            for _ in 0..n {
                publisher.publish_with(publish_seq(seq)).await.unwrap();
                seq += 1;
            }
            if i % 2 == 0 {
                assert_eq!(publisher.wait_acked(WAIT).await.outstanding, 0);
            }
        });
        broker.proc.signal(Signal::SIGKILL);
        broker.proc.wait();
        broker = start();
        attached(rt, &publisher);
        let kept = broker.stats()["subscriptions"][0]["pending"]
            .as_u64()
            .unwrap();
        restored.push(kept);
    }
    let report = rt.block_on(publisher.wait_acked(WAIT));
    assert_eq!(
        (report.acked, report.refused, report.outstanding),
        (seq, 0, 0)
    );
    let subscriber = rt
        .block_on(Client::connect(ep, client_options("crash-sub")))
        .unwrap();
    let mut sub = rt
        .block_on(subscriber.subscribe_durable("ondisk", ["crash.#"]))
        .unwrap();
    let mut seen = BTreeMap::new();
    let mut first_order = Vec::new();
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while (seen.len() as u64) < seq {
            let m = match tokio::time::timeout_at(deadline, sub.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("{} of {seq} arrived", seen.len()),
            };
            let s: u64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
            let count = seen.entry(s).or_insert(0u32);
            if *count == 0 {
                first_order.push(s);
            }
            *count += 1;
        }
    });
    assert!(
        first_order.windows(2).all(|w| w[0] < w[1]),
        "in publish order"
    );
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    println!(
        "{} broker kills with a data directory, fsync {fsync}: {seq} publishes acknowledged, \
         all received ({duplicates} twice); the restarted brokers read back {restored:?} waiting",
        iterations()
    );
    assert!(restored.iter().all(|k| *k > 0), "{restored:?}");
    drop(sub);
    rt.block_on(subscriber.close());
    rt.block_on(publisher.close());
}

/// The publisher side of [`a_spooling_publisher_killed_while_its_broker_is_away_loses_nothing`]:
/// runs only when re-executed by it. With a spool: when `ROLE_COUNT` is 0 it only connects
/// (sending what an earlier process left in the spool) and prints `acked` once all of it is
/// acknowledged; otherwise it waits for its broker to go, then publishes `ROLE_COUNT`
/// Processed messages from `ROLE_FROM` on, printing `spooled N` as each returns.
#[tokio::test]
async fn spool_publisher_role() {
    let (Ok(socket), Ok(from), Ok(count), Ok(spool)) = (
        std::env::var(ROLE_SOCKET),
        std::env::var(ROLE_FROM),
        std::env::var(ROLE_COUNT),
        std::env::var(ROLE_SPOOL),
    ) else {
        return;
    };
    let say = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    };
    let (from, count): (u64, u64) = (from.parse().unwrap(), count.parse().unwrap());
    let mut options = client_options("crash-spool");
    options.spool_dir = Some(spool.into());
    let ep = Endpoint::parse(&socket).unwrap();
    let client = Client::connect(&ep, options).await.unwrap();
    say("connected".into());
    if count == 0 {
        let report = client.wait_acked(WAIT).await;
        say(format!("acked, {} outstanding", report.outstanding));
    } else {
        let mut state = client.state_watch();
        state
            .wait_for(|s| !matches!(s, daemoneye_eventbus::client::ConnState::Connected { .. }))
            .await
            .unwrap();
        for seq in from..from + count {
            client.publish_with(publish_seq(seq)).await.unwrap();
            say(format!("spooled {seq}"));
        }
    }
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A publisher with a spool (`ClientOptions::spool_dir`) is a process: its broker is killed,
/// it publishes while the broker is away, and it is killed with SIGKILL at a random point,
/// `iterations()` times. Each time a new process on the same spool connects to the restarted
/// broker and sends what the killed one left: every publish that had returned reaches the
/// durable subscriber.
#[test]
fn a_spooling_publisher_killed_while_its_broker_is_away_loses_nothing() {
    let scene = DiskScene::new("crash-spool", "");
    let (rt, ep, socket) = (&scene.rt, &scene.ep, &scene.socket);
    let spool = scene.dir.path().join("spool");
    let start = || scene.start();
    let mut broker = start();
    make_durable(rt, ep, "spooled");
    let role = |from: u64, count: u64| {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "spool_publisher_role",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_SOCKET, format!("unix://{}", socket.display()))
            .env(ROLE_FROM, from.to_string())
            .env(ROLE_COUNT, count.to_string())
            .env(ROLE_SPOOL, &spool)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = common::lines_of(child.stdout.take().unwrap());
        // libtest's own "test … " may come first on the line.
        wait_line(&lines, "the publisher connected", |l| {
            l.ends_with("connected")
        });
        (child, lines)
    };
    let kill = |child: &mut std::process::Child| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            Signal::SIGKILL,
        )
        .unwrap();
        child.wait().unwrap();
    };
    let mut spooled: BTreeSet<u64> = BTreeSet::new();
    for round in 0..iterations() as u64 {
        let (from, count) = (round * 1_000, random(1, 200));
        let (mut child, lines) = role(from, count);
        broker.proc.signal(Signal::SIGKILL);
        broker.proc.wait();
        // Killed once a random number of its publishes returned.
        let wanted = random(1, count + 1);
        for _ in 0..wanted {
            let line = wait_line(&lines, "a spooled publish", |l| l.contains("spooled "));
            spooled.insert(line.rsplit(' ').next().unwrap().parse().unwrap());
        }
        kill(&mut child);
        // What it printed meanwhile returned too.
        while let Ok(line) = lines.try_recv() {
            if line.contains("spooled ") {
                spooled.insert(line.rsplit(' ').next().unwrap().parse().unwrap());
            }
        }
        broker = start();
        let (mut next, lines) = role(0, 0);
        let done = wait_line(&lines, "the spool sent", |l| l.contains("acked, "));
        assert!(done.ends_with("acked, 0 outstanding"), "{done}");
        kill(&mut next);
    }
    let subscriber = rt
        .block_on(Client::connect(ep, client_options("crash-sub")))
        .unwrap();
    let mut sub = rt
        .block_on(subscriber.subscribe_durable("spooled", ["crash.#"]))
        .unwrap();
    let mut seen = BTreeMap::new();
    rt.block_on(collect(&mut sub, &mut seen, |seen| {
        spooled.iter().all(|s| seen.contains_key(s))
    }));
    println!(
        "{} spooling publishers killed while their broker was away: {} publishes returned, all \
         received ({} in all)",
        iterations(),
        spooled.len(),
        seen.len()
    );
    drop(sub);
    rt.block_on(subscriber.close());
}

/// A broker with a data directory in a directory of its own, started again on the same
/// socket and directory after each kill, with a runtime for the test's clients.
struct DiskScene {
    dir: TempDir,
    socket: std::path::PathBuf,
    config: String,
    rt: tokio::runtime::Runtime,
    ep: Endpoint,
}

impl DiskScene {
    /// `extra`: more `[broker]` lines after `data_dir`.
    fn new(name: &str, extra: &str) -> Self {
        let dir = TempDir::new(name);
        let socket = dir.path().join("eb.sock");
        let config = format!(
            "[broker]\ndata_dir = \"{}\"\n{extra}",
            dir.path().join("data").display()
        );
        let ep = Endpoint::Unix(socket.clone());
        Self {
            dir,
            socket,
            config,
            rt: tokio::runtime::Runtime::new().unwrap(),
            ep,
        }
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn start(&self) -> Broker {
        Broker::start_at(&self.socket, self.dir.path(), Some(&self.config))
    }

    /// Publishes `publishes` Processed from a client of its own and waits until all are
    /// acknowledged.
    fn publish_acked(&self, name: &str, publishes: impl IntoIterator<Item = Publish>) {
        self.rt.block_on(async {
            let c = Client::connect(&self.ep, client_options(name))
                .await
                .unwrap();
            for p in publishes {
                c.publish_with(p).await.unwrap();
            }
            assert_eq!(c.wait_acked(WAIT).await.outstanding, 0);
            c.close().await;
        });
    }
}

/// Makes durable subscription `name` on `crash.#` and leaves it detached, before the first
/// publish.
fn make_durable(rt: &tokio::runtime::Runtime, ep: &Endpoint, name: &str) {
    rt.block_on(async {
        let c = Client::connect(ep, client_options("maker")).await.unwrap();
        drop(c.subscribe_durable(name, ["crash.#"]).await.unwrap());
        c.close().await;
    });
}

/// Waits until `client` is connected and everything it sent before is read by the broker
/// (its subscriptions are restored before anything else it sends after a reconnect).
fn attached(rt: &tokio::runtime::Runtime, client: &Client) {
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while client.ping().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        }
    });
}

/// Where each record of a log segment starts, and the file's length (`docs/storage.md`: a
/// 16-byte header, then records of `u32` length + that many bytes).
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 16;
    while at + 4 <= bytes.len() {
        starts.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    assert_eq!(at, bytes.len(), "a whole log before the damage");
    starts
}

/// The tail of a durable subscription's last segment cut short, or overwritten, at a random
/// offset among its last records while the broker is down (killed): the restarted broker
/// truncates the segment at the damaged record, counts exactly the bytes cut
/// (`store_torn_bytes`), keeps exactly the messages of the whole records before it and
/// delivers them in order; every round starts again on the same data directory.
#[test]
fn a_damaged_log_tail_is_cut_back_to_its_whole_records() {
    let scene = DiskScene::new("crash-tail", "fsync = \"never\"\n");
    let (rt, ep, data) = (&scene.rt, &scene.ep, scene.data());
    let start = || scene.start();
    let mut broker = start();
    let (mut truncated, mut overwritten) = (0, 0);
    for round in 0..iterations() {
        let name = format!("tail{round}");
        let topic = Topic::new(format!("tail.{round}")).unwrap();
        let n = random(20, 60);
        rt.block_on(async {
            let c = Client::connect(ep, client_options("tail-pub"))
                .await
                .unwrap();
            drop(c.subscribe_durable(&name, [topic.as_str()]).await.unwrap());
            // One at a time: one record each.
            for i in 0..n {
                let p = Publish::new(topic.clone(), i.to_string()).qos(Qos::Processed);
                c.publish_with(p).await.unwrap();
                assert_eq!(c.wait_acked(WAIT).await.outstanding, 0);
            }
            c.close().await;
        });
        broker.proc.signal(Signal::SIGKILL);
        broker.proc.wait();
        let log = data.join("durable").join(&name).join("log");
        let mut segments: Vec<_> = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segments.sort();
        let last = segments.last().unwrap();
        let mut bytes = std::fs::read(last).unwrap();
        let starts = record_starts(&bytes);
        assert_eq!(starts.len() as u64, n, "one record per message");
        let from = starts[starts.len().saturating_sub(10)];
        let at = random(from as u64, bytes.len() as u64) as usize;
        // The first record the damage reaches.
        let hit = starts.iter().rposition(|s| *s <= at).unwrap();
        let (kept, torn) = if round % 2 == 0 {
            truncated += 1;
            std::fs::OpenOptions::new()
                .write(true)
                .open(last)
                .unwrap()
                .set_len(at as u64)
                .unwrap();
            if starts[hit] == at {
                (hit, 0)
            } else {
                (hit, at - starts[hit])
            }
        } else {
            overwritten += 1;
            bytes[at] ^= 0xff;
            std::fs::write(last, &bytes).unwrap();
            (hit, bytes.len() - starts[hit])
        };
        broker = start();
        let stats = broker.stats();
        assert_eq!(
            stats["store_torn_bytes"].as_u64(),
            Some(torn as u64),
            "round {round}"
        );
        let sub = stats["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["durable"].as_str() == Some(&name))
            .unwrap();
        assert_eq!(sub["pending"].as_u64(), Some(kept as u64), "round {round}");
        rt.block_on(async {
            let c = Client::connect(ep, client_options("tail-sub"))
                .await
                .unwrap();
            let mut s = c.subscribe_durable(&name, [topic.as_str()]).await.unwrap();
            for i in 0..kept {
                let m = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap();
                assert_eq!(std::str::from_utf8(m.payload()).unwrap(), i.to_string());
            }
            s.delete().await.unwrap();
            c.close().await;
        });
    }
    println!(
        "{} damaged log tails ({truncated} cut short, {overwritten} overwritten): every \
         restart kept exactly the whole records before the damage and counted the bytes cut",
        iterations()
    );
}

/// Messages dropped to keep the data directory within `store_max_bytes` while nobody was
/// attached are announced, with their exact count, to the subscriber that attaches after the
/// broker was killed and started again; it then gets every message kept, in order.
#[test]
fn drops_not_yet_announced_survive_a_broker_kill() {
    let scene = DiskScene::new(
        "crash-drops",
        "store_segment_bytes = 65536\nstore_max_bytes = 262144\n",
    );
    let (rt, ep) = (&scene.rt, &scene.ep);
    let start = || scene.start();
    let mut broker = start();
    make_durable(rt, ep, "bounded");
    let n = 2000u64;
    scene.publish_acked(
        "drops-pub",
        (0..n).map(|seq| {
            Publish::new(Topic::new("crash.events").unwrap(), format!("{seq:0512}"))
                .qos(Qos::Processed)
        }),
    );
    // The bound is kept every fsync_interval_ms (100 ms): wait until the drops stop.
    let deadline = Instant::now() + WAIT;
    let (mut dropped, mut same) = (0, 0);
    while same < 3 {
        assert!(Instant::now() < deadline, "the drops never settled");
        std::thread::sleep(Duration::from_millis(150));
        let now = broker.stats()["subscriptions"][0]["dropped"]
            .as_u64()
            .unwrap();
        same = if now > 0 && now == dropped {
            same + 1
        } else {
            0
        };
        dropped = now;
    }
    broker.proc.signal(Signal::SIGKILL);
    broker.proc.wait();
    let _broker = start();
    rt.block_on(async {
        let c = Client::connect(ep, client_options("drops-sub"))
            .await
            .unwrap();
        let mut s = c.subscribe_durable("bounded", ["crash.#"]).await.unwrap();
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Err(RecvError::Missed { count, .. }) => {
                assert_eq!(
                    count, dropped,
                    "told {count}, counted {dropped} before the kill"
                );
            }
            other => panic!("the drop is told first: {other:?}"),
        }
        for seq in dropped..n {
            let m = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap();
            let got: u64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
            assert_eq!(got, seq);
        }
        s.delete().await.unwrap();
        c.close().await;
    });
    println!("{dropped} of {n} dropped for the store bound, announced after a broker kill");
}

/// A message its durable subscriber acknowledged never comes back after the broker is killed
/// (duplicates are only of messages not yet acknowledged): each round a subscriber takes and
/// acknowledges a random number of the waiting messages, a ping makes sure the broker read the
/// acknowledgements, and the broker is killed and started again; the next round's subscriber
/// gets exactly the first message not acknowledged first. Duplicates are handed to the test,
/// not dropped by the client.
#[test]
fn acknowledged_messages_never_come_back_after_a_broker_kill() {
    use daemoneye_eventbus::client::{AckMode, SubscribeOptions};
    let scene = DiskScene::new("crash-acks", "");
    let (rt, ep) = (&scene.rt, &scene.ep);
    let start = || scene.start();
    let mut broker = start();
    make_durable(rt, ep, "acks");
    let total = 60 * iterations() as u64;
    scene.publish_acked("acks-pub", (0..total).map(publish_seq));
    let mut next = 0u64;
    for round in 0..iterations() {
        let take = random(1, 50);
        let subscriber = rt
            .block_on(Client::connect(ep, client_options("acks-sub")))
            .unwrap();
        rt.block_on(async {
            let options = SubscribeOptions::default()
                .durable(daemoneye_eventbus::core::DurableName::new("acks").unwrap())
                .ack_mode(AckMode::Manual)
                .keep_duplicates(true);
            let mut sub = subscriber
                .subscribe_with_options(["crash.#"], options)
                .await
                .unwrap();
            for _ in 0..take {
                let m = tokio::time::timeout(WAIT, sub.recv())
                    .await
                    .unwrap()
                    .unwrap();
                let seq: u64 = std::str::from_utf8(m.payload()).unwrap().parse().unwrap();
                assert_eq!(
                    seq, next,
                    "round {round}: an acknowledged message came back, or one was skipped"
                );
                assert!(sub.ack(&m));
                next += 1;
            }
            sub.flush_acks();
            subscriber.ping().await.unwrap();
        });
        broker.proc.signal(Signal::SIGKILL);
        broker.proc.wait();
        rt.block_on(subscriber.close());
        broker = start();
    }
    println!(
        "{} broker kills: {next} messages acknowledged by a durable subscriber, none came back",
        iterations()
    );
}
