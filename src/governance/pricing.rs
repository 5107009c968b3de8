//! Pricing: what a model's tokens cost, and the cost of one interception's usage.
//!
//! A [`PriceBook`] maps model ids to [`ModelPrice`]s (nano-USD per million tokens). It starts from
//! the shipped book (`config/prices.toml`, generated from models.dev by `scripts/gen_prices.py`)
//! and operators override entries with [`PriceBook::insert`]. [`cost`] turns a [`TokenUsage`] into
//! money and [`CostBound`] gives the most a request can cost, which is reserved before it runs.
//! Everything is integer arithmetic: no float ever touches a price or a cost.
//!
//! Not here: budgets, caps, reservations or the spend ledger (the rest of `governance`), reading
//! usage out of provider responses (`providers`), or storing prices (`store`).

use std::collections::BTreeMap;

use serde::Deserialize;

pub use crate::money::ModelPrice;
use crate::money::{MoneyError, NanoUsd};
use crate::providers::TokenUsage;

/// Token counts are priced per this many tokens.
const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// One entry of [`PriceBook::iter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedPrice<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub price: &'a ModelPrice,
}

/// Why a price file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("price file is not valid TOML for a price book: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("price of model `{model}`, field `{field}`: {source}")]
    Amount {
        model: String,
        field: &'static str,
        source: MoneyError,
    },
    #[error("model `{0}` is listed more than once in the price file")]
    DuplicateModel(String),
    #[error("a [[model]] entry has an empty `{0}`")]
    EmptyField(&'static str),
}

/// Model id → price, with the provider each model was listed under (for listing only: lookups
/// ignore it, because a model id means the same model whichever provider entry serves it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceBook {
    models: BTreeMap<String, ProviderPrice>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProviderPrice {
    provider: String,
    price: ModelPrice,
}

/// The on-disk shape of a price file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default)]
    model: Vec<PriceFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFileEntry {
    provider: String,
    id: String,
    input: String,
    output: String,
    cache_read: Option<String>,
    cache_write: Option<String>,
    output_limit: Option<u64>,
}

const SHIPPED_PRICES: &str = include_str!("../../config/prices.toml");

impl PriceBook {
    /// Reads a price file: `[[model]]` tables with `provider`, `id`, `input`, `output` and
    /// optional `cache_read`, `cache_write` (decimal USD strings per million tokens) and
    /// `output_limit` (integer). A missing cache price means the source publishes no cache
    /// discount, so cached tokens are charged at the `input` price rather than for free.
    pub fn from_toml_str(text: &str) -> Result<PriceBook, PricingError> {
        let file: PriceFile = toml::from_str(text)?;
        let mut book = PriceBook::default();
        for entry in file.model {
            if entry.provider.trim().is_empty() {
                return Err(PricingError::EmptyField("provider"));
            }
            if entry.id.trim().is_empty() {
                return Err(PricingError::EmptyField("id"));
            }
            let amount = |field: &'static str, text: &str| {
                NanoUsd::parse_non_negative_usd(text).map_err(|source| PricingError::Amount {
                    model: entry.id.clone(),
                    field,
                    source,
                })
            };
            let input = amount("input", &entry.input)?;
            let output = amount("output", &entry.output)?;
            let cache_read = match &entry.cache_read {
                Some(text) => amount("cache_read", text)?,
                None => input,
            };
            let cache_write = match &entry.cache_write {
                Some(text) => amount("cache_write", text)?,
                None => input,
            };
            let price = ModelPrice {
                input,
                output,
                cache_read,
                cache_write,
                output_limit: entry.output_limit,
            };
            if book.models.contains_key(&entry.id) {
                return Err(PricingError::DuplicateModel(entry.id));
            }
            book.insert(&entry.provider, &entry.id, price);
        }
        Ok(book)
    }

    /// The price book shipped in the binary (`config/prices.toml`).
    pub fn builtin() -> PriceBook {
        // The shipped file is compiled in and checked by a unit test, so a parse failure here
        // can only come from an untested build; an empty book then degrades to "unpriced"
        // (governed by `budgets.unpriced`) instead of taking the gateway down.
        PriceBook::from_toml_str(SHIPPED_PRICES).unwrap_or_default()
    }

    /// Adds or replaces a model's price: operator overrides are applied after the shipped book,
    /// so the last insert wins.
    pub fn insert(&mut self, provider: &str, model: &str, price: ModelPrice) {
        self.models.insert(
            model.to_owned(),
            ProviderPrice {
                provider: provider.to_owned(),
                price,
            },
        );
    }

    /// The price of `model`: the exact id if listed, else the id without a trailing release
    /// date (`gpt-4o-2024-08-06` → `gpt-4o`, `claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`).
    /// Nothing looser: a near-miss id is an unpriced model, not a guess.
    pub fn lookup(&self, model: &str) -> Option<&ModelPrice> {
        if let Some(entry) = self.models.get(model) {
            return Some(&entry.price);
        }
        let undated = strip_date_suffix(model)?;
        self.models.get(undated).map(|entry| &entry.price)
    }

    /// A price no model of `provider` exceeds: each rate and the output limit is the highest
    /// any of its entries has (over the whole book when `provider` is `None` or lists nothing).
    /// What a model the book lacks is reserved at, so an alias cannot be cheaper to admit than
    /// the model the upstream answers with.
    pub fn ceiling(&self, provider: Option<&str>) -> Option<ModelPrice> {
        let of_provider = |p: &&ProviderPrice| provider.is_none_or(|name| p.provider == name);
        let mut entries = self.models.values().filter(of_provider).peekable();
        let entries: Box<dyn Iterator<Item = &ProviderPrice>> = if entries.peek().is_some() {
            Box::new(entries)
        } else {
            Box::new(self.models.values())
        };
        entries.map(|p| p.price).reduce(|a, b| ModelPrice {
            input: a.input.max(b.input),
            output: a.output.max(b.output),
            cache_read: a.cache_read.max(b.cache_read),
            cache_write: a.cache_write.max(b.cache_write),
            output_limit: a.output_limit.max(b.output_limit),
        })
    }

    /// Every priced model, ordered by model id.
    pub fn iter(&self) -> impl Iterator<Item = ListedPrice<'_>> {
        self.models.iter().map(|(model, entry)| ListedPrice {
            provider: &entry.provider,
            model,
            price: &entry.price,
        })
    }

    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }
}

/// `model` without a trailing `-YYYY-MM-DD` (OpenAI) or `-YYYYMMDD` (Anthropic) release date.
fn strip_date_suffix(model: &str) -> Option<&str> {
    let bytes = model.as_bytes();
    let digits_at = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    let number_at = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .fold(0u32, |value, digit| value * 10 + u32::from(digit - b'0'))
    };
    let plausible_date = |year: u32, month: u32, day: u32| {
        (2000..2100).contains(&year) && (1..=12).contains(&month) && (1..=31).contains(&day)
    };

    // "-YYYY-MM-DD": 11 bytes, checked as bytes so a multi-byte character cannot split a slice.
    if let Some(start) = bytes.len().checked_sub(11) {
        let date = start + 1;
        if start > 0
            && bytes[start] == b'-'
            && bytes[date + 4] == b'-'
            && bytes[date + 7] == b'-'
            && digits_at(date..date + 4)
            && digits_at(date + 5..date + 7)
            && digits_at(date + 8..date + 10)
            && plausible_date(
                number_at(date..date + 4),
                number_at(date + 5..date + 7),
                number_at(date + 8..date + 10),
            )
        {
            return Some(&model[..start]);
        }
    }
    // "-YYYYMMDD": 9 bytes.
    if let Some(start) = bytes.len().checked_sub(9) {
        let date = start + 1;
        if start > 0
            && bytes[start] == b'-'
            && digits_at(date..date + 8)
            && plausible_date(
                number_at(date..date + 4),
                number_at(date + 4..date + 6),
                number_at(date + 6..date + 8),
            )
        {
            return Some(&model[..start]);
        }
    }
    None
}

/// The cost of `usage` at `price`: Σ tokens × price ÷ 10⁶, rounded up to the next nano-USD so
/// that fractions are never given away, saturating at [`NanoUsd::MAX`].
///
/// `usage.reasoning` is not charged: it is already counted inside `usage.output`. A negative
/// price (only possible through a hand-built [`ModelPrice`]) counts as zero, so a cost can never
/// credit a budget.
pub fn cost(usage: &TokenUsage, price: &ModelPrice) -> NanoUsd {
    let priced_tokens = [
        (usage.input, price.input),
        (usage.output, price.output),
        (usage.cache_read, price.cache_read),
        (usage.cache_write, price.cache_write),
    ];
    // u64 tokens × i64 price fits in u128 (< 2¹²⁷); only the sum of four such can overflow.
    let nano_usd_times_million = priced_tokens
        .iter()
        .fold(0u128, |sum, (tokens, per_million)| {
            let per_million = u128::try_from(per_million.0).unwrap_or(0);
            sum.saturating_add(u128::from(*tokens) * per_million)
        });
    let nano_usd = nano_usd_times_million.div_ceil(TOKENS_PER_PRICE_UNIT);
    NanoUsd(i64::try_from(nano_usd).unwrap_or(i64::MAX))
}

/// Tokens a provider adds to a request beyond its body (chat framing, the tool-use system
/// prompt Anthropic inserts when tools are given: about 350 tokens).
pub const REQUEST_OVERHEAD_TOKENS: u64 = 512;

/// Tokens one inline image or audio clip may cost at most. A picture is priced by its pixels,
/// not its bytes: OpenAI's high-detail tiles reach about 1,500 tokens, its patch-based models
/// about 2,500, Anthropic about 1,600.
pub const MEDIA_PART_TOKENS: u64 = 4096;

/// The most a request can cost, as far as its body shows: what a spend reservation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostBound {
    /// Body bytes (every token is at least one byte), plus [`MEDIA_PART_TOKENS`] per inline
    /// media part and [`REQUEST_OVERHEAD_TOKENS`].
    pub input_tokens: u64,
    /// The output limit (the request's, else the model's) times the number of choices.
    pub output_tokens: u64,
}

impl CostBound {
    pub fn new(body_bytes: u64, media_parts: u32, output_cap: u64, choices: u64) -> CostBound {
        CostBound {
            input_tokens: body_bytes
                .saturating_add(u64::from(media_parts).saturating_mul(MEDIA_PART_TOKENS))
                .saturating_add(REQUEST_OVERHEAD_TOKENS),
            output_tokens: output_cap.saturating_mul(choices.max(1)),
        }
    }

    /// The bound in money at `price`. Input is priced at the dearest input rate (a prompt may
    /// all be written to the provider's cache, which costs more than plain input).
    pub fn cost(&self, price: &ModelPrice) -> NanoUsd {
        let dearest_input = price.input.max(price.cache_write).max(price.cache_read);
        cost(
            &TokenUsage {
                input: self.input_tokens,
                output: self.output_tokens,
                ..TokenUsage::default()
            },
            &ModelPrice {
                input: dearest_input,
                ..*price
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(text: &str) -> NanoUsd {
        NanoUsd::parse_usd(text).unwrap()
    }

    fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> TokenUsage {
        TokenUsage {
            input,
            output,
            cache_read,
            cache_write,
            reasoning: 0,
        }
    }

    fn flat_price(per_million: NanoUsd) -> ModelPrice {
        ModelPrice {
            input: per_million,
            output: per_million,
            cache_read: per_million,
            cache_write: per_million,
            output_limit: None,
        }
    }

    /// The usage a fixture in `tests/fixtures/manifest.json` reports (reasoning included, to
    /// show it is not charged twice).
    fn fixture_usage(name: &str) -> TokenUsage {
        let manifest: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/manifest.json")).unwrap();
        let entry = &manifest[name];
        let count = |field: &str| entry[field].as_u64().unwrap();
        TokenUsage {
            input: count("input"),
            output: count("output"),
            cache_read: count("cache_read"),
            cache_write: count("cache_write"),
            reasoning: count("reasoning"),
        }
    }

    fn fixture_cost(name: &str) -> NanoUsd {
        let manifest: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/manifest.json")).unwrap();
        let model = manifest[name]["model"].as_str().unwrap();
        let book = PriceBook::builtin();
        let price = book
            .lookup(model)
            .unwrap_or_else(|| panic!("no price for {model}"));
        cost(&fixture_usage(name), price)
    }

    #[test]
    fn shipped_book_parses_and_covers_both_providers() {
        let book = PriceBook::from_toml_str(SHIPPED_PRICES).unwrap();
        assert_eq!(PriceBook::builtin(), book);
        assert!(book.len() > 50, "only {} models", book.len());
        assert!(book.iter().any(|listed| listed.provider == "openai"));
        assert!(book.iter().any(|listed| listed.provider == "anthropic"));
        assert!(book
            .iter()
            .all(|listed| listed.provider == "openai" || listed.provider == "anthropic"));
        assert!(book.iter().all(|listed| !listed.price.input.is_negative()));
    }

    #[test]
    fn shipped_prices_of_the_fixture_models() {
        let book = PriceBook::builtin();
        assert_eq!(
            book.lookup("gpt-4o-2024-08-06"),
            Some(&ModelPrice {
                input: usd("2.50"),
                output: usd("10.00"),
                cache_read: usd("1.25"),
                // No cache-write price published: charged as input.
                cache_write: usd("2.50"),
                output_limit: Some(16384),
            })
        );
        assert_eq!(
            book.lookup("gpt-5"),
            Some(&ModelPrice {
                input: usd("1.25"),
                output: usd("10.00"),
                cache_read: usd("0.125"),
                cache_write: usd("1.25"),
                output_limit: None,
            })
        );
        assert_eq!(
            book.lookup("claude-sonnet-4-5-20250929"),
            Some(&ModelPrice {
                input: usd("3.00"),
                output: usd("15.00"),
                cache_read: usd("0.30"),
                cache_write: usd("3.75"),
                output_limit: Some(64000),
            })
        );
        // The source gives an explicit "0" cache price here; it is kept, not replaced by input.
        assert_eq!(
            book.lookup("gpt-3.5-turbo").map(|p| p.cache_read),
            Some(NanoUsd::ZERO)
        );
    }

    #[test]
    fn openai_chat_fixture_cost() {
        // gpt-4o-2024-08-06: input $2.50/M, output $10.00/M, cache read $1.25/M.
        //   226 × 2_500_000_000 =   565_000_000_000
        //    96 × 10_000_000_000 =   960_000_000_000   (32 reasoning tokens are inside the 96)
        //  1024 × 1_250_000_000 = 1_280_000_000_000
        //                    sum = 2_805_000_000_000 ÷ 10⁶ = 2_805_000 nano = $0.002805
        assert_eq!(fixture_cost("openai-chat.json"), NanoUsd(2_805_000));
        assert_eq!(fixture_cost("openai-chat-stream.sse"), NanoUsd(2_805_000));
    }

    #[test]
    fn openai_chat_tools_fixture_cost() {
        // gpt-4o-2024-08-06:
        //   812 × 2_500_000_000 = 2_030_000_000_000
        //    58 × 10_000_000_000 =   580_000_000_000
        //                    sum = 2_610_000_000_000 ÷ 10⁶ = 2_610_000 nano = $0.00261
        assert_eq!(
            fixture_cost("openai-chat-tools-stream.sse"),
            NanoUsd(2_610_000)
        );
    }

    #[test]
    fn openai_responses_fixture_cost() {
        // gpt-5-2025-08-07 → gpt-5: input $1.25/M, output $10.00/M, cache read $0.125/M.
        //   512 × 1_250_000_000 =   640_000_000_000
        //   180 × 10_000_000_000 = 1_800_000_000_000   (64 reasoning tokens are inside the 180)
        //  1536 ×   125_000_000 =   192_000_000_000
        //                    sum = 2_632_000_000_000 ÷ 10⁶ = 2_632_000 nano = $0.002632
        assert_eq!(fixture_cost("openai-responses.json"), NanoUsd(2_632_000));
        assert_eq!(
            fixture_cost("openai-responses-stream.sse"),
            NanoUsd(2_632_000)
        );
    }

    #[test]
    fn anthropic_messages_fixture_cost() {
        // claude-sonnet-4-5-20250929: input $3/M, output $15/M, cache read $0.30/M,
        // cache write $3.75/M.
        //   420 × 3_000_000_000 = 1_260_000_000_000
        //   233 × 15_000_000_000 = 3_495_000_000_000
        //  9000 ×   300_000_000 = 2_700_000_000_000
        //  1800 × 3_750_000_000 = 6_750_000_000_000
        //                    sum = 14_205_000_000_000 ÷ 10⁶ = 14_205_000 nano = $0.014205
        assert_eq!(fixture_cost("anthropic-messages.json"), NanoUsd(14_205_000));
        assert_eq!(
            fixture_cost("anthropic-messages-stream.sse"),
            NanoUsd(14_205_000)
        );
        assert_eq!(NanoUsd(14_205_000).to_usd_string(), "0.014205");
    }

    #[test]
    fn reasoning_is_not_charged_separately() {
        let price = flat_price(usd("1.00"));
        let without = usage(10, 20, 0, 0);
        let with = TokenUsage {
            reasoning: 15,
            ..without
        };
        assert_eq!(cost(&with, &price), cost(&without, &price));
    }

    #[test]
    fn fractions_of_a_nano_round_up() {
        // One token at $0.000001 per million: 1 × 1_000 ÷ 10⁶ = 0.001 nano → 1 nano.
        assert_eq!(
            cost(&usage(1, 0, 0, 0), &flat_price(usd("0.000001"))),
            NanoUsd(1)
        );
        // 1_000_001 × 1 nano ÷ 10⁶ = 1.000001 → 2.
        assert_eq!(
            cost(&usage(1_000_001, 0, 0, 0), &flat_price(NanoUsd(1))),
            NanoUsd(2)
        );
        // Exactly a whole nano does not round up.
        assert_eq!(
            cost(&usage(999_999, 1, 0, 0), &flat_price(NanoUsd(1))),
            NanoUsd(1)
        );
        // Rounding applies to the sum, not per kind of token: 4 × 0.25 nano = 1 nano.
        assert_eq!(
            cost(
                &usage(250_000, 250_000, 250_000, 250_000),
                &flat_price(NanoUsd(1))
            ),
            NanoUsd(1)
        );
        assert_eq!(
            cost(&usage(0, 0, 0, 0), &flat_price(usd("5"))),
            NanoUsd::ZERO
        );
    }

    #[test]
    fn absurd_usage_saturates_instead_of_overflowing() {
        let most = usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(cost(&most, &flat_price(NanoUsd::MAX)), NanoUsd::MAX);
        assert_eq!(
            cost(&usage(u64::MAX, 0, 0, 0), &flat_price(usd("1000"))),
            NanoUsd::MAX
        );
        // Just below the edge stays exact: u64::MAX tokens at 1 nano/M.
        assert_eq!(
            cost(&usage(u64::MAX, 0, 0, 0), &flat_price(NanoUsd(1))),
            NanoUsd(i64::try_from(u64::MAX.div_ceil(1_000_000)).unwrap())
        );
    }

    #[test]
    fn negative_prices_never_credit() {
        assert_eq!(
            cost(&usage(1_000_000, 0, 0, 0), &flat_price(NanoUsd(-5))),
            NanoUsd::ZERO
        );
    }

    #[test]
    fn the_bound_counts_every_byte_media_and_choices_at_the_dearest_input_rate() {
        let price = ModelPrice {
            input: usd("3.00"),
            output: usd("15.00"),
            cache_read: usd("0.30"),
            cache_write: usd("3.75"),
            output_limit: None,
        };
        let bound = CostBound::new(1000, 2, 100, 3);
        assert_eq!(
            bound.input_tokens,
            1000 + 2 * MEDIA_PART_TOKENS + REQUEST_OVERHEAD_TOKENS
        );
        assert_eq!(bound.output_tokens, 300);
        // (9704 × 3.75 + 300 × 15) $/M = 0.036390 + 0.0045 = $0.04089
        assert_eq!(bound.cost(&price), NanoUsd(40_890_000));
        // No `n` means one choice; nothing saturates into a wrap.
        assert_eq!(CostBound::new(0, 0, 10, 0).output_tokens, 10);
        assert_eq!(
            CostBound::new(u64::MAX, u32::MAX, u64::MAX, u64::MAX).cost(&flat_price(NanoUsd::MAX)),
            NanoUsd::MAX
        );
    }

    #[test]
    fn the_ceiling_is_the_dearest_rate_of_the_provider() {
        let mut book = PriceBook::default();
        let p = |i: &str, o: &str, limit| ModelPrice {
            input: usd(i),
            output: usd(o),
            cache_read: usd(i),
            cache_write: usd(i),
            output_limit: limit,
        };
        book.insert("openai", "cheap-in", p("1", "40", Some(1000)));
        book.insert("openai", "dear-in", p("10", "20", Some(64000)));
        book.insert("anthropic", "claude-x", p("100", "100", Some(8000)));
        let openai = book.ceiling(Some("openai")).unwrap();
        assert_eq!(openai, p("10", "40", Some(64000)));
        // An unknown provider name, or none, takes the whole book.
        assert_eq!(book.ceiling(Some("vllm")), book.ceiling(None));
        assert_eq!(book.ceiling(None).unwrap(), p("100", "100", Some(64000)));
        assert_eq!(PriceBook::default().ceiling(None), None);
    }

    #[test]
    fn lookup_exact_then_without_date() {
        let book = PriceBook::builtin();
        let gpt_4o = book.lookup("gpt-4o").unwrap();
        // Listed under its own dated id: the dated entry wins over the alias.
        assert_eq!(book.lookup("gpt-4o-2024-05-13").unwrap().input, usd("5.00"));
        assert_ne!(book.lookup("gpt-4o-2024-05-13"), Some(gpt_4o));
        // Not listed: falls back to the alias.
        assert_eq!(book.lookup("gpt-4o-2099-01-02"), Some(gpt_4o));
        assert_eq!(book.lookup("gpt-5-2025-08-07"), book.lookup("gpt-5"));
        assert_eq!(
            book.lookup("claude-sonnet-4-5-20991231"),
            book.lookup("claude-sonnet-4-5")
        );
        assert!(book.lookup("claude-sonnet-4-5").is_some());
    }

    #[test]
    fn lookup_does_not_guess() {
        let book = PriceBook::builtin();
        for unpriced in [
            "gpt-4o-mini-turbo",
            "GPT-4O",
            "gpt-4o-",
            "gpt-4o-2024-13-01",
            "gpt-4o-20241301",
            "gpt-4o-2024-08",
            "gpt-4o-12345678",
            "claude-sonnet",
            "claude-sonnet-4-5-2025092",
            "-20250929",
            "",
            "gpt-4o-2024-08-06-preview",
        ] {
            assert_eq!(book.lookup(unpriced), None, "{unpriced}");
        }
        // A listed prefix is not a match: gpt-4 has its own (different) price.
        assert_ne!(book.lookup("gpt-4"), book.lookup("gpt-4o"));
        // Multi-byte characters near the end must not split a slice.
        assert_eq!(book.lookup("gpt-4o-2024-08-0é"), None);
        assert_eq!(book.lookup("ééééééééééé"), None);
    }

    #[test]
    fn strips_only_plausible_dates() {
        assert_eq!(strip_date_suffix("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(
            strip_date_suffix("claude-opus-4-1-20250805"),
            Some("claude-opus-4-1")
        );
        assert_eq!(strip_date_suffix("gpt-4o"), None);
        assert_eq!(strip_date_suffix("2024-08-06"), None);
        assert_eq!(strip_date_suffix("-2024-08-06"), None);
        assert_eq!(strip_date_suffix("model-19991231"), None);
        assert_eq!(strip_date_suffix("model-20250230"), Some("model"));
    }

    #[test]
    fn operator_overrides_win() {
        let mut book = PriceBook::builtin();
        let custom = flat_price(usd("0.01"));
        book.insert("openai", "gpt-4o", custom);
        assert_eq!(book.lookup("gpt-4o"), Some(&custom));
        assert_eq!(book.lookup("gpt-4o-2099-01-01"), Some(&custom));
        book.insert("local", "my-finetune", custom);
        let listed = book.iter().find(|l| l.model == "my-finetune").unwrap();
        assert_eq!(listed.provider, "local");
        assert_eq!(listed.price, &custom);
    }

    #[test]
    fn price_file_format() {
        let book = PriceBook::from_toml_str(
            r#"
            # a comment
            [[model]]
            provider = "openai"
            id = "m1"
            input = "0.10"
            output = "0.40"
            cache_read = "0.025"
            cache_write = "0"
            output_limit = 32768

            [[model]]
            provider = "anthropic"
            id = "m2"
            input = "3"
            output = "15"
            "#,
        )
        .unwrap();
        assert_eq!(
            book.lookup("m1"),
            Some(&ModelPrice {
                input: NanoUsd(100_000_000),
                output: NanoUsd(400_000_000),
                cache_read: NanoUsd(25_000_000),
                cache_write: NanoUsd::ZERO,
                output_limit: Some(32768),
            })
        );
        let m2 = book.lookup("m2").unwrap();
        assert_eq!((m2.cache_read, m2.cache_write), (usd("3"), usd("3")));
        assert_eq!(m2.output_limit, None);
        let listed: Vec<_> = book.iter().map(|l| (l.provider, l.model)).collect();
        assert_eq!(listed, [("openai", "m1"), ("anthropic", "m2")]);
        assert!(PriceBook::from_toml_str("").unwrap().is_empty());
    }

    #[test]
    fn bad_price_files_are_refused_with_reasons() {
        let refusal = |text: &str| PriceBook::from_toml_str(text).unwrap_err().to_string();
        let entry = |extra: &str| {
            format!("[[model]]\nprovider = \"openai\"\nid = \"m\"\ninput = \"1\"\n{extra}")
        };

        let message = refusal(&entry("output = \"1e3\""));
        assert!(
            message.contains("`m`") && message.contains("`output`") && message.contains("1e3"),
            "{message}"
        );
        let message = refusal(&entry("output = \"-1\""));
        assert!(message.contains("negative"), "{message}");
        let message = refusal(&entry("output = 1.5"));
        assert!(message.contains("not valid TOML"), "{message}");
        let message = refusal(&entry("output = \"1\"\ncolour = \"red\""));
        assert!(message.contains("colour"), "{message}");
        let message = refusal(&entry(""));
        assert!(message.contains("output"), "{message}");
        let twice = format!("{}\n{}", entry("output = \"1\""), entry("output = \"2\""));
        assert!(refusal(&twice).contains("more than once"));
        let message =
            refusal("[[model]]\nprovider = \"\"\nid = \"m\"\ninput = \"1\"\noutput = \"1\"");
        assert!(message.contains("`provider`"), "{message}");
    }
}
