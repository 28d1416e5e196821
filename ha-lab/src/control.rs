//! The JSON-lines control protocol of a running lab (a unix socket in the lab directory).
//!
//! One request per line, one response per line:
//!
//! ```text
//! {"op":"ping"}
//! {"op":"fault","target":"proxy-bj-a-1","action":{"round_trip_latency":{"ms":200}}}
//! {"op":"fault","target":"proxy-bj-a-1","action":{"latency":{"ms":100}}}
//! {"op":"fault","target":"dns-north","action":"freeze"}
//! {"op":"shutdown"}
//! -> {"ok":true} | {"ok":false,"error":"unknown server \"x\" (known: ...)"}
//! ```

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
    /// Stop the lab and the daemon.
    Shutdown,
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
}

impl ControlResponse {
    pub(crate) fn from_result(r: Result<(), LabError>) -> ControlResponse {
        match r {
            Ok(()) => ControlResponse {
                ok: true,
                error: None,
            },
            Err(e) => ControlResponse {
                ok: false,
                error: Some(e.to_string()),
            },
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
