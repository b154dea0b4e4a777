//! The consumer-loop handler: one `conversation.transcribed` in, one
//! `memories.extracted` out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use elaaoms_shared::bus::consumer::{error_chain, Delivery, Handler, HandlerError};
use elaaoms_shared::bus::{event_msg_id, Bus, Envelope, Step};
use elaaoms_shared::db;
use elaaoms_shared::domain::{ConversationStatus, ExtractedMemory, TransitionKind};
use elaaoms_shared::events::{ConversationTranscribed, MemoriesExtracted};
use elaaoms_shared::payload_store::{PayloadKind, PayloadStore};
use elaaoms_shared::telemetry;
use elaaoms_shared::trace::TraceParent;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::breaker::{Admission, CircuitBreakers};
use crate::llm::{self, LlmRun};
use crate::privacy::PrivacyPolicy;
use crate::profiles::{AgentProfiles, ProfileSettings};
use crate::prompt::{OpenIssue, PromptInput, PROMPT_VERSION};
use crate::provider::{Anthropic, CallError, OpenAi, Provider, RetryPolicy};
use crate::rules;
use crate::settings::{ExtractorSettings, LlmSettings};

/// Open issues given to the prompt, newest first.
const MAX_OPEN_ISSUES: i64 = 50;
/// Failed attempts remembered for failure files (per conversation, bounded).
const MAX_REMEMBERED_CONVERSATIONS: usize = 10_000;

struct Metrics {
    outcomes: IntCounterVec,
    seconds: HistogramVec,
    tokens: IntCounterVec,
    requests: IntCounterVec,
    retries: IntCounterVec,
    repairs: IntCounterVec,
    circuit_rejections: IntCounter,
    circuits_opened: IntCounter,
    duplicate_extractions: IntCounter,
    dlq_messages: IntGauge,
}

impl Metrics {
    fn new(registry: &Registry) -> Self {
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            telemetry::register(
                registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter = |name: &str, help: &str| {
            telemetry::register(registry, IntCounter::new(name, help).expect("valid metric"))
        };
        Self {
            outcomes: counter_vec("elaaoms_extractor_conversations_total", "Conversations extracted, by outcome", &["outcome"]),
            seconds: telemetry::register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("elaaoms_extractor_extraction_seconds", "Time to extract one conversation")
                        .buckets(vec![0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0]),
                    &["extractor"],
                )
                .expect("valid metric"),
            ),
            tokens: counter_vec("elaaoms_extractor_llm_tokens_total", "LLM tokens, by provider, model and direction", &["provider", "model", "kind"]),
            requests: counter_vec("elaaoms_extractor_llm_requests_total", "LLM HTTP requests, retries included", &["provider", "model"]),
            retries: counter_vec("elaaoms_extractor_llm_retries_total", "LLM requests retried after a transient failure", &["provider"]),
            repairs: counter_vec("elaaoms_extractor_llm_repairs_total", "Answers that failed validation and were sent back once", &["provider"]),
            circuit_rejections: counter(
                "elaaoms_extractor_circuit_rejections_total",
                "Messages delayed without calling the provider because the organization's circuit is open",
            ),
            circuits_opened: counter("elaaoms_extractor_circuits_opened_total", "Times an organization's circuit opened"),
            duplicate_extractions: counter(
                "elaaoms_extractor_duplicate_extractions_total",
                "LLM extractions of a conversation generation that had been extracted before (redeliveries)",
            ),
            dlq_messages: telemetry::register(
                registry,
                IntGauge::new("elaaoms_extractor_dlq_messages", "Messages in the dead-letter stream, as of the last dead letter")
                    .expect("valid metric"),
            ),
        }
    }
}

/// The organization's choice of extractor (`organizations.llm_*`).
#[derive(Debug, Clone, PartialEq)]
pub struct OrganizationLlm {
    pub provider: String,
    pub model: Option<String>,
    pub base_url: Option<String>,
}

/// What is read from Postgres before extracting.
struct Context {
    erased: bool,
    llm: OrganizationLlm,
    /// The conversation's current generation, when the row exists.
    generation: Option<i32>,
    open_issues: Vec<OpenIssue>,
    /// The organization's redaction classes for this caller.
    privacy: PrivacyPolicy,
}

/// Builds providers from the configuration and an organization's row (also
/// for `elaaoms eval`, so it measures exactly what the worker runs).
pub struct Providers {
    http: reqwest::Client,
    settings: LlmSettings,
}

/// The HTTP client for LLM providers and ElevenLabs: rustls with the ring
/// provider, a connect deadline (each request sets its own overall one).
pub fn provider_http_client() -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
}

impl Providers {
    pub fn new(http: reqwest::Client, settings: LlmSettings) -> Self {
        Self { http, settings }
    }

    /// How a call to any of these providers is retried.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.settings.retry_policy()
    }

    /// `None`: the offline rules extractor.
    pub fn for_organization(
        &self,
        llm: &OrganizationLlm,
    ) -> Result<Option<Box<dyn Provider>>, CallError> {
        let settings = &self.settings;
        let not_configured = |provider: &'static str, what: &str| CallError::Permanent {
            provider,
            reason: format!("not configured: {what} (set it and replay the dead letters)"),
        };
        let base_url = |default: &str| llm.base_url.clone().unwrap_or_else(|| default.to_owned());
        let provider: Box<dyn Provider> = match llm.provider.as_str() {
            "rules" => return Ok(None),
            "openai" => Box::new(OpenAi {
                name: "openai",
                http: self.http.clone(),
                base_url: base_url(&settings.openai_base_url),
                api_key: Some(
                    settings
                        .openai_api_key
                        .clone()
                        .ok_or_else(|| not_configured("openai", "OPENAI_API_KEY"))?,
                ),
                model: llm
                    .model
                    .clone()
                    .unwrap_or_else(|| settings.openai_model.clone()),
                timeout: settings.request_timeout,
            }),
            "anthropic" => Box::new(Anthropic {
                http: self.http.clone(),
                base_url: base_url(&settings.anthropic_base_url),
                api_key: settings
                    .anthropic_api_key
                    .clone()
                    .ok_or_else(|| not_configured("anthropic", "ANTHROPIC_API_KEY"))?,
                model: llm
                    .model
                    .clone()
                    .unwrap_or_else(|| settings.anthropic_model.clone()),
                max_tokens: settings.max_output_tokens,
                timeout: settings.request_timeout,
            }),
            "openai-compatible" => Box::new(OpenAi {
                name: "openai-compatible",
                http: self.http.clone(),
                base_url: llm
                    .base_url
                    .clone()
                    .or_else(|| settings.openai_compatible_base_url.clone())
                    .ok_or_else(|| {
                        not_configured(
                            "openai-compatible",
                            "the organization's llm_base_url or OPENAI_COMPATIBLE_BASE_URL",
                        )
                    })?,
                api_key: settings.openai_compatible_api_key.clone(),
                model: llm
                    .model
                    .clone()
                    .or_else(|| settings.openai_compatible_model.clone())
                    .ok_or_else(|| {
                        not_configured(
                            "openai-compatible",
                            "the organization's llm_model or OPENAI_COMPATIBLE_MODEL",
                        )
                    })?,
                timeout: settings.request_timeout,
            }),
            other => {
                return Err(CallError::Permanent {
                    provider: "unknown",
                    reason: format!("unknown llm_provider `{other}`"),
                })
            }
        };
        Ok(Some(provider))
    }
}

/// The failed attempts of one conversation generation on this replica, for
/// its failure file.
type AttemptKey = (Uuid, String, i32);

pub(crate) struct ExtractHandler {
    pool: PgPool,
    bus: Bus,
    payloads: PayloadStore,
    providers: Providers,
    retry_policy: RetryPolicy,
    breakers: CircuitBreakers,
    profiles: AgentProfiles,
    metrics: Metrics,
    attempts: Mutex<HashMap<AttemptKey, Vec<serde_json::Value>>>,
}

impl ExtractHandler {
    pub(crate) fn new(
        pool: PgPool,
        bus: Bus,
        payloads: PayloadStore,
        settings: &ExtractorSettings,
        registry: &Registry,
    ) -> Self {
        let http = provider_http_client().expect("an HTTP client with the ring provider");
        Self {
            pool,
            bus,
            payloads,
            retry_policy: settings.llm.retry_policy(),
            breakers: CircuitBreakers::new(
                settings.llm.breaker_threshold,
                settings.llm.breaker_cooldown,
            ),
            profiles: AgentProfiles::new(
                http.clone(),
                ProfileSettings {
                    api_key: settings.profiles.elevenlabs_api_key.clone(),
                    base_url: settings.profiles.elevenlabs_base_url.clone(),
                    ttl: Duration::from_secs(settings.profiles.ttl_hours.saturating_mul(3600)),
                    timeout: settings.profiles.timeout,
                },
            ),
            providers: Providers {
                http,
                settings: settings.llm.clone(),
            },
            metrics: Metrics::new(registry),
            attempts: Mutex::default(),
        }
    }

    fn decode(delivery: &Delivery) -> Result<Envelope<ConversationTranscribed>, HandlerError> {
        Envelope::decode(&delivery.payload).map_err(|err| HandlerError::permanent(&err))
    }

    /// One organization-scoped read of what the extraction needs.
    async fn context(
        &self,
        event: &Envelope<ConversationTranscribed>,
    ) -> Result<Context, HandlerError> {
        let transient = |err: sqlx::Error| HandlerError::transient(&err);
        let organization_id = event.organization_id;
        let transcript = &event.payload;
        let mut tx = db::begin_org_tx(&self.pool, organization_id)
            .await
            .map_err(transient)?;
        let erased = db::is_caller_erased(
            &mut tx,
            organization_id,
            &transcript.caller_id,
            Some(transcript.started_at),
        )
        .await
        .map_err(transient)?;
        let row: Option<(String, Option<String>, Option<String>, serde_json::Value)> = sqlx::query_as(
            "SELECT llm_provider, llm_model, llm_base_url, privacy_settings FROM organizations WHERE id = $1",
        )
        .bind(organization_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(transient)?;
        let Some((provider, model, base_url, privacy_settings)) = row else {
            return Err(HandlerError::Permanent(format!(
                "organization {organization_id} does not exist"
            )));
        };
        let generation: Option<i32> =
            sqlx::query_scalar("SELECT generation FROM conversations WHERE organization_id = $1 AND conversation_id = $2")
                .bind(organization_id)
                .bind(&transcript.conversation_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(transient)?;
        let open_issues = if provider == "rules" {
            Vec::new()
        } else {
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, content FROM memories
                  WHERE organization_id = $1 AND caller_id = $2 AND type = 'issue' AND status = 'open'
                  ORDER BY created_at DESC LIMIT $3",
            )
            .bind(organization_id)
            .bind(&transcript.caller_id)
            .bind(MAX_OPEN_ISSUES)
            .fetch_all(&mut *tx)
            .await
            .map_err(transient)?;
            rows.into_iter()
                .map(|(id, content)| OpenIssue { id, content })
                .collect()
        };
        tx.commit().await.map_err(transient)?;
        Ok(Context {
            erased,
            llm: OrganizationLlm {
                provider,
                model: model.filter(|model| !model.trim().is_empty()),
                base_url: base_url.filter(|url| !url.trim().is_empty()),
            },
            generation,
            open_issues,
            privacy: PrivacyPolicy::from_settings(&privacy_settings, transcript.caller_id.as_str()),
        })
    }

    /// Extracts with the organization's LLM; every outcome is counted and
    /// its tokens recorded.
    async fn extract_with_llm(
        &self,
        event: &Envelope<ConversationTranscribed>,
        delivery: &Delivery,
        provider: &dyn Provider,
        open_issues: &[OpenIssue],
    ) -> Result<(Vec<ExtractedMemory>, Vec<Uuid>), HandlerError> {
        let organization_id = event.organization_id;
        let transcript = &event.payload;
        if let Admission::Reject { retry_in } = self.breakers.admit(organization_id) {
            self.metrics.circuit_rejections.inc();
            self.metrics
                .outcomes
                .with_label_values(&["circuit_open"])
                .inc();
            let reason = format!(
                "{}: circuit open for organization {organization_id} after repeated provider failures; \
                 not calling it for another {} s",
                provider.name(),
                retry_in.as_secs()
            );
            self.remember_attempt(event, delivery, &reason, true, 0, &[]);
            return Err(HandlerError::Transient(reason));
        }
        let profile = self
            .profiles
            .get(&self.pool, organization_id, &transcript.agent_id)
            .await;
        let input = PromptInput {
            agent: profile.as_ref(),
            open_issues,
            turns: &transcript.turns,
        };
        let run = llm::extract(provider, &self.retry_policy, &input).await;
        self.record_usage(event, provider, &run).await;
        match &run.result {
            Err(err) if err.is_transient() => {
                if self.breakers.record_failure(organization_id) {
                    self.metrics.circuits_opened.inc();
                    tracing::error!(%organization_id, provider = provider.name(), "provider keeps failing: circuit open");
                }
            }
            _ => self.breakers.record_success(organization_id),
        }
        match &run.result {
            Ok(output) => Ok((output.memories.clone(), output.resolved_issue_ids.clone())),
            Err(err) => {
                let transient = err.is_transient();
                let reason = error_chain(err);
                self.remember_attempt(
                    event,
                    delivery,
                    &reason,
                    transient,
                    run.requests,
                    &run.retry_waits,
                );
                Err(if transient {
                    HandlerError::Transient(reason)
                } else {
                    HandlerError::Permanent(reason)
                })
            }
        }
    }

    /// Tokens in metrics and in `extraction_usage` (best effort: the
    /// extraction does not fail for its bookkeeping).
    async fn record_usage(
        &self,
        event: &Envelope<ConversationTranscribed>,
        provider: &dyn Provider,
        run: &LlmRun,
    ) {
        let (name, model) = (provider.name(), provider.model());
        let metrics = &self.metrics;
        metrics
            .tokens
            .with_label_values(&[name, model, "input"])
            .inc_by(run.usage.input);
        metrics
            .tokens
            .with_label_values(&[name, model, "output"])
            .inc_by(run.usage.output);
        metrics
            .requests
            .with_label_values(&[name, model])
            .inc_by(u64::from(run.requests));
        metrics
            .retries
            .with_label_values(&[name])
            .inc_by(run.retry_waits.len() as u64);
        if run.repaired {
            metrics.repairs.with_label_values(&[name]).inc();
        }
        let recorded: Result<bool, sqlx::Error> = async {
            let mut tx = db::begin_org_tx(&self.pool, event.organization_id).await?;
            // `xmax <> 0`: the row existed, so this generation was extracted before.
            let again: bool = sqlx::query_scalar(
                "INSERT INTO extraction_usage (organization_id, conversation_id, generation, provider, model,
                                               prompt_version, llm_calls, input_tokens, output_tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT (organization_id, conversation_id, generation) DO UPDATE
                    SET llm_calls = extraction_usage.llm_calls + EXCLUDED.llm_calls,
                        extractions = extraction_usage.extractions + 1,
                        input_tokens = extraction_usage.input_tokens + EXCLUDED.input_tokens,
                        output_tokens = extraction_usage.output_tokens + EXCLUDED.output_tokens,
                        provider = EXCLUDED.provider, model = EXCLUDED.model,
                        prompt_version = EXCLUDED.prompt_version, updated_at = now()
                 RETURNING xmax <> 0",
            )
            .bind(event.organization_id)
            .bind(&event.payload.conversation_id)
            .bind(event.generation)
            .bind(name)
            .bind(model)
            .bind(PROMPT_VERSION)
            .bind(i32::try_from(run.requests).unwrap_or(i32::MAX))
            .bind(i64::try_from(run.usage.input).unwrap_or(i64::MAX))
            .bind(i64::try_from(run.usage.output).unwrap_or(i64::MAX))
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(again)
        }
        .await;
        match recorded {
            Ok(true) => metrics.duplicate_extractions.inc(),
            Ok(false) => {}
            Err(err) => tracing::warn!(error = %err, "cannot record the extraction's token usage"),
        }
    }

    fn remember_attempt(
        &self,
        event: &Envelope<ConversationTranscribed>,
        delivery: &Delivery,
        reason: &str,
        transient: bool,
        requests: u32,
        retry_waits: &[Duration],
    ) {
        let key = (
            event.organization_id,
            event.payload.conversation_id.clone(),
            event.generation,
        );
        let mut attempts = self.attempts.lock().expect("attempts lock");
        if attempts.len() >= MAX_REMEMBERED_CONVERSATIONS && !attempts.contains_key(&key) {
            attempts.clear();
        }
        attempts.entry(key).or_default().push(json!({
            "delivery": delivery.attempt,
            "at": chrono::Utc::now(),
            "kind": if transient { "transient" } else { "permanent" },
            "error": reason,
            "llm_requests": requests,
            "retry_waits_ms": retry_waits.iter().map(|wait| wait.as_millis() as u64).collect::<Vec<_>>(),
        }));
    }

    async fn publish(
        &self,
        event: &Envelope<ConversationTranscribed>,
        trace: &TraceParent,
        extracted: MemoriesExtracted,
    ) -> Result<(), HandlerError> {
        let conversation_id = extracted.conversation_id.clone();
        let body = Envelope::new(event.organization_id, event.generation, extracted)
            .encode()
            .map_err(|err| HandlerError::permanent(&err))?;
        let msg_id = event_msg_id(
            event.organization_id,
            &conversation_id,
            Step::Extracted,
            event.generation,
        );
        self.bus
            .publish_traced(
                &self.bus.names.subject(Step::Extracted),
                &msg_id,
                event.organization_id,
                Some(trace),
                Bytes::from(body),
            )
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        Ok(())
    }

    /// A transcript too large for a JetStream message travels by reference
    /// to its stored payload: read the turns from there, so it is extracted
    /// like any other (never silently as empty).
    async fn resolve_payload_ref(
        &self,
        event: &mut Envelope<ConversationTranscribed>,
    ) -> Result<(), HandlerError> {
        if event.payload.payload_ref.is_none() || !event.payload.turns.is_empty() {
            return Ok(());
        }
        let body = self
            .payloads
            .get(&event.payload.conversation_id, PayloadKind::Transcription)
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        event.payload.turns = elaaoms_shared::transcript::turns_of_payload(&body)
            .map_err(|err| HandlerError::permanent(&err))?;
        Ok(())
    }

    async fn dlq_size(&self) -> Option<u64> {
        let mut stream = self
            .bus
            .jetstream
            .get_stream(self.bus.names.dlq_stream())
            .await
            .ok()?;
        Some(stream.info().await.ok()?.state.messages)
    }
}

impl Handler for ExtractHandler {
    async fn handle(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let mut event = Self::decode(delivery)?;
        // Before the transcript is read: an erased caller's payload file is
        // gone, and the event is dropped anyway.
        let context = self.context(&event).await?;
        if context.erased {
            self.metrics.outcomes.with_label_values(&["erased"]).inc();
            tracing::info!(
                conversation_id = event.payload.conversation_id,
                "caller erased: dropping transcript"
            );
            if let Err(err) = self.bus.delete_event(delivery.stream_sequence).await {
                tracing::warn!(error = %err, "cannot delete an erased caller's event; it goes at retention");
            }
            return Ok(());
        }
        self.resolve_payload_ref(&mut event).await?;
        // Redacted before any extractor reads it, so a provider never sees
        // what we would not store; the memories are redacted again below
        // (a model may reassemble what it was given in pieces).
        event.payload.turns = context.privacy.redact_turns(&event.payload.turns);
        let transcript = &event.payload;
        if context
            .generation
            .is_some_and(|current| current > event.generation)
        {
            // A replay superseded this generation; its own event follows.
            self.metrics
                .outcomes
                .with_label_values(&["superseded"])
                .inc();
            tracing::info!(
                conversation_id = transcript.conversation_id,
                generation = event.generation,
                "superseded generation: skipped"
            );
            return Ok(());
        }
        let started = Instant::now();
        let provider = self
            .providers
            .for_organization(&context.llm)
            .map_err(|err| HandlerError::permanent(&err))?;
        let (memories, resolved_issue_ids, extractor) = match &provider {
            None => (
                rules::extract_memories(&transcript.turns),
                Vec::new(),
                "rules".to_owned(),
            ),
            Some(provider) => {
                let (memories, resolved) = self
                    .extract_with_llm(&event, delivery, provider.as_ref(), &context.open_issues)
                    .await?;
                (
                    memories,
                    resolved,
                    format!("{}:{}", provider.name(), provider.model()),
                )
            }
        };
        let memories: Vec<ExtractedMemory> = memories
            .into_iter()
            .map(|memory| context.privacy.redact_memory(memory))
            .collect();
        let label = provider
            .as_ref()
            .map_or("rules", |provider| provider.name());
        self.metrics
            .seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            conversation_id = transcript.conversation_id,
            extractor,
            memories = memories.len(),
            resolved = resolved_issue_ids.len(),
            "extracted"
        );
        self.publish(
            &event,
            &delivery.trace,
            MemoriesExtracted {
                conversation_id: transcript.conversation_id.clone(),
                agent_id: transcript.agent_id.clone(),
                caller_id: transcript.caller_id.clone(),
                memories,
                resolved_issue_ids,
                extractor,
            },
        )
        .await?;
        self.metrics
            .outcomes
            .with_label_values(&["extracted"])
            .inc();
        Ok(())
    }

    /// The extraction failed for good: the conversation says so and a
    /// failure file keeps the error chain and the attempts next to the
    /// payload.
    async fn on_dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), HandlerError> {
        self.metrics
            .outcomes
            .with_label_values(&["dead_lettered"])
            .inc();
        if let Some(size) = self.dlq_size().await {
            self.metrics
                .dlq_messages
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        let Ok(event) = Self::decode(delivery) else {
            return Ok(()); // Garbage names no conversation to mark.
        };
        let conversation_id = &event.payload.conversation_id;
        let key = (
            event.organization_id,
            conversation_id.clone(),
            event.generation,
        );
        let attempt_log = self
            .attempts
            .lock()
            .expect("attempts lock")
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let failure = json!({
            "kind": "extraction",
            "organization_id": event.organization_id,
            "conversation_id": conversation_id,
            "generation": event.generation,
            "reason": reason,
            // Outermost first, as `error_chain` joined it.
            "error_chain": reason.split(": ").collect::<Vec<_>>(),
            "attempts": delivery.attempt,
            "attempt_log": attempt_log,
            "prompt_version": PROMPT_VERSION,
            "failed_at": chrono::Utc::now(),
        });
        self.payloads
            .put(
                conversation_id,
                PayloadKind::Failure,
                failure.to_string().into_bytes(),
            )
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        let mut tx = db::begin_org_tx(&self.pool, event.organization_id)
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        db::transition_conversation(
            &mut tx,
            event.organization_id,
            conversation_id,
            ConversationStatus::ExtractionFailed,
            TransitionKind::Normal,
        )
        .await
        .map_err(|err| HandlerError::transient(&err))?;
        tx.commit()
            .await
            .map_err(|err| HandlerError::transient(&err))?;
        self.attempts.lock().expect("attempts lock").remove(&key);
        Ok(())
    }
}
