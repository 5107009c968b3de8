//! Governance: pricing and cost, spend caps, rate limits, key policy, seats.

pub mod pricing;
