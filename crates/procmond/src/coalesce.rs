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

/// A batch holding a start goes at once when the last hand-over of a start was at least this
/// long ago; else it is due this long after that one, and goes with the first event heard
/// from then on, or [`START_LATE`] later: under load one wake of the task per gap or so (at
/// 200 starts a second, two starts ride each hand-over), none added when processes start
/// less often. A start is handed over at most `START_GAP + START_LATE` after it was heard.
pub const START_GAP: Duration = Duration::from_millis(10);

/// How long after it is due a held start goes even if no event comes to take it along.
pub const START_LATE: Duration = Duration::from_millis(10);

/// How long a batch of exits (and name changes) alone waits for company: an exit is told
/// within this, and at a steady rate of processes it rides with the next start.
pub const EXIT_LINGER: Duration = Duration::from_millis(20);

/// A hold reaching this many events goes at once.
pub const HOLD_MAX: usize = 256;

/// What a batch holds, for how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A start, an exec or a new user: waits only to keep the hand-overs of starts about
    /// [`START_GAP`] apart (at most `START_GAP + START_LATE`).
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
    /// Whether a start is held.
    holds_start: bool,
    /// When a start was last handed over (a hand-over of exits alone does not count: it
    /// would hold back the next start of a quiet host).
    start_sent: Option<Instant>,
    /// Starts go at once, never held.
    starts_at_once: bool,
}

impl<T> Default for Hold<T> {
    fn default() -> Self {
        Self {
            events: Vec::new(),
            due: None,
            deadline: None,
            holds_start: false,
            start_sent: None,
            starts_at_once: false,
        }
    }
}

impl<T> Hold<T> {
    /// Whether starts go at once instead of riding together (procmond hashing executables
    /// opens each new one when it hears of its start, before a short process is gone).
    pub fn set_starts_at_once(&mut self, at_once: bool) {
        self.starts_at_once = at_once;
    }

    /// Adds `batch`, heard at `now` (events keep their order).
    pub fn add(&mut self, mut batch: Vec<T>, urgency: Urgency, now: Instant) {
        if batch.is_empty() {
            return;
        }
        let (due, deadline) = match urgency {
            Urgency::Start => {
                self.holds_start = true;
                let due = match self.start_sent {
                    Some(sent) if !self.starts_at_once => (sent + START_GAP).max(now),
                    _ => now,
                };
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
        if self.events.is_empty() {
            self.events = batch;
        } else {
            self.events.append(&mut batch);
        }
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
        if std::mem::take(&mut self.holds_start) {
            self.start_sent = Some(now);
        }
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
        assert_eq!(h.deadline(), Some(t0 + START_LATE));
        assert_eq!(h.take(t0), vec![1]);
        assert_eq!(h.deadline(), None);
        assert!(!h.is_due(t0));
        // Long after the last hand-over: at once again.
        let t1 = t0 + START_GAP * 3;
        h.add(vec![2], Urgency::Start, t1);
        assert!(h.is_due(t1));
        assert_eq!(h.deadline(), Some(t1 + START_LATE));
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
        // Due a gap after the last hand-over, with the next event; at the latest
        // START_LATE after that.
        assert!(!h.is_due(t0 + START_GAP - Duration::from_micros(1)));
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
        assert!(!h.is_due(t0));
        assert!(!h.is_due(t0 + EXIT_LINGER - Duration::from_micros(1)));
        assert!(h.is_due(t0 + EXIT_LINGER));
        assert_eq!(h.deadline(), Some(t0 + EXIT_LINGER));
        // A start after a quiet spell: everything goes at once, the exit first.
        let t1 = t0 + Duration::from_millis(3);
        h.add(vec![2], Urgency::Start, t1);
        assert!(h.is_due(t1));
        assert_eq!(h.take(t1), vec![1, 2]);
        // An exit right after a hand-over waits for company, no longer than before.
        h.add(vec![3], Urgency::Exit, t1);
        assert!(!h.is_due(t1));
        assert_eq!(h.deadline(), Some(t1 + EXIT_LINGER));
        // A start then waits only for the gap, which is earlier: both go then.
        h.add(vec![4], Urgency::Start, t1);
        assert!(!h.is_due(t1));
        assert!(h.is_due(t1 + START_GAP));
        assert_eq!(h.deadline(), Some(t1 + START_GAP + START_LATE));
        assert_eq!(h.take(t1 + START_GAP), vec![3, 4]);
    }

    #[test]
    fn exits_handed_over_alone_do_not_hold_back_the_next_start() {
        // Short processes 25 ms apart: a start goes, its exit goes alone 20 ms later, and the
        // next start, 5 ms after that, goes at once (not 10 ms after the exits).
        let t0 = Instant::now();
        let mut h = Hold::default();
        h.add(vec![1], Urgency::Start, t0);
        h.take(t0);
        h.add(vec![2], Urgency::Exit, t0 + Duration::from_millis(1));
        let exits_go = h.deadline().unwrap();
        assert_eq!(h.take(exits_go), vec![2]);
        let t1 = t0 + Duration::from_millis(25);
        h.add(vec![3], Urgency::Start, t1);
        assert!(h.is_due(t1));
    }

    #[test]
    fn starts_go_at_once_when_asked() {
        let t0 = Instant::now();
        let mut h = Hold::default();
        h.add(vec![1], Urgency::Start, t0);
        h.take(t0);
        h.set_starts_at_once(true);
        let t1 = t0 + Duration::from_millis(1);
        h.add(vec![2], Urgency::Exit, t1);
        assert!(!h.is_due(t1), "exits still wait");
        h.add(vec![3], Urgency::Start, t1);
        assert!(h.is_due(t1));
        assert_eq!(h.take(t1), vec![2, 3]);
        h.set_starts_at_once(false);
        h.add(vec![4], Urgency::Start, t1);
        assert!(!h.is_due(t1));
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
