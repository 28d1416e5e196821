//! The refresh state machine of one DNS dependency: pure, driven by `tokio::time::Instant`.
//!
//! [`RefreshState`] decides when to resolve, what to publish and which events to emit; the
//! background task only feeds it the time and the lookup results and carries out its
//! [`Effect`]s. Nothing here does I/O, so unit tests drive it (and the task) with paused time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::resolver::{Answer, AttemptError, DnsError, RegionAttempt};
use crate::config::DnsSettings;
use crate::events::TopologyEvent;

/// Something the refresh task must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Publish these addresses as a fresh set (the [`Publisher`](crate::discovery::Publisher)
    /// diffs, versions and announces them).
    Publish(Vec<IpAddr>),
    /// Keep the addresses, mark the set stale.
    MarkStale,
    /// Replace the set by an empty, expired one.
    Expire,
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
    /// The addresses of the published set.
    published: Vec<IpAddr>,
    stale: bool,
    /// An empty answer (NXDOMAIN, NODATA) came while addresses were published: the set is
    /// kept (stale) and the next lookup asks every region; only if every region confirms is
    /// the set emptied. One answer from one region never empties a set at once.
    suspect: bool,
    good: Option<Good>,
    next_refresh: Instant,
    /// The non-local region that answered last, to emit `DnsFallback` once per change.
    fallback_region: Option<Arc<str>>,
}

impl RefreshState {
    /// A state with nothing resolved, due for a refresh at `now`.
    pub(crate) fn new(settings: DnsSettings, dependency: Arc<str>, now: Instant) -> RefreshState {
        RefreshState {
            settings,
            dependency,
            published: Vec::new(),
            stale: false,
            suspect: false,
            good: None,
            next_refresh: now,
            fallback_region: None,
        }
    }

    /// True when the next lookup must ask every region (an empty answer is being confirmed).
    pub(crate) fn confirming(&self) -> bool {
        self.suspect
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
            Some(at(good.expires, self.settings.serve_stale_for))
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
        if now >= at(good.expires, self.settings.serve_stale_for) {
            self.good = None;
            self.stale = false;
            self.suspect = false;
            self.published = Vec::new();
            // Events go out before the set they describe, so a watcher woken by the set finds
            // them already on the bus.
            out.push(Effect::Event(TopologyEvent::DnsExpired {
                dependency: self.dependency.clone(),
            }));
            out.push(Effect::Expire);
        } else if now >= good.expires && !self.stale {
            self.stale = true;
            self.stale_served(now - good.expires, &mut out);
            out.push(Effect::MarkStale);
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
        if addrs.is_empty() && !self.published.is_empty() && !self.suspect {
            // One region says the name has no addresses while we hold some: a record being
            // replaced, a broken zone push, a resolver with a stale negative entry. Keep the
            // set (stale) and ask every region soon; a long negative TTL must not empty it.
            tracing::warn!(dependency = %self.dependency, region = %answer.region, "dns: empty answer for a name with addresses; keeping the last set until every region confirms");
            self.suspect = true;
            self.next_refresh = at(now, self.settings.retry_interval);
            if !self.stale {
                self.stale = true;
                out.push(Effect::MarkStale);
            }
            return out;
        }
        self.suspect = false;
        let was_stale = self.stale;
        self.stale = false;
        // An empty answer (NXDOMAIN, NODATA) has nothing to serve stale, hence nothing to expire;
        // it is asked again soon (at most every `retry_interval`, at least `min_ttl`), whatever
        // its negative TTL: an empty set is an outage.
        self.good = (!addrs.is_empty()).then_some(Good {
            expires: at(now, ttl),
        });
        let refresh = ttl.mul_f64(self.settings.refresh_ahead);
        self.next_refresh = if addrs.is_empty() {
            at(
                now,
                refresh.min(self.settings.retry_interval.max(self.settings.min_ttl)),
            )
        } else {
            at(now, refresh)
        };
        if addrs != self.published || was_stale {
            // Same addresses, fresh again: the flag changes, the version does not (the
            // publisher only bumps it for a change of endpoints).
            self.published = addrs.clone();
            out.push(Effect::Publish(addrs));
        }
        out
    }

    fn on_failure(&mut self, now: Instant, error: DnsError) -> Vec<Effect> {
        let mut out = Vec::new();
        self.poisoned(error.attempts(), &mut out);
        self.next_refresh = at(now, self.settings.retry_interval);
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
}

/// The longest span any DNS deadline is put ahead of now: time arithmetic past it saturates
/// here instead of overflowing an `Instant` (a huge configured duration must never panic the
/// refresh task).
pub(crate) const FAR: Duration = Duration::from_secs(86_400 * 365 * 10);

/// `base + d`, saturating at `base + FAR`.
pub(crate) fn at(base: Instant, d: Duration) -> Instant {
    base.checked_add(d.min(FAR))
        .unwrap_or_else(|| base.checked_add(FAR).unwrap_or(base))
}
