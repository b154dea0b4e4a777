//! The consumer loop (`bus::consumer`) against the real NATS: every test has
//! streams of its own, millisecond retry delays and a short ack wait, and
//! reads the outcome from JetStream itself (consumer info, the dead-letter
//! stream), never from the loop's logs.
//!
//! The test handler's behaviour is scripted by the message body (see
//! `Script`); it records every call it sees.
//!
//! Timing: waits poll observable state with a bound (`WAIT`); the only
//! duration asserted is a lower bound (a nak's delay is honoured).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::message::StreamMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use elaaoms_shared::bus::consumer::{
    run_consumer, ConsumerSettings, Delivery, Handler, HandlerError,
};
use elaaoms_shared::bus::{
    Bus, BusError, Step, DLQ_ATTEMPTS_HEADER, DLQ_ORIGINAL_SEQUENCE_HEADER,
    DLQ_ORIGINAL_SUBJECT_HEADER, DLQ_REASON_HEADER, DLQ_SERVICE_HEADER, ORGANIZATION_HEADER,
};
use elaaoms_shared::test_support::TestBus;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Upper bound of every wait on observable state; a healthy run needs far
/// less.
const WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(25);
const TRANSIENT_REASON: &str = "provider down";
const PERMANENT_REASON: &str = "garbage input";
const SLOW_HANDLER: Duration = Duration::from_secs(2);

/// Polls `$cond` (which may `.await`) until it holds; fails the test after
/// `WAIT`.
macro_rules! wait_until {
    ($what:expr, $cond:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            if $cond {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for {}",
                $what
            );
            tokio::time::sleep(POLL).await;
        }
    }};
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// What the handler does with a message, by its body: `<script>` or
/// `<script>#<anything>` (to tell messages of the same script apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Ok,
    /// Transient on attempt 1, then Ok.
    TransientOnce,
    /// Always transient.
    FailTransient,
    FailPermanent,
    /// Panics on attempt 1, then Ok.
    PanicOnce,
    /// Transient until the last allowed attempt, on which it never returns.
    HangOnLast,
    /// Sleeps `SLOW_HANDLER` (longer than the ack wait), then Ok.
    Slow,
    /// Waits until the test releases it, then transient.
    BlockedThenTransient,
}

impl Script {
    fn of(payload: &str) -> Script {
        match payload.split('#').next().unwrap_or_default() {
            "ok" => Script::Ok,
            "transient-once" => Script::TransientOnce,
            "fail-transient" => Script::FailTransient,
            "fail-permanent" => Script::FailPermanent,
            "panic-once" => Script::PanicOnce,
            "hang-on-last" => Script::HangOnLast,
            "slow" => Script::Slow,
            "blocked-then-transient" => Script::BlockedThenTransient,
            other => panic!("no script {other:?}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Call {
    payload: String,
    attempt: u64,
    organization_id: Option<Uuid>,
    stream_sequence: u64,
    started: Instant,
    /// None while running, or when the handler panicked or was aborted.
    finished: Option<Instant>,
}

#[derive(Debug, Clone)]
struct DeadLetterCall {
    payload: String,
    reason: String,
    failed: bool,
}

struct TestHandler {
    max_attempts: u64,
    calls: Mutex<Vec<Call>>,
    dead_letters: Mutex<Vec<DeadLetterCall>>,
    /// `on_dead_letter` fails while this is above zero (and counts down).
    dead_letter_failures: AtomicUsize,
    /// Releases `BlockedThenTransient` handlers.
    release: CancellationToken,
}

impl TestHandler {
    fn new(max_attempts: u64) -> Arc<Self> {
        Arc::new(Self {
            max_attempts,
            calls: Mutex::default(),
            dead_letters: Mutex::default(),
            dead_letter_failures: AtomicUsize::new(0),
            release: CancellationToken::new(),
        })
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn calls_of(&self, prefix: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.payload.starts_with(prefix))
            .collect()
    }

    fn attempts(&self) -> Vec<u64> {
        self.calls().iter().map(|c| c.attempt).collect()
    }

    fn dead_letters(&self) -> Vec<DeadLetterCall> {
        self.dead_letters.lock().unwrap().clone()
    }
}

impl Handler for TestHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let payload = String::from_utf8(delivery.payload.to_vec()).expect("utf-8 test payload");
        let index = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                payload: payload.clone(),
                attempt: delivery.attempt,
                organization_id: delivery.organization_id,
                stream_sequence: delivery.stream_sequence,
                started: Instant::now(),
                finished: None,
            });
            calls.len() - 1
        };
        let transient = || {
            Err(HandlerError::Transient(format!(
                "{TRANSIENT_REASON} (attempt {})",
                delivery.attempt
            )))
        };
        let outcome = match Script::of(&payload) {
            Script::Ok => Ok(()),
            Script::TransientOnce if delivery.attempt == 1 => transient(),
            Script::TransientOnce => Ok(()),
            Script::FailTransient => transient(),
            Script::FailPermanent => Err(HandlerError::Permanent(PERMANENT_REASON.to_owned())),
            Script::PanicOnce if delivery.attempt == 1 => panic!("scripted panic"),
            Script::PanicOnce => Ok(()),
            Script::HangOnLast if delivery.attempt == self.max_attempts => {
                std::future::pending().await
            }
            Script::HangOnLast => transient(),
            Script::Slow => {
                tokio::time::sleep(SLOW_HANDLER).await;
                Ok(())
            }
            Script::BlockedThenTransient => {
                self.release.cancelled().await;
                transient()
            }
        };
        self.calls.lock().unwrap()[index].finished = Some(Instant::now());
        outcome
    }

    async fn on_dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), HandlerError> {
        let fail = self
            .dead_letter_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        self.dead_letters.lock().unwrap().push(DeadLetterCall {
            payload: String::from_utf8_lossy(&delivery.payload).into_owned(),
            reason: reason.to_owned(),
            failed: fail,
        });
        if fail {
            Err(HandlerError::Transient(
                "failure store unavailable".to_owned(),
            ))
        } else {
            Ok(())
        }
    }
}

fn settings(service: &str) -> ConsumerSettings {
    ConsumerSettings {
        service: service.to_owned(),
        step: Step::Transcribed,
        concurrency: 4,
        per_organization_concurrency: 2,
        max_attempts: 3,
        retry_delays: vec![Duration::from_millis(50), Duration::from_millis(100)],
        ack_wait: Duration::from_secs(1),
        // Longer than any test: no pull request expires while a redelivery
        // comes due. On nats-server 2.9 that coincidence loses the
        // redelivery and delivers the message again with a delivery count
        // of 1 (nats-server#5305, fixed in 2.10.14), which no assertion on
        // attempts could survive. `an_idle_worker_keeps_pulling_after_its_
        // pull_requests_expire` covers expiry on its own.
        pull_expiry: Duration::from_secs(10),
    }
}

struct Worker {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), BusError>>,
}

fn start_worker(bus: &Bus, settings: &ConsumerSettings, handler: &Arc<TestHandler>) -> Worker {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_consumer(
        bus.clone(),
        settings.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    Worker { shutdown, task }
}

impl Worker {
    /// Graceful shutdown: returns once `run_consumer` has returned.
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run_consumer returns after shutdown")
            .expect("run_consumer does not panic")
            .expect("run_consumer ends with Ok");
    }
}

async fn publish(bus: &Bus, msg_id: &str, organization_id: Uuid, body: &str) -> u64 {
    bus.publish(
        &bus.names.subject(Step::Transcribed),
        msg_id,
        organization_id,
        Bytes::copy_from_slice(body.as_bytes()),
    )
    .await
    .expect("publish test message")
}

/// The durable consumer's state, or None before the worker has created it.
async fn consumer_info(bus: &Bus, service: &str) -> Option<consumer::Info> {
    let stream = bus
        .jetstream
        .get_stream(bus.names.event_stream())
        .await
        .ok()?;
    let mut consumer: PullConsumer = stream
        .get_consumer(&bus.names.consumer(service))
        .await
        .ok()?;
    consumer.info().await.ok().cloned()
}

/// Everything the consumer was given has been delivered and settled (acked
/// or termed): nothing waits for delivery, nothing waits for an ack.
async fn settled(bus: &Bus, service: &str, last_sequence: u64) -> bool {
    consumer_info(bus, service).await.is_some_and(|info| {
        info.num_pending == 0
            && info.num_ack_pending == 0
            && info.delivered.stream_sequence >= last_sequence
    })
}

/// Every message of the dead-letter stream, oldest first.
async fn dead_letters(bus: &Bus) -> Vec<StreamMessage> {
    let mut stream = bus
        .jetstream
        .get_stream(bus.names.dlq_stream())
        .await
        .expect("DLQ stream");
    let state = stream.info().await.expect("DLQ stream info").state.clone();
    let mut messages = Vec::new();
    if state.messages == 0 {
        return messages;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            messages.push(message);
        }
    }
    messages
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.as_str())
}

#[tokio::test]
async fn a_message_that_succeeds_is_handled_once_and_acked() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("ok");
    let handler = TestHandler::new(settings.max_attempts);
    let organization_id = Uuid::new_v4();
    let sequence = publish(bus, "m-ok", organization_id, "ok").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!(
        "the message to be acked",
        settled(bus, "ok", sequence).await
    );
    worker.stop().await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].attempt, 1);
    assert_eq!(calls[0].organization_id, Some(organization_id));
    assert_eq!(calls[0].stream_sequence, sequence);
    let info = consumer_info(bus, "ok").await.unwrap();
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.ack_floor.stream_sequence, sequence);
    assert!(dead_letters(bus).await.is_empty());
    assert!(handler.dead_letters().is_empty());
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_transient_failure_is_retried_after_the_configured_delay() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let delay = Duration::from_millis(400);
    let settings = ConsumerSettings {
        retry_delays: vec![delay],
        // Longer than the delay, so a lost nak (redelivery after the ack
        // wait) would not pass for a nak with its delay.
        ack_wait: Duration::from_secs(3),
        ..settings("retry")
    };
    let handler = TestHandler::new(settings.max_attempts);
    let sequence = publish(bus, "m-retry", Uuid::new_v4(), "transient-once").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!(
        "the retried message to be acked",
        settled(bus, "retry", sequence).await
    );
    worker.stop().await;

    let calls = handler.calls();
    assert_eq!(handler.attempts(), vec![1, 2], "{calls:?}");
    let first_finished = calls[0].finished.expect("first attempt returned");
    let between = calls[1].started.duration_since(first_finished);
    assert!(
        between >= delay,
        "redelivered {between:?} after the nak, before the nak delay of {delay:?}"
    );
    assert!(dead_letters(bus).await.is_empty());
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_message_failing_transiently_past_the_budget_goes_to_the_dead_letter_stream_once() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("budget");
    let handler = TestHandler::new(settings.max_attempts);
    let organization_id = Uuid::new_v4();
    let body = "fail-transient#budget";
    let sequence = publish(bus, "m-budget", organization_id, body).await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("the message to be dead-lettered", {
        settled(bus, "budget", sequence).await && !dead_letters(bus).await.is_empty()
    });
    worker.stop().await;

    assert_eq!(
        handler.attempts(),
        vec![1, 2, 3],
        "the handler runs exactly max_attempts times"
    );
    let dead = dead_letters(bus).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let entry = &dead[0];
    assert_eq!(
        entry.payload,
        Bytes::from_static(body.as_bytes()),
        "the original bytes"
    );
    assert_eq!(
        entry.subject.as_str(),
        bus.names
            .dlq_subject_for(&bus.names.subject(Step::Transcribed))
    );
    let headers = &entry.headers;
    let reason = header(headers, DLQ_REASON_HEADER).expect("reason header");
    assert!(reason.contains(TRANSIENT_REASON), "{reason}");
    assert_eq!(header(headers, DLQ_ATTEMPTS_HEADER), Some("3"));
    assert_eq!(header(headers, DLQ_SERVICE_HEADER), Some("budget"));
    let original_subject = bus.names.subject(Step::Transcribed);
    assert_eq!(
        header(headers, DLQ_ORIGINAL_SUBJECT_HEADER),
        Some(original_subject.as_str())
    );
    assert_eq!(
        header(headers, DLQ_ORIGINAL_SEQUENCE_HEADER),
        Some(sequence.to_string().as_str())
    );
    let organization = organization_id.to_string();
    assert_eq!(
        header(headers, ORGANIZATION_HEADER),
        Some(organization.as_str())
    );
    let dlq_msg_id = format!("dlq:{}:{sequence}", bus.names.event_stream());
    assert_eq!(header(headers, "Nats-Msg-Id"), Some(dlq_msg_id.as_str()));

    // The message id dedupes: a second dead-lettering of the same message
    // (a worker that crashed before the term) adds nothing.
    let again = bus
        .publish_with_headers(
            &entry.subject,
            &dlq_msg_id,
            headers.clone(),
            entry.payload.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        again, entry.sequence,
        "the duplicate is acknowledged with the first entry's sequence"
    );
    assert_eq!(dead_letters(bus).await.len(), 1);

    let recorded = handler.dead_letters();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].payload, body);
    assert!(
        recorded[0].reason.contains(TRANSIENT_REASON),
        "{:?}",
        recorded[0]
    );
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_permanent_failure_goes_to_the_dead_letter_stream_after_one_attempt() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("permanent");
    let handler = TestHandler::new(settings.max_attempts);
    let sequence = publish(bus, "m-permanent", Uuid::new_v4(), "fail-permanent").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("the message to be dead-lettered", {
        settled(bus, "permanent", sequence).await && !dead_letters(bus).await.is_empty()
    });
    worker.stop().await;

    assert_eq!(handler.attempts(), vec![1]);
    let dead = dead_letters(bus).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(header(&dead[0].headers, DLQ_ATTEMPTS_HEADER), Some("1"));
    let reason = header(&dead[0].headers, DLQ_REASON_HEADER).unwrap();
    assert!(reason.contains(PERMANENT_REASON), "{reason}");
    let recorded = handler.dead_letters();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].reason, PERMANENT_REASON);
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_failure_after_the_dead_letter_publish_retries_the_dead_letter_path_without_a_second_entry(
) {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("dlq-retry");
    let handler = TestHandler::new(settings.max_attempts);
    // Recording the failure fails once: the message is in the DLQ stream
    // but not termed, so it comes back.
    handler.dead_letter_failures.store(1, Ordering::SeqCst);
    let sequence = publish(bus, "m-dlq-retry", Uuid::new_v4(), "fail-permanent").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!(
        "the dead-letter path to be retried and the message termed",
        settled(bus, "dlq-retry", sequence).await && handler.dead_letters().len() >= 2
    );
    worker.stop().await;

    let recorded = handler.dead_letters();
    assert_eq!(
        recorded.len(),
        2,
        "one failed and one successful recording: {recorded:?}"
    );
    assert!(recorded[0].failed && !recorded[1].failed);
    assert!(
        recorded.iter().all(|r| r.reason == PERMANENT_REASON),
        "the retry records the original reason: {recorded:?}"
    );
    assert_eq!(
        handler.attempts(),
        vec![1],
        "a message already dead-lettered goes back to the dead-letter path, not to the handler"
    );
    let dead = dead_letters(bus).await;
    assert_eq!(
        dead.len(),
        1,
        "Nats-Msg-Id dedupes the second publish: {dead:?}"
    );
    assert_eq!(
        header(&dead[0].headers, DLQ_ORIGINAL_SEQUENCE_HEADER),
        Some(sequence.to_string().as_str())
    );
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_handler_that_panics_loses_no_message() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("panic");
    let handler = TestHandler::new(settings.max_attempts);
    let sequence = publish(bus, "m-panic", Uuid::new_v4(), "panic-once").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!(
        "the message to be acked after the panic",
        settled(bus, "panic", sequence).await
    );
    assert!(!worker.task.is_finished(), "the worker survives the panic");
    worker.stop().await;

    let calls = handler.calls();
    assert_eq!(handler.attempts(), vec![1, 2], "{calls:?}");
    assert!(calls[0].finished.is_none() && calls[1].finished.is_some());
    assert!(dead_letters(bus).await.is_empty());
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_during_the_last_allowed_delivery_still_dead_letters_the_message() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("killed");
    let handler = TestHandler::new(settings.max_attempts);
    let sequence = publish(bus, "m-killed", Uuid::new_v4(), "hang-on-last").await;

    let first = start_worker(bus, &settings, &handler);
    wait_until!(
        "the last allowed attempt to start",
        handler.attempts().last() == Some(&settings.max_attempts)
    );
    // A crash: no graceful shutdown, nothing settles the message.
    first.task.abort();
    let aborted = first.task.await.expect_err("the worker was aborted");
    assert!(aborted.is_cancelled());

    let second = start_worker(bus, &settings, &handler);
    wait_until!("the redelivered message to be dead-lettered", {
        settled(bus, "killed", sequence).await && !dead_letters(bus).await.is_empty()
    });
    second.stop().await;

    assert_eq!(
        handler.attempts(),
        vec![1, 2, 3],
        "the handler does not run past the budget"
    );
    let dead = dead_letters(bus).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let attempts: u64 = header(&dead[0].headers, DLQ_ATTEMPTS_HEADER)
        .unwrap()
        .parse()
        .unwrap();
    assert!(attempts > settings.max_attempts, "{attempts}");
    let reason = header(&dead[0].headers, DLQ_REASON_HEADER).unwrap();
    assert!(reason.contains("budget"), "{reason}");
    let recorded = handler.dead_letters();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert!(recorded[0].reason.contains("budget"));
    test_bus.cleanup().await;
}

#[tokio::test]
async fn one_organization_failing_does_not_hold_up_another() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = ConsumerSettings {
        concurrency: 2,
        per_organization_concurrency: 1,
        retry_delays: vec![Duration::from_secs(30)],
        ..settings("fair")
    };
    let handler = TestHandler::new(settings.max_attempts);
    let (organization_a, organization_b) = (Uuid::new_v4(), Uuid::new_v4());
    // A's messages come first in the stream and block in the handler (a
    // provider that times out), then fail transiently.
    for i in 0..5 {
        publish(
            bus,
            &format!("a-{i}"),
            organization_a,
            &format!("blocked-then-transient#a{i}"),
        )
        .await;
    }
    let mut last = 0;
    for i in 0..5 {
        last = publish(bus, &format!("b-{i}"), organization_b, &format!("ok#b{i}")).await;
    }

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("all of B's messages to be acked while A's block", {
        let b_done = handler
            .calls_of("ok")
            .iter()
            .filter(|c| c.finished.is_some())
            .count()
            == 5;
        b_done
            && consumer_info(bus, "fair").await.is_some_and(|info| {
                info.num_pending == 0
                    && info.num_ack_pending == 5
                    && info.delivered.stream_sequence == last
            })
    });
    let a_calls = handler.calls_of("blocked");
    assert!(
        a_calls.len() <= settings.per_organization_concurrency,
        "{a_calls:?}"
    );
    assert!(handler
        .calls_of("ok")
        .iter()
        .all(|c| c.organization_id == Some(organization_b)));

    // A's provider answers (with an error): A's messages wait for their
    // retry, B's stay done.
    handler.release.cancel();
    wait_until!(
        "every A message to have failed once",
        handler
            .calls_of("blocked")
            .iter()
            .filter(|c| c.finished.is_some())
            .count()
            == 5
    );
    let a_calls = handler.calls_of("blocked");
    assert!(
        a_calls
            .iter()
            .all(|c| c.attempt == 1 && c.organization_id == Some(organization_a)),
        "{a_calls:?}"
    );
    wait_until!(
        "A's messages to be waiting for their retry",
        consumer_info(bus, "fair")
            .await
            .is_some_and(|info| info.num_ack_pending == 5 && info.num_pending == 0)
    );
    worker.stop().await;
    assert_eq!(
        handler.calls_of("blocked").len(),
        5,
        "no retry before the 30 s delay"
    );
    assert!(dead_letters(bus).await.is_empty());
    test_bus.cleanup().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_message_in_flight() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("shutdown");
    assert!(SLOW_HANDLER > settings.ack_wait);
    let handler = TestHandler::new(settings.max_attempts);
    let sequence = publish(bus, "m-slow", Uuid::new_v4(), "slow").await;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("the slow handler to start", !handler.calls().is_empty());
    // Keep pulling past the ack wait: without progress reports the server
    // would redeliver the message to this same worker now.
    let started = handler.calls()[0].started;
    wait_until!(
        "the slow handler to have run past the ack wait",
        started.elapsed() > settings.ack_wait * 3 / 2
    );
    worker.shutdown.cancel();
    let result = tokio::time::timeout(WAIT, worker.task)
        .await
        .expect("run_consumer returns after shutdown")
        .expect("run_consumer does not panic");
    assert!(result.is_ok(), "{result:?}");

    let calls = handler.calls();
    assert_eq!(
        calls.len(),
        1,
        "progress reports prevent a redelivery: {calls:?}"
    );
    assert!(
        calls[0].finished.is_some(),
        "run_consumer returned before the handler finished"
    );
    let info = consumer_info(bus, "shutdown").await.unwrap();
    assert_eq!(info.num_ack_pending, 0, "the message in flight was acked");
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.ack_floor.stream_sequence, sequence);
    test_bus.cleanup().await;
}

#[tokio::test]
async fn a_message_without_a_decodable_organization_is_handled() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = settings("no-org");
    let handler = TestHandler::new(settings.max_attempts);
    let subject = bus.names.subject(Step::Transcribed);

    let mut garbage = HeaderMap::new();
    garbage.insert(ORGANIZATION_HEADER, "not-a-uuid");
    bus.publish_with_headers(
        &subject,
        "m-garbage-org",
        garbage,
        Bytes::from_static(b"ok#garbage-org"),
    )
    .await
    .unwrap();
    // No headers at all.
    bus.jetstream
        .publish(subject.clone(), Bytes::from_static(b"ok#no-headers"))
        .await
        .unwrap()
        .await
        .unwrap();
    let last = bus
        .jetstream
        .publish(
            subject.clone(),
            Bytes::from_static(b"fail-permanent#no-headers"),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("all three messages to be settled", {
        settled(bus, "no-org", last).await && !dead_letters(bus).await.is_empty()
    });
    worker.stop().await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|c| c.organization_id.is_none() && c.attempt == 1),
        "{calls:?}"
    );
    let dead = dead_letters(bus).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].payload,
        Bytes::from_static(b"fail-permanent#no-headers")
    );
    assert_eq!(header(&dead[0].headers, ORGANIZATION_HEADER), None);
    assert_eq!(
        header(&dead[0].headers, DLQ_ORIGINAL_SEQUENCE_HEADER),
        Some(last.to_string().as_str())
    );
    test_bus.cleanup().await;
}

#[tokio::test]
async fn an_idle_worker_keeps_pulling_after_its_pull_requests_expire() {
    init_tracing();
    let test_bus = TestBus::create().await;
    let bus = &test_bus.bus;
    let settings = ConsumerSettings {
        pull_expiry: Duration::from_millis(200),
        ..settings("idle")
    };
    let handler = TestHandler::new(settings.max_attempts);

    let worker = start_worker(bus, &settings, &handler);
    wait_until!("the worker to wait for messages", {
        consumer_info(bus, "idle")
            .await
            .is_some_and(|info| info.num_waiting > 0)
    });
    // Let several pull requests expire before anything is published.
    let idle_since = Instant::now();
    wait_until!(
        "a few pull expiries",
        idle_since.elapsed() > settings.pull_expiry * 4
    );
    let organization_id = Uuid::new_v4();
    let sequence = publish(bus, "m-idle", organization_id, "ok#idle").await;
    wait_until!(
        "the message to be acked",
        settled(bus, "idle", sequence).await
    );
    worker.stop().await;

    let calls = handler.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].attempt, calls[0].organization_id),
        (1, Some(organization_id))
    );
    test_bus.cleanup().await;
}
