//! Money: an exact, integer amount of US dollars in nano-USD (10⁻⁹ USD).
//!
//! Every amount Tollgate stores, sums or compares (prices, costs, spend, caps) is a [`NanoUsd`].
//! Amounts enter and leave the program as decimal strings ("100.00", "0.004125"), parsed and
//! printed here digit by digit, so no amount ever passes through a binary float and rounds.
//!
//! [`ModelPrice`] (a model's prices per million tokens) lives here too, as a plain value.
//!
//! Not here: what a token costs (`governance::pricing`), or budgets and their periods
//! (`governance`). This module knows nothing about tokens or users.

use std::fmt;
use std::str::FromStr;

/// An amount of money in nano-USD: `NanoUsd(1_000_000_000)` is one dollar.
///
/// `i64` holds about ±9.2 billion dollars, far beyond any budget, so arithmetic that could still
/// overflow (costs of absurd token counts) saturates instead of wrapping.
/// Serialises as the bare integer; [`fmt::Display`] gives the decimal dollar string.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct NanoUsd(pub i64);

/// Nano-USD in one dollar.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Decimal places a [`NanoUsd`] can represent.
const MAX_FRACTION_DIGITS: usize = 9;

/// Why a decimal dollar string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("empty amount: expected a decimal USD amount such as \"12.50\"")]
    Empty,
    #[error(
        "`{0}` is not a decimal USD amount: expected digits with an optional '-' sign and an \
         optional '.' followed by digits, such as \"12.50\" (no exponents, separators or symbols)"
    )]
    Malformed(String),
    #[error(
        "`{0}` has more than 9 decimal places: the smallest representable amount is 0.000000001 USD"
    )]
    TooPrecise(String),
    #[error("`{0}` is out of range: amounts must lie within ±9223372036.854775807 USD")]
    OutOfRange(String),
    #[error("`{0}` is negative: expected an amount of zero or more")]
    Negative(String),
}

impl NanoUsd {
    pub const ZERO: NanoUsd = NanoUsd(0);
    pub const MAX: NanoUsd = NanoUsd(i64::MAX);

    /// Parses a decimal dollar amount exactly: `"100.00"`, `"0.30"`, `"3"`, `"0.000000001"`,
    /// `"-1.5"`. Surrounding whitespace is ignored. Digits beyond the ninth decimal place are
    /// accepted only if they are all zeros, because anything else would have to be rounded.
    pub fn parse_usd(text: &str) -> Result<NanoUsd, MoneyError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(MoneyError::Empty);
        }
        let malformed = || MoneyError::Malformed(trimmed.to_owned());
        let (negative, unsigned) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let (whole_digits, fraction_digits) = match unsigned.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (unsigned, ""),
        };
        // Both ".5" and "5." are refused: config values are written by people, and a lone dot
        // is more often a typo than a deliberate amount.
        let has_dot = unsigned.contains('.');
        if !is_ascii_digits(whole_digits) || (has_dot && !is_ascii_digits(fraction_digits)) {
            return Err(malformed());
        }

        let (kept_fraction, dropped_fraction) =
            fraction_digits.split_at(fraction_digits.len().min(MAX_FRACTION_DIGITS));
        if dropped_fraction.bytes().any(|digit| digit != b'0') {
            return Err(MoneyError::TooPrecise(trimmed.to_owned()));
        }

        let out_of_range = || MoneyError::OutOfRange(trimmed.to_owned());
        // Accumulate in i128 so that i64::MIN (whose magnitude exceeds i64::MAX) still parses.
        let mut magnitude: i128 = 0;
        for digit in whole_digits.bytes() {
            magnitude = magnitude
                .checked_mul(10)
                .and_then(|value| value.checked_add(i128::from(digit - b'0')))
                .filter(|value| *value <= i128::from(i64::MAX) + 1)
                .ok_or_else(out_of_range)?;
        }
        let mut nanos_in_fraction: i128 = 0;
        for position in 0..MAX_FRACTION_DIGITS {
            let digit = kept_fraction
                .as_bytes()
                .get(position)
                .map_or(0, |d| d - b'0');
            nanos_in_fraction = nanos_in_fraction * 10 + i128::from(digit);
        }
        let total = magnitude
            .checked_mul(i128::from(NANOS_PER_USD))
            .and_then(|whole_nanos| whole_nanos.checked_add(nanos_in_fraction))
            .ok_or_else(out_of_range)?;
        let signed = if negative { -total } else { total };
        i64::try_from(signed)
            .map(NanoUsd)
            .map_err(|_| out_of_range())
    }

    /// [`NanoUsd::parse_usd`] for amounts that cannot be negative: prices, caps, budgets.
    pub fn parse_non_negative_usd(text: &str) -> Result<NanoUsd, MoneyError> {
        let amount = NanoUsd::parse_usd(text)?;
        if amount.is_negative() {
            return Err(MoneyError::Negative(text.trim().to_owned()));
        }
        Ok(amount)
    }

    /// The exact decimal dollar string: trailing zeros trimmed, but always at least two decimals
    /// (`"100.00"`, `"0.004125"`, `"0.000000001"`, `"-1.50"`). Parses back to the same amount.
    pub fn to_usd_string(self) -> String {
        let magnitude = self.0.unsigned_abs();
        let nanos_per_usd = NANOS_PER_USD.unsigned_abs();
        let whole = magnitude / nanos_per_usd;
        let fraction = format!("{:09}", magnitude % nanos_per_usd);
        let significant = fraction.trim_end_matches('0');
        let shown = if significant.len() < 2 {
            &fraction[..2]
        } else {
            significant
        };
        let sign = if self.0 < 0 { "-" } else { "" };
        format!("{sign}{whole}.{shown}")
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn checked_add(self, other: NanoUsd) -> Option<NanoUsd> {
        self.0.checked_add(other.0).map(NanoUsd)
    }

    pub fn checked_sub(self, other: NanoUsd) -> Option<NanoUsd> {
        self.0.checked_sub(other.0).map(NanoUsd)
    }

    /// Adds, sticking at the bounds: a spend total that would overflow is "more than any cap",
    /// which is the safe reading for a budget check.
    pub fn saturating_add(self, other: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: NanoUsd) -> NanoUsd {
        NanoUsd(self.0.saturating_sub(other.0))
    }
}

fn is_ascii_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit())
}

impl fmt::Display for NanoUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_usd_string())
    }
}

impl FromStr for NanoUsd {
    type Err = MoneyError;

    fn from_str(text: &str) -> Result<NanoUsd, MoneyError> {
        NanoUsd::parse_usd(text)
    }
}

/// A model's prices, each in nano-USD per million tokens: a value the price book, the
/// configuration and the store all carry (what a token costs is decided in `governance::pricing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelPrice {
    /// Non-cached input tokens.
    pub input: NanoUsd,
    /// Output tokens, reasoning included.
    pub output: NanoUsd,
    /// Input tokens served from the provider's prompt cache.
    pub cache_read: NanoUsd,
    /// Input tokens written to the provider's prompt cache.
    pub cache_write: NanoUsd,
    /// The model's maximum output tokens, when known: the output side of an estimate for a
    /// request that sets no `max_tokens`.
    pub output_limit: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn usd(text: &str) -> NanoUsd {
        NanoUsd::parse_usd(text).unwrap()
    }

    #[test]
    fn parses_exact_decimal_amounts() {
        assert_eq!(usd("100.00"), NanoUsd(100_000_000_000));
        assert_eq!(usd("0.30"), NanoUsd(300_000_000));
        assert_eq!(usd("3"), NanoUsd(3_000_000_000));
        assert_eq!(usd("0.000000001"), NanoUsd(1));
        assert_eq!(usd("0.004125"), NanoUsd(4_125_000));
        assert_eq!(usd("0.125"), NanoUsd(125_000_000));
        assert_eq!(usd("-1.5"), NanoUsd(-1_500_000_000));
        assert_eq!(usd("-0"), NanoUsd::ZERO);
        assert_eq!(usd("007.10"), NanoUsd(7_100_000_000));
        assert_eq!(usd("  2.5\n"), NanoUsd(2_500_000_000));
    }

    #[test]
    fn accepts_extra_decimals_only_when_they_are_zero() {
        assert_eq!(usd("1.1000000000000"), NanoUsd(1_100_000_000));
        assert_eq!(usd("0.0000000010"), NanoUsd(1));
        assert_eq!(
            NanoUsd::parse_usd("0.0000000001"),
            Err(MoneyError::TooPrecise("0.0000000001".into()))
        );
        assert_eq!(
            NanoUsd::parse_usd("1.0000000015"),
            Err(MoneyError::TooPrecise("1.0000000015".into()))
        );
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(NanoUsd::parse_usd(""), Err(MoneyError::Empty));
        assert_eq!(NanoUsd::parse_usd("   "), Err(MoneyError::Empty));
        for garbage in [
            "1e3", "1E-2", "abc", "$5", "5 USD", "1,000.00", "1_000", "+1", "--1", "-", ".", ".5",
            "5.", "1.2.3", "0x10", "١", "1. 5", "NaN", "inf", "- 1",
        ] {
            assert_eq!(
                NanoUsd::parse_usd(garbage),
                Err(MoneyError::Malformed(garbage.trim().to_owned())),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn refuses_amounts_beyond_i64() {
        assert_eq!(usd("9223372036.854775807"), NanoUsd::MAX);
        assert_eq!(usd("-9223372036.854775808"), NanoUsd(i64::MIN));
        for too_big in [
            "9223372036.854775808",
            "-9223372036.854775809",
            "9223372037",
            "99999999999999999999999999999999999999999999999999",
        ] {
            assert_eq!(
                NanoUsd::parse_usd(too_big),
                Err(MoneyError::OutOfRange(too_big.to_owned())),
                "{too_big}"
            );
        }
    }

    #[test]
    fn long_leading_zeros_do_not_overflow() {
        assert_eq!(
            usd("000000000000000000000000000000000000000001.5"),
            usd("1.5")
        );
    }

    #[test]
    fn non_negative_parse_refuses_negatives() {
        assert_eq!(
            NanoUsd::parse_non_negative_usd("-0.01"),
            Err(MoneyError::Negative("-0.01".into()))
        );
        assert_eq!(NanoUsd::parse_non_negative_usd("-0"), Ok(NanoUsd::ZERO));
        assert_eq!(
            NanoUsd::parse_non_negative_usd("0.01"),
            Ok(NanoUsd(10_000_000))
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let message = NanoUsd::parse_usd("1e3").unwrap_err().to_string();
        assert!(
            message.contains("`1e3`") && message.contains("no exponents"),
            "{message}"
        );
        let message = NanoUsd::parse_usd("0.0000000001").unwrap_err().to_string();
        assert!(message.contains("9 decimal places"), "{message}");
    }

    #[test]
    fn prints_at_least_two_decimals_and_no_trailing_zeros() {
        assert_eq!(NanoUsd(100_000_000_000).to_usd_string(), "100.00");
        assert_eq!(NanoUsd(4_125_000).to_usd_string(), "0.004125");
        assert_eq!(NanoUsd(1).to_usd_string(), "0.000000001");
        assert_eq!(NanoUsd(300_000_000).to_usd_string(), "0.30");
        assert_eq!(NanoUsd(0).to_usd_string(), "0.00");
        assert_eq!(NanoUsd(-1_500_000_000).to_usd_string(), "-1.50");
        assert_eq!(NanoUsd(-1).to_usd_string(), "-0.000000001");
        assert_eq!(NanoUsd::MAX.to_usd_string(), "9223372036.854775807");
        assert_eq!(NanoUsd(i64::MIN).to_usd_string(), "-9223372036.854775808");
        assert_eq!(NanoUsd(2_805_000).to_string(), "0.002805");
        assert_eq!("12.5".parse::<NanoUsd>(), Ok(NanoUsd(12_500_000_000)));
    }

    #[test]
    fn serialises_as_the_bare_integer() {
        assert_eq!(serde_json::to_string(&NanoUsd(42)).unwrap(), "42");
        assert_eq!(serde_json::from_str::<NanoUsd>("-7").unwrap(), NanoUsd(-7));
    }

    #[test]
    fn arithmetic_checks_and_saturates() {
        assert_eq!(NanoUsd(1).checked_add(NanoUsd(2)), Some(NanoUsd(3)));
        assert_eq!(NanoUsd::MAX.checked_add(NanoUsd(1)), None);
        assert_eq!(NanoUsd(i64::MIN).checked_sub(NanoUsd(1)), None);
        assert_eq!(NanoUsd(5).checked_sub(NanoUsd(7)), Some(NanoUsd(-2)));
        assert_eq!(NanoUsd::MAX.saturating_add(NanoUsd(1)), NanoUsd::MAX);
        assert_eq!(
            NanoUsd(i64::MIN).saturating_sub(NanoUsd(1)),
            NanoUsd(i64::MIN)
        );
        assert_eq!(NanoUsd(5).saturating_sub(NanoUsd(7)), NanoUsd(-2));
        assert!(NanoUsd(-1).is_negative() && !NanoUsd::ZERO.is_negative());
    }

    proptest! {
        #[test]
        fn every_amount_round_trips_through_its_string(nanos in any::<i64>()) {
            let amount = NanoUsd(nanos);
            prop_assert_eq!(NanoUsd::parse_usd(&amount.to_usd_string()), Ok(amount));
        }

        #[test]
        fn parsing_matches_integer_arithmetic(whole in 0i64..9_000_000_000, fraction in 0i64..NANOS_PER_USD) {
            let text = format!("{whole}.{fraction:09}");
            prop_assert_eq!(NanoUsd::parse_usd(&text), Ok(NanoUsd(whole * NANOS_PER_USD + fraction)));
        }
    }
}
