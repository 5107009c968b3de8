//! Start-up and shutdown: the open-file limit and the listeners' capacities, the database, the
//! background runtime, the listeners (gateway, admin, and the proxy front door when `[proxy]
//! enabled`), pingora.
//!
//! pingora builds and owns its own runtimes and blocks in `Server::run`, so this is a plain
//! function called from `main` (no `#[tokio::main]`). Tollgate's own async work (database pool,
//! recorder, admin API) runs on a separate background runtime that outlives pingora's, so the
//! recorder can drain every queued record after the listeners have stopped.
//!
//! Not here: request handling (gateway) or the admin routes (api).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use axum::Extension;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

use crate::app::AppState;
use crate::config::Config;
use crate::front_door::descriptors::{self, DescriptorPlan};
use crate::front_door::{ConnectionLimiter, HeadLimits};
use crate::gateway::{Gateway, GatewayListener};
use crate::governance::keyvault::KeyVault;
use crate::proxy::ForwardProxy;
use crate::store::{Recorder, SpendJournal, Store};
use crate::{api, telemetry};

/// Runs every configured listener until SIGTERM (graceful) or SIGINT (fast), then drains the
/// recorder. Migrations are applied first.
///
/// `config_path` is the file `config` came from (`None`: the default path or built-in
/// defaults); SIGHUP reads it again.
pub fn serve(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    // First, before any descriptor is opened: every listener's capacity must fit the limit.
    let plan = descriptors::raise_and_plan(&config)?;
    let heads = HeadLimits::from_config(&config.server);
    let config = Arc::new(config);
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-bg")
        .enable_all()
        .build()
        .context("cannot start the background runtime")?;

    let store = background
        .block_on(open_store(&config))
        .with_context(|| format!("database {}", redact_url(&config.database.url)))?;
    // Spend an unclean stop left in the journal is restored before budgets are loaded.
    let journal = match &config.recorder.journal_dir {
        Some(dir) => Some(Arc::new(open_journal(&background, dir, &store)?)),
        None => None,
    };
    let (recorder, recorder_handle) = {
        let _guard = background.enter();
        Recorder::start(store.clone(), config.recorder.clone())
    };
    if let Some(journal) = &journal {
        // A record is submitted at most two client writes after it was settled.
        let slack = config.server.client_write_timeout * 2 + std::time::Duration::from_secs(10);
        journal
            .start_upkeep(config.recorder.journal_sync, slack, recorder.progress())
            .context("cannot start the spend journal's thread")?;
    }
    let vault = if config.keys.allow_user_api_key {
        let secret = std::env::var("TOLLGATE_SECRET_KEY").ok();
        Some(
            KeyVault::load(secret.as_deref(), &config.vault.secret_key_file)
                .context("cannot open the key vault for stored provider keys")?,
        )
    } else {
        None
    };
    let state = Arc::new(AppState::new(
        config.clone(),
        store,
        background.handle().clone(),
        recorder,
        journal,
        vault,
        |name| std::env::var(name).ok(),
    ));
    state
        .keys
        .set_failed_attempts_per_minute(config.auth.failed_attempts_per_minute);
    background
        .block_on(state.governance.refresh(&state.store, chrono::Utc::now()))
        .context("cannot load budgets and prices")?;
    background.spawn(refresh_governance(state.clone()));
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    background.spawn(trim_heap());
    state.warn_about_missing_keys();
    crate::reload::install(background.handle(), state.clone(), config_path)
        .context("cannot install the SIGHUP handler")?;
    telemetry::prometheus();
    background.spawn(telemetry::metrics_upkeep());
    // The CA is checked before any listener opens: a bad one stops the start with its reason.
    let forward_proxy = match plan.proxy {
        Some(caps) => Some(ForwardProxy::new(
            state.clone(),
            &config.proxy,
            heads,
            ConnectionLimiter::new("proxy", caps.max, caps.per_client),
        )?),
        None => None,
    };
    background.spawn(crate::store::run_retention(
        state.store.clone(),
        config.retention.interceptions_days,
    ));

    let admin_listener = background
        .block_on(tokio::net::TcpListener::bind(config.server.admin_listen))
        .with_context(|| {
            format!(
                "cannot listen on server.admin_listen {}",
                config.server.admin_listen
            )
        })?;
    let admin_addr = admin_listener.local_addr()?;
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_router =
        api::router(state.clone(), crate::dashboard::router()).layer(Extension(plan.clone()));
    background.spawn(api::listener::serve(
        admin_listener,
        admin_router,
        ConnectionLimiter::new("admin", plan.admin.max, plan.admin.per_client),
        heads,
        async {
            let _ = admin_stopped.await;
        },
    ));
    background.spawn(descriptors::report(plan.clone()));

    // Held while the gateway port is picked, so two port-0 listeners never get the same port.
    let proxy_probe = match &forward_proxy {
        Some(_) => Some(reserve_held(config.proxy.listen, "proxy.listen")?),
        None => None,
    };
    let gateway_addr = reserve(config.server.gateway_listen, "server.gateway_listen")?;
    let mut server = Server::new_with_opt_and_conf(None, pingora_conf(&config, &plan));
    server.bootstrap();
    let mut gateway = Service::new(
        "gateway".to_string(),
        GatewayListener::new(
            Gateway::new(state.clone()),
            heads,
            Some(ConnectionLimiter::new(
                "gateway",
                plan.gateway.max,
                plan.gateway.per_client,
            )),
        ),
    );
    let scheme = match &config.server.gateway_tls {
        Some(tls) => {
            gateway
                .add_tls(
                    &gateway_addr.to_string(),
                    &tls.cert.to_string_lossy(),
                    &tls.key.to_string_lossy(),
                )
                .map_err(|e| anyhow!("server.gateway_tls_cert/key: {e}"))?;
            "https"
        }
        None => {
            // No L4 read buffer: pingora's HTTP/1 server reads the request head and body into
            // its own buffers, so the default 64 KB one (zero-filled, per connection) only costs
            // memory: ~64 KB resident for every open stream.
            gateway.add_listener(
                ListenerConfig::tcp(gateway_addr.to_string())
                    .l4_buffer(L4BufferSettings::default().read(0)),
            );
            "http"
        }
    };
    server.add_service(gateway);
    let proxy_listening = match (forward_proxy, proxy_probe) {
        (Some(app), Some((proxy_addr, probe))) => {
            drop(probe);
            let scheme = app.scheme();
            let mut service = Service::new("proxy".to_string(), app);
            service.add_tcp(&proxy_addr.to_string());
            server.add_service(service);
            Some(format!("{scheme}://{proxy_addr}"))
        }
        _ => None,
    };

    tracing::info!(listener = "gateway", addr = %gateway_addr, url = %format!("{scheme}://{gateway_addr}"), "listening");
    tracing::info!(listener = "admin", addr = %admin_addr, url = %format!("http://{admin_addr}"), "listening");
    if let Some(url) = proxy_listening {
        let addr = url.split("://").nth(1).unwrap_or_default();
        tracing::info!(listener = "proxy", addr = %addr, url = %url, "listening");
    }

    server.run(RunArgs::default());

    tracing::info!("listeners stopped; writing queued interceptions");
    let _ = admin_stop.send(());
    background.block_on(recorder_handle.drain());
    tracing::info!("stopped");
    Ok(())
}

/// Opens the database and applies migrations; fails fast with a readable reason.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        Store::connect(&config.database.url, config.database.max_connections),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting"))??;
    store.migrate().await?;
    Ok(store)
}

/// glibc keeps freed heap memory for reuse: after a burst of open streams (~60 KB each) ends,
/// RSS would stay at the burst's peak. Every few seconds, when more than `TRIM_ABOVE` bytes lie
/// free in malloc's arenas, hand the free pages back to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_heap() {
    /// glibc's `struct mallinfo2` (glibc 2.33 and later).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> MallInfo2;
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }
    const TRIM_ABOVE: usize = 32 << 20;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: both are thread-safe glibc calls without arguments that point anywhere;
        // they lock each arena in turn while they walk it.
        let trimmed = tokio::task::spawn_blocking(|| unsafe {
            if mallinfo2().fordblks > TRIM_ABOVE {
                malloc_trim(0);
            }
        })
        .await;
        if trimmed.is_err() {
            return;
        }
    }
}

/// Every couple of seconds: caps and prices from the store (changes made through another
/// replica or the CLI), the ledger on period roll-over, and the seat gauges.
async fn refresh_governance(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = chrono::Utc::now();
        if let Err(e) = state.governance.refresh(&state.store, now).await {
            tracing::warn!(error = %e, "governance refresh failed; keeping the last known caps and prices");
        }
        let active_since =
            now - chrono::Duration::days(i64::from(state.config().seats.active_days));
        match state.store.active_seat_count(active_since).await {
            Ok(n) => {
                metrics::gauge!(telemetry::metric::SEATS_USED).set(f64::from(n));
                metrics::gauge!(telemetry::metric::SEATS_LIMIT)
                    .set(f64::from(state.config().seats.limit.unwrap_or(0)));
            }
            Err(e) => tracing::warn!(error = %e, "seat count failed"),
        }
    }
}

fn pingora_conf(config: &Config, plan: &DescriptorPlan) -> ServerConf {
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        // Idle upstream connections hold descriptors too: as many as the plan counted.
        upstream_keepalive_pool_size: plan.upstream_pool,
        ..ServerConf::default()
    };
    // pingora's pid/upgrade files only matter for daemon mode and zero-downtime upgrades.
    conf.pid_file = std::env::temp_dir()
        .join("tollgate.pid")
        .to_string_lossy()
        .into_owned();
    conf.upgrade_sock = std::env::temp_dir()
        .join("tollgate_upgrade.sock")
        .to_string_lossy()
        .into_owned();
    conf
}

/// Checks that `addr` can be bound now (pingora retries a busy port silently for 30 s and then
/// panics its service thread), and turns port 0 into a concrete free port.
fn reserve(addr: SocketAddr, key: &str) -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {key} {addr}"))?;
    Ok(probe.local_addr()?)
}

/// [`reserve`], keeping the probe bound until the caller drops it.
fn reserve_held(
    addr: SocketAddr,
    key: &str,
) -> anyhow::Result<(SocketAddr, std::net::TcpListener)> {
    let probe = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {key} {addr}"))?;
    Ok((probe.local_addr()?, probe))
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Opens the spend journal, restoring what an unclean stop left in it.
fn open_journal(
    background: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    store: &Store,
) -> anyhow::Result<SpendJournal> {
    let (journal, recovery) = background
        .block_on(SpendJournal::open(dir, store))
        .with_context(|| format!("recorder.journal_dir {}", dir.display()))?;
    if recovery.records > 0 || recovery.unreadable > 0 {
        tracing::warn!(
            records = recovery.records,
            unreadable = recovery.unreadable,
            dir = %dir.display(),
            "spend journal: interceptions of an unclean stop restored"
        );
    }
    Ok(journal)
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://tg:pw@localhost/tg"),
            "postgres://tg:***@localhost/tg"
        );
        assert_eq!(
            super::redact_url("sqlite://data/t.db"),
            "sqlite://data/t.db"
        );
    }
}
