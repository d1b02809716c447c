//! The node-wide send slots: how many envelopes may be in flight to all peers together.
//!
//! `delivery.max_in_flight_total` slots are shared by every peer's worker (a send holds one until
//! it ends). A peer that is the only one with anything in flight or waiting may go past them, up
//! to its own `delivery.max_in_flight_per_peer`, on a second, smaller pool (`per_peer − total`
//! slots): one busy peer — a backlog after its outage, a provider's burst of single files to one
//! area — then fills its window, while traffic spread over many peers (the national case, where
//! every slot costs memory in 42 directions) stays within the total. As soon as a second peer has
//! work, no more is borrowed; what is borrowed comes back as those sends end (one round trip).
//! So a node never has more than `max(total, per_peer)` sends in flight.
//! Must not: let two peers borrow at once, or count a worker as busy after it has stopped (its
//! [`BusyMark`] clears itself when dropped).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The node's send slots (see the module doc).
pub struct SendSlots {
    shared: Arc<Semaphore>,
    lone: Arc<Semaphore>,
    /// The two pools' sizes.
    sizes: (usize, usize),
    /// Workers with sends in flight or waiting for a slot.
    busy: AtomicUsize,
}

impl SendSlots {
    /// `total` shared slots, and a lone peer's room up to `per_peer`.
    pub fn new(total: usize, per_peer: usize) -> Self {
        let lone = per_peer.saturating_sub(total);
        Self {
            shared: Arc::new(Semaphore::new(total)),
            lone: Arc::new(Semaphore::new(lone)),
            sizes: (total, lone),
            busy: AtomicUsize::new(0),
        }
    }

    /// The shared pool, for a worker that waits (fairly, in turn) for slots to free.
    pub fn shared(&self) -> Arc<Semaphore> {
        self.shared.clone()
    }

    /// A mark for one worker, not busy until it says so.
    pub fn mark(self: &Arc<Self>) -> BusyMark {
        BusyMark {
            slots: self.clone(),
            on: false,
        }
    }

    /// Whether `mark`'s worker is the only busy one (so it may borrow).
    pub fn alone(&self, mark: &BusyMark) -> bool {
        mark.on && self.busy.load(Ordering::SeqCst) == 1
    }

    /// Slots free to `mark`'s worker now.
    pub fn available(&self, mark: &BusyMark) -> usize {
        let lone = if self.alone(mark) {
            self.lone.available_permits()
        } else {
            0
        };
        self.shared.available_permits() + lone
    }

    /// One slot if one is free to `mark`'s worker: a shared one first, else, while it is the only
    /// busy worker, one of the lone peer's.
    pub fn try_take(&self, mark: &BusyMark) -> Option<OwnedSemaphorePermit> {
        self.shared.clone().try_acquire_owned().ok().or_else(|| {
            self.alone(mark)
                .then(|| self.lone.clone().try_acquire_owned().ok())
                .flatten()
        })
    }

    /// Sends in flight now: (on shared slots, on a lone peer's), for `status`.
    pub fn in_use(&self) -> (usize, usize) {
        (
            self.sizes.0 - self.shared.available_permits(),
            self.sizes.1 - self.lone.available_permits(),
        )
    }
}

/// One worker's place in the busy count; cleared when dropped.
pub struct BusyMark {
    slots: Arc<SendSlots>,
    on: bool,
}

impl BusyMark {
    /// Says whether the worker has sends in flight or waits for a slot.
    pub fn set(&mut self, busy: bool) {
        if busy != self.on {
            self.on = busy;
            if busy {
                self.slots.busy.fetch_add(1, Ordering::SeqCst);
            } else {
                self.slots.busy.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for BusyMark {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(slots: &SendSlots, mark: &BusyMark) -> Vec<OwnedSemaphorePermit> {
        std::iter::from_fn(|| slots.try_take(mark)).collect()
    }

    #[test]
    fn a_peer_alone_fills_its_own_window_past_the_shared_slots() {
        let slots = Arc::new(SendSlots::new(4, 10));
        let mut a = slots.mark();
        // Not yet busy: only the shared slots.
        assert_eq!(slots.available(&a), 4);
        a.set(true);
        assert_eq!(slots.available(&a), 10);
        let held = take_all(&slots, &a);
        assert_eq!(held.len(), 10, "the peer's whole window");
        assert_eq!(slots.in_use(), (4, 6));
        drop(held);
        assert_eq!(slots.in_use(), (0, 0), "every slot comes back");
    }

    #[test]
    fn with_a_second_busy_peer_nobody_borrows() {
        let slots = Arc::new(SendSlots::new(4, 10));
        let (mut a, mut b) = (slots.mark(), slots.mark());
        a.set(true);
        let first = take_all(&slots, &a);
        assert_eq!(first.len(), 10);
        // B has work: A may take no more beyond the total, nor may B borrow.
        b.set(true);
        drop(first);
        assert_eq!(take_all(&slots, &a).len() + take_all(&slots, &b).len(), 4);
        assert!(!slots.alone(&a) && !slots.alone(&b));
        // B done (or its worker gone): A is alone again.
        drop(b);
        assert!(slots.alone(&a));
    }

    #[test]
    fn no_lone_room_when_the_total_is_the_larger() {
        let slots = Arc::new(SendSlots::new(8, 4));
        let mut a = slots.mark();
        a.set(true);
        assert_eq!(take_all(&slots, &a).len(), 8, "the total, no more");
    }

    #[test]
    fn a_mark_counts_once_however_often_it_is_set() {
        let slots = Arc::new(SendSlots::new(1, 2));
        let (mut a, mut b) = (slots.mark(), slots.mark());
        a.set(true);
        a.set(true);
        b.set(true);
        b.set(false);
        b.set(false);
        assert!(slots.alone(&a), "one busy worker, counted once");
    }
}
