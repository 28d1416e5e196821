//! ha-core benchmarks, each a ratio against a baseline measured in the same run:
//! - `pick/64` vs `pick/4`: a pick among 64 endpoints costs at most 1.2× a pick among 4;
//! - `stack/bare` vs `stack/failover+balance`: `Failover` + `LocalityBalance` over a no-op
//!   service add at most 150 ns per call;
//! - `resolve/cached` vs `resolve/hickory`: a cached resolve (`DnsDiscovery::current`) is at least
//!   100× faster than a hickory lookup to the lab DNS, and faster than `resolve/hickory-cache-on`
//!   (hickory answering from its own cache, the fair baseline for a cached answer).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::{Ready, ready};
use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use criterion::{Criterion, criterion_group, criterion_main};
use futures::FutureExt;
use ha_core::balance::LocalityBalance;
use ha_core::discovery::channel;
use ha_core::dns::DnsDiscovery;
use ha_core::failover::Failover;
use ha_core::{Endpoint, EndpointSet, EventBus, Topology};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tower::Service;

/// A service that answers at once.
#[derive(Clone, Copy)]
struct Noop;

impl Service<()> for Noop {
    type Response = ();
    type Error = std::io::Error;
    type Future = Ready<Result<(), std::io::Error>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: ()) -> Self::Future {
        ready(Ok(()))
    }
}

fn topology(extra: &str) -> Topology {
    Topology::from_toml_str(
        &format!(
            r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15953"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53:15953"]
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
{extra}
"#
        ),
        "bench.toml",
    )
    .unwrap()
}

/// `n` endpoints spread over the three IDCs, a third each.
fn balancer(topo: &Topology, n: usize) -> LocalityBalance<Noop> {
    let c = topo.classifier();
    let eps: Vec<Endpoint> = (0..n)
        .map(|i| {
            c.endpoint(SocketAddr::new(
                IpAddr::from([127, 0, (i % 3) as u8 + 1, (i / 3) as u8 + 10]),
                80,
            ))
        })
        .collect();
    let (tx, rx) = channel(EndpointSet::new("bench", eps, 1));
    // The sender lives as long as the bench.
    std::mem::forget(tx);
    LocalityBalance::builder(topo, rx).build(|_: &Endpoint| Noop)
}

fn pick(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let topo = topology("");
    let mut g = c.benchmark_group("pick");
    for n in [4usize, 64] {
        let mut svc = balancer(&topo, n);
        g.bench_function(format!("{n}"), |b| {
            b.iter(|| black_box(svc.call(()).now_or_never()));
        });
    }
    g.finish();
}

fn stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let topo = topology("");
    let mut g = c.benchmark_group("stack");
    // Both sides go through `poll_ready` then `call`, as tower requires and every caller does
    // (`Failover` answers a call made without a ready inner service on its slow path).
    let mut bare = Noop;
    g.bench_function("bare", |b| {
        b.iter(|| {
            let _ = black_box(std::future::poll_fn(|cx| bare.poll_ready(cx)).now_or_never());
            black_box(bare.call(()).now_or_never())
        })
    });
    let mut full = Failover::builder().service(balancer(&topo, 6));
    g.bench_function("failover+balance", |b| {
        b.iter(|| {
            let _ = black_box(std::future::poll_fn(|cx| full.poll_ready(cx)).now_or_never());
            black_box(full.call(()).now_or_never())
        })
    });
    g.finish();
}

fn resolve(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (dns, disc, bare, cached) = rt.block_on(async {
        let dns = ha_lab::dns::LabDns::start("north", "127.0.1.53:0".parse().unwrap(), "lab.")
            .await
            .unwrap();
        let ips: Vec<IpAddr> = (11..17).map(|i| IpAddr::from([127, 0, 1, i])).collect();
        dns.set_records("profile.north.lab.", &ips, 30).unwrap();
        let port = dns.addr().port();
        let text = format!(
            r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:{port}"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[dependencies.profile]
port = 80
dns = {{ north = "profile.north.lab." }}
"#
        );
        let topo = Arc::new(Topology::from_toml_str(&text, "bench.toml").unwrap());
        let disc = DnsDiscovery::start(topo, "profile", EventBus::default())
            .await
            .unwrap();
        assert_eq!(disc.current().len(), 6, "the lab DNS answered");
        // The bare library: a hickory resolver to the same server, its cache off like ours.
        let mut ns = NameServerConfig::udp_and_tcp(dns.addr().ip());
        for c in &mut ns.connections {
            c.port = port;
        }
        let build = |cache_size: u64| {
            let mut opts = ResolverOpts::default();
            opts.cache_size = cache_size;
            let mut builder = TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), vec![ns.clone()]),
                TokioRuntimeProvider::new(),
            );
            *builder.options_mut() = opts;
            builder.build().unwrap()
        };
        let bare = build(0);
        // hickory with its own cache on (the TTL is 30 s: every lookup after the first is a hit).
        let cached = build(1024);
        cached.lookup_ip("profile.north.lab.").await.unwrap();
        (dns, disc, bare, cached)
    });
    let mut g = c.benchmark_group("resolve");
    g.bench_function("cached", |b| b.iter(|| black_box(disc.current())));
    g.bench_function("hickory-cache-on", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(cached.lookup_ip("profile.north.lab.").await.unwrap()) })
        })
    });
    g.bench_function("hickory", |b| {
        b.iter(|| {
            rt.block_on(async { black_box(bare.lookup_ip("profile.north.lab.").await.unwrap()) })
        })
    });
    g.finish();
    drop(disc);
    rt.block_on(dns.stop());
}

criterion_group!(benches, pick, stack, resolve);
criterion_main!(benches);
