//! Counting keys under a prefix on Redis (SCAN, never KEYS). Kept apart from `redis.rs`
//! so the store's connection code and this read-only walk change independently.

use super::redis::{glob_escape, RedisStore, StoreError};

impl RedisStore {
    /// Keys whose names start with `prefix`, counted by walking SCAN MATCH.
    pub async fn count_prefixed(&self, prefix: &str) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut cursor: u64 = 0;
        let mut count = 0;
        loop {
            let pattern = pattern.clone();
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .run(|mut conn| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            count += keys.len() as u64;
            if next == 0 {
                return Ok(count);
            }
            cursor = next;
        }
    }
}
