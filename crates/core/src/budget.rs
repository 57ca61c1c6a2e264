//! A byte budget shared by everything that keeps messages (the broker's `max_memory_bytes`),
//! and the charge a kept message carries against it.
//!
//! A queue that keeps a message charges the budget for it. When several queues keep the same
//! copy (one frame routed to several subscribers), the copy is charged once: the charge
//! travels inside the message ([`crate::Message`], [`crate::codec::MessageRun`]) and is given
//! back when its last clone is dropped, wherever that happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes in use against a cap. Reservations never take it past the cap.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    cap: usize,
}

impl Budget {
    /// An empty budget of `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes `n` bytes if they fit under the cap.
    pub fn try_reserve(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.cap).then_some(u + n)
            })
            .is_ok()
    }

    /// Gives back `n` bytes taken before.
    pub fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The cap.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Whether `n` more bytes would fit now.
    pub fn has_room(&self, n: usize) -> bool {
        self.used() + n <= self.cap
    }
}

/// Bytes taken from a [`Budget`], given back when the charge is dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    /// Takes `bytes` from `budget`; `None` when they do not fit.
    pub fn take(budget: &Arc<Budget>, bytes: usize) -> Option<Self> {
        budget.try_reserve(bytes).then(|| Self {
            budget: Arc::clone(budget),
            bytes,
        })
    }

    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_holds_its_bytes_until_dropped_and_never_passes_the_cap() {
        let budget = Arc::new(Budget::new(100));
        let a = Charge::take(&budget, 60).unwrap();
        assert!(Charge::take(&budget, 41).is_none(), "past the cap");
        let b = Charge::take(&budget, 40).unwrap();
        assert_eq!((budget.used(), a.bytes() + b.bytes()), (100, 100));
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(budget.has_room(60) && !budget.has_room(61));
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
