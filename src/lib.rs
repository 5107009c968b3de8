//! Tollgate: a governed gateway for LLM traffic.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; integration tests and benchmarks
//! use the same modules. One module per concern: `app` (the state every listener shares), `config`, `gateway` (the request pipeline),
//! `providers` (wire formats), `sse`, `clients`, `auth`, `governance`, `store`, `api`,
//! `telemetry`, `proxy` (the HTTPS_PROXY front door), `tls` (its CA and certificates),
//! `private_files` (owner-only files for records and secrets), `front_door` (what every listener
//! limits before a client is authenticated),
//! `server` (start-up and shutdown), `reload` (SIGHUP).

#[macro_use]
mod stream_wrap;

pub mod api;
pub mod app;
pub mod auth;
pub mod clients;
pub mod config;
pub mod dashboard;
pub mod front_door;
pub mod gateway;
pub mod governance;
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
