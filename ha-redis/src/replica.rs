//! Reads from replicas, nearest IDC first: the replicas Sentinel knows (`SENTINEL REPLICAS`,
//! only those up with their link to the master `ok`) are published through ha-core's
//! [`Publisher`](ha_core::Publisher) with [`Role::Replica`](ha_core::Role::Replica), and a read
//! goes through ha-core's `LocalityBalance` (same IDC, then same region, then elsewhere, with
//! its health and ejection), not a second balancer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ha_core::HaError;
use ha_core::balance::LocalityBalance;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};
use tower::{Service, ServiceExt};

use crate::error::{is_transport, to_redis_error};
use crate::node::{self, Credentials};

/// The service of one replica: a multiplexed connection made on first use and made again
/// after a transport failure.
#[derive(Clone)]
pub(crate) struct ReplicaConn {
    addr: SocketAddr,
    creds: Arc<Credentials>,
    connect_timeout: Duration,
    conn: Arc<ArcSwapOption<MultiplexedConnection>>,
}

impl ReplicaConn {
    pub(crate) fn new(
        addr: SocketAddr,
        creds: Arc<Credentials>,
        connect_timeout: Duration,
    ) -> ReplicaConn {
        ReplicaConn {
            addr,
            creds,
            connect_timeout,
            conn: Arc::new(ArcSwapOption::empty()),
        }
    }
}

impl Service<Cmd> for ReplicaConn {
    type Response = Value;
    type Error = RedisError;
    type Future = RedisFuture<'static, Value>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RedisError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, cmd: Cmd) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let mut conn = match me.conn.load_full() {
                Some(c) => (*c).clone(),
                None => {
                    let c = node::connect(me.addr, &me.creds, me.connect_timeout).await?;
                    me.conn.store(Some(Arc::new(c.clone())));
                    c
                }
            };
            let r = conn.req_packed_command(&cmd).await;
            if let Err(e) = &r
                && is_transport(e)
            {
                me.conn.store(None);
            }
            r
        })
    }
}

/// Reads from the nearest healthy replica ([`crate::HaRedis::replicas`]). `Clone`, and a
/// [`redis::aio::ConnectionLike`] for single commands (pipelines are refused: use the master
/// handle). Send only reads: a replica answers writes with `-READONLY`. Every command is
/// bounded by the handle's deadline. With no replica usable (none known, or every one
/// ejected) a read goes to the master; within a session's read-your-writes window
/// ([`crate::HaRedis::session`]) it goes to the master at once.
#[derive(Clone)]
pub struct ReplicaHandle {
    pub(crate) balance: LocalityBalance<ReplicaConn>,
    pub(crate) timeout: Duration,
    pub(crate) master: crate::MasterHandle,
    pub(crate) read_your_writes: Option<(Arc<crate::client::WriteClock>, Duration)>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("timeout", &self.timeout)
            .field(
                "read_your_writes",
                &self.read_your_writes.as_ref().map(|(_, w)| w),
            )
            .finish_non_exhaustive()
    }
}

impl ReplicaHandle {
    /// Runs `cmd` on a replica, with typed errors.
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, HaError> {
        let v = self.exec(cmd).await?;
        v.extract_error()
            .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
            .map_err(HaError::backend)
    }

    async fn exec(&self, cmd: &Cmd) -> Result<Value, HaError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        if let Some((clock, window)) = &self.read_your_writes
            && clock.within(*window)
        {
            metrics::counter!("ha_redis_reads_total", "served_by" => "master_read_your_writes")
                .increment(1);
            return self.on_master(cmd, deadline).await;
        }
        let mut b = self.balance.clone();
        let fut = async move { b.ready().await?.call(cmd.clone()).await };
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(Err(e)) if e.is_no_healthy_endpoint() => {
                metrics::counter!("ha_redis_reads_total", "served_by" => "master_no_replica")
                    .increment(1);
                self.on_master(cmd, deadline).await
            }
            Ok(r) => {
                metrics::counter!("ha_redis_reads_total", "served_by" => "replica").increment(1);
                r
            }
            Err(_) => Err(HaError::DeadlineExceeded {
                deadline: self.timeout,
                attempts: 1,
                maybe_sent: true,
            }),
        }
    }

    /// `cmd` on the master, within what is left of the deadline.
    async fn on_master(&self, cmd: &Cmd, deadline: tokio::time::Instant) -> Result<Value, HaError> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut m = self.master.clone().with_timeout(left);
        m.req_packed_command(cmd)
            .await
            .map_err(crate::error::into_ha_error)
    }
}

impl ConnectionLike for ReplicaHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match self.exec(cmd).await {
                Ok(v) => Ok(v),
                // An error a replica answered comes back as itself.
                Err(HaError::Backend(e)) => match e.downcast::<RedisError>() {
                    Ok(r) => Err(*r),
                    Err(other) => Err(to_redis_error(HaError::Backend(other))),
                },
                Err(e) => Err(to_redis_error(e)),
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _pipeline: &'a Pipeline,
        _offset: usize,
        _count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async {
            Err(RedisError::from((
                redis::ErrorKind::Client,
                "pipelines are not supported on the replica handle",
            )))
        })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Which replicas of a `SENTINEL REPLICAS` reply may serve reads: up (no `s_down`, `o_down`,
/// `disconnected`) and with `master-link-status ok`.
pub(crate) fn usable_replicas(reply: &Value) -> Vec<SocketAddr> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|r| {
            let ip = node::field(r, "ip")?.parse::<std::net::IpAddr>().ok()?;
            let port = node::field(r, "port")?.parse::<u16>().ok()?;
            let flags = node::field(r, "flags").unwrap_or_default();
            let link = node::field(r, "master-link-status").unwrap_or_default();
            let down = ["s_down", "o_down", "disconnected"]
                .iter()
                .any(|f| flags.contains(f));
            (!down && link == "ok").then_some(SocketAddr::new(ip, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ip: &str, port: &str, flags: &str, link: &str) -> Value {
        let kv = |k: &str, v: &str| {
            [
                Value::BulkString(k.as_bytes().to_vec()),
                Value::BulkString(v.as_bytes().to_vec()),
            ]
        };
        let mut v = Vec::new();
        v.extend(kv("ip", ip));
        v.extend(kv("port", port));
        v.extend(kv("flags", flags));
        v.extend(kv("master-link-status", link));
        Value::Array(v)
    }

    #[test]
    fn only_replicas_up_with_their_link_ok() {
        let reply = Value::Array(vec![
            entry("127.0.2.10", "6401", "slave", "ok"),
            entry("127.0.3.10", "6402", "s_down,slave,disconnected", "err"),
            entry("127.0.3.11", "6403", "slave", "err"),
            entry("bad", "1", "slave", "ok"),
        ]);
        let got = usable_replicas(&reply);
        assert_eq!(got, vec![SocketAddr::from(([127, 0, 2, 10], 6401))]);
        assert!(usable_replicas(&Value::Nil).is_empty());
    }
}
