//! The one way a worker runs: its consumer loop plus a small HTTP listener
//! for `/healthz`, `/readyz` and `/metrics`, stopped together.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::consumer::{run_consumer, ConsumerSettings, Handler};
use crate::bus::{Bus, BusError};
use crate::telemetry::{health_router, Health};

/// A worker that is connected and bound, ready to run.
pub struct Worker<H: Handler> {
    pub name: &'static str,
    pub bus: Bus,
    pub pool: PgPool,
    pub settings: ConsumerSettings,
    pub handler: Arc<H>,
    pub registry: Registry,
    pub health_listener: TcpListener,
}

impl<H: Handler> Worker<H> {
    pub fn health_addr(&self) -> SocketAddr {
        self.health_listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Consumes until `shutdown`, then finishes in-flight messages and stops
    /// the health listener.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BusError> {
        let router = health_router(Health {
            service: self.name,
            registry: self.registry,
            database: Some(self.pool),
            bus: Some(self.bus.clone()),
        });
        let health_shutdown = CancellationToken::new();
        let stop_health = health_shutdown.clone().cancelled_owned();
        let listener = self.health_listener;
        let health = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop_health)
                .await
        });
        tracing::info!(worker = self.name, "worker started");
        let consumed = run_consumer(self.bus, self.settings, self.handler, shutdown).await;
        health_shutdown.cancel();
        let _ = health.await;
        consumed
    }
}
