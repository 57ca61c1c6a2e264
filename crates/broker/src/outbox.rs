//! Per-connection outbound queues, bounded in messages and bytes, plus the broker-wide memory
//! cap.
//!
//! Policy when full (DESIGN §5): `DropOldest` evicts the oldest queued messages and records
//! them per topic for an in-band `Notice`; `Disconnect` closes the connection. Control frames
//! (replies, pongs, errors) are never evicted; a peer that lets more than
//! [`MAX_QUEUED_CONTROL`] of them pile up is disconnected.

use bytes::BytesMut;
use daemoneye_eventbus_core::codec::{
    DropReason, LEN_PREFIX, MessageRun, Notice, SlowReaderPolicy, encode_message_frame,
    encode_run_delivery, kind,
};
use daemoneye_eventbus_core::{Frame, Message, QueueGroup, Topic};
use daemoneye_eventbus_transport::VECTORED_MIN;
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;

/// Control frames allowed to wait in one outbox before the peer is disconnected.
pub const MAX_QUEUED_CONTROL: usize = 4096;

/// Broker-wide accounting of queued message bytes against `max_memory_bytes`.
#[derive(Debug)]
pub(crate) struct Memory {
    used: AtomicUsize,
    cap: usize,
}

impl Memory {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.cap).then_some(u + n)
            })
            .is_ok()
    }

    pub(crate) fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap
    }
}

/// An item waiting to be written.
pub(crate) enum Out {
    /// A message, how it was admitted (only [`Admission::Shed`] messages may be evicted) and
    /// the queue group it was given to this connection in, if any.
    Msg(Message, Admission, Option<QueueGroup>),
    /// A run of messages on one topic (protocol 1.2), queued, evicted and written as a unit;
    /// it counts as its number of messages against the bounds.
    Run(MessageRun, Admission),
    /// Deliveries already encoded (see [`Encoding::Bytes`]), written as they are and evicted
    /// as a unit.
    Encoded(Chunk),
    Frame(Frame),
}

/// How a connection's deliveries wait in its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// As shared messages and runs, encoded by the writer (in-process peers, which take
    /// frames as values).
    Shared,
    /// Byte-stream peers (`runs`: the peer reads message runs, protocol 1.2). A small
    /// delivery (below [`VECTORED_MIN`], which the writer would copy anyway) is encoded into
    /// the chunk at the queue's tail when it is queued, while the queue holds less than
    /// [`ENCODE_BELOW`] bytes: the frame's own buffer goes back to the pool at once instead of
    /// waiting in the queue, and the writer hands whole chunks to `writev`. A reader that falls
    /// behind gets shared references instead, so nothing is copied for a reader that may
    /// never read it.
    Bytes { runs: bool },
}

/// A queue below this many bytes encodes small deliveries when they are queued.
pub(crate) const ENCODE_BELOW: usize = 256 * 1024;

/// A chunk takes no more frames once it holds this many bytes (and never grows past its
/// capacity): written in one piece, and evicted as a unit under drop-oldest.
const CHUNK_BYTES: usize = 16 * 1024;

/// Encoded DELIVER and DELIVER_RUN frames of one admission (see [`Encoding::Bytes`]).
pub(crate) struct Chunk {
    pub(crate) buf: BytesMut,
    /// Messages it holds.
    msgs: usize,
    /// Bytes charged to the bounds (the messages' accounted sizes).
    size: usize,
    /// Payload bytes, for the statistics.
    pub(crate) payload: usize,
    admission: Admission,
}

impl Chunk {
    /// The topics of the frames held, with the number of messages of each frame.
    fn topics(&self) -> impl Iterator<Item = (&[u8], u64)> {
        let mut at = 0;
        let buf = &self.buf[..];
        std::iter::from_fn(move || {
            let field = |at: usize, n: usize| buf.get(at..at + n);
            let len = u32::from_le_bytes(field(at, LEN_PREFIX)?.try_into().ok()?) as usize;
            let frame = at + LEN_PREFIX;
            let topic_len = u16::from_le_bytes(field(frame + 1, 2)?.try_into().ok()?) as usize;
            let topic = field(frame + 3, topic_len)?;
            let count = if buf[frame] == kind::DELIVER_RUN {
                u64::from(u16::from_le_bytes(
                    field(frame + 3 + topic_len, 2)?.try_into().ok()?,
                ))
            } else {
                1
            };
            at = frame + len;
            Some((topic, count))
        })
    }
}

/// What a push queues: one message or a run.
#[derive(Clone, Copy)]
pub(crate) enum Item<'a> {
    Msg(&'a Message),
    Run(&'a MessageRun),
}

impl Item<'_> {
    pub(crate) fn topic(&self) -> &Topic {
        match self {
            Self::Msg(m) => m.topic(),
            Self::Run(r) => r.topic(),
        }
    }

    /// Bytes charged to the bounds.
    pub(crate) fn size(&self) -> usize {
        match self {
            Self::Msg(m) => m.accounted_size(),
            Self::Run(r) => r.accounted_size(),
        }
    }

    /// Messages it holds.
    pub(crate) fn count(&self) -> usize {
        match self {
            Self::Msg(_) => 1,
            Self::Run(r) => r.len(),
        }
    }

    /// Bytes of its wire form.
    fn wire_len(&self) -> usize {
        match self {
            Self::Msg(m) => m.wire().len(),
            Self::Run(r) => r.wire().len(),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Msg(m) => m.payload().len(),
            Self::Run(r) => r.payload_bytes(),
        }
    }

    /// Bytes its encoding as deliveries takes at most (frame heads included).
    fn encoded_len(&self) -> usize {
        let head = LEN_PREFIX + 1;
        match self {
            Self::Msg(m) => head + m.wire().len(),
            Self::Run(r) => r.wire().len() + r.len() * (head + 2 + r.topic().as_str().len()),
        }
    }

    /// What the queue keeps: exactly the item's own bytes, never the reader's buffer it may
    /// have been lent from (so what is queued is what is accounted).
    fn to_out(self, admission: Admission, group: Option<&QueueGroup>) -> Out {
        match self {
            Self::Msg(m) => Out::Msg(m.detached(), admission, group.cloned()),
            Self::Run(r) => Out::Run(r.detached(), admission),
        }
    }
}

/// How a message enters a full queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// At most once: the connection's slow-reader policy applies (drop oldest or disconnect).
    Shed,
    /// At least once (a `Processed` subscription): never dropped; a full queue is reported
    /// as [`Pushed::Full`] and the publisher waits for room.
    Wait,
}

/// Result of queueing a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued; `evicted` older messages were dropped to make room. `wake` is set when the
    /// queue was empty: the caller must then call [`Outbox::wake`] (at once, or after the
    /// batch it is routing, so the writer takes the whole batch in one write).
    Queued { evicted: u64, wake: bool },
    /// Not queued: the broker-wide memory cap left no room even after evicting ours.
    Dropped,
    /// The queue was full and the policy is to disconnect; the connection must close.
    Overflow,
    /// The connection is closing.
    Closed,
    /// No room under [`Admission::Wait`]: nothing was queued or dropped; retry after
    /// [`Outbox::wait_for_room`].
    Full,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Out>,
    msgs: usize,
    bytes: usize,
    controls: usize,
    pending_drops: BTreeMap<Topic, u64>,
    pending_reason: Option<DropReason>,
    dropped_total: u64,
    dropped_by_topic: BTreeMap<Topic, u64>,
    /// Drops of one topic not yet folded into the maps above.
    run: Option<(Topic, u64)>,
    closed: bool,
}

impl State {
    /// Counts one drop. Consecutive drops of one topic (a stalled reader's usual pattern) are
    /// accumulated in `run` and folded into the per-topic maps only when the topic changes or
    /// the counts are read, so a drop costs a comparison and an increment.
    fn record_drop(&mut self, topic: &Topic, reason: DropReason, n: u64) {
        self.dropped_total += n;
        if self.pending_reason.is_none() || reason == DropReason::MemoryCap {
            self.pending_reason = Some(reason);
        }
        match &mut self.run {
            Some((t, dropped)) if t == topic => *dropped += n,
            _ => {
                self.fold_run();
                self.run = Some((topic.clone(), n));
            }
        }
    }

    /// [`State::record_drop`] for a topic read from an encoded frame (made a [`Topic`] only
    /// when it differs from the last one dropped).
    fn record_drop_bytes(&mut self, topic: &[u8], reason: DropReason, n: u64) {
        let topic = match &self.run {
            Some((t, _)) if t.as_str().as_bytes() == topic => Some(t.clone()),
            // The frame was encoded from a checked topic.
            _ => std::str::from_utf8(topic)
                .ok()
                .and_then(|t| Topic::new(t).ok()),
        };
        match topic {
            Some(t) => self.record_drop(&t, reason, n),
            None => self.dropped_total += n,
        }
    }

    /// Appends `item`'s deliveries to the chunk at the tail (a new one when the tail is not a
    /// chunk of this admission or has no room left).
    fn append_encoded(&mut self, item: Item<'_>, runs: bool, size: usize, admission: Admission) {
        let need = item.encoded_len();
        let fits = |c: &Chunk| {
            c.admission == admission
                && c.buf.len() < CHUNK_BYTES
                && c.buf.capacity() - c.buf.len() >= need
        };
        if !matches!(self.queue.back(), Some(Out::Encoded(c)) if fits(c)) {
            self.queue.push_back(Out::Encoded(Chunk {
                buf: BytesMut::with_capacity(CHUNK_BYTES.max(need)),
                msgs: 0,
                size: 0,
                payload: 0,
                admission,
            }));
        }
        let Some(Out::Encoded(chunk)) = self.queue.back_mut() else {
            unreachable!("the tail is a chunk with room")
        };
        match item {
            Item::Msg(m) => encode_message_frame(&mut chunk.buf, kind::DELIVER, m),
            Item::Run(r) => encode_run_delivery(&mut chunk.buf, r, runs),
        }
        chunk.msgs += item.count();
        chunk.size += size;
        chunk.payload += item.payload_len();
    }

    /// Adds the accumulated run of drops to the per-topic maps.
    fn fold_run(&mut self) {
        if let Some((topic, n)) = self.run.take() {
            *self.dropped_by_topic.entry(topic.clone()).or_default() += n;
            *self.pending_drops.entry(topic).or_default() += n;
        }
    }

    /// Evicts the oldest message or run that may be dropped; returns its size and message
    /// count, or `None` when there is none.
    fn evict_oldest(&mut self, reason: DropReason) -> Option<(usize, u64)> {
        let pos = self.queue.iter().position(|o| match o {
            Out::Msg(_, a, _) | Out::Run(_, a) => *a == Admission::Shed,
            Out::Encoded(c) => c.admission == Admission::Shed,
            Out::Frame(_) => false,
        })?;
        let (size, count) = match self.queue.remove(pos) {
            Some(Out::Msg(m, ..)) => {
                self.record_drop(m.topic(), reason, 1);
                (m.accounted_size(), 1)
            }
            Some(Out::Run(r, _)) => {
                self.record_drop(r.topic(), reason, r.len() as u64);
                (r.accounted_size(), r.len())
            }
            Some(Out::Encoded(c)) => {
                for (topic, n) in c.topics() {
                    self.record_drop_bytes(topic, reason, n);
                }
                (c.size, c.msgs)
            }
            _ => unreachable!("position found a message, a run or a chunk"),
        };
        self.msgs -= count;
        self.bytes -= size;
        Some((size, count as u64))
    }
}

/// What the writer took in one batch.
pub(crate) struct Batch {
    /// Drop notice to write before the batch's messages.
    pub(crate) notice: Option<Frame>,
    /// Message bytes taken (to release from [`Memory`] after writing).
    pub(crate) bytes: usize,
    /// Messages taken.
    pub(crate) msgs: usize,
}

/// Snapshot of one outbox for statistics.
pub(crate) struct OutboxStats {
    pub(crate) queued_msgs: usize,
    pub(crate) queued_bytes: usize,
    pub(crate) dropped: u64,
    pub(crate) dropped_by_topic: BTreeMap<Topic, u64>,
}

/// One connection's outbound queue.
pub(crate) struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    /// Woken when the writer takes the queue (publishers waiting under [`Admission::Wait`]).
    space: Notify,
    max_msgs: usize,
    max_bytes: usize,
    policy: SlowReaderPolicy,
    encoding: Encoding,
}

impl Outbox {
    pub(crate) fn new(
        max_msgs: usize,
        max_bytes: usize,
        policy: SlowReaderPolicy,
        encoding: Encoding,
    ) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            space: Notify::new(),
            max_msgs,
            max_bytes,
            policy,
            encoding,
        }
    }

    /// Queues a message under the per-connection bounds and the broker-wide cap.
    pub(crate) fn push_message(
        &self,
        msg: &Message,
        memory: &Memory,
        admission: Admission,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        self.push(Item::Msg(msg), memory, admission, group)
    }

    /// Queues a message or a run (a run never goes to a queue group: the broker splits a run
    /// whose topic a group subscribes to). `evicted` and drops count messages.
    pub(crate) fn push(
        &self,
        item: Item<'_>,
        memory: &Memory,
        admission: Admission,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        let size = item.size();
        let n = item.count();
        let mut st = self.state.lock();
        if st.closed {
            return Pushed::Closed;
        }
        if admission == Admission::Wait {
            if !self.queue_has_room(&st, size, n) || !memory.try_reserve(size) {
                return Pushed::Full;
            }
            return self.enqueue(st, item, size, 0, Admission::Wait, group);
        }
        let mut evicted = 0;
        let mut freed = 0;
        while st.msgs + n > self.max_msgs.max(n) || st.bytes + size > self.max_bytes {
            if self.policy == SlowReaderPolicy::Disconnect {
                // Counted, but no notice: the connection is closed instead.
                st.dropped_total += n as u64;
                *st.dropped_by_topic.entry(item.topic().clone()).or_default() += n as u64;
                st.closed = true;
                drop(st);
                self.notify.notify_one();
                return Pushed::Overflow;
            }
            match st.evict_oldest(DropReason::SlowReader) {
                Some((bytes, msgs)) => {
                    freed += bytes;
                    evicted += msgs;
                }
                // Only messages that must not be dropped are queued: this one goes instead.
                None => {
                    memory.release(freed);
                    st.record_drop(item.topic(), DropReason::SlowReader, n as u64);
                    return Pushed::Dropped;
                }
            }
        }
        memory.release(freed);
        while !memory.try_reserve(size) {
            match st.evict_oldest(DropReason::MemoryCap) {
                Some((bytes, msgs)) => {
                    memory.release(bytes);
                    evicted += msgs;
                }
                None => {
                    st.record_drop(item.topic(), DropReason::MemoryCap, n as u64);
                    return Pushed::Dropped;
                }
            }
        }
        self.enqueue(st, item, size, evicted, Admission::Shed, group)
    }

    /// Appends a message or run whose memory is already reserved.
    fn enqueue(
        &self,
        mut st: parking_lot::MutexGuard<'_, State>,
        item: Item<'_>,
        size: usize,
        evicted: u64,
        admission: Admission,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        let wake = st.queue.is_empty();
        match self.encoding {
            Encoding::Bytes { runs }
                if group.is_none() && st.bytes < ENCODE_BELOW && item.wire_len() < VECTORED_MIN =>
            {
                st.append_encoded(item, runs, size, admission);
            }
            _ => st.queue.push_back(item.to_out(admission, group)),
        }
        st.msgs += item.count();
        st.bytes += size;
        Pushed::Queued { evicted, wake }
    }

    /// Wakes the writer (after a [`Pushed::Queued`] with `wake` set).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Whether this queue has room for `n` messages of `size` bytes in all under
    /// [`Admission::Wait`] (one message or run always fits an empty queue). The one
    /// definition both sites use.
    fn queue_has_room(&self, st: &State, size: usize, n: usize) -> bool {
        st.msgs == 0 || (st.msgs + n <= self.max_msgs && st.bytes + size <= self.max_bytes)
    }

    /// Whether a message of `size` bytes would be admitted under [`Admission::Wait`] now.
    /// Whether a message of `size` bytes would enter without waiting or evicting.
    pub(crate) fn has_room_for(&self, size: usize, memory: &Memory) -> bool {
        let st = self.state.lock();
        !st.closed && self.has_room(&st, size, 1, memory)
    }

    fn has_room(&self, st: &State, size: usize, n: usize, memory: &Memory) -> bool {
        self.queue_has_room(st, size, n) && memory.used() + size <= memory.cap()
    }

    /// Waits until `item` would fit (or the outbox closed), so a message or run refused
    /// with [`Pushed::Full`] can be offered again. Returns at once only when it would fit
    /// now; otherwise waits for the writer to take the queue, rechecking after 10 ms at most
    /// because room under the broker-wide memory cap can also come from other connections.
    pub(crate) async fn wait_for_room(&self, item: Item<'_>, memory: &Memory) {
        let (size, n) = (item.size(), item.count());
        let taken = self.space.notified();
        {
            let st = self.state.lock();
            if st.closed || self.has_room(&st, size, n, memory) {
                return;
            }
        }
        tokio::select! {
            () = taken => {}
            () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
        }
    }

    /// Queues a control frame. Returns `false` when the connection is closing or the peer let
    /// too many control frames pile up (the caller then disconnects it).
    pub(crate) fn push_frame(&self, frame: Frame) -> bool {
        let mut st = self.state.lock();
        if st.closed || st.controls >= MAX_QUEUED_CONTROL {
            return false;
        }
        let was_empty = st.queue.is_empty();
        st.queue.push_back(Out::Frame(frame));
        st.controls += 1;
        drop(st);
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Queues a final frame and closes the outbox: the writer writes what is queued, then
    /// this frame, then stops.
    pub(crate) fn close_with(&self, frame: Option<Frame>) {
        let mut st = self.state.lock();
        if let Some(f) = frame.filter(|_| !st.closed) {
            st.queue.push_back(Out::Frame(f));
        }
        st.closed = true;
        drop(st);
        self.notify.notify_one();
    }

    /// Moves everything queued into `into` (which must be empty) and reports what was taken.
    pub(crate) fn take(&self, into: &mut VecDeque<Out>) -> Batch {
        let mut st = self.state.lock();
        std::mem::swap(&mut st.queue, into);
        let notice = st.pending_reason.take().map(|reason| {
            st.fold_run();
            let topics = std::mem::take(&mut st.pending_drops).into_iter().collect();
            Frame::Notice(Notice::Dropped { reason, topics })
        });
        let batch = Batch {
            notice,
            bytes: st.bytes,
            msgs: st.msgs,
        };
        st.bytes = 0;
        st.msgs = 0;
        st.controls = 0;
        drop(st);
        self.space.notify_waiters();
        batch
    }

    /// Whether the outbox is closed (nothing more will be queued).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Waits until something is queued or the outbox closes.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Closes the outbox and discards what is queued, releasing its memory. Returns the
    /// number of messages discarded; the queue group deliveries among them are added to
    /// `regroup` so another member of their group can be given them.
    pub(crate) fn discard(
        &self,
        memory: &Memory,
        regroup: &mut Vec<(Message, QueueGroup)>,
    ) -> usize {
        let mut st = self.state.lock();
        st.closed = true;
        let n = st.msgs;
        memory.release(st.bytes);
        for out in st.queue.drain(..) {
            if let Out::Msg(m, _, Some(g)) = out {
                regroup.push((m, g));
            }
        }
        st.msgs = 0;
        st.bytes = 0;
        n
    }

    pub(crate) fn stats(&self) -> OutboxStats {
        let mut st = self.state.lock();
        st.fold_run();
        OutboxStats {
            queued_msgs: st.msgs,
            queued_bytes: st.bytes,
            dropped: st.dropped_total,
            dropped_by_topic: st.dropped_by_topic.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daemoneye_eventbus_core::Header;

    impl Outbox {
        fn push_message_shed(&self, m: &Message, mem: &Memory) -> Pushed {
            self.push_message(m, mem, Admission::Shed, None)
        }

        fn push_message_wait(&self, m: &Message, mem: &Memory) -> Pushed {
            self.push_message(m, mem, Admission::Wait, None)
        }
    }

    #[test]
    fn realtime_traffic_never_evicts_processed_messages() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(2, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..2 {
            assert!(matches!(
                ob.push_message_wait(&msg("keep", 1), &mem),
                Pushed::Queued { .. }
            ));
        }
        assert_eq!(ob.push_message_shed(&msg("rt", 1), &mem), Pushed::Dropped);
        let (_, q) = taken(&ob);
        let topics: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(topics, ["keep", "keep"]);
    }

    #[test]
    fn wait_admission_never_drops() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(2, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..2 {
            assert!(matches!(
                ob.push_message_wait(&msg("a", 1), &mem),
                Pushed::Queued { .. }
            ));
        }
        assert_eq!(ob.push_message_wait(&msg("a", 1), &mem), Pushed::Full);
        assert_eq!(ob.stats().dropped, 0);
        let (batch, _) = taken(&ob);
        mem.release(batch.bytes);
        assert!(matches!(
            ob.push_message_wait(&msg("a", 1), &mem),
            Pushed::Queued { .. }
        ));
    }

    /// What a queued item is: a message's topic, `run <topic>`, the frames of a chunk, `frame`.
    fn describe(o: &Out) -> String {
        match o {
            Out::Msg(m, ..) => m.topic().to_string(),
            Out::Run(r, _) => format!("run {}", r.topic()),
            Out::Encoded(c) => {
                let frames: Vec<_> = c
                    .topics()
                    .map(|(t, n)| format!("{}x{n}", String::from_utf8_lossy(t)))
                    .collect();
                format!("chunk {}", frames.join(" "))
            }
            Out::Frame(_) => "frame".into(),
        }
    }

    fn msg(topic: &str, len: usize) -> Message {
        Message::new(
            Topic::new(topic).unwrap(),
            Header::default(),
            Bytes::from(vec![0; len]),
        )
    }

    #[test]
    fn drop_oldest_counts_and_notices_per_topic() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(2, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        assert_eq!(
            ob.push_message_shed(&msg("a", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: true
            }
        );
        assert_eq!(
            ob.push_message_shed(&msg("b", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: false
            }
        );
        assert_eq!(
            ob.push_message_shed(&msg("c", 1), &mem),
            Pushed::Queued {
                evicted: 1,
                wake: false
            }
        );
        let (batch, q) = taken(&ob);
        assert_eq!(batch.msgs, 2);
        let topics: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(topics, ["b", "c"]);
        match batch.notice {
            Some(Frame::Notice(Notice::Dropped { reason, topics })) => {
                assert_eq!(reason, DropReason::SlowReader);
                assert_eq!(topics, vec![(Topic::new("a").unwrap(), 1)]);
            }
            other => panic!("expected a notice, got {other:?}"),
        }
        assert_eq!(ob.stats().dropped, 1);
        mem.release(batch.bytes);
        assert_eq!(mem.used(), 0);
    }

    #[test]
    fn byte_bound_and_memory_cap() {
        let one = msg("a", 100).accounted_size();
        let mem = Memory::new(one * 3);
        let ob = Outbox::new(100, one * 2, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..5 {
            ob.push_message_shed(&msg("a", 100), &mem);
        }
        assert_eq!(ob.stats().queued_bytes, one * 2);
        assert_eq!(ob.stats().dropped, 3);
        // A second queue can only take what is left of the global cap.
        let other = Outbox::new(100, one * 2, SlowReaderPolicy::DropOldest, Encoding::Shared);
        assert!(matches!(
            other.push_message_shed(&msg("b", 100), &mem),
            Pushed::Queued { .. }
        ));
        assert_eq!(
            other.push_message_shed(&msg("b", 100), &mem),
            Pushed::Queued {
                evicted: 1,
                wake: true
            }
        );
        assert!(mem.used() <= mem.cap());
    }

    /// A run of `n` one-byte messages on `topic`, as the broker receives it.
    fn run(topic: &str, n: usize) -> MessageRun {
        use daemoneye_eventbus_core::codec::{FrameDecoder, RunWriter};
        let mut b = bytes::BytesMut::new();
        let mut w = RunWriter::begin(&mut b, &Topic::new(topic).unwrap());
        for _ in 0..n {
            w.push(&mut b, &Header::default(), b"x");
        }
        match FrameDecoder::new(1 << 20).decode(&mut b) {
            Ok(Some(Frame::PublishRun(r))) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_run_counts_as_its_messages() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(5, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        let three = run("r", 3);
        assert!(matches!(
            ob.push(Item::Run(&three), &mem, Admission::Shed, None),
            Pushed::Queued { evicted: 0, .. }
        ));
        assert_eq!(ob.stats().queued_msgs, 3);
        assert_eq!(ob.stats().queued_bytes, three.accounted_size());
        // Two more messages fit; a third evicts the whole run, counted as three drops.
        ob.push_message_shed(&msg("m", 1), &mem);
        ob.push_message_shed(&msg("m", 1), &mem);
        assert_eq!(
            ob.push_message_shed(&msg("m", 1), &mem),
            Pushed::Queued {
                evicted: 3,
                wake: false
            }
        );
        let (batch, _) = taken(&ob);
        assert_eq!(batch.msgs, 3);
        match batch.notice {
            Some(Frame::Notice(Notice::Dropped { topics, .. })) => {
                assert_eq!(topics, vec![(Topic::new("r").unwrap(), 3)]);
            }
            other => panic!("expected a notice, got {other:?}"),
        }
        mem.release(batch.bytes);
        // Under Wait, a run that does not fit waits; one larger than the whole bound still
        // enters an empty queue.
        let big = run("r", 9);
        assert!(matches!(
            ob.push(Item::Run(&big), &mem, Admission::Wait, None),
            Pushed::Queued { .. }
        ));
        assert_eq!(
            ob.push(Item::Run(&three), &mem, Admission::Wait, None),
            Pushed::Full
        );
        assert_eq!(ob.stats().dropped, 3);
    }

    #[test]
    fn disconnect_policy_overflows() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(1, 1 << 20, SlowReaderPolicy::Disconnect, Encoding::Shared);
        assert_eq!(
            ob.push_message_shed(&msg("a", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: true
            }
        );
        assert_eq!(ob.push_message_shed(&msg("a", 1), &mem), Pushed::Overflow);
        assert!(ob.is_closed());
        assert_eq!(ob.stats().dropped, 1, "the overflowing message is counted");
        assert!(
            taken(&ob).0.notice.is_none(),
            "no drop notice: the connection closes"
        );
    }

    fn taken(ob: &Outbox) -> (Batch, Vec<Out>) {
        let mut q = VecDeque::new();
        let batch = ob.take(&mut q);
        (batch, q.into())
    }

    const STREAM: Encoding = Encoding::Bytes { runs: true };

    #[test]
    fn byte_stream_deliveries_are_encoded_into_one_chunk_that_reads_back() {
        use daemoneye_eventbus_core::codec::FrameDecoder;
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let (a, b) = (msg("a", 3), msg("b", 0));
        let (one, three) = (run("r", 1), run("s", 3));
        for item in [
            Item::Msg(&a),
            Item::Run(&one),
            Item::Run(&three),
            Item::Msg(&b),
        ] {
            assert!(matches!(
                ob.push(item, &mem, Admission::Shed, None),
                Pushed::Queued { evicted: 0, .. }
            ));
        }
        let (batch, q) = taken(&ob);
        assert_eq!(batch.msgs, 6);
        let described: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(described, ["chunk ax1 rx1 sx3 bx1"]);
        let Some(Out::Encoded(chunk)) = q.into_iter().next() else {
            unreachable!()
        };
        assert_eq!(chunk.payload, 3 + 1 + 3);
        // What the writer sends: a plain DELIVER for a message and for a run of one, a
        // DELIVER_RUN for a longer run, each as the subscriber would read it.
        let mut wire = chunk.buf;
        let dec = FrameDecoder::new(1 << 20);
        let mut frames = Vec::new();
        while let Some(f) = dec.decode(&mut wire).unwrap() {
            frames.push(f);
        }
        assert!(wire.is_empty());
        assert!(matches!(&frames[0], Frame::Deliver(m) if *m == a));
        assert!(matches!(&frames[1], Frame::Deliver(m) if m.topic().as_str() == "r"));
        assert!(matches!(&frames[2], Frame::DeliverRun(r) if r.len() == 3));
        assert!(matches!(&frames[3], Frame::Deliver(m) if *m == b));
    }

    #[test]
    fn group_deliveries_other_admissions_and_control_frames_start_new_items() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let group = QueueGroup::new("g").unwrap();
        ob.push(Item::Msg(&msg("a", 1)), &mem, Admission::Wait, None);
        ob.push(Item::Msg(&msg("b", 1)), &mem, Admission::Shed, None);
        ob.push(Item::Msg(&msg("c", 1)), &mem, Admission::Shed, Some(&group));
        ob.push(Item::Msg(&msg("d", 1)), &mem, Admission::Shed, None);
        assert!(ob.push_frame(Frame::Ping(1)));
        ob.push(Item::Msg(&msg("e", 1)), &mem, Admission::Shed, None);
        let (_, q) = taken(&ob);
        let described: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(
            described,
            [
                "chunk ax1",
                "chunk bx1",
                "c",
                "chunk dx1",
                "frame",
                "chunk ex1"
            ]
        );
    }

    #[test]
    fn a_chunk_is_evicted_as_a_unit_and_its_drops_counted_per_topic() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(4, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        ob.push(Item::Msg(&msg("keep", 1)), &mem, Admission::Wait, None);
        for t in ["a", "a", "b"] {
            ob.push(Item::Msg(&msg(t, 1)), &mem, Admission::Shed, None);
        }
        // Full: the next one evicts the realtime chunk (three messages), never the
        // processed one.
        assert_eq!(
            ob.push(Item::Msg(&msg("c", 1)), &mem, Admission::Shed, None),
            Pushed::Queued {
                evicted: 3,
                wake: false
            }
        );
        let (batch, q) = taken(&ob);
        let described: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(described, ["chunk keepx1", "chunk cx1"]);
        assert_eq!(batch.msgs, 2);
        match batch.notice {
            Some(Frame::Notice(Notice::Dropped { topics, .. })) => assert_eq!(
                topics,
                [(Topic::new("a").unwrap(), 2), (Topic::new("b").unwrap(), 1)]
            ),
            other => panic!("{other:?}"),
        }
        mem.release(batch.bytes);
        assert_eq!(mem.used(), 0);
        assert_eq!(ob.stats().dropped, 3);
    }

    #[test]
    fn a_queue_holding_enough_keeps_shared_references_and_large_payloads_stay_shared() {
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(1000, 8 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let big = msg("big", VECTORED_MIN);
        ob.push(Item::Msg(&big), &mem, Admission::Shed, None);
        let m = msg("m", 8 * 1024);
        let mut pushed = 1;
        while ob.stats().queued_bytes < ENCODE_BELOW {
            ob.push(Item::Msg(&m), &mem, Admission::Shed, None);
            pushed += 1;
        }
        ob.push(Item::Msg(&m), &mem, Admission::Shed, None);
        let (batch, q) = taken(&ob);
        assert_eq!(batch.msgs, pushed + 1);
        let described: Vec<_> = q.iter().map(describe).collect();
        assert_eq!(described.first().map(String::as_str), Some("big"));
        assert!(
            described[1..described.len() - 1]
                .iter()
                .all(|d| d.starts_with("chunk m"))
        );
        assert_eq!(described.last().map(String::as_str), Some("m"));
    }

    #[test]
    fn a_queue_keeps_its_own_copies_of_lent_messages_and_runs() {
        use daemoneye_eventbus_core::codec::{DecodeCache, FrameDecoder, RunWriter};
        let mut wire = bytes::BytesMut::new();
        Frame::Publish(msg("m", 10)).encode(&mut wire);
        let mut w = RunWriter::begin(&mut wire, &Topic::new("r").unwrap());
        w.push(&mut wire, &Header::default(), b"x");
        let (dec, mut cache) = (FrameDecoder::new(1 << 20), DecodeCache::lending());
        let mut lent = Vec::new();
        while let Some(f) = dec.decode_cached(&mut wire, &mut cache).unwrap() {
            lent.push(f);
        }
        let mem = Memory::new(1 << 30);
        let ob = Outbox::new(100, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for f in &lent {
            let item = match f {
                Frame::Publish(m) => Item::Msg(m),
                Frame::PublishRun(r) => Item::Run(r),
                other => panic!("{other:?}"),
            };
            ob.push(item, &mem, Admission::Shed, None);
        }
        let (_, q) = taken(&ob);
        let kept: Vec<_> = q
            .iter()
            .map(|o| match o {
                Out::Msg(m, ..) => (describe(o), m.is_lent()),
                Out::Run(r, _) => (describe(o), r.is_lent()),
                other => panic!("{}", describe(other)),
            })
            .collect();
        assert_eq!(kept, [("m".into(), false), ("run r".into(), false)]);
    }
}
