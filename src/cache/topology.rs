//! Where keys live on a Redis Cluster: which URLs name a cluster, the slot of a key, and
//! hash tags that put a key's companions (its lock, its wake-up list) in the key's slot.

use std::sync::OnceLock;

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16_384;

/// A cluster URL split into one URL per seed node, each carrying the credentials and the
/// TLS choice of the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSeeds {
    pub nodes: Vec<String>,
    pub tls: bool,
}

/// Reads `redis+cluster://`, `valkey+cluster://` (and their TLS forms `rediss+cluster://`,
/// `valkeys+cluster://`), and a plain URL listing several `host:port` (the form the host
/// apps' deployment notes use). `Ok(None)` is a single-server URL; `Err` says what is wrong.
pub fn cluster_seeds(url: &str) -> Result<Option<ClusterSeeds>, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(None);
    };
    let (tls, explicit) = match scheme {
        "redis+cluster" | "valkey+cluster" => (false, true),
        "rediss+cluster" | "valkeys+cluster" => (true, true),
        "redis" | "valkey" => (false, false),
        "rediss" | "valkeys" => (true, false),
        _ => return Ok(None),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !explicit && !hosts.contains(',') {
        return Ok(None);
    }
    let db = path.trim_start_matches('/');
    let db = db.split('?').next().unwrap_or("");
    if !db.is_empty() && db != "0" {
        return Err(format!(
            "a cluster has only database 0, but the URL selects database {db}"
        ));
    }
    let query = path.find('?').map_or("", |i| &path[i..]);
    let node_scheme = if tls { "rediss" } else { "redis" };
    let mut nodes = Vec::new();
    for host in hosts.split(',') {
        let host = host.trim();
        if host.is_empty() {
            return Err("the cluster URL has an empty node in its list".into());
        }
        nodes.push(format!("{node_scheme}://{userinfo}{host}{query}"));
    }
    Ok(Some(ClusterSeeds { nodes, tls }))
}

/// The part of a key Redis hashes: the text between the first `{` and the next `}` when
/// that is not empty, else the whole key.
fn hashed_part(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// CRC16/XMODEM, the checksum Redis Cluster assigns slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`, as `CLUSTER KEYSLOT` answers.
pub fn slot_of(key: &[u8]) -> u16 {
    crc16(hashed_part(key)) % SLOTS
}

/// For each slot, a short tag that hashes to it. A companion key `{tag}|…` of `key` then
/// lives in `key`'s slot whatever characters `key` holds (braces included), so a script
/// can touch both on a cluster.
fn slot_tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u32 = 0;
        while missing > 0 {
            let tag = format!("{n:x}");
            let slot = usize::from(slot_of(tag.as_bytes()));
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// A key for `what` (`lock`, `done`, …) of the stored key `key`, in the same slot:
/// `{tag}|what|key`. Never a user key: those start with `{namespace}:` and namespaces
/// may not contain `|`, while this starts with `{hex}|`.
pub fn companion_key(key: &str, what: &str) -> String {
    let tag = &slot_tags()[usize::from(slot_of(key.as_bytes()))];
    format!("{{{tag}}}|{what}|{key}")
}

/// Which primary serves each slot, as `CLUSTER SLOTS` last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// (first slot, last slot, index into `nodes`), sorted by first slot.
    ranges: Vec<(u16, u16, usize)>,
    /// `(host, port)` of each primary.
    pub nodes: Vec<(String, u16)>,
}

impl SlotMap {
    pub fn new(ranges: impl IntoIterator<Item = (u16, u16, String, u16)>) -> Self {
        let mut map = SlotMap::default();
        for (first, last, host, port) in ranges {
            let node = match map.nodes.iter().position(|n| n.0 == host && n.1 == port) {
                Some(i) => i,
                None => {
                    map.nodes.push((host, port));
                    map.nodes.len() - 1
                }
            };
            map.ranges.push((first, last, node));
        }
        map.ranges.sort_unstable();
        map
    }

    /// How many slots each node serves, in `nodes` order.
    pub fn slot_counts(&self) -> Vec<u32> {
        let mut counts = vec![0; self.nodes.len()];
        for &(first, last, node) in &self.ranges {
            counts[node] += u32::from(last.saturating_sub(first)) + 1;
        }
        counts
    }

    fn node_of(&self, slot: u16) -> Option<usize> {
        let i = self
            .ranges
            .partition_point(|r| r.0 <= slot)
            .checked_sub(1)?;
        let (first, last, node) = self.ranges[i];
        (first..=last).contains(&slot).then_some(node)
    }

    /// The positions of `keys` grouped by the node serving them, or None when a slot has
    /// no known owner (the map is stale: route key by key instead).
    pub fn group<K: AsRef<[u8]>>(&self, keys: &[K]) -> Option<Vec<(usize, Vec<usize>)>> {
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let node = self.node_of(slot_of(key.as_ref()))?;
            match groups.iter_mut().find(|g| g.0 == node) {
                Some(group) => group.1.push(i),
                None => groups.push((node, vec![i])),
            }
        }
        Some(groups)
    }
}

/// `{name}`, a hash tag that keeps every key of one limiter (its per-key logs and its
/// shared pause) in one slot, so its scripts run on a cluster. A name that cannot be a tag
/// itself (empty, or holding braces) gets a tag of its own slot in front.
pub fn tagged(name: &str) -> String {
    if name.is_empty() || name.contains(['{', '}']) {
        let tag = &slot_tags()[usize::from(slot_of(name.as_bytes()))];
        format!("{{{tag}}}{name}")
    } else {
        format!("{{{name}}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Answers of CLUSTER KEYSLOT on a real server.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"hello"), 866);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(
            slot_of(b"foo{}{bar}"),
            slot_of(b"foo{}{bar}"),
            "empty tag: whole key"
        );
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
    }

    #[test]
    fn companions_share_the_slot_of_any_key() {
        for key in ["app:k", "app:{x}y", "app:a}b", "app:{}z", "", "ns:{", "é:ü"] {
            let lock = companion_key(key, "lock");
            assert_eq!(slot_of(lock.as_bytes()), slot_of(key.as_bytes()), "{key}");
            assert!(lock.ends_with(&format!("|lock|{key}")));
        }
        assert!(slot_tags().iter().all(|t| !t.is_empty() && t.len() <= 5));
    }

    #[test]
    fn tagged_names_keep_a_limiters_keys_together() {
        for name in ["up", "", "a{b", "x}y", "{}"] {
            let base = tagged(name);
            let log = format!("tenuto|limit|{base}:k:log");
            let pause = format!("tenuto|limit|{base}:pause");
            assert_eq!(
                slot_of(log.as_bytes()),
                slot_of(pause.as_bytes()),
                "{name:?}"
            );
        }
        assert_eq!(tagged("up"), "{up}");
    }

    #[test]
    fn slot_map_groups_keys_by_node() {
        let map = SlotMap::new([
            (0, 5460, "a".into(), 1),
            (10923, 16383, "c".into(), 3),
            (5461, 10922, "b".into(), 2),
        ]);
        assert_eq!(map.slot_counts(), [5461, 5461, 5462]);
        let keys = ["foo", "bar", "hello", "{bar}x"]; // slots 12182, 5061, 866, 5061
        let groups = map.group(&keys).unwrap();
        assert_eq!(groups, [(1, vec![0]), (0, vec![1, 2, 3])]);
        let partial = SlotMap::new([(0, 100, "a".into(), 1)]);
        assert_eq!(
            partial.group(&["foo"]),
            None,
            "an unowned slot: no grouping"
        );
        assert_eq!(partial.group(&["hello"]), None);
        assert_eq!(SlotMap::default().group::<&str>(&[]), Some(vec![]));
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(cluster_seeds("redis://localhost:6379/0"), Ok(None));
        assert_eq!(cluster_seeds("memory://"), Ok(None));
        let seeds = cluster_seeds("redis+cluster://:pw@a:7000,b:7001")
            .unwrap()
            .unwrap();
        assert_eq!(seeds.nodes, ["redis://:pw@a:7000", "redis://:pw@b:7001"]);
        assert!(!seeds.tls);
        let seeds = cluster_seeds("redis://a:6379, b:6379,c:6379")
            .unwrap()
            .unwrap();
        assert_eq!(seeds.nodes.len(), 3);
        assert_eq!(seeds.nodes[1], "redis://b:6379");
        let seeds = cluster_seeds("valkeys+cluster://u:p@h:1/?insecure")
            .unwrap()
            .unwrap();
        assert_eq!(seeds.nodes, ["rediss://u:p@h:1?insecure"]);
        assert!(seeds.tls);
        assert!(cluster_seeds("redis+cluster://a:1/3")
            .unwrap_err()
            .contains("database 3"));
        assert!(cluster_seeds("redis://a:1,,b:2")
            .unwrap_err()
            .contains("empty node"));
    }
}
