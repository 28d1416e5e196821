//! Topology events: every change to a dependency's endpoints, health, tier or master, broadcast on
//! one channel and mirrored to `tracing` and `metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::generation::Generation;

/// A change somewhere in the topology.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TopologyEvent {
    /// A new endpoint appeared in a dependency's set.
    #[non_exhaustive]
    EndpointAdded {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC (`unknown` when unclassified).
        idc: Arc<str>,
    },
    /// An endpoint left a dependency's set.
    #[non_exhaustive]
    EndpointRemoved {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
    },
    /// Outlier detection ejected an endpoint.
    #[non_exhaustive]
    EndpointEjected {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
        /// How long it stays out before a probe.
        for_: Duration,
        /// Why: `consecutive_failures` or `failure_rate`.
        reason: &'static str,
    },
    /// An ejected endpoint passed its probe and takes traffic again.
    #[non_exhaustive]
    EndpointRestored {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
    },
    /// The share of traffic sent to each locality tier changed.
    #[non_exhaustive]
    TierChanged {
        /// The dependency.
        dependency: Arc<str>,
        /// Shares for `SameIdc`, `SameRegion`, `Remote` (sum 1 unless nothing is usable).
        shares: [f64; 3],
        /// True when too few endpoints are healthy and every endpoint is used.
        panic: bool,
    },
    /// An operator drained (or undrained) an IDC.
    #[non_exhaustive]
    IdcDrained {
        /// The IDC.
        idc: Arc<str>,
        /// True when drained, false when undrained.
        drained: bool,
    },
    /// The master of a dependency changed; its generation was bumped (published by
    /// [`MasterWatch`](crate::master::MasterWatch)).
    #[non_exhaustive]
    MasterSwitched {
        /// The dependency.
        dependency: Arc<str>,
        /// The previous master, `None` for the first one.
        from: Option<SocketAddr>,
        /// The new master.
        addr: SocketAddr,
        /// The new master's IDC (`unknown` when unclassified).
        idc: Arc<str>,
        /// The new generation.
        generation: Generation,
        /// Why: e.g. `sentinel_switch_master`, `dns_repointed`, `poll`, `initial`.
        cause: Arc<str>,
    },
    /// A connection of an older generation was refused instead of being used.
    #[non_exhaustive]
    ConnectionFenced {
        /// The dependency.
        dependency: Arc<str>,
        /// Where the connection goes.
        addr: SocketAddr,
        /// The generation it was made in.
        connection: Generation,
        /// The current generation.
        current: Generation,
    },
    /// A watcher (DNS refresh, a Sentinel subscription, an HA-master or route poller) lost its
    /// source and is working degraded (serving what it last knew, retrying).
    #[non_exhaustive]
    WatcherDegraded {
        /// The dependency.
        dependency: Arc<str>,
        /// Which watcher, e.g. `dns`, `sentinel 127.0.1.1:26379`, `routes`.
        watcher: Arc<str>,
        /// What went wrong.
        reason: Arc<str>,
    },
    /// A degraded watcher has its source back.
    #[non_exhaustive]
    WatcherRestored {
        /// The dependency.
        dependency: Arc<str>,
        /// Which watcher.
        watcher: Arc<str>,
    },
    /// A background task of a dependency ended; what it maintained no longer changes.
    #[non_exhaustive]
    TaskEnded {
        /// The dependency.
        dependency: Arc<str>,
        /// Which task, e.g. `dns_refresh`.
        task: Arc<str>,
        /// Why it ended (`handle dropped`, `every receiver dropped`, a panic message, ...).
        reason: Arc<str>,
    },
    /// A failover of a dependency's master began (its first sign, e.g. Sentinel's
    /// `+try-failover`): writes are held, not sent to a master that may be demoted.
    #[non_exhaustive]
    WritesHeld {
        /// The dependency.
        dependency: Arc<str>,
        /// What began the hold (the failover step seen first).
        reason: Arc<str>,
    },
    /// The held writes of a dependency were released: to the new master once it was verified,
    /// or, when the failover aborted, to the old master verified again.
    #[non_exhaustive]
    WritesReleased {
        /// The dependency.
        dependency: Arc<str>,
        /// The master the writes now go to.
        master: SocketAddr,
        /// How many writes waited during this hold.
        held: u64,
        /// How long the hold lasted.
        held_for: std::time::Duration,
        /// The failover aborted: the master is the one writes were held from.
        aborted: bool,
    },
    /// Traffic of a dependency moved from one IDC's cluster to another's (e.g. RocketMQ).
    #[non_exhaustive]
    ClusterFailedOver {
        /// The dependency.
        dependency: Arc<str>,
        /// The cluster (IDC) traffic left.
        from: Arc<str>,
        /// The cluster (IDC) it went to.
        to: Arc<str>,
        /// Why.
        reason: Arc<str>,
    },
    /// Traffic returned to the preferred (local) cluster after a failover.
    #[non_exhaustive]
    ClusterFailedBack {
        /// The dependency.
        dependency: Arc<str>,
        /// The cluster traffic left.
        from: Arc<str>,
        /// The preferred cluster it returned to.
        to: Arc<str>,
    },
    /// A dependency's cluster in one IDC failed and is avoided for a while (e.g. a RocketMQ
    /// cluster after a failed send); then one request probes it. Published when the cluster
    /// becomes avoided (again after each failed probe, with the longer time), not for every
    /// failure while it is avoided.
    #[non_exhaustive]
    ClusterAvoided {
        /// The dependency.
        dependency: Arc<str>,
        /// The cluster's IDC.
        idc: Arc<str>,
        /// How long it is avoided before a probe.
        for_: Duration,
        /// The failure's root cause.
        cause: Arc<str>,
    },
    /// An avoided cluster took a request again (its probe succeeded).
    #[non_exhaustive]
    ClusterRestored {
        /// The dependency.
        dependency: Arc<str>,
        /// The cluster's IDC.
        idc: Arc<str>,
    },
    /// A replica stopped serving reads: it lags its primary past the bound, its link to the
    /// primary is down, or it did not answer its check (ha-redis: replication offset lag; a
    /// frozen replica). Published when it leaves the read set, not on every check.
    #[non_exhaustive]
    ReplicaLagging {
        /// The dependency.
        dependency: Arc<str>,
        /// The replica's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
        /// What the check saw, e.g. `offset lag 70000 bytes > bound 65536`.
        reason: Arc<str>,
    },
    /// A replica that was [`TopologyEvent::ReplicaLagging`] caught up and serves reads again.
    #[non_exhaustive]
    ReplicaCaughtUp {
        /// The dependency.
        dependency: Arc<str>,
        /// The replica's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
        /// How long it was out.
        after: Duration,
    },
    /// A local spool of messages no cluster took is growing (debounced by the publisher:
    /// ha-mq publishes when the record count reaches each power of two, and at most every 10 s
    /// otherwise while it grows).
    #[non_exhaustive]
    SpoolGrowing {
        /// The dependency.
        dependency: Arc<str>,
        /// Records waiting in the spool.
        records: u64,
        /// The spool's size on disk.
        bytes: u64,
    },
    /// A spool was replayed to the end: every record waiting in it was sent.
    #[non_exhaustive]
    SpoolReplayed {
        /// The dependency.
        dependency: Arc<str>,
        /// Records sent by this replay.
        records: u64,
        /// From the replay's first record to its last commit.
        took: Duration,
    },
    /// A rate limit raised an alert (ha-ratelimit: rejections, near capacity, keys evicted,
    /// cluster limit unavailable), debounced per limit and kind.
    #[non_exhaustive]
    RateLimitAlert {
        /// The limit's name.
        limit: Arc<str>,
        /// What happened: `rejected`, `near_capacity`, `keys_evicted`, `cluster_unavailable`.
        kind: &'static str,
        /// Occurrences folded into this alert since the previous one.
        suppressed: u64,
        /// A human-readable detail (e.g. the IDC and measured load for `near_capacity`).
        detail: Arc<str>,
    },
    /// DNS answers are being served past their TTL because every resolver failed.
    #[non_exhaustive]
    DnsStale {
        /// The dependency.
        dependency: Arc<str>,
        /// How far past expiry the served answer is.
        age_past_expiry: Duration,
    },
    /// A stale answer passed its bound and was dropped; the dependency has no resolved endpoints.
    #[non_exhaustive]
    DnsExpired {
        /// The dependency.
        dependency: Arc<str>,
    },
    /// A resolver of another region answered because the local region's did not.
    #[non_exhaustive]
    DnsFallback {
        /// The dependency.
        dependency: Arc<str>,
        /// The region whose resolvers answered.
        region: Arc<str>,
    },
    /// An answer contained addresses outside the dependency's allowed CIDRs; they were refused.
    #[non_exhaustive]
    DnsPoisoned {
        /// The dependency.
        dependency: Arc<str>,
        /// The region whose resolver gave the answer.
        region: Arc<str>,
        /// The refused addresses.
        refused: Vec<std::net::IpAddr>,
    },
}

impl TopologyEvent {
    /// A short stable name for metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            TopologyEvent::EndpointAdded { .. } => "endpoint_added",
            TopologyEvent::EndpointRemoved { .. } => "endpoint_removed",
            TopologyEvent::EndpointEjected { .. } => "endpoint_ejected",
            TopologyEvent::EndpointRestored { .. } => "endpoint_restored",
            TopologyEvent::TierChanged { .. } => "tier_changed",
            TopologyEvent::IdcDrained { .. } => "idc_drained",
            TopologyEvent::MasterSwitched { .. } => "master_switched",
            TopologyEvent::DnsStale { .. } => "dns_stale",
            TopologyEvent::DnsExpired { .. } => "dns_expired",
            TopologyEvent::DnsFallback { .. } => "dns_fallback",
            TopologyEvent::DnsPoisoned { .. } => "dns_poisoned",
            TopologyEvent::ConnectionFenced { .. } => "connection_fenced",
            TopologyEvent::WatcherDegraded { .. } => "watcher_degraded",
            TopologyEvent::WatcherRestored { .. } => "watcher_restored",
            TopologyEvent::TaskEnded { .. } => "task_ended",
            TopologyEvent::WritesHeld { .. } => "writes_held",
            TopologyEvent::WritesReleased { .. } => "writes_released",
            TopologyEvent::ClusterFailedOver { .. } => "cluster_failed_over",
            TopologyEvent::ClusterFailedBack { .. } => "cluster_failed_back",
            TopologyEvent::ClusterAvoided { .. } => "cluster_avoided",
            TopologyEvent::ClusterRestored { .. } => "cluster_restored",
            TopologyEvent::ReplicaLagging { .. } => "replica_lagging",
            TopologyEvent::ReplicaCaughtUp { .. } => "replica_caught_up",
            TopologyEvent::SpoolGrowing { .. } => "spool_growing",
            TopologyEvent::SpoolReplayed { .. } => "spool_replayed",
            TopologyEvent::RateLimitAlert { .. } => "rate_limit_alert",
        }
    }
}

/// Constructors for the events other crates publish. Every variant is `#[non_exhaustive]` so
/// that a field can be added without breaking anyone: outside ha-core, build events with these
/// and match them with `..`.
impl TopologyEvent {
    /// [`TopologyEvent::MasterSwitched`].
    pub fn master_switched(
        dependency: impl Into<Arc<str>>,
        from: Option<SocketAddr>,
        addr: SocketAddr,
        idc: impl Into<Arc<str>>,
        generation: Generation,
        cause: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::MasterSwitched {
            dependency: dependency.into(),
            from,
            addr,
            idc: idc.into(),
            generation,
            cause: cause.into(),
        }
    }

    /// [`TopologyEvent::ConnectionFenced`].
    pub fn connection_fenced(
        dependency: impl Into<Arc<str>>,
        addr: SocketAddr,
        connection: Generation,
        current: Generation,
    ) -> Self {
        TopologyEvent::ConnectionFenced {
            dependency: dependency.into(),
            addr,
            connection,
            current,
        }
    }

    /// [`TopologyEvent::WatcherDegraded`].
    pub fn watcher_degraded(
        dependency: impl Into<Arc<str>>,
        watcher: impl Into<Arc<str>>,
        reason: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::WatcherDegraded {
            dependency: dependency.into(),
            watcher: watcher.into(),
            reason: reason.into(),
        }
    }

    /// [`TopologyEvent::WatcherRestored`].
    pub fn watcher_restored(dependency: impl Into<Arc<str>>, watcher: impl Into<Arc<str>>) -> Self {
        TopologyEvent::WatcherRestored {
            dependency: dependency.into(),
            watcher: watcher.into(),
        }
    }

    /// [`TopologyEvent::TaskEnded`].
    pub fn task_ended(
        dependency: impl Into<Arc<str>>,
        task: impl Into<Arc<str>>,
        reason: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::TaskEnded {
            dependency: dependency.into(),
            task: task.into(),
            reason: reason.into(),
        }
    }

    /// [`TopologyEvent::WritesHeld`].
    pub fn writes_held(dependency: impl Into<Arc<str>>, reason: impl Into<Arc<str>>) -> Self {
        TopologyEvent::WritesHeld {
            dependency: dependency.into(),
            reason: reason.into(),
        }
    }

    /// [`TopologyEvent::WritesReleased`].
    pub fn writes_released(
        dependency: impl Into<Arc<str>>,
        master: SocketAddr,
        held: u64,
        held_for: std::time::Duration,
        aborted: bool,
    ) -> Self {
        TopologyEvent::WritesReleased {
            dependency: dependency.into(),
            master,
            held,
            held_for,
            aborted,
        }
    }

    /// [`TopologyEvent::ClusterFailedOver`].
    pub fn cluster_failed_over(
        dependency: impl Into<Arc<str>>,
        from: impl Into<Arc<str>>,
        to: impl Into<Arc<str>>,
        reason: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::ClusterFailedOver {
            dependency: dependency.into(),
            from: from.into(),
            to: to.into(),
            reason: reason.into(),
        }
    }

    /// [`TopologyEvent::ClusterFailedBack`].
    pub fn cluster_failed_back(
        dependency: impl Into<Arc<str>>,
        from: impl Into<Arc<str>>,
        to: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::ClusterFailedBack {
            dependency: dependency.into(),
            from: from.into(),
            to: to.into(),
        }
    }

    /// [`TopologyEvent::ClusterAvoided`].
    pub fn cluster_avoided(
        dependency: impl Into<Arc<str>>,
        idc: impl Into<Arc<str>>,
        for_: Duration,
        cause: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::ClusterAvoided {
            dependency: dependency.into(),
            idc: idc.into(),
            for_,
            cause: cause.into(),
        }
    }

    /// [`TopologyEvent::ClusterRestored`].
    pub fn cluster_restored(dependency: impl Into<Arc<str>>, idc: impl Into<Arc<str>>) -> Self {
        TopologyEvent::ClusterRestored {
            dependency: dependency.into(),
            idc: idc.into(),
        }
    }

    /// [`TopologyEvent::ReplicaLagging`].
    pub fn replica_lagging(
        dependency: impl Into<Arc<str>>,
        addr: SocketAddr,
        idc: impl Into<Arc<str>>,
        reason: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::ReplicaLagging {
            dependency: dependency.into(),
            addr,
            idc: idc.into(),
            reason: reason.into(),
        }
    }

    /// [`TopologyEvent::ReplicaCaughtUp`].
    pub fn replica_caught_up(
        dependency: impl Into<Arc<str>>,
        addr: SocketAddr,
        idc: impl Into<Arc<str>>,
        after: Duration,
    ) -> Self {
        TopologyEvent::ReplicaCaughtUp {
            dependency: dependency.into(),
            addr,
            idc: idc.into(),
            after,
        }
    }

    /// [`TopologyEvent::SpoolGrowing`].
    pub fn spool_growing(dependency: impl Into<Arc<str>>, records: u64, bytes: u64) -> Self {
        TopologyEvent::SpoolGrowing {
            dependency: dependency.into(),
            records,
            bytes,
        }
    }

    /// [`TopologyEvent::SpoolReplayed`].
    pub fn spool_replayed(dependency: impl Into<Arc<str>>, records: u64, took: Duration) -> Self {
        TopologyEvent::SpoolReplayed {
            dependency: dependency.into(),
            records,
            took,
        }
    }

    /// [`TopologyEvent::RateLimitAlert`].
    pub fn rate_limit_alert(
        limit: impl Into<Arc<str>>,
        kind: &'static str,
        suppressed: u64,
        detail: impl Into<Arc<str>>,
    ) -> Self {
        TopologyEvent::RateLimitAlert {
            limit: limit.into(),
            kind,
            suppressed,
            detail: detail.into(),
        }
    }

    /// [`TopologyEvent::IdcDrained`].
    pub fn idc_drained(idc: impl Into<Arc<str>>, drained: bool) -> Self {
        TopologyEvent::IdcDrained {
            idc: idc.into(),
            drained,
        }
    }

    /// The dependency the event is about, `None` for IDC- and limit-wide events.
    pub fn dependency(&self) -> Option<&Arc<str>> {
        match self {
            TopologyEvent::EndpointAdded { dependency, .. }
            | TopologyEvent::EndpointRemoved { dependency, .. }
            | TopologyEvent::EndpointEjected { dependency, .. }
            | TopologyEvent::EndpointRestored { dependency, .. }
            | TopologyEvent::TierChanged { dependency, .. }
            | TopologyEvent::MasterSwitched { dependency, .. }
            | TopologyEvent::DnsStale { dependency, .. }
            | TopologyEvent::DnsExpired { dependency, .. }
            | TopologyEvent::DnsFallback { dependency, .. }
            | TopologyEvent::DnsPoisoned { dependency, .. }
            | TopologyEvent::ConnectionFenced { dependency, .. }
            | TopologyEvent::WatcherDegraded { dependency, .. }
            | TopologyEvent::WatcherRestored { dependency, .. }
            | TopologyEvent::TaskEnded { dependency, .. }
            | TopologyEvent::ClusterFailedOver { dependency, .. }
            | TopologyEvent::ClusterFailedBack { dependency, .. }
            | TopologyEvent::ClusterAvoided { dependency, .. }
            | TopologyEvent::ClusterRestored { dependency, .. }
            | TopologyEvent::ReplicaLagging { dependency, .. }
            | TopologyEvent::ReplicaCaughtUp { dependency, .. }
            | TopologyEvent::SpoolGrowing { dependency, .. }
            | TopologyEvent::SpoolReplayed { dependency, .. }
            | TopologyEvent::WritesHeld { dependency, .. }
            | TopologyEvent::WritesReleased { dependency, .. } => Some(dependency),
            TopologyEvent::IdcDrained { .. } | TopologyEvent::RateLimitAlert { .. } => None,
        }
    }
}

/// The broadcast channel of [`TopologyEvent`]s, shared by every component of one client.
///
/// Publishing never blocks and never fails; a slow subscriber loses the oldest events (and sees
/// `RecvError::Lagged`). Every event is also logged with `tracing` and counted in
/// `ha_core_topology_events_total{kind}`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use ha_core::{EventBus, TopologyEvent};
/// let bus = EventBus::new(64);
/// let mut rx = bus.subscribe();
/// bus.publish(TopologyEvent::idc_drained("bj-b", true));
/// assert_eq!(rx.recv().await.unwrap().kind(), "idc_drained");
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<TopologyEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new(1024)
    }
}

impl EventBus {
    /// A bus keeping up to `capacity` events for slow subscribers.
    pub fn new(capacity: usize) -> EventBus {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventBus { tx }
    }

    /// A new subscriber, receiving events published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<TopologyEvent> {
        self.tx.subscribe()
    }

    /// Publishes an event, mirroring it to `tracing` and `metrics`.
    pub fn publish(&self, event: TopologyEvent) {
        metrics::counter!(crate::metrics_names::TOPOLOGY_EVENTS, "kind" => event.kind())
            .increment(1);
        match &event {
            TopologyEvent::EndpointEjected {
                dependency,
                addr,
                idc,
                for_,
                reason,
            } => {
                tracing::warn!(%dependency, endpoint = %addr, %idc, ejected_for = ?for_, reason, "endpoint ejected");
            }
            TopologyEvent::EndpointRestored {
                dependency,
                addr,
                idc,
            } => {
                tracing::info!(%dependency, endpoint = %addr, %idc, "endpoint restored");
            }
            TopologyEvent::EndpointAdded {
                dependency,
                addr,
                idc,
            } => {
                tracing::info!(%dependency, endpoint = %addr, %idc, "endpoint added");
            }
            TopologyEvent::EndpointRemoved {
                dependency,
                addr,
                idc,
            } => {
                tracing::info!(%dependency, endpoint = %addr, %idc, "endpoint removed");
            }
            TopologyEvent::TierChanged {
                dependency,
                shares,
                panic,
            } => {
                tracing::info!(%dependency, same_idc = shares[0], same_region = shares[1], remote = shares[2], panic, "tier shares changed");
            }
            TopologyEvent::IdcDrained { idc, drained } => {
                tracing::warn!(%idc, drained, "idc drain changed");
            }
            TopologyEvent::MasterSwitched {
                dependency,
                from,
                addr,
                idc,
                generation,
                cause,
            } => {
                tracing::warn!(%dependency, from = ?from, endpoint = %addr, %idc, generation, %cause, "master switched");
            }
            TopologyEvent::ConnectionFenced {
                dependency,
                addr,
                connection,
                current,
            } => {
                tracing::warn!(%dependency, endpoint = %addr, generation = connection, current, "connection of an old generation fenced");
            }
            TopologyEvent::WatcherDegraded {
                dependency,
                watcher,
                reason,
            } => {
                tracing::warn!(%dependency, %watcher, %reason, "watcher degraded");
            }
            TopologyEvent::WatcherRestored {
                dependency,
                watcher,
            } => {
                tracing::info!(%dependency, %watcher, "watcher restored");
            }
            TopologyEvent::TaskEnded {
                dependency,
                task,
                reason,
            } => {
                // Nobody watching any more is an orderly end; anything else (stopped, a panic)
                // leaves something that no longer changes.
                if &**reason == "every receiver dropped" {
                    tracing::info!(%dependency, %task, %reason, "background task ended");
                } else {
                    tracing::error!(%dependency, %task, %reason, "background task ended");
                }
            }
            TopologyEvent::WritesHeld { dependency, reason } => {
                tracing::warn!(%dependency, %reason, "failover in progress: writes held");
            }
            TopologyEvent::WritesReleased {
                dependency,
                master,
                held,
                held_for,
                aborted,
            } => {
                tracing::info!(%dependency, %master, held, held_ms = held_for.as_millis() as u64, aborted, "held writes released");
            }
            TopologyEvent::ClusterFailedOver {
                dependency,
                from,
                to,
                reason,
            } => {
                tracing::warn!(%dependency, %from, %to, %reason, "cluster failed over");
            }
            TopologyEvent::ClusterFailedBack {
                dependency,
                from,
                to,
            } => {
                tracing::info!(%dependency, %from, %to, "cluster failed back");
            }
            TopologyEvent::ClusterAvoided {
                dependency,
                idc,
                for_,
                cause,
            } => {
                tracing::warn!(%dependency, %idc, avoided_for = ?for_, %cause, "cluster avoided");
            }
            TopologyEvent::ClusterRestored { dependency, idc } => {
                tracing::info!(%dependency, %idc, "cluster restored");
            }
            TopologyEvent::ReplicaLagging {
                dependency,
                addr,
                idc,
                reason,
            } => {
                tracing::warn!(%dependency, endpoint = %addr, %idc, %reason, "replica out of the read set");
            }
            TopologyEvent::ReplicaCaughtUp {
                dependency,
                addr,
                idc,
                after,
            } => {
                tracing::info!(%dependency, endpoint = %addr, %idc, after_ms = after.as_millis() as u64, "replica caught up: serves reads again");
            }
            TopologyEvent::SpoolGrowing {
                dependency,
                records,
                bytes,
            } => {
                tracing::warn!(%dependency, records, bytes, "spool growing: no cluster takes messages");
            }
            TopologyEvent::SpoolReplayed {
                dependency,
                records,
                took,
            } => {
                tracing::info!(%dependency, records, took_ms = took.as_millis() as u64, "spool replayed");
            }
            TopologyEvent::RateLimitAlert {
                limit,
                kind,
                suppressed,
                detail,
            } => {
                tracing::warn!(%limit, kind, suppressed, %detail, "rate limit alert");
            }
            TopologyEvent::DnsStale {
                dependency,
                age_past_expiry,
            } => {
                tracing::warn!(%dependency, past_expiry = ?age_past_expiry, "every resolver failed: serving stale DNS answers");
            }
            TopologyEvent::DnsExpired { dependency } => {
                tracing::error!(%dependency, "stale DNS answers passed their bound: no endpoints");
            }
            TopologyEvent::DnsFallback { dependency, region } => {
                tracing::warn!(%dependency, %region, "local region's resolvers failed: answered by another region");
            }
            TopologyEvent::DnsPoisoned {
                dependency,
                region,
                refused,
            } => {
                tracing::error!(%dependency, %region, ?refused, "DNS answer outside the allowed CIDRs refused");
            }
        }
        // No subscriber is not an error.
        let _ = self.tx.send(event);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn cluster_and_spool_events_name_their_dependency() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        bus.publish(TopologyEvent::cluster_avoided(
            "events",
            "bj-a",
            Duration::from_millis(100),
            "transport.connection.failed",
        ));
        bus.publish(TopologyEvent::cluster_restored("events", "bj-a"));
        bus.publish(TopologyEvent::spool_growing("events", 64, 8192));
        bus.publish(TopologyEvent::spool_replayed(
            "events",
            64,
            Duration::from_millis(300),
        ));
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let e = rx.recv().await.unwrap();
            assert_eq!(e.dependency().map(|d| &**d), Some("events"));
            kinds.push(e.kind());
        }
        assert_eq!(
            kinds,
            [
                "cluster_avoided",
                "cluster_restored",
                "spool_growing",
                "spool_replayed"
            ]
        );
    }

    #[tokio::test]
    async fn a_hold_and_its_release_reach_subscribers_in_order() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        let master: SocketAddr = "127.0.2.1:6379".parse().unwrap();
        bus.publish(TopologyEvent::writes_held("cache", "+try-failover"));
        bus.publish(TopologyEvent::writes_released(
            "cache",
            master,
            3,
            std::time::Duration::from_millis(640),
            false,
        ));
        let held = rx.recv().await.unwrap();
        assert_eq!(held.kind(), "writes_held");
        assert_eq!(held.dependency().map(|d| &**d), Some("cache"));
        let released = rx.recv().await.unwrap();
        assert_eq!(released.kind(), "writes_released");
        assert!(matches!(
            released,
            TopologyEvent::WritesReleased { master: m, held: 3, aborted: false, .. } if m == master
        ));
    }
}
