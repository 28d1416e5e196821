#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]
//! A point `SELECT 1` through `HaMysql::writer()` vs a bare mysql_async `Pool`, and the
//! checkout alone, against a real MariaDB of the lab (started here, removed at the end).
//!
//! `cargo bench -p ha-mysql --bench select`

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ha_lab::mariadb::{APP_PASSWORD, APP_USER, DATABASE, MariaDbLab, MariaDbLabOptions};
use ha_mysql::mysql_async::{self, prelude::Queryable};
use ha_mysql::{HaMysql, deadpool};

/// The bare-deadpool baseline of a checkout: a manager that does nothing.
struct Trivial;

impl deadpool::managed::Manager for Trivial {
    type Type = ();
    type Error = std::convert::Infallible;
    async fn create(&self) -> Result<(), Self::Error> {
        Ok(())
    }
    async fn recycle(
        &self,
        _: &mut (),
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Self::Error> {
        Ok(())
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (lab, db, (bare, no_reset)) = rt.block_on(async {
        let lab = MariaDbLab::start(MariaDbLabOptions::default())
            .await
            .unwrap();
        let primary = lab.primary();
        let db = HaMysql::builder()
            .addrs([primary.addr])
            .user(APP_USER)
            .password(APP_PASSWORD)
            .database(DATABASE)
            .connect()
            .await
            .unwrap();
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(primary.addr.ip().to_string())
            .tcp_port(primary.addr.port())
            .user(Some(APP_USER))
            .pass(Some(APP_PASSWORD))
            .db_name(Some(DATABASE))
            .prefer_socket(false);
        let bare = mysql_async::Pool::new(opts.clone());
        // mysql_async's pool resets every connection it takes back (COM_RESET_CONNECTION) by
        // default; ha-mysql's does not: the like-for-like baseline has the reset off.
        let no_reset = mysql_async::Pool::new(
            opts.pool_opts(mysql_async::PoolOpts::default().with_reset_connection(false)),
        );
        (lab, db, (bare, no_reset))
    });
    let mut g = c.benchmark_group("mysql");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("select_1/ha_mysql_writer", |b| {
        b.to_async(&rt).iter(|| async {
            let mut w = db.writer().await.unwrap();
            let v: Option<i64> = w.query_first("SELECT 1").await.unwrap();
            v
        })
    });
    g.bench_function("select_1/bare_mysql_async_pool", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = bare.get_conn().await.unwrap();
            let v: Option<i64> = conn.query_first("SELECT 1").await.unwrap();
            v
        })
    });
    g.bench_function("select_1/bare_mysql_async_pool_no_reset", |b| {
        b.to_async(&rt).iter(|| async {
            let mut conn = no_reset.get_conn().await.unwrap();
            let v: Option<i64> = conn.query_first("SELECT 1").await.unwrap();
            v
        })
    });
    g.bench_function("checkout/ha_mysql_writer", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(db.writer().await.unwrap()) })
    });
    g.bench_function("checkout/bare_mysql_async_pool", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(bare.get_conn().await.unwrap()) })
    });
    g.bench_function("checkout/bare_mysql_async_pool_no_reset", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(no_reset.get_conn().await.unwrap()) })
    });
    let trivial: deadpool::managed::Pool<Trivial> = deadpool::managed::Pool::builder(Trivial)
        .max_size(16)
        .runtime(deadpool::Runtime::Tokio1)
        .build()
        .unwrap();
    g.bench_function("checkout/bare_deadpool_trivial_manager", |b| {
        b.to_async(&rt)
            .iter(|| async { drop(trivial.get().await.unwrap()) })
    });
    g.finish();
    // Criterion times one side after the other, and this shared machine's speed moves between
    // the two by more than the difference measured: the ratio the README records is the median
    // of per-round ratios, each round 1000 checkouts of each side back to back (the order
    // alternating), so both sides of a round see the same machine.
    let ratios = rt.block_on(async {
        let mut ratios = Vec::with_capacity(2000);
        for round in 0..2000 {
            let ha = async {
                let t = tokio::time::Instant::now();
                for _ in 0..1000 {
                    drop(std::hint::black_box(db.writer().await.unwrap()));
                }
                t.elapsed()
            };
            let deadpool = async {
                let t = tokio::time::Instant::now();
                for _ in 0..1000 {
                    drop(std::hint::black_box(trivial.get().await.unwrap()));
                }
                t.elapsed()
            };
            let (h, d) = if round % 2 == 0 {
                let h = ha.await;
                (h, deadpool.await)
            } else {
                let d = deadpool.await;
                (ha.await, d)
            };
            ratios.push(h.as_secs_f64() / d.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        ratios
    });
    println!(
        "paired checkout: HaMysql::writer() / bare deadpool per round of 1000, median {:.3}x (p25 {:.3}x, p75 {:.3}x, {} rounds)",
        ratios[ratios.len() / 2],
        ratios[ratios.len() / 4],
        ratios[ratios.len() * 3 / 4],
        ratios.len()
    );
    rt.block_on(async {
        let _ = bare.disconnect().await;
        let _ = no_reset.disconnect().await;
    });
    drop(db);
    drop(lab);
}

criterion_group!(benches, bench);
criterion_main!(benches);
