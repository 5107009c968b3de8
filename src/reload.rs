//! Configuration reload on SIGHUP: providers (routes, key pools, timeouts, breakers), prices,
//! budget defaults, request limits and seats, without dropping a connection.
//!
//! The file given at start is read again and validated as `check-config` would. A file with
//! problems is refused as a whole, with every problem logged, and the running configuration
//! stays. A valid one is swapped in for new requests; requests in flight finish on the
//! provider route they already hold. Parts that live in sockets, pools or runtimes built once
//! at start (listeners, database, proxy front door, key vault, recorder, logging, auth cache,
//! retention, the budget period) keep their running values, and each changed one is logged as
//! needing a restart.
//!
//! pingora handles SIGTERM, SIGINT and SIGQUIT itself and leaves SIGHUP alone, whose default
//! action would end the process; the handler is installed before the listeners open.
//!
//! Not here: parsing and validation (`config`), or what each value does (its module).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::app::AppState;
use crate::config::Config;
use crate::telemetry::metric;

/// Installs the SIGHUP handler on `runtime` (the background runtime) for the life of the process.
pub fn install(
    runtime: &tokio::runtime::Handle,
    state: Arc<AppState>,
    path: Option<PathBuf>,
) -> std::io::Result<()> {
    let mut hangups = {
        let _guard = runtime.enter();
        signal(SignalKind::hangup())?
    };
    runtime.spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the configuration");
            reload(&state, path.as_deref()).await;
        }
    });
    Ok(())
}

/// Reads, validates and applies the configuration file; returns whether it was applied.
pub async fn reload(state: &AppState, path: Option<&Path>) -> bool {
    let fresh = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let problems: Vec<String> = e.problems.iter().map(ToString::to_string).collect();
            tracing::error!(file = %e.source_name, problems = ?problems, "configuration reload refused; the running configuration stays in force");
            metrics::counter!(metric::CONFIG_RELOADS_TOTAL, "result" => "refused").increment(1);
            return false;
        }
    };
    let (applied, needs_restart) = merge(&state.config(), fresh);
    for key in &needs_restart {
        tracing::warn!(
            key,
            "changed in the configuration file, but only a restart applies it; the running value is kept"
        );
    }
    let providers = applied.providers.len();
    state
        .reconfigure(Arc::new(applied), |name| std::env::var(name).ok())
        .await;
    state.warn_about_missing_keys();
    metrics::counter!(metric::CONFIG_RELOADS_TOTAL, "result" => "applied").increment(1);
    tracing::info!(
        providers,
        needs_restart = ?needs_restart,
        "configuration reloaded"
    );
    true
}

/// The configuration to run: `fresh` with the restart-only parts of `running` kept, and the
/// key paths of the restart-only parts that differ.
pub fn merge(running: &Config, mut fresh: Config) -> (Config, Vec<&'static str>) {
    let mut needs_restart = Vec::new();
    let mut keep = |key: &'static str, differs: bool| {
        if differs {
            needs_restart.push(key);
        }
    };
    let (r, f) = (&running.server, &fresh.server);
    keep(
        "server.gateway_listen",
        r.gateway_listen != f.gateway_listen,
    );
    keep("server.admin_listen", r.admin_listen != f.admin_listen);
    keep(
        "server.gateway_tls_cert/key",
        format!("{:?}", r.gateway_tls) != format!("{:?}", f.gateway_tls),
    );
    keep("server.threads", r.threads != f.threads);
    keep(
        "server.grace_period_seconds",
        r.grace_period != f.grace_period,
    );
    keep(
        "server.client_header_timeout_ms",
        r.client_header_timeout != f.client_header_timeout,
    );
    keep(
        "server.client_body_timeout_ms",
        r.client_body_timeout != f.client_body_timeout,
    );
    keep(
        "server.client_write_timeout_ms",
        r.client_write_timeout != f.client_write_timeout,
    );
    keep(
        "server.max_request_head_bytes",
        r.max_request_head_bytes != f.max_request_head_bytes,
    );
    keep(
        "server.max_connections(_per_client)",
        (r.max_connections, r.max_connections_per_client)
            != (f.max_connections, f.max_connections_per_client),
    );
    keep(
        "server.admin_max_connections(_per_client)",
        (r.admin_max_connections, r.admin_max_connections_per_client)
            != (f.admin_max_connections, f.admin_max_connections_per_client),
    );
    keep(
        "database",
        format!("{:?}", running.database) != format!("{:?}", fresh.database),
    );
    keep(
        "proxy",
        format!("{:?}", running.proxy) != format!("{:?}", fresh.proxy),
    );
    let mitm = |c: &Config| {
        c.providers
            .iter()
            .map(|(n, p)| (n.clone(), p.mitm_hosts.clone()))
            .collect::<Vec<_>>()
    };
    keep("providers.*.mitm_hosts", mitm(running) != mitm(&fresh));
    keep("keys", running.keys != fresh.keys);
    keep(
        "keys.secret_key_file",
        running.vault.secret_key_file != fresh.vault.secret_key_file,
    );
    keep(
        "recorder",
        format!("{:?}", running.recorder) != format!("{:?}", fresh.recorder),
    );
    keep(
        "logging",
        format!("{:?}", running.logging) != format!("{:?}", fresh.logging),
    );
    keep(
        "auth",
        format!("{:?}", running.auth) != format!("{:?}", fresh.auth),
    );
    keep(
        "retention",
        running.retention.interceptions_days != fresh.retention.interceptions_days,
    );
    keep(
        "budgets.period",
        running.budgets.period != fresh.budgets.period,
    );
    fresh.server = running.server.clone();
    fresh.database = running.database.clone();
    fresh.proxy = running.proxy.clone();
    fresh.keys = running.keys;
    fresh.vault = running.vault.clone();
    fresh.recorder = running.recorder.clone();
    fresh.logging = running.logging.clone();
    fresh.auth = running.auth;
    fresh.retention = running.retention;
    fresh.budgets.period = running.budgets.period;
    for (name, p) in fresh.providers.iter_mut() {
        p.mitm_hosts = running
            .providers
            .get(name)
            .map(|old| old.mitm_hosts.clone())
            .unwrap_or_default();
    }
    (fresh, needs_restart)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::from_parts("t", Some(text), &[]).unwrap()
    }

    #[test]
    fn reloadable_parts_change_and_restart_only_parts_are_kept_and_named() {
        let running = parse(
            "[server]\ngateway_listen = \"127.0.0.1:8080\"\n[limits]\nrequests_per_minute = 10\n\
             [providers.openai]\nkind = \"openai\"\nmitm_hosts = [\"api.openai.com\"]\n",
        );
        let fresh = parse(
            "[server]\ngateway_listen = \"127.0.0.1:9999\"\n[limits]\nrequests_per_minute = 20\n\
             [budgets]\nperiod = \"day\"\n\
             [providers.openai]\nkind = \"openai\"\napi_key_envs = [\"B\"]\nmitm_hosts = [\"x.example\"]\n\
             [[pricing.models]]\nmodel = \"m\"\ninput = \"1\"\noutput = \"2\"\n",
        );
        let (applied, restart) = merge(&running, fresh);
        assert_eq!(
            restart,
            [
                "server.gateway_listen",
                "providers.*.mitm_hosts",
                "budgets.period"
            ]
        );
        assert_eq!(applied.server.gateway_listen.port(), 8080);
        assert_eq!(applied.budgets.period, running.budgets.period);
        assert_eq!(applied.providers["openai"].mitm_hosts, ["api.openai.com"]);
        assert_eq!(applied.limits.requests_per_minute, 20);
        assert_eq!(applied.providers["openai"].api_key_envs, ["B"]);
        assert_eq!(applied.pricing.len(), 1);

        let (_, restart) = merge(&running, running.clone());
        assert!(restart.is_empty());
    }
}
