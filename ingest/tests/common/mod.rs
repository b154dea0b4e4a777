//! A real IngestService on port 0 against its own database and streams.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use elaaoms_ingest::{Config, IngestService, IngestSettings};
use elaaoms_shared::config::{BusConfig, DatabaseConfig, PayloadStoreConfig};
use elaaoms_shared::test_support::{TestBus, TestDatabase};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const SLUG: &str = "fixture-org-a";
pub const SECRET: &str = "whsec_fixture_0123456789abcdef0123456789abcdef";
pub const MAYA_CONVERSATION: &str = "conv_wxgkkg26wh6wcecpnv68bert84";
pub const MAYA_FIXTURE: &str = "post_call_transcription_bakery_maya_2025-11-03.json";

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../tests/fixtures/elevenlabs/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture")
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

pub fn sign_now(body: &[u8]) -> String {
    elaaoms_ingest::signature::sign(SECRET, now(), body)
}

/// Settings for tests: port 0, a quick relay.
pub fn test_settings() -> IngestSettings {
    IngestSettings {
        addr: "127.0.0.1:0".parse().unwrap(),
        outbox_relay_interval: Duration::from_millis(200),
        outbox_relay_grace: Duration::from_secs(1),
        publish_deadline: Duration::from_secs(1),
        ..IngestSettings::default()
    }
}

pub struct Ingest {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Ingest {
    pub async fn start(
        database_url: SecretString,
        bus: BusConfig,
        payload_dir: PathBuf,
        settings: IngestSettings,
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let service = IngestService::build(Config {
            database: DatabaseConfig {
                database_url,
                database_max_connections: 5,
            },
            bus,
            payloads: PayloadStoreConfig {
                payload_dir,
                payload_store_url: None,
            },
            settings,
        })
        .await
        .expect("ingest starts");
        let url = format!("http://{}", service.local_addr());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { service.run(token).await.expect("ingest runs") });
        Self {
            url,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// Database, streams, payload directory and a running ingest.
pub struct Harness {
    pub database: TestDatabase,
    pub bus: TestBus,
    pub payloads: tempfile::TempDir,
    pub organization_id: Uuid,
    pub ingest: Option<Ingest>,
    pub client: reqwest::Client,
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with(test_settings()).await
    }

    pub async fn start_with(settings: IngestSettings) -> Self {
        let mut harness = Self::without_ingest().await;
        harness.start_ingest(settings).await;
        harness
    }

    pub async fn without_ingest() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let database = TestDatabase::create().await;
        let organization_id = database.create_organization(SLUG, SECRET).await;
        let bus = TestBus::create().await;
        Self {
            database,
            bus,
            payloads: tempfile::tempdir().unwrap(),
            organization_id,
            ingest: None,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    pub async fn start_ingest(&mut self, settings: IngestSettings) {
        self.ingest = Some(
            Ingest::start(
                self.database.service_url.clone(),
                self.bus.config.clone(),
                self.payloads.path().to_owned(),
                settings,
            )
            .await,
        );
    }

    pub fn url(&self) -> &str {
        &self.ingest.as_ref().expect("ingest started").url
    }

    pub async fn post_to(
        &self,
        slug: &str,
        body: Vec<u8>,
        signature: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = self
            .client
            .post(format!("{}/v1/webhooks/elevenlabs/{slug}", self.url()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("ElevenLabs-Signature", signature);
        }
        let response = request.send().await.expect("ingest answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("JSON answer, got {status} {text:?}"));
        (status, json)
    }

    /// Posts `body` signed now with the organization's secret.
    pub async fn post_signed(&self, body: Vec<u8>) -> (u16, serde_json::Value) {
        let signature = sign_now(&body);
        self.post_to(SLUG, body, Some(&signature)).await
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.database.admin_pool)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    pub async fn stream_messages(&self) -> u64 {
        stream_messages(&self.bus).await
    }

    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Every file under the payload directory.
    pub fn payload_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                if entry.path().is_dir() {
                    walk(&entry.path(), out);
                } else {
                    out.push(entry.path());
                }
            }
        }
        let mut files = Vec::new();
        walk(self.payloads.path(), &mut files);
        files
    }

    pub async fn stop(mut self) {
        if let Some(ingest) = self.ingest.take() {
            ingest.stop().await;
        }
        self.bus.cleanup().await;
    }
}

pub async fn stream_messages(bus: &TestBus) -> u64 {
    let mut stream = bus
        .bus
        .jetstream
        .get_stream(bus.bus.names.event_stream())
        .await
        .expect("event stream");
    stream.info().await.expect("stream info").state.messages
}

/// The event stream's message at `sequence`, decoded.
pub async fn stream_event(
    bus: &TestBus,
    sequence: u64,
) -> elaaoms_shared::bus::Envelope<elaaoms_shared::events::ConversationTranscribed> {
    let stream = bus
        .bus
        .jetstream
        .get_stream(bus.bus.names.event_stream())
        .await
        .expect("event stream");
    let message = stream
        .get_raw_message(sequence)
        .await
        .expect("stored message");
    elaaoms_shared::bus::Envelope::decode(&message.payload).expect("an event")
}

/// Polls `check` until it returns Some, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The service URL with its host and port replaced (to go through a proxy).
pub fn with_host_port(url: &SecretString, host_port: &str) -> SecretString {
    let url = url.expose_secret();
    let at = url.rfind('@').expect("URL with credentials") + 1;
    let slash = at + url[at..].find('/').expect("URL with a database");
    SecretString::from(format!("{}{host_port}{}", &url[..at], &url[slash..]))
}
