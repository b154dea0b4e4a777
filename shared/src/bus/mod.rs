//! The message bus: stream names and setup, the event envelope, publishing
//! with a message id, and (in `consumer`) the one consumer loop every
//! worker uses.

pub mod consumer;

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::config::BusConfig;
use crate::trace::{TraceParent, TRACEPARENT_HEADER};

/// Header carrying the organization of every event, so the consumer loop can
/// apply per-organization limits before decoding the body.
pub const ORGANIZATION_HEADER: &str = "Elaaoms-Organization-Id";
pub const DLQ_REASON_HEADER: &str = "Elaaoms-Dlq-Reason";
pub const DLQ_ATTEMPTS_HEADER: &str = "Elaaoms-Dlq-Attempts";
pub const DLQ_SERVICE_HEADER: &str = "Elaaoms-Dlq-Service";
pub const DLQ_ORIGINAL_SUBJECT_HEADER: &str = "Elaaoms-Dlq-Original-Subject";
pub const DLQ_ORIGINAL_SEQUENCE_HEADER: &str = "Elaaoms-Dlq-Original-Sequence";

/// How long JetStream remembers message ids: longer than ElevenLabs' retry
/// schedule (about 40 minutes), so a retried webhook is dropped.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);
/// The event stream is a queue, not an archive: the payload store and
/// Postgres keep what matters.
pub const EVENT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("cannot set up stream {stream}: {source}")]
    StreamSetup {
        stream: String,
        #[source]
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error(
        "cannot keep {replicas} replicas of stream {stream}: {reason}; \
         set NATS_STREAM_REPLICAS=1 for a single NATS server (at most the \
         cluster's size otherwise)"
    )]
    StreamReplicas {
        stream: String,
        replicas: usize,
        reason: String,
    },
    #[error("cannot publish to {subject}: {reason}")]
    Publish { subject: String, reason: String },
    #[error("JetStream consumer {consumer}: {reason}")]
    Consumer { consumer: String, reason: String },
    #[error("cannot encode event: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("cannot decode event: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// The steps of the pipeline; each has a subject and appears in message ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Transcribed,
    Extracted,
    Indexed,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Transcribed => "transcribed",
            Step::Extracted => "extracted",
            Step::Indexed => "indexed",
        }
    }

    fn subject_suffix(self) -> &'static str {
        match self {
            Step::Transcribed => "conversation.transcribed",
            Step::Extracted => "memories.extracted",
            Step::Indexed => "memories.indexed",
        }
    }
}

/// Stream names and subjects. A namespace (empty in production) lets tests
/// and several deployments share one NATS server without touching each
/// other's streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusNames {
    namespace: String,
}

impl BusNames {
    pub fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn name_prefix(&self) -> String {
        if self.namespace.is_empty() {
            String::new()
        } else {
            format!("{}_", self.namespace.to_uppercase())
        }
    }

    fn subject_prefix(&self) -> String {
        if self.namespace.is_empty() {
            "elaaoms".to_owned()
        } else {
            format!("{}.elaaoms", self.namespace)
        }
    }

    /// `ELAAOMS`: the pipeline's events.
    pub fn event_stream(&self) -> String {
        format!("{}ELAAOMS", self.name_prefix())
    }

    /// `ELAAOMS_DLQ`: messages that failed for good, kept until replayed.
    pub fn dlq_stream(&self) -> String {
        format!("{}ELAAOMS_DLQ", self.name_prefix())
    }

    /// `elaaoms.v1.conversation.transcribed` and its siblings.
    pub fn subject(&self, step: Step) -> String {
        format!("{}.v1.{}", self.subject_prefix(), step.subject_suffix())
    }

    fn event_subjects(&self) -> String {
        format!("{}.v1.>", self.subject_prefix())
    }

    fn dlq_subjects(&self) -> String {
        format!("{}.dlq.>", self.subject_prefix())
    }

    /// Where a failed message goes: `elaaoms.dlq.conversation.transcribed`.
    pub fn dlq_subject_for(&self, original_subject: &str) -> String {
        let prefix = format!("{}.v1.", self.subject_prefix());
        let suffix = original_subject
            .strip_prefix(&prefix)
            .unwrap_or(original_subject);
        format!("{}.dlq.{suffix}", self.subject_prefix())
    }

    /// A durable consumer name, unique per stream.
    pub fn consumer(&self, service: &str) -> String {
        format!("{}{service}", self.name_prefix())
    }
}

/// `{org}:{conversation}:{step}:{generation}`: a retried webhook or a
/// republish after a crash is dropped by JetStream; a replay, which bumps the
/// generation, is not.
pub fn event_msg_id(
    organization_id: Uuid,
    conversation_id: &str,
    step: Step,
    generation: i32,
) -> String {
    format!(
        "{organization_id}:{conversation_id}:{}:{generation}",
        step.as_str()
    )
}

/// Every event body: MessagePack with named fields, so fields can be added
/// without breaking older readers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub organization_id: Uuid,
    pub generation: i32,
    pub payload: T,
}

impl<T: Serialize + DeserializeOwned> Envelope<T> {
    pub fn new(organization_id: Uuid, generation: i32, payload: T) -> Self {
        Self {
            id: Uuid::new_v4(),
            occurred_at: Utc::now(),
            organization_id,
            generation,
            payload,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, BusError> {
        Ok(rmp_serde::to_vec_named(self)?)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, BusError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// A connected JetStream context plus the names it works with.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub names: BusNames,
    stream_max_bytes: i64,
    stream_replicas: usize,
}

/// Deadline for a PubAck: short, because the webhook path waits for it and
/// the outbox relay covers a slow or absent JetStream.
pub const PUBLISH_ACK_TIMEOUT: Duration = Duration::from_secs(5);

impl Bus {
    pub async fn connect(config: &BusConfig) -> Result<Self, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("elaaoms")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(&config.nats_url)
            .await
            .map_err(|source| BusError::Connect {
                url: config.nats_url.clone(),
                source,
            })?;
        let jetstream = jetstream::ContextBuilder::new()
            .ack_timeout(PUBLISH_ACK_TIMEOUT)
            .build(client.clone());
        Ok(Self {
            client,
            jetstream,
            names: BusNames::new(&config.bus_namespace),
            stream_max_bytes: config.stream_max_bytes,
            stream_replicas: usize::from(config.nats_stream_replicas),
        })
    }

    /// Creates both streams, or updates them to the current settings
    /// (replica count included: a NATS cluster copies the data to new peers
    /// in the background): safe to run from every replica at every start.
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let events = stream::Config {
            name: self.names.event_stream(),
            description: Some("ELAAOMS pipeline events".to_owned()),
            subjects: vec![self.names.event_subjects()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: EVENT_MAX_AGE,
            max_bytes: self.stream_max_bytes,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.stream_replicas,
            ..Default::default()
        };
        // Dead letters wait for an operator: no age limit, and when full the
        // publish fails (the worker retries) rather than dropping old ones.
        let dead_letters = stream::Config {
            name: self.names.dlq_stream(),
            description: Some("ELAAOMS dead letters, kept until replayed or purged".to_owned()),
            subjects: vec![self.names.dlq_subjects()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_bytes: self.stream_max_bytes,
            discard: stream::DiscardPolicy::New,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.stream_replicas,
            ..Default::default()
        };
        for config in [events, dead_letters] {
            let name = config.name.clone();
            // A missing stream is created below (and any other error
            // shows there too).
            if let Ok(existing) = self.jetstream.get_stream(&name).await {
                let current = existing.cached_info().config.num_replicas;
                if current != self.stream_replicas {
                    self.check_replicas_supported(&name)?;
                    tracing::info!(
                        stream = name,
                        from = current,
                        to = self.stream_replicas,
                        "changing the stream's replica count (NATS_STREAM_REPLICAS)"
                    );
                }
            }
            self.jetstream
                .create_or_update_stream(config)
                .await
                .map_err(|source| self.stream_setup_error(name, source))?;
        }
        Ok(())
    }

    /// A standalone server refuses more than one replica when a stream is
    /// created (see [`Bus::stream_setup_error`]) but accepts it silently in
    /// an update (nats-server 2.9), keeping one copy. Its INFO names a
    /// cluster only when it is in one.
    fn check_replicas_supported(&self, stream: &str) -> Result<(), BusError> {
        if self.stream_replicas > 1 && self.client.server_info().cluster.is_none() {
            return Err(BusError::StreamReplicas {
                stream: stream.to_owned(),
                replicas: self.stream_replicas,
                reason: "the NATS server is not part of a cluster".to_owned(),
            });
        }
        Ok(())
    }

    fn stream_setup_error(
        &self,
        stream: String,
        source: async_nats::jetstream::context::CreateStreamError,
    ) -> BusError {
        use async_nats::jetstream::context::CreateStreamErrorKind;
        if let CreateStreamErrorKind::JetStream(js) = source.kind() {
            // 10074: "replicas > 1 not supported in non-clustered mode".
            if js.error_code() == jetstream::ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED {
                return BusError::StreamReplicas {
                    stream,
                    replicas: self.stream_replicas,
                    reason: js.to_string(),
                };
            }
        }
        BusError::StreamSetup { stream, source }
    }

    /// Publishes and waits for the PubAck; a duplicate (same message id
    /// within the window) is success. Returns the stream sequence.
    pub async fn publish(
        &self,
        subject: &str,
        msg_id: &str,
        organization_id: Uuid,
        body: Bytes,
    ) -> Result<u64, BusError> {
        self.publish_traced(subject, msg_id, organization_id, None, body)
            .await
    }

    /// [`Bus::publish`] with the W3C `traceparent` header of the trace the
    /// event belongs to, so consumers log and publish within it.
    pub async fn publish_traced(
        &self,
        subject: &str,
        msg_id: &str,
        organization_id: Uuid,
        trace: Option<&TraceParent>,
        body: Bytes,
    ) -> Result<u64, BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(ORGANIZATION_HEADER, organization_id.to_string().as_str());
        if let Some(trace) = trace {
            headers.insert(TRACEPARENT_HEADER, trace.to_string().as_str());
        }
        self.publish_with_headers(subject, msg_id, headers, body)
            .await
    }

    pub async fn publish_with_headers(
        &self,
        subject: &str,
        msg_id: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<u64, BusError> {
        let publish_error = |reason: String| BusError::Publish {
            subject: subject.to_owned(),
            reason,
        };
        let publish = PublishMessage::build()
            .headers(headers)
            .message_id(msg_id)
            .payload(body);
        let ack_future = self
            .jetstream
            .send_publish(subject.to_owned(), publish)
            .await
            .map_err(|err| publish_error(err.to_string()))?;
        let ack = tokio::time::timeout(PUBLISH_ACK_TIMEOUT, ack_future)
            .await
            .map_err(|_| publish_error("no PubAck before the deadline".to_owned()))?
            .map_err(|err| publish_error(err.to_string()))?;
        Ok(ack.sequence)
    }

    /// Deletes one message of the event stream by sequence. Workers call it
    /// for an event of an erased caller they drop: erasure sweeps the
    /// streams once, and this removes what was published after the sweep
    /// (an extraction in flight) instead of leaving it until retention.
    /// A message that is already gone is not an error.
    pub async fn delete_event(&self, sequence: u64) -> Result<(), BusError> {
        let consumer_error = |reason: String| BusError::Consumer {
            consumer: format!("{} delete", self.names.event_stream()),
            reason,
        };
        let handle = self
            .jetstream
            .get_stream(self.names.event_stream())
            .await
            .map_err(|err| consumer_error(err.to_string()))?;
        delete_sequence(&handle, sequence)
            .await
            .map(|_| ())
            .map_err(|err| consumer_error(format!("sequence {sequence}: {err}")))
    }

    /// Deletes every message of `stream` for which `matches(headers,
    /// payload)` is true, and returns how many it deleted (0 when the stream
    /// does not exist). For erasure, not for the hot path: it reads the
    /// whole stream once through a short-lived ephemeral consumer (no acks,
    /// in memory) up to the last sequence at the start, then deletes by
    /// sequence, so its cost grows with the stream's size, not the match
    /// count. Messages published after the scan started are not seen.
    pub async fn purge_matching<F>(&self, stream: &str, mut matches: F) -> Result<u64, BusError>
    where
        F: FnMut(Option<&HeaderMap>, &[u8]) -> bool,
    {
        use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
        use async_nats::jetstream::context::GetStreamErrorKind;
        use futures::StreamExt;

        let consumer_error = |reason: String| BusError::Consumer {
            consumer: format!("{stream} purge scan"),
            reason,
        };
        let handle = match self.jetstream.get_stream(stream).await {
            Ok(handle) => handle,
            Err(err) => {
                if let GetStreamErrorKind::JetStream(js) = err.kind() {
                    if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND {
                        return Ok(0);
                    }
                }
                return Err(consumer_error(err.to_string()));
            }
        };
        let state = handle
            .get_info()
            .await
            .map_err(|err| consumer_error(err.to_string()))?
            .state;
        if state.messages == 0 {
            return Ok(0);
        }
        let last = state.last_sequence;
        let consumer = handle
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|err| consumer_error(err.to_string()))?;
        let consumer_name = consumer.cached_info().name.clone();

        let mut doomed = Vec::new();
        let scanned: Result<(), BusError> = async {
            let mut seen = 0;
            while seen < last {
                let mut batch = consumer
                    .batch()
                    .max_messages(500)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|err| consumer_error(err.to_string()))?;
                let mut received = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|err| consumer_error(err.to_string()))?;
                    received += 1;
                    let sequence = message
                        .info()
                        .map_err(|err| consumer_error(err.to_string()))?
                        .stream_sequence;
                    seen = seen.max(sequence);
                    if sequence <= last && matches(message.headers.as_ref(), &message.payload) {
                        doomed.push(sequence);
                    }
                }
                // An empty batch: nothing more up to `last` (deleted or aged out).
                if received == 0 {
                    break;
                }
            }
            Ok(())
        }
        .await;
        let _ = handle.delete_consumer(&consumer_name).await;
        scanned?;

        let mut deleted = 0;
        for sequence in doomed {
            let gone = delete_sequence(&handle, sequence)
                .await
                .map_err(|err| consumer_error(format!("deleting sequence {sequence}: {err}")))?;
            deleted += u64::from(gone);
        }
        Ok(deleted)
    }

    /// Whether the connection to NATS is up, for readiness probes.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// Deletes one message by sequence: `true` when this call deleted it,
/// `false` when it was already gone (deleted or aged out meanwhile).
async fn delete_sequence(
    handle: &stream::Stream,
    sequence: u64,
) -> Result<bool, stream::DeleteMessageError> {
    match handle.delete_message(sequence).await {
        Ok(deleted) => Ok(deleted),
        Err(err)
            if matches!(err.kind(), stream::DeleteMessageErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::NO_MESSAGE_FOUND) =>
        {
            Ok(false)
        }
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct PayloadV1 {
        conversation_id: String,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct PayloadV2 {
        conversation_id: String,
        added_later: Vec<String>,
    }

    #[test]
    fn envelope_round_trips_and_tolerates_unknown_fields() {
        let organization_id = Uuid::new_v4();
        let newer = Envelope::new(
            organization_id,
            3,
            PayloadV2 {
                conversation_id: "conv_1".into(),
                added_later: vec!["x".into()],
            },
        );
        let bytes = newer.encode().unwrap();
        let older: Envelope<PayloadV1> = Envelope::decode(&bytes).unwrap();
        assert_eq!(older.payload.conversation_id, "conv_1");
        assert_eq!(older.generation, 3);
        assert_eq!(older.organization_id, organization_id);
        assert_eq!(older.id, newer.id);
        assert!(Envelope::<PayloadV1>::decode(b"\xc1garbage").is_err());
    }

    #[test]
    fn names_are_namespaced_and_do_not_overlap() {
        let production = BusNames::new("");
        assert_eq!(production.event_stream(), "ELAAOMS");
        assert_eq!(production.dlq_stream(), "ELAAOMS_DLQ");
        assert_eq!(
            production.subject(Step::Transcribed),
            "elaaoms.v1.conversation.transcribed"
        );
        assert_eq!(
            production.dlq_subject_for("elaaoms.v1.conversation.transcribed"),
            "elaaoms.dlq.conversation.transcribed"
        );
        let test = BusNames::new("t1a");
        assert_eq!(test.event_stream(), "T1A_ELAAOMS");
        assert_eq!(
            test.subject(Step::Indexed),
            "t1a.elaaoms.v1.memories.indexed"
        );
    }

    #[test]
    fn msg_id_carries_organization_conversation_step_and_generation() {
        let organization_id = Uuid::nil();
        assert_eq!(
            event_msg_id(organization_id, "conv_1", Step::Extracted, 2),
            "00000000-0000-0000-0000-000000000000:conv_1:extracted:2"
        );
    }
}
