//! Acknowledged subscriptions (protocol 1.3): Processed deliveries the subscriber
//! acknowledges, kept in a [`Store`] until it does, redelivered when it does not.
//!
//! [`AckedQueue`] is the pure part: which positions of the store wait to be sent, which are in
//! flight (sent, not acknowledged) under which delivery sequence number, and how often each
//! was delivered; time is a parameter. [`AckedSub`] is one subscription as the broker shares
//! it: the queue behind a lock, whether it is attached to a connection (and which), whether
//! it stalled, its bounds and full policy, its counters.

use super::store::{MemoryStore, Pos, Store};
use super::{Drops, Memory, Outlet};
use daemoneye_eventbus_core::codec::{AckedDelivery, DropReason, Notice, SubId};
use daemoneye_eventbus_core::{DurableName, Message, TopicFilter};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use tokio::sync::Notify;

/// Bounds of one acknowledged subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckedLimits {
    /// Messages kept at most (waiting to be sent, or sent and not acknowledged).
    pub(crate) msgs: usize,
    /// Charged bytes kept at most.
    pub(crate) bytes: usize,
    /// Deliveries in flight (sent, not acknowledged) at most.
    pub(crate) window: usize,
}

/// A sent, unacknowledged delivery.
#[derive(Debug, Clone, Copy)]
struct Flight {
    seq: u64,
    /// `None` once acknowledged (removed when it reaches the front).
    pos: Option<Pos>,
    /// Deliveries of this position so far, this one included.
    deliveries: u16,
    sent_ms: u64,
}

/// The delivery state of one acknowledged subscription. See the module documentation.
pub(crate) struct AckedQueue<S: Store> {
    store: S,
    /// Positions to send, in order, with how often each was delivered already (redeliveries
    /// go first, in position order).
    unsent: VecDeque<(Pos, u16)>,
    /// In delivery sequence order.
    in_flight: VecDeque<Flight>,
    /// Live entries of `in_flight`.
    unacked: usize,
    next_seq: u64,
    limits: AckedLimits,
}

impl<S: Store> AckedQueue<S> {
    pub(crate) fn new(store: S, limits: AckedLimits) -> Self {
        Self {
            store,
            unsent: VecDeque::new(),
            in_flight: VecDeque::new(),
            unacked: 0,
            next_seq: 1,
            limits,
        }
    }

    /// Whether a message of `size` charged bytes fits the bounds (an empty queue takes one).
    pub(crate) fn fits(&self, size: usize) -> bool {
        self.store.len() == 0
            || (self.store.len() < self.limits.msgs
                && self.store.bytes() + size <= self.limits.bytes)
    }

    /// Keeps `msg`, to be sent after everything kept before it.
    pub(crate) fn append(&mut self, msg: Message) {
        let pos = self.store.append(msg);
        self.unsent.push_back((pos, 0));
    }

    /// Drops the oldest message kept (the retention policy); returns it.
    pub(crate) fn drop_oldest(&mut self) -> Option<Message> {
        let pos = self.store.oldest()?;
        let msg = self.store.remove(pos)?;
        if let Some(i) = self.unsent.iter().position(|(p, _)| *p == pos) {
            self.unsent.remove(i);
        } else if let Some(f) = self.in_flight.iter_mut().find(|f| f.pos == Some(pos)) {
            f.pos = None;
            self.unacked -= 1;
            self.trim();
        }
        Some(msg)
    }

    /// Sets how many deliveries may be in flight at once (from the next send on).
    pub(crate) fn set_window(&mut self, window: usize) {
        self.limits.window = window;
    }

    /// Whether something can be sent now (waiting, and the window has room).
    pub(crate) fn sendable(&self) -> bool {
        !self.unsent.is_empty() && self.unacked < self.limits.window
    }

    /// Sends what the window allows: each delivery gets the next sequence number and joins
    /// the flight at `now_ms`.
    pub(crate) fn take(&mut self, sub: SubId, now_ms: u64, out: &mut Vec<AckedDelivery>) -> usize {
        let mut n = 0;
        while self.unacked < self.limits.window {
            let Some((pos, before)) = self.unsent.pop_front() else {
                break;
            };
            let Some(msg) = self.store.get(pos) else {
                continue;
            };
            let seq = self.next_seq;
            self.next_seq += 1;
            out.push(AckedDelivery {
                sub,
                seq,
                redelivered: before,
                message: msg.clone(),
            });
            self.in_flight.push_back(Flight {
                seq,
                pos: Some(pos),
                deliveries: before.saturating_add(1),
                sent_ms: now_ms,
            });
            self.unacked += 1;
            n += 1;
        }
        n
    }

    /// Acknowledges the deliveries in `ranges` (inclusive sequence numbers): their messages
    /// are forgotten. Returns the messages and charged bytes freed.
    pub(crate) fn ack(&mut self, ranges: &[(u64, u64)]) -> (usize, usize) {
        let (mut msgs, mut bytes) = (0, 0);
        for &(first, last) in ranges {
            let start = self.in_flight.partition_point(|f| f.seq < first);
            for f in self.in_flight.iter_mut().skip(start) {
                if f.seq > last {
                    break;
                }
                if let Some(pos) = f.pos.take() {
                    self.unacked -= 1;
                    if let Some(m) = self.store.remove(pos) {
                        msgs += 1;
                        bytes += m.accounted_size();
                    }
                }
            }
        }
        self.trim();
        (msgs, bytes)
    }

    fn trim(&mut self) {
        while matches!(self.in_flight.front(), Some(f) if f.pos.is_none()) {
            self.in_flight.pop_front();
        }
    }

    /// Sends again, first, what was in flight for `timeout_ms` or more at `now_ms`; returns
    /// how many.
    pub(crate) fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> usize {
        self.requeue(|f| now_ms.saturating_sub(f.sent_ms) >= timeout_ms)
    }

    /// Sends again, first, everything in flight (the subscriber went away); returns how many.
    pub(crate) fn requeue_all(&mut self) -> usize {
        self.requeue(|_| true)
    }

    fn requeue(&mut self, due: impl Fn(&Flight) -> bool) -> usize {
        let mut again: Vec<(Pos, u16)> = Vec::new();
        for f in &mut self.in_flight {
            if let Some(pos) = f.pos
                && due(f)
            {
                again.push((pos, f.deliveries));
                f.pos = None;
            }
        }
        self.unacked -= again.len();
        self.trim();
        let n = again.len();
        again.sort_unstable_by_key(|(pos, _)| *pos);
        for entry in again.into_iter().rev() {
            self.unsent.push_front(entry);
        }
        n
    }

    /// Messages waiting to be sent.
    pub(crate) fn pending(&self) -> usize {
        self.unsent.len()
    }

    /// Deliveries sent and not acknowledged.
    pub(crate) fn unacked(&self) -> usize {
        self.unacked
    }

    /// Messages kept, and their charged bytes.
    pub(crate) fn kept(&self) -> (usize, usize) {
        (self.store.len(), self.store.bytes())
    }

    /// Forgets everything; returns the messages and charged bytes dropped.
    pub(crate) fn clear(&mut self) -> (usize, usize) {
        let kept = self.kept();
        while let Some(pos) = self.store.oldest() {
            self.store.remove(pos);
        }
        self.unsent.clear();
        self.in_flight.clear();
        self.unacked = 0;
        kept
    }
}

/// What a durable subscription's full backlog does with a new message while nobody is
/// attached, or while its subscriber stalled (configuration `durable_full_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurableFullPolicy {
    /// Drop the oldest messages kept until the new one fits (default): the backlog holds the
    /// latest events.
    #[default]
    DropOldest,
    /// Drop the new message: the backlog holds the first events.
    DropNew,
}

/// The connection an acknowledged subscription delivers to.
pub(crate) struct Attachment {
    pub(crate) outlet: Weak<Outlet>,
    pub(crate) sub: SubId,
    pub(crate) session_id: u64,
    pub(crate) client: String,
    /// Deliveries the attached subscriber takes unacknowledged at once.
    pub(crate) window: usize,
}

/// Result of offering a message to an acknowledged subscription.
pub(crate) enum SubPushed {
    /// Kept; `wake` is the attached connection's outlet when its writer has something to send
    /// now. `dropped` older messages were dropped (retention) to make room.
    Kept {
        wake: Option<Arc<Outlet>>,
        dropped: u64,
    },
    /// No room while the subscriber is attached and keeping up: the publisher waits.
    Full,
    /// Not kept (retention policy or memory cap), counted.
    Dropped,
    /// The subscription is closed.
    Closed,
}

struct SubState {
    queue: AckedQueue<MemoryStore>,
    attached: Option<Attachment>,
    /// Stalled: its publishers no longer wait for it.
    stalled: bool,
    closed: bool,
    drops: Drops,
    delivered: u64,
    redelivered: u64,
    acked: u64,
}

/// Statistics of one acknowledged subscription.
#[derive(Debug, Clone)]
pub(crate) struct SubStats {
    pub(crate) pending: u64,
    pub(crate) unacked: u64,
    pub(crate) kept_bytes: u64,
    pub(crate) delivered: u64,
    pub(crate) redelivered: u64,
    pub(crate) acked: u64,
    pub(crate) dropped: u64,
    pub(crate) stalled: bool,
    pub(crate) attached: Option<(u64, String)>,
}

/// One acknowledged subscription, shared by the routing table, the connection it is
/// attached to, and the publishers that wait for it. See the module documentation.
pub(crate) struct AckedSub {
    /// Its index in the broker's registry (and value in the routing table).
    pub(crate) index: u32,
    /// A durable subscription's name (it outlives connections); `None` for one that lives
    /// with its connection.
    pub(crate) name: Option<DurableName>,
    pub(crate) filters: Vec<TopicFilter>,
    full_policy: DurableFullPolicy,
    state: Mutex<SubState>,
    /// Woken when acknowledgements make room (publishers waiting).
    space: Notify,
}

impl AckedSub {
    pub(crate) fn new(
        index: u32,
        name: Option<DurableName>,
        filters: Vec<TopicFilter>,
        limits: AckedLimits,
        full_policy: DurableFullPolicy,
    ) -> Self {
        Self {
            index,
            name,
            filters,
            full_policy,
            state: Mutex::new(SubState {
                queue: AckedQueue::new(MemoryStore::default(), limits),
                attached: None,
                stalled: false,
                closed: false,
                drops: Drops::default(),
                delivered: 0,
                redelivered: 0,
                acked: 0,
            }),
            space: Notify::new(),
        }
    }

    /// How it is called in messages: `durable NAME` or `subscription N of CLIENT`.
    pub(crate) fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("durable subscription {n}"),
            None => {
                let st = self.state.lock();
                match &st.attached {
                    Some(a) => format!("subscription {} of {:?}", a.sub, a.client),
                    None => format!("subscription #{}", self.index),
                }
            }
        }
    }

    /// Offers `msg`. Under `may_wait` (a client's publish), a subscription that is attached
    /// and keeping up without room answers [`SubPushed::Full`]; otherwise (nobody attached, the
    /// subscriber stalled, or the broker's own message) the full policy applies.
    pub(crate) fn push(&self, msg: Message, memory: &Memory, may_wait: bool) -> SubPushed {
        let size = msg.accounted_size();
        let mut st = self.state.lock();
        if st.closed {
            return SubPushed::Closed;
        }
        if st.queue.fits(size) && memory.try_reserve(size) {
            return self.keep(st, msg, 0);
        }
        if may_wait && st.attached.is_some() && !st.stalled {
            return SubPushed::Full;
        }
        if self.full_policy == DurableFullPolicy::DropNew {
            st.drops.record(msg.topic(), DropReason::BacklogFull, 1);
            return SubPushed::Dropped;
        }
        let mut dropped = 0;
        loop {
            if st.queue.fits(size) && memory.try_reserve(size) {
                return self.keep(st, msg, dropped);
            }
            let reason = if st.queue.fits(size) {
                DropReason::MemoryCap
            } else {
                DropReason::BacklogFull
            };
            let Some(old) = st.queue.drop_oldest() else {
                st.drops.record(msg.topic(), reason, 1);
                return SubPushed::Dropped;
            };
            memory.release(old.accounted_size());
            st.drops.record(old.topic(), reason, 1);
            dropped += 1;
        }
    }

    fn keep(
        &self,
        mut st: parking_lot::MutexGuard<'_, SubState>,
        msg: Message,
        dropped: u64,
    ) -> SubPushed {
        let was_sendable = st.queue.sendable();
        st.queue.append(msg);
        let wake = match (&st.attached, was_sendable) {
            (Some(a), false) if st.queue.sendable() => a.outlet.upgrade(),
            _ => None,
        };
        SubPushed::Kept { wake, dropped }
    }

    /// Waits until a message of `size` bytes would fit (or the subscription closed or
    /// stalled), rechecking after 10 ms at most (room under the memory cap comes from
    /// elsewhere too).
    pub(crate) async fn wait_for_room(&self, size: usize, memory: &Memory) {
        let acked = self.space.notified();
        {
            let st = self.state.lock();
            if st.closed
                || st.stalled
                || st.attached.is_none()
                || st.queue.fits(size) && memory.has_room(size)
            {
                return;
            }
        }
        tokio::select! {
            () = acked => {}
            () = tokio::time::sleep(std::time::Duration::from_millis(10)) => {}
        }
    }

    /// Attaches the subscription to a connection; `Err` names the connection already holding
    /// it.
    pub(crate) fn attach(&self, attachment: Attachment) -> Result<(), String> {
        let mut st = self.state.lock();
        if let Some(a) = &st.attached {
            return Err(format!(
                "{} is attached to session {} ({:?}); close it there first",
                self.name
                    .as_ref()
                    .map_or_else(String::new, |n| format!("durable subscription {n}")),
                a.session_id,
                a.client
            ));
        }
        // A durable subscription's window is its current subscriber's, not its maker's.
        st.queue.set_window(attachment.window);
        st.attached = Some(attachment);
        st.stalled = false;
        Ok(())
    }

    /// Detaches it from connection `session_id` (if attached there): what was in flight is
    /// sent again, first, to the next subscriber. Returns whether it was attached there.
    pub(crate) fn detach(&self, session_id: u64) -> bool {
        let mut st = self.state.lock();
        if st
            .attached
            .as_ref()
            .is_none_or(|a| a.session_id != session_id)
        {
            return false;
        }
        st.attached = None;
        st.stalled = false;
        st.queue.requeue_all();
        drop(st);
        self.space.notify_waiters();
        true
    }

    /// Acknowledges `ranges`; gives their memory back. Returns the outlet to wake when more
    /// can be sent now.
    pub(crate) fn ack(&self, ranges: &[(u64, u64)], memory: &Memory) -> Option<Arc<Outlet>> {
        let mut st = self.state.lock();
        let (msgs, bytes) = st.queue.ack(ranges);
        memory.release(bytes);
        st.acked += msgs as u64;
        if msgs > 0 && st.stalled {
            // Acknowledging again: its publishers wait for it again.
            st.stalled = false;
        }
        let wake = match &st.attached {
            Some(a) if st.queue.sendable() => a.outlet.upgrade(),
            _ => None,
        };
        drop(st);
        if msgs > 0 {
            self.space.notify_waiters();
        }
        wake
    }

    /// Sends again what was in flight for `timeout_ms` at `now_ms`; returns the outlet to wake
    /// when there is.
    pub(crate) fn expire(&self, now_ms: u64, timeout_ms: u64) -> Option<Arc<Outlet>> {
        let mut st = self.state.lock();
        if st.queue.expire(now_ms, timeout_ms) == 0 {
            return None;
        }
        st.attached.as_ref().and_then(|a| a.outlet.upgrade())
    }

    /// Moves what the window allows into `out`, for the attached connection's writer.
    pub(crate) fn take(&self, now_ms: u64, out: &mut Vec<AckedDelivery>) -> usize {
        let mut st = self.state.lock();
        let Some(sub) = st.attached.as_ref().map(|a| a.sub) else {
            return 0;
        };
        let start = out.len();
        let n = st.queue.take(sub, now_ms, out);
        st.delivered += n as u64;
        st.redelivered += out[start..].iter().filter(|d| d.redelivered > 0).count() as u64;
        n
    }

    /// Marks it stalled: its publishers stop waiting for it (until it acknowledges again).
    pub(crate) fn stall(&self) {
        self.state.lock().stalled = true;
        self.space.notify_waiters();
    }

    /// Whether a connection holds it.
    pub(crate) fn is_attached(&self) -> bool {
        self.state.lock().attached.is_some()
    }

    /// The outlet of the connection it is attached to, with the id it has there and the
    /// connection's session.
    pub(crate) fn attached_at(&self) -> Option<(Arc<Outlet>, SubId, u64)> {
        let st = self.state.lock();
        let a = st.attached.as_ref()?;
        Some((a.outlet.upgrade()?, a.sub, a.session_id))
    }

    /// Closes it and forgets what it kept, giving the memory back; returns the messages
    /// dropped.
    pub(crate) fn close(&self, memory: &Memory) -> u64 {
        let mut st = self.state.lock();
        st.closed = true;
        st.attached = None;
        let (msgs, bytes) = st.queue.clear();
        memory.release(bytes);
        drop(st);
        self.space.notify_waiters();
        msgs as u64
    }

    /// The drop notice due to the attached subscriber, if any (kept until one is attached).
    pub(crate) fn take_notice(&self) -> Option<daemoneye_eventbus_core::Frame> {
        let mut st = self.state.lock();
        let sub = st.attached.as_ref()?.sub;
        match st.drops.take_notice()? {
            daemoneye_eventbus_core::Frame::Notice(Notice::Dropped { reason, topics }) => {
                Some(daemoneye_eventbus_core::Frame::Notice(Notice::SubDropped {
                    sub,
                    reason,
                    topics,
                }))
            }
            other => Some(other),
        }
    }

    pub(crate) fn stats(&self) -> SubStats {
        let st = self.state.lock();
        SubStats {
            pending: st.queue.pending() as u64,
            unacked: st.queue.unacked() as u64,
            kept_bytes: st.queue.kept().1 as u64,
            delivered: st.delivered,
            redelivered: st.redelivered,
            acked: st.acked,
            dropped: st.drops.total(),
            stalled: st.stalled,
            attached: st
                .attached
                .as_ref()
                .map(|a| (a.session_id, a.client.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use daemoneye_eventbus_core::{Header, MessageId, Topic};

    fn msg(n: u64) -> Message {
        Message::new(
            Topic::new("t").unwrap(),
            Header {
                id: MessageId {
                    publisher: 1,
                    sequence: n,
                },
                ..Header::default()
            },
            Bytes::from(vec![0; 10]),
        )
    }

    fn queue(window: usize) -> AckedQueue<MemoryStore> {
        AckedQueue::new(
            MemoryStore::default(),
            AckedLimits {
                msgs: 100,
                bytes: 1 << 20,
                window,
            },
        )
    }

    fn sent(q: &mut AckedQueue<MemoryStore>, now: u64) -> Vec<(u64, u16, u64)> {
        let mut out = Vec::new();
        q.take(SubId(1), now, &mut out);
        out.iter()
            .map(|d| (d.seq, d.redelivered, d.message.id().sequence))
            .collect()
    }

    #[test]
    fn the_window_bounds_what_is_in_flight_and_acks_make_room() {
        let mut q = queue(2);
        for n in 1..=5 {
            q.append(msg(n));
        }
        assert_eq!(sent(&mut q, 0), [(1, 0, 1), (2, 0, 2)]);
        assert!(!q.sendable() && sent(&mut q, 0).is_empty());
        // An acknowledgement out of order frees its place at once.
        assert_eq!(q.ack(&[(2, 2)]).0, 1);
        assert_eq!(sent(&mut q, 0), [(3, 0, 3)]);
        assert_eq!(q.ack(&[(1, 3)]).0, 2);
        assert_eq!(sent(&mut q, 0), [(4, 0, 4), (5, 0, 5)]);
        assert_eq!(q.ack(&[(4, 5), (9, 12)]).0, 2);
        assert_eq!((q.pending(), q.unacked(), q.kept().0), (0, 0, 0));
        assert!(q.in_flight.is_empty());
    }

    #[test]
    fn timed_out_and_requeued_deliveries_go_first_with_their_count() {
        let mut q = queue(10);
        for n in 1..=4 {
            q.append(msg(n));
        }
        assert_eq!(sent(&mut q, 100).len(), 4);
        q.ack(&[(2, 2)]);
        // At 1,100 ms, with a 1,000 ms timeout: 1, 3 and 4 go again, first, in order.
        q.append(msg(5));
        assert_eq!(q.expire(1_099, 1_000), 0);
        assert_eq!(q.expire(1_100, 1_000), 3);
        assert_eq!(
            sent(&mut q, 1_100),
            [(5, 1, 1), (6, 1, 3), (7, 1, 4), (8, 0, 5)]
        );
        // A subscriber going away: everything in flight goes again.
        assert_eq!(q.requeue_all(), 4);
        assert_eq!(
            sent(&mut q, 1_200),
            [(9, 2, 1), (10, 2, 3), (11, 2, 4), (12, 1, 5)]
        );
        // An old sequence number acknowledges nothing twice.
        assert_eq!(q.ack(&[(1, 8)]).0, 0);
        assert_eq!(q.ack(&[(9, 12)]).0, 4);
        assert_eq!(q.kept().0, 0);
    }

    #[test]
    fn the_oldest_is_dropped_wherever_it_is() {
        let mut q = queue(1);
        for n in 1..=3 {
            q.append(msg(n));
        }
        assert_eq!(sent(&mut q, 0), [(1, 0, 1)]);
        assert_eq!(q.drop_oldest().unwrap().id().sequence, 1, "in flight");
        assert_eq!(q.unacked(), 0);
        assert_eq!(q.drop_oldest().unwrap().id().sequence, 2, "waiting");
        assert_eq!(sent(&mut q, 0), [(2, 0, 3)]);
        assert_eq!(q.kept().0, 1);
        assert_eq!(q.clear().0, 1);
    }

    fn sub(policy: DurableFullPolicy) -> AckedSub {
        AckedSub::new(
            0,
            Some(DurableName::new("d").unwrap()),
            vec![TopicFilter::new("t").unwrap()],
            AckedLimits {
                msgs: 2,
                bytes: 1 << 20,
                window: 10,
            },
            policy,
        )
    }

    #[test]
    fn a_full_subscription_holds_publishers_back_only_while_attached_and_keeping_up() {
        let mem = Memory::new(1 << 30);
        let s = sub(DurableFullPolicy::DropOldest);
        let outlet = Arc::new(Outlet::new(
            super::super::Bounds {
                msgs: 10,
                bytes: 1 << 20,
            },
            daemoneye_eventbus_core::codec::SlowReaderPolicy::DropOldest,
            super::super::Encoding::Shared,
        ));
        s.attach(Attachment {
            outlet: Arc::downgrade(&outlet),
            sub: SubId(3),
            session_id: 1,
            client: "c".into(),
            window: 10,
        })
        .unwrap();
        assert!(matches!(
            s.push(msg(1), &mem, true),
            SubPushed::Kept { wake: Some(_), .. }
        ));
        assert!(matches!(
            s.push(msg(2), &mem, true),
            SubPushed::Kept { wake: None, .. }
        ));
        assert!(matches!(s.push(msg(3), &mem, true), SubPushed::Full));
        // Another connection cannot take it.
        let taken = s.attach(Attachment {
            outlet: Weak::new(),
            sub: SubId(1),
            session_id: 2,
            client: "other".into(),
            window: 10,
        });
        assert!(taken.unwrap_err().contains("session 1"));
        // Stalled: the publisher moves on, the oldest goes, counted.
        s.stall();
        assert!(matches!(
            s.push(msg(3), &mem, true),
            SubPushed::Kept { dropped: 1, .. }
        ));
        assert_eq!(s.stats().dropped, 1);
        // Detached: never waits either.
        assert!(s.detach(1));
        assert!(matches!(
            s.push(msg(4), &mem, true),
            SubPushed::Kept { dropped: 1, .. }
        ));
        let mut out = Vec::new();
        assert_eq!(s.take(0, &mut out), 0, "nobody attached");
        assert_eq!(s.close(&mem), 2);
        assert_eq!(mem.used(), 0);
        assert!(matches!(s.push(msg(5), &mem, false), SubPushed::Closed));
    }

    #[test]
    fn drop_new_keeps_the_first_messages() {
        let mem = Memory::new(1 << 30);
        let s = sub(DurableFullPolicy::DropNew);
        for n in 1..=2 {
            assert!(matches!(s.push(msg(n), &mem, true), SubPushed::Kept { .. }));
        }
        assert!(matches!(s.push(msg(3), &mem, true), SubPushed::Dropped));
        let stats = s.stats();
        assert_eq!((stats.pending, stats.dropped), (2, 1));
        assert!(
            s.take_notice().is_none(),
            "kept until a subscriber is attached"
        );
        s.attach(Attachment {
            outlet: Weak::new(),
            sub: SubId(4),
            session_id: 1,
            client: "c".into(),
            window: 1,
        })
        .unwrap();
        match s.take_notice() {
            Some(daemoneye_eventbus_core::Frame::Notice(Notice::SubDropped {
                sub,
                reason,
                ..
            })) => assert_eq!((sub, reason), (SubId(4), DropReason::BacklogFull)),
            other => panic!("{other:?}"),
        }
        let mut out = Vec::new();
        assert_eq!(
            s.take(0, &mut out),
            1,
            "the subscriber's window, not its maker's"
        );
    }
}
