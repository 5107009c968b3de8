pub mod mock;
pub mod server;
