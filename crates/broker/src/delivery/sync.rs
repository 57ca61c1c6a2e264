//! Group commit for one durable subscription's log under `fsync = always`: every session that
//! wrote to the log asks for it to be on the disk through what it wrote; one sync at a time
//! runs (on a blocking thread), and what sessions write while it runs is covered by the next,
//! one sync for all of them.
//!
//! [`GroupCommit`] is the bookkeeping, pure; [`SyncPoint`] shares it with the sessions that
//! wait (a `watch` channel whose value it is: one lock, and waiters woken only when a sync
//! ends).

use tokio::sync::watch;

/// How far a log is on the disk, and who is syncing it. Positions are the log's record
/// sequence numbers: "through `n`" means every record before `n`.
#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    /// A sync is running (its runner asks [`GroupCommit::finished`] when it ends).
    running: bool,
    /// The furthest position any session asked for.
    wanted: u64,
    /// Every record before this is on the disk.
    through: u64,
    /// Syncs that failed: a session waiting when one fails writes again later.
    failures: u64,
}

/// What a session asking for a sync must do ([`GroupCommit::want`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// On the disk already.
    Done,
    /// Start the sync (nobody is syncing): run [`SyncPoint::run`], then wait.
    Lead(SyncWait),
    /// Wait: the sync running now, or the next one, covers it.
    Follow(SyncWait),
}

/// What a session waits for ([`GroupCommit::reached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyncWait {
    target: u64,
    failures: u64,
}

impl GroupCommit {
    /// A session wrote the log through `target` and needs it on the disk.
    pub(crate) fn want(&mut self, target: u64) -> Want {
        if self.through >= target {
            return Want::Done;
        }
        self.wanted = self.wanted.max(target);
        let waiting = SyncWait {
            target,
            failures: self.failures,
        };
        if self.running {
            Want::Follow(waiting)
        } else {
            self.running = true;
            Want::Lead(waiting)
        }
    }

    /// The running sync ended: on the disk through `Some(position)`, or failed (`None`).
    /// Returns whether another must run now (someone asked for more meanwhile); the runner
    /// then goes on.
    pub(crate) fn finished(&mut self, outcome: Option<u64>) -> bool {
        match outcome {
            Some(through) => self.through = self.through.max(through),
            None => self.failures += 1,
        }
        // After a failure the waiters write again and a new leader starts.
        self.running = outcome.is_some() && self.wanted > self.through;
        self.running
    }

    /// `Some(true)` once the log is on the disk through the target, `Some(false)` if a sync
    /// failed meanwhile, `None` while neither.
    pub(crate) fn reached(&self, w: SyncWait) -> Option<bool> {
        if self.through >= w.target {
            Some(true)
        } else if self.failures > w.failures {
            Some(false)
        } else {
            None
        }
    }
}

/// A log's [`GroupCommit`], shared by the sessions writing to it and the sync running.
#[derive(Debug)]
pub(crate) struct SyncPoint(watch::Sender<GroupCommit>);

impl Default for SyncPoint {
    fn default() -> Self {
        Self(watch::Sender::new(GroupCommit::default()))
    }
}

impl SyncPoint {
    /// See [`GroupCommit::want`]; with what to wait on.
    pub(crate) fn want(&self, target: u64) -> (Want, watch::Receiver<GroupCommit>) {
        let mut want = Want::Done;
        // Asking wakes nobody.
        self.0.send_if_modified(|g| {
            want = g.want(target);
            false
        });
        (want, self.0.subscribe())
    }

    /// Runs syncs until nobody waits for more: `sync` writes what is buffered, waits for the
    /// disk (blocking: call this on a blocking thread) and returns the position it covers, or
    /// `None` when it failed. Every waiter whose target a sync reaches is woken when it ends.
    pub(crate) fn run(&self, mut sync: impl FnMut() -> Option<u64>) {
        loop {
            let outcome = sync();
            let mut again = false;
            self.0.send_modify(|g| again = g.finished(outcome));
            if !again {
                return;
            }
        }
    }

    /// Waits until the log is on the disk through `w`'s target (`true`), or a sync failed
    /// (`false`).
    pub(crate) async fn wait(mut rx: watch::Receiver<GroupCommit>, w: SyncWait) -> bool {
        match rx.wait_for(|g| g.reached(w).is_some()).await {
            Ok(g) => g.reached(w) == Some(true),
            // The subscription is gone: nothing of it to wait for.
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(w: Want) -> SyncWait {
        match w {
            Want::Lead(w) | Want::Follow(w) => w,
            Want::Done => panic!("expected a wait"),
        }
    }

    #[test]
    fn sessions_writing_while_a_sync_runs_share_the_next() {
        let mut g = GroupCommit::default();
        let a = g.want(5);
        assert!(matches!(a, Want::Lead(_)));
        // Two more sessions write while it runs: they follow.
        let b = g.want(7);
        let c = g.want(9);
        assert!(matches!(b, Want::Follow(_)));
        assert!(matches!(c, Want::Follow(_)));
        assert_eq!(g.reached(waiting(a)), None);
        // The first sync covered what was written when it started (5, and say 6).
        assert!(g.finished(Some(6)), "another sync for 7 and 9");
        assert_eq!(g.reached(waiting(a)), Some(true));
        assert_eq!(g.reached(waiting(b)), None);
        // One more sync covers both followers.
        assert!(!g.finished(Some(9)));
        assert_eq!(g.reached(waiting(b)), Some(true));
        assert_eq!(g.reached(waiting(c)), Some(true));
        // Nothing running; what is on the disk needs no sync.
        assert_eq!(g.want(9), Want::Done);
        assert!(matches!(g.want(10), Want::Lead(_)));
    }

    #[test]
    fn a_failed_sync_releases_its_waiters_and_the_next_asker_leads() {
        let mut g = GroupCommit::default();
        let a = waiting(g.want(3));
        let b = waiting(g.want(4));
        assert!(!g.finished(None), "no sync runs after a failure");
        assert_eq!(g.reached(a), Some(false));
        assert_eq!(g.reached(b), Some(false));
        // Written again: a new leader, and a later success reaches it.
        let again = g.want(4);
        assert!(matches!(again, Want::Lead(_)));
        assert!(!g.finished(Some(4)));
        assert_eq!(g.reached(waiting(again)), Some(true));
    }

    #[tokio::test]
    async fn waiters_wake_when_the_sync_reaching_them_ends() {
        let point = std::sync::Arc::new(SyncPoint::default());
        let (lead, rx_a) = point.want(2);
        let (follow, rx_b) = point.want(4);
        let a = tokio::spawn(SyncPoint::wait(rx_a, waiting(lead)));
        let b = tokio::spawn(SyncPoint::wait(rx_b, waiting(follow)));
        let mut syncs = vec![2u64, 4];
        let runner = std::sync::Arc::clone(&point);
        tokio::task::spawn_blocking(move || runner.run(|| Some(syncs.remove(0))))
            .await
            .unwrap();
        assert!(a.await.unwrap());
        assert!(b.await.unwrap());
    }
}
