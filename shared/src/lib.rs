//! Code every ELAAOMS service shares: the domain model, typed configuration,
//! Postgres access, the JetStream bus and its consumer loop, telemetry, the
//! payload store and the embedder.

pub mod api_keys;
pub mod bus;
pub mod config;
pub mod db;
pub mod domain;
pub mod embedder;
pub mod events;
pub mod http;
pub mod payload_store;
pub mod sharing;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod trace;
pub mod transcript;
pub mod worker;
