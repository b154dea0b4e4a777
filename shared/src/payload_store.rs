//! The raw webhook payloads, one "directory" per conversation:
//! `{conversation_id}/{conversation_id}_{kind}` under the store's root.
//!
//! The store is an [`object_store`]: a local directory by default
//! (`PAYLOAD_DIR`), or S3-compatible storage (`PAYLOAD_STORE_URL=s3://bucket/prefix`,
//! cargo feature `s3`). Either way a write that returned is durable, because
//! ingest answers 200 only after it and ElevenLabs does not retry:
//! - local: object_store's `LocalFileSystem` with `with_fsync(true)` writes a
//!   staging file next to the target, fsyncs it, renames it into place and
//!   fsyncs the parent directory (and every directory it had to create). That
//!   is the temporary-file, fsync, rename, fsync-directory sequence this
//!   store used to hand-roll, so one code path serves both backends.
//!   Without `with_fsync(true)` it would NOT be durable (its default is off).
//! - S3: a PUT is atomic and durable once acknowledged.

use std::path::PathBuf;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::OnceCell;

use crate::config::PayloadStoreConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Transcription,
    Audio,
    Failure,
}

impl PayloadKind {
    fn file_suffix(self) -> &'static str {
        match self {
            PayloadKind::Transcription => "transcription.json",
            PayloadKind::Audio => "audio.mp3",
            PayloadKind::Failure => "failure.json",
        }
    }
}

/// The object_store errors are boxed: they are large, and this error travels
/// inside other errors' `Result`s.
#[derive(Debug, thiserror::Error)]
pub enum PayloadStoreError {
    #[error("conversation id `{0}` cannot name a file: use letters, digits, `_` and `-`")]
    UnsafeId(String),
    #[error("cannot open the payload directory {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("cannot create the payload directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("payload store configuration: {0}")]
    Config(String),
    #[error("cannot write {key} to {store}: {source}")]
    Write {
        store: String,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("cannot read {key} from {store}: {source}")]
    Read {
        store: String,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("cannot delete {key} from {store}: {source}")]
    Delete {
        store: String,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("cannot delete the payload directory {path}: {source}")]
    DeleteDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the payloads live. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct PayloadStore {
    backend: Arc<Backend>,
}

#[derive(Debug)]
enum Backend {
    /// Opened on first use: `LocalFileSystem` needs the directory to exist,
    /// and `local` stays infallible like the directory writer it replaced.
    Local {
        root: PathBuf,
        fs: OnceCell<Arc<dyn ObjectStore>>,
        /// Always empty: the store itself is rooted at `root`.
        prefix: ObjectPath,
    },
    Remote {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        description: String,
    },
}

impl PayloadStore {
    /// A local directory, created on the first write if missing.
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self {
            backend: Arc::new(Backend::Local {
                root: root.into(),
                fs: OnceCell::new(),
                prefix: ObjectPath::default(),
            }),
        }
    }

    /// Any object store, keys under `prefix` (`""` for the store's root):
    /// S3 in production, `object_store::memory::InMemory` in tests.
    pub fn with_object_store(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
    ) -> Result<Self, PayloadStoreError> {
        let prefix = ObjectPath::parse(prefix)
            .map_err(|err| PayloadStoreError::Config(format!("prefix `{prefix}`: {err}")))?;
        let description = format!("{store}/{prefix}");
        Ok(Self {
            backend: Arc::new(Backend::Remote {
                store,
                prefix,
                description,
            }),
        })
    }

    /// What the services use: `PAYLOAD_STORE_URL` when set, else the local
    /// `PAYLOAD_DIR`. The store is checked now (the local directory is
    /// created) so a misconfiguration stops the service at start, not at
    /// the first webhook.
    pub async fn from_config(config: &PayloadStoreConfig) -> Result<Self, PayloadStoreError> {
        let store = match config.payload_store_url.as_deref() {
            None | Some("") => Self::local(&config.payload_dir),
            Some(url) => Self::from_url(url)?,
        };
        store.backend().await?;
        Ok(store)
    }

    fn from_url(url: &str) -> Result<Self, PayloadStoreError> {
        let parsed = url::Url::parse(url).map_err(|err| {
            PayloadStoreError::Config(format!("PAYLOAD_STORE_URL `{url}` is not a URL: {err}"))
        })?;
        match parsed.scheme() {
            "file" => {
                let path = parsed.to_file_path().map_err(|()| {
                    PayloadStoreError::Config(format!("`{url}` is not a local file URL"))
                })?;
                Ok(Self::local(path))
            }
            "s3" => Self::s3(&parsed),
            other => Err(PayloadStoreError::Config(format!(
                "PAYLOAD_STORE_URL scheme `{other}` is not supported: use s3://bucket/prefix or file:///dir"
            ))),
        }
    }

    /// Endpoint, region and credentials come from the standard AWS variables
    /// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`...).
    #[cfg(feature = "s3")]
    fn s3(url: &url::Url) -> Result<Self, PayloadStoreError> {
        let bucket = url
            .host_str()
            .filter(|bucket| !bucket.is_empty())
            .ok_or_else(|| PayloadStoreError::Config(format!("`{url}` names no bucket")))?;
        // object_store's HTTP client is the workspace's reqwest, built
        // without a TLS provider of its own (no aws-lc): ring, as everywhere.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .build()
            .map_err(|err| PayloadStoreError::Config(format!("S3 store for `{url}`: {err}")))?;
        Self::with_object_store(Arc::new(store), url.path())
    }

    #[cfg(not(feature = "s3"))]
    fn s3(url: &url::Url) -> Result<Self, PayloadStoreError> {
        Err(PayloadStoreError::Config(format!(
            "`{url}` needs S3 support: build elaaoms with `--features s3`"
        )))
    }

    /// The store-relative key of a payload (`{id}/{id}_transcription.json`):
    /// what events carry when they refer to a payload instead of embedding it.
    pub fn key_of(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
    ) -> Result<String, PayloadStoreError> {
        check_id(conversation_id)?;
        Ok(format!(
            "{conversation_id}/{conversation_id}_{}",
            kind.file_suffix()
        ))
    }

    /// Writes the payload atomically and durably (see the module comment);
    /// an existing payload is replaced. Returns its key. Takes `Bytes` as
    /// well as `Vec<u8>` so a request body is stored without a copy.
    pub async fn put(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
        bytes: impl Into<bytes::Bytes>,
    ) -> Result<String, PayloadStoreError> {
        let key = self.key_of(conversation_id, kind)?;
        let (store, prefix) = self.backend().await?;
        store
            .put(&join(prefix, &key), PutPayload::from(bytes.into()))
            .await
            .map_err(|source| PayloadStoreError::Write {
                store: self.describe(),
                key: key.clone(),
                source: Box::new(source),
            })?;
        Ok(key)
    }

    pub async fn get(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
    ) -> Result<Vec<u8>, PayloadStoreError> {
        let key = self.key_of(conversation_id, kind)?;
        let (store, prefix) = self.backend().await?;
        let read_error = |source| PayloadStoreError::Read {
            store: self.describe(),
            key: key.clone(),
            source: Box::new(source),
        };
        let result = store.get(&join(prefix, &key)).await.map_err(read_error)?;
        // `Vec::from` reuses the buffer when it can: no second copy.
        Ok(Vec::from(result.bytes().await.map_err(read_error)?))
    }

    /// Deletes every payload of a conversation (erasure); returns whether
    /// there was anything to delete. An unsafe id names nothing: `false`.
    pub async fn delete_conversation(
        &self,
        conversation_id: &str,
    ) -> Result<bool, PayloadStoreError> {
        if check_id(conversation_id).is_err() {
            return Ok(false);
        }
        let (store, prefix) = self.backend().await?;
        let directory = join(prefix, conversation_id);
        let delete_error = |source| PayloadStoreError::Delete {
            store: self.describe(),
            key: format!("{conversation_id}/"),
            source: Box::new(source),
        };
        let objects: Vec<ObjectPath> = store
            .list(Some(&directory))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await
            .map_err(delete_error)?;
        for object in &objects {
            match store.delete(object).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(err) => return Err(delete_error(err)),
            }
        }
        let mut existed = !objects.is_empty();
        if let Backend::Local { root, .. } = self.backend.as_ref() {
            // Listing hides staging files a crash mid-write may have left
            // (`name#1`); erasure must not leave them, nor the directory.
            let path = root.join(conversation_id);
            match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => existed = true,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(PayloadStoreError::DeleteDir { path, source }),
            }
        }
        Ok(existed)
    }

    async fn backend(&self) -> Result<(&Arc<dyn ObjectStore>, &ObjectPath), PayloadStoreError> {
        match self.backend.as_ref() {
            Backend::Local { root, fs, prefix } => {
                let store = fs.get_or_try_init(|| open_local(root.clone())).await?;
                Ok((store, prefix))
            }
            Backend::Remote { store, prefix, .. } => Ok((store, prefix)),
        }
    }

    fn describe(&self) -> String {
        match self.backend.as_ref() {
            Backend::Local { root, .. } => root.display().to_string(),
            Backend::Remote { description, .. } => description.clone(),
        }
    }
}

async fn open_local(root: PathBuf) -> Result<Arc<dyn ObjectStore>, PayloadStoreError> {
    tokio::fs::create_dir_all(&root)
        .await
        .map_err(|source| PayloadStoreError::CreateDir {
            path: root.clone(),
            source,
        })?;
    let fs = LocalFileSystem::new_with_prefix(&root)
        .map_err(|source| PayloadStoreError::Open {
            path: root,
            source: Box::new(source),
        })?
        // Durable writes: off by default in object_store, required here.
        .with_fsync(true);
    Ok(Arc::new(fs))
}

fn check_id(conversation_id: &str) -> Result<(), PayloadStoreError> {
    let safe = !conversation_id.is_empty()
        && conversation_id.len() <= 256
        && conversation_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if safe {
        Ok(())
    } else {
        Err(PayloadStoreError::UnsafeId(conversation_id.to_owned()))
    }
}

/// `key` is made of checked ids and fixed suffixes: its parts are valid.
fn join(prefix: &ObjectPath, key: &str) -> ObjectPath {
    key.split('/')
        .fold(prefix.clone(), |path, part| path.join(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn files_under(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn local_writes_read_back_overwrite_atomically_and_leave_no_staging_files() {
        let dir = tempfile::tempdir().unwrap();
        // A root that does not exist yet is created on the first write.
        let root = dir.path().join("payloads");
        let store = PayloadStore::local(&root);
        let key = store
            .put(
                "conv_abc",
                PayloadKind::Transcription,
                b"{\"a\":1}".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(key, "conv_abc/conv_abc_transcription.json");
        assert_eq!(
            std::fs::read(root.join("conv_abc/conv_abc_transcription.json")).unwrap(),
            b"{\"a\":1}",
            "today's on-disk layout is kept"
        );
        store
            .put(
                "conv_abc",
                PayloadKind::Transcription,
                b"{\"a\":2}".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(
            store
                .get("conv_abc", PayloadKind::Transcription)
                .await
                .unwrap(),
            b"{\"a\":2}"
        );
        assert_eq!(
            files_under(&root.join("conv_abc")),
            ["conv_abc_transcription.json"],
            "no staging file left behind"
        );
    }

    #[tokio::test]
    async fn concurrent_overwrites_leave_one_whole_payload() {
        let dir = tempfile::tempdir().unwrap();
        let store = PayloadStore::local(dir.path());
        let writes = (0..20u8).map(|i| {
            let store = store.clone();
            async move {
                store
                    .put("conv_race", PayloadKind::Audio, vec![i; 64 * 1024])
                    .await
            }
        });
        for result in futures::future::join_all(writes).await {
            result.unwrap();
        }
        let body = store.get("conv_race", PayloadKind::Audio).await.unwrap();
        assert_eq!(body.len(), 64 * 1024);
        assert!(
            body.iter().all(|b| *b == body[0]),
            "one writer's payload, never a mix"
        );
        assert_eq!(
            files_under(&dir.path().join("conv_race")),
            ["conv_race_audio.mp3"]
        );
    }

    #[tokio::test]
    async fn ids_that_could_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = PayloadStore::local(dir.path());
        for id in ["../etc", "a/b", "", "conv 1", "..", "x#1"] {
            assert!(matches!(
                store.put(id, PayloadKind::Audio, Vec::<u8>::new()).await,
                Err(PayloadStoreError::UnsafeId(_))
            ));
            assert!(matches!(
                store.get(id, PayloadKind::Audio).await,
                Err(PayloadStoreError::UnsafeId(_))
            ));
            assert!(!store.delete_conversation(id).await.unwrap());
        }
        assert!(files_under(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn local_delete_conversation_removes_its_directory_and_staging_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let store = PayloadStore::local(dir.path());
        store
            .put("conv_1", PayloadKind::Transcription, b"t".to_vec())
            .await
            .unwrap();
        store
            .put("conv_1", PayloadKind::Audio, b"a".to_vec())
            .await
            .unwrap();
        store
            .put("conv_2", PayloadKind::Transcription, b"t".to_vec())
            .await
            .unwrap();
        // What a crash between write and rename leaves: listing hides it.
        std::fs::write(
            dir.path().join("conv_1/conv_1_audio.mp3#1"),
            b"partial audio",
        )
        .unwrap();

        assert!(store.delete_conversation("conv_1").await.unwrap());
        assert!(!dir.path().join("conv_1").exists());
        assert!(!store.delete_conversation("conv_1").await.unwrap());
        assert!(!store.delete_conversation("conv_never").await.unwrap());
        assert_eq!(
            store
                .get("conv_2", PayloadKind::Transcription)
                .await
                .unwrap(),
            b"t",
            "other conversations are untouched"
        );
    }

    #[tokio::test]
    async fn a_root_that_cannot_be_a_directory_fails_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let config = PayloadStoreConfig {
            payload_dir: file,
            payload_store_url: None,
        };
        assert!(matches!(
            PayloadStore::from_config(&config).await,
            Err(PayloadStoreError::CreateDir { .. })
        ));
    }

    #[tokio::test]
    async fn object_store_backend_keeps_keys_under_its_prefix() {
        let memory = Arc::new(InMemory::new());
        let store = PayloadStore::with_object_store(memory.clone(), "tenant-a/payloads").unwrap();
        let key = store
            .put("conv_9", PayloadKind::Failure, b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(key, "conv_9/conv_9_failure.json");
        store
            .put("conv_9", PayloadKind::Failure, b"{\"v\":2}".to_vec())
            .await
            .unwrap();
        store
            .put("conv_10", PayloadKind::Transcription, b"t".to_vec())
            .await
            .unwrap();

        let raw = memory
            .get(&ObjectPath::from(
                "tenant-a/payloads/conv_9/conv_9_failure.json",
            ))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(raw.as_ref(), b"{\"v\":2}");
        assert_eq!(
            store.get("conv_9", PayloadKind::Failure).await.unwrap(),
            b"{\"v\":2}"
        );
        assert!(matches!(
            store.get("conv_9", PayloadKind::Audio).await,
            Err(PayloadStoreError::Read { source, .. })
                if matches!(*source, object_store::Error::NotFound { .. })
        ));

        assert!(store.delete_conversation("conv_9").await.unwrap());
        assert!(!store.delete_conversation("conv_9").await.unwrap());
        let left: Vec<String> = memory
            .list(None)
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            left,
            ["tenant-a/payloads/conv_10/conv_10_transcription.json"]
        );
    }

    #[tokio::test]
    async fn delete_conversation_does_not_touch_ids_sharing_a_prefix() {
        let store = PayloadStore::with_object_store(Arc::new(InMemory::new()), "").unwrap();
        for id in ["conv_1", "conv_10"] {
            store
                .put(id, PayloadKind::Transcription, id.as_bytes().to_vec())
                .await
                .unwrap();
        }
        assert!(store.delete_conversation("conv_1").await.unwrap());
        assert_eq!(
            store
                .get("conv_10", PayloadKind::Transcription)
                .await
                .unwrap(),
            b"conv_10"
        );
    }

    #[tokio::test]
    async fn urls_choose_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let file_url = url::Url::from_directory_path(dir.path()).unwrap();
        let config = PayloadStoreConfig {
            payload_dir: PathBuf::from("/nonexistent/unused"),
            payload_store_url: Some(file_url.to_string()),
        };
        let store = PayloadStore::from_config(&config).await.unwrap();
        store
            .put("conv_u", PayloadKind::Audio, b"mp3".to_vec())
            .await
            .unwrap();
        assert!(dir.path().join("conv_u/conv_u_audio.mp3").exists());

        for bad in ["gs://bucket/x", "not a url"] {
            let config = PayloadStoreConfig {
                payload_dir: PathBuf::from("unused"),
                payload_store_url: Some(bad.to_owned()),
            };
            assert!(matches!(
                PayloadStore::from_config(&config).await,
                Err(PayloadStoreError::Config(_))
            ));
        }
    }

    #[cfg(feature = "s3")]
    #[tokio::test]
    async fn an_s3_url_opens_the_bucket_under_its_prefix() {
        let config = PayloadStoreConfig {
            payload_dir: PathBuf::from("unused"),
            payload_store_url: Some("s3://payload-bucket/elaaoms/prod".to_owned()),
        };
        let store = PayloadStore::from_config(&config).await.unwrap();
        let described = store.describe();
        assert!(
            described.contains("payload-bucket") && described.ends_with("/elaaoms/prod"),
            "{described}"
        );
        assert!(matches!(
            PayloadStore::from_url("s3:///prefix-without-bucket"),
            Err(PayloadStoreError::Config(_))
        ));
    }

    /// The S3 client signs with ring (no aws-lc) and writes the same keys
    /// under the prefix: checked against a fake S3 endpoint.
    #[cfg(feature = "s3")]
    #[tokio::test]
    async fn s3_puts_and_gets_the_conversation_keys_under_the_prefix() {
        use wiremock::matchers::{header_exists, method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};

        let _ = rustls::crypto::ring::default_provider().install_default();
        let server = MockServer::start().await;
        let key = "/payload-bucket/elaaoms/conv_s3/conv_s3_audio.mp3";
        Mock::given(method("PUT"))
            .and(path(key))
            .and(header_exists("authorization"))
            .respond_with(ResponseTemplate::new(200).insert_header("ETag", "\"e1\""))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path(key))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("ETag", "\"e1\"")
                    .insert_header("Last-Modified", "Wed, 25 Nov 2026 16:00:00 GMT")
                    .set_body_bytes(b"mp3 bytes".to_vec()),
            )
            .expect(1)
            .mount(&server)
            .await;
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(server.uri())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name("payload-bucket")
            .with_access_key_id("test-key")
            .with_secret_access_key("test-secret")
            .build()
            .unwrap();
        let store = PayloadStore::with_object_store(Arc::new(s3), "elaaoms").unwrap();
        let stored = store
            .put("conv_s3", PayloadKind::Audio, b"mp3 bytes".to_vec())
            .await
            .unwrap();
        assert_eq!(stored, "conv_s3/conv_s3_audio.mp3");
        assert_eq!(
            store.get("conv_s3", PayloadKind::Audio).await.unwrap(),
            b"mp3 bytes"
        );
    }

    #[cfg(not(feature = "s3"))]
    #[tokio::test]
    async fn an_s3_url_without_the_s3_feature_says_how_to_get_it() {
        let config = PayloadStoreConfig {
            payload_dir: PathBuf::from("unused"),
            payload_store_url: Some("s3://bucket/prefix".to_owned()),
        };
        let err = PayloadStore::from_config(&config).await.unwrap_err();
        assert!(err.to_string().contains("s3"), "{err}");
    }
}
