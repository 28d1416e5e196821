//! Per-region DNS with background refresh, serve-stale and a poisoning guard.
//!
//! # Resolution: [`RegionalResolver`]
//!
//! Every region has its own resolvers and may have its own name for a dependency
//! (`dns = { north = "profile.north.lab.", south = "profile.south.lab." }`). The resolver holds
//! one hickory resolver per region whose name servers are exactly that region's `resolvers`
//! (UDP, TCP for truncated answers; hickory's cache off, no retries inside hickory). A
//! resolution asks the local region first, querying A and AAAA for the region's name (a region
//! without a name of its own uses the local region's name), and moves to the next region (file
//! order) only on a *failure*: no answer within `query_timeout`, SERVFAIL, REFUSED, a transport
//! error, or an answer whose addresses are all outside the dependency's `allowed_cidrs`.
//! NXDOMAIN and NODATA are *answers* (the name has no addresses): the region's DNS works and
//! has spoken, so the result is an empty set, not a fallback. An [`Answer`] says who answered
//! and whether that was a fallback; a [`DnsError`] lists what every region's attempt gave.
//!
//! # Refresh: [`DnsDiscovery`]
//!
//! One background task per DNS dependency publishes [`EndpointSet`](crate::EndpointSet)s on a
//! `watch` channel and an `arc-swap` ([`DnsDiscovery::current`]); the call path never waits on
//! DNS. With the defaults of [`DnsSettings`](crate::DnsSettings) (`min_ttl` 1s, `max_ttl` 300s,
//! `refresh_ahead` 0.75, `serve_stale_for` 300s, `query_timeout` 1s, `retry_interval` 1s):
//!
//! - **TTL**: the smallest record TTL of the answer (CNAMEs included; the SOA negative TTL for
//!   an empty answer), clamped to `[min_ttl, max_ttl]`. The answer expires at `now + ttl`.
//! - **Refresh ahead**: the next lookup starts at `refresh_ahead × ttl` (75%), so a working DNS
//!   replaces the set before it expires. [`DnsDiscovery::refresh_now`] asks for one at once.
//! - **Changes**: a changed address list publishes a new set (version + 1) with an
//!   `EndpointAdded` / `EndpointRemoved` event per difference; an identical list only extends
//!   the expiry (no new version). Versions change exactly when the addresses do.
//! - **Failure**: when every region fails, the lookup is retried every `retry_interval` and the
//!   last good set keeps being served. Past its expiry it is republished with `stale: true`
//!   (same version), with a `DnsStale` event, a `ha_core_dns_stale_served_total` increment and
//!   one warning per failed retry (not per call). At `expiry + serve_stale_for` (300s by
//!   default) an empty set replaces it and `DnsExpired` is emitted: the balancer then fails
//!   with [`HaError::NoHealthyEndpoint`](crate::HaError::NoHealthyEndpoint) instead of calling
//!   addresses nobody vouches for any more. The first good answer afterwards restores the set.
//! - **Fallback**: an answer from another region than the local one emits `DnsFallback` (once
//!   per change of answering region, not per refresh).
//! - **Poisoning**: addresses outside the dependency's `allowed_cidrs` (by default the ranges of
//!   every configured IDC) are dropped, counted in `ha_core_dns_poisoned_total` and alerted with
//!   a `DnsPoisoned` event (logged at error level) on every answer that carries them. An answer
//!   with *only* refused addresses is a failure of its region: the next region is asked and,
//!   if none answers, the previous good set keeps being served as above.
//!
//! Every lookup attempt of a region is counted in `ha_core_dns_lookups_total{dependency,
//! region, outcome}` with outcome `ok`, `error` or `timeout`.
//!
//! The timing rules live in a pure state machine driven by `tokio::time::Instant`, and the
//! lookup sits behind the [`DnsLookup`] trait, so the behaviour is tested with paused time.

mod discovery;
mod resolver;
mod state;

pub use discovery::DnsDiscovery;
pub use resolver::{Answer, AttemptError, DnsError, DnsLookup, RegionAttempt, RegionalResolver};

#[cfg(test)]
mod tests;
