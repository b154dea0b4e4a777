//! Organization API keys: random, shown once, stored only as a SHA-256 hash.
//! A hash (not a slow password hash) is right here: the key has 256 bits of
//! entropy, so it cannot be guessed, and every request must check it fast.

use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "elk_";

/// A new key as the user sees it (`elk_` + 64 hex characters).
pub fn generate_api_key() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// The first characters, stored so an operator can tell keys apart.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hash_to_32_bytes() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        assert!(a.starts_with("elk_") && a.len() == 68);
        assert_eq!(hash_api_key(&a).len(), 32);
        assert_ne!(hash_api_key(&a), hash_api_key(&b));
        assert_eq!(display_prefix(&a).len(), 12);
    }
}
