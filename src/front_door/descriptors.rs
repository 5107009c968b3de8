//! File descriptors: every connection on every listener, every upstream connection and every
//! database file takes one from the same per-process table, so a flood on one listener could
//! leave none for the others (or for `/healthz`). At start the open-file limit is raised to
//! what the configured capacities need ([`plan`]); when the hard limit does not allow that, the
//! gateway's and the proxy's capacities (and their per-address shares) are lowered until
//! everything fits, so the listeners refuse connections themselves before the kernel does, and
//! the admin listener's capacity stays reserved. What is left is reported as headroom
//! (`/readyz`, `tollgate_fd_headroom`).
//!
//! Not here: counting connections (`front_door::connections`), the listeners.

use crate::config::Config;
use crate::telemetry::metric;

/// Descriptors the process uses besides connections and database files: listening sockets,
/// the runtimes' epoll and event descriptors, stdio, the spill file, DNS lookups.
pub const BASE_DESCRIPTORS: u64 = 128;
/// Most idle upstream connections the gateway keeps for reuse (pingora's keep-alive pool).
pub const UPSTREAM_POOL_MAX: usize = 512;
/// Fewest gateway connections worth starting with.
const MIN_GATEWAY_CONNECTIONS: usize = 16;

/// A listener's capacity: in all, and per client address (0: no per-address limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerCaps {
    pub max: usize,
    pub per_client: usize,
}

/// The capacities that fit the open-file limit, and that limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorPlan {
    pub gateway: ListenerCaps,
    /// `None` when the proxy front door is off.
    pub proxy: Option<ListenerCaps>,
    pub admin: ListenerCaps,
    /// The gateway's idle upstream connection pool.
    pub upstream_pool: usize,
    /// Descriptors the capacities above need at most.
    pub needed: u64,
    /// The soft open-file limit in force.
    pub limit: u64,
    /// True when the configured gateway and proxy capacities were lowered to fit `limit`.
    pub lowered: bool,
}

/// The soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFileLimit {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("the open-file limit is {limit} (hard limit {hard}) but Tollgate needs at least {minimum} descriptors (admin listener, database, {MIN_GATEWAY_CONNECTIONS} gateway connections); raise it (ulimit -n, systemd LimitNOFILE=) or lower server.admin_max_connections or database.max_connections")]
    TooLow { limit: u64, hard: u64, minimum: u64 },
    #[error("cannot read the open-file limit: {0}")]
    Read(std::io::Error),
}

/// The configured capacities.
struct Wanted {
    gateway: ListenerCaps,
    proxy: Option<ListenerCaps>,
    admin: ListenerCaps,
    database_connections: u64,
}

impl Wanted {
    fn of(config: &Config) -> Wanted {
        let server = &config.server;
        Wanted {
            gateway: ListenerCaps {
                max: server.max_connections,
                per_client: server.max_connections_per_client,
            },
            proxy: config.proxy.enabled.then_some(ListenerCaps {
                max: config.proxy.max_connections,
                per_client: server.max_connections_per_client,
            }),
            admin: ListenerCaps {
                max: server.admin_max_connections,
                per_client: server.admin_max_connections_per_client,
            },
            database_connections: u64::from(config.database.max_connections),
        }
    }

    /// Descriptors that do not depend on the gateway's and proxy's capacities: the admin
    /// listener's connections, the database (SQLite opens the file, its WAL and its shared
    /// memory per pooled connection) and [`BASE_DESCRIPTORS`].
    fn fixed(&self) -> u64 {
        self.admin.max as u64 + 3 * self.database_connections + BASE_DESCRIPTORS
    }
}

/// Descriptors a gateway and a proxy capacity take: two per connection (the client's and the
/// upstream's) and the gateway's idle upstream pool.
fn for_connections(gateway: usize, proxy: usize) -> u64 {
    2 * gateway as u64 + gateway.min(UPSTREAM_POOL_MAX) as u64 + 2 * proxy as u64
}

/// A capacity scaled by `parts` per million, at least 1.
fn scaled(caps: ListenerCaps, parts: u64) -> ListenerCaps {
    let scale = |n: usize| ((n as u64 * parts / 1_000_000) as usize).max(1);
    ListenerCaps {
        max: scale(caps.max),
        per_client: if caps.per_client == 0 {
            0
        } else {
            scale(caps.per_client)
        },
    }
}

/// The capacities of `config` that fit in `limit` descriptors (see the module docs). Pure: the
/// limit is raised beforehand by [`raise_and_plan`].
pub fn plan(config: &Config, limit: OpenFileLimit) -> Result<DescriptorPlan, DescriptorError> {
    let wanted = Wanted::of(config);
    let fixed = wanted.fixed();
    let minimum = fixed + for_connections(MIN_GATEWAY_CONNECTIONS, 0);
    if limit.soft < minimum {
        return Err(DescriptorError::TooLow {
            limit: limit.soft,
            hard: limit.hard,
            minimum,
        });
    }
    let proxy_max = wanted.proxy.map_or(0, |p| p.max);
    let room = limit.soft - fixed;
    let (gateway, proxy, lowered) = if for_connections(wanted.gateway.max, proxy_max) <= room {
        (wanted.gateway, wanted.proxy, false)
    } else {
        // The largest share (parts per million) of both capacities that fits.
        let fits = |parts: u64| {
            let g = scaled(wanted.gateway, parts).max;
            let p = wanted.proxy.map_or(0, |p| scaled(p, parts).max);
            for_connections(g, p) <= room
        };
        let (mut low, mut high) = (0u64, 1_000_000u64);
        while low < high {
            let mid = (low + high).div_ceil(2);
            if fits(mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        let gateway = scaled(wanted.gateway, low);
        let gateway = ListenerCaps {
            max: gateway.max.max(MIN_GATEWAY_CONNECTIONS),
            ..gateway
        };
        (gateway, wanted.proxy.map(|p| scaled(p, low)), true)
    };
    let proxy_max = proxy.map_or(0, |p| p.max);
    Ok(DescriptorPlan {
        gateway,
        proxy,
        admin: wanted.admin,
        upstream_pool: gateway.max.min(UPSTREAM_POOL_MAX),
        needed: fixed + for_connections(gateway.max, proxy_max),
        limit: limit.soft,
        lowered,
    })
}

/// Raises the soft open-file limit towards what `config` needs (never past the hard limit),
/// then plans the capacities for the limit in force. Logs what was raised or lowered.
pub fn raise_and_plan(config: &Config) -> Result<DescriptorPlan, DescriptorError> {
    let wanted = Wanted::of(config);
    let needed =
        wanted.fixed() + for_connections(wanted.gateway.max, wanted.proxy.map_or(0, |p| p.max));
    let mut limit = read_limit().map_err(DescriptorError::Read)?;
    if limit.soft < needed {
        let target = needed.min(limit.hard);
        match set_soft_limit(target, limit.hard) {
            Ok(()) => {
                tracing::info!(
                    from = limit.soft,
                    to = target,
                    needed,
                    "raised the open-file limit"
                );
                limit.soft = target;
            }
            Err(e) => {
                tracing::warn!(error = %e, soft = limit.soft, wanted = target, "cannot raise the open-file limit")
            }
        }
    }
    let planned = plan(config, limit)?;
    if planned.lowered {
        tracing::warn!(
            limit = limit.soft,
            hard_limit = limit.hard,
            needed,
            gateway_max_connections = planned.gateway.max,
            gateway_max_connections_per_client = planned.gateway.per_client,
            proxy_max_connections = planned.proxy.map_or(0, |p| p.max),
            "the open-file limit cannot hold the configured connection limits; they were lowered to fit (raise the hard limit to keep them)"
        );
    }
    metrics::gauge!(metric::FD_LIMIT).set(limit.soft as f64);
    Ok(planned)
}

fn read_limit() -> std::io::Result<OpenFileLimit> {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OpenFileLimit {
        soft: rlim.rlim_cur,
        hard: rlim.rlim_max,
    })
}

fn set_soft_limit(soft: u64, hard: u64) -> std::io::Result<()> {
    let rlim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Descriptors in use against the limit, for `/readyz` and the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct DescriptorUsage {
    /// The soft open-file limit.
    pub limit: u64,
    /// Descriptors open now.
    pub open: u64,
    /// `limit - open`.
    pub headroom: u64,
    /// What the listeners' capacities need at most (after any lowering at start).
    pub needed: u64,
}

/// Counts the open descriptors now (`/proc/self/fd`; `None` where there is no procfs) and
/// updates the gauges.
pub fn usage(plan: &DescriptorPlan) -> Option<DescriptorUsage> {
    // The directory handle itself is one of the entries read.
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let open = open.saturating_sub(1);
    let headroom = plan.limit.saturating_sub(open);
    metrics::gauge!(metric::FDS_OPEN).set(open as f64);
    metrics::gauge!(metric::FD_HEADROOM).set(headroom as f64);
    Some(DescriptorUsage {
        limit: plan.limit,
        open,
        headroom,
        needed: plan.needed,
    })
}

/// Keeps the descriptor gauges current (every 5 s), for alerting on a shrinking headroom.
pub async fn report(plan: DescriptorPlan) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = usage(&plan);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::from_parts("test", Some(extra), &[]).expect("valid test config")
    }

    #[test]
    fn a_limit_that_holds_everything_changes_nothing() {
        let c = config("[server]\nmax_connections = 1000\nmax_connections_per_client = 100\n");
        let p = plan(
            &c,
            OpenFileLimit {
                soft: 100_000,
                hard: 100_000,
            },
        )
        .unwrap();
        assert!(!p.lowered);
        assert_eq!(
            p.gateway,
            ListenerCaps {
                max: 1000,
                per_client: 100
            }
        );
        assert_eq!(p.proxy, None);
        assert_eq!(p.admin.max, 64);
        assert_eq!(p.upstream_pool, 512);
        assert_eq!(p.needed, 64 + 3 * 8 + 128 + 2000 + 512);
    }

    #[test]
    fn a_low_limit_lowers_gateway_and_proxy_but_keeps_the_admin_reserve() {
        let c = config(
            "[server]\nmax_connections = 10000\nmax_connections_per_client = 1000\nadmin_max_connections = 16\n[proxy]\nmax_connections = 10000\n",
        );
        let mut c = c;
        c.proxy.enabled = true;
        let limit = OpenFileLimit {
            soft: 400,
            hard: 400,
        };
        let p = plan(&c, limit).unwrap();
        assert!(p.lowered);
        assert_eq!(p.admin.max, 16, "the admin listener keeps its capacity");
        assert!(p.needed <= 400, "{p:?}");
        let proxy = p.proxy.unwrap();
        assert!(p.gateway.max >= 16 && proxy.max >= 1, "{p:?}");
        assert!(p.gateway.per_client < p.gateway.max, "{p:?}");
        assert!(
            for_connections(p.gateway.max + 2, proxy.max) + 16 + 24 + 128 > 400,
            "the largest share that fits: {p:?}"
        );
    }

    #[test]
    fn a_limit_too_low_for_the_reserve_stops_the_start() {
        let c = config("[server]\nadmin_max_connections = 64\n");
        let err = plan(
            &c,
            OpenFileLimit {
                soft: 200,
                hard: 200,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("ulimit -n"), "{err}");
    }
}
