//! GET and SET through the master handle vs a bare `MultiplexedConnection` to the same server
//! (the lab's master), sequential and with 64 concurrent callers, and the durable mode's SET
//! (`WAIT 2`) against the plain one. Run with
//! `cargo bench -p ha-redis --bench handle`; the ratios of the medians are what matter.
//!
//! Both sides bound every command the same way: the handle's deadline is 1 s, and the bare
//! connection's response timeout is set to 1 s too (redis's default is 500 ms); `*/untimed`
//! is the bare connection with no response timeout at all. The 64-caller cases report
//! throughput (commands per second) beside the time per batch.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::HaRedis;
use ha_redis::redis::AsyncCommands;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lab, client, bare, untimed) = rt.block_on(async {
        let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
        let client = HaRedis::builder(lab.sentinel_addrs(), "members")
            .timeout(Duration::from_secs(1))
            .build()
            .await
            .unwrap();
        let bare_client =
            ha_redis::redis::Client::open(format!("redis://{}", lab.nodes[0].addr)).unwrap();
        let with_timeout = |t: Option<Duration>| {
            ha_redis::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_millis(500)))
                .set_response_timeout(t)
        };
        let bare = bare_client
            .get_multiplexed_async_connection_with_config(&with_timeout(Some(Duration::from_secs(
                1,
            ))))
            .await
            .unwrap();
        let untimed = bare_client
            .get_multiplexed_async_connection_with_config(&with_timeout(None))
            .await
            .unwrap();
        let mut m = client.master();
        let _: () = m.set("bench:k", "v").await.unwrap();
        (lab, client, bare, untimed)
    });
    let mut g = c.benchmark_group("redis");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30);
    let handle = client.master();
    g.bench_function("get/handle", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = handle.clone();
            async move {
                let _: String = m.get("bench:k").await.unwrap();
            }
        })
    });
    g.bench_function("get/bare", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = bare.clone();
            async move {
                let _: String = m.get("bench:k").await.unwrap();
            }
        })
    });
    g.bench_function("get/untimed", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = untimed.clone();
            async move {
                let _: String = m.get("bench:k").await.unwrap();
            }
        })
    });
    g.bench_function("set/handle", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = handle.clone();
            async move {
                let _: () = m.set("bench:k", "v").await.unwrap();
            }
        })
    });
    g.bench_function("set/bare", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = bare.clone();
            async move {
                let _: () = m.set("bench:k", "v").await.unwrap();
            }
        })
    });
    // The durable mode's cost: the same SET acknowledged only once both replicas have it
    // (`WAIT 2`), against the plain SET through the handle above.
    let durable = client.master().durable(2, Duration::from_millis(500));
    g.bench_function("set/durable", |b| {
        b.to_async(&rt).iter(|| {
            let mut m = durable.clone();
            async move {
                let _: () = m.set("bench:k", "v").await.unwrap();
            }
        })
    });
    g.finish();
    let mut g = c.benchmark_group("redis64");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .throughput(Throughput::Elements(64));
    g.bench_function("get64/handle", |b| {
        b.to_async(&rt).iter(|| {
            let h = handle.clone();
            async move {
                futures::future::join_all((0..64).map(|_| {
                    let mut m = h.clone();
                    async move {
                        let _: String = m.get("bench:k").await.unwrap();
                    }
                }))
                .await;
            }
        })
    });
    g.bench_function("get64/bare", |b| {
        b.to_async(&rt).iter(|| {
            let h = bare.clone();
            async move {
                futures::future::join_all((0..64).map(|_| {
                    let mut m = h.clone();
                    async move {
                        let _: String = m.get("bench:k").await.unwrap();
                    }
                }))
                .await;
            }
        })
    });
    for (name, conn) in [("set64/handle", None), ("set64/bare", Some(bare.clone()))] {
        let h = handle.clone();
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let h = h.clone();
                let conn = conn.clone();
                async move {
                    futures::future::join_all((0..64).map(|i| {
                        let mut m = h.clone();
                        let mut c = conn.clone();
                        async move {
                            let key = format!("bench:s{i}");
                            let _: () = match &mut c {
                                Some(c) => c.set(key, "v").await.unwrap(),
                                None => m.set(key, "v").await.unwrap(),
                            };
                        }
                    }))
                    .await;
                }
            })
        });
    }
    g.finish();
    drop(client);
    drop(lab);
}

criterion_group!(benches, bench);
criterion_main!(benches);
