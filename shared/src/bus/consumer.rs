//! The one consumer loop every worker runs (DESIGN.md section 4).
//!
//! Pull in batches, bounded concurrency, a per-organization in-flight limit.
//! The delivery count is read before the handler runs: the server's
//! `max_deliver` is unlimited and this loop's budget decides, because a
//! server that gives up on a message drops it without a trace. Outcomes:
//!
//! * `Ok`: the handler has published what comes next; double-ack.
//! * `Transient`: nak with the next delay of the schedule; on the last
//!   allowed delivery, the dead-letter path instead.
//! * `Permanent`: the dead-letter path at once.
//! * dead-letter path: publish the original bytes to the DLQ stream with the
//!   reason in headers and `Nats-Msg-Id = dlq:{stream}:{seq}` (a crash before
//!   the term cannot make a second entry), await the PubAck, let the handler
//!   record the failure, then term with a double ack.
//!
//! A handler runs in its own task: a panic is a transient failure, not a
//! lost message. While it runs, the loop reports progress every third of the
//! ack wait so a slow handler is not redelivered under its feet.

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
use uuid::Uuid;

use super::{
    Bus, BusError, Step, DLQ_ATTEMPTS_HEADER, DLQ_ORIGINAL_SEQUENCE_HEADER,
    DLQ_ORIGINAL_SUBJECT_HEADER, DLQ_REASON_HEADER, DLQ_SERVICE_HEADER, ORGANIZATION_HEADER,
};
use crate::config::WorkerConfig;

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
        let index = (attempt.saturating_sub(1) as usize).min(self.retry_delays.len().saturating_sub(1));
        self.retry_delays.get(index).copied().unwrap_or(Duration::from_secs(60))
    }
}

/// Far above any worker's concurrency: the server stops delivering when a
/// consumer has this many unacknowledged messages.
const MAX_ACK_PENDING: i64 = 10_000;

/// Creates the worker's durable pull consumer (idempotent).
async fn ensure_consumer(bus: &Bus, settings: &ConsumerSettings) -> Result<jetstream::consumer::Consumer<pull::Config>, BusError> {
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
#[derive(Clone)]
struct OrganizationLimits {
    per_organization: usize,
    slots: Arc<Mutex<HashMap<Option<Uuid>, Arc<Semaphore>>>>,
}

impl OrganizationLimits {
    fn new(per_organization: usize) -> Self {
        Self {
            per_organization,
            slots: Arc::default(),
        }
    }

    async fn acquire(&self, organization_id: Option<Uuid>) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut slots = self.slots.lock().expect("organization limits lock");
            // Forget idle organizations so the map does not grow forever.
            if slots.len() > 10_000 {
                slots.retain(|_, s| s.available_permits() < self.per_organization);
            }
            slots
                .entry(organization_id)
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_organization)))
                .clone()
        };
        semaphore.acquire_owned().await.expect("semaphore never closed")
    }
}

/// Runs until `shutdown` fires, then stops pulling, finishes the messages in
/// flight and returns.
pub async fn run_consumer<H: Handler>(
    bus: Bus,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let consumer = ensure_consumer(&bus, &settings).await?;
    let settings = Arc::new(settings);
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let organization_limits = OrganizationLimits::new(settings.per_organization_concurrency);
    let mut in_flight = JoinSet::new();
    tracing::info!(service = settings.service, subject = bus.names.subject(settings.step), "consumer started");

    'pull: loop {
        while in_flight.try_join_next().is_some() {}
        let first_slot = tokio::select! {
            _ = shutdown.cancelled() => break 'pull,
            slot = slots.clone().acquire_owned() => slot.expect("semaphore never closed"),
        };
        let wanted = 1 + slots.available_permits();
        let batch = consumer
            .batch()
            .max_messages(wanted)
            .expires(settings.pull_expiry)
            .messages()
            .await;
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(err) => {
                tracing::warn!(error = %err, "pull request failed; retrying");
                drop(first_slot);
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                }
            }
        };
        let mut first_slot = Some(first_slot);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                next = batch.next() => next,
            };
            let message = match next {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "pull batch ended with an error");
                    break;
                }
            };
            let slot = match first_slot.take() {
                Some(slot) => slot,
                None => slots.clone().acquire_owned().await.expect("semaphore never closed"),
            };
            in_flight.spawn(process_message(
                bus.clone(),
                settings.clone(),
                handler.clone(),
                organization_limits.clone(),
                message,
                slot,
            ));
        }
    }

    tracing::info!(service = settings.service, in_flight = in_flight.len(), "consumer stopping: finishing messages in flight");
    while in_flight.join_next().await.is_some() {}
    tracing::info!(service = settings.service, "consumer stopped");
    Ok(())
}

fn delivery_of(message: &jetstream::Message) -> Delivery {
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
    }
}

async fn process_message<H: Handler>(
    bus: Bus,
    settings: Arc<ConsumerSettings>,
    handler: Arc<H>,
    organization_limits: OrganizationLimits,
    message: jetstream::Message,
    _slot: OwnedSemaphorePermit,
) {
    let delivery = Arc::new(delivery_of(&message));
    let progress = spawn_progress_reports(message.clone(), settings.ack_wait);
    let _organization_slot = organization_limits.acquire(delivery.organization_id).await;

    let outcome = if delivery.attempt > settings.max_attempts {
        Err(HandlerError::Permanent(format!(
            "delivered {} times, over the budget of {} (a worker crashed or timed out on it)",
            delivery.attempt, settings.max_attempts
        )))
    } else {
        run_handler(handler.clone(), delivery.clone()).await
    };

    let span = tracing::info_span!(
        "message",
        service = settings.service,
        subject = delivery.subject,
        seq = delivery.stream_sequence,
        attempt = delivery.attempt
    );
    let _entered = span.enter();
    let acked = match outcome {
        Ok(()) => message.double_ack().await.map_err(|err| err.to_string()),
        Err(HandlerError::Transient(reason)) if delivery.attempt < settings.max_attempts => {
            let delay = settings.retry_delay(delivery.attempt);
            tracing::warn!(reason, delay_ms = delay.as_millis() as u64, "transient failure: retrying later");
            message
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|err| err.to_string())
        }
        Err(HandlerError::Transient(reason) | HandlerError::Permanent(reason)) => {
            tracing::error!(reason, "giving up: dead-lettering the message");
            dead_letter(&bus, &settings, handler.as_ref(), &delivery, &message, &reason).await
        }
    };
    progress.abort();
    if let Err(err) = acked {
        // The message comes back after the ack wait; handlers are idempotent.
        tracing::warn!(error = err, "could not settle the message; it will be redelivered");
    }
}

/// Runs the handler in its own task so that a panic is a failure of this
/// message rather than of the worker.
async fn run_handler<H: Handler>(handler: Arc<H>, delivery: Arc<Delivery>) -> Result<(), HandlerError> {
    let task = tokio::spawn(async move { handler.handle(&delivery).await });
    match task.await {
        Ok(result) => result,
        Err(join_error) => Err(HandlerError::Transient(format!("handler panicked: {join_error}"))),
    }
}

fn spawn_progress_reports(message: jetstream::Message, ack_wait: Duration) -> tokio::task::JoinHandle<()> {
    let every = (ack_wait / 3).max(Duration::from_millis(100));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(err) = message.ack_with(AckKind::Progress).await {
                tracing::debug!(error = %err, "progress report failed");
            }
        }
    })
}

/// Header values cannot hold line breaks; reasons can be long.
fn header_safe(text: &str) -> String {
    let single_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    single_line.chars().take(2000).collect()
}

async fn dead_letter<H: Handler>(
    bus: &Bus,
    settings: &ConsumerSettings,
    handler: &H,
    delivery: &Delivery,
    message: &jetstream::Message,
    reason: &str,
) -> Result<(), String> {
    let mut headers = delivery.headers.clone().unwrap_or_default();
    headers.insert(DLQ_REASON_HEADER, header_safe(reason).as_str());
    headers.insert(DLQ_ATTEMPTS_HEADER, delivery.attempt.to_string().as_str());
    headers.insert(DLQ_SERVICE_HEADER, settings.service.as_str());
    headers.insert(DLQ_ORIGINAL_SUBJECT_HEADER, delivery.subject.as_str());
    headers.insert(DLQ_ORIGINAL_SEQUENCE_HEADER, delivery.stream_sequence.to_string().as_str());
    let msg_id = format!("dlq:{}:{}", bus.names.event_stream(), delivery.stream_sequence);
    let retry_later = |why: String| {
        let delay = settings.retry_delay(1);
        async move {
            tracing::warn!(why, "dead-letter path failed; retrying it later");
            message
                .ack_with(AckKind::Nak(Some(delay)))
                .await
                .map_err(|err| err.to_string())
        }
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
        return retry_later(err.to_string()).await;
    }
    if let Err(err) = handler.on_dead_letter(delivery, reason).await {
        return retry_later(err.to_string()).await;
    }
    message
        .double_ack_with(AckKind::Term)
        .await
        .map_err(|err| err.to_string())
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
            retry_delays: vec![Duration::from_secs(60), Duration::from_secs(300), Duration::from_secs(1800)],
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
