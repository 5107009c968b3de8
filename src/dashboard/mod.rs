//! The dashboard: server-rendered HTML pages on the admin listener under `/dashboard` for people
//! who would rather look than read JSON. Overview, users, sessions, usage explorer (with CSV),
//! budget and price editors, and sign-in with a Tollgate key.
//!
//! Every number comes from the management API's own handlers, called as functions with the
//! viewer as the caller: the pages show exactly what `/api/v2` answers, and members are confined
//! to their own records by the same checks. Nothing is fetched from elsewhere at run time: the
//! stylesheet is compiled in and charts are inline SVG.
//!
//! Not here: the API (`api`), the queries (`store::Queries`), escaping (`html`, `csv`).

mod csv;
pub mod html;
mod signin;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::api::auth::ClientAddress;
use crate::api::error::ApiError;
use crate::api::extract::{ApiJson, ApiPath};
use crate::api::interceptions::{Interception, TokenUsage};
use crate::api::{budgets, me, seats, sessions, usage, users};
use crate::app::AppState;
use crate::money::NanoUsd;
use html::{bar_chart, column_chart, path_segment, query_value, w, Html};
use signin::Viewer;

const STYLE: &str = include_str!("style.css");

/// The dashboard's routes. Not in the OpenAPI document: these are pages, not API.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/dashboard", get(overview))
        .route("/dashboard/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard/sign-in", get(sign_in_page).post(sign_in))
        .route("/dashboard/sign-out", post(sign_out))
        .route("/dashboard/users", get(users_page))
        .route("/dashboard/sessions", get(sessions_page))
        .route("/dashboard/sessions/{id}", get(session_page))
        .route("/dashboard/usage", get(usage_page))
        .route("/dashboard/usage.csv", get(usage_csv))
        .route("/dashboard/budgets", get(budgets_page).post(save_budget))
        .route("/dashboard/budgets/remove", post(remove_budget))
        .route("/dashboard/pricing", get(pricing_page).post(save_price))
        .route("/dashboard/pricing/remove", post(remove_price))
        .route("/dashboard/assets/style.css", get(stylesheet))
}

/// Headers every page carries: nothing cached (pages show spend and prompts), nothing loaded
/// from elsewhere, no framing, no referrer leaving the dashboard.
fn page_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: that makes the browser send `Origin: null` with these pages' own
    // forms, and the sign-in check needs their real origin. Other sites still get nothing.
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    resp
}

async fn stylesheet() -> Response {
    let mut resp = STYLE.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=3600"),
    );
    resp
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tab {
    Overview,
    Users,
    Sessions,
    Usage,
    Budgets,
    Pricing,
    None,
}

/// The page frame: navigation (admin pages only for admins), sign-out, and `body`.
fn layout(viewer: Option<&Viewer>, tab: Tab, title: &str, body: Html) -> String {
    let mut p = Html::new();
    w!(&mut p, "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>", (title), " · Tollgate</title><link rel=\"stylesheet\" href=\"/dashboard/assets/style.css\"></head><body>",
        "<a class=\"skip\" href=\"#main\">Skip to content</a><header><strong>Tollgate</strong>");
    if let Some(v) = viewer {
        w!(&mut p, "<nav aria-label=\"Dashboard\">");
        let mut links = vec![
            (Tab::Overview, "/dashboard", "Overview"),
            (Tab::Sessions, "/dashboard/sessions", "Sessions"),
            (Tab::Usage, "/dashboard/usage", "Usage"),
        ];
        if v.is_admin() {
            links.insert(1, (Tab::Users, "/dashboard/users", "Users"));
            links.push((Tab::Budgets, "/dashboard/budgets", "Budgets"));
            links.push((Tab::Pricing, "/dashboard/pricing", "Pricing"));
        }
        for (t, href, label) in links {
            w!(&mut p, "<a href=\"", (href), "\"");
            if t == tab {
                w!(&mut p, " aria-current=\"page\"");
            }
            w!(&mut p, ">", (label), "</a>");
        }
        w!(&mut p, "</nav><span class=\"who\">", (v.principal.username),
            (if v.is_admin() { " (admin)" } else { "" }), "</span>",
            "<form method=\"post\" action=\"/dashboard/sign-out\"><input type=\"hidden\" name=\"csrf\" value=\"", (v.csrf),
            "\"><button type=\"submit\">Sign out</button></form>");
    }
    w!(&mut p, "</header><main id=\"main\">");
    let mut s = p.into_string();
    s.push_str(&body.into_string());
    s.push_str("</main></body></html>");
    s
}

pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let mut body = Html::new();
    w!(
        &mut body,
        "<h1>",
        (status.canonical_reason().unwrap_or("Error")),
        "</h1><p class=\"banner error\" role=\"alert\">",
        (message),
        "</p><p><a href=\"/dashboard\">Back to the overview</a></p>"
    );
    page_response(status, layout(None, Tab::None, "Error", body))
}

/// An API refusal as a page with the same status (403 for another user's session, 404, 400).
fn api_error(e: ApiError) -> Response {
    let status = e.status();
    let message = match status {
        StatusCode::FORBIDDEN => "You do not have access to this page.".to_string(),
        StatusCode::NOT_FOUND => "Not found.".to_string(),
        StatusCode::INTERNAL_SERVER_ERROR | StatusCode::SERVICE_UNAVAILABLE => {
            "The database could not answer; try again shortly.".to_string()
        }
        // 400 and 422 carry a message about the viewer's own input, safe to show.
        _ => match &e {
            ApiError::BadRequest(m) | ApiError::Unprocessable(m) | ApiError::Conflict(m) => {
                m.clone()
            }
            _ => "The request was refused.".to_string(),
        },
    };
    error_page(status, &message)
}

fn uri(path_and_query: &str) -> Uri {
    path_and_query
        .parse()
        .unwrap_or_else(|_| Uri::from_static("/"))
}

fn usd(nano: i64) -> String {
    NanoUsd(nano).to_usd_string()
}

fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn total_tokens(u: &TokenUsage) -> u64 {
    u.input_tokens + u.output_tokens + u.cache_read_input_tokens + u.cache_write_input_tokens
}

// ---------------------------------------------------------------------------------------------
// Sign-in

async fn sign_in_page(
    headers: HeaderMap,
    ClientAddress(client): ClientAddress,
    State(state): State<Arc<AppState>>,
) -> Response {
    if let Ok(Some(_)) = signin::viewer(&state, &headers, client).await {
        return Redirect::to("/dashboard").into_response();
    }
    sign_in_form(StatusCode::OK, None)
}

fn sign_in_form(status: StatusCode, problem: Option<&str>) -> Response {
    let mut b = Html::new();
    w!(&mut b, "<div class=\"signin\"><h1>Sign in to Tollgate</h1>");
    if let Some(problem) = problem {
        w!(
            &mut b,
            "<p class=\"banner error\" role=\"alert\">",
            (problem),
            "</p>"
        );
    }
    w!(&mut b, "<form method=\"post\" action=\"/dashboard/sign-in\">",
        "<label for=\"key\">Tollgate key<input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required autofocus placeholder=\"tg_...\"></label>",
        "<button type=\"submit\">Sign in</button></form>",
        "<p class=\"muted\">Use the key your administrator gave you (<code>tollgate keys create</code>). Signing in opens a session; the key itself is not kept in your browser.</p></div>");
    page_response(status, layout(None, Tab::None, "Sign in", b))
}

#[derive(serde::Deserialize)]
struct SignInForm {
    key: String,
}

async fn sign_in(
    State(state): State<Arc<AppState>>,
    ClientAddress(client): ClientAddress,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Response {
    if !signin::same_origin(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "This sign-in form did not come from this dashboard.",
        );
    }
    let session_id = match signin::sign_in(&state, form.key.trim(), client).await {
        Ok(id) => id,
        Err(signin::SignInError::BadKey) => {
            return sign_in_form(
                StatusCode::UNAUTHORIZED,
                Some("That key is not valid, or it was revoked."),
            )
        }
        Err(e) => return signin::refusal_page(&e),
    };
    let mut resp = Redirect::to("/dashboard").into_response();
    let max_age = state.config().auth.dashboard_max_age;
    if let Ok(v) = HeaderValue::from_str(&signin::set_cookie(&headers, &session_id, max_age)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn sign_out(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = viewer.check_csrf(form.get("csrf").map(String::as_str)) {
        return refused;
    }
    if let Err(e) = viewer.sign_out(&state).await {
        return signin::refusal_page(&e.into());
    }
    let mut resp = Redirect::to("/dashboard/sign-in").into_response();
    if let Ok(v) = HeaderValue::from_str(&signin::clear_cookie(&headers)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Overview

async fn overview(viewer: Viewer, State(state): State<Arc<AppState>>) -> Response {
    match render_overview(&viewer, &state).await {
        Ok(body) => page_response(
            StatusCode::OK,
            layout(Some(&viewer), Tab::Overview, "Overview", body),
        ),
        Err(e) => api_error(e),
    }
}

async fn render_overview(viewer: &Viewer, state: &Arc<AppState>) -> Result<Html, ApiError> {
    let mut b = Html::new();
    let Json(mine) = me::my_budget(State(state.clone()), viewer.caller()).await;
    let period_start = mine.period_start;
    if viewer.is_admin() {
        let Json(seat) = seats::seats(
            State(state.clone()),
            viewer.admin().map_err(|_| ApiError::admin_only())?,
            uri("/"),
        )
        .await?;
        if let (Some(message), "warning" | "over") = (&seat.message, seat.state.as_str()) {
            let class = if seat.state == "over" {
                "banner over"
            } else {
                "banner warning"
            };
            w!(
                &mut b,
                "<p class=\"",
                (class),
                "\" role=\"status\" id=\"seat-banner\">",
                (message),
                "</p>"
            );
        }
    }
    w!(
        &mut b,
        "<h1>Overview</h1><p class=\"muted\">This ",
        (mine.period),
        " began ",
        (when(period_start)),
        " and resets ",
        (when(mine.reset_at)),
        ".</p>"
    );

    let figures = period_figures(viewer, state, period_start).await?;
    let (by_user, by_model, by_day) = (&figures.by_user, &figures.by_model, &figures.by_day);
    let period_cost: i64 = by_user.results.iter().map(|r| r.cost_nano_usd).sum();
    let period_count: i64 = by_user.results.iter().map(|r| r.interception_count).sum();

    w!(&mut b, "<div class=\"cards\"><div class=\"card\"><div class=\"muted\">Spend this ", (mine.period),
        (if viewer.is_admin() { " (everyone)" } else { "" }),
        "</div><div class=\"big\" id=\"period-spend\">$", (usd(period_cost)), "</div></div>",
        "<div class=\"card\"><div class=\"muted\">Interceptions this ", (mine.period),
        "</div><div class=\"big\" id=\"period-count\">", (period_count), "</div></div>",
        "<div class=\"card\"><div class=\"muted\">Your budget</div><div class=\"big\" id=\"my-spent\">$", (mine.spent_usd),
        "</div><div>of ", (mine.limit_usd.as_deref().map(|l| format!("${l}")).unwrap_or_else(|| "no cap".into())),
        (mine.remaining_usd.as_deref().map(|r| format!(" · ${r} left")).unwrap_or_default()), "</div></div></div>");

    if viewer.is_admin() {
        let Json(list) = users::list_users(
            State(state.clone()),
            viewer.admin().map_err(|_| ApiError::admin_only())?,
            uri("/?limit=1000"),
        )
        .await?;
        let now = Utc::now();
        let mut capped: Vec<(String, NanoUsd, NanoUsd)> = list
            .users
            .iter()
            .filter_map(|u| {
                let groups: Vec<uuid::Uuid> = u.groups.iter().map(|g| g.id).collect();
                let view = state.governance.budget_view(u.id, &groups, now);
                view.cap.map(|cap| (u.username.clone(), view.spent, cap))
            })
            .collect();
        capped.sort_by(|a, b| {
            let ratio = |x: &(String, NanoUsd, NanoUsd)| x.1 .0 as f64 / (x.2 .0.max(1)) as f64;
            ratio(b).total_cmp(&ratio(a))
        });
        w!(&mut b, "<h2>Spend against caps</h2>");
        if capped.is_empty() {
            w!(&mut b, "<p class=\"muted\">No user has a cap.</p>");
        } else {
            w!(&mut b, "<table id=\"caps\"><caption class=\"muted\">Closest to their cap first</caption><thead><tr><th scope=\"col\">User</th><th scope=\"col\" class=\"num\">Spent</th><th scope=\"col\" class=\"num\">Cap</th><th scope=\"col\">Used</th></tr></thead><tbody>");
            for (name, spent, cap) in capped.iter().take(15) {
                let pct = (spent.0 as f64 * 100.0 / cap.0.max(1) as f64).min(999.0);
                w!(
                    &mut b,
                    "<tr><td>",
                    (name),
                    "</td><td class=\"num\">$",
                    (spent.to_usd_string()),
                    "</td><td class=\"num\">$",
                    (cap.to_usd_string()),
                    "</td><td><meter min=\"0\" max=\"100\" high=\"90\" value=\"",
                    (format!("{:.0}", pct.min(100.0))),
                    "\" aria-label=\"",
                    (name),
                    " has used ",
                    (format!("{pct:.0}")),
                    "% of the cap\"></meter> ",
                    (format!("{pct:.0}%")),
                    "</td></tr>"
                );
            }
            w!(&mut b, "</tbody></table>");
        }
    }

    let mut users_sorted: Vec<_> = by_user.results.iter().collect();
    users_sorted.sort_by_key(|r| std::cmp::Reverse(r.cost_nano_usd));
    let mut models_sorted: Vec<_> = by_model.results.iter().collect();
    models_sorted.sort_by_key(|r| std::cmp::Reverse(r.cost_nano_usd));
    let user_bars: Vec<(String, f64, String)> = users_sorted
        .iter()
        .take(10)
        .map(|r| {
            let name = r
                .user
                .as_ref()
                .map(|u| u.username.clone())
                .unwrap_or_else(|| r.key.clone());
            (name, r.cost_nano_usd as f64, format!("${}", r.cost_usd))
        })
        .collect();
    let model_bars: Vec<(String, f64, String)> = models_sorted
        .iter()
        .take(10)
        .map(|r| {
            (
                r.key.clone(),
                r.cost_nano_usd as f64,
                format!("${}", r.cost_usd),
            )
        })
        .collect();
    let mut token_models: Vec<_> = by_model.results.iter().collect();
    token_models.sort_by_key(|r| std::cmp::Reverse(total_tokens(&r.token_usage)));
    let token_bars: Vec<(String, f64, String)> = token_models
        .iter()
        .take(10)
        .map(|r| {
            let t = total_tokens(&r.token_usage);
            (r.key.clone(), t as f64, format!("{t} tokens"))
        })
        .collect();
    let day_bars: Vec<(String, f64, String)> = by_day
        .results
        .iter()
        .map(|r| {
            (
                r.key.get(5..).unwrap_or(&r.key).to_string(),
                r.cost_nano_usd as f64,
                format!("${}", r.cost_usd),
            )
        })
        .collect();

    w!(
        &mut b,
        "<h2>This ",
        (mine.period),
        "</h2><div class=\"grid2\">"
    );
    bar_chart(
        &mut b,
        if viewer.is_admin() {
            "Top users by spend"
        } else {
            "Your spend"
        },
        &user_bars,
    );
    bar_chart(&mut b, "Top models by spend", &model_bars);
    bar_chart(&mut b, "Tokens by model", &token_bars);
    column_chart(
        &mut b,
        "Spend per day",
        &day_bars,
        (day_bars.len() / 8).max(1),
    );
    w!(&mut b, "</div>");

    w!(&mut b, "<h2>Last 24 hours</h2>");
    column_chart(&mut b, "Interceptions per hour (UTC)", &figures.hours, 3);
    Ok(b)
}

/// The overview's rollups of the period and its last-24-hours counts.
struct PeriodFigures {
    by_user: usage::UsageReport,
    by_model: usage::UsageReport,
    by_day: usage::UsageReport,
    hours: Vec<(String, f64, String)>,
}

/// The period's figures for this viewer (everyone's for an admin, their own for a member),
/// from the API's usage handler. Whole hours come from the hourly rollup, so this costs a few
/// milliseconds at any size and the overview is always current.
async fn period_figures(
    viewer: &Viewer,
    state: &Arc<AppState>,
    period_start: DateTime<Utc>,
) -> Result<PeriodFigures, ApiError> {
    let scope = if viewer.is_admin() {
        None
    } else {
        Some(viewer.principal.user_id)
    };
    let from = period_start.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let q = |group: &str| uri(&format!("/?group_by={group}&from={}", query_value(&from)));
    // On separate pool connections the three rollups run side by side.
    let (by_user, by_model, by_day) = tokio::join!(
        usage::usage(State(state.clone()), viewer.caller(), q("user")),
        usage::usage(State(state.clone()), viewer.caller(), q("model")),
        usage::usage(State(state.clone()), viewer.caller(), q("day")),
    );
    let (Json(by_user), Json(by_model), Json(by_day)) = (by_user?, by_model?, by_day?);

    // Interceptions per hour over the last day, from the hourly rollup.
    let now = Utc::now();
    let this_hour = now.duration_trunc(Duration::hours(1)).unwrap_or(now);
    let first = this_hour - Duration::hours(23);
    let counts: HashMap<DateTime<Utc>, i64> = state
        .store
        .queries()
        .interceptions_per_hour(first, scope)
        .await?
        .into_iter()
        .collect();
    let hours = (0..24)
        .map(|i| {
            let start = first + Duration::hours(i);
            let n = counts.get(&start).copied().unwrap_or(0);
            (
                start.format("%H:00").to_string(),
                n as f64,
                format!("{n} interceptions"),
            )
        })
        .collect();
    Ok(PeriodFigures {
        by_user,
        by_model,
        by_day,
        hours,
    })
}

// ---------------------------------------------------------------------------------------------
// Users

async fn users_page(viewer: Viewer, State(state): State<Arc<AppState>>) -> Response {
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Json(list) =
        match users::list_users(State(state.clone()), admin.clone(), uri("/?limit=1000")).await {
            Ok(l) => l,
            Err(e) => return api_error(e),
        };
    let Json(seat) = match seats::seats(State(state.clone()), admin, uri("/")).await {
        Ok(s) => s,
        Err(e) => return api_error(e),
    };
    let holders: HashMap<uuid::Uuid, DateTime<Utc>> = seat
        .holders
        .iter()
        .map(|h| (h.user.id, h.last_used_at))
        .collect();
    let now = Utc::now();
    let mut b = Html::new();
    w!(&mut b, "<h1>Users</h1><p class=\"muted\">", (list.count), " users; ", (seat.actual), " hold an AI seat",
        (seat.limit.map(|l| format!(" of {l}")).unwrap_or_default()),
        ". Spend is this budget period's; last activity is within the seat window.</p>",
        "<table id=\"users\"><thead><tr><th scope=\"col\">User</th><th scope=\"col\">Role</th><th scope=\"col\">Groups</th>",
        "<th scope=\"col\" class=\"num\">Budget</th><th scope=\"col\" class=\"num\">Spent</th><th scope=\"col\" class=\"num\">Remaining</th>",
        "<th scope=\"col\">AI seat</th><th scope=\"col\">Last activity</th></tr></thead><tbody>");
    for u in &list.users {
        let groups: Vec<uuid::Uuid> = u.groups.iter().map(|g| g.id).collect();
        let view = state.governance.budget_view(u.id, &groups, now);
        let names: Vec<&str> = u.groups.iter().map(|g| g.name.as_str()).collect();
        let last = holders.get(&u.id);
        w!(
            &mut b,
            "<tr data-user=\"",
            (u.username),
            "\"><th scope=\"row\">",
            (u.username),
            "</th><td>",
            (if u.is_admin { "admin" } else { "member" }),
            "</td><td>",
            (names.join(", ")),
            "</td><td class=\"num\">",
            (view
                .cap
                .map(|c| format!("${}", c.to_usd_string()))
                .unwrap_or_else(|| "no cap".into())),
            "</td><td class=\"num\">$",
            (view.spent.to_usd_string()),
            "</td><td class=\"num\">",
            (view
                .remaining()
                .map(|r| format!("${}", r.to_usd_string()))
                .unwrap_or_else(|| "—".into())),
            "</td><td>",
            (if last.is_some() { "Yes" } else { "No" }),
            "</td><td>",
            (last.map(|t| when(*t)).unwrap_or_else(|| "—".into())),
            "</td></tr>"
        );
    }
    w!(&mut b, "</tbody></table>");
    page_response(
        StatusCode::OK,
        layout(Some(&viewer), Tab::Users, "Users", b),
    )
}

// ---------------------------------------------------------------------------------------------
// Sessions

#[derive(serde::Deserialize)]
struct SessionsQuery {
    after_id: Option<String>,
    /// The API's session filter (`initiator:`, `model:`, `provider:`, `client:` terms).
    q: Option<String>,
}

async fn sessions_page(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Query(q): Query<SessionsQuery>,
) -> Response {
    const PAGE: usize = 50;
    let filter = q.q.as_deref().map(str::trim).filter(|f| !f.is_empty());
    let mut target = format!("/?limit={PAGE}");
    if let Some(f) = filter {
        target.push_str(&format!("&q={}", query_value(f)));
    }
    if let Some(after) = q.after_id.as_deref().filter(|a| !a.is_empty()) {
        target.push_str(&format!("&after_id={}", query_value(after)));
    }
    let Json(list) =
        match sessions::list_sessions(State(state.clone()), viewer.caller(), uri(&target)).await {
            Ok(l) => l,
            Err(ApiError::BadRequest(message)) => {
                let mut b = Html::new();
                w!(&mut b, "<h1>Sessions</h1>");
                sessions_filter_form(&mut b, filter);
                w!(
                    &mut b,
                    "<p class=\"banner error\" role=\"alert\">",
                    (message),
                    "</p>"
                );
                return page_response(
                    StatusCode::BAD_REQUEST,
                    layout(Some(&viewer), Tab::Sessions, "Sessions", b),
                );
            }
            Err(e) => return api_error(e),
        };
    let mut b = Html::new();
    w!(&mut b, "<h1>Sessions</h1>");
    sessions_filter_form(&mut b, filter);
    w!(&mut b, "<p class=\"muted\">", (list.count),
        (if viewer.is_admin() { " sessions" } else { " of your sessions" }), ", latest activity first.</p>",
        "<table id=\"sessions\"><thead><tr><th scope=\"col\">Session</th><th scope=\"col\">User</th><th scope=\"col\">Client</th>",
        "<th scope=\"col\">Models</th><th scope=\"col\" class=\"num\">Calls</th><th scope=\"col\" class=\"num\">Tokens</th>",
        "<th scope=\"col\" class=\"num\">Cost</th><th scope=\"col\">Last active</th><th scope=\"col\">Last prompt</th></tr></thead><tbody>");
    for s in &list.sessions {
        let prompt: String = s
            .last_prompt
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(90)
            .collect();
        // A client's session id is stored after its user's id (`{user id}:{session}`): the
        // part the client chose is what a reader recognises.
        let label = match s.id.split_once(':') {
            Some((user, session)) if uuid::Uuid::parse_str(user).is_ok() => session,
            _ => s.id.as_str(),
        };
        let short: String = label.chars().take(24).collect();
        w!(
            &mut b,
            "<tr><td><a href=\"/dashboard/sessions/",
            (path_segment(&s.id)),
            "\">",
            (short),
            "</a></td><td>",
            (s.initiator.username),
            "</td><td>",
            (s.client),
            "</td><td>",
            (s.models.join(", ")),
            "</td><td class=\"num\">",
            (s.interception_count),
            "</td><td class=\"num\">",
            (total_tokens(&s.token_usage_summary)),
            "</td><td class=\"num\">$",
            (s.cost_usd),
            "</td><td>",
            (when(s.last_active_at)),
            "</td><td>",
            (prompt),
            "</td></tr>"
        );
    }
    w!(&mut b, "</tbody></table>");
    if list.sessions.len() == PAGE {
        if let Some(last) = list.sessions.last() {
            w!(
                &mut b,
                "<p><a href=\"/dashboard/sessions?after_id=",
                (query_value(&last.id)),
                (filter
                    .map(|f| format!("&q={}", query_value(f)))
                    .unwrap_or_default()),
                "\">Older sessions</a></p>"
            );
        }
    }
    page_response(
        StatusCode::OK,
        layout(Some(&viewer), Tab::Sessions, "Sessions", b),
    )
}

/// The sessions list's filter box (the API's `q` syntax).
fn sessions_filter_form(b: &mut Html, filter: Option<&str>) {
    w!(
        b,
        "<form class=\"filters\" method=\"get\" action=\"/dashboard/sessions\" role=\"search\">",
        "<label for=\"q\">Filter<input id=\"q\" name=\"q\" type=\"search\" size=\"40\" ",
        "placeholder=\"initiator:alice model:gpt-4o client:curl\" value=\"",
        (filter.unwrap_or("")),
        "\"></label><button type=\"submit\">Filter</button></form>"
    );
}

async fn session_page(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Response {
    let Json(s) =
        match sessions::get_session(State(state.clone()), viewer.caller(), ApiPath(id)).await {
            Ok(s) => s,
            Err(e) => return api_error(e),
        };
    let mut b = Html::new();
    w!(&mut b, "<p><a href=\"/dashboard/sessions\">All sessions</a></p><h1>Session <code>", (s.id), "</code></h1>",
        "<div class=\"cards\"><div class=\"card\"><div class=\"muted\">User · client</div><div>",
        (s.initiator.username), " · ", (s.client), "</div></div>",
        "<div class=\"card\"><div class=\"muted\">Calls · threads</div><div class=\"big\">", (s.interception_count), " · ", (s.threads.len()),
        "</div></div><div class=\"card\"><div class=\"muted\">Cost</div><div class=\"big\" id=\"session-cost\">$", (s.cost_usd),
        "</div></div><div class=\"card\"><div class=\"muted\">Tokens</div><div class=\"big\">", (total_tokens(&s.token_usage_summary)),
        "</div></div></div><p class=\"muted\">", (when(s.started_at)), " to ", (when(s.ended_at)), "</p>");
    for (n, t) in s.threads.iter().enumerate() {
        w!(
            &mut b,
            "<section aria-labelledby=\"thread-",
            (n),
            "\"><h2 id=\"thread-",
            (n),
            "\">Thread ",
            (n + 1),
            " · ",
            (t.interception_count),
            (if t.interception_count == 1 {
                " call · $"
            } else {
                " calls · $"
            }),
            (t.cost_usd),
            "</h2>"
        );
        for (i, step) in t.interceptions.iter().enumerate() {
            render_step(&mut b, i + 1, step);
        }
        w!(&mut b, "</section>");
    }
    page_response(
        StatusCode::OK,
        layout(Some(&viewer), Tab::Sessions, "Session", b),
    )
}

fn render_step(b: &mut Html, n: usize, step: &Interception) {
    let u = &step.token_usage;
    // Estimated usage is said so: those counts are Tollgate's, not the provider's.
    let source = match step.usage_source.as_str() {
        "estimated" => " · usage estimated",
        "none" => " · no usage",
        _ => "",
    };
    w!(b, "<article class=\"step\"><h4>Step ", (n), ": ", (step.provider), " / ", (step.model), " · ", (step.status),
        " · ", (when(step.started_at)), (source), "</h4>",
        "<table><thead><tr><th scope=\"col\" class=\"num\">Input</th><th scope=\"col\" class=\"num\">Output</th>",
        "<th scope=\"col\" class=\"num\">Cache read</th><th scope=\"col\" class=\"num\">Cache write</th><th scope=\"col\" class=\"num\">Reasoning</th>",
        "<th scope=\"col\" class=\"num\">Cost</th></tr></thead><tbody><tr><td class=\"num\">", (u.input_tokens), "</td><td class=\"num\">",
        (u.output_tokens), "</td><td class=\"num\">", (u.cache_read_input_tokens), "</td><td class=\"num\">", (u.cache_write_input_tokens),
        "</td><td class=\"num\">", (u.reasoning_tokens), "</td><td class=\"num step-cost\">$", (step.cost_usd), "</td></tr></tbody></table>");
    for p in &step.user_prompts {
        w!(
            b,
            "<details open><summary>Prompt</summary><pre>",
            (p.prompt),
            "</pre></details>"
        );
    }
    for t in &step.tool_usages {
        w!(
            b,
            "<details><summary>Tool call: ",
            (t.tool),
            (if t.injected { " (injected)" } else { "" }),
            "</summary><pre>",
            (t.input),
            "</pre></details>"
        );
    }
    for th in step.model_thoughts.iter().flatten() {
        w!(
            b,
            "<details><summary>Thought (",
            (th.source),
            ")</summary><pre>",
            (th.content),
            "</pre></details>"
        );
    }
    w!(b, "</article>");
}

// ---------------------------------------------------------------------------------------------
// Usage explorer

#[derive(serde::Deserialize, Default)]
struct UsageQuery {
    group_by: Option<String>,
    from: Option<String>,
    to: Option<String>,
    /// Username or id (the API's `user`; members may only name themselves).
    user: Option<String>,
    model: Option<String>,
}

impl UsageQuery {
    fn api_uri(&self) -> Uri {
        let mut q = format!("/?group_by={}", query_value(self.group()));
        for (name, v) in [
            ("from", &self.from),
            ("to", &self.to),
            ("user", &self.user),
            ("model", &self.model),
        ] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                q.push_str(&format!("&{name}={}", query_value(v)));
            }
        }
        uri(&q)
    }

    fn group(&self) -> &str {
        self.group_by
            .as_deref()
            .filter(|g| !g.is_empty())
            .unwrap_or("user")
    }
}

const GROUPS: [&str; 6] = ["user", "group", "model", "provider", "client", "day"];

fn rollup_label(r: &usage::UsageRollup) -> String {
    r.user
        .as_ref()
        .map(|u| u.username.clone())
        .or_else(|| r.group.as_ref().map(|g| g.name.clone()))
        .unwrap_or_else(|| r.key.clone())
}

async fn usage_page(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Query(q): Query<UsageQuery>,
) -> Response {
    let report = usage::usage(State(state.clone()), viewer.caller(), q.api_uri()).await;
    let mut b = Html::new();
    w!(
        &mut b,
        "<h1>Usage</h1><form class=\"filters\" method=\"get\" action=\"/dashboard/usage\">",
        "<label for=\"group_by\">Group by<select id=\"group_by\" name=\"group_by\">"
    );
    for g in GROUPS {
        w!(&mut b, "<option value=\"", (g), "\"");
        if g == q.group() {
            w!(&mut b, " selected");
        }
        w!(&mut b, ">", (g), "</option>");
    }
    w!(&mut b, "</select></label><label for=\"from\">From (UTC)<input id=\"from\" name=\"from\" type=\"date\" value=\"",
        (q.from.as_deref().unwrap_or("")), "\"></label><label for=\"to\">To, inclusive<input id=\"to\" name=\"to\" type=\"date\" value=\"",
        (q.to.as_deref().unwrap_or("")), "\"></label>");
    if viewer.is_admin() {
        w!(&mut b, "<label for=\"user\">User<input id=\"user\" name=\"user\" type=\"text\" placeholder=\"username\" value=\"",
            (q.user.as_deref().unwrap_or("")), "\"></label>");
    }
    w!(&mut b, "<label for=\"model\">Model<input id=\"model\" name=\"model\" type=\"text\" placeholder=\"any\" value=\"",
        (q.model.as_deref().unwrap_or("")), "\"></label><button type=\"submit\">Show</button></form>");
    let report = match report {
        Ok(Json(r)) => r,
        Err(e) => {
            let status = e.status();
            let message = match e {
                ApiError::BadRequest(m) => m,
                _ => "The usage report could not be produced.".into(),
            };
            w!(
                &mut b,
                "<p class=\"banner error\" role=\"alert\">",
                (message),
                "</p>"
            );
            return page_response(status, layout(Some(&viewer), Tab::Usage, "Usage", b));
        }
    };
    let csv = q.api_uri().query().unwrap_or("").to_string();
    w!(
        &mut b,
        "<p><a href=\"/dashboard/usage.csv?",
        (csv),
        "\" download>Download CSV</a>",
        (if viewer.is_admin() {
            ""
        } else {
            " · your own usage only"
        }),
        "</p>"
    );
    let bars: Vec<(String, f64, String)> = report
        .results
        .iter()
        .map(|r| {
            (
                rollup_label(r),
                r.cost_nano_usd as f64,
                format!("${}", r.cost_usd),
            )
        })
        .collect();
    if report.group_by == "day" {
        column_chart(&mut b, "Spend per day", &bars, (bars.len() / 8).max(1));
    } else {
        let mut top = bars.clone();
        top.sort_by(|a, b| b.1.total_cmp(&a.1));
        top.truncate(15);
        bar_chart(&mut b, "Spend", &top);
    }
    w!(&mut b, "<table id=\"usage\"><thead><tr><th scope=\"col\">", (report.group_by), "</th><th scope=\"col\" class=\"num\">Calls</th>",
        "<th scope=\"col\" class=\"num\">Input</th><th scope=\"col\" class=\"num\">Output</th><th scope=\"col\" class=\"num\">Cache read</th>",
        "<th scope=\"col\" class=\"num\">Cache write</th><th scope=\"col\" class=\"num\">Reasoning</th><th scope=\"col\" class=\"num\">Cost (USD)</th></tr></thead><tbody>");
    for r in &report.results {
        let u = &r.token_usage;
        w!(
            &mut b,
            "<tr data-key=\"",
            (r.key),
            "\"><th scope=\"row\">",
            (rollup_label(r)),
            "</th><td class=\"num\">",
            (r.interception_count),
            "</td><td class=\"num\">",
            (u.input_tokens),
            "</td><td class=\"num\">",
            (u.output_tokens),
            "</td><td class=\"num\">",
            (u.cache_read_input_tokens),
            "</td><td class=\"num\">",
            (u.cache_write_input_tokens),
            "</td><td class=\"num\">",
            (u.reasoning_tokens),
            "</td><td class=\"num cost\">",
            (r.cost_usd),
            "</td></tr>"
        );
    }
    w!(&mut b, "</tbody></table>");
    page_response(
        StatusCode::OK,
        layout(Some(&viewer), Tab::Usage, "Usage", b),
    )
}

async fn usage_csv(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Query(q): Query<UsageQuery>,
) -> Response {
    let Json(report) = match usage::usage(State(state.clone()), viewer.caller(), q.api_uri()).await
    {
        Ok(r) => r,
        Err(e) => return api_error(e),
    };
    let mut out = String::from("key,label,interceptions,input_tokens,output_tokens,cache_read_input_tokens,cache_write_input_tokens,reasoning_tokens,cost_usd,cost_nano_usd\r\n");
    for r in &report.results {
        let u = &r.token_usage;
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{}\r\n",
            csv::field(&r.key),
            csv::field(&rollup_label(r)),
            r.interception_count,
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_write_input_tokens,
            u.reasoning_tokens,
            r.cost_usd,
            r.cost_nano_usd
        ));
    }
    let mut resp = out.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"tollgate-usage-{}.csv\"",
        report.group_by
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

// ---------------------------------------------------------------------------------------------
// Budgets and pricing editors

#[derive(serde::Deserialize, Default)]
struct Notice {
    saved: Option<String>,
}

async fn budgets_page(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Query(n): Query<Notice>,
) -> Response {
    render_budgets(
        &viewer,
        &state,
        StatusCode::OK,
        n.saved
            .as_deref()
            .map(|_| Ok("Saved. It applies within a few seconds.")),
    )
    .await
}

async fn render_budgets(
    viewer: &Viewer,
    state: &Arc<AppState>,
    status: StatusCode,
    notice: Option<Result<&str, &str>>,
) -> Response {
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Json(list) =
        match budgets::list_budgets(State(state.clone()), admin.clone(), uri("/")).await {
            Ok(l) => l,
            Err(e) => return api_error(e),
        };
    let Json(people) =
        match users::list_users(State(state.clone()), admin.clone(), uri("/?limit=1000")).await {
            Ok(l) => l,
            Err(e) => return api_error(e),
        };
    let Json(groups) =
        match users::list_groups(State(state.clone()), admin, uri("/?limit=1000")).await {
            Ok(l) => l,
            Err(e) => return api_error(e),
        };
    let mut b = Html::new();
    w!(&mut b, "<h1>Budgets</h1>");
    notice_banner(&mut b, notice);
    w!(&mut b, "<p class=\"muted\">Caps per ", (format!("{:?}", state.config().budgets.period).to_lowercase()),
        ". A user's own cap wins; else their groups' (", (format!("{:?}", state.config().budgets.group_policy).to_lowercase()),
        "); else the default.</p><table id=\"budgets\"><thead><tr><th scope=\"col\">Scope</th><th scope=\"col\">Applies to</th>",
        "<th scope=\"col\" class=\"num\">Limit (USD)</th><th scope=\"col\">Updated</th><th scope=\"col\">Remove</th></tr></thead><tbody>");
    for bud in &list.budgets {
        w!(
            &mut b,
            "<tr><td>",
            (bud.scope),
            "</td><th scope=\"row\">",
            (bud.scope_name.as_deref().unwrap_or("everyone")),
            "</th><td class=\"num\">",
            (bud.limit_usd),
            "</td><td>",
            (when(bud.updated_at)),
            "</td><td>"
        );
        let target = match bud.scope_id {
            Some(id) => format!("{}:{id}", bud.scope),
            None => bud.scope.clone(),
        };
        remove_form(
            &mut b,
            "/dashboard/budgets/remove",
            &viewer.csrf,
            "target",
            &target,
            bud.scope_name.as_deref().unwrap_or("the default cap"),
        );
        w!(&mut b, "</td></tr>");
    }
    w!(&mut b, "</tbody></table><h2>Set a cap</h2><form class=\"editor\" method=\"post\" action=\"/dashboard/budgets\">",
        "<input type=\"hidden\" name=\"csrf\" value=\"", (viewer.csrf), "\">",
        "<label for=\"target\">Applies to<select id=\"target\" name=\"target\"><option value=\"default\">Default (everyone)</option><optgroup label=\"Groups\">");
    for g in &groups.groups {
        w!(
            &mut b,
            "<option value=\"group:",
            (g.id),
            "\">",
            (g.name),
            "</option>"
        );
    }
    w!(&mut b, "</optgroup><optgroup label=\"Users\">");
    for u in &people.users {
        w!(
            &mut b,
            "<option value=\"user:",
            (u.id),
            "\">",
            (u.username),
            "</option>"
        );
    }
    w!(&mut b, "</optgroup></select></label><label for=\"limit_usd\">Limit per period (USD)<input id=\"limit_usd\" name=\"limit_usd\" inputmode=\"decimal\" required placeholder=\"250.00\"></label>",
        "<button type=\"submit\">Save cap</button></form>");
    page_response(status, layout(Some(viewer), Tab::Budgets, "Budgets", b))
}

fn notice_banner(b: &mut Html, notice: Option<Result<&str, &str>>) {
    match notice {
        Some(Ok(m)) => w!(b, "<p class=\"banner ok\" role=\"status\">", (m), "</p>"),
        Some(Err(m)) => w!(b, "<p class=\"banner error\" role=\"alert\">", (m), "</p>"),
        None => {}
    }
}

async fn save_budget(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = viewer.check_csrf(form.get("csrf").map(String::as_str)) {
        return refused;
    }
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let target = form.get("target").map(String::as_str).unwrap_or("");
    let (scope, scope_id) = match target.split_once(':') {
        Some((scope, id)) => (scope.to_string(), uuid::Uuid::parse_str(id).ok()),
        None => (target.to_string(), None),
    };
    let body = budgets::SetBudget {
        scope,
        scope_id,
        limit_usd: form
            .get("limit_usd")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    };
    match budgets::put_budget(State(state.clone()), admin, ApiJson(body)).await {
        Ok(_) => Redirect::to("/dashboard/budgets?saved=1").into_response(),
        Err(e) => {
            let message = editor_error(&e);
            render_budgets(&viewer, &state, e.status(), Some(Err(&message))).await
        }
    }
}

fn editor_error(e: &ApiError) -> String {
    match e {
        ApiError::BadRequest(m)
        | ApiError::Unprocessable(m)
        | ApiError::NotFound(m)
        | ApiError::Conflict(m) => m.clone(),
        _ => "The change could not be saved.".into(),
    }
}

async fn pricing_page(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Query(n): Query<Notice>,
) -> Response {
    render_pricing(
        &viewer,
        &state,
        StatusCode::OK,
        n.saved
            .as_deref()
            .map(|_| Ok("Saved. New requests use this price within a few seconds.")),
    )
    .await
}

async fn render_pricing(
    viewer: &Viewer,
    state: &Arc<AppState>,
    status: StatusCode,
    notice: Option<Result<&str, &str>>,
) -> Response {
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Json(list) = match budgets::list_prices(State(state.clone()), admin, uri("/")).await {
        Ok(l) => l,
        Err(e) => return api_error(e),
    };
    let mut b = Html::new();
    w!(&mut b, "<h1>Pricing</h1>");
    notice_banner(&mut b, notice);
    w!(&mut b, "<h2>Set a price</h2><form class=\"editor\" method=\"post\" action=\"/dashboard/pricing\">",
        "<input type=\"hidden\" name=\"csrf\" value=\"", (viewer.csrf), "\">",
        "<label for=\"model\">Model<input id=\"model\" name=\"model\" list=\"models\" required></label><datalist id=\"models\">");
    for p in &list.prices {
        w!(&mut b, "<option value=\"", (p.model), "\"></option>");
    }
    w!(&mut b, "</datalist>");
    for (name, label) in [
        ("input", "Input"),
        ("output", "Output"),
        ("cache_read", "Cache read"),
        ("cache_write", "Cache write"),
    ] {
        w!(
            &mut b,
            "<label for=\"",
            (name),
            "\">",
            (label),
            " (USD / 1M tokens)<input id=\"",
            (name),
            "\" name=\"",
            (name),
            "\" inputmode=\"decimal\" required placeholder=\"0.00\"></label>"
        );
    }
    w!(&mut b, "<button type=\"submit\">Save price</button></form><h2>Effective prices</h2><p class=\"muted\">USD per million tokens; overrides first.</p>",
        "<table id=\"prices\"><thead><tr><th scope=\"col\">Model</th><th scope=\"col\">Provider</th><th scope=\"col\" class=\"num\">Input</th>",
        "<th scope=\"col\" class=\"num\">Output</th><th scope=\"col\" class=\"num\">Cache read</th><th scope=\"col\" class=\"num\">Cache write</th>",
        "<th scope=\"col\">Source</th><th scope=\"col\">Remove</th></tr></thead><tbody>");
    let mut prices: Vec<_> = list.prices.iter().collect();
    prices.sort_by_key(|p| (p.source != "override", p.model.clone()));
    for p in prices {
        w!(
            &mut b,
            "<tr><th scope=\"row\">",
            (p.model),
            "</th><td>",
            (p.provider),
            "</td><td class=\"num\">",
            (p.input),
            "</td><td class=\"num\">",
            (p.output),
            "</td><td class=\"num\">",
            (p.cache_read),
            "</td><td class=\"num\">",
            (p.cache_write),
            "</td><td>",
            (p.source),
            "</td><td>"
        );
        if p.source == "override" {
            remove_form(
                &mut b,
                "/dashboard/pricing/remove",
                &viewer.csrf,
                "model",
                &p.model,
                &p.model,
            );
        }
        w!(&mut b, "</td></tr>");
    }
    w!(&mut b, "</tbody></table>");
    page_response(status, layout(Some(viewer), Tab::Pricing, "Pricing", b))
}

async fn save_price(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = viewer.check_csrf(form.get("csrf").map(String::as_str)) {
        return refused;
    }
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let field = |n: &str| {
        form.get(n)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let body = budgets::SetPrice {
        provider: None,
        input: field("input"),
        output: field("output"),
        cache_read: field("cache_read"),
        cache_write: field("cache_write"),
        output_limit: None,
    };
    match budgets::put_price(
        State(state.clone()),
        admin,
        ApiPath(field("model")),
        ApiJson(body),
    )
    .await
    {
        Ok(_) => Redirect::to("/dashboard/pricing?saved=1").into_response(),
        Err(e) => {
            let message = editor_error(&e);
            render_pricing(&viewer, &state, e.status(), Some(Err(&message))).await
        }
    }
}

/// A one-button form posting `name=value` (and the CSRF token) to `action`; `what` names the
/// thing removed for screen readers.
fn remove_form(
    b: &mut Html,
    action: &'static str,
    csrf: &str,
    name: &'static str,
    value: &str,
    what: &str,
) {
    w!(
        b,
        "<form method=\"post\" action=\"",
        (action),
        "\"><input type=\"hidden\" name=\"csrf\" value=\"",
        (csrf),
        "\"><input type=\"hidden\" name=\"",
        (name),
        "\" value=\"",
        (value),
        "\"><button type=\"submit\" class=\"remove\" aria-label=\"Remove ",
        (what),
        "\">Remove</button></form>"
    );
}

async fn remove_budget(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = viewer.check_csrf(form.get("csrf").map(String::as_str)) {
        return refused;
    }
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let target = form.get("target").cloned().unwrap_or_default();
    let result = match target.split_once(':') {
        Some((scope, id)) => {
            budgets::delete_scoped_budget(
                State(state.clone()),
                admin,
                ApiPath((scope.to_string(), id.to_string())),
            )
            .await
        }
        None => budgets::delete_default_budget(State(state.clone()), admin, ApiPath(target)).await,
    };
    match result {
        Ok(_) => Redirect::to("/dashboard/budgets?saved=1").into_response(),
        Err(e) => {
            let message = editor_error(&e);
            render_budgets(&viewer, &state, e.status(), Some(Err(&message))).await
        }
    }
}

async fn remove_price(
    viewer: Viewer,
    State(state): State<Arc<AppState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if let Err(refused) = viewer.check_csrf(form.get("csrf").map(String::as_str)) {
        return refused;
    }
    let admin = match viewer.admin() {
        Ok(a) => a,
        Err(r) => return r,
    };
    let model = form.get("model").cloned().unwrap_or_default();
    match budgets::delete_price(State(state.clone()), admin, ApiPath(model)).await {
        Ok(_) => Redirect::to("/dashboard/pricing?saved=1").into_response(),
        Err(e) => {
            let message = editor_error(&e);
            render_pricing(&viewer, &state, e.status(), Some(Err(&message))).await
        }
    }
}
