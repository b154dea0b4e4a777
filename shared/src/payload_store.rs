//! The raw webhook payloads, one directory per conversation:
//! `{dir}/{conversation_id}/{conversation_id}_{kind}`. Every write is atomic
//! and durable (temporary file, fsync, rename, fsync of the directory), so a
//! webhook we answered survives a crash.

use std::io::Write;
use std::path::{Path, PathBuf};

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

#[derive(Debug, thiserror::Error)]
pub enum PayloadStoreError {
    #[error("conversation id `{0}` cannot name a file: use letters, digits, `_` and `-`")]
    UnsafeId(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("payload store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A local directory; S3-compatible storage is a production option.
#[derive(Debug, Clone)]
pub struct PayloadStore {
    root: PathBuf,
}

impl PayloadStore {
    pub fn local(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path_of(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
    ) -> Result<PathBuf, PayloadStoreError> {
        let safe = !conversation_id.is_empty()
            && conversation_id.len() <= 256
            && conversation_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !safe {
            return Err(PayloadStoreError::UnsafeId(conversation_id.to_owned()));
        }
        Ok(self
            .root
            .join(conversation_id)
            .join(format!("{conversation_id}_{}", kind.file_suffix())))
    }

    /// The store-relative key of a payload (`{id}/{id}_transcription.json`):
    /// what events carry when they refer to a payload instead of embedding it.
    pub fn key_of(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
    ) -> Result<String, PayloadStoreError> {
        self.path_of(conversation_id, kind)?;
        Ok(format!(
            "{conversation_id}/{conversation_id}_{}",
            kind.file_suffix()
        ))
    }

    /// Writes the file atomically and durably; an existing file is replaced.
    pub async fn put(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
        bytes: Vec<u8>,
    ) -> Result<PathBuf, PayloadStoreError> {
        let path = self.path_of(conversation_id, kind)?;
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_durably(&target, &bytes))
            .await?
            .map_err(|source| PayloadStoreError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(path)
    }

    pub async fn get(
        &self,
        conversation_id: &str,
        kind: PayloadKind,
    ) -> Result<Vec<u8>, PayloadStoreError> {
        let path = self.path_of(conversation_id, kind)?;
        tokio::fs::read(&path)
            .await
            .map_err(|source| PayloadStoreError::Read { path, source })
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("payload paths have a directory");
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("payload"),
        uuid::Uuid::new_v4()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_read_back_and_leave_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = PayloadStore::local(dir.path());
        let path = store
            .put(
                "conv_abc",
                PayloadKind::Transcription,
                b"{\"a\":1}".to_vec(),
            )
            .await
            .unwrap();
        assert!(path.ends_with("conv_abc/conv_abc_transcription.json"));
        assert_eq!(
            store
                .key_of("conv_abc", PayloadKind::Transcription)
                .unwrap(),
            "conv_abc/conv_abc_transcription.json"
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
        let entries: Vec<_> = std::fs::read_dir(dir.path().join("conv_abc"))
            .unwrap()
            .collect();
        assert_eq!(entries.len(), 1, "no temporary file left behind");
    }

    #[tokio::test]
    async fn ids_that_could_escape_the_directory_are_refused() {
        let store = PayloadStore::local("/tmp/unused");
        for id in ["../etc", "a/b", "", "conv 1"] {
            assert!(matches!(
                store.put(id, PayloadKind::Audio, vec![]).await,
                Err(PayloadStoreError::UnsafeId(_))
            ));
        }
    }
}
