//! The metric names of ha-core, `ha_core_<thing>_<unit>`. Labels are noted beside each.

/// Counter: topology events published, label `kind`.
pub const TOPOLOGY_EVENTS: &str = "ha_core_topology_events_total";
/// Counter: picks, labels `dependency`, `locality`, `idc`.
pub const PICKS: &str = "ha_core_picks_total";
/// Counter: calls that found no usable endpoint, label `dependency`.
pub const NO_ENDPOINT: &str = "ha_core_no_healthy_endpoint_total";
/// Gauge: share of traffic per tier, labels `dependency`, `locality`.
pub const TIER_SHARE: &str = "ha_core_tier_share_ratio";
/// Gauge: 1 while the dependency is in panic mode, label `dependency`.
pub const PANIC: &str = "ha_core_panic_mode";
/// Counter: endpoint ejections, labels `dependency`, `idc`, `reason`.
pub const EJECTIONS: &str = "ha_core_ejections_total";
/// Counter: DNS lookups, labels `dependency`, `region`, `outcome` (`ok`, `error`, `timeout`).
pub const DNS_LOOKUPS: &str = "ha_core_dns_lookups_total";
/// Counter: times stale DNS answers were served, label `dependency`.
pub const DNS_STALE: &str = "ha_core_dns_stale_served_total";
/// Counter: addresses refused as outside the allowed CIDRs, labels `dependency`, `region`.
pub const DNS_POISONED: &str = "ha_core_dns_poisoned_total";
/// Counter: failover retry decisions, labels `dependency`, `outcome` (`retried`,
/// `budget_exhausted`, `not_retryable`, `attempts_exhausted`, `deadline_exceeded`, `no_endpoint`).
pub const RETRIES: &str = "ha_core_retries_total";
/// Counter: calls that exceeded their deadline, label `dependency`.
pub const DEADLINES: &str = "ha_core_deadline_exceeded_total";
/// Counter: calls refused by an open fail-fast guard.
pub const FAIL_FAST: &str = "ha_core_fail_fast_rejected_total";
/// Counter: connections of an old generation refused, label `dependency`.
pub const FENCED: &str = "ha_core_fenced_total";
/// Counter: calls whose outcome is unknown (sent, no answer, not retried), label `dependency`.
pub const OUTCOME_UNKNOWN: &str = "ha_core_outcome_unknown_total";
/// Counter: failures that would have ejected an endpoint but the ejection cap refused, labels
/// `dependency`, `idc`.
pub const EJECTION_CAPPED: &str = "ha_core_ejection_capped_total";
/// Counter: background tasks that ended (a refresh or watcher task), labels `dependency`,
/// `task`.
pub const TASKS_ENDED: &str = "ha_core_tasks_ended_total";
