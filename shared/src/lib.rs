//! Code every ELAAOMS service shares: the domain model, typed configuration,
//! Postgres access, the JetStream bus and its consumer loop, telemetry, the
//! payload store and the embedder.

pub mod bus;
pub mod config;
pub mod db;
pub mod domain;
pub mod embedder;
#[cfg(feature = "test-support")]
pub mod test_support;
