//! LocalityBalance against in-process endpoint services, with paused time.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_types,
    clippy::needless_range_loop
)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ha_core::balance::LocalityBalance;
use ha_core::discovery::channel;
use ha_core::health::Status;
use ha_core::{
    Control, Endpoint, EndpointSet, EventBus, HaError, Topology, TopologyEvent, attempt,
};
use proptest::prelude::*;
use tower::{BoxError, Service, ServiceExt};

const TOPO: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[health]
consecutive_failures = 1
base_ejection = "1s"
max_ejection = "4s"
max_ejected_percent = 100
[balance]
failback_hold = "3s"
[dependencies.profile]
static_addrs = ["127.0.1.11:80"]
"#;

type Down = Arc<Mutex<HashSet<SocketAddr>>>;

struct Fixture {
    topo: Topology,
    control: Control,
    events: EventBus,
    down: Down,
    svc: LocalityBalance<tower::util::BoxCloneSyncService<(), SocketAddr, BoxError>>,
    _tx: tokio::sync::watch::Sender<Arc<EndpointSet>>,
}

fn addrs() -> Vec<SocketAddr> {
    [
        "127.0.1.11:80",
        "127.0.1.12:80",
        "127.0.2.11:80",
        "127.0.2.12:80",
        "127.0.3.11:80",
        "127.0.3.12:80",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

fn fixture_with(addrs: Vec<SocketAddr>, seed: u64) -> Fixture {
    let topo = Topology::from_toml_str(TOPO, "test.toml").unwrap();
    let events = EventBus::new(4096);
    let control = Control::new(&topo, events.clone());
    let c = topo.classifier();
    let set = EndpointSet::new("profile", addrs.iter().map(|a| c.endpoint(*a)).collect(), 1);
    let (tx, rx) = channel(set);
    let down: Down = Arc::default();
    let d = down.clone();
    let svc = LocalityBalance::builder(&topo, rx)
        .control(control.clone())
        .events(events.clone())
        .seed(seed)
        .build(move |ep: &Endpoint| {
            let addr = ep.addr;
            let down = d.clone();
            tower::util::BoxCloneSyncService::new(tower::service_fn(move |()| {
                let fail = down.lock().unwrap().contains(&addr);
                async move {
                    if fail {
                        Err::<SocketAddr, BoxError>(Box::new(std::io::Error::from(
                            std::io::ErrorKind::ConnectionRefused,
                        )))
                    } else {
                        Ok(addr)
                    }
                }
            }))
        });
    Fixture {
        topo,
        control,
        events,
        down,
        svc,
        _tx: tx,
    }
}

fn fixture() -> Fixture {
    fixture_with(addrs(), 7)
}

/// Runs `n` calls; returns successes per IDC and the number of errors.
async fn run(f: &mut Fixture, n: usize) -> (BTreeMap<String, usize>, usize) {
    let c = f.topo.classifier().clone();
    let mut per = BTreeMap::new();
    let mut errors = 0;
    for _ in 0..n {
        match f.svc.ready().await.unwrap().call(()).await {
            Ok(addr) => {
                *per.entry(c.endpoint(addr).idc_name().to_string())
                    .or_insert(0) += 1
            }
            Err(_) => errors += 1,
        }
    }
    (per, errors)
}

fn share(per: &BTreeMap<String, usize>, idc: &str) -> f64 {
    let total: usize = per.values().sum();
    *per.get(idc).unwrap_or(&0) as f64 / total.max(1) as f64
}

#[tokio::test(start_paused = true)]
async fn steady_state_stays_in_local_idc() {
    let mut f = fixture();
    let (per, errors) = run(&mut f, 1000).await;
    assert_eq!(errors, 0);
    assert_eq!(per.get("bj-a"), Some(&1000), "{per:?}");
}

#[tokio::test(start_paused = true)]
async fn one_local_down_spills_thirty_percent_to_same_region() {
    let mut f = fixture();
    let dead: SocketAddr = "127.0.1.11:80".parse().unwrap();
    f.down.lock().unwrap().insert(dead);
    // consecutive_failures = 1: the first failure ejects it.
    let (_, errors) = run(&mut f, 50).await;
    assert!((1..=2).contains(&errors), "errors {errors}");
    let (per, errors) = run(&mut f, 10_000).await;
    assert_eq!(
        errors, 0,
        "no call goes to the ejected endpoint before its ejection ends"
    );
    // Overprovisioning 1.4 × 1/2 = 0.7 stays local, 0.3 spills to bj-b, nothing goes remote.
    assert!((share(&per, "bj-a") - 0.7).abs() < 0.03, "{per:?}");
    assert!((share(&per, "bj-b") - 0.3).abs() < 0.03, "{per:?}");
    assert_eq!(per.get("sh-a"), None);
}

#[tokio::test(start_paused = true)]
async fn drain_moves_traffic_on_the_next_pick_and_undrain_brings_it_back() {
    let mut f = fixture();
    let mut rx = f.events.subscribe();
    f.control.drain("bj-a").unwrap();
    f.control.drain("bj-b").unwrap();
    let (per, errors) = run(&mut f, 500).await;
    assert_eq!(errors, 0);
    assert_eq!(per.get("sh-a"), Some(&500), "{per:?}");
    f.control.undrain("bj-a").unwrap();
    let (per, _) = run(&mut f, 500).await;
    assert_eq!(per.get("bj-a"), Some(&500), "{per:?}");
    let mut drained_events = 0;
    while let Ok(ev) = rx.try_recv() {
        if matches!(ev, TopologyEvent::IdcDrained { .. }) {
            drained_events += 1;
        }
    }
    assert_eq!(drained_events, 3);
}

#[tokio::test(start_paused = true)]
async fn panic_mode_uses_every_endpoint() {
    let mut f = fixture_with(addrs()[..4].to_vec(), 3);
    // Three of four down: 1/4 healthy < 0.5 → panic.
    for a in &addrs()[..3] {
        f.down.lock().unwrap().insert(*a);
    }
    let _ = run(&mut f, 200).await;
    let v = f.svc.view();
    assert!(v.panic, "{v:?}");
    let (per, errors) = run(&mut f, 400).await;
    // In panic, ejected endpoints get calls too (and fail).
    assert!(errors > 0);
    assert!(per.get("bj-b").copied().unwrap_or(0) > 0);
}

#[tokio::test(start_paused = true)]
async fn failback_waits_for_the_hold_and_probes_first() {
    let mut f = fixture_with(addrs()[..4].to_vec(), 11);
    let a = addrs();
    f.down.lock().unwrap().extend([a[0], a[1]]);
    let _ = run(&mut f, 20).await;
    let v = f.svc.view();
    assert!(
        v.endpoints
            .iter()
            .filter(|e| matches!(e.status, Status::Ejected { .. }))
            .count()
            == 2,
        "{v:?}"
    );
    assert_eq!(v.shares, [0.0, 1.0, 0.0]);
    // Heal; nothing happens until the ejection (1s) ends.
    f.down.lock().unwrap().clear();
    let (per, _) = run(&mut f, 100).await;
    assert_eq!(per.get("bj-a"), None);
    tokio::time::advance(Duration::from_millis(1001)).await;
    // The next two calls are the probes; they restore the endpoints, which then warm up.
    let (per, errors) = run(&mut f, 2).await;
    assert_eq!((per.get("bj-a"), errors), (Some(&2), 0));
    let v = f.svc.view();
    assert!(
        v.endpoints
            .iter()
            .filter(|e| e.status == Status::Warming)
            .count()
            == 2,
        "{v:?}"
    );
    let (per, _) = run(&mut f, 500).await;
    assert_eq!(
        per.get("bj-a"),
        None,
        "no traffic back before the hold: {per:?}"
    );
    tokio::time::advance(Duration::from_millis(3000)).await;
    let (per, _) = run(&mut f, 500).await;
    assert_eq!(per.get("bj-a"), Some(&500), "{per:?}");
}

#[tokio::test(start_paused = true)]
async fn failed_probe_ejects_for_longer() {
    let mut f = fixture_with(addrs()[..4].to_vec(), 5);
    let mut rx = f.events.subscribe();
    let a = addrs();
    f.down.lock().unwrap().insert(a[0]);
    let _ = run(&mut f, 10).await;
    tokio::time::advance(Duration::from_millis(1001)).await;
    let _ = run(&mut f, 10).await;
    let mut fors = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let TopologyEvent::EndpointEjected { for_, addr, .. } = ev {
            assert_eq!(addr, a[0]);
            fors.push(for_);
        }
    }
    assert_eq!(fors, [Duration::from_secs(1), Duration::from_secs(2)]);
}

#[tokio::test(start_paused = true)]
async fn attempt_scope_avoids_previous_picks() {
    let mut f = fixture();
    let a = addrs();
    for _ in 0..100 {
        let svc = f.svc.ready().await.unwrap();
        let (fut, picked) = attempt::scope(vec![a[0]], || svc.call(()));
        let got = fut.await.unwrap();
        assert_eq!(picked, Some(got));
        assert_eq!(got, a[1], "the other local endpoint");
    }
    // Both local avoided: the nearest tier with an endpoint left.
    let svc = f.svc.ready().await.unwrap();
    let (fut, _) = attempt::scope(vec![a[0], a[1]], || svc.call(()));
    assert!(fut.await.unwrap().ip().to_string().starts_with("127.0.2."));
}

#[tokio::test(start_paused = true)]
async fn empty_set_is_a_clear_error() {
    let mut f = fixture_with(Vec::new(), 1);
    let err = f.svc.ready().await.unwrap().call(()).await.unwrap_err();
    assert!(
        HaError::find(&err).is_some_and(HaError::is_no_healthy_endpoint),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "no healthy endpoint for dependency profile"
    );
}

#[tokio::test(start_paused = true)]
async fn new_endpoint_sets_are_followed_and_keep_health() {
    let mut f = fixture_with(addrs()[2..].to_vec(), 1);
    let (per, _) = run(&mut f, 50).await;
    assert_eq!(per.get("bj-b"), Some(&50));
    let c = f.topo.classifier();
    f._tx.send_replace(Arc::new(EndpointSet::new(
        "profile",
        addrs().iter().map(|a| c.endpoint(*a)).collect(),
        2,
    )));
    let (per, _) = run(&mut f, 50).await;
    assert_eq!(per.get("bj-a"), Some(&50), "{per:?}");
}

fn tier_of(a: &SocketAddr) -> usize {
    match a.ip().to_string().as_str() {
        s if s.starts_with("127.0.1.") => 0,
        s if s.starts_with("127.0.2.") => 1,
        _ => 2,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// A drained IDC gets no traffic unless the balancer is in panic; nothing leaves the nearest
    /// tier that is fully healthy and undrained; each tier's share follows the overprovisioning rule.
    #[test]
    fn drained_idcs_get_no_traffic_and_shares_follow_the_rule(
        down_mask in 0u8..64,
        drain_mask in 0u8..8,
        seed in 0u64..1000,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        rt.block_on(async move {
            let mut f = fixture_with(addrs(), seed);
            let all = addrs();
            let idcs = ["bj-a", "bj-b", "sh-a"];
            for (i, a) in all.iter().enumerate() {
                if down_mask & (1 << i) != 0 { f.down.lock().unwrap().insert(*a); }
            }
            for (i, idc) in idcs.iter().enumerate() {
                if drain_mask & (1 << i) != 0 { f.control.drain(idc).unwrap(); }
            }
            // Let outlier detection find the down endpoints (each needs one failed call).
            for _ in 0..200 { let _ = f.svc.ready().await.unwrap().call(()).await; }
            let v = f.svc.view();
            let mut counts = [0usize; 3];
            let mut drained_hits = 0;
            for _ in 0..3000 {
                if let Ok(a) = f.svc.ready().await.unwrap().call(()).await {
                    counts[tier_of(&a)] += 1;
                    if drain_mask & (1 << tier_of(&a)) != 0 { drained_hits += 1; }
                }
            }
            if !v.panic {
                prop_assert_eq!(drained_hits, 0);
                let total: usize = counts.iter().sum();
                for t in 0..3 {
                    let got = counts[t] as f64 / total.max(1) as f64;
                    prop_assert!((got - v.shares[t]).abs() < 0.05, "tier {} got {} want {:?}", t, got, v.shares);
                }
                // Expected shares from the rule, recomputed here from what is up and undrained.
                let mut health = [0.0f64; 3];
                for t in 0..3 {
                    if drain_mask & (1 << t) != 0 { continue; }
                    let up = (0..2).filter(|k| down_mask & (1 << (2 * t + k)) == 0).count();
                    health[t] = (1.4 * up as f64 / 2.0).min(1.0);
                }
                let sum: f64 = health.iter().sum();
                let mut left = 1.0;
                for t in 0..3 {
                    let want = if sum < 1.0 { health[t] / sum } else { let x = health[t].min(left); left -= x; x };
                    prop_assert!((v.shares[t] - want).abs() < 1e-9, "tier {} share {:?} want {}", t, v.shares, want);
                }
            }
            Ok(())
        })?;
    }
}

/// Peak-EWMA decays with time: an endpoint that had one slow call is not shunned for ever by a
/// power-of-two-choices comparison with its only sibling (which would also hide its death from
/// passive health).
#[tokio::test(start_paused = true)]
async fn a_slow_sample_fades_and_the_endpoint_is_picked_again() {
    let topo = Topology::from_toml_str(
        &format!("{TOPO}\n").replace("[balance]\n", "[balance]\newma_decay = \"1s\"\n"),
        "t.toml",
    )
    .unwrap();
    let c = topo.classifier().clone();
    let a: Vec<SocketAddr> = addrs()[..2].to_vec();
    let (_tx, rx) = channel(EndpointSet::new(
        "profile",
        a.iter().map(|x| c.endpoint(*x)).collect(),
        1,
    ));
    let slow = a[0];
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut svc = LocalityBalance::builder(&topo, rx)
        .seed(3)
        .build(move |ep: &Endpoint| {
            let addr = ep.addr;
            let first = first.clone();
            tower::service_fn(move |()| {
                let ms = if addr == slow && first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    50
                } else {
                    1
                };
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, BoxError>(addr)
                }
            })
        });
    // Make sure the slow endpoint took its slow call.
    let start = tokio::time::Instant::now();
    let mut slow_after = 0;
    let mut slow_total = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let got = svc.ready().await.unwrap().call(()).await.unwrap();
        if got == slow {
            slow_total += 1;
            if start.elapsed() > Duration::from_secs(1) {
                slow_after += 1;
            }
        }
    }
    assert!(slow_total >= 1);
    assert!(
        slow_after > 0,
        "the endpoint with one 50ms sample was never picked again"
    );
}

/// Exploration: a small share of first attempts ignores cost, so an endpoint that lost every
/// cost comparison still gets a few calls and its death is seen by passive health, even with the
/// default (slow) EWMA decay.
#[tokio::test(start_paused = true)]
async fn exploration_finds_a_dead_endpoint_that_cost_alone_would_never_pick() {
    let topo = Topology::from_toml_str(TOPO, "t.toml").unwrap();
    let events = EventBus::new(1024);
    let mut rx = events.subscribe();
    let c = topo.classifier().clone();
    let a: Vec<SocketAddr> = addrs()[..4].to_vec();
    let (_tx, wrx) = channel(EndpointSet::new(
        "profile",
        a.iter().map(|x| c.endpoint(*x)).collect(),
        1,
    ));
    let slow = a[0];
    let dead = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = dead.clone();
    let mut svc = LocalityBalance::builder(&topo, wrx)
        .events(events.clone())
        .seed(9)
        .build(move |ep: &Endpoint| {
            let addr = ep.addr;
            let dead = d.clone();
            tower::service_fn(move |()| {
                let is_dead = addr == slow && dead.load(std::sync::atomic::Ordering::SeqCst);
                let ms = if addr == slow { 50 } else { 1 };
                async move {
                    if is_dead {
                        return Err::<SocketAddr, BoxError>(Box::new(std::io::Error::from(
                            std::io::ErrorKind::ConnectionRefused,
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(addr)
                }
            })
        });
    // Both endpoints get a sample; the slow one then loses every cost comparison.
    for _ in 0..50 {
        let _ = svc.ready().await.unwrap().call(()).await;
    }
    dead.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut ejected = false;
    for _ in 0..1000 {
        let _ = svc.ready().await.unwrap().call(()).await;
        while let Ok(ev) = rx.try_recv() {
            if matches!(ev, TopologyEvent::EndpointEjected { addr, .. } if addr == slow) {
                ejected = true;
            }
        }
        if ejected {
            break;
        }
    }
    assert!(
        ejected,
        "the dead endpoint was never tried, so never ejected"
    );
}

#[tokio::test(start_paused = true)]
async fn the_last_set_before_the_publisher_ends_is_followed() {
    // A publisher that sends a final set and ends (a stopped or dead discovery task) closes the
    // channel; a closed channel answers `has_changed` with an error, which the balancer took as
    // "no change": the final set was never read.
    let mut f = fixture_with(addrs()[2..].to_vec(), 1);
    let (per, _) = run(&mut f, 20).await;
    assert_eq!(per.get("bj-b"), Some(&20));
    let c = f.topo.classifier();
    let tx = std::mem::replace(
        &mut f._tx,
        tokio::sync::watch::channel(Arc::new(EndpointSet::empty("x"))).0,
    );
    tx.send_replace(Arc::new(EndpointSet::new(
        "profile",
        addrs()[..2].iter().map(|a| c.endpoint(*a)).collect(),
        2,
    )));
    drop(tx);
    let (per, errors) = run(&mut f, 20).await;
    assert_eq!((per.get("bj-a"), errors), (Some(&20), 0), "{per:?}");
    // And a closed channel costs no recompute per pick: the picture stays.
    let (per, _) = run(&mut f, 20).await;
    assert_eq!(per.get("bj-a"), Some(&20));
}
