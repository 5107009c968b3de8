//! The dashboard as a browser uses it: signing in through the form (the session cookie that
//! comes back) and the CSRF token a page's forms carry.
#![allow(dead_code)]

use std::time::Duration;

use super::server::Tollgate;

/// A client that stays on the page it asked for (no redirects followed), as the tests read them.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Posts the sign-in form with `key`; the response (303 and a cookie when it worked).
pub async fn sign_in_response(tg: &Tollgate, key: &str) -> reqwest::Response {
    browser()
        .post(format!("{}/dashboard/sign-in", tg.admin))
        .form(&[("key", key)])
        .send()
        .await
        .unwrap()
}

/// The `name=value` part of the response's `Set-Cookie`, as a browser would send it back.
pub fn cookie_of(resp: &reqwest::Response) -> Option<String> {
    let set = resp.headers().get("set-cookie")?.to_str().ok()?;
    set.split(';').next().map(str::to_string)
}

/// GET `path` on the admin listener with `cookie`: (status, body).
pub async fn dashboard_get(tg: &Tollgate, cookie: &str, path: &str) -> (u16, String) {
    let resp = browser()
        .get(format!("{}{path}", tg.admin))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// POST a form to `path` on the admin listener with `cookie`.
pub async fn dashboard_post(
    tg: &Tollgate,
    cookie: &str,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    browser()
        .post(format!("{}{path}", tg.admin))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap()
}

/// The CSRF token in a page's forms.
pub fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[start..start + html[start..].find('"').unwrap()].to_string()
}
