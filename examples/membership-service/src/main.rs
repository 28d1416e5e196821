//! # membership-service (stub: not built yet)
//!
//! The example membership service (accounts, subscriptions, renewals) that will use every ha-*
//! crate: an axum HTTP API with cache-aside reads (ha-redis), writes with events (ha-mysql,
//! ha-mq), local rate limits (ha-ratelimit), `/metrics`, `/topology`, an admin drain endpoint
//! (`ha_core::Control`) and a `demo` that starts the lab and runs a failover drill. Its issue is
//! not open yet; until then the runnable demo is `cargo run --release -p locality-demo`.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("membership-service is not built yet; run `cargo run --release -p locality-demo`");
    std::process::exit(2);
}
