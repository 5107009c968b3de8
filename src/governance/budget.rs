//! Budgets: which spend cap applies to a user, and which UTC calendar period spend is summed over.
//!
//! Pure functions only. Time comes in as an argument (`now`), never from the system clock, so
//! period boundaries and cap resolution are testable to the millisecond.
//!
//! Not here: tracking spend or reserving money for in-flight requests (`governance::ledger`),
//! loading limits or spend from the database (`store`), or refusing requests (`gateway`).

use std::collections::HashMap;

use chrono::{DateTime, Datelike, Days, Months, NaiveDate, NaiveTime, Utc};
use uuid::Uuid;

use crate::config::{BudgetPeriod, GroupPolicy};
use crate::money::NanoUsd;

/// The UTC calendar period containing `now`, as `[start, end)`.
///
/// Day: midnight to the next midnight. Week: ISO week, Monday 00:00 to the next Monday 00:00.
/// Month: the 1st 00:00 to the 1st of the next month 00:00. `end` is exclusive: at exactly
/// `end` the next period has begun.
pub fn period_bounds(period: BudgetPeriod, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let today = now.date_naive();
    // The checked date arithmetic below can only fail within days of chrono's representable
    // range (year ±262 143); there the period is clamped to that range instead of panicking.
    let (start, end) = match period {
        BudgetPeriod::Day => (Some(today), today.succ_opt()),
        BudgetPeriod::Week => {
            let since_monday = u64::from(today.weekday().num_days_from_monday());
            let monday = today.checked_sub_days(Days::new(since_monday));
            (
                monday,
                monday.and_then(|m| m.checked_add_days(Days::new(7))),
            )
        }
        BudgetPeriod::Month => {
            // Day 1 exists in every month, so `with_day(1)` cannot actually fail.
            let first = today.with_day(1);
            (
                first,
                first.and_then(|f| f.checked_add_months(Months::new(1))),
            )
        }
    };
    (
        start.map_or(DateTime::<Utc>::MIN_UTC, midnight),
        end.map_or(DateTime::<Utc>::MAX_UTC, midnight),
    )
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    date.and_time(NaiveTime::MIN).and_utc()
}

/// Which configured limit produced a user's cap; a 402 names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitScope {
    /// The user's own override.
    User,
    /// A group's limit; carries the group's name.
    Group(String),
    /// `budgets.default_limit_usd`.
    Default,
}

impl LimitScope {
    /// The scope's wire name: `"user"`, `"group"` or `"default"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            LimitScope::User => "user",
            LimitScope::Group(_) => "group",
            LimitScope::Default => "default",
        }
    }
}

/// Every configured spend limit, as loaded from config and the store.
#[derive(Debug, Clone)]
pub struct BudgetLimits {
    /// `budgets.default_limit_usd`; `None` means users without another limit are uncapped.
    pub default: Option<NanoUsd>,
    /// Group id → (group name, limit). Groups without a limit are simply absent.
    pub groups: HashMap<Uuid, (String, NanoUsd)>,
    /// User id → the user's own override.
    pub users: HashMap<Uuid, NanoUsd>,
    /// How to choose among several groups' limits.
    pub policy: GroupPolicy,
}

/// The cap that applies to `user_id`, and where it came from; `None` means no cap.
///
/// Precedence: the user's override; else, among `group_ids` that have a limit, the highest or
/// lowest per `limits.policy`; else the default; else no cap. Group ids without a limit are
/// ignored rather than meaning "unlimited", so joining an unconfigured group never lifts a cap.
pub fn resolve_cap(
    limits: &BudgetLimits,
    user_id: Uuid,
    group_ids: &[Uuid],
) -> Option<(NanoUsd, LimitScope)> {
    if let Some(cap) = limits.users.get(&user_id) {
        return Some((*cap, LimitScope::User));
    }
    let mut winner: Option<(&str, NanoUsd)> = None;
    for (name, cap) in group_ids.iter().filter_map(|id| limits.groups.get(id)) {
        let better = match winner {
            None => true,
            // Equal caps are broken by group name so the named scope does not depend on the
            // order the store happened to return the user's groups in.
            Some((best_name, best_cap)) => match limits.policy {
                GroupPolicy::Highest => {
                    (*cap, std::cmp::Reverse(name.as_str()))
                        > (best_cap, std::cmp::Reverse(best_name))
                }
                GroupPolicy::Lowest => (*cap, name.as_str()) < (best_cap, best_name),
            },
        };
        if better {
            winner = Some((name.as_str(), *cap));
        }
    }
    if let Some((name, cap)) = winner {
        return Some((cap, LimitScope::Group(name.to_owned())));
    }
    limits.default.map(|cap| (cap, LimitScope::Default))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{NaiveDateTime, TimeZone};

    fn at(text: &str) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap()
            .and_utc()
    }

    fn day(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    #[test]
    fn day_runs_midnight_to_midnight() {
        let last_ms = at("2025-03-14 23:59:59.999");
        assert_eq!(
            period_bounds(BudgetPeriod::Day, last_ms),
            (day(2025, 3, 14), day(2025, 3, 15))
        );
        let next = at("2025-03-15 00:00:00.000");
        assert_eq!(
            period_bounds(BudgetPeriod::Day, next),
            (day(2025, 3, 15), day(2025, 3, 16))
        );
    }

    #[test]
    fn day_crosses_the_year() {
        assert_eq!(
            period_bounds(BudgetPeriod::Day, at("2024-12-31 23:59:59.999")),
            (day(2024, 12, 31), day(2025, 1, 1))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Day, at("2025-01-01 00:00:00")),
            (day(2025, 1, 1), day(2025, 1, 2))
        );
    }

    #[test]
    fn week_runs_monday_to_monday() {
        // 2025-03-16 is a Sunday, 2025-03-17 a Monday.
        let sunday_last_ms = at("2025-03-16 23:59:59.999");
        assert_eq!(
            period_bounds(BudgetPeriod::Week, sunday_last_ms),
            (day(2025, 3, 10), day(2025, 3, 17))
        );
        let monday = at("2025-03-17 00:00:00");
        assert_eq!(
            period_bounds(BudgetPeriod::Week, monday),
            (day(2025, 3, 17), day(2025, 3, 24))
        );
        // Mid-week, mid-day.
        assert_eq!(
            period_bounds(BudgetPeriod::Week, at("2025-03-19 13:45:00")),
            (day(2025, 3, 17), day(2025, 3, 24))
        );
    }

    #[test]
    fn week_spans_the_new_year() {
        // 2024-12-30 is a Monday; ISO week 1 of 2025 runs 2024-12-30 .. 2025-01-06.
        let expected = (day(2024, 12, 30), day(2025, 1, 6));
        assert_eq!(
            period_bounds(BudgetPeriod::Week, at("2024-12-31 23:59:59.999")),
            expected
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Week, at("2025-01-01 00:00:00")),
            expected
        );
    }

    #[test]
    fn month_runs_first_to_first() {
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at("2025-03-31 23:59:59.999")),
            (day(2025, 3, 1), day(2025, 4, 1))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at("2025-04-01 00:00:00")),
            (day(2025, 4, 1), day(2025, 5, 1))
        );
    }

    #[test]
    fn month_crosses_the_year() {
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at("2024-12-31 23:59:59.999")),
            (day(2024, 12, 1), day(2025, 1, 1))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at("2025-01-01 00:00:00")),
            (day(2025, 1, 1), day(2025, 2, 1))
        );
    }

    #[test]
    fn february_in_a_leap_year_has_29_days() {
        let leap_day = at("2024-02-29 23:59:59.999");
        assert_eq!(
            period_bounds(BudgetPeriod::Month, leap_day),
            (day(2024, 2, 1), day(2024, 3, 1))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Day, leap_day),
            (day(2024, 2, 29), day(2024, 3, 1))
        );
        assert_eq!(
            period_bounds(BudgetPeriod::Month, at("2025-02-28 12:00:00")),
            (day(2025, 2, 1), day(2025, 3, 1))
        );
    }

    #[test]
    fn extremes_clamp_instead_of_panicking() {
        let (start, end) = period_bounds(BudgetPeriod::Month, DateTime::<Utc>::MAX_UTC);
        assert!(start <= DateTime::<Utc>::MAX_UTC);
        assert_eq!(end, DateTime::<Utc>::MAX_UTC);
        let (start, _) = period_bounds(BudgetPeriod::Week, DateTime::<Utc>::MIN_UTC);
        assert!(start <= DateTime::<Utc>::MIN_UTC + chrono::Duration::days(7));
    }

    fn usd(text: &str) -> NanoUsd {
        NanoUsd::parse_usd(text).unwrap()
    }

    struct Fixture {
        limits: BudgetLimits,
        user: Uuid,
        eng: Uuid,
        ops: Uuid,
        interns: Uuid,
        unlimited: Uuid,
    }

    fn fixture(policy: GroupPolicy) -> Fixture {
        let (eng, ops, interns, unlimited) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        let groups = HashMap::from([
            (eng, ("eng".to_owned(), usd("200"))),
            (ops, ("ops".to_owned(), usd("50"))),
            (interns, ("interns".to_owned(), usd("10"))),
        ]);
        Fixture {
            limits: BudgetLimits {
                default: Some(usd("100")),
                groups,
                users: HashMap::new(),
                policy,
            },
            user: Uuid::new_v4(),
            eng,
            ops,
            interns,
            unlimited,
        }
    }

    #[test]
    fn several_groups_resolve_by_policy() {
        let f = fixture(GroupPolicy::Highest);
        let groups = [f.ops, f.eng, f.interns];
        assert_eq!(
            resolve_cap(&f.limits, f.user, &groups),
            Some((usd("200"), LimitScope::Group("eng".into())))
        );
        let f = Fixture {
            limits: BudgetLimits {
                policy: GroupPolicy::Lowest,
                ..f.limits
            },
            ..f
        };
        assert_eq!(
            resolve_cap(&f.limits, f.user, &groups),
            Some((usd("10"), LimitScope::Group("interns".into())))
        );
    }

    #[test]
    fn groups_without_limits_are_ignored() {
        for policy in [GroupPolicy::Highest, GroupPolicy::Lowest] {
            let f = fixture(policy);
            assert_eq!(
                resolve_cap(&f.limits, f.user, &[f.unlimited, f.ops]),
                Some((usd("50"), LimitScope::Group("ops".into())))
            );
            // Only unlimited groups: falls through to the default.
            assert_eq!(
                resolve_cap(&f.limits, f.user, &[f.unlimited]),
                Some((usd("100"), LimitScope::Default))
            );
        }
    }

    #[test]
    fn user_override_wins_even_when_lower() {
        let mut f = fixture(GroupPolicy::Highest);
        f.limits.users.insert(f.user, usd("5"));
        assert_eq!(
            resolve_cap(&f.limits, f.user, &[f.eng, f.ops]),
            Some((usd("5"), LimitScope::User))
        );
        // A zero override is a cap of zero, not "unlimited".
        f.limits.users.insert(f.user, NanoUsd::ZERO);
        assert_eq!(
            resolve_cap(&f.limits, f.user, &[f.eng]),
            Some((NanoUsd::ZERO, LimitScope::User))
        );
    }

    #[test]
    fn default_then_no_cap() {
        let mut f = fixture(GroupPolicy::Lowest);
        assert_eq!(
            resolve_cap(&f.limits, f.user, &[]),
            Some((usd("100"), LimitScope::Default))
        );
        f.limits.default = None;
        assert_eq!(resolve_cap(&f.limits, f.user, &[]), None);
        assert_eq!(resolve_cap(&f.limits, f.user, &[f.unlimited]), None);
    }

    #[test]
    fn equal_group_caps_pick_the_same_group_whatever_the_order() {
        for policy in [GroupPolicy::Highest, GroupPolicy::Lowest] {
            let mut f = fixture(policy);
            f.limits.groups.insert(f.ops, ("alpha".into(), usd("200")));
            f.limits.groups.insert(f.eng, ("beta".into(), usd("200")));
            f.limits.groups.remove(&f.interns);
            let forward = resolve_cap(&f.limits, f.user, &[f.ops, f.eng]);
            let backward = resolve_cap(&f.limits, f.user, &[f.eng, f.ops]);
            assert_eq!(forward, backward);
            assert_eq!(
                forward,
                Some((usd("200"), LimitScope::Group("alpha".into())))
            );
        }
    }

    #[test]
    fn scope_names() {
        assert_eq!(LimitScope::User.as_str(), "user");
        assert_eq!(LimitScope::Group("eng".into()).as_str(), "group");
        assert_eq!(LimitScope::Default.as_str(), "default");
    }
}
