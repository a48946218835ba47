//! One connection type for a single server and for a cluster, so every command the store
//! sends is written once. A cluster connection routes each command by its key (following
//! MOVED/ASK and topology changes); multi-key commands must then stay in one slot, which
//! the store arranges (see `topology`).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, PushInfo,
    RedisFuture, RedisResult, Value,
};

use super::topology::ClusterSeeds;

/// One per store, built once: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// Receives what the server pushes on the shared connection (RESP3 invalidations).
pub type PushHandler = Arc<dyn Fn(PushInfo) + Send + Sync>;

impl Client {
    /// `resp3`: speak RESP3 to a single server, so it can push invalidations on the
    /// connection that also carries commands.
    pub fn open(url: &str, seeds: Option<ClusterSeeds>, resp3: bool) -> RedisResult<Self> {
        match seeds {
            None if resp3 => {
                let info = url.into_connection_info()?;
                let settings = info
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3);
                redis::Client::open(info.set_redis_settings(settings)).map(Client::Single)
            }
            None => redis::Client::open(url).map(Client::Single),
            Some(seeds) => ClusterClient::builder(seeds.nodes)
                .build()
                .map(Client::Cluster),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Client::Cluster(_))
    }

    /// The database a single-server URL selects (a cluster has only 0).
    pub fn db(&self) -> i64 {
        match self {
            Client::Single(client) => client.get_connection_info().redis_settings().db(),
            Client::Cluster(_) => 0,
        }
    }

    /// A new connection. `response_timeout` None: commands may block (BLPOP) as long as
    /// they ask; the caller bounds them.
    pub async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Option<Duration>,
        push: Option<PushHandler>,
    ) -> RedisResult<Conn> {
        match self {
            Client::Single(client) => {
                let mut config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(response_timeout);
                if let Some(handler) = push {
                    config = config.set_push_sender(move |info: PushInfo| {
                        handler(info);
                        Ok::<(), std::convert::Infallible>(())
                    });
                }
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Conn::Single)
            }
            Client::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(response_timeout.unwrap_or(Duration::from_secs(3600)));
                client
                    .get_async_connection_with_config(config)
                    .await
                    .map(Conn::Cluster)
            }
        }
    }
}

impl Conn {
    /// Sends `cmd` to the node at `host:port` (a cluster's primary, for SCAN and INFO).
    pub async fn on_node(&mut self, host: &str, port: u16, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Conn::Single(conn) => cmd.query_async(conn).await,
            Conn::Cluster(conn) => {
                let routing = SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                };
                conn.route_command(cmd, RoutingInfo::SingleNode(routing))
                    .await
            }
        }
    }
}

impl Conn {
    /// Sends `pipe` (`count` commands) to the node at `host:port` in one round trip.
    pub async fn pipeline_on_node(
        &mut self,
        host: &str,
        port: u16,
        pipe: Pipeline,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(&pipe, 0, count).await,
            Conn::Cluster(conn) => {
                let node = SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                };
                conn.route_pipeline(pipe, 0, count, node).await
            }
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}
