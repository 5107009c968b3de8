//! The dashboard over HTTP against the real binary: sign-in into a session cookie, every page
//! rendered from seeded interceptions, the numbers on the pages equal to the API's, the budget
//! editor's change enforced by the gateway, members confined to their own records, and forms
//! refused without their CSRF token.

use crate::common;

use std::time::{Duration, Instant};

use common::dashboard::browser as http;
use common::dashboard::{csrf_of, dashboard_post, sign_in_response};
use common::mock::{MockResponse, MockUpstream};
use common::server::{Tollgate, OPENAI_CENTRAL_KEY};
use serde_json::{json, Value};

async fn upstream() -> MockUpstream {
    MockUpstream::start(|req| match req.path_without_query() {
        "/v1/chat/completions" => MockResponse::fixture("openai-chat.json"),
        "/v1/messages" => MockResponse::fixture("anthropic-messages.json"),
        other => MockResponse::json(500, json!({"unexpected": other})),
    })
    .await
}

async fn chat(tg: &Tollgate, key: &str, session: &str, prompt: &str) -> reqwest::Response {
    http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(key)
        .header("x-tollgate-session", session)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap()
}

async fn messages(tg: &Tollgate, key: &str, session: &str) -> reqwest::Response {
    http()
        .post(format!("{}/anthropic/v1/messages", tg.gateway))
        .bearer_auth(key)
        .header("x-tollgate-session", session)
        .json(&json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
            "messages": [{"role": "user", "content": "Fix the flaky test."}]}))
        .send()
        .await
        .unwrap()
}

async fn api(tg: &Tollgate, key: &str, path: &str) -> Value {
    let resp = http()
        .get(format!("{}{path}", tg.admin))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

/// Signs in through the form and returns the `Cookie` header value the browser would send.
async fn sign_in(tg: &Tollgate, key: &str) -> String {
    let resp = sign_in_response(tg, key).await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(set.contains(attribute), "{attribute} missing from {set}");
    }
    assert!(
        !set.contains("Secure"),
        "plain HTTP: a Secure cookie would never come back"
    );
    set.split(';').next().unwrap().to_string()
}

struct Page {
    status: u16,
    text: String,
}

async fn page(tg: &Tollgate, cookie: &str, path: &str) -> Page {
    let resp = http()
        .get(format!("{}{path}", tg.admin))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status == 200 && !path.contains(".csv") {
        assert_eq!(resp.headers()["content-type"], "text/html; charset=utf-8");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        assert!(resp.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'"));
    }
    Page {
        status,
        text: resp.text().await.unwrap(),
    }
}

async fn page_ok(tg: &Tollgate, cookie: &str, path: &str) -> String {
    let p = page(tg, cookie, path).await;
    assert_eq!(p.status, 200, "GET {path}: {}", p.text);
    p.text
}

/// The `<tr>` whose opening tag carries `marker`, up to its end.
fn row<'a>(html: &'a str, marker: &str) -> &'a str {
    let start = html
        .find(marker)
        .unwrap_or_else(|| panic!("no row {marker}"));
    let end = start + html[start..].find("</tr>").unwrap();
    &html[start..end]
}

/// The session a user's client session id names: `{user id}:{client session id}` (sessions
/// are per user).
async fn session_of(tg: &Tollgate, username: &str, client_session: &str) -> String {
    let id: String = tg
        .scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = ?",
            &[username],
        )
        .await;
    format!("{id}:{client_session}")
}

/// Two members with calls in two sessions, an admin with none, a seat limit of 2 (so the two
/// seat holders are at 100 %: the warning).
async fn seeded() -> (MockUpstream, Tollgate, String, String, String) {
    seeded_with_seats(2).await
}

async fn seeded_with_seats(limit: u32) -> (MockUpstream, Tollgate, String, String, String) {
    let up = upstream().await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &up.base_url())
        .provider("anthropic", "anthropic", &up.base_url())
        .extra(&format!("[seats]\nlimit = {limit}"))
        .start()
        .await;
    let admin = tg.admin_key("root");
    let alice = tg.user_key("alice");
    let bob = tg.user_key("bob");
    assert_eq!(
        chat(&tg, &alice, "sess-alice", "<script>alert(1)</script> why?")
            .await
            .status(),
        200
    );
    assert_eq!(
        chat(&tg, &alice, "sess-alice", "and then?").await.status(),
        200
    );
    assert_eq!(messages(&tg, &alice, "sess-alice").await.status(), 200);
    assert_eq!(chat(&tg, &bob, "sess-bob", "hello").await.status(), 200);
    tg.wait_until_recorded(4).await;
    (up, tg, admin, alice, bob)
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_render_seeded_data_with_the_apis_numbers() {
    let (_up, tg, admin, alice, bob) = seeded().await;
    // Signed out, every page sends the browser to the sign-in form.
    let out = page(&tg, "", "/dashboard/usage").await;
    assert_eq!(out.status, 303);
    let bad = http()
        .post(format!("{}/dashboard/sign-in", tg.admin))
        .form(&[("key", "tg_not_a_key")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get("set-cookie").is_none());

    // Another site cannot sign a visitor in with a key of its choosing.
    let forged = http()
        .post(format!("{}/dashboard/sign-in", tg.admin))
        .header("origin", "https://evil.example")
        .form(&[("key", admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("set-cookie").is_none());
    let opaque = http()
        .post(format!("{}/dashboard/sign-in", tg.admin))
        .header("origin", "null")
        .form(&[("key", admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(opaque.status(), 403);
    let same_site = http()
        .post(format!("{}/dashboard/sign-in", tg.admin))
        .header("origin", tg.admin.as_str())
        .form(&[("key", admin.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(same_site.status(), 303);

    let cookie = sign_in(&tg, &admin).await;
    let mut all_pages = String::new();

    // Overview: the seat banner exactly as the API words it, the period's totals.
    let seats = api(&tg, &admin, "/api/v2/seats").await;
    assert_eq!(seats["state"], "warning", "{seats}");
    let overview = page_ok(&tg, &cookie, "/dashboard").await;
    let message = seats["message"].as_str().unwrap();
    assert_eq!(message, "You have used 100% of your AI seats.");
    assert!(
        overview.contains(&format!("id=\"seat-banner\">{message}</p>")),
        "{overview}"
    );
    let by_user = api(&tg, &admin, "/api/v2/usage?group_by=user").await;
    let total: i64 = by_user["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cost_nano_usd"].as_i64().unwrap())
        .sum();
    let count: i64 = by_user["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["interception_count"].as_i64().unwrap())
        .sum();
    assert_eq!(count, 4);
    assert!(total > 0);
    let total_usd = format!("{}.{:09}", total / 1_000_000_000, total % 1_000_000_000);
    let total_usd = total_usd.trim_end_matches('0').trim_end_matches('.');
    assert!(
        overview.contains(&format!("id=\"period-count\">{count}<")),
        "{overview}"
    );
    let shown = overview
        .split("id=\"period-spend\">$")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap();
    assert_eq!(shown.trim_end_matches('0').trim_end_matches('.'), total_usd);
    assert!(
        overview.contains("<svg role=\"img\""),
        "charts are inline SVG"
    );
    all_pages.push_str(&overview);

    // Users: spent per user as that user's own budget endpoint reports it; seat column.
    let users = page_ok(&tg, &cookie, "/dashboard/users").await;
    for (name, key) in [("alice", &alice), ("bob", &bob)] {
        let budget = api(&tg, key, "/api/v2/users/me/budget").await;
        let r = row(&users, &format!("data-user=\"{name}\""));
        assert!(
            r.contains(&format!("${}</td>", budget["spent_usd"].as_str().unwrap())),
            "{r}\n{budget}"
        );
        assert!(r.contains("<td>Yes</td>"), "{name} holds a seat: {r}");
    }
    assert!(row(&users, "data-user=\"root\"").contains("<td>No</td>"));
    all_pages.push_str(&users);

    // Usage explorer by model: every row's count and cost equal the API's; the CSV too.
    let usage_api = api(&tg, &admin, "/api/v2/usage?group_by=model").await;
    let usage_page = page_ok(&tg, &cookie, "/dashboard/usage?group_by=model").await;
    let csv = page_ok(&tg, &cookie, "/dashboard/usage.csv?group_by=model").await;
    let results = usage_api["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{usage_api}");
    assert_eq!(csv.lines().count(), 1 + results.len(), "{csv}");
    for r in results {
        let key = r["key"].as_str().unwrap();
        let cost = r["cost_usd"].as_str().unwrap();
        let n = r["interception_count"].as_i64().unwrap();
        let tr = row(&usage_page, &format!("data-key=\"{key}\""));
        assert!(
            tr.contains(&format!("<td class=\"num cost\">{cost}</td>")),
            "{tr}"
        );
        assert!(tr.contains(&format!("<td class=\"num\">{n}</td>")), "{tr}");
        let line = csv
            .lines()
            .find(|l| l.starts_with(&format!("{key},")))
            .unwrap();
        let cells: Vec<&str> = line.split(',').collect();
        assert_eq!(cells[2], n.to_string());
        assert_eq!(cells[8], cost);
        assert_eq!(cells[9], r["cost_nano_usd"].as_i64().unwrap().to_string());
    }
    all_pages.push_str(&usage_page);
    for group in ["user", "group", "provider", "client", "day"] {
        all_pages.push_str(
            &page_ok(
                &tg,
                &cookie,
                &format!("/dashboard/usage?group_by={group}&from=2020-01-01&to=2099-12-31"),
            )
            .await,
        );
    }
    let refused = page(&tg, &cookie, "/dashboard/usage?group_by=planet").await;
    assert_eq!(refused.status, 400);
    // The user and model filters narrow the report exactly as the API's do.
    for (filter, api_filter) in [
        ("user=alice", "user=alice"),
        ("model=gpt-4o", "model=gpt-4o"),
    ] {
        let want = api(
            &tg,
            &admin,
            &format!("/api/v2/usage?group_by=model&{api_filter}"),
        )
        .await;
        let got = page_ok(
            &tg,
            &cookie,
            &format!("/dashboard/usage?group_by=model&{filter}"),
        )
        .await;
        let rows = want["results"].as_array().unwrap();
        assert!(!rows.is_empty(), "{want}");
        assert_eq!(got.matches("<tr data-key=").count(), rows.len(), "{filter}");
        for r in rows {
            let tr = row(
                &got,
                &format!("data-key=\"{}\"", r["key"].as_str().unwrap()),
            );
            assert!(
                tr.contains(&format!(
                    "<td class=\"num cost\">{}</td>",
                    r["cost_usd"].as_str().unwrap()
                )),
                "{tr}"
            );
        }
        assert!(got.contains(&format!("value=\"{}\"", filter.split_once('=').unwrap().1)));
    }

    // Sessions list and one session: the API's cost, each step, the prompt escaped.
    let (sess_alice, sess_bob) = (
        session_of(&tg, "alice", "sess-alice").await,
        session_of(&tg, "bob", "sess-bob").await,
    );
    let sessions = page_ok(&tg, &cookie, "/dashboard/sessions").await;
    assert!(sessions.contains(&format!("href=\"/dashboard/sessions/{sess_alice}\"")));
    assert!(sessions.contains(&format!("href=\"/dashboard/sessions/{sess_bob}\"")));
    // The filter box passes the API's `q` through: only alice's session is left.
    let filtered = page_ok(&tg, &cookie, "/dashboard/sessions?q=initiator%3Aalice").await;
    assert!(filtered.contains(&format!("href=\"/dashboard/sessions/{sess_alice}\"")));
    assert!(!filtered.contains(&format!("href=\"/dashboard/sessions/{sess_bob}\"")));
    assert!(filtered.contains("value=\"initiator:alice\""), "{filtered}");
    let bad = page(&tg, &cookie, "/dashboard/sessions?q=planet%3Amars").await;
    assert_eq!(
        bad.status, 400,
        "an unknown filter key is explained, not a 500"
    );
    let detail = api(
        &tg,
        &admin,
        &format!("/api/v2/aibridge/sessions/{sess_alice}"),
    )
    .await;
    let session = page_ok(&tg, &cookie, &format!("/dashboard/sessions/{sess_alice}")).await;
    assert!(session.contains(&format!(
        "id=\"session-cost\">${}<",
        detail["cost_usd"].as_str().unwrap()
    )));
    let steps: Vec<&Value> = detail["threads"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["interceptions"].as_array().unwrap())
        .collect();
    assert_eq!(steps.len(), 3);
    for s in &steps {
        assert!(session.contains(&format!(
            "step-cost\">${}</td>",
            s["cost_usd"].as_str().unwrap()
        )));
    }
    assert!(session.contains("&lt;script&gt;alert(1)&lt;/script&gt; why?"));
    assert!(
        !session.contains("<script>"),
        "a prompt never becomes markup"
    );
    all_pages.push_str(&sessions);
    all_pages.push_str(&session);

    // Editors list what the API lists.
    let budgets = page_ok(&tg, &cookie, "/dashboard/budgets").await;
    assert!(budgets.contains("<option value=\"user:"), "{budgets}");
    let pricing = page_ok(&tg, &cookie, "/dashboard/pricing").await;
    let prices = api(&tg, &admin, "/api/v2/pricing").await;
    let gpt = prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == "gpt-4o")
        .unwrap();
    assert!(row(&pricing, "<tr><th scope=\"row\">gpt-4o</th>")
        .contains(&format!(">{}</td>", gpt["input"].as_str().unwrap())));
    all_pages.push_str(&budgets);
    all_pages.push_str(&pricing);

    // No page carries a secret: neither a Tollgate key nor the central provider key.
    for secret in [
        admin.as_str(),
        alice.as_str(),
        bob.as_str(),
        OPENAI_CENTRAL_KEY,
    ] {
        assert!(!all_pages.contains(secret), "a page shows a secret");
    }
    let css = http()
        .get(format!("{}/dashboard/assets/style.css", tg.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn members_see_only_their_own_records() {
    let (_up, tg, _admin, alice, bob) = seeded().await;
    let cookie = sign_in(&tg, &bob).await;
    let overview = page_ok(&tg, &cookie, "/dashboard").await;
    assert!(
        !overview.contains("seat-banner"),
        "the seat banner is for admins"
    );
    assert!(
        !overview.contains("href=\"/dashboard/users\""),
        "no admin links for members"
    );
    let mine = api(&tg, &bob, "/api/v2/users/me/budget").await;
    assert!(overview.contains(&format!(
        "id=\"my-spent\">${}<",
        mine["spent_usd"].as_str().unwrap()
    )));

    let (sess_alice, sess_bob) = (
        session_of(&tg, "alice", "sess-alice").await,
        session_of(&tg, "bob", "sess-bob").await,
    );
    let sessions = page_ok(&tg, &cookie, "/dashboard/sessions").await;
    assert!(sessions.contains("sess-bob"));
    assert!(!sessions.contains("sess-alice"), "{sessions}");
    assert_eq!(
        page(&tg, &cookie, &format!("/dashboard/sessions/{sess_alice}"))
            .await
            .status,
        403
    );
    assert_eq!(
        page(&tg, &cookie, "/dashboard/sessions/no-such-session")
            .await
            .status,
        404
    );
    assert!(
        page_ok(&tg, &cookie, &format!("/dashboard/sessions/{sess_bob}"))
            .await
            .contains("hello")
    );
    for admin_only in [
        "/dashboard/users",
        "/dashboard/budgets",
        "/dashboard/pricing",
    ] {
        assert_eq!(
            page(&tg, &cookie, admin_only).await.status,
            403,
            "{admin_only}"
        );
    }
    // The usage explorer is confined to the member: one user row, bob's, with bob's numbers.
    let usage = page_ok(&tg, &cookie, "/dashboard/usage?group_by=user").await;
    assert!(!usage.contains(">alice<"), "{usage}");
    let own = api(&tg, &bob, "/api/v2/usage?group_by=user").await;
    let cost = own["results"][0]["cost_usd"].as_str().unwrap();
    assert!(usage.contains(&format!("<td class=\"num cost\">{cost}</td>")));
    // A member's form post to an admin editor is refused even with a valid token.
    let csrf = csrf_of(&overview);
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/budgets",
        &[("csrf", &csrf), ("target", "default"), ("limit_usd", "0")],
    )
    .await;
    assert_eq!(resp.status(), 403);
    let after = api(&tg, &alice, "/api/v2/users/me/budget").await;
    assert_eq!(after["limit_usd"], Value::Null, "nothing was capped");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_budget_set_in_the_editor_is_enforced_and_forms_need_their_csrf_token() {
    let (_up, tg, admin, alice, _bob) = seeded().await;
    let cookie = sign_in(&tg, &admin).await;
    let editor = page_ok(&tg, &cookie, "/dashboard/budgets").await;
    let csrf = csrf_of(&editor);
    let users = api(&tg, &admin, "/api/v2/users").await;
    let alice_id = users["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["username"] == "alice")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let target = format!("user:{alice_id}");

    // Without the token, or with another one, the form is refused and nothing changes.
    for form in [
        vec![("target", target.as_str()), ("limit_usd", "0")],
        vec![
            ("csrf", "0000"),
            ("target", target.as_str()),
            ("limit_usd", "0"),
        ],
    ] {
        let resp = dashboard_post(&tg, &cookie, "/dashboard/budgets", &form).await;
        assert_eq!(resp.status(), 403);
    }
    assert_eq!(api(&tg, &admin, "/api/v2/budgets").await["count"], 0);
    assert_eq!(
        chat(&tg, &alice, "sess-alice", "still allowed")
            .await
            .status(),
        200
    );

    // A bad amount comes back as the editor with the API's reason.
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/budgets",
        &[("csrf", &csrf), ("target", &target), ("limit_usd", "lots")],
    )
    .await;
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("role=\"alert\""));

    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/budgets",
        &[
            ("csrf", &csrf),
            ("target", &target),
            ("limit_usd", "0.000001"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], "/dashboard/budgets?saved=1");
    let budgets = api(&tg, &admin, "/api/v2/budgets").await;
    assert_eq!(budgets["budgets"][0]["scope_name"], "alice", "{budgets}");
    assert!(page_ok(&tg, &cookie, "/dashboard/budgets?saved=1")
        .await
        .contains("0.000001"));

    // Alice has spent more than a micro-dollar: her next call is refused with 402.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = chat(&tg, &alice, "sess-alice", "over budget?")
            .await
            .status();
        if status == 402 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new cap was not enforced: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A price saved through the pricing editor is what the API then reports.
    let pricing = page_ok(&tg, &cookie, "/dashboard/pricing").await;
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/pricing",
        &[
            ("csrf", &csrf_of(&pricing)),
            ("model", "my-model"),
            ("input", "1.5"),
            ("output", "3"),
            ("cache_read", "0.1"),
            ("cache_write", "0"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 303);
    let prices = api(&tg, &admin, "/api/v2/pricing").await;
    let mine = prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == "my-model")
        .unwrap();
    assert_eq!(mine["source"], "override");
    assert_eq!(mine["output"], "3.00");

    // The remove buttons undo both through the API: alice may call again, the override is gone.
    let editor = page_ok(&tg, &cookie, "/dashboard/budgets").await;
    assert!(editor.contains(&format!("name=\"target\" value=\"{target}\"")));
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/budgets/remove",
        &[("target", &target)],
    )
    .await;
    assert_eq!(resp.status(), 403, "removing needs the CSRF token too");
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/budgets/remove",
        &[("csrf", &csrf), ("target", &target)],
    )
    .await;
    assert_eq!(resp.status(), 303);
    assert_eq!(api(&tg, &admin, "/api/v2/budgets").await["count"], 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while chat(&tg, &alice, "sess-alice", "allowed again?")
        .await
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "the removed cap still applies");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resp = dashboard_post(
        &tg,
        &cookie,
        "/dashboard/pricing/remove",
        &[("csrf", &csrf), ("model", "my-model")],
    )
    .await;
    assert_eq!(resp.status(), 303);
    let prices = api(&tg, &admin, "/api/v2/pricing").await;
    assert!(!prices["prices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["model"] == "my-model" && p["source"] == "override"));

    // Sign-out needs the token too, then clears the cookie.
    assert_eq!(
        dashboard_post(&tg, &cookie, "/dashboard/sign-out", &[])
            .await
            .status(),
        403
    );
    let resp = dashboard_post(&tg, &cookie, "/dashboard/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(resp.status(), 303);
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_over_limit_seat_message_is_the_contracts_and_seats_within_limits_show_none() {
    let (_up, tg, admin, _alice, _bob) = seeded_with_seats(1).await;
    let cookie = sign_in(&tg, &admin).await;
    let seats = api(&tg, &admin, "/api/v2/seats").await;
    assert_eq!(seats["state"], "over");
    let message = seats["message"].as_str().unwrap();
    assert_eq!(
        message,
        "Your organization is using 2 / 1 AI seats (100% over the limit)."
    );
    let overview = page_ok(&tg, &cookie, "/dashboard").await;
    assert!(
        overview.contains(&format!(
            "<p class=\"banner over\" role=\"status\" id=\"seat-banner\">{message}</p>"
        )),
        "{overview}"
    );

    let (_up, tg, admin, _alice, _bob) = seeded_with_seats(10).await;
    let cookie = sign_in(&tg, &admin).await;
    assert_eq!(api(&tg, &admin, "/api/v2/seats").await["state"], "ok");
    assert!(!page_ok(&tg, &cookie, "/dashboard")
        .await
        .contains("seat-banner"));
}
