//! When the connector's thread hands events to procmond's task: each hand-over wakes the
//! task and sends a message to the broker, so under a steady stream of processes several
//! ride together, and an idle host pays nothing.
//!
//! What is held goes with the first event heard once it is due (the thread wakes for the
//! kernel's events anyway), or at a later deadline if nothing comes: holding costs no wake
//! of its own while processes keep starting.
//!
//! Pure: the caller says what time it is. `/proc` is still read the moment an exec is heard
//! (a short process is soon gone); only the hand-over waits.

use std::time::{Duration, Instant};

/// A batch holding a start goes at once when the last hand-over was at least this long ago,
/// else when it is this long after the last one: at most one wake of the task per gap under
/// load (at 200 starts a second, every other start waits up to this long), none added when
/// processes start less often.
pub const START_GAP: Duration = Duration::from_millis(10);

/// How long after it is due a held start goes even if no event comes to take it along.
pub const START_LATE: Duration = Duration::from_millis(10);

/// How long a batch of exits (and name changes) alone waits for company: an exit is told
/// within this, and at a steady rate of processes it rides with the next start.
pub const EXIT_LINGER: Duration = Duration::from_millis(20);

/// Events held at most: more go at once.
pub const HOLD_MAX: usize = 256;

/// What a batch holds, for how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A start, an exec or a new user: waits only to keep hand-overs [`START_GAP`] apart.
    Start,
    /// Exits and name changes only: wait up to [`EXIT_LINGER`].
    Exit,
}

/// Events waiting to be handed over, when they may go with the next event, and when they
/// must go.
#[derive(Debug)]
pub struct Hold<T> {
    events: Vec<T>,
    due: Option<Instant>,
    deadline: Option<Instant>,
    last_sent: Option<Instant>,
}

impl<T> Default for Hold<T> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            due: None,
            deadline: None,
            last_sent: None,
        }
    }
}

impl<T> Hold<T> {
    /// Adds `batch`, heard at `now` (events keep their order).
    pub fn add(&mut self, mut batch: Vec<T>, urgency: Urgency, now: Instant) {
        if batch.is_empty() {
            return;
        }
        let (due, deadline) = match urgency {
            Urgency::Start => {
                let due = self
                    .last_sent
                    .map_or(now, |sent| (sent + START_GAP).max(now));
                (due, due + START_LATE)
            }
            Urgency::Exit => (now + EXIT_LINGER, now + EXIT_LINGER),
        };
        let (due, deadline) = if self.events.len() + batch.len() >= HOLD_MAX {
            (now, now)
        } else {
            (due, deadline)
        };
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
        self.deadline = Some(self.deadline.map_or(deadline, |d| d.min(deadline)));
        self.events.append(&mut batch);
    }

    /// When what is held must go even if no event comes (`None`: nothing is held).
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether what is held goes now, with the event just heard at `now`.
    pub fn is_due(&self, now: Instant) -> bool {
        self.due.is_some_and(|d| d <= now)
    }

    /// Everything held, handed over at `now`.
    pub fn take(&mut self, now: Instant) -> Vec<T> {
        self.due = None;
        self.deadline = None;
        self.last_sent = Some(now);
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_after_a_quiet_spell_goes_at_once() {
        let t0 = Instant::now();
        let mut h = Hold::default();
        assert_eq!(h.deadline(), None);
        assert!(!h.is_due(t0));
        h.add(vec![1], Urgency::Start, t0);
        assert!(h.is_due(t0));
        assert_eq!(h.take(t0), vec![1]);
        assert_eq!(h.deadline(), None);
        // Long after the last hand-over: at once again.
        let t1 = t0 + START_GAP * 3;
        h.add(vec![2], Urgency::Start, t1);
        assert!(h.is_due(t1));
    }

    #[test]
    fn starts_close_together_ride_one_hand_over() {
        let t0 = Instant::now();
        let mut h = Hold::default();
        h.add(vec![1], Urgency::Start, t0);
        h.take(t0);
        let t1 = t0 + START_GAP / 2;
        h.add(vec![2], Urgency::Start, t1);
        assert!(!h.is_due(t1));
        // Due a gap after the last hand-over; sent by then only if nothing else came.
        assert!(h.is_due(t0 + START_GAP));
        assert_eq!(h.deadline(), Some(t0 + START_GAP + START_LATE));
        h.add(vec![3], Urgency::Start, t1 + Duration::from_millis(1));
        assert!(!h.is_due(t1 + Duration::from_millis(1)));
        assert_eq!(h.deadline(), Some(t0 + START_GAP + START_LATE));
        assert_eq!(h.take(t0 + START_GAP), vec![2, 3]);
    }

    #[test]
    fn exits_wait_for_company_and_a_start_takes_them_along() {
        let t0 = Instant::now();
        let mut h = Hold::default();
        h.add(vec![1], Urgency::Exit, t0);
        assert_eq!(h.deadline(), Some(t0 + EXIT_LINGER));
        assert!(!h.is_due(t0 + EXIT_LINGER / 2));
        // A start after a quiet spell: everything goes at once, the exit first.
        let t1 = t0 + Duration::from_millis(3);
        h.add(vec![2], Urgency::Start, t1);
        assert!(h.is_due(t1));
        assert_eq!(h.take(t1), vec![1, 2]);
        // An exit right after a hand-over does not bring its due time forward.
        h.add(vec![3], Urgency::Exit, t1);
        assert_eq!(h.deadline(), Some(t1 + EXIT_LINGER));
        // A start then waits only for the gap, which is earlier.
        h.add(vec![4], Urgency::Start, t1);
        assert!(h.is_due(t1 + START_GAP));
        assert_eq!(h.deadline(), Some(t1 + START_GAP + START_LATE));
    }

    #[test]
    fn a_full_hold_goes_at_once() {
        let t0 = Instant::now();
        let mut h = Hold::default();
        h.add(vec![0; HOLD_MAX - 1], Urgency::Exit, t0);
        assert!(!h.is_due(t0));
        h.add(vec![0], Urgency::Exit, t0);
        assert!(h.is_due(t0));
        assert_eq!(h.take(t0).len(), HOLD_MAX);
        h.add(Vec::new(), Urgency::Start, t0);
        assert_eq!(h.deadline(), None);
    }
}
