//! The HTTP API against the real lab stack (Redis + Sentinel, MariaDB + the HA simulator,
//! RocketMQ in two IDCs): every route, every bad input with its status, the admin token, the
//! history consumer, read-your-writes across a Redis failover, and the graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{JSON, TOKEN, call, client, member, raw, stack, start};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_bad_input_admin_history_and_shutdown() {
    let stack = stack().await;
    let mut svc = start(&stack, "bj-a", "").await;
    let c = client();
    let a = svc.addr;
    let auth = format!("Bearer {TOKEN}");

    // Liveness and readiness.
    assert_eq!(
        call(&c, a, "GET", "/healthz", &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = call(&c, a, "GET", "/readyz", &[], b"").await.unwrap();
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Create: 200 with version 1; replace: version 2.
    let r = call(&c, a, "PUT", "/members/42", &[JSON], &member("Zoë", "gold"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j["version"], 1);
    assert_eq!(j["name"], "Zoë");
    assert_eq!(j["expires_at"], "2030-01-01T00:00:00.000000Z");
    let r = call(
        &c,
        a,
        "PUT",
        "/members/42",
        &[JSON],
        &member("Zoë B", "platinum"),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["version"], 2);
    let r = call(&c, a, "GET", "/members/42", &[], b"").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], 2);
    // The lab's replication is semi-synchronous: those commits were acknowledged by a replica.
    {
        use ha_mysql::mysql_async::prelude::Queryable;
        let primary = stack.mariadb().primary();
        let mut admin = stack.mariadb().admin_conn(&primary).await.unwrap();
        let status: Vec<(String, String)> = admin
            .query("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_%'")
            .await
            .unwrap();
        let get = |k: &str| {
            status
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(get("Rpl_semi_sync_master_status"), "ON", "{status:?}");
        assert!(
            get("Rpl_semi_sync_master_yes_tx").parse::<u64>().unwrap() >= 2,
            "{status:?}"
        );
    }
    assert_eq!(r.json()["level"], "platinum");

    // Absent: 404 as JSON.
    let r = call(&c, a, "GET", "/members/7", &[], b"").await.unwrap();
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let r = call(&c, a, "GET", "/members/7/history", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 404);

    // Delete: 204, then 404; a PUT after it continues the versions (3 was the delete).
    let r = call(&c, a, "DELETE", "/members/42", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 204);
    let r = call(&c, a, "GET", "/members/42", &[], b"").await.unwrap();
    assert_eq!(r.status, 404);
    let r = call(
        &c,
        a,
        "PUT",
        "/members/42",
        &[JSON],
        &member("Back", "basic"),
    )
    .await
    .unwrap();
    assert_eq!(r.json()["version"], 4);

    // Bad ids: 400.
    for id in ["%2B5", "-1", "abc", "18446744073709551616", "1.5"] {
        let r = call(&c, a, "GET", &format!("/members/{id}"), &[], b"")
            .await
            .unwrap();
        assert_eq!((r.status, r.code().as_str()), (400, "bad_id"), "{id}");
    }
    // Bad bodies.
    let cases: [(&[u8], u16); 8] = [
        (b"{", 400),
        (b"[1,2]", 400),
        (b"\"x\"", 400),
        (br#"{"name":"a","level":"gold"}"#, 422),
        (
            br#"{"name":"a","level":"gold","expires_at":"2030-01-01T00:00:00Z","x":1}"#,
            422,
        ),
        (
            br#"{"name":"","level":"gold","expires_at":"2030-01-01T00:00:00Z"}"#,
            422,
        ),
        (
            br#"{"name":"a","level":"diamond","expires_at":"2030-01-01T00:00:00Z"}"#,
            422,
        ),
        (
            br#"{"name":"a","level":"gold","expires_at":"next year"}"#,
            422,
        ),
    ];
    for (body, status) in cases {
        let r = call(&c, a, "PUT", "/members/9", &[JSON], body)
            .await
            .unwrap();
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(body));
        r.code();
    }
    // Wrong content type: 415.
    let r = call(
        &c,
        a,
        "PUT",
        "/members/9",
        &[("content-type", "text/plain")],
        &member("a", "gold"),
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    // Too large, declared: 413; streamed (chunked, no length): 413.
    let big = vec![b' '; 17 * 1024];
    let r = call(&c, a, "PUT", "/members/9", &[JSON], &big)
        .await
        .unwrap();
    assert_eq!((r.status, r.code().as_str()), (413, "body_too_large"));
    let mut chunked = b"PUT /members/9 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw(a, &chunked).await, 413);
    // Unknown route 404, wrong method 405, both JSON.
    let r = call(&c, a, "GET", "/nope", &[], b"").await.unwrap();
    assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
    let r = call(&c, a, "POST", "/members/1", &[JSON], b"{}")
        .await
        .unwrap();
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
    // None of the refused PUTs wrote member 9.
    let r = call(&c, a, "GET", "/members/9", &[], b"").await.unwrap();
    assert_eq!(r.status, 404);

    // Admin: 401 without or with a wrong token; drain and undrain are idempotent; 422 for an
    // unknown IDC.
    let body = br#"{"idc":"bj-b"}"#;
    for h in [
        vec![JSON],
        vec![JSON, ("authorization", "Bearer wrong-token-xxxxxx")],
        vec![JSON, ("authorization", TOKEN)],
    ] {
        let r = call(&c, a, "POST", "/admin/drain", &h, body).await.unwrap();
        assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
    }
    let admin = [JSON, ("authorization", auth.as_str())];
    for _ in 0..2 {
        let r = call(&c, a, "POST", "/admin/drain", &admin, body)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["drained"], serde_json::json!(["bj-b"]));
    }
    let topo = call(&c, a, "GET", "/topology", &[], b"")
        .await
        .unwrap()
        .json();
    assert_eq!(topo["drained"], serde_json::json!(["bj-b"]));
    assert_eq!(topo["local_idc"], "bj-a");
    let db = &topo["dependencies"]["db"]["endpoints"][0];
    assert_eq!(db["role"], "primary");
    assert_eq!(db["in_use"], true);
    assert!(db["generation"].as_u64().is_some(), "{topo}");
    let replicas: Vec<_> = topo["dependencies"]["db"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["role"] == "replica")
        .collect();
    assert_eq!(replicas.len(), 2, "{topo}");
    assert!(
        replicas
            .iter()
            .any(|e| e["idc"] == "bj-b" && e["locality"] == "same_region"),
        "{topo}"
    );
    assert!(
        replicas
            .iter()
            .any(|e| e["idc"] == "sh-a" && e["locality"] == "remote"),
        "{topo}"
    );
    let cache = &topo["dependencies"]["cache"]["endpoints"][0];
    assert_eq!(cache["role"], "master");
    for _ in 0..2 {
        let r = call(&c, a, "POST", "/admin/undrain", &admin, body)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["drained"], serde_json::json!([]));
    }
    let r = call(
        &c,
        a,
        "POST",
        "/admin/drain",
        &admin,
        br#"{"idc":"mars-1"}"#,
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.code().as_str()), (422, "unknown_idc"));

    // The history: every version the consumer saw (1, 2, 3 = the delete, 4), in order.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = call(&c, a, "GET", "/members/42/history", &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        if r.json()["versions"] == serde_json::json!([1, 2, 3, 4]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "history incomplete: {}",
            r.json()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rate limits: an instance with a tight per-IP line answers 429 with Retry-After as JSON;
    // the probes are never limited.
    let tight = common::start_with(&stack, "bj-a", |t| {
        assert!(t.contains("rate = \"500r/s\"\nburst = 1000"), "{t}");
        t.replace(
            "rate = \"500r/s\"\nburst = 1000",
            "rate = \"1r/m\"\nburst = 3",
        )
        .replace("instance = \"bj-a-1\"", "instance = \"bj-a-2\"")
    })
    .await;
    let mut limited = None;
    for _ in 0..10 {
        let r = call(&c, tight.addr, "GET", "/members/42", &[], b"")
            .await
            .unwrap();
        if r.status == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    let r = limited.expect("a flood of 10 on burst 3 is limited");
    assert_eq!(r.code(), "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = call(&c, tight.addr, "GET", path, &[], b"").await.unwrap();
        assert_ne!(r.status, 429, "{path} is limited");
    }
    drop(tight);

    // Graceful shutdown with requests in flight: every request sent before it is answered.
    let mut inflight = Vec::new();
    for i in 0..20u64 {
        let c = c.clone();
        inflight.push(tokio::spawn(async move {
            call(
                &c,
                a,
                "PUT",
                &format!("/members/{}", 1000 + i),
                &[JSON],
                &member("x", "basic"),
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let stopping = Instant::now();
    svc.shutdown();
    let mut ok = 0;
    for t in inflight {
        match t.await.unwrap() {
            Ok(r) if r.status == 200 => ok += 1,
            // A request that had not reached the server yet: refused or reset, never a 5xx.
            Ok(r) => assert!(r.status < 500, "{r:?}"),
            Err(_) => {}
        }
    }
    let task = &mut svc.task;
    let out = tokio::time::timeout(Duration::from_secs(15), task).await;
    assert!(out.is_ok(), "the server did not stop within 15 s");
    out.unwrap().unwrap().unwrap();
    assert!(ok > 0, "no request in flight was answered");
    let _took = stopping.elapsed();
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_your_writes_across_redis_failovers() {
    let stack = stack().await;
    let svc = start(&stack, "bj-a", "").await;
    let c = client();
    let a = svc.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let c = c.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
            let mut violations = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = w * 100 + (i % 10);
                i += 1;
                match call(
                    &c,
                    a,
                    "PUT",
                    &format!("/members/{id}"),
                    &[JSON],
                    &member("w", "gold"),
                )
                .await
                {
                    Ok(r) if r.status == 200 => {
                        let v = r.json()["version"].as_u64().unwrap();
                        acked.insert(id, v);
                        // Read it back at once, on another connection of the pool.
                        if let Ok(g) = call(&c, a, "GET", &format!("/members/{id}"), &[], b"").await
                            && g.status == 200
                        {
                            let got = g.json()["version"].as_u64().unwrap();
                            if got < v {
                                violations.push((id, v, got));
                            }
                        }
                    }
                    Ok(r) => {
                        assert!(r.status == 503, "{r:?}");
                        errors += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            (acked, violations, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.redis_failover().await.expect("planned failover");
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack
        .kill_redis_master()
        .await
        .expect("kill -9 of the master");
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = BTreeMap::new();
    let mut errors = 0;
    for w in writers {
        let (acked, violations, e) = w.await.unwrap();
        assert!(
            violations.is_empty(),
            "read-your-writes violated: {violations:?}"
        );
        errors += e;
        all.extend(acked);
    }
    assert!(all.len() >= 20, "too few writes: {}", all.len());
    // Every acknowledged version is still there (or a newer one), from a fresh GET.
    for (id, v) in &all {
        let r = call(&c, a, "GET", &format!("/members/{id}"), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{id}: {r:?}");
        assert!(
            r.json()["version"].as_u64().unwrap() >= *v,
            "{id}: {}",
            r.json()
        );
    }
    eprintln!("ids {} errors {errors}", all.len());
    drop(svc);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_expiry_job_runs_in_one_instance_and_moves_when_it_stops() {
    let stack = stack().await;
    let fast = "";
    let bj = start(&stack, "bj-a", fast).await;
    let sh = start(&stack, "sh-a", fast).await;
    let c = client();
    // Who holds the lease: exactly one of the two, both agree.
    let holder_of = |j: &serde_json::Value| j["job"]["holder"].as_str().map(str::to_string);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let a = call(&c, bj.addr, "GET", "/topology", &[], b"")
            .await
            .unwrap()
            .json();
        let b = call(&c, sh.addr, "GET", "/topology", &[], b"")
            .await
            .unwrap()
            .json();
        let here = [a["job"]["held_here"] == true, b["job"]["held_here"] == true];
        if let (Some(h), Some(h2)) = (holder_of(&a), holder_of(&b))
            && h == h2
            && here.iter().filter(|x| **x).count() == 1
        {
            break h;
        }
        assert!(Instant::now() < deadline, "no single holder: {a} {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A member whose expiry passed is expired by the holder (a new version), with its event.
    let past = br#"{"name":"old","level":"basic","expires_at":"2020-01-01T00:00:00Z"}"#;
    let r = call(&c, bj.addr, "PUT", "/members/500", &[JSON], past)
        .await
        .unwrap();
    assert_eq!(r.json()["version"], 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = call(&c, sh.addr, "GET", "/members/500", &[], b"")
            .await
            .unwrap()
            .json();
        if g["expired"] == true {
            assert_eq!(g["version"], 2, "{g}");
            break;
        }
        assert!(Instant::now() < deadline, "never expired: {g}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The holder dies (its task aborted: no graceful release): the other takes over once the
    // lease's TTL has passed.
    let (survivor, stopped) = if first.starts_with("bj-a") {
        bj.task.abort();
        (&sh, "bj-a")
    } else {
        sh.task.abort();
        (&bj, "sh-a")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = call(&c, survivor.addr, "GET", "/topology", &[], b"")
            .await
            .unwrap()
            .json();
        if j["job"]["held_here"] == true {
            assert!(
                !holder_of(&j).unwrap_or_default().starts_with(stopped),
                "{j}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no takeover: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And it runs the job: another expired member is handled by the survivor.
    let r = call(&c, survivor.addr, "PUT", "/members/501", &[JSON], past)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let g = call(&c, survivor.addr, "GET", "/members/501", &[], b"")
            .await
            .unwrap()
            .json();
        if g["expired"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never expired after the takeover: {g}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let h = call(&c, survivor.addr, "GET", "/members/500/history", &[], b"")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut h = h.json();
    while h["versions"] != serde_json::json!([1, 2]) {
        assert!(Instant::now() < deadline, "history: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        h = call(&c, survivor.addr, "GET", "/members/500/history", &[], b"")
            .await
            .unwrap()
            .json();
    }
    drop(bj);
    stack.stop().await;
}

/// The binary itself: `serve --config FILE`, then SIGTERM with requests in flight: they are
/// answered and the process exits 0 within 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_requests_in_flight_and_exits_zero() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let stack = stack().await;
    let dir = std::env::temp_dir().join(format!("ms-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A fixed port of bj-a's service address (the test group runs one such test at a time).
    let listen: std::net::SocketAddr = "127.0.1.100:18391".parse().unwrap();
    let path = dir.join("membership-service.toml");
    std::fs::write(&path, stack.service_config("bj-a", listen, TOKEN)).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_membership-service"))
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = call(&c, listen, "GET", "/readyz", &[], b"").await
            && r.status == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the binary never became ready");
        assert!(child.try_wait().unwrap().is_none(), "the binary exited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A steady load from 8 callers until the process is gone; each call's start and end kept.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..8u64 {
        let (c, stop) = (c.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut calls = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let path = format!("/members/{}", 2000 + w * 1000 + i % 100);
                let r = call(&c, listen, "PUT", &path, &[JSON], &member("t", "gold")).await;
                calls.push((started, Instant::now(), r.map(|r| r.status)));
                i += 1;
                if calls.last().is_some_and(|c| c.2.is_err()) {
                    break;
                }
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    let term_at = Instant::now();
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exited within 15 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut straddling, mut total) = (0, 0);
    for t in load {
        for (started, ended, r) in t.await.unwrap() {
            total += 1;
            if let Ok(code) = r {
                assert!(code < 500, "a {code} during the shutdown");
                if started < term_at && ended > term_at && code == 200 {
                    straddling += 1;
                }
            }
        }
    }
    // Calls in flight when SIGTERM arrived were answered, not cut off.
    assert!(
        straddling > 0,
        "no call straddled the SIGTERM ({total} calls)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    stack.stop().await;
}
