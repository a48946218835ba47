//! Counting keys under a prefix on Redis (SCAN, never KEYS; every primary of a cluster).
//! Kept apart from `redis.rs` so the store's connection code and this read-only walk
//! change independently.

use super::redis::{glob_escape, ClusterNode, RedisStore, StoreError};

impl RedisStore {
    /// Keys whose names start with `prefix`, counted by walking SCAN MATCH.
    pub async fn count_prefixed(&self, prefix: &str) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(prefix));
        let nodes = if self.is_cluster() {
            self.primaries().await?
        } else {
            vec![ClusterNode::default()]
        };
        let mut count = 0;
        for node in &nodes {
            count += self.count_matching_on(node, &pattern).await?;
        }
        Ok(count)
    }

    async fn count_matching_on(
        &self,
        node: &ClusterNode,
        pattern: &str,
    ) -> Result<u64, StoreError> {
        let mut cursor: u64 = 0;
        let mut count = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000);
            let reply = self
                .run(|mut conn| async move { conn.on_node(&node.host, node.port, scan).await })
                .await?;
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)
                .map_err(|err| StoreError::Command(err.to_string()))?;
            count += keys.len() as u64;
            if next == 0 {
                return Ok(count);
            }
            cursor = next;
        }
    }
}
