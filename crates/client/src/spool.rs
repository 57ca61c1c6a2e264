//! Store-and-forward (`ClientOptions::spool_dir`): Processed publishes made while the broker
//! is unreachable go to a log on disk (`daemoneye-eventbus-store`, the broker's log code)
//! instead of memory, and are handed to the next connection in order; what a process leaves
//! in its spool (it was killed, or closed while disconnected), the next client on the same
//! spool sends when it connects.
//!
//! Records: [`KIND_PUBLISH`], one PUBLISH frame (the publish as first made); [`KIND_DONE`],
//! a record sequence number below which every publish record was acknowledged by a broker
//! (or dropped by [`SpoolFull::DropOldest`]); [`KIND_ID`], the publisher identity of the
//! clients on this spool (the last one holds).
//!
//! **Identity.** The clients that use one spool, one after another, are one publisher: each
//! takes the publisher id of the last and a new *generation*, the high bits of its message
//! sequence numbers ([`GENERATION_SHIFT`]). So what one client left in the spool is sent by
//! the next with its ids unchanged (a copy a broker got before the crash is recognised as a
//! duplicate by its id), and the next client's own publishes, numbered in a later generation,
//! never take an id its predecessor used.

use crate::options::SpoolFull;
use bytes::BytesMut;
use daemoneye_eventbus_core::codec::{DecodeCache, LEN_PREFIX, encode_message_frame, kind};
use daemoneye_eventbus_core::{Frame, Message};
use daemoneye_eventbus_store::{Log, LogOptions, StoreError};
use std::collections::VecDeque;
use std::path::Path;

const KIND_PUBLISH: u8 = 1;
const KIND_DONE: u8 = 2;
/// Publisher id (`u64`), then the generation in use (`u64`).
const KIND_ID: u8 = 3;

/// A client on a spool numbers its publishes `generation << GENERATION_SHIFT` + 1, + 2, …: up
/// to 2^44 publishes per generation ([`Spool::next_generation`] starts the next).
pub(crate) const GENERATION_SHIFT: u32 = 44;

/// Who a client on the spool publishes as ([`Spool::open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The publisher id.
    pub(crate) publisher: u64,
    /// Its generation: its sequence numbers start after `generation << GENERATION_SHIFT`.
    pub(crate) generation: u64,
}

impl Identity {
    /// The sequence number before this generation's first.
    pub(crate) fn first_sequence(self) -> u64 {
        self.generation << GENERATION_SHIFT
    }
}

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
    /// The identity in use, and the sequence number of the record naming it (written again
    /// when the segment holding it goes).
    identity: (Identity, u64),
}

impl Spool {
    /// Opens the spool in `dir`; returns it, the identity this client publishes as (the
    /// last client's publisher id, or `fresh` on a new spool, in a new generation), and the
    /// publishes an earlier client left in it, in order, with their ids (to send again).
    pub(crate) fn open(
        dir: &Path,
        max_bytes: usize,
        full: SpoolFull,
        fresh: u64,
    ) -> Result<(Self, Identity, Vec<Message>), StoreError> {
        let mut cache = DecodeCache::default();
        let mut left: Vec<(u64, Message)> = Vec::new();
        let mut last: Option<Identity> = None;
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
            KIND_ID => {
                if let (Some(p), Some(g)) = (r.body.first_chunk::<8>(), r.body.get(8..16)) {
                    last = Some(Identity {
                        publisher: u64::from_le_bytes(*p),
                        generation: u64::from_le_bytes(g.try_into().expect("8 bytes")),
                    });
                }
            }
            _ => {}
        })?;
        // A generation past the last that fits starts the numbering over, as a new publisher.
        let identity = match last {
            Some(i) if i.generation + 1 < 1 << (64 - GENERATION_SHIFT) => Identity {
                publisher: i.publisher,
                generation: i.generation + 1,
            },
            _ => Identity {
                publisher: fresh,
                generation: 0,
            },
        };
        let mut spool = Self {
            log,
            pending: VecDeque::new(),
            bytes: 0,
            max_bytes,
            full,
            handed: None,
            scratch: BytesMut::new(),
            identity: (identity, 0),
        };
        // Named before anything is published in this generation.
        spool.write_identity()?;
        if left.is_empty() {
            // Nothing owed: give the space back.
            spool.forget_all()?;
        }
        Ok((spool, identity, left.into_iter().map(|(_, m)| m).collect()))
    }

    /// This client used up its generation's sequence numbers and goes on into the next:
    /// written, so that no later client takes it.
    pub(crate) fn next_generation(&mut self) -> Result<(), StoreError> {
        self.identity.0.generation += 1;
        self.write_identity()
    }

    fn write_identity(&mut self) -> Result<(), StoreError> {
        let (i, _) = self.identity;
        let mut body = [0u8; 16];
        body[..8].copy_from_slice(&i.publisher.to_le_bytes());
        body[8..].copy_from_slice(&i.generation.to_le_bytes());
        let seq = self.log.append(KIND_ID, &body)?;
        self.log.flush()?;
        self.identity.1 = seq;
        Ok(())
    }

    /// Writes the identity again when the segments before `seq`, which hold its record, are
    /// about to go.
    fn keep_identity_before(&mut self, seq: u64) -> Result<(), StoreError> {
        if self.identity.1 < seq {
            self.write_identity()?;
        }
        Ok(())
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

    /// Hands over publishes left by an earlier client (in order, last sequence `through`):
    /// forgotten like [`Spool::take`]'s.
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
        self.keep_identity_before(done)?;
        self.log.flush()?;
        self.log.remove_segments_before(done).map(|_| ())
    }

    /// Nothing is owed any more: the log keeps only the records saying so, and who it is.
    fn forget_all(&mut self) -> Result<(), StoreError> {
        let done = self.log.next_seq();
        self.mark_done(done)?;
        if self.log.segments().count() > 1 {
            // The last records go to a segment of their own; the others are given back.
            self.log.start_segment()?;
            self.log.append(KIND_DONE, &done.to_le_bytes())?;
            self.write_identity()?;
            while self.log.segments().count() > 1 {
                self.log.remove_oldest_segment()?;
            }
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
        let id = |generation| Identity {
            publisher: 9,
            generation,
        };
        {
            let (mut s, me, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse, 9).unwrap();
            assert_eq!(me, id(0), "a new spool: the fresh id, generation 0");
            assert!(left.is_empty());
            for n in 1..=3 {
                assert_eq!(s.push(publish(n)).unwrap(), 0);
            }
            assert!(matches!(s.push(publish(4)), Err(NotSpooled::Full)));
            // The process ends with all three owed.
        }
        let (mut s, me, left) = Spool::open(&dir, 3 * one, SpoolFull::DropOldest, 5).unwrap();
        assert_eq!(me, id(1), "the same publisher, the next generation");
        assert_eq!(seqs(&left), [1, 2, 3], "left for the next client, in order");
        s.handed_over(3);
        let first = me.first_sequence();
        for n in 1..=3 {
            s.push(publish(first + n)).unwrap();
        }
        // Full: the oldest spooled goes.
        assert_eq!(s.push(publish(first + 4)).unwrap(), 1);
        // Acknowledged through 3: the earlier client's three are done with.
        s.acked_through(3).unwrap();
        let handed = s.take();
        assert_eq!(seqs(&handed), [first + 2, first + 3, first + 4]);
        drop(s);
        let (mut s, me, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse, 5).unwrap();
        assert_eq!(me, id(2));
        assert_eq!(
            seqs(&left),
            [first + 2, first + 3, first + 4],
            "handed, not acknowledged: owed still"
        );
        s.handed_over(first + 4);
        s.acked_through(first + 4).unwrap();
        // A generation used up: the next is named.
        s.next_generation().unwrap();
        drop(s);
        let (_, me, left) = Spool::open(&dir, 3 * one, SpoolFull::Refuse, 5).unwrap();
        assert!(left.is_empty());
        assert_eq!(me, id(4), "the identity outlives the segments given back");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
