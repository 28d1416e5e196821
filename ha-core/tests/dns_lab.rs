#![allow(clippy::unwrap_used, clippy::expect_used)]
//! DNS discovery against real per-region DNS servers from `ha-lab`.
//!
//! North resolvers bind 127.0.1.53, south 127.0.3.53, on ports chosen by the OS; every wait is
//! on the watch channel or the event bus, bounded by a timeout.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::dns::{AttemptError, DnsDiscovery, RegionalResolver};
use ha_core::{BoxError, EndpointSet, EndpointWatch, EventBus, HaError, Topology, TopologyEvent};
use ha_lab::dns::{DnsMode, LabDns};
use tokio::sync::broadcast;
use tokio::time::{Instant, timeout};
use tower::ServiceExt;

/// Upper bound of any single wait; generous so a loaded machine does not fail the tests.
const WAIT: Duration = Duration::from_secs(10);

struct Lab {
    north: LabDns,
    south: LabDns,
    topo: Arc<Topology>,
}

const NORTH_NAME: &str = "profile.north.lab.";
const SOUTH_NAME: &str = "profile.south.lab.";

async fn lab() -> Lab {
    lab_with(r#"["127.0.1.0/24", "127.0.3.0/24"]"#, "").await
}

/// A lab whose dependency allows `allowed` (a TOML array) with extra `[dns]` lines.
async fn lab_with(allowed: &str, dns_extra: &str) -> Lab {
    let north = LabDns::start("north", "127.0.1.53:0".parse().unwrap(), "lab.")
        .await
        .unwrap();
    let south = LabDns::start("south", "127.0.3.53:0".parse().unwrap(), "lab.")
        .await
        .unwrap();
    north
        .set_records(NORTH_NAME, &ips(&["127.0.1.11"]), 1)
        .unwrap();
    south
        .set_records(SOUTH_NAME, &ips(&["127.0.3.11"]), 1)
        .unwrap();
    let toml = format!(
        r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["{north}"]
[[regions]]
name = "south"
resolvers = ["{south}"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[dns]
min_ttl = "500ms"
max_ttl = "30s"
query_timeout = "300ms"
retry_interval = "250ms"
serve_stale_for = "2s"
{dns_extra}
[dependencies.profile]
port = 18081
dns = {{ north = "{NORTH_NAME}", south = "{SOUTH_NAME}" }}
allowed_cidrs = {allowed}
"#,
        north = north.addr(),
        south = south.addr(),
    );
    let topo = Arc::new(Topology::from_toml_str(&toml, "dns_lab.toml").unwrap());
    Lab { north, south, topo }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn addrs(set: &EndpointSet) -> Vec<String> {
    set.endpoints
        .iter()
        .map(|e| e.addr.ip().to_string())
        .collect()
}

/// Waits until the published set satisfies `pred`; returns it.
async fn wait_set(
    w: &mut EndpointWatch,
    what: &str,
    pred: impl FnMut(&Arc<EndpointSet>) -> bool,
) -> Arc<EndpointSet> {
    let found = match timeout(WAIT, w.wait_for(pred)).await {
        Ok(Ok(set)) => Some(set.clone()),
        Ok(Err(_)) => panic!("discovery stopped while waiting for {what}"),
        Err(_) => None,
    };
    found.unwrap_or_else(|| {
        panic!(
            "no set with {what} within {WAIT:?}; last: {:?}",
            *w.borrow()
        )
    })
}

/// Waits for an event satisfying `pred`; returns it.
async fn wait_event(
    rx: &mut broadcast::Receiver<TopologyEvent>,
    what: &str,
    mut pred: impl FnMut(&TopologyEvent) -> bool,
) -> TopologyEvent {
    let found = timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Ok(e) if pred(&e) => return e,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => panic!("event bus closed"),
            }
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} event within {WAIT:?}"))
}

/// The error the balancer gives for the dependency's current set.
async fn balancer_error(topo: &Topology, watch: EndpointWatch) -> Option<BoxError> {
    let svc = ha_core::balance::LocalityBalance::builder(topo, watch)
        .seed(7)
        .build(|_e: &ha_core::Endpoint| {
            tower::service_fn(|_req: ()| async { Ok::<_, BoxError>(()) })
        });
    svc.oneshot(()).await.err().map(BoxError::from)
}

#[tokio::test]
async fn changed_record_is_followed_within_ttl_and_refresh() {
    let lab = lab().await;
    let d = DnsDiscovery::start(lab.topo.clone(), "profile", EventBus::default())
        .await
        .unwrap();
    let first = d.current();
    assert_eq!(addrs(&first), ["127.0.1.11"]);
    assert!(!first.stale);
    assert_eq!(first.endpoints[0].addr.port(), 18081);
    assert_eq!(first.endpoints[0].idc.as_deref(), Some("bj-a"));

    let mut w = d.watch();
    let changed_at = Instant::now();
    lab.north
        .set_records(NORTH_NAME, &ips(&["127.0.1.12", "127.0.1.13"]), 1)
        .unwrap();
    let set = wait_set(&mut w, "the new records", |s| {
        addrs(s) == ["127.0.1.12", "127.0.1.13"]
    })
    .await;
    let took = changed_at.elapsed();
    eprintln!("record change followed after {took:?} (ttl 1s, refresh at 75%)");
    assert_eq!(set.version, first.version + 1);
    assert_eq!(*d.current(), *set);
    // A region that answers is never skipped: the south server was not asked.
    assert_eq!(lab.south.queries(), 0);
}

#[tokio::test]
async fn local_dns_stopped_then_south_answers() {
    let lab = lab().await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let d = DnsDiscovery::start(lab.topo.clone(), "profile", bus)
        .await
        .unwrap();
    assert_eq!(addrs(&d.current()), ["127.0.1.11"]);
    let mut w = d.watch();

    lab.north.stop().await;
    let set = wait_set(&mut w, "the south answer", |s| addrs(s) == ["127.0.3.11"]).await;
    assert!(!set.stale);
    assert_eq!(set.endpoints[0].idc.as_deref(), Some("sh-a"));
    let e = wait_event(&mut events, "DnsFallback", |e| {
        matches!(e, TopologyEvent::DnsFallback { .. })
    })
    .await;
    assert!(
        matches!(&e, TopologyEvent::DnsFallback { dependency, region, .. }
            if &**dependency == "profile" && &**region == "south"),
        "{e:?}"
    );
    assert!(lab.south.queries() > 0);

    // The local region back: its answer wins again at the next refresh.
    lab.north.restart().await.unwrap();
    wait_set(&mut w, "the north answer again", |s| {
        addrs(s) == ["127.0.1.11"]
    })
    .await;
}

#[tokio::test]
async fn failing_local_modes_fall_back_and_nxdomain_does_not() {
    let lab = lab().await;
    let resolver = RegionalResolver::new(&lab.topo).unwrap();
    let dep = lab.topo.dependency("profile").unwrap();

    let a = resolver.resolve(dep).await.unwrap();
    assert_eq!(a.addrs, ips(&["127.0.1.11"]));
    assert_eq!((&*a.region, a.fallback), ("north", false));
    assert!(
        a.ttl >= Duration::from_millis(500) && a.ttl <= Duration::from_secs(1),
        "{:?}",
        a.ttl
    );

    for (mode, want) in [
        (DnsMode::ServFail, "servfail"),
        (DnsMode::Refused, "refused"),
        (DnsMode::Silent, "timeout"),
    ] {
        lab.north.set_mode(mode);
        let a = resolver.resolve(dep).await.unwrap();
        assert_eq!(a.addrs, ips(&["127.0.3.11"]), "{mode:?}");
        assert_eq!((&*a.region, a.fallback), ("south", true), "{mode:?}");
        assert_eq!(a.failed.len(), 1);
        assert_eq!(a.failed[0].error.kind(), want, "{mode:?}: {:?}", a.failed);
    }

    // NXDOMAIN is an answer: no fallback, no addresses.
    lab.north.set_mode(DnsMode::Serve);
    lab.north.remove(NORTH_NAME).unwrap();
    let a = resolver.resolve(dep).await.unwrap();
    assert!(a.addrs.is_empty());
    assert_eq!((&*a.region, a.fallback), ("north", false));

    // Every region failing: the error says what each one gave.
    lab.north.set_mode(DnsMode::Silent);
    lab.south.set_mode(DnsMode::ServFail);
    let e = resolver.resolve(dep).await.unwrap_err();
    assert!(
        matches!(e.attempts()[0].error, AttemptError::Timeout(_)),
        "{e}"
    );
    assert_eq!(e.attempts()[1].error, AttemptError::ServFail);
    assert!(
        e.to_string()
            .contains("north (profile.north.lab.): timed out after 300ms"),
        "{e}"
    );
}

async fn all_dns_down_serves_stale_then_expires(kill: bool) {
    let lab = lab().await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let d = DnsDiscovery::start(lab.topo.clone(), "profile", bus)
        .await
        .unwrap();
    let good = d.current();
    assert_eq!(addrs(&good), ["127.0.1.11"]);
    let mut w = d.watch();

    if kill {
        lab.north.stop().await;
        lab.south.stop().await;
    } else {
        lab.north.set_mode(DnsMode::Silent);
        lab.south.set_mode(DnsMode::Silent);
    }
    let down_at = Instant::now();

    let stale = wait_set(&mut w, "the stale flag", |s| s.stale).await;
    let stale_after = down_at.elapsed();
    assert_eq!(
        addrs(&stale),
        ["127.0.1.11"],
        "the last good set is served stale"
    );
    assert_eq!(stale.version, good.version);
    assert!(d.current().stale);
    wait_event(&mut events, "DnsStale", |e| {
        matches!(e, TopologyEvent::DnsStale { .. })
    })
    .await;
    // While stale, the balancer still has the endpoint.
    assert!(balancer_error(&lab.topo, d.watch()).await.is_none());

    let empty = wait_set(&mut w, "the empty set", |s| s.is_empty()).await;
    let empty_after = down_at.elapsed();
    assert!(!empty.stale);
    assert_eq!(empty.version, good.version + 1);
    wait_event(&mut events, "DnsExpired", |e| {
        matches!(e, TopologyEvent::DnsExpired { .. })
    })
    .await;
    eprintln!(
        "all DNS down (kill: {kill}): stale after {stale_after:?}, empty after {empty_after:?}"
    );
    // What the docs claim, with the lab's TTL 1s (refreshed at 0.75s) and serve_stale_for 2s:
    // the set goes stale when the last good answer's TTL runs out (0.25s to 1s after DNS went
    // down, never before), and empty serve_stale_for after that (never before 2.25s). The upper
    // bounds add 2s of slack for a loaded machine; they catch a bound that is not obeyed at all.
    assert!(
        stale_after >= Duration::from_millis(200) && stale_after <= Duration::from_secs(3),
        "stale after {stale_after:?}"
    );
    assert!(
        empty_after >= Duration::from_millis(2200) && empty_after <= Duration::from_secs(5),
        "empty after {empty_after:?}"
    );
    assert!(
        empty_after - stale_after >= Duration::from_millis(1000),
        "stale for {:?} only",
        empty_after - stale_after
    );

    let err = balancer_error(&lab.topo, d.watch())
        .await
        .expect("no endpoint left");
    let ha = HaError::find(&*err).expect("an HaError");
    assert!(ha.is_no_healthy_endpoint(), "{ha}");
    assert_eq!(ha.to_string(), "no healthy endpoint for dependency profile");

    // DNS back: the set comes back.
    if kill {
        lab.north.restart().await.unwrap();
    } else {
        lab.north.set_mode(DnsMode::Serve);
    }
    let back = wait_set(&mut w, "the recovered set", |s| !s.is_empty()).await;
    assert_eq!(addrs(&back), ["127.0.1.11"]);
    assert!(!back.stale);
}

#[tokio::test]
async fn all_dns_stopped_serves_stale_then_expires() {
    all_dns_down_serves_stale_then_expires(true).await;
}

#[tokio::test]
async fn all_dns_silent_serves_stale_then_expires() {
    all_dns_down_serves_stale_then_expires(false).await;
}

#[tokio::test]
async fn poisoned_answers_are_refused_and_the_good_set_keeps_serving() {
    let lab = lab().await;
    let bus = EventBus::default();
    let mut events = bus.subscribe();
    let d = DnsDiscovery::start(lab.topo.clone(), "profile", bus)
        .await
        .unwrap();
    let good = d.current();
    assert_eq!(addrs(&good), ["127.0.1.11"]);
    let mut w = d.watch();

    // A mixed answer: the good address stays, the foreign one is refused and alerted.
    lab.north
        .set_records(NORTH_NAME, &ips(&["127.0.1.11", "10.66.0.1"]), 1)
        .unwrap();
    let e = wait_event(&mut events, "DnsPoisoned", |e| {
        matches!(e, TopologyEvent::DnsPoisoned { .. })
    })
    .await;
    assert!(
        matches!(&e, TopologyEvent::DnsPoisoned { dependency, region, refused, .. }
            if &**dependency == "profile" && &**region == "north" && *refused == ips(&["10.66.0.1"])),
        "{e:?}"
    );
    assert_eq!(*d.current(), *good, "same set, same version");

    // Only foreign addresses, and the south region down: a failure of the north region; the
    // previous good set keeps serving and the poisoned address never appears.
    lab.south.stop().await;
    lab.north
        .set_records(NORTH_NAME, &ips(&["10.66.0.1"]), 1)
        .unwrap();
    let mut fresh = events.resubscribe();
    wait_event(&mut fresh, "DnsPoisoned (only foreign)", |e| {
        matches!(e, TopologyEvent::DnsPoisoned { .. })
    })
    .await;
    // Seen by the resolver: a failure of the north region, not an answer.
    let resolver = RegionalResolver::new(&lab.topo).unwrap();
    let err = resolver
        .resolve(lab.topo.dependency("profile").unwrap())
        .await
        .unwrap_err();
    assert_eq!(
        err.attempts()[0].error,
        AttemptError::Poisoned {
            refused: ips(&["10.66.0.1"])
        },
        "{err}"
    );
    let now = d.current();
    assert_eq!(addrs(&now), ["127.0.1.11"]);
    assert_eq!(now.version, good.version);
    // It goes stale at the good answer's expiry (the poisoned answer's TTL is not honoured),
    // still without the foreign address.
    let stale = wait_set(&mut w, "the stale flag", |s| s.stale).await;
    assert_eq!(addrs(&stale), ["127.0.1.11"]);
    assert!(
        w.borrow()
            .endpoints
            .iter()
            .all(|e| e.addr.ip() != "10.66.0.1".parse::<IpAddr>().unwrap())
    );
}

// === issue 14, B.5: A and AAAA are timed apart; AAAA is not asked where it cannot be used ===

#[tokio::test]
async fn a_resolver_that_drops_aaaa_never_costs_the_a_answer() {
    // Before: A and AAAA shared one timeout equal to hickory's own; with AAAA dropped, in 1 of
    // 12 runs the local A answer was thrown away and the other region's published.
    let lab = lab_with(r#"["127.0.1.0/24", "127.0.3.0/24", "fd00::/8"]"#, "").await;
    lab.north.set_drop_aaaa(true);
    let resolver = RegionalResolver::new(&lab.topo).unwrap();
    let dep = lab.topo.dependency("profile").unwrap();
    for i in 0..12 {
        let a = resolver.resolve(dep).await.unwrap();
        assert_eq!(
            (a.addrs.clone(), &*a.region, a.fallback),
            (ips(&["127.0.1.11"]), "north", false),
            "resolve {i}: {a:?}"
        );
    }
}

#[tokio::test]
async fn aaaa_is_not_asked_when_no_allowed_cidr_is_ipv6_nor_with_ipv4_only() {
    // Before: with IPv4 allowed_cidrs, every AAAA answer of a dual-stack name raised
    // DnsPoisoned on every refresh.
    for (allowed, extra) in [
        (r#"["127.0.1.0/24", "127.0.3.0/24"]"#, ""),
        (
            r#"["127.0.1.0/24", "127.0.3.0/24", "fd00::/8"]"#,
            "ipv4_only = true",
        ),
    ] {
        let lab = lab_with(allowed, extra).await;
        lab.north
            .set_records(NORTH_NAME, &ips(&["127.0.1.11", "fd00::11"]), 1)
            .unwrap();
        let resolver = RegionalResolver::new(&lab.topo).unwrap();
        let dep = lab.topo.dependency("profile").unwrap();
        let before = lab.north.queries();
        for _ in 0..5 {
            let a = resolver.resolve(dep).await.unwrap();
            assert_eq!(a.addrs, ips(&["127.0.1.11"]));
            assert!(a.refused.is_empty(), "{extra}: {a:?}");
        }
        assert_eq!(
            lab.north.queries() - before,
            5,
            "{extra}: one A query per resolve"
        );

        let bus = EventBus::default();
        let mut events = bus.subscribe();
        let d = DnsDiscovery::start(lab.topo.clone(), "profile", bus)
            .await
            .unwrap();
        let mut w = d.watch();
        // Two refreshes later (TTL 1s, refreshed every 0.75s), still no poisoning alert.
        let v = w.borrow().version;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1600) {
            let _ = timeout(Duration::from_millis(100), w.changed()).await;
        }
        assert_eq!(w.borrow().version, v);
        while let Ok(e) = events.try_recv() {
            assert!(
                !matches!(e, TopologyEvent::DnsPoisoned { .. }),
                "{extra}: {e:?}"
            );
        }
    }
}

// === issue 14, B.3: one negative answer is not an outage ===

#[tokio::test]
async fn one_nxdomain_with_a_long_negative_ttl_keeps_serving_and_asks_the_other_region() {
    // Before: one NXDOMAIN with a long negative TTL emptied the set at once, without a stale
    // answer or another region, for up to 0.75 x max_ttl.
    let lab = lab().await;
    lab.north.set_negative_ttl(3600).unwrap();
    lab.south.set_negative_ttl(3600).unwrap();
    let bus = EventBus::default();
    let d = DnsDiscovery::start(lab.topo.clone(), "profile", bus)
        .await
        .unwrap();
    let mut w = d.watch();
    assert_eq!(addrs(&w.borrow_and_update()), ["127.0.1.11"]);
    lab.north.remove(NORTH_NAME).unwrap();
    // Every set published on the way to the other region's answer has endpoints.
    let moved = timeout(WAIT, async {
        loop {
            w.changed().await.expect("discovery runs");
            let set = w.borrow_and_update().clone();
            assert!(!set.is_empty(), "an empty set was published: {set:?}");
            if addrs(&set) == ["127.0.3.11"] {
                return set;
            }
        }
    })
    .await
    .expect("the south answer within the wait");
    assert!(!moved.stale);

    // Only when every region says so is the set emptied...
    lab.south.remove(SOUTH_NAME).unwrap();
    let empty = wait_set(&mut w, "the empty set", |s| s.is_empty()).await;
    assert!(!empty.stale);
    // ...and the name is asked again soon despite the 3600 s negative TTL (max_ttl 30s would
    // mean 22.5 s): the record is back well within the wait.
    lab.north
        .set_records(NORTH_NAME, &ips(&["127.0.1.12"]), 1)
        .unwrap();
    let back = wait_set(&mut w, "the record back", |s| !s.is_empty()).await;
    assert_eq!(addrs(&back), ["127.0.1.12"]);
}
