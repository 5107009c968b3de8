//! The TOML configuration: parsing, defaults, environment overrides and validation.
//!
//! The file is read once into typed structs; the rest of the code never sees raw strings from it.
//! Every problem is collected with its key path (`limits.requests_per_minute: expected an
//! integer`), so `tollgate check-config` can report them all at once.
//!
//! Not here: what the values mean at run time (that is each module's business), and reloading.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use crate::cidr::Cidr;
use crate::money::{ModelPrice, NanoUsd};
use crate::providers::ProviderKind;

/// Where the config comes from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/tollgate.toml";
/// Environment variables of the form `TOLLGATE_<SECTION>__<KEY>` override file keys.
const ENV_PREFIX: &str = "TOLLGATE_";

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub proxy: ProxyConfig,
    pub keys: KeyPolicyConfig,
    pub vault: VaultConfig,
    pub budgets: BudgetConfig,
    pub limits: LimitsConfig,
    pub seats: SeatsConfig,
    pub retention: RetentionConfig,
    pub logging: LoggingConfig,
    pub recorder: RecorderConfig,
    pub auth: AuthConfig,
    /// Defaults for every provider's circuit breaker (`[breaker]`); a provider's own
    /// `[providers.NAME.breaker]` table overrides them key by key.
    pub breaker: BreakerConfig,
    /// Operator price overrides from `[[pricing.models]]` (they win over the shipped book).
    pub pricing: Vec<PriceOverride>,
}

/// One `[[pricing.models]]` entry: prices in nano-USD per million tokens.
#[derive(Debug, Clone)]
pub struct PriceOverride {
    pub provider: String,
    pub model: String,
    pub price: ModelPrice,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub gateway_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub gateway_tls: Option<TlsFiles>,
    /// Worker threads of the gateway service.
    pub threads: usize,
    /// How long a graceful stop (SIGTERM) lets in-flight requests finish.
    pub grace_period: Duration,
    /// Longest a connection on any listener may take to send a whole request head, counted
    /// from when the listener starts waiting for it (on a kept-alive connection: from the end
    /// of the previous response, so it is also the idle keep-alive limit).
    pub client_header_timeout: Duration,
    /// Largest request head (request line and headers) any listener accepts: 431 above it.
    pub max_request_head_bytes: usize,
    /// Connections the gateway listener holds at once; lowered at start when the open-file
    /// limit cannot hold them (see `front_door::descriptors`).
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold on the gateway listener, and on
    /// the proxy listener; 0 means no per-address limit.
    pub max_connections_per_client: usize,
    /// The admin listener's own capacity, kept free of gateway and proxy traffic.
    pub admin_max_connections: usize,
    /// Connections one client address may hold on the admin listener; 0 means no limit.
    pub admin_max_connections_per_client: usize,
    /// Longest wait for the next piece of a request body from the client (408 after it).
    pub client_body_timeout: Duration,
    /// Longest time a client may leave a response write pending (it stopped reading).
    pub client_write_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub base_url: UpstreamUrl,
    /// Name of the environment variable holding the central key (never the key itself).
    pub api_key_env: Option<String>,
    /// More central keys (a pool): tried in order after `api_key_env`'s, each one skipped while
    /// it cools down after an upstream 429 or after the upstream rejected it (401/403).
    pub api_key_envs: Vec<String>,
    /// How long a pooled key rests after a 429 that carried no usable `Retry-After`.
    pub key_cooldown: Duration,
    pub mitm_hosts: Vec<String>,
    pub connect_timeout: Duration,
    /// Longest silence tolerated while reading a response (streams pause between events): the
    /// default of `first_byte_timeout` and `idle_timeout`.
    pub read_timeout: Duration,
    /// Longest wait for the response head once the request is sent.
    pub first_byte_timeout: Duration,
    /// Longest silence between two pieces of a response body.
    pub idle_timeout: Duration,
    pub breaker: BreakerConfig,
}

impl ProviderConfig {
    /// The environment variables of the central key pool, in the order keys are tried.
    pub fn central_key_envs(&self) -> impl Iterator<Item = &str> {
        self.api_key_env
            .iter()
            .chain(self.api_key_envs.iter())
            .map(String::as_str)
    }
}

/// A circuit breaker per provider and model: after `failure_threshold` consecutive failures
/// (5xx overload answers or timeouts) requests are answered 503 without contacting the upstream
/// for `open_duration`; then one trial request decides whether it closes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub open_duration: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: false,
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
        }
    }
}

/// A provider's `base_url`, split once so the hot path never parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub path: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("must start with http:// or https://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err("must name a host (and no credentials)".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(port) if port > 0 => (h.to_string(), port),
                _ => return Err(format!("invalid port {p:?}")),
            },
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err("must name a host".into());
        }
        if path.contains('?') || path.contains('#') {
            return Err("must not carry a query or fragment".into());
        }
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            path: path.trim_end_matches('/').to_string(),
        })
    }

    /// `host:port` for resolution.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `Host` header value: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            self.authority()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelPolicy {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub tls: Option<TlsFiles>,
    pub tunnel: TunnelPolicy,
    /// Private or reserved networks tunnels may reach anyway.
    pub allowed_private_cidrs: Vec<Cidr>,
    /// How long a client has to send its request head, and to finish each TLS handshake.
    pub handshake_timeout: Duration,
    /// A tunnel (or a decrypted HTTP/2 connection) with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Ports CONNECT may reach (the contract's 80 and 443 by default).
    pub allowed_ports: Vec<u16>,
    /// Connections the proxy listener holds at once (per address: the server's
    /// `max_connections_per_client`); lowered at start to fit the open-file limit.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicyConfig {
    pub central_api_key_enabled: bool,
    pub allow_user_api_key: bool,
    pub allow_central_api_key_fallback: bool,
}

/// Where the vault key for stored personal provider keys lives when `TOLLGATE_SECRET_KEY` is
/// not set.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    pub secret_key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupPolicy {
    Highest,
    Lowest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpricedPolicy {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub period: BudgetPeriod,
    pub default_limit: Option<NanoUsd>,
    pub group_policy: GroupPolicy,
    pub unpriced: UnpricedPolicy,
    /// What a capped request gets when the shared spend store (PostgreSQL) cannot be reached.
    pub when_database_down: DatabaseDownPolicy,
    /// How long a replica's reservations keep counting after it stops renewing them (it died).
    pub reservation_ttl: Duration,
}

/// `budgets.when_database_down`: decide capped requests on this replica's own ledger (the last
/// spend it knew plus its own traffic), or refuse them with a 503 until the database is back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseDownPolicy {
    Local,
    Refuse,
}

#[derive(Debug, Clone, Copy)]
pub struct LimitsConfig {
    pub requests_per_minute: u32,
    pub max_concurrent: u32,
    pub max_body_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct SeatsConfig {
    pub limit: Option<u32>,
    /// A user holds a seat while their last interception is at most this many days old.
    pub active_days: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    pub interceptions_days: u32,
}

#[derive(Debug, Clone)]
pub struct LoggingConfig {
    pub structured: bool,
    pub level: String,
}

#[derive(Debug, Clone)]
pub struct RecorderConfig {
    pub queue_capacity: usize,
    pub batch_size: usize,
    /// Where records go when the database stays down longer than `spill_after`.
    pub spill_dir: PathBuf,
    /// 0 = never spill (hold in memory, drop when the queue is full).
    pub spill_max_bytes: u64,
    pub spill_after: Duration,
    /// The spend journal's directory (`store::SpendJournal`); `None` (an empty string) turns it
    /// off, and a hard kill then loses the spend of records still queued.
    pub journal_dir: Option<PathBuf>,
    /// How often the journal is `fdatasync`ed: what a machine crash can lose.
    pub journal_sync: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct AuthConfig {
    /// How long a looked-up key stays trusted before it is checked again (≤ 5 s per contract).
    pub key_cache_ttl: Duration,
    /// Failed authentications one client address may make per minute (and in a burst) before
    /// keys from it that are not already cached are refused with 429 without a lookup.
    pub failed_attempts_per_minute: u32,
    /// A dashboard session unused this long is over.
    pub dashboard_idle: Duration,
    /// A dashboard session is over this long after sign-in, however much it is used.
    pub dashboard_max_age: Duration,
}

/// One problem found in the configuration, with the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} has {} problem(s):",
            self.source_name,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Loads the file given, or `config/tollgate.toml` if present, or built-in defaults; then
    /// applies `TOLLGATE_*` environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        let (name, text) = match path {
            Some(p) => (
                p.display().to_string(),
                Some(std::fs::read_to_string(p).map_err(|e| ConfigError {
                    source_name: p.display().to_string(),
                    problems: vec![ConfigProblem {
                        path: "(file)".into(),
                        message: format!("cannot read: {e}"),
                    }],
                })?),
            ),
            None => match std::fs::read_to_string(DEFAULT_CONFIG_PATH) {
                Ok(t) => (DEFAULT_CONFIG_PATH.to_string(), Some(t)),
                Err(_) => ("built-in defaults".to_string(), None),
            },
        };
        Config::from_parts(&name, text.as_deref(), &env)
    }

    /// Parses `text` (or nothing: defaults) with the given environment overrides.
    pub fn from_parts(
        source_name: &str,
        text: Option<&str>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        };
        let mut root = match text {
            Some(t) => t.parse::<Table>().map_err(|e| {
                fail(vec![ConfigProblem {
                    path: "(syntax)".into(),
                    message: e.to_string().trim().replace('\n', " "),
                }])
            })?,
            None => Table::new(),
        };
        let mut problems = Vec::new();
        apply_env_overrides(&mut root, env, &mut problems);
        let config = Reader::new(&mut problems).read(&root);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// The provider whose `mitm_hosts` lists `host`, if any.
    pub fn provider_for_mitm_host(&self, host: &str) -> Option<&str> {
        self.providers.iter().find_map(|(name, p)| {
            p.mitm_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host))
                .then_some(name.as_str())
        })
    }
}

fn apply_env_overrides(
    root: &mut Table,
    env: &[(String, String)],
    problems: &mut Vec<ConfigProblem>,
) {
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue; // e.g. TOLLGATE_SECRET_KEY: not a config key
        }
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        if path.iter().any(|p| p.is_empty()) {
            problems.push(ConfigProblem {
                path: name.clone(),
                message: "malformed override name".into(),
            });
            continue;
        }
        // A value that reads as TOML (number, bool, array) keeps its type; anything else is text.
        let value = format!("v = {raw}")
            .parse::<Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| Value::String(raw.clone()));
        if let Err(p) = set_path(root, &path, value) {
            problems.push(ConfigProblem {
                path: path.join("."),
                message: format!("{name} overrides a key inside {p}, which is not a table"),
            });
        }
    }
}

/// A key as it appears in a problem's path: bare when TOML allows it bare, else quoted as TOML
/// writes it (`""`, `"a.b"`, `'a"b'`), so such keys are named exactly rather than as an empty
/// or misleadingly dotted path.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if bare {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

/// Sets `path` in the tree, creating tables on the way; fails with the segment that is not a table.
fn set_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(t) => set_path(t, rest, value),
            _ => Err(first.clone()),
        },
    }
}

/// Typed extraction from the TOML tree that records every problem instead of stopping.
struct Reader<'p> {
    problems: &'p mut Vec<ConfigProblem>,
}

impl<'p> Reader<'p> {
    fn new(problems: &'p mut Vec<ConfigProblem>) -> Self {
        Reader { problems }
    }

    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigProblem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn read(&mut self, root: &Table) -> Config {
        const SECTIONS: &[&str] = &[
            "server",
            "database",
            "providers",
            "proxy",
            "keys",
            "budgets",
            "limits",
            "seats",
            "retention",
            "logging",
            "recorder",
            "auth",
            "pricing",
            "breaker",
        ];
        for key in root.keys() {
            if !SECTIONS.contains(&key.as_str()) {
                self.problem(key_segment(key), "unknown section");
            }
        }
        let server_table = self.section(root, "server");
        let server = self.server(&server_table);
        let database_table = self.section(root, "database");
        let database = self.database(&database_table);
        let breaker_table = self.section(root, "breaker");
        let breaker = self.breaker(&breaker_table, "breaker", BreakerConfig::default());
        let providers = self.providers(root, breaker);
        let proxy_table = self.section(root, "proxy");
        let proxy = self.proxy(&proxy_table);
        let keys_table = self.section(root, "keys");
        let keys = self.keys(&keys_table);
        let vault = VaultConfig {
            secret_key_file: self
                .string(&keys_table, "keys", "secret_key_file", "data/secret.key")
                .into(),
        };
        let pricing = self.pricing(root);
        let budgets = self.budgets(root);
        let limits_table = self.section(root, "limits");
        let limits = self.limits(&limits_table);
        let seats = {
            let t = self.section(root, "seats");
            let limit = self.opt_int(&t, "seats", "limit", 1, u32::MAX as i64);
            let active_days = self.int(&t, "seats", "active_days", 30, 1, 3650);
            self.unknown_keys(&t, "seats", &["limit", "active_days"]);
            SeatsConfig {
                limit: limit.map(|v| v as u32),
                active_days: active_days as u32,
            }
        };
        let retention = {
            let t = self.section(root, "retention");
            let days = self.int(&t, "retention", "interceptions_days", 60, 0, 100_000);
            self.unknown_keys(&t, "retention", &["interceptions_days"]);
            RetentionConfig {
                interceptions_days: days as u32,
            }
        };
        let logging = {
            let t = self.section(root, "logging");
            let structured = self.boolean(&t, "logging", "structured", true);
            let level = self.string(&t, "logging", "level", "info");
            self.unknown_keys(&t, "logging", &["structured", "level"]);
            LoggingConfig { structured, level }
        };
        let recorder = {
            let t = self.section(root, "recorder");
            let queue_capacity = self.int(&t, "recorder", "queue_capacity", 65_536, 16, 10_000_000);
            let batch_size = self.int(&t, "recorder", "batch_size", 512, 1, 100_000);
            let spill_dir = self.string(&t, "recorder", "spill_dir", "data/spill");
            let spill_max_bytes = self.int(&t, "recorder", "spill_max_bytes", 1 << 30, 0, i64::MAX);
            let spill_after = self.int(&t, "recorder", "spill_after_ms", 2_000, 0, 600_000);
            let journal_dir = self.string(&t, "recorder", "journal_dir", "data/journal");
            let journal_sync = self.int(&t, "recorder", "journal_sync_ms", 10, 1, 1_000);
            self.unknown_keys(
                &t,
                "recorder",
                &[
                    "queue_capacity",
                    "batch_size",
                    "spill_dir",
                    "spill_max_bytes",
                    "spill_after_ms",
                    "journal_dir",
                    "journal_sync_ms",
                ],
            );
            RecorderConfig {
                queue_capacity: queue_capacity as usize,
                batch_size: batch_size as usize,
                spill_dir: spill_dir.into(),
                spill_max_bytes: spill_max_bytes as u64,
                spill_after: Duration::from_millis(spill_after as u64),
                journal_dir: (!journal_dir.is_empty()).then(|| journal_dir.into()),
                journal_sync: Duration::from_millis(journal_sync as u64),
            }
        };
        let auth = {
            let t = self.section(root, "auth");
            let ttl = self.int(&t, "auth", "key_cache_ttl_ms", 2_000, 0, 5_000);
            let failed = self.int(&t, "auth", "failed_attempts_per_minute", 60, 1, 100_000);
            let idle = self.int(&t, "auth", "dashboard_idle_minutes", 60, 1, 10_080);
            let max_age = self.int(&t, "auth", "dashboard_max_hours", 12, 1, 720);
            self.unknown_keys(
                &t,
                "auth",
                &[
                    "key_cache_ttl_ms",
                    "failed_attempts_per_minute",
                    "dashboard_idle_minutes",
                    "dashboard_max_hours",
                ],
            );
            AuthConfig {
                key_cache_ttl: Duration::from_millis(ttl as u64),
                failed_attempts_per_minute: failed as u32,
                dashboard_idle: Duration::from_secs(idle as u64 * 60),
                dashboard_max_age: Duration::from_secs(max_age as u64 * 3600),
            }
        };
        if proxy.enabled && server_addrs_clash(&server, &proxy) {
            self.problem(
                "proxy.listen",
                "must differ from the gateway and admin listeners",
            );
        }
        if server.gateway_listen == server.admin_listen && server.gateway_listen.port() != 0 {
            self.problem(
                "server.admin_listen",
                "must differ from server.gateway_listen",
            );
        }
        Config {
            server,
            database,
            providers,
            proxy,
            keys,
            vault,
            budgets,
            limits,
            seats,
            retention,
            logging,
            recorder,
            auth,
            breaker,
            pricing,
        }
    }

    /// A `[breaker]`-shaped table; keys it leaves out keep `base`'s values.
    fn breaker(&mut self, t: &Table, s: &str, base: BreakerConfig) -> BreakerConfig {
        let cfg = BreakerConfig {
            enabled: self.boolean(t, s, "enabled", base.enabled),
            failure_threshold: self.int(
                t,
                s,
                "failure_threshold",
                i64::from(base.failure_threshold),
                1,
                10_000,
            ) as u32,
            open_duration: Duration::from_millis(self.int(
                t,
                s,
                "open_ms",
                base.open_duration.as_millis() as i64,
                10,
                86_400_000,
            ) as u64),
        };
        self.unknown_keys(t, s, &["enabled", "failure_threshold", "open_ms"]);
        cfg
    }

    fn pricing(&mut self, root: &Table) -> Vec<PriceOverride> {
        let t = self.section(root, "pricing");
        self.unknown_keys(&t, "pricing", &["models"]);
        let items = match t.get("models") {
            None => return Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(_) => {
                self.problem("pricing.models", "expected [[pricing.models]] tables");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("pricing.models[{i}]");
            let Value::Table(m) = item else {
                self.problem(&path, "must be a table");
                continue;
            };
            let Some(model) = self.opt_string(m, &path, "model") else {
                self.problem(format!("{path}.model"), "required");
                continue;
            };
            let amount = |this: &mut Self, key: &str, required: bool| -> Option<NanoUsd> {
                match this.opt_string(m, &path, key) {
                    None if required => {
                        this.problem(
                            format!("{path}.{key}"),
                            "required (USD per million tokens, a decimal string)",
                        );
                        None
                    }
                    None => Some(NanoUsd(0)),
                    Some(v) => match NanoUsd::parse_usd(&v) {
                        Ok(n) if n.0 >= 0 => Some(n),
                        Ok(_) => {
                            this.problem(format!("{path}.{key}"), "must not be negative");
                            None
                        }
                        Err(e) => {
                            this.problem(format!("{path}.{key}"), format!("{v:?}: {e}"));
                            None
                        }
                    },
                }
            };
            let input = amount(self, "input", true);
            let output = amount(self, "output", true);
            let cache_read = match m.get("cache_read") {
                None => input,
                Some(_) => amount(self, "cache_read", false),
            };
            let cache_write = match m.get("cache_write") {
                None => input,
                Some(_) => amount(self, "cache_write", false),
            };
            let output_limit = self
                .opt_int(m, &path, "output_limit", 1, i64::MAX)
                .map(|v| v as u64);
            let provider = self.string(m, &path, "provider", "");
            self.unknown_keys(
                m,
                &path,
                &[
                    "model",
                    "provider",
                    "input",
                    "output",
                    "cache_read",
                    "cache_write",
                    "output_limit",
                ],
            );
            if let (Some(input), Some(output), Some(cache_read), Some(cache_write)) =
                (input, output, cache_read, cache_write)
            {
                out.push(PriceOverride {
                    provider,
                    model,
                    price: ModelPrice {
                        input,
                        output,
                        cache_read,
                        cache_write,
                        output_limit,
                    },
                });
            }
        }
        out
    }

    fn section(&mut self, root: &Table, name: &str) -> Table {
        match root.get(name) {
            None => Table::new(),
            Some(Value::Table(t)) => t.clone(),
            Some(_) => {
                self.problem(name, "must be a table");
                Table::new()
            }
        }
    }

    fn unknown_keys(&mut self, t: &Table, section: &str, known: &[&str]) {
        for key in t.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(format!("{section}.{}", key_segment(key)), "unknown key");
            }
        }
    }

    fn opt_string(&mut self, t: &Table, section: &str, key: &str) -> Option<String> {
        match t.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Integer(i) => Some(i.to_string()),
            other => {
                self.problem(
                    format!("{section}.{key}"),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn string(&mut self, t: &Table, section: &str, key: &str, default: &str) -> String {
        self.opt_string(t, section, key)
            .unwrap_or_else(|| default.to_string())
    }

    fn boolean(&mut self, t: &Table, section: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    format!("{section}.{key}"),
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn opt_int(&mut self, t: &Table, section: &str, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = match t.get(key)? {
            Value::Integer(i) => *i,
            other => {
                self.problem(
                    format!("{section}.{key}"),
                    format!("expected an integer, found {}", other.type_str()),
                );
                return None;
            }
        };
        if v < min || v > max {
            self.problem(
                format!("{section}.{key}"),
                format!("{v} is out of range ({min}..={max})"),
            );
            return None;
        }
        Some(v)
    }

    fn int(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        self.opt_int(t, section, key, min, max).unwrap_or(default)
    }

    fn addr(&mut self, t: &Table, section: &str, key: &str, default: &str) -> SocketAddr {
        let s = self.string(t, section, key, default);
        match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    format!("{section}.{key}"),
                    format!("{s:?} is not an ip:port address"),
                );
                default.parse().expect("valid default address")
            }
        }
    }

    fn tls_pair(
        &mut self,
        t: &Table,
        section: &str,
        cert_key: &str,
        key_key: &str,
    ) -> Option<TlsFiles> {
        let cert = self.opt_string(t, section, cert_key);
        let key = self.opt_string(t, section, key_key);
        match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                self.problem(
                    format!("{section}.{key_key}"),
                    format!("required when {cert_key} is set"),
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    format!("{section}.{cert_key}"),
                    format!("required when {key_key} is set"),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(
        &mut self,
        t: &Table,
        section: &str,
        key: &str,
        default: T,
        options: &[(&str, T)],
    ) -> T {
        let Some(s) = self.opt_string(t, section, key) else {
            return default;
        };
        match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => *v,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.problem(
                    format!("{section}.{key}"),
                    format!("{s:?} is not one of {}", names.join(" | ")),
                );
                default
            }
        }
    }

    fn server(&mut self, t: &Table) -> ServerConfig {
        let s = "server";
        let cfg = ServerConfig {
            gateway_listen: self.addr(t, s, "gateway_listen", "127.0.0.1:8080"),
            admin_listen: self.addr(t, s, "admin_listen", "127.0.0.1:9090"),
            gateway_tls: self.tls_pair(t, s, "gateway_tls_cert", "gateway_tls_key"),
            threads: self.int(t, s, "threads", 2, 1, 256) as usize,
            grace_period: Duration::from_secs(
                self.int(t, s, "grace_period_seconds", 5, 0, 3600) as u64
            ),
            client_header_timeout: Duration::from_millis(self.int(
                t,
                s,
                "client_header_timeout_ms",
                30_000,
                10,
                3_600_000,
            ) as u64),
            client_body_timeout: Duration::from_millis(self.int(
                t,
                s,
                "client_body_timeout_ms",
                60_000,
                10,
                3_600_000,
            ) as u64),
            client_write_timeout: Duration::from_millis(self.int(
                t,
                s,
                "client_write_timeout_ms",
                60_000,
                10,
                3_600_000,
            ) as u64),
            max_request_head_bytes: self.int(
                t,
                s,
                "max_request_head_bytes",
                65_536,
                1_024,
                1_048_576,
            ) as usize,
            max_connections: self.int(t, s, "max_connections", 10_000, 16, 1_000_000) as usize,
            max_connections_per_client: self.int(
                t,
                s,
                "max_connections_per_client",
                1_024,
                0,
                1_000_000,
            ) as usize,
            admin_max_connections: self.int(t, s, "admin_max_connections", 64, 4, 100_000) as usize,
            admin_max_connections_per_client: self.int(
                t,
                s,
                "admin_max_connections_per_client",
                16,
                0,
                100_000,
            ) as usize,
        };
        self.unknown_keys(
            t,
            s,
            &[
                "gateway_listen",
                "admin_listen",
                "gateway_tls_cert",
                "gateway_tls_key",
                "threads",
                "grace_period_seconds",
                "client_header_timeout_ms",
                "client_body_timeout_ms",
                "client_write_timeout_ms",
                "max_request_head_bytes",
                "max_connections",
                "max_connections_per_client",
                "admin_max_connections",
                "admin_max_connections_per_client",
            ],
        );
        cfg
    }

    fn database(&mut self, t: &Table) -> DatabaseConfig {
        let s = "database";
        let url = self.string(t, s, "url", "sqlite://data/tollgate.db");
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            self.problem("database.url", "must start with sqlite: or postgres://");
        }
        let max_connections = self.int(t, s, "max_connections", 8, 1, 1000) as u32;
        self.unknown_keys(t, s, &["url", "max_connections"]);
        DatabaseConfig {
            url,
            max_connections,
        }
    }

    fn providers(
        &mut self,
        root: &Table,
        breaker_defaults: BreakerConfig,
    ) -> BTreeMap<String, ProviderConfig> {
        let mut out = BTreeMap::new();
        let table = match root.get("providers") {
            None => {
                let mut defaults = default_providers();
                for p in defaults.values_mut() {
                    p.breaker = breaker_defaults;
                }
                return defaults;
            }
            Some(Value::Table(t)) => t.clone(),
            Some(_) => {
                self.problem("providers", "must be a table of [providers.NAME] tables");
                return out;
            }
        };
        for (name, value) in &table {
            let path = format!("providers.{}", key_segment(name));
            if !valid_route_name(name) {
                self.problem(
                    &path,
                    "provider names are route names: lowercase letters, digits, '-' and '_'",
                );
                continue;
            }
            let Value::Table(t) = value else {
                self.problem(&path, "must be a table");
                continue;
            };
            let kind = match self.opt_string(t, &path, "kind") {
                None => {
                    self.problem(
                        format!("{path}.kind"),
                        "required: openai | anthropic | openai-compatible | copilot",
                    );
                    continue;
                }
                Some(k) => match k.as_str() {
                    "openai" => ProviderKind::OpenAi,
                    "anthropic" => ProviderKind::Anthropic,
                    "openai-compatible" => ProviderKind::OpenAiCompatible,
                    "copilot" => ProviderKind::Copilot,
                    other => {
                        self.problem(
                            format!("{path}.kind"),
                            format!("{other:?} is not one of openai | anthropic | openai-compatible | copilot"),
                        );
                        continue;
                    }
                },
            };
            let default_url = match kind {
                ProviderKind::OpenAi => Some("https://api.openai.com"),
                ProviderKind::Anthropic => Some("https://api.anthropic.com"),
                ProviderKind::Copilot => Some("https://api.individual.githubcopilot.com"),
                ProviderKind::OpenAiCompatible => None,
            };
            let base_url = match self
                .opt_string(t, &path, "base_url")
                .or(default_url.map(String::from))
            {
                None => {
                    self.problem(
                        format!("{path}.base_url"),
                        "required for openai-compatible providers",
                    );
                    continue;
                }
                Some(u) => match UpstreamUrl::parse(&u) {
                    Ok(u) => u,
                    Err(e) => {
                        self.problem(format!("{path}.base_url"), format!("{u:?}: {e}"));
                        continue;
                    }
                },
            };
            let api_key_env = self.opt_string(t, &path, "api_key_env");
            if kind == ProviderKind::Copilot && api_key_env.is_some() {
                self.problem(
                    format!("{path}.api_key_env"),
                    "copilot has no central key: the client's own GitHub token is always used",
                );
            }
            let api_key_envs = match t.get("api_key_envs") {
                None => Vec::new(),
                Some(Value::Array(items)) => {
                    let mut names = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        match item.as_str() {
                            Some(n) if !n.trim().is_empty() => names.push(n.to_string()),
                            _ => self.problem(
                                format!("{path}.api_key_envs[{i}]"),
                                "expected the name of an environment variable",
                            ),
                        }
                    }
                    names
                }
                Some(_) => {
                    self.problem(
                        format!("{path}.api_key_envs"),
                        "expected an array of environment variable names",
                    );
                    Vec::new()
                }
            };
            if kind == ProviderKind::Copilot && !api_key_envs.is_empty() {
                self.problem(
                    format!("{path}.api_key_envs"),
                    "copilot has no central key: the client's own GitHub token is always used",
                );
            }
            {
                let mut seen = std::collections::BTreeSet::new();
                for n in api_key_env.iter().chain(api_key_envs.iter()) {
                    if !seen.insert(n.as_str()) {
                        self.problem(
                            format!("{path}.api_key_envs"),
                            format!("{n} is listed twice"),
                        );
                    }
                }
            }
            let key_cooldown =
                Duration::from_secs(
                    self.int(t, &path, "key_cooldown_seconds", 60, 1, 86_400) as u64
                );
            let mitm_hosts = match t.get("mitm_hosts") {
                None => Vec::new(),
                Some(Value::Array(items)) => {
                    let mut hosts = Vec::new();
                    for (i, item) in items.iter().enumerate() {
                        match item.as_str() {
                            Some(h) if !h.is_empty() && !h.contains([':', '/', ' ']) => {
                                hosts.push(h.to_ascii_lowercase())
                            }
                            _ => self
                                .problem(format!("{path}.mitm_hosts[{i}]"), "expected a host name"),
                        }
                    }
                    hosts
                }
                Some(_) => {
                    self.problem(
                        format!("{path}.mitm_hosts"),
                        "expected an array of host names",
                    );
                    Vec::new()
                }
            };
            let connect_timeout =
                Duration::from_millis(
                    self.int(t, &path, "connect_timeout_ms", 10_000, 1, 600_000) as u64
                );
            let read_timeout =
                Duration::from_secs(
                    self.int(t, &path, "read_timeout_seconds", 300, 1, 86_400) as u64
                );
            let read_ms = read_timeout.as_millis() as i64;
            let first_byte_timeout = Duration::from_millis(self.int(
                t,
                &path,
                "first_byte_timeout_ms",
                read_ms,
                1,
                86_400_000,
            ) as u64);
            let idle_timeout =
                Duration::from_millis(
                    self.int(t, &path, "idle_timeout_ms", read_ms, 1, 86_400_000) as u64,
                );
            let breaker = match t.get("breaker") {
                None => breaker_defaults,
                Some(Value::Table(b)) => {
                    self.breaker(b, &format!("{path}.breaker"), breaker_defaults)
                }
                Some(_) => {
                    self.problem(format!("{path}.breaker"), "must be a table");
                    breaker_defaults
                }
            };
            self.unknown_keys(
                t,
                &path,
                &[
                    "kind",
                    "base_url",
                    "api_key_env",
                    "api_key_envs",
                    "key_cooldown_seconds",
                    "mitm_hosts",
                    "connect_timeout_ms",
                    "read_timeout_seconds",
                    "first_byte_timeout_ms",
                    "idle_timeout_ms",
                    "breaker",
                ],
            );
            out.insert(
                name.clone(),
                ProviderConfig {
                    kind,
                    base_url,
                    api_key_env,
                    api_key_envs,
                    key_cooldown,
                    mitm_hosts,
                    connect_timeout,
                    read_timeout,
                    first_byte_timeout,
                    idle_timeout,
                    breaker,
                },
            );
        }
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, p) in &out {
            for h in &p.mitm_hosts {
                if let Some(other) = seen.insert(h.as_str(), name.as_str()) {
                    self.problems.push(ConfigProblem {
                        path: format!("providers.{name}.mitm_hosts"),
                        message: format!("{h} is already listed by providers.{other}"),
                    });
                }
            }
        }
        out
    }

    fn proxy(&mut self, t: &Table) -> ProxyConfig {
        let s = "proxy";
        let cfg = ProxyConfig {
            enabled: self.boolean(t, s, "enabled", false),
            listen: self.addr(t, s, "listen", "127.0.0.1:8888"),
            ca_cert: self.string(t, s, "ca_cert", "certs/ca.pem").into(),
            ca_key: self.string(t, s, "ca_key", "certs/ca.key").into(),
            tls: self.tls_pair(t, s, "tls_cert", "tls_key"),
            tunnel: self.choice(
                t,
                s,
                "tunnel",
                TunnelPolicy::Allow,
                &[("allow", TunnelPolicy::Allow), ("deny", TunnelPolicy::Deny)],
            ),
            allowed_private_cidrs: self.cidrs(t.get("allowed_private_cidrs")),
            handshake_timeout: Duration::from_millis(self.int(
                t,
                s,
                "handshake_timeout_ms",
                10_000,
                100,
                120_000,
            ) as u64),
            idle_timeout: Duration::from_secs(
                self.int(t, s, "idle_timeout_seconds", 300, 1, 86_400) as u64,
            ),
            allowed_ports: self.ports(t.get("allowed_ports")),
            max_connections: self.int(t, s, "max_connections", 10_000, 16, 1_000_000) as usize,
        };
        self.unknown_keys(
            t,
            s,
            &[
                "enabled",
                "listen",
                "ca_cert",
                "ca_key",
                "tls_cert",
                "tls_key",
                "tunnel",
                "allowed_private_cidrs",
                "handshake_timeout_ms",
                "idle_timeout_seconds",
                "allowed_ports",
                "max_connections",
            ],
        );
        cfg
    }

    fn ports(&mut self, value: Option<&Value>) -> Vec<u16> {
        let path = "proxy.allowed_ports";
        let Some(value) = value else {
            return vec![80, 443];
        };
        let Value::Array(items) = value else {
            self.problem(path, "expected an array of port numbers (e.g. [80, 443])");
            return vec![80, 443];
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item
                .as_integer()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
            {
                Some(p) => out.push(p),
                None => self.problem(format!("{path}[{i}]"), "expected a port number (1..=65535)"),
            }
        }
        out
    }

    fn cidrs(&mut self, value: Option<&Value>) -> Vec<Cidr> {
        let path = "proxy.allowed_private_cidrs";
        let items = match value {
            None => return Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => {
                self.problem(
                    path,
                    "expected an array of CIDR strings (e.g. [\"10.0.0.0/8\"])",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str().map(str::parse::<Cidr>) {
                Some(Ok(c)) => out.push(c),
                Some(Err(e)) => self.problem(format!("{path}[{i}]"), e),
                None => self.problem(format!("{path}[{i}]"), "expected a CIDR string"),
            }
        }
        out
    }

    fn keys(&mut self, t: &Table) -> KeyPolicyConfig {
        let s = "keys";
        let cfg = KeyPolicyConfig {
            central_api_key_enabled: self.boolean(t, s, "central_api_key_enabled", true),
            allow_user_api_key: self.boolean(t, s, "allow_user_api_key", false),
            allow_central_api_key_fallback: self.boolean(
                t,
                s,
                "allow_central_api_key_fallback",
                false,
            ),
        };
        self.unknown_keys(
            t,
            s,
            &[
                "central_api_key_enabled",
                "allow_user_api_key",
                "allow_central_api_key_fallback",
                "secret_key_file",
            ],
        );
        if !cfg.central_api_key_enabled && !cfg.allow_user_api_key {
            self.problem(
                "keys",
                "central_api_key_enabled and allow_user_api_key are both false: no request could ever be served",
            );
        } else if cfg.allow_central_api_key_fallback
            && !(cfg.central_api_key_enabled && cfg.allow_user_api_key)
        {
            self.problem(
                "keys.allow_central_api_key_fallback",
                "needs both central_api_key_enabled and allow_user_api_key",
            );
        }
        cfg
    }

    fn budgets(&mut self, root: &Table) -> BudgetConfig {
        let t = self.section(root, "budgets");
        let s = "budgets";
        let period = self.choice(
            &t,
            s,
            "period",
            BudgetPeriod::Month,
            &[
                ("day", BudgetPeriod::Day),
                ("week", BudgetPeriod::Week),
                ("month", BudgetPeriod::Month),
            ],
        );
        let default_limit = match self.opt_string(&t, s, "default_limit_usd") {
            None => None,
            Some(v) => match NanoUsd::parse_usd(&v) {
                Ok(n) if n.0 >= 0 => Some(n),
                Ok(_) => {
                    self.problem("budgets.default_limit_usd", "must not be negative");
                    None
                }
                Err(e) => {
                    self.problem("budgets.default_limit_usd", format!("{v:?}: {e}"));
                    None
                }
            },
        };
        let group_policy = self.choice(
            &t,
            s,
            "group_policy",
            GroupPolicy::Highest,
            &[
                ("highest", GroupPolicy::Highest),
                ("lowest", GroupPolicy::Lowest),
            ],
        );
        let unpriced = self.choice(
            &t,
            s,
            "unpriced",
            UnpricedPolicy::Allow,
            &[
                ("allow", UnpricedPolicy::Allow),
                ("deny", UnpricedPolicy::Deny),
            ],
        );
        let when_database_down = self.choice(
            &t,
            s,
            "when_database_down",
            DatabaseDownPolicy::Local,
            &[
                ("local", DatabaseDownPolicy::Local),
                ("refuse", DatabaseDownPolicy::Refuse),
            ],
        );
        let ttl = self.int(&t, s, "reservation_ttl_seconds", 30, 5, 3600);
        self.unknown_keys(
            &t,
            s,
            &[
                "period",
                "default_limit_usd",
                "group_policy",
                "unpriced",
                "when_database_down",
                "reservation_ttl_seconds",
            ],
        );
        BudgetConfig {
            period,
            default_limit,
            group_policy,
            unpriced,
            when_database_down,
            reservation_ttl: Duration::from_secs(ttl as u64),
        }
    }

    fn limits(&mut self, t: &Table) -> LimitsConfig {
        let s = "limits";
        let cfg = LimitsConfig {
            requests_per_minute: self.int(t, s, "requests_per_minute", 600, 0, 1_000_000) as u32,
            max_concurrent: self.int(t, s, "max_concurrent", 0, 0, 1_000_000) as u32,
            max_body_bytes: self.int(t, s, "max_body_bytes", 32 * 1024 * 1024, 1024, 1 << 30)
                as usize,
        };
        self.unknown_keys(
            t,
            s,
            &["requests_per_minute", "max_concurrent", "max_body_bytes"],
        );
        cfg
    }
}

fn server_addrs_clash(server: &ServerConfig, proxy: &ProxyConfig) -> bool {
    proxy.listen.port() != 0
        && (proxy.listen == server.gateway_listen || proxy.listen == server.admin_listen)
}

fn valid_route_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// With no `[providers]` at all, the two real providers with their public URLs.
fn default_providers() -> BTreeMap<String, ProviderConfig> {
    let mk = |kind, url: &str, env: &str, host: &str| ProviderConfig {
        kind,
        base_url: UpstreamUrl::parse(url).expect("valid built-in url"),
        api_key_env: Some(env.to_string()),
        api_key_envs: Vec::new(),
        key_cooldown: Duration::from_secs(60),
        mitm_hosts: vec![host.to_string()],
        connect_timeout: Duration::from_secs(10),
        read_timeout: Duration::from_secs(300),
        first_byte_timeout: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(300),
        breaker: BreakerConfig::default(),
    };
    BTreeMap::from([
        (
            "openai".to_string(),
            mk(
                ProviderKind::OpenAi,
                "https://api.openai.com",
                "OPENAI_API_KEY",
                "api.openai.com",
            ),
        ),
        (
            "anthropic".to_string(),
            mk(
                ProviderKind::Anthropic,
                "https://api.anthropic.com",
                "ANTHROPIC_API_KEY",
                "api.anthropic.com",
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_parts("test", Some(text), &[])
    }

    #[test]
    fn defaults_without_a_file() {
        let c = Config::from_parts("none", None, &[]).unwrap();
        assert_eq!(c.server.gateway_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.server.client_header_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_request_head_bytes, 64 * 1024);
        assert_eq!(
            (
                c.server.max_connections,
                c.server.max_connections_per_client,
                c.server.admin_max_connections,
                c.server.admin_max_connections_per_client,
                c.proxy.max_connections
            ),
            (10_000, 1_024, 64, 16, 10_000)
        );
        assert_eq!(c.auth.failed_attempts_per_minute, 60);
        assert_eq!(c.auth.dashboard_idle, Duration::from_secs(3600));
        assert_eq!(c.auth.dashboard_max_age, Duration::from_secs(12 * 3600));
        assert_eq!(c.database.url, "sqlite://data/tollgate.db");
        assert_eq!(c.limits.max_body_bytes, 33_554_432);
        assert_eq!(c.providers.len(), 2);
        assert!(c.keys.central_api_key_enabled);
    }

    /// Regression (found by the `config` fuzz target): `[""]` was reported as ": unknown
    /// section", a problem with an empty key path that names nothing.
    #[test]
    fn keys_that_are_not_bare_are_quoted_in_problem_paths() {
        for (text, path) in [
            ("[\"\"]", "\"\""),
            ("[\"a.b\"]", "\"a.b\""),
            ("[server]\n\"x y\" = 1", "server.\"x y\""),
            ("[server]\n\"\" = 1", "server.\"\""),
            ("[providers.\"\"]\nkind = \"openai\"", "providers.\"\""),
            (
                "[providers.\"a\\\"b\"]\nkind = \"openai\"",
                "providers.'a\"b'",
            ),
            ("[nope]", "nope"),
        ] {
            let err = parse(text).unwrap_err();
            let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
            assert!(paths.contains(&path), "{text:?} gave {paths:?}");
            assert!(
                paths.iter().all(|p| !p.is_empty()),
                "{text:?} gave {paths:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let err = parse(
            r#"
            [server]
            gateway_listen = "nope"
            [limits]
            requests_per_minute = "many"
            max_concurrent = -1
            [budgets]
            period = "year"
            default_limit_usd = "1.2.3"
            [providers.openai]
            kind = "openai"
            base_url = "ftp://x"
            [providers.other]
            kind = "mystery"
            [keys]
            central_api_key_enabled = false
            [surprise]
            "#,
        )
        .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "server.gateway_listen",
            "limits.requests_per_minute",
            "limits.max_concurrent",
            "budgets.period",
            "budgets.default_limit_usd",
            "providers.openai.base_url",
            "providers.other.kind",
            "keys",
            "surprise",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn env_overrides_win_and_keep_types() {
        let env = vec![
            (
                "TOLLGATE_DATABASE__URL".to_string(),
                "sqlite://other.db".to_string(),
            ),
            (
                "TOLLGATE_LIMITS__REQUESTS_PER_MINUTE".to_string(),
                "7".to_string(),
            ),
            (
                "TOLLGATE_PROVIDERS__OPENAI__BASE_URL".to_string(),
                "http://127.0.0.1:9".to_string(),
            ),
            ("TOLLGATE_SECRET_KEY".to_string(), "ignored".to_string()),
        ];
        let c = Config::from_parts(
            "t",
            Some("[providers.openai]\nkind = \"openai\"\nbase_url = \"https://api.openai.com\"\n"),
            &env,
        )
        .unwrap();
        assert_eq!(c.database.url, "sqlite://other.db");
        assert_eq!(c.limits.requests_per_minute, 7);
        assert_eq!(c.providers["openai"].base_url.port, 9);
        assert!(!c.providers["openai"].base_url.tls);
    }

    #[test]
    fn key_policy_combinations() {
        let bad = [
            "central_api_key_enabled = false\nallow_user_api_key = false",
            "central_api_key_enabled = false\nallow_user_api_key = false\nallow_central_api_key_fallback = true",
            "central_api_key_enabled = true\nallow_user_api_key = false\nallow_central_api_key_fallback = true",
            "central_api_key_enabled = false\nallow_user_api_key = true\nallow_central_api_key_fallback = true",
        ];
        for b in bad {
            assert!(parse(&format!("[keys]\n{b}\n")).is_err(), "{b}");
        }
        let good = [
            "central_api_key_enabled = true\nallow_user_api_key = false",
            "central_api_key_enabled = false\nallow_user_api_key = true",
            "central_api_key_enabled = true\nallow_user_api_key = true",
            "central_api_key_enabled = true\nallow_user_api_key = true\nallow_central_api_key_fallback = true",
        ];
        for g in good {
            assert!(parse(&format!("[keys]\n{g}\n")).is_ok(), "{g}");
        }
    }

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "api.openai.com", 443, "")
        );
        assert_eq!(u.host_header(), "api.openai.com");
        let u = UpstreamUrl::parse("http://127.0.0.1:8000/proxy/").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8000, "/proxy"));
        assert_eq!(u.host_header(), "127.0.0.1:8000");
        assert!(UpstreamUrl::parse("api.openai.com").is_err());
        assert!(UpstreamUrl::parse("http://u:p@host").is_err());
        assert!(UpstreamUrl::parse("http://host:0").is_err());
    }

    #[test]
    fn key_pools_timeouts_and_breakers() {
        let c = parse(
            r#"
            [breaker]
            failure_threshold = 3
            [providers.openai]
            kind = "openai"
            api_key_env = "A"
            api_key_envs = ["B", "C"]
            key_cooldown_seconds = 5
            first_byte_timeout_ms = 250
            [providers.openai.breaker]
            enabled = true
            open_ms = 1500
            [providers.anthropic]
            kind = "anthropic"
            read_timeout_seconds = 7
            "#,
        )
        .unwrap();
        let p = &c.providers["openai"];
        assert_eq!(p.central_key_envs().collect::<Vec<_>>(), ["A", "B", "C"]);
        assert_eq!(p.key_cooldown, Duration::from_secs(5));
        assert_eq!(p.first_byte_timeout, Duration::from_millis(250));
        assert_eq!(p.idle_timeout, Duration::from_secs(300));
        assert_eq!(
            p.breaker,
            BreakerConfig {
                enabled: true,
                failure_threshold: 3,
                open_duration: Duration::from_millis(1500)
            }
        );
        let a = &c.providers["anthropic"];
        assert!(!a.breaker.enabled);
        assert_eq!(a.breaker.failure_threshold, 3);
        assert_eq!(a.first_byte_timeout, Duration::from_secs(7));
        assert_eq!(a.idle_timeout, Duration::from_secs(7));
        assert_eq!(c.server.client_body_timeout, Duration::from_secs(60));
        assert_eq!(c.server.client_write_timeout, Duration::from_secs(60));
        assert_eq!(c.server.client_header_timeout, Duration::from_secs(30));

        let err = parse(
            "[providers.x]\nkind = \"openai\"\napi_key_env = \"A\"\napi_key_envs = [\"A\", 3]\n[providers.x.breaker]\nfailure_threshold = 0\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "providers.x.api_key_envs[1]",
                "providers.x.api_key_envs",
                "providers.x.breaker.failure_threshold"
            ]
        );
    }

    #[test]
    fn proxy_cidrs_and_timeouts() {
        let c = parse(
            "[proxy]\nallowed_private_cidrs = [\"10.0.0.0/8\", \"::1\"]\nhandshake_timeout_ms = 500\n",
        )
        .unwrap();
        assert_eq!(c.proxy.allowed_private_cidrs.len(), 2);
        assert_eq!(c.proxy.handshake_timeout, Duration::from_millis(500));
        assert_eq!(c.proxy.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.proxy.allowed_ports, [80, 443]);
        assert!(parse("[proxy]\nallowed_ports = [443, 0]\n").is_err());
        let err = parse("[proxy]\nallowed_private_cidrs = [\"10.0.0.0/8\", \"10.1.0.0/8\", 7]\n")
            .unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "proxy.allowed_private_cidrs[1]",
                "proxy.allowed_private_cidrs[2]"
            ]
        );
    }

    #[test]
    fn shipped_configs_are_valid() {
        for f in ["config/tollgate.toml", "config/tollgate.example.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let text = std::fs::read_to_string(&path).unwrap();
            if let Err(e) = Config::from_parts(f, Some(&text), &[]) {
                panic!("{e}");
            }
        }
    }
}
