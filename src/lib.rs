//! Tollgate: a governed gateway for LLM traffic.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; integration tests and benchmarks
//! use the same modules. One module per concern, lowest layer first (a module uses only its own
//! layer or lower ones; `scripts/module-graph` checks it):
//! - value types and plumbing: `money`, `cidr`, `sse`, `lineage` (which interception a tool
//!   result answers), `private_files` (owner-only files for records and secrets);
//! - `providers` (wire formats), `config`;
//! - `front_door` (what every listener limits before a client is authenticated), `store`;
//! - `telemetry`, `auth`, `clients`, `governance`, `upstream` (provider routes, key pools,
//!   breakers), `tls` (the proxy's CA and certificates);
//! - `app` (the state every listener shares);
//! - `gateway` (the request pipeline);
//! - `proxy` (the HTTPS_PROXY front door), `api`, `dashboard`;
//! - `server` (start-up and shutdown), `reload` (SIGHUP).

#[macro_use]
mod stream_wrap;

pub mod api;
pub mod app;
pub mod auth;
pub mod cidr;
pub mod clients;
pub mod config;
pub mod dashboard;
pub mod front_door;
pub mod gateway;
pub mod governance;
pub mod lineage;
pub mod money;
pub mod private_files;
pub mod providers;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod sse;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
