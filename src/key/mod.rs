//! Deterministic cache keys shared with the host apps:
//! `name + ":" + sha256(canonical JSON of data)` in lower-case hex.

use sha2::{Digest, Sha256};

#[cfg(feature = "python")]
pub mod py;

/// Formats a key from a name and the canonical JSON text of its data.
pub fn key_from_json(name: &str, canonical_json: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(canonical_json.as_bytes());
    let mut hex = [0u8; 64];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[(byte >> 4) as usize];
        pair[1] = HEX[(byte & 0xF) as usize];
    }
    let mut key = String::with_capacity(name.len() + 1 + 64);
    key.push_str(name);
    key.push(':');
    key.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
    key
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_digest() {
        // sha256 of `{"a":1}`, as `hashlib.sha256(b'{"a":1}').hexdigest()` prints it.
        assert_eq!(
            super::key_from_json("n", "{\"a\":1}"),
            "n:015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"
        );
    }
}
