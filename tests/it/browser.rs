//! The dashboard in a real headless browser: Debian's `chromium` driven by `chromedriver` over
//! WebDriver with a small hand-written JSON client. Signs in through the form, opens every page
//! with seeded data, checks the numbers shown against the API, edits a budget and sees the
//! gateway enforce it, and checks that a member cannot open another user's session.
//! Screenshots of each page go to `target/dashboard-screenshots/` (not committed).
//!
//! Skips with a message when chromium or chromedriver is not installed (`.ci/run` installs
//! both).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::client::http_builder;
use common::mock::{MockResponse, MockUpstream};
use common::server::Tollgate;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C WebDriver key of an element reference.
const TAB: &str = "\u{E004}";
const ENTER: &str = "\u{E007}";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn http() -> reqwest::Client {
    http_builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A chromedriver process this test started, and one browser session on it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    shots: PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http().get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1366,900", "--no-proxy-server",
            ]}
        }}});
        let resp: Value = http()
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {resp}"))
            .to_string();
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dashboard-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        let browser = Browser {
            driver,
            base,
            session,
            shots,
        };
        // Element lookups wait for a page that is still loading after a click.
        browser
            .cmd(
                reqwest::Method::POST,
                "/timeouts",
                Some(json!({"implicit": 5000})),
            )
            .await;
        browser
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = http().request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Waits until the page URL satisfies `want` (a click's navigation may still be under way)
    /// and returns it.
    async fn wait_url(&self, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let url = self.url().await;
            if want(&url) {
                return url;
            }
            assert!(Instant::now() < deadline, "the browser stayed on {url}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Presses one key (a WebDriver key code such as TAB) on whatever has the focus.
    async fn press(&self, key: &str) {
        let actions = json!({"actions": [{"type": "key", "id": "keyboard", "actions": [
            {"type": "keyDown", "value": key}, {"type": "keyUp", "value": key}
        ]}]});
        self.cmd(reqwest::Method::POST, "/actions", Some(actions))
            .await;
    }

    /// The text of the focused element.
    async fn focused_text(&self) -> String {
        let v = self
            .cmd(reqwest::Method::GET, "/element/active", None)
            .await;
        let e = v[ELEMENT].as_str().unwrap().to_string();
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the browser, then the driver this test started (by its own handle, not by name).
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async { http().delete(url).send().await.map(|_| ()) })
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn api(tg: &Tollgate, key: &str, path: &str) -> Value {
    http()
        .get(format!("{}{path}", tg.admin))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn chat(tg: &Tollgate, key: &str, session: &str) -> u16 {
    http()
        .post(format!("{}/openai/v1/chat/completions", tg.gateway))
        .bearer_auth(key)
        .header("x-tollgate-session", session)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "why?"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_in_a_headless_browser() {
    if !Path::new(CHROMIUM).exists() || !Path::new(CHROMEDRIVER).exists() {
        eprintln!(
            "skipped: {CHROMIUM} or {CHROMEDRIVER} is not installed (apt-get install chromium chromium-driver; .ci/run does)"
        );
        return;
    }
    let up = MockUpstream::start(|req| match req.path_without_query() {
        "/v1/chat/completions" => MockResponse::fixture("openai-chat.json"),
        "/v1/messages" => MockResponse::fixture("anthropic-messages.json"),
        other => MockResponse::json(500, json!({"unexpected": other})),
    })
    .await;
    let tg = Tollgate::builder()
        .provider("openai", "openai", &up.base_url())
        .provider("anthropic", "anthropic", &up.base_url())
        .extra("[seats]\nlimit = 2")
        .start()
        .await;
    let admin = tg.admin_key("root");
    let alice = tg.user_key("alice");
    let bob = tg.user_key("bob");
    for _ in 0..3 {
        assert_eq!(chat(&tg, &alice, "sess-alice").await, 200);
    }
    assert_eq!(chat(&tg, &bob, "sess-bob").await, 200);
    tg.wait_until_recorded(4).await;
    // Sessions are per user: a client session id names `{user id}:{id}` (issue 14).
    let session_of = |id: String, client: &str| format!("{id}:{client}");
    let sess_alice = session_of(
        tg.scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'alice'",
            &[],
        )
        .await,
        "sess-alice",
    );
    let sess_bob = session_of(
        tg.scalar(
            "SELECT CAST(id AS TEXT) FROM users WHERE username = 'bob'",
            &[],
        )
        .await,
        "sess-bob",
    );

    let b = Browser::start().await;
    let site = &tg.admin;

    // Signed out: the browser lands on the form; sign in by typing the key.
    b.go(&format!("{site}/dashboard")).await;
    b.wait_url(|u| u.ends_with("/dashboard/sign-in")).await;
    b.screenshot("01-sign-in").await;
    b.type_into("#key", &admin).await;
    b.click("form[action='/dashboard/sign-in'] button").await;
    b.wait_url(|u| u.ends_with("/dashboard")).await;

    // Overview: the seat warning as the API words it, and the period's call count.
    let seats = api(&tg, &admin, "/api/v2/seats").await;
    assert_eq!(
        b.text("#seat-banner").await,
        seats["message"].as_str().unwrap()
    );
    let usage = api(&tg, &admin, "/api/v2/usage?group_by=user").await;
    let count: i64 = usage["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["interception_count"].as_i64().unwrap())
        .sum();
    assert_eq!(b.text("#period-count").await, count.to_string());
    b.screenshot("02-overview").await;
    // Keyboard: the first Tab reaches the skip link, Enter follows it, the next Tab the nav.
    b.press(TAB).await;
    assert_eq!(b.focused_text().await, "Skip to content");
    b.press(ENTER).await;
    b.wait_url(|u| u.ends_with("#main")).await;
    b.go(&format!("{site}/dashboard")).await;
    b.press(TAB).await;
    b.press(TAB).await;
    assert_eq!(b.focused_text().await, "Overview");

    // Users: alice's spent is her own budget endpoint's.
    b.click("nav a[href='/dashboard/users']").await;
    b.wait_url(|u| u.ends_with("/dashboard/users")).await;
    let spent = api(&tg, &alice, "/api/v2/users/me/budget").await["spent_usd"]
        .as_str()
        .unwrap()
        .to_string();
    let row = b.text("tr[data-user='alice']").await;
    assert!(row.contains(&format!("${spent}")), "{row}");
    b.screenshot("03-users").await;

    // Sessions, then alice's session by its link: the API's cost.
    b.click("nav a[href='/dashboard/sessions']").await;
    b.wait_url(|u| u.ends_with("/dashboard/sessions")).await;
    b.screenshot("04-sessions").await;
    b.click(&format!("a[href='/dashboard/sessions/{sess_alice}']"))
        .await;
    b.wait_url(|u| u.ends_with(&format!("/sessions/{sess_alice}")))
        .await;
    let detail = api(
        &tg,
        &admin,
        &format!("/api/v2/aibridge/sessions/{sess_alice}"),
    )
    .await;
    assert_eq!(
        b.text("#session-cost").await,
        format!("${}", detail["cost_usd"].as_str().unwrap())
    );
    b.screenshot("05-session").await;

    // Usage explorer grouped by model through the form.
    b.click("nav a[href='/dashboard/usage']").await;
    b.wait_url(|u| u.ends_with("/dashboard/usage")).await;
    b.click("#group_by option[value='model']").await;
    b.click("form.filters button").await;
    b.wait_url(|u| u.contains("group_by=model")).await;
    let by_model = api(&tg, &admin, "/api/v2/usage?group_by=model").await;
    let first = &by_model["results"][0];
    let cell = b
        .text(&format!(
            "tr[data-key='{}'] td.cost",
            first["key"].as_str().unwrap()
        ))
        .await;
    assert_eq!(cell, first["cost_usd"].as_str().unwrap());
    b.screenshot("06-usage").await;

    // Budget editor: cap alice below what she spent; the gateway refuses her next call.
    b.click("nav a[href='/dashboard/budgets']").await;
    b.wait_url(|u| u.ends_with("/dashboard/budgets")).await;
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
    b.click(&format!("#target option[value='user:{alice_id}']"))
        .await;
    b.type_into("#limit_usd", "0.000001").await;
    b.click("form.editor button").await;
    b.wait_url(|u| u.ends_with("/dashboard/budgets?saved=1"))
        .await;
    assert!(b.source().await.contains("0.000001"));
    b.screenshot("07-budgets").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while chat(&tg, &alice, "sess-alice").await != 402 {
        assert!(
            Instant::now() < deadline,
            "the cap set in the browser was not enforced"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    b.click("nav a[href='/dashboard/pricing']").await;
    b.wait_url(|u| u.ends_with("/dashboard/pricing")).await;
    assert!(b.source().await.contains("Effective prices"));
    b.screenshot("08-pricing").await;

    // Sign out, sign in as bob: alice's session is refused, his own opens.
    b.click("header form button").await;
    b.wait_url(|u| u.ends_with("/dashboard/sign-in")).await;
    b.type_into("#key", &bob).await;
    b.click("form[action='/dashboard/sign-in'] button").await;
    b.wait_url(|u| u.ends_with("/dashboard")).await;
    assert!(b.text("header .who").await.starts_with("bob"));
    b.screenshot("09-member-overview").await;
    b.go(&format!("{site}/dashboard/sessions/{sess_alice}"))
        .await;
    assert_eq!(b.text("main h1").await, "Forbidden");
    b.screenshot("10-member-forbidden").await;
    b.go(&format!("{site}/dashboard/sessions/{sess_bob}")).await;
    assert!(b.text("main h1").await.contains("sess-bob"));
}
