//! End-to-end tests with real `eventbus` processes and real Unix sockets.

#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, RawPeer, TempDir, WAIT, eventbus, wait_line};
use daemoneye_eventbus::Endpoint;
use daemoneye_eventbus::client::{Client, ClientOptions, RecvError};
use daemoneye_eventbus::core::codec::{ErrorCode, ErrorFrame, RunWriter, Subscribe, Version};
use daemoneye_eventbus::core::{
    ByteStr, Frame, Header, Message, MessageId, Qos, Topic, TopicFilter,
};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;

fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn publish_in_one_process_receive_in_another() {
    let dir = TempDir::new("pubsub");
    let mut broker = Broker::start(dir.path(), Some(&common::open_policy_config(dir.path())));
    let mut sub = broker.sub(&["events.process.+", "--count", "3", "--json"]);
    let out = broker.run(&[
        "pub",
        "events.process.lifecycle",
        "hello",
        "--count",
        "3",
        "--correlation-id",
        "corr-1",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(sub.wait(), 0);
    let msgs = json_lines(&sub.stdout_lines());
    assert_eq!(msgs.len(), 3);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m["topic"], "events.process.lifecycle");
        assert_eq!(m["payload"], "hello");
        assert_eq!(m["size"], 5);
        assert_eq!(m["correlation_id"], "corr-1");
        assert_eq!(m["publisher"], "eventbus-pub");
        assert!(
            m["message_id"]
                .as_str()
                .unwrap()
                .ends_with(&format!("-{}", i + 1))
        );
    }
    // Binary payloads are printed as base64.
    let mut bin = broker.sub(&["bin", "--count", "1", "--json"]);
    assert_eq!(broker.run(&["pub", "bin", "--size", "3"]).code, 0);
    assert_eq!(bin.wait(), 0);
    let m = &json_lines(&bin.stdout_lines())[0];
    assert!(m["payload_base64"].is_string() || m["payload"].is_string());
    assert_eq!(m["size"], 3);
    // SIGTERM drains and exits 0, removing the socket.
    broker.proc.signal(Signal::SIGTERM);
    assert_eq!(broker.proc.wait(), 0);
    assert!(!broker.socket.exists());
}

#[test]
fn wildcard_matrix_across_processes() {
    let dir = TempDir::new("wild");
    let broker = Broker::start(dir.path(), Some(&common::open_policy_config(dir.path())));
    let cases: [(&str, &[&str]); 5] = [
        (
            "events.process.*",
            &["events.process.lifecycle", "events.process.batch"],
        ),
        (
            "events.#",
            &[
                "events",
                "events.process.lifecycle",
                "events.process.batch",
                "events.network.dns",
            ],
        ),
        ("+.network.+", &["events.network.dns"]),
        (
            "control.collector.lifecycle",
            &["control.collector.lifecycle"],
        ),
        (
            "#",
            &[
                "events",
                "events.process.lifecycle",
                "events.process.batch",
                "events.network.dns",
                "control.collector.lifecycle",
            ],
        ),
    ];
    let mut subs: Vec<(Proc, &[&str])> = cases
        .iter()
        .map(|(f, expected)| {
            let n = expected.len().to_string();
            (broker.sub(&[f, "--count", &n, "--json"]), *expected)
        })
        .collect();
    for topic in [
        "events",
        "events.process.lifecycle",
        "events.process.batch",
        "events.network.dns",
        "control.collector.lifecycle",
    ] {
        assert_eq!(broker.run(&["pub", topic, "x"]).code, 0);
    }
    for (sub, expected) in &mut subs {
        assert_eq!(sub.wait(), 0);
        let got: Vec<String> = json_lines(&sub.stdout_lines())
            .iter()
            .map(|m| m["topic"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(&got, expected);
    }
    let bad = broker.run(&["sub", "events.pro+"]);
    assert_ne!(bad.code, 0);
    assert!(
        bad.stderr
            .iter()
            .any(|l| l.contains("must be a whole segment")),
        "{bad:?}"
    );
}

#[test]
fn large_payloads_delivered_and_limit_plus_one_refused() {
    let dir = TempDir::new("large");
    let broker = Broker::start(dir.path(), None);
    let mut sub = broker.sub(&["big", "--count", "2", "--json"]);
    assert_eq!(broker.run(&["pub", "big", "--size", "65536"]).code, 0);
    assert_eq!(broker.run(&["pub", "big", "--size", "1048576"]).code, 0);
    assert_eq!(sub.wait(), 0);
    let sizes: Vec<u64> = json_lines(&sub.stdout_lines())
        .iter()
        .map(|m| m["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [65_536, 1_048_576]);
    let refused = broker.run(&["pub", "big", "--size", "1048577"]);
    assert_eq!(refused.code, 1);
    assert_eq!(
        refused.stderr,
        ["error: message of 1048577 bytes exceeds max_message_size (1048576 bytes)"]
    );

    // A peer that skips the client-side check is refused by the broker and stays connected.
    let mut raw = RawPeer::handshake(&broker.socket, "raw");
    let header = Header {
        id: MessageId {
            publisher: 9,
            sequence: 1,
        },
        source: ByteStr::from("raw"),
        ..Header::default()
    };
    let msg = Message::new(
        Topic::new("big").unwrap(),
        header,
        vec![0u8; (1 << 20) + 1].into(),
    );
    raw.send(&Frame::Publish(msg));
    match raw.recv_until(|f| matches!(f, Frame::Nack(_))) {
        Frame::Nack(n) => {
            assert_eq!(n.code, ErrorCode::MessageTooLarge);
            assert!(
                n.reason.contains("exceeds max_message_size"),
                "{}",
                n.reason
            );
        }
        _ => unreachable!(),
    }
    raw.send(&Frame::Ping(7));
    assert_eq!(
        raw.recv_until(|f| matches!(f, Frame::Pong(_))),
        Frame::Pong(7)
    );
    assert_eq!(broker.stats()["rejected_publishes"], 1);
}

#[test]
fn stalled_subscriber_does_not_slow_others_and_memory_stays_capped() {
    let dir = TempDir::new("stall");
    let config = "[broker]\nmessage_buffer_size = 100000\nsubscriber_buffer_bytes = 2097152\n\
                  max_memory_bytes = 8388608\nmax_message_size = 65536\n";
    let broker = Broker::start(dir.path(), Some(config));
    // The stalled peer subscribes and then never reads.
    let mut stalled = RawPeer::handshake(&broker.socket, "stalled");
    let filter = TopicFilter::new("load").unwrap();
    stalled.send(&Frame::Subscribe(Subscribe {
        request_id: 1,
        qos: Qos::Realtime,
        filter,
        group: None,
    }));
    assert!(
        matches!(stalled.recv_until(|f| matches!(f, Frame::Reply(_))), Frame::Reply(r) if r.error.is_none())
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    // Twenty rounds of 1,000 × 1 KiB from a separate publisher process: the healthy subscriber
    // drains each round (at most 1 MiB behind, under its 2 MiB bound) while the stalled one
    // passes its bound in the second round and keeps dropping.
    let (rounds, per_round) = (20u64, 1000u64);
    let n = rounds * per_round;
    let (received, missed) = rt.block_on(async {
        let ep = Endpoint::Unix(broker.socket.clone());
        let healthy = Client::connect(&ep, ClientOptions::named("healthy"))
            .await
            .unwrap();
        let mut s = healthy.subscribe(["load"]).await.unwrap();
        let (mut received, mut missed) = (0u64, 0u64);
        for _ in 0..rounds {
            let b = broker.socket_arg();
            let status = tokio::task::spawn_blocking(move || {
                let mut cmd = eventbus();
                cmd.args([
                    "pub", "--socket", &b, "load", "--size", "1024", "--count", "1000",
                ]);
                cmd.status().unwrap().code()
            });
            assert_eq!(status.await.unwrap(), Some(0), "publisher process");
            let target = received + missed + per_round;
            while received + missed < target {
                let next = tokio::time::timeout(WAIT, s.recv()).await;
                match next.expect("healthy subscriber keeps receiving") {
                    Ok(_) => received += 1,
                    Err(RecvError::Missed { count, .. }) => missed += count,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        (received, missed)
    });
    assert_eq!(
        (received, missed),
        (n, 0),
        "the healthy subscriber got everything"
    );
    let stats = broker.stats();
    let conns = stats["connections"].as_array().unwrap();
    let st = conns
        .iter()
        .find(|c| c["name"] == "stalled")
        .expect("stalled peer still connected");
    assert!(st["dropped"].as_u64().unwrap() > 0, "{st}");
    assert!(st["queued_bytes"].as_u64().unwrap() <= 2_097_152, "{st}");
    assert!(
        stats["queued_bytes"].as_u64().unwrap() <= 8_388_608,
        "{stats}"
    );
    assert_eq!(stats["published"], n);
    drop(stalled);
}

#[test]
fn reconnect_after_broker_restart_restores_subscriptions() {
    let dir = TempDir::new("restart");
    let mut broker = Broker::start(dir.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(broker.socket.clone());
    let client = rt
        .block_on(Client::connect(&ep, ClientOptions::named("survivor")))
        .unwrap();
    let mut s = rt.block_on(client.subscribe(["after.restart"])).unwrap();
    // A durable subscription is kept in the broker's memory: the restarted broker makes it
    // anew, so it too is told of the outage.
    let mut d = rt
        .block_on(client.subscribe_durable("survivor", ["after.restart"]))
        .unwrap();

    broker.proc.signal(Signal::SIGTERM);
    assert_eq!(broker.proc.wait(), 0);
    let broker = Broker::start(dir.path(), None);
    rt.block_on(async {
        let mut state = client.state_watch();
        tokio::time::timeout(
            WAIT,
            state
                .wait_for(|s| matches!(s, daemoneye_eventbus::client::ConnState::Connected { .. })),
        )
        .await
        .expect("reconnected within the deadline")
        .unwrap();
        match tokio::time::timeout(WAIT, s.recv()).await.unwrap() {
            Err(RecvError::Reconnected { .. }) => {}
            other => panic!("expected the outage to be reported first, got {other:?}"),
        }
        match tokio::time::timeout(WAIT, d.recv()).await.unwrap() {
            Err(RecvError::Reconnected { .. }) => {}
            other => panic!("the durable subscription was not resumed: {other:?}"),
        }
        client.ping().await.unwrap();
    });
    assert_eq!(broker.run(&["pub", "after.restart", "back"]).code, 0);
    let m = rt.block_on(async { tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap() });
    assert_eq!(m.payload().as_ref(), b"back");
    assert_eq!(client.stats().reconnects, 1);
}

#[test]
fn keepalive_keeps_idle_connections_and_closes_silent_ones() {
    let dir = TempDir::new("keepalive");
    let config = "[broker]\nkeepalive_interval_ms = 100\nconnection_timeout_secs = 1\nhandshake_timeout_ms = 300\n";
    let broker = Broker::start(dir.path(), Some(config));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(broker.socket.clone());
    let mut options = ClientOptions::named("idle");
    options.keepalive = std::time::Duration::from_millis(100);
    let client = rt.block_on(Client::connect(&ep, options)).unwrap();
    let mut s = rt.block_on(client.subscribe(["still.here"])).unwrap();

    // A peer that completes the handshake but then never answers anything is closed after
    // connection_timeout_secs, with a keepalive error.
    let mut silent = RawPeer::handshake(&broker.socket, "silent");
    let end = silent.recv_until(|f| matches!(f, Frame::Error(_)));
    assert!(
        matches!(
            end,
            Frame::Error(ErrorFrame {
                code: ErrorCode::KeepaliveTimeout,
                fatal: true,
                ..
            })
        ),
        "{end:?}"
    );
    assert!(silent.recv().is_none(), "connection closed after the error");

    // A peer that never sends its handshake is refused after handshake_timeout_ms.
    let mut mute = RawPeer::connect(&broker.socket);
    let refused = mute.recv().unwrap();
    assert!(
        matches!(
            refused,
            Frame::Error(ErrorFrame {
                code: ErrorCode::HandshakeTimeout,
                ..
            })
        ),
        "{refused:?}"
    );

    // The idle client lived through ten keepalive periods on the same connection.
    assert_eq!(broker.run(&["pub", "still.here", "yes"]).code, 0);
    let m = rt.block_on(async { tokio::time::timeout(WAIT, s.recv()).await.unwrap().unwrap() });
    assert_eq!(m.payload().as_ref(), b"yes");
    assert_eq!(client.stats().reconnects, 0);
}

#[test]
fn a_peer_that_only_publishes_hears_from_the_broker_and_never_reconnects() {
    let dir = TempDir::new("pubonly");
    let config = "[broker]\nkeepalive_interval_ms = 100\nconnection_timeout_secs = 2\n";
    let broker = Broker::start(dir.path(), Some(config));
    // A raw peer that publishes without pause and never pings: the broker hears it all the
    // time, writes nothing to it otherwise, and must still ping it within a few periods.
    let mut raw = RawPeer::handshake(&broker.socket, "rawpub");
    let topic = Topic::new("nobody.listens").unwrap();
    let header = Header {
        source: ByteStr::from("rawpub"),
        ..Header::default()
    };
    let mut out = raw.stream.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = std::sync::Arc::clone(&stop);
        let topic = topic.clone();
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut sequence = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && start.elapsed() < WAIT {
                sequence += 1;
                let id = MessageId {
                    publisher: 9,
                    sequence,
                };
                let h = Header {
                    id,
                    ..header.clone()
                };
                let mut b = bytes::BytesMut::new();
                Frame::Publish(Message::new(topic.clone(), h, "x".into())).encode(&mut b);
                std::io::Write::write_all(&mut out, &b).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            start.elapsed()
        })
    };
    let pinged = raw.recv();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published_for = publisher.join().unwrap();
    assert!(
        matches!(pinged, Some(Frame::Ping(_))) && published_for < WAIT,
        "the broker pings a peer it hears but has not written to for a keepalive period: \
         {pinged:?} after {published_for:?}"
    );

    // A client that only publishes, for five of its keepalive periods, with a liveness limit
    // of three: it hears the broker's pings (and its own pongs), so it never takes the broker
    // for dead.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ep = Endpoint::Unix(broker.socket.clone());
    let mut options = ClientOptions::named("pubonly");
    options.keepalive = std::time::Duration::from_millis(100);
    let client = rt.block_on(Client::connect(&ep, options)).unwrap();
    rt.block_on(async {
        let start = tokio::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(500) {
            client.publish(&topic, "y").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    assert_eq!(client.stats().reconnects, 0, "no false reconnect");
    assert!(matches!(
        client.state(),
        daemoneye_eventbus::client::ConnState::Connected { .. }
    ));
}

#[test]
fn a_broker_killed_with_sigkill_is_replaced_at_the_first_try() {
    let dir = TempDir::new("takeover");
    let socket = dir.path().join("eb.sock");
    let mut previous = Broker::start_at(&socket, dir.path(), None);
    for _ in 0..20 {
        previous.proc.signal(Signal::SIGKILL);
        // Not reaped yet: the next broker starts while the killed one may still be exiting,
        // or be a zombie. Its socket file is stale and must be taken over, not refused.
        let next = Broker::start_at(&socket, dir.path(), None);
        drop(previous);
        previous = next;
    }
    let out = previous.run(&["pub", "after.takeover", "ok"]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn pub_processed_exits_zero_only_when_every_message_is_acknowledged() {
    let dir = TempDir::new("pubacked");
    let config = "[broker]\nmessage_buffer_size = 10\nprocessed_stall_timeout_ms = 60000\n";
    let broker = Broker::start(dir.path(), Some(config));
    // Nobody subscribes: the broker acknowledges each at once.
    let ok = broker.run(&["pub", "jobs.a", "x", "--qos", "processed", "--count", "100"]);
    assert_eq!(ok.code, 0, "{ok:?}");
    // A peer of protocol 1.2 subscribes Processed and never reads: publishers wait for it
    // (for longer than this test: processed_stall_timeout_ms is a minute).
    let mut stuck =
        RawPeer::handshake_version(&broker.socket, "stuck", Version { major: 1, minor: 2 });
    stuck.send(&Frame::Subscribe(Subscribe {
        request_id: 1,
        qos: Qos::Processed,
        filter: TopicFilter::new("jobs.#").unwrap(),
        group: None,
    }));
    assert!(matches!(stuck.recv(), Some(Frame::Reply(_))));
    let start = std::time::Instant::now();
    let held = broker.run(&[
        "pub",
        "jobs.b",
        "--size",
        "4096",
        "--qos",
        "processed",
        "--count",
        "1000",
        "--timeout",
        "1",
    ]);
    let took = start.elapsed();
    assert_ne!(held.code, 0, "{held:?}");
    assert!(
        held.stderr
            .iter()
            .any(|l| l.contains("of 1000 messages acknowledged by the broker")),
        "{held:?}"
    );
    assert!(
        took < std::time::Duration::from_secs(5),
        "bounded by --timeout: {took:?}"
    );
}

#[test]
fn sub_durable_gets_what_was_published_while_it_was_away() {
    let dir = TempDir::new("durable");
    let broker = Broker::start(dir.path(), None);
    // Made by a first subscriber, which leaves at once.
    let made = broker.run(&["sub", "--durable", "audit", "audit.#", "--timeout", "0.2"]);
    assert_eq!(made.code, 0, "{made:?}");
    let published = broker.run(&[
        "pub",
        "audit.login",
        "m",
        "--qos",
        "processed",
        "--count",
        "5",
    ]);
    assert_eq!(published.code, 0, "{published:?}");
    let listed = broker.run(&["stats"]);
    assert!(
        listed
            .stdout
            .iter()
            .any(|l| l.starts_with("audit ") && l.contains("waiting") && l.contains(" 5 ")),
        "{listed:?}"
    );
    let got = broker.run(&["sub", "--durable", "audit", "audit.#", "--count", "5"]);
    assert_eq!(got.code, 0, "{got:?}");
    assert_eq!(got.stdout, vec!["audit.login m"; 5]);
    // Acknowledged once printed: nothing is left for the next subscriber.
    let stats = broker.stats();
    assert_eq!(stats["subscriptions"][0]["pending"], 0);
    assert_eq!(stats["subscriptions"][0]["unacked"], 0);
    let deleted = broker.run(&["sub", "--delete-durable", "audit"]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert_eq!(broker.stats()["subscriptions"], serde_json::json!([]));
    let again = broker.run(&["sub", "--delete-durable", "audit"]);
    assert_eq!(again.code, 1);
    assert!(
        again
            .stderr
            .iter()
            .any(|l| l.contains("no durable subscription audit")),
        "{again:?}"
    );
}

#[test]
fn connection_limit_refuses_cleanly_then_frees_the_slot() {
    let dir = TempDir::new("limit");
    let broker = Broker::start(dir.path(), Some("[broker]\nmax_connections = 2\n"));
    let a = RawPeer::handshake(&broker.socket, "a");
    let _b = RawPeer::handshake(&broker.socket, "b");
    let refused = broker.run(&["pub", "x", "y"]);
    assert_eq!(refused.code, 1);
    assert!(
        refused.stderr[0].contains("max_connections (2)"),
        "{refused:?}"
    );
    drop(a);
    // The freed slot is usable; bounded retries cover the broker noticing the close.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = broker.run(&["pub", "x", "y"]);
        if out.code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot never freed: {out:?}"
        );
    }
    let stats = broker.stats();
    assert!(stats["refused_connections"].as_u64().unwrap() >= 1);
}

#[test]
fn malformed_and_oversized_frames_close_only_the_offender() {
    let dir = TempDir::new("malformed");
    let broker = Broker::start(dir.path(), None);
    let mut sub = broker.sub(&["ok", "--count", "2"]);
    assert_eq!(broker.run(&["pub", "ok", "before"]).code, 0);

    // Content errors keep the stream in sync: answered, and the connection goes on.
    let mut sloppy = RawPeer::handshake(&broker.socket, "sloppy");
    let mut bad_filter = bytes::BytesMut::new();
    let filter = TopicFilter::new("ok").unwrap();
    Frame::Subscribe(Subscribe {
        request_id: 42,
        qos: Qos::Realtime,
        filter,
        group: None,
    })
    .encode(&mut bad_filter);
    let at = bad_filter.len() - 2;
    bad_filter[at..].copy_from_slice(b"OK");
    sloppy.send_raw(&bad_filter);
    match sloppy.recv_until(|f| matches!(f, Frame::Reply(_))) {
        Frame::Reply(r) => {
            assert_eq!(
                (r.request_id, r.error),
                (42, Some(ErrorCode::InvalidFilter))
            );
            assert!(
                r.message.contains("upper-case character 'O'"),
                "{}",
                r.message
            );
        }
        _ => unreachable!(),
    }
    let mut bad_topic = bytes::BytesMut::new();
    let header = Header {
        source: ByteStr::from("sloppy"),
        ..Header::default()
    };
    Frame::Publish(Message::new(Topic::new("ok").unwrap(), header, "x".into()))
        .encode(&mut bad_topic);
    bad_topic[7] = b'$';
    sloppy.send_raw(&bad_topic);
    match sloppy.recv_until(|f| matches!(f, Frame::Error(_))) {
        Frame::Error(e) => assert!(!e.fatal && e.code == ErrorCode::InvalidTopic, "{e:?}"),
        _ => unreachable!(),
    }
    // A correlation tag over its limit: answered, discarded, connection kept.
    let mut meta = daemoneye_eventbus::CorrelationMetadata::root("c", 1);
    meta.tags.insert("k".into(), "v".repeat(2000));
    let header = Header {
        source: ByteStr::from("sloppy"),
        correlation: Some(Box::new(meta)),
        ..Header::default()
    };
    let msg = Message::new(Topic::new("ok").unwrap(), header, "x".into());
    sloppy.send(&Frame::Publish(msg));
    match sloppy.recv_until(|f| matches!(f, Frame::Error(_))) {
        Frame::Error(e) => {
            assert!(!e.fatal && e.code == ErrorCode::Protocol, "{e:?}");
            assert!(e.message.contains("correlation.tag.value"), "{}", e.message);
        }
        _ => unreachable!(),
    }
    sloppy.send(&Frame::Ping(1));
    assert_eq!(
        sloppy.recv_until(|f| matches!(f, Frame::Pong(_))),
        Frame::Pong(1)
    );

    let mut garbage = RawPeer::handshake(&broker.socket, "garbage");
    garbage.send_raw(&[3, 0, 0, 0, 0xEE, 1, 2]);
    match garbage.recv().unwrap() {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Protocol);
            assert!(e.fatal);
            assert!(
                e.message.contains("unknown frame kind 0xee"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(garbage.recv().is_none());

    let mut huge = RawPeer::handshake(&broker.socket, "huge");
    huge.send_raw(&u32::MAX.to_le_bytes());
    match huge.recv().unwrap() {
        Frame::Error(e) => assert_eq!(e.code, ErrorCode::FrameTooLarge, "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(huge.recv().is_none());

    let mut old = RawPeer::connect(&broker.socket);
    old.send(&RawPeer::hello("future", 2));
    match old.recv().unwrap() {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            assert!(e.message.contains("2.0 is not supported"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }

    assert_eq!(broker.run(&["pub", "ok", "after"]).code, 0);
    assert_eq!(sub.wait(), 0);
    let got: Vec<String> = sub.stdout_lines();
    assert_eq!(got, ["ok before", "ok after"]);
    assert!(broker.stats()["protocol_errors"].as_u64().unwrap() >= 2);
}

#[test]
fn socket_file_and_directory_modes_and_path_safety() {
    let runtime = TempDir::new("xdg");
    // Default path: $XDG_RUNTIME_DIR/daemoneye/eventbus.sock, directory 0700, socket 0600.
    let mut cmd = eventbus();
    cmd.arg("serve").env("XDG_RUNTIME_DIR", runtime.path());
    let mut p = Proc::spawn(cmd);
    let line = wait_line(p.stdout.as_ref().unwrap(), "listening", |l| {
        l.starts_with("listening")
    });
    let sock = runtime.path().join("daemoneye/eventbus.sock");
    assert_eq!(line, format!("listening on unix:{}", sock.display()));
    let mode =
        |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    assert_eq!(mode(&sock), 0o600);

    // A live broker's socket is never stolen.
    let mut second = eventbus();
    second.arg("serve").env("XDG_RUNTIME_DIR", runtime.path());
    let mut second = Proc::spawn(second);
    assert_eq!(second.wait(), 1);
    let err = second.stderr_lines().join("\n");
    assert!(err.contains("another broker is already listening"), "{err}");
    p.signal(Signal::SIGKILL);
    p.wait();

    // A stale socket (left by the killed broker) is replaced.
    assert!(sock.exists());
    let mut again = eventbus();
    again.arg("serve").env("XDG_RUNTIME_DIR", runtime.path());
    let again = Proc::spawn(again);
    wait_line(again.stdout.as_ref().unwrap(), "listening", |l| {
        l.starts_with("listening")
    });
    drop(again);

    // Symlinks and non-sockets are refused, never followed or deleted.
    let dir = TempDir::new("unsafe");
    let target = dir.path().join("precious");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let mut cmd = eventbus();
    cmd.args(["serve", "--socket"]).arg(&link);
    let mut refused = Proc::spawn(cmd);
    assert_eq!(refused.wait(), 1);
    assert!(refused.stderr_lines().join("\n").contains("symbolic link"));
    let mut cmd = eventbus();
    cmd.args(["serve", "--socket"]).arg(&target);
    let mut refused = Proc::spawn(cmd);
    assert_eq!(refused.wait(), 1);
    assert!(
        refused
            .stderr_lines()
            .join("\n")
            .contains("is not a socket")
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");

    // A foreign-owned private directory is refused.
    let foreign = TempDir::new("foreign");
    std::fs::create_dir(foreign.path().join("daemoneye")).unwrap();
    nix::unistd::chown(
        &foreign.path().join("daemoneye"),
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    let mut cmd = eventbus();
    cmd.arg("serve").env("XDG_RUNTIME_DIR", foreign.path());
    let mut refused = Proc::spawn(cmd);
    assert_eq!(refused.wait(), 1);
    assert!(
        refused
            .stderr_lines()
            .join("\n")
            .contains("owned by uid 65534")
    );
}

#[test]
fn bad_configuration_is_refused_with_the_field_named() {
    let dir = TempDir::new("config");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[broker]\nmax_conections = 3\n").unwrap();
    let mut cmd = eventbus();
    cmd.args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--config")
        .arg(&file);
    let mut p = Proc::spawn(cmd);
    assert_eq!(p.wait(), 1);
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("max_conections") && err.contains("bad.toml"),
        "{err}"
    );
    std::fs::write(&file, "[broker]\nmax_message_size = 0\n").unwrap();
    let mut cmd = eventbus();
    cmd.args(["serve", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--config")
        .arg(&file);
    let mut p = Proc::spawn(cmd);
    assert_eq!(p.wait(), 1);
    assert!(p.stderr_lines().join("\n").contains("max_message_size = 0"));
}

#[test]
fn stats_are_real() {
    let dir = TempDir::new("stats");
    let broker = Broker::start(dir.path(), None);
    let mut sub = broker.sub(&["m.+", "--count", "10"]);
    assert_eq!(
        broker
            .run(&["pub", "m.a", "--size", "100", "--count", "10"])
            .code,
        0
    );
    assert_eq!(sub.wait(), 0);
    let s = broker.stats();
    assert_eq!(s["published"], 10);
    assert_eq!(s["delivered"], 10);
    assert_eq!(s["bytes_in"], 1000);
    assert_eq!(s["bytes_out"], 1000);
    assert_eq!(s["dropped"], 0);
    assert!(s["total_connections"].as_u64().unwrap() >= 3);
    let table = broker.run(&["stats"]);
    assert!(
        table
            .stdout
            .iter()
            .any(|l| l.starts_with("published") && l.ends_with(" 10")),
        "{table:?}"
    );
}

/// A raw peer subscribed to `filter` (in `group`, if any), its subscription confirmed.
fn raw_subscriber(
    broker: &Broker,
    name: &str,
    minor: u16,
    filter: &str,
    group: Option<&str>,
) -> RawPeer {
    let mut p = RawPeer::handshake_version(&broker.socket, name, Version { major: 1, minor });
    p.send(&Frame::Subscribe(Subscribe {
        request_id: 1,
        qos: Qos::Realtime,
        filter: TopicFilter::new(filter).unwrap(),
        group: group.map(|g| daemoneye_eventbus::core::QueueGroup::new(g).unwrap()),
    }));
    match p.recv_until(|f| matches!(f, Frame::Reply(_))) {
        Frame::Reply(r) => assert_eq!(r.error, None, "{r:?}"),
        _ => unreachable!(),
    }
    p
}

/// A PUBLISH_RUN frame of `payloads` on `topic`, from `source`, numbered from `first`.
fn run_frame(topic: &str, source: &str, first: u64, payloads: &[&str]) -> bytes::BytesMut {
    run_frame_of(Qos::Realtime, topic, source, first, payloads)
}

/// [`run_frame`] of `qos` messages.
fn run_frame_of(
    qos: Qos,
    topic: &str,
    source: &str,
    first: u64,
    payloads: &[&str],
) -> bytes::BytesMut {
    let mut b = bytes::BytesMut::new();
    let mut run = RunWriter::begin(&mut b, &Topic::new(topic).unwrap(), qos);
    for (i, p) in payloads.iter().enumerate() {
        let header = Header {
            id: MessageId {
                publisher: 7,
                sequence: first + i as u64,
            },
            source: ByteStr::from(source),
            qos,
            ..Header::default()
        };
        run.push(&mut b, &header, p.as_bytes());
    }
    b
}

fn payload_of(frame: &Frame) -> String {
    match frame {
        Frame::Deliver(m) => String::from_utf8(m.payload().to_vec()).unwrap(),
        Frame::DeliverGroup(d) => String::from_utf8(d.message.payload().to_vec()).unwrap(),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[test]
fn message_runs_reach_every_kind_of_subscriber() {
    let dir = TempDir::new("runs");
    let broker = Broker::start(dir.path(), None);
    let mut old = raw_subscriber(&broker, "old", 0, "runs.a", None);
    let mut new = raw_subscriber(&broker, "new", 2, "runs.+", None);
    let mut w1 = raw_subscriber(&broker, "w1", 2, "runs.g", Some("workers"));
    let mut w2 = raw_subscriber(&broker, "w2", 2, "runs.g", Some("workers"));
    let mut publisher =
        RawPeer::handshake_version(&broker.socket, "pubr", Version { major: 1, minor: 2 });

    // A 1.2 subscriber gets the run's bytes as one DELIVER_RUN; a 1.0 one gets DELIVERs.
    let sent = run_frame("runs.a", "pubr", 1, &["a1", "a2", "a3"]);
    publisher.send_raw(&sent);
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(payload_of(
            &old.recv_until(|f| matches!(f, Frame::Deliver(_))),
        ));
    }
    assert_eq!(got, ["a1", "a2", "a3"]);
    match new.recv_until(|f| matches!(f, Frame::DeliverRun(_))) {
        Frame::DeliverRun(run) => {
            assert_eq!(run.wire()[..], sent[5..], "forwarded verbatim");
            let ids: Vec<u64> = run.messages().map(|m| m.unwrap().id().sequence).collect();
            assert_eq!(ids, [1, 2, 3]);
        }
        _ => unreachable!(),
    }

    // A queue group subscribes to the topic: each message goes to one member in turn.
    publisher.send_raw(&run_frame("runs.g", "pubr", 4, &["g1", "g2", "g3", "g4"]));
    let mut given: Vec<String> = Vec::new();
    for w in [&mut w1, &mut w2] {
        for _ in 0..2 {
            given.push(payload_of(
                &w.recv_until(|f| matches!(f, Frame::DeliverGroup(_))),
            ));
        }
    }
    given.sort();
    assert_eq!(given, ["g1", "g2", "g3", "g4"]);
    // The plain wildcard subscriber gets the same four as a run of its own.
    match new.recv_until(|f| matches!(f, Frame::Deliver(_) | Frame::DeliverRun(_))) {
        Frame::Deliver(m) => assert_eq!(m.payload().as_ref(), b"g1"),
        other => panic!("split messages arrive one by one, got {other:?}"),
    }

    // Another connection's name as source: every message is refused on its own.
    publisher.send_raw(&run_frame("runs.a", "someone-else", 8, &["x1", "x2"]));
    for seq in [8, 9] {
        match publisher.recv_until(|f| matches!(f, Frame::Nack(_))) {
            Frame::Nack(n) => assert_eq!((n.id.sequence, n.code), (seq, ErrorCode::NotAuthorized)),
            _ => unreachable!(),
        }
    }

    // A malformed run (two sources) is refused whole; the connection goes on.
    let mut mixed = run_frame("runs.a", "pubr", 10, &["m1"]);
    let tail = run_frame("runs.a", "other", 11, &["m2"]);
    let entry_at = 5 + 2 + "runs.a".len() + 2;
    mixed.extend_from_slice(&tail[entry_at..]);
    let len = u32::try_from(mixed.len() - 4).unwrap();
    mixed[..4].copy_from_slice(&len.to_le_bytes());
    mixed[entry_at - 2..entry_at].copy_from_slice(&2u16.to_le_bytes());
    publisher.send_raw(&mixed);
    match publisher.recv_until(|f| matches!(f, Frame::Error(_))) {
        Frame::Error(e) => {
            assert!(!e.fatal && e.code == ErrorCode::Protocol, "{e:?}");
            assert!(e.message.contains("same source"), "{}", e.message);
        }
        _ => unreachable!(),
    }
    publisher.send_raw(&run_frame("runs.a", "pubr", 12, &["after"]));
    assert_eq!(
        payload_of(&old.recv_until(|f| matches!(f, Frame::Deliver(_)))),
        "after"
    );
    let s = broker.stats();
    assert_eq!(s["published"], 8);
    assert_eq!(s["rejected_publishes"], 3);
}

/// Protocol 1.4: a run of Processed publishes is acknowledged with its last id once every
/// acknowledged subscription keeps it; a 1.4 subscriber gets it as one DELIVER_ACKED_RUN (the
/// publisher's entries verbatim), a 1.3 one as DELIVER_ACKED frames numbered in turn; what is
/// not acknowledged comes again, message by message as far as it was acknowledged.
#[test]
fn processed_runs_reach_acknowledged_subscribers_of_each_version() {
    use daemoneye_eventbus::core::codec::{SubAck, SubId, SubscribeAcked};
    let dir = TempDir::new("pruns");
    // Unacknowledged deliveries come again after 100 ms (checked every 100 ms).
    let config = "[broker]\nack_timeout_ms = 100\nkeepalive_interval_ms = 200\n";
    let broker = Broker::start(dir.path(), Some(config));
    let subscribe = |name: &str, minor: u16| {
        let mut p = RawPeer::handshake_version(&broker.socket, name, Version { major: 1, minor });
        p.send(&Frame::SubscribeAcked(SubscribeAcked {
            request_id: 1,
            sub: SubId(5),
            durable: None,
            window: 0,
            filters: vec![TopicFilter::new("jobs.#").unwrap()],
        }));
        match p.recv_until(|f| matches!(f, Frame::Reply(_))) {
            Frame::Reply(r) => assert_eq!(r.error, None, "{r:?}"),
            _ => unreachable!(),
        }
        p
    };
    let mut new = subscribe("new", 4);
    let mut old = subscribe("old", 3);
    let mut publisher =
        RawPeer::handshake_version(&broker.socket, "pubr", Version { major: 1, minor: 4 });
    let sent = run_frame_of(Qos::Processed, "jobs.a", "pubr", 1, &["j1", "j2", "j3"]);
    publisher.send_raw(&sent);
    match publisher.recv_until(|f| matches!(f, Frame::Ack(_) | Frame::Nack(_))) {
        Frame::Ack(id) => assert_eq!(id.sequence, 3, "one ACK, for the last"),
        other => panic!("{other:?}"),
    }
    match new.recv_until(|f| matches!(f, Frame::DeliverAckedRun(_))) {
        Frame::DeliverAckedRun(d) => {
            assert_eq!(
                (d.head.sub, d.head.seq, d.head.redelivered),
                (SubId(5), 1, 0)
            );
            assert_eq!(
                d.run.wire()[..],
                sent[5..],
                "the publisher's bytes verbatim"
            );
        }
        _ => unreachable!(),
    }
    let mut seqs = Vec::new();
    for _ in 0..3 {
        match old.recv_until(|f| matches!(f, Frame::DeliverAcked(_))) {
            Frame::DeliverAcked(d) => {
                seqs.push((
                    d.seq,
                    String::from_utf8(d.message.payload().to_vec()).unwrap(),
                ));
            }
            _ => unreachable!(),
        }
    }
    assert_eq!(seqs, [(1, "j1".into()), (2, "j2".into()), (3, "j3".into())]);
    // The 1.4 subscriber acknowledges the first and last only: the second comes again, alone,
    // with a new number; the 1.3 one acknowledges all.
    new.send(&Frame::SubAck(SubAck {
        sub: SubId(5),
        ranges: vec![(1, 1), (3, 3)],
    }));
    old.send(&Frame::SubAck(SubAck {
        sub: SubId(5),
        ranges: vec![(1, 3)],
    }));
    match new.recv_until(|f| matches!(f, Frame::DeliverAcked(_) | Frame::DeliverAckedRun(_))) {
        Frame::DeliverAcked(d) => {
            assert_eq!((d.seq, d.redelivered), (4, 1));
            assert_eq!(d.message.payload().as_ref(), b"j2");
        }
        other => panic!("only the unacknowledged message comes again: {other:?}"),
    }
    new.send(&Frame::SubAck(SubAck {
        sub: SubId(5),
        ranges: vec![(4, 4)],
    }));
    for p in [&mut new, &mut old] {
        p.send(&Frame::Ping(9));
        assert!(matches!(
            p.recv_until(|f| matches!(f, Frame::Pong(_))),
            Frame::Pong(9)
        ));
    }
    let stats = broker.stats();
    let subs = stats["subscriptions"].as_array().unwrap();
    let seen: Vec<(String, u64, u64, u64)> = subs
        .iter()
        .map(|s| {
            (
                s["client"].as_str().unwrap_or_default().to_string(),
                s["unacked"].as_u64().unwrap(),
                s["delivered"].as_u64().unwrap(),
                s["redelivered"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(seen.contains(&("new".into(), 0, 4, 1)), "{seen:?}");
    assert!(seen.contains(&("old".into(), 0, 3, 0)), "{seen:?}");
}

/// A data directory others may write to is refused with the fix named; one a newer build
/// wrote is refused saying so; a durable subscription whose definition is damaged is set
/// aside, and a log cut short by a crash is truncated: the broker starts either way and
/// counts both.
#[test]
fn a_bad_data_directory_is_refused_and_damage_in_a_good_one_never_stops_the_broker() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("datadir");
    let data = dir.path().join("data");
    let serve = |data: &std::path::Path| {
        let mut cmd = eventbus();
        cmd.args(["serve", "--socket"])
            .arg(dir.path().join("s.sock"))
            .arg("--data-dir")
            .arg(data);
        Proc::spawn(cmd)
    };
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut p = serve(&data);
    assert_eq!(p.wait(), 1);
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("other users write") && err.contains("chmod 700"),
        "{err}"
    );
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Another user's (we are root in CI; as another user the chown is refused, skipped).
    let nobody = Some(nix::unistd::Uid::from_raw(65534));
    if nix::unistd::chown(&data, nobody, None).is_ok() {
        let mut p = serve(&data);
        assert_eq!(p.wait(), 1);
        let err = p.stderr_lines().join("\n");
        assert!(err.contains("owned by uid 65534"), "{err}");
        nix::unistd::chown(&data, Some(nix::unistd::getuid()), None).unwrap();
    }

    // Two durable subscriptions with something kept, then the broker is killed.
    let config = format!("[broker]\ndata_dir = \"{}\"\n", data.display());
    let mut broker = Broker::start(dir.path(), Some(&config));
    for name in ["good", "broken"] {
        let mut s = broker.sub(&["--durable", name, "kept.#"]);
        s.signal(Signal::SIGTERM);
        s.wait();
    }
    let out = broker.run(&["pub", "kept.a", "x", "--count", "3", "--qos", "processed"]);
    assert_eq!(out.code, 0, "{out:?}");
    broker.proc.signal(Signal::SIGKILL);
    broker.proc.wait();
    // The broken one's definition is garbage; the good one's log ends in half a record.
    std::fs::write(data.join("durable/broken/meta.json"), b"{not json").unwrap();
    let log = data.join("durable/good/log/00000000000000000000.log");
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2]).unwrap();
    drop(f);
    let broker = Broker::start(dir.path(), Some(&config));
    let s = broker.stats();
    assert_eq!(
        (s["store_torn_bytes"].as_u64(), s["store_damaged"].as_u64()),
        (Some(6), Some(1))
    );
    let subs = s["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 1, "{subs:?}");
    assert_eq!(
        (subs[0]["durable"].as_str(), subs[0]["pending"].as_u64()),
        (Some("good"), Some(3))
    );
    assert!(data.join("durable/broken.damaged/meta.json").exists());
    drop(broker);

    // A segment of a newer format: refused, naming it.
    let mut bytes = std::fs::read(&log).unwrap();
    bytes[8] = 9;
    std::fs::write(&log, &bytes).unwrap();
    let mut p = serve(&data);
    assert_eq!(p.wait(), 1);
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("storage format 9") && err.contains("00000000000000000000.log"),
        "{err}"
    );
}

/// `eventbus serve --fsync` acts: under `never` no log is ever synced; under `always` the
/// publisher's acknowledgement waited for a sync (`store_syncs`).
#[test]
fn serve_fsync_sets_when_the_logs_are_synced() {
    for (mode, synced) in [("never", false), ("always", true)] {
        let dir = TempDir::new("fsync-flag");
        let data = dir.path().join("data");
        let args: Vec<std::ffi::OsString> = vec![
            "--data-dir".into(),
            data.into_os_string(),
            "--fsync".into(),
            mode.into(),
        ];
        let broker = Broker::serve(&dir.path().join("s.sock"), &args);
        let mut s = broker.sub(&["--durable", "kept", "kept.#"]);
        s.signal(Signal::SIGTERM);
        s.wait();
        let out = broker.run(&["pub", "kept.a", "x", "--count", "3", "--qos", "processed"]);
        assert_eq!(out.code, 0, "{out:?}");
        let stats = broker.stats();
        let syncs = stats["store_syncs"].as_u64().unwrap();
        assert_eq!(syncs > 0, synced, "fsync {mode}: {syncs} syncs");
        assert_eq!(stats["subscriptions"][0]["pending"].as_u64(), Some(3));
    }
}

/// `broker.acl_file` decides by identity from the kernel (uid, and the executable read
/// through a pidfd): the `eventbus` CLI of root may publish jobs and read events, but not
/// publish events, subscribe to control topics or connect as "procmond"; the procmond binary
/// may, under its name. `max_connections_per_identity` keeps one executable from taking every
/// connection while another still connects. SIGHUP puts an edited policy in force; a broken
/// one is refused and the one in force stays. `eventbus acl check` validates a file.
#[test]
fn an_acl_file_decides_by_uid_and_executable_and_reloads_on_sighup() {
    let dir = TempDir::new("acl");
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap().display().to_string();
    let eventbus_exe = canonical(std::path::Path::new(env!("CARGO_BIN_EXE_eventbus")));
    let procmond_exe = canonical(&common::collector_bin("procmond"));
    let policy = dir.path().join("acl.toml");
    let write_policy = |root_publishes: &str| {
        let text = format!(
            "version = 1\n\n\
             [[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"$sys.#\"]\npublish = [{root_publishes}]\n\
             request = [\"control.broker.admin\"]\n\n\
             [[rule]]\nexe = \"{procmond_exe}\"\nname = \"procmond\"\n\
             publish = [\"events.process.#\", \"control.health.#\"]\n\
             reply = [\"control.collector.procmond\"]\n"
        );
        std::fs::write(&policy, text).unwrap();
    };
    write_policy("\"jobs.#\"");
    let config = format!(
        "[broker]\nacl_file = \"{}\"\nmax_connections_per_identity = 3\n",
        policy.display()
    );
    let mut broker = Broker::start(dir.path(), Some(&config));
    let check = broker.run(&["acl", "check", policy.to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}");
    assert!(check.stdout[0].ends_with("2 rules, valid"), "{check:?}");

    let publish = |broker: &Broker, topic: &str, name: &str| {
        broker.run(&[
            "pub",
            topic,
            "x",
            "--qos",
            "processed",
            "--name",
            name,
            "--timeout",
            "5",
        ])
    };
    assert_eq!(publish(&broker, "jobs.a", "eventbus-pub").code, 0);
    let denied = publish(&broker, "events.process.lifecycle", "eventbus-pub");
    assert_ne!(denied.code, 0);
    assert!(
        denied
            .stderr
            .join("\n")
            .contains("not allowed to publish on events.process.lifecycle"),
        "{denied:?}"
    );
    let sub = broker.run(&["sub", "control.#", "--timeout", "1"]);
    assert_ne!(sub.code, 0);
    assert!(
        sub.stderr
            .join("\n")
            .contains("not allowed to subscribe to control.#"),
        "{sub:?}"
    );
    let impostor = publish(&broker, "jobs.a", "procmond");
    assert_ne!(impostor.code, 0);
    assert!(
        impostor
            .stderr
            .join("\n")
            .contains("kept by broker.acl_file"),
        "{impostor:?}"
    );
    let stats = broker.stats();
    assert_eq!(stats["acl_rules"], 2);
    assert_eq!(stats["acl_denials"], 2, "{stats}");
    let me = format!("uid 0 {eventbus_exe}");
    assert_eq!(stats["refused_by_identity"][&me], 1, "{stats}");
    let own = &stats["connections"].as_array().unwrap()[0];
    assert_eq!(
        (own["uid"].as_u64(), own["exe"].as_str()),
        (Some(0), Some(eventbus_exe.as_str()))
    );

    // Three connections of the eventbus executable: a fourth is refused, procmond still
    // connects and publishes under its name.
    let held: Vec<Proc> = (0..3).map(|_| broker.sub(&["events.#"])).collect();
    let fourth = broker.run(&["sub", "events.#", "--timeout", "1"]);
    assert_ne!(fourth.code, 0);
    assert!(
        fourth
            .stderr
            .join("\n")
            .contains("max_connections_per_identity (3)"),
        "{fourth:?}"
    );
    let mut cmd = std::process::Command::new(common::collector_bin("procmond"));
    cmd.args(["--heartbeat-secs", "1"])
        .env("EVENTBUS_SOCKET", &broker.socket);
    let _procmond = Proc::spawn(cmd);
    drop(held);
    let deadline = std::time::Instant::now() + WAIT;
    let procmond = loop {
        let stats = broker.stats();
        let found = stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "procmond" && c["published"].as_u64() > Some(0))
            .cloned();
        if let Some(c) = found {
            assert_eq!(stats["refused_by_identity"][&me], 2, "{stats}");
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "procmond never published: {stats}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(procmond["exe"].as_str(), Some(procmond_exe.as_str()));
    // One refusal: its collection tasks (`control.collector.task.procmond`), which this
    // policy does not grant; procmond serves and publishes without them.
    assert_eq!(procmond["denied"], 1, "{procmond}");

    // An edited policy is in force after SIGHUP; a broken one is refused, the last stays.
    let stderr = broker.proc.stderr.take().unwrap();
    write_policy("\"jobs.#\", \"events.process.#\"");
    broker.proc.signal(Signal::SIGHUP);
    wait_line(&stderr, "the reload", |l| {
        l.contains("ACL policy reloaded: 2 rules")
    });
    assert_eq!(
        publish(&broker, "events.process.lifecycle", "eventbus-pub").code,
        0
    );
    std::fs::write(
        &policy,
        "version = 1\n[[rule]]\nuid = 0\npublish = [\"a..b\"]\n",
    )
    .unwrap();
    broker.proc.signal(Signal::SIGHUP);
    let refused = wait_line(&stderr, "the refusal", |l| l.contains("not reloaded"));
    assert!(refused.contains("rule 1 (publish)"), "{refused}");
    assert_eq!(
        publish(&broker, "events.process.lifecycle", "eventbus-pub").code,
        0
    );
    assert_ne!(
        publish(&broker, "control.agent.lifecycle", "eventbus-pub").code,
        0
    );
    // `eventbus acl reload` asks the broker itself, as the policy lets root.
    let bad = broker.run(&["acl", "reload"]);
    assert_ne!(bad.code, 0, "{bad:?}");
    assert!(
        bad.stderr.join("\n").contains("rule 1 (publish)"),
        "{bad:?}"
    );
    write_policy("\"jobs.#\"");
    let good = broker.run(&["acl", "reload"]);
    assert_eq!(good.code, 0, "{good:?}");
    assert_eq!(good.stdout, ["ACL policy reloaded: 2 rules"]);
    assert_ne!(
        publish(&broker, "events.process.lifecycle", "eventbus-pub").code,
        0
    );
}

/// `broker.audit_log` records, chained: the first connection of an identity, a refused
/// connection, ACL denials, a control request and its answer, policy reloads. `eventbus audit
/// verify` finds the chain intact up to the broker's head, and finds a changed byte, a removed
/// record and records cut off the end; `eventbus audit tail` prints the records.
#[test]
fn the_audit_trail_records_control_actions_and_shows_tampering() {
    let dir = TempDir::new("audit");
    let policy = dir.path().join("acl.toml");
    std::fs::write(
        &policy,
        "version = 1\n[[rule]]\nuid = 0\nsubscribe = [\"events.#\", \"$sys.#\"]\n\
         request = [\"control.collector.+\"]\nreply = [\"control.collector.fake\"]\n\
         [[rule]]\nname = \"procmond\"\nexe = \"/nonexistent/procmond\"\n",
    )
    .unwrap();
    let trail = dir.path().join("audit").join("audit.log");
    let config = format!(
        "[broker]\nacl_file = \"{}\"\naudit_log = \"{}\"\n",
        policy.display(),
        trail.display()
    );
    let broker = Broker::start(dir.path(), Some(&config));
    // A responder on a control topic, a request answered by it, a denial, a refused name.
    let mut cmd = eventbus();
    cmd.args(["reply", "control.collector.fake", "--echo", "--count", "1"])
        .env("EVENTBUS_SOCKET", &broker.socket);
    let mut reply = Proc::spawn(cmd);
    wait_line(reply.stderr.as_ref().unwrap(), "responder ready", |l| {
        l.starts_with("replying on control.collector.fake")
    });
    let call = broker.run(&[
        "request",
        "control.collector.fake",
        "status?",
        "--timeout",
        "5",
    ]);
    assert_eq!(call.code, 0, "{call:?}");
    assert_eq!(reply.wait(), 0);
    assert_ne!(broker.run(&["pub", "events.x", "forged"]).code, 0);
    assert_ne!(
        broker
            .run(&["pub", "jobs.a", "x", "--name", "procmond"])
            .code,
        0
    );
    broker.proc.signal(Signal::SIGHUP);
    wait_line(broker.proc.stderr.as_ref().unwrap(), "the reload", |l| {
        l.contains("ACL policy reloaded")
    });
    // The records are synced once the broker's head says so.
    let deadline = std::time::Instant::now() + WAIT;
    let head = loop {
        let s = broker.stats();
        let kinds = std::fs::read_to_string(&trail).unwrap_or_default();
        // The head and the file agree (nothing was written between the two readings).
        let agree = s["audit_head"]["seq"].as_u64() == Some(kinds.lines().count() as u64);
        if agree && kinds.contains("policy_reload") && kinds.contains("control_reply") {
            break s["audit_head"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not recorded: {kinds}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&trail).unwrap();
    for kind in [
        "first_connection",
        "connection_refused",
        "acl_denied",
        "control_request",
        "control_reply",
        "policy_reload",
    ] {
        assert!(
            text.contains(&format!("\"kind\":\"{kind}\"")),
            "{kind} missing:\n{text}"
        );
    }
    assert!(
        text.contains("\"operation\":\"publish on\",\"target\":\"events.x\"")
            || text.contains("events.x")
    );
    let head_arg = format!("{}:{}", head["seq"], head["hash"].as_str().unwrap());
    let verify = |files: &[&std::path::Path], head: Option<&str>| {
        let mut cmd = eventbus();
        cmd.args(["audit", "verify"]).args(files);
        if let Some(h) = head {
            cmd.args(["--head", h]);
        }
        let mut p = Proc::spawn(cmd);
        let code = p.wait();
        (
            code,
            p.stdout_lines().join("\n"),
            p.stderr_lines().join("\n"),
        )
    };
    let (code, out, err) = verify(&[&trail], Some(&head_arg));
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("chain intact"), "{out}");
    // Tampered copies.
    let copy = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let changed = copy("changed.log", &text.replacen("events.x", "events.y", 1));
    let (code, _, err) = verify(&[&changed], None);
    assert_eq!(code, 1);
    assert!(err.contains("was changed"), "{err}");
    let lines: Vec<&str> = text.lines().collect();
    let without: String = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let removed = copy("removed.log", &without);
    let (code, _, err) = verify(&[&removed], None);
    assert_eq!(code, 1);
    assert!(err.contains("follows record 1"), "{err}");
    let short: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    let cut = copy("cut.log", &short);
    let (code, _, err) = verify(&[&cut], Some(&head_arg));
    assert_eq!(code, 1);
    assert!(err.contains("cut off the end"), "{err}");
    let tail = broker.run(&["audit", "tail", trail.to_str().unwrap(), "-n", "3"]);
    assert_eq!(tail.code, 0);
    assert_eq!(tail.stdout.len(), 3);
    assert!(
        tail.stdout.iter().any(|l| l.contains("policy_reload")),
        "{tail:?}"
    );
}

/// Socket paths another user could have prepared are refused, by the broker before binding
/// and by the client before connecting, saying why: a directory of another user, a symbolic
/// link on the way, a directory others may write to, a socket of another user. Without
/// `XDG_RUNTIME_DIR`, root's default socket is under /run and another user has none (never a
/// shared temporary directory).
#[test]
fn unsafe_socket_paths_are_refused_by_broker_and_client() {
    let dir = TempDir::new("paths");
    let nobody = nix::unistd::Uid::from_raw(65534);
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = eventbus();
        cmd.args(args).env_remove("XDG_RUNTIME_DIR");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut p = Proc::spawn(cmd);
        let code = p.wait();
        (code, p.stderr_lines().join("\n"))
    };
    // Another user's directory, with a socket in it: the client will not connect.
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    let impostor = std::os::unix::net::UnixListener::bind(foreign.join("s.sock")).unwrap();
    nix::unistd::chown(&foreign, Some(nobody), None).unwrap();
    let sock = foreign.join("s.sock");
    let (code, err) = run(&["stats", "--socket", sock.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("owned by uid 65534, neither this user (0) nor root"),
        "{err}"
    );
    drop(impostor);
    // Our directory, another user's socket.
    let ours = dir.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    let theirs = ours.join("s.sock");
    let listener = std::os::unix::net::UnixListener::bind(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nobody), None).unwrap();
    let (code, err) = run(&["stats", "--socket", theirs.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("the socket is owned by uid 65534"), "{err}");
    drop(listener);
    // A symbolic link on the way: the broker does not follow it (it would have bound in /etc).
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("/etc", &link).unwrap();
    let through = link.join("s.sock");
    let (code, err) = run(&["serve", "--socket", through.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("is a symbolic link (to /etc)"), "{err}");
    assert!(!std::path::Path::new("/etc/s.sock").exists());
    // A directory others may write to.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, err) = run(
        &["serve", "--socket", open.join("s.sock").to_str().unwrap()],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("chmod go-w"), "{err}");
    // Root's default without XDG_RUNTIME_DIR is under /run; another user has none.
    let (_, err) = run(&["stats"], &[]);
    assert!(err.contains("/run/daemoneye/eventbus.sock"), "{err}");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_eventbus"))
        .arg("stats")
        .env_remove("XDG_RUNTIME_DIR");
    let mut p = Proc::spawn(cmd);
    assert_ne!(p.wait(), 0);
    let err = p.stderr_lines().join("\n");
    assert!(
        err.contains("no default socket path: XDG_RUNTIME_DIR is not set"),
        "{err}"
    );
}

/// Without `acl_file` the default policy applies: a client that is neither the agent nor a
/// collector the agent started may read events and `$sys`, and use topics of its own, but not
/// forge events or heartbeats, call the agent's or a collector's control services, or read
/// others' calls and answers; each refusal is immediate and says what to do.
#[test]
fn the_default_policy_keeps_control_and_events_to_the_agent_and_its_collectors() {
    let dir = TempDir::new("default-acl");
    let broker = Broker::start(dir.path(), None);
    let stats = broker.stats();
    assert_eq!(stats["acl_rules"], 2, "the default policy's two rules");
    let refused = |out: &common::Output, what: &str| {
        assert_ne!(out.code, 0, "{out:?}");
        let err = out.stderr.join("\n");
        assert!(err.contains(what), "{what}: {err}");
        assert!(err.contains("grant it in broker.acl_file"), "{err}");
    };
    let forged = broker.run(&[
        "pub",
        "events.process.lifecycle",
        "forged",
        "--qos",
        "processed",
    ]);
    refused(
        &forged,
        "not allowed to publish on events.process.lifecycle",
    );
    let heartbeat = broker.run(&[
        "pub",
        "control.health.heartbeat.procmond",
        "{}",
        "--qos",
        "processed",
    ]);
    refused(
        &heartbeat,
        "not allowed to publish on control.health.heartbeat.procmond",
    );
    for topic in ["control.agent.lifecycle", "control.collector.procmond"] {
        let started = std::time::Instant::now();
        let call = broker.run(&["request", topic, "stop", "--timeout", "20"]);
        assert_eq!(call.code, 5, "{call:?}");
        let err = call.stderr.join("\n");
        assert!(
            err.contains(&format!("not allowed to send requests on {topic}")),
            "{err}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "refused at once"
        );
    }
    for filter in ["control.collector.#", "_inbox.#", "#"] {
        let sub = broker.run(&["sub", filter, "--timeout", "1"]);
        refused(&sub, &format!("not allowed to subscribe to {filter}"));
    }
    // The broker's own control service is not theirs either.
    let reload = broker.run(&["acl", "reload"]);
    assert_ne!(reload.code, 0);
    assert!(
        reload
            .stderr
            .join("\n")
            .contains("not allowed to send requests on control.broker.admin"),
        "{reload:?}"
    );
    // What others may do.
    let _events = broker.sub(&["events.#"]);
    let _status = broker.sub(&["control.agent.status"]);
    assert_eq!(
        broker
            .run(&["pub", "jobs.a", "x", "--qos", "processed"])
            .code,
        0
    );
    assert_eq!(broker.stats()["acl_denials"], 8);
}

/// Clients of other uids (run through setpriv): the broker sees their uid from the kernel.
/// An allowed uid gets what the default policy gives any other client (its events forged and
/// control calls refused, its own topics and event reading allowed); a uid not in
/// `allowed_uids` is refused before the handshake, counted under its identity. With
/// `socket_group`, the socket is the group's, mode 0660.
#[test]
fn clients_of_other_uids_get_what_the_policy_gives_them() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("uids");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.path().join("bus.sock");
    let config = "[broker]\nallowed_uids = [0, 65534]\nsocket_group = 65534\n";
    let broker = Broker::start_at(&socket, dir.path(), Some(config));
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (65534, 0o660));
    let as_uid = |uid: u32, args: &[&str]| {
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args([
            "--reuid",
            &uid.to_string(),
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .args(["--socket", socket.to_str().unwrap()]);
        let mut p = Proc::spawn(cmd);
        let code = p.wait();
        (code, p.stderr_lines().join("\n"))
    };
    let (code, err) = as_uid(
        65534,
        &["pub", "events.process.lifecycle", "x", "--qos", "processed"],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("not allowed to publish on events.process.lifecycle"),
        "{err}"
    );
    let (code, err) = as_uid(65534, &["request", "control.agent.lifecycle", "stop"]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("not allowed to send requests on control.agent.lifecycle"),
        "{err}"
    );
    let (code, err) = as_uid(65534, &["pub", "jobs.a", "x", "--qos", "processed"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = as_uid(65534, &["sub", "events.#", "--timeout", "0.2"]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = as_uid(65533, &["pub", "jobs.a", "x"]);
    assert_ne!(code, 0);
    assert!(err.contains("uid 65533 is not allowed to connect"), "{err}");
    let stats = broker.stats();
    assert_eq!(stats["acl_denials"], 2, "{stats}");
    let refused = stats["refused_by_identity"].as_object().unwrap();
    assert!(
        refused.keys().any(|k| k.starts_with("uid 65533")),
        "{refused:?}"
    );
}

#[path = "../../eventbus/tests/common/pki.rs"]
mod pki;

/// `eventbus serve --tls-listen` with the command-line clients over `tls://`: certificates by
/// flag or by environment, the verified subject shown and held to the policy (the default
/// one: a remote client is any other client), and clear refusals for a missing or untrusted
/// certificate.
#[test]
fn clients_on_other_hosts_connect_over_mutual_tls() {
    let dir = TempDir::new("tls");
    let pki = pki::Pki::new(dir.path());
    let os = |p: &std::path::Path| p.as_os_str().to_owned();
    let broker = Broker::serve(
        &dir.path().join("bus.sock"),
        &[
            "--tls-listen".into(),
            "127.0.0.1:0".into(),
            "--tls-cert".into(),
            os(&pki.broker.cert),
            "--tls-key".into(),
            os(&pki.broker.key),
            "--tls-client-ca".into(),
            os(&pki.ca),
        ],
    );
    let line = wait_line(broker.proc.stdout.as_ref().unwrap(), "tls line", |l| {
        l.starts_with("listening on tls:")
    });
    let port = line.rsplit(':').next().unwrap().to_owned();
    let tls = format!("tls://localhost:{port}");
    let client = |files: &pki::Files, args: &[&str]| {
        let mut cmd = eventbus();
        cmd.args(args)
            .env("EVENTBUS_SOCKET", &tls)
            .env("EVENTBUS_TLS_CERT", &files.cert)
            .env("EVENTBUS_TLS_KEY", &files.key)
            .env("EVENTBUS_TLS_CA", &files.ca);
        cmd
    };
    // A subscriber with its certificate by flag, a publisher by environment.
    let mut sub = eventbus();
    sub.args(["sub", "jobs.#", "--count", "3", "--json", "--socket", &tls])
        .arg("--tls-cert")
        .arg(&pki.client_b.cert)
        .arg("--tls-key")
        .arg(&pki.client_b.key)
        .arg("--tls-ca")
        .arg(&pki.ca);
    let mut sub = Proc::spawn(sub);
    wait_line(sub.stderr.as_ref().unwrap(), "sub ready", |l| l == "ready");
    let stats = broker.stats();
    let subject_of = |stats: &Value, name: &str| {
        stats["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| c["tls_subject"].clone())
    };
    assert_eq!(
        subject_of(&stats, "eventbus-sub"),
        Some(Value::from(pki::CLIENT_B)),
        "{stats}"
    );
    let mut publish = Proc::spawn(client(
        &pki.client_a,
        &[
            "pub",
            "jobs.remote",
            "x",
            "--count",
            "3",
            "--qos",
            "processed",
        ],
    ));
    assert_eq!(publish.wait(), 0, "{:?}", publish.stderr_lines());
    assert_eq!(sub.wait(), 0);
    assert_eq!(sub.stdout_lines().len(), 3);
    // The default policy holds for a remote client as for any other: no forged events.
    let mut forged = Proc::spawn(client(
        &pki.client_a,
        &["pub", "events.process.lifecycle", "x", "--qos", "processed"],
    ));
    assert_ne!(forged.wait(), 0);
    let err = forged.stderr_lines().join("\n");
    assert!(
        err.contains("not allowed to publish on events.process.lifecycle"),
        "{err}"
    );
    // Refusals a user can act on.
    let mut bare = eventbus();
    bare.args(["pub", "jobs.x", "x", "--socket", &tls])
        .env_remove("EVENTBUS_TLS_CERT")
        .env_remove("EVENTBUS_TLS_KEY")
        .env_remove("EVENTBUS_TLS_CA");
    let mut bare = Proc::spawn(bare);
    assert_ne!(bare.wait(), 0);
    let err = bare.stderr_lines().join("\n");
    assert!(
        err.contains("needs --tls-cert, --tls-key and --tls-ca"),
        "{err}"
    );
    let mut untrusted = Proc::spawn(client(&pki.client_other_ca, &["pub", "jobs.x", "x"]));
    assert_ne!(untrusted.wait(), 0);
    let err = untrusted.stderr_lines().join("\n");
    assert!(
        err.contains("the broker refused this client's TLS certificate"),
        "{err}"
    );
    let stats = broker.stats();
    assert_eq!(stats["tls_refused"], 1, "{stats}");
    // The subject a rule names, from the certificate file.
    let out = broker.run(&["tls", "subject", pki.client_a.cert.to_str().unwrap()]);
    assert_eq!(out.stdout, vec![pki::CLIENT_A.to_owned()], "{out:?}");
}
