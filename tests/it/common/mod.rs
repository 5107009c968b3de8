pub mod client;
pub mod dashboard;
pub mod mock;
pub mod server;
pub mod tunnel;
