//! The fetch scheduler: every repository fetch the cache makes waits here for a slot, in strict
//! class order. VM reads first, then pre-staging, then background work (read-ahead, relocation).
//!
//! Owns: the number of fetches in flight (bounded), the queue of fetches waiting for a slot, and
//! the order in which they get one. A waiting fetch's class can be raised while it waits (a VM
//! read that needs a chunk a pre-stager asked for first), and it is then served as that class.
//! Must not: know about chunks, caches or mounts; it only hands out [`Slot`]s.
//!
//! Guarantees, tested below:
//! - a fetch is never queued behind a fetch of a lower class (lower = later in [`FetchClass`]);
//! - the last [`FetchScheduler::reserve`] slots are for VM reads only, so a VM read finds a free
//!   slot even while pre-staging or background work keeps every slot they may use busy: at worst
//!   it waits behind other VM reads, never behind a queued or in-flight background fetch;
//! - within a class, requesters share fairly: a waiter whose requester has fewer fetches in
//!   flight goes first, so one mount's flood of uncached reads cannot make every other mount's
//!   VM wait behind it; among equals, first come first served;
//! - while VM reads are active (one is running, or one ended less than [`VM_HOLD`] ago),
//!   pre-staging and background work together keep at most one fetch in flight: on a store
//!   whose bandwidth is the limit, in-flight fetches are served in turn, and a VM read should
//!   find at most one lower-class transfer ahead of it. When the VM is quiet they use every
//!   slot they may;
//! - a fetch made on behalf of a [`Requester`] (a mount's read-ahead) is held back only by the
//!   VM reads of others: a VM is not protected from the read-ahead of its own stream, which
//!   is what stops its next reads from missing (decision 0012);
//! - pre-staging fetches go by their pre-stager's rank (its start order): of many VMs whose
//!   boot sets are warmed at once, the first started is warm first (issue 24).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long after a VM read ends VM reads count as active.
pub const VM_HOLD: Duration = Duration::from_millis(200);
/// Lower-class fetches in flight at most while VM reads are active.
pub const LOWER_WHILE_VM_ACTIVE: usize = 1;

/// Why a chunk is fetched, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchClass {
    /// A read a VM (an NFS client) is waiting for.
    Vm = 0,
    /// Warming a mount's boot set before or while its VM starts.
    Prestage = 1,
    /// Read-ahead and relocation: nobody waits for these now.
    Background = 2,
}

impl FetchClass {
    const ALL: [FetchClass; 3] = [FetchClass::Vm, FetchClass::Prestage, FetchClass::Background];

    fn from_u8(v: u8) -> FetchClass {
        Self::ALL[usize::from(v.min(2))]
    }
}

/// Whose reads a fetch serves: one per mount reader, so that a mount's read-ahead is not held
/// back by the VM reads of that same mount. [`Requester::ANYONE`] is nobody in particular
/// (pre-staging, relocation, reads outside a mount): held back by every VM read, and its own
/// VM reads hold back every lower-class fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Requester(u64);

impl Requester {
    pub const ANYONE: Requester = Requester(0);

    /// A requester distinct from every other one made in this process.
    pub fn unique() -> Requester {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Requester(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The class of one pending fetch, shared by everyone waiting for it (it can only rise), and
/// the requester that started it.
#[derive(Debug)]
pub struct Demand {
    class: AtomicU8,
    requester: Requester,
    /// Among pre-staging fetches, lower ranks first (see [`Demand::ranked`]).
    rank: u64,
}

impl Demand {
    pub fn new(class: FetchClass) -> Arc<Demand> {
        Self::on_behalf_of(class, Requester::ANYONE)
    }

    pub fn on_behalf_of(class: FetchClass, requester: Requester) -> Arc<Demand> {
        Arc::new(Demand {
            class: AtomicU8::new(class as u8),
            requester,
            rank: 0,
        })
    }

    /// A fetch of `class` for nobody in particular with `rank`: while it is a pre-staging
    /// fetch, it goes before every waiting pre-staging fetch of a higher rank. Pre-stagers
    /// take their rank from the order in which they started (see [`next_rank`]), so that
    /// of many VMs started at once the first is warm first, rather than all of them at the
    /// end together. Raised to a VM read, the rank no longer counts.
    pub fn ranked(class: FetchClass, rank: u64) -> Arc<Demand> {
        Arc::new(Demand {
            class: AtomicU8::new(class as u8),
            requester: Requester::ANYONE,
            rank,
        })
    }

    /// What orders it among waiters of its class before fairness and arrival.
    fn rank_in(&self, class: FetchClass) -> u64 {
        if class == FetchClass::Prestage {
            self.rank
        } else {
            0
        }
    }

    pub fn class(&self) -> FetchClass {
        FetchClass::from_u8(self.class.load(Ordering::Acquire))
    }

    /// Raises the class to `class` if that is higher; returns whether it rose.
    pub fn raise(&self, class: FetchClass) -> bool {
        self.class.fetch_min(class as u8, Ordering::AcqRel) > class as u8
    }
}

/// The next pre-staging rank: pre-stagers started later go after those started earlier (1
/// is the first; 0 is no rank and goes first).
pub fn next_rank() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Hands out fetch slots in class order.
#[derive(Debug)]
pub struct FetchScheduler {
    limit: usize,
    reserve: usize,
    hold: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_flight: usize,
    /// VM-class fetches in flight, in all.
    vm_in_flight: usize,
    /// VM-class fetches in flight and when the last one ended, by requester (an entry goes
    /// once it is past the hold with nothing in flight).
    vm: HashMap<Requester, VmReads>,
    /// Fetches in flight (every class) by requester, for fair shares within a class.
    flights: HashMap<Requester, usize>,
    next_seq: u64,
    waiting: Vec<Waiter>,
    /// Slots handed out so far, by class (for tests and `/metrics`).
    granted: [u64; 3],
    /// Fetches in flight now, by class (for the console).
    class_in_flight: [usize; 3],
}

#[derive(Debug, Default)]
struct VmReads {
    in_flight: usize,
    ended: Option<Instant>,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    demand: Arc<Demand>,
    wake: oneshot::Sender<Slot>,
}

/// Counters of a scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SchedulerStats {
    pub in_flight: usize,
    pub waiting: usize,
    /// Fetches started, by class: VM, pre-stage, background.
    pub started: [u64; 3],
    /// Fetches in flight now, by class: VM, pre-stage, background.
    pub in_flight_by_class: [usize; 3],
}

/// Permission to run one fetch; the slot is given back when this is dropped.
#[derive(Debug)]
pub struct Slot {
    sched: Option<Arc<FetchScheduler>>,
    class: FetchClass,
    requester: Requester,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(s) = self.sched.take() {
            let mut st = s.lock();
            s.give_back(&mut st, self.class, self.requester, true);
            s.grant(&mut st);
        }
    }
}

impl FetchScheduler {
    /// At most `limit` fetches at once, the last `reserve` of them for VM reads only
    /// (`reserve` is clamped to `0..limit`).
    pub fn new(limit: usize, reserve: usize) -> Arc<FetchScheduler> {
        Self::with_hold(limit, reserve, VM_HOLD)
    }

    /// The same, with VM reads counting as active for `hold` after one ends (zero: only while
    /// one runs).
    pub fn with_hold(limit: usize, reserve: usize, hold: Duration) -> Arc<FetchScheduler> {
        let limit = limit.max(1);
        Arc::new(FetchScheduler {
            limit,
            reserve: reserve.min(limit - 1),
            hold,
            state: Mutex::new(State::default()),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn reserve(&self) -> usize {
        self.reserve
    }

    pub fn stats(&self) -> SchedulerStats {
        let st = self.lock();
        SchedulerStats {
            in_flight: st.in_flight,
            waiting: st.waiting.iter().filter(|w| !w.wake.is_closed()).count(),
            started: st.granted,
            in_flight_by_class: st.class_in_flight,
        }
    }

    /// Waits for a slot for a fetch of `demand`'s class (read again each time slots are handed
    /// out, so a raised class takes effect at once).
    pub async fn slot(self: &Arc<Self>, demand: Arc<Demand>) -> Slot {
        let rx = {
            let mut st = self.lock();
            let class = demand.class();
            let queued_ahead = st
                .waiting
                .iter()
                .any(|w| !w.wake.is_closed() && w.demand.class() <= class);
            if !queued_ahead && st.in_flight < self.cap(&st, class, demand.requester) {
                return self.take(&mut st, class, demand.requester);
            }
            let (tx, rx) = oneshot::channel();
            let seq = st.next_seq;
            st.next_seq += 1;
            st.waiting.push(Waiter {
                seq,
                demand,
                wake: tx,
            });
            rx
        };
        match rx.await {
            Ok(slot) => slot,
            // Unreachable while `self` lives (waiters are only dropped when they are granted
            // or when their receiver is gone); wait for a new slot rather than panic.
            Err(_) => Box::pin(self.slot(Demand::new(FetchClass::Vm))).await,
        }
    }

    /// Hands out free slots after a waiter's class was raised.
    pub fn reconsider(self: &Arc<Self>) {
        let mut st = self.lock();
        self.grant(&mut st);
    }

    /// Whether VM reads are active now (one running, or one ended less than the hold ago).
    pub fn vm_active(&self) -> bool {
        let st = self.lock();
        self.vm_active_in(&st, Requester::ANYONE)
    }

    fn active(&self, r: &VmReads) -> bool {
        r.in_flight > 0
            || r.ended
                .is_some_and(|t| t.elapsed() < self.hold && !self.hold.is_zero())
    }

    /// Whether VM reads other than `except`'s own are active (all of them for
    /// [`Requester::ANYONE`]; reads by nobody in particular count for everyone).
    fn vm_active_in(&self, st: &State, except: Requester) -> bool {
        st.vm.iter().any(|(who, r)| {
            (except == Requester::ANYONE || *who != except || *who == Requester::ANYONE)
                && self.active(r)
        })
    }

    /// How many slots a fetch of `class` for `requester` may find busy and still start.
    fn cap(&self, st: &State, class: FetchClass, requester: Requester) -> usize {
        if class == FetchClass::Vm {
            return self.limit;
        }
        if self.vm_active_in(st, requester) {
            // Lower classes may hold at most this many of the busy slots.
            (st.vm_in_flight + LOWER_WHILE_VM_ACTIVE).min(self.limit - self.reserve)
        } else {
            self.limit - self.reserve
        }
    }

    fn take(self: &Arc<Self>, st: &mut State, class: FetchClass, requester: Requester) -> Slot {
        st.in_flight += 1;
        *st.flights.entry(requester).or_default() += 1;
        if class == FetchClass::Vm {
            st.vm_in_flight += 1;
            st.vm.entry(requester).or_default().in_flight += 1;
        }
        st.granted[class as usize] += 1;
        st.class_in_flight[class as usize] += 1;
        Slot {
            sched: Some(self.clone()),
            class,
            requester,
        }
    }

    /// Undoes the counts of [`Self::take`]; `ran`: the fetch ran (a VM read ends now).
    fn give_back(&self, st: &mut State, class: FetchClass, requester: Requester, ran: bool) {
        st.in_flight -= 1;
        st.class_in_flight[class as usize] -= 1;
        if let Some(n) = st.flights.get_mut(&requester) {
            *n -= 1;
            if *n == 0 {
                st.flights.remove(&requester);
            }
        }
        if class == FetchClass::Vm {
            st.vm_in_flight -= 1;
            if let Some(r) = st.vm.get_mut(&requester) {
                r.in_flight -= 1;
                if ran {
                    r.ended = Some(Instant::now());
                }
            }
        }
        if class == FetchClass::Vm {
            // Forget requesters whose reads are over and past the hold (mounts come and go);
            // only VM reads make entries, so only their ends need to look.
            let hold = self.hold;
            st.vm.retain(|_, r| {
                r.in_flight > 0
                    || r.ended
                        .is_some_and(|t| t.elapsed() < hold && !hold.is_zero())
            });
        }
    }

    /// Gives free slots to waiters, best class first; within a class, the lowest pre-staging
    /// rank first, then the requester with the fewest fetches in flight, then the oldest; stops at the first waiter that may not
    /// start (nobody behind it may overtake it).
    fn grant(self: &Arc<Self>, st: &mut State) {
        st.waiting.retain(|w| !w.wake.is_closed());
        loop {
            let Some(best) = st
                .waiting
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| {
                    let flights = st.flights.get(&w.demand.requester).copied().unwrap_or(0);
                    let class = w.demand.class();
                    (class, w.demand.rank_in(class), flights, w.seq)
                })
                .map(|(i, w)| (i, w.demand.class(), w.demand.requester))
            else {
                return;
            };
            let (i, class, requester) = best;
            if st.in_flight >= self.cap(st, class, requester) {
                return;
            }
            let w = st.waiting.swap_remove(i);
            let slot = self.take(st, class, requester);
            if let Err(mut slot) = w.wake.send(slot) {
                // The waiter went away just now: take the slot back without re-entering.
                slot.sched = None;
                self.give_back(st, class, requester, false);
                st.granted[class as usize] -= 1;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Starts a task that takes a slot of `class` and reports it on `done`.
    fn request(
        s: &Arc<FetchScheduler>,
        demand: Arc<Demand>,
        label: &'static str,
        done: &tokio::sync::mpsc::UnboundedSender<(&'static str, Slot)>,
    ) {
        let s = s.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let slot = s.slot(demand).await;
            let _ = done.send((label, slot));
        });
    }

    #[tokio::test]
    async fn pre_staging_goes_by_rank_and_a_raised_one_leaves_its_rank() {
        let s = FetchScheduler::with_hold(2, 1, Duration::ZERO);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // One slot for pre-staging, busy; the later pre-stager's fetches queue first.
        request(&s, Demand::ranked(FetchClass::Prestage, 1), "first", &tx);
        let busy = rx.recv().await.unwrap();
        for _ in 0..3 {
            request(&s, Demand::ranked(FetchClass::Prestage, 7), "later", &tx);
        }
        settle().await;
        for _ in 0..3 {
            request(&s, Demand::ranked(FetchClass::Prestage, 2), "second", &tx);
        }
        settle().await;
        let raised = Demand::ranked(FetchClass::Prestage, 9);
        request(&s, raised.clone(), "raised", &tx);
        settle().await;
        assert!(raised.raise(FetchClass::Vm));
        s.reconsider();
        // The raised one is a VM read now: it takes the reserved slot at once.
        let (label, vm) = rx.recv().await.unwrap();
        assert_eq!(label, "raised");
        drop(vm);
        drop(busy);
        let mut order = Vec::new();
        for _ in 0..6 {
            let (label, slot) = rx.recv().await.unwrap();
            order.push(label);
            drop(slot);
        }
        assert_eq!(
            order,
            ["second", "second", "second", "later", "later", "later"]
        );
    }

    #[tokio::test]
    async fn a_vm_read_overtakes_every_queued_background_fetch() {
        // (No hold after VM reads here: the next test is about that.)
        let s = FetchScheduler::with_hold(4, 1, Duration::ZERO);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Background work fills the three slots it may use and queues 100 more.
        for _ in 0..103 {
            request(&s, Demand::new(FetchClass::Background), "bg", &tx);
        }
        settle().await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(rx.recv().await.unwrap());
        }
        assert_eq!(s.stats().in_flight, 3);
        assert_eq!(s.stats().in_flight_by_class, [0, 0, 3]);
        // A VM read arrives: the reserved slot is free, it starts at once.
        request(&s, Demand::new(FetchClass::Vm), "vm", &tx);
        let (label, vm_slot) = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(label, "vm");
        assert_eq!(s.stats().in_flight_by_class, [1, 0, 3]);
        // With every slot busy, a second VM read and more pre-staging queue; when one slot
        // frees, the VM read gets it. Pre-staging and background start only while at least
        // the reserved slot is free: pre-staging first, then background.
        request(&s, Demand::new(FetchClass::Prestage), "pre", &tx);
        settle().await;
        request(&s, Demand::new(FetchClass::Vm), "vm2", &tx);
        settle().await;
        drop(vm_slot);
        let vm2 = rx.recv().await.unwrap();
        assert_eq!(vm2.0, "vm2");
        drop(vm2);
        settle().await;
        assert_eq!(
            s.stats().in_flight,
            3,
            "nothing but a VM read may take the last slot"
        );
        drop(held.pop());
        let pre = rx.recv().await.unwrap();
        assert_eq!(pre.0, "pre");
        drop(held.pop());
        let bg = rx.recv().await.unwrap();
        assert_eq!(bg.0, "bg");
        assert_eq!(s.stats().started, [2, 1, 4]);
        assert_eq!(s.stats().in_flight, 3);
        assert_eq!(s.stats().in_flight_by_class, [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn while_vm_reads_are_active_lower_classes_keep_one_fetch_in_flight() {
        let s = FetchScheduler::with_hold(8, 2, Duration::from_millis(200));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..20 {
            request(&s, Demand::new(FetchClass::Prestage), "pre", &tx);
        }
        settle().await;
        let mut pre = Vec::new();
        for _ in 0..6 {
            pre.push(rx.recv().await.unwrap());
        }
        assert_eq!(
            s.stats().in_flight,
            6,
            "a quiet VM: pre-staging uses its 6 slots"
        );
        let vm = s.slot(Demand::new(FetchClass::Vm)).await;
        // The VM is active: as pre-stage fetches end, only one at a time is started again.
        pre.truncate(0);
        settle().await;
        let next = rx.recv().await.unwrap();
        settle().await;
        assert_eq!(
            s.stats().in_flight,
            2,
            "the VM read and one pre-stage fetch"
        );
        drop(vm);
        drop(next);
        settle().await;
        assert_eq!(
            s.stats().in_flight,
            1,
            "still one within the hold after the VM read"
        );
        // The hold passes; at the next slot handed back pre-staging takes its slots again.
        tokio::time::sleep(Duration::from_millis(250)).await;
        drop(rx.recv().await.unwrap());
        settle().await;
        assert_eq!(s.stats().in_flight, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_mounts_read_ahead_is_held_back_by_other_vms_only() {
        let s = FetchScheduler::with_hold(8, 2, Duration::from_millis(200));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (me, other) = (Requester::unique(), Requester::unique());
        // My VM reads: my read-ahead still gets every slot lower classes may use (6 of 8).
        let mine = s.slot(Demand::on_behalf_of(FetchClass::Vm, me)).await;
        for _ in 0..10 {
            let d = Demand::on_behalf_of(FetchClass::Background, me);
            request(&s, d, "ahead", &tx);
        }
        settle().await;
        let mut ahead = Vec::new();
        for _ in 0..5 {
            ahead.push(rx.recv().await.unwrap());
        }
        assert_eq!(s.stats().in_flight, 6, "my VM read and 5 of my read-aheads");
        // Another VM reads: as my read-aheads end, they are started again only up to one
        // beyond the VM reads in flight.
        let theirs = s.slot(Demand::on_behalf_of(FetchClass::Vm, other)).await;
        ahead.clear();
        settle().await;
        let held = rx.recv().await.unwrap();
        settle().await;
        assert_eq!(s.stats().in_flight, 3, "two VM reads and one read-ahead");
        // Both VM reads end; theirs is within its hold, so still one read-ahead at a time.
        drop((mine, theirs));
        settle().await;
        assert_eq!(s.stats().in_flight, 1);
        // Past the hold, my read-ahead has its slots back.
        tokio::time::advance(Duration::from_millis(250)).await;
        s.reconsider();
        settle().await;
        assert_eq!(
            s.stats().in_flight,
            5,
            "the one held and the 4 still waiting"
        );
        drop(held);

        // A fetch by nobody in particular is held back by my VM reads, as before.
        let s = FetchScheduler::with_hold(8, 2, Duration::from_millis(200));
        let _mine = s.slot(Demand::on_behalf_of(FetchClass::Vm, me)).await;
        for _ in 0..3 {
            request(&s, Demand::new(FetchClass::Prestage), "pre", &tx);
        }
        settle().await;
        assert_eq!(s.stats().in_flight, 2, "my VM read and one pre-stage fetch");
        assert_eq!(s.stats().waiting, 2);
    }

    #[tokio::test]
    async fn a_raised_demand_is_served_in_its_new_class() {
        let s = FetchScheduler::new(2, 1);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        request(&s, Demand::new(FetchClass::Prestage), "pre0", &tx);
        let first = rx.recv().await.unwrap();
        // pre1 waits (pre-staging may use one slot); then a VM read needs pre1's chunk.
        let d = Demand::new(FetchClass::Prestage);
        request(&s, d.clone(), "pre1", &tx);
        settle().await;
        assert_eq!(s.stats().waiting, 1);
        assert!(d.raise(FetchClass::Vm));
        assert!(!d.raise(FetchClass::Background), "a class never drops");
        s.reconsider();
        // It now runs in the slot kept for VM reads, without waiting for pre0.
        let (label, _slot) = tokio::time::timeout(Duration::from_secs(1), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(label, "pre1");
        drop(first);
    }

    #[tokio::test]
    async fn one_mounts_flood_does_not_queue_another_mounts_vm_read_behind_it() {
        let s = FetchScheduler::new(4, 1);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (flood, quiet) = (Requester::unique(), Requester::unique());
        // The flood takes every slot and queues 50 more reads.
        for _ in 0..54 {
            request(
                &s,
                Demand::on_behalf_of(FetchClass::Vm, flood),
                "flood",
                &tx,
            );
        }
        settle().await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(rx.recv().await.unwrap());
        }
        // Another mount's VM reads: the next free slot is theirs, not the flood's 51st.
        request(
            &s,
            Demand::on_behalf_of(FetchClass::Vm, quiet),
            "quiet",
            &tx,
        );
        settle().await;
        request(
            &s,
            Demand::on_behalf_of(FetchClass::Vm, quiet),
            "quiet2",
            &tx,
        );
        settle().await;
        drop(held.pop());
        let (label, slot) = rx.recv().await.unwrap();
        assert_eq!(label, "quiet");
        // In flight now: quiet 1, flood 2. The next slot is quiet's again.
        drop(held.pop());
        let (label2, slot2) = rx.recv().await.unwrap();
        assert_eq!(label2, "quiet2");
        // In flight now: quiet 2, flood 1. The flood's turn.
        drop(held.pop());
        let (label3, _slot3) = rx.recv().await.unwrap();
        assert_eq!(label3, "flood");
        drop((slot, slot2));
    }

    #[tokio::test]
    async fn same_class_is_first_come_first_served_and_gone_waiters_are_skipped() {
        let s = FetchScheduler::new(1, 0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let hold = s.slot(Demand::new(FetchClass::Vm)).await;
        let gone = {
            let s = s.clone();
            tokio::spawn(async move { s.slot(Demand::new(FetchClass::Vm)).await })
        };
        settle().await;
        for label in ["a", "b", "c"] {
            request(&s, Demand::new(FetchClass::Vm), label, &tx);
            settle().await;
        }
        gone.abort();
        settle().await;
        drop(hold);
        for want in ["a", "b", "c"] {
            let (label, slot) = rx.recv().await.unwrap();
            assert_eq!(label, want);
            drop(slot);
        }
        let st = s.stats();
        assert_eq!((st.in_flight, st.waiting), (0, 0));
    }
}
