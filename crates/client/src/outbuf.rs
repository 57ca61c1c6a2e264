//! The client's outgoing queue: encoded bytes for byte-stream transports, frames for
//! in-process ones (so payloads are never serialised there).
//!
//! Large payloads (at least [`VECTORED_MIN`] bytes) are not copied into the encoded buffer:
//! only their frame head is encoded, and the caller's `Bytes` follows as its own `writev`
//! segment.
//!
//! Consecutive publishes of one QoS on one topic that queue up while the writer is busy join
//! one PUBLISH_RUN frame (protocol 1.2; Processed ones since 1.4), which the broker routes
//! once for all of them. A publish that finds the queue empty starts a run of its own, so
//! nothing waits for a run to fill; a Processed one waits as a plain PUBLISH until a second
//! joins it.

use bytes::{Bytes, BytesMut};
use daemoneye_eventbus_core::codec::{RunWriter, encode_publish, encode_publish_head, may_run};
use daemoneye_eventbus_core::message::MESSAGE_OVERHEAD;
use daemoneye_eventbus_core::{Frame, Header, Message, Qos, Topic};
use daemoneye_eventbus_transport::{FrameWriter, VECTORED_MIN};
use std::mem;

pub(crate) enum Buf {
    /// Encoded frames, and the large payloads that go between them: each payload follows
    /// the first `offset` bytes of `head` (offsets ascending).
    Encoded {
        head: BytesMut,
        payloads: Vec<(usize, Bytes)>,
        /// What the end of `head` holds that the next publish on its topic may join.
        tail: Tail,
    },
    Frames(Vec<Frame>),
}

/// Largest buffer kept for reuse between batches.
const MAX_SPARE: usize = 1 << 20;

/// A run takes no more messages once its frame would pass this size: it stays below the
/// receiver's copy threshold (16 KiB), and a drop of the oldest queued run under a
/// subscriber's slow-reader policy never takes more than a few dozen messages at once.
const RUN_TARGET: usize = 15 * 1024;

/// Room assumed for a message's header when deciding whether it still fits a run.
const HEADER_ROOM: usize = 128;

/// The end of an encoded buffer, as far as the next publish goes.
pub(crate) enum Tail {
    /// Nothing a publish may join.
    Closed,
    /// A run, open for more messages of its QoS on its topic.
    Run(RunWriter),
    /// A lone Processed PUBLISH frame from this offset: alone, it goes as a PUBLISH (the
    /// broker routes, keeps and acknowledges one message with less work than a run of one);
    /// the next Processed publish on its topic turns it into a run.
    Single(usize),
}

/// Where a PUBLISH or PUBLISH_RUN frame's topic starts: after the length prefix, the kind and
/// the topic's length.
const TOPIC_AT: usize = 4 + 1 + 2;

/// Whether the frame at `start` of `head` is on `topic`.
fn frame_is_on(head: &[u8], start: usize, topic: &Topic) -> bool {
    let t = topic.as_str().as_bytes();
    let len = u16::try_from(t.len()).unwrap_or(u16::MAX).to_le_bytes();
    head.get(start + TOPIC_AT - 2..start + TOPIC_AT) == Some(&len[..])
        && head.get(start + TOPIC_AT..start + TOPIC_AT + t.len()) == Some(t)
}

/// Which messages the broker reads in runs (from its protocol minor version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runs {
    /// None (before 1.2): every message goes alone.
    None,
    /// Realtime messages (1.2, 1.3).
    Realtime,
    /// Realtime and Processed messages (1.4).
    AnyQos,
}

impl Runs {
    /// What a broker of protocol minor `minor` reads.
    pub(crate) fn of_minor(minor: u16) -> Self {
        use daemoneye_eventbus_core::codec::{PROCESSED_RUNS_SINCE_MINOR, RUNS_SINCE_MINOR};
        if minor >= PROCESSED_RUNS_SINCE_MINOR {
            Self::AnyQos
        } else if minor >= RUNS_SINCE_MINOR {
            Self::Realtime
        } else {
            Self::None
        }
    }
}

/// What is waiting to be written.
pub(crate) struct OutBuf {
    buf: Buf,
    /// Bytes accounted against `outbox_bytes` / `connected_outbox_bytes`.
    pub(crate) bytes: usize,
    /// Publishes waiting (lost if the connection dies while they are written).
    pub(crate) publishes: u64,
    /// Of them, Processed publishes also kept until acknowledged (sent again after a
    /// reconnect, so never lost with a failed write).
    pub(crate) kept: u64,
    /// Frames waiting.
    pub(crate) frames: u64,
}

impl OutBuf {
    pub(crate) fn new(in_process: bool) -> Self {
        let buf = if in_process {
            Buf::Frames(Vec::new())
        } else {
            Buf::Encoded {
                head: BytesMut::new(),
                payloads: Vec::new(),
                tail: Tail::Closed,
            }
        };
        Self {
            buf,
            bytes: 0,
            publishes: 0,
            kept: 0,
            frames: 0,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// An empty buffer of the same kind.
    fn empty_like(&self) -> Self {
        Self::new(matches!(self.buf, Buf::Frames(_)))
    }

    /// Queues a publish; `runs`: which message runs the broker reads.
    pub(crate) fn push_publish(
        &mut self,
        topic: &Topic,
        header: &Header,
        payload: &Bytes,
        runs: Runs,
    ) {
        self.bytes += payload.len() + topic.as_str().len() + MESSAGE_OVERHEAD;
        match &mut self.buf {
            Buf::Encoded {
                head,
                payloads,
                tail,
            } if payload.len() >= VECTORED_MIN => {
                *tail = Tail::Closed;
                encode_publish_head(head, topic, header, payload.len());
                payloads.push((head.len(), payload.clone()));
            }
            Buf::Encoded { head, tail, .. }
                if runs != Runs::None && may_run(header, runs == Runs::AnyQos) =>
            {
                let qos = header.qos;
                let fits =
                    |start: usize| head.len() - start + HEADER_ROOM + payload.len() <= RUN_TARGET;
                match tail {
                    Tail::Run(r)
                        if r.is_on(head, topic, qos) && r.has_room() && fits(r.start()) =>
                    {
                        r.push(head, header, payload);
                    }
                    Tail::Single(start) if frame_is_on(head, *start, topic) && fits(*start) => {
                        let mut r = RunWriter::from_publish(head, *start, qos);
                        r.push(head, header, payload);
                        *tail = Tail::Run(r);
                    }
                    _ if qos == Qos::Processed => {
                        *tail = Tail::Single(head.len());
                        encode_publish(head, topic, header, payload);
                    }
                    _ => {
                        let mut r = RunWriter::begin(head, topic, qos);
                        r.push(head, header, payload);
                        *tail = Tail::Run(r);
                    }
                }
            }
            Buf::Encoded { head, tail, .. } => {
                *tail = Tail::Closed;
                encode_publish(head, topic, header, payload);
            }
            Buf::Frames(f) => f.push(Frame::Publish(Message::new(
                topic.clone(),
                header.clone(),
                payload.clone(),
            ))),
        }
        self.publishes += 1;
        self.frames += 1;
    }

    pub(crate) fn push_frame(&mut self, frame: Frame) {
        match &mut self.buf {
            Buf::Encoded { head, tail, .. } => {
                *tail = Tail::Closed;
                let before = head.len();
                frame.encode(head);
                self.bytes += head.len() - before;
            }
            Buf::Frames(f) => {
                self.bytes += 64;
                f.push(frame);
            }
        }
        self.frames += 1;
    }

    /// Takes everything, leaving an empty buffer that reuses `spare`'s memory (the buffer
    /// [`OutBuf::write_into`] gave back last time), so a busy publisher does not grow a fresh
    /// buffer for every batch.
    pub(crate) fn take(&mut self, spare: Option<BytesMut>) -> Self {
        let mut empty = self.empty_like();
        if let (Buf::Encoded { head, .. }, Some(mut spare)) = (&mut empty.buf, spare)
            && spare.capacity() <= MAX_SPARE
        {
            spare.clear();
            *head = spare;
        }
        mem::replace(self, empty)
    }

    /// Hands the contents to a connection writer; returns an empty buffer to reuse.
    pub(crate) fn write_into(self, writer: &mut FrameWriter) -> Option<BytesMut> {
        const HOLDS: &str = "the client's own buffer holds only complete frames";
        match self.buf {
            Buf::Encoded {
                mut head, payloads, ..
            } => {
                let mut written = 0;
                for (offset, payload) in payloads {
                    let mut part = head.split_to(offset - written);
                    written = offset;
                    writer.push_encoded(&mut part).expect(HOLDS);
                    writer
                        .push_segment(payload)
                        .expect("byte streams take segments");
                }
                // Swapped with the writer's empty buffer, or copied and cleared: empty either
                // way, with memory to reuse.
                writer.push_encoded(&mut head).expect(HOLDS);
                Some(head)
            }
            Buf::Frames(frames) => {
                for f in &frames {
                    writer.push(f);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use daemoneye_eventbus_core::codec::{FrameDecoder, max_frame_len};
    use daemoneye_eventbus_core::{ByteStr, Qos};

    fn header(qos: Qos) -> Header {
        Header {
            qos,
            source: ByteStr::from("p"),
            ..Header::default()
        }
    }

    /// The frames queued, as (kind, messages) pairs.
    fn frames(buf: &mut OutBuf) -> Vec<(&'static str, usize)> {
        let Buf::Encoded { head, .. } = &mut buf.buf else {
            unreachable!("a byte-stream buffer")
        };
        let dec = FrameDecoder::new(max_frame_len(1 << 20));
        let mut out = Vec::new();
        while let Some(f) = dec.decode(head).unwrap() {
            out.push(match f {
                Frame::Publish(_) => ("publish", 1),
                Frame::PublishRun(r) => ("run", r.len()),
                _ => ("other", 0),
            });
        }
        out
    }

    #[test]
    fn queued_realtime_publishes_on_one_topic_form_runs() {
        let (a, b) = (Topic::new("a").unwrap(), Topic::new("b").unwrap());
        let mut buf = OutBuf::new(false);
        let x = || Bytes::from_static(b"x");
        for _ in 0..3 {
            buf.push_publish(&a, &header(Qos::Realtime), &x(), Runs::Realtime);
        }
        buf.push_publish(&b, &header(Qos::Realtime), &x(), Runs::Realtime);
        // A Processed message stays alone for a broker before 1.4, and ends the run before it.
        buf.push_publish(&b, &header(Qos::Processed), &x(), Runs::Realtime);
        buf.push_publish(&b, &header(Qos::Realtime), &x(), Runs::Realtime);
        // So does a control frame: frames keep their order.
        buf.push_frame(Frame::Ping(1));
        buf.push_publish(&b, &header(Qos::Realtime), &x(), Runs::Realtime);
        assert_eq!((buf.publishes, buf.frames), (7, 8));
        assert_eq!(
            frames(&mut buf),
            [
                ("run", 3),
                ("run", 1),
                ("publish", 1),
                ("run", 1),
                ("other", 0),
                ("run", 1)
            ]
        );
    }

    #[test]
    fn processed_publishes_form_runs_of_their_own_for_a_broker_of_1_4() {
        let a = Topic::new("a").unwrap();
        let mut buf = OutBuf::new(false);
        let x = || Bytes::from_static(b"x");
        for qos in [
            Qos::Processed,
            Qos::Processed,
            Qos::Realtime,
            Qos::Processed,
        ] {
            buf.push_publish(&a, &header(qos), &x(), Runs::AnyQos);
        }
        let mut request = header(Qos::Processed);
        request.reply_to = Some(Topic::new("_inbox.x").unwrap());
        buf.push_publish(&a, &request, &x(), Runs::AnyQos);
        // A lone Processed publish goes as a PUBLISH; the next on its topic makes it a run.
        assert_eq!(
            frames(&mut buf),
            [("run", 2), ("run", 1), ("publish", 1), ("publish", 1)]
        );
        let b = Topic::new("b").unwrap();
        let mut buf = OutBuf::new(false);
        for t in [&a, &b, &b, &b] {
            buf.push_publish(t, &header(Qos::Processed), &x(), Runs::AnyQos);
        }
        buf.push_frame(Frame::Ping(1));
        buf.push_publish(&b, &header(Qos::Processed), &x(), Runs::AnyQos);
        let decoded = frames(&mut buf);
        assert_eq!(
            decoded,
            [("publish", 1), ("run", 3), ("other", 0), ("publish", 1)]
        );
        assert_eq!(Runs::of_minor(4), Runs::AnyQos);
        assert_eq!(Runs::of_minor(3), Runs::Realtime);
        assert_eq!(Runs::of_minor(1), Runs::None);
    }

    #[test]
    fn runs_stay_small_and_wait_for_a_broker_that_reads_them() {
        let a = Topic::new("a").unwrap();
        let mut buf = OutBuf::new(false);
        for _ in 0..100 {
            let payload = Bytes::from(vec![0; 1000]);
            buf.push_publish(&a, &header(Qos::Realtime), &payload, Runs::Realtime);
        }
        let runs = frames(&mut buf);
        assert_eq!(runs.iter().map(|r| r.1).sum::<usize>(), 100);
        assert!(runs.len() >= 7, "{runs:?}");
        let mut old = OutBuf::new(false);
        for _ in 0..3 {
            old.push_publish(
                &a,
                &header(Qos::Realtime),
                &Bytes::from_static(b"x"),
                Runs::None,
            );
        }
        assert_eq!(frames(&mut old), [("publish", 1); 3]);
    }
}
