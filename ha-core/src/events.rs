//! Topology events: every change to a dependency's endpoints, health, tier or master, broadcast on
//! one channel and mirrored to `tracing` and `metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

/// A change somewhere in the topology.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TopologyEvent {
    /// A new endpoint appeared in a dependency's set.
    EndpointAdded {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC (`unknown` when unclassified).
        idc: Arc<str>,
    },
    /// An endpoint left a dependency's set.
    EndpointRemoved {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
    },
    /// Outlier detection ejected an endpoint.
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
    EndpointRestored {
        /// The dependency.
        dependency: Arc<str>,
        /// The endpoint's address.
        addr: SocketAddr,
        /// Its IDC.
        idc: Arc<str>,
    },
    /// The share of traffic sent to each locality tier changed.
    TierChanged {
        /// The dependency.
        dependency: Arc<str>,
        /// Shares for `SameIdc`, `SameRegion`, `Remote` (sum 1 unless nothing is usable).
        shares: [f64; 3],
        /// True when too few endpoints are healthy and every endpoint is used.
        panic: bool,
    },
    /// An operator drained (or undrained) an IDC.
    IdcDrained {
        /// The IDC.
        idc: Arc<str>,
        /// True when drained, false when undrained.
        drained: bool,
    },
    /// The master of a dependency changed; its generation was bumped.
    MasterSwitched {
        /// The dependency.
        dependency: Arc<str>,
        /// The new master.
        addr: SocketAddr,
        /// The new generation.
        generation: u64,
    },
    /// DNS answers are being served past their TTL because every resolver failed.
    DnsStale {
        /// The dependency.
        dependency: Arc<str>,
        /// How far past expiry the served answer is.
        age_past_expiry: Duration,
    },
    /// A stale answer passed its bound and was dropped; the dependency has no resolved endpoints.
    DnsExpired {
        /// The dependency.
        dependency: Arc<str>,
    },
    /// A resolver of another region answered because the local region's did not.
    DnsFallback {
        /// The dependency.
        dependency: Arc<str>,
        /// The region whose resolvers answered.
        region: Arc<str>,
    },
    /// An answer contained addresses outside the dependency's allowed CIDRs; they were refused.
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
/// bus.publish(TopologyEvent::IdcDrained { idc: "bj-b".into(), drained: true });
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
                addr,
                generation,
            } => {
                tracing::warn!(%dependency, endpoint = %addr, generation, "master switched");
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
