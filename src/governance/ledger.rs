//! The in-memory spend ledger: each user's spend in the current budget period, plus money
//! reserved for requests still in flight, so the spend-cap check on the request path never
//! waits for the database.
//!
//! A request reserves its estimated cost before it goes upstream ([`SpendLedger::try_reserve`])
//! and settles the real cost when it ends ([`SpendLedger::settle`]). Reservations are what stop
//! many concurrent requests from all passing the check against the same, not yet updated, spend.
//!
//! # Admission rule and overshoot bound
//!
//! With a cap, a [`ReservationKind::Bounded`] request (one whose reservation is an upper bound
//! of its cost: `pricing::CostBound`) is admitted when the user's spend is below the cap and
//! either no other request of theirs is in flight, or spend + reserved + estimate fits within
//! the cap. The first case admits a request even when its estimate alone exceeds what is left:
//! estimates are deliberately generous (a model's full output limit), and refusing them would
//! lock a user out while they still have money. An [`ReservationKind::Unbounded`] request (its
//! input is partly invisible to the gateway, so no estimate bounds it) is admitted only when
//! nothing else of the user's is in flight, and it reserves at least the rest of the cap, so
//! nothing else is admitted while it runs.
//!
//! The price is a bounded overshoot: a user's spend ends a period at most **one request's real
//! cost** above the cap. Only a request admitted alone can cross the cap, and while it is in
//! flight nothing else is admitted past the cap; concurrent bounded requests are admitted only
//! while their reservations fit under the cap, and each costs no more than its reservation.
//!
//! # Period roll-over
//!
//! Entries roll over lazily: the first reservation in a new period resets that user's spend to
//! zero. A request that started in the old period and settles in the new one is charged to the
//! new period: the old period is over and nothing checks it any more, while charging the new one
//! keeps the cost from vanishing and keeps in-flight money counted against the cap that is live.
//!
//! Not here: which cap applies (`governance::budget`), computing costs or estimates
//! (`governance::pricing`), or persisting spend (`store`, which [`SpendLedger::hydrate`] loads
//! from). The ledger is per process: several replicas each hold their own.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use uuid::Uuid;

use super::budget::LimitScope;
use crate::money::NanoUsd;

type Users = Arc<Mutex<HashMap<Uuid, UserSpend>>>;

/// Per-user spend and in-flight reservations.
#[derive(Debug, Default)]
pub struct SpendLedger {
    // Shared with every outstanding `Reservation`, so one dropped without being settled can still
    // release its money (see `Reservation`'s `Drop`).
    users: Users,
}

#[derive(Debug, Clone, Copy)]
struct UserSpend {
    period_start: DateTime<Utc>,
    spent: NanoUsd,
    reserved: NanoUsd,
}

impl UserSpend {
    fn new(period_start: DateTime<Utc>) -> UserSpend {
        UserSpend {
            period_start,
            spent: NanoUsd::ZERO,
            reserved: NanoUsd::ZERO,
        }
    }

    /// Moves the entry into `period_start`'s period if it is from an older one. Reservations
    /// carry over: those requests are still running and will be charged to the new period.
    fn roll_to(&mut self, period_start: DateTime<Utc>) {
        if self.period_start < period_start {
            self.period_start = period_start;
            self.spent = NanoUsd::ZERO;
        }
    }
}

/// Whether a request's reservation bounds its cost; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationKind {
    /// The reservation is an upper bound of what the request can cost.
    Bounded,
    /// Nothing bounds the cost: admitted only alone, holding the rest of the cap.
    Unbounded,
}

/// Why a request was refused: the user's cap is spent, or what is left is already reserved by
/// their other in-flight requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} spend cap of {cap} USD reached: {spent} USD spent, {reserved} USD reserved by requests in \
     flight",
    scope.as_str()
)]
pub struct BudgetRefusal {
    pub cap: NanoUsd,
    pub spent: NanoUsd,
    /// Money held by the user's other in-flight requests; non-zero when spend alone is still
    /// under the cap and the refusal is because those requests may use up the rest.
    pub reserved: NanoUsd,
    pub scope: LimitScope,
}

/// Money held for one in-flight request, to be settled exactly once with
/// [`SpendLedger::settle`].
///
/// Not `Clone`, so it cannot be settled twice. If it is dropped unsettled (a panic, or a request
/// future cancelled when its client went away), the reservation is released and nothing is
/// charged, rather than holding the user's budget forever; callers should still settle with the
/// real cost whenever they know it.
#[must_use = "a reservation must be settled with SpendLedger::settle, or its cost is never charged"]
#[derive(Debug)]
pub struct Reservation {
    user: Uuid,
    amount: NanoUsd,
    period_start: DateTime<Utc>,
    // `None` once settled.
    ledger: Option<Users>,
}

impl Reservation {
    pub fn user(&self) -> Uuid {
        self.user
    }

    /// The money held: the request's estimate.
    pub fn amount(&self) -> NanoUsd {
        self.amount
    }

    /// Start of the budget period the reservation was made in.
    pub fn period_start(&self) -> DateTime<Utc> {
        self.period_start
    }

    /// Releases the reservation on `users` and charges `actual` to the user's current period.
    fn finish(&mut self, actual: NanoUsd) {
        let Some(users) = self.ledger.take() else {
            return;
        };
        let mut map = users.lock();
        let entry = map
            .entry(self.user)
            .or_insert_with(|| UserSpend::new(self.period_start));
        // The entry's period is never older than the reservation's: reserving rolled it
        // forward, and hydrate never moves an entry back. So `actual` lands in the current
        // period, which is the new one if the period rolled over meanwhile.
        entry.roll_to(self.period_start);
        entry.reserved = entry
            .reserved
            .saturating_sub(self.amount)
            .max(NanoUsd::ZERO);
        entry.spent = entry.spent.saturating_add(actual.max(NanoUsd::ZERO));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.ledger.is_some() {
            tracing::warn!(
                user_id = %self.user,
                reserved_nano_usd = self.amount.0,
                "budget reservation dropped without being settled; released without charge"
            );
            self.finish(NanoUsd::ZERO);
        }
    }
}

impl SpendLedger {
    pub fn new() -> SpendLedger {
        SpendLedger::default()
    }

    /// Loads each user's spend for the period starting at `period_start`, replacing what the
    /// ledger held: users not listed are set to zero spend. Money reserved by requests in flight
    /// is kept, since those requests will still settle. Entries already in a later period than
    /// `period_start` are left alone, so a slow load cannot move a user back in time.
    pub fn hydrate(
        &self,
        period_start: DateTime<Utc>,
        spent: impl IntoIterator<Item = (Uuid, NanoUsd)>,
    ) {
        // Collect before locking so a lazy iterator cannot hold the lock.
        let loaded: Vec<(Uuid, NanoUsd)> = spent.into_iter().collect();
        let mut map = self.users.lock();
        map.retain(|_, entry| {
            if entry.period_start > period_start {
                return true;
            }
            entry.period_start = period_start;
            entry.spent = NanoUsd::ZERO;
            // An idle user's zeroed entry carries no information; dropping it keeps the map to
            // the users who are spending.
            entry.reserved > NanoUsd::ZERO
        });
        for (user, amount) in loaded {
            let entry = map
                .entry(user)
                .or_insert_with(|| UserSpend::new(period_start));
            if entry.period_start == period_start {
                entry.spent = amount;
            }
        }
    }

    /// Reserves `estimate` for a request by `user` in the period starting at `period_start`, or
    /// refuses it. `cap` is the user's resolved cap (`None`: uncapped, always admitted but still
    /// tracked). See the module docs for the admission rule and its overshoot bound.
    pub fn try_reserve(
        &self,
        user: Uuid,
        cap: Option<(NanoUsd, LimitScope)>,
        estimate: NanoUsd,
        period_start: DateTime<Utc>,
        kind: ReservationKind,
    ) -> Result<Reservation, BudgetRefusal> {
        let mut estimate = estimate.max(NanoUsd::ZERO);
        let mut map = self.users.lock();
        let entry = map
            .entry(user)
            .or_insert_with(|| UserSpend::new(period_start));
        entry.roll_to(period_start);
        if let Some((cap, scope)) = cap {
            let alone = entry.reserved == NanoUsd::ZERO;
            let fits = entry
                .spent
                .saturating_add(entry.reserved)
                .saturating_add(estimate)
                <= cap;
            let admitted = match kind {
                ReservationKind::Bounded => alone || fits,
                ReservationKind::Unbounded => alone,
            };
            if entry.spent >= cap || !admitted {
                return Err(BudgetRefusal {
                    cap,
                    spent: entry.spent,
                    reserved: entry.reserved,
                    scope,
                });
            }
            if kind == ReservationKind::Unbounded {
                // Holding the rest of the cap keeps every other request out while it runs.
                estimate = estimate.max(cap.saturating_sub(entry.spent));
            }
        }
        entry.reserved = entry.reserved.saturating_add(estimate);
        // Settling charges the entry's current period, so record the period the entry is in
        // (which may be later than the caller's `period_start` if the caller's clock lags).
        let period_start = entry.period_start;
        drop(map);
        Ok(Reservation {
            user,
            amount: estimate,
            period_start,
            ledger: Some(Arc::clone(&self.users)),
        })
    }

    /// Ends a reservation: releases its money and charges `actual` (negative amounts count as
    /// zero) to the user's current period. See the module docs for roll-over.
    pub fn settle(&self, mut reservation: Reservation, actual: NanoUsd) {
        // A reservation always settles on the ledger that issued it; settling one from another
        // ledger would be a caller bug, and charging its own ledger is the only sound outcome.
        debug_assert!(reservation
            .ledger
            .as_ref()
            .is_some_and(|users| Arc::ptr_eq(users, &self.users)));
        reservation.finish(actual);
    }

    /// Raises the user's spend in `period_start`'s period to `spent` if the ledger knew less
    /// (another replica's spend, seen in the shared store). Never lowers it: this replica's own
    /// latest costs may not have reached the store yet.
    pub fn observe_spent(&self, user: Uuid, period_start: DateTime<Utc>, spent: NanoUsd) {
        let mut map = self.users.lock();
        let entry = map
            .entry(user)
            .or_insert_with(|| UserSpend::new(period_start));
        entry.roll_to(period_start);
        if entry.period_start == period_start && entry.spent < spent {
            entry.spent = spent;
        }
    }

    /// The user's `(spent, reserved)` as the ledger holds them, zero for unknown users. Spend is
    /// that of the last period the user was seen in; it does not roll over by itself.
    pub fn snapshot(&self, user: Uuid) -> (NanoUsd, NanoUsd) {
        self.users
            .lock()
            .get(&user)
            .map_or((NanoUsd::ZERO, NanoUsd::ZERO), |entry| {
                (entry.spent, entry.reserved)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::sync::Barrier;

    fn period(month: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, month, 1, 0, 0, 0).unwrap()
    }

    fn capped(cap: i64) -> Option<(NanoUsd, LimitScope)> {
        Some((NanoUsd(cap), LimitScope::User))
    }

    const B: ReservationKind = ReservationKind::Bounded;
    const U: ReservationKind = ReservationKind::Unbounded;

    #[test]
    fn an_unbounded_request_runs_only_alone_and_keeps_others_out() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd(30))]);
        let bounded = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(3), B)
            .unwrap();
        // Something else is in flight: refused, although its estimate would fit.
        let refusal = ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), U)
            .unwrap_err();
        assert_eq!(refusal.reserved, NanoUsd(10));
        ledger.settle(bounded, NanoUsd(10));
        // Alone: admitted, holding the whole rest of the cap (100 - 40).
        let unbounded = ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), U)
            .unwrap();
        assert_eq!(unbounded.amount(), NanoUsd(60));
        // While it runs nothing else fits, bounded or not.
        assert!(ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), B)
            .is_err());
        assert!(ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), U)
            .is_err());
        // It cost far more than anything reserved: the overshoot is this one request.
        ledger.settle(unbounded, NanoUsd(500));
        assert_eq!(ledger.snapshot(user), (NanoUsd(540), NanoUsd(0)));
        // Without a cap it is tracked like any other request.
        let other = Uuid::new_v4();
        let a = ledger
            .try_reserve(other, None, NanoUsd(5), period(3), U)
            .unwrap();
        let b = ledger
            .try_reserve(other, None, NanoUsd(5), period(3), U)
            .unwrap();
        assert_eq!(ledger.snapshot(other), (NanoUsd(0), NanoUsd(10)));
        ledger.settle(a, NanoUsd(1));
        ledger.settle(b, NanoUsd(1));
    }

    #[test]
    fn concurrent_reservations_do_not_overshoot() {
        const E: i64 = 1_000_000;
        let cap = 10 * E;
        let ledger = Arc::new(SpendLedger::new());
        let user = Uuid::new_v4();
        let start = Arc::new(Barrier::new(200));
        let threads: Vec<_> = (0..200)
            .map(|_| {
                let ledger = Arc::clone(&ledger);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    match ledger.try_reserve(user, capped(cap), NanoUsd(E), period(3), B) {
                        Ok(reservation) => {
                            ledger.settle(reservation, NanoUsd(E));
                            true
                        }
                        Err(refusal) => {
                            assert_eq!(refusal.cap, NanoUsd(cap));
                            false
                        }
                    }
                })
            })
            .collect();
        let admitted = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|ok| *ok)
            .count() as i64;
        let (spent, reserved) = ledger.snapshot(user);
        assert_eq!(reserved, NanoUsd::ZERO);
        assert_eq!(spent, NanoUsd(admitted * E));
        assert!(spent <= NanoUsd(cap + E), "spent {spent:?}");
        // Real cost equals the estimate here, so not even the one-request overshoot happens.
        assert!(spent <= NanoUsd(cap), "spent {spent:?}");
        assert!(admitted >= 1);
    }

    #[test]
    fn reservations_bound_in_flight_requests() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        let held: Vec<Reservation> = (0..10)
            .map(|_| {
                ledger
                    .try_reserve(user, capped(100), NanoUsd(10), period(3), B)
                    .unwrap()
            })
            .collect();
        assert_eq!(ledger.snapshot(user), (NanoUsd(0), NanoUsd(100)));
        let refusal = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(3), B)
            .unwrap_err();
        assert_eq!(
            refusal,
            BudgetRefusal {
                cap: NanoUsd(100),
                spent: NanoUsd(0),
                reserved: NanoUsd(100),
                scope: LimitScope::User,
            }
        );
        for reservation in held {
            ledger.settle(reservation, NanoUsd(4));
        }
        assert_eq!(ledger.snapshot(user), (NanoUsd(40), NanoUsd(0)));
    }

    #[test]
    fn a_lone_request_runs_even_if_its_estimate_exceeds_what_is_left() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd(90))]);
        let big = ledger
            .try_reserve(user, capped(100), NanoUsd(500), period(3), B)
            .unwrap();
        // While it runs, nothing else gets in: its reservation already exceeds the cap.
        assert!(ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), B)
            .is_err());
        // It costs more than was left: the overshoot is this one request's cost.
        ledger.settle(big, NanoUsd(30));
        assert_eq!(ledger.snapshot(user), (NanoUsd(120), NanoUsd(0)));
        let refusal = ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), B)
            .unwrap_err();
        assert_eq!(refusal.spent, NanoUsd(120));
        assert_eq!(refusal.reserved, NanoUsd(0));
    }

    #[test]
    fn refusal_names_cap_spend_and_scope() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd(100))]);
        let refusal = ledger
            .try_reserve(
                user,
                Some((NanoUsd(100), LimitScope::Group("eng".into()))),
                NanoUsd(1),
                period(3),
                B,
            )
            .unwrap_err();
        assert_eq!(
            refusal,
            BudgetRefusal {
                cap: NanoUsd(100),
                spent: NanoUsd(100),
                reserved: NanoUsd(0),
                scope: LimitScope::Group("eng".into()),
            }
        );
        assert_eq!(
            refusal.to_string(),
            "group spend cap of 0.0000001 USD reached: 0.0000001 USD spent, 0.00 USD reserved by \
             requests in flight"
        );
        // A zero cap refuses even a zero estimate.
        assert!(ledger
            .try_reserve(Uuid::new_v4(), capped(0), NanoUsd(0), period(3), B)
            .is_err());
    }

    #[test]
    fn without_a_cap_everything_is_admitted_and_tracked() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd::MAX)]);
        let first = ledger
            .try_reserve(user, None, NanoUsd(7), period(3), B)
            .unwrap();
        let second = ledger
            .try_reserve(user, None, NanoUsd(5), period(3), B)
            .unwrap();
        assert_eq!(ledger.snapshot(user), (NanoUsd::MAX, NanoUsd(12)));
        ledger.settle(first, NanoUsd(3));
        ledger.settle(second, NanoUsd(3));
        // Saturates rather than wrapping.
        assert_eq!(ledger.snapshot(user), (NanoUsd::MAX, NanoUsd(0)));
    }

    #[test]
    fn a_new_period_resets_spend() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd(100))]);
        assert!(ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(3), B)
            .is_err());
        let april = ledger
            .try_reserve(user, capped(100), NanoUsd(1), period(4), B)
            .unwrap();
        assert_eq!(april.period_start(), period(4));
        assert_eq!(ledger.snapshot(user), (NanoUsd(0), NanoUsd(1)));
        ledger.settle(april, NanoUsd(1));
        assert_eq!(ledger.snapshot(user), (NanoUsd(1), NanoUsd(0)));
    }

    #[test]
    fn a_request_spanning_the_roll_over_is_charged_to_the_new_period() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        ledger.hydrate(period(3), [(user, NanoUsd(50))]);
        let march = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(3), B)
            .unwrap();
        // April begins while the March request is still running; its reservation still counts.
        let april = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(4), B)
            .unwrap();
        assert_eq!(ledger.snapshot(user), (NanoUsd(0), NanoUsd(20)));
        ledger.settle(march, NanoUsd(8));
        ledger.settle(april, NanoUsd(2));
        assert_eq!(ledger.snapshot(user), (NanoUsd(10), NanoUsd(0)));
    }

    #[test]
    fn a_caller_with_a_lagging_clock_cannot_move_a_user_back() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        let april = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(4), B)
            .unwrap();
        ledger.settle(april, NanoUsd(10));
        let late = ledger
            .try_reserve(user, capped(100), NanoUsd(10), period(3), B)
            .unwrap();
        assert_eq!(late.period_start(), period(4));
        ledger.settle(late, NanoUsd(10));
        assert_eq!(ledger.snapshot(user), (NanoUsd(20), NanoUsd(0)));
    }

    #[test]
    fn hydrate_replaces_spend_but_keeps_reservations() {
        let ledger = SpendLedger::new();
        let (busy, idle, loaded) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        ledger.hydrate(period(3), [(busy, NanoUsd(5)), (idle, NanoUsd(6))]);
        let in_flight = ledger
            .try_reserve(busy, capped(100), NanoUsd(10), period(3), B)
            .unwrap();
        ledger.hydrate(period(4), [(loaded, NanoUsd(7))]);
        assert_eq!(ledger.snapshot(busy), (NanoUsd(0), NanoUsd(10)));
        assert_eq!(ledger.snapshot(idle), (NanoUsd(0), NanoUsd(0)));
        assert_eq!(ledger.snapshot(loaded), (NanoUsd(7), NanoUsd(0)));
        assert_eq!(ledger.users.lock().len(), 2, "idle user's entry dropped");
        ledger.settle(in_flight, NanoUsd(3));
        assert_eq!(ledger.snapshot(busy), (NanoUsd(3), NanoUsd(0)));
        // A stale load for an older period does not overwrite newer spend.
        ledger.hydrate(period(3), [(loaded, NanoUsd(99))]);
        assert_eq!(ledger.snapshot(loaded), (NanoUsd(7), NanoUsd(0)));
    }

    #[test]
    fn dropping_an_unsettled_reservation_releases_it() {
        let ledger = SpendLedger::new();
        let user = Uuid::new_v4();
        let reservation = ledger
            .try_reserve(user, capped(100), NanoUsd(60), period(3), B)
            .unwrap();
        assert_eq!(reservation.user(), user);
        assert_eq!(reservation.amount(), NanoUsd(60));
        drop(reservation);
        assert_eq!(ledger.snapshot(user), (NanoUsd(0), NanoUsd(0)));
        // Two fit again, which they would not if the dropped one still held its 60.
        let a = ledger
            .try_reserve(user, capped(100), NanoUsd(50), period(3), B)
            .unwrap();
        let b = ledger
            .try_reserve(user, capped(100), NanoUsd(50), period(3), B)
            .unwrap();
        ledger.settle(a, NanoUsd(1));
        ledger.settle(b, NanoUsd(1));
        assert_eq!(ledger.snapshot(user), (NanoUsd(2), NanoUsd(0)));
    }
}
