//! Codec tests: golden bytes that pin `docs/protocol.md`, round trips, and limits.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use daemoneye_eventbus_core::codec::{
    AckedDelivery, AckedHead, DecodeCache, DurableDelete, ErrorCode, ErrorFrame, FrameDecoder,
    GoingAway, GroupDelivery, Hello, LentFrame, Reply, RunPart, RunWriter, SlowReaderPolicy,
    SubAck, SubClose, SubEnd, SubId, Subscribe, SubscribeAcked, Version, Welcome, encode_acked_run,
    encode_run_as_delivers, kind, max_frame_len, may_run,
};
use daemoneye_eventbus_core::message::{CorrelationMetadata, Header, Message, MessageId, Qos};
use daemoneye_eventbus_core::{
    ByteStr, DurableName, Frame, FrameError, QueueGroup, ReplyStatus, StatusCode, Topic,
    TopicFilter,
};
use proptest::prelude::*;

fn encode(frame: &Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    frame.encode(&mut b);
    b.to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
    let mut buf = BytesMut::from(bytes);
    FrameDecoder::new(max_frame_len(1 << 20)).decode(&mut buf)
}

fn simple_message(payload: &'static [u8]) -> Message {
    let header = Header {
        id: MessageId {
            publisher: 1,
            sequence: 2,
        },
        timestamp_ns: 3,
        qos: Qos::Realtime,
        source: ByteStr::from("p"),
        ..Header::default()
    };
    Message::new(
        Topic::new("a.b").unwrap(),
        header,
        Bytes::from_static(payload),
    )
}

// Each fixture below is reproduced byte for byte in docs/protocol.md, section "Examples".
#[test]
fn golden_hello() {
    let f = Frame::Hello(Hello {
        version: Version::CURRENT,
        capabilities: 0,
        max_message_size: 1_048_576,
        keepalive_ms: 10_000,
        slow_reader: SlowReaderPolicy::DropOldest,
        client_name: "cli".into(),
    });
    assert_eq!(
        hex(&encode(&f)),
        "16 00 00 00 01 01 00 04 00 00 00 00 00 00 00 10 00 10 27 00 00 00 03 63 6c 69"
    );
}

#[test]
fn golden_subscribe() {
    let f = Frame::Subscribe(Subscribe {
        request_id: 7,
        qos: Qos::Realtime,
        filter: TopicFilter::new("events.*").unwrap(),
        group: None,
    });
    assert_eq!(
        hex(&encode(&f)),
        "10 00 00 00 03 07 00 00 00 00 08 00 65 76 65 6e 74 73 2e 2b"
    );
}

#[test]
fn golden_subscribe_in_a_group() {
    let f = Frame::Subscribe(Subscribe {
        request_id: 7,
        qos: Qos::Processed,
        filter: TopicFilter::new("svc").unwrap(),
        group: Some(QueueGroup::new("w").unwrap()),
    });
    assert_eq!(
        hex(&encode(&f)),
        "0d 00 00 00 03 07 00 00 00 81 03 00 73 76 63 01 77"
    );
}

#[test]
fn golden_reply_status_and_group_delivery() {
    let mut header = simple_message(b"").header().clone();
    header.status = Some(Box::new(ReplyStatus::new(StatusCode::ExecutionError, "no")));
    let msg = Message::new(Topic::new("a.b").unwrap(), header, Bytes::new());
    let f = Frame::DeliverGroup(GroupDelivery {
        group: QueueGroup::new("w").unwrap(),
        message: msg,
    });
    assert_eq!(
        hex(&encode(&f)),
        "2c 00 00 00 0f 01 77 03 00 61 2e 62 20 00 00 00 20 01 00 00 00 00 00 00 00 02 00 00 \
         00 00 00 00 00 03 00 00 00 00 00 00 00 01 70 03 02 00 6e 6f"
    );
    assert_eq!(decode_one(&encode(&f)).unwrap().unwrap(), f);
}

#[test]
fn golden_publish() {
    let f = Frame::Publish(simple_message(b"hi"));
    assert_eq!(
        hex(&encode(&f)),
        "27 00 00 00 06 03 00 61 2e 62 1b 00 00 00 00 01 00 00 00 00 00 00 00 02 00 00 00 00 \
         00 00 00 03 00 00 00 00 00 00 00 01 70 68 69"
    );
}

/// A PUBLISH_RUN of `msgs` (all on the first one's topic), encoded by the client's writer.
fn run_bytes(msgs: &[Message]) -> BytesMut {
    let mut b = BytesMut::new();
    let mut run = RunWriter::begin(&mut b, msgs[0].topic(), msgs[0].header().qos);
    for m in msgs {
        run.push(&mut b, m.header(), m.payload());
    }
    assert_eq!(run.len(), msgs.len());
    assert_eq!(run.frame_len(&b), b.len());
    b
}

#[test]
fn golden_publish_run() {
    let mut second = simple_message(b"yo");
    second = Message::new(
        second.topic().clone(),
        Header {
            id: MessageId {
                publisher: 1,
                sequence: 3,
            },
            ..second.header().clone()
        },
        second.payload().clone(),
    );
    let b = run_bytes(&[simple_message(b"hi"), second.clone()]);
    assert_eq!(
        hex(&b),
        "52 00 00 00 10 03 00 61 2e 62 02 00 \
         1b 00 00 00 00 01 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00 03 00 00 00 00 00 00 \
         00 01 70 02 00 00 00 68 69 \
         1b 00 00 00 00 01 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00 03 00 00 00 00 00 00 \
         00 01 70 02 00 00 00 79 6f"
    );
    let run = match decode_one(&b).unwrap().unwrap() {
        Frame::PublishRun(run) => run,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!((run.topic().as_str(), run.len()), ("a.b", 2));
    assert_eq!((run.payload_bytes(), run.max_payload()), (4, 2));
    assert_eq!(run.source().as_str(), "p");
    let msgs: Vec<Message> = run.messages().map(Result::unwrap).collect();
    assert_eq!(msgs, [simple_message(b"hi"), second]);
    assert_eq!(
        run.accounted_size(),
        msgs.iter().map(Message::accounted_size).sum::<usize>()
    );
    // Delivered verbatim: the DELIVER_RUN body is the PUBLISH_RUN body.
    let deliver = encode(&Frame::DeliverRun(run));
    assert_eq!((deliver[4], &deliver[5..]), (kind::DELIVER_RUN, &b[5..]));
    // A subscriber reads only the first source when the run arrives, the rest with the
    // messages.
    let delivered = match decode_one(&deliver).unwrap().unwrap() {
        Frame::DeliverRun(run) => run,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(delivered.source().as_str(), "p");
    let again: Vec<Message> = delivered.messages().map(Result::unwrap).collect();
    assert_eq!(again, msgs);
}

/// A run's messages become DELIVER frames with their header bytes verbatim: fields of a later
/// minor version reach a client before 1.2.
#[test]
fn a_run_as_delivers_keeps_header_extensions() {
    let msg = simple_message(b"hi");
    let mut b = run_bytes(std::slice::from_ref(&msg)).to_vec();
    // Header of 27 bytes at offset 12 (see golden_publish_run): make it 29, two extension bytes.
    b[12] = 29;
    b.splice(16 + 27..16 + 27, [0xEE, 0xEF]);
    let len = u32::try_from(b.len() - 4).unwrap();
    b[..4].copy_from_slice(&len.to_le_bytes());
    let run = match decode_one(&b).unwrap().unwrap() {
        Frame::PublishRun(run) => run,
        other => panic!("unexpected {other:?}"),
    };
    let mut delivers = BytesMut::new();
    encode_run_as_delivers(&mut delivers, &run);
    let plain = encode(&Frame::Deliver(msg.clone()));
    assert_eq!(delivers.len(), plain.len() + 2);
    assert!(delivers.windows(2).any(|w| w == [0xEE, 0xEF]));
    match decode_one(&delivers).unwrap().unwrap() {
        Frame::Deliver(m) => {
            assert_eq!((m.topic(), m.header()), (msg.topic(), msg.header()));
            assert_eq!(m.payload(), msg.payload());
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Decodes `bytes` as one frame, expecting a recoverable refusal whose text contains `what`.
fn refused(bytes: &[u8], what: &str) {
    match decode_one(bytes) {
        Err(e) => {
            assert!(e.is_recoverable(), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        other => panic!("expected a refusal mentioning {what:?}, got {other:?}"),
    }
}

#[test]
fn malformed_runs_are_refused_whole() {
    let plain = simple_message(b"hi");
    let with = |f: &dyn Fn(&mut Header)| {
        let mut h = plain.header().clone();
        f(&mut h);
        Message::new(plain.topic().clone(), h, plain.payload().clone())
    };
    // A run carries no request and no reply...
    for odd in [
        with(&|h| h.reply_to = Some(Topic::new("_inbox.x").unwrap())),
        with(&|h| h.status = Some(Box::new(ReplyStatus::unavailable("busy")))),
    ] {
        assert!(!may_run(odd.header(), true));
        refused(&run_bytes(&[plain.clone(), odd]), "no request");
    }
    // ...messages of one QoS (Processed ones since 1.4)...
    let processed = with(&|h| h.qos = Qos::Processed);
    assert!(may_run(processed.header(), true) && !may_run(processed.header(), false));
    let mut mixed = run_bytes(&[plain.clone(), plain.clone()]);
    let second_flags = mixed.len() - (4 + 0x1b + 4 + 2) + 4;
    mixed[second_flags] = 1;
    refused(&mixed, "same QoS");
    // ...from one source.
    let other = with(&|h| h.source = ByteStr::from("q"));
    refused(&run_bytes(&[plain.clone(), other]), "same source");
    // No message at all.
    let mut empty = BytesMut::new();
    RunWriter::begin(&mut empty, plain.topic(), Qos::Realtime);
    refused(&empty, "run.count");
    // Lengths that do not add up: a count above the entries, bytes after them, an entry cut.
    let mut more = run_bytes(std::slice::from_ref(&plain));
    more[10] = 2;
    refused(&more, "run.header_len");
    let mut trailing = run_bytes(std::slice::from_ref(&plain));
    trailing.extend_from_slice(b"x");
    let len = u32::try_from(trailing.len() - 4).unwrap();
    trailing[..4].copy_from_slice(&len.to_le_bytes());
    refused(&trailing, "trailing");
    let mut cut = run_bytes(std::slice::from_ref(&plain));
    cut.truncate(cut.len() - 1);
    let len = u32::try_from(cut.len() - 4).unwrap();
    cut[..4].copy_from_slice(&len.to_le_bytes());
    refused(&cut, "run.payload");
}

#[test]
fn a_delivered_run_checks_headers_as_its_messages_are_read() {
    // The broker checked the run, so a client checks lengths first and each header as it
    // reads the message: a bad one ends the run there with an error.
    let mut b = run_bytes(&[simple_message(b"hi"), simple_message(b"yo")]);
    b[4] = kind::DELIVER_RUN;
    let second_flags = b.len() - (4 + 0x1b + 4 + 2) + 4;
    b[second_flags] = 3;
    let run = match decode_one(&b).unwrap().unwrap() {
        Frame::DeliverRun(run) => run,
        other => panic!("unexpected {other:?}"),
    };
    let read: Vec<_> = run.messages().collect();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].as_ref().unwrap().payload().as_ref(), b"hi");
    assert!(matches!(
        read[1],
        Err(FrameError::InvalidValue { field: "qos", .. })
    ));
}

#[test]
fn golden_ping_and_error() {
    assert_eq!(
        hex(&encode(&Frame::Ping(5))),
        "09 00 00 00 0a 05 00 00 00 00 00 00 00"
    );
    let e = Frame::Error(ErrorFrame {
        request_id: 0,
        code: ErrorCode::ConnectionLimit,
        fatal: true,
        message: "full".into(),
    });
    assert_eq!(
        hex(&encode(&e)),
        "0e 00 00 00 0c 00 00 00 00 07 00 01 04 00 66 75 6c 6c"
    );
}

#[test]
fn golden_acknowledged_subscriptions() {
    // A durable subscription `d`, id 7, window 100, on `a.+` and `b`.
    let open = Frame::SubscribeAcked(SubscribeAcked {
        request_id: 3,
        sub: SubId(7),
        durable: Some(DurableName::new("d").unwrap()),
        window: 100,
        filters: vec![
            TopicFilter::new("a.+").unwrap(),
            TopicFilter::new("b").unwrap(),
        ],
    });
    assert_eq!(
        hex(&encode(&open)),
        "19 00 00 00 12 03 00 00 00 07 00 00 00 01 64 00 00 00 01 64 02 03 00 61 2e 2b 01 00 62"
    );
    // The message of `golden_publish`, delivered as sequence 9 of subscription 7, redelivered
    // once: the PUBLISH body follows the three fields verbatim.
    let publish = encode(&Frame::Publish(simple_message(b"hi")));
    let delivery = encode(&Frame::DeliverAcked(AckedDelivery {
        sub: SubId(7),
        seq: 9,
        redelivered: 1,
        message: simple_message(b"hi"),
    }));
    assert_eq!(
        hex(&delivery[..19]),
        "35 00 00 00 13 07 00 00 00 09 00 00 00 00 00 00 00 01 00"
    );
    assert_eq!(delivery[19..], publish[5..]);
    let ack = Frame::SubAck(SubAck {
        sub: SubId(7),
        ranges: vec![(1, 9)],
    });
    assert_eq!(
        hex(&encode(&ack)),
        "17 00 00 00 14 07 00 00 00 01 00 01 00 00 00 00 00 00 00 09 00 00 00 00 00 00 00"
    );
    let close = Frame::SubClose(SubClose {
        request_id: 4,
        sub: SubId(7),
        delete: true,
    });
    assert_eq!(
        hex(&encode(&close)),
        "0a 00 00 00 15 04 00 00 00 07 00 00 00 01"
    );
    let delete = Frame::DurableDelete(DurableDelete {
        request_id: 5,
        name: DurableName::new("d").unwrap(),
    });
    assert_eq!(hex(&encode(&delete)), "07 00 00 00 16 05 00 00 00 01 64");
    let end = Frame::SubEnd(SubEnd {
        sub: SubId(7),
        code: ErrorCode::Stalled,
        message: "x".into(),
    });
    assert_eq!(
        hex(&encode(&end)),
        "0a 00 00 00 17 07 00 00 00 15 00 01 00 78"
    );
    for f in [open, ack, close, delete, end] {
        assert_eq!(decode_one(&encode(&f)).unwrap().unwrap(), f);
    }
    // An invalid durable name is answered with the request id; the stream stays in sync.
    let mut bad = encode(&Frame::DurableDelete(DurableDelete {
        request_id: 5,
        name: DurableName::new("d").unwrap(),
    }));
    bad[10] = b'D';
    assert!(matches!(
        decode_one(&bad),
        Err(FrameError::InvalidName { request_id: 5, .. })
    ));
}

/// A lone PUBLISH becomes a run of one that takes more messages: the same messages as if the
/// run had been begun for the first.
#[test]
fn a_publish_turned_into_a_run_reads_as_the_run() {
    let (first, second) = (simple_message(b"hi"), simple_message(b"yo"));
    let mut b = BytesMut::from(&b"leading bytes"[..]);
    let start = b.len();
    daemoneye_eventbus_core::codec::encode_publish(
        &mut b,
        first.topic(),
        first.header(),
        first.payload(),
    );
    let mut run = RunWriter::from_publish(&mut b, start, Qos::Realtime);
    assert_eq!(
        (run.len(), run.start(), run.frame_len(&b)),
        (1, start, b.len() - start)
    );
    run.push(&mut b, second.header(), second.payload());
    assert_eq!(&b[start..], &run_bytes(&[first, second])[..]);
}

/// Protocol 1.4: a run of Processed messages, and what an acknowledged subscription sends of
/// one: a DELIVER_ACKED_RUN of any part of it, or DELIVER_ACKED frames one by one.
#[test]
fn golden_processed_run_and_acknowledged_run_deliveries() {
    let processed = |payload: &'static [u8], sequence: u64| {
        let m = simple_message(payload);
        let mut h = m.header().clone();
        h.qos = Qos::Processed;
        h.id.sequence = sequence;
        Message::new(m.topic().clone(), h, m.payload().clone())
    };
    let msgs = [
        processed(b"hi", 2),
        processed(b"yo", 3),
        processed(b"ok", 4),
    ];
    let b = run_bytes(&msgs);
    // Flags byte 0x01 (Processed) in every header.
    assert_eq!(b[16], 1);
    let run = match decode_one(&b).unwrap().unwrap() {
        Frame::PublishRun(run) => run,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(run.qos(), Qos::Processed);
    assert_eq!(
        run.last_id(),
        Some(msgs[2].id()),
        "the ACK names the last one"
    );
    // Entries start after topic16 and count (offsets in the body, after the kind byte); each
    // is 4 + 27 + 4 + 2 bytes.
    let starts = run.entry_starts();
    assert_eq!(starts, [7, 44, 81, 118]);
    assert_eq!(run.whole().count, 3);
    assert_eq!(
        run.entry_charge(starts[1], starts[2]),
        msgs[1].accounted_size()
    );
    let head = AckedHead {
        sub: SubId(7),
        seq: 9,
        redelivered: 0,
    };
    // The last two messages, as sequences 9 and 10.
    let part = RunPart {
        count: 2,
        start: starts[1],
        end: starts[3],
    };
    let mut as_run = BytesMut::new();
    encode_acked_run(&mut as_run, head, &run, part, true);
    assert_eq!(
        hex(&as_run[..26]),
        "60 00 00 00 18 07 00 00 00 09 00 00 00 00 00 00 00 00 00 03 00 61 2e 62 02 00"
    );
    assert_eq!(as_run[26..], b[49..]);
    let delivered = match decode_one(&as_run).unwrap().unwrap() {
        Frame::DeliverAckedRun(d) => d,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(delivered.head, head);
    let read: Vec<Message> = delivered.run.messages().map(Result::unwrap).collect();
    assert_eq!(read, msgs[1..]);
    assert_eq!(run.slice(part), delivered.run);
    assert_eq!(
        decode_one(&encode(&Frame::DeliverAckedRun(delivered.clone())))
            .unwrap()
            .unwrap(),
        Frame::DeliverAckedRun(delivered)
    );
    // For a subscriber before 1.4: the same as two DELIVER_ACKED frames.
    let mut one_by_one = BytesMut::new();
    encode_acked_run(&mut one_by_one, head, &run, part, false);
    let mut expected = encode(&Frame::DeliverAcked(AckedDelivery {
        sub: SubId(7),
        seq: 9,
        redelivered: 0,
        message: msgs[1].clone(),
    }));
    expected.extend_from_slice(&encode(&Frame::DeliverAcked(AckedDelivery {
        sub: SubId(7),
        seq: 10,
        redelivered: 0,
        message: msgs[2].clone(),
    })));
    assert_eq!(one_by_one, expected);
}

#[test]
fn deliver_reuses_the_publish_body() {
    let msg = simple_message(b"payload");
    let publish = encode(&Frame::Publish(msg.clone()));
    let decoded = match decode_one(&publish).unwrap().unwrap() {
        Frame::Publish(m) => m,
        other => panic!("unexpected {other:?}"),
    };
    let deliver = encode(&Frame::Deliver(decoded));
    assert_eq!(publish[5..], deliver[5..]);
    assert_eq!(deliver[4], kind::DELIVER);
}

#[test]
fn too_large_is_refused_from_the_prefix_alone() {
    let max = max_frame_len(1 << 20);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&((max + 1) as u32).to_le_bytes());
    let err = FrameDecoder::new(max).decode(&mut buf).unwrap_err();
    assert_eq!(err, FrameError::TooLarge { len: max + 1, max });
    assert!(
        buf.capacity() < 1024,
        "nothing reserved for a refused frame"
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    assert_eq!(
        decode_one(&[1, 0, 0, 0, 0xEE]),
        Err(FrameError::UnknownKind(0xEE))
    );
    assert_eq!(decode_one(&[0, 0, 0, 0]), Err(FrameError::Empty));
    assert!(matches!(
        decode_one(&[2, 0, 0, 0, kind::PING, 1]),
        Err(FrameError::Truncated(_))
    ));
    // A publish whose topic is upper case.
    let mut b = BytesMut::new();
    Frame::Publish(simple_message(b"x")).encode(&mut b);
    b[7] = b'A';
    assert!(matches!(decode_one(&b), Err(FrameError::Topic(_))));
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let bytes = encode(&Frame::Publish(simple_message(b"0123456789")));
    let dec = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::new();
    for (i, b) in bytes.iter().enumerate() {
        assert!(
            dec.decode(&mut buf).unwrap().is_none(),
            "complete early at {i}"
        );
        buf.extend_from_slice(&[*b]);
    }
    assert!(dec.decode(&mut buf).unwrap().is_some());
    assert!(buf.is_empty());
}

#[test]
fn frames_of_every_size_up_to_the_limit() {
    let limit = 1 << 20;
    for size in [0, 1, 65_535, 65_536, 65_537, limit] {
        let header = Header {
            source: ByteStr::from("s"),
            ..Header::default()
        };
        let payload = Bytes::from(vec![0xAB; size]);
        let msg = Message::new(Topic::new("big").unwrap(), header, payload.clone());
        let bytes = encode(&Frame::Publish(msg));
        match decode_one(&bytes).unwrap().unwrap() {
            Frame::Publish(m) => assert_eq!(m.payload(), &payload),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn correlation() -> impl Strategy<Value = Option<Box<CorrelationMetadata>>> {
    let tags = prop::collection::btree_map("[a-z]{1,8}", "\\PC{0,20}", 0..5);
    let meta = (
        "[a-z0-9-]{1,40}",
        prop::option::of("[a-z]{1,10}"),
        any::<u64>(),
        tags,
    )
        .prop_map(|(id, parent, seq, tags)| {
            Box::new(CorrelationMetadata {
                correlation_id: id.clone(),
                parent_correlation_id: parent,
                root_correlation_id: id,
                sequence_number: seq,
                workflow_stage: Some("stage".into()),
                tags,
                created_at_ns: seq / 2,
            })
        });
    prop::option::of(meta)
}

fn message() -> impl Strategy<Value = Message> {
    (
        "[a-z]{1,10}(\\.[a-z0-9_-]{1,10}){0,4}",
        any::<(u64, u64, u64)>(),
        any::<bool>(),
        prop::option::of(any::<u64>()),
        correlation(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(topic, (s, q, ts), processed, deadline, corr, payload)| {
            let header = Header {
                id: MessageId {
                    publisher: s,
                    sequence: q,
                },
                timestamp_ns: ts,
                qos: if processed {
                    Qos::Processed
                } else {
                    Qos::Realtime
                },
                source: ByteStr::from("src"),
                reply_to: deadline.map(|_| Topic::new("_inbox.c.1").unwrap()),
                deadline_ns: deadline,
                status: q
                    .is_multiple_of(3)
                    .then(|| Box::new(ReplyStatus::new(StatusCode::from_u8((s % 7) as u8), "why"))),
                correlation: corr,
            };
            Message::new(Topic::new(topic).unwrap(), header, Bytes::from(payload))
        })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        message().prop_map(Frame::Publish),
        message().prop_map(Frame::Deliver),
        ("[a-z0-9_-]{1,64}", message()).prop_map(|(g, m)| Frame::DeliverGroup(GroupDelivery {
            group: QueueGroup::new(&g).unwrap(),
            message: m,
        })),
        (
            any::<u32>(),
            any::<bool>(),
            prop::option::of("[a-z0-9_-]{1,64}")
        )
            .prop_map(|(id, processed, group)| Frame::Subscribe(Subscribe {
                request_id: id,
                qos: if processed {
                    Qos::Processed
                } else {
                    Qos::Realtime
                },
                filter: TopicFilter::new("a.+.#").unwrap(),
                group: group.map(|g| QueueGroup::new(&g).unwrap()),
            })),
        any::<u64>().prop_map(Frame::Ping),
        any::<u64>().prop_map(Frame::Pong),
        (any::<u32>(), "[a-z ]{0,30}").prop_map(|(id, m)| Frame::Reply(Reply {
            request_id: id,
            error: id.is_multiple_of(2).then_some(ErrorCode::InvalidFilter),
            message: m,
        })),
        (any::<u64>(), "\\PC{0,20}").prop_map(|(s, b)| Frame::Welcome(Welcome {
            version: Version::CURRENT,
            session_id: s,
            capabilities: 0,
            max_message_size: 1 << 20,
            keepalive_ms: 5,
            broker: b,
        })),
        (any::<u32>(), "\\PC{0,20}").prop_map(|(d, r)| Frame::GoingAway(GoingAway {
            drain_ms: d,
            reason: r,
        })),
        (
            any::<u32>(),
            any::<u32>(),
            prop::option::of("[a-z0-9_-]{1,64}"),
            any::<u32>(),
            1usize..4
        )
            .prop_map(
                |(r, sub, name, window, n)| Frame::SubscribeAcked(SubscribeAcked {
                    request_id: r,
                    sub: SubId(sub),
                    durable: name.map(|n| DurableName::new(&n).unwrap()),
                    window,
                    filters: ["a.+", "b.#", "c", "#"][..n]
                        .iter()
                        .map(|f| TopicFilter::new(f).unwrap())
                        .collect(),
                })
            ),
        (any::<u32>(), any::<u64>(), any::<u16>(), message()).prop_map(|(sub, seq, r, m)| {
            Frame::DeliverAcked(AckedDelivery {
                sub: SubId(sub),
                seq,
                redelivered: r,
                message: m,
            })
        }),
        (
            any::<u32>(),
            prop::collection::vec((0u64..1000, 0u64..1000), 0..8)
        )
            .prop_map(|(sub, r)| Frame::SubAck(SubAck {
                sub: SubId(sub),
                ranges: r.into_iter().map(|(a, b)| (a, a + b)).collect(),
            })),
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(r, sub, delete)| {
            Frame::SubClose(SubClose {
                request_id: r,
                sub: SubId(sub),
                delete,
            })
        }),
        (any::<u32>(), "[a-z0-9_-]{1,64}").prop_map(|(r, n)| Frame::DurableDelete(DurableDelete {
            request_id: r,
            name: DurableName::new(&n).unwrap(),
        })),
        (any::<u32>(), "\\PC{0,20}").prop_map(|(sub, m)| Frame::SubEnd(SubEnd {
            sub: SubId(sub),
            code: ErrorCode::Stalled,
            message: m,
        })),
    ]
}

proptest! {
    #[test]
    fn round_trip(frames in prop::collection::vec(frame(), 1..8)) {
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let dec = FrameDecoder::new(max_frame_len(1 << 20));
        for f in &frames {
            let got = dec.decode(&mut buf).unwrap().unwrap();
            prop_assert_eq!(&got, f);
        }
        prop_assert!(buf.is_empty());
    }

    /// Any realtime messages without reply_to or status, on one topic from one source, make a
    /// run that reads back as the same messages, in order, after any other frames.
    #[test]
    fn runs_round_trip(msgs in prop::collection::vec(message(), 1..12), before in frame()) {
        let topic = msgs[0].topic().clone();
        let msgs: Vec<Message> = msgs
            .into_iter()
            .map(|m| {
                let mut h = m.header().clone();
                (h.qos, h.reply_to, h.status) = (Qos::Realtime, None, None);
                Message::new(topic.clone(), h, m.payload().clone())
            })
            .collect();
        let mut buf = BytesMut::new();
        before.encode(&mut buf);
        buf.extend_from_slice(&run_bytes(&msgs));
        let dec = FrameDecoder::new(max_frame_len(1 << 20));
        let mut cache = DecodeCache::default();
        prop_assert_eq!(dec.decode_cached(&mut buf, &mut cache).unwrap().unwrap(), before);
        let run = match dec.decode_cached(&mut buf, &mut cache).unwrap().unwrap() {
            Frame::PublishRun(run) => run,
            other => panic!("unexpected {other:?}"),
        };
        let got: Vec<Message> = run.messages().map(Result::unwrap).collect();
        prop_assert_eq!(&got, &msgs);
        prop_assert!(buf.is_empty());
        // As DELIVER frames (a client before 1.2, a run of one): the bytes of each message's
        // own DELIVER.
        let mut delivers = BytesMut::new();
        encode_run_as_delivers(&mut delivers, &run);
        let expected: Vec<u8> = msgs.iter().flat_map(|m| encode(&Frame::Deliver(m.clone()))).collect();
        prop_assert_eq!(&delivers[..], &expected[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let dec = FrameDecoder::new(4096);
        let mut cache = DecodeCache::default();
        while let Ok(Some(_)) = dec.decode_cached(&mut buf, &mut cache) {}
    }

    /// One connection's cache (recent topics, last source) changes nothing in what is decoded,
    /// whether strings repeat, differ by one byte or in length, or come in large frames
    /// (whose source is never remembered).
    #[test]
    fn a_connection_cache_decodes_the_same(
        picks in prop::collection::vec((0usize..5, 0usize..3, any::<bool>()), 1..24)
    ) {
        const TOPICS: [&str; 5] = ["a.b", "a.c", "a.b.c", "a.bb", "b.b"];
        const SOURCES: [&str; 3] = ["src", "srd", "source"];
        let frames: Vec<Frame> = picks
            .iter()
            .enumerate()
            .map(|(i, &(t, s, large))| {
                let header = Header {
                    id: MessageId { publisher: 7, sequence: i as u64 },
                    source: ByteStr::from(SOURCES[s]),
                    ..Header::default()
                };
                let payload = Bytes::from(vec![i as u8; if large { 20_000 } else { 10 }]);
                Frame::Deliver(Message::new(Topic::new(TOPICS[t]).unwrap(), header, payload))
            })
            .collect();
        let mut buf = BytesMut::new();
        for f in &frames {
            f.encode(&mut buf);
        }
        let dec = FrameDecoder::new(max_frame_len(1 << 20));
        let mut cache = DecodeCache::default();
        for f in &frames {
            let got = dec.decode_cached(&mut buf, &mut cache).unwrap().unwrap();
            prop_assert_eq!(&got, f);
        }
    }
}

#[test]
fn a_cached_topic_does_not_let_an_invalid_one_through() {
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    let mut cache = DecodeCache::default();
    let good = Frame::Publish(Message::new(
        Topic::new("a.bc").unwrap(),
        Header::default(),
        Bytes::new(),
    ));
    let mut buf = BytesMut::from(&encode(&good)[..]);
    assert_eq!(
        dec.decode_cached(&mut buf, &mut cache).unwrap().unwrap(),
        good
    );
    // The same frame with the topic's last byte changed to a wildcard: same length, so only
    // the comparison stands between it and the cached topic.
    let mut bad = encode(&good);
    let at = bad.windows(4).position(|w| w == b"a.bc").unwrap();
    bad[at + 3] = b'#';
    let mut buf = BytesMut::from(&bad[..]);
    assert!(matches!(
        dec.decode_cached(&mut buf, &mut cache),
        Err(FrameError::Topic(_))
    ));
}

#[test]
fn publish_head_plus_payload_equals_publish() {
    use daemoneye_eventbus_core::codec::{encode_publish, encode_publish_head};
    let topic = Topic::new("a.b").unwrap();
    let header = Header {
        source: ByteStr::from("p"),
        ..Header::default()
    };
    let payload = vec![7u8; 70_000];
    let mut whole = BytesMut::new();
    encode_publish(&mut whole, &topic, &header, &payload);
    let mut split = BytesMut::new();
    encode_publish_head(&mut split, &topic, &header, payload.len());
    split.extend_from_slice(&payload);
    assert_eq!(whole, split);
}

#[test]
fn carved_frames_read_the_same_and_their_chunk_is_reused_once_they_are_gone() {
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    let msgs = [simple_message(b"one"), simple_message(b"two")];
    let mut wire = BytesMut::new();
    for m in &msgs {
        Frame::Deliver(m.clone()).encode(&mut wire);
    }
    // A frame above the copy threshold is sliced from the read buffer, never carved.
    let large = Message::new(
        Topic::new("a.b").unwrap(),
        msgs[0].header().clone(),
        Bytes::from(vec![7u8; 20 * 1024]),
    );
    Frame::Deliver(large.clone()).encode(&mut wire);
    let mut cache = DecodeCache::carving();
    let mut read = Vec::new();
    while let Some(f) = dec.decode_cached(&mut wire, &mut cache).unwrap() {
        match f {
            Frame::Deliver(m) => read.push(m),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(read, [msgs[0].clone(), msgs[1].clone(), large]);
    // The two small frames sit side by side in one chunk.
    let (first, second) = (read[0].wire().as_ptr(), read[1].wire().as_ptr());
    assert_eq!(second as usize - first as usize, read[0].wire().len());
    drop(read);
    // Frames read and dropped one by one fill the chunk: once every frame carved from it is
    // gone, the next one that does not fit is carved from its start again.
    let mut wire = BytesMut::new();
    while wire.len() < 2 * daemoneye_eventbus_core::codec::CARVE_CHUNK {
        Frame::Deliver(msgs[1].clone()).encode(&mut wire);
    }
    let mut starts = 0;
    while let Some(f) = dec.decode_cached(&mut wire, &mut cache).unwrap() {
        let Frame::Deliver(m) = f else {
            panic!("a delivery")
        };
        assert_eq!(m, msgs[1]);
        starts += usize::from(m.wire().as_ptr() == first);
    }
    assert!(starts >= 1, "the chunk was reclaimed in place");
}

#[test]
fn an_owned_lent_message_is_copied_in_place_once_and_kept_by_reference() {
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    let mut buf = BytesMut::with_capacity(4096);
    let sent = simple_message(b"processed");
    Frame::Publish(sent.clone()).encode(&mut buf);
    let within = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
    let mut cache = DecodeCache::lending();
    let Some(LentFrame::Publish(mut m)) = dec.decode_lent(&mut buf, &mut cache).unwrap() else {
        panic!("a publish")
    };
    assert!(m.shares_buffer());
    m.own();
    assert!(!m.shares_buffer());
    let (a, b) = (m.keep(), m.keep());
    assert!(
        !within.contains(&(a.wire().as_ptr() as usize)),
        "its own buffer"
    );
    assert_eq!(a.wire().as_ptr(), b.wire().as_ptr(), "kept by reference");
    assert_eq!(a, sent);
    drop(m);
    assert!(buf.try_reclaim(4096), "nothing holds the read buffer");
}

#[test]
fn a_charged_keep_is_one_copy_for_every_keeper_and_its_charge_lasts_as_long_as_it() {
    use daemoneye_eventbus_core::{Budget, Charge};
    use std::sync::Arc;
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    let mut buf = BytesMut::with_capacity(4096);
    let plain = simple_message(b"one");
    Frame::Publish(plain.clone()).encode(&mut buf);
    buf.extend_from_slice(&run_bytes(&[plain.clone(), simple_message(b"two")]));
    let mut cache = DecodeCache::lending();
    let budget = Arc::new(Budget::new(1 << 20));
    let mut kept = Vec::new();
    while let Some(f) = dec.decode_lent(&mut buf, &mut cache).unwrap() {
        match f {
            LentFrame::Publish(m) => {
                let (a, b) = (
                    m.keep_charged(&budget).unwrap(),
                    m.keep_charged(&budget).unwrap(),
                );
                assert!(a.is_charged() && a.wire().as_ptr() == b.wire().as_ptr());
                assert_eq!(budget.used(), m.accounted_size(), "charged once");
                assert!(!m.keep().is_charged(), "a plain keep is a copy of its own");
                kept.push(a);
            }
            LentFrame::PublishRun(r) => {
                let before = budget.used();
                let (a, b) = (
                    r.keep_charged(&budget).unwrap(),
                    r.keep_charged(&budget).unwrap(),
                );
                assert!(a.is_charged() && a.wire().as_ptr() == b.wire().as_ptr());
                assert_eq!(budget.used() - before, r.accounted_size());
                drop((a, b));
                assert!(budget.used() > before, "the lent run still holds its copy");
                drop(r);
                assert_eq!(budget.used(), before, "the run's last clone gave it back");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(kept, [plain]);
    drop(kept);
    assert_eq!(budget.used(), 0, "the message's last clone gave it back");
    // No room: refused, and a later try (with room) succeeds.
    let full = Arc::new(Budget::new(10));
    let hold = Charge::take(&full, 10).unwrap();
    Frame::Publish(simple_message(b"x")).encode(&mut buf);
    let Some(LentFrame::Publish(m)) = dec.decode_lent(&mut buf, &mut cache).unwrap() else {
        panic!("a publish")
    };
    assert!(m.keep_charged(&full).is_none());
    drop(hold);
    let big = Arc::new(Budget::new(1 << 20));
    assert!(m.keep_charged(&big).unwrap().is_charged());
    // A value that shares no buffer is returned as it is, uncharged.
    let owned = daemoneye_eventbus_core::codec::Lent::owned(simple_message(b"y"));
    assert!(!owned.keep_charged(&big).unwrap().is_charged());
}

#[test]
fn lent_frames_stay_in_the_read_buffer_and_kept_copies_keep_nothing_of_it() {
    let dec = FrameDecoder::new(max_frame_len(1 << 20));
    // A request on an inbox topic, with a reply topic: every field that could be a slice.
    let request = Message::new(
        Topic::new("_inbox.c.1").unwrap(),
        Header {
            reply_to: Some(Topic::new("_inbox.c.2").unwrap()),
            ..simple_message(b"").header().clone()
        },
        Bytes::from_static(b"ask"),
    );
    let plain = simple_message(b"one");
    let in_run = [plain.clone(), simple_message(b"two")];
    let mut buf = BytesMut::with_capacity(4096);
    Frame::Publish(request.clone()).encode(&mut buf);
    Frame::Publish(plain.clone()).encode(&mut buf);
    buf.extend_from_slice(&run_bytes(&in_run));
    let within = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
    let outside = |m: &Message| !within.contains(&(m.payload().as_ptr() as usize));
    let mut cache = DecodeCache::lending();
    let (mut kept, mut runs) = (Vec::new(), Vec::new());
    while let Some(f) = dec.decode_lent(&mut buf, &mut cache).unwrap() {
        match f {
            LentFrame::Publish(m) => {
                assert!(m.shares_buffer());
                let copy = m.keep();
                assert!(outside(&copy));
                assert_eq!(copy.wire().len(), m.wire_len());
                kept.push(copy);
            }
            LentFrame::PublishRun(r) => {
                assert!(r.shares_buffer());
                for m in r.messages() {
                    let m = m.unwrap();
                    assert!(m.shares_buffer());
                    let copy = m.keep();
                    assert!(outside(&copy));
                    kept.push(copy);
                }
                let copy = r.keep();
                assert_eq!(copy.wire().len(), r.wire_len());
                assert!(!within.contains(&(copy.wire().as_ptr() as usize)));
                runs.push(copy);
            }
            other => panic!("{other:?}"),
        }
    }
    let expected = [&[request, plain][..], &in_run[..]].concat();
    assert_eq!(kept, expected);
    assert_eq!(runs.len(), 1);
    // With only the copies alive, the read buffer is reused in place.
    assert!(buf.try_reclaim(4096), "a copy still holds the read buffer");
    // Frames above the copy threshold are slices whatever the reader, and never lent: keeping
    // one copies nothing.
    let large = Message::new(
        Topic::new("a.b").unwrap(),
        Header::default(),
        Bytes::from(vec![7u8; 20 * 1024]),
    );
    Frame::Publish(large).encode(&mut buf);
    match dec.decode_lent(&mut buf, &mut cache).unwrap() {
        Some(LentFrame::Publish(m)) => {
            assert!(!m.shares_buffer());
            let (a, b) = (m.keep(), m.keep());
            assert_eq!(a.payload().as_ptr(), b.payload().as_ptr());
        }
        other => panic!("{other:?}"),
    }
    // Other readers never lend.
    Frame::Publish(simple_message(b"x")).encode(&mut buf);
    match dec
        .decode_lent(&mut buf, &mut DecodeCache::default())
        .unwrap()
    {
        Some(LentFrame::Publish(m)) => assert!(!m.shares_buffer()),
        other => panic!("{other:?}"),
    }
    // Deliveries are never lent, even by a lending reader: what holds them is a copy.
    buf.clear();
    Frame::Deliver(simple_message(b"d")).encode(&mut buf);
    let within = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
    match dec.decode_lent(&mut buf, &mut cache).unwrap() {
        Some(LentFrame::Other(Frame::Deliver(m))) => {
            assert!(!within.contains(&(m.payload().as_ptr() as usize)));
            assert_eq!(m.payload().as_ref(), b"d");
        }
        other => panic!("{other:?}"),
    }
}
