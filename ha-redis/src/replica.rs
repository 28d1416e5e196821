//! Reads from replicas, nearest IDC first: the replicas Sentinel knows (`SENTINEL REPLICAS`,
//! only those up with their link to the master `ok`) are published through ha-core's
//! [`Publisher`](ha_core::Publisher) with [`Role::Replica`](ha_core::Role::Replica), and a read
//! goes through ha-core's `LocalityBalance` (same IDC, then same region, then elsewhere, with
//! its health and ejection), not a second balancer.
//!
//! Every poll interval each of them is also checked on its own connection (`INFO
//! replication`, bounded): a replica whose link to the master is down, that is in a full sync,
//! that does not answer in time (frozen), or whose replication offset trails the master's by
//! more than the bound ([`Builder::replica_max_lag`](crate::Builder::replica_max_lag)) leaves
//! the read set ([`TopologyEvent::ReplicaLagging`](ha_core::TopologyEvent::ReplicaLagging)) and
//! comes back once a check passes again
//! ([`TopologyEvent::ReplicaCaughtUp`](ha_core::TopologyEvent::ReplicaCaughtUp)).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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
    /// `same_idc`, `same_region` or `remote`: the label of `ha_redis_reads_total`.
    locality: &'static str,
    creds: Arc<Credentials>,
    source: Option<IpAddr>,
    connect_timeout: Duration,
    conn: Arc<ArcSwapOption<MultiplexedConnection>>,
}

impl ReplicaConn {
    pub(crate) fn new(
        ep: &ha_core::Endpoint,
        creds: Arc<Credentials>,
        source: Option<IpAddr>,
        connect_timeout: Duration,
    ) -> ReplicaConn {
        ReplicaConn {
            addr: ep.addr,
            locality: ep.locality.as_str(),
            creds,
            source,
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
            let mut conn = me.connection().await?;
            let r = conn.send_packed_command(&cmd).await;
            match &r {
                Err(e) if is_transport(e) => me.conn.store(None),
                Err(_) => {}
                Ok(_) => metrics::counter!("ha_redis_reads_total", "served_by" => "replica", "locality" => me.locality)
                    .increment(1),
            }
            r
        })
    }
}

/// A pipeline for one replica: the commands, and which replies the caller wants (as
/// [`ConnectionLike::req_packed_commands`] takes them).
pub(crate) struct ReplicaPipeline {
    pipeline: Pipeline,
    offset: usize,
    count: usize,
}

impl Service<ReplicaPipeline> for ReplicaConn {
    type Response = Vec<Value>;
    type Error = RedisError;
    type Future = RedisFuture<'static, Vec<Value>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), RedisError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ReplicaPipeline) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let mut conn = me.connection().await?;
            let r = conn
                .send_packed_commands(&req.pipeline, req.offset, req.count)
                .await;
            match &r {
                Err(e) if is_transport(e) => me.conn.store(None),
                Err(_) => {}
                Ok(_) => metrics::counter!("ha_redis_reads_total", "served_by" => "replica", "locality" => me.locality)
                    .increment(1),
            }
            r
        })
    }
}

impl ReplicaConn {
    /// The connection, made on first use (and again after a transport failure).
    async fn connection(&self) -> Result<MultiplexedConnection, RedisError> {
        match self.conn.load_full() {
            Some(c) => Ok((*c).clone()),
            None => {
                let c = node::connect(self.addr, &self.creds, self.source, self.connect_timeout)
                    .await?;
                self.conn.store(Some(Arc::new(c.clone())));
                Ok(c)
            }
        }
    }
}

/// Reads from the nearest healthy replica ([`crate::HaRedis::replicas`]). `Clone`, and a
/// [`redis::aio::ConnectionLike`] for single commands and pipelines (a pipeline goes to one
/// replica as a whole). Send only reads: a replica answers writes with `-READONLY`. Every command is
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
        let v = self.exec_cmd(cmd).await?;
        v.extract_error()
            .and_then(|v| redis::from_redis_value(v).map_err(RedisError::from))
            .map_err(HaError::backend)
    }

    /// Runs `pipeline` on one replica, with typed errors.
    ///
    /// ```no_run
    /// # async fn f(r: ha_redis::ReplicaHandle) -> Result<(), ha_core::HaError> {
    /// let (a, b): (Option<String>, Option<String>) =
    ///     r.query_pipeline(ha_redis::redis::pipe().get("member:1").get("member:2")).await?;
    /// # let _ = (a, b); Ok(()) }
    /// ```
    pub async fn query_pipeline<T: redis::FromRedisValue>(
        &self,
        pipeline: &Pipeline,
    ) -> Result<T, HaError> {
        let mut me = self.clone();
        pipeline
            .query_async(&mut me)
            .await
            .map_err(crate::error::into_ha_error)
    }

    /// One command, as [`ReplicaHandle::exec`] routes it.
    async fn exec_cmd(&self, cmd: &Cmd) -> Result<Value, HaError> {
        self.exec(cmd.clone(), |mut m| async move {
            m.req_packed_command(cmd).await
        })
        .await
    }

    /// One read (a command or a pipeline): on the master within a session's read-your-writes
    /// window, else on the nearest usable replica, else (none usable) on the master; the
    /// whole within the handle's deadline.
    async fn exec<R, Out, F, Fut>(&self, req: R, on_master: F) -> Result<Out, HaError>
    where
        ReplicaConn: Service<R, Response = Out, Error = RedisError> + Clone,
        F: FnOnce(crate::MasterHandle) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<Out>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let master = |on_master: F| {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let fut = on_master(self.master.clone().with_timeout(left));
            async move { fut.await.map_err(crate::error::into_ha_error) }
        };
        if let Some((clock, window)) = &self.read_your_writes
            && clock.within(*window)
        {
            metrics::counter!("ha_redis_reads_total", "served_by" => "master_read_your_writes", "locality" => "master")
                .increment(1);
            return master(on_master).await;
        }
        let mut b = self.balance.clone();
        let fut = async move {
            let s = ServiceExt::<R>::ready(&mut b).await?;
            Service::<R>::call(s, req).await
        };
        match tokio::time::timeout_at(deadline, fut).await {
            Ok(Err(e)) if e.is_no_healthy_endpoint() => {
                metrics::counter!("ha_redis_reads_total", "served_by" => "master_no_replica", "locality" => "master")
                    .increment(1);
                master(on_master).await
            }
            Ok(r) => r,
            Err(_) => Err(HaError::DeadlineExceeded {
                deadline: self.timeout,
                attempts: 1,
                maybe_sent: true,
            }),
        }
    }
}

/// A read's error for [`ConnectionLike`]: one a replica answered comes back as itself.
fn read_error(e: HaError) -> RedisError {
    match e {
        HaError::Backend(e) => match e.downcast::<RedisError>() {
            Ok(r) => *r,
            Err(other) => to_redis_error(HaError::Backend(other)),
        },
        e => to_redis_error(e),
    }
}

impl ConnectionLike for ReplicaHandle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.exec_cmd(cmd).await.map_err(read_error) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let req = ReplicaPipeline {
            pipeline: pipeline.clone(),
            offset,
            count,
        };
        Box::pin(async move {
            self.exec(req, |mut m| async move {
                m.req_packed_commands(pipeline, offset, count).await
            })
            .await
            .map_err(read_error)
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

/// The value of `name` in an `INFO` reply (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The master's replication offset from its `INFO replication`.
pub(crate) fn master_offset(info: &str) -> Option<u64> {
    info_field(info, "master_repl_offset")?.parse().ok()
}

/// Whether a replica may serve reads, from its own `INFO replication` and the master's offset
/// read *after* it (so the lag is never underestimated): `Ok(lag)` or why not. Without the
/// master's offset (no verified master right now) only the link is judged.
pub(crate) fn judge(replica_info: &str, master: Option<u64>, bound: u64) -> Result<u64, String> {
    if info_field(replica_info, "role") != Some("slave") {
        return Err(format!(
            "it is not a replica (role {})",
            info_field(replica_info, "role").unwrap_or("missing")
        ));
    }
    if info_field(replica_info, "master_link_status") != Some("up") {
        return Err("its link to the master is down".into());
    }
    if info_field(replica_info, "master_sync_in_progress") == Some("1") {
        return Err("a full sync is in progress".into());
    }
    let own = info_field(replica_info, "slave_repl_offset")
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| "no slave_repl_offset in its INFO".to_string())?;
    let Some(master) = master else {
        return Ok(0);
    };
    let lag = master.saturating_sub(own);
    if lag > bound {
        return Err(format!("offset lag {lag} bytes > bound {bound}"));
    }
    Ok(lag)
}

/// The checks' state, owned by the replica task: a connection per replica and the replicas
/// out of the read set with the time they left.
#[derive(Default)]
pub(crate) struct Prober {
    conns: HashMap<SocketAddr, MultiplexedConnection>,
    pub(crate) out: HashMap<SocketAddr, tokio::time::Instant>,
}

impl Prober {
    /// `INFO replication` of every address, concurrently, each bounded by `connect` + `answer`;
    /// a connection that failed is dropped and made again next time.
    pub(crate) async fn infos(
        &mut self,
        addrs: &[SocketAddr],
        creds: &Credentials,
        source: Option<IpAddr>,
        connect: Duration,
        answer: Duration,
    ) -> Vec<(SocketAddr, Result<String, String>)> {
        self.conns.retain(|a, _| addrs.contains(a));
        let jobs = addrs.iter().map(|&addr| {
            let cached = self.conns.get(&addr).cloned();
            async move {
                let mut conn = match cached {
                    Some(c) => c,
                    None => match node::connect(addr, creds, source, connect).await {
                        Ok(c) => c,
                        Err(e) => return (addr, None, Err(format!("connect failed: {e}"))),
                    },
                };
                let r = node::run(&mut conn, redis::cmd("INFO").arg("replication"), answer)
                    .await
                    .and_then(|v| redis::from_redis_value::<String>(v).map_err(RedisError::from));
                match r {
                    Ok(info) => (addr, Some(conn), Ok(info)),
                    Err(e) => (addr, None, Err(format!("no answer to INFO: {e}"))),
                }
            }
        });
        let done = futures::future::join_all(jobs).await;
        done.into_iter()
            .map(|(addr, conn, r)| {
                match conn {
                    Some(c) => {
                        self.conns.insert(addr, c);
                    }
                    None => {
                        self.conns.remove(&addr);
                    }
                }
                (addr, r)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const REPLICA: &str = "# Replication\r\nrole:slave\r\nmaster_host:127.0.1.7\r\nmaster_link_status:up\r\n\
        master_sync_in_progress:0\r\nslave_read_repl_offset:1200\r\nslave_repl_offset:1000\r\nmaster_repl_offset:1000\r\n";

    #[test]
    fn a_replica_within_the_bound_serves_reads() {
        assert_eq!(judge(REPLICA, Some(1500), 500), Ok(500));
        assert_eq!(judge(REPLICA, Some(1000), 0), Ok(0));
        // A master offset read before the replica's can be lower: never a negative lag.
        assert_eq!(judge(REPLICA, Some(900), 0), Ok(0));
        // No verified master: only the link is judged.
        assert_eq!(judge(REPLICA, None, 0), Ok(0));
    }

    #[test]
    fn a_replica_past_the_bound_or_with_its_link_down_does_not() {
        let e = judge(REPLICA, Some(1501), 500).unwrap_err();
        assert_eq!(e, "offset lag 501 bytes > bound 500");
        let down = REPLICA.replace("master_link_status:up", "master_link_status:down");
        assert!(judge(&down, Some(1000), 500).unwrap_err().contains("link"));
        let syncing = REPLICA.replace("master_sync_in_progress:0", "master_sync_in_progress:1");
        assert!(
            judge(&syncing, Some(1000), 500)
                .unwrap_err()
                .contains("full sync")
        );
        let master = REPLICA.replace("role:slave", "role:master");
        assert!(
            judge(&master, Some(1000), 500)
                .unwrap_err()
                .contains("role master")
        );
        assert!(
            judge("", Some(1), 500)
                .unwrap_err()
                .contains("role missing")
        );
        let no_offset = REPLICA.replace("slave_repl_offset:1000", "");
        assert!(
            judge(&no_offset, Some(1000), 500)
                .unwrap_err()
                .contains("slave_repl_offset")
        );
        assert_eq!(
            master_offset("role:master\r\nmaster_repl_offset:42\r\n"),
            Some(42)
        );
        assert_eq!(master_offset("role:master\r\n"), None);
    }

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
