//! Retry avoidance through a layer that defers the call (tower's `Buffer`): the attempt
//! context must cross it, or retries go back to the endpoint that just failed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ha_core::attempt::{CarryLayer, RestoreLayer};
use ha_core::balance::LocalityBalance;
use ha_core::discovery::channel;
use ha_core::failover::{Failover, Idempotent};
use ha_core::{Endpoint, EndpointSet, EventBus, Topology};
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

const TOPO: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[health]
# Never ejected: the test is about where the retry goes, not about health.
consecutive_failures = 1000000
failure_rate = 1.0
failure_rate_min_requests = 1000000
[dependencies.profile]
static_addrs = ["127.0.1.11:80"]
"#;

const DEAD: &str = "127.0.1.11:80";
const ALIVE: &str = "127.0.1.12:80";

type Balancer = LocalityBalance<tower::util::BoxCloneSyncService<(), SocketAddr, BoxError>>;

/// Two endpoints of the local IDC; `DEAD` refuses every connect. Returns the balancer and the
/// count of calls that reached the dead one.
fn balancer(
    seed: u64,
) -> (
    Balancer,
    Arc<AtomicUsize>,
    tokio::sync::watch::Sender<Arc<EndpointSet>>,
) {
    let topo = Topology::from_toml_str(TOPO, "t.toml").unwrap();
    let c = topo.classifier();
    let dead: SocketAddr = DEAD.parse().unwrap();
    let alive: SocketAddr = ALIVE.parse().unwrap();
    let set = EndpointSet::new("profile", vec![c.endpoint(dead), c.endpoint(alive)], 1);
    let (tx, rx) = channel(set);
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let svc = LocalityBalance::builder(&topo, rx)
        .events(EventBus::default())
        .seed(seed)
        .build(move |ep: &Endpoint| {
            let addr = ep.addr;
            let h = h.clone();
            tower::util::BoxCloneSyncService::new(tower::service_fn(move |()| {
                let refused = addr == dead;
                if refused {
                    h.fetch_add(1, Ordering::SeqCst);
                }
                async move {
                    if refused {
                        Err::<SocketAddr, BoxError>(Box::new(std::io::Error::from(
                            std::io::ErrorKind::ConnectionRefused,
                        )))
                    } else {
                        Ok(addr)
                    }
                }
            }))
        });
    (svc, hits, tx)
}

fn failover() -> ha_core::failover::FailoverLayer<Idempotent> {
    Failover::builder()
        .max_attempts(2)
        // A budget that never runs out: every failure may be retried once.
        .budget(1000.0, 100_000)
        .policy(Idempotent)
        .layer()
}

const CALLS: usize = 400;

#[tokio::test(flavor = "current_thread")]
async fn buffer_without_carry_loses_the_avoidance() {
    // The stacking the review found: Failover over Buffer over the balancer. The retry's
    // avoid list does not reach the balancer, so a retry can go back to the dead endpoint.
    let (bal, hits, _keep) = balancer(3);
    let mut svc = ServiceBuilder::new()
        .layer(failover())
        .buffer(16)
        .service(bal);
    let mut failed = 0;
    for _ in 0..CALLS {
        if svc.ready().await.unwrap().call(()).await.is_err() {
            failed += 1;
        }
    }
    assert!(hits.load(Ordering::SeqCst) > 0);
    assert!(
        failed > 0,
        "without the carried context some retries hit the dead endpoint"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn carry_and_restore_keep_the_avoidance_through_a_buffer() {
    let (bal, hits, _keep) = balancer(3);
    let mut svc = ServiceBuilder::new()
        .layer(failover())
        .layer(CarryLayer)
        .buffer(16)
        .layer(RestoreLayer)
        .service(bal);
    let mut failed = 0;
    for _ in 0..CALLS {
        match svc.ready().await.unwrap().call(()).await {
            Ok(addr) => assert_eq!(addr, ALIVE.parse::<SocketAddr>().unwrap()),
            Err(err) => {
                failed += 1;
                eprintln!("{err}");
            }
        }
    }
    // The dead endpoint was tried (it is picked first now and then), and every such call
    // was saved by a retry on the other endpoint.
    assert!(hits.load(Ordering::SeqCst) > 0);
    assert_eq!(failed, 0);
}
