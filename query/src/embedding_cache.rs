//! A bounded LRU cache of query embeddings, keyed by the exact query text.
//!
//! Agents and dashboards ask the same questions again ("allergies?"), and
//! the embedding is most of a search's time (INFRA-NOTES: ~17 ms against a
//! few ms of SQL). Entries are small (384 floats, 1.5 KB), so 1,000 of them
//! cost about 1.5 MB. Eviction scans for the least recently used entry: at
//! this size that is a few microseconds, far below one embedding, and keeps
//! the code free of a linked list.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use elaaoms_shared::embedder::{Embedder, EmbedderError};

#[derive(Clone)]
pub(crate) struct EmbeddingCache {
    inner: Arc<Mutex<Lru>>,
    embedder: Embedder,
}

struct Lru {
    capacity: usize,
    tick: u64,
    entries: HashMap<String, (Arc<Vec<f32>>, u64)>,
}

impl Lru {
    fn get(&mut self, key: &str) -> Option<Arc<Vec<f32>>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(vector, used)| {
            *used = tick;
            vector.clone()
        })
    }

    fn insert(&mut self, key: String, vector: Arc<Vec<f32>>) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (vector, self.tick));
    }
}

impl EmbeddingCache {
    pub fn new(embedder: Embedder, capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Lru {
                capacity,
                tick: 0,
                entries: HashMap::with_capacity(capacity.min(4096)),
            })),
            embedder,
        }
    }

    /// The embedding of `text`, computed once per distinct text while it
    /// stays among the `capacity` most recently used. Returns whether it
    /// came from the cache.
    pub async fn embed(&self, text: &str) -> Result<(Arc<Vec<f32>>, bool), EmbedderError> {
        if let Some(hit) = self.lock().get(text) {
            return Ok((hit, true));
        }
        let vector = Arc::new(self.embedder.embed_one(text).await?);
        self.lock().insert(text.to_owned(), vector.clone());
        Ok((vector, false))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock leaves a valid map: keep using it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lru(capacity: usize) -> Lru {
        Lru {
            capacity,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    #[test]
    fn evicts_the_least_recently_used_entry() {
        let mut cache = lru(2);
        cache.insert("a".into(), Arc::new(vec![1.0]));
        cache.insert("b".into(), Arc::new(vec![2.0]));
        // Touch "a": "b" is now the oldest.
        assert_eq!(cache.get("a").as_deref(), Some(&vec![1.0]));
        cache.insert("c".into(), Arc::new(vec![3.0]));
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        assert_eq!(cache.entries.len(), 2);
    }

    #[test]
    fn keys_are_exact_and_capacity_zero_caches_nothing() {
        let mut cache = lru(4);
        cache.insert("Allergies?".into(), Arc::new(vec![1.0]));
        assert!(cache.get("allergies?").is_none());
        let mut none = lru(0);
        none.insert("a".into(), Arc::new(vec![1.0]));
        assert!(none.get("a").is_none());
    }

    #[test]
    fn reinserting_a_key_does_not_evict_another() {
        let mut cache = lru(2);
        cache.insert("a".into(), Arc::new(vec![1.0]));
        cache.insert("b".into(), Arc::new(vec![2.0]));
        cache.insert("a".into(), Arc::new(vec![9.0]));
        assert_eq!(cache.entries.len(), 2);
        assert_eq!(cache.get("a").as_deref(), Some(&vec![9.0]));
        assert!(cache.get("b").is_some());
    }
}
