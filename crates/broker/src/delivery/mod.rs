//! The delivery layer: bounded queues, one per kind of subscription, each owning its QoS
//! policy, and the broker-wide memory cap.
//!
//! - [`RealtimeQueue`]: a connection's at-most-once deliveries (its Realtime subscriptions,
//!   the broker's `$sys` messages). Full: the connection's slow-reader policy, drop oldest
//!   (counted per topic in [`Drops`], announced by NOTICE) or disconnect.
//! - [`ProcessedQueue`]: a connection's Processed deliveries. Full: nothing is dropped; the
//!   publisher waits ([`Pushed::Full`]).
//! - [`AckedSub`]: an acknowledged subscription (protocol 1.3), its messages kept in a store
//!   (`store.rs`, the interface a disk log implements) until the subscriber acknowledges them;
//!   durable ones outlive connections. Full while its subscriber keeps up: the publisher
//!   waits; detached or stalled: the durable full policy applies.
//! - [`Outlet`]: one connection's queues and its control frames behind one lock, what its
//!   writer takes in one pass (with what its attached acknowledged subscriptions may send).
//!
//! What a queue keeps is decided here, in the type system: a push takes an [`Item`], a view
//! of a [`Lent`] message or run, and keeps [`Lent::keep`]'s copy of exactly its bytes, or
//! encodes it at once into a chunk ([`Encoding::Bytes`]). A lent frame cannot outlive the read
//! it came from, so nothing a queue holds pins a reader's buffer, and what is queued is what
//! is accounted.

mod acked;
mod disk;
mod drops;
mod lane;
mod outlet;
mod processed;
mod realtime;
mod store;
mod sync;
#[cfg(test)]
mod testing;

pub use acked::DurableFullPolicy;
pub(crate) use acked::{AckedLimits, AckedOut, AckedSub, Attachment, SubPushed};
pub(crate) use disk::DiskStore;
pub use drops::{DROP_TOPICS, DropCause};
pub(crate) use drops::{DropTotals, Drops};
pub(crate) use lane::Out;
pub use outlet::MAX_QUEUED_CONTROL;
pub(crate) use outlet::{Batch, Outlet};
pub(crate) use processed::ProcessedQueue;
pub(crate) use realtime::RealtimeQueue;
pub(crate) use store::{Kept, KeptStore};
pub(crate) use sync::{GroupCommit, SyncPoint, SyncWait, Want};

use daemoneye_eventbus_core::Budget;
use daemoneye_eventbus_core::codec::{Lent, MessageRun};
use daemoneye_eventbus_core::{Message, Qos, Topic};
use std::sync::Arc;

/// Broker-wide accounting of queued message bytes against `max_memory_bytes`: the
/// [`Budget`] that queues charge, and that a copy kept by several queues carries once (see
/// [`daemoneye_eventbus_core::budget`]).
#[derive(Debug)]
pub(crate) struct Memory(Arc<Budget>);

impl Memory {
    pub(crate) fn new(cap: usize) -> Self {
        Self(Arc::new(Budget::new(cap)))
    }

    pub(crate) fn try_reserve(&self, n: usize) -> bool {
        self.0.try_reserve(n)
    }

    pub(crate) fn release(&self, n: usize) {
        self.0.release(n);
    }

    pub(crate) fn used(&self) -> usize {
        self.0.used()
    }

    pub(crate) fn cap(&self) -> usize {
        self.0.cap()
    }

    /// Whether `n` more bytes would fit now.
    pub(crate) fn has_room(&self, n: usize) -> bool {
        self.0.has_room(n)
    }

    /// The budget a kept copy is charged to ([`Lent::keep_charged`]).
    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.0
    }
}

/// Bounds of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Messages queued at most (an empty queue always takes one message or run).
    pub(crate) msgs: usize,
    /// Charged bytes queued at most (idem).
    pub(crate) bytes: usize,
}

/// How a connection's deliveries wait in its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// As shared messages and runs, encoded by the writer (in-process peers, which take
    /// frames as values).
    Shared,
    /// Byte-stream peers (`runs`: the peer reads message runs, protocol 1.2). A small
    /// delivery (below the writer's vectored threshold, which it would copy anyway) is
    /// encoded into the chunk at the queue's tail when it is queued, while the queue holds
    /// less than [`lane::ENCODE_BELOW`] bytes: the frame's own buffer is free at once instead
    /// of waiting in the queue, and the writer hands whole chunks to `writev`. A reader that
    /// falls behind gets kept messages instead, so nothing is encoded for a reader that may
    /// never read it.
    Bytes {
        /// Whether the peer reads DELIVER_RUN frames.
        runs: bool,
    },
}

/// What a push offers a queue: a view of one message or run, which the queue keeps only as
/// its own copy ([`Lent::keep`]).
#[derive(Clone, Copy)]
pub(crate) enum Item<'a> {
    Msg(&'a Lent<'a, Message>),
    Run(&'a Lent<'a, MessageRun>),
}

impl Item<'_> {
    pub(crate) fn topic(&self) -> &Topic {
        match self {
            Self::Msg(m) => m.topic(),
            Self::Run(r) => r.topic(),
        }
    }

    /// Its quality of service (a run has one).
    pub(crate) fn qos(&self) -> Qos {
        match self {
            Self::Msg(m) => m.header().qos,
            Self::Run(r) => r.qos(),
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

    /// A copy an acknowledged subscription keeps (see [`Lent::keep`]).
    pub(crate) fn kept(&self) -> Kept {
        match self {
            Self::Msg(m) => Kept::One(m.keep()),
            Self::Run(r) => Kept::Run(r.keep()),
        }
    }
}

/// Result of offering an item to a queue.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued; `evicted` older messages were dropped to make room. `wake` is set when the
    /// connection's queues were empty: the caller must then call [`Outlet::wake`] (at once,
    /// or after the batch it is routing, so the writer takes the whole batch in one write).
    Queued { evicted: u64, wake: bool },
    /// Not queued, counted as dropped: the broker-wide memory cap left no room even after
    /// evicting this connection's own oldest.
    Dropped,
    /// The queue was full and the policy is to disconnect; the connection must close.
    Overflow,
    /// The connection is closing.
    Closed,
    /// A Processed queue without room: nothing was queued or dropped; retry after
    /// [`Outlet::wait_for_room`].
    Full,
}
