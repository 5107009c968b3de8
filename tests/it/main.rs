//! The integration tests, one test binary (`it`): one compile of the shared helpers in
//! `common/`, one link of the dependency graph, and one process for `cargo test` (or one process
//! per test under `cargo nextest run`). Each module is one area, as the separate files under
//! `tests/` were before; a test's path names its module, e.g. `gateway::streaming_is_not_buffered`.
//!
//! Run one area with `cargo test --test it gateway::`, or `cargo nextest run -E 'test(/^gateway::/)'`.
//! Nothing here relies on a process of its own: no test sets environment variables, changes the
//! working directory or process limits of the test process (a server's open-file limit is set in
//! the child, see `common::server`), and every listener binds port 0.

mod common;

mod api;
mod browser;
mod cli;
mod dashboard;
mod dashboard_scale;
mod front_door;
mod fuzz_seeds;
mod gateway;
mod governance;
mod grafana;
mod mock_selftest;
mod proxy;
mod replicas;
mod resilience;
mod security;
mod store_faults;
mod usage_rollup;
