//! The extractor's own settings: providers, retries, circuit breaker and
//! agent profiles. Keys are `SecretString`s and only ever come from the
//! configuration; which provider and model an organization uses comes from
//! its `organizations` row.

use std::net::SocketAddr;
use std::time::Duration;

use elaaoms_shared::config::{parse_duration, parse_secret};
use secrecy::SecretString;

use crate::provider::RetryPolicy;

/// What only the extractor needs.
#[derive(clap::Args, Debug, Clone)]
pub struct ExtractorSettings {
    /// Address of the extractor's /healthz, /readyz and /metrics.
    #[arg(
        id = "extractor_health_addr",
        long = "extractor-health-addr",
        env = "EXTRACTOR_HEALTH_ADDR",
        default_value = "127.0.0.1:9091"
    )]
    pub health_addr: SocketAddr,
    #[command(flatten)]
    pub llm: LlmSettings,
    #[command(flatten)]
    pub profiles: AgentProfileSettings,
}

impl Default for ExtractorSettings {
    fn default() -> Self {
        Self {
            health_addr: "127.0.0.1:9091".parse().expect("valid address"),
            llm: LlmSettings::default(),
            profiles: AgentProfileSettings::default(),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct LlmSettings {
    /// OpenAI API key, for organizations whose llm_provider is `openai`.
    #[arg(id = "openai_api_key", long = "openai-api-key", env = "OPENAI_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub openai_api_key: Option<SecretString>,
    /// OpenAI API base URL (up to /v1); an organization's llm_base_url wins.
    #[arg(
        id = "openai_base_url",
        long = "openai-base-url",
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,
    /// Model for OpenAI organizations without an llm_model.
    #[arg(
        id = "openai_model",
        long = "openai-model",
        env = "OPENAI_MODEL",
        default_value = "gpt-4o-mini"
    )]
    pub openai_model: String,

    /// Anthropic API key, for organizations whose llm_provider is `anthropic`.
    #[arg(id = "anthropic_api_key", long = "anthropic-api-key", env = "ANTHROPIC_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub anthropic_api_key: Option<SecretString>,
    /// Anthropic API base URL (without /v1); an organization's llm_base_url wins.
    #[arg(
        id = "anthropic_base_url",
        long = "anthropic-base-url",
        env = "ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,
    /// Model for Anthropic organizations without an llm_model.
    #[arg(
        id = "anthropic_model",
        long = "anthropic-model",
        env = "ANTHROPIC_MODEL",
        default_value = "claude-3-5-haiku-latest"
    )]
    pub anthropic_model: String,

    /// Bearer key for `openai-compatible` servers, when they want one.
    #[arg(id = "openai_compatible_api_key", long = "openai-compatible-api-key", env = "OPENAI_COMPATIBLE_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub openai_compatible_api_key: Option<SecretString>,
    /// Base URL (up to /v1) for `openai-compatible` organizations without an llm_base_url.
    #[arg(
        id = "openai_compatible_base_url",
        long = "openai-compatible-base-url",
        env = "OPENAI_COMPATIBLE_BASE_URL"
    )]
    pub openai_compatible_base_url: Option<String>,
    /// Model for `openai-compatible` organizations without an llm_model.
    #[arg(
        id = "openai_compatible_model",
        long = "openai-compatible-model",
        env = "OPENAI_COMPATIBLE_MODEL"
    )]
    pub openai_compatible_model: Option<String>,

    /// Deadline of one HTTP request to a provider.
    #[arg(id = "llm_request_timeout", long = "llm-request-timeout", env = "LLM_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Retries of one call (429, 5xx, timeouts) before the message is nak'ed.
    #[arg(
        id = "llm_max_retries",
        long = "llm-max-retries",
        env = "LLM_MAX_RETRIES",
        default_value_t = 3
    )]
    pub max_retries: usize,
    /// First backoff delay (jittered, doubling).
    #[arg(id = "llm_retry_min_delay", long = "llm-retry-min-delay", env = "LLM_RETRY_MIN_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub retry_min_delay: Duration,
    #[arg(id = "llm_retry_max_delay", long = "llm-retry-max-delay", env = "LLM_RETRY_MAX_DELAY", default_value = "20s", value_parser = parse_duration)]
    pub retry_max_delay: Duration,
    /// A provider's Retry-After is honoured up to this.
    #[arg(id = "llm_max_retry_after", long = "llm-max-retry-after", env = "LLM_MAX_RETRY_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub max_retry_after: Duration,
    /// One call with all its retries, within one delivery of the message.
    #[arg(id = "llm_attempt_budget", long = "llm-attempt-budget", env = "LLM_ATTEMPT_BUDGET", default_value = "3m", value_parser = parse_duration)]
    pub attempt_budget: Duration,
    /// max_tokens of an Anthropic answer.
    #[arg(
        id = "llm_max_output_tokens",
        long = "llm-max-output-tokens",
        env = "LLM_MAX_OUTPUT_TOKENS",
        default_value_t = 4096
    )]
    pub max_output_tokens: u32,
    /// Consecutive transient provider failures that open an organization's circuit.
    #[arg(
        id = "llm_breaker_threshold",
        long = "llm-breaker-threshold",
        env = "LLM_BREAKER_THRESHOLD",
        default_value_t = 5
    )]
    pub breaker_threshold: u32,
    /// How long an open circuit delays an organization's messages without calling its provider.
    #[arg(id = "llm_breaker_cooldown", long = "llm-breaker-cooldown", env = "LLM_BREAKER_COOLDOWN", default_value = "60s", value_parser = parse_duration)]
    pub breaker_cooldown: Duration,
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            openai_api_key: None,
            openai_base_url: "https://api.openai.com/v1".to_owned(),
            openai_model: "gpt-4o-mini".to_owned(),
            anthropic_api_key: None,
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            anthropic_model: "claude-3-5-haiku-latest".to_owned(),
            openai_compatible_api_key: None,
            openai_compatible_base_url: None,
            openai_compatible_model: None,
            request_timeout: Duration::from_secs(60),
            max_retries: 3,
            retry_min_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(30),
            attempt_budget: Duration::from_secs(180),
            max_output_tokens: 4096,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(60),
        }
    }
}

impl LlmSettings {
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_retries: self.max_retries,
            min_delay: self.retry_min_delay,
            max_delay: self.retry_max_delay.max(self.retry_min_delay),
            max_retry_after: self.max_retry_after,
            budget: self.attempt_budget,
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct AgentProfileSettings {
    /// ElevenLabs API key for agent profiles; without it no profile is fetched.
    #[arg(id = "elevenlabs_api_key", long = "elevenlabs-api-key", env = "ELEVENLABS_API_KEY", value_parser = parse_secret, hide_env_values = true)]
    pub elevenlabs_api_key: Option<SecretString>,
    #[arg(
        id = "elevenlabs_base_url",
        long = "elevenlabs-base-url",
        env = "ELEVENLABS_BASE_URL",
        default_value = "https://api.elevenlabs.io"
    )]
    pub elevenlabs_base_url: String,
    /// How long a fetched agent profile is used before it is fetched again.
    #[arg(
        id = "agent_profile_ttl_hours",
        long = "agent-profile-ttl-hours",
        env = "AGENT_PROFILE_TTL_HOURS",
        default_value_t = 24
    )]
    pub ttl_hours: u64,
    /// Deadline of one profile fetch; a slow ElevenLabs must not slow extraction much.
    #[arg(id = "agent_profile_timeout", long = "agent-profile-timeout", env = "AGENT_PROFILE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl Default for AgentProfileSettings {
    fn default() -> Self {
        Self {
            elevenlabs_api_key: None,
            elevenlabs_base_url: "https://api.elevenlabs.io".to_owned(),
            ttl_hours: 24,
            timeout: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: ExtractorSettings,
    }

    #[test]
    fn defaults_match_the_command_line_defaults_and_hide_keys() {
        let parsed = Cli::parse_from(["x", "--openai-api-key", "sk-very-secret"]).settings;
        let defaults = ExtractorSettings::default();
        assert_eq!(parsed.llm.openai_model, defaults.llm.openai_model);
        assert_eq!(parsed.llm.attempt_budget, defaults.llm.attempt_budget);
        assert_eq!(parsed.llm.breaker_cooldown, defaults.llm.breaker_cooldown);
        assert_eq!(parsed.profiles.ttl_hours, 24);
        assert_eq!(parsed.health_addr, defaults.health_addr);
        assert!(!format!("{parsed:?}").contains("sk-very-secret"));
    }
}
