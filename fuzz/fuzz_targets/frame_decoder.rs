//! Feeds arbitrary bytes to a `FrameDecoder` and checks, for every frame decoded, that
//! encoding it and decoding the result gives back an equal frame. The stream is decoded as
//! one connection's (with a `DecodeCache`), the round trip without one, so the cache is
//! checked against plain decoding. The messages of a run are read back: all of them for a
//! PUBLISH_RUN (checked whole by the decoder), and again from the run split into DELIVER
//! frames; up to the first error for a DELIVER_RUN. Must never panic.
#![no_main]

use bytes::BytesMut;
use daemoneye_eventbus_core::{Frame, FrameDecoder};
use daemoneye_eventbus_core::codec::{DecodeCache, encode_run_as_delivers};
use libfuzzer_sys::fuzz_target;

/// Small frame limit so the fuzzer explores `TooLarge` and keeps allocations bounded.
const MAX_FRAME_LEN: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut buf = BytesMut::from(data);
    let mut cache = DecodeCache::default();
    loop {
        let frame = match decoder.decode_cached(&mut buf, &mut cache) {
            Ok(Some(frame)) => frame,
            // Needs more bytes, or the stream is no longer trustworthy: stop either way.
            Ok(None) | Err(_) => break,
        };

        match &frame {
            Frame::PublishRun(run) => {
                let mut size = 0;
                let mut delivers = BytesMut::new();
                encode_run_as_delivers(&mut delivers, run);
                for m in run.messages() {
                    let m = m.unwrap_or_else(|e| panic!("a checked run has a bad message: {e}"));
                    size += m.accounted_size();
                    match decoder.decode(&mut delivers) {
                        Ok(Some(Frame::Deliver(d))) => {
                            assert_eq!((d.topic(), d.header()), (m.topic(), m.header()));
                            assert_eq!(d.payload(), m.payload());
                        }
                        other => panic!("a run message as a DELIVER read back as {other:?}"),
                    }
                }
                assert!(delivers.is_empty(), "one DELIVER per message");
                assert_eq!(size, run.accounted_size(), "run accounting differs");
            }
            Frame::DeliverRun(run) => {
                assert!(run.messages().map_while(Result::ok).count() <= run.len());
                // Lengths were checked: splitting into DELIVER frames never panics.
                encode_run_as_delivers(&mut BytesMut::new(), run);
            }
            _ => {}
        }

        // Round trip: encode, then decode with the same limit.
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded);
        let encoded_bytes = encoded.clone().freeze();
        let again = decoder
            .decode(&mut encoded)
            .unwrap_or_else(|e| panic!("re-encoded frame failed to decode: {e}; frame: {frame:?}"))
            .unwrap_or_else(|| panic!("re-encoded frame is incomplete; frame: {frame:?}"));
        assert!(
            encoded.is_empty(),
            "{} trailing bytes after re-encoded frame {frame:?}",
            encoded.len()
        );
        assert_eq!(frame, again, "round trip changed the frame");

        // Encoding is canonical: encoding the round-tripped frame gives the same bytes.
        let mut encoded2 = BytesMut::new();
        again.encode(&mut encoded2);
        assert_eq!(
            encoded_bytes,
            encoded2.freeze(),
            "re-encoding is not stable for {frame:?}"
        );
    }
});
