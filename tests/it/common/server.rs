//! Starts the real `tollgate` binary for a test: its own temp dir, SQLite file and config, ports
//! chosen by the binary itself (port 0, read back from its "listening" log lines), stdout
//! captured so tests can inspect the structured logs.
//!
//! With `TOLLGATE_TEST_DATABASE_URL=postgres://user:pass@host:port/maintenance_db` set, every
//! instance runs on PostgreSQL instead: a fresh database per instance (created through that
//! maintenance connection, named `tg_test_<random>`), so tests stay independent exactly as
//! their SQLite temp files are. Tests read rows through the backend-neutral helpers
//! ([`Tollgate::scalar`], [`Tollgate::column`], [`Tollgate::execute`],
//! [`Tollgate::wait_until_recorded`]); [`Tollgate::db`] is the SQLite file itself, and a test
//! that needs it must be SQLite-only ([`skip_on_postgres`]).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::SqlitePool;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// The environment variable that switches the integration tests to PostgreSQL.
pub const PG_ENV: &str = "TOLLGATE_TEST_DATABASE_URL";

/// The maintenance URL when the tests run on PostgreSQL.
pub fn postgres_url() -> Option<String> {
    std::env::var(PG_ENV).ok().filter(|u| !u.is_empty())
}

/// True when the tests run on PostgreSQL.
pub fn on_postgres() -> bool {
    postgres_url().is_some()
}

/// Returns true (and says why on stderr) when the calling test must be skipped because it reads
/// the SQLite file directly or needs a store query that has no PostgreSQL flavour yet.
/// Use as `if skip_on_postgres("reason") { return; }`.
pub fn skip_on_postgres(reason: &str) -> bool {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: {reason}");
        true
    } else {
        false
    }
}

/// `?` placeholders as PostgreSQL's `$1, $2, …` (test SQL has no `?` in literals).
fn number_placeholders(sql: &str) -> String {
    let mut numbered = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            numbered.push_str(&format!("${n}"));
        } else {
            numbered.push(c);
        }
    }
    numbered
}

/// Creates a fresh, empty database next to the maintenance database of `base` and returns its
/// URL. Names are random, so parallel tests never share one.
pub async fn fresh_postgres_database(base: &str) -> String {
    use sqlx::Connection;
    let name = format!("tg_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(base)
        .await
        .unwrap_or_else(|e| panic!("{PG_ENV}: cannot connect to the maintenance database: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("CREATE DATABASE (the test role needs CREATEDB)");
    let _ = conn.close().await;
    // postgres://user:pass@host:port/db?params → swap the database, keep the rest.
    let (url, params) = match base.split_once('?') {
        Some((u, p)) => (u, format!("?{p}")),
        None => (base, String::new()),
    };
    let authority_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match url[authority_end..].find('/') {
        Some(i) => &url[..authority_end + i],
        None => url,
    };
    format!("{root}/{name}{params}")
}

/// The central keys the test config hands to providers (they must never reach a client or log).
pub const OPENAI_CENTRAL_KEY: &str = "sk-central-openai-0123456789abcdef";
pub const ANTHROPIC_CENTRAL_KEY: &str = "sk-ant-central-0123456789abcdef";

pub struct TollgateBuilder {
    providers: Vec<(String, String, String)>,
    server_extra: String,
    extra: String,
    env: Vec<(String, String)>,
    /// `mitm_hosts` per provider name.
    mitm: Vec<(String, Vec<String>)>,
    /// More keys inside `[providers.NAME]`, per provider name.
    provider_extra: Vec<(String, String)>,
    /// `[proxy]` lines (after `enabled`, `listen`, `ca_cert`, `ca_key`) when the proxy is on.
    proxy: Option<String>,
    /// Files written into the instance's directory before it starts (path relative to it).
    files: Vec<(String, Vec<u8>)>,
    /// Use this SQLite file instead of a fresh one (a restart of an earlier instance).
    database: Option<PathBuf>,
    /// Use this database URL instead of a fresh database (a restart, on either backend).
    database_url: Option<String>,
    /// The server's open-file limit (soft and hard), as `prlimit --nofile` would set it.
    open_file_limit: Option<u64>,
}

impl TollgateBuilder {
    /// Adds `[providers.NAME]` of `kind` pointing at `base_url`.
    pub fn provider(mut self, name: &str, kind: &str, base_url: &str) -> Self {
        self.providers
            .push((name.into(), kind.into(), base_url.into()));
        self
    }

    /// Extra keys for the `[server]` table.
    pub fn server_extra(mut self, toml: &str) -> Self {
        self.server_extra.push_str(toml);
        self.server_extra.push('\n');
        self
    }

    /// Extra TOML appended to the config (other sections).
    pub fn extra(mut self, toml: &str) -> Self {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    /// Runs on an existing SQLite file (to restart on an earlier instance's state).
    pub fn database(mut self, path: &Path) -> Self {
        self.database = Some(path.to_path_buf());
        self
    }

    /// Runs on an earlier instance's database, whichever the backend (see [`Tollgate::db_url`]).
    pub fn database_url(mut self, url: &str) -> Self {
        self.database_url = Some(url.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets `mitm_hosts` of provider `name` (added with [`TollgateBuilder::provider`]).
    pub fn mitm_hosts(mut self, name: &str, hosts: &[&str]) -> Self {
        self.mitm
            .push((name.into(), hosts.iter().map(|h| h.to_string()).collect()));
        self
    }

    /// Extra keys inside `[providers.NAME]` (added with [`TollgateBuilder::provider`]).
    pub fn provider_extra(mut self, name: &str, toml: &str) -> Self {
        self.provider_extra.push((name.into(), toml.into()));
        self
    }

    /// Turns the proxy front door on, listening on 127.0.0.1:0 with the CA in `certs/ca.pem` and
    /// `certs/ca.key` (made with `tollgate ca init` unless given with [`TollgateBuilder::file`]).
    /// `extra` holds more `[proxy]` keys.
    pub fn proxy(mut self, extra: &str) -> Self {
        self.proxy = Some(extra.to_string());
        self
    }

    /// Starts the server with this open-file limit (soft and hard), as `prlimit --nofile=N:N`.
    pub fn open_file_limit(mut self, limit: u64) -> Self {
        self.open_file_limit = Some(limit);
        self
    }

    /// Writes `contents` to `path` (relative to the instance's directory) before starting;
    /// files ending in `.key` get mode 0600.
    pub fn file(mut self, path: &str, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.into(), contents.into()));
        self
    }

    pub async fn start(self) -> Tollgate {
        let dir = tempfile::tempdir().expect("temp dir");
        let db_path = self
            .database
            .clone()
            .unwrap_or_else(|| dir.path().join("tollgate.db"));
        let db_url = match (&self.database_url, postgres_url()) {
            (Some(url), _) => url.clone(),
            // A given SQLite file means "state that outlives one instance": under PostgreSQL
            // that is a fresh database, reused through `database_url(&tg.db_url)`.
            (None, Some(base)) => fresh_postgres_database(&base).await,
            _ => format!("sqlite://{}", db_path.display()),
        };
        // No grace period unless a test sets its own.
        let grace = if self.server_extra.contains("grace_period_seconds") {
            ""
        } else {
            "grace_period_seconds = 0\n"
        };
        let mut config = format!(
            "[server]\ngateway_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{grace}{}\n\
             [database]\nurl = \"{}\"\n\n[auth]\nkey_cache_ttl_ms = 1000\n\n",
            self.server_extra, db_url
        );
        for (name, kind, url) in &self.providers {
            let env = match kind.as_str() {
                "anthropic" => "\napi_key_env = \"TEST_ANTHROPIC_KEY\"",
                "copilot" => "",
                _ => "\napi_key_env = \"TEST_OPENAI_KEY\"",
            };
            let mitm = self
                .mitm
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, hosts)| format!("\nmitm_hosts = {hosts:?}"))
                .unwrap_or_default();
            let extra: String = self
                .provider_extra
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, toml)| format!("\n{toml}"))
                .collect();
            config.push_str(&format!(
                "[providers.{name}]\nkind = \"{kind}\"\nbase_url = \"{url}\"{env}{mitm}{extra}\n\n"
            ));
        }
        for (path, contents) in &self.files {
            let full = dir.path().join(path);
            std::fs::create_dir_all(full.parent().unwrap()).expect("create dir");
            std::fs::write(&full, contents).expect("write file");
            if path.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod 600");
            }
        }
        if let Some(extra) = &self.proxy {
            if !dir.path().join("certs/ca.pem").exists() {
                let out = Command::new(BIN)
                    .args(["ca", "init", "--out", "certs"])
                    .current_dir(dir.path())
                    .output()
                    .expect("run tollgate ca init");
                assert!(out.status.success(), "ca init: {out:?}");
            }
            config.push_str(&format!(
                "[proxy]\nenabled = true\nlisten = \"127.0.0.1:0\"\nca_cert = \"certs/ca.pem\"\nca_key = \"certs/ca.key\"\n{extra}\n\n"
            ));
        }
        config.push_str(&self.extra);
        let config_path = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, &config).expect("write config");

        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("TEST_OPENAI_KEY", OPENAI_CENTRAL_KEY)
            .env("TEST_ANTHROPIC_KEY", ANTHROPIC_CENTRAL_KEY)
            .env_remove("TOLLGATE_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(limit) = self.open_file_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent's.
            unsafe {
                cmd.pre_exec(move || {
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        let mut child = cmd.spawn().expect("spawn tollgate");
        let logs = Arc::new(Mutex::new(Vec::<String>::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        let mut tg = Tollgate {
            child,
            dir,
            db_path,
            db_url,
            config_path,
            logs,
            gateway: String::new(),
            admin: String::new(),
            proxy: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (gw, admin) = tg.listener_urls();
            let proxy = tg.listener_url("proxy");
            if let (Some(gw), Some(admin)) = (gw, admin) {
                if self.proxy.is_none() || proxy.is_some() {
                    tg.gateway = gw;
                    tg.admin = admin;
                    tg.proxy = proxy.unwrap_or_default();
                    break;
                }
            }
            if let Ok(Some(status)) = tg.child.try_wait() {
                panic!(
                    "tollgate exited early with {status}:\n{}",
                    tg.logs().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not start:\n{}",
                tg.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // pingora binds after the log line; wait until the gateway port accepts.
        let addr = tg
            .gateway
            .split("://")
            .last()
            .unwrap_or_default()
            .to_string();
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(Instant::now() < deadline, "gateway port never opened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !tg.proxy.is_empty() {
            let addr = tg.proxy_addr();
            while tokio::net::TcpStream::connect(&addr).await.is_err() {
                assert!(Instant::now() < deadline, "proxy port never opened");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tg
    }
}

pub struct Tollgate {
    child: Child,
    dir: tempfile::TempDir,
    /// The SQLite file (meaningless under PostgreSQL; see [`Tollgate::db_url`]).
    pub db_path: PathBuf,
    /// `database.url` of this instance: the SQLite file or its own PostgreSQL database.
    pub db_url: String,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    /// `http://127.0.0.1:PORT` of the gateway listener.
    pub gateway: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    /// `http://127.0.0.1:PORT` (or `https://`) of the proxy listener; empty when it is off.
    pub proxy: String,
}

impl Tollgate {
    pub fn builder() -> TollgateBuilder {
        TollgateBuilder {
            providers: Vec::new(),
            server_extra: String::new(),
            extra: String::new(),
            env: Vec::new(),
            mitm: Vec::new(),
            provider_extra: Vec::new(),
            proxy: None,
            files: Vec::new(),
            database: None,
            database_url: None,
            open_file_limit: None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's process id (for signals and /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn listener_urls(&self) -> (Option<String>, Option<String>) {
        let mut gw = None;
        let mut admin = None;
        for line in self.logs().iter() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["message"] != "listening" {
                continue;
            }
            let url = v["url"].as_str().map(String::from);
            match v["listener"].as_str() {
                Some("gateway") => gw = url,
                Some("admin") => admin = url,
                _ => {}
            }
        }
        (gw, admin)
    }

    /// The URL a listener logged ("gateway", "admin", "proxy").
    pub fn listener_url(&self, listener: &str) -> Option<String> {
        self.logs().iter().rev().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["message"] == "listening" && v["listener"] == listener)
                .then(|| v["url"].as_str().map(String::from))
                .flatten()
        })
    }

    /// `127.0.0.1:PORT` of the proxy listener.
    pub fn proxy_addr(&self) -> String {
        self.proxy
            .split("://")
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// The proxy's CA certificate (PEM), as clients are told to trust it.
    pub fn proxy_ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir().join("certs/ca.pem")).expect("read certs/ca.pem")
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Runs a `tollgate` CLI command against this instance's config.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .output()
            .expect("run tollgate cli")
    }

    /// Creates a user through the CLI and returns a fresh key for it.
    pub fn user_key(&self, name: &str) -> String {
        let out = self.cli(&["users", "create", name]);
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
            "{out:?}"
        );
        let out = self.cli(&["keys", "create", "--user", name]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Creates an admin user through the CLI and returns a fresh key for it.
    pub fn admin_key(&self, name: &str) -> String {
        let out = self.cli(&["users", "create", name, "--admin"]);
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("already exists"),
            "{out:?}"
        );
        let out = self.cli(&["keys", "create", "--user", name]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The SQLite file, read-only, for tests that check rows directly. Under PostgreSQL such
    /// tests must call [`skip_on_postgres`] first; reaching this is a bug in the test.
    pub async fn db(&self) -> SqlitePool {
        assert!(
            !on_postgres(),
            "this test reads the SQLite file directly; guard it with skip_on_postgres"
        );
        let opts = SqliteConnectOptions::new()
            .filename(&self.db_path)
            .read_only(true);
        SqlitePool::connect_with(opts).await.expect("open test db")
    }

    /// Runs one statement on either backend (same SQL rules as [`Tollgate::column`]).
    pub async fn execute(&self, sql: &str, binds: &[&str]) {
        if on_postgres() {
            let pool = sqlx::PgPool::connect(&self.db_url)
                .await
                .expect("connect to the test database");
            let numbered = number_placeholders(sql);
            let mut q = sqlx::query(&numbered);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(&pool).await.expect(&numbered);
            pool.close().await;
        } else {
            let pool = self.db_rw().await;
            let mut q = sqlx::query(sql);
            for b in binds {
                q = q.bind(*b);
            }
            q.execute(&pool).await.expect(sql);
            pool.close().await;
        }
    }

    /// One scalar from either backend; see [`Tollgate::column`] for the SQL rules.
    pub async fn scalar<T>(&self, sql: &str, binds: &[&str]) -> T
    where
        T: Send
            + Unpin
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>,
    {
        self.column(sql, binds)
            .await
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no row for {sql}"))
    }

    /// The first column of every row, from either backend. `sql` must be portable: `?`
    /// placeholders (numbered for PostgreSQL here), text binds, and `CAST(… AS TEXT)` /
    /// `CAST(… AS BIGINT)` where the column types differ (uuid, and SUM's numeric, on
    /// PostgreSQL).
    pub async fn column<T>(&self, sql: &str, binds: &[&str]) -> Vec<T>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::Decode<'r, sqlx::Sqlite>
            + sqlx::Type<sqlx::Sqlite>
            + for<'r> sqlx::Decode<'r, sqlx::Postgres>
            + sqlx::Type<sqlx::Postgres>,
    {
        if on_postgres() {
            let pool = sqlx::PgPool::connect(&self.db_url)
                .await
                .expect("connect to the test database");
            let numbered = number_placeholders(sql);
            let mut q = sqlx::query_scalar::<_, T>(&numbered);
            for b in binds {
                q = q.bind(*b);
            }
            let v = q.fetch_all(&pool).await.expect(&numbered);
            pool.close().await;
            v
        } else {
            let pool = self.db().await;
            let mut q = sqlx::query_scalar::<_, T>(sql);
            for b in binds {
                q = q.bind(*b);
            }
            let v = q.fetch_all(&pool).await.expect(sql);
            pool.close().await;
            v
        }
    }

    /// `GET /readyz`: the status (0 when the admin listener did not answer) and the body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        match reqwest::Client::new()
            .get(format!("{}/readyz", self.admin))
            .send()
            .await
        {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(serde_json::Value::Null))
            }
            Err(_) => (0, serde_json::Value::Null),
        }
    }

    /// Polls `/readyz` until it answers `status`, failing the test after `within`; returns the
    /// body it answered with (the reason, when not ready).
    pub async fn wait_for_readyz(&self, status: u16, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let (got, body) = self.readyz().await;
            if got == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz did not answer {status} within {within:?}: last {got} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the recorder has written at least `n` interceptions, on either backend.
    pub async fn wait_until_recorded(&self, n: i64) {
        if !on_postgres() {
            self.wait_for_interceptions(n).await;
            return;
        }
        let pool = sqlx::PgPool::connect(&self.db_url)
            .await
            .expect("connect to the test database");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM interceptions")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
            if count >= n {
                pool.close().await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {n} interceptions recorded:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the recorder has written at least `n` interceptions and returns the SQLite
    /// pool (SQLite only; use [`Tollgate::wait_until_recorded`] when the pool is not needed).
    pub async fn wait_for_interceptions(&self, n: i64) -> SqlitePool {
        let pool = self.db().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM interceptions")
                .fetch_one(&pool)
                .await
                .unwrap_or(0);
            if count >= n {
                return pool;
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {n} interceptions recorded:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then wait for the process to exit; returns the exit status success.
    pub async fn stop(mut self) -> (bool, Vec<String>) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        let ok = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        (ok, self.logs())
    }
}

/// The text of the admin listener's `/metrics`.
pub async fn metrics(tg: &Tollgate) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", tg.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one metric line (`name{labels}` exactly as rendered), if present.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Resident memory of a process, in bytes (`VmRSS` of /proc/PID/status).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Samples the RSS of `pid` every 25 ms until `stop` is set; returns the peak.
pub fn watch_rss(
    pid: u32,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            peak = peak.max(rss(pid));
            std::thread::sleep(Duration::from_millis(25));
        }
        peak.max(rss(pid))
    })
}

/// Descriptors a process holds (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tollgate {
    /// A writable connection to the instance's SQLite file (WAL lets it share with the server),
    /// for tests that set up rows the way another replica or the CLI would.
    pub async fn db_rw(&self) -> SqlitePool {
        let opts = SqliteConnectOptions::new()
            .filename(&self.db_path)
            .busy_timeout(Duration::from_secs(5));
        SqlitePool::connect_with(opts)
            .await
            .expect("open test db for writing")
    }
}
