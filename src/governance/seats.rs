//! Seats: how the number of users holding an AI seat compares with the licensed limit, and the
//! message `GET /api/v2/seats` shows for it.
//!
//! Integer arithmetic only, so the percentages are exact floors and the messages are stable.
//!
//! Not here: who holds a seat (a user's first interception onwards; counted by `store`), or the
//! HTTP response around this status (`api`).

use serde::Serialize;

/// Percent of the limit from which a warning is shown.
const WARNING_PERCENT: u64 = 90;

/// Where seat use stands against the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeatState {
    /// Below 90 % of the limit, or no limit.
    Ok,
    /// At least 90 % of the limit, but not above it.
    Warning,
    /// More seats in use than the limit.
    Over,
}

impl SeatState {
    /// The wire name: `"ok"`, `"warning"` or `"over"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SeatState::Ok => "ok",
            SeatState::Warning => "warning",
            SeatState::Over => "over",
        }
    }
}

/// Seat use against the limit, as `GET /api/v2/seats` reports it (without the holders).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeatStatus {
    /// Licensed seats; `None` means unlimited.
    pub limit: Option<u32>,
    /// Users holding a seat.
    pub actual: u32,
    /// ⌊actual × 100 / limit⌋; `None` when unlimited (or when a limit of 0 is exceeded, which
    /// has no finite percentage).
    pub percent: Option<u32>,
    pub state: SeatState,
    /// What to tell the operator; `None` when all is well.
    pub message: Option<String>,
}

/// Compares `actual` seat holders with `limit`.
///
/// Warning at 90 % or more while within the limit ("You have used N% of your AI seats."), over
/// above it ("Your organization is using A / L AI seats (X% over the limit)." with
/// X = ⌊(A − L) × 100 / L⌋). A limit of 0 (which config refuses, but the API might store) counts
/// as fully used when no one holds a seat, and as over, without a percentage, when anyone does.
pub fn seat_status(limit: Option<u32>, actual: u32) -> SeatStatus {
    let Some(limit) = limit else {
        return SeatStatus {
            limit: None,
            actual,
            percent: None,
            state: SeatState::Ok,
            message: None,
        };
    };
    // u64 holds u32::MAX × 100 exactly; the result can exceed u32 only for absurd overuse of a
    // tiny limit, where saturating is the honest answer.
    let (actual_wide, limit_wide) = (u64::from(actual), u64::from(limit));
    let percent_of = |amount: u64| {
        (amount * 100)
            .checked_div(limit_wide)
            .map(|percent| u32::try_from(percent).unwrap_or(u32::MAX))
    };
    let percent = if limit == 0 && actual == 0 {
        Some(100)
    } else {
        percent_of(actual_wide)
    };

    let (state, message) = if actual > limit {
        let message = match percent_of(actual_wide - limit_wide) {
            Some(over) => format!(
                "Your organization is using {actual} / {limit} AI seats ({over}% over the limit)."
            ),
            None => format!("Your organization is using {actual} / {limit} AI seats."),
        };
        (SeatState::Over, Some(message))
    } else {
        match percent {
            Some(used) if u64::from(used) >= WARNING_PERCENT => (
                SeatState::Warning,
                Some(format!("You have used {used}% of your AI seats.")),
            ),
            _ => (SeatState::Ok, None),
        }
    };

    SeatStatus {
        limit: Some(limit),
        actual,
        percent,
        state,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_ninety_percent_is_ok() {
        let status = seat_status(Some(100), 89);
        assert_eq!(
            status,
            SeatStatus {
                limit: Some(100),
                actual: 89,
                percent: Some(89),
                state: SeatState::Ok,
                message: None,
            }
        );
    }

    #[test]
    fn ninety_percent_warns() {
        let status = seat_status(Some(100), 90);
        assert_eq!(status.percent, Some(90));
        assert_eq!(status.state, SeatState::Warning);
        assert_eq!(
            status.message.as_deref(),
            Some("You have used 90% of your AI seats.")
        );
    }

    #[test]
    fn exactly_at_the_limit_still_warns() {
        let status = seat_status(Some(100), 100);
        assert_eq!(status.percent, Some(100));
        assert_eq!(status.state, SeatState::Warning);
        assert_eq!(
            status.message.as_deref(),
            Some("You have used 100% of your AI seats.")
        );
    }

    #[test]
    fn above_the_limit_is_over() {
        let status = seat_status(Some(100), 101);
        assert_eq!(status.percent, Some(101));
        assert_eq!(status.state, SeatState::Over);
        assert_eq!(
            status.message.as_deref(),
            Some("Your organization is using 101 / 100 AI seats (1% over the limit).")
        );
    }

    #[test]
    fn non_round_limits_floor() {
        let status = seat_status(Some(50), 44);
        assert_eq!((status.percent, status.state), (Some(88), SeatState::Ok));
        let status = seat_status(Some(50), 45);
        assert_eq!(status.percent, Some(90));
        assert_eq!(status.state, SeatState::Warning);
        assert_eq!(
            status.message.as_deref(),
            Some("You have used 90% of your AI seats.")
        );
        let status = seat_status(Some(50), 51);
        assert_eq!(status.percent, Some(102));
        assert_eq!(status.state, SeatState::Over);
        assert_eq!(
            status.message.as_deref(),
            Some("Your organization is using 51 / 50 AI seats (2% over the limit).")
        );
        // 8 of 9 is 88.9 %: floored, not rounded up into a warning.
        let status = seat_status(Some(9), 8);
        assert_eq!((status.percent, status.state), (Some(88), SeatState::Ok));
        // 4 over 3 is 33.3 % over.
        let status = seat_status(Some(3), 4);
        assert_eq!(
            status.message.as_deref(),
            Some("Your organization is using 4 / 3 AI seats (33% over the limit).")
        );
    }

    #[test]
    fn unlimited_is_always_ok() {
        for actual in [0, 1, u32::MAX] {
            assert_eq!(
                seat_status(None, actual),
                SeatStatus {
                    limit: None,
                    actual,
                    percent: None,
                    state: SeatState::Ok,
                    message: None,
                }
            );
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let status = seat_status(Some(1), u32::MAX);
        assert_eq!(status.percent, Some(u32::MAX));
        assert_eq!(status.state, SeatState::Over);
        let status = seat_status(Some(u32::MAX), u32::MAX);
        assert_eq!(
            (status.percent, status.state),
            (Some(100), SeatState::Warning)
        );
    }

    #[test]
    fn a_zero_limit_is_full_or_over() {
        let status = seat_status(Some(0), 0);
        assert_eq!(
            (status.percent, status.state),
            (Some(100), SeatState::Warning)
        );
        let status = seat_status(Some(0), 3);
        assert_eq!((status.percent, status.state), (None, SeatState::Over));
        assert_eq!(
            status.message.as_deref(),
            Some("Your organization is using 3 / 0 AI seats.")
        );
    }

    #[test]
    fn serialises_with_lowercase_state() {
        let json = serde_json::to_value(seat_status(Some(100), 95)).unwrap();
        assert_eq!(json["state"], "warning");
        assert_eq!(json["percent"], 95);
        assert_eq!(SeatState::Over.as_str(), "over");
    }
}
