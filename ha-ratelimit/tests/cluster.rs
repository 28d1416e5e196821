//! The cluster-wide limit against a real `redis-server` started through ha-lab (by pid, on a
//! lab address): nginx semantics in Redis, two instances sharing one budget, several lines, the
//! tower layer, and the fallback when Redis is killed, frozen or absent.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ha_core::HaError;
use ha_lab::process::{ServerSpec, Supervisor};
use ha_ratelimit::cluster::redis::aio::ConnectionManager;
use ha_ratelimit::cluster::{ClusterLimiter, ClusterLimiterBuilder, ClusterRateLimitLayer, Source};
use ha_ratelimit::{Alert, AlertKind, Decision, Key, LimitConfig, Rate, RateLimitConfig, Share};
use tokio::time::{Instant, timeout};
use tower::{Service, ServiceExt};

/// A redis-server of our own, on `127.0.1.<host>:<port>` in IDC bj-a, cleaned up on drop.
struct Redis {
    sup: Supervisor,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Redis {
    async fn start(host: u8, port: u16) -> Redis {
        assert!(
            ha_lab::process::find_program("redis-server").is_some(),
            "redis-server is not installed (Debian package redis-server; scripts/setup installs it)"
        );
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(dir.path());
        let addr: SocketAddr = format!("127.0.1.{host}:{port}").parse().unwrap();
        let mut spec = ServerSpec::redis("redis", addr, dir.path());
        spec.idc = "bj-a".into();
        sup.start(spec).await.unwrap();
        Redis {
            sup,
            addr,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// A limiter on this server with its own key prefix and a timeout generous enough that a
    /// loaded machine never makes these tests fall back.
    fn builder(
        &self,
        cfg: RateLimitConfig,
        prefix: &str,
    ) -> ClusterLimiterBuilder<ConnectionManager> {
        ClusterLimiter::connect(&self.url(), cfg)
            .unwrap()
            .prefix(prefix)
            .timeout(Duration::from_secs(2))
    }

    /// A plain connection to inspect what the limiter left in Redis.
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

fn one_line(line: LimitConfig) -> RateLimitConfig {
    RateLimitConfig::with_limits(vec![line])
}

/// 1 request per minute: a test's few seconds drain at most a few dozen milli-requests, so
/// every count below is exact whatever the machine's load.
fn slow(name: &str, key: &str) -> LimitConfig {
    LimitConfig::new(name, key, Rate::per_minute(1))
}

async fn check<R>(l: &ClusterLimiter<R>, key: u64) -> (Decision, Source)
where
    R: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    l.check_with_source(|_| Key::u64(key)).await
}

#[tokio::test]
async fn burst_then_reject_as_nginx_and_a_rejection_charges_nothing() {
    let redis = Redis::start(31, 16401).await;
    let l = redis
        .builder(one_line(slow("m", "member").burst(5).nodelay()), "t1:")
        .build()
        .unwrap();
    // Rule 3: an empty bucket admits 1 + burst at once.
    for _ in 0..6 {
        assert_eq!(check(&l, 7).await, (Decision::Allow, Source::Cluster));
    }
    // Rule 4 and the exact wait: excess 5000 at 1000/60 = 16 milli-requests/s (integer, as
    // nginx) must drain 1000 milli-requests: ceil(1000 * 1000 / 16) = 62 500 ms, less the few
    // ms this test took.
    let (d, src) = check(&l, 7).await;
    assert_eq!(src, Source::Cluster);
    let Decision::Reject { retry_after } = d else {
        panic!("{d:?}")
    };
    assert!(
        retry_after <= Duration::from_millis(62_500) && retry_after > Duration::from_secs(55),
        "{retry_after:?}"
    );
    // Rule 5: the rejected request wrote nothing, so the next wait is no longer.
    let Decision::Reject { retry_after: again } = check(&l, 7).await.0 else {
        panic!("not rejected")
    };
    assert!(again <= retry_after, "{again:?} > {retry_after:?}");
    // Rule 9: another key has its own bucket.
    assert_eq!(check(&l, 8).await, (Decision::Allow, Source::Cluster));

    // The bucket expires in Redis when it would be empty: memory in Redis is bounded by the
    // keys with state.
    let mut c = redis.conn().await;
    let key = [b"t1:m:".as_slice(), &7u64.to_be_bytes()].concat();
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut c)
        .await
        .unwrap();
    // excess 5000 drains in (5000 + 1000) * 1000 / 16 = 375 000 ms.
    assert!(pttl > 300_000 && pttl <= 375_001, "{pttl}");
    assert!(!l.is_degraded());
}

#[tokio::test]
async fn delay_holds_like_nginx() {
    // rate=1r/s burst=4 delay=2: 3 at once, then held ~1000 and ~2000 ms, then rejected
    // (rule 7; the holds shrink by the ms the test took, 1 milli-request per ms).
    let redis = Redis::start(32, 16402).await;
    let cfg = one_line(
        LimitConfig::new("d", "member", Rate::per_second(1))
            .burst(4)
            .delay(2),
    );
    let l = redis.builder(cfg, "t2:").build().unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(check(&l, 1).await);
    }
    assert!(got.iter().all(|(_, s)| *s == Source::Cluster), "{got:?}");
    assert_eq!(got[..3], [(Decision::Allow, Source::Cluster); 3]);
    let hold = |i: usize| match got[i].0 {
        Decision::Delay(d) => d,
        other => panic!("request {i}: {other:?}"),
    };
    assert!(hold(3) <= Duration::from_millis(1000) && hold(3) > Duration::from_millis(500));
    assert!(hold(4) <= Duration::from_millis(2000) && hold(4) > Duration::from_millis(1500));
    assert!(got[5].0.is_reject(), "{got:?}");
}

#[tokio::test]
async fn several_lines_a_rejection_charges_no_line_and_empty_keys_skip() {
    // Rule 11: a per-member line (burst 0) and a server-wide line (burst 10). Member 1's second
    // request is rejected by its own line and must not use the server-wide budget: 10 more
    // members then pass (1 + 10 in all) and the 11th is refused by the server line.
    let redis = Redis::start(33, 16403).await;
    let cfg = RateLimitConfig::with_limits(vec![
        slow("per_member", "member").nodelay(),
        slow("server", "server").burst(10).nodelay(),
    ]);
    let l = redis.builder(cfg, "t3:").build().unwrap();
    let req = |member: u64| {
        move |src: &str| match src {
            "member" => Key::u64(member),
            _ => Key::global(),
        }
    };
    assert_eq!(l.check_with(req(1)).await, Decision::Allow);
    assert!(l.check_with(req(1)).await.is_reject());
    for m in 2..=11 {
        assert_eq!(l.check_with(req(m)).await, Decision::Allow, "member {m}");
    }
    assert!(l.check_with(req(12)).await.is_reject());
    // Rule 10: with an empty member key the per-member line is skipped, the server line still
    // applies (and is full).
    let skip = |src: &str| match src {
        "member" => Key::NONE,
        _ => Key::global(),
    };
    assert!(l.check_with(skip).await.is_reject());
    // Nothing at all to check: allowed.
    assert_eq!(l.check_with(|_| Key::NONE).await, Decision::Allow);
}

#[tokio::test]
async fn two_instances_share_one_budget() {
    let redis = Redis::start(34, 16404).await;
    let cfg = one_line(slow("shared", "member").burst(5).nodelay());
    let build = || {
        redis
            .builder(cfg.clone(), "t4:")
            .instances(2)
            .build()
            .unwrap()
    };
    let (a, b) = (build(), build());
    for _ in 0..3 {
        assert_eq!(check(&a, 1).await, (Decision::Allow, Source::Cluster));
        assert_eq!(check(&b, 1).await, (Decision::Allow, Source::Cluster));
    }
    // 6 = 1 + burst admitted across both instances; the next is refused on either.
    assert!(check(&a, 1).await.0.is_reject());
    assert!(check(&b, 1).await.0.is_reject());
    // The derived fallback: the cluster's rate divided by the instances.
    assert_eq!(a.rate("shared"), Some(Rate::per_minute(1)));
    assert_eq!(a.fallback().rate("shared").unwrap().milli_per_sec(), 16 / 2);
}

#[tokio::test]
async fn killed_redis_falls_back_at_once_and_recovers() {
    let redis = Redis::start(35, 16405).await;
    let alerts = Arc::new(parking_lot::Mutex::new(Vec::<Alert>::new()));
    let seen = alerts.clone();
    // One alert per kind per minute: the count below holds however long the recovery takes.
    let mut cfg = one_line(slow("k", "member").burst(2).nodelay());
    cfg.alerts.interval = Duration::from_secs(60);
    let l = ClusterLimiter::connect(&redis.url(), cfg)
        .unwrap()
        .prefix("t5:")
        .timeout(Duration::from_millis(500))
        .retry_after(Duration::from_millis(200))
        .on_alert(move |a| seen.lock().push(a.clone()))
        .build()
        .unwrap();
    assert_eq!(check(&l, 1).await, (Decision::Allow, Source::Cluster));

    redis.sup.kill("redis").await.unwrap();
    // Connection refused: the fallback decides, the request is not refused for it.
    let (d, src) = check(&l, 1).await;
    assert_eq!((d, src), (Decision::Allow, Source::Fallback));
    assert!(l.is_degraded());
    {
        let alerts = alerts.lock();
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].kind, AlertKind::ClusterUnavailable);
        assert_eq!(&*alerts[0].limit, "t5:");
    }
    // The fallback applies its own limit: its bucket for key 1 was fresh, burst 2 → 3 in all.
    assert_eq!(check(&l, 1).await, (Decision::Allow, Source::Fallback));
    assert_eq!(check(&l, 1).await, (Decision::Allow, Source::Fallback));
    let (d, src) = check(&l, 1).await;
    assert!(d.is_reject() && src == Source::Fallback, "{d:?} {src:?}");

    redis.sup.restart("redis").await.unwrap();
    // Within a bounded time a request tries Redis again and it decides.
    let back = timeout(Duration::from_secs(15), async {
        loop {
            if check(&l, 2).await.1 == Source::Cluster {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "Redis never decided again after its restart");
    assert!(!l.is_degraded());
    // One unavailability alert per interval, however many requests fell back; the derived
    // fallback's own rejection alert reached the same hook.
    let alerts = alerts.lock();
    let count = |kind| alerts.iter().filter(|a| a.kind == kind).count();
    assert_eq!(count(AlertKind::ClusterUnavailable), 1, "{alerts:?}");
    assert_eq!(count(AlertKind::Rejected), 1, "{alerts:?}");
}

#[tokio::test]
async fn frozen_redis_costs_one_timeout_then_nothing() {
    let redis = Redis::start(36, 16406).await;
    // Long enough that a check which skips Redis never comes near it, even on a loaded machine.
    let wait = Duration::from_secs(1);
    let l = ClusterLimiter::connect(
        &redis.url(),
        one_line(slow("f", "member").burst(5).nodelay()),
    )
    .unwrap()
    .prefix("t6:")
    .timeout(wait)
    .retry_after(Duration::from_secs(30))
    .build()
    .unwrap();
    assert_eq!(check(&l, 1).await.1, Source::Cluster);
    redis.sup.freeze("redis").unwrap();

    // A frozen server accepts connections and never answers: the check gives up after the
    // timeout (the outer bound only catches a hang) and the fallback decides.
    let started = Instant::now();
    let got = timeout(Duration::from_secs(10), check(&l, 1)).await;
    let took = started.elapsed();
    assert_eq!(
        got.expect("the check hung on a frozen Redis"),
        (Decision::Allow, Source::Fallback)
    );
    assert!(took >= wait, "{took:?}");
    // Until retry_after passes nobody waits for Redis again: these return without the timeout.
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(check(&l, 3).await.1, Source::Fallback);
        assert!(
            started.elapsed() < wait,
            "a check waited for the frozen Redis"
        );
    }
    redis.sup.thaw("redis").unwrap();
}

#[tokio::test]
async fn unreachable_at_start_is_a_fallback_not_an_error() {
    // Nothing listens there: building succeeds (nothing is sent at start) and requests are
    // decided locally.
    let l = ClusterLimiter::connect(
        "redis://127.0.1.37:16407/",
        one_line(slow("u", "member").burst(1)),
    )
    .unwrap()
    .timeout(Duration::from_millis(500))
    .build()
    .unwrap();
    let got = timeout(Duration::from_secs(10), check(&l, 1))
        .await
        .unwrap();
    assert_eq!(got, (Decision::Allow, Source::Fallback));
    assert!(l.is_degraded());
}

#[test]
fn bad_input_is_a_clear_error() {
    let cfg = one_line(slow("x", "member"));
    // Outside a tokio runtime: an error, not a panic in redis's spawn.
    let err = ClusterLimiter::connect("redis://127.0.0.1:1/", cfg.clone()).unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let err = ClusterLimiter::connect("http://nope", cfg.clone()).unwrap_err();
        assert!(err.to_string().contains("not a Redis URL"), "{err}");
        let err = ClusterLimiter::connect("redis://127.0.0.1:1/", cfg.clone())
            .unwrap()
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("timeout"), "{err}");
        let err = ClusterLimiter::connect("redis://127.0.0.1:1/", cfg.clone())
            .unwrap()
            .instances(0)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("instances"), "{err}");
    });
}

#[tokio::test]
async fn tower_layer_under_concurrency() {
    // 40 concurrent requests for one member, burst 5: exactly 6 reach the service, 34 get
    // `RateLimited` with a retry_after.
    let redis = Redis::start(38, 16408).await;
    let l = Arc::new(
        redis
            .builder(one_line(slow("api", "member").burst(5).nodelay()), "t8:")
            .build()
            .unwrap(),
    );
    fn member<'r>(_source: &str, req: &'r u64) -> Key<'r> {
        Key::u64(*req)
    }
    let layer = ClusterRateLimitLayer::new(l, member);
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|req: u64| async move {
            Ok::<_, std::convert::Infallible>(req)
        }));
    let calls = (0..40).map(|_| {
        let svc = svc.clone();
        tokio::spawn(async move { svc.oneshot(9u64).await })
    });
    let results = futures::future::join_all(calls).await;
    let mut ok = 0;
    let mut limited = 0;
    for r in results {
        match r.unwrap() {
            Ok(9) => ok += 1,
            Ok(other) => panic!("wrong response {other}"),
            Err(e) => match HaError::find(&*e) {
                Some(HaError::RateLimited { retry_after }) => {
                    assert!(*retry_after > Duration::from_secs(50), "{retry_after:?}");
                    limited += 1;
                }
                _ => panic!("unexpected error {e}"),
            },
        }
    }
    assert_eq!((ok, limited), (6, 34));
    // Clones are cheap and share the limiter.
    let mut svc2 = svc.clone();
    let e = svc2.ready().await.unwrap().call(9).await.unwrap_err();
    assert!(HaError::find(&*e).is_some_and(|e| e.is_rate_limited()));
}

#[tokio::test]
async fn reload_and_instances_rederive_the_fallback() {
    // Nothing is sent to Redis here: reloads only change the lines.
    let url = "redis://127.0.1.41:16411/";
    let l = ClusterLimiter::connect(url, one_line(slow("r", "member").burst(3)))
        .unwrap()
        .instances(2)
        .build()
        .unwrap();
    let rates = |l: &ClusterLimiter| {
        (
            l.rate("r").unwrap().milli_per_sec(),
            l.fallback().rate("r").unwrap().milli_per_sec(),
        )
    };
    assert_eq!(rates(&l), (16, 8));
    l.set_instances(4).unwrap();
    assert_eq!(rates(&l), (16, 4));
    l.reload(one_line(
        LimitConfig::new("r", "member", Rate::per_minute(2)).burst(3),
    ))
    .unwrap();
    assert_eq!(rates(&l), (33, 8));
    // Bad input changes nothing.
    let mut bad = LimitConfig::new("r", "member", Rate::per_second(1));
    bad.delay = Some(1);
    bad.nodelay = true;
    assert!(l.reload(one_line(bad)).is_err());
    assert!(l.set_instances(0).is_err());
    assert_eq!(rates(&l), (33, 8));

    // A fallback of one's own is not re-derived: setting the instances says so.
    let own = Arc::new(
        ha_ratelimit::Limiter::builder(one_line(slow("r", "member")))
            .build()
            .unwrap(),
    );
    let l = ClusterLimiter::connect(url, one_line(slow("r", "member")))
        .unwrap()
        .fallback(own)
        .build()
        .unwrap();
    let err = l.set_instances(3).unwrap_err();
    assert!(err.to_string().contains("fallback"), "{err}");
}

fn topology(capacity_rps: u32) -> ha_core::Topology {
    ha_core::Topology::from_toml_str(
        &format!(
            r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15353"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
capacity_rps = {capacity_rps}
[dependencies.profile]
static_addrs = ["127.0.1.11:8080"]
"#
        ),
        "t.toml",
    )
    .unwrap()
}

/// A share line decided in Redis raises `near_capacity` like a local one (this instance's load
/// against its even part of the IDC's share), and every alert of the cluster limiter reaches
/// both the hook and ha-core's event bus.
#[tokio::test]
async fn cluster_share_lines_alert_near_capacity_on_the_hook_and_the_bus() {
    let redis = Redis::start(42, 16412).await;
    let bus = ha_core::EventBus::new(256);
    let mut rx = bus.subscribe();
    let alerts = Arc::new(parking_lot::Mutex::new(Vec::<Alert>::new()));
    let seen = alerts.clone();
    // The IDC's share is 8 r/s, two instances: 4 r/s each; a burst that admits everything
    // this test sends, and a short window so that it measures soon.
    let share = Share {
        idc: "bj-a".into(),
        fraction: 0.8,
    };
    let mut cfg = one_line(
        LimitConfig::share("route", "route", share)
            .burst(1_000_000)
            .nodelay(),
    );
    cfg.alerts.window = Duration::from_millis(20);
    let l = redis
        .builder(cfg, "t12:")
        .topology(&topology(10))
        .instances(2)
        .events(bus.clone())
        .on_alert(move |a| seen.lock().push(a.clone()))
        .build()
        .unwrap();
    assert_eq!(l.rate("route"), Some(Rate::per_second(8)));
    // Requests as fast as Redis answers them (thousands a second, far over 0.8 x 4 r/s): the
    // alert comes with the first full window. The bound is a count, not a time.
    let mut sent = 0;
    while alerts.lock().is_empty() && sent < 200_000 {
        let (d, src) = l.check_with_source(|_| Key::str("/members")).await;
        assert_eq!((d, src), (Decision::Allow, Source::Cluster));
        sent += 1;
    }
    let got = alerts.lock().clone();
    assert_eq!(got.len(), 1, "after {sent} requests: {got:?}");
    assert_eq!(got[0].kind, AlertKind::NearCapacity);
    assert_eq!(&*got[0].limit, "route");
    let (idc, measured, limit) = got[0].load.clone().unwrap();
    assert_eq!((&*idc, limit), ("bj-a", 4.0));
    assert!(measured >= 0.8 * 4.0, "{measured}");
    let event = rx.try_recv().unwrap();
    let ha_core::TopologyEvent::RateLimitAlert { limit, kind, .. } = event else {
        panic!("{event:?}")
    };
    assert_eq!((&*limit, kind), ("route", "near_capacity"));

    // Redis going away is an alert on the bus too.
    redis.sup.kill("redis").await.unwrap();
    assert_eq!(
        l.check_with_source(|_| Key::str("/members")).await.1,
        Source::Fallback
    );
    let kinds: Vec<&str> = std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|e| match e {
            ha_core::TopologyEvent::RateLimitAlert { kind, .. } => Some(kind),
            _ => None,
        })
        .collect();
    assert!(kinds.contains(&"cluster_unavailable"), "{kinds:?}");
}

/// A connection that counts the commands sent through it: the round trips a check makes.
#[derive(Clone)]
struct Counted {
    inner: ConnectionManager,
    sent: Arc<std::sync::atomic::AtomicUsize>,
}

impl Counted {
    /// A connection manager set up as `ClusterLimiter::connect` sets one up (no response
    /// timeout of its own: the limiter's bounds every call).
    async fn to(redis: &Redis) -> Counted {
        let client = redis::Client::open(redis.url()).unwrap();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(None)
            .set_number_of_retries(1);
        Counted {
            inner: ConnectionManager::new_with_config(client, config)
                .await
                .unwrap(),
            sent: Arc::default(),
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl redis::aio::ConnectionLike for Counted {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// A debugging recorder's counters, summed over its snapshots (a snapshot takes what was
/// counted since the one before).
struct Totals {
    snapshotter: metrics_util::debugging::Snapshotter,
    sums: std::collections::BTreeMap<(String, Vec<(String, String)>), u64>,
}

impl Totals {
    fn new(snapshotter: metrics_util::debugging::Snapshotter) -> Totals {
        Totals {
            snapshotter,
            sums: Default::default(),
        }
    }

    /// The counter `name` with the label `label`, summed over its other labels.
    fn get(&mut self, name: &str, label: (&str, &str)) -> u64 {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            if let metrics_util::debugging::DebugValue::Counter(c) = value {
                let labels = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_string(), l.value().to_string()))
                    .collect();
                *self
                    .sums
                    .entry((key.key().name().to_string(), labels))
                    .or_default() += c;
            }
        }
        self.sums
            .iter()
            .filter(|((n, labels), _)| {
                n == name && labels.iter().any(|(k, v)| k == label.0 && v == label.1)
            })
            .map(|(_, c)| c)
            .sum()
    }
}

/// What the docs claim for a killed Redis, measured: with a timeout of an hour, the check
/// after the kill still comes back (from the fallback) because the refused connection fails
/// it, not the timeout; it made exactly one round trip; and while Redis is skipped the checks
/// make none.
#[tokio::test]
async fn killed_redis_is_decided_by_the_fallback_without_waiting_for_the_timeout() {
    let redis = Redis::start(43, 16413).await;
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let mut totals = Totals::new(recorder.snapshotter());
    // This test's current-thread runtime runs on this thread: the limiter's metric handles,
    // taken at build, go to this recorder.
    let _local = metrics::set_default_local_recorder(&recorder);
    let conn = Counted::to(&redis).await;
    let hour = Duration::from_secs(3600);
    let l = ClusterLimiter::builder(conn.clone(), one_line(slow("k", "member").burst(2)))
        .prefix("t13:")
        .timeout(hour)
        .retry_after(hour)
        .build()
        .unwrap();
    assert_eq!(check(&l, 1).await, (Decision::Allow, Source::Cluster));

    redis.sup.kill("redis").await.unwrap();
    let before = conn.sent();
    // The outer bound only catches a hang (a check waiting for the hour-long timeout).
    let got = timeout(Duration::from_secs(600), check(&l, 1)).await;
    assert_eq!(
        got.expect("the check waited for the timeout"),
        (Decision::Allow, Source::Fallback)
    );
    assert_eq!(conn.sent() - before, 1, "one round trip, refused");
    let mut unavailable =
        |reason| totals.get("ha_ratelimit_cluster_unavailable_total", ("reason", reason));
    assert_eq!((unavailable("error"), unavailable("timeout")), (1, 0));
    // Until retry_after, no check goes to Redis at all.
    for _ in 0..20 {
        assert_eq!(check(&l, 3).await.1, Source::Fallback);
    }
    assert_eq!(conn.sent() - before, 1);
    assert_eq!((unavailable("error"), unavailable("timeout")), (1, 0));
    assert_eq!(
        totals.get("ha_ratelimit_cluster_checks_total", ("source", "fallback")),
        21
    );
}

/// A frozen Redis on a paused clock: the first check waits exactly the timeout (the clock only
/// moves while everything waits on it), the next ones not at all, exactly.
#[tokio::test]
async fn frozen_redis_costs_exactly_one_timeout_on_a_paused_clock() {
    let redis = Redis::start(44, 16414).await;
    let wait = Duration::from_secs(5);
    let conn = Counted::to(&redis).await;
    let l = ClusterLimiter::builder(
        conn.clone(),
        one_line(slow("f", "member").burst(5).nodelay()),
    )
    .prefix("t14:")
    .timeout(wait)
    .retry_after(Duration::from_secs(30))
    .build()
    .unwrap();
    assert_eq!(check(&l, 1).await.1, Source::Cluster);
    redis.sup.freeze("redis").unwrap();
    // From here nothing this runtime waits for will answer but a timer, so paused time is
    // exact: it jumps to the next timer whenever every task waits.
    tokio::time::pause();
    let before = conn.sent();
    let started = Instant::now();
    assert_eq!(check(&l, 1).await, (Decision::Allow, Source::Fallback));
    let took = started.elapsed();
    // The timer wheel counts whole ms, so the deadline is rounded up to the next one.
    assert!(
        took >= wait && took <= wait + Duration::from_millis(1),
        "{took:?}"
    );
    assert_eq!(conn.sent() - before, 1);
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(check(&l, 3).await.1, Source::Fallback);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "a check waited for Redis"
        );
    }
    assert_eq!(
        conn.sent() - before,
        1,
        "no round trip while Redis is skipped"
    );
    tokio::time::resume();
    redis.sup.thaw("redis").unwrap();
}
