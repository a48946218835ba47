//! Leases: the right to run a named job, held by one holder until its TTL passes.
//!
//! A prewarm job takes its lease for one interval and does not give it back after the
//! run: the lease expiring *is* the schedule, so every process and host sharing a Redis
//! runs the job once per interval between them. On Redis a lease is one key,
//! `tenuto|lease|{namespace}|{job}`, holding the holder's name, taken with `SET NX PX`
//! on the server's clock. `|` keeps it out of every cache namespace (which may not
//! contain it), so no `clear()` reaches a lease. Without Redis (or while it is down) the
//! process keeps its own table, so each process schedules for itself.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::cache::redis::{RedisStore, StoreError};
use crate::error::{CoreError, CoreResult};
use crate::runtime;
use crate::sync::lock;

#[cfg(feature = "python")]
pub mod py;

/// What an attempt to take a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseReply {
    /// True when the caller holds the lease now.
    pub acquired: bool,
    /// Who holds it (the caller when `acquired`), None when nobody does.
    pub holder: Option<String>,
    /// Milliseconds until it expires (0 when nobody holds it).
    pub remaining_ms: i64,
}

impl LeaseReply {
    fn free() -> Self {
        LeaseReply {
            acquired: false,
            holder: None,
            remaining_ms: 0,
        }
    }
}

/// The Redis key of a job's lease.
pub fn lease_key(namespace: &str, job: &str) -> String {
    format!("tenuto|lease|{namespace}|{job}")
}

/// Job and holder names: non-empty text.
pub fn check_name(what: &str, name: &str) -> CoreResult<()> {
    if name.is_empty() {
        return Err(CoreError::invalid(format!("{what} must not be empty")));
    }
    Ok(())
}

/// Lease TTLs in whole milliseconds, at least 1 (PX refuses 0).
pub fn ttl_ms(seconds: f64) -> i64 {
    ((seconds * 1000.0).ceil() as i64).max(1)
}

/// In-process leases, for memory caches and while Redis is down. A forked child starts
/// with an empty table: the parent's leases name a process that does not run there.
pub struct MemoryLeases {
    /// The fork epoch the table belongs to, and per key: holder, expiry (epoch ms).
    table: Mutex<(u64, Table)>,
}

type Table = HashMap<String, (String, i64)>;

impl Default for MemoryLeases {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's table, shared by every cache object of one namespace.
pub fn memory() -> &'static MemoryLeases {
    static TABLE: std::sync::OnceLock<MemoryLeases> = std::sync::OnceLock::new();
    TABLE.get_or_init(MemoryLeases::new)
}

impl MemoryLeases {
    pub fn new() -> Self {
        MemoryLeases {
            table: Mutex::new((runtime::fork_epoch(), HashMap::new())),
        }
    }

    fn with<T>(&self, now_ms: i64, f: impl FnOnce(&mut Table) -> T) -> T {
        let mut guard = lock(&self.table);
        let epoch = runtime::fork_epoch();
        if guard.0 != epoch {
            *guard = (epoch, HashMap::new());
        }
        guard.1.retain(|_, (_, until)| *until > now_ms);
        f(&mut guard.1)
    }

    pub fn acquire(&self, key: &str, holder: &str, ttl_ms: i64, now_ms: i64) -> LeaseReply {
        self.with(now_ms, |table| match table.get(key) {
            Some((current, until)) => LeaseReply {
                acquired: false,
                holder: Some(current.clone()),
                remaining_ms: until - now_ms,
            },
            None => {
                table.insert(key.to_owned(), (holder.to_owned(), now_ms + ttl_ms));
                LeaseReply {
                    acquired: true,
                    holder: Some(holder.to_owned()),
                    remaining_ms: ttl_ms,
                }
            }
        })
    }

    /// Sets a new TTL from now, only while `holder` holds the lease.
    pub fn renew(&self, key: &str, holder: &str, ttl_ms: i64, now_ms: i64) -> bool {
        self.with(now_ms, |table| match table.get_mut(key) {
            Some((current, until)) if current == holder => {
                *until = now_ms + ttl_ms;
                true
            }
            _ => false,
        })
    }

    /// Gives the lease up, only while `holder` holds it.
    pub fn release(&self, key: &str, holder: &str, now_ms: i64) -> bool {
        self.with(now_ms, |table| match table.get(key) {
            Some((current, _)) if current == holder => {
                table.remove(key);
                true
            }
            _ => false,
        })
    }

    pub fn holder(&self, key: &str, now_ms: i64) -> LeaseReply {
        self.with(now_ms, |table| match table.get(key) {
            Some((current, until)) => LeaseReply {
                acquired: false,
                holder: Some(current.clone()),
                remaining_ms: until - now_ms,
            },
            None => LeaseReply::free(),
        })
    }
}

// One script per decision, each on the one declared key: take it unless held (and say
// who holds it for how long), renew or release it only for its holder.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, ARGV[1], tonumber(ARGV[2])}
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";
const HOLDER: &str = r"
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
";

fn script(cell: &'static std::sync::OnceLock<redis::Script>, text: &str) -> &'static redis::Script {
    cell.get_or_init(|| redis::Script::new(text))
}

fn reply(acquired: i64, holder: Option<String>, pttl: i64) -> LeaseReply {
    match holder {
        Some(holder) => LeaseReply {
            acquired: acquired == 1,
            holder: Some(holder),
            remaining_ms: pttl.max(0),
        },
        None => LeaseReply::free(),
    }
}

pub async fn redis_acquire(
    store: &RedisStore,
    key: String,
    holder: String,
    ttl_ms: i64,
) -> Result<LeaseReply, StoreError> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = script(&SCRIPT, ACQUIRE);
    let (acquired, holder, pttl): (i64, Option<String>, i64) = store
        .run(|mut conn| async move {
            script
                .key(key)
                .arg(holder)
                .arg(ttl_ms)
                .invoke_async(&mut conn)
                .await
        })
        .await?;
    Ok(reply(acquired, holder, pttl))
}

pub async fn redis_renew(
    store: &RedisStore,
    key: String,
    holder: String,
    ttl_ms: i64,
) -> Result<bool, StoreError> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = script(&SCRIPT, RENEW);
    let done: i64 = store
        .run(|mut conn| async move {
            script
                .key(key)
                .arg(holder)
                .arg(ttl_ms)
                .invoke_async(&mut conn)
                .await
        })
        .await?;
    Ok(done == 1)
}

pub async fn redis_release(
    store: &RedisStore,
    key: String,
    holder: String,
) -> Result<bool, StoreError> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = script(&SCRIPT, RELEASE);
    let done: i64 = store
        .run(|mut conn| async move { script.key(key).arg(holder).invoke_async(&mut conn).await })
        .await?;
    Ok(done == 1)
}

pub async fn redis_holder(store: &RedisStore, key: String) -> Result<LeaseReply, StoreError> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    let script = script(&SCRIPT, HOLDER);
    let (holder, pttl): (Option<String>, i64) = store
        .run(|mut conn| async move { script.key(key).invoke_async(&mut conn).await })
        .await?;
    Ok(reply(0, holder, pttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_until_expiry() {
        let leases = MemoryLeases::new();
        let first = leases.acquire("k", "a", 1000, 0);
        assert!(first.acquired);
        let second = leases.acquire("k", "b", 1000, 400);
        assert_eq!(
            second,
            LeaseReply {
                acquired: false,
                holder: Some("a".into()),
                remaining_ms: 600
            }
        );
        assert!(leases.acquire("k", "b", 1000, 1000).acquired, "expired");
        assert_eq!(leases.holder("k", 1500).holder.as_deref(), Some("b"));
        assert_eq!(leases.holder("k", 2000), LeaseReply::free());
    }

    #[test]
    fn renew_and_release_only_for_the_holder() {
        let leases = MemoryLeases::new();
        assert!(leases.acquire("k", "a", 1000, 0).acquired);
        assert!(!leases.renew("k", "b", 5000, 100));
        assert!(leases.renew("k", "a", 5000, 900));
        assert_eq!(leases.holder("k", 1000).remaining_ms, 4900);
        assert!(!leases.release("k", "b", 1000));
        assert!(leases.release("k", "a", 1000));
        assert!(!leases.renew("k", "a", 5000, 1000), "released");
        assert!(leases.acquire("k", "b", 1000, 1000).acquired);
    }

    #[test]
    fn names_and_keys() {
        assert!(check_name("job", "").is_err());
        assert_eq!(lease_key("app", "warm:x"), "tenuto|lease|app|warm:x");
        assert_eq!(ttl_ms(0.0001), 1);
        assert_eq!(ttl_ms(1.5), 1500);
    }
}
