//! GET and SET through the master handle vs a bare `MultiplexedConnection` to the same server
//! (the lab's master), sequential and with 64 concurrent callers, and the durable mode's SET
//! (`WAIT 2`) against the plain one. Run with
//! `cargo bench -p ha-redis --bench handle`; the ratios of the medians are what matter.
//!
//! Both sides bound every command the same way: the handle's deadline is 1 s, and the bare
//! connection's response timeout is set to 1 s too (redis's default is 500 ms); `*/untimed`
//! is the bare connection with no response timeout at all. The 64-caller cases report
//! throughput (commands per second) beside the time per batch.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

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
    // 64 concurrent callers. A batch's time moves by ±20% between runs on this shared
    // machine, more than the difference measured, so each side is timed interleaved with the
    // other: every timed batch of one follows an untimed batch of the other, and both
    // criterion functions see the same mix of work. `paired` then prints the median of the
    // per-round ratios (handle / bare, the order alternating), the figure the README records.
    let mut g = c.benchmark_group("redis64");
    g.measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(30)
        .throughput(Throughput::Elements(64));
    let get_h = {
        let h = handle.clone();
        move || get64(Side::Handle(h.clone()))
    };
    let get_b = {
        let b = bare.clone();
        move || get64(Side::Bare(b.clone()))
    };
    let set_h = {
        let h = handle.clone();
        move || set64(Side::Handle(h.clone()))
    };
    let set_b = {
        let b = bare.clone();
        move || set64(Side::Bare(b.clone()))
    };
    g.bench_function("get64/handle", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| interleaved(iters, get_h.clone(), get_b.clone()))
    });
    g.bench_function("get64/bare", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| interleaved(iters, get_b.clone(), get_h.clone()))
    });
    g.bench_function("set64/handle", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| interleaved(iters, set_h.clone(), set_b.clone()))
    });
    g.bench_function("set64/bare", |b| {
        b.to_async(&rt)
            .iter_custom(|iters| interleaved(iters, set_b.clone(), set_h.clone()))
    });
    g.finish();
    for (name, ratios) in [
        (
            "get64",
            rt.block_on(paired(400, get_h.clone(), get_b.clone())),
        ),
        (
            "set64",
            rt.block_on(paired(400, set_h.clone(), set_b.clone())),
        ),
        (
            "get",
            rt.block_on(paired(
                2000,
                {
                    let h = handle.clone();
                    move || get1(Side::Handle(h.clone()))
                },
                {
                    let b = bare.clone();
                    move || get1(Side::Bare(b.clone()))
                },
            )),
        ),
    ] {
        println!(
            "paired {name}: handle / bare per round, median {:.3}x (p25 {:.3}x, p75 {:.3}x, {} rounds)",
            ratios[ratios.len() / 2],
            ratios[ratios.len() / 4],
            ratios[ratios.len() * 3 / 4],
            ratios.len()
        );
    }
    drop(client);
    drop(lab);
}

/// One side of a comparison: the master handle or the bare connection.
#[derive(Clone)]
enum Side {
    Handle(ha_redis::MasterHandle),
    Bare(ha_redis::redis::aio::MultiplexedConnection),
}

impl Side {
    async fn get(&self) -> String {
        match self.clone() {
            Side::Handle(mut m) => m.get("bench:k").await.unwrap(),
            Side::Bare(mut m) => m.get("bench:k").await.unwrap(),
        }
    }

    async fn set(&self, key: String) {
        match self.clone() {
            Side::Handle(mut m) => m.set::<_, _, ()>(key, "v").await.unwrap(),
            Side::Bare(mut m) => m.set::<_, _, ()>(key, "v").await.unwrap(),
        }
    }
}

async fn get1(side: Side) {
    side.get().await;
}

async fn get64(side: Side) {
    futures::future::join_all((0..64).map(|_| side.get())).await;
}

async fn set64(side: Side) {
    futures::future::join_all((0..64).map(|i| side.set(format!("bench:s{i}")))).await;
}

/// `iters` timed runs of `measured`, each right after an untimed run of `other`.
async fn interleaved<A, B, FA, FB>(iters: u64, measured: A, other: B) -> Duration
where
    A: Fn() -> FA,
    B: Fn() -> FB,
    FA: Future<Output = ()>,
    FB: Future<Output = ()>,
{
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        other().await;
        total += timed(measured()).await;
    }
    total
}

/// `rounds` rounds of one `a` and one `b` (the order alternating); the sorted per-round
/// ratios of their times, a / b.
async fn paired<A, B, FA, FB>(rounds: usize, a: A, b: B) -> Vec<f64>
where
    A: Fn() -> FA,
    B: Fn() -> FB,
    FA: Future<Output = ()>,
    FB: Future<Output = ()>,
{
    let mut ratios = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let (ta, tb) = if round % 2 == 0 {
            let ta = timed(a()).await;
            (ta, timed(b()).await)
        } else {
            let tb = timed(b()).await;
            (timed(a()).await, tb)
        };
        ratios.push(ta.as_secs_f64() / tb.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    ratios
}

async fn timed(f: impl Future<Output = ()>) -> Duration {
    let t = tokio::time::Instant::now();
    f.await;
    t.elapsed()
}

criterion_group!(benches, bench);
criterion_main!(benches);
