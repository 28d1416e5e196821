//! Limits as plain serde data, validated with errors that name the field and the value.
//!
//! ```toml
//! max_keys = 100000          # per limit; default 100000
//! dry_run = false            # nginx `limit_req_dry_run`; default false
//! status = 429               # nginx `limit_req_status` (whose default is 503); default 429
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
    /// (about 5% of them at the cap). Keys are kept as a fixed-size hash, so this bound holds in
    /// bytes whatever the keys' length.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// Count and alert as usual, but never reject or delay (nginx `limit_req_dry_run on`).
    /// Default false.
    #[serde(default)]
    pub dry_run: bool,
    /// The HTTP status a rejected request is answered with (nginx `limit_req_status`, whose
    /// default is 503), 400 to 599. Default 429 (Too Many Requests), always with `Retry-After`.
    /// The tower layers' [`Rejected`](crate::Rejected) error carries it, and
    /// `axum::handle_error` answers with it.
    #[serde(default = "default_status")]
    pub status: u16,
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
            status: default_status(),
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
        let cfg: RateLimitConfig = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
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
/// field, which `[[limit]]` (its index and name). Errors of the TOML text (an unknown field, a
/// value of the wrong type) are as precise as those of validation.
///
/// ```
/// let e = ha_ratelimit::RateLimitConfig::from_toml_str(
///     "[[limit]]\nname = \"per_ip\"\nkey = \"client_ip\"\nrate = \"10r/s\"\nburst = -1\n",
/// )
/// .unwrap_err();
/// assert_eq!(e.field(), "limit[0].burst");
/// assert_eq!(e.value(), "-1");
/// assert_eq!((e.limit_index(), e.limit()), (Some(0), Some("per_ip")));
/// assert_eq!(
///     e.to_string(),
///     "invalid rate-limit config: limit[0] \"per_ip\": limit[0].burst = \"-1\": \
///      invalid value: integer `-1`, expected u64"
/// );
/// ```
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
    if !(400..=599).contains(&cfg.status) {
        return Err(ConfigError::new(
            "status",
            cfg.status,
            "must be an HTTP error status, 400 to 599 (nginx limit_req_status; 429 or 503)",
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

// === errors of the TOML text ===

/// A TOML error as a [`ConfigError`]: the error's span is looked up in the document (parsed again
/// with spans) to name the field's path (`limit[1].burst`), the value as written and the
/// `[[limit]]`; a text that is not TOML at all says the line and column, and the `[[limit]]` it
/// is in.
fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let reason = e.message().trim().to_string();
    let span = e.span().unwrap_or(0..0);
    let doc = match toml::de::DeTable::parse(text) {
        Ok(doc) => doc,
        Err(_) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let err = ConfigError::new("", "", format!("{reason} (line {line}, column {column})"));
            // The `[[limit]]` headers before the error tell which line it is in; its `name`
            // is read from the text of that table, if it is written plainly.
            let header = |l: &str| l.trim_start().starts_with("[[limit]]");
            let headers = before.lines().filter(|l| header(l)).count();
            let Some(i) = headers.checked_sub(1) else {
                return err;
            };
            let name = text
                .lines()
                .skip_while(|l| !header(l))
                .scan(0, |seen, l| {
                    *seen += usize::from(header(l));
                    (*seen <= headers).then_some((*seen, l))
                })
                .filter(|(seen, _)| *seen == headers)
                .find_map(|(_, l)| {
                    let rest = l
                        .trim()
                        .strip_prefix("name")?
                        .trim_start()
                        .strip_prefix('=')?;
                    let quoted = rest.trim().strip_prefix('"')?;
                    Some(quoted.split('"').next()?.to_string())
                })
                .unwrap_or_default();
            return err.in_limit(i, name);
        }
    };
    let mut at = Located::default();
    if !locate(text, doc.get_ref(), &span, &mut at, true) {
        at = Located::default();
    }
    // A missing field's error points at the table it is missing from.
    if let Some(missing) = reason
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
    {
        if !at.path.is_empty() {
            at.path.push('.');
        }
        at.path.push_str(missing);
    }
    let err = ConfigError::new(at.path, at.value, reason);
    match at.limit {
        Some((i, name)) => err.in_limit(i, name),
        None => err,
    }
}

/// Where in the document an error's span is.
#[derive(Default)]
struct Located {
    path: String,
    value: String,
    limit: Option<(usize, String)>,
}

fn within(outer: &std::ops::Range<usize>, inner: &std::ops::Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// Finds the key, value or table whose span holds `span`, filling `at` with its path. Every
/// table is searched (the span of an array of tables' item only covers its `[[header]]`).
fn locate(
    text: &str,
    table: &toml::de::DeTable<'_>,
    span: &std::ops::Range<usize>,
    at: &mut Located,
    top: bool,
) -> bool {
    for (key, value) in table {
        let depth = at.path.len();
        if !at.path.is_empty() {
            at.path.push('.');
        }
        at.path.push_str(key.get_ref());
        if within(&key.span(), span) {
            // The key itself (an unknown field): its value as written.
            at.value = shown(text, value);
            return true;
        }
        let found = match value.get_ref() {
            toml::de::DeValue::Table(inner) => {
                locate(text, inner, span, at, false) || within(&value.span(), span)
            }
            toml::de::DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let depth = at.path.len();
                at.path.push_str(&format!("[{i}]"));
                let found = match item.get_ref() {
                    toml::de::DeValue::Table(inner) => {
                        let found =
                            locate(text, inner, span, at, false) || within(&item.span(), span);
                        if found && top && key.get_ref() == "limit" {
                            let name = inner
                                .get("name")
                                .and_then(|n| match n.get_ref() {
                                    toml::de::DeValue::String(s) => Some(s.to_string()),
                                    _ => None,
                                })
                                .unwrap_or_default();
                            at.limit = Some((i, name));
                        }
                        found
                    }
                    _ if within(&item.span(), span) => {
                        at.value = shown(text, item);
                        true
                    }
                    _ => false,
                };
                if !found {
                    at.path.truncate(depth);
                }
                found
            }),
            _ if within(&value.span(), span) => {
                at.value = shown(text, value);
                true
            }
            _ => false,
        };
        if found {
            return true;
        }
        at.path.truncate(depth);
    }
    false
}

/// A value as written: a string's contents, anything else's text.
fn shown(text: &str, value: &toml::Spanned<toml::de::DeValue<'_>>) -> String {
    match value.get_ref() {
        toml::de::DeValue::String(s) => s.to_string(),
        _ => text
            .get(value.span())
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn default_status() -> u16 {
    429
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

    /// Errors of the TOML text itself (an unknown field, a value of the wrong type or out of
    /// range) name the field, the value as written and the `[[limit]]` (index and name), like
    /// the errors of validation.
    #[test]
    fn parse_errors_name_field_value_and_limit() {
        let two = |second: &str| {
            format!(
                "[[limit]]\nname = \"first\"\nkey = \"ip\"\nrate = \"1r/s\"\n\n[[limit]]\nname = \"second\"\nkey = \"ip\"\n{second}\n"
            )
        };
        let cases = [
            (
                "rate = \"1r/s\"\nbrust = 5",
                "limit[1].brust",
                "5",
                "unknown field",
            ),
            ("rate = \"10r/h\"", "limit[1].rate", "10r/h", "r/s or r/m"),
            ("rate = \"1r/s\"\nburst = -1", "limit[1].burst", "-1", "-1"),
            (
                "rate = \"1r/s\"\nnodelay = \"yes\"",
                "limit[1].nodelay",
                "yes",
                "bool",
            ),
            (
                "rate = \"1r/s\"\nshare = { idc = \"bj-a\", fraction = \"half\" }",
                "limit[1].share.fraction",
                "half",
                "f64",
            ),
        ];
        for (second, field, value, reason) in cases {
            let e = RateLimitConfig::from_toml_str(&two(second)).unwrap_err();
            assert_eq!(e.field(), field, "{e}");
            assert_eq!(e.value(), value, "{e}");
            assert_eq!(e.limit_index(), Some(1), "{e}");
            assert_eq!(e.limit(), Some("second"), "{e}");
            assert!(e.reason().contains(reason), "{e}");
            assert!(e.to_string().contains("second"), "{e}");
        }
        // A missing field names the field, with the limit it is missing from.
        let e = RateLimitConfig::from_toml_str(
            &two("rate = \"1r/s\"")
                .replace("key = \"ip\"\nrate = \"1r/s\"\n\n", "rate = \"1r/s\"\n\n"),
        )
        .unwrap_err();
        assert_eq!(
            (e.field(), e.limit_index(), e.limit()),
            ("limit[0].key", Some(0), Some("first")),
            "{e}"
        );
        // Settings outside the lines name no limit.
        let e = RateLimitConfig::from_toml_str("max_keys = -3\n").unwrap_err();
        assert_eq!(
            (e.field(), e.value(), e.limit()),
            ("max_keys", "-3", None),
            "{e}"
        );
        let e = RateLimitConfig::from_toml_str("[alerts]\nintervall = \"1s\"\n").unwrap_err();
        assert_eq!((e.field(), e.value()), ("alerts.intervall", "1s"), "{e}");
        let e = RateLimitConfig::from_toml_str("idle_sweep = \"soon\"\n").unwrap_err();
        assert_eq!((e.field(), e.value()), ("idle_sweep", "soon"), "{e}");
        // Broken TOML says where.
        let e = RateLimitConfig::from_toml_str(&two("rate = \"1r/s")).unwrap_err();
        assert!(e.reason().contains("line 9"), "{e}");
        assert_eq!(
            (e.limit_index(), e.limit()),
            (Some(1), Some("second")),
            "{e}"
        );
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
