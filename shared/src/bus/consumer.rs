//! The one consumer loop every worker runs (DESIGN.md section 4).
//!
//! Pull in batches, bounded concurrency, a per-organization in-flight limit
//! (a message waiting for its organization's turn does not take a running
//! slot from other organizations). The delivery count is read before the
//! handler runs: the server's `max_deliver` is unlimited and this loop's
//! budget decides, because a server that gives up on a message drops it
//! without a trace. Outcomes:
//!
//! * `Ok`: the handler has published what comes next; double-ack.
//! * `Transient`: nak with the next delay of the schedule; on the last
//!   allowed delivery, the dead-letter path instead.
//! * `Permanent`: the dead-letter path at once.
//! * dead-letter path: publish the original bytes to the DLQ stream with the
//!   reason in headers and `Nats-Msg-Id = dlq:{stream}:{seq}` (a crash before
//!   the term cannot make a second entry), await the PubAck, let the handler
//!   record the failure, then term with a double ack. When a step fails the
//!   message is nakked and its redelivery to this worker retries the
//!   dead-letter path (not the handler).
//!
//! A handler runs in its own task: a panic is a transient failure, not a
//! lost message. While it runs, the loop reports progress every third of the
//! ack wait so a slow handler is not redelivered under its feet; the reports
//! stop before the message is settled (nats-server 2.9 takes a progress
//! report that follows a nak as a new delivery time, which would replace the
//! nak's delay with the ack wait).
//!
//! nats-server 2.9 (fixed in 2.10.14, nats-server#5305): when a redelivery
//! comes due at the moment the only waiting pull request expires, the server
//! loses the redelivery (it comes back after the ack wait, counted one
//! delivery higher), steps its cursor back and delivers the previous message
//! once more with a delivery count of 1. Handlers are idempotent; for such a
//! message the budget is off by a delivery or two. The same coincidence can
//! drop the pull request without its `408`, which `PULL_END_GRACE` bounds.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::{
    Bus, BusError, Step, DLQ_ATTEMPTS_HEADER, DLQ_ORIGINAL_SEQUENCE_HEADER,
    DLQ_ORIGINAL_SUBJECT_HEADER, DLQ_REASON_HEADER, DLQ_SERVICE_HEADER, ORGANIZATION_HEADER,
};
use crate::config::WorkerConfig;
use crate::trace::{link_span, TraceParent, TRACEPARENT_HEADER};

/// Why a handler did not finish a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later: a provider is down, a timeout, a lock.
    #[error("transient: {0}")]
    Transient(String),
    /// Will never succeed: garbage input, a rejected request.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl HandlerError {
    /// Builds a reason from an error and its whole source chain.
    pub fn transient(err: &(dyn std::error::Error + 'static)) -> Self {
        HandlerError::Transient(error_chain(err))
    }

    pub fn permanent(err: &(dyn std::error::Error + 'static)) -> Self {
        HandlerError::Permanent(error_chain(err))
    }
}

/// `outer: cause: root cause`, for logs and dead-letter reasons.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// One message as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    pub organization_id: Option<Uuid>,
    /// 1 on the first delivery.
    pub attempt: u64,
    pub stream_sequence: u64,
    /// This worker's span of the message's trace: a child of its
    /// `traceparent` header (same trace id, new span id), or a new trace
    /// when it carries none or a malformed one; with the OTLP exporter on,
    /// the exported span's ids. Handlers publish their next event with it
    /// (`Bus::publish_traced`), so it is the parent there.
    pub trace: TraceParent,
}

/// What a worker does with one message. Handlers must be idempotent:
/// delivery is at least once.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, delivery: &Delivery) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Called once the message is safely in the dead-letter stream and
    /// before it is termed, to record the failure (a status, a failure
    /// file). Must be idempotent; an error retries the dead-letter path.
    fn on_dead_letter(
        &self,
        _delivery: &Delivery,
        _reason: &str,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }
}

/// How one worker consumes one step's subject.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Names the durable consumer and appears in dead-letter headers.
    pub service: String,
    pub step: Step,
    pub concurrency: usize,
    pub per_organization_concurrency: usize,
    /// Deliveries allowed before the dead-letter path.
    pub max_attempts: u64,
    /// Nak delays by attempt; the last one repeats.
    pub retry_delays: Vec<Duration>,
    pub ack_wait: Duration,
    /// How long one pull request waits for messages.
    pub pull_expiry: Duration,
}

impl ConsumerSettings {
    pub fn from_config(service: &str, step: Step, config: &WorkerConfig) -> Self {
        Self {
            service: service.to_owned(),
            step,
            concurrency: config.worker_concurrency.max(1),
            per_organization_concurrency: config.worker_per_organization_concurrency.max(1),
            max_attempts: config.worker_max_attempts.max(1),
            retry_delays: config.worker_retry_delays.clone(),
            ack_wait: config.worker_ack_wait,
            pull_expiry: Duration::from_secs(5),
        }
    }

    fn retry_delay(&self, attempt: u64) -> Duration {
        let index =
            (attempt.saturating_sub(1) as usize).min(self.retry_delays.len().saturating_sub(1));
        self.retry_delays
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(60))
    }
}

/// Far above any worker's concurrency: the server stops delivering when a
/// consumer has this many unacknowledged messages.
const MAX_ACK_PENDING: i64 = 10_000;

/// Creates the worker's durable pull consumer (idempotent).
async fn ensure_consumer(
    bus: &Bus,
    settings: &ConsumerSettings,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
    let name = bus.names.consumer(&settings.service);
    let consumer_error = |reason: String| BusError::Consumer {
        consumer: name.clone(),
        reason,
    };
    let stream = bus
        .jetstream
        .get_stream(bus.names.event_stream())
        .await
        .map_err(|err| consumer_error(err.to_string()))?;
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: bus.names.subject(settings.step),
        ack_policy: AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        // Unlimited: the loop's own budget decides (see the module comment).
        max_deliver: -1,
        max_ack_pending: MAX_ACK_PENDING,
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(consumer) => Ok(consumer),
        // An existing consumer with other settings: keep it, say so.
        Err(create_err) => {
            let consumer = stream
                .get_consumer(&name)
                .await
                .map_err(|_| consumer_error(create_err.to_string()))?;
            tracing::warn!(consumer = name, error = %create_err, "using the existing consumer's settings");
            Ok(consumer)
        }
    }
}

/// In-flight slots per organization, created on first use.
struct OrganizationLimits {
    per_organization: usize,
    slots: Mutex<HashMap<Option<Uuid>, Arc<Semaphore>>>,
}

impl OrganizationLimits {
    fn new(per_organization: usize) -> Self {
        Self {
            per_organization: per_organization.max(1),
            slots: Mutex::default(),
        }
    }

    fn semaphore(&self, organization_id: Option<Uuid>) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().expect("organization limits lock");
        // Forget idle organizations so the map does not grow forever.
        if slots.len() > 10_000 {
            slots.retain(|_, s| s.available_permits() < self.per_organization);
        }
        slots
            .entry(organization_id)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_organization)))
            .clone()
    }
}

/// How long past its expiry a pull request may stay silent before the loop
/// gives up on it. nats-server 2.9 can drop an expiring request without the
/// `408 Request Timeout` that ends it (when a message becomes deliverable at
/// the moment it expires); async-nats would then wait the expiry plus 5 s.
const PULL_END_GRACE: Duration = Duration::from_secs(1);

/// Messages taken from the server and not yet settled, per running slot:
/// those beyond the running ones wait for their organization's turn.
const HELD_PER_RUNNING_SLOT: usize = 4;

/// The loop's two limits. `running` bounds the handlers running at once (the
/// concurrency). `held` bounds the messages taken from the server and not yet
/// settled, including those waiting for their organization's turn: a waiting
/// message gives its running slot back, so one organization's backlog cannot
/// take every slot while it waits for its own limit.
#[derive(Clone)]
struct Capacity {
    running: Arc<Semaphore>,
    held: Arc<Semaphore>,
}

struct Permits {
    _held: OwnedSemaphorePermit,
    running: Option<OwnedSemaphorePermit>,
}

impl Capacity {
    fn new(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            running: Arc::new(Semaphore::new(concurrency)),
            held: Arc::new(Semaphore::new(concurrency * HELD_PER_RUNNING_SLOT)),
        }
    }

    async fn acquire(&self) -> Permits {
        let held = self
            .held
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let running = self
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        Permits {
            _held: held,
            running: Some(running),
        }
    }

    fn available(&self) -> usize {
        self.running
            .available_permits()
            .min(self.held.available_permits())
    }
}

/// Messages whose dead-letter path failed (the DLQ publish, the handler's
/// record of the failure, or the term), with the reason they were given up
/// on: their redelivery goes straight back to the dead-letter path instead of
/// running the handler again. Best effort: a redelivery to another replica
/// runs the handler again (delivery is at least once) or, past the budget,
/// takes the dead-letter path with the budget as the reason.
#[derive(Default)]
struct DeadLetterRetries(Mutex<HashMap<u64, String>>);

impl DeadLetterRetries {
    fn remember(&self, stream_sequence: u64, reason: &str) {
        if stream_sequence == 0 {
            return;
        }
        let mut reasons = self.0.lock().expect("dead-letter retries lock");
        // Entries of messages another replica finished are never removed
        // here; bound them.
        if reasons.len() >= 10_000 {
            reasons.clear();
        }
        reasons.insert(stream_sequence, reason.to_owned());
    }

    fn reason(&self, stream_sequence: u64) -> Option<String> {
        self.0
            .lock()
            .expect("dead-letter retries lock")
            .get(&stream_sequence)
            .cloned()
    }

    fn forget(&self, stream_sequence: u64) {
        self.0
            .lock()
            .expect("dead-letter retries lock")
            .remove(&stream_sequence);
    }
}

/// What one worker's loop shares with the tasks of its messages.
struct Shared<H> {
    bus: Bus,
    settings: ConsumerSettings,
    handler: Arc<H>,
    capacity: Capacity,
    organizations: OrganizationLimits,
    dead_letter_retries: DeadLetterRetries,
}

/// Runs until `shutdown` fires, then stops pulling, finishes the messages in
/// flight and returns.
///
/// Dropping the returned future (aborting its task) abandons the messages in
/// flight: their handlers and progress reports stop, and the server
/// redelivers them after the ack wait.
pub async fn run_consumer<H: Handler>(
    bus: Bus,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let consumer = ensure_consumer(&bus, &settings).await?;
    let capacity = Capacity::new(settings.concurrency);
    let shared = Arc::new(Shared {
        organizations: OrganizationLimits::new(settings.per_organization_concurrency),
        capacity: capacity.clone(),
        dead_letter_retries: DeadLetterRetries::default(),
        bus,
        settings,
        handler,
    });
    let mut in_flight = JoinSet::new();
    tracing::info!(
        service = shared.settings.service,
        subject = shared.bus.names.subject(shared.settings.step),
        "consumer started"
    );

    'pull: loop {
        while let Some(finished) = in_flight.try_join_next() {
            log_task_failure(finished);
        }
        let first_permits = tokio::select! {
            _ = shutdown.cancelled() => break 'pull,
            permits = capacity.acquire() => permits,
        };
        let wanted = 1 + capacity.available();
        let batch = consumer
            .batch()
            .max_messages(wanted)
            .expires(shared.settings.pull_expiry)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "pull request failed; retrying");
                drop(first_permits);
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                }
            }
        };
        let mut first_permits = Some(first_permits);
        let batch_deadline =
            tokio::time::Instant::now() + shared.settings.pull_expiry + PULL_END_GRACE;
        loop {
            // A message the server has already sent is taken even when
            // shutting down: dropped, it would come back only after the ack
            // wait, one delivery of its budget later.
            let next = tokio::select! {
                biased;
                next = batch.next() => next,
                _ = shutdown.cancelled() => break 'pull,
                _ = tokio::time::sleep_until(batch_deadline) => {
                    tracing::debug!("the pull request expired without a word from the server; pulling again");
                    break;
                }
            };
            let message = match next {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "pull batch ended with an error");
                    break;
                }
            };
            let permits = match first_permits.take() {
                Some(permits) => permits,
                None => capacity.acquire().await,
            };
            in_flight.spawn(process_message(shared.clone(), message, permits));
        }
    }

    tracing::info!(
        service = shared.settings.service,
        in_flight = in_flight.len(),
        "consumer stopping: finishing messages in flight"
    );
    while let Some(finished) = in_flight.join_next().await {
        log_task_failure(finished);
    }
    tracing::info!(service = shared.settings.service, "consumer stopped");
    Ok(())
}

fn log_task_failure(finished: Result<(), tokio::task::JoinError>) {
    if let Err(err) = finished {
        tracing::error!(error = %err, "a message's task failed; the message will be redelivered");
    }
}

fn delivery_of(message: &jetstream::Message, trace: TraceParent) -> Delivery {
    let (attempt, stream_sequence) = message
        .info()
        .map(|info| (info.delivered.max(1) as u64, info.stream_sequence))
        .unwrap_or((1, 0));
    let organization_id = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(ORGANIZATION_HEADER))
        .and_then(|value| Uuid::parse_str(value.as_str()).ok());
    Delivery {
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        headers: message.headers.clone(),
        organization_id,
        attempt,
        stream_sequence,
        trace,
    }
}

/// How a message is settled with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    Ack,
    Nak(Duration),
    /// In the dead-letter stream: never deliver it again.
    Term,
}

async fn process_message<H: Handler>(
    shared: Arc<Shared<H>>,
    message: jetstream::Message,
    mut permits: Permits,
) {
    let span = tracing::info_span!(
        "message",
        service = shared.settings.service,
        subject = message.subject.as_str(),
        seq = tracing::field::Empty,
        attempt = tracing::field::Empty,
        // Every log line of the handler carries the pipeline's trace id.
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty
    );
    // The span continues the message's `traceparent` (in the OTLP exporter
    // too, when it is on) and its ids are what the handler sends on.
    let trace = link_span(
        &span,
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(TRACEPARENT_HEADER))
            .map(|value| value.as_str()),
    );
    let delivery = Arc::new(delivery_of(&message, trace));
    span.record("seq", delivery.stream_sequence);
    span.record("attempt", delivery.attempt);
    async move {
        let progress = ProgressReports::start(message.clone(), shared.settings.ack_wait);
        let settle = decide(&shared, &delivery, &mut permits).await;
        // No progress report may follow the nak: the server would take it
        // for a new delivery time and redeliver after the ack wait instead
        // of the nak's delay.
        progress.stop().await;
        let settled = match settle {
            Settle::Ack => message.double_ack().await,
            Settle::Nak(delay) => message.ack_with(AckKind::Nak(Some(delay))).await,
            Settle::Term => message.double_ack_with(AckKind::Term).await,
        };
        match settled {
            Ok(()) if settle == Settle::Term => shared.dead_letter_retries.forget(delivery.stream_sequence),
            Ok(()) => {}
            // The message comes back after the ack wait; handlers are
            // idempotent.
            Err(err) => tracing::warn!(error = %err, ?settle, "could not settle the message; it will be redelivered"),
        }
    }
    .instrument(span)
    .await
}

/// Runs the handler (or not) and says how to settle the message.
async fn decide<H: Handler>(
    shared: &Shared<H>,
    delivery: &Arc<Delivery>,
    permits: &mut Permits,
) -> Settle {
    let settings = &shared.settings;
    if let Some(reason) = shared.dead_letter_retries.reason(delivery.stream_sequence) {
        tracing::warn!(reason, "retrying the dead-letter path");
        return dead_letter(shared, delivery, &reason).await;
    }
    if delivery.attempt > settings.max_attempts {
        let reason = format!(
            "delivered {} times, over the budget of {} (a worker crashed or timed out on it)",
            delivery.attempt, settings.max_attempts
        );
        tracing::error!(reason, "giving up: dead-lettering the message");
        return dead_letter(shared, delivery, &reason).await;
    }

    let organization = shared.organizations.semaphore(delivery.organization_id);
    let _organization_slot = match organization.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            // Wait for this organization's turn without a running slot, so
            // other organizations' messages run meanwhile.
            permits.running = None;
            let slot = organization
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            permits.running = Some(
                shared
                    .capacity
                    .running
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed"),
            );
            slot
        }
    };

    match run_handler(shared.handler.clone(), delivery.clone()).await {
        Ok(()) => Settle::Ack,
        Err(HandlerError::Transient(reason)) if delivery.attempt < settings.max_attempts => {
            let delay = settings.retry_delay(delivery.attempt);
            tracing::warn!(
                reason,
                delay_ms = delay.as_millis() as u64,
                "transient failure: retrying later"
            );
            Settle::Nak(delay)
        }
        Err(HandlerError::Transient(reason) | HandlerError::Permanent(reason)) => {
            tracing::error!(reason, "giving up: dead-lettering the message");
            dead_letter(shared, delivery, &reason).await
        }
    }
}

/// A task that is aborted when this is dropped: dropping the loop (or a
/// message's task) must not leave handlers or progress reports running.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the handler in its own task so that a panic is a failure of this
/// message rather than of the worker.
async fn run_handler<H: Handler>(
    handler: Arc<H>,
    delivery: Arc<Delivery>,
) -> Result<(), HandlerError> {
    let mut task = AbortOnDrop(tokio::spawn(
        async move { handler.handle(&delivery).await }.in_current_span(),
    ));
    match (&mut task.0).await {
        Ok(result) => result,
        Err(join_error) => Err(HandlerError::Transient(format!(
            "handler panicked: {join_error}"
        ))),
    }
}

/// `AckKind::Progress` every third of the ack wait while a message is worked
/// on, so a slow handler is not redelivered under its feet.
struct ProgressReports(AbortOnDrop<()>);

impl ProgressReports {
    fn start(message: jetstream::Message, ack_wait: Duration) -> Self {
        let every = (ack_wait / 3).max(Duration::from_millis(100));
        Self(AbortOnDrop(tokio::spawn(
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(err) = message.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %err, "progress report failed");
                    }
                }
            }
            .in_current_span(),
        )))
    }

    /// Returns once no report can be sent any more.
    async fn stop(mut self) {
        self.0 .0.abort();
        let _ = (&mut self.0 .0).await;
    }
}

/// Header values cannot hold line breaks; reasons can be long.
fn header_safe(text: &str) -> String {
    let single_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    single_line.chars().take(2000).collect()
}

/// Publishes the message to the dead-letter stream and lets the handler
/// record the failure; `Term` when both worked, otherwise a nak so that the
/// path is retried.
async fn dead_letter<H: Handler>(shared: &Shared<H>, delivery: &Delivery, reason: &str) -> Settle {
    let (bus, settings) = (&shared.bus, &shared.settings);
    shared
        .dead_letter_retries
        .remember(delivery.stream_sequence, reason);
    let mut headers = delivery.headers.clone().unwrap_or_default();
    headers.insert(DLQ_REASON_HEADER, header_safe(reason).as_str());
    headers.insert(DLQ_ATTEMPTS_HEADER, delivery.attempt.to_string().as_str());
    headers.insert(DLQ_SERVICE_HEADER, settings.service.as_str());
    headers.insert(DLQ_ORIGINAL_SUBJECT_HEADER, delivery.subject.as_str());
    headers.insert(
        DLQ_ORIGINAL_SEQUENCE_HEADER,
        delivery.stream_sequence.to_string().as_str(),
    );
    let msg_id = format!(
        "dlq:{}:{}",
        bus.names.event_stream(),
        delivery.stream_sequence
    );
    let retry_later = |why: String| {
        let delay = settings.retry_delay(1);
        tracing::warn!(
            why,
            delay_ms = delay.as_millis() as u64,
            "dead-letter path failed; retrying it later"
        );
        Settle::Nak(delay)
    };
    if let Err(err) = bus
        .publish_with_headers(
            &bus.names.dlq_subject_for(&delivery.subject),
            &msg_id,
            headers,
            delivery.payload.clone(),
        )
        .await
    {
        return retry_later(err.to_string());
    }
    if let Err(err) = shared.handler.on_dead_letter(delivery, reason).await {
        return retry_later(err.to_string());
    }
    Settle::Term
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_follow_the_schedule_and_repeat_the_last() {
        let settings = ConsumerSettings {
            service: "test".into(),
            step: Step::Transcribed,
            concurrency: 1,
            per_organization_concurrency: 1,
            max_attempts: 10,
            retry_delays: vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(1800),
            ],
            ack_wait: Duration::from_secs(30),
            pull_expiry: Duration::from_secs(1),
        };
        assert_eq!(settings.retry_delay(1), Duration::from_secs(60));
        assert_eq!(settings.retry_delay(2), Duration::from_secs(300));
        assert_eq!(settings.retry_delay(3), Duration::from_secs(1800));
        assert_eq!(settings.retry_delay(9), Duration::from_secs(1800));
    }

    #[test]
    fn error_chain_includes_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("extraction failed")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("connection reset"));
        assert_eq!(error_chain(&err), "extraction failed: connection reset");
    }

    #[test]
    fn header_values_are_single_line_and_bounded() {
        let value = header_safe(&format!("line one\r\nline two{}", "x".repeat(5000)));
        assert!(!value.contains('\n') && !value.contains('\r'));
        assert_eq!(value.chars().count(), 2000);
    }
}
