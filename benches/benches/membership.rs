//! End to end: `GET /members/1` served from Redis by the example membership service (the whole
//! stack: axum with its middleware and rate limiter, `ha-redis` through Sentinel, `ha-mysql`,
//! `ha-mq`, `ha-core`) against the same GET served by a bare axum server whose handler uses
//! bare clients: a `redis::aio::MultiplexedConnection` to the current Redis master and a
//! `mysql_async::Pool` to the primary (only used on a miss, which the bench never has). The
//! issue's target is at most 1.10× at p50.
//!
//! Run: `cargo bench -p benches --bench membership -- --warm-up-time 2 --measurement-time 5`
//! (the first run builds the whole stack in release; the lab stack, with RocketMQ, is started
//! in-process and stopped at the end, like the service's tests do).
//!
//! Both servers listen in this process on an IDC address (`127.0.1.100` the service,
//! `127.0.1.101` the bare one) and are called through the same hyper-util legacy client
//! (keep-alive, nodelay), one request at a time. Before the measurement one member is PUT, so
//! each GET is one `MGET m:1 ms:gtid` on the Redis master, the entry (`"<version>|<json>"`)
//! parsed and answered as JSON, in both servers. The service's rate limits are raised so that
//! a sequential client is never limited (the limiter still checks every request).
//!
//! Criterion reports the mean per GET (`ha_stack` and `bare`). Each request's latency is also
//! recorded; the summary at the end (stderr) gives p50, p99 and mean of both from criterion's
//! runs, then from interleaved rounds (`ROUNDS` rounds of `PER_ROUND` requests to each server,
//! one to each in turn, so a noisy neighbour hits both alike), and the ratios ours / bare.
//! `-- nomatch` skips criterion and prints only the interleaved rounds.
#![forbid(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_types,
    missing_docs
)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use criterion::Criterion;
use ha_lab::mariadb::{APP_PASSWORD, APP_USER};
use ha_lab::stack::{SERVICE_DATABASE, Stack, StackOptions};
use ha_mysql::mysql_async;
use ha_mysql::mysql_async::prelude::Queryable;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use membership_service::{Service, ServiceConfig};

const TOKEN: &str = "bench-admin-token-0123";
/// Interleaved rounds after criterion, and requests per server in each.
const ROUNDS: usize = 7;
const PER_ROUND: usize = 2000;

type HttpClient = Client<HttpConnector, Full<Bytes>>;
type Samples = Arc<Mutex<Vec<Duration>>>;

fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(c)
}

/// One request; panics unless the answer is 200 (a 429 or 503 would measure something else).
async fn call(c: &HttpClient, method: &str, uri: &str, body: &[u8]) -> Bytes {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(15), c.request(req))
        .await
        .expect("an answer within 15 s")
        .expect("an answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        status,
        StatusCode::OK,
        "{method} {uri}: {}",
        String::from_utf8_lossy(&body)
    );
    body
}

async fn get(c: &HttpClient, uri: &str) -> Duration {
    let t = Instant::now();
    black_box(call(c, "GET", uri, b"").await);
    t.elapsed()
}

// === the bare server ===

#[derive(Clone)]
struct Bare {
    redis: redis::aio::MultiplexedConnection,
    db: mysql_async::Pool,
}

const SELECT_MEMBER: &str = "SELECT name, level, DATE_FORMAT(expires_at, '%Y-%m-%dT%H:%i:%s.%fZ'), \
     version, deleted, expired FROM members WHERE id = ?";

type Row = (String, String, String, u64, bool, bool);

fn unavailable(e: impl std::fmt::Display) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
}

/// What the service's GET does, with bare clients: the entry from Redis, else the primary.
async fn bare_get(State(b): State<Bare>, Path(id): Path<u64>) -> Response {
    let key = format!("m:{id}");
    let mut conn = b.redis.clone();
    let cached: redis::RedisResult<(Option<String>, Option<String>)> = redis::cmd("MGET")
        .arg(&key)
        .arg("ms:gtid")
        .query_async(&mut conn)
        .await;
    if let Ok((Some(entry), _)) = cached
        && let Some((_, json)) = entry.split_once('|')
        && let Ok(mut v) = serde_json::from_str::<serde_json::Value>(json)
    {
        let Some(obj) = v.as_object_mut() else {
            return unavailable("not an object");
        };
        if obj
            .remove("state")
            .and_then(|s| s.as_str().map(str::to_owned))
            == Some("deleted".into())
        {
            return StatusCode::NOT_FOUND.into_response();
        }
        return Json(v).into_response();
    }
    let mut c = match b.db.get_conn().await {
        Ok(c) => c,
        Err(e) => return unavailable(e),
    };
    match c.exec_first::<Row, _, _>(SELECT_MEMBER, (id,)).await {
        Ok(Some((name, level, expires_at, version, false, expired))) => Json(serde_json::json!({
            "id": id, "name": name, "level": level, "expires_at": expires_at,
            "version": version, "expired": expired,
        }))
        .into_response(),
        Ok(_) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => unavailable(e),
    }
}

// === the summary ===

struct Stats {
    p50: Duration,
    p99: Duration,
    mean: Duration,
    n: usize,
}

fn stats(samples: &[Duration]) -> Option<Stats> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    let total: Duration = s.iter().sum();
    Some(Stats {
        p50: at(0.50),
        p99: at(0.99),
        mean: total / s.len() as u32,
        n: s.len(),
    })
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(what: &str, ours: &[Duration], bare: &[Duration]) {
    let (Some(o), Some(b)) = (stats(ours), stats(bare)) else {
        eprintln!("{what}: no samples");
        return;
    };
    eprintln!(
        "{what}: ha_stack p50 {:.1} µs p99 {:.1} µs mean {:.1} µs (n {}); \
         bare p50 {:.1} µs p99 {:.1} µs mean {:.1} µs (n {})",
        us(o.p50),
        us(o.p99),
        us(o.mean),
        o.n,
        us(b.p50),
        us(b.p99),
        us(b.mean),
        b.n
    );
    eprintln!(
        "{what}: ratio ours / bare: p50 {:.3}x, p99 {:.3}x, mean {:.3}x (target p50 <= 1.10x)",
        us(o.p50) / us(b.p50),
        us(o.p99) / us(b.p99),
        us(o.mean) / us(b.mean)
    );
}

// === main ===

/// Raises the generated config's rate limits out of a sequential client's reach.
fn unlimited(text: String) -> String {
    text.replace("rate = \"500r/s\"", "rate = \"1000000r/s\"")
        .replace("burst = 1000\n", "burst = 1000000\n")
        .replace("burst = 2000", "burst = 1000000")
        .replace("capacity_rps = 2000", "capacity_rps = 1000000")
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stack = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(180),
            Stack::start(StackOptions::default()),
        )
        .await
        .expect("the stack starts within 180 s")
        .expect("the stack starts")
    });

    // The service, as its tests start it.
    let listen: SocketAddr = "127.0.1.100:0".parse().unwrap();
    let text = unlimited(stack.service_config("bj-a", listen, TOKEN));
    let cfg = ServiceConfig::from_toml_str(&text, "bench.toml").expect("config");
    let (ours_addr, ours_stop, ours_task) = rt.block_on(async {
        let service = tokio::time::timeout(Duration::from_secs(60), Service::start(cfg, None))
            .await
            .expect("the service starts within 60 s")
            .expect("the service starts");
        let listener = service.bind(Some(listen)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(service.serve(listener, async move {
            let _ = rx.await;
        }));
        (addr, tx, task)
    });

    // The bare server: the current Redis master, a pool to the primary.
    let (bare_addr, bare_stop, bare_task, pool) = rt.block_on(async {
        let master = stack.redis().master().await.unwrap();
        let redis = redis::Client::open(format!("redis://{master}/"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let primary = stack.mariadb().primary();
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname(primary.addr.ip().to_string())
            .tcp_port(primary.addr.port())
            .user(Some(APP_USER))
            .pass(Some(APP_PASSWORD))
            .db_name(Some(SERVICE_DATABASE));
        let db = mysql_async::Pool::new(opts);
        let mut c = db.get_conn().await.unwrap();
        c.query_drop("SELECT 1").await.unwrap();
        drop(c);
        let app = axum::Router::new()
            .route("/members/{id}", axum::routing::get(bare_get))
            .with_state(Bare {
                redis,
                db: db.clone(),
            });
        let listener = tokio::net::TcpListener::bind("127.0.1.101:0")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await
        });
        (addr, tx, task, db)
    });

    let http = client();
    let ours_uri = format!("http://{ours_addr}/members/1");
    let bare_uri = format!("http://{bare_addr}/members/1");
    rt.block_on(async {
        let member =
            br#"{"name":"a","level":"gold","expires_at":"2030-01-01T00:00:00Z"}"#.as_slice();
        call(&http, "PUT", &ours_uri, member).await;
        // Both answer the member from the entry the PUT wrote (and open their connections).
        let a: serde_json::Value =
            serde_json::from_slice(&call(&http, "GET", &ours_uri, b"").await).unwrap();
        let b: serde_json::Value =
            serde_json::from_slice(&call(&http, "GET", &bare_uri, b"").await).unwrap();
        assert_eq!(a, b, "the two servers answer the same member");
        eprintln!("GET /members/1 answers {a}");
    });

    let mut criterion = Criterion::default().configure_from_args();
    let recorded: [(&str, &str, Samples); 2] = [
        ("ha_stack", ours_uri.as_str(), Samples::default()),
        ("bare", bare_uri.as_str(), Samples::default()),
    ];
    {
        let mut group = criterion.benchmark_group("membership_get");
        for (name, uri, samples) in &recorded {
            group.bench_function(*name, |b| {
                b.to_async(&rt).iter_custom(|iters| {
                    let (http, samples) = (http.clone(), Arc::clone(samples));
                    async move {
                        let mut lat = Vec::with_capacity(iters as usize);
                        let start = Instant::now();
                        for _ in 0..iters {
                            lat.push(get(&http, uri).await);
                        }
                        let total = start.elapsed();
                        samples.lock().unwrap().extend(lat);
                        total
                    }
                });
            });
        }
        group.finish();
    }
    criterion.final_summary();

    // Interleaved rounds: both see the same neighbours.
    let (mut ours, mut bare) = (Vec::new(), Vec::new());
    let mut round_ratios = Vec::new();
    rt.block_on(async {
        for _ in 0..ROUNDS {
            let (mut o, mut b) = (Vec::with_capacity(PER_ROUND), Vec::with_capacity(PER_ROUND));
            // One request to each in turn, the first of each pair alternating.
            for i in 0..PER_ROUND {
                if i % 2 == 0 {
                    o.push(get(&http, &ours_uri).await);
                    b.push(get(&http, &bare_uri).await);
                } else {
                    b.push(get(&http, &bare_uri).await);
                    o.push(get(&http, &ours_uri).await);
                }
            }
            if let (Some(so), Some(sb)) = (stats(&o), stats(&b)) {
                round_ratios.push(us(so.p50) / us(sb.p50));
            }
            ours.extend(o);
            bare.extend(b);
        }
    });

    eprintln!();
    report(
        "criterion runs",
        &recorded[0].2.lock().unwrap(),
        &recorded[1].2.lock().unwrap(),
    );
    report(&format!("interleaved {ROUNDS}x{PER_ROUND}"), &ours, &bare);
    round_ratios.sort_by(f64::total_cmp);
    eprintln!(
        "interleaved: p50 ratio per round {}; median {:.3}x",
        round_ratios
            .iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(" "),
        round_ratios[round_ratios.len() / 2]
    );

    rt.block_on(async {
        let _ = ours_stop.send(());
        let _ = bare_stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(15), ours_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), bare_task).await;
        let _ = pool.disconnect().await;
        drop(http);
        stack.stop().await;
    });
}
