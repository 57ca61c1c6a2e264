//! The queue between the connection's reader and one [`crate::Subscription`].
//!
//! One producer (the reader) pushes messages one at a time under a short lock; the consumer
//! takes **everything queued at once** and then serves its application from that private batch
//! without touching the lock again. Wake-ups are sent only when the other side is actually
//! waiting, so a busy stream costs one lock per message on the producer side and one lock per
//! batch on the consumer side, and no wake-up at all.
//!
//! Bound: at most `capacity` messages wait in the shared queue, and the consumer's private batch
//! holds at most what one take moved, so a subscription holds at most `2 × capacity` messages.
//! When the shared queue is full the producer waits ([`Sender::send`]), which stops the
//! connection reading, so the broker's slow-reader policy applies upstream.
//!
//! A gap report (messages missed, the connection restored, the subscription ended) never
//! waits ([`Sender::report`]): the reader must not stop on a notice while its consumer cannot
//! run yet (a subscription whose opening is still unanswered). It merges into a like report at
//! the tail, so reports are at most one per queued message plus one.

use crate::RecvError;
use crate::subscription::Item;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::Notify;

struct State {
    items: VecDeque<Item>,
    /// Gap reports among `items` (they take no room).
    reports: usize,
    /// The consumer found the queue empty and waits on `readable`.
    consumer_waiting: bool,
    /// The producer found the queue full and waits on `writable`.
    producer_waiting: bool,
    /// No more items will come (subscription removed or client closed).
    closed: bool,
    /// The consumer is gone; items are discarded.
    abandoned: bool,
}

impl State {
    /// Whether `capacity` messages wait (gap reports take no room).
    fn is_full(&self, capacity: usize) -> bool {
        self.items.len() - self.reports >= capacity
    }
}

struct Shared {
    state: Mutex<State>,
    capacity: usize,
    readable: Notify,
    writable: Notify,
}

/// The producer's handle. Cloning is cheap; closing is explicit ([`Sender::close`]).
#[derive(Clone)]
pub(crate) struct Sender(Arc<Shared>);

/// The consumer's handle, with its private batch.
pub(crate) struct Receiver {
    shared: Arc<Shared>,
    batch: VecDeque<Item>,
}

/// A queue holding at most `capacity` (at least 1) items between the two sides.
pub(crate) fn channel(capacity: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            reports: 0,
            consumer_waiting: false,
            producer_waiting: false,
            closed: false,
            abandoned: false,
        }),
        capacity: capacity.max(1),
        readable: Notify::new(),
        writable: Notify::new(),
    });
    (
        Sender(Arc::clone(&shared)),
        Receiver {
            shared,
            batch: VecDeque::new(),
        },
    )
}

impl Sender {
    /// Queues `item` if there is room; gives it back when the queue is full. An item for a
    /// consumer that is gone is discarded.
    pub(crate) fn try_send(&self, item: Item) -> Result<(), Item> {
        let mut st = self.0.state.lock();
        if st.abandoned {
            return Ok(());
        }
        if st.is_full(self.0.capacity) {
            return Err(item);
        }
        st.items.push_back(item);
        let wake = std::mem::take(&mut st.consumer_waiting);
        drop(st);
        if wake {
            self.0.readable.notify_one();
        }
        Ok(())
    }

    /// Queues items from the front of `items` while there is room, under one lock; what is
    /// left did not fit. Items for a consumer that is gone are discarded.
    pub(crate) fn try_send_many(&self, items: &mut VecDeque<Item>) {
        let mut st = self.0.state.lock();
        if st.abandoned {
            items.clear();
            return;
        }
        let room = self
            .0
            .capacity
            .saturating_sub(st.items.len() - st.reports)
            .min(items.len());
        if room == 0 {
            return;
        }
        st.items.extend(items.drain(..room));
        let wake = std::mem::take(&mut st.consumer_waiting);
        drop(st);
        if wake {
            self.0.readable.notify_one();
        }
    }

    /// Queues a gap report without waiting, beyond the capacity if need be; a `Missed` report
    /// adds its count to a `Missed` report of the same reason at the tail.
    pub(crate) fn report(&self, gap: RecvError) {
        let mut st = self.0.state.lock();
        if st.abandoned {
            return;
        }
        if let (
            Some(Item::Gap(RecvError::Missed { count, reason })),
            RecvError::Missed {
                count: more,
                reason: r,
            },
        ) = (st.items.back_mut(), &gap)
            && reason == r
        {
            *count += more;
            return;
        }
        st.items.push_back(Item::Gap(gap));
        st.reports += 1;
        let wake = std::mem::take(&mut st.consumer_waiting);
        drop(st);
        if wake {
            self.0.readable.notify_one();
        }
    }

    /// Queues `item`, waiting for room while the queue is full.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: a cancelled call has not queued the item.
    pub(crate) async fn send(&self, mut item: Item) {
        loop {
            item = match self.try_send(item) {
                Ok(()) => return,
                Err(item) => item,
            };
            let full = {
                let mut st = self.0.state.lock();
                let full = st.is_full(self.0.capacity) && !st.abandoned;
                st.producer_waiting |= full;
                full
            };
            if !full {
                continue;
            }
            // `notify_one` stores a permit when nobody waits yet, so a take between the unlock
            // above and this await still wakes us.
            self.0.writable.notified().await;
        }
    }

    /// Ends the stream: the consumer receives what is queued, then `Closed`.
    pub(crate) fn close(&self) {
        let mut st = self.0.state.lock();
        st.closed = true;
        let wake = std::mem::take(&mut st.consumer_waiting);
        drop(st);
        if wake {
            self.0.readable.notify_one();
        }
    }
}

/// What the consumer found.
pub(crate) enum Taken {
    Item(Item),
    Empty,
    Closed,
}

impl Receiver {
    /// The next item without waiting.
    pub(crate) fn try_take(&mut self) -> Taken {
        if let Some(item) = self.batch.pop_front() {
            return Taken::Item(item);
        }
        let mut st = self.shared.state.lock();
        if st.items.is_empty() {
            return if st.closed {
                Taken::Closed
            } else {
                Taken::Empty
            };
        }
        std::mem::swap(&mut st.items, &mut self.batch);
        st.reports = 0;
        let wake = std::mem::take(&mut st.producer_waiting);
        drop(st);
        if wake {
            self.shared.writable.notify_one();
        }
        self.batch.pop_front().map_or(Taken::Empty, Taken::Item)
    }

    /// The next item, waiting for one; `None` once closed and empty.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: items move from the shared queue to the private batch under the lock, with
    /// no await in between.
    pub(crate) async fn take(&mut self) -> Option<Item> {
        loop {
            match self.try_take() {
                Taken::Item(item) => return Some(item),
                Taken::Closed => return None,
                Taken::Empty => {}
            }
            let idle = {
                let mut st = self.shared.state.lock();
                let idle = st.items.is_empty() && !st.closed;
                st.consumer_waiting |= idle;
                idle
            };
            if idle {
                self.shared.readable.notified().await;
            }
        }
    }

    /// Whether nothing is queued right now.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.shared.state.lock().items.is_empty()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut st = self.shared.state.lock();
        st.abandoned = true;
        st.items.clear();
        st.reports = 0;
        let wake = std::mem::take(&mut st.producer_waiting);
        drop(st);
        if wake {
            self.shared.writable.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn gap(n: u64) -> Item {
        Item::Gap(RecvError::Missed {
            count: n,
            reason: crate::MissedReason::Other,
        })
    }

    fn count_of(item: Item) -> u64 {
        match item {
            Item::Gap(RecvError::Missed { count, .. }) => count,
            _ => panic!("unexpected item"),
        }
    }

    #[test]
    fn items_arrive_in_order_and_the_bound_holds() {
        let (tx, mut rx) = channel(3);
        for n in 0..3 {
            assert!(tx.try_send(gap(n)).is_ok());
        }
        assert!(tx.try_send(gap(3)).is_err(), "full at capacity");
        let Taken::Item(first) = rx.try_take() else {
            panic!("an item is queued")
        };
        assert_eq!(count_of(first), 0);
        // The take moved the whole batch: the shared queue has room again.
        assert!(tx.try_send(gap(3)).is_ok());
        let mut rest = Vec::new();
        while let Taken::Item(i) = rx.try_take() {
            rest.push(count_of(i));
        }
        assert_eq!(rest, [1, 2, 3]);
        tx.close();
        assert!(matches!(rx.try_take(), Taken::Closed));
    }

    #[test]
    fn many_items_go_under_one_lock_as_far_as_there_is_room() {
        let (tx, mut rx) = channel(3);
        assert!(tx.try_send(gap(0)).is_ok());
        let mut items: VecDeque<Item> = (1..5).map(gap).collect();
        tx.try_send_many(&mut items);
        assert_eq!(items.len(), 2, "two fitted");
        tx.try_send_many(&mut items);
        assert_eq!(items.len(), 2, "none fits a full queue");
        let mut got = Vec::new();
        while let Taken::Item(i) = rx.try_take() {
            got.push(count_of(i));
        }
        tx.try_send_many(&mut items);
        assert!(items.is_empty());
        while let Taken::Item(i) = rx.try_take() {
            got.push(count_of(i));
        }
        assert_eq!(got, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn reports_never_wait_take_no_room_and_merge() {
        // (Messages stand in as `gap` items of another reason.)
        let (tx, mut rx) = channel(2);
        tx.report(RecvError::Missed {
            count: 5,
            reason: crate::MissedReason::BacklogFull,
        });
        assert!(tx.try_send(gap(100)).is_ok() && tx.try_send(gap(101)).is_ok());
        assert!(tx.try_send(gap(102)).is_err(), "two messages fill it");
        // Beyond the capacity; like reports at the tail merge.
        for count in [1, 2] {
            tx.report(RecvError::Missed {
                count,
                reason: crate::MissedReason::BacklogFull,
            });
        }
        tx.report(RecvError::Ended("gone".into()));
        let mut got = Vec::new();
        while let Taken::Item(i) = rx.try_take() {
            got.push(match i {
                Item::Gap(RecvError::Ended(_)) => u64::MAX,
                other => count_of(other),
            });
        }
        assert_eq!(got, [5, 100, 101, 3, u64::MAX]);
        assert!(tx.try_send(gap(1)).is_ok(), "the take made room");
    }

    #[tokio::test]
    async fn a_waiting_producer_resumes_when_the_consumer_takes() {
        let (tx, mut rx) = channel(1);
        tx.send(gap(1)).await;
        let producer = tokio::spawn(async move {
            tx.send(gap(2)).await;
            tx.close();
        });
        let mut got = Vec::new();
        while let Some(item) = tokio::time::timeout(Duration::from_secs(5), rx.take())
            .await
            .expect("bounded wait")
        {
            got.push(count_of(item));
        }
        assert_eq!(got, [1, 2]);
        producer.await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_consumer_releases_a_waiting_producer() {
        let (tx, rx) = channel(1);
        tx.send(gap(1)).await;
        let producer = tokio::spawn(async move { tx.send(gap(2)).await });
        tokio::task::yield_now().await;
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), producer)
            .await
            .expect("released")
            .unwrap();
    }
}
