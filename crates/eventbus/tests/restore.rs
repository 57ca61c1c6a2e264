//! A durable subscription restored after a reconnect while the broker still holds it for the
//! client's previous connection: that connection died on the client's side (a network that
//! failed, a proxy that dropped it) and the broker has not noticed yet. The client asks again
//! until the broker lets go of it, and the application's stream goes on with nothing missed.

#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{TempDir, WAIT, publish_numbered};
use daemoneye_eventbus::broker::{Broker, BrokerConfig};
use daemoneye_eventbus::client::{
    Client, ClientOptions, ConnState, Publish, RecvError, Subscription,
};
use daemoneye_eventbus::{Endpoint, Qos, Topic};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

/// A Unix socket proxy to the broker whose connections can be cut on the client's side only:
/// the broker's side is held open, silent, until [`Proxy::release`].
struct Proxy {
    cut: Arc<Notify>,
    held: Arc<Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(listen: &PathBuf, upstream: PathBuf) -> Self {
        let listener = UnixListener::bind(listen).unwrap();
        let cut = Arc::new(Notify::new());
        let held = Arc::new(Mutex::new(Vec::new()));
        let (c, h) = (Arc::clone(&cut), Arc::clone(&held));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let up = UnixStream::connect(&upstream).await.unwrap();
                tokio::spawn(Self::pair(client, up, Arc::clone(&c), Arc::clone(&h)));
            }
        });
        Self { cut, held }
    }

    async fn pair(
        mut client: UnixStream,
        mut up: UnixStream,
        cut: Arc<Notify>,
        held: Arc<Mutex<Vec<UnixStream>>>,
    ) {
        let notified = cut.notified();
        let was_cut = tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut up) => false,
            () = notified => true,
        };
        if was_cut {
            drop(client);
            held.lock().unwrap().push(up);
        }
    }

    /// Closes the client's side of every connection; the broker's stay open.
    fn cut(&self) {
        self.cut.notify_waiters();
    }

    /// Closes the broker's side of the connections cut.
    fn release(&self) {
        self.held.lock().unwrap().clear();
    }
}

fn payload_u32(m: &daemoneye_eventbus::Message) -> u32 {
    u32::from_le_bytes(m.payload()[..4].try_into().unwrap())
}

async fn next(s: &mut Subscription) -> u32 {
    let m = tokio::time::timeout(WAIT, s.recv())
        .await
        .expect("a message within the deadline")
        .unwrap();
    payload_u32(&m)
}

/// [`publish_numbered`], then every publish acknowledged.
async fn publish(client: &Client, range: std::ops::Range<u32>) {
    publish_numbered(client, range).await;
    assert_eq!(client.wait_acked(WAIT).await.outstanding, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_still_held_for_a_dead_connection_is_restored_when_let_go() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-restore-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (bus, via) = (dir.0.join("bus.sock"), dir.0.join("proxy.sock"));
    let broker = Broker::start_on(BrokerConfig::default(), &[Endpoint::Unix(bus.clone())])
        .await
        .unwrap();
    let proxy = Proxy::start(&via, bus.clone());
    let subscriber = Client::connect(&Endpoint::Unix(via), ClientOptions::named("restorer"))
        .await
        .unwrap();
    let ConnState::Connected {
        session_id: first_session,
    } = subscriber.state()
    else {
        panic!("connected")
    };
    let mut s = subscriber
        .subscribe_durable("kept", ["jobs.#"])
        .await
        .unwrap();
    let publisher = Client::connect(&Endpoint::Unix(bus), ClientOptions::named("pub"))
        .await
        .unwrap();
    publish(&publisher, 0..1).await;
    assert_eq!(next(&mut s).await, 0);
    let holder = |broker: &Broker| {
        broker
            .stats()
            .subscriptions
            .iter()
            .find(|d| d.durable.as_deref() == Some("kept"))
            .and_then(|d| d.session_id)
    };
    let first = holder(&broker).expect("attached");

    // The subscriber's connection dies on its side only; what is published meanwhile is kept
    // by the durable subscription, in flight on the connection the broker still holds.
    proxy.cut();
    publish(&publisher, 1..3).await;
    // Reconnected (a session other than the first): the restore was sent, and refused (the
    // broker still holds the subscription), before the answer to a ping on the new session.
    let mut state = subscriber.state_watch();
    tokio::time::timeout(
        WAIT,
        state.wait_for(
            |s| matches!(s, ConnState::Connected { session_id } if *session_id != first_session),
        ),
    )
    .await
    .expect("the subscriber reconnects")
    .unwrap();
    tokio::time::timeout(WAIT, subscriber.ping())
        .await
        .expect("the reconnected session answers")
        .unwrap();
    assert_eq!(
        holder(&broker),
        Some(first),
        "still held for the dead connection"
    );

    // The broker lets go once it sees that connection close; the client's next request
    // attaches, and the stream goes on: the rest, once each.
    proxy.release();
    assert_eq!(next(&mut s).await, 1);
    assert_eq!(next(&mut s).await, 2);
    publish(&publisher, 3..4).await;
    assert_eq!(next(&mut s).await, 3);
    s.delete().await.unwrap();
    broker.shutdown().await;
}

/// With a data directory, a durable subscription lives in `durable/<name>/` until it is
/// deleted: then its files go, and one made again under its name starts empty. A broker shut
/// down and started again on the directory gives it back with what it kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_subscription_on_disk_comes_back_with_the_broker_and_goes_when_deleted() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-ondisk-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let data = dir.0.join("data");
    let bus = dir.0.join("bus.sock");
    let config = BrokerConfig {
        data_dir: Some(data.clone()),
        ..BrokerConfig::default()
    };
    let endpoints = [Endpoint::Unix(bus.clone())];
    let start = || Broker::start_on(config.clone(), &endpoints);
    let broker = start().await.unwrap();
    let client = Client::connect(&Endpoint::Unix(bus.clone()), ClientOptions::named("c"))
        .await
        .unwrap();
    drop(client.subscribe_durable("kept", ["jobs.#"]).await.unwrap());
    publish(&client, 0..5).await;
    client.close().await;
    assert!(data.join("durable/kept/meta.json").exists());
    broker.shutdown().await;
    drop(broker);

    let broker = start().await.unwrap();
    let client = Client::connect(&Endpoint::Unix(bus.clone()), ClientOptions::named("c"))
        .await
        .unwrap();
    let mut s = client.subscribe_durable("kept", ["jobs.#"]).await.unwrap();
    for i in 0..5 {
        assert_eq!(next(&mut s).await, i);
    }
    s.delete().await.unwrap();
    assert!(
        !data.join("durable/kept").exists(),
        "its files went with it"
    );
    drop(client.subscribe_durable("kept", ["jobs.#"]).await.unwrap());
    let stats = broker.stats();
    let kept = stats
        .subscriptions
        .iter()
        .find(|d| d.durable.as_deref() == Some("kept"))
        .unwrap();
    assert_eq!((kept.pending, kept.unacked), (0, 0), "made again, empty");
    client.close().await;
    broker.shutdown().await;
}

/// A full disk never earns a publisher an acknowledgement: a Processed publish a durable
/// subscription could not write to its log stays unacknowledged (counted in `store_errors`),
/// and while the disk stays full the next ones are refused with `StoreFull` (delivered to
/// nobody) while Realtime traffic flows; once there is room again the held one is written and
/// acknowledged, new ones are taken, and exactly those survive a restart. Needs root (a
/// 512 KiB tmpfs is mounted as the data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_the_first_publish_and_refuses_the_next_until_there_is_room() {
    let root = std::process::Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = TempDir(std::env::temp_dir().join(format!("eb-full-{}", std::process::id())));
    let mnt = dir.0.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let bus = dir.0.join("bus.sock");
    let config = BrokerConfig {
        data_dir: Some(mnt.join("data")),
        ..BrokerConfig::default()
    };
    let endpoints = [Endpoint::Unix(bus.clone())];
    let broker = Broker::start_on(config.clone(), &endpoints).await.unwrap();
    let ep = Endpoint::Unix(bus.clone());
    let client = Client::connect(&ep, ClientOptions::named("c"))
        .await
        .unwrap();
    drop(client.subscribe_durable("kept", ["jobs.#"]).await.unwrap());
    let mut live = client.subscribe(["live.#"]).await.unwrap();
    // A plain Processed subscriber: it must get nothing that was refused.
    let watcher = Client::connect(&ep, ClientOptions::named("w"))
        .await
        .unwrap();
    let mut plain = watcher
        .subscribe_with(["jobs.#"], Qos::Processed)
        .await
        .unwrap();
    let job = |i: u32| {
        Publish::new(
            Topic::new("jobs.a").unwrap(),
            Bytes::from(vec![i as u8; 4096]),
        )
        .qos(Qos::Processed)
    };
    // Fill the disk, leaving less than a publish needs.
    let filler = mnt.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    drop(f);
    // The first is routed before the store knows: held, not acknowledged, not refused.
    client.publish_with(job(0)).await.unwrap();
    let held = client.wait_acked(Duration::from_millis(300)).await;
    assert_eq!((held.acked, held.refused, held.outstanding), (0, 0, 1));
    assert!(broker.stats().store_errors > 0);
    // The next are refused at once, each with StoreFull.
    for i in 1..50u32 {
        client.publish_with(job(i)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let refused = loop {
        let r = client.wait_acked(Duration::from_millis(50)).await;
        if r.refused == 49 || tokio::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(
        (refused.acked, refused.refused, refused.outstanding),
        (0, 49, 1)
    );
    let why = client.last_rejection().unwrap();
    assert!(why.contains("disk is full"), "{why}");
    assert_eq!(broker.stats().rejected_publishes, 49);
    // Realtime traffic is not held.
    client
        .publish(&Topic::new("live.x").unwrap(), Bytes::from_static(b"hello"))
        .await
        .unwrap();
    let m = tokio::time::timeout(WAIT, live.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.payload().as_ref(), b"hello");
    // Room again: the held one is written and acknowledged, and new ones are taken.
    std::fs::remove_file(&filler).unwrap();
    let report = client.wait_acked(WAIT).await;
    assert_eq!((report.acked, report.outstanding), (1, 0));
    for i in 50..60u32 {
        client.publish_with(job(i)).await.unwrap();
    }
    let report = client.wait_acked(WAIT).await;
    assert_eq!(
        (report.acked, report.refused, report.outstanding),
        (11, 49, 0)
    );
    // The plain subscriber saw exactly what was taken.
    for want in std::iter::once(0u8).chain(50..60) {
        let m = tokio::time::timeout(WAIT, plain.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload()[0], want);
    }
    watcher.close().await;
    client.close().await;
    broker.shutdown().await;
    drop(broker);
    let broker = Broker::start_on(config, &endpoints).await.unwrap();
    let client = Client::connect(&ep, ClientOptions::named("c"))
        .await
        .unwrap();
    let mut s = client.subscribe_durable("kept", ["jobs.#"]).await.unwrap();
    for want in std::iter::once(0u8).chain(50..60) {
        let m = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload()[0], want);
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), s.recv())
            .await
            .is_err(),
        "nothing refused was kept"
    );
    s.delete().await.unwrap();
    client.close().await;
    broker.shutdown().await;
}

/// `store_max_bytes` bounds the data directory: past it, the oldest segment of the largest
/// log goes, its messages counted as dropped and reported to the next subscriber, who gets
/// the newest in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_within_its_bound_by_giving_back_the_oldest_segment() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-bound-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let data = dir.0.join("data");
    let bus = dir.0.join("bus.sock");
    let config = BrokerConfig {
        data_dir: Some(data.clone()),
        store_segment_bytes: 64 * 1024,
        store_max_bytes: 256 * 1024,
        ..BrokerConfig::default()
    };
    let broker = Broker::start_on(config, &[Endpoint::Unix(bus.clone())])
        .await
        .unwrap();
    let ep = Endpoint::Unix(bus);
    let client = Client::connect(&ep, ClientOptions::named("c"))
        .await
        .unwrap();
    drop(client.subscribe_durable("big", ["jobs.#"]).await.unwrap());
    let n = 2000u32;
    for i in 0..n {
        let mut payload = vec![0u8; 512];
        payload[..4].copy_from_slice(&i.to_le_bytes());
        let p =
            Publish::new(Topic::new("jobs.a").unwrap(), Bytes::from(payload)).qos(Qos::Processed);
        client.publish_with(p).await.unwrap();
    }
    assert_eq!(client.wait_acked(WAIT).await.outstanding, 0);
    let disk = || -> u64 {
        let log = data.join("durable/big/log");
        std::fs::read_dir(log)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    };
    // The bound is kept every fsync_interval_ms (100): wait until the drops stop.
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut dropped, mut same) = (0, 0);
    while same < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never within the bound: {} bytes",
            disk()
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        let s = broker.stats();
        let now = s
            .subscriptions
            .iter()
            .find(|d| d.durable.as_deref() == Some("big"))
            .map_or(0, |d| d.dropped);
        same = if now > 0 && now == dropped {
            same + 1
        } else {
            0
        };
        dropped = now;
    }
    assert!(disk() <= 256 * 1024 + 64 * 1024, "{} bytes", disk());
    // The statistics measure the same files, and count the segments given back as drops of
    // a full backlog.
    let stats = broker.stats();
    assert_eq!(stats.store_bytes, disk());
    assert_eq!(stats.dropped_by_cause["backlog_full"], dropped);
    let mut s = client.subscribe_durable("big", ["jobs.#"]).await.unwrap();
    match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
        Err(RecvError::Missed { count, .. }) => {
            assert_eq!(count, dropped, "told {count}, counted {dropped}")
        }
        other => panic!("the drop is told first: {other:?}"),
    }
    // The oldest went: the first `dropped` published.
    for i in dropped..u64::from(n) {
        let m = tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap();
        assert_eq!(
            u64::from(u32::from_le_bytes(m.payload()[..4].try_into().unwrap())),
            i
        );
    }
    s.delete().await.unwrap();
    client.close().await;
    broker.shutdown().await;
}

/// A ping or a subscription request in flight when its connection is lost is answered at once
/// with `Disconnected`, not left to its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_lost_connection_fails_at_once() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-lost-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let (bus, via) = (dir.0.join("bus.sock"), dir.0.join("proxy.sock"));
    let broker = Broker::start_on(BrokerConfig::default(), &[Endpoint::Unix(bus.clone())])
        .await
        .unwrap();
    let proxy = Proxy::start(&via, bus);
    let mut options = ClientOptions::named("pinger");
    options.request_timeout = Duration::from_secs(30);
    let client = Client::connect(&Endpoint::Unix(via), options)
        .await
        .unwrap();
    for _ in 0..5 {
        proxy.cut();
        // Sent on the lost connection, or on the next one: answered either way, long before
        // the 30 s deadline.
        let (ping, sub) = tokio::time::timeout(WAIT, async {
            tokio::join!(client.ping(), client.subscribe(["x.#"]))
        })
        .await
        .expect("answered, not left to the deadline");
        assert!(
            matches!(
                ping,
                Ok(_) | Err(daemoneye_eventbus::client::SubscribeError::Disconnected)
            ),
            "{ping:?}"
        );
        assert!(
            matches!(
                sub,
                Ok(_) | Err(daemoneye_eventbus::client::SubscribeError::Disconnected)
            ),
            "{sub:?}"
        );
        proxy.release();
    }
    client.close().await;
    broker.shutdown().await;
}

/// `startup_timeout_seconds` bounds the start: a durable subscription's log another process
/// holds is waited for (two seconds) before the start fails as locked, unless the startup
/// deadline comes first; once let go, the broker starts and the subscription is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_is_bounded_by_startup_timeout_seconds() {
    let dir = TempDir(std::env::temp_dir().join(format!("eb-startup-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let data = dir.0.join("data");
    let endpoints = [Endpoint::Unix(dir.0.join("bus.sock"))];
    let config = |secs| BrokerConfig {
        data_dir: Some(data.clone()),
        startup_timeout_seconds: secs,
        ..BrokerConfig::default()
    };
    let broker = Broker::start_on(config(30), &endpoints).await.unwrap();
    let client = Client::connect(&endpoints[0], ClientOptions::named("c"))
        .await
        .unwrap();
    drop(client.subscribe_durable("kept", ["jobs.#"]).await.unwrap());
    client.close().await;
    broker.shutdown().await;
    drop(broker);
    // Another process holds the log's lock (`-o`: flock itself, not the command it runs).
    let mut holder = std::process::Command::new("flock")
        .arg("-o")
        .arg(data.join("durable/kept/log/LOCK"))
        .args(["-c", "echo held; exec sleep 60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    let e = Broker::start_on(config(1), &endpoints).await.unwrap_err();
    assert!(
        e.to_string().contains("startup_timeout_seconds (1 s)"),
        "{e}"
    );
    let e = Broker::start_on(config(30), &endpoints).await.unwrap_err();
    assert!(!e.to_string().contains("startup_timeout_seconds"), "{e}");
    holder.kill().unwrap();
    holder.wait().unwrap();
    let broker = Broker::start_on(config(1), &endpoints).await.unwrap();
    assert!(
        broker
            .stats()
            .subscriptions
            .iter()
            .any(|s| s.durable.as_deref() == Some("kept"))
    );
    broker.shutdown().await;
}
