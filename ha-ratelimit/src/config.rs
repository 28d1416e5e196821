//! Limits as plain serde data, validated with errors that name the field and the value.
//!
//! ```toml
//! max_keys = 100000          # per limit; default 100000
//! dry_run = false            # nginx `limit_req_dry_run`; default false
//! idle_sweep = "10s"         # how often `Limiter::spawn_sweeper` drops drained keys; default "10s"
//!
//! [alerts]
//! interval = "10s"           # at most one alert per (limit, kind) per interval; default "10s"
//! near_capacity = 0.8        # alert when an IDC share is this full; default 0.8
//! window = "1s"              # the window the share's load is measured over; default "1s"
//!
//! [[limit]]                  # limit_req_zone $binary_remote_addr rate=10r/s; limit_req burst=20 delay=5;
//! name = "per_ip"
//! key = "client_ip"          # handed to your key function; the name of the request attribute
//! rate = "10r/s"
//! burst = 20
//! delay = 5
//!
//! [[limit]]                  # 80% of bj-a's capacity, split over this service's instances
//! name = "idc_share"
//! key = "server"
//! share = { idc = "bj-a", fraction = 0.8 }
//! burst = 100
//! nodelay = true
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::rate::Rate;

/// The most limit lines one limiter applies to a request (nginx has no such limit; this one keeps
/// the per-request key table on the stack).
pub const MAX_LINES: usize = 16;

/// The largest `max_keys` accepted (at the cap, about 650 MB of key state per limit: a table of
/// 256 MB, the most lines a table has, and the keys beyond three per line in the overflow store).
pub const MAX_KEYS: usize = 16 * 1024 * 1024;

/// The largest `burst` (and `delay`) accepted, in requests.
pub const MAX_BURST: u64 = 1_000_000_000;

/// The whole rate-limit configuration of one limiter (one nginx `location`'s `limit_req` lines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimitConfig {
    /// The most keys each limit tracks (an nginx zone's size, counted in keys). Default 100000,
    /// at most [`MAX_KEYS`]. Like an nginx zone, each limit's table is allocated when the limit
    /// is built: a 64-byte line of three keys per 1.5 keys of the cap (rounded up to 1/8 of an
    /// octave: 4.7 MB at the default), plus 32 bytes for each key that overflows a full line
    /// (about 6% of them at the cap). Keys are kept as a fixed-size hash, so this bound holds in
    /// bytes whatever the keys' length.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Count and alert as usual, but never reject or delay (nginx `limit_req_dry_run on`).
    /// Default false.
    #[serde(default)]
    pub dry_run: bool,
    /// How often the background sweeper drops drained keys. Default 10 s.
    #[serde(default = "default_sweep", with = "duration_str")]
    pub idle_sweep: Duration,
    /// Alerting. Defaults: interval 10 s, near_capacity 0.8, window 1 s.
    #[serde(default)]
    pub alerts: AlertConfig,
    /// The limit lines, checked in order; a request must pass every one. Written `[[limit]]`.
    #[serde(default, rename = "limit")]
    pub limits: Vec<LimitConfig>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            max_keys: default_max_keys(),
            dry_run: false,
            idle_sweep: default_sweep(),
            alerts: AlertConfig::default(),
            limits: Vec::new(),
        }
    }
}

impl RateLimitConfig {
    /// A configuration with these lines and every other setting at its default.
    pub fn with_limits(limits: Vec<LimitConfig>) -> Self {
        RateLimitConfig {
            limits,
            ..RateLimitConfig::default()
        }
    }

    /// Parses and validates TOML text.
    ///
    /// ```
    /// let cfg = ha_ratelimit::RateLimitConfig::from_toml_str(r#"
    /// [[limit]]
    /// name = "per_ip"
    /// key = "client_ip"
    /// rate = "10r/s"
    /// burst = 5
    /// nodelay = true
    /// "#).unwrap();
    /// assert_eq!(cfg.limits[0].burst, 5);
    /// ```
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: RateLimitConfig =
            toml::from_str(text).map_err(|e| ConfigError::new("", "", e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the error names the first bad field and its value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate(self).map(|_| ())
    }
}

/// Alert settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct AlertConfig {
    /// At most one alert per (limit, kind) per interval. Default 10 s.
    #[serde(default = "default_alert_interval", with = "duration_str")]
    pub interval: Duration,
    /// Alert when a share limit's measured load reaches this fraction of its rate. Default 0.8.
    #[serde(default = "default_near")]
    pub near_capacity: f64,
    /// The window over which a share limit's load is measured. Default 1 s.
    #[serde(default = "default_window", with = "duration_str")]
    pub window: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            interval: default_alert_interval(),
            near_capacity: default_near(),
            window: default_window(),
        }
    }
}

/// One limit line: nginx's `limit_req_zone` and `limit_req` together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitConfig {
    /// The limit's name (the nginx zone name); unique, used in metrics and alerts.
    pub name: String,
    /// What the key function is asked for (`client_ip`, `member_id`, `route`, `server`, ...).
    pub key: String,
    /// A fixed rate, `"10r/s"` or `"600r/m"`. Exactly one of `rate` and `share`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// A share of an IDC's capacity. Exactly one of `rate` and `share`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// Excess requests allowed beyond the rate (nginx `burst`). Default 0.
    #[serde(default)]
    pub burst: u64,
    /// How many excess requests pass at once before holding starts (nginx `delay=N`).
    /// Default 0: every excess request is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<u64>,
    /// No excess request is held (nginx `nodelay`). Default false.
    #[serde(default)]
    pub nodelay: bool,
}

impl LimitConfig {
    /// A line with a fixed rate, no burst, every excess request held.
    ///
    /// ```
    /// use ha_ratelimit::{LimitConfig, Rate};
    /// let line = LimitConfig::new("per_ip", "client_ip", Rate::per_second(10)).burst(5).nodelay();
    /// assert!(line.nodelay);
    /// ```
    pub fn new(name: impl Into<String>, key: impl Into<String>, rate: Rate) -> Self {
        LimitConfig {
            name: name.into(),
            key: key.into(),
            rate: Some(rate),
            share: None,
            burst: 0,
            delay: None,
            nodelay: false,
        }
    }

    /// A line whose rate is a share of an IDC's capacity.
    pub fn share(name: impl Into<String>, key: impl Into<String>, share: Share) -> Self {
        LimitConfig {
            rate: None,
            share: Some(share),
            ..LimitConfig::new(name, key, Rate::per_second(1))
        }
    }

    /// Sets `burst`.
    #[must_use]
    pub fn burst(mut self, burst: u64) -> Self {
        self.burst = burst;
        self
    }

    /// Sets `delay=N`.
    #[must_use]
    pub fn delay(mut self, delay: u64) -> Self {
        self.delay = Some(delay);
        self.nodelay = false;
        self
    }

    /// Sets `nodelay`.
    #[must_use]
    pub fn nodelay(mut self) -> Self {
        self.nodelay = true;
        self.delay = None;
        self
    }
}

/// A share of an IDC's capacity: rate = `capacity_rps(idc) × fraction / instances`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// The IDC whose `capacity_rps` (from ha-core's topology) is shared.
    pub idc: String,
    /// The fraction of the IDC's capacity this limit allows, in (0, 1].
    pub fraction: f64,
}

/// A configuration value that was refused: which field, what value, why, and for a limit line's
/// field, which `[[limit]]` (its index and name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    field: String,
    value: String,
    reason: String,
    /// The `[[limit]]` the field belongs to: its index and name (empty when it has none).
    limit: Option<(usize, String)>,
}

impl ConfigError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
            limit: None,
        }
    }

    /// The same error, said to be about the `[[limit]]` at `index` named `name`.
    pub(crate) fn in_limit(mut self, index: usize, name: impl Into<String>) -> Self {
        self.limit = Some((index, name.into()));
        self
    }

    /// The field, e.g. `limit[1].rate`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The refused value as written.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// Why it was refused.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// The name of the `[[limit]]` the refused field belongs to (`None` for a setting outside
    /// the limit lines; `Some("")` for a line without a name).
    pub fn limit(&self) -> Option<&str> {
        self.limit.as_ref().map(|(_, name)| name.as_str())
    }

    /// The index of the `[[limit]]` the refused field belongs to, counted from 0 in the order
    /// written.
    pub fn limit_index(&self) -> Option<usize> {
        self.limit.as_ref().map(|(i, _)| *i)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid rate-limit config: ")?;
        if let Some((i, name)) = &self.limit {
            write!(f, "limit[{i}] {name:?}: ")?;
        }
        if self.field.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{} = {:?}: {}", self.field, self.value, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

// === validated ===

/// Where a line's rate comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RateSource {
    Fixed(Rate),
    Share(Share),
}

/// A validated line, before its rate is derived.
#[derive(Debug, Clone)]
pub(crate) struct LineSpec {
    pub name: Arc<str>,
    pub key: Arc<str>,
    pub source: RateSource,
    /// `burst × 1000` (nginx `limit->burst`).
    pub burst_m: u64,
    /// `delay × 1000`; `u64::MAX` for `nodelay`.
    pub delay_m: u64,
}

pub(crate) fn validate(cfg: &RateLimitConfig) -> Result<Vec<LineSpec>, ConfigError> {
    if cfg.max_keys == 0 {
        return Err(ConfigError::new("max_keys", 0, "must be at least 1"));
    }
    if cfg.max_keys > MAX_KEYS {
        return Err(ConfigError::new(
            "max_keys",
            cfg.max_keys,
            format!("must be at most {MAX_KEYS} (the key table is allocated up front)"),
        ));
    }
    if cfg.idle_sweep.is_zero() {
        return Err(ConfigError::new("idle_sweep", "0s", "must be positive"));
    }
    let a = &cfg.alerts;
    if a.interval.is_zero() {
        return Err(ConfigError::new(
            "alerts.interval",
            "0s",
            "must be positive",
        ));
    }
    if a.window.is_zero() {
        return Err(ConfigError::new("alerts.window", "0s", "must be positive"));
    }
    if !(a.near_capacity > 0.0 && a.near_capacity <= 1.0) {
        return Err(ConfigError::new(
            "alerts.near_capacity",
            a.near_capacity,
            "must be in (0, 1]",
        ));
    }
    if cfg.limits.len() > MAX_LINES {
        return Err(ConfigError::new(
            "limit",
            format!("{} lines", cfg.limits.len()),
            format!("at most {MAX_LINES} limit lines"),
        ));
    }
    let mut out: Vec<LineSpec> = Vec::with_capacity(cfg.limits.len());
    for (i, l) in cfg.limits.iter().enumerate() {
        let spec = validate_line(i, l, &out).map_err(|e| e.in_limit(i, &l.name))?;
        out.push(spec);
    }
    Ok(out)
}

/// One `[[limit]]`, given the lines before it (for duplicate names).
fn validate_line(i: usize, l: &LimitConfig, before: &[LineSpec]) -> Result<LineSpec, ConfigError> {
    let f = |name: &str| format!("limit[{i}].{name}");
    if l.name.trim().is_empty() {
        return Err(ConfigError::new(f("name"), &l.name, "must not be empty"));
    }
    if before.iter().any(|o| *o.name == *l.name) {
        return Err(ConfigError::new(f("name"), &l.name, "duplicate limit name"));
    }
    if l.key.trim().is_empty() {
        return Err(ConfigError::new(f("key"), &l.key, "must not be empty"));
    }
    let source = match (&l.rate, &l.share) {
        // Rate::per_second(0) and Rate::per_minute(0) are values of the type (so that they
        // can be const); a zero rate would divide by zero in the hold and the wait.
        (Some(r), None) if r.milli_per_sec() == 0 => {
            return Err(ConfigError::new(
                f("rate"),
                r,
                "the rate must be positive (at least 1r/m)",
            ));
        }
        (Some(r), None) => RateSource::Fixed(*r),
        (None, Some(s)) => {
            if s.idc.trim().is_empty() {
                return Err(ConfigError::new(
                    f("share.idc"),
                    &s.idc,
                    "must not be empty",
                ));
            }
            if !(s.fraction > 0.0 && s.fraction <= 1.0) {
                return Err(ConfigError::new(
                    f("share.fraction"),
                    s.fraction,
                    "must be in (0, 1]",
                ));
            }
            RateSource::Share(s.clone())
        }
        (Some(r), Some(_)) => {
            return Err(ConfigError::new(
                f("rate"),
                r,
                "give either rate or share, not both",
            ));
        }
        (None, None) => {
            return Err(ConfigError::new(
                f("rate"),
                "",
                "give rate (\"10r/s\") or share",
            ));
        }
    };
    if l.burst > MAX_BURST {
        return Err(ConfigError::new(
            f("burst"),
            l.burst,
            format!("at most {MAX_BURST}"),
        ));
    }
    let delay_m = match (l.delay, l.nodelay) {
        (Some(d), true) => {
            return Err(ConfigError::new(
                f("delay"),
                d,
                "delay and nodelay exclude each other",
            ));
        }
        (Some(d), false) if d > MAX_BURST => {
            return Err(ConfigError::new(
                f("delay"),
                d,
                format!("at most {MAX_BURST}"),
            ));
        }
        (Some(d), false) => d * 1000,
        (None, true) => u64::MAX,
        (None, false) => 0,
    };
    Ok(LineSpec {
        name: l.name.as_str().into(),
        key: l.key.as_str().into(),
        source,
        burst_m: l.burst * 1000,
        delay_m,
    })
}

fn default_max_keys() -> usize {
    100_000
}
fn default_sweep() -> Duration {
    Duration::from_secs(10)
}
fn default_alert_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_near() -> f64 {
    0.8
}
fn default_window() -> Duration {
    Duration::from_secs(1)
}

/// The same duration syntax as the topology file (`"250ms"`, `"10s"`, `"1.5s"`, `"2m"`, `"1h"`;
/// zero and negative durations refused), so one operator vocabulary covers both.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    ha_core::config::parse_duration(text)
        .map_err(|reason| format!("invalid duration {text:?}: {reason}"))
}

mod duration_str {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = include_str!("config.rs")
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = RateLimitConfig::from_toml_str(&text).unwrap();
        assert_eq!(cfg.limits.len(), 2);
        assert_eq!(cfg.limits[0].rate, Some(Rate::per_second(10)));
        assert_eq!(cfg.limits[0].delay, Some(5));
        assert_eq!(cfg.limits[1].share.as_ref().unwrap().fraction, 0.8);
        assert_eq!(cfg.alerts.interval, Duration::from_secs(10));
    }

    #[test]
    fn errors_name_field_and_value() {
        let e = RateLimitConfig::from_toml_str(
            "[[limit]]\nname = \"a\"\nkey = \"ip\"\nrate = \"10r/h\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("10r/h"), "{e}");
        let e = RateLimitConfig::from_toml_str(
            "[[limit]]\nname = \"a\"\nkey = \"ip\"\nrate = \"10r/s\"\ndelay = 3\nnodelay = true\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), "limit[0].delay");
        assert_eq!(e.value(), "3");
        let e = RateLimitConfig::from_toml_str(
            "[[limit]]\nname = \"a\"\nkey = \"ip\"\nshare = { idc = \"bj-a\", fraction = 1.5 }\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), "limit[0].share.fraction");
        let e =
            RateLimitConfig::from_toml_str("[[limit]]\nname = \"a\"\nkey = \"ip\"\n").unwrap_err();
        assert_eq!(e.field(), "limit[0].rate");
        let e = RateLimitConfig::from_toml_str(
            "[[limit]]\nname = \"a\"\nkey = \"ip\"\nrate = \"1r/s\"\n[[limit]]\nname = \"a\"\nkey = \"x\"\nrate = \"1r/s\"\n",
        )
        .unwrap_err();
        assert_eq!(e.field(), "limit[1].name");
        assert!(parse_duration("10x").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
