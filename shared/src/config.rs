//! Typed configuration shared by the services. Every setting is a flag and
//! an environment variable (clap), validated at start; secrets are
//! `SecretString`s, printed as `[REDACTED]` and hidden from `--help`.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

/// clap value parser for secrets: keeps them out of `Debug` output.
pub fn parse_secret(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(value.to_owned()))
}

/// clap value parser for durations written as `500ms`, `30s`, `5m`, `1h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{value}` needs a unit: ms, s, m or h"))?;
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{value}` is not a duration like 500ms, 30s, 5m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        _ => Err(format!(
            "`{value}` has unknown unit `{unit}`: use ms, s, m or h"
        )),
    }
}

/// clap value parser for a comma-separated list of durations.
pub fn parse_duration_list(value: &str) -> Result<Vec<Duration>, String> {
    value.split(',').map(parse_duration).collect()
}

#[derive(clap::Args, Debug, Clone)]
pub struct DatabaseConfig {
    /// Postgres URL of the services' role: neither superuser, nor table
    /// owner, nor BYPASSRLS (services refuse to start otherwise).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://elaaoms_app:elaaoms_app@127.0.0.1:5432/elaaoms",
        value_parser = parse_secret,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub database_url: SecretString,

    /// Connections in each service's pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,
}

#[derive(clap::Args, Debug, Clone)]
pub struct AdminDatabaseConfig {
    /// Postgres URL of the admin role used by migrations and operator
    /// commands (a superuser or a BYPASSRLS role).
    #[arg(
        long,
        env = "DATABASE_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/elaaoms",
        value_parser = parse_secret,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub database_admin_url: SecretString,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BusConfig {
    /// NATS server URL (JetStream enabled).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,

    /// Prefix for stream names and subjects, so several deployments (or
    /// tests) can share one NATS server. Empty in production.
    #[arg(long, env = "BUS_NAMESPACE", default_value = "")]
    pub bus_namespace: String,

    /// Upper bound on the event stream's size on disk.
    #[arg(long, env = "STREAM_MAX_BYTES", default_value_t = 1 << 30)]
    pub stream_max_bytes: i64,

    /// Copies of each stream (events and dead letters) in a NATS cluster:
    /// 1 on a single server, 3 in production. Applied to existing streams
    /// at start.
    #[arg(long, env = "NATS_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_stream_replicas: u8,
}

#[derive(clap::Args, Debug, Clone)]
pub struct WorkerConfig {
    /// Messages handled at once by this worker.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 8)]
    pub worker_concurrency: usize,

    /// Messages of one organization handled at once by this worker.
    #[arg(long, env = "WORKER_PER_ORGANIZATION_CONCURRENCY", default_value_t = 4)]
    pub worker_per_organization_concurrency: usize,

    /// Deliveries of a message before it goes to the dead-letter stream.
    #[arg(long, env = "WORKER_MAX_ATTEMPTS", default_value_t = 4)]
    pub worker_max_attempts: u64,

    /// Delay before each retry of a transiently failed message (the last
    /// one repeats).
    #[arg(long, env = "WORKER_RETRY_DELAYS", default_value = "1m,5m,30m", value_parser = parse_duration_list)]
    pub worker_retry_delays: std::vec::Vec<Duration>,

    /// How long JetStream waits for an ack before redelivering; slow
    /// handlers report progress every third of it.
    #[arg(long, env = "WORKER_ACK_WAIT", default_value = "60s", value_parser = parse_duration)]
    pub worker_ack_wait: Duration,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PayloadStoreConfig {
    /// Directory of the raw webhook payloads.
    #[arg(long, env = "PAYLOAD_DIR", default_value = "data/payloads")]
    pub payload_dir: PathBuf,
    /// Object storage for the payloads instead of PAYLOAD_DIR:
    /// `s3://bucket/prefix` (needs the `s3` build feature; endpoint, region
    /// and credentials from the standard AWS_* variables) or `file:///dir`.
    #[arg(long, env = "PAYLOAD_STORE_URL")]
    pub payload_store_url: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EmbeddingConfig {
    /// Directory with all-MiniLM-L6-v2's model.safetensors, tokenizer.json
    /// and config.json (installed by deploy/local/setup.sh).
    #[arg(
        long,
        env = "EMBEDDING_MODEL_DIR",
        default_value = "data/models/all-MiniLM-L6-v2"
    )]
    pub embedding_model_dir: PathBuf,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable, for a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryConfig {
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// tracing filter, e.g. `info,elaaoms_ingest=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,

    /// OTLP/HTTP (protobuf) collector to export traces to, e.g.
    /// `http://otel-collector:4318` (spans go to `/v1/traces` under it).
    /// Unset: no exporter.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_exporter_otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans; default: the service's name
    /// (`elaaoms-ingest`, `elaaoms-extractor`, ...).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,

    /// Share of new traces exported, 0.0 to 1.0; a trace continued from a
    /// `traceparent` follows its sampled flag.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = parse_ratio)]
    pub otel_traces_sampler_arg: f64,
}

/// clap value parser for a ratio between 0 and 1.
pub fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("`{value}` is not a ratio between 0.0 and 1.0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct TestCli {
        #[command(flatten)]
        database: DatabaseConfig,
        #[command(flatten)]
        worker: WorkerConfig,
    }

    #[test]
    fn durations_parse_with_units_and_refuse_garbage() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 fortnights").is_err());
        assert_eq!(
            parse_duration_list("1m,5m,30m").unwrap(),
            vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(1800)
            ]
        );
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let cli = TestCli::parse_from([
            "test",
            "--database-url",
            "postgres://app:hunter2-very-secret@db/elaaoms",
        ]);
        let printed = format!("{cli:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("REDACTED"), "{printed}");
    }

    #[test]
    fn ratios_between_zero_and_one_only() {
        assert_eq!(parse_ratio("0.25").unwrap(), 0.25);
        assert_eq!(parse_ratio("1").unwrap(), 1.0);
        assert!(parse_ratio("1.5").is_err());
        assert!(parse_ratio("-0.1").is_err());
        assert!(parse_ratio("half").is_err());
    }

    #[test]
    fn worker_defaults_follow_the_design() {
        let cli = TestCli::parse_from(["test"]);
        assert_eq!(cli.worker.worker_retry_delays.len(), 3);
        assert_eq!(cli.worker.worker_retry_delays[2], Duration::from_secs(1800));
    }
}
