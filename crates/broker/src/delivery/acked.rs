//! Acknowledged subscriptions (protocol 1.3): Processed deliveries the subscriber
//! acknowledges, kept in a [`Store`] until it does, redelivered when it does not.
//!
//! [`AckedQueue`] is the pure part: which positions of the store wait to be sent, which are in
//! flight (sent, not acknowledged) under which delivery sequence number, and how often each
//! was delivered; time is a parameter. [`AckedSub`] is one subscription as the broker shares
//! it: the queue behind a lock, whether it is attached to a connection (and which), whether
//! it stalled, its bounds and full policy, its counters.

use super::store::{Kept, KeptRun, KeptStore, Pos, Store, Stored};
use super::{DropTotals, Drops, Memory, Outlet, SyncPoint};
use daemoneye_eventbus_core::codec::{
    AckedDelivery, AckedHead, DropReason, Notice, RunPart, SubId,
};
use daemoneye_eventbus_core::{DurableName, Topic, TopicFilter};
use daemoneye_eventbus_store::{StoreError, SyncJob};
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

/// What the writer sends for an acknowledged subscription: one delivery, or a part of a run
/// the subscription kept, numbered from `head.seq`.
pub(crate) enum AckedOut {
    One(AckedDelivery),
    Run {
        head: AckedHead,
        run: Arc<KeptRun>,
        part: RunPart,
    },
}

impl AckedOut {
    /// Messages it holds.
    pub(crate) fn count(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Run { part, .. } => usize::from(part.count),
        }
    }

    fn redelivered(&self) -> u16 {
        match self {
            Self::One(d) => d.redelivered,
            Self::Run { head, .. } => head.redelivered,
        }
    }
}

/// Positions waiting to be sent: `n` consecutive positions from `pos` (those removed meanwhile
/// are skipped), delivered `before` times already.
#[derive(Debug, Clone, Copy)]
struct Unsent {
    pos: Pos,
    n: usize,
    before: u16,
}

/// Deliveries sent together and not all acknowledged: sequences `seq..seq + n` are positions
/// `pos..pos + n`.
#[derive(Debug, Clone, Copy)]
struct Flight {
    seq: u64,
    pos: Pos,
    n: usize,
    /// Of them, still kept and waited for; 0 once all are acknowledged or dropped, or the
    /// flight was taken back to be sent again (removed when it reaches the front).
    live: usize,
    /// Deliveries of these positions so far, this one included.
    deliveries: u16,
    sent_ms: u64,
}

/// The delivery state of one acknowledged subscription. See the module documentation.
pub(crate) struct AckedQueue<S: Store> {
    store: S,
    /// Positions to send, in order (redeliveries go first, in position order).
    unsent: VecDeque<Unsent>,
    /// In delivery sequence order.
    in_flight: VecDeque<Flight>,
    /// Sum of the flights' `live`: deliveries sent and not acknowledged.
    unacked: usize,
    next_seq: u64,
    limits: AckedLimits,
}

impl<S: Store> AckedQueue<S> {
    /// A queue over `store`: what it already keeps (read back from disk) waits to be sent.
    pub(crate) fn new(store: S, limits: AckedLimits) -> Self {
        let mut unsent = VecDeque::new();
        if let Some(first) = store.oldest() {
            let n = usize::try_from(store.end() - first).expect("positions kept fit in memory");
            unsent.push_back(Unsent {
                pos: first,
                n,
                before: 0,
            });
        }
        Self {
            store,
            unsent,
            in_flight: VecDeque::new(),
            unacked: 0,
            next_seq: 1,
            limits,
        }
    }

    /// Whether `count` messages of `size` charged bytes fit the bounds (an empty queue takes
    /// one message of any size).
    pub(crate) fn fits(&self, count: usize, size: usize) -> bool {
        (self.store.len() + count <= self.limits.msgs
            && self.store.bytes() + size <= self.limits.bytes)
            || (self.store.len() == 0 && count == 1)
    }

    /// Whether `count` messages of `size` bytes fit an empty queue.
    fn could_fit(&self, count: usize, size: usize) -> bool {
        count == 1 || (count <= self.limits.msgs && size <= self.limits.bytes)
    }

    /// Keeps a message or run, to be sent after everything kept before it.
    pub(crate) fn append(&mut self, kept: Kept) {
        let n = kept.count();
        let pos = self.store.append(kept);
        self.unsent.push_back(Unsent { pos, n, before: 0 });
    }

    /// Drops the oldest message kept (the retention policy); returns its topic and charged
    /// bytes. Waiting to be sent, it is skipped when its turn comes.
    pub(crate) fn drop_oldest(&mut self) -> Option<(Topic, usize)> {
        let pos = self.store.oldest()?;
        let topic = self.store.get(pos)?.topic().clone();
        let bytes = self.store.remove(pos)?;
        if let Some(f) = self
            .in_flight
            .iter_mut()
            .find(|f| f.live > 0 && (f.pos..f.pos + f.n as u64).contains(&pos))
        {
            f.live -= 1;
            self.unacked -= 1;
            self.trim();
        }
        Some((topic, bytes))
    }

    /// The store.
    pub(crate) fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Sets how many deliveries may be in flight at once (from the next send on).
    pub(crate) fn set_window(&mut self, window: usize) {
        self.limits.window = window;
    }

    /// Whether something can be sent now (waiting, and the window has room).
    pub(crate) fn sendable(&self) -> bool {
        self.pending() > 0 && self.unacked < self.limits.window
    }

    /// Sends what the window allows: each message gets the next sequence number and joins
    /// the flight at `now_ms`; consecutive messages of one kept run go as one part of it.
    /// Returns how many messages.
    pub(crate) fn take(&mut self, sub: SubId, now_ms: u64, out: &mut Vec<AckedOut>) -> usize {
        let mut sent = 0;
        while self.unacked < self.limits.window {
            let Some(&Unsent { pos, n, before }) = self.unsent.front() else {
                break;
            };
            let room = (self.limits.window - self.unacked).min(n);
            let head = AckedHead {
                sub,
                seq: self.next_seq,
                redelivered: before,
            };
            let (k, item) = match self.store.get(pos) {
                // Acknowledged or dropped since it was queued.
                None => (1, None),
                Some(Stored::One(msg)) => (
                    1,
                    Some(AckedOut::One(AckedDelivery {
                        sub,
                        seq: head.seq,
                        redelivered: before,
                        message: msg.clone(),
                    })),
                ),
                Some(Stored::InRun { run, index, span }) => {
                    let k = span.min(room);
                    let part = run.part(index, k);
                    let run = Arc::clone(run);
                    (k, Some(AckedOut::Run { head, run, part }))
                }
            };
            let front = self.unsent.front_mut().expect("a front");
            if k >= front.n {
                self.unsent.pop_front();
            } else {
                front.pos += k as u64;
                front.n -= k;
            }
            let Some(item) = item else {
                continue;
            };
            out.push(item);
            self.in_flight.push_back(Flight {
                seq: head.seq,
                pos,
                n: k,
                live: k,
                deliveries: before.saturating_add(1),
                sent_ms: now_ms,
            });
            self.next_seq += k as u64;
            self.unacked += k;
            sent += k;
        }
        sent
    }

    /// Acknowledges the deliveries in `ranges` (inclusive sequence numbers): their messages
    /// are forgotten. Returns the messages and charged bytes freed.
    pub(crate) fn ack(&mut self, ranges: &[(u64, u64)]) -> (usize, usize) {
        let (mut msgs, mut bytes) = (0, 0);
        for &(first, last) in ranges {
            let start = self
                .in_flight
                .partition_point(|f| f.seq + f.n as u64 <= first);
            for f in self.in_flight.iter_mut().skip(start) {
                if f.seq > last {
                    break;
                }
                if f.live == 0 {
                    continue;
                }
                let end = last.min(f.seq + f.n as u64 - 1);
                for seq in first.max(f.seq)..=end {
                    if let Some(b) = self.store.remove(f.pos + (seq - f.seq)) {
                        f.live -= 1;
                        self.unacked -= 1;
                        msgs += 1;
                        bytes += b;
                    }
                }
            }
        }
        self.trim();
        (msgs, bytes)
    }

    fn trim(&mut self) {
        while matches!(self.in_flight.front(), Some(f) if f.live == 0) {
            self.in_flight.pop_front();
        }
    }

    /// Sends again, first, what was in flight for `timeout_ms` or more at `now_ms`; returns
    /// how many messages.
    pub(crate) fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> usize {
        self.requeue(|f| now_ms.saturating_sub(f.sent_ms) >= timeout_ms)
    }

    /// Sends again, first, everything in flight (the subscriber went away); returns how many
    /// messages.
    pub(crate) fn requeue_all(&mut self) -> usize {
        self.requeue(|_| true)
    }

    fn requeue(&mut self, due: impl Fn(&Flight) -> bool) -> usize {
        let mut again: Vec<Unsent> = Vec::new();
        let mut msgs = 0;
        for f in &mut self.in_flight {
            if f.live > 0 && due(f) {
                again.push(Unsent {
                    pos: f.pos,
                    n: f.n,
                    before: f.deliveries,
                });
                msgs += f.live;
                f.live = 0;
            }
        }
        self.unacked -= msgs;
        self.trim();
        again.sort_unstable_by_key(|u| u.pos);
        // Adjacent ranges delivered as often go again together (a run sent in parts goes
        // again as one part).
        let mut merged: Vec<Unsent> = Vec::with_capacity(again.len());
        for u in again {
            match merged.last_mut() {
                Some(m) if m.pos + m.n as u64 == u.pos && m.before == u.before => m.n += u.n,
                _ => merged.push(u),
            }
        }
        for entry in merged.into_iter().rev() {
            self.unsent.push_front(entry);
        }
        msgs
    }

    /// Messages waiting to be sent.
    pub(crate) fn pending(&self) -> usize {
        self.store.len() - self.unacked
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
    /// now. Older messages dropped (retention) to make room are counted by the subscription.
    Kept { wake: Option<Arc<Outlet>> },
    /// No room while the subscriber is attached and keeping up: the publisher waits.
    Full,
    /// Not kept (retention policy or memory cap), counted.
    Dropped,
    /// The subscription is closed.
    Closed,
}

struct SubState {
    queue: AckedQueue<KeptStore>,
    attached: Option<Attachment>,
    /// Stalled: its publishers no longer wait for it.
    stalled: bool,
    closed: bool,
    drops: Drops,
    /// [`Drops::changes`] when the drops were last written to its log (on disk).
    drops_written: u64,
    delivered: u64,
    redelivered: u64,
    acked: u64,
}

impl SubState {
    /// Writes the drops still to be announced to its log (on disk) when they changed since
    /// last written, so that a broker started again announces them.
    fn write_drops(&mut self) {
        if self.drops.changes() == self.drops_written {
            return;
        }
        let KeptStore::Disk(d) = self.queue.store_mut() else {
            return;
        };
        d.write_drops(self.drops.unannounced().as_ref());
        self.drops_written = self.drops.changes();
    }
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
    /// Whether what it keeps is also on disk (a durable subscription of a broker with a data
    /// directory).
    pub(crate) on_disk: bool,
    state: Mutex<SubState>,
    /// Woken when acknowledgements make room (publishers waiting).
    space: Notify,
    /// Under `fsync = always`, the sessions waiting for its log to reach the disk, and the
    /// sync that serves them all (group commit).
    pub(crate) sync: SyncPoint,
}

impl AckedSub {
    pub(crate) fn new(
        index: u32,
        name: Option<DurableName>,
        filters: Vec<TopicFilter>,
        limits: AckedLimits,
        full_policy: DurableFullPolicy,
        mut store: KeptStore,
        totals: Arc<DropTotals>,
    ) -> Self {
        // What a previous broker process dropped and did not announce is announced still.
        let mut drops = Drops::counted_in(totals);
        if let KeptStore::Disk(d) = &mut store
            && let Some((reason, topics)) = d.take_restored_drops()
        {
            drops.restore(reason, &topics);
        }
        Self {
            index,
            name,
            filters,
            full_policy,
            on_disk: matches!(store, KeptStore::Disk(_)),
            state: Mutex::new(SubState {
                queue: AckedQueue::new(store, limits),
                attached: None,
                stalled: false,
                closed: false,
                drops_written: drops.changes(),
                drops,
                delivered: 0,
                redelivered: 0,
                acked: 0,
            }),
            space: Notify::new(),
            sync: SyncPoint::default(),
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

    /// Offers a message or run. Under `may_wait` (a client's publish), a subscription that is
    /// attached and keeping up without room answers [`SubPushed::Full`]; otherwise (nobody
    /// attached, the subscriber stalled, or the broker's own message) the full policy applies.
    pub(crate) fn push(&self, kept: Kept, memory: &Memory, may_wait: bool) -> SubPushed {
        let (count, size) = (kept.count(), kept.size());
        let mut st = self.state.lock();
        if st.closed {
            return SubPushed::Closed;
        }
        if st.queue.fits(count, size) && memory.try_reserve(size) {
            return self.keep(st, kept);
        }
        if may_wait && st.attached.is_some() && !st.stalled {
            return SubPushed::Full;
        }
        if self.full_policy == DurableFullPolicy::DropNew {
            st.drops
                .record(kept.topic(), DropReason::BacklogFull, count as u64);
            return SubPushed::Dropped;
        }
        loop {
            if st.queue.fits(count, size) && memory.try_reserve(size) {
                return self.keep(st, kept);
            }
            let reason = if st.queue.fits(count, size) {
                DropReason::MemoryCap
            } else {
                DropReason::BacklogFull
            };
            let Some((topic, bytes)) = st.queue.drop_oldest() else {
                st.drops.record(kept.topic(), reason, count as u64);
                return SubPushed::Dropped;
            };
            memory.release(bytes);
            st.drops.record(&topic, reason, 1);
        }
    }

    fn keep(&self, mut st: parking_lot::MutexGuard<'_, SubState>, kept: Kept) -> SubPushed {
        let was_sendable = st.queue.sendable();
        st.queue.append(kept);
        let wake = match (&st.attached, was_sendable) {
            (Some(a), false) if st.queue.sendable() => a.outlet.upgrade(),
            _ => None,
        };
        SubPushed::Kept { wake }
    }

    /// Whether a run of `count` messages of `size` bytes may be offered whole: there is room
    /// for it now, or (nobody waits for it: detached, stalled) the retention policy can make
    /// room by dropping older messages. Otherwise the publisher's session offers its messages
    /// one by one, so that the bounds hold for each and a full subscription holds the
    /// publisher back at a message, not at a run it could never take.
    pub(crate) fn takes_whole(&self, count: usize, size: usize) -> bool {
        let st = self.state.lock();
        st.closed
            || st.queue.fits(count, size)
            || ((st.attached.is_none() || st.stalled) && st.queue.could_fit(count, size))
    }

    /// Waits until `count` messages of `size` bytes would fit (or the subscription closed or
    /// stalled), rechecking after 10 ms at most (room under the memory cap comes from
    /// elsewhere too).
    pub(crate) async fn wait_for_room(&self, count: usize, size: usize, memory: &Memory) {
        let acked = self.space.notified();
        {
            let st = self.state.lock();
            if st.closed
                || st.stalled
                || st.attached.is_none()
                || st.queue.fits(count, size) && memory.has_room(size)
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
    pub(crate) fn take(&self, now_ms: u64, out: &mut Vec<AckedOut>) -> usize {
        let mut st = self.state.lock();
        let Some(sub) = st.attached.as_ref().map(|a| a.sub) else {
            return 0;
        };
        let start = out.len();
        let n = st.queue.take(sub, now_ms, out);
        st.delivered += n as u64;
        st.redelivered += out[start..]
            .iter()
            .filter(|d| d.redelivered() > 0)
            .map(AckedOut::count)
            .sum::<usize>() as u64;
        n
    }

    /// Runs `write` on its disk store, after the drops still to be announced are written to
    /// it (`None`, nothing done, for a store in memory).
    fn on_disk<T>(
        &self,
        write: impl FnOnce(&mut super::DiskStore) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let mut st = self.state.lock();
        st.write_drops();
        match st.queue.store_mut() {
            KeptStore::Disk(d) => write(d).map(Some),
            KeptStore::Memory(_) => Ok(None),
        }
    }

    /// Writes what it kept and what was acknowledged since the last call to its disk log
    /// (nothing for a store in memory); with `sync`, to the disk itself.
    ///
    /// # Errors
    ///
    /// The log's first write error since the last success.
    pub(crate) fn persist(&self, sync: bool) -> Result<(), StoreError> {
        self.on_disk(|d| d.persist(sync)).map(|_| ())
    }

    /// [`AckedSub::persist`] with `sync`, the wait for the disk returned to run elsewhere
    /// (`None` for a store in memory).
    ///
    /// # Errors
    ///
    /// The log's first write error since the last success.
    pub(crate) fn persist_for_sync(&self) -> Result<Option<SyncJob>, StoreError> {
        self.on_disk(super::DiskStore::persist_for_sync)
    }

    /// Under `fsync = always`: writes what it kept to the operating system and returns the
    /// log position its sessions wait for on [`AckedSub::sync`] (`None` in memory).
    ///
    /// # Errors
    ///
    /// The log's first write error since the last success.
    pub(crate) fn write_for_sync(&self) -> Result<Option<u64>, StoreError> {
        self.on_disk(super::DiskStore::write_through)
    }

    /// Writes what it kept and returns the wait for the disk that puts it there, with the
    /// log position that covers (`None` in memory).
    ///
    /// # Errors
    ///
    /// The log's first write error since the last success.
    pub(crate) fn sync_job(&self) -> Result<Option<(SyncJob, u64)>, StoreError> {
        self.on_disk(super::DiskStore::sync_job)
    }

    /// Bytes its log takes on disk (0 in memory).
    pub(crate) fn disk_bytes(&self) -> u64 {
        match self.state.lock().queue.store_mut() {
            KeptStore::Disk(d) => d.disk_bytes(),
            KeptStore::Memory(_) => 0,
        }
    }

    /// Gives back its log's oldest segment (to keep the data directory within
    /// `store_max_bytes`): the messages in it are dropped, counted (reason backlog full) and
    /// reported to its subscriber. Returns the bytes given back and the messages dropped.
    ///
    /// # Errors
    ///
    /// The log could not be written.
    pub(crate) fn give_back_segment(&self, memory: &Memory) -> Result<(u64, u64), StoreError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        if let KeptStore::Disk(d) = st.queue.store_mut()
            && d.single_segment()
        {
            // What is written below goes to a segment of its own, not to the one given back.
            d.start_segment()?;
        }
        let (before, end) = match st.queue.store_mut() {
            KeptStore::Disk(d) => match d.oldest_segment_end() {
                Some(end) => (d.disk_bytes(), end),
                None => return Ok((0, 0)),
            },
            KeptStore::Memory(_) => return Ok((0, 0)),
        };
        let mut dropped = 0;
        while let KeptStore::Disk(d) = st.queue.store_mut() {
            if !d.oldest_before(end) {
                break;
            }
            let Some((topic, bytes)) = st.queue.drop_oldest() else {
                break;
            };
            memory.release(bytes);
            st.drops.record(&topic, DropReason::BacklogFull, 1);
            dropped += 1;
        }
        st.write_drops();
        let KeptStore::Disk(d) = st.queue.store_mut() else {
            unreachable!("checked above");
        };
        // The removals and drops are written, and segments holding nothing kept go.
        d.persist(false)?;
        if d.oldest_segment_end() == Some(end) {
            d.remove_oldest_segment()?;
        }
        Ok((before.saturating_sub(d.disk_bytes()), dropped))
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
        // Its files are closed; the owner removes them.
        *st.queue.store_mut() = KeptStore::default();
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
    use crate::delivery::store::MemoryStore;
    use crate::delivery::testing::{message, run};

    fn msg(n: u64) -> Kept {
        Kept::One(message(n))
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

    /// What one take sends: (sequence, redelivered, message number) of each message, and the
    /// message count of each frame.
    fn sent_in(q: &mut AckedQueue<MemoryStore>, now: u64) -> (Vec<(u64, u16, u64)>, Vec<usize>) {
        let mut out = Vec::new();
        let n = q.take(SubId(1), now, &mut out);
        let mut msgs = Vec::new();
        for o in &out {
            match o {
                AckedOut::One(d) => msgs.push((d.seq, d.redelivered, d.message.id().sequence)),
                AckedOut::Run { head, run, part } => {
                    let part = run.run.slice(*part);
                    for (i, m) in part.messages().enumerate() {
                        let m = m.unwrap();
                        msgs.push((head.seq + i as u64, head.redelivered, m.id().sequence));
                    }
                }
            }
        }
        assert_eq!(n, msgs.len());
        (msgs, out.iter().map(AckedOut::count).collect())
    }

    fn sent(q: &mut AckedQueue<MemoryStore>, now: u64) -> Vec<(u64, u16, u64)> {
        sent_in(q, now).0
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
        let one = message(1).accounted_size();
        assert_eq!(q.drop_oldest().unwrap().1, one, "in flight");
        assert_eq!(q.unacked(), 0);
        assert_eq!(q.drop_oldest().unwrap().1, one, "waiting");
        assert_eq!(q.pending(), 1);
        assert_eq!(sent(&mut q, 0), [(2, 0, 3)]);
        assert_eq!(q.kept().0, 1);
        assert_eq!(q.clear().0, 1);
    }

    #[test]
    fn a_kept_run_goes_in_parts_the_window_allows_and_only_its_unacknowledged_messages_again() {
        let mut q = queue(3);
        q.append(run(1..=5));
        q.append(msg(6));
        let one = message(1).accounted_size();
        assert_eq!(q.kept(), (6, 6 * one), "charged as its messages");
        // Three of the run, as one part.
        let (msgs, frames) = sent_in(&mut q, 0);
        assert_eq!(msgs, [(1, 0, 1), (2, 0, 2), (3, 0, 3)]);
        assert_eq!(frames, [3]);
        // The middle one acknowledged: one place, one message of the run.
        assert_eq!(q.ack(&[(2, 2)]), (1, one));
        assert_eq!(sent_in(&mut q, 0), (vec![(4, 0, 4)], vec![1]));
        assert_eq!(q.ack(&[(1, 1)]).0, 1);
        assert_eq!(sent_in(&mut q, 0), (vec![(5, 0, 5)], vec![1]));
        assert_eq!(q.unacked(), 3);
        // The subscriber goes: 3, 4 and 5 go again, together (sent in three flights), and 1
        // and 2 (acknowledged) do not.
        assert_eq!(q.requeue_all(), 3);
        let (msgs, frames) = sent_in(&mut q, 10);
        assert_eq!(msgs, [(6, 1, 3), (7, 1, 4), (8, 1, 5)]);
        assert_eq!(frames, [3]);
        // Late acknowledgements of the taken-back sequences free nothing.
        assert_eq!(q.ack(&[(3, 5)]).0, 0);
        assert_eq!(q.ack(&[(6, 8)]).0, 3);
        assert_eq!(sent(&mut q, 10), [(9, 0, 6)]);
        assert_eq!(q.ack(&[(9, 9)]).0, 1);
        assert_eq!((q.kept(), q.unacked(), q.pending()), ((0, 0), 0, 0));
        assert!(q.in_flight.is_empty() && q.unsent.is_empty());
    }

    #[test]
    fn dropping_the_oldest_message_of_a_run_in_flight_keeps_the_count_right() {
        let mut q = queue(10);
        q.append(run(1..=3));
        assert_eq!(sent(&mut q, 0).len(), 3);
        assert!(q.drop_oldest().is_some());
        assert_eq!((q.unacked(), q.kept().0), (2, 2));
        // Acknowledging the whole flight frees what is left, once.
        assert_eq!(q.ack(&[(1, 3), (1, 3)]).0, 2);
        assert!(q.in_flight.is_empty());
        // A run that does not fit the bounds whole is not taken by a non-empty queue.
        let mut small = AckedQueue::new(
            MemoryStore::default(),
            AckedLimits {
                msgs: 4,
                bytes: 1 << 20,
                window: 10,
            },
        );
        small.append(msg(1));
        let r = run(2..=5);
        assert!(!small.fits(r.count(), r.size()));
        assert!(small.fits(3, 3 * one_size()));
    }

    fn one_size() -> usize {
        message(1).accounted_size()
    }

    /// What a test does to a queue.
    #[derive(Debug, Clone)]
    enum Op {
        One,
        Run(u64),
        Take,
        Ack(Vec<(u64, u64)>),
        RequeueAll,
        /// Sends again what was sent this many operations ago or earlier.
        Expire(u64),
        DropOldest,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            2 => Just(Op::One),
            2 => (1u64..6).prop_map(Op::Run),
            4 => Just(Op::Take),
            4 => proptest::collection::vec((1u64..60, 0u64..4), 1..4)
                .prop_map(|r| Op::Ack(r.into_iter().map(|(a, n)| (a, a + n)).collect())),
            1 => Just(Op::RequeueAll),
            2 => (1u64..6).prop_map(Op::Expire),
            1 => Just(Op::DropOldest),
        ]
    }

    proptest::proptest! {
        // Orders that break the bookkeeping can take a few thousand cases to come up.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

        /// Against a model of messages and deliveries: what is kept, sent and unacknowledged
        /// always adds up; a message is never in flight twice at once; fresh messages go out
        /// in order; an acknowledgement frees each message once; and in the end every message
        /// kept is delivered.
        #[test]
        fn runs_and_single_messages_add_up_under_any_sequence_of_operations(
            window in 1usize..8,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            use std::collections::{BTreeSet, HashMap};
            let mut q = queue(window);
            let mut next = 1u64;
            let mut kept: BTreeSet<u64> = BTreeSet::new();
            // In-flight sequence → (message, when sent).
            let mut live: HashMap<u64, (u64, u64)> = HashMap::new();
            let mut last_fresh = 0u64;
            for (now, op) in (0u64..).zip(ops) {
                match op {
                    Op::One => {
                        q.append(msg(next));
                        kept.insert(next);
                        next += 1;
                    }
                    Op::Run(n) => {
                        q.append(run(next..=next + n - 1));
                        kept.extend(next..next + n);
                        next += n;
                    }
                    Op::Take => {
                        for (seq, redelivered, m) in sent(&mut q, now) {
                            proptest::prop_assert!(kept.contains(&m), "sent {m}, not kept");
                            proptest::prop_assert!(
                                !live.values().any(|(x, _)| *x == m),
                                "{m} in flight twice"
                            );
                            if redelivered == 0 {
                                proptest::prop_assert!(m > last_fresh, "fresh {m} after {last_fresh}");
                                last_fresh = m;
                            }
                            live.insert(seq, (m, now));
                        }
                        proptest::prop_assert!(q.unacked() <= window);
                    }
                    Op::Ack(ranges) => {
                        let mut freed = 0;
                        for (seq, (m, _)) in live.clone() {
                            if ranges.iter().any(|(a, b)| (*a..=*b).contains(&seq)) {
                                live.remove(&seq);
                                kept.remove(&m);
                                freed += 1;
                            }
                        }
                        proptest::prop_assert_eq!(q.ack(&ranges).0, freed);
                    }
                    Op::RequeueAll => {
                        proptest::prop_assert_eq!(q.requeue_all(), live.len());
                        live.clear();
                    }
                    Op::Expire(timeout) => {
                        let before = live.len();
                        live.retain(|_, (_, at)| now - *at < timeout);
                        proptest::prop_assert_eq!(q.expire(now, timeout), before - live.len());
                    }
                    Op::DropOldest => {
                        let oldest = kept.iter().next().copied();
                        proptest::prop_assert_eq!(q.drop_oldest().is_some(), oldest.is_some());
                        if let Some(m) = oldest {
                            kept.remove(&m);
                            live.retain(|_, (x, _)| *x != m);
                        }
                    }
                }
                proptest::prop_assert_eq!(q.kept().0, kept.len());
                proptest::prop_assert_eq!(q.unacked(), live.len());
                proptest::prop_assert_eq!(q.pending(), kept.len() - live.len());
                proptest::prop_assert_eq!(q.kept().1, kept.len() * message(1).accounted_size());
            }
            // Everything kept reaches the subscriber.
            q.requeue_all();
            let mut delivered = BTreeSet::new();
            for _ in 0..1000 {
                let got = sent(&mut q, 0);
                if got.is_empty() {
                    break;
                }
                let last = got.last().map(|(seq, ..)| *seq).unwrap_or_default();
                delivered.extend(got.iter().map(|(.., m)| *m));
                q.ack(&[(1, last)]);
            }
            proptest::prop_assert_eq!(delivered, kept);
            proptest::prop_assert_eq!(q.kept(), (0, 0));
        }
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
            KeptStore::default(),
            Arc::default(),
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
            Arc::default(),
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
        assert!(matches!(s.push(msg(3), &mem, true), SubPushed::Kept { .. }));
        assert_eq!(s.stats().dropped, 1);
        // Detached: never waits either.
        assert!(s.detach(1));
        assert!(matches!(s.push(msg(4), &mem, true), SubPushed::Kept { .. }));
        assert_eq!(s.stats().dropped, 2);
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
