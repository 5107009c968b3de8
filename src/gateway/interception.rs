//! Interception: one intercepted provider call from its start to its record. What is known
//! when it opens (who, client, session, thread), what the exchange reports as it goes, the
//! settlement (usage and cost, charged through governance before the client has the last
//! byte), and the [`InterceptionRecord`] it finishes as.
//!
//! Not here: moving bytes (`exchange`), pricing and budgets (`governance`), writing records
//! (`store::Recorder`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use pingora::proxy::Session;
use uuid::Uuid;

use super::credential::Credential;
use super::intake::Routed;
use super::Gateway;
use crate::clients::{self, ClientInfo};
use crate::governance::estimate::{self, EstimateInput};
use crate::governance::{Admission, Charge, Settlement};
use crate::lineage::ThreadLink;
use crate::money::NanoUsd;
use crate::providers::{
    Endpoint, ParsedRequest, ResponseParser, ResponseSummary, TokenUsage, UsageSource,
};
use crate::store::{CredentialKind, InterceptionRecord, InterceptionStatus, Principal};
use crate::telemetry;
use crate::upstream::{breaker, ProviderRoute};

/// An interception between its start and its record.
pub(super) struct OpenInterception {
    pub(super) id: Uuid,
    pub(super) started: Instant,
    pub(super) started_at: DateTime<Utc>,
    pub(super) route: Arc<ProviderRoute>,
    pub(super) endpoint: Endpoint,
    pub(super) request: ParsedRequest,
    pub(super) principal: Arc<Principal>,
    pub(super) client: ClientInfo,
    pub(super) thread: Option<ThreadLink>,
    pub(super) credential_kind: CredentialKind,
    pub(super) credential_hint: Option<String>,
    pub(super) admission: Option<Admission>,
    /// The body as it went upstream: what an estimate of input tokens reads.
    pub(super) body: Bytes,
    /// The circuit breaker's permission, reported with the upstream's answer.
    pub(super) breaker: Option<breaker::Ticket>,
    /// What the exchange has seen so far.
    pub(super) progress: Progress,
    /// How it failed, if it did (set by the exchange, never after the client has the answer).
    pub(super) outcome: Outcome,
    /// What the parser found, once the response is complete (or cut).
    pub(super) summary: Option<ResponseSummary>,
    /// What was charged, set together with `summary`.
    pub(super) settled: Option<Settled>,
}

/// What the exchange reports as it goes.
#[derive(Default)]
pub(super) struct Progress {
    /// The request was (or may have been) delivered to the upstream, which then bills it.
    pub(super) request_sent: bool,
    /// The client has the whole answer (its final event or last byte was written): nothing it
    /// does afterwards makes the interception anything but `completed`.
    pub(super) delivered: bool,
    /// The provider's response parser, fed every chunk of a successful answer.
    pub(super) parser: Option<Box<dyn ResponseParser>>,
    pub(super) streaming: bool,
    pub(super) upstream_status: Option<u16>,
    pub(super) ttfb: Option<Duration>,
    /// Time spent waiting on the upstream (connect, head, body reads).
    pub(super) upstream_wait: Duration,
}

/// How an interception failed; empty while nothing has.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) status: Option<InterceptionStatus>,
    pub(super) error: Option<String>,
    /// First bytes of an upstream error body, for the record.
    pub(super) error_body: Vec<u8>,
}

/// An interception's usage and what it cost.
pub(super) struct Settled {
    pub(super) usage: TokenUsage,
    pub(super) source: UsageSource,
    pub(super) settlement: Settlement,
}

/// What the blocking pool needs to estimate usage.
struct EstimateJob {
    pub(super) body: Bytes,
    pub(super) model: String,
    pub(super) media_parts: u32,
    pub(super) output_bytes: u64,
    pub(super) bound: crate::governance::pricing::CostBound,
}

impl Gateway {
    /// Phase 5: the interception starts: who, which client and session, which thread.
    pub(super) async fn open_interception(
        &self,
        session: &Session,
        routed: &Routed,
        endpoint: Endpoint,
        request: ParsedRequest,
        principal: Arc<Principal>,
        credential: &Credential,
    ) -> OpenInterception {
        let headers = &session.req_header().headers;
        let client = clients::identify(headers, request.metadata_user_id.as_deref());
        let thread = self
            .find_thread(principal.user_id, &request.tool_result_ids)
            .await;
        routed.route.series().inflight().increment(1.0);
        OpenInterception {
            id: Uuid::now_v7(),
            started: Instant::now(),
            started_at: Utc::now(),
            route: routed.route.clone(),
            endpoint,
            request,
            principal,
            client,
            thread,
            credential_kind: credential.kind,
            credential_hint: credential.hint.clone(),
            admission: None,
            body: Bytes::new(),
            breaker: None,
            progress: Progress::default(),
            outcome: Outcome::default(),
            summary: None,
            settled: None,
        }
    }

    async fn find_thread(&self, user: Uuid, tool_result_ids: &[String]) -> Option<ThreadLink> {
        for id in tool_result_ids.iter().rev() {
            if let Some(link) = self.state.threads.find(user, id) {
                return Some(link);
            }
        }
        // Not in memory (older, or produced by another replica): ask the store once.
        let last = tool_result_ids.last()?.clone();
        let store = self.state.store.clone();
        let db = &self.state.db;
        let found = self
            .state
            .store
            .on_hot_path(async move {
                db.spawn(async move { store.thread_of_tool_call(user, &last).await })
                    .await
                    .map_err(|e| {
                        crate::store::StoreError::Invalid(format!(
                            "lineage lookup task failed: {e}"
                        ))
                    })?
            })
            .await??;
        Some(ThreadLink {
            parent: found.0,
            root: found.1,
        })
    }

    /// Settles at the response's final event or last chunk, before the client can act on it,
    /// and reports the cost to the shared budget at once (other replicas see the spend before
    /// the recorder writes it).
    pub(super) async fn settle_before_last_byte(&self, open: &mut OpenInterception) {
        self.settle(open).await;
        if let Some(s) = &open.settled {
            self.state
                .governance
                .settle_shared(&s.settlement.charge, s.settlement.cost)
                .await;
        }
    }

    /// The response is over (complete or cut): takes the parser's findings, makes its tool
    /// calls known to thread lineage right away, and charges the usage: as reported, or
    /// estimated when the response carried none but the request reached the provider (which
    /// bills it whatever the client saw; see `governance::estimate`).
    pub(super) async fn settle(&self, open: &mut OpenInterception) {
        if open.summary.is_some() {
            return;
        }
        let summary = open
            .progress
            .parser
            .take()
            .map(|mut p| p.finish())
            .unwrap_or_default();
        let link = ThreadLink {
            parent: open.id,
            root: open.thread.map(|t| t.root).unwrap_or(open.id),
        };
        for call in &summary.tool_calls {
            self.state
                .threads
                .remember(open.principal.user_id, &call.id, link);
        }
        let billed =
            open.progress.request_sent && open.progress.upstream_status.is_none_or(|s| s < 400);
        let estimate = match &open.admission {
            Some(admission) if billed && summary.usage.is_none() => Some(EstimateJob {
                body: open.body.clone(),
                model: summary
                    .model
                    .clone()
                    .unwrap_or_else(|| open.request.model.clone()),
                media_parts: open.request.input.media_parts,
                output_bytes: summary.output_bytes,
                bound: admission.bound,
            }),
            _ => None,
        };
        let (usage, source) = match (summary.usage, estimate, summary.partial_usage) {
            (Some(usage), _, _) => (usage, UsageSource::Reported),
            // A stream cut before its final usage may have reported part of it (Anthropic's
            // input counts come first, the output count last): what it reported stands, and
            // output is at least what the client was sent.
            (None, Some(job), Some(partial)) => {
                let estimated = estimated_usage(job).await;
                let usage = TokenUsage {
                    output: partial.output.max(estimated.output),
                    ..partial
                };
                (usage, UsageSource::Estimated)
            }
            (None, Some(job), None) => (estimated_usage(job).await, UsageSource::Estimated),
            (None, None, partial) => (partial.unwrap_or_default(), UsageSource::Absent),
        };
        // Charge now, before the client has the last byte, so its next request already sees
        // the spend (sequential requests cannot slip past a nearly spent cap).
        let settlement = match open.admission.take() {
            Some(admission) => {
                self.state
                    .governance
                    .settle(admission, &usage, summary.model.as_deref())
            }
            None => Settlement {
                price: None,
                cost: NanoUsd::ZERO,
                charge: Charge {
                    period_start: self.state.governance.period_start(Utc::now()),
                    shared_reservation: None,
                },
            },
        };
        open.settled = Some(Settled {
            usage,
            source,
            settlement,
        });
        if let Some(journal) = &self.state.journal {
            // As it stands now: the final record, if it is ever written, replaces nothing (a
            // recovered one is inserted only where the final one is missing).
            let thread_root = open.thread.map(|t| t.root);
            let session_key = session_key(&open.principal, &open.client, thread_root, open.id);
            journal.append(&journal_entry(open, &summary, &session_key));
        }
        open.summary = Some(summary);
    }

    /// Phase 7: the record. Cost (settled here if the response broke before its end), metrics,
    /// structured logs, then the recorder queue (never waits).
    pub(super) async fn close_interception(&self, mut open: OpenInterception) {
        self.settle(&mut open).await;
        let record = open.finish();
        open.route.series().inflight().decrement(1.0);
        telemetry::count_interception(
            &record,
            open.started.elapsed().as_secs_f64(),
            open.progress.upstream_wait.as_secs_f64(),
        );
        telemetry::log_interception(&record);
        self.state.recorder.submit(record);
    }
}

impl OpenInterception {
    /// The record a settled interception finishes as: its status, what it cost, and the
    /// request's prompt and the response's tool calls and thoughts moved in.
    fn finish(&mut self) -> InterceptionRecord {
        let summary = self.summary.take().unwrap_or_default();
        let mut record = record_of(self, &summary, status_of(self, self.progress.delivered));
        record.prompt = self.request.last_user_prompt.take();
        record.tool_calls = summary.tool_calls;
        record.thoughts = summary.thoughts;
        record
    }
}

/// How an interception ended: the failure it recorded, else by the upstream's answer if the
/// client has the whole answer (`delivered`), else the client went away.
fn status_of(open: &OpenInterception, delivered: bool) -> InterceptionStatus {
    open.outcome
        .status
        .unwrap_or(match (delivered, open.progress.upstream_status) {
            (true, Some(status)) if status >= 400 => InterceptionStatus::UpstreamError,
            (true, _) => InterceptionStatus::Completed,
            (false, _) => InterceptionStatus::ClientAborted,
        })
}

/// The record of a settled interception, without its text (prompt, tool calls, thoughts),
/// which the caller adds if it keeps them.
fn record_of(
    open: &OpenInterception,
    summary: &ResponseSummary,
    status: InterceptionStatus,
) -> InterceptionRecord {
    let settled = open
        .settled
        .as_ref()
        .expect("records are made of settled interceptions");
    let error = open.outcome.error.clone().or_else(|| {
        (!open.outcome.error_body.is_empty())
            .then(|| String::from_utf8_lossy(&open.outcome.error_body).into_owned())
    });
    let thread_root = open.thread.map(|t| t.root);
    InterceptionRecord {
        id: open.id,
        user_id: open.principal.user_id,
        api_key_id: Some(open.principal.api_key_id),
        provider: open.route.name.clone(),
        provider_kind: open.route.kind.as_str(),
        endpoint: endpoint_name(open.endpoint),
        model: open.request.model.clone(),
        response_model: summary.model.clone(),
        client: open.client.client.as_str(),
        client_session_id: open.client.session_id.clone(),
        session_key: session_key(&open.principal, &open.client, thread_root, open.id),
        thread_parent_id: open.thread.map(|t| t.parent),
        thread_root_id: thread_root,
        credential_kind: open.credential_kind,
        credential_hint: open.credential_hint.clone(),
        status,
        upstream_status: open.progress.upstream_status,
        error,
        streaming: open.progress.streaming,
        started_at: open.started_at,
        ended_at: Utc::now(),
        ttfb_ms: open.progress.ttfb.map(|d| d.as_millis() as u64),
        response_id: summary.response_id.clone(),
        usage: settled.usage,
        usage_source: settled.source,
        prompt: None,
        tool_calls: Vec::new(),
        thoughts: Vec::new(),
        cost: settled.settlement.cost,
        price: settled.settlement.price,
        spend_period_start: settled.settlement.charge.period_start,
        shared_reservation: settled.settlement.charge.shared_reservation,
    }
}

/// A settled interception as the spend journal keeps it (borrowing what `open` holds).
fn journal_entry<'a>(
    open: &'a OpenInterception,
    summary: &'a ResponseSummary,
    session_key: &'a str,
) -> crate::store::JournalEntry<&'a str> {
    let settled = open
        .settled
        .as_ref()
        .expect("journal entries are made of settled interceptions");
    crate::store::JournalEntry {
        id: open.id.as_u64_pair(),
        user_id: open.principal.user_id.as_u64_pair(),
        api_key_id: Some(open.principal.api_key_id.as_u64_pair()),
        provider: &open.route.name,
        provider_kind: open.route.kind.as_str(),
        endpoint: endpoint_name(open.endpoint),
        model: &open.request.model,
        response_model: summary.model.as_deref(),
        client: open.client.client.as_str(),
        client_session_id: open.client.session_id.as_deref(),
        session_key,
        thread_parent_id: open.thread.map(|t| t.parent.as_u64_pair()),
        thread_root_id: open.thread.map(|t| t.root.as_u64_pair()),
        credential_kind: open.credential_kind,
        credential_hint: open.credential_hint.as_deref(),
        status: status_of(open, true),
        upstream_status: open.progress.upstream_status,
        error: open.outcome.error.as_deref(),
        streaming: open.progress.streaming,
        started_ms: open.started_at.timestamp_millis(),
        ended_ms: Utc::now().timestamp_millis(),
        ttfb_ms: open.progress.ttfb.map(|d| d.as_millis() as u64),
        response_id: summary.response_id.as_deref(),
        usage: settled.usage,
        usage_source: settled.source,
        cost: settled.settlement.cost.0,
        price: settled.settlement.price,
        spend_period_ms: settled.settlement.charge.period_start.timestamp_millis(),
        shared_reservation: settled
            .settlement
            .charge
            .shared_reservation
            .map(|r| r.as_u64_pair()),
    }
}

/// A session groups one user's interceptions: the client's session id (scoped to the user, so
/// another user reusing it starts a session of their own), else the thread root, else the
/// interception itself (both ids of the user's own interceptions).
fn session_key(
    principal: &Principal,
    client: &ClientInfo,
    thread_root: Option<Uuid>,
    own_id: Uuid,
) -> String {
    match (&client.session_id, thread_root) {
        (Some(client_session), _) => format!("{}:{client_session}", principal.user_id),
        (None, Some(root)) => root.to_string(),
        (None, None) => own_id.to_string(),
    }
}

/// Usage estimated on the blocking pool (tokenizing is CPU work the gateway's threads must
/// not do); if the estimate fails, the request's whole bound.
async fn estimated_usage(job: EstimateJob) -> TokenUsage {
    let bound = job.bound;
    let run = move || {
        estimate::estimate_usage(&EstimateInput {
            body: &job.body,
            model: &job.model,
            media_parts: job.media_parts,
            output_bytes: job.output_bytes,
            bound: job.bound,
        })
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(usage) => usage,
        Err(e) => {
            tracing::error!(error = %e, "usage estimate failed; charging the request's bound");
            TokenUsage {
                input: bound.input_tokens,
                output: bound.output_tokens,
                ..TokenUsage::default()
            }
        }
    }
}

fn endpoint_name(e: Endpoint) -> &'static str {
    match e {
        Endpoint::ChatCompletions => "chat_completions",
        Endpoint::Responses => "responses",
        Endpoint::Messages => "messages",
    }
}
