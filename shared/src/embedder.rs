//! Sentence embeddings with all-MiniLM-L6-v2 on the CPU (the forward pass
//! is `elaaoms-minilm`), 384 dimensions.
//!
//! The model files (`config.json`, `tokenizer.json`, `model.safetensors`) are
//! installed once by `deploy/local/setup.sh` into [`default_model_dir`]; nothing
//! is downloaded at run time.
//!
//! [`LocalEmbedder`] is the synchronous model: load it once and share it.
//! [`Embedder`] is the cheap-to-clone handle that async services use: it runs
//! the arithmetic on tokio's blocking pool so the runtime never stalls, and
//! at most one forward pass per core at a time so bursts do not
//! oversubscribe the CPU. It can also call OpenAI's embeddings API
//! (`text-embedding-3-small` cut to 384 dimensions), chosen by
//! [`EmbeddingProviderConfig`] (`EMBEDDING_PROVIDER=local|openai`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use elaaoms_minilm::{BertConfig, MiniLm, Tokens};
use tokenizers::{Tokenizer, TruncationParams};

/// Length of every embedding vector.
pub const EMBEDDING_DIMENSIONS: usize = 384;

/// Name recorded with embeddings made by [`LocalEmbedder`].
pub const LOCAL_MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// Texts are cut at this many tokens (special tokens included). The model
/// accepts 512 positions; it was trained on at most 256 word pieces.
pub const MAX_TOKENS: usize = 256;

/// Largest batch that [`Embedder::embed`] hands to the model at once.
pub const MAX_BATCH: usize = 32;

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const WEIGHTS_FILE: &str = "model.safetensors";

const SETUP_HINT: &str = "run deploy/local/setup.sh to install the all-MiniLM-L6-v2 model files";

/// Where `deploy/local/setup.sh` installs the model, relative to the working directory.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from("data/models/all-MiniLM-L6-v2")
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    /// A model file is missing or unreadable.
    #[error("cannot read embedding model file {}: {source}; {SETUP_HINT}", path.display())]
    ModelFiles {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not a BERT configuration.
    #[error("invalid embedding model config {}: {source}; {SETUP_HINT}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `config.json` describes a model whose output is not 384-dimensional.
    #[error(
        "embedding model config {} has hidden size {found}, expected {EMBEDDING_DIMENSIONS}; {SETUP_HINT}",
        path.display()
    )]
    Dimensions { path: PathBuf, found: usize },
    /// `tokenizer.json` cannot be parsed or configured.
    #[error("invalid embedding tokenizer {}: {source}; {SETUP_HINT}", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// `model.safetensors` is corrupt or does not hold the expected tensors.
    #[error("invalid embedding model weights {}: {source}; {SETUP_HINT}", path.display())]
    Weights {
        path: PathBuf,
        #[source]
        source: elaaoms_minilm::ModelError,
    },
    /// Tokenising the input texts failed.
    #[error("tokenising {count} text(s) for embedding failed: {source}")]
    Tokenize {
        count: usize,
        #[source]
        source: tokenizers::Error,
    },
    /// The blocking task that ran a batch panicked or was cancelled.
    #[error("embedding task did not complete: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The embeddings API could not be reached or did not answer in time.
    #[error("embeddings API request failed: {0}")]
    Transport(#[source] reqwest::Error),
    /// The embeddings API answered with an error status (the body is not
    /// kept: it may echo the input).
    #[error("embeddings API answered HTTP {status}")]
    Status {
        status: u16,
        #[doc(hidden)]
        retry_after: Option<Duration>,
    },
    /// The embeddings API answered something that is not the expected vectors.
    #[error("embeddings API answered an unexpected body: {0}")]
    InvalidResponse(String),
    /// The configuration cannot make an embedder.
    #[error("embedding configuration: {0}")]
    Configuration(String),
}

impl EmbedderError {
    /// Worth trying again: the network, a timeout, 429 or a 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            EmbedderError::Transport(_) => true,
            EmbedderError::Status { status, .. } => *status == 429 || *status >= 500,
            _ => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            EmbedderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// all-MiniLM-L6-v2 on the CPU. Load once, share.
pub struct LocalEmbedder {
    model: MiniLm,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model", &LOCAL_MODEL_NAME)
            .finish_non_exhaustive()
    }
}

fn read_model_file(path: &Path) -> Result<Vec<u8>, EmbedderError> {
    std::fs::read(path).map_err(|source| EmbedderError::ModelFiles {
        path: path.to_path_buf(),
        source,
    })
}

impl LocalEmbedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `model_dir`.
    /// Takes a fraction of a second and about 90 MB; do it once per process.
    pub fn load(model_dir: &Path) -> Result<Self, EmbedderError> {
        let started = Instant::now();

        let config_path = model_dir.join(CONFIG_FILE);
        let config: BertConfig =
            serde_json::from_slice(&read_model_file(&config_path)?).map_err(|source| {
                EmbedderError::Config {
                    path: config_path.clone(),
                    source,
                }
            })?;
        if config.hidden_size != EMBEDDING_DIMENSIONS {
            return Err(EmbedderError::Dimensions {
                path: config_path,
                found: config.hidden_size,
            });
        }

        let tokenizer_path = model_dir.join(TOKENIZER_FILE);
        let tokenizer_error = |source| EmbedderError::Tokenizer {
            path: tokenizer_path.clone(),
            source,
        };
        let mut tokenizer =
            Tokenizer::from_bytes(read_model_file(&tokenizer_path)?).map_err(tokenizer_error)?;
        // tokenizer.json pads every text to 128 tokens and cuts at 128. The
        // forward pass takes each text at its own length: no padding at
        // all, and a cut at MAX_TOKENS.
        tokenizer.with_padding(None);
        let truncation = TruncationParams {
            max_length: MAX_TOKENS.min(config.max_position_embeddings),
            ..tokenizer.get_truncation().cloned().unwrap_or_default()
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(tokenizer_error)?;

        let weights_path = model_dir.join(WEIGHTS_FILE);
        let model = MiniLm::load(config, &read_model_file(&weights_path)?).map_err(|source| {
            EmbedderError::Weights {
                path: weights_path.clone(),
                source,
            }
        })?;

        tracing::info!(
            model = LOCAL_MODEL_NAME,
            dir = %model_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        Ok(Self { model, tokenizer })
    }

    /// Embeds a batch: tokenise (truncating at 256 tokens), BERT forward
    /// over all the batch's tokens at once without padding, mean pooling,
    /// L2-normalise. Returns one 384-vector per text, in order.
    ///
    /// CPU-bound (a few milliseconds for a short text, more for long
    /// batches): from async code use [`Embedder`].
    pub fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let count = texts.len();
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|source| EmbedderError::Tokenize { count, source })?;
        let tokens: Vec<Tokens<'_>> = encodings
            .iter()
            .map(|encoding| Tokens {
                ids: encoding.get_ids(),
                type_ids: encoding.get_type_ids(),
            })
            .collect();
        Ok(self.model.embed(&tokens))
    }
}

/// Which embedding provider, and its settings (`EMBEDDING_PROVIDER`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbeddingProvider {
    /// all-MiniLM-L6-v2 on this machine's CPU (the default; no network).
    #[default]
    Local,
    /// OpenAI's embeddings API with `dimensions: 384`.
    Openai,
}

#[derive(clap::Args, Debug, Clone)]
pub struct EmbeddingProviderConfig {
    #[arg(id = "embedding_provider", long, env = "EMBEDDING_PROVIDER", value_enum, default_value_t = EmbeddingProvider::Local)]
    pub embedding_provider: EmbeddingProvider,
    /// Base URL of the OpenAI (or compatible) API.
    #[arg(
        id = "embedding_openai_base_url",
        long,
        env = "EMBEDDING_OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub embedding_openai_base_url: String,
    #[arg(
        id = "embedding_openai_model",
        long,
        env = "EMBEDDING_OPENAI_MODEL",
        default_value = "text-embedding-3-small"
    )]
    pub embedding_openai_model: String,
    /// Required with `--embedding-provider openai`; never logged.
    #[arg(id = "embedding_openai_api_key", long, env = "EMBEDDING_OPENAI_API_KEY", hide_env_values = true, value_parser = crate::config::parse_secret)]
    pub embedding_openai_api_key: Option<SecretString>,
}

/// Settings of [`OpenAiEmbedder`].
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    pub base_url: String,
    pub model: String,
    pub api_key: SecretString,
    /// Per request.
    pub timeout: Duration,
    /// Retries of a transient failure (429, 5xx, timeouts).
    pub max_retries: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A longer `Retry-After` is cut to this.
    pub max_retry_after: Duration,
}

impl OpenAiSettings {
    pub fn new(
        base_url: impl Into<String>,
        model: impl Into<String>,
        api_key: SecretString,
    ) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key,
            timeout: Duration::from_secs(30),
            max_retries: 4,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// OpenAI's embeddings endpoint (`POST {base}/embeddings`), 384 dimensions.
#[derive(Debug)]
pub struct OpenAiEmbedder {
    client: reqwest::Client,
    settings: OpenAiSettings,
}

#[derive(serde::Deserialize)]
struct EmbeddingsResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(serde::Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

impl OpenAiEmbedder {
    pub fn new(settings: OpenAiSettings) -> Result<Self, EmbedderError> {
        // reqwest is built without a default crypto provider (no aws-lc).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|err| EmbedderError::Configuration(format!("HTTP client: {err}")))?;
        Ok(Self { client, settings })
    }

    /// One request for the whole batch, retried with jittered exponential
    /// backoff on transient failures; `Retry-After` replaces the delay (capped).
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedderError> {
        let settings = &self.settings;
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(settings.min_delay)
            .with_max_delay(settings.max_delay)
            .with_max_times(settings.max_retries);
        let max_retry_after = settings.max_retry_after;
        (|| self.request(texts))
            .retry(backoff)
            .when(EmbedderError::is_transient)
            .adjust(move |err: &EmbedderError, delay| match (delay, err.retry_after()) {
                (None, _) => None,
                (Some(_), Some(wait)) => Some(wait.min(max_retry_after)),
                (Some(delay), None) => Some(delay),
            })
            .notify(|err: &EmbedderError, wait| {
                tracing::warn!(error = %err, wait_ms = wait.as_millis() as u64, "embeddings request failed; retrying");
            })
            .await
    }

    async fn request(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedderError> {
        let url = format!(
            "{}/embeddings",
            self.settings.base_url.trim_end_matches('/')
        );
        let body = serde_json::json!({
            "model": self.settings.model,
            "input": texts,
            "dimensions": EMBEDDING_DIMENSIONS,
            "encoding_format": "float",
        });
        let response = self
            .client
            .post(url)
            .bearer_auth(self.settings.api_key.expose_secret())
            .json(&body)
            .send()
            .await
            .map_err(EmbedderError::Transport)?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(EmbedderError::Status {
                status: status.as_u16(),
                retry_after,
            });
        }
        let bytes = response.bytes().await.map_err(EmbedderError::Transport)?;
        let parsed: EmbeddingsResponse = serde_json::from_slice(&bytes)
            .map_err(|err| EmbedderError::InvalidResponse(err.to_string()))?;
        if parsed.data.len() != texts.len() {
            return Err(EmbedderError::InvalidResponse(format!(
                "{} embeddings for {} texts",
                parsed.data.len(),
                texts.len()
            )));
        }
        let mut out = vec![Vec::new(); texts.len()];
        for item in parsed.data {
            if item.embedding.len() != EMBEDDING_DIMENSIONS {
                return Err(EmbedderError::InvalidResponse(format!(
                    "an embedding of {} dimensions, expected {EMBEDDING_DIMENSIONS}",
                    item.embedding.len()
                )));
            }
            let slot = out.get_mut(item.index).ok_or_else(|| {
                EmbedderError::InvalidResponse(format!("index {} out of range", item.index))
            })?;
            *slot = normalised(item.embedding);
        }
        if out.iter().any(Vec::is_empty) {
            return Err(EmbedderError::InvalidResponse(
                "an index is missing".to_owned(),
            ));
        }
        Ok(out)
    }
}

/// Search ranks by inner product, which is cosine only for unit vectors.
fn normalised(mut vector: Vec<f32>) -> Vec<f32> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

#[derive(Debug)]
enum Provider {
    Local {
        model: Arc<LocalEmbedder>,
        /// One forward pass per core: more only queue inside the CPU.
        passes: Arc<Semaphore>,
    },
    OpenAi(OpenAiEmbedder),
}

/// Cheap to clone handle used by async services: the local model runs
/// batches on tokio's blocking pool (at most one per core at a time) so the
/// runtime never stalls; large inputs are split into batches of at most 32
/// texts. Or OpenAI's API, with the same interface.
#[derive(Clone, Debug)]
pub struct Embedder {
    provider: Arc<Provider>,
}

impl From<LocalEmbedder> for Embedder {
    fn from(local: LocalEmbedder) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::local_with_passes(local, cores)
    }
}

impl Embedder {
    /// Loads the local model (blocking: call it at start-up, or from `spawn_blocking`).
    pub fn local(model_dir: &Path) -> Result<Self, EmbedderError> {
        LocalEmbedder::load(model_dir).map(Self::from)
    }

    /// The local model with at most `passes` forward passes at a time.
    pub fn local_with_passes(local: LocalEmbedder, passes: usize) -> Self {
        Self {
            provider: Arc::new(Provider::Local {
                model: Arc::new(local),
                passes: Arc::new(Semaphore::new(passes.max(1))),
            }),
        }
    }

    pub fn openai(settings: OpenAiSettings) -> Result<Self, EmbedderError> {
        Ok(Self {
            provider: Arc::new(Provider::OpenAi(OpenAiEmbedder::new(settings)?)),
        })
    }

    /// The embedder the configuration asks for: the local model from
    /// `model_dir`, or OpenAI (which needs the API key).
    pub fn from_config(
        model_dir: &Path,
        config: &EmbeddingProviderConfig,
    ) -> Result<Self, EmbedderError> {
        match config.embedding_provider {
            EmbeddingProvider::Local => Self::local(model_dir),
            EmbeddingProvider::Openai => {
                let api_key = config.embedding_openai_api_key.clone().ok_or_else(|| {
                    EmbedderError::Configuration(
                        "EMBEDDING_PROVIDER=openai needs EMBEDDING_OPENAI_API_KEY".to_owned(),
                    )
                })?;
                Self::openai(OpenAiSettings::new(
                    config.embedding_openai_base_url.clone(),
                    config.embedding_openai_model.clone(),
                    api_key,
                ))
            }
        }
    }

    /// Name of the model that makes the vectors, recorded with each embedding.
    pub fn model_name(&self) -> &str {
        match &*self.provider {
            Provider::Local { .. } => LOCAL_MODEL_NAME,
            Provider::OpenAi(openai) => &openai.settings.model,
        }
    }

    /// Length of every vector this embedder returns.
    pub fn dimensions(&self) -> usize {
        EMBEDDING_DIMENSIONS
    }

    /// Embeds `texts`, one unit vector per text, in order.
    ///
    /// Texts are grouped by length into batches of at most [`MAX_BATCH`], so
    /// short texts are not padded to the length of long ones; each batch runs
    /// on the blocking pool (or is one API request). Dropping the future
    /// stops after the current batch.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedderError> {
        let total = texts.len();
        if total <= MAX_BATCH {
            return self.run_batch(texts).await;
        }

        let mut order: Vec<usize> = (0..total).collect();
        order.sort_by_key(|&i| texts[i].len());
        let mut slots: Vec<Option<String>> = texts.into_iter().map(Some).collect();
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); total];
        for chunk in order.chunks(MAX_BATCH) {
            let batch: Vec<String> = chunk
                .iter()
                .map(|&i| slots[i].take().unwrap_or_default())
                .collect();
            let vectors = self.run_batch(batch).await?;
            for (&i, vector) in chunk.iter().zip(vectors) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    /// Embeds one text.
    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedderError> {
        let mut vectors = self.run_batch(vec![text.to_owned()]).await?;
        Ok(vectors.pop().unwrap_or_default())
    }

    async fn run_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        match &*self.provider {
            Provider::OpenAi(openai) => openai.embed(&texts).await,
            Provider::Local { model, passes } => {
                // The permit moves into the blocking task: a caller that
                // gives up does not free the core while the pass still runs.
                let permit = Arc::clone(passes)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let model = Arc::clone(model);
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                    model.embed_batch(&refs)
                })
                .await?
            }
        }
    }

    /// Forward passes that may start now (local model only), for tests and metrics.
    pub fn available_passes(&self) -> Option<usize> {
        match &*self.provider {
            Provider::Local { passes, .. } => Some(passes.available_permits()),
            Provider::OpenAi(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_names_the_file_and_the_setup_script() {
        let dir = Path::new("/nonexistent/elaaoms/models/all-MiniLM-L6-v2");
        let err = LocalEmbedder::load(dir).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, EmbedderError::ModelFiles { .. }), "{err:?}");
        assert!(message.contains("config.json"), "{message}");
        assert!(message.contains("deploy/local/setup.sh"), "{message}");
    }

    #[test]
    fn default_dir_is_under_data_models() {
        assert_eq!(
            default_model_dir(),
            PathBuf::from("data/models/all-MiniLM-L6-v2")
        );
    }

    mod openai {
        use super::super::*;
        use wiremock::matchers::{body_partial_json, header, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};

        fn settings(server: &MockServer) -> OpenAiSettings {
            OpenAiSettings {
                timeout: Duration::from_millis(500),
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(50),
                max_retries: 3,
                ..OpenAiSettings::new(
                    format!("{}/v1", server.uri()),
                    "text-embedding-3-small",
                    SecretString::from("sk-test"),
                )
            }
        }

        fn vector(seed: f32) -> Vec<f32> {
            (0..EMBEDDING_DIMENSIONS).map(|i| seed + i as f32).collect()
        }

        fn answer(vectors: &[(usize, Vec<f32>)]) -> serde_json::Value {
            let data: Vec<_> = vectors
                .iter()
                .map(|(index, embedding)| serde_json::json!({"object": "embedding", "index": index, "embedding": embedding}))
                .collect();
            serde_json::json!({"object": "list", "data": data, "model": "text-embedding-3-small", "usage": {"prompt_tokens": 4, "total_tokens": 4}})
        }

        #[tokio::test]
        async fn asks_for_384_dimensions_and_returns_unit_vectors_in_order() {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .and(path("/v1/embeddings"))
                .and(header("authorization", "Bearer sk-test"))
                .and(body_partial_json(serde_json::json!({"model": "text-embedding-3-small", "dimensions": 384, "input": ["a", "b"]})))
                .respond_with(ResponseTemplate::new(200).set_body_json(answer(&[(1, vector(2.0)), (0, vector(1.0))])))
                .expect(1)
                .mount(&server)
                .await;
            let embedder = Embedder::openai(settings(&server)).unwrap();
            assert_eq!(embedder.model_name(), "text-embedding-3-small");
            let vectors = embedder.embed(vec!["a".into(), "b".into()]).await.unwrap();
            assert_eq!(vectors.len(), 2);
            assert_eq!(vectors[0], normalised(vector(1.0)));
            assert_eq!(vectors[1], normalised(vector(2.0)));
            let norm: f32 = vectors[0].iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-4);
        }

        #[tokio::test]
        async fn a_429_with_retry_after_and_a_500_are_retried() {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
                .up_to_n_times(1)
                .expect(1)
                .with_priority(1)
                .mount(&server)
                .await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(503))
                .up_to_n_times(1)
                .expect(1)
                .with_priority(2)
                .mount(&server)
                .await;
            Mock::given(method("POST"))
                .respond_with(ResponseTemplate::new(200).set_body_json(answer(&[(0, vector(1.0))])))
                .expect(1)
                .with_priority(3)
                .mount(&server)
                .await;
            let embedder = Embedder::openai(settings(&server)).unwrap();
            let vector = embedder.embed_one("a").await.unwrap();
            assert_eq!(vector.len(), EMBEDDING_DIMENSIONS);
        }

        #[tokio::test]
        async fn a_client_error_is_not_retried_and_the_error_says_transient_or_not() {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(401).set_body_string("{\"error\": \"bad key\"}"),
                )
                .expect(1)
                .mount(&server)
                .await;
            let err = Embedder::openai(settings(&server))
                .unwrap()
                .embed_one("a")
                .await
                .unwrap_err();
            assert!(
                matches!(err, EmbedderError::Status { status: 401, .. }),
                "{err:?}"
            );
            assert!(!err.is_transient());
            assert!(!err.to_string().contains("sk-test"));
        }

        #[tokio::test]
        async fn garbage_and_wrong_dimensions_are_refused_without_retrying() {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(200).set_body_string("<html>proxy error</html>"),
                )
                .expect(1)
                .mount(&server)
                .await;
            let err = Embedder::openai(settings(&server))
                .unwrap()
                .embed_one("a")
                .await
                .unwrap_err();
            assert!(matches!(err, EmbedderError::InvalidResponse(_)), "{err:?}");

            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(200).set_body_json(answer(&[(0, vec![1.0; 1536])])),
                )
                .expect(1)
                .mount(&server)
                .await;
            let err = Embedder::openai(settings(&server))
                .unwrap()
                .embed_one("a")
                .await
                .unwrap_err();
            assert!(err.to_string().contains("1536"), "{err}");
        }

        #[tokio::test]
        async fn a_timeout_is_retried_then_reported() {
            let server = MockServer::start().await;
            Mock::given(method("POST"))
                .respond_with(
                    ResponseTemplate::new(200)
                        .set_delay(Duration::from_secs(5))
                        .set_body_json(answer(&[(0, vector(1.0))])),
                )
                .expect(2)
                .mount(&server)
                .await;
            let embedder = Embedder::openai(OpenAiSettings {
                timeout: Duration::from_millis(100),
                max_retries: 1,
                ..settings(&server)
            })
            .unwrap();
            let err = embedder.embed_one("a").await.unwrap_err();
            assert!(matches!(err, EmbedderError::Transport(_)), "{err:?}");
            assert!(err.is_transient());
        }

        #[test]
        fn openai_without_a_key_is_a_configuration_error() {
            let config = EmbeddingProviderConfig {
                embedding_provider: EmbeddingProvider::Openai,
                embedding_openai_base_url: "http://127.0.0.1:1/v1".into(),
                embedding_openai_model: "text-embedding-3-small".into(),
                embedding_openai_api_key: None,
            };
            let err = Embedder::from_config(Path::new("/nonexistent"), &config).unwrap_err();
            assert!(
                err.to_string().contains("EMBEDDING_OPENAI_API_KEY"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn local_passes_are_bounded_and_given_back() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../data/models/all-MiniLM-L6-v2"
        ));
        let embedder =
            Embedder::local_with_passes(LocalEmbedder::load(dir).expect("model files"), 1);
        assert_eq!(embedder.available_passes(), Some(1));
        let texts = ["one", "two", "three", "four"];
        let results =
            futures::future::join_all(texts.iter().map(|text| embedder.embed_one(text))).await;
        for (text, result) in texts.iter().zip(results) {
            let vector = result.unwrap();
            assert_eq!(vector, embedder.embed_one(text).await.unwrap(), "{text}");
        }
        assert_eq!(embedder.available_passes(), Some(1));
    }
}
