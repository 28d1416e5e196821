//! Wiring: the clients built from the configuration, the history consumer, the expiry job, and
//! the server with its graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::{ConfigError, HaContext, HaError};
use ha_mq::{ConsumerConfig, HaConsumer, HaProducer, MqError, ProducerConfig};
use ha_mysql::{HaMysql, MysqlError};
use ha_ratelimit::Limiter;
use ha_redis::{HaRedis, StartupError};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::ServiceConfig;
use crate::http::{AppState, DRAIN_REQUESTS, router};
use crate::job::JobView;
use crate::store::{MemberEvent, Store};

/// Why the service did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// Redis.
    #[error("redis: {0}")]
    Redis(#[from] StartupError),
    /// MySQL.
    #[error("mysql: {0}")]
    Mysql(#[from] MysqlError),
    /// MySQL, while creating the tables.
    #[error("mysql schema: {0}")]
    Schema(HaError),
    /// The job's lease settings.
    #[error("job: {0}")]
    Job(#[from] crate::lease::LeaseError),
    /// RocketMQ.
    #[error("rocketmq: {0}")]
    Mq(#[from] MqError),
    /// The rate limits.
    #[error("rate limits: {0}")]
    Limits(#[from] ha_ratelimit::ConfigError),
    /// The listener.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A started service: every client connected, the consumer and the job running.
pub struct Service {
    state: AppState,
    producer: Arc<HaProducer>,
    consumer: HaConsumer,
    job: Option<JoinHandle<()>>,
    job_stop: tokio::sync::watch::Sender<bool>,
    sweeper: Option<JoinHandle<()>>,
    config: ServiceConfig,
}

impl Drop for Service {
    /// A service dropped without [`Service::stop`] (its task aborted, a panic) stops its job
    /// at once without releasing the lease, which then expires after its TTL: what another
    /// instance sees when this process dies.
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            job.abort();
        }
        if let Some(s) = self.sweeper.take() {
            s.abort();
        }
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("instance", &self.config.instance)
            .finish()
    }
}

impl Service {
    /// Connects everything. `prometheus` renders `/metrics` (install the recorder once per
    /// process, in `main`).
    pub async fn start(
        config: ServiceConfig,
        prometheus: Option<PrometheusHandle>,
    ) -> Result<Service, StartError> {
        let ctx = HaContext::new(config.topology.clone());
        let deps = &config.app.dependencies;
        let cache: HaRedis = HaRedis::builder_from_context(&ctx, &deps.cache)
            .await?
            .build()
            .await?;
        let db: HaMysql = HaMysql::from_context(&ctx, &deps.db)
            .await?
            .connect()
            .await?;
        Store::ensure_schema(&db, config.write_timeout)
            .await
            .map_err(StartError::Schema)?;

        // The local IDC's cluster first; `spool_dir` in the dependency's settings turns the
        // spool on.
        let mut pc = ProducerConfig::discover(&ctx, &deps.events).await?;
        if let Some(dir) = &config.app.spool_dir {
            pc = pc.spool(ha_mq::spool::SpoolConfig::new(dir.clone()));
        }
        let producer = Arc::new(HaProducer::start(pc, Some(ctx.events().clone())).await?);

        // The topic's route on every cluster before the consumer starts: its consumer on the
        // backup cluster then follows a failover at once, not at its next rebalance.
        for (idc, r) in producer.warm_up(&config.app.topic).await {
            if let Err(cause) = r {
                tracing::warn!(idc, %cause, "the event topic could not be warmed up on this cluster");
            }
        }
        let history_db = db.clone();
        let cc = ConsumerConfig::discover(
            &ctx,
            &deps.events,
            config.app.consumer_group.clone(),
            config.app.topic.clone(),
        )
        .await?;
        let consumer = HaConsumer::start(cc, Some(ctx.events().clone()), move |d| {
            let db = history_db.clone();
            async move {
                let event: MemberEvent = match serde_json::from_slice(&d.body) {
                    Ok(e) => e,
                    Err(e) => {
                        // Not ours: acknowledged and dropped, never retried forever.
                        tracing::warn!(key = ?d.key, error = %e, "unreadable event dropped");
                        return Ok(());
                    }
                };
                Store::record(&db, &event, Duration::from_secs(5))
                    .await
                    .map_err(|e| e.to_string())
            }
        })
        .await?;

        let limiter = if config.app.limits.limits.is_empty() {
            None
        } else {
            let l = Limiter::builder(config.app.limits.clone())
                .topology(&config.topology)
                .instances(config.app.instances)
                .events(ctx.events().clone())
                .keys(["client_ip", "route", "server"])
                .build()?;
            Some(Arc::new(l))
        };
        let sweeper = limiter.as_ref().map(Limiter::spawn_sweeper);

        let store = Store::new(
            db,
            cache,
            Arc::clone(&producer),
            &config.app.topic,
            config.write_timeout,
            config.read_timeout,
        );
        let job_view = JobView::default();
        let (job_stop, job_rx) = tokio::sync::watch::channel(false);
        let job = crate::job::spawn(store.clone(), &config, job_view.clone(), job_rx)?;
        let state = AppState {
            store,
            ctx,
            limiter,
            trusted_proxies: config.app.trusted_proxies.clone().into(),
            admin_token: config.admin_token.clone().into(),
            prometheus,
            job: Some(job_view),
            instance: config.instance.clone().into(),
            deps: Arc::new(config.app.dependencies.clone()),
        };
        Ok(Service {
            state,
            producer,
            consumer,
            job: Some(job),
            job_stop,
            sweeper,
            config,
        })
    }

    /// The router (for tests that drive it without a socket).
    pub fn router(&self) -> axum::Router {
        router(self.state.clone())
    }

    /// The shared state.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Binds `addr` (or the configured address).
    pub async fn bind(&self, addr: Option<SocketAddr>) -> Result<TcpListener, StartError> {
        let addr = addr
            .or(self.config.app.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 18090)));
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })
    }

    /// Serves until `shutdown` completes; then stops accepting, lets requests in flight
    /// finish (at most 10 s), flushes the producer, stops the consumer and the job.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.await;
                })
                .await
        });
        let mut served_out = None;
        tokio::select! {
            () = shutdown => {}
            r = &mut server => served_out = Some(r),
        }
        let _ = stop_tx.send(());
        let result = match served_out {
            Some(r) => r,
            None => match tokio::time::timeout(DRAIN_REQUESTS, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("requests still in flight after 10 s: aborted");
                    server.abort();
                    Ok(Ok(()))
                }
            },
        };
        self.stop().await;
        match result {
            Ok(r) => r,
            Err(join) => Err(std::io::Error::other(join)),
        }
    }

    /// Stops the job (releasing the lease), the consumer and the producer (each bounded).
    pub async fn stop(&mut self) {
        let _ = self.job_stop.send(true);
        if let Some(job) = self.job.take()
            && tokio::time::timeout(Duration::from_secs(2), job)
                .await
                .is_err()
        {
            tracing::warn!("the job did not stop within 2 s");
        }
        if let Some(s) = self.sweeper.take() {
            s.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), self.producer.shutdown()).await;
        let _ = tokio::time::timeout(Duration::from_secs(3), self.consumer.shutdown()).await;
    }
}
