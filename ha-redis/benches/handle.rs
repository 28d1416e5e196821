//! GET and SET through the master handle vs a bare `MultiplexedConnection` to the same server
//! (the lab's master), sequential and with 64 concurrent callers, and the durable mode's SET
//! (`WAIT 2`) against the plain one. Run with
//! `cargo bench -p ha-redis --bench handle`; the ratios of the medians are what matter.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::HaRedis;
use ha_redis::redis::AsyncCommands;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lab, client, bare) = rt.block_on(async {
        let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
        let client = HaRedis::builder(lab.sentinel_addrs(), "members")
            .build()
            .await
            .unwrap();
        let bare = ha_redis::redis::Client::open(format!("redis://{}", lab.nodes[0].addr))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut m = client.master();
        let _: () = m.set("bench:k", "v").await.unwrap();
        (lab, client, bare)
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
    g.finish();
    drop(client);
    drop(lab);
}

criterion_group!(benches, bench);
criterion_main!(benches);
