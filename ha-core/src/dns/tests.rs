#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Paused-time tests of the refresh state machine and task, with a scripted lookup.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Mutex, broadcast};
use tokio::time::Instant;

use super::*;
use crate::config::{Dependency, Topology};
use crate::events::{EventBus, TopologyEvent};

const TOPO: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15353"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53:15353"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[dns]
min_ttl = "1s"
max_ttl = "30s"
refresh_ahead = 0.75
serve_stale_for = "10s"
retry_interval = "1s"
query_timeout = "300ms"
[dependencies.profile]
port = 18081
dns = { north = "profile.north.lab.", south = "profile.south.lab." }
[dependencies.cache]
static_addrs = ["127.0.1.20:6380"]
"#;

fn topo() -> Arc<Topology> {
    Arc::new(Topology::from_toml_str(TOPO, "t.toml").unwrap())
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn answer(addrs: &[&str], ttl: Duration) -> Result<Answer, DnsError> {
    Ok(Answer {
        addrs: ips(addrs),
        refused: Vec::new(),
        ttl,
        region: "north".into(),
        fallback: false,
        failed: Vec::new(),
    })
}

fn failure() -> Result<Answer, DnsError> {
    Err(DnsError::AllRegionsFailed {
        dependency: "profile".into(),
        attempts: vec![
            RegionAttempt {
                region: "north".into(),
                name: "profile.north.lab.".into(),
                error: AttemptError::Timeout(Duration::from_millis(300)),
            },
            RegionAttempt {
                region: "south".into(),
                name: "profile.south.lab.".into(),
                error: AttemptError::ServFail,
            },
        ],
    })
}

/// A lookup answering whatever the test set last, recording when it was asked.
#[derive(Clone)]
struct Scripted {
    reply: Arc<ArcSwap<Result<Answer, DnsError>>>,
    /// What a confirming lookup (every region asked) gives; `None`: the same as `reply`.
    confirm: Arc<ArcSwap<Option<Result<Answer, DnsError>>>>,
    calls: Arc<Mutex<Vec<Instant>>>,
    confirming_calls: Arc<Mutex<Vec<Instant>>>,
    delay: Duration,
}

impl Scripted {
    fn new(reply: Result<Answer, DnsError>) -> Scripted {
        Scripted {
            reply: Arc::new(ArcSwap::from_pointee(reply)),
            confirm: Arc::new(ArcSwap::from_pointee(None)),
            calls: Arc::new(Mutex::new(Vec::new())),
            confirming_calls: Arc::new(Mutex::new(Vec::new())),
            delay: Duration::ZERO,
        }
    }

    fn set(&self, reply: Result<Answer, DnsError>) {
        self.reply.store(Arc::new(reply));
    }

    fn set_confirm(&self, reply: Result<Answer, DnsError>) {
        self.confirm.store(Arc::new(Some(reply)));
    }

    /// Call times relative to `t0`, in milliseconds.
    async fn calls_ms(&self, t0: Instant) -> Vec<u128> {
        self.calls
            .lock()
            .await
            .iter()
            .map(|t| (*t - t0).as_millis())
            .collect()
    }
}

impl DnsLookup for Scripted {
    async fn resolve(&self, _dependency: &Dependency) -> Result<Answer, DnsError> {
        self.calls.lock().await.push(Instant::now());
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (**self.reply.load()).clone()
    }

    async fn resolve_confirming(&self, dependency: &Dependency) -> Result<Answer, DnsError> {
        self.confirming_calls.lock().await.push(Instant::now());
        match &**self.confirm.load() {
            Some(reply) => reply.clone(),
            None => self.resolve(dependency).await,
        }
    }
}

async fn start(lookup: &Scripted) -> (DnsDiscovery, broadcast::Receiver<TopologyEvent>, Instant) {
    let bus = EventBus::new(1024);
    let rx = bus.subscribe();
    let t0 = Instant::now();
    let d = DnsDiscovery::with_lookup(topo(), "profile", bus, lookup.clone())
        .await
        .unwrap();
    (d, rx, t0)
}

fn drain(rx: &mut broadcast::Receiver<TopologyEvent>) -> Vec<TopologyEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn kinds(events: &[TopologyEvent]) -> Vec<&'static str> {
    events.iter().map(TopologyEvent::kind).collect()
}

fn addrs(set: &crate::EndpointSet) -> Vec<String> {
    set.endpoints.iter().map(|e| e.addr.to_string()).collect()
}

/// Waits (in paused time) for the next published set.
async fn next(w: &mut crate::EndpointWatch) -> Arc<crate::EndpointSet> {
    tokio::time::timeout(Duration::from_secs(3600), w.changed())
        .await
        .unwrap()
        .unwrap();
    w.borrow_and_update().clone()
}

#[tokio::test(start_paused = true)]
async fn first_answer_is_published_with_classified_endpoints() {
    let lookup = Scripted::new(answer(&["127.0.3.9", "127.0.1.7"], Duration::from_secs(5)));
    let (d, mut rx, _) = start(&lookup).await;
    let set = d.current();
    assert_eq!(addrs(&set), ["127.0.1.7:18081", "127.0.3.9:18081"]);
    assert_eq!(set.version, 1);
    assert!(!set.stale);
    assert_eq!(set.endpoints[0].idc.as_deref(), Some("bj-a"));
    assert_eq!(set.endpoints[1].locality, crate::Locality::Remote);
    assert_eq!(kinds(&drain(&mut rx)), ["endpoint_added", "endpoint_added"]);
    assert_eq!(*d.watch().borrow(), set);
}

#[tokio::test(start_paused = true)]
async fn short_ttl_is_clamped_to_min_ttl() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_millis(100)));
    let (_d, _rx, t0) = start(&lookup).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    // min_ttl 1s → refresh at 750ms steps, not every 75ms.
    assert_eq!(lookup.calls_ms(t0).await, [0, 750, 1500, 2250]);
}

#[tokio::test(start_paused = true)]
async fn long_ttl_is_clamped_to_max_ttl() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(3600)));
    let (d, _rx, t0) = start(&lookup).await;
    tokio::time::sleep(Duration::from_secs(50)).await;
    // max_ttl 30s → refresh at 22.5s steps; still fresh.
    assert_eq!(lookup.calls_ms(t0).await, [0, 22_500, 45_000]);
    assert!(!d.current().stale);
}

#[tokio::test(start_paused = true)]
async fn changed_answer_replaces_the_set_before_expiry() {
    let lookup = Scripted::new(answer(&["127.0.1.7", "127.0.1.8"], Duration::from_secs(4)));
    let (d, mut rx, t0) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(answer(&["127.0.1.8", "127.0.3.9"], Duration::from_secs(4)));
    let set = next(&mut w).await;
    // Refresh at 75% of 4s, i.e. before the 4s expiry.
    assert_eq!((Instant::now() - t0).as_millis(), 3000);
    assert_eq!(addrs(&set), ["127.0.1.8:18081", "127.0.3.9:18081"]);
    assert_eq!(set.version, 2);
    assert!(!set.stale);
    let events = drain(&mut rx);
    assert_eq!(
        events,
        [
            TopologyEvent::EndpointRemoved {
                dependency: "profile".into(),
                addr: "127.0.1.7:18081".parse().unwrap(),
                idc: "bj-a".into()
            },
            TopologyEvent::EndpointAdded {
                dependency: "profile".into(),
                addr: "127.0.3.9:18081".parse().unwrap(),
                idc: "sh-a".into()
            },
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn identical_answer_publishes_no_new_version() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, t0) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(lookup.calls_ms(t0).await.len() >= 6);
    assert!(
        !w.has_changed().unwrap(),
        "no set published for identical answers"
    );
    assert_eq!(d.current().version, 1);
    assert!(!d.current().stale);
    assert!(drain(&mut rx).is_empty());
}

#[tokio::test(start_paused = true)]
async fn stale_until_the_bound_then_empty_and_expired() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, t0) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(failure());

    // Refresh at 1.5s fails; the set stays fresh until its 2s expiry, then is served stale.
    let set = next(&mut w).await;
    assert_eq!((Instant::now() - t0).as_millis(), 2000);
    assert!(set.stale);
    assert_eq!(set.version, 1);
    assert_eq!(addrs(&set), ["127.0.1.7:18081"]);
    assert!(d.current().stale);
    let events = drain(&mut rx);
    assert_eq!(
        events,
        [TopologyEvent::DnsStale {
            dependency: "profile".into(),
            age_past_expiry: Duration::ZERO
        }]
    );

    // Expiry 2s + serve_stale_for 10s: the empty set at 12s.
    let set = next(&mut w).await;
    assert_eq!((Instant::now() - t0).as_millis(), 12_000);
    assert!(set.is_empty());
    assert!(!set.stale);
    assert_eq!(set.version, 2);
    let events = drain(&mut rx);
    let k = kinds(&events);
    // One stale report per failed retry (every 1s from 2.5s to 11.5s), then the expiry.
    assert_eq!(k.iter().filter(|k| **k == "dns_stale").count(), 10, "{k:?}");
    assert_eq!(&k[k.len() - 2..], ["dns_expired", "endpoint_removed"]);
    assert_eq!(
        lookup.calls_ms(t0).await,
        [
            0, 1500, 2500, 3500, 4500, 5500, 6500, 7500, 8500, 9500, 10_500, 11_500
        ]
    );

    // Still failing: nothing more is published, retries go on.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!w.has_changed().unwrap());
    assert!(drain(&mut rx).is_empty());

    // Recovery: a new version with the endpoints.
    lookup.set(answer(&["127.0.1.9"], Duration::from_secs(2)));
    let set = next(&mut w).await;
    assert_eq!(addrs(&set), ["127.0.1.9:18081"]);
    assert_eq!(set.version, 3);
    assert!(!set.stale);
    assert_eq!(kinds(&drain(&mut rx)), ["endpoint_added"]);
}

#[tokio::test(start_paused = true)]
async fn recovery_while_stale_clears_the_flag_without_a_new_version() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, _) = start(&lookup).await;
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(failure());
    assert!(next(&mut w).await.stale);
    lookup.set(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let set = next(&mut w).await;
    assert!(!set.stale);
    assert_eq!(set.version, 1);
    assert!(!kinds(&drain(&mut rx)).contains(&"dns_expired"));
}

#[tokio::test(start_paused = true)]
async fn first_failure_returns_an_empty_set_and_keeps_retrying() {
    let lookup = Scripted::new(failure());
    let (d, _rx, t0) = start(&lookup).await;
    assert!(d.current().is_empty());
    assert_eq!(d.current().version, 0);
    let mut w = d.watch();
    lookup.set(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let set = next(&mut w).await;
    assert_eq!((Instant::now() - t0).as_millis(), 1000);
    assert_eq!(set.version, 1);
}

#[tokio::test(start_paused = true)]
async fn poisoned_addresses_are_refused_and_alerted() {
    let mut poisoned = answer(&["127.0.1.7"], Duration::from_secs(2)).unwrap();
    poisoned.refused = ips(&["10.66.0.1"]);
    let lookup = Scripted::new(Ok(poisoned));
    let (d, mut rx, _) = start(&lookup).await;
    assert_eq!(addrs(&d.current()), ["127.0.1.7:18081"]);
    let events = drain(&mut rx);
    assert_eq!(
        events[0],
        TopologyEvent::DnsPoisoned {
            dependency: "profile".into(),
            region: "north".into(),
            refused: ips(&["10.66.0.1"])
        }
    );
}

#[tokio::test(start_paused = true)]
async fn only_poisoned_answer_is_a_failure_and_the_good_set_stays() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, _) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    let mut bad = answer(&[], Duration::from_secs(60)).unwrap();
    bad.refused = ips(&["10.66.0.1"]);
    lookup.set(Ok(bad));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(!w.has_changed().unwrap());
    assert_eq!(addrs(&d.current()), ["127.0.1.7:18081"]);
    assert_eq!(kinds(&drain(&mut rx)), ["dns_poisoned"]);
    // Its TTL is not honoured: the set goes stale at the good answer's expiry.
    assert!(next(&mut w).await.stale);
}

#[tokio::test(start_paused = true)]
async fn fallback_answer_emits_one_event_per_change() {
    let mut south = answer(&["127.0.3.9"], Duration::from_secs(1)).unwrap();
    south.region = "south".into();
    south.fallback = true;
    south.failed = vec![RegionAttempt {
        region: "north".into(),
        name: "profile.north.lab.".into(),
        error: AttemptError::Refused,
    }];
    let lookup = Scripted::new(Ok(south));
    let (d, mut rx, _) = start(&lookup).await;
    assert_eq!(addrs(&d.current()), ["127.0.3.9:18081"]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events = drain(&mut rx);
    assert_eq!(
        events
            .iter()
            .filter(
                |e| matches!(e, TopologyEvent::DnsFallback { region, .. } if &**region == "south")
            )
            .count(),
        1,
        "{events:?}"
    );
    // Back to the local region, then south again: a second event.
    lookup.set(answer(&["127.0.3.9"], Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut south = answer(&["127.0.3.9"], Duration::from_secs(1)).unwrap();
    south.region = "south".into();
    south.fallback = true;
    lookup.set(Ok(south));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(kinds(&drain(&mut rx)), ["dns_fallback"]);
}

#[tokio::test(start_paused = true)]
async fn empty_answer_is_published_and_never_expires() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, _) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(answer(&[], Duration::from_secs(2)));
    // One empty answer only makes the set suspect (kept, stale); the confirming lookup that
    // every region answers empty empties it.
    let set = next(&mut w).await;
    assert!(set.stale && !set.is_empty(), "{set:?}");
    let set = next(&mut w).await;
    assert!(set.is_empty());
    assert_eq!(set.version, 2);
    lookup.set(failure());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!w.has_changed().unwrap());
    assert_eq!(kinds(&drain(&mut rx)), ["endpoint_removed"]);
}

#[tokio::test(start_paused = true)]
async fn stale_flag_comes_on_time_during_a_slow_lookup() {
    let mut lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    lookup.delay = Duration::from_millis(600);
    let (d, _rx, t0) = start(&lookup).await;
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(failure());
    // First answer at 0.6s: expiry at 2.6s, refresh at 2.1s; that lookup runs until 2.7s, but
    // the set turns stale at 2.6s, not when the lookup ends.
    let set = next(&mut w).await;
    assert!(set.stale);
    assert_eq!((Instant::now() - t0).as_millis(), 2600);
}

#[tokio::test(start_paused = true)]
async fn refresh_now_nudges_a_lookup() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(20)));
    let (d, _rx, t0) = start(&lookup).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    d.refresh_now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(lookup.calls_ms(t0).await, [0, 1000]);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_and_every_watch_stops_the_task() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(1)));
    let (d, _rx, t0) = start(&lookup).await;
    let w = d.watch();
    drop(d);
    drop(w);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        lookup.calls_ms(t0).await,
        [0],
        "nobody can see the sets: no more lookups"
    );
}

// === One negative answer is not an outage (issue 14, B.3) ===

#[tokio::test(start_paused = true)]
async fn one_empty_answer_keeps_the_set_and_another_region_answers() {
    // Before: a single NXDOMAIN with a long negative TTL emptied the set at once, with no
    // stale answer and no other region, for up to 0.75 × max_ttl.
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, mut rx, t0) = start(&lookup).await;
    drain(&mut rx);
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(answer(&[], Duration::from_secs(3600)));
    let mut south = answer(&["127.0.3.9"], Duration::from_secs(2)).unwrap();
    south.region = "south".into();
    south.fallback = true;
    lookup.set_confirm(Ok(south));
    let kept = next(&mut w).await;
    assert_eq!(addrs(&kept), ["127.0.1.7:18081"]);
    assert!(kept.stale);
    assert_eq!(kept.version, 1);
    let moved = next(&mut w).await;
    assert_eq!(addrs(&moved), ["127.0.3.9:18081"]);
    assert!(!moved.stale);
    // The empty answer came at 1.5s; the confirming lookup one retry_interval later.
    let confirming: Vec<u128> = lookup
        .confirming_calls
        .lock()
        .await
        .iter()
        .map(|t| (*t - t0).as_millis())
        .collect();
    assert_eq!(confirming, [2500]);
    let seen = kinds(&drain(&mut rx));
    assert!(!seen.contains(&"dns_expired"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn an_empty_answer_every_region_confirms_empties_the_set_and_is_asked_again_soon() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, _rx, t0) = start(&lookup).await;
    let mut w = d.watch();
    w.borrow_and_update();
    // A long negative TTL (clamped to max_ttl 30s): the name is asked again every
    // retry_interval, not every 22.5s, while the set is empty.
    lookup.set(answer(&[], Duration::from_secs(3600)));
    lookup.set_confirm(answer(&[], Duration::from_secs(3600)));
    let _stale = next(&mut w).await;
    let empty = next(&mut w).await;
    assert!(empty.is_empty());
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(lookup.calls_ms(t0).await, [0, 1500, 3500, 4500, 5500]);
}

#[tokio::test(start_paused = true)]
async fn a_failed_confirmation_keeps_the_stale_set_and_asks_again() {
    let lookup = Scripted::new(answer(&["127.0.1.7"], Duration::from_secs(2)));
    let (d, _rx, _t0) = start(&lookup).await;
    let mut w = d.watch();
    w.borrow_and_update();
    lookup.set(answer(&[], Duration::from_secs(3600)));
    lookup.set_confirm(failure());
    let kept = next(&mut w).await;
    assert!(kept.stale);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        addrs(&d.current()),
        ["127.0.1.7:18081"],
        "still served, stale"
    );
    assert!(
        lookup.confirming_calls.lock().await.len() >= 2,
        "asks again"
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_and_static_dependencies_are_config_errors() {
    let lookup = Scripted::new(failure());
    let e = DnsDiscovery::with_lookup(topo(), "nope", EventBus::default(), lookup.clone())
        .await
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(e.to_string().contains("unknown dependency"), "{e}");
    let e = DnsDiscovery::with_lookup(topo(), "cache", EventBus::default(), lookup)
        .await
        .unwrap_err();
    assert!(e.is_config());
    assert!(e.to_string().contains("not a DNS dependency"), "{e}");
    let e = DnsDiscovery::start(topo(), "cache", EventBus::default())
        .await
        .unwrap_err();
    assert!(e.is_config());
}

#[tokio::test(start_paused = true)]
async fn regional_resolver_refuses_static_dependencies() {
    let t = topo();
    let r = RegionalResolver::new(&t).unwrap();
    let e = r.resolve(t.dependency("cache").unwrap()).await.unwrap_err();
    assert!(matches!(e, DnsError::NotDns { .. }));
    assert!(e.attempts().is_empty());
}

#[test]
fn dns_error_lists_every_region() {
    let e = failure().unwrap_err();
    assert_eq!(
        e.to_string(),
        "dns resolution of profile failed in every region: north (profile.north.lab.): timed out after 300ms; south (profile.south.lab.): SERVFAIL"
    );
    assert!(!e.is_timeout());
}

// === The task outlives its handle, and never ends silently (issue 14, B.2 and B.6) ===

#[tokio::test(start_paused = true)]
async fn dropping_the_handle_keeps_a_watched_set_fresh() {
    // Before: dropping the handle aborted the task, and the balancer kept the old address
    // forever, never stale, never expired, nothing logged.
    let lookup = Scripted::new(answer(&["127.0.1.11"], Duration::from_secs(4)));
    let (d, _events, _t0) = start(&lookup).await;
    let mut watch = d.watch();
    assert_eq!(
        watch.borrow_and_update().endpoints[0].addr.ip(),
        ips(&["127.0.1.11"])[0]
    );
    drop(d);
    lookup.set(answer(&["127.0.1.12"], Duration::from_secs(4)));
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            watch.changed().await.expect("the task still publishes");
            let set = watch.borrow_and_update().clone();
            if set.endpoints.first().map(|e| e.addr.ip()) == Some(ips(&["127.0.1.12"])[0]) {
                assert!(!set.stale);
                break;
            }
        }
    })
    .await
    .expect("the new address is published after the handle was dropped");
}

#[tokio::test(start_paused = true)]
async fn the_task_ends_when_nobody_can_see_it_and_says_so() {
    let lookup = Scripted::new(answer(&["127.0.1.11"], Duration::from_secs(4)));
    let (d, mut events, _t0) = start(&lookup).await;
    drop(d);
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(TopologyEvent::TaskEnded { task, reason, .. }) = events.recv().await {
                return (task, reason);
            }
        }
    })
    .await
    .expect("TaskEnded published");
    assert_eq!(&*ended.0, "dns_refresh");
    assert_eq!(&*ended.1, "every receiver dropped");
}

#[tokio::test(start_paused = true)]
async fn stop_is_reported_and_marks_the_set_stale() {
    let lookup = Scripted::new(answer(&["127.0.1.11"], Duration::from_secs(4)));
    let (d, mut events, _t0) = start(&lookup).await;
    let mut watch = d.watch();
    watch.borrow_and_update();
    d.stop();
    watch.changed().await.unwrap();
    assert!(watch.borrow().stale, "the frozen set is marked stale");
    assert_eq!(d.ended().as_deref(), Some("stopped"));
    let seen = drain(&mut events);
    assert!(seen.iter().any(|e| e.kind() == "task_ended"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn huge_durations_neither_panic_nor_kill_the_task() {
    // Before: query_timeout = "5000000000000000h" panicked in start, and a huge
    // serve_stale_for killed the task after the first answer (an Instant overflow).
    let mut topo = (*topo()).clone();
    let huge = Duration::from_secs(5_000_000_000_000_000 * 3600);
    topo.dns_mut_for_tests(|d| {
        d.query_timeout = huge;
        d.serve_stale_for = huge;
        d.max_ttl = huge;
    });
    let lookup = Scripted::new(answer(&["127.0.1.11"], Duration::from_secs(4)));
    let d = DnsDiscovery::with_lookup(
        Arc::new(topo),
        "profile",
        EventBus::default(),
        lookup.clone(),
    )
    .await
    .unwrap();
    let mut watch = d.watch();
    watch.borrow_and_update();
    lookup.set(answer(&["127.0.1.12"], Duration::from_secs(4)));
    tokio::time::timeout(Duration::from_secs(60), watch.changed())
        .await
        .expect("still refreshing")
        .unwrap();
    assert_eq!(d.ended(), None);
    assert_eq!(
        watch.borrow().endpoints[0].addr.ip(),
        ips(&["127.0.1.12"])[0]
    );
}
