//! One connection's queues (its [`RealtimeQueue`], its [`ProcessedQueue`]) and its control
//! frames, behind one lock: routers push, the connection's writer takes everything in one
//! pass.
//!
//! The writer writes, in this order, the drop notice, the Realtime deliveries, the Processed
//! deliveries, then the control frames. Taking everything under one lock, and writing the
//! control frames last, means a control frame is never written before a delivery queued
//! before it: a REPLY to UNSUBSCRIBE follows everything routed to the filter, a PONG follows
//! everything routed before the PING, and GOING_AWAY comes last.

use super::acked::{AckedOut, AckedSub};
use super::lane::Out;
use super::{Bounds, DropTotals, Encoding, Item, Memory, ProcessedQueue, Pushed, RealtimeQueue};
use daemoneye_eventbus_core::codec::SlowReaderPolicy;
use daemoneye_eventbus_core::{Frame, Message, QueueGroup, Topic};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::Notify;

/// Control frames allowed to wait in one outlet before the peer is disconnected.
pub const MAX_QUEUED_CONTROL: usize = 4096;

struct State {
    realtime: RealtimeQueue,
    processed: ProcessedQueue,
    controls: VecDeque<Frame>,
    /// Acknowledged subscriptions attached to this connection (protocol 1.3).
    acked: Vec<Arc<AckedSub>>,
    closed: bool,
}

impl State {
    fn is_empty(&self) -> bool {
        self.realtime.lane.is_empty() && self.processed.lane.is_empty() && self.controls.is_empty()
    }
}

/// What the writer took in one pass, in the order it writes it.
#[derive(Default)]
pub(crate) struct Batch {
    /// Drop notices, written first.
    pub(crate) notices: Vec<Frame>,
    pub(crate) realtime: VecDeque<Out>,
    pub(crate) processed: VecDeque<Out>,
    /// Deliveries of acknowledged subscriptions: their messages stay kept until acknowledged.
    pub(crate) acked: Vec<AckedOut>,
    /// Written last.
    pub(crate) controls: VecDeque<Frame>,
    /// What the deliveries taken held of the memory cap themselves (to release from [`Memory`]
    /// once written; a kept copy that carries its own charge gives it back when dropped).
    pub(crate) bytes: usize,
    /// Messages taken.
    pub(crate) msgs: usize,
}

impl Batch {
    pub(crate) fn is_empty(&self) -> bool {
        self.notices.is_empty()
            && self.realtime.is_empty()
            && self.processed.is_empty()
            && self.acked.is_empty()
            && self.controls.is_empty()
    }
}

/// A snapshot of one outlet for statistics.
pub(crate) struct OutletStats {
    pub(crate) queued_msgs: usize,
    pub(crate) queued_bytes: usize,
    pub(crate) dropped: u64,
    pub(crate) dropped_by_topic: Vec<(Topic, u64)>,
}

/// See the module documentation.
pub(crate) struct Outlet {
    state: Mutex<State>,
    /// Wakes the writer.
    notify: Notify,
    /// Woken when the writer takes the Processed queue (publishers waiting for room).
    space: Notify,
    encoding: Encoding,
}

impl Outlet {
    /// A connection's queues; their drops add to the broker-wide `totals`.
    pub(crate) fn new(
        bounds: Bounds,
        policy: SlowReaderPolicy,
        encoding: Encoding,
        totals: Arc<DropTotals>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                realtime: RealtimeQueue::new(bounds, policy, totals),
                processed: ProcessedQueue::new(bounds),
                controls: VecDeque::new(),
                acked: Vec::new(),
                closed: false,
            }),
            notify: Notify::new(),
            space: Notify::new(),
            encoding,
        }
    }

    /// Offers a delivery to the Realtime queue (see [`RealtimeQueue::push`]). An overflow
    /// under the disconnect policy closes the outlet.
    pub(crate) fn push_realtime(
        &self,
        item: Item<'_>,
        memory: &Memory,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        self.push_with(|st| st.realtime.push(item, memory, self.encoding, group))
    }

    /// Offers a delivery to the Processed queue (see [`ProcessedQueue::push`]).
    pub(crate) fn push_processed(
        &self,
        item: Item<'_>,
        memory: &Memory,
        group: Option<&QueueGroup>,
    ) -> Pushed {
        self.push_with(|st| st.processed.push(item, memory, self.encoding, group))
    }

    /// Runs `push` on the open outlet's state; `wake` tells whether the writer had nothing
    /// before, and an overflow closes the outlet.
    fn push_with(&self, push: impl FnOnce(&mut State) -> Pushed) -> Pushed {
        let mut st = self.state.lock();
        if st.closed {
            return Pushed::Closed;
        }
        let wake = st.is_empty();
        match push(&mut st) {
            Pushed::Queued { evicted, .. } => Pushed::Queued { evicted, wake },
            Pushed::Overflow => {
                st.closed = true;
                drop(st);
                self.notify.notify_one();
                Pushed::Overflow
            }
            other => other,
        }
    }

    /// Whether a message of `size` bytes would enter the Realtime (`processed` false) or
    /// Processed queue now without waiting or evicting anything (and the outlet is open).
    pub(crate) fn has_room(&self, processed: bool, size: usize, memory: &Memory) -> bool {
        let st = self.state.lock();
        !st.closed
            && if processed {
                st.processed.has_room(size, 1, memory)
            } else {
                st.realtime.has_room(size, memory)
            }
    }

    /// Waits until `item` would fit the Processed queue (or the outlet closed), so an item
    /// refused with [`Pushed::Full`] can be offered again. Returns at once only when it would
    /// fit now; otherwise waits for the writer to take the queue, rechecking after 10 ms at
    /// most because room under the broker-wide memory cap can also come from other
    /// connections.
    pub(crate) async fn wait_for_room(&self, item: Item<'_>, memory: &Memory) {
        let (size, n) = (item.size(), item.count());
        let taken = self.space.notified();
        {
            let st = self.state.lock();
            if st.closed || st.processed.has_room(size, n, memory) {
                return;
            }
        }
        tokio::select! {
            () = taken => {}
            () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
        }
    }

    /// Wakes the writer (after a [`Pushed::Queued`] with `wake` set).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Queues a control frame. Returns `false` when the outlet is closed or the peer let too
    /// many control frames pile up (the caller then disconnects it).
    pub(crate) fn push_frame(&self, frame: Frame) -> bool {
        let mut st = self.state.lock();
        if st.closed || st.controls.len() >= MAX_QUEUED_CONTROL {
            return false;
        }
        let wake = st.is_empty();
        st.controls.push_back(frame);
        drop(st);
        if wake {
            self.notify.notify_one();
        }
        true
    }

    /// Queues a final frame and closes the outlet: the writer writes what is queued, then
    /// this frame, then stops.
    pub(crate) fn close_with(&self, frame: Option<Frame>) {
        let mut st = self.state.lock();
        if let Some(f) = frame.filter(|_| !st.closed) {
            st.controls.push_back(f);
        }
        st.closed = true;
        drop(st);
        self.notify.notify_one();
    }

    /// Moves everything queued into `batch` (whose queues must be empty), and what the
    /// attached acknowledged subscriptions' windows allow, sent at `now_ms`.
    pub(crate) fn take(&self, batch: &mut Batch, now_ms: u64) {
        let mut st = self.state.lock();
        let st = &mut *st;
        batch.notices.extend(st.realtime.drops.take_notice());
        let (rb, rm) = st.realtime.lane.take(&mut batch.realtime);
        let (pb, pm) = st.processed.lane.take(&mut batch.processed);
        let mut am = 0;
        for sub in &st.acked {
            batch.notices.extend(sub.take_notice());
            am += sub.take(now_ms, &mut batch.acked);
        }
        std::mem::swap(&mut st.controls, &mut batch.controls);
        batch.bytes = rb + pb;
        batch.msgs = rm + pm + am;
        if pm > 0 {
            self.space.notify_waiters();
        }
    }

    /// Attaches an acknowledged subscription: the writer sends what its window allows.
    /// Refused (`false`) when the outlet is closed.
    pub(crate) fn attach(&self, sub: Arc<AckedSub>) -> bool {
        let mut st = self.state.lock();
        if st.closed {
            return false;
        }
        st.acked.push(sub);
        drop(st);
        self.notify.notify_one();
        true
    }

    /// Detaches the acknowledged subscription `sub` (if attached here).
    pub(crate) fn detach(&self, sub: &Arc<AckedSub>) {
        let mut st = self.state.lock();
        if let Some(at) = st.acked.iter().position(|s| Arc::ptr_eq(s, sub)) {
            st.acked.swap_remove(at);
        }
    }

    /// The acknowledged subscriptions attached.
    pub(crate) fn attached(&self) -> Vec<Arc<AckedSub>> {
        self.state.lock().acked.clone()
    }

    /// Whether the outlet is closed (nothing more will be queued).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.lock().closed
    }

    /// Waits until something is queued or the outlet closes.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Closes the outlet and discards what is queued, releasing its memory. Returns the
    /// number of messages discarded; the queue group deliveries among them are added to
    /// `regroup` so another member of their group can be given them.
    pub(crate) fn discard(
        &self,
        memory: &Memory,
        regroup: &mut Vec<(Message, QueueGroup)>,
    ) -> usize {
        let mut st = self.state.lock();
        st.closed = true;
        st.controls.clear();
        let (rb, rm) = st.realtime.lane.discard(regroup);
        let (pb, pm) = st.processed.lane.discard(regroup);
        memory.release(rb + pb);
        drop(st);
        self.space.notify_waiters();
        rm + pm
    }

    pub(crate) fn stats(&self) -> OutletStats {
        let mut st = self.state.lock();
        let st = &mut *st;
        OutletStats {
            queued_msgs: st.realtime.lane.msgs + st.processed.lane.msgs,
            queued_bytes: st.realtime.lane.bytes + st.processed.lane.bytes,
            dropped: st.realtime.drops.total(),
            dropped_by_topic: st.realtime.drops.by_topic(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::lane::ENCODE_BELOW;
    use bytes::Bytes;
    use daemoneye_eventbus_core::Header;
    use daemoneye_eventbus_core::codec::{
        DecodeCache, DropReason, FrameDecoder, Lent, LentFrame, MessageRun, Notice, RunWriter,
    };
    use daemoneye_eventbus_transport::VECTORED_MIN;

    const STREAM: Encoding = Encoding::Bytes { runs: true };

    fn outlet(msgs: usize, bytes: usize, policy: SlowReaderPolicy, encoding: Encoding) -> Outlet {
        Outlet::new(Bounds { msgs, bytes }, policy, encoding, Arc::default())
    }

    fn msg(topic: &str, len: usize) -> Lent<'static, Message> {
        Lent::owned(Message::new(
            Topic::new(topic).unwrap(),
            Header::default(),
            Bytes::from(vec![0; len]),
        ))
    }

    /// A run of `n` one-byte messages on `topic`, as the broker receives it.
    fn run(topic: &str, n: usize) -> Lent<'static, MessageRun> {
        let mut b = bytes::BytesMut::new();
        let mut w = RunWriter::begin(
            &mut b,
            &Topic::new(topic).unwrap(),
            daemoneye_eventbus_core::Qos::Realtime,
        );
        for _ in 0..n {
            w.push(&mut b, &Header::default(), b"x");
        }
        match FrameDecoder::new(1 << 20).decode(&mut b) {
            Ok(Some(Frame::PublishRun(r))) => Lent::owned(r),
            other => panic!("{other:?}"),
        }
    }

    fn rt(o: &Outlet, m: &Lent<'_, Message>, mem: &Memory) -> Pushed {
        o.push_realtime(Item::Msg(m), mem, None)
    }

    fn pr(o: &Outlet, m: &Lent<'_, Message>, mem: &Memory) -> Pushed {
        o.push_processed(Item::Msg(m), mem, None)
    }

    fn taken(o: &Outlet) -> Batch {
        let mut b = Batch::default();
        o.take(&mut b, 0);
        b
    }

    /// What a queued delivery is: a message's topic, `run <topic>`, the frames of a chunk.
    fn describe(o: &Out) -> String {
        match o {
            Out::Msg(m, None) => m.topic().to_string(),
            Out::Msg(m, Some(g)) => format!("{} in {g}", m.topic()),
            Out::Run(r) => format!("run {}", r.topic()),
            Out::Encoded(c) => {
                let frames: Vec<_> = c
                    .topics()
                    .map(|(t, n)| format!("{}x{n}", String::from_utf8_lossy(t)))
                    .collect();
                format!("chunk {}", frames.join(" "))
            }
        }
    }

    fn described(q: &VecDeque<Out>) -> Vec<String> {
        q.iter().map(describe).collect()
    }

    fn notice_topics(b: &Batch) -> Vec<(Topic, u64)> {
        match b.notices.first() {
            Some(Frame::Notice(Notice::Dropped { topics, .. })) => topics.clone(),
            other => panic!("expected a notice, got {other:?}"),
        }
    }

    #[test]
    fn realtime_traffic_never_touches_the_processed_queue() {
        let mem = Memory::new(1 << 30);
        let o = outlet(2, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..2 {
            assert!(matches!(
                pr(&o, &msg("keep", 1), &mem),
                Pushed::Queued { .. }
            ));
        }
        assert_eq!(pr(&o, &msg("keep", 1), &mem), Pushed::Full);
        for t in ["a", "b", "c"] {
            assert!(matches!(rt(&o, &msg(t, 1), &mem), Pushed::Queued { .. }));
        }
        let b = taken(&o);
        assert_eq!(described(&b.processed), ["keep", "keep"]);
        assert_eq!(described(&b.realtime), ["b", "c"]);
        assert_eq!(notice_topics(&b), [(Topic::new("a").unwrap(), 1)]);
        assert_eq!(b.msgs, 4);
        mem.release(b.bytes);
        assert_eq!(mem.used(), 0);
    }

    #[test]
    fn a_full_processed_queue_drops_nothing_and_takes_again_after_the_writer() {
        let mem = Memory::new(1 << 30);
        let o = outlet(2, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..2 {
            assert!(matches!(pr(&o, &msg("a", 1), &mem), Pushed::Queued { .. }));
        }
        assert!(!o.has_room(true, msg("a", 1).accounted_size(), &mem));
        assert_eq!(pr(&o, &msg("a", 1), &mem), Pushed::Full);
        assert_eq!(o.stats().dropped, 0);
        let b = taken(&o);
        mem.release(b.bytes);
        assert!(o.has_room(true, msg("a", 1).accounted_size(), &mem));
        assert!(matches!(pr(&o, &msg("a", 1), &mem), Pushed::Queued { .. }));
    }

    #[test]
    fn the_first_delivery_or_control_frame_into_an_empty_outlet_wakes_the_writer() {
        let mem = Memory::new(1 << 30);
        let o = outlet(10, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        assert_eq!(
            rt(&o, &msg("a", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: true
            }
        );
        assert_eq!(
            pr(&o, &msg("b", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: false
            }
        );
        assert!(o.push_frame(Frame::Ping(1)));
        let b = taken(&o);
        assert_eq!(
            (b.realtime.len(), b.processed.len(), b.controls.len()),
            (1, 1, 1)
        );
        assert_eq!(
            pr(&o, &msg("b", 1), &mem),
            Pushed::Queued {
                evicted: 0,
                wake: true
            }
        );
    }

    #[test]
    fn byte_bound_and_memory_cap() {
        let one = msg("a", 100).accounted_size();
        let mem = Memory::new(one * 3);
        let o = outlet(100, one * 2, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for _ in 0..5 {
            rt(&o, &msg("a", 100), &mem);
        }
        assert_eq!(o.stats().queued_bytes, one * 2);
        assert_eq!(o.stats().dropped, 3);
        // A second outlet can only take what is left of the global cap: its own oldest goes.
        let other = outlet(100, one * 2, SlowReaderPolicy::DropOldest, Encoding::Shared);
        assert!(matches!(
            rt(&other, &msg("b", 100), &mem),
            Pushed::Queued { .. }
        ));
        assert_eq!(
            rt(&other, &msg("b", 100), &mem),
            Pushed::Queued {
                evicted: 1,
                wake: false
            }
        );
        match taken(&other).notices.first() {
            Some(Frame::Notice(Notice::Dropped { reason, .. })) => {
                assert_eq!(*reason, DropReason::MemoryCap);
            }
            n => panic!("{n:?}"),
        }
        assert!(mem.used() <= mem.cap());
        // With nothing of its own left to evict, the new message is dropped instead.
        let third = outlet(100, one * 2, SlowReaderPolicy::DropOldest, Encoding::Shared);
        assert_eq!(rt(&third, &msg("c", 100), &mem), Pushed::Dropped);
        assert_eq!(third.stats().dropped, 1);
    }

    #[test]
    fn a_run_counts_as_its_messages_and_is_evicted_whole() {
        let mem = Memory::new(1 << 30);
        let o = outlet(5, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        let three = run("r", 3);
        assert!(matches!(
            o.push_realtime(Item::Run(&three), &mem, None),
            Pushed::Queued { evicted: 0, .. }
        ));
        assert_eq!(o.stats().queued_msgs, 3);
        assert_eq!(o.stats().queued_bytes, three.accounted_size());
        rt(&o, &msg("m", 1), &mem);
        rt(&o, &msg("m", 1), &mem);
        assert_eq!(
            rt(&o, &msg("m", 1), &mem),
            Pushed::Queued {
                evicted: 3,
                wake: false
            }
        );
        let b = taken(&o);
        assert_eq!(b.msgs, 3);
        assert_eq!(notice_topics(&b), [(Topic::new("r").unwrap(), 3)]);
        mem.release(b.bytes);
        // In the Processed queue, a run that does not fit waits; one larger than the whole
        // bound still enters an empty queue.
        let big = run("r", 9);
        assert!(matches!(
            o.push_processed(Item::Run(&big), &mem, None),
            Pushed::Queued { .. }
        ));
        assert_eq!(
            o.push_processed(Item::Run(&three), &mem, None),
            Pushed::Full
        );
        assert_eq!(o.stats().dropped, 3);
    }

    #[test]
    fn disconnect_policy_overflows_and_closes() {
        let mem = Memory::new(1 << 30);
        let o = outlet(1, 1 << 20, SlowReaderPolicy::Disconnect, Encoding::Shared);
        assert!(matches!(rt(&o, &msg("a", 1), &mem), Pushed::Queued { .. }));
        assert_eq!(rt(&o, &msg("a", 1), &mem), Pushed::Overflow);
        assert!(o.is_closed());
        assert_eq!(o.stats().dropped, 1, "the overflowing message is counted");
        assert!(
            taken(&o).notices.is_empty(),
            "no notice: the connection closes"
        );
        assert_eq!(rt(&o, &msg("a", 1), &mem), Pushed::Closed);
    }

    #[test]
    fn byte_stream_deliveries_are_encoded_into_one_chunk_that_reads_back() {
        let mem = Memory::new(1 << 30);
        let o = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let (a, b) = (msg("a", 3), msg("b", 0));
        let (one, three) = (run("r", 1), run("s", 3));
        for item in [
            Item::Msg(&a),
            Item::Run(&one),
            Item::Run(&three),
            Item::Msg(&b),
        ] {
            assert!(matches!(
                o.push_realtime(item, &mem, None),
                Pushed::Queued { evicted: 0, .. }
            ));
        }
        let batch = taken(&o);
        assert_eq!(batch.msgs, 6);
        assert_eq!(described(&batch.realtime), ["chunk ax1 rx1 sx3 bx1"]);
        let Some(Out::Encoded(chunk)) = batch.realtime.into_iter().next() else {
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
        assert!(matches!(&frames[0], Frame::Deliver(m) if *m == a.keep()));
        assert!(matches!(&frames[1], Frame::Deliver(m) if m.topic().as_str() == "r"));
        assert!(matches!(&frames[2], Frame::DeliverRun(r) if r.len() == 3));
        assert!(matches!(&frames[3], Frame::Deliver(m) if *m == b.keep()));
    }

    #[test]
    fn group_deliveries_are_kept_as_messages_between_chunks() {
        let mem = Memory::new(1 << 30);
        let o = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let group = QueueGroup::new("g").unwrap();
        rt(&o, &msg("b", 1), &mem);
        o.push_realtime(Item::Msg(&msg("c", 1)), &mem, Some(&group));
        rt(&o, &msg("d", 1), &mem);
        pr(&o, &msg("p", 1), &mem);
        let b = taken(&o);
        assert_eq!(described(&b.realtime), ["chunk bx1", "c in g", "chunk dx1"]);
        assert_eq!(described(&b.processed), ["chunk px1"]);
        // What a departing connection leaves behind: its group deliveries go to another
        // member.
        o.push_realtime(Item::Msg(&msg("c", 1)), &mem, Some(&group));
        rt(&o, &msg("d", 1), &mem);
        let mut regroup = Vec::new();
        assert_eq!(o.discard(&mem, &mut regroup), 2);
        assert_eq!(regroup.len(), 1);
        assert!(o.is_closed());
    }

    #[test]
    fn a_chunk_is_evicted_as_a_unit_and_its_drops_counted_per_topic() {
        let mem = Memory::new(1 << 30);
        let o = outlet(3, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        for t in ["a", "a", "b"] {
            rt(&o, &msg(t, 1), &mem);
        }
        assert_eq!(
            rt(&o, &msg("c", 1), &mem),
            Pushed::Queued {
                evicted: 3,
                wake: false
            }
        );
        let b = taken(&o);
        assert_eq!(described(&b.realtime), ["chunk cx1"]);
        assert_eq!(b.msgs, 1);
        assert_eq!(
            notice_topics(&b),
            [(Topic::new("a").unwrap(), 2), (Topic::new("b").unwrap(), 1)]
        );
        mem.release(b.bytes);
        assert_eq!(mem.used(), 0);
        assert_eq!(o.stats().dropped, 3);
    }

    #[test]
    fn a_queue_holding_enough_keeps_messages_and_large_payloads_stay_shared() {
        let mem = Memory::new(1 << 30);
        let o = outlet(1000, 8 << 20, SlowReaderPolicy::DropOldest, STREAM);
        rt(&o, &msg("big", VECTORED_MIN), &mem);
        let m = msg("m", 8 * 1024);
        let mut pushed = 1;
        while o.stats().queued_bytes < ENCODE_BELOW {
            rt(&o, &m, &mem);
            pushed += 1;
        }
        rt(&o, &m, &mem);
        let b = taken(&o);
        assert_eq!(b.msgs, pushed + 1);
        let d = described(&b.realtime);
        assert_eq!(d.first().map(String::as_str), Some("big"));
        assert!(d[1..d.len() - 1].iter().all(|d| d.starts_with("chunk m")));
        assert_eq!(d.last().map(String::as_str), Some("m"));
    }

    #[test]
    fn a_queue_keeps_its_own_copies_of_lent_messages_and_runs() {
        let mut wire = bytes::BytesMut::with_capacity(4096);
        Frame::Publish(msg("m", 10).keep()).encode(&mut wire);
        let mut w = RunWriter::begin(
            &mut wire,
            &Topic::new("r").unwrap(),
            daemoneye_eventbus_core::Qos::Realtime,
        );
        w.push(&mut wire, &Header::default(), b"x");
        let within = wire.as_ptr() as usize..wire.as_ptr() as usize + wire.capacity();
        let (dec, mut cache) = (FrameDecoder::new(1 << 20), DecodeCache::lending());
        let mem = Memory::new(1 << 30);
        let o = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        while let Some(f) = dec.decode_lent(&mut wire, &mut cache).unwrap() {
            let pushed = match &f {
                LentFrame::Publish(m) => o.push_realtime(Item::Msg(m), &mem, None),
                LentFrame::PublishRun(r) => o.push_realtime(Item::Run(r), &mem, None),
                LentFrame::Other(other) => panic!("{other:?}"),
            };
            assert!(matches!(pushed, Pushed::Queued { .. }));
        }
        let b = taken(&o);
        for out in &b.realtime {
            let at = match out {
                Out::Msg(m, _) => m.wire().as_ptr(),
                Out::Run(r) => r.wire().as_ptr(),
                Out::Encoded(_) => unreachable!("shared encoding"),
            } as usize;
            assert!(
                !within.contains(&at),
                "{} holds the read buffer",
                describe(out)
            );
        }
        assert_eq!(described(&b.realtime), ["m", "run r"]);
        assert!(
            wire.try_reclaim(4096),
            "nothing queued holds the read buffer"
        );
    }

    /// A delivery a byte-stream queue keeps rather than encodes: a queue group's.
    fn kept_rt(o: &Outlet, m: &Lent<'_, Message>, mem: &Memory) -> Pushed {
        o.push_realtime(Item::Msg(m), mem, Some(&QueueGroup::new("g").unwrap()))
    }

    fn kept_pr(o: &Outlet, m: &Lent<'_, Message>, mem: &Memory) -> Pushed {
        o.push_processed(Item::Msg(m), mem, Some(&QueueGroup::new("g").unwrap()))
    }

    #[test]
    fn an_in_process_peer_keeps_a_copy_of_its_own_charged_until_written() {
        let mut wire = bytes::BytesMut::with_capacity(4096);
        Frame::Publish(msg("m", 200).keep()).encode(&mut wire);
        let (dec, mut cache) = (FrameDecoder::new(1 << 20), DecodeCache::lending());
        let mem = Memory::new(1 << 30);
        let stream = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM);
        let inproc = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        let Some(LentFrame::Publish(m)) = dec.decode_lent(&mut wire, &mut cache).unwrap() else {
            panic!("a publish")
        };
        let size = m.accounted_size();
        assert!(matches!(kept_rt(&stream, &m, &mem), Pushed::Queued { .. }));
        assert!(matches!(rt(&inproc, &m, &mem), Pushed::Queued { .. }));
        drop(m);
        let entry = std::mem::size_of::<Out>();
        assert_eq!(mem.used(), size + entry + size);
        let b = taken(&inproc);
        let Some(Out::Msg(own, None)) = b.realtime.front() else {
            panic!("a kept message")
        };
        assert!(
            !own.is_charged(),
            "the application may hold it as long as it likes"
        );
        mem.release(b.bytes);
        assert_eq!(mem.used(), size + entry, "written: its charge is back");
    }

    #[test]
    fn queues_keeping_one_lent_frame_share_one_copy_charged_once() {
        let mut wire = bytes::BytesMut::with_capacity(4096);
        Frame::Publish(msg("m", 200).keep()).encode(&mut wire);
        let (dec, mut cache) = (FrameDecoder::new(1 << 20), DecodeCache::lending());
        let mem = Memory::new(1 << 30);
        let outlets: Vec<Outlet> = (0..3)
            .map(|_| outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM))
            .collect();
        // Byte-stream peers keep queue group deliveries (as they keep anything once behind).
        let Some(LentFrame::Publish(m)) = dec.decode_lent(&mut wire, &mut cache).unwrap() else {
            panic!("a publish")
        };
        let size = m.accounted_size();
        assert!(matches!(
            kept_rt(&outlets[0], &m, &mem),
            Pushed::Queued { .. }
        ));
        assert!(matches!(
            kept_pr(&outlets[1], &m, &mem),
            Pushed::Queued { .. }
        ));
        assert!(matches!(
            kept_rt(&outlets[2], &m, &mem),
            Pushed::Queued { .. }
        ));
        drop(m);
        let entry = std::mem::size_of::<Out>();
        assert_eq!(mem.used(), size + 3 * entry, "one copy, three slots");
        let batches: Vec<Batch> = outlets.iter().map(taken).collect();
        let copies: Vec<usize> = batches
            .iter()
            .flat_map(|b| b.realtime.iter().chain(b.processed.iter()))
            .map(|out| match out {
                Out::Msg(m, _) => m.wire().as_ptr() as usize,
                other => panic!("{}", describe(other)),
            })
            .collect();
        assert_eq!(copies.len(), 3);
        assert!(copies.iter().all(|c| *c == copies[0]), "the same copy");
        // Written: each writer gives back its slot; the copy goes with its last holder.
        let mut batches = batches.into_iter();
        for b in batches.by_ref().take(2) {
            mem.release(b.bytes);
            drop(b);
        }
        assert_eq!(mem.used(), size + entry);
        let last = batches.next().unwrap();
        mem.release(last.bytes);
        drop(last);
        assert_eq!(mem.used(), 0);
    }

    #[test]
    fn under_the_cap_a_queue_evicts_only_while_that_frees_memory() {
        // Two queues share five kept copies that fill the cap. A sixth message for the first
        // queue alone: evicting its oldest frees only a slot (the copy lives on in the
        // other), so it stops there and drops the new message instead of emptying itself.
        let mut wire = bytes::BytesMut::with_capacity(1 << 16);
        for _ in 0..6 {
            Frame::Publish(msg("m", 200).keep()).encode(&mut wire);
        }
        let (dec, mut cache) = (FrameDecoder::new(1 << 20), DecodeCache::lending());
        let one = msg("m", 200).accounted_size() + 2 * std::mem::size_of::<Out>();
        let mem = Memory::new(one * 5);
        let (a, b) = (
            outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM),
            outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, STREAM),
        );
        for _ in 0..5 {
            let Some(LentFrame::Publish(m)) = dec.decode_lent(&mut wire, &mut cache).unwrap()
            else {
                panic!("a publish")
            };
            assert!(matches!(
                kept_rt(&a, &m, &mem),
                Pushed::Queued { evicted: 0, .. }
            ));
            assert!(matches!(
                kept_rt(&b, &m, &mem),
                Pushed::Queued { evicted: 0, .. }
            ));
        }
        assert_eq!(mem.used(), mem.cap());
        let Some(LentFrame::Publish(m)) = dec.decode_lent(&mut wire, &mut cache).unwrap() else {
            panic!("a publish")
        };
        assert_eq!(kept_rt(&a, &m, &mem), Pushed::Dropped);
        assert_eq!(
            a.stats().dropped,
            2,
            "one evicted in vain, then the new one"
        );
        assert_eq!(taken(&a).msgs, 4);
        assert!(mem.used() <= mem.cap());
    }

    #[test]
    fn control_frames_are_bounded_and_the_final_frame_comes_last() {
        let mem = Memory::new(1 << 30);
        let o = outlet(100, 1 << 20, SlowReaderPolicy::DropOldest, Encoding::Shared);
        for n in 0..MAX_QUEUED_CONTROL {
            assert!(o.push_frame(Frame::Ping(n as u64)));
        }
        assert!(!o.push_frame(Frame::Ping(0)), "the peer stopped reading");
        let b = taken(&o);
        assert_eq!(b.controls.len(), MAX_QUEUED_CONTROL);
        rt(&o, &msg("a", 1), &mem);
        o.close_with(Some(Frame::Pong(7)));
        assert!(!o.push_frame(Frame::Ping(1)));
        assert_eq!(rt(&o, &msg("a", 1), &mem), Pushed::Closed);
        let b = taken(&o);
        assert_eq!(described(&b.realtime), ["a"]);
        assert!(matches!(b.controls.back(), Some(Frame::Pong(7))));
    }
}
