//! The Redis/Valkey store: bytes in, bytes out, with fail-open health tracking.
//!
//! One multiplexed connection per process (tagged with the fork epoch, so a forked child
//! opens its own). The first failure that looks like an outage (I/O error, timeout,
//! refused) marks the store down: from then on calls return `Unavailable` at once, without
//! waiting, and a background task reconnects with backoff and marks it up again.
//! Logging happens outside the state lock: pyo3-log calls into Python.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::try_join_all;
use redis::{ErrorKind, RedisError};

use super::conn::{Client, Conn};
use super::engine::{FlightKeys, LockReply, Remote};
use super::local::{Invalidated, Invalidation, Listener};
use super::topology::{self, SlotMap};
use crate::error::{CoreError, CoreResult};
use crate::runtime;

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Ask the server to push invalidations of keys under this prefix (a local tier).
    pub tracking_prefix: Option<String>,
}

/// Why a Redis call did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Unreachable, timed out, or marked down: serve from memory.
    Unavailable(String),
    /// The server answered with an error (OOM, wrong type, script error...).
    Command(String),
}

impl From<StoreError> for CoreError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(msg) => CoreError::BackendUnavailable(msg),
            StoreError::Command(msg) => CoreError::Backend(msg),
        }
    }
}

struct ConnState {
    epoch: u64,
    /// Bumped whenever `conn` is replaced: a failure seen on an older connection (a
    /// command that was in flight when the store reconnected) does not mark the new one
    /// down.
    generation: u64,
    conn: Option<Conn>,
    down: bool,
    reconnecting: bool,
    last_error: String,
}

pub struct RedisStore {
    client: Client,
    config: RedisConfig,
    /// URL without its password, for logs and stats.
    pub display_url: String,
    state: Mutex<ConnState>,
    /// Connections for blocking waits (BLPOP), which would stall every other command on
    /// the shared multiplexed connection. Tagged with the fork epoch they were made in.
    blocking: Mutex<(u64, Vec<Conn>)>,
    policy_checked: std::sync::atomic::AtomicBool,
    eviction_policy: Mutex<Option<String>>,
    /// A cluster's slot owners, read once and forgotten at the first sign it is stale.
    slot_map: Mutex<Option<Arc<SlotMap>>>,
    /// The local tier's listener, told of pushed invalidations and of new connections.
    listener: Mutex<Option<Listener>>,
    invalidated_by: Mutex<Invalidated>,
    /// Woken when the store is marked down: waits that would not notice (a BLPOP on its
    /// own connection) give up at once.
    went_down: tokio::sync::Notify,
    pub outages: AtomicU64,
    me: Weak<RedisStore>,
}

/// How many `connect_timeout`s a cluster connection may take (discovery, then primaries).
const CLUSTER_CONNECT_STEPS: u32 = 4;
/// Idle blocking connections kept per process.
const BLOCKING_POOL: usize = 4;
/// How long the wake-up list of a finished load lives (waiters pop it within this).
const WAKE_LIST_MS: u64 = 10_000;

/// Redis URL schemes tenuto accepts (the `+cluster` ones name a Redis Cluster's seeds).
pub const SCHEMES: [&str; 8] = [
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "redis+cluster",
    "rediss+cluster",
    "valkey+cluster",
    "valkeys+cluster",
];

pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".into()
            };
            format!("{}{}{}", &url[..scheme_end + 3], masked, &url[at..])
        }
        _ => url.to_string(),
    }
}

fn is_outage(err: &RedisError) -> bool {
    !matches!(
        err.kind(),
        ErrorKind::Server(_)
            | ErrorKind::Extension
            | ErrorKind::UnexpectedReturnType
            | ErrorKind::Parse
    )
}

impl RedisStore {
    pub fn new(config: RedisConfig) -> CoreResult<Arc<Self>> {
        let display_url = redact(&config.url);
        let invalid =
            |err: String| CoreError::invalid(format!("invalid Redis URL {display_url}: {err}"));
        let seeds = topology::cluster_seeds(&config.url).map_err(invalid)?;
        if config.url.starts_with("rediss") || config.url.starts_with("valkeys") {
            // rustls needs a process-wide crypto provider; a second install is a no-op error.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let resp3 = config.tracking_prefix.is_some() && seeds.is_none();
        let client =
            Client::open(&config.url, seeds, resp3).map_err(|err| invalid(err.to_string()))?;
        // Redis numbers its databases with an int; a bigger index can never be selected,
        // and would otherwise look like an outage that reconnects forever.
        let db = client.db();
        if !(0..=i64::from(i32::MAX)).contains(&db) {
            return Err(CoreError::invalid(format!(
                "invalid Redis URL {display_url}: database index {db} is out of range (0 to {})",
                i32::MAX
            )));
        }
        Ok(Arc::new_cyclic(|me| Self {
            client,
            config,
            display_url,
            state: Mutex::new(ConnState {
                epoch: runtime::fork_epoch(),
                generation: 0,
                conn: None,
                down: false,
                reconnecting: false,
                last_error: String::new(),
            }),
            blocking: Mutex::new((runtime::fork_epoch(), Vec::new())),
            policy_checked: std::sync::atomic::AtomicBool::new(false),
            eviction_policy: Mutex::new(None),
            slot_map: Mutex::new(None),
            listener: Mutex::new(None),
            invalidated_by: Mutex::new(Invalidated::Pending),
            went_down: tokio::sync::Notify::new(),
            outages: AtomicU64::new(0),
            me: me.clone(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ConnState> {
        let mut state = crate::sync::lock(&self.state);
        let epoch = runtime::fork_epoch();
        if state.epoch != epoch {
            // Forked: the parent's connection and reconnect task belong to a runtime that
            // does not run here. Leak the connection (its driver is gone) and start clean.
            std::mem::forget(state.conn.take());
            *state = ConnState {
                epoch,
                generation: state.generation + 1,
                conn: None,
                down: false,
                reconnecting: false,
                last_error: String::new(),
            };
        }
        state
    }

    /// True while the store is marked down: callers go to memory without waiting.
    pub fn is_down(&self) -> bool {
        self.lock().down
    }

    pub fn last_error(&self) -> String {
        self.lock().last_error.clone()
    }

    pub fn is_cluster(&self) -> bool {
        self.client.is_cluster()
    }

    /// The URL as given, password included (for other tenuto objects sharing this Redis;
    /// never for logs or display, which use `display_url`).
    pub fn connection_url(&self) -> &str {
        &self.config.url
    }

    async fn connect(&self) -> Result<Conn, String> {
        let push = self.config.tracking_prefix.as_ref().map(|_| {
            let me = self.me.clone();
            Arc::new(move |info: redis::PushInfo| {
                if let Some(store) = me.upgrade() {
                    store.on_push(info);
                }
            }) as super::conn::PushHandler
        });
        let attempt = self.client.connect(
            self.config.connect_timeout,
            Some(self.config.command_timeout),
            push,
        );
        // `connect_timeout` bounds each TCP connect; a cluster connection also asks for the
        // slot map and connects to every primary, so it gets a few of them.
        let budget = if self.is_cluster() {
            self.config.connect_timeout * CLUSTER_CONNECT_STEPS
        } else {
            self.config.connect_timeout
        };
        match tokio::time::timeout(budget, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("connect timed out after {budget:?}")),
        }
    }

    /// The shared connection and its generation.
    async fn connection(&self) -> Result<(Conn, u64), StoreError> {
        let generation = {
            let state = self.lock();
            if state.down {
                return Err(StoreError::Unavailable(state.last_error.clone()));
            }
            if let Some(conn) = &state.conn {
                return Ok((conn.clone(), state.generation));
            }
            state.generation
        };
        match self.connect().await {
            Ok(conn) => {
                let conn = {
                    let mut state = self.lock();
                    // Another caller may have connected meanwhile; keep the first.
                    if state.conn.is_none() {
                        state.generation += 1;
                    }
                    (state.conn.get_or_insert(conn).clone(), state.generation)
                };
                self.check_eviction_policy(conn.0.clone());
                self.start_tracking(conn.0.clone()).await;
                Ok(conn)
            }
            Err(reason) => {
                self.mark_down(generation, reason.clone());
                Err(StoreError::Unavailable(reason))
            }
        }
    }

    /// Marks the store down after a failure on connection `generation`; a failure on an
    /// older connection than the current one is that command's alone.
    /// On a new shared connection: asks a single server to push invalidations of the
    /// local tier's keys (broadcast mode on the namespace prefix; NOLOOP: not our own
    /// writes).
    async fn start_tracking(&self, mut conn: Conn) {
        let Some(prefix) = &self.config.tracking_prefix else {
            return;
        };
        let by = if self.is_cluster() {
            Invalidated::ByTtlOnly
        } else {
            let mut tracking = redis::cmd("CLIENT");
            tracking
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg(prefix)
                .arg("NOLOOP");
            let reply = tokio::time::timeout(
                self.config.command_timeout,
                tracking.query_async::<()>(&mut conn),
            )
            .await;
            match reply {
                Ok(Ok(())) => Invalidated::ByServer,
                Ok(Err(err)) => {
                    log::debug!(target: "tenuto::cache", "CLIENT TRACKING refused: {err}");
                    Invalidated::ByTtlOnly
                }
                Err(_) => Invalidated::ByTtlOnly,
            }
        };
        let before = std::mem::replace(&mut *crate::sync::lock(&self.invalidated_by), by);
        if by == Invalidated::ByTtlOnly && before != Invalidated::ByTtlOnly {
            log::warn!(
                target: "tenuto::cache",
                "Redis at {} does not push invalidations to this client{}: the local tier \
                 serves each copy for local_ttl at most, and other processes' writes show \
                 only after that",
                self.display_url,
                if self.is_cluster() { " (a cluster)" } else { "" }
            );
        }
    }

    fn notify(&self, what: Invalidation) {
        let listener = crate::sync::lock(&self.listener).clone();
        if let Some(listener) = listener {
            listener(what);
        }
    }

    /// What the server pushed on the shared connection.
    fn on_push(&self, info: redis::PushInfo) {
        match info.kind {
            redis::PushKind::Invalidate => {
                let what = match info.data.into_iter().next() {
                    Some(redis::Value::Array(keys)) => Invalidation::Keys(
                        keys.into_iter()
                            .filter_map(|k| redis::from_redis_value::<Vec<u8>>(k).ok())
                            .collect(),
                    ),
                    _ => Invalidation::All, // nil: the server flushed
                };
                self.notify(what);
            }
            redis::PushKind::Disconnection => self.notify(Invalidation::All),
            _ => {}
        }
    }

    fn mark_down(&self, generation: u64, reason: String) {
        let first = {
            let mut state = self.lock();
            if state.generation != generation {
                return;
            }
            state.conn = None;
            state.last_error = reason.clone();
            let first = !state.down;
            state.down = true;
            let start_reconnect = !state.reconnecting;
            state.reconnecting = true;
            if start_reconnect {
                if let Some(me) = self.me.upgrade() {
                    runtime::handle().spawn(reconnect_loop(Arc::downgrade(&me)));
                }
            }
            first
        };
        self.went_down.notify_waiters();
        if first {
            self.outages.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                target: "tenuto::cache",
                "Redis at {} is unavailable ({reason}); serving from memory until it is back",
                self.display_url
            );
        }
    }

    /// Runs one command (or pipeline) with the command timeout; outages mark the store down.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let (conn, generation) = self.connection().await?;
        match tokio::time::timeout(self.config.command_timeout, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) if !is_outage(&err) => Err(StoreError::Command(err.to_string())),
            Ok(Err(err)) => {
                let reason = err.to_string();
                self.mark_down(generation, reason.clone());
                Err(StoreError::Unavailable(reason))
            }
            Err(_) => {
                let reason = format!("command timed out after {:?}", self.config.command_timeout);
                self.mark_down(generation, reason.clone());
                Err(StoreError::Unavailable(reason))
            }
        }
    }

    pub async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
    }

    pub async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if self.is_cluster() {
            let gets = keys.iter().map(|k| {
                let mut get = redis::cmd("GET");
                get.arg(k);
                get
            });
            if let Some(values) = self.per_node(gets.collect(), &keys).await? {
                return values
                    .into_iter()
                    .map(redis::from_redis_value)
                    .collect::<Result<_, _>>()
                    .map_err(|err| StoreError::Command(err.to_string()));
            }
            // A stale slot map: the cluster client splits MGET by slot itself.
        }
        self.run(
            |mut conn| async move { redis::cmd("MGET").arg(keys).query_async(&mut conn).await },
        )
        .await
    }

    /// SETs (with TTLs in seconds) and DELs in one round trip (one pipeline per primary on
    /// a cluster), applied in order, nothing read back.
    pub async fn write_many(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
    ) -> Result<(), StoreError> {
        self.set_then_delete(sets, deletes, false).await.map(drop)
    }

    /// Like `write_many`, but each SET returns the value it replaced (`SET … GET`), in
    /// the order of `sets`.
    pub async fn swap_many(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.set_then_delete(sets, deletes, true)
            .await?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(|err| StoreError::Command(err.to_string()))
    }

    /// The SETs' replies (the replaced values with `get`), then one DEL of `deletes`.
    async fn set_then_delete(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
        get: bool,
    ) -> Result<Vec<redis::Value>, StoreError> {
        if sets.is_empty() && deletes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = sets.iter().map(|s| s.0.clone()).collect();
        let commands: Vec<redis::Cmd> = sets
            .into_iter()
            .map(|(key, value, seconds)| {
                let mut set = redis::cmd("SET");
                set.arg(key).arg(value).arg("EX").arg(seconds);
                if get {
                    set.arg("GET");
                }
                set
            })
            .collect();
        if !self.is_cluster() {
            return self
                .run(|mut conn| async move {
                    let mut pipe = redis::pipe();
                    for command in commands {
                        pipe.add_command(command);
                    }
                    if !deletes.is_empty() {
                        pipe.cmd("DEL").arg(deletes).ignore();
                    }
                    pipe.query_async(&mut conn).await
                })
                .await;
        }
        // A cluster takes a pipeline only within one slot: one per primary from the slot
        // map, or, while the map is stale, one command per key sent together (the cluster
        // client routes each).
        let replies = match self.per_node(commands.clone(), &keys).await? {
            Some(replies) => replies,
            None => {
                self.run(|conn| async move {
                    let sent = commands.into_iter().map(|command| {
                        let mut conn = conn.clone();
                        async move { command.query_async::<redis::Value>(&mut conn).await }
                    });
                    try_join_all(sent).await
                })
                .await?
            }
        };
        if !deletes.is_empty() {
            self.delete(deletes).await?;
        }
        Ok(replies)
    }

    /// Deletes `key` only while its JSON record has `field == expected` (one script).
    pub async fn unlink_if_names(
        &self,
        key: String,
        field: String,
        expected: String,
    ) -> Result<(), StoreError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = script(&SCRIPT, include_str!("scripts/unlink_if_names.lua"));
        self.run(|mut conn| async move {
            script
                .key(key)
                .arg(field)
                .arg(expected)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(drop)
    }

    pub async fn delete(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        self.run(|mut conn| async move { redis::cmd("DEL").arg(keys).query_async(&mut conn).await })
            .await
    }

    /// Deletes every key matching `pattern` with SCAN + UNLINK (never KEYS, which blocks the
    /// server), on every primary of a cluster. Returns how many keys were removed.
    async fn delete_matching(&self, pattern: String) -> Result<u64, StoreError> {
        let mut removed = 0;
        for node in &self.scan_targets().await? {
            let mut cursor = 0;
            loop {
                let (next, keys) = self.scan_page(node, &pattern, cursor).await?;
                if !keys.is_empty() {
                    // UNLINK of many keys: a cluster connection splits it by slot.
                    removed += self
                        .run(|mut conn| async move {
                            redis::cmd("UNLINK")
                                .arg(keys)
                                .query_async::<u64>(&mut conn)
                                .await
                        })
                        .await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }

    /// Each primary of a cluster with its slots and whether it answers PING now (for
    /// `stats()`). Empty for a single server, or when the slot map cannot be read.
    pub async fn node_health(&self) -> Vec<(ClusterNode, bool)> {
        if !self.is_cluster() {
            return Vec::new();
        }
        let Ok(nodes) = self.primaries().await else {
            return Vec::new();
        };
        let Ok((conn, _)) = self.connection().await else {
            return nodes.into_iter().map(|n| (n, false)).collect();
        };
        let pings = nodes.into_iter().map(|node| {
            let mut conn = conn.clone();
            async move {
                let ping = conn.on_node(&node.host, node.port, redis::cmd("PING"));
                let up = matches!(
                    tokio::time::timeout(self.config.command_timeout, ping).await,
                    Ok(Ok(_))
                );
                (node, up)
            }
        });
        futures_util::future::join_all(pings).await
    }

    /// The cluster's primaries and how many slots each serves (`CLUSTER SLOTS`, read now).
    pub async fn primaries(&self) -> Result<Vec<ClusterNode>, StoreError> {
        crate::sync::lock(&self.slot_map).take();
        let map = self.slot_map().await?;
        Ok(map
            .nodes
            .iter()
            .zip(map.slot_counts())
            .map(|((host, port), slots)| ClusterNode {
                host: host.clone(),
                port: *port,
                slots,
            })
            .collect())
    }

    /// The slot map, read with `CLUSTER SLOTS` when there is none.
    async fn slot_map(&self) -> Result<Arc<SlotMap>, StoreError> {
        if let Some(map) = crate::sync::lock(&self.slot_map).clone() {
            return Ok(map);
        }
        let reply: redis::Value = self
            .run(|mut conn| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let map = Arc::new(SlotMap::new(slot_ranges(reply)));
        if map.nodes.is_empty() {
            return Err(StoreError::Command("CLUSTER SLOTS named no primary".into()));
        }
        *crate::sync::lock(&self.slot_map) = Some(Arc::clone(&map));
        Ok(map)
    }

    /// Sends `commands` (one per key of `keys`) to the primaries serving the keys, one
    /// pipeline per node: one round trip per shard, answers in input order. Ok(None) when
    /// the slot map turns out stale (a key moved, a failover): the map is forgotten and the
    /// caller routes key by key instead.
    async fn per_node(
        &self,
        commands: Vec<redis::Cmd>,
        keys: &[String],
    ) -> Result<Option<Vec<redis::Value>>, StoreError> {
        let map = self.slot_map().await?;
        let Some(groups) = map.group(keys) else {
            crate::sync::lock(&self.slot_map).take();
            return Ok(None);
        };
        let mut commands: Vec<Option<redis::Cmd>> = commands.into_iter().map(Some).collect();
        let batches = groups.into_iter().map(|(node, positions)| {
            let mut pipe = redis::pipe();
            for &i in &positions {
                if let Some(cmd) = commands[i].take() {
                    pipe.add_command(cmd);
                }
            }
            let (host, port) = map.nodes[node].clone();
            let count = positions.len();
            async move {
                let values =
                    self.run(|mut conn| async move {
                        conn.pipeline_on_node(&host, port, pipe, count).await
                    })
                    .await;
                (positions, values)
            }
        });
        let mut out = vec![redis::Value::Nil; keys.len()];
        for (positions, values) in futures_util::future::join_all(batches).await {
            let values = match values {
                Ok(values) if values.len() == positions.len() => values,
                Ok(_) | Err(StoreError::Command(_)) => {
                    crate::sync::lock(&self.slot_map).take();
                    return Ok(None);
                }
                Err(err) => {
                    // A node that does not answer may have failed over: read the map again.
                    crate::sync::lock(&self.slot_map).take();
                    return Err(err);
                }
            };
            if values
                .iter()
                .any(|v| matches!(v, redis::Value::ServerError(_)))
            {
                crate::sync::lock(&self.slot_map).take();
                return Ok(None);
            }
            for (i, value) in positions.into_iter().zip(values) {
                out[i] = value;
            }
        }
        Ok(Some(out))
    }

    /// One admission attempt of a shared rate limit (sliding log + spacing + pause, on
    /// the server's clock). See `limit::REDIS_SCRIPT` for the reply.
    pub async fn limit_attempt(
        &self,
        keys: [String; 3],
        args: [i64; 4],
        member: String,
    ) -> Result<SharedDecision, StoreError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| redis::Script::new(crate::limit::REDIS_SCRIPT));
        let (admitted, wait, now, used, reset): (i64, i64, i64, i64, i64) = self
            .run(|mut conn| async move {
                let mut invocation = script.prepare_invoke();
                invocation.key(&keys[0]).key(&keys[1]).key(&keys[2]);
                for arg in args {
                    invocation.arg(arg);
                }
                invocation.arg(member);
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(SharedDecision {
            admitted: admitted == 1,
            wait_us: wait,
            now_us: now,
            used: used.max(0) as u32,
            reset_us: reset.max(0),
        })
    }

    /// Takes one of `max` concurrency leases (a sorted set scored by expiry on the server's
    /// clock): a holder that dies frees its lease when `ttl_ms` runs out.
    pub async fn lease(
        &self,
        key: String,
        max: i64,
        ttl_ms: i64,
        token: String,
    ) -> Result<bool, StoreError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| redis::Script::new(crate::limit::LEASE_SCRIPT));
        let taken: i64 = self
            .run(|mut conn| async move {
                script
                    .key(key)
                    .arg(max)
                    .arg(ttl_ms)
                    .arg(token)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(taken == 1)
    }

    pub async fn unlease(&self, key: String, token: String) -> Result<(), StoreError> {
        self.run(|mut conn| async move {
            redis::cmd("ZREM")
                .arg(key)
                .arg(token)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// One step of a shared circuit breaker (see `limit::BREAKER_SCRIPT`).
    pub async fn breaker_step(
        &self,
        key: String,
        args: [String; 5],
    ) -> Result<(i64, i64), StoreError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = SCRIPT.get_or_init(|| redis::Script::new(crate::limit::BREAKER_SCRIPT));
        self.run(|mut conn| async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(key);
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// Pauses a shared limit for `ms` milliseconds (extending, never shortening, a pause).
    pub async fn limit_pause(&self, key: String, ms: i64) -> Result<(), StoreError> {
        self.run(|mut conn| async move {
            let current: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await?;
            if current < ms {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(ms.max(1))
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(())
        })
        .await
    }

    /// The finishing script alone: writes the value (if any), releases the lock, wakes
    /// the waiters.
    async fn finish_script(
        &self,
        keys: &FlightKeys,
        write: Option<(Vec<u8>, u64)>,
        token: &str,
    ) -> Result<(), StoreError> {
        let script = finish_script_text();
        let (flag, value, seconds) = match write {
            Some((value, seconds)) => ("1", value, seconds),
            None => ("0", Vec::new(), 0),
        };
        self.run(|mut conn| async move {
            script
                .key(&keys.value)
                .key(&keys.lock)
                .key(&keys.waiters)
                .key(&keys.done)
                .arg(token)
                .arg(flag)
                .arg(value)
                .arg(seconds)
                .arg(WAKE_LIST_MS)
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Reads the server's `maxmemory-policy` once per process, in the background. Under an
    /// `allkeys-*` policy Redis may evict limiter, breaker and lock keys like any cache
    /// entry (a limiter then forgets what it admitted): one warning says so, and `stats()`
    /// shows the policy. Servers that refuse CONFIG (managed services) are left alone.
    fn check_eviction_policy(&self, mut conn: Conn) {
        if self
            .policy_checked
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        runtime::handle().spawn(async move {
            let mut config_get = redis::cmd("CONFIG");
            config_get.arg("GET").arg("maxmemory-policy");
            // A map in RESP3, pairs in RESP2: both read as one.
            let reply: Result<std::collections::HashMap<String, String>, _> =
                config_get.query_async(&mut conn).await;
            let Some(policy) = reply.ok().and_then(|r| r.into_values().next()) else {
                return;
            };
            if policy.starts_with("allkeys-") {
                log::warn!(
                    target: "tenuto::cache",
                    "Redis at {} evicts any key under memory pressure (maxmemory-policy {policy}): \
                     rate-limiter, breaker and lock state may be evicted with cache entries; use a \
                     volatile-* or noeviction policy, or a separate Redis, for them",
                    me.display_url
                );
            }
            *crate::sync::lock(&me.eviction_policy) = Some(policy);
        });
    }

    /// The server's `maxmemory-policy`, once read (None before, or when CONFIG is refused).
    pub fn eviction_policy(&self) -> Option<String> {
        crate::sync::lock(&self.eviction_policy).clone()
    }

    fn take_blocking(&self) -> Option<Conn> {
        let mut pool = crate::sync::lock(&self.blocking);
        let epoch = runtime::fork_epoch();
        if pool.0 != epoch {
            // Connections of the parent process: their driver tasks do not run here.
            std::mem::forget(std::mem::take(&mut pool.1));
            pool.0 = epoch;
        }
        pool.1.pop()
    }

    fn give_back_blocking(&self, conn: Conn) {
        let mut pool = crate::sync::lock(&self.blocking);
        if pool.0 == runtime::fork_epoch() && pool.1.len() < BLOCKING_POOL {
            pool.1.push(conn);
        }
    }

    async fn blocking_connection(&self) -> Result<Conn, StoreError> {
        if self.is_down() {
            return Err(StoreError::Unavailable(self.last_error()));
        }
        if let Some(conn) = self.take_blocking() {
            return Ok(conn);
        }
        let attempt = self.client.connect(self.config.connect_timeout, None, None);
        let budget = if self.is_cluster() {
            self.config.connect_timeout * CLUSTER_CONNECT_STEPS
        } else {
            self.config.connect_timeout
        };
        match tokio::time::timeout(budget, attempt).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(err)) => Err(StoreError::Unavailable(err.to_string())),
            Err(_) => Err(StoreError::Unavailable("connect timed out".into())),
        }
    }

    async fn ping(&self, conn: &mut Conn) -> Result<(), String> {
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(conn);
        match tokio::time::timeout(self.config.command_timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("PING timed out".into()),
        }
    }
}

fn script(cell: &'static std::sync::OnceLock<redis::Script>, text: &str) -> &'static redis::Script {
    cell.get_or_init(|| redis::Script::new(text))
}

fn finish_script_text() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    script(&SCRIPT, include_str!("scripts/finish.lua"))
}

impl Remote for RedisStore {
    fn is_down(&self) -> bool {
        RedisStore::is_down(self)
    }

    fn down_reason(&self) -> String {
        format!("Redis at {}: {}", self.display_url, self.last_error())
    }

    fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    fn watch(&self, listener: Listener) {
        *crate::sync::lock(&self.listener) = Some(listener);
    }

    fn invalidated_by(&self) -> Invalidated {
        *crate::sync::lock(&self.invalidated_by)
    }

    async fn get(&self, key: String) -> Result<Option<Vec<u8>>, StoreError> {
        RedisStore::get(self, key).await
    }

    async fn mget(&self, keys: Vec<String>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        RedisStore::mget(self, keys).await
    }

    async fn write_many(
        &self,
        sets: Vec<(String, Vec<u8>, u64)>,
        deletes: Vec<String>,
    ) -> Result<(), StoreError> {
        RedisStore::write_many(self, sets, deletes).await
    }

    async fn delete(&self, keys: Vec<String>) -> Result<u64, StoreError> {
        RedisStore::delete(self, keys).await
    }

    async fn delete_prefixed(&self, prefix: String) -> Result<u64, StoreError> {
        self.delete_matching(format!("{}*", glob_escape(&prefix)))
            .await
    }

    async fn read_or_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        lock_ttl: Duration,
        now: i64,
    ) -> Result<(Option<Vec<u8>>, LockReply), StoreError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let script = script(&SCRIPT, include_str!("scripts/read_or_lock.lua"));
        let millis = lock_ttl.as_millis().max(1) as u64;
        let (value, answer): (Option<Vec<u8>>, i64) = self
            .run(|mut conn| async move {
                script
                    .key(&keys.value)
                    .key(&keys.lock)
                    .key(&keys.waiters)
                    .arg(token)
                    .arg(millis)
                    .arg(now)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let reply = match answer {
            0 => LockReply::NotNeeded,
            1 => LockReply::Taken,
            _ => LockReply::HeldElsewhere,
        };
        Ok((value, reply))
    }

    async fn try_lock(
        &self,
        keys: &FlightKeys,
        token: &str,
        lock_ttl: Duration,
    ) -> Result<bool, StoreError> {
        let millis = lock_ttl.as_millis().max(1) as u64;
        let reply: Option<String> = self
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(&keys.lock)
                    .arg(token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(reply.is_some())
    }

    async fn finish(
        &self,
        keys: &FlightKeys,
        write: Option<(Vec<u8>, u64)>,
        token: &str,
    ) -> Result<(), StoreError> {
        let script = finish_script_text();
        if self.config.tracking_prefix.is_some() {
            if let Some((value, seconds)) = write {
                // With a local tier the value goes in a plain SET, pipelined before the
                // script: Redis 7.0 echoes a script's writes back to the writer despite
                // NOLOOP, which would drop this process's fresh local copy.
                let pipelined = self
                    .run(|mut conn| async move {
                        let mut pipe = redis::pipe();
                        pipe.cmd("SET")
                            .arg(&keys.value)
                            .arg(value)
                            .arg("EX")
                            .arg(seconds)
                            .ignore();
                        pipe.cmd("EVALSHA")
                            .arg(script.get_hash())
                            .arg(4)
                            .arg(&keys.value)
                            .arg(&keys.lock)
                            .arg(&keys.waiters)
                            .arg(&keys.done)
                            .arg(token)
                            .arg("0")
                            .arg("")
                            .arg(0)
                            .arg(WAKE_LIST_MS)
                            .ignore();
                        pipe.query_async::<()>(&mut conn).await
                    })
                    .await;
                return match pipelined {
                    // The script was not loaded yet: the SET is done; release and wake.
                    Err(StoreError::Command(msg))
                        if msg.to_ascii_uppercase().contains("NOSCRIPT") =>
                    {
                        self.finish_script(keys, None, token).await
                    }
                    other => other,
                };
            }
        }
        self.finish_script(keys, write, token).await
    }

    async fn wait_done(&self, keys: &FlightKeys, timeout: Duration) -> Result<bool, StoreError> {
        // Registered before the check, so a mark-down in between is not missed.
        let went_down = self.went_down.notified();
        tokio::pin!(went_down);
        went_down.as_mut().enable();
        if self.is_down() {
            return Err(StoreError::Unavailable(self.last_error()));
        }
        tokio::select! {
            waited = self.wait_done_on_own_connection(keys, timeout) => waited,
            () = &mut went_down => Err(StoreError::Unavailable(
                "Redis was marked down while waiting for another process's load".into(),
            )),
        }
    }
}

impl RedisStore {
    /// BLPOP in slices of half a `command_timeout`: a server that stops answering is
    /// noticed (and the store marked down) within 1.5 command timeouts, not after the
    /// whole wait.
    async fn wait_done_on_own_connection(
        &self,
        keys: &FlightKeys,
        timeout: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.blocking_connection().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                self.give_back_blocking(conn);
                return Ok(false);
            }
            let slice = left.min(self.config.command_timeout / 2);
            // BLPOP takes seconds with decimals (Redis 6+); 0 would mean "forever".
            let mut blpop = redis::cmd("BLPOP");
            blpop.arg(&keys.done).arg(slice.as_secs_f64().max(0.01));
            let pop = blpop.query_async::<Option<(String, String)>>(&mut conn);
            // The server answers nil after the slice; this deadline catches one that hangs.
            match tokio::time::timeout(slice + self.config.command_timeout, pop).await {
                Ok(Ok(Some(_))) => {
                    self.give_back_blocking(conn);
                    return Ok(true);
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) if !is_outage(&err) => {
                    return Err(StoreError::Command(err.to_string()))
                }
                Ok(Err(err)) => return Err(StoreError::Unavailable(err.to_string())),
                Err(_) => {
                    let reason = "Redis stopped answering a wait (BLPOP timed out)".to_string();
                    let generation = self.lock().generation;
                    self.mark_down(generation, reason.clone());
                    return Err(StoreError::Unavailable(reason));
                }
            }
        }
    }
}

/// `(first slot, last slot, host, port)` of each range in a `CLUSTER SLOTS` reply.
fn slot_ranges(reply: redis::Value) -> Vec<(u16, u16, String, u16)> {
    let redis::Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let redis::Value::Array(parts) = item else {
                return None;
            };
            let first = redis::from_redis_value::<u16>(parts.first()?.clone()).ok()?;
            let last = redis::from_redis_value::<u16>(parts.get(1)?.clone()).ok()?;
            let redis::Value::Array(node) = parts.get(2)? else {
                return None;
            };
            let host = redis::from_redis_value::<String>(node.first()?.clone()).ok()?;
            let port = redis::from_redis_value::<u16>(node.get(1)?.clone()).ok()?;
            Some((first, last, host, port))
        })
        .collect()
}

/// A cluster primary (the default: "the server" of a single-server store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNode {
    pub host: String,
    pub port: u16,
    pub slots: u32,
}

/// A shared limiter's answer, from the server's clock.
#[derive(Debug, Clone, Copy)]
pub struct SharedDecision {
    pub admitted: bool,
    pub wait_us: i64,
    pub now_us: i64,
    /// Admissions in the window now (this one included).
    pub used: u32,
    /// Until the oldest admission in the window leaves it.
    pub reset_us: i64,
}

/// Escapes glob metacharacters so a namespace matches only itself in SCAN MATCH.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if matches!(ch, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

async fn reconnect_loop(store: Weak<RedisStore>) {
    let epoch = runtime::fork_epoch();
    let mut delay = Duration::from_millis(50);
    loop {
        tokio::time::sleep(delay).await;
        let Some(store) = store.upgrade() else { return };
        if runtime::fork_epoch() != epoch {
            return;
        }
        let attempt = match store.connect().await {
            Ok(mut conn) => store.ping(&mut conn).await.map(|_| conn),
            Err(reason) => Err(reason),
        };
        match attempt {
            Ok(conn) => {
                // Before anyone reads through it: tracking, and a word to the engine that
                // what it kept while Redis was away (outage copies, local copies that
                // missed pushes) may be older than what other processes wrote since.
                store.start_tracking(conn.clone()).await;
                store.notify(Invalidation::All);
                {
                    let mut state = store.lock();
                    state.conn = Some(conn);
                    state.generation += 1;
                    state.down = false;
                    state.reconnecting = false;
                }
                log::info!(target: "tenuto::cache", "Redis at {} is back; leaving memory fallback", store.display_url);
                return;
            }
            Err(reason) => {
                store.lock().last_error = reason;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(
            redact("redis://:secret@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(redact("redis://user:pw@h/1"), "redis://user:***@h/1");
        assert_eq!(redact("redis://localhost:6379"), "redis://localhost:6379");
    }

    #[test]
    fn glob_escape_neutralises_patterns() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn dead_port_is_unavailable_and_marked_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let store = RedisStore::new(RedisConfig {
            url: format!("redis://127.0.0.1:{port}"),
            connect_timeout: Duration::from_millis(200),
            command_timeout: Duration::from_millis(500),
            tracking_prefix: None,
        })
        .unwrap();
        let result = runtime::block_on(store.get("k".into()));
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
        assert!(store.is_down());
        assert_eq!(store.outages.load(Ordering::Relaxed), 1);
        let again = runtime::block_on(store.get("k".into()));
        assert!(matches!(again, Err(StoreError::Unavailable(_))));
        assert_eq!(
            store.outages.load(Ordering::Relaxed),
            1,
            "one outage, not one per call"
        );
    }
}
