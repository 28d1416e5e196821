//! Start-up against the real lab: it works, and every bad input is a typed error within the
//! start-up bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ha_lab::redis::{RedisLab, RedisLabOptions};
use ha_redis::HaRedis;
use ha_redis::redis::AsyncCommands;
use tokio::time::Instant;

mod common;

const BOUND: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sentinel_reachable_is_typed_and_bounded() {
    // Nothing listens on these (a blackholed address would hit the bound instead: also tested).
    let sentinels = [
        "127.0.1.251:1".parse().unwrap(),
        "127.0.2.251:1".parse().unwrap(),
    ];
    let start = Instant::now();
    let err = HaRedis::builder(sentinels, "members")
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap_err();
    assert!(err.is_no_sentinel_reachable(), "{err}");
    assert!(err.to_string().contains("127.0.1.251:1"), "{err}");
    assert!(start.elapsed() <= BOUND + Duration::from_millis(500));
    // An address that never answers: a listener that never accepts a RESP exchange.
    let silent = std::net::TcpListener::bind("127.0.1.252:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let start = Instant::now();
    let err = HaRedis::builder([addr], "members")
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap_err();
    assert!(
        err.is_no_sentinel_reachable() || matches!(err, ha_redis::StartupError::Timeout { .. }),
        "{err}"
    );
    assert!(start.elapsed() <= BOUND + Duration::from_millis(500));
    let err = HaRedis::builder(Vec::new(), "members")
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, ha_redis::StartupError::Config(_)), "{err}");
    // A zero interval or bound is refused by name, before any task starts (a zero interval
    // would otherwise kill the follower task).
    let err = HaRedis::builder([addr], "members")
        .poll_interval(Duration::ZERO)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ha_redis::StartupError::Config(m) if m.contains("poll_interval")),
        "{err}"
    );
    let err = HaRedis::builder([addr], "members")
        .timeout(Duration::ZERO)
        .build()
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("timeout must be more than 0"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_start_unknown_name_and_wrong_passwords() {
    let mut opts = RedisLabOptions::default();
    opts.redis_password = Some("redis-secret".into());
    opts.sentinel_password = Some("sentinel-secret".into());
    let lab = RedisLab::start(opts).await.unwrap();
    let sentinels = lab.sentinel_addrs();

    // Right credentials: it starts, writes and reads.
    let client = HaRedis::builder(sentinels.clone(), "members")
        .redis_auth(None, Some("redis-secret"))
        .sentinel_auth(None, Some("sentinel-secret"))
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap();
    assert_eq!(client.current_master().unwrap().addr, lab.nodes[0].addr);
    let mut m = client.master();
    let _: () = m.set("startup:k", "v").await.unwrap();
    let v: String = m.get("startup:k").await.unwrap();
    assert_eq!(v, "v");
    let n: i64 = client
        .master()
        .query(ha_redis::redis::cmd("INCR").arg("startup:n"))
        .await
        .unwrap();
    assert_eq!(n, 1);
    // An application error passes through as redis's own error.
    let err = m.incr::<_, _, i64>("startup:k", 1).await.unwrap_err();
    assert!(ha_redis::error::ha_error(&err).is_none(), "{err}");

    // Unknown master name.
    let start = Instant::now();
    let err = HaRedis::builder(sentinels.clone(), "nope")
        .redis_auth(None, Some("redis-secret"))
        .sentinel_auth(None, Some("sentinel-secret"))
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap_err();
    assert!(err.is_unknown_master(), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(start.elapsed() <= BOUND);

    // Wrong sentinel password.
    let start = Instant::now();
    let err = HaRedis::builder(sentinels.clone(), "members")
        .redis_auth(None, Some("redis-secret"))
        .sentinel_auth(None, Some("wrong"))
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ha_redis::StartupError::SentinelAuth { .. }),
        "{err}"
    );
    assert!(start.elapsed() <= BOUND);

    // Wrong Redis password.
    let start = Instant::now();
    let err = HaRedis::builder(sentinels.clone(), "members")
        .redis_auth(None, Some("wrong"))
        .sentinel_auth(None, Some("sentinel-secret"))
        .startup_timeout(BOUND)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, ha_redis::StartupError::RedisAuth { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains(&lab.nodes[0].addr.to_string()),
        "{err}"
    );
    assert!(start.elapsed() <= BOUND);
}

/// A client in bj-b built from the lab's topology with `settings` for the `cache` dependency.
async fn client_from_topology(lab: &RedisLab, settings: &str) -> (ha_core::HaContext, HaRedis) {
    let ctx = ha_core::HaContext::new(common::topology(lab, "bj-b", settings));
    let client = HaRedis::builder_from_context(&ctx, "cache")
        .await
        .unwrap()
        .build()
        .await
        .unwrap();
    (ctx, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_topology_dependency() {
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let (ctx, client) = client_from_topology(&lab, "timeout_ms = 800").await;
    let m = ctx.master_watch("cache").current().unwrap();
    assert_eq!(m.addr, lab.nodes[0].addr);
    assert_eq!(m.idc_name(), "bj-a");
    let _: () = client.master().set("topo:k", 1).await.unwrap();
}

/// True when `line` of a `CLIENT LIST` is a client connected from `ip`.
fn is_from(line: &str, ip: &str) -> bool {
    let prefix = format!("addr={ip}:");
    line.split(' ').any(|f| f.starts_with(&prefix))
}

/// How many clients of `reply` (a `CLIENT LIST`) connect from `ip`.
fn clients_from(reply: &ha_lab::redis::Resp, ip: &str) -> usize {
    reply
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| is_from(l, ip))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_comes_from_the_source_address() {
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    let source = "127.0.2.77";
    let (_ctx, client) =
        client_from_topology(&lab, &format!("source_address = \"{source}\"")).await;
    let _: () = client.master().set("src:k", 1).await.unwrap();
    let replicas = client.replicas().unwrap();
    let deadline = Instant::now() + BOUND;
    // The replica reads go to bj-b's replica once the replica set is published.
    loop {
        let r: Result<Option<i64>, _> = replicas.clone().get("src:k").await;
        if r.is_ok() || Instant::now() >= deadline {
            r.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let master = lab.nodes[0].addr;
    let list = lab.redis_cmd(master, &["CLIENT", "LIST"]).await.unwrap();
    assert!(clients_from(&list, source) >= 1, "master: {list:?}");
    for r in &lab.nodes[1..] {
        let list = lab.redis_cmd(r.addr, &["CLIENT", "LIST"]).await.unwrap();
        assert!(
            clients_from(&list, source) >= 1,
            "replica {}: {list:?}",
            r.addr
        );
    }
    // Each sentinel: the command connection and the event subscription (made by a task of
    // its own, so waited for).
    for s in lab.sentinel_addrs() {
        let deadline = Instant::now() + BOUND;
        loop {
            let list = lab.sentinel_cmd(s, &["CLIENT", "LIST"]).await.unwrap();
            if clients_from(&list, source) >= 2 {
                break;
            }
            assert!(Instant::now() < deadline, "sentinel {s}: {list:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Nothing of ours from anywhere else: every client of the master is ours (from the
    // source), a replica's link (from its own address) or a sentinel's.
    let list = lab.redis_cmd(master, &["CLIENT", "LIST"]).await.unwrap();
    let ours_elsewhere = list
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|l| !is_from(l, source))
        .filter(|l| l.contains("cmd=set") || l.contains("cmd=role"))
        .count();
    assert_eq!(ours_elsewhere, 0, "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_address_of_another_host_is_a_typed_error() {
    let lab = RedisLab::start(RedisLabOptions::default()).await.unwrap();
    for (ip, why) in [
        ("192.0.2.1", "cannot be bound"),
        ("::1", "different IP families"),
    ] {
        let start = Instant::now();
        let err = common::build(&lab)
            .source_address(ip.parse().unwrap())
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, ha_redis::StartupError::Config(_)), "{err}");
        assert!(err.to_string().contains(ip), "{err}");
        assert!(err.to_string().contains(why), "{err}");
        assert!(start.elapsed() <= BOUND);
    }
}
