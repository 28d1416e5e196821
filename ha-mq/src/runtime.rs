//! The client runtime ha-mq's producers and consumers run their RocketMQ clients on (the client
//! never uses the caller's tokio runtime): one place that builds it and stops it.

use std::sync::Arc;

use parking_lot::Mutex;
use rocketmq_client_rust::{ClientRuntime, ClientRuntimeConfig};

use crate::error::{MqError, classify};

/// A RocketMQ client runtime and the tokio runtime it owns.
pub(crate) struct ClientRt {
    pub(crate) runtime: Arc<ClientRuntime>,
    owner: Mutex<Option<rocketmq_runtime::RuntimeOwner>>,
}

impl ClientRt {
    /// Two worker threads named after `scope`.
    pub(crate) fn start(scope: &'static str) -> Result<ClientRt, MqError> {
        let runtime_err = |e: String| MqError::Runtime {
            why: format!("client runtime: {e}"),
        };
        let owner = rocketmq_runtime::RuntimeOwner::plan(
            rocketmq_runtime::RuntimeConfig::for_parallelism(scope, 2),
        )
        .map_err(|e| runtime_err(e.to_string()))?
        .build()
        .map_err(|e| runtime_err(e.to_string()))?;
        let runtime = ClientRuntime::try_new(
            owner.root_context().component(scope),
            ClientRuntimeConfig::default(),
            rocketmq_observability::TelemetryHandle::noop(),
        )
        .map_err(|e| MqError::Start {
            idc: String::new(),
            cause: classify(&e),
        })?;
        Ok(ClientRt {
            runtime,
            owner: Mutex::new(Some(owner)),
        })
    }

    /// Stops the client runtime, then its tasks and threads (once; later calls do nothing).
    pub(crate) async fn shutdown(&self) {
        // Boxed: the client runtime's shutdown future is deep enough to overflow the
        // compiler's layout query depth when it is inlined into a caller's future.
        let _report = Box::pin(self.runtime.shutdown()).await;
        let owner = self.owner.lock().take();
        if let Some(owner) = owner {
            let _tasks = Box::pin(owner.shutdown_tasks()).await;
            let _bg = owner.shutdown_background();
        }
    }
}
