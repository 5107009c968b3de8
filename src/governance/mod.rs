//! Governance: pricing and cost, spend caps, rate limits, key policy, seats.
//!
//! [`Governance`] is the one front door the gateway calls: `check_rate` before the body is read
//! (requests per minute, concurrency), `admit` once the model is known (price, budget
//! reservation), `settle` when the interception ends. Every decision is made in memory; the
//! background refresher (`refresh`) pulls caps and price overrides from the store every few
//! seconds and reloads spend when a period rolls over.
//!
//! On PostgreSQL several replicas share one budget: after the in-memory check, a capped
//! request also reserves its estimate in the database (`admit_shared`, one round trip, only
//! for users with a cap), so the replicas together admit no more than one of them would. The
//! recorder turns each reservation into the request's cost in the transaction that records
//! it, and the refresher reloads every user's spend from the database. See
//! `docs/replicas.md` for the overshoot bound and what happens while the database is down.
//!
//! Not here: rendering refusals (the gateway does, in the provider's format) or SQL (store).

pub mod budget;
pub mod estimate;
pub mod keyvault;
pub mod ledger;
pub mod limits;
pub mod pricing;
pub mod seats;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::{Mutex, RwLock};
use uuid::Uuid;

use crate::config::{BudgetConfig, Config, DatabaseDownPolicy, PriceOverride, UnpricedPolicy};
use crate::money::NanoUsd;
use crate::providers::{InputShape, TokenUsage};
use crate::store::{Principal, Store, StoreError};
use budget::{BudgetLimits, LimitScope};
use ledger::{BudgetRefusal, Reservation, ReservationKind, SpendLedger};
use limits::{ConcurrencyLimiter, ConcurrencyPermit, RateLimiter};
use pricing::{CostBound, ModelPrice, PriceBook};

/// Output tokens assumed for a request that sets no limit, of a model whose limit the price
/// book does not know, when no model in the book has a limit either.
const FALLBACK_OUTPUT_TOKENS: u64 = 128_000;

/// What admission needs to know about an intercepted request.
#[derive(Debug, Clone, Copy)]
pub struct CostRequest<'a> {
    /// The model the request names.
    pub model: &'a str,
    /// The price book's provider name (`openai`, `anthropic`) whose dearest model a model the
    /// book lacks is reserved at; `None` for the whole book.
    pub price_family: Option<&'a str>,
    /// The body as it goes upstream.
    pub body_bytes: u64,
    /// `max_tokens` and its siblings, if the client set one.
    pub max_output_tokens: Option<u64>,
    /// Chat `n`.
    pub choices: Option<u64>,
    pub input: &'a InputShape,
}

/// Why governance said no.
#[derive(Debug)]
pub enum Denial {
    RateLimited {
        retry_after: Duration,
    },
    TooManyInFlight {
        limit: u32,
    },
    Budget {
        refusal: BudgetRefusal,
        reset: DateTime<Utc>,
    },
    Unpriced {
        model: String,
    },
    /// The shared budget store is down and `budgets.when_database_down = "refuse"`.
    BudgetUnavailable,
}

/// A user's budget as the response headers and `/users/me/budget` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetView {
    pub cap: Option<NanoUsd>,
    pub scope: Option<LimitScope>,
    pub spent: NanoUsd,
    pub reserved: NanoUsd,
    pub period_start: DateTime<Utc>,
    pub reset: DateTime<Utc>,
}

impl BudgetView {
    pub fn remaining(&self) -> Option<NanoUsd> {
        self.cap
            .map(|c| NanoUsd(c.0.saturating_sub(self.spent.0).max(0)))
    }
}

/// What an admitted request carries until it ends.
#[derive(Debug)]
pub struct Admission {
    reservation: Option<Reservation>,
    /// The requested model's price; `None` when the book lacks it (an alias, or a model that
    /// is not priced): the model that answers is then charged.
    pub price: Option<ModelPrice>,
    /// The most the request can cost, as its reservation assumed.
    pub bound: CostBound,
    /// Whether the reservation bounds the cost (the input is all in the body).
    pub kind: ReservationKind,
    /// The cap check still to be made against the shared store (`admit_shared`).
    capped: Option<CappedRequest>,
    /// The request's reservation in the shared store.
    shared: Option<Uuid>,
}

#[derive(Debug)]
struct CappedRequest {
    user: Uuid,
    cap: NanoUsd,
    scope: LimitScope,
    estimate: NanoUsd,
    kind: ReservationKind,
    period_start: DateTime<Utc>,
    reset: DateTime<Utc>,
}

/// What a request was charged when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The prices used; `None` when neither the requested nor the answering model is priced.
    pub price: Option<ModelPrice>,
    pub cost: NanoUsd,
    pub charge: Charge,
}

/// What a settled request was charged to, for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub period_start: DateTime<Utc>,
    /// Released by the recorder in the transaction that adds the cost to the shared total.
    pub shared_reservation: Option<Uuid>,
}

/// The database several replicas share spend through (PostgreSQL only).
struct SharedSpend {
    store: Store,
    /// This process, as its reservations name it.
    replica: Uuid,
    /// Reservations of requests in flight here, renewed by the refresher so they do not expire.
    live: Mutex<HashSet<Uuid>>,
    /// Unix seconds of the last "database down" warning, so an outage logs once per 10 s.
    last_warned: AtomicI64,
}

/// Per-replica governance state.
pub struct Governance {
    // The config-derived parts are behind locks so a SIGHUP reload can replace them
    // (`reconfigure`); the ledger and the hydration mark are never replaced.
    budgets: RwLock<BudgetConfig>,
    config_prices: RwLock<Vec<PriceOverride>>,
    limits: RwLock<Arc<BudgetLimits>>,
    prices: RwLock<Arc<PriceBook>>,
    ledger: SpendLedger,
    rate: RwLock<Arc<RateLimiter>>,
    concurrency: RwLock<Arc<ConcurrencyLimiter>>,
    /// Start of the period the ledger was last hydrated for.
    hydrated_period: RwLock<Option<DateTime<Utc>>>,
    shared: Option<SharedSpend>,
    /// (requests_per_minute, max_concurrent) the limiters were built with.
    limits_config: RwLock<(u32, u32)>,
}

impl Governance {
    pub fn new(config: &Config) -> Governance {
        let limits = BudgetLimits {
            default: config.budgets.default_limit,
            groups: HashMap::new(),
            users: HashMap::new(),
            policy: config.budgets.group_policy,
        };
        let gov = Governance {
            budgets: RwLock::new(config.budgets.clone()),
            config_prices: RwLock::new(config.pricing.clone()),
            limits: RwLock::new(Arc::new(limits)),
            prices: RwLock::new(Arc::new(PriceBook::builtin())),
            ledger: SpendLedger::new(),
            rate: RwLock::new(Arc::new(RateLimiter::new(
                config.limits.requests_per_minute,
            ))),
            concurrency: RwLock::new(Arc::new(ConcurrencyLimiter::new(
                config.limits.max_concurrent,
            ))),
            hydrated_period: RwLock::new(None),
            shared: None,
            limits_config: RwLock::new((
                config.limits.requests_per_minute,
                config.limits.max_concurrent,
            )),
        };
        gov.apply_prices(&[]);
        gov
    }

    /// Makes `store` (PostgreSQL) the authority on spend across replicas.
    pub fn share_spend_through(&mut self, store: Store) {
        self.shared = Some(SharedSpend {
            store,
            replica: Uuid::new_v4(),
            live: Mutex::new(HashSet::new()),
            last_warned: AtomicI64::new(0),
        });
    }

    /// Start of the budget period `at` falls in.
    pub fn period_start(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        budget::period_bounds(self.budgets.read().period, at).0
    }

    pub fn prices(&self) -> Arc<PriceBook> {
        self.prices.read().clone()
    }

    /// Request rate and concurrency, checked before the body is read. The permit is held until
    /// the request ends.
    pub fn check_rate(&self, user: Uuid) -> Result<ConcurrencyPermit, Denial> {
        self.rate
            .read()
            .check(user)
            .map_err(|retry_after| Denial::RateLimited { retry_after })?;
        self.concurrency
            .read()
            .acquire(user)
            .map_err(|e| Denial::TooManyInFlight { limit: e.limit })
    }

    /// Price and budget for an intercepted request: reserves the most it can cost
    /// ([`CostBound`] at the model's prices; at the dearest prices of its provider for a model
    /// the book lacks). A request whose input is partly invisible (`InputShape::unseen`) has
    /// no bound and is admitted only alone. See `ledger` for the rule and its overshoot bound.
    pub fn admit(
        &self,
        principal: &Principal,
        request: &CostRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<Admission, Denial> {
        let book = self.prices();
        let price = book.lookup(request.model).copied();
        let budgets = self.budgets.read().clone();
        if price.is_none() && budgets.unpriced == UnpricedPolicy::Deny {
            return Err(Denial::Unpriced {
                model: request.model.to_string(),
            });
        }
        let needs_ceiling = price.is_none()
            || (request.max_output_tokens.is_none()
                && price.is_some_and(|p| p.output_limit.is_none()));
        let ceiling = needs_ceiling
            .then(|| book.ceiling(request.price_family))
            .flatten();
        let output_cap = request
            .max_output_tokens
            .or(price.and_then(|p| p.output_limit))
            .or(ceiling.and_then(|c| c.output_limit))
            .unwrap_or(FALLBACK_OUTPUT_TOKENS);
        let bound = CostBound::new(
            request.body_bytes,
            request.input.media_parts,
            output_cap,
            request.choices.unwrap_or(1),
        );
        // An empty book with unpriced models allowed is the only way to reserve nothing.
        let estimate = price.or(ceiling).map_or(NanoUsd::ZERO, |p| bound.cost(&p));
        let kind = match request.input.unseen {
            Some(_) => ReservationKind::Unbounded,
            None => ReservationKind::Bounded,
        };
        let limits = self.limits.read().clone();
        let cap = budget::resolve_cap(&limits, principal.user_id, &principal.group_ids);
        let (period_start, reset) = budget::period_bounds(budgets.period, now);
        let capped = cap.clone().map(|(cap, scope)| CappedRequest {
            user: principal.user_id,
            cap,
            scope,
            estimate,
            kind,
            period_start,
            reset,
        });
        let reservation = self
            .ledger
            .try_reserve(principal.user_id, cap, estimate, period_start, kind)
            .map_err(|refusal| Denial::Budget { refusal, reset })?;
        Ok(Admission {
            reservation: Some(reservation),
            price,
            bound,
            kind,
            capped,
            shared: None,
        })
    }

    /// The second half of admission when replicas share spend: reserves a capped request's
    /// estimate in the database, where every replica's reservations and recorded spend are.
    /// A no-op without a shared store or without a cap.
    pub async fn admit_shared(&self, mut admission: Admission) -> Result<Admission, Denial> {
        let (Some(shared), Some(c)) = (&self.shared, admission.capped.take()) else {
            return Ok(admission);
        };
        let id = Uuid::now_v7();
        let (ttl, when_down) = {
            let budgets = self.budgets.read();
            (budgets.reservation_ttl, budgets.when_database_down)
        };
        let answer = shared
            .store
            .on_hot_path(shared.store.reserve_shared(
                id,
                c.user,
                c.period_start,
                c.cap,
                c.estimate,
                c.kind == ReservationKind::Unbounded,
                shared.replica,
                ttl,
            ))
            .await;
        match answer {
            Some(Some(r)) if r.admitted => {
                shared.live.lock().insert(id);
                admission.shared = Some(id);
                self.ledger.observe_spent(c.user, c.period_start, r.spent);
                Ok(admission)
            }
            Some(Some(r)) => {
                self.ledger.observe_spent(c.user, c.period_start, r.spent);
                self.release(admission);
                // Reserved as the database counts it, less this replica's own share, which the
                // refusal message already calls "your in-flight requests".
                Err(Denial::Budget {
                    refusal: BudgetRefusal {
                        cap: c.cap,
                        spent: r.spent,
                        reserved: r.reserved,
                        scope: c.scope,
                    },
                    reset: c.reset,
                })
            }
            Some(None) => Ok(admission),
            None => {
                metrics::counter!(crate::telemetry::metric::BUDGET_STORE_ERRORS_TOTAL).increment(1);
                let now = Utc::now().timestamp();
                if now - shared.last_warned.swap(now, Ordering::Relaxed) >= 10 {
                    tracing::warn!(policy = ?when_down, "shared budget store unreachable; capped requests decided by budgets.when_database_down");
                }
                match when_down {
                    DatabaseDownPolicy::Local => Ok(admission),
                    DatabaseDownPolicy::Refuse => {
                        self.release(admission);
                        Err(Denial::BudgetUnavailable)
                    }
                }
            }
        }
    }

    /// Gives back an admission's money without charging anything.
    fn release(&self, mut admission: Admission) {
        if let Some(r) = admission.reservation.take() {
            self.ledger.settle(r, NanoUsd::ZERO);
        }
    }

    /// Prices `usage` and charges it, releasing the reservation. The requested model's price
    /// applies; for a model the book lacks, the price of the model that answered
    /// (`answering_model`), else nothing (`budgets.unpriced = "allow"`). Says which period was
    /// charged (and which shared reservation the record must release).
    pub fn settle(
        &self,
        mut admission: Admission,
        usage: &TokenUsage,
        answering_model: Option<&str>,
    ) -> Settlement {
        let price = admission.price.or_else(|| {
            let book = self.prices();
            answering_model.and_then(|m| book.lookup(m)).copied()
        });
        let cost = price
            .as_ref()
            .map_or(NanoUsd::ZERO, |p| pricing::cost(usage, p));
        let period_start = match admission.reservation.take() {
            Some(r) => {
                let period = r.period_start();
                self.ledger.settle(r, cost);
                period
            }
            None => self.period_start(Utc::now()),
        };
        if let (Some(shared), Some(id)) = (&self.shared, admission.shared) {
            shared.live.lock().remove(&id);
        }
        Settlement {
            price,
            cost,
            charge: Charge {
                period_start,
                shared_reservation: admission.shared,
            },
        }
    }

    /// Tells the shared store a request ended and what it cost, so the next admission on any
    /// replica counts it as spend rather than as a request in flight. Bounded in time (see
    /// `Store::on_hot_path`): a slow database must not hold back the client's last byte, and
    /// the recorder settles the reservation anyway.
    pub async fn settle_shared(&self, charge: &Charge, cost: NanoUsd) {
        let (Some(shared), Some(id)) = (&self.shared, charge.shared_reservation) else {
            return;
        };
        if shared
            .store
            .on_hot_path(shared.store.settle_shared(id, cost))
            .await
            .is_none()
        {
            metrics::counter!(crate::telemetry::metric::BUDGET_STORE_ERRORS_TOTAL).increment(1);
        }
    }

    /// The user's cap, spend and reset time right now.
    pub fn budget_view(&self, user: Uuid, group_ids: &[Uuid], now: DateTime<Utc>) -> BudgetView {
        let limits = self.limits.read().clone();
        let resolved = budget::resolve_cap(&limits, user, group_ids);
        let (period_start, reset) = budget::period_bounds(self.budgets.read().period, now);
        let (spent, reserved) = self.ledger.snapshot(user);
        BudgetView {
            cap: resolved.as_ref().map(|(c, _)| *c),
            scope: resolved.map(|(_, s)| s),
            spent,
            reserved,
            period_start,
            reset,
        }
    }

    /// Reloads caps and price overrides from the store, and the ledger when the period rolled
    /// over (or on first run). Called at start and every few seconds.
    pub async fn refresh(&self, store: &Store, now: DateTime<Utc>) -> Result<(), StoreError> {
        let rows = store.spend_limits().await?;
        let budgets = self.budgets.read().clone();
        let mut limits = BudgetLimits {
            default: budgets.default_limit,
            groups: HashMap::new(),
            users: HashMap::new(),
            policy: budgets.group_policy,
        };
        for row in rows {
            match (row.scope.as_str(), row.scope_id) {
                ("default", _) => limits.default = Some(row.limit),
                ("group", Some(id)) => {
                    limits.groups.insert(
                        id,
                        (row.group_name.unwrap_or_else(|| id.to_string()), row.limit),
                    );
                }
                ("user", Some(id)) => {
                    limits.users.insert(id, row.limit);
                }
                _ => {}
            }
        }
        *self.limits.write() = Arc::new(limits);
        let overrides = store.price_overrides().await?;
        self.apply_prices(&overrides);

        let (period_start, _) = budget::period_bounds(budgets.period, now);
        let stale = self.hydrated_period.read().is_none_or(|p| p < period_start);
        match &self.shared {
            // Every replica writes spend: reload it every time, not only on roll-over.
            Some(shared) => {
                if stale {
                    shared.store.reconcile_shared_spend(period_start).await?;
                }
                let live: Vec<Uuid> = shared.live.lock().iter().copied().collect();
                shared
                    .store
                    .renew_shared_reservations(shared.replica, &live, budgets.reservation_ttl)
                    .await?;
                if let Some(spent) = shared.store.shared_spend(period_start).await? {
                    self.ledger.hydrate(period_start, spent);
                }
                *self.hydrated_period.write() = Some(period_start);
            }
            None if stale => {
                let spent = store.spend_since(period_start).await?;
                self.ledger.hydrate(period_start, spent);
                *self.hydrated_period.write() = Some(period_start);
            }
            None => {}
        }
        self.rate.read().retain_recent();
        Ok(())
    }

    /// Takes a reloaded configuration's prices, budget defaults and request limits (the caller
    /// then calls `refresh` so store overrides are layered on top again). The budget period is
    /// not changed: the ledger is hydrated per period. A changed limiter starts empty: requests
    /// already in flight are not counted against a new concurrency limit.
    pub fn reconfigure(&self, config: &Config) {
        {
            let mut budgets = self.budgets.write();
            let period = budgets.period;
            *budgets = BudgetConfig {
                period,
                ..config.budgets.clone()
            };
        }
        *self.config_prices.write() = config.pricing.clone();
        if self.limits_config.read().0 != config.limits.requests_per_minute {
            *self.rate.write() = Arc::new(RateLimiter::new(config.limits.requests_per_minute));
        }
        if self.limits_config.read().1 != config.limits.max_concurrent {
            *self.concurrency.write() =
                Arc::new(ConcurrencyLimiter::new(config.limits.max_concurrent));
        }
        *self.limits_config.write() = (
            config.limits.requests_per_minute,
            config.limits.max_concurrent,
        );
    }

    /// Shipped price book, then `[[pricing.models]]` from the config, then the store's overrides.
    fn apply_prices(&self, store_overrides: &[crate::store::PriceOverrideRow]) {
        let mut book = PriceBook::builtin();
        for o in self.config_prices.read().iter() {
            book.insert(&o.provider, &o.model, o.price);
        }
        for o in store_overrides {
            book.insert(&o.provider, &o.model, o.price);
        }
        *self.prices.write() = Arc::new(book);
    }
}
