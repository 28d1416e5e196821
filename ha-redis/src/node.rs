//! Talking to one node: connections with credentials and bounded connects, `ROLE`, and the
//! two questions asked of a sentinel.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection, PubSub};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo,
    RedisConnectionInfo, RedisError, Value,
};

use crate::vote::{Answer, FailKind};

/// A username and password (either may be absent).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// ACL username (`None`: the default user).
    pub username: Option<String>,
    /// Password (`None`: no `AUTH`).
    pub password: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

fn settings(creds: &Credentials) -> RedisConnectionInfo {
    let mut redis = RedisConnectionInfo::default();
    if let Some(u) = &creds.username {
        redis = redis.set_username(u);
    }
    if let Some(p) = &creds.password {
        redis = redis.set_password(p);
    }
    redis
}

fn client(addr: SocketAddr, creds: &Credentials) -> Result<Client, RedisError> {
    let info: ConnectionInfo = ConnectionAddr::Tcp(addr.ip().to_string(), addr.port())
        .into_connection_info()?
        .set_redis_settings(settings(creds));
    Client::open(info)
}

/// A TCP socket of `source`'s family bound to `source` (port chosen by the kernel).
fn bound_socket(source: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = match source {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket)
}

/// Checks that `source` can be bound (an address of this host), for the start-up error.
pub(crate) fn check_source(source: IpAddr) -> Result<(), String> {
    bound_socket(source).map(drop).map_err(|e| {
        format!("source_address {source} cannot be bound (not an address of this host?): {e}")
    })
}

/// A TCP connection to `addr` from `source`.
async fn dial(addr: SocketAddr, source: IpAddr) -> std::io::Result<tokio::net::TcpStream> {
    if source.is_ipv4() != addr.is_ipv4() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("source address {source} and {addr} are of different IP families"),
        ));
    }
    let socket = bound_socket(source).map_err(|e| {
        std::io::Error::new(e.kind(), format!("bind to source address {source}: {e}"))
    })?;
    socket.connect(addr).await
}

fn connect_timed_out(addr: SocketAddr, timeout: Duration) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("connect to {addr} not done within {timeout:?}"),
    ))
}

/// A multiplexed connection to `addr` (from `source` when given), connected and authenticated
/// within `timeout`. Responses have no timeout of redis's own: every caller bounds its own wait.
pub(crate) async fn connect(
    addr: SocketAddr,
    creds: &Credentials,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(None);
    let Some(source) = source else {
        let client = client(addr, creds)?;
        return tokio::time::timeout(
            timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .unwrap_or_else(|_| Err(connect_timed_out(addr, timeout)));
    };
    let bound = async {
        let stream = dial(addr, source).await?;
        let (conn, driver) =
            MultiplexedConnection::new_with_config(&settings(creds), stream, config).await?;
        // The driver ends when the last clone of `conn` is dropped (its request channel closes).
        tokio::spawn(driver);
        Ok(conn)
    };
    tokio::time::timeout(timeout, bound)
        .await
        .unwrap_or_else(|_| Err(connect_timed_out(addr, timeout)))
}

/// A RESP2 pub/sub connection to `addr` (from `source` when given), unbounded: the caller
/// bounds it.
pub(crate) async fn pubsub(
    addr: SocketAddr,
    creds: &Credentials,
    source: Option<IpAddr>,
) -> Result<PubSub, RedisError> {
    match source {
        None => client(addr, creds)?.get_async_pubsub().await,
        Some(source) => {
            let stream = dial(addr, source).await?;
            PubSub::new(&settings(creds), stream).await
        }
    }
}

/// Runs `cmd` on `conn`, bounded by `timeout`; a server error reply is an `Err`.
pub(crate) async fn run(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
    timeout: Duration,
) -> Result<Value, RedisError> {
    match tokio::time::timeout(timeout, conn.req_packed_command(cmd)).await {
        Ok(r) => r.and_then(Value::extract_error),
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no reply within {timeout:?}"),
        ))),
    }
}

/// The first element of `ROLE`: `master`, `slave` or `sentinel`.
pub(crate) async fn role(
    conn: &mut MultiplexedConnection,
    timeout: Duration,
) -> Result<String, RedisError> {
    let v = run(conn, &redis::cmd("ROLE"), timeout).await?;
    let first = match &v {
        Value::Array(items) => items.first(),
        _ => None,
    };
    match first {
        Some(Value::BulkString(b)) => Ok(String::from_utf8_lossy(b).into_owned()),
        Some(Value::SimpleString(s)) => Ok(s.clone()),
        _ => Err(RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected ROLE reply",
        ))),
    }
}

/// True for a refusal of credentials.
pub(crate) fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        || e.to_string().contains("AUTH")
}

pub(crate) fn failed(e: &RedisError) -> Answer {
    let kind = if is_auth_error(e) {
        FailKind::Auth
    } else if e.is_io_error() || e.is_timeout() || e.is_connection_refusal() {
        FailKind::Unreachable
    } else {
        FailKind::Other
    };
    Answer::Failed(kind, e.to_string())
}

/// What one sentinel says about the master: its vote, and (from `SENTINEL MASTER`) its
/// config epoch and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelView {
    pub(crate) answer: Answer,
    pub(crate) epoch: u64,
    pub(crate) flags: String,
    /// The master record `SENTINEL MASTER` describes (`ip`, `port`). During a failover's
    /// last steps `get-master-addr-by-name` already names the promoted replica while this is
    /// still the old master, the one the flags are about.
    pub(crate) record: Option<SocketAddr>,
}

impl SentinelView {
    pub(crate) fn failover_in_progress(&self) -> bool {
        self.flags.contains("failover_in_progress")
    }
    pub(crate) fn odown(&self) -> bool {
        self.flags.contains("o_down")
    }
}

/// Asks one sentinel `SENTINEL get-master-addr-by-name` and then `SENTINEL MASTER`.
pub(crate) async fn ask_sentinel(
    conn: &mut MultiplexedConnection,
    master_name: &str,
    timeout: Duration,
) -> Result<SentinelView, RedisError> {
    let v = run(
        conn,
        redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master_name),
        timeout,
    )
    .await?;
    let addr = match &v {
        Value::Nil => None,
        Value::Array(items) if items.len() == 2 => {
            let text = |v: &Value| match v {
                Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                Value::SimpleString(s) => Some(s.clone()),
                _ => None,
            };
            let ip = text(&items[0]).and_then(|s| s.parse::<std::net::IpAddr>().ok());
            let port = text(&items[1]).and_then(|s| s.parse::<u16>().ok());
            match (ip, port) {
                (Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
                _ => {
                    return Err(RedisError::from((
                        ErrorKind::UnexpectedReturnType,
                        "bad get-master-addr-by-name reply",
                    )));
                }
            }
        }
        _ => {
            return Err(RedisError::from((
                ErrorKind::UnexpectedReturnType,
                "bad get-master-addr-by-name reply",
            )));
        }
    };
    let Some(addr) = addr else {
        return Ok(SentinelView {
            answer: Answer::Unknown,
            epoch: 0,
            flags: String::new(),
            record: None,
        });
    };
    let info = run(
        conn,
        redis::cmd("SENTINEL").arg("MASTER").arg(master_name),
        timeout,
    )
    .await?;
    let epoch = field(&info, "config-epoch")
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    let flags = field(&info, "flags").unwrap_or_default();
    let record = match (
        field(&info, "ip").and_then(|i| i.parse::<std::net::IpAddr>().ok()),
        field(&info, "port").and_then(|p| p.parse::<u16>().ok()),
    ) {
        (Some(ip), Some(port)) => Some(SocketAddr::new(ip, port)),
        _ => None,
    };
    Ok(SentinelView {
        answer: Answer::Master(addr),
        epoch,
        flags,
        record,
    })
}

/// A field of a flat `[k, v, ...]` array (RESP2) or a map (RESP3).
pub(crate) fn field(v: &Value, name: &str) -> Option<String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    };
    match v {
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
            .and_then(|kv| kv.get(1))
            .and_then(text),
        Value::Map(kvs) => kvs
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(name))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}
