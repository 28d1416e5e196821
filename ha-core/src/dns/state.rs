//! The refresh state machine of one DNS dependency: pure, driven by `tokio::time::Instant`.
//!
//! [`RefreshState`] decides when to resolve, what to publish and which events to emit; the
//! background task only feeds it the time and the lookup results and carries out its
//! [`Effect`]s. Nothing here does I/O, so unit tests drive it (and the task) with paused time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::resolver::{Answer, AttemptError, DnsError, RegionAttempt};
use crate::config::DnsSettings;
use crate::discovery::EndpointSet;
use crate::events::TopologyEvent;
use crate::locality::IdcClassifier;

/// Something the refresh task must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Publish this set (to the watch channel and the arc-swap).
    Publish(Arc<EndpointSet>),
    /// Publish this event on the bus.
    Event(TopologyEvent),
    /// A stale set is being served: count `ha_core_dns_stale_served_total` (the matching
    /// `DnsStale` event comes as its own [`Effect::Event`]).
    StaleServed,
    /// Every region failed; `stale` says whether the published set is stale (then the
    /// `DnsStale` event already warns, so the task logs the failure at debug).
    Failed { error: DnsError, stale: bool },
}

/// The last good answer.
#[derive(Debug, Clone)]
struct Good {
    expires: Instant,
}

/// The refresh state of one dependency.
#[derive(Debug)]
pub(crate) struct RefreshState {
    settings: DnsSettings,
    dependency: Arc<str>,
    port: u16,
    classifier: Arc<IdcClassifier>,
    /// The addresses of the published set.
    published: Vec<IpAddr>,
    version: u64,
    stale: bool,
    good: Option<Good>,
    next_refresh: Instant,
    /// The non-local region that answered last, to emit `DnsFallback` once per change.
    fallback_region: Option<Arc<str>>,
}

impl RefreshState {
    /// A state with nothing resolved, due for a refresh at `now`.
    pub(crate) fn new(
        settings: DnsSettings,
        dependency: Arc<str>,
        port: u16,
        classifier: Arc<IdcClassifier>,
        now: Instant,
    ) -> RefreshState {
        RefreshState {
            settings,
            dependency,
            port,
            classifier,
            published: Vec::new(),
            version: 0,
            stale: false,
            good: None,
            next_refresh: now,
            fallback_region: None,
        }
    }

    /// The set published before any answer.
    pub(crate) fn initial_set(&self) -> EndpointSet {
        EndpointSet::empty(self.dependency.clone())
    }

    /// True when a lookup should start now.
    pub(crate) fn refresh_due(&self, now: Instant) -> bool {
        now >= self.next_refresh
    }

    /// When the next lookup is due.
    pub(crate) fn next_refresh(&self) -> Instant {
        self.next_refresh
    }

    /// Makes a lookup due at `now` (the `refresh_now` nudge).
    pub(crate) fn refresh_now(&mut self, now: Instant) {
        self.next_refresh = self.next_refresh.min(now);
    }

    /// The next time-driven transition (the set going stale, or the stale bound), if any.
    pub(crate) fn next_transition(&self) -> Option<Instant> {
        let good = self.good.as_ref()?;
        if self.stale {
            Some(good.expires + self.settings.serve_stale_for)
        } else {
            Some(good.expires)
        }
    }

    /// The next instant at which [`RefreshState::on_time`] or a refresh has work.
    pub(crate) fn next_wake(&self) -> Instant {
        match self.next_transition() {
            Some(t) => t.min(self.next_refresh),
            None => self.next_refresh,
        }
    }

    /// The time-driven transitions: past expiry the set is republished with `stale: true`;
    /// past `expiry + serve_stale_for` an empty set replaces it (and `DnsExpired` is emitted).
    pub(crate) fn on_time(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(good) = self.good.clone() else {
            return out;
        };
        if now >= good.expires + self.settings.serve_stale_for {
            self.good = None;
            self.stale = false;
            // Events go out before the set they describe, so a watcher woken by the set finds
            // them already on the bus.
            out.push(Effect::Event(TopologyEvent::DnsExpired {
                dependency: self.dependency.clone(),
            }));
            self.publish_addrs(Vec::new(), &mut out);
        } else if now >= good.expires && !self.stale {
            self.stale = true;
            self.stale_served(now - good.expires, &mut out);
            self.publish_same(&mut out);
        }
        out
    }

    /// A lookup finished at `now`.
    pub(crate) fn on_result(
        &mut self,
        now: Instant,
        result: Result<Answer, DnsError>,
    ) -> Vec<Effect> {
        match result {
            // An answer with nothing but refused addresses is a failure of its region; a real
            // RegionalResolver already turns it into one, a scripted lookup might not.
            Ok(a) if a.addrs.is_empty() && !a.refused.is_empty() => {
                let mut attempts = a.failed;
                attempts.push(RegionAttempt {
                    region: a.region,
                    name: String::new(),
                    error: AttemptError::Poisoned { refused: a.refused },
                });
                let error = DnsError::AllRegionsFailed {
                    dependency: self.dependency.clone(),
                    attempts,
                };
                self.on_failure(now, error)
            }
            Ok(answer) => self.on_answer(now, answer),
            Err(error) => self.on_failure(now, error),
        }
    }

    fn on_answer(&mut self, now: Instant, answer: Answer) -> Vec<Effect> {
        let mut out = Vec::new();
        self.poisoned(&answer.failed, &mut out);
        if !answer.refused.is_empty() {
            out.push(Effect::Event(TopologyEvent::DnsPoisoned {
                dependency: self.dependency.clone(),
                region: answer.region.clone(),
                refused: answer.refused.clone(),
            }));
        }
        if answer.fallback {
            if self.fallback_region.as_ref() != Some(&answer.region) {
                out.push(Effect::Event(TopologyEvent::DnsFallback {
                    dependency: self.dependency.clone(),
                    region: answer.region.clone(),
                }));
                self.fallback_region = Some(answer.region.clone());
            }
        } else {
            self.fallback_region = None;
        }
        let ttl = self.settings.clamp_ttl(answer.ttl);
        let mut addrs = answer.addrs;
        addrs.sort();
        addrs.dedup();
        let was_stale = self.stale;
        self.stale = false;
        // An empty answer (NXDOMAIN, NODATA) has nothing to serve stale, hence nothing to expire.
        self.good = (!addrs.is_empty()).then_some(Good { expires: now + ttl });
        self.next_refresh = now + ttl.mul_f64(self.settings.refresh_ahead);
        if addrs != self.published {
            self.publish_addrs(addrs, &mut out);
        } else if was_stale {
            // Same addresses, fresh again: the flag changes, the version does not.
            self.publish_same(&mut out);
        }
        out
    }

    fn on_failure(&mut self, now: Instant, error: DnsError) -> Vec<Effect> {
        let mut out = Vec::new();
        self.poisoned(error.attempts(), &mut out);
        self.next_refresh = now + self.settings.retry_interval;
        let mut time = self.on_time(now);
        let went_stale = time.contains(&Effect::StaleServed);
        out.append(&mut time);
        if self.stale && !went_stale {
            // One stale report per failed retry while stale: an event, a metric, one warn.
            if let Some(good) = &self.good {
                self.stale_served(now.saturating_duration_since(good.expires), &mut out);
            }
        }
        out.push(Effect::Failed {
            error,
            stale: self.stale,
        });
        out
    }

    fn poisoned(&self, attempts: &[RegionAttempt], out: &mut Vec<Effect>) {
        for a in attempts {
            if let AttemptError::Poisoned { refused } = &a.error {
                out.push(Effect::Event(TopologyEvent::DnsPoisoned {
                    dependency: self.dependency.clone(),
                    region: a.region.clone(),
                    refused: refused.clone(),
                }));
            }
        }
    }

    fn stale_served(&self, age: Duration, out: &mut Vec<Effect>) {
        out.push(Effect::StaleServed);
        out.push(Effect::Event(TopologyEvent::DnsStale {
            dependency: self.dependency.clone(),
            age_past_expiry: age,
        }));
    }

    /// Publishes a new version with `addrs`, with an event per added and removed endpoint.
    fn publish_addrs(&mut self, addrs: Vec<IpAddr>, out: &mut Vec<Effect>) {
        for ip in self.published.iter().filter(|ip| !addrs.contains(ip)) {
            let e = self.classifier.endpoint(SocketAddr::new(*ip, self.port));
            out.push(Effect::Event(TopologyEvent::EndpointRemoved {
                dependency: self.dependency.clone(),
                addr: e.addr,
                idc: e.idc_name().into(),
            }));
        }
        for ip in addrs.iter().filter(|ip| !self.published.contains(ip)) {
            let e = self.classifier.endpoint(SocketAddr::new(*ip, self.port));
            out.push(Effect::Event(TopologyEvent::EndpointAdded {
                dependency: self.dependency.clone(),
                addr: e.addr,
                idc: e.idc_name().into(),
            }));
        }
        self.published = addrs;
        self.version += 1;
        self.publish_same(out);
    }

    /// Publishes the current addresses, version and stale flag.
    fn publish_same(&self, out: &mut Vec<Effect>) {
        let endpoints = self
            .published
            .iter()
            .map(|ip| self.classifier.endpoint(SocketAddr::new(*ip, self.port)))
            .collect();
        let mut set = EndpointSet::new(self.dependency.clone(), endpoints, self.version);
        set.stale = self.stale;
        out.push(Effect::Publish(Arc::new(set)));
    }
}
