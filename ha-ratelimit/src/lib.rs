//! # ha-ratelimit
//!
//! Local, keyed rate limits that behave exactly like nginx's `limit_req` (`rate`, `burst`,
//! `delay=N`, `nodelay`, several lines per request), sized by IDC capacity shares from ha-core's
//! topology, with debounced alerts, hot reload, bounded memory, and a `Clone` tower layer.
//!
//! - [`config`]: the limits as serde data (`[[limit]] name, key, rate = "10r/s", burst, delay`).
//! - [`Limiter`]: the decision ([`Decision`]: allow, delay, reject with `retry_after`), reload,
//!   capacity shares, idle-key sweeping.
//! - [`layer`]: [`RateLimitLayer`] / [`RateLimit`], returning [`ha_core::HaError::RateLimited`].
//! - `axum` (feature `axum`): 429 with `Retry-After`.
//! - `cluster` (feature `redis`): the same lines as a cluster-wide limit kept in Redis (one Lua
//!   script, Redis's clock), with the local limiter as the fallback whenever Redis does not
//!   answer in time, and its tower layer.
//!
//! A limit's keys live three to a 64-byte cache line (lock, key hashes and state together, 20
//! bytes a key), allocated when the limit is built like an nginx zone: about 47 bytes per key of
//! `max_keys`, whatever the keys' length. A request's lines are checked and charged under all
//! their locks at once, so concurrent requests get exactly what serial nginx gives. See the
//! README for the layout and the measured figures.
//!
//! ```
//! use ha_ratelimit::{Decision, Key, Limiter, RateLimitConfig};
//! use governor::clock::FakeRelativeClock;
//! use std::time::Duration;
//!
//! // limit_req zone=one burst=8 delay=4;  (rate=10r/s)
//! let cfg = RateLimitConfig::from_toml_str(r#"
//! [[limit]]
//! name = "one"
//! key = "client_ip"
//! rate = "10r/s"
//! burst = 8
//! delay = 4
//! "#).unwrap();
//! let limiter = Limiter::builder(cfg).clock(FakeRelativeClock::default()).build().unwrap();
//! let k = Key::str("10.0.0.1");
//! let got: Vec<Decision> = (0..10).map(|_| limiter.check(k)).collect();
//! assert_eq!(got[..5], [Decision::Allow; 5]);
//! assert_eq!(got[5], Decision::Delay(Duration::from_millis(100)));
//! assert_eq!(got[8], Decision::Delay(Duration::from_millis(400)));
//! assert!(got[9].is_reject());
//! ```
#![forbid(unsafe_code)]

mod alert;
mod clock;
pub mod config;
mod key;
mod keys;
pub mod layer;
mod limiter;
mod rate;
mod zone;

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "redis")]
pub mod cluster;

pub use alert::{Alert, AlertHook, AlertKind};
pub use clock::{DefaultClock, TokioClock};
pub use config::{AlertConfig, ConfigError, LimitConfig, RateLimitConfig, Share};
pub use key::{Key, MAX_KEY_LEN};
pub use keys::{KeyError, Keys, key_fn};
pub use layer::{KeyFn, RateLimit, RateLimitLayer, Rejected};
pub use limiter::{Decision, Limiter, LimiterBuilder, share_rate};
pub use rate::{Rate, RateParseError};

/// `Retry-After` in whole seconds for a `retry_after`: rounded up, at least 1.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(ha_ratelimit::retry_after_secs(Duration::from_millis(1)), 1);
/// assert_eq!(ha_ratelimit::retry_after_secs(Duration::from_millis(1001)), 2);
/// assert_eq!(ha_ratelimit::retry_after_secs(Duration::ZERO), 1);
/// ```
pub fn retry_after_secs(retry_after: std::time::Duration) -> u64 {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    secs.max(1)
}
