//! Walking keys under a pattern on Redis (SCAN, never KEYS; every primary of a cluster):
//! counting them here, deleting them in `redis.rs`.
//! Kept apart from `redis.rs` so the store's connection code and this read-only walk
//! change independently.

use super::redis::{glob_escape, ClusterNode, RedisStore, StoreError};

impl RedisStore {
    /// The servers a SCAN must visit: every primary of a cluster, or the one server.
    pub(super) async fn scan_targets(&self) -> Result<Vec<ClusterNode>, StoreError> {
        if self.is_cluster() {
            self.primaries().await
        } else {
            Ok(vec![ClusterNode::default()])
        }
    }

    /// One SCAN MATCH page on `node`: the next cursor (0 when done) and the keys found.
    pub(super) async fn scan_page(
        &self,
        node: &ClusterNode,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let reply = self
            .run(|mut conn| async move { conn.on_node(&node.host, node.port, scan).await })
            .await?;
        redis::from_redis_value(reply).map_err(|err| StoreError::Command(err.to_string()))
    }

    /// Keys whose names start with `prefix`, counted by walking SCAN MATCH.
    pub async fn count_prefixed(&self, prefix: &str) -> Result<u64, StoreError> {
        let pattern = format!("{}*", glob_escape(prefix));
        let mut count = 0;
        for node in &self.scan_targets().await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(node, &pattern, cursor).await?;
                count += keys.len() as u64;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(count)
    }
}
