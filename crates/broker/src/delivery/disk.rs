//! A durable subscription's store on disk: every message it keeps is in memory (a
//! [`MemoryStore`], within the subscription's bounds) and in its own log
//! (`daemoneye-eventbus-store`), so that it survives the broker process.
//!
//! Records (`docs/storage.md` gives their framing): [`KIND_MESSAGE`] a kept message (its
//! position, then the PUBLISH frame it came in, or the broker's own encoding of it);
//! [`KIND_RUN`] a kept run (its first position, then the PUBLISH_RUN frame); [`KIND_REMOVED`]
//! positions acknowledged or dropped (ranges). Reading the log back keeps every message whose
//! position was not removed, at the same position. Whole segments are given back once every
//! message in them is removed.

use super::store::{Kept, MemoryStore, Pos, Store, Stored};
use bytes::{BufMut, BytesMut};
use daemoneye_eventbus_core::codec::{
    DecodeCache, DropReason, LEN_PREFIX, encode_message_frame, encode_run_frame, kind,
};
use daemoneye_eventbus_core::{Frame, Topic};
use daemoneye_eventbus_store::{Log, LogOptions, Recovery, StoreError, SyncJob};
use std::collections::VecDeque;
use std::path::Path;

/// A kept message: position (`u64`), then one PUBLISH frame.
pub(crate) const KIND_MESSAGE: u8 = 1;
/// A kept run: its first position (`u64`), then one PUBLISH_RUN frame.
pub(crate) const KIND_RUN: u8 = 2;
/// Positions removed: inclusive ranges, (`u64` first, `u64` last) each.
pub(crate) const KIND_REMOVED: u8 = 3;
/// The drops not yet announced to a subscriber, as they stand (the last such record holds):
/// their total (`u64`), the reason (`u8`, as in NOTICE), the number of topics (`u16`), then
/// each topic (`u16` length, bytes) and its count (`u64`). A total of 0: none.
pub(crate) const KIND_DROPS: u8 = 4;

/// Drops to be announced: why, and how many per topic.
pub(crate) type Unannounced = (DropReason, Vec<(Topic, u64)>);

/// See the module documentation.
pub(crate) struct DiskStore {
    mem: MemoryStore,
    log: Log,
    /// The records of kept messages, in position order: (first position, count, record).
    records: VecDeque<(Pos, usize, u64)>,
    /// Removed positions not yet written, as ranges.
    removed: Vec<(Pos, Pos)>,
    scratch: BytesMut,
    /// The first error writing the log since it last succeeded (appends go on in memory).
    failed: Option<StoreError>,
    /// The last [`KIND_DROPS`] record announcing something, and its sequence number: written
    /// again before the segment holding it is given back.
    drops: Option<(Vec<u8>, u64)>,
    /// The drops the log held when it was opened, until [`DiskStore::take_restored_drops`].
    restored_drops: Option<Unannounced>,
}

/// What opening a durable subscription's log found, beyond its messages.
pub(crate) struct Reopened {
    pub(crate) store: DiskStore,
    pub(crate) recovery: Recovery,
    /// Records that could not be decoded (not counted in the recovery's records).
    pub(crate) undecodable: u64,
}

impl DiskStore {
    /// Opens (or creates) the log in `dir` and reads back what it keeps.
    ///
    /// # Errors
    ///
    /// As [`Log::open`]: an unsafe or locked directory, a newer format, an I/O error.
    pub(crate) fn open(dir: &Path, segment_bytes: u64) -> Result<Reopened, StoreError> {
        // Messages share the segments' buffers (read once, never copied again); topics and
        // sources repeat, and are interned as a connection's would be.
        let mut cache = DecodeCache::default();
        let mut found: Vec<(Pos, Kept, u64)> = Vec::new();
        let mut removed: Vec<(Pos, Pos)> = Vec::new();
        let mut drops: Option<(Vec<u8>, u64)> = None;
        let mut undecodable = 0u64;
        let (log, recovery) = Log::open(dir, LogOptions { segment_bytes }, |r| {
            let mut c = r.body;
            let Some(pos) = take_u64(&mut c) else {
                undecodable += 1;
                return;
            };
            match r.kind {
                KIND_MESSAGE | KIND_RUN => {
                    // The frame after the position: length prefix, kind, body.
                    let frame = r.body_bytes();
                    let whole = c.len() > LEN_PREFIX
                        && u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize + LEN_PREFIX
                            == c.len();
                    let decoded = whole.then(|| {
                        Frame::decode_cached(
                            c[LEN_PREFIX],
                            frame.slice(8 + LEN_PREFIX + 1..),
                            &mut cache,
                        )
                    });
                    match (r.kind, decoded) {
                        (KIND_MESSAGE, Some(Ok(Frame::Publish(m)))) => {
                            found.push((pos, Kept::One(m), r.seq));
                        }
                        (KIND_RUN, Some(Ok(Frame::PublishRun(run)))) => {
                            found.push((pos, Kept::Run(run), r.seq));
                        }
                        _ => undecodable += 1,
                    }
                }
                KIND_DROPS => match decode_drops(r.body) {
                    // The last one holds.
                    Some(Some(_)) => drops = Some((r.body.to_vec(), r.seq)),
                    Some(None) => drops = None,
                    None => undecodable += 1,
                },
                KIND_REMOVED => {
                    let mut last_of = c;
                    let Some(last) = take_u64(&mut last_of) else {
                        undecodable += 1;
                        return;
                    };
                    removed.push((pos, last));
                    c = last_of;
                    while let (Some(a), Some(b)) = (take_u64(&mut c), take_u64(&mut c)) {
                        removed.push((a, b));
                    }
                }
                _ => undecodable += 1,
            }
        })?;
        let mut mem = MemoryStore::default();
        let mut records = VecDeque::with_capacity(found.len());
        found.sort_unstable_by_key(|(pos, ..)| *pos);
        let mut end = 0;
        for (pos, kept, seq) in found {
            if pos < mem.next_pos() {
                // Overlaps what was read already: not from this store's writes.
                undecodable += 1;
                continue;
            }
            let n = kept.count();
            records.push_back((pos, n, seq));
            mem.place(pos, kept);
            end = pos + n as u64;
        }
        for (first, last) in removed {
            for p in first..=last.min(end.saturating_sub(1)) {
                mem.remove(p);
            }
            end = end.max(last.saturating_add(1));
        }
        mem.skip_to(end);
        let restored_drops = drops.as_ref().and_then(|(body, _)| decode_drops(body)?);
        let mut store = Self {
            mem,
            log,
            records,
            removed: Vec::new(),
            scratch: BytesMut::new(),
            failed: None,
            drops,
            restored_drops,
        };
        store.trim_records();
        Ok(Reopened {
            store,
            recovery,
            undecodable,
        })
    }

    /// Writes what was removed since the last call, gives back whole segments that hold
    /// nothing kept any more, and writes everything to the operating system; with `sync`,
    /// also to the disk.
    ///
    /// # Errors
    ///
    /// The first write error since the last success (the messages stay kept in memory).
    pub(crate) fn persist(&mut self, sync: bool) -> Result<(), StoreError> {
        self.prepare()?;
        if sync {
            self.log.sync()
        } else {
            self.log.flush()
        }
    }

    /// [`DiskStore::persist`] with `sync`, the wait for the disk left to the caller (to run
    /// on a blocking thread).
    ///
    /// # Errors
    ///
    /// As [`DiskStore::persist`].
    pub(crate) fn persist_for_sync(&mut self) -> Result<SyncJob, StoreError> {
        self.prepare()?;
        self.log.flush_for_sync()
    }

    /// Writes what is buffered to the operating system (as [`DiskStore::persist`] without
    /// sync); returns the log position that covers it, for a group sync
    /// ([`super::sync::SyncPoint`]).
    ///
    /// # Errors
    ///
    /// As [`DiskStore::persist`].
    pub(crate) fn write_through(&mut self) -> Result<u64, StoreError> {
        self.prepare()?;
        self.log.flush()?;
        Ok(self.log.next_seq())
    }

    /// Writes what is buffered and returns the wait for the disk that puts it there, with the
    /// log position that covers.
    ///
    /// # Errors
    ///
    /// As [`DiskStore::persist`].
    pub(crate) fn sync_job(&mut self) -> Result<(SyncJob, u64), StoreError> {
        let job = self.persist_for_sync()?;
        Ok((job, self.log.next_seq()))
    }

    /// Appends the removals, gives back segments holding nothing kept, and reports the first
    /// error since the last success.
    fn prepare(&mut self) -> Result<(), StoreError> {
        if !self.removed.is_empty() {
            let mut body = Vec::with_capacity(self.removed.len() * 16);
            for (a, b) in self.removed.drain(..) {
                body.put_u64_le(a);
                body.put_u64_le(b);
            }
            if let Err(e) = self.log.append(KIND_REMOVED, &body) {
                self.failed.get_or_insert(e);
            }
        }
        self.trim_records();
        let first_kept = self
            .records
            .front()
            .map_or(self.log.next_seq(), |(.., seq)| *seq);
        self.keep_drops_before(first_kept);
        if let Err(e) = self.log.remove_segments_before(first_kept) {
            self.failed.get_or_insert(e);
        }
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Forgets the records whose messages are all removed.
    fn trim_records(&mut self) {
        let oldest = self.mem.oldest().unwrap_or(Pos::MAX);
        while matches!(self.records.front(), Some((first, n, _)) if first + *n as u64 <= oldest) {
            self.records.pop_front();
        }
    }

    /// Bytes of its log on disk.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.log.bytes()
    }

    /// The sequence number past the last record of the oldest segment, when there is one
    /// besides the segment appended to (or the log could make one by closing that).
    pub(crate) fn oldest_segment_end(&self) -> Option<u64> {
        let first = self.log.segments().next()?;
        (first.end_seq > first.first_seq).then_some(first.end_seq)
    }

    /// Whether the oldest kept message lies in a record before `seq`. Records whose messages
    /// are all gone are forgotten first, so this looks at one record (it is asked once per
    /// message dropped).
    pub(crate) fn oldest_before(&mut self, seq: u64) -> bool {
        self.trim_records();
        self.mem.oldest().is_some()
            && self
                .records
                .front()
                .is_some_and(|(.., record)| *record < seq)
    }

    /// Removes the oldest segment once nothing kept lies in it; returns the bytes given back.
    pub(crate) fn remove_oldest_segment(&mut self) -> Result<u64, StoreError> {
        if self.single_segment() {
            // The drops record, written again, must not land in the segment given back.
            self.log.start_segment()?;
        }
        if let Some(end) = self.oldest_segment_end() {
            self.keep_drops_before(end);
            self.log.flush()?;
        }
        Ok(self.log.remove_oldest_segment()?.map_or(0, |s| s.bytes))
    }

    /// Whether its log has one segment (the one appended to).
    pub(crate) fn single_segment(&self) -> bool {
        self.log.segments().nth(1).is_none()
    }

    /// Closes the segment appended to (see [`Log::start_segment`]).
    ///
    /// # Errors
    ///
    /// As [`Log::start_segment`].
    pub(crate) fn start_segment(&mut self) -> Result<(), StoreError> {
        self.log.start_segment()
    }

    /// Writes the drops to be announced as they stand now (`None`: none), so that a broker
    /// started again on this log still announces them.
    pub(crate) fn write_drops(&mut self, drops: Option<&Unannounced>) {
        if drops.is_none() && self.drops.is_none() {
            return;
        }
        let body = encode_drops(drops);
        match self.log.append(KIND_DROPS, &body) {
            Ok(seq) => self.drops = drops.is_some().then_some((body, seq)),
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
    }

    /// The drops the log held when it was opened (once).
    pub(crate) fn take_restored_drops(&mut self) -> Option<Unannounced> {
        self.restored_drops.take()
    }

    /// Appends the drops record again when the segments before `seq`, which hold it, are
    /// about to go.
    fn keep_drops_before(&mut self, seq: u64) {
        let Some((body, at)) = self.drops.take() else {
            return;
        };
        if at >= seq {
            self.drops = Some((body, at));
            return;
        }
        match self.log.append(KIND_DROPS, &body) {
            Ok(at) => self.drops = Some((body, at)),
            Err(e) => {
                self.drops = Some((body, at));
                self.failed.get_or_insert(e);
            }
        }
    }

    /// Messages kept, and their charged bytes.
    pub(crate) fn kept(&self) -> (usize, usize) {
        (self.mem.len(), self.mem.bytes())
    }
}

fn encode_drops(drops: Option<&Unannounced>) -> Vec<u8> {
    let mut body = Vec::new();
    let Some((reason, topics)) = drops else {
        body.put_u64_le(0);
        return body;
    };
    body.put_u64_le(topics.iter().map(|(_, n)| n).sum());
    body.put_u8(reason.to_u8());
    // At most DROP_TOPICS + 1 entries.
    body.put_u16_le(topics.len() as u16);
    for (topic, n) in topics {
        let t = topic.as_str().as_bytes();
        body.put_u16_le(t.len() as u16);
        body.put_slice(t);
        body.put_u64_le(*n);
    }
    body
}

/// `None`: not a drops record; `Some(None)`: nothing to announce.
fn decode_drops(mut c: &[u8]) -> Option<Option<Unannounced>> {
    let total = take_u64(&mut c)?;
    if total == 0 {
        return Some(None);
    }
    let (&reason, rest) = c.split_first()?;
    let (n, mut rest) = rest.split_first_chunk::<2>()?;
    let mut topics = Vec::with_capacity(usize::from(u16::from_le_bytes(*n)));
    for _ in 0..u16::from_le_bytes(*n) {
        let (len, r) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len));
        let (topic, mut r) = (r.get(..len)?, r.get(len..)?);
        let topic = Topic::new(std::str::from_utf8(topic).ok()?).ok()?;
        topics.push((topic, take_u64(&mut r)?));
        rest = r;
    }
    Some(Some((DropReason::from_u8(reason), topics)))
}

fn take_u64(c: &mut &[u8]) -> Option<u64> {
    let (head, rest) = c.split_first_chunk::<8>()?;
    *c = rest;
    Some(u64::from_le_bytes(*head))
}

impl Store for DiskStore {
    fn append(&mut self, kept: Kept) -> Pos {
        let pos = self.mem.next_pos();
        self.scratch.clear();
        self.scratch.put_u64_le(pos);
        let kind = match &kept {
            Kept::One(m) => {
                encode_message_frame(&mut self.scratch, kind::PUBLISH, m);
                KIND_MESSAGE
            }
            Kept::Run(r) => {
                encode_run_frame(&mut self.scratch, kind::PUBLISH_RUN, r);
                KIND_RUN
            }
        };
        match self.log.append(kind, &self.scratch) {
            Ok(seq) => self.records.push_back((pos, kept.count(), seq)),
            Err(e) => {
                self.failed.get_or_insert(e);
            }
        }
        self.mem.append(kept)
    }

    fn get(&self, pos: Pos) -> Option<Stored<'_>> {
        self.mem.get(pos)
    }

    fn remove(&mut self, pos: Pos) -> Option<usize> {
        let bytes = self.mem.remove(pos)?;
        match self.removed.last_mut() {
            Some((_, last)) if *last + 1 == pos => *last = pos,
            _ => self.removed.push((pos, pos)),
        }
        Some(bytes)
    }

    fn oldest(&self) -> Option<Pos> {
        self.mem.oldest()
    }

    fn end(&self) -> Pos {
        self.mem.end()
    }

    fn len(&self) -> usize {
        self.mem.len()
    }

    fn bytes(&self) -> usize {
        self.mem.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::testing::{message, run};

    /// (position, message number) of everything kept.
    fn kept(s: &DiskStore) -> Vec<(Pos, u64)> {
        let mut out = Vec::new();
        let Some(first) = s.oldest() else {
            return out;
        };
        for pos in first..s.mem.next_pos() {
            match s.get(pos) {
                Some(Stored::One(m)) => out.push((pos, m.id().sequence)),
                Some(Stored::InRun { run, index, .. }) => {
                    let part = run.run.slice(run.part(index, 1));
                    let m = part.messages().next().unwrap().unwrap();
                    out.push((pos, m.id().sequence));
                }
                None => {}
            }
        }
        out
    }

    #[test]
    fn what_is_kept_comes_back_at_its_position_and_acknowledged_segments_go() {
        let dir = std::env::temp_dir().join(format!("eb-disk-store-{}", std::process::id()));
        let log = dir.join("log");
        {
            let mut s = DiskStore::open(&log, 1 << 20).unwrap().store;
            for n in 0..3 {
                assert_eq!(s.append(Kept::One(message(n))), n);
            }
            assert_eq!(s.append(run(3..=6)), 3);
            s.append(Kept::One(message(7)));
            // Acknowledged: 0, 1, and two of the run.
            for pos in [0, 1, 4, 5] {
                assert!(s.remove(pos).is_some());
            }
            s.persist(true).unwrap();
            // An acknowledgement not yet written when the process ends: 7 comes back, to be
            // delivered again.
            s.remove(7);
        }
        let reopened = DiskStore::open(&log, 1 << 20).unwrap();
        assert_eq!(reopened.undecodable, 0);
        let mut s = reopened.store;
        assert_eq!(kept(&s), [(2, 2), (3, 3), (6, 6), (7, 7)]);
        assert_eq!(s.mem.next_pos(), 8, "positions go on");
        assert_eq!(s.append(Kept::One(message(8))), 8);
        for pos in [2, 3, 6, 7, 8] {
            s.remove(pos);
        }
        s.persist(true).unwrap();
        assert_eq!(s.records.len(), 0);
        assert_eq!(s.log.segments().count(), 1, "nothing kept: no old segment");
        drop(s);
        let s = DiskStore::open(&log, 1 << 20).unwrap().store;
        assert!(kept(&s).is_empty());
        assert_eq!(s.mem.next_pos(), 9);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unannounced_drops_come_back_until_announced_even_as_their_segments_go() {
        let dir = std::env::temp_dir().join(format!("eb-disk-drops-{}", std::process::id()));
        let log = dir.join("log");
        let topic = |t: &str| Topic::new(t).unwrap();
        let drops = (
            DropReason::BacklogFull,
            vec![(topic("a.b"), 7), (topic("c"), 2)],
        );
        {
            // Small segments: the drops record's segment is given back as messages go.
            let mut s = DiskStore::open(&log, 256).unwrap().store;
            assert!(s.take_restored_drops().is_none());
            s.write_drops(Some(&drops));
            for n in 0..20 {
                s.append(Kept::One(message(n)));
                s.persist(false).unwrap();
            }
            for n in 0..19 {
                s.remove(n);
            }
            s.persist(false).unwrap();
            assert!(s.log.segments().count() < 5, "old segments went");
            s.remove_oldest_segment().unwrap();
        }
        let mut s = DiskStore::open(&log, 256).unwrap().store;
        assert_eq!(s.take_restored_drops(), Some(drops));
        assert_eq!(s.take_restored_drops(), None, "once");
        // Announced: nothing comes back.
        s.write_drops(None);
        s.persist(false).unwrap();
        drop(s);
        let mut s = DiskStore::open(&log, 256).unwrap().store;
        assert_eq!(s.take_restored_drops(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest::proptest! {
        /// A drops record reads back as written; any other bytes read as something or
        /// nothing, never a panic.
        #[test]
        fn drops_records_round_trip_and_garbage_never_panics(
            counts in proptest::collection::vec(("[a-z]{1,8}(\\.[a-z]{1,8}){0,3}", 1u64..1_000_000), 0..20),
            reason in 1u8..=3,
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let topics: Vec<(Topic, u64)> = counts
                .iter()
                .map(|(t, n)| (Topic::new(t.as_str()).unwrap(), *n))
                .collect();
            let drops = (!topics.is_empty()).then(|| (DropReason::from_u8(reason), topics));
            proptest::prop_assert_eq!(decode_drops(&encode_drops(drops.as_ref())), Some(drops));
            let _ = decode_drops(&garbage);
        }
    }
}
