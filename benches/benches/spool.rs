//! ha-mq's spool: acknowledged appends per second, each resolved only after its fsync, with 1,
//! 64 and 256 concurrent appenders (concurrent appends share fsyncs: group commit, so the rate
//! is about the appenders over one fsync's latency). The target is at least 20,000 appends/s
//! with 64 appenders.
//!
//! Run: `cargo bench -p benches --bench spool -- --warm-up-time 2 --measurement-time 5`
//! Criterion reports `thrpt` in appends/s (one element per append). The spool lives in a
//! temporary directory under `$TMPDIR` (point it at the disk you want measured).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ha_mq::spool::{Spool, SpoolConfig, SpoolRecord};

/// A message of a typical size: a 256-byte body, a key, tags and one property.
fn message() -> SpoolRecord {
    SpoolRecord::new("orders", "order-000000042", vec![b'x'; 256])
        .tags("created")
        .property("region", "sh")
}

fn appends(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = SpoolConfig::new(tmp.path())
        .max_bytes(16 << 30)
        .segment_bytes(64 << 20);
    let spool = rt.block_on(Spool::open(config)).unwrap();
    let record = Arc::new(message());

    let mut group = c.benchmark_group("spool_append");
    group.throughput(Throughput::Elements(1));
    for appenders in [1_u64, 64, 256] {
        group.bench_function(BenchmarkId::from_parameter(appenders), |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (spool, record) = (spool.clone(), Arc::clone(&record));
                async move {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..appenders)
                        .map(|i| {
                            // Spread `iters` appends over the appenders.
                            let n = iters / appenders + u64::from(i < iters % appenders);
                            let (spool, record) = (spool.clone(), Arc::clone(&record));
                            tokio::spawn(async move {
                                for _ in 0..n {
                                    spool.append(&record).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    start.elapsed()
                }
            });
        });
    }
    group.finish();
    rt.block_on(spool.close());
}

criterion_group! {
    name = benches;
    // An fsync costs milliseconds: fewer, longer samples than criterion's default.
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(2));
    targets = appends
}
criterion_main!(benches);
