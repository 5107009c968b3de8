//! Circuit breakers per provider and model: stop sending requests to an upstream that keeps
//! failing, so clients get a fast 503 instead of waiting for yet another timeout, and the
//! upstream gets room to recover.
//!
//! Closed → Open after `failure_threshold` consecutive failures (a 5xx answer such as 503, 504
//! or Anthropic's 529, a timeout, or an unreachable upstream); Open → Half-open once
//! `open_duration` has passed, letting exactly one trial request through; the trial's outcome
//! closes the breaker or opens it again. A 4xx is a healthy upstream saying no: it resets the run.
//!
//! Not here: rendering the 503 (gateway, through `Refusal`) or what counts as a timeout
//! (gateway). Off unless `breaker.enabled`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::BreakerConfig;
use crate::telemetry::metric;

/// Past this many tracked models, healthy entries are forgotten (clients choose model names).
const MAX_TRACKED_MODELS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { trial_in_flight: bool },
}

impl State {
    fn gauge_value(self) -> f64 {
        match self {
            State::Closed { .. } => 0.0,
            State::Open { .. } => 1.0,
            State::HalfOpen { .. } => 2.0,
        }
    }
}

/// The breakers of one provider, one per model.
pub struct Breakers {
    provider: String,
    config: BreakerConfig,
    states: Mutex<HashMap<String, State>>,
}

/// Permission to send one request; report its outcome with [`Ticket::succeeded`] or
/// [`Ticket::failed`]. Dropped unreported (the client left first), a half-open trial frees its
/// slot so another request can try.
pub struct Ticket {
    breakers: Arc<Breakers>,
    model: String,
    trial: bool,
    reported: bool,
}

impl Breakers {
    pub fn new(provider: &str, config: BreakerConfig) -> Arc<Breakers> {
        Arc::new(Breakers {
            provider: provider.to_string(),
            config,
            states: Mutex::new(HashMap::new()),
        })
    }

    /// A ticket for a request to `model`, or how long until the breaker lets one through.
    /// Always a ticket when the breaker is off.
    pub fn admit(self: &Arc<Self>, model: &str) -> Result<Option<Ticket>, Duration> {
        if !self.config.enabled {
            return Ok(None);
        }
        let now = Instant::now();
        let mut states = self.states.lock();
        let state = states
            .entry(model.to_string())
            .or_insert(State::Closed { failures: 0 });
        let trial = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now < until => {
                drop(states);
                self.count(metric::BREAKER_REJECTS_TOTAL, model);
                return Err(until - now);
            }
            State::Open { .. }
            | State::HalfOpen {
                trial_in_flight: false,
            } => {
                *state = State::HalfOpen {
                    trial_in_flight: true,
                };
                self.publish(model, *state);
                tracing::info!(provider = %self.provider, model, "circuit breaker half-open: one trial request goes upstream");
                true
            }
            State::HalfOpen {
                trial_in_flight: true,
            } => {
                drop(states);
                self.count(metric::BREAKER_REJECTS_TOTAL, model);
                return Err(Duration::from_secs(1));
            }
        };
        Ok(Some(Ticket {
            breakers: self.clone(),
            model: model.to_string(),
            trial,
            reported: false,
        }))
    }

    fn record(&self, model: &str, trial: bool, ok: bool) {
        let mut states = self.states.lock();
        if states.len() > MAX_TRACKED_MODELS {
            states.retain(|_, s| *s != State::Closed { failures: 0 });
        }
        let state = states
            .entry(model.to_string())
            .or_insert(State::Closed { failures: 0 });
        let before = *state;
        let trip = |failures| {
            if failures >= self.config.failure_threshold {
                State::Open {
                    until: Instant::now() + self.config.open_duration,
                }
            } else {
                State::Closed { failures }
            }
        };
        *state = match (before, ok) {
            (_, true) if trial => State::Closed { failures: 0 },
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (_, false) if trial => State::Open {
                until: Instant::now() + self.config.open_duration,
            },
            (State::Closed { failures }, false) => trip(failures + 1),
            // A request admitted before the breaker opened, ending now: the decision stands.
            (other, _) => other,
        };
        let after = *state;
        drop(states);
        if after != before {
            self.publish(model, after);
        }
        if matches!(after, State::Open { .. }) && !matches!(before, State::Open { .. }) {
            self.count(metric::BREAKER_TRIPS_TOTAL, model);
            tracing::warn!(provider = %self.provider, model, open_ms = self.config.open_duration.as_millis() as u64, "circuit breaker opened: requests are answered 503 without contacting the upstream");
        } else if matches!(after, State::Closed { .. }) && trial {
            tracing::info!(provider = %self.provider, model, "circuit breaker closed: the trial request succeeded");
        }
    }

    fn release_trial(&self, model: &str) {
        let mut states = self.states.lock();
        if let Some(s @ State::HalfOpen { .. }) = states.get_mut(model) {
            *s = State::HalfOpen {
                trial_in_flight: false,
            };
        }
    }

    fn count(&self, name: &'static str, model: &str) {
        metrics::counter!(name, "provider" => self.provider.clone(), "model" => model.to_string())
            .increment(1);
    }

    fn publish(&self, model: &str, state: State) {
        metrics::gauge!(metric::BREAKER_STATE, "provider" => self.provider.clone(), "model" => model.to_string())
            .set(state.gauge_value());
    }
}

impl Ticket {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breakers.record(&self.model, self.trial, true);
    }

    pub fn failed(mut self) {
        self.reported = true;
        self.breakers.record(&self.model, self.trial, false);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            self.breakers.release_trial(&self.model);
        }
    }
}

/// Upstream statuses that count against the breaker: the upstream is failing or overloaded.
pub fn is_failure_status(status: u16) -> bool {
    status >= 500
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers(threshold: u32, open_ms: u64) -> Arc<Breakers> {
        Breakers::new(
            "p",
            BreakerConfig {
                enabled: true,
                failure_threshold: threshold,
                open_duration: Duration::from_millis(open_ms),
            },
        )
    }

    #[test]
    fn off_by_default_admits_everything() {
        let b = Breakers::new("p", BreakerConfig::default());
        for _ in 0..10 {
            assert!(b.admit("m").unwrap().is_none());
        }
    }

    #[test]
    fn opens_after_a_run_of_failures_and_a_success_resets_the_run() {
        let b = breakers(3, 60_000);
        b.admit("m").unwrap().unwrap().failed();
        b.admit("m").unwrap().unwrap().failed();
        b.admit("m").unwrap().unwrap().succeeded();
        b.admit("m").unwrap().unwrap().failed();
        b.admit("m").unwrap().unwrap().failed();
        assert!(b.admit("other").is_ok(), "per model");
        b.admit("m").unwrap().unwrap().failed();
        let wait = b.admit("m").err().expect("open");
        assert!(wait > Duration::from_secs(59));
    }

    #[test]
    fn half_open_lets_one_trial_through_and_its_outcome_decides() {
        let b = breakers(1, 20);
        b.admit("m").unwrap().unwrap().failed();
        assert!(b.admit("m").is_err());
        std::thread::sleep(Duration::from_millis(30));
        let trial = b.admit("m").unwrap().unwrap();
        assert!(b.admit("m").is_err(), "only one trial at a time");
        trial.failed();
        assert!(b.admit("m").is_err(), "a failed trial opens it again");
        std::thread::sleep(Duration::from_millis(30));
        let trial = b.admit("m").unwrap().unwrap();
        drop(trial); // the client left: the slot is free again
        let trial = b.admit("m").unwrap().unwrap();
        trial.succeeded();
        let t = b.admit("m").unwrap().unwrap();
        let t2 = b.admit("m").unwrap().unwrap();
        t.succeeded();
        t2.succeeded();
    }
}
