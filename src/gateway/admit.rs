//! Admit: whether a parsed request may run now: the model's circuit breaker, then governance
//! (the cost estimate against limits and budgets, then the shared budget when replicas share
//! spend). What it grants travels with the interception until settlement.
//!
//! Not here: the rules (`governance`, `upstream::breaker`), the per-user request rate and
//! concurrency (checked right after authentication), the refusal messages (`refusal`).

use bytes::Bytes;
use chrono::Utc;

use super::refusal::{circuit_open_refusal, denial_refusal, Refusal};
use super::Gateway;
use crate::governance::{Admission, CostRequest};
use crate::providers::ParsedRequest;
use crate::store::Principal;
use crate::upstream::{breaker, ProviderRoute};

/// What admission grants a request: its budget reservation and the breaker's permission (both
/// reported back when the request ends).
pub(super) struct Admitted {
    pub(super) admission: Admission,
    pub(super) breaker: Option<breaker::Ticket>,
}

impl Gateway {
    /// Phase 4: the breaker for `request.model`, then governance, admit the request (503 with
    /// the breaker open; 402/403/429 from governance).
    pub(super) async fn admit(
        &self,
        route: &ProviderRoute,
        principal: &Principal,
        request: &ParsedRequest,
        upstream_body: &Bytes,
    ) -> Result<Admitted, Refusal> {
        let breaker = route
            .breakers
            .admit(&request.model)
            .map_err(|wait| circuit_open_refusal(&route.name, &request.model, wait))?;
        let cost_request = CostRequest {
            model: &request.model,
            price_family: route.kind.price_family(),
            body_bytes: body_len(upstream_body),
            max_output_tokens: request.max_output_tokens,
            choices: request.choices,
            input: &request.input,
        };
        let admission = self
            .state
            .governance
            .admit(principal, &cost_request, Utc::now())
            .map_err(|denial| denial_refusal(denial, request.input.unseen.as_ref()))?;
        let admission = self
            .state
            .governance
            .admit_shared(admission)
            .await
            .map_err(|denial| denial_refusal(denial, request.input.unseen.as_ref()))?;
        Ok(Admitted { admission, breaker })
    }
}

fn body_len(body: &Bytes) -> u64 {
    body.len() as u64
}
