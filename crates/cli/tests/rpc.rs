//! Request / reply across real processes: `eventbus serve`, `eventbus reply` responders and
//! `eventbus request` callers.

#![cfg(unix)]
#![allow(clippy::unwrap_used)]

mod common;

use common::{Broker, Proc, TempDir, eventbus, wait_line};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Starts `eventbus reply` with `args` and waits until it serves.
fn responder(broker: &Broker, args: &[&str]) -> Proc {
    let mut cmd = eventbus();
    cmd.arg("reply")
        .args(args)
        .env("EVENTBUS_SOCKET", &broker.socket);
    let p = Proc::spawn(cmd);
    wait_line(p.stderr.as_ref().unwrap(), "responder ready", |l| {
        l.starts_with("replying on")
    });
    p
}

fn json_reply(broker: &Broker, topic: &str, payload: &str) -> serde_json::Value {
    let out = broker.run(&["request", topic, payload, "--json", "--timeout", "10"]);
    assert_eq!(out.code, 0, "{out:?}");
    serde_json::from_str(&out.stdout[0]).unwrap()
}

#[test]
fn requests_replies_and_every_error_kind() {
    let dir = TempDir::new("rpc");
    // Calls to control topics are the agent's under the default policy; these are RPC's tests.
    let broker = Broker::start(dir.path(), Some(&common::open_policy_config(dir.path())));
    let _echo = responder(&broker, &["svc.echo", "--echo", "--concurrency", "8"]);
    let _upper = responder(&broker, &["svc.upper", "--exec", "tr a-z A-Z"]);
    let _fail = responder(
        &broker,
        &["svc.fail", "--exec", "echo 'disk full' >&2; exit 3"],
    );
    let _slow = responder(&broker, &["svc.slow", "--exec", "sleep 30"]);

    let out = broker.run(&["request", "svc.echo", "hello"]);
    assert_eq!(
        (out.code, out.stdout.as_slice()),
        (0, &["hello".to_owned()][..])
    );
    let reply = json_reply(&broker, "svc.upper", "quiet");
    assert_eq!(reply["payload"], "QUIET");
    assert_eq!(reply["publisher"], "eventbus-reply");
    assert!(
        reply["correlation_id"]
            .as_str()
            .is_some_and(|c| c.len() == 32)
    );

    // Concurrent callers in separate processes each get only their own reply.
    let callers: Vec<(String, Proc)> = (0..8)
        .map(|i| {
            let body = format!("caller-{i}");
            let mut cmd = eventbus();
            cmd.args(["request", "svc.echo", &body, "--timeout", "10"])
                .env("EVENTBUS_SOCKET", &broker.socket);
            (body, Proc::spawn(cmd))
        })
        .collect();
    for (body, mut p) in callers {
        assert_eq!(p.wait(), 0);
        assert_eq!(p.stdout_lines(), [body]);
    }

    // A handler failure comes back typed, with the responder's explanation.
    let out = broker.run(&["request", "svc.fail", "x"]);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr[0].starts_with("error: execution_error: ")
            && out.stderr[0].ends_with("disk full"),
        "{out:?}"
    );
    // Nobody serves the topic: fails at once, distinctly.
    let started = Instant::now();
    let out = broker.run(&["request", "control.collector.procmond", "--timeout", "30"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert_eq!(
        out.stderr,
        ["error: no_responders: no responders for control.collector.procmond"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not the 30 s deadline"
    );
    // The deadline is honoured: not before it, and the kind says so.
    let started = Instant::now();
    let out = broker.run(&["request", "svc.slow", "--timeout", "0.5", "--json"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let err: serde_json::Value = serde_json::from_str(&out.stdout[0]).unwrap();
    assert_eq!(err["error"]["kind"], "timeout");
    let stats = broker.stats();
    assert_eq!(stats["no_responders"], 1);
}

#[test]
fn a_queue_group_shares_requests_and_skips_stopped_responders() {
    let dir = TempDir::new("rpc-group");
    let broker = Broker::start(dir.path(), None);
    let mut a = responder(&broker, &["svc.work", "--echo", "--name", "inst-a"]);
    let mut b = responder(&broker, &["svc.work", "--echo", "--name", "inst-b"]);
    let mut by = BTreeMap::new();
    for i in 0..16 {
        let reply = json_reply(&broker, "svc.work", &format!("{i}"));
        assert_eq!(reply["payload"], format!("{i}"));
        *by.entry(reply["publisher"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(by.len(), 2, "both instances answered: {by:?}");
    assert_eq!(by.values().sum::<i32>(), 16, "each request answered once");

    // SIGTERM: the instance leaves the group gracefully; every later request is answered.
    a.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(a.wait(), 0);
    for i in 0..8 {
        let reply = json_reply(&broker, "svc.work", &format!("after-{i}"));
        assert_eq!(reply["publisher"], "inst-b");
    }
    // With the last instance killed, requests fail fast again.
    b.signal(nix::sys::signal::Signal::SIGKILL);
    b.wait();
    let out = broker.run(&["request", "svc.work", "x", "--timeout", "30"]);
    assert_eq!(out.code, 3, "{out:?}");
}

/// A group member that stops reading and then disconnects: the requests the broker still held
/// for it (queued, or in a write that could not complete) go to the other member. Only what
/// the kernel had already accepted into the departed member's socket is lost (those callers
/// time out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_held_for_a_departed_member_are_reoffered() {
    use daemoneye_eventbus::client::{Client, ClientOptions, RpcErrorKind};
    use daemoneye_eventbus::core::codec::Subscribe;
    use daemoneye_eventbus::core::{Qos, QueueGroup, TopicFilter};
    use daemoneye_eventbus::{Endpoint, Topic};

    let dir = TempDir::new("rpc-reoffer");
    let broker = Broker::start(dir.path(), None);
    let _healthy = responder(
        &broker,
        &["svc.bulk", "--echo", "--group", "bulk", "--name", "healthy"],
    );
    // The stalled member: joins the group, then never reads.
    let mut stalled = common::RawPeer::handshake(&broker.socket, "stalled");
    stalled.send(&daemoneye_eventbus::core::Frame::Subscribe(Subscribe {
        request_id: 1,
        qos: Qos::Realtime,
        filter: TopicFilter::new("svc.bulk").unwrap(),
        group: Some(QueueGroup::new("bulk").unwrap()),
    }));
    let ack = stalled.recv().unwrap();
    assert!(
        matches!(&ack, daemoneye_eventbus::core::Frame::Reply(r) if r.error.is_none()),
        "{ack:?}"
    );

    let ep = Endpoint::Unix(broker.socket.clone());
    let caller = Client::connect(&ep, ClientOptions::named("caller"))
        .await
        .unwrap();
    let topic = Topic::new("svc.bulk").unwrap();
    let payload = bytes::Bytes::from(vec![7u8; 64 * 1024]);
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let (c, t, p) = (caller.clone(), topic.clone(), payload.clone());
            tokio::spawn(async move { c.request(&t, p, Duration::from_secs(5)).await })
        })
        .collect();
    // Wait until the broker has routed every request and holds some for the stalled member,
    // then let it go (requests routed after it left would go to the healthy one directly).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = broker.stats();
        let conn = |name: &str, field: &str| {
            stats["connections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .map_or(0, |c| c[field].as_u64().unwrap())
        };
        // Held for it: still queued, or taken by its writer in a batch the full socket has not
        // let through (a taken batch leaves the queue, and counts as delivered only once
        // written). Round robin gives it half of the 40.
        let held = conn("stalled", "queued_messages") > 0 || conn("stalled", "delivered") < 20;
        if held && conn("caller", "published") >= 40 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the requests were not all routed, or none was queued for the stalled member"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stalled);
    let mut answered = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(reply) => {
                assert_eq!(reply.payload().len(), 64 * 1024);
                assert_eq!(reply.header().source.as_str(), "healthy");
                answered += 1;
            }
            Err(e) => assert_eq!(e.kind, RpcErrorKind::Timeout, "{e}"),
        }
    }
    // Round robin gave the stalled member about half; a socket buffer holds a few 64 KiB
    // frames, the rest were given again.
    let reoffered = broker.stats()["reoffered"].as_u64().unwrap();
    assert!(reoffered >= 10, "re-offered {reoffered}");
    assert!(answered >= 30, "answered {answered} of 40");
    caller.close().await;
}
