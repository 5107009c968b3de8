//! Soak: the real `tollgate` binary (release) under mixed traffic for a long, bounded time,
//! through both front doors, with budgets, rate limits and key-pool cool-downs firing, to show
//! that memory does not grow and that every request served is recorded.
//!
//! Run with `cargo bench --bench soak` (30 minutes; `SOAK_SECS=120` for a short run). Loopback
//! only. It writes `target/soak-report.md` (`SOAK_REPORT`) with RSS over time, responses by
//! status, and the recorded-versus-served check, and exits non-zero if that check fails or
//! Tollgate dies.
//!
//! Traffic (8 workers, paced to about 100 requests/s in total, plus one unpaced "hot" user):
//! OpenAI chat and Anthropic messages, blocking and streaming, half through the gateway and half
//! through the HTTPS_PROXY door (CONNECT + MITM with Tollgate's CA). Of 20 users, 3 have a cap
//! that runs out early (402s), the hot user exceeds its rate limit (429s), and the mock provider
//! answers 429 with `Retry-After` to one of the two central keys now and then, so the key pool
//! cools it down and fails over to the other.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY_A: &str = "sk-soak-central-a-0123456789";
const KEY_B: &str = "sk-soak-central-b-0123456789";
const OPENAI_JSON: &[u8] = include_bytes!("../tests/fixtures/openai-chat.json");
const OPENAI_SSE: &[u8] = include_bytes!("../tests/fixtures/openai-chat-stream.sse");
const ANTHROPIC_JSON: &[u8] = include_bytes!("../tests/fixtures/anthropic-messages.json");
const ANTHROPIC_SSE: &[u8] = include_bytes!("../tests/fixtures/anthropic-messages-stream.sse");
/// Every this many requests carrying key A, the mock answers 429.
const KEY_A_429_EVERY: u64 = 25;

fn main() {
    let secs: u64 = env_or("SOAK_SECS", 1800);
    let report_path = std::env::var("SOAK_REPORT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/soak-report.md").to_string()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(soak(Duration::from_secs(secs), &report_path));
    if !ok {
        std::process::exit(1);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---- the mock provider --------------------------------------------------------------------

async fn mock(listener: TcpListener, key_a_seen: Arc<AtomicU64>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let seen = key_a_seen.clone();
        tokio::spawn(async move {
            let _ = serve_mock_connection(conn, seen).await;
        });
    }
}

async fn serve_mock_connection(
    mut conn: TcpStream,
    key_a_seen: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(16 * 1024);
    loop {
        // Head.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 8192];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 8192];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned();
        buf.drain(..head_end + length);
        let anthropic = head.starts_with("post /v1/messages");
        let streaming = body.contains("\"stream\":true");
        let uses_a = head.contains(&KEY_A.to_ascii_lowercase());
        if uses_a && key_a_seen.fetch_add(1, Ordering::Relaxed) % KEY_A_429_EVERY == 0 {
            let body = if anthropic {
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#
            } else {
                r#"{"error":{"message":"slow down","type":"requests","code":"rate_limit_exceeded"}}"#
            };
            let resp = format!(
                "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 2\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(resp.as_bytes()).await?;
            continue;
        }
        match (anthropic, streaming) {
            (a, false) => {
                let body = if a { ANTHROPIC_JSON } else { OPENAI_JSON };
                let mut resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                resp.extend_from_slice(body);
                conn.write_all(&resp).await?;
            }
            (a, true) => {
                let body = if a { ANTHROPIC_SSE } else { OPENAI_SSE };
                conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await?;
                // Three chunks a few milliseconds apart, cut anywhere.
                for part in body.chunks(body.len().div_ceil(3)) {
                    conn.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                        .await?;
                    conn.write_all(part).await?;
                    conn.write_all(b"\r\n").await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                conn.write_all(b"0\r\n\r\n").await?;
            }
        }
    }
}

// ---- Tollgate -----------------------------------------------------------------------------

struct Tollgate {
    child: Child,
    dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
    errors: Arc<AtomicU64>,
}

impl Tollgate {
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .args(["--config", "tollgate.toml"])
            .current_dir(self.dir.path())
            .output()
            .expect("run tollgate");
        assert!(out.status.success(), "tollgate {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn url(&self, listener: &str) -> Option<String> {
        self.logs.lock().unwrap().iter().find_map(|line| {
            let v: Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening" && v["listener"] == listener)
                .then(|| v["url"].as_str().map(String::from))
                .flatten()
        })
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

fn start_tollgate(mock: SocketAddr) -> (Tollgate, String, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"[server]
gateway_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[database]
url = "sqlite://{db}"

[providers.openai]
kind = "openai"
base_url = "http://{mock}"
api_key_envs = ["SOAK_KEY_A", "SOAK_KEY_B"]
mitm_hosts = ["api.openai.com"]

[providers.anthropic]
kind = "anthropic"
base_url = "http://{mock}"
api_key_envs = ["SOAK_KEY_A", "SOAK_KEY_B"]
mitm_hosts = ["api.anthropic.com"]

[proxy]
enabled = true
listen = "127.0.0.1:0"
ca_cert = "certs/ca.pem"
ca_key = "certs/ca.key"

[budgets]
default_limit_usd = "1000.00"

[limits]
requests_per_minute = 600
"#,
        db = dir.path().join("soak.db").display(),
    );
    std::fs::write(dir.path().join("tollgate.toml"), config).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["ca", "init", "--out", "certs"])
        .current_dir(dir.path())
        .output()
        .expect("ca init");
    assert!(out.status.success(), "ca init: {out:?}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config", "tollgate.toml"])
        .current_dir(dir.path())
        .env("SOAK_KEY_A", KEY_A)
        .env("SOAK_KEY_B", KEY_B)
        .env_remove("TOLLGATE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let logs = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(AtomicU64::new(0));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (logs, errors) = (logs.clone(), errors.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                // Interception records are most of the output: keep only start-up lines and
                // count errors, so the soak's own memory stays flat.
                if line.contains("\"level\":\"ERROR\"") || line.contains("panicked") {
                    errors.fetch_add(1, Ordering::Relaxed);
                    eprintln!("tollgate: {line}");
                }
                if line.contains("listening") {
                    logs.lock().unwrap().push(line);
                }
            }
        });
    }
    let tg = Tollgate {
        child,
        dir,
        logs,
        errors,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (gateway, admin, proxy) = loop {
        if let (Some(g), Some(a), Some(p)) = (tg.url("gateway"), tg.url("admin"), tg.url("proxy")) {
            break (g, a, p);
        }
        assert!(Instant::now() < deadline, "tollgate did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    (tg, gateway, admin, proxy)
}

// ---- traffic ------------------------------------------------------------------------------

#[derive(Default)]
struct Counts {
    by_status: Mutex<std::collections::BTreeMap<u16, u64>>,
    served: AtomicU64,
}

impl Counts {
    fn add(&self, status: u16) {
        *self.by_status.lock().unwrap().entry(status).or_default() += 1;
        if status == 200 {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct User {
    key: String,
    gateway: reqwest::Client,
    proxied: reqwest::Client,
}

async fn one_request(user: &User, gateway: &str, n: u64) -> u16 {
    let anthropic = n % 2 == 0;
    let streaming = n % 3 == 0;
    let via_proxy = (n / 2) % 2 == 0;
    let body = if anthropic {
        json!({"model": "claude-sonnet-4-5-20250929", "max_tokens": 1024, "stream": streaming,
               "messages": [{"role": "user", "content": format!("soak {n}")}]})
    } else {
        json!({"model": "gpt-4o", "stream": streaming,
               "messages": [{"role": "user", "content": format!("soak {n}")}]})
    };
    let path = if anthropic {
        "/v1/messages"
    } else {
        "/v1/chat/completions"
    };
    let request = if via_proxy {
        let host = if anthropic {
            "api.anthropic.com"
        } else {
            "api.openai.com"
        };
        user.proxied.post(format!("https://{host}{path}"))
    } else {
        let provider = if anthropic { "anthropic" } else { "openai" };
        user.gateway
            .post(format!("{gateway}/{provider}{path}"))
            .bearer_auth(&user.key)
    };
    match request.json(&body).send().await {
        // Read the whole body: a stream cut short is a failure, not a success.
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.bytes().await {
                Ok(_) => status,
                Err(_) => 1,
            }
        }
        Err(_) => 0,
    }
}

async fn soak(duration: Duration, report_path: &str) -> bool {
    let key_a_seen = Arc::new(AtomicU64::new(0));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("mock listener");
    let mock_addr = listener.local_addr().unwrap();
    tokio::spawn(mock(listener, key_a_seen.clone()));
    let (tg, gateway, admin, proxy) = start_tollgate(mock_addr);
    let proxy_addr = proxy.split("://").nth(1).unwrap().to_string();
    let ca = std::fs::read_to_string(tg.dir.path().join("certs/ca.pem")).expect("CA");

    tg.cli(&["users", "create", "root", "--admin"]);
    let admin_key = tg.cli(&["keys", "create", "--user", "root"]);
    let admin_client = reqwest::Client::new();
    let mut users = Vec::new();
    for i in 0..20 {
        let name = format!("dev{i}");
        tg.cli(&["users", "create", &name]);
        let key = tg.cli(&["keys", "create", "--user", &name]);
        if i < 3 {
            // Small caps that run out within minutes: 402s for the rest of the soak.
            let id = admin_client
                .get(format!("{admin}/api/v2/users"))
                .bearer_auth(&admin_key)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["users"]
                .as_array()
                .unwrap()
                .iter()
                .find(|u| u["username"] == name.as_str())
                .unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string();
            let resp = admin_client
                .post(format!("{admin}/api/v2/budgets"))
                .bearer_auth(&admin_key)
                .json(&json!({"scope": "user", "scope_id": id, "limit_usd": "0.50"}))
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success());
        }
        let proxied = reqwest::Client::builder()
            .proxy(reqwest::Proxy::https(format!("http://tollgate:{key}@{proxy_addr}")).unwrap())
            .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).unwrap())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let gateway_client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        users.push(Arc::new(User {
            key,
            gateway: gateway_client,
            proxied,
        }));
    }

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (users, counts, stop, gateway) =
            (users.clone(), counts.clone(), stop.clone(), gateway.clone());
        workers.push(tokio::spawn(async move {
            let mut n = w;
            while !stop.load(Ordering::Relaxed) {
                // Users 0..19 in turn, except the hot one (19), which has its own worker.
                let user = &users[(n as usize * 7 + w as usize) % 19];
                counts.add(one_request(user, &gateway, n).await);
                n += 8;
                tokio::time::sleep(Duration::from_millis(70)).await;
            }
        }));
    }
    {
        // The hot user: as fast as one connection goes, far over 600 requests a minute.
        let (user, counts, stop, gateway) = (
            users[19].clone(),
            counts.clone(),
            stop.clone(),
            gateway.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                counts.add(one_request(&user, &gateway, n).await);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }

    let mut samples: Vec<(u64, u64, u64)> = Vec::new(); // (second, RSS KiB, served)
    let mut alive = true;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(10).min(duration)).await;
        let rss = tg.rss_kib();
        if rss == 0 {
            alive = false;
            break;
        }
        samples.push((
            started.elapsed().as_secs(),
            rss,
            counts.served.load(Ordering::Relaxed),
        ));
        let (t, rss, served) = samples.last().unwrap();
        eprintln!(
            "soak: {t:>5} s  RSS {:>6.1} MiB  served {served}",
            *rss as f64 / 1024.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();

    // Recorded versus served.
    let metrics = admin_client
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .map(|r| r.text())
        .expect("metrics")
        .await
        .unwrap_or_default();
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    let served = counts.served.load(Ordering::Relaxed);
    let url = format!("sqlite://{}", tg.dir.path().join("soak.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.expect("open soak db");
    let deadline = Instant::now() + Duration::from_secs(30);
    let completed = loop {
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM interceptions WHERE status = 'completed'")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
        if n as u64 >= served || Instant::now() > deadline {
            break n as u64;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let by_status_db: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, COUNT(*) FROM interceptions GROUP BY status ORDER BY status",
    )
    .fetch_all(&pool)
    .await
    .unwrap_or_default();

    // RSS: the first two minutes are warm-up (caches, pools, allocator arenas filling).
    let warm: Vec<u64> = samples
        .iter()
        .filter(|s| s.0 >= 120.min(duration.as_secs() / 2))
        .map(|s| s.1)
        .collect();
    let (warm_first, warm_last, peak) = (
        warm.first().copied().unwrap_or(0),
        warm.last().copied().unwrap_or(0),
        samples.iter().map(|s| s.1).max().unwrap_or(0),
    );
    let statuses = counts.by_status.lock().unwrap().clone();
    let total: u64 = statuses.values().sum();
    let ok = alive && completed == served && metric("tollgate_recorder_dropped_total") == 0;

    let mut report = String::new();
    report.push_str(&format!(
        "# Soak report\n\n{:.0} s of mixed traffic through the gateway and the HTTPS_PROXY door \
         (release build, SQLite), {total} requests ({:.0}/s).\n\n",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    ));
    report.push_str("| responses | count |\n|---|---|\n");
    for (status, n) in &statuses {
        let what = match status {
            200 => "200 served",
            402 => "402 budget exceeded",
            429 => "429 rate limited / all keys cooling",
            0 => "connection error",
            1 => "body cut short",
            _ => "other",
        };
        report.push_str(&format!("| {status} ({what}) | {n} |\n"));
    }
    report.push_str(&format!(
        "\nRecorded: {completed} completed interceptions for {served} responses served \
         ({}); by status in the database: {by_status_db:?}.\n\
         Key A answered 429 {} times (every {KEY_A_429_EVERY}th request carrying it); key-pool \
         state changes: {}; recorder dropped: {}; error log lines: {}.\n\n",
        if completed == served {
            "equal"
        } else {
            "MISMATCH"
        },
        key_a_seen.load(Ordering::Relaxed).div_ceil(KEY_A_429_EVERY),
        metric("tollgate_provider_key_state_changes_total"),
        metric("tollgate_recorder_dropped_total"),
        tg.errors.load(Ordering::Relaxed),
    ));
    report.push_str(&format!(
        "RSS: peak {:.1} MiB; after warm-up {:.1} MiB → {:.1} MiB at the end ({:+.1} MiB).\n\n\
         | t (s) | RSS (MiB) | served |\n|---|---|---|\n",
        peak as f64 / 1024.0,
        warm_first as f64 / 1024.0,
        warm_last as f64 / 1024.0,
        (warm_last as f64 - warm_first as f64) / 1024.0
    ));
    let step = (samples.len() / 30).max(1);
    for s in samples.iter().step_by(step) {
        report.push_str(&format!(
            "| {} | {:.1} | {} |\n",
            s.0,
            s.1 as f64 / 1024.0,
            s.2
        ));
    }
    std::fs::write(report_path, &report).expect("write report");
    println!("{report}");
    let mut child = tg.child;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    drop(tg.dir);
    ok
}
