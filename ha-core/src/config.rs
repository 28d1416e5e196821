//! The configured picture: regions, IDCs, the local IDC, dependencies and tuning, read from TOML.
//!
//! ```toml
//! local_idc = "bj-a"            # overridden by the HA_IDC environment variable when set
//!
//! [[regions]]
//! name = "north"
//! resolvers = ["127.0.1.53:15353"]
//!
//! [[regions]]
//! name = "south"
//! resolvers = ["127.0.3.53:15353"]
//!
//! [[idcs]]
//! name = "bj-a"
//! region = "north"
//! cidrs = ["127.0.1.0/24"]
//! capacity_rps = 2000
//!
//! [[idcs]]
//! name = "sh-a"
//! region = "south"
//! cidrs = ["127.0.3.0/24"]
//! capacity_rps = 1000
//!
//! [dependencies.profile]
//! port = 18081
//! dns = { north = "profile.north.lab.", south = "profile.north.lab." }
//! allowed_cidrs = ["127.0.1.0/24", "127.0.3.0/24"]
//!
//! [dependencies.cache]
//! kind = "redis"                # read by the backend crate
//! static_addrs = ["127.0.1.20:6380", "127.0.3.20:6380"]
//!
//! [dependencies.cache.overrides.health]   # this dependency's own [health], [dns], [balance]
//! consecutive_failures = 3
//!
//! [dependencies.cache.settings]           # the backend's table: Dependency::settings::<T>()
//! master_name = "members"
//! ```
//!
//! Durations are written as strings with a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`; each field
//! has an upper bound (a typo such as `"5000000h"` is refused, not obeyed). Errors name the file,
//! the dotted field path and, for errors of the TOML layer, the line and column.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::ConfigError;
use crate::locality::IdcClassifier;

/// The environment variable that names the local IDC; it wins over `local_idc` in the file.
pub const LOCAL_IDC_ENV: &str = "HA_IDC";

// === raw (as written) ===

/// A duration as written in the file (`"250ms"`, `"5s"`, `"2m"`, `"1h"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DurationStr(pub String);

impl DurationStr {
    /// Parses the duration, refusing one longer than `max`.
    fn parse(&self, file: &Path, field: &str, max: Duration) -> Result<Duration, ConfigError> {
        parse_duration_at_most(&self.0, max)
            .map_err(|reason| ConfigError::new(file, field, &self.0, reason))
    }
}

/// [`parse_duration`], refusing a duration longer than `max` (every configured duration has a
/// bound: past it, time arithmetic in the tasks that obey it would overflow).
///
/// ```
/// use std::time::Duration;
/// use ha_core::config::parse_duration_at_most;
/// assert_eq!(parse_duration_at_most("2s", Duration::from_secs(60)), Ok(Duration::from_secs(2)));
/// let e = parse_duration_at_most("5000000000000000h", Duration::from_secs(60)).unwrap_err();
/// assert!(e.contains("at most 60s"), "{e}");
/// ```
pub fn parse_duration_at_most(text: &str, max: Duration) -> Result<Duration, String> {
    let too_long = || format!("must be at most {}", format_duration(max));
    let d = parse_duration(text).map_err(|e| {
        if e.contains("too big") || e.contains("overflow") {
            too_long()
        } else {
            e
        }
    })?;
    if d > max {
        return Err(too_long());
    }
    Ok(d)
}

/// Writes a duration the way [`parse_duration`] reads it (`"250ms"`, `"60s"`, `"2h"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(1000) && ms > 0 {
        format!("{}s", ms / 1000)
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{ms}ms")
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Parses `"250ms"`, `"5s"`, `"1.5s"`, `"2m"`, `"1h"`; zero and negative durations are refused.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(ha_core::config::parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
/// assert!(ha_core::config::parse_duration("-5s").is_err());
/// assert!(ha_core::config::parse_duration("0s").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| "a duration needs a unit: ms, s, m or h".to_string())?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{num:?} is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err("a duration must be positive".into());
    }
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?}: use ms, s, m or h")),
    };
    if secs <= 0.0 {
        return Err("a duration must be greater than zero".into());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| "the duration is too big".to_string())
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    local_idc: Option<String>,
    #[serde(default)]
    regions: Vec<RawRegion>,
    #[serde(default)]
    idcs: Vec<RawIdc>,
    #[serde(default)]
    dependencies: BTreeMap<String, RawDependency>,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    balance: RawBalance,
    app: Option<toml::Table>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    name: String,
    #[serde(default)]
    resolvers: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdc {
    name: String,
    region: String,
    #[serde(default)]
    cidrs: Vec<String>,
    #[serde(default)]
    capacity_rps: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    kind: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    dns: BTreeMap<String, String>,
    #[serde(default)]
    static_addrs: Vec<String>,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    #[serde(default)]
    overrides: RawOverrides,
    settings: Option<toml::Table>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOverrides {
    dns: Option<RawDns>,
    health: Option<RawHealth>,
    balance: Option<RawBalance>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDns {
    min_ttl: Option<DurationStr>,
    max_ttl: Option<DurationStr>,
    refresh_ahead: Option<f64>,
    serve_stale_for: Option<DurationStr>,
    query_timeout: Option<DurationStr>,
    retry_interval: Option<DurationStr>,
    ipv4_only: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    consecutive_failures: Option<u32>,
    failure_rate: Option<f64>,
    failure_rate_min_requests: Option<u32>,
    window: Option<DurationStr>,
    base_ejection: Option<DurationStr>,
    max_ejection: Option<DurationStr>,
    max_ejected_percent: Option<f64>,
    probe_timeout: Option<DurationStr>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBalance {
    overprovisioning: Option<f64>,
    panic_threshold: Option<f64>,
    failback_hold: Option<DurationStr>,
    ewma_decay: Option<DurationStr>,
    explore: Option<f64>,
}

// === validated ===

/// A region: a name and the DNS resolvers that serve it, asked first by clients in the region.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Region {
    /// The region's name, e.g. `north`.
    pub name: Arc<str>,
    /// The region's DNS resolvers, asked in order.
    pub resolvers: Vec<SocketAddr>,
}

/// A data center: a name, its region, the address ranges of its hosts and its capacity.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Idc {
    /// The IDC's name, e.g. `bj-a`.
    pub name: Arc<str>,
    /// The region the IDC is in.
    pub region: Arc<str>,
    /// The address ranges of the IDC's hosts; endpoints are classified by longest prefix.
    pub cidrs: Vec<IpNet>,
    /// How many requests per second the IDC's instances of this service can take in all; `None`
    /// when not configured. `ha-ratelimit` derives IDC-share limits from it.
    pub capacity_rps: Option<f64>,
}

/// Where a dependency's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Source {
    /// Resolve a DNS name per region (the region's own name first, by the region's resolvers).
    Dns {
        /// The DNS name to resolve in each region, by region name.
        names: BTreeMap<Arc<str>, String>,
        /// The port of every resolved address.
        port: u16,
    },
    /// Fixed addresses.
    Static(Vec<SocketAddr>),
}

/// One dependency of the service: where its endpoints come from, which addresses are allowed,
/// its own tuning and its backend's settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Dependency {
    /// The dependency's name, e.g. `profile`.
    pub name: Arc<str>,
    /// What kind of backend it is (`kind = "redis"`), as the backend crates spell it; `None`
    /// when not given.
    pub kind: Option<Arc<str>>,
    /// Where the endpoints come from.
    pub source: Source,
    /// Resolved addresses outside these ranges are refused (a DNS-poisoning guard). When none
    /// are configured: the ranges of every configured IDC.
    pub allowed_cidrs: Vec<IpNet>,
    dns: DnsSettings,
    health: HealthSettings,
    balance: BalanceSettings,
    settings: toml::Table,
    file: Arc<Path>,
}

impl Dependency {
    /// True when `ip` may be used for this dependency.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed_cidrs.iter().any(|net| net.contains(&ip))
    }

    /// The DNS tuning of this dependency: `[dns]` with its `overrides.dns` applied.
    pub fn dns_settings(&self) -> &DnsSettings {
        &self.dns
    }

    /// The outlier-detection tuning: `[health]` with its `overrides.health` applied.
    pub fn health_settings(&self) -> &HealthSettings {
        &self.health
    }

    /// The selection tuning: `[balance]` with its `overrides.balance` applied.
    pub fn balance_settings(&self) -> &BalanceSettings {
        &self.balance
    }

    /// Reads the backend's table `[dependencies.NAME.settings]` as `T` (an empty table when it
    /// is missing, so a `T` with `#[serde(default)]` fields works without one). An error names
    /// the file and the dotted path of the field, e.g.
    /// `dependencies.cache.settings.master_name`.
    ///
    /// ```
    /// #[derive(Debug, serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct Redis { master_name: String, #[serde(default)] db: u8 }
    ///
    /// let topo = ha_core::Topology::from_toml_str(r#"
    /// local_idc = "bj-a"
    /// [[regions]]
    /// name = "north"
    /// resolvers = ["127.0.1.53"]
    /// [[idcs]]
    /// name = "bj-a"
    /// region = "north"
    /// cidrs = ["127.0.1.0/24"]
    /// [dependencies.cache]
    /// kind = "redis"
    /// static_addrs = ["127.0.1.20:26379"]
    /// [dependencies.cache.settings]
    /// master_name = "members"
    /// db = 300
    /// "#, "t.toml").unwrap();
    /// let cache = topo.dependency("cache").unwrap();
    /// assert_eq!(cache.kind.as_deref(), Some("redis"));
    /// let e = cache.settings::<Redis>().unwrap_err();
    /// assert_eq!(e.field, "dependencies.cache.settings.db");
    /// ```
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let value = toml::Value::Table(self.settings.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = dotted(e.path());
            let field = if path.is_empty() {
                format!("dependencies.{}.settings", self.name)
            } else {
                format!("dependencies.{}.settings.{path}", self.name)
            };
            ConfigError::new(&*self.file, field, "", e.into_inner().message().to_string())
        })
    }

    /// True when the dependency has a `[dependencies.NAME.settings]` table.
    pub fn has_settings(&self) -> bool {
        !self.settings.is_empty()
    }
}

/// DNS tuning. Defaults: `min_ttl` 1s, `max_ttl` 300s, `refresh_ahead` 0.75 (re-resolve when 75% of
/// the clamped TTL has passed), `serve_stale_for` 300s, `query_timeout` 1s, `retry_interval` 1s.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct DnsSettings {
    /// Shortest TTL honoured; shorter answers are cached this long.
    pub min_ttl: Duration,
    /// Longest TTL honoured; longer answers are re-resolved after this long.
    pub max_ttl: Duration,
    /// Fraction of the clamped TTL after which the background refresh starts (0 < f ≤ 1).
    pub refresh_ahead: f64,
    /// How long after expiry an answer may still be served when every resolver fails.
    pub serve_stale_for: Duration,
    /// Timeout of one query to one resolver.
    pub query_timeout: Duration,
    /// Delay between refresh attempts while every resolver fails.
    pub retry_interval: Duration,
    /// Ask only for A records (never AAAA). AAAA is also skipped, without this, when no
    /// allowed CIDR of the dependency is IPv6.
    pub ipv4_only: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
            refresh_ahead: 0.75,
            serve_stale_for: Duration::from_secs(300),
            query_timeout: Duration::from_secs(1),
            retry_interval: Duration::from_secs(1),
            ipv4_only: false,
        }
    }
}

impl DnsSettings {
    /// Clamps a TTL from an answer to `[min_ttl, max_ttl]` (`max_ttl` wins if a hand-built
    /// value has them the wrong way round; never panics).
    pub fn clamp_ttl(&self, ttl: Duration) -> Duration {
        ttl.max(self.min_ttl).min(self.max_ttl)
    }
}

/// Passive outlier detection. Defaults: eject after 5 `consecutive_failures`, or when the
/// `failure_rate` in `window` (10s) reaches 0.5 over at least `failure_rate_min_requests` (10)
/// calls; ejected for `base_ejection` (2s) × 2^(repeats), at most `max_ejection` (60s); at most
/// `max_ejected_percent` (50%) of a set ejected at once; a probe may take `probe_timeout` (1s).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct HealthSettings {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// Failure rate in the window that ejects an endpoint (0 < r ≤ 1).
    pub failure_rate: f64,
    /// Calls needed in the window before the failure rate counts.
    pub failure_rate_min_requests: u32,
    /// The failure-rate window.
    pub window: Duration,
    /// Ejection time of a first ejection; doubled for each repeat.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Largest share of a set's endpoints ejected at once, in percent (0–100).
    pub max_ejected_percent: f64,
    /// How long the probe of an endpoint whose ejection ended may take (1s); a probe that has
    /// not answered by then is abandoned and the next call probes again.
    pub probe_timeout: Duration,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            consecutive_failures: 5,
            failure_rate: 0.5,
            failure_rate_min_requests: 10,
            window: Duration::from_secs(10),
            base_ejection: Duration::from_secs(2),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50.0,
            probe_timeout: Duration::from_secs(1),
        }
    }
}

/// Locality-aware selection. Defaults: `overprovisioning` 1.4 (as Envoy), `panic_threshold` 0.5,
/// `failback_hold` 5s, `ewma_decay` 10s, `explore` 1/32.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct BalanceSettings {
    /// A tier keeps all traffic while `healthy / total × overprovisioning ≥ 1`.
    pub overprovisioning: f64,
    /// Below this healthy share of the usable endpoints, every endpoint is used (panic mode).
    pub panic_threshold: f64,
    /// A restored endpoint counts toward its tier's health only after being healthy this long.
    pub failback_hold: Duration,
    /// Decay time of the peak-EWMA latency estimate.
    pub ewma_decay: Duration,
    /// Share of first-attempt picks made uniformly inside the tier instead of by cost (0–0.5).
    /// Power of two choices never picks the costliest endpoint of a tier, and with two endpoints
    /// it always compares both: without exploration an endpoint that once answered slowly gets
    /// no calls until its estimate decays, so passive health cannot see that it died.
    pub explore: f64,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        BalanceSettings {
            overprovisioning: 1.4,
            panic_threshold: 0.5,
            failback_hold: Duration::from_secs(5),
            ewma_decay: Duration::from_secs(10),
            explore: 1.0 / 32.0,
        }
    }
}

/// The whole configured picture, validated.
///
/// ```
/// let topo = ha_core::Topology::from_toml_str(r#"
/// local_idc = "bj-a"
/// [[regions]]
/// name = "north"
/// resolvers = ["127.0.1.53:15353"]
/// [[idcs]]
/// name = "bj-a"
/// region = "north"
/// cidrs = ["127.0.1.0/24"]
/// capacity_rps = 2000
/// [dependencies.profile]
/// static_addrs = ["127.0.1.11:8080"]
/// "#, "example.toml").unwrap();
/// assert_eq!(&*topo.local_idc().name, "bj-a");
/// assert_eq!(topo.idc("bj-a").and_then(|i| i.capacity_rps), Some(2000.0));
/// ```
#[derive(Debug, Clone)]
pub struct Topology {
    file: PathBuf,
    local_idc: Arc<str>,
    regions: Vec<Region>,
    idcs: Vec<Idc>,
    dependencies: BTreeMap<Arc<str>, Dependency>,
    dns: DnsSettings,
    health: HealthSettings,
    balance: BalanceSettings,
    classifier: Arc<IdcClassifier>,
    app: toml::Table,
}

impl Topology {
    /// Reads and validates a TOML file; `HA_IDC`, when set, names the local IDC.
    pub fn load(path: impl AsRef<Path>) -> Result<Topology, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, "", "", format!("cannot read the file: {e}")))?;
        Self::parse(&text, path, std::env::var(LOCAL_IDC_ENV).ok())
    }

    /// Validates TOML text; `file` is the label used in errors. Ignores `HA_IDC`.
    pub fn from_toml_str(text: &str, file: impl AsRef<Path>) -> Result<Topology, ConfigError> {
        Self::parse(text, file.as_ref(), None)
    }

    /// Validates TOML text, with `local_idc_override` (the value of `HA_IDC`) winning over the file.
    pub fn parse(
        text: &str,
        file: &Path,
        local_idc_override: Option<String>,
    ) -> Result<Topology, ConfigError> {
        let raw: RawTopology = deserialize_toml(text, file)?;
        Self::validate(raw, file, local_idc_override)
    }

    fn validate(
        raw: RawTopology,
        file: &Path,
        local_override: Option<String>,
    ) -> Result<Topology, ConfigError> {
        let err = |field: String, value: &dyn std::fmt::Display, reason: &str| {
            ConfigError::new(file, field, value, reason)
        };

        // Regions.
        if raw.regions.is_empty() {
            return Err(err(
                "regions".into(),
                &"",
                "at least one region is required",
            ));
        }
        let mut regions: Vec<Region> = Vec::new();
        for (i, r) in raw.regions.iter().enumerate() {
            if r.name.trim().is_empty() {
                return Err(err(
                    format!("regions[{i}].name"),
                    &r.name,
                    "must not be empty",
                ));
            }
            if regions.iter().any(|x| *x.name == *r.name) {
                return Err(err(
                    format!("regions[{i}].name"),
                    &r.name,
                    "duplicate region",
                ));
            }
            if r.resolvers.is_empty() {
                return Err(err(
                    format!("regions[{i}].resolvers"),
                    &"[]",
                    "a region needs at least one DNS resolver",
                ));
            }
            let mut resolvers = Vec::new();
            for (j, s) in r.resolvers.iter().enumerate() {
                let addr = parse_socket_addr(s, 53)
                    .map_err(|reason| err(format!("regions[{i}].resolvers[{j}]"), s, &reason))?;
                if addr.port() == 0 {
                    return Err(err(
                        format!("regions[{i}].resolvers[{j}]"),
                        s,
                        "port 0 is not a resolver's port (leave the port out for 53)",
                    ));
                }
                resolvers.push(addr);
            }
            regions.push(Region {
                name: r.name.as_str().into(),
                resolvers,
            });
        }

        // IDCs.
        if raw.idcs.is_empty() {
            return Err(err("idcs".into(), &"", "at least one IDC is required"));
        }
        let mut idcs: Vec<Idc> = Vec::new();
        for (i, d) in raw.idcs.iter().enumerate() {
            if d.name.trim().is_empty() {
                return Err(err(format!("idcs[{i}].name"), &d.name, "must not be empty"));
            }
            if idcs.iter().any(|x| *x.name == *d.name) {
                return Err(err(format!("idcs[{i}].name"), &d.name, "duplicate IDC"));
            }
            let Some(region) = regions.iter().find(|r| *r.name == *d.region) else {
                return Err(err(
                    format!("idcs[{i}].region"),
                    &d.region,
                    &format!(
                        "unknown region (known: {})",
                        names(regions.iter().map(|r| &r.name))
                    ),
                ));
            };
            if d.cidrs.is_empty() {
                return Err(err(
                    format!("idcs[{i}].cidrs"),
                    &"[]",
                    "an IDC needs at least one CIDR",
                ));
            }
            let mut cidrs = Vec::new();
            for (j, c) in d.cidrs.iter().enumerate() {
                cidrs.push(
                    parse_cidr(c)
                        .map_err(|reason| err(format!("idcs[{i}].cidrs[{j}]"), c, &reason))?,
                );
            }
            if let Some(cap) = d.capacity_rps
                && (!cap.is_finite() || cap <= 0.0)
            {
                return Err(err(
                    format!("idcs[{i}].capacity_rps"),
                    &cap,
                    "capacity must be a positive number of requests per second",
                ));
            }
            idcs.push(Idc {
                name: d.name.as_str().into(),
                region: region.name.clone(),
                cidrs,
                capacity_rps: d.capacity_rps,
            });
        }
        // Overlapping CIDRs between (or within) IDCs make classification ambiguous.
        let all: Vec<(usize, usize, IpNet)> = idcs
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.cidrs.iter().enumerate().map(move |(j, c)| (i, j, *c)))
            .collect();
        for (a, &(i, j, na)) in all.iter().enumerate() {
            for &(k, l, nb) in &all[a + 1..] {
                if na.contains(&nb.network()) || nb.contains(&na.network()) {
                    return Err(err(
                        format!("idcs[{k}].cidrs[{l}]"),
                        &nb,
                        &format!(
                            "overlaps {na} of IDC {} (idcs[{i}].cidrs[{j}])",
                            idcs[i].name
                        ),
                    ));
                }
            }
        }

        // Local IDC.
        let (local_field, local) = match local_override.filter(|s| !s.trim().is_empty()) {
            Some(v) => (LOCAL_IDC_ENV.to_string(), v),
            None => match raw.local_idc {
                Some(v) => ("local_idc".to_string(), v),
                None => {
                    return Err(err(
                        "local_idc".into(),
                        &"",
                        &format!(
                            "missing: set local_idc in the file or the {LOCAL_IDC_ENV} environment variable"
                        ),
                    ));
                }
            },
        };
        let Some(local_idc) = idcs
            .iter()
            .find(|d| *d.name == *local)
            .map(|d| d.name.clone())
        else {
            return Err(err(
                local_field,
                &local,
                &format!(
                    "unknown IDC (known: {})",
                    names(idcs.iter().map(|d| &d.name))
                ),
            ));
        };

        // Settings.
        let dns = validate_dns(&raw.dns, DnsSettings::default(), file, "dns")?;
        let health = validate_health(&raw.health, HealthSettings::default(), file, "health")?;
        let balance = validate_balance(&raw.balance, BalanceSettings::default(), file, "balance")?;
        let file_arc: Arc<Path> = Arc::from(file);

        // Dependencies.
        let idc_ranges: Vec<IpNet> = idcs.iter().flat_map(|d| d.cidrs.iter().copied()).collect();
        let mut dependencies = BTreeMap::new();
        for (name, d) in &raw.dependencies {
            if name.trim().is_empty() {
                return Err(err(
                    "dependencies".into(),
                    &"\"\"",
                    "a dependency needs a name: [dependencies.NAME]",
                ));
            }
            let f = |k: &str| format!("dependencies.{name}.{k}");
            if let Some(kind) = &d.kind
                && kind.trim().is_empty()
            {
                return Err(err(f("kind"), &"", "must not be empty when given"));
            }
            let source = match (d.dns.is_empty(), d.static_addrs.is_empty()) {
                (false, false) => {
                    return Err(err(
                        f("static_addrs"),
                        &"",
                        "give either dns or static_addrs, not both",
                    ));
                }
                (true, true) => {
                    return Err(err(
                        f("dns"),
                        &"",
                        "missing: give dns names per region or static_addrs",
                    ));
                }
                (false, true) => {
                    let Some(port) = d.port else {
                        return Err(err(
                            f("port"),
                            &"",
                            "missing: a DNS dependency needs a port",
                        ));
                    };
                    if port == 0 {
                        return Err(err(f("port"), &port, "port must not be 0"));
                    }
                    let mut names = BTreeMap::new();
                    for (region, host) in &d.dns {
                        let Some(r) = regions.iter().find(|r| *r.name == **region) else {
                            return Err(err(f(&format!("dns.{region}")), region, "unknown region"));
                        };
                        if host.trim().is_empty() {
                            return Err(err(f(&format!("dns.{region}")), host, "empty DNS name"));
                        }
                        names.insert(r.name.clone(), host.trim().to_string());
                    }
                    Source::Dns { names, port }
                }
                (true, false) => {
                    let mut addrs = Vec::new();
                    for (j, s) in d.static_addrs.iter().enumerate() {
                        let a = match d.port {
                            Some(p) => parse_socket_addr(s, p),
                            None => s.trim().parse::<SocketAddr>().map_err(|_| {
                                "not an address with a port such as 10.1.0.5:6379".to_string()
                            }),
                        }
                        .map_err(|reason| err(f(&format!("static_addrs[{j}]")), s, &reason))?;
                        if a.port() == 0 {
                            return Err(err(
                                f(&format!("static_addrs[{j}]")),
                                s,
                                "port must not be 0",
                            ));
                        }
                        addrs.push(a);
                    }
                    Source::Static(addrs)
                }
            };
            let mut allowed = Vec::new();
            for (j, c) in d.allowed_cidrs.iter().enumerate() {
                allowed.push(
                    parse_cidr(c)
                        .map_err(|reason| err(f(&format!("allowed_cidrs[{j}]")), c, &reason))?,
                );
            }
            if allowed.is_empty() {
                allowed = idc_ranges.clone();
            }
            let o = &d.overrides;
            let dep_dns = match &o.dns {
                Some(r) => validate_dns(r, dns, file, &f("overrides.dns"))?,
                None => dns,
            };
            let dep_health = match &o.health {
                Some(r) => validate_health(r, health, file, &f("overrides.health"))?,
                None => health,
            };
            let dep_balance = match &o.balance {
                Some(r) => validate_balance(r, balance, file, &f("overrides.balance"))?,
                None => balance,
            };
            let name: Arc<str> = name.as_str().into();
            dependencies.insert(
                name.clone(),
                Dependency {
                    name,
                    kind: d.kind.as_deref().map(|k| Arc::from(k.trim())),
                    source,
                    allowed_cidrs: allowed,
                    dns: dep_dns,
                    health: dep_health,
                    balance: dep_balance,
                    settings: d.settings.clone().unwrap_or_default(),
                    file: file_arc.clone(),
                },
            );
        }

        let classifier = Arc::new(IdcClassifier::new(&idcs, &local_idc));
        Ok(Topology {
            file: file.to_path_buf(),
            local_idc,
            regions,
            idcs,
            dependencies,
            dns,
            health,
            balance,
            classifier,
            app: raw.app.unwrap_or_default(),
        })
    }

    /// Reads the application's own table `[app]` as `T` (an empty table when it is missing):
    /// ha-core ignores it, so a service keeps its settings (listen address, admin token,
    /// limits) in the same file as its topology. An error names the file and the dotted path
    /// of the field, e.g. `app.admin.token`.
    ///
    /// ```
    /// #[derive(Debug, serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct App { listen: std::net::SocketAddr }
    ///
    /// let topo = ha_core::Topology::from_toml_str(r#"
    /// local_idc = "bj-a"
    /// [[regions]]
    /// name = "north"
    /// resolvers = ["127.0.1.53"]
    /// [[idcs]]
    /// name = "bj-a"
    /// region = "north"
    /// cidrs = ["127.0.1.0/24"]
    /// [app]
    /// listen = "127.0.1.100:nope"
    /// "#, "t.toml").unwrap();
    /// let e = topo.app::<App>().unwrap_err();
    /// assert_eq!(e.field, "app.listen");
    /// ```
    pub fn app<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let value = toml::Value::Table(self.app.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = dotted(e.path());
            let field = if path.is_empty() {
                "app".to_string()
            } else {
                format!("app.{path}")
            };
            ConfigError::new(&self.file, field, "", e.into_inner().message().to_string())
        })
    }

    /// The file this topology was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The IDC this process runs in.
    pub fn local_idc(&self) -> &Idc {
        // Validation guarantees the local IDC exists; fall back to the first IDC defensively.
        self.idc(&self.local_idc).unwrap_or(&self.idcs[0])
    }

    /// The region this process runs in.
    pub fn local_region(&self) -> &Region {
        let name = &self.local_idc().region;
        self.region(name).unwrap_or(&self.regions[0])
    }

    /// Every region, in file order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| &*r.name == name)
    }

    /// Every IDC, in file order.
    pub fn idcs(&self) -> &[Idc] {
        &self.idcs
    }

    /// An IDC by name.
    pub fn idc(&self, name: &str) -> Option<&Idc> {
        self.idcs.iter().find(|d| &*d.name == name)
    }

    /// Every dependency by name.
    pub fn dependencies(&self) -> impl Iterator<Item = &Dependency> {
        self.dependencies.values()
    }

    /// A dependency by name.
    pub fn dependency(&self, name: &str) -> Option<&Dependency> {
        self.dependencies.get(name)
    }

    /// A dependency by name, or a [`ConfigError`] naming the file and the known dependencies.
    pub fn require_dependency(&self, name: &str) -> Result<&Dependency, ConfigError> {
        self.dependencies.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.dependencies.keys().map(|k| &**k).collect();
            ConfigError::new(
                &self.file,
                "dependencies",
                name,
                format!("unknown dependency (known: {})", known.join(", ")),
            )
        })
    }

    /// DNS tuning.
    pub fn dns(&self) -> &DnsSettings {
        &self.dns
    }

    /// The DNS tuning of `dependency` (its `overrides.dns` applied); `[dns]` for an unknown
    /// name.
    pub fn dns_for(&self, dependency: &str) -> &DnsSettings {
        self.dependencies
            .get(dependency)
            .map_or(&self.dns, |d| &d.dns)
    }

    /// The outlier-detection tuning of `dependency`; `[health]` for an unknown name.
    pub fn health_for(&self, dependency: &str) -> &HealthSettings {
        self.dependencies
            .get(dependency)
            .map_or(&self.health, |d| &d.health)
    }

    /// The selection tuning of `dependency`; `[balance]` for an unknown name.
    pub fn balance_for(&self, dependency: &str) -> &BalanceSettings {
        self.dependencies
            .get(dependency)
            .map_or(&self.balance, |d| &d.balance)
    }

    /// The DNS tuning of every dependency, writable, for tests that need values validation
    /// refuses.
    #[cfg(test)]
    pub(crate) fn dns_mut_for_tests(&mut self, f: impl Fn(&mut DnsSettings)) {
        f(&mut self.dns);
        for d in self.dependencies.values_mut() {
            f(&mut d.dns);
        }
    }

    /// Outlier-detection tuning.
    pub fn health(&self) -> &HealthSettings {
        &self.health
    }

    /// Selection tuning.
    pub fn balance(&self) -> &BalanceSettings {
        &self.balance
    }

    /// The classifier of addresses into IDCs and localities relative to the local IDC.
    pub fn classifier(&self) -> &Arc<IdcClassifier> {
        &self.classifier
    }

    /// The regions in the order a client of the local IDC asks their resolvers: the local region
    /// first, then the others in file order.
    pub fn regions_local_first(&self) -> Vec<&Region> {
        let local = &self.local_idc().region;
        let mut out: Vec<&Region> = self.regions.iter().filter(|r| r.name == *local).collect();
        out.extend(self.regions.iter().filter(|r| r.name != *local));
        out
    }
}

/// The longest value each duration field accepts.
const MAX_TTL_BOUND: Duration = Duration::from_secs(7 * 86_400);
const DAY: Duration = Duration::from_secs(86_400);
const HOUR: Duration = Duration::from_secs(3_600);
const MINUTE: Duration = Duration::from_secs(60);

fn validate_dns(
    raw: &RawDns,
    base: DnsSettings,
    file: &Path,
    at: &str,
) -> Result<DnsSettings, ConfigError> {
    let f = |k: &str| format!("{at}.{k}");
    let mut s = base;
    if let Some(d) = &raw.min_ttl {
        s.min_ttl = d.parse(file, &f("min_ttl"), DAY)?;
    }
    if let Some(d) = &raw.max_ttl {
        s.max_ttl = d.parse(file, &f("max_ttl"), MAX_TTL_BOUND)?;
    }
    if s.min_ttl > s.max_ttl {
        return Err(ConfigError::new(
            file,
            f("min_ttl"),
            format_duration(s.min_ttl),
            format!("must not exceed max_ttl ({})", format_duration(s.max_ttl)),
        ));
    }
    if let Some(x) = raw.refresh_ahead {
        if !(x > 0.0 && x <= 1.0) {
            return Err(ConfigError::new(
                file,
                f("refresh_ahead"),
                x,
                "must be in (0, 1]",
            ));
        }
        s.refresh_ahead = x;
    }
    if let Some(d) = &raw.serve_stale_for {
        s.serve_stale_for = d.parse(file, &f("serve_stale_for"), MAX_TTL_BOUND)?;
    }
    if let Some(d) = &raw.query_timeout {
        s.query_timeout = d.parse(file, &f("query_timeout"), MINUTE)?;
    }
    if let Some(d) = &raw.retry_interval {
        s.retry_interval = d.parse(file, &f("retry_interval"), HOUR)?;
    }
    if let Some(b) = raw.ipv4_only {
        s.ipv4_only = b;
    }
    Ok(s)
}

fn validate_health(
    raw: &RawHealth,
    base: HealthSettings,
    file: &Path,
    at: &str,
) -> Result<HealthSettings, ConfigError> {
    let f = |k: &str| format!("{at}.{k}");
    let mut s = base;
    if let Some(n) = raw.consecutive_failures {
        if n == 0 {
            return Err(ConfigError::new(
                file,
                f("consecutive_failures"),
                n,
                "must be at least 1",
            ));
        }
        s.consecutive_failures = n;
    }
    if let Some(r) = raw.failure_rate {
        if !(r > 0.0 && r <= 1.0) {
            return Err(ConfigError::new(
                file,
                f("failure_rate"),
                r,
                "must be in (0, 1]",
            ));
        }
        s.failure_rate = r;
    }
    if let Some(n) = raw.failure_rate_min_requests {
        if n == 0 {
            return Err(ConfigError::new(
                file,
                f("failure_rate_min_requests"),
                n,
                "must be at least 1 (one failed call would otherwise be a 100% failure rate)",
            ));
        }
        s.failure_rate_min_requests = n;
    }
    if let Some(d) = &raw.window {
        s.window = d.parse(file, &f("window"), HOUR)?;
    }
    if let Some(d) = &raw.base_ejection {
        s.base_ejection = d.parse(file, &f("base_ejection"), HOUR)?;
    }
    if let Some(d) = &raw.max_ejection {
        s.max_ejection = d.parse(file, &f("max_ejection"), DAY)?;
    }
    if let Some(d) = &raw.probe_timeout {
        s.probe_timeout = d.parse(file, &f("probe_timeout"), HOUR)?;
    }
    if s.base_ejection > s.max_ejection {
        return Err(ConfigError::new(
            file,
            f("base_ejection"),
            format_duration(s.base_ejection),
            format!(
                "must not exceed max_ejection ({})",
                format_duration(s.max_ejection)
            ),
        ));
    }
    if let Some(p) = raw.max_ejected_percent {
        if !(0.0..=100.0).contains(&p) {
            return Err(ConfigError::new(
                file,
                f("max_ejected_percent"),
                p,
                "must be in [0, 100]",
            ));
        }
        s.max_ejected_percent = p;
    }
    Ok(s)
}

fn validate_balance(
    raw: &RawBalance,
    base: BalanceSettings,
    file: &Path,
    at: &str,
) -> Result<BalanceSettings, ConfigError> {
    let f = |k: &str| format!("{at}.{k}");
    let mut s = base;
    if let Some(o) = raw.overprovisioning {
        if !(o.is_finite() && (1.0..=100.0).contains(&o)) {
            return Err(ConfigError::new(
                file,
                f("overprovisioning"),
                o,
                "must be in [1, 100]",
            ));
        }
        s.overprovisioning = o;
    }
    if let Some(p) = raw.panic_threshold {
        if !(0.0..=1.0).contains(&p) {
            return Err(ConfigError::new(
                file,
                f("panic_threshold"),
                p,
                "must be in [0, 1]",
            ));
        }
        s.panic_threshold = p;
    }
    if let Some(d) = &raw.failback_hold {
        s.failback_hold = d.parse(file, &f("failback_hold"), HOUR)?;
    }
    if let Some(d) = &raw.ewma_decay {
        s.ewma_decay = d.parse(file, &f("ewma_decay"), HOUR)?;
    }
    if let Some(e) = raw.explore {
        if !(0.0..=0.5).contains(&e) {
            return Err(ConfigError::new(
                file,
                f("explore"),
                e,
                "must be in [0, 0.5]",
            ));
        }
        s.explore = e;
    }
    Ok(s)
}

/// A CIDR as written: an address range whose host bits are zero (`127.0.1.7/24` is refused, as
/// it is probably a typo for an address or for `127.0.1.0/24`).
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net =
        IpNet::from_str(text.trim()).map_err(|_| "not a CIDR such as 10.1.0.0/16".to_string())?;
    if net != net.trunc() {
        return Err(format!(
            "host bits are set: the range is {} (write that, or a /{} for one address)",
            net.trunc(),
            net.max_prefix_len()
        ));
    }
    Ok(net)
}

/// Deserializes TOML text, with errors that name the dotted field path and the line and column.
fn deserialize_toml<T: DeserializeOwned>(text: &str, file: &Path) -> Result<T, ConfigError> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| toml_error(text, file, String::new(), &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = dotted(e.path());
        toml_error(text, file, path, e.inner())
    })
}

fn toml_error(text: &str, file: &Path, mut path: String, e: &toml::de::Error) -> ConfigError {
    let mut reason = e.message().trim().to_string();
    let mut err = ConfigError::new(file, "", "", "");
    if let Some(span) = e.span() {
        let (line, column) = line_column(text, span.start);
        err.line = Some(line);
        err.column = Some(column);
        let at = text.get(span.clone()).unwrap_or("").trim();
        if path.is_empty() {
            // A parse error (a duplicate key, a syntax error) comes before any path is known:
            // name the key under the table header above it.
            path = header_path(text, span.start, at);
        } else if reason.starts_with("unknown field") {
            // The path ends at the table; the unknown key is the field.
            let key = at.trim_matches(|c| c == '"' || c == '\'');
            if !key.is_empty() && !path.ends_with(key) {
                path = format!("{path}.{key}");
            }
        }
    }
    if reason.is_empty() {
        reason = "invalid TOML".into();
    }
    err.field = path;
    err.reason = reason;
    err
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (u32, u32) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (
        u32::try_from(line).unwrap_or(u32::MAX),
        u32::try_from(column).unwrap_or(u32::MAX),
    )
}

/// The dotted path of the key at `offset`: the nearest table header above it, then the key.
fn header_path(text: &str, offset: usize, at: &str) -> String {
    let before = text.get(..offset).unwrap_or(text);
    let header = before.lines().rev().find_map(|l| {
        let t = l.trim();
        t.starts_with('[').then(|| {
            t.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
    });
    let key = at
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    let is_key = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    match (header, is_key) {
        (Some(h), true) if !h.is_empty() => format!("{h}.{key}"),
        (Some(h), false) => h,
        (None, true) => key.to_string(),
        _ => String::new(),
    }
}

/// A serde path as a dotted field path: `dependencies.profile.port`, `idcs[1].cidrs[0]`.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for seg in path.iter() {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

fn parse_socket_addr(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err("not an IP address (with an optional port) such as 10.0.0.53:53".into())
}

fn names<'a>(it: impl Iterator<Item = &'a Arc<str>>) -> String {
    it.map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const GOOD: &str = r#"
local_idc = "bj-a"
[[regions]]
name = "north"
resolvers = ["127.0.1.53:15353", "127.0.2.53"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53:15353"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
capacity_rps = 2000
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
[dns]
min_ttl = "500ms"
max_ttl = "30s"
[dependencies.profile]
port = 18081
dns = { north = "profile.north.lab.", south = "profile.north.lab." }
[dependencies.cache]
static_addrs = ["127.0.1.20:6380"]
"#;

    fn bad(text: &str) -> ConfigError {
        Topology::from_toml_str(text, "t.toml").unwrap_err()
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let t = Topology::from_toml_str(GOOD, "t.toml").unwrap();
        assert_eq!(&*t.local_idc().name, "bj-a");
        assert_eq!(&*t.local_region().name, "north");
        assert_eq!(t.region("north").unwrap().resolvers[1].port(), 53);
        assert_eq!(t.dns().min_ttl, Duration::from_millis(500));
        assert_eq!(
            t.dns().serve_stale_for,
            DnsSettings::default().serve_stale_for
        );
        assert_eq!(t.balance().overprovisioning, 1.4);
        let dep = t.dependency("profile").unwrap();
        assert!(dep.allows("127.0.3.9".parse().unwrap()));
        assert!(!dep.allows("10.0.0.1".parse().unwrap()));
        let order: Vec<_> = t
            .regions_local_first()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(order, ["north", "south"]);
    }

    #[test]
    fn env_override_wins() {
        let t = Topology::parse(GOOD, Path::new("t.toml"), Some("sh-a".into())).unwrap();
        assert_eq!(&*t.local_idc().name, "sh-a");
        let order: Vec<_> = t
            .regions_local_first()
            .iter()
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(order, ["south", "north"]);
        let e = Topology::parse(GOOD, Path::new("t.toml"), Some("xx".into())).unwrap_err();
        assert_eq!(e.field, "HA_IDC");
        assert_eq!(e.value, "xx");
    }

    #[test]
    fn unknown_region_is_named() {
        let e = bad(&GOOD.replace("region = \"south\"", "region = \"west\""));
        assert_eq!(e.field, "idcs[2].region");
        assert_eq!(e.value, "west");
        assert!(e.to_string().contains("t.toml"));
    }

    #[test]
    fn unknown_local_idc_is_named() {
        let e = bad(&GOOD.replace("local_idc = \"bj-a\"", "local_idc = \"gz-a\""));
        assert_eq!((e.field.as_str(), e.value.as_str()), ("local_idc", "gz-a"));
    }

    #[test]
    fn missing_local_idc() {
        let e = bad(&GOOD.replace("local_idc = \"bj-a\"", ""));
        assert_eq!(e.field, "local_idc");
        assert!(e.reason.contains("HA_IDC"));
    }

    #[test]
    fn overlapping_cidrs() {
        let e = bad(&GOOD.replace("cidrs = [\"127.0.2.0/24\"]", "cidrs = [\"127.0.0.0/16\"]"));
        assert_eq!(e.field, "idcs[1].cidrs[0]");
        assert!(e.reason.contains("overlaps 127.0.1.0/24"), "{e}");
    }

    #[test]
    fn bad_durations() {
        let e = bad(&GOOD.replace("max_ttl = \"30s\"", "max_ttl = \"-3s\""));
        assert_eq!((e.field.as_str(), e.value.as_str()), ("dns.max_ttl", "-3s"));
        let e = bad(&GOOD.replace("max_ttl = \"30s\"", "max_ttl = \"0ms\""));
        assert_eq!(e.field, "dns.max_ttl");
        let e = bad(&GOOD.replace("max_ttl = \"30s\"", "max_ttl = \"30\""));
        assert!(e.reason.contains("unit"));
    }

    #[test]
    fn empty_resolvers() {
        let e = bad(&GOOD.replace("resolvers = [\"127.0.3.53:15353\"]", "resolvers = []"));
        assert_eq!(e.field, "regions[1].resolvers");
    }

    #[test]
    fn unknown_dns_region_and_bad_capacity() {
        let e = bad(&GOOD.replace("south = \"profile.north.lab.\"", "west = \"x.\""));
        assert_eq!(e.field, "dependencies.profile.dns.west");
        let e = bad(&GOOD.replace("capacity_rps = 2000", "capacity_rps = -5"));
        assert_eq!(e.field, "idcs[0].capacity_rps");
    }

    // === issue 14, A.4: errors with paths and positions, refusals, overrides, settings ===

    /// The line and column of the first occurrence of `needle` in `text`.
    fn pos(text: &str, needle: &str) -> (Option<u32>, Option<u32>) {
        let at = text.find(needle).unwrap();
        let (l, c) = line_column(text, at);
        (Some(l), Some(c))
    }

    #[test]
    fn toml_errors_name_the_dotted_path_and_line_column() {
        // Before: each of these said only "at byte 225..232".
        let text = GOOD.replace("port = 18081", "port = 18081\nprot = 1");
        let e = bad(&text);
        assert_eq!(e.field, "dependencies.profile.prot", "{e}");
        assert_eq!((e.line, e.column), pos(&text, "prot ="));
        assert!(e.reason.contains("unknown field"), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("t.toml:{}:", e.line.unwrap())),
            "{e}"
        );

        let text = GOOD.replace("port = 18081", "port = \"http\"");
        let e = bad(&text);
        assert_eq!(e.field, "dependencies.profile.port", "{e}");
        assert_eq!((e.line, e.column), pos(&text, "\"http\""));

        let text = GOOD.replace("port = 18081", "port = 70000");
        let e = bad(&text);
        assert_eq!(e.field, "dependencies.profile.port", "{e}");
        assert_eq!(e.line, pos(&text, "70000").0);

        let text = GOOD.replace("capacity_rps = 2000", "capacity_rps = 2000\nregion = \"x\"");
        let e = bad(&text);
        assert!(e.reason.contains("duplicate key"), "{e}");
        assert_eq!(e.field, "idcs.region", "{e}");
        assert_eq!(e.line, pos(&text, "region = \"x\"").0);

        let e = bad(&GOOD.replace("cidrs = [\"127.0.2.0/24\"]", "cidrs = \"127.0.2.0/24\""));
        assert_eq!(e.field, "idcs[1].cidrs", "{e}");
    }

    #[test]
    fn refused_values_that_used_to_pass() {
        let e = bad(&GOOD.replace("cidrs = [\"127.0.1.0/24\"]", "cidrs = [\"127.0.1.7/24\"]"));
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("idcs[0].cidrs[0]", "127.0.1.7/24")
        );
        assert!(e.reason.contains("127.0.1.0/24"), "{e}");
        let e = bad(&GOOD.replace(
            "[dependencies.cache]",
            "[dependencies.cache]\nallowed_cidrs = [\"127.0.1.1/16\"]",
        ));
        assert_eq!(e.field, "dependencies.cache.allowed_cidrs[0]");
        let e = bad(&format!(
            "{GOOD}\n[dependencies.\"\"]\nstatic_addrs = [\"127.0.1.1:1\"]\n"
        ));
        assert_eq!(e.field, "dependencies");
        let e = bad(&GOOD.replace("127.0.3.53:15353", "127.0.3.53:0"));
        assert_eq!(e.field, "regions[1].resolvers[0]");
        let e = bad(&GOOD.replace("127.0.1.20:6380", "127.0.1.20:0"));
        assert_eq!(e.field, "dependencies.cache.static_addrs[0]");
        let e = bad(&format!(
            "{GOOD}\n[health]\nfailure_rate_min_requests = 0\n"
        ));
        assert_eq!(e.field, "health.failure_rate_min_requests");
        let e = bad(&GOOD.replace(
            "max_ttl = \"30s\"",
            "max_ttl = \"30s\"\nquery_timeout = \"5000000000000000h\"",
        ));
        assert_eq!(e.field, "dns.query_timeout");
        assert!(
            e.reason.contains("at most 1m") || e.reason.contains("at most 60s"),
            "{e}"
        );
        let e = bad(&GOOD.replace(
            "max_ttl = \"30s\"",
            "max_ttl = \"30s\"\nserve_stale_for = \"100000h\"",
        ));
        assert_eq!(e.field, "dns.serve_stale_for");
    }

    #[test]
    fn clamp_ttl_never_panics() {
        let d = DnsSettings {
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(5),
            ..Default::default()
        };
        assert_eq!(d.clamp_ttl(Duration::from_secs(1)), Duration::from_secs(5));
    }

    #[test]
    fn per_dependency_overrides_and_backend_settings() {
        let text = GOOD.replace(
            "[dependencies.cache]\n",
            "[dependencies.cache]\nkind = \"redis\"\n",
        ) + r#"
[dependencies.cache.overrides.health]
consecutive_failures = 2
[dependencies.cache.overrides.dns]
ipv4_only = true
[dependencies.cache.overrides.balance]
explore = 0.0
[dependencies.cache.settings]
master_name = "members"
sentinels = { north = "s.north.lab." }
"#;
        let t = Topology::from_toml_str(&text, "t.toml").unwrap();
        assert_eq!(t.health_for("cache").consecutive_failures, 2);
        assert_eq!(t.health_for("profile").consecutive_failures, 5);
        assert!(t.dns_for("cache").ipv4_only);
        // Fields not overridden come from [dns].
        assert_eq!(t.dns_for("cache").min_ttl, Duration::from_millis(500));
        assert_eq!(t.balance_for("cache").explore, 0.0);
        let cache = t.dependency("cache").unwrap();
        assert_eq!(cache.kind.as_deref(), Some("redis"));
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Redis {
            master_name: String,
            sentinels: BTreeMap<String, String>,
        }
        let r: Redis = cache.settings().unwrap();
        assert_eq!(r.master_name, "members");
        assert_eq!(r.sentinels["north"], "s.north.lab.");

        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Strict {
            master_name: String,
        }
        let e = cache.settings::<Strict>().unwrap_err();
        assert_eq!(e.field, "dependencies.cache.settings.sentinels", "{e}");
        let e = t
            .dependency("profile")
            .unwrap()
            .settings::<Strict>()
            .unwrap_err();
        assert_eq!(e.field, "dependencies.profile.settings", "{e}");
        assert!(e.reason.contains("master_name"), "{e}");

        let e = bad(&text.replace("consecutive_failures = 2", "consecutive_failures = 0"));
        assert_eq!(
            e.field,
            "dependencies.cache.overrides.health.consecutive_failures"
        );
        let e = bad(&text.replace("ipv4_only = true", "ipv4_only = true\nttl = 3"));
        assert_eq!(e.field, "dependencies.cache.overrides.dns.ttl", "{e}");
    }

    #[test]
    fn syntax_error_names_file() {
        let e = bad("local_idc = ");
        assert!(e.to_string().starts_with("invalid config t.toml"), "{e}");
    }
}
