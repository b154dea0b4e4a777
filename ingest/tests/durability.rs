//! Durability: JetStream down (its own nats-server, stopped and restarted),
//! Postgres unreachable (a proxy that is cut), a failing transaction, and a
//! crash between commit and publish.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use elaaoms_ingest::IngestSettings;
use elaaoms_shared::config::BusConfig;
use elaaoms_shared::test_support::TestBus;
use tokio::net::{TcpListener, TcpStream};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server of the test's own, with JetStream storing in a directory
/// that survives restarts.
struct OwnNats {
    port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnNats {
    async fn start() -> Self {
        let mut nats = Self {
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server on PATH");
        self.child = Some(child);
        let port = self.port;
        eventually(
            Duration::from_secs(10),
            "nats-server listening",
            || async move {
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy to Postgres that can be cut: open connections are dropped
/// and new ones closed at once, which is what an unreachable server looks
/// like to the pool.
struct CuttableProxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl CuttableProxy {
    async fn start(target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (accepting_up, accepting_cut) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !accepting_up.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let cut = accepting_cut.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Self { port, up, cut }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn with_jetstream_down_webhooks_get_200_and_the_relay_publishes_exactly_once_when_it_is_back()
{
    let mut nats = OwnNats::start().await;
    let mut harness = Harness::without_ingest().await;
    harness.bus.cleanup().await;
    harness.bus = TestBus::with_config(BusConfig {
        nats_url: nats.url(),
        ..harness.bus.config.clone()
    })
    .await;
    harness
        .start_ingest(IngestSettings {
            // So that the backlog gauges count this test's conversation.
            extraction_stuck_after: Duration::from_millis(500),
            ..test_settings()
        })
        .await;

    nats.stop();
    let (status, answer) = harness.post_signed(fixture(MAYA_FIXTURE)).await;
    assert_eq!(status, 200, "durable in Postgres, so accepted: {answer}");
    assert_eq!(
        harness
            .count("SELECT count(*) FROM conversations WHERE status = 'extraction_pending'")
            .await,
        1
    );
    assert_eq!(
        harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        1
    );
    assert!(harness
        .metrics()
        .await
        .contains("elaaoms_ingest_publish_deferred_total 1"));
    // The relay, unable to publish, reports the backlog the alerts watch.
    let metrics = eventually(Duration::from_secs(60), "the backlog gauges", || async {
        let metrics = harness.metrics().await;
        (gauge(&metrics, "elaaoms_outbox_unpublished") == Some(1.0)
            && gauge(&metrics, "elaaoms_conversations_extraction_pending_stuck") == Some(1.0))
        .then_some(metrics)
    })
    .await;
    assert!(gauge(&metrics, "elaaoms_outbox_oldest_unpublished_seconds").unwrap() >= 1.0);
    assert!(
        gauge(
            &metrics,
            "elaaoms_conversations_extraction_pending_oldest_seconds"
        )
        .unwrap()
            > 0.5
    );

    nats.restart().await;
    let sequence = eventually(Duration::from_secs(60), "the relay publishes", || async {
        let published: Option<i64> =
            sqlx::query_scalar("SELECT stream_seq FROM outbox WHERE published_at IS NOT NULL")
                .fetch_optional(&harness.database.admin_pool)
                .await
                .unwrap();
        published
    })
    .await;
    assert_eq!(sequence, 1);
    // The request's buffered publish may reach the server after the relay's:
    // the message id makes it a duplicate. Look a few times: still one.
    for _ in 0..10 {
        assert_eq!(harness.stream_messages().await, 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let event = stream_event(&harness.bus, 1).await;
    assert_eq!(event.payload.conversation_id, MAYA_CONVERSATION);
    // Published: the outbox backlog is gone (the conversation still waits
    // for an extractor, which this test does not run).
    eventually(
        Duration::from_secs(30),
        "the outbox gauge clears",
        || async {
            let metrics = harness.metrics().await;
            (gauge(&metrics, "elaaoms_outbox_unpublished") == Some(0.0)).then_some(())
        },
    )
    .await;
    harness.stop().await;
}

/// The value of an unlabelled metric in Prometheus' text format.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

#[tokio::test]
async fn with_postgres_unreachable_webhooks_get_503_and_nothing_is_half_written() {
    let proxy = CuttableProxy::start("127.0.0.1:5432").await;
    let mut harness = Harness::without_ingest().await;
    let through_proxy = with_host_port(
        &harness.database.service_url,
        &format!("127.0.0.1:{}", proxy.port),
    );
    harness.ingest = Some(
        Ingest::start(
            through_proxy,
            harness.bus.config.clone(),
            harness.payloads.path().to_owned(),
            test_settings(),
        )
        .await,
    );

    proxy.cut();
    let body = fixture(MAYA_FIXTURE);
    let (status, answer) = harness.post_signed(body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable");
    assert!(
        !answer.to_string().contains("5432"),
        "no internals leak: {answer}"
    );
    for table in ["conversations", "callers", "outbox"] {
        assert_eq!(
            harness
                .count(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}"
        );
    }
    assert_eq!(harness.stream_messages().await, 0);

    // ElevenLabs (with retries on) sends it again once we are back.
    proxy.restore();
    let (status, answer) = harness.post_signed(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(harness.count("SELECT count(*) FROM conversations").await, 1);
    assert_eq!(
        harness
            .count("SELECT total_conversations::bigint FROM callers")
            .await,
        1
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_transaction_that_fails_halfway_leaves_nothing_and_answers_503() {
    let harness = Harness::start().await;
    // The outbox insert, the last write of the transaction, fails.
    for statement in [
        "CREATE FUNCTION refuse_outbox() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'outbox refused by test'; END $$",
        "CREATE TRIGGER refuse_outbox BEFORE INSERT ON outbox FOR EACH ROW EXECUTE FUNCTION refuse_outbox()",
    ] {
        sqlx::query(statement).execute(&harness.database.admin_pool).await.unwrap();
    }
    let body = fixture(MAYA_FIXTURE);
    let (status, answer) = harness.post_signed(body.clone()).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        !answer.to_string().contains("refused by test"),
        "no internals leak: {answer}"
    );
    for table in ["conversations", "callers", "agents", "outbox"] {
        assert_eq!(
            harness
                .count(&format!("SELECT count(*) FROM {table}"))
                .await,
            0,
            "{table}"
        );
    }
    assert_eq!(harness.stream_messages().await, 0);

    sqlx::query("DROP TRIGGER refuse_outbox ON outbox")
        .execute(&harness.database.admin_pool)
        .await
        .unwrap();
    assert_eq!(harness.post_signed(body).await.0, 200);
    assert_eq!(
        harness
            .count("SELECT total_conversations::bigint FROM callers")
            .await,
        1
    );
    assert_eq!(
        harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL")
            .await,
        1
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_publish_loses_nothing() {
    let mut harness = Harness::without_ingest().await;
    let body = fixture("post_call_transcription_dental_priya_2025-11-12.json");
    let elaaoms_ingest::webhook::Webhook::Transcription(transcription) =
        elaaoms_ingest::webhook::parse_webhook(&body).unwrap()
    else {
        panic!("a transcription");
    };
    // What the request did before it died: payload stored, transaction committed.
    let recorded = elaaoms_ingest::persist::record_transcription(
        &harness.database.pool,
        &harness.bus.bus,
        harness.organization_id,
        &transcription,
        transcription.caller_id.as_ref().unwrap(),
        "conv_gvs3ebxbsrwhj3s2ppxn9kyhzt/conv_gvs3ebxbsrwhj3s2ppxn9kyhzt_transcription.json",
        &elaaoms_shared::trace::TraceParent::new_root(),
    )
    .await
    .unwrap();
    assert!(recorded.pending.is_some());
    assert_eq!(harness.stream_messages().await, 0);

    // The restarted ingest's relay publishes it.
    harness.start_ingest(test_settings()).await;
    eventually(Duration::from_secs(30), "the relay publishes", || async {
        (harness
            .count("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND stream_seq = 1")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(harness.stream_messages().await, 1);
    let event = stream_event(&harness.bus, 1).await;
    assert_eq!(
        event.payload.conversation_id,
        "conv_gvs3ebxbsrwhj3s2ppxn9kyhzt"
    );
    assert_eq!(event.organization_id, harness.organization_id);
    assert!(harness
        .metrics()
        .await
        .contains("elaaoms_ingest_publish_seconds_count{path=\"relay\"} 1"));
    harness.stop().await;
}
