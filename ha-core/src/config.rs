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
//! static_addrs = ["127.0.1.20:6380", "127.0.3.20:6380"]
//! ```
//!
//! Durations are written as strings with a unit: `"250ms"`, `"5s"`, `"2m"`, `"1h"`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

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
    fn parse(&self, file: &Path, field: &str) -> Result<Duration, ConfigError> {
        parse_duration(&self.0).map_err(|reason| ConfigError::new(file, field, &self.0, reason))
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
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
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
    port: Option<u16>,
    #[serde(default)]
    dns: BTreeMap<String, String>,
    #[serde(default)]
    static_addrs: Vec<String>,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
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
pub struct Region {
    /// The region's name, e.g. `north`.
    pub name: Arc<str>,
    /// The region's DNS resolvers, asked in order.
    pub resolvers: Vec<SocketAddr>,
}

/// A data center: a name, its region, the address ranges of its hosts and its capacity.
#[derive(Debug, Clone, PartialEq)]
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

/// One dependency of the service: where its endpoints come from and which addresses are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    /// The dependency's name, e.g. `profile`.
    pub name: Arc<str>,
    /// Where the endpoints come from.
    pub source: Source,
    /// Resolved addresses outside these ranges are refused (a DNS-poisoning guard). Empty means
    /// "the ranges of every configured IDC".
    pub allowed_cidrs: Vec<IpNet>,
}

impl Dependency {
    /// True when `ip` may be used for this dependency.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allowed_cidrs.iter().any(|net| net.contains(&ip))
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
        }
    }
}

impl DnsSettings {
    /// Clamps a TTL from an answer to `[min_ttl, max_ttl]`.
    pub fn clamp_ttl(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl)
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
        let raw: RawTopology = toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map(|s| format!("at byte {}..{}", s.start, s.end))
                .unwrap_or_default();
            ConfigError::new(file, field, "", e.message().to_string())
        })?;
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
                let net = IpNet::from_str(c.trim()).map_err(|_| {
                    err(
                        format!("idcs[{i}].cidrs[{j}]"),
                        c,
                        "not a CIDR such as 10.1.0.0/16",
                    )
                })?;
                cidrs.push(net.trunc());
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
        let dns = validate_dns(&raw.dns, file)?;
        let health = validate_health(&raw.health, file)?;
        let balance = validate_balance(&raw.balance, file)?;

        // Dependencies.
        let idc_ranges: Vec<IpNet> = idcs.iter().flat_map(|d| d.cidrs.iter().copied()).collect();
        let mut dependencies = BTreeMap::new();
        for (name, d) in &raw.dependencies {
            let f = |k: &str| format!("dependencies.{name}.{k}");
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
                        addrs.push(a);
                    }
                    Source::Static(addrs)
                }
            };
            let mut allowed = Vec::new();
            for (j, c) in d.allowed_cidrs.iter().enumerate() {
                allowed.push(IpNet::from_str(c.trim()).map_err(|_| {
                    err(
                        f(&format!("allowed_cidrs[{j}]")),
                        c,
                        "not a CIDR such as 10.1.0.0/16",
                    )
                })?);
            }
            if allowed.is_empty() {
                allowed = idc_ranges.clone();
            }
            let name: Arc<str> = name.as_str().into();
            dependencies.insert(
                name.clone(),
                Dependency {
                    name,
                    source,
                    allowed_cidrs: allowed,
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

fn validate_dns(raw: &RawDns, file: &Path) -> Result<DnsSettings, ConfigError> {
    let mut s = DnsSettings::default();
    if let Some(d) = &raw.min_ttl {
        s.min_ttl = d.parse(file, "dns.min_ttl")?;
    }
    if let Some(d) = &raw.max_ttl {
        s.max_ttl = d.parse(file, "dns.max_ttl")?;
    }
    if s.min_ttl > s.max_ttl {
        return Err(ConfigError::new(
            file,
            "dns.min_ttl",
            format!("{:?}", s.min_ttl),
            format!("must not exceed dns.max_ttl ({:?})", s.max_ttl),
        ));
    }
    if let Some(f) = raw.refresh_ahead {
        if !(f > 0.0 && f <= 1.0) {
            return Err(ConfigError::new(
                file,
                "dns.refresh_ahead",
                f,
                "must be in (0, 1]",
            ));
        }
        s.refresh_ahead = f;
    }
    if let Some(d) = &raw.serve_stale_for {
        s.serve_stale_for = d.parse(file, "dns.serve_stale_for")?;
    }
    if let Some(d) = &raw.query_timeout {
        s.query_timeout = d.parse(file, "dns.query_timeout")?;
    }
    if let Some(d) = &raw.retry_interval {
        s.retry_interval = d.parse(file, "dns.retry_interval")?;
    }
    Ok(s)
}

fn validate_health(raw: &RawHealth, file: &Path) -> Result<HealthSettings, ConfigError> {
    let mut s = HealthSettings::default();
    if let Some(n) = raw.consecutive_failures {
        if n == 0 {
            return Err(ConfigError::new(
                file,
                "health.consecutive_failures",
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
                "health.failure_rate",
                r,
                "must be in (0, 1]",
            ));
        }
        s.failure_rate = r;
    }
    if let Some(n) = raw.failure_rate_min_requests {
        s.failure_rate_min_requests = n.max(1);
    }
    if let Some(d) = &raw.window {
        s.window = d.parse(file, "health.window")?;
    }
    if let Some(d) = &raw.base_ejection {
        s.base_ejection = d.parse(file, "health.base_ejection")?;
    }
    if let Some(d) = &raw.max_ejection {
        s.max_ejection = d.parse(file, "health.max_ejection")?;
    }
    if let Some(d) = &raw.probe_timeout {
        s.probe_timeout = d.parse(file, "health.probe_timeout")?;
        if s.probe_timeout.is_zero() {
            return Err(ConfigError::new(
                file,
                "health.probe_timeout",
                format!("{:?}", s.probe_timeout),
                "must be more than 0",
            ));
        }
    }
    if s.base_ejection > s.max_ejection {
        return Err(ConfigError::new(
            file,
            "health.base_ejection",
            format!("{:?}", s.base_ejection),
            format!("must not exceed health.max_ejection ({:?})", s.max_ejection),
        ));
    }
    if let Some(p) = raw.max_ejected_percent {
        if !(0.0..=100.0).contains(&p) {
            return Err(ConfigError::new(
                file,
                "health.max_ejected_percent",
                p,
                "must be in [0, 100]",
            ));
        }
        s.max_ejected_percent = p;
    }
    Ok(s)
}

fn validate_balance(raw: &RawBalance, file: &Path) -> Result<BalanceSettings, ConfigError> {
    let mut s = BalanceSettings::default();
    if let Some(o) = raw.overprovisioning {
        if !(o.is_finite() && o >= 1.0) {
            return Err(ConfigError::new(
                file,
                "balance.overprovisioning",
                o,
                "must be at least 1.0",
            ));
        }
        s.overprovisioning = o;
    }
    if let Some(p) = raw.panic_threshold {
        if !(0.0..=1.0).contains(&p) {
            return Err(ConfigError::new(
                file,
                "balance.panic_threshold",
                p,
                "must be in [0, 1]",
            ));
        }
        s.panic_threshold = p;
    }
    if let Some(d) = &raw.failback_hold {
        s.failback_hold = d.parse(file, "balance.failback_hold")?;
    }
    if let Some(d) = &raw.ewma_decay {
        s.ewma_decay = d.parse(file, "balance.ewma_decay")?;
    }
    if let Some(e) = raw.explore {
        if !(0.0..=0.5).contains(&e) {
            return Err(ConfigError::new(
                file,
                "balance.explore",
                e,
                "must be in [0, 0.5]",
            ));
        }
        s.explore = e;
    }
    Ok(s)
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

    #[test]
    fn syntax_error_names_file() {
        let e = bad("local_idc = ");
        assert!(e.to_string().starts_with("invalid config t.toml"), "{e}");
    }
}
