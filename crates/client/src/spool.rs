//! Store-and-forward (`ClientOptions::spool_dir`): Processed publishes made while the broker
//! is unreachable go to a log on disk (`daemoneye-eventbus-store`, the broker's log code)
//! instead of memory, and are handed to the next connection in order; what a process leaves
//! in its spool (it was killed, or closed while disconnected), the next client on the same
//! spool sends when it connects.
//!
//! Records: [`KIND_PUBLISH`], one PUBLISH frame (the publish as first made); [`KIND_DONE`],
//! a record sequence number below which every publish record was acknowledged by a broker
//! (or dropped by [`SpoolFull::DropOldest`]).

use crate::options::SpoolFull;
use bytes::BytesMut;
use daemoneye_eventbus_core::codec::{DecodeCache, LEN_PREFIX, encode_message_frame, kind};
use daemoneye_eventbus_core::{Frame, Message};
use daemoneye_eventbus_store::{Log, LogOptions, StoreError};
use std::collections::VecDeque;
use std::path::Path;

const KIND_PUBLISH: u8 = 1;
const KIND_DONE: u8 = 2;

/// Segments of a spool: small, so that space is given back soon after a handover.
const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// Why a publish was not spooled.
#[derive(Debug)]
pub(crate) enum NotSpooled {
    /// The spool is full and its policy refuses new publishes.
    Full,
    /// The log could not be written.
    Store(StoreError),
}

/// A spooled publish: the message, and the record holding it.
struct Spooled {
    msg: Message,
    record: u64,
}

/// See the module documentation.
pub(crate) struct Spool {
    log: Log,
    /// Spooled and not yet handed to a connection, in order.
    pending: VecDeque<Spooled>,
    /// Charged bytes of `pending` (as `Message::accounted_size`).
    bytes: usize,
    max_bytes: usize,
    full: SpoolFull,
    /// The publish sequence number of the last spooled publish handed to a connection and
    /// not yet acknowledged, with the record sequence the log is done with once it is.
    handed: Option<(u64, u64)>,
    scratch: BytesMut,
}

impl Spool {
    /// Opens the spool in `dir`; returns it and the publishes an earlier client left in it,
    /// in order (to send again).
    pub(crate) fn open(
        dir: &Path,
        max_bytes: usize,
        full: SpoolFull,
    ) -> Result<(Self, Vec<Message>), StoreError> {
        let mut cache = DecodeCache::default();
        let mut left: Vec<(u64, Message)> = Vec::new();
        let options = LogOptions {
            segment_bytes: SEGMENT_BYTES,
        };
        let (log, _recovery) = Log::open(dir, options, |r| match r.kind {
            KIND_PUBLISH => {
                let frame = r.body_bytes();
                let c = r.body;
                let whole = c.len() > LEN_PREFIX
                    && u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize + LEN_PREFIX
                        == c.len()
                    && c[LEN_PREFIX] == kind::PUBLISH;
                if whole
                    && let Ok(Frame::Publish(m)) = Frame::decode_cached(
                        kind::PUBLISH,
                        frame.slice(LEN_PREFIX + 1..),
                        &mut cache,
                    )
                {
                    left.push((r.seq, m));
                }
            }
            KIND_DONE => {
                if let Some(done) = r.body.first_chunk::<8>().map(|b| u64::from_le_bytes(*b)) {
                    left.retain(|(seq, _)| *seq >= done);
                }
            }
            _ => {}
        })?;
        let mut spool = Self {
            log,
            pending: VecDeque::new(),
            bytes: 0,
            max_bytes,
            full,
            handed: None,
            scratch: BytesMut::new(),
        };
        if left.is_empty() {
            // Nothing owed: give the space back.
            spool.forget_all()?;
        }
        Ok((spool, left.into_iter().map(|(_, m)| m).collect()))
    }

    /// Keeps `msg` on disk (written to the operating system before this returns: it survives
    /// this process being killed) until a connection takes it. Returns how many older
    /// publishes the full policy dropped.
    pub(crate) fn push(&mut self, msg: Message) -> Result<u64, NotSpooled> {
        let size = msg.accounted_size();
        let mut dropped = 0;
        while !self.pending.is_empty() && self.bytes + size > self.max_bytes {
            match self.full {
                SpoolFull::Refuse => return Err(NotSpooled::Full),
                SpoolFull::DropOldest => {
                    let old = self.pending.pop_front().expect("not empty");
                    self.bytes -= old.msg.accounted_size();
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            let done = self
                .pending
                .front()
                .map_or(self.log.next_seq(), |s| s.record);
            self.mark_done(done).map_err(NotSpooled::Store)?;
        }
        self.scratch.clear();
        encode_message_frame(&mut self.scratch, kind::PUBLISH, &msg);
        let record = self
            .log
            .append(KIND_PUBLISH, &self.scratch)
            .map_err(NotSpooled::Store)?;
        self.log.flush().map_err(NotSpooled::Store)?;
        self.bytes += size;
        self.pending.push_back(Spooled { msg, record });
        Ok(dropped)
    }

    /// Hands every waiting publish to a connection, in order; the spool forgets them once a
    /// broker acknowledges the last ([`Spool::acked_through`]).
    pub(crate) fn take(&mut self) -> Vec<Message> {
        let msgs: Vec<Message> = self.pending.drain(..).map(|s| s.msg).collect();
        self.bytes = 0;
        if let Some(last) = msgs.last() {
            self.handed = Some((last.id().sequence, self.log.next_seq()));
        }
        msgs
    }

    /// Hands over publishes left by an earlier client, renumbered by this one (`msgs`, in
    /// order, last sequence `through`): forgotten like [`Spool::take`]'s.
    pub(crate) fn handed_over(&mut self, through: u64) {
        self.handed = Some((through, self.log.next_seq()));
    }

    /// The broker acknowledged this client's publishes up to sequence `seq`: once that covers
    /// what was handed over, the log is done with it.
    pub(crate) fn acked_through(&mut self, seq: u64) -> Result<(), StoreError> {
        match self.handed {
            Some((through, done)) if seq >= through => {
                self.handed = None;
                if self.pending.is_empty() {
                    self.forget_all()
                } else {
                    self.mark_done(done)
                }
            }
            _ => Ok(()),
        }
    }

    fn mark_done(&mut self, done: u64) -> Result<(), StoreError> {
        self.log.append(KIND_DONE, &done.to_le_bytes())?;
        self.log.flush()?;
        self.log.remove_segments_before(done).map(|_| ())
    }

    /// Nothing is owed any more: the log keeps only a record saying so.
    fn forget_all(&mut self) -> Result<(), StoreError> {
        let done = self.log.next_seq();
        self.mark_done(done)?;
        while self.log.segments().count() > 1 {
            self.log.remove_oldest_segment()?;
        }
        Ok(())
    }

    /// Charged bytes waiting.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Publishes waiting for a connection.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daemoneye_eventbus_core::{ByteStr, Header, MessageId, Qos, Topic};

    fn publish(n: u64) -> Message {
        Message::new(
            Topic::new("t").unwrap(),
            Header {
                id: MessageId {
                    publisher: 9,
                    sequence: n,
                },
                source: ByteStr::from("c"),
                qos: Qos::Processed,
                ..Header::default()
            },
            Bytes::from(vec![n as u8; 100]),
        )
    }

    fn seqs(msgs: &[Message]) -> Vec<u64> {
        msgs.iter().map(|m| m.id().sequence).collect()
    }

    #[test]
    fn spooled_publishes_outlive_the_process_until_acknowledged() {
        let dir = std::env::temp_dir().join(format!("eb-spool-{}", std::process::id()));
        let one = publish(1).accounted_size();
        {
            let (mut s, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse).unwrap();
            assert!(left.is_empty());
            for n in 1..=3 {
                assert_eq!(s.push(publish(n)).unwrap(), 0);
            }
            assert!(matches!(s.push(publish(4)), Err(NotSpooled::Full)));
            // The process ends with all three owed.
        }
        let (mut s, left) = Spool::open(&dir, 3 * one, SpoolFull::DropOldest).unwrap();
        assert_eq!(seqs(&left), [1, 2, 3], "left for the next client, in order");
        s.handed_over(13);
        for n in 14..=16 {
            s.push(publish(n)).unwrap();
        }
        // Full: the oldest spooled goes.
        assert_eq!(s.push(publish(17)).unwrap(), 1);
        // Acknowledged through 13: the earlier client's three are done with.
        s.acked_through(13).unwrap();
        let handed = s.take();
        assert_eq!(seqs(&handed), [15, 16, 17]);
        drop(s);
        let (mut s, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse).unwrap();
        assert_eq!(
            seqs(&left),
            [15, 16, 17],
            "handed, not acknowledged: owed still"
        );
        s.handed_over(17);
        s.acked_through(17).unwrap();
        drop(s);
        let (_, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse).unwrap();
        assert!(left.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
