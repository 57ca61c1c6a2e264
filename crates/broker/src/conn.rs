//! What the broker records about one connection, shared by its session, its writer and the
//! routing table: who it is, its queues ([`Outlet`]), its counters and how to tear it down.

use crate::delivery::{AckedSub, Outlet};
use crate::stats::ConnCounters;
use daemoneye_eventbus_core::codec::{ErrorCode, ErrorFrame, SubId};
use daemoneye_eventbus_transport::PeerInfo;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// See the module documentation.
pub(crate) struct Conn {
    pub(crate) session_id: u64,
    pub(crate) name: String,
    pub(crate) peer: PeerInfo,
    /// The supervised collector it is: its pid registered by the supervisor (when it
    /// connected, or since: [`crate::Hub::register_collector`]).
    pub(crate) collector: Mutex<Option<Arc<str>>>,
    /// The reply inboxes it holds (`Hub::claim_inbox`), given back when it goes.
    pub(crate) inboxes: Mutex<Vec<String>>,
    pub(crate) outlet: Arc<Outlet>,
    /// The acknowledged subscriptions this connection opened or attached, by its ids.
    pub(crate) acked: Mutex<HashMap<SubId, Arc<AckedSub>>>,
    /// Whether the client reads message runs (protocol 1.2); older clients get a run's
    /// messages as single deliveries.
    pub(crate) runs: bool,
    /// The protocol minor version of the client's HELLO.
    pub(crate) minor: u16,
    pub(crate) counters: ConnCounters,
    /// Cancelled to tear the connection down at once (overflow, forced shutdown).
    pub(crate) cancel: CancellationToken,
    /// The error frame to write, best effort, when the connection is torn down.
    last_error: Mutex<Option<ErrorFrame>>,
    /// The connection's slot in the routing table (`u32::MAX` until registered).
    pub(crate) slot: AtomicU32,
    /// When the connection opened: `written_ms` counts from it.
    opened: Instant,
    /// Milliseconds after `opened` when the writer last finished a write.
    written_ms: AtomicU64,
}

/// The identity a connection from `peer` named `name` has for the ACL.
pub(crate) fn identity_of<'a>(
    peer: &'a PeerInfo,
    name: &'a str,
    collector: Option<&'a str>,
) -> crate::acl::Identity<'a> {
    crate::acl::Identity {
        in_process: peer.transport == daemoneye_eventbus_transport::TransportKind::InProc,
        uid: peer.uid,
        gid: peer.gid,
        exe: peer.exe.as_deref(),
        collector,
        // The hub adds them when it resolves grants (`Hub::grants`).
        collector_events: &[],
        tls_subject: peer.tls_subject.as_deref(),
        name,
    }
}

impl Conn {
    /// Runs `f` with its identity for the ACL.
    pub(crate) fn with_identity<R>(&self, f: impl FnOnce(&crate::acl::Identity<'_>) -> R) -> R {
        let collector = self.collector.lock().clone();
        f(&identity_of(&self.peer, &self.name, collector.as_deref()))
    }

    /// Tears the connection down because its name belongs to a collector it is not.
    pub(crate) fn impostor(&self, message: String) {
        self.tear_down(ErrorFrame {
            request_id: 0,
            code: ErrorCode::NotAuthorized,
            fatal: true,
            message,
        });
    }

    /// Filters of the acknowledged subscriptions this connection opened (a durable one it
    /// attached to counts for nobody: it outlives connections), against
    /// `max_subscriptions_per_connection`.
    pub(crate) fn acked_filters(&self) -> usize {
        self.acked
            .lock()
            .values()
            .filter(|a| a.name.is_none())
            .map(|a| a.filters.len())
            .sum()
    }

    pub(crate) fn new(
        session_id: u64,
        name: String,
        peer: PeerInfo,
        outlet: Outlet,
        minor: u16,
        cancel: CancellationToken,
        collector: Option<Arc<str>>,
    ) -> Self {
        Self {
            session_id,
            name,
            peer,
            collector: Mutex::new(collector),
            inboxes: Mutex::new(Vec::new()),
            outlet: Arc::new(outlet),
            acked: Mutex::new(HashMap::new()),
            runs: minor >= daemoneye_eventbus_core::codec::RUNS_SINCE_MINOR,
            minor,
            counters: ConnCounters::default(),
            cancel,
            last_error: Mutex::new(None),
            slot: AtomicU32::new(u32::MAX),
            opened: Instant::now(),
            written_ms: AtomicU64::new(0),
        }
    }

    /// The routing table slot.
    pub(crate) fn slot(&self) -> u32 {
        self.slot.load(Ordering::Relaxed)
    }

    /// The writer finished a write at `now`.
    pub(crate) fn wrote(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.opened).as_millis();
        self.written_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// When the writer last finished a write (the opening, before the first).
    pub(crate) fn written_at(&self) -> Instant {
        self.opened + Duration::from_millis(self.written_ms.load(Ordering::Relaxed))
    }

    /// The connection's Processed queue held its publishers back for longer than
    /// `processed_stall_timeout_ms`: it is closed so they can go on.
    pub(crate) fn stalled(&self, timeout_ms: u64) {
        self.tear_down(ErrorFrame {
            request_id: 0,
            code: ErrorCode::Stalled,
            fatal: true,
            message: format!(
                "connection {:?} made no room in its Processed queue for {timeout_ms} ms \
                 (processed_stall_timeout_ms) and was closed so its publishers could go on",
                self.name
            ),
        });
    }

    /// The Realtime queue overflowed under the `Disconnect` policy.
    pub(crate) fn overflowed(&self) {
        self.tear_down(ErrorFrame {
            request_id: 0,
            code: ErrorCode::SlowReader,
            fatal: true,
            message: format!(
                "connection {:?} read too slowly and its slow-reader policy is disconnect",
                self.name
            ),
        });
    }

    fn tear_down(&self, error: ErrorFrame) {
        self.last_error.lock().get_or_insert(error);
        self.cancel.cancel();
    }

    /// The error to write last, if the connection was torn down with one.
    pub(crate) fn take_last_error(&self) -> Option<ErrorFrame> {
        self.last_error.lock().take()
    }
}
