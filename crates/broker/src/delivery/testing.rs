//! Messages and runs for the delivery layer's unit tests.

use super::Kept;
use bytes::{Bytes, BytesMut};
use daemoneye_eventbus_core::codec::{FrameDecoder, RunWriter, max_frame_len};
use daemoneye_eventbus_core::{ByteStr, Frame, Header, Message, MessageId, Qos, Topic};

/// Message number `n` (its sequence; its payload the number's bytes), Processed, on `t`.
pub(crate) fn message(n: u64) -> Message {
    Message::new(
        Topic::new("t").expect("a valid topic"),
        Header {
            id: MessageId {
                publisher: 1,
                sequence: n,
            },
            source: ByteStr::from("p"),
            qos: Qos::Processed,
            ..Header::default()
        },
        Bytes::from(n.to_le_bytes().to_vec()),
    )
}

/// A run of the messages numbered `ns`, as a broker decodes it from a PUBLISH_RUN.
pub(crate) fn run(ns: std::ops::RangeInclusive<u64>) -> Kept {
    let mut b = BytesMut::new();
    let mut w = RunWriter::begin(
        &mut b,
        &Topic::new("t").expect("a valid topic"),
        Qos::Processed,
    );
    for n in ns {
        let m = message(n);
        w.push(&mut b, m.header(), m.payload());
    }
    match FrameDecoder::new(max_frame_len(1 << 20)).decode(&mut b) {
        Ok(Some(Frame::PublishRun(r))) => Kept::Run(r),
        other => panic!("not a run: {other:?}"),
    }
}
