//! The JSON-lines control protocol of a running lab (a unix socket in the lab directory).
//!
//! One request per line, one response per line:
//!
//! ```text
//! {"op":"ping"}
//! {"op":"fault","target":"proxy-bj-a-1","action":{"round_trip_latency":{"ms":200}}}
//! {"op":"fault","target":"proxy-bj-a-1","action":{"latency":{"ms":100}}}
//! {"op":"fault","target":"dns-north","action":"freeze"}
//! {"op":"stack","fault":"kill_redis_master"}
//! {"op":"stack","fault":{"restart_broker":{"idc":"bj-a"}}}
//! {"op":"stack","fault":{"partition":{"idc":"sh-a"}}}
//! {"op":"stack","fault":{"place":{"idc":"bj-a","pid":4242}}}
//! {"op":"shutdown"}
//! -> {"ok":true} | {"ok":false,"error":"unknown server \"x\" (known: ...)"}
//! -> {"ok":true,"detail":"redis master redis-bj-a 127.0.1.10:20000 -> redis-bj-b ..."}
//! ```
//!
//! `stack` requests are served by a stack daemon (`ha-lab up --stack`, see `ha_lab::stack`);
//! the default lab refuses them.

use std::{path::Path, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::LabError;

/// A request to the lab daemon.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Liveness check.
    Ping,
    /// Apply a fault to a server of the lab.
    Fault {
        /// The server name from `lab.json`.
        target: String,
        /// What to do.
        action: FaultAction,
    },
    /// A fault on the stack of `ha-lab up --stack` (`ha_lab::stack`); the answer's
    /// [`ControlResponse::detail`] says what happened.
    Stack {
        /// The fault.
        fault: StackFault,
    },
    /// Stop the lab and the daemon.
    Shutdown,
}

/// A fault on the stack (Redis + Sentinel, MariaDB with its HA simulator, RocketMQ) that
/// `ha-lab up --stack` runs. A `server` is a server name of `lab.json` (`redis-bj-a`,
/// `sentinel-sh-a`, `mariadb-bj-b`, `rocketmq-broker-bj-a`, ...) or a role: `redis-master`,
/// `mysql-primary`, `mq-broker@<idc>`, `mq-namesrv@<idc>`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StackFault {
    /// SIGKILL the Redis master and wait (bounded) until the sentinels name a new one.
    KillRedisMaster,
    /// A planned `SENTINEL FAILOVER`, waited for (bounded).
    RedisFailover,
    /// SIGKILL the MariaDB primary and wait (bounded) until the HA simulator promoted a replica.
    KillMysqlPrimary,
    /// A planned MariaDB switchover to the first replica.
    MysqlSwitchover,
    /// SIGKILL the RocketMQ broker of `idc`.
    KillBroker {
        /// The IDC, e.g. `bj-a`.
        idc: String,
    },
    /// Start the RocketMQ broker of `idc` again (same ports and store), waited until registered.
    RestartBroker {
        /// The IDC.
        idc: String,
    },
    /// SIGKILL one server.
    Kill {
        /// Server name or role.
        server: String,
    },
    /// SIGSTOP one server.
    Freeze {
        /// Server name or role.
        server: String,
    },
    /// SIGCONT one server.
    Thaw {
        /// Server name or role.
        server: String,
    },
    /// Cut `idc` off from the other IDCs across the stack (`ha_lab::stack::Stack::partition`:
    /// the servers by address, the processes placed in IDC cgroups by cgroup); the daemon
    /// keeps the partition until [`StackFault::Heal`] or its own shutdown.
    Partition {
        /// The IDC.
        idc: String,
    },
    /// Heal the partition of `idc` (and fence its old MariaDB primary, if the HA simulator
    /// promoted another meanwhile).
    Heal {
        /// The IDC.
        idc: String,
    },
    /// Move process `pid` into `idc`'s cgroup, so that a partition of the IDC cuts it as it
    /// cuts the IDC's servers (only sockets it opens afterwards). `ha-lab run --idc` places
    /// itself this way and then runs the command.
    Place {
        /// The IDC.
        idc: String,
        /// The process.
        pid: u32,
    },
}

impl std::fmt::Display for StackFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StackFault::KillRedisMaster => f.write_str("kill redis-master"),
            StackFault::RedisFailover => f.write_str("failover redis"),
            StackFault::KillMysqlPrimary => f.write_str("kill mysql-primary"),
            StackFault::MysqlSwitchover => f.write_str("switchover mysql"),
            StackFault::KillBroker { idc } => write!(f, "kill mq-broker@{idc}"),
            StackFault::RestartBroker { idc } => write!(f, "restart mq-broker@{idc}"),
            StackFault::Kill { server } => write!(f, "kill {server}"),
            StackFault::Freeze { server } => write!(f, "freeze {server}"),
            StackFault::Thaw { server } => write!(f, "thaw {server}"),
            StackFault::Partition { idc } => write!(f, "partition {idc}"),
            StackFault::Heal { idc } => write!(f, "heal {idc}"),
            StackFault::Place { idc, pid } => write!(f, "place pid {pid} in {idc}"),
        }
    }
}

impl StackFault {
    /// The fault of the command line `ha-lab fault <verb> <target>` when its target is a role
    /// of the stack: `kill redis-master`, `failover redis`, `kill mysql-primary`, `switchover
    /// mysql`, `kill|restart mq-broker@<idc>`, and `kill|freeze|thaw` of a role
    /// (`redis-master`, `mysql-primary`, `mq-broker@<idc>`, `mq-namesrv@<idc>`). `None` for
    /// anything else: a server named in `lab.json` takes a [`ControlRequest::Fault`].
    ///
    /// ```
    /// use ha_lab::control::StackFault;
    /// assert_eq!(StackFault::parse("kill", "redis-master"), Some(StackFault::KillRedisMaster));
    /// assert_eq!(
    ///     StackFault::parse("restart", "mq-broker@sh-a"),
    ///     Some(StackFault::RestartBroker { idc: "sh-a".into() })
    /// );
    /// assert_eq!(
    ///     StackFault::parse("freeze", "mysql-primary"),
    ///     Some(StackFault::Freeze { server: "mysql-primary".into() })
    /// );
    /// assert_eq!(StackFault::parse("kill", "redis-bj-a"), None);
    /// ```
    pub fn parse(verb: &str, target: &str) -> Option<StackFault> {
        let broker = target.strip_prefix("mq-broker@").filter(|i| !i.is_empty());
        let role = matches!(target, "redis-master" | "mysql-primary")
            || broker.is_some()
            || target
                .strip_prefix("mq-namesrv@")
                .is_some_and(|i| !i.is_empty());
        let server = || target.to_owned();
        Some(match (verb, target) {
            ("kill", "redis-master") => StackFault::KillRedisMaster,
            ("failover", "redis") => StackFault::RedisFailover,
            ("kill", "mysql-primary") => StackFault::KillMysqlPrimary,
            ("switchover", "mysql") => StackFault::MysqlSwitchover,
            ("kill", _) if broker.is_some() => StackFault::KillBroker {
                idc: broker?.to_owned(),
            },
            ("restart", _) if broker.is_some() => StackFault::RestartBroker {
                idc: broker?.to_owned(),
            },
            ("kill", _) if role => StackFault::Kill { server: server() },
            ("freeze", _) if role => StackFault::Freeze { server: server() },
            ("thaw", _) if role => StackFault::Thaw { server: server() },
            _ => return None,
        })
    }
}

/// A fault applied to one server of the lab. What each means per kind of server:
///
/// | action | dns | proxy | http | process |
/// |---|---|---|---|---|
/// | `kill` | stop | stop | stop | SIGKILL |
/// | `freeze` | mode Silent | Blackhole | - | SIGSTOP |
/// | `thaw`, `heal` | mode Serve | Pass | no-op | SIGCONT |
/// | `restart` | restart | restart | restart | kill + start |
/// | `round_trip_latency` | - | RoundTrip | - | - |
/// | `latency` | - | Latency | - | - |
/// | `blackhole` | mode Silent | Blackhole | - | - |
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Kill or stop the server.
    Kill,
    /// Make it hang: accept and never answer.
    Freeze,
    /// Undo a freeze.
    Thaw,
    /// Restart it on the same address.
    Restart,
    /// Add latency in each direction (proxies only): a round trip gains `2 × ms`
    /// ([`Fault::Latency`](crate::proxy::Fault::Latency)).
    Latency {
        /// Milliseconds added to each direction.
        ms: u64,
    },
    /// Add latency to each request/response round trip (proxies only), half on the way there
    /// and half on the way back ([`Fault::RoundTrip`](crate::proxy::Fault::RoundTrip)); what
    /// `ha-lab fault latency MS` sends.
    RoundTripLatency {
        /// Milliseconds a round trip gains in total.
        ms: u64,
    },
    /// Accept, read and discard.
    Blackhole,
    /// Back to normal service.
    Heal,
}

impl std::fmt::Display for FaultAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultAction::Kill => f.write_str("kill"),
            FaultAction::Freeze => f.write_str("freeze"),
            FaultAction::Thaw => f.write_str("thaw"),
            FaultAction::Restart => f.write_str("restart"),
            FaultAction::Latency { ms } => write!(f, "latency {ms}ms each direction"),
            FaultAction::RoundTripLatency { ms } => {
                write!(f, "latency {ms}ms per round trip (half each way)")
            }
            FaultAction::Blackhole => f.write_str("blackhole"),
            FaultAction::Heal => f.write_str("heal"),
        }
    }
}

/// The daemon's answer to one request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlResponse {
    /// True when the request was applied.
    pub ok: bool,
    /// The error, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What happened, when the request says more than ok (a stack fault: the old and the new
    /// master).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ControlResponse {
    pub(crate) fn from_result(r: Result<(), LabError>) -> ControlResponse {
        ControlResponse::from_detail(r.map(|()| None))
    }

    pub(crate) fn from_detail(r: Result<Option<String>, LabError>) -> ControlResponse {
        match r {
            Ok(detail) => ControlResponse {
                ok: true,
                error: None,
                detail,
            },
            Err(e) => ControlResponse::error(e.to_string()),
        }
    }

    pub(crate) fn error(message: String) -> ControlResponse {
        ControlResponse {
            ok: false,
            error: Some(message),
            detail: None,
        }
    }
}

/// Sends one request to the control socket at `socket` and waits (bounded by `wait`) for the
/// answer. A response with `ok: false` is returned as [`LabError::Control`].
pub async fn request(
    socket: &Path,
    req: &ControlRequest,
    wait: Duration,
) -> Result<ControlResponse, LabError> {
    let ctx = || format!("control socket {}", socket.display());
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| LabError::io(ctx(), e))?;
        let (r, mut w) = stream.into_split();
        let mut line = serde_json::to_string(req).map_err(|source| LabError::Json {
            context: "encode control request".into(),
            source,
        })?;
        line.push('\n');
        w.write_all(line.as_bytes())
            .await
            .map_err(|e| LabError::io(ctx(), e))?;
        let mut answer = String::new();
        BufReader::new(r)
            .read_line(&mut answer)
            .await
            .map_err(|e| LabError::io(ctx(), e))?;
        serde_json::from_str::<ControlResponse>(&answer).map_err(|source| LabError::Json {
            context: format!("decode control answer {answer:?}"),
            source,
        })
    };
    let resp = tokio::time::timeout(wait, exchange).await.map_err(|_| {
        LabError::Control(format!(
            "no answer within {wait:?} from {}",
            socket.display()
        ))
    })??;
    if resp.ok {
        Ok(resp)
    } else {
        Err(LabError::Control(
            resp.error.unwrap_or_else(|| "request failed".into()),
        ))
    }
}
