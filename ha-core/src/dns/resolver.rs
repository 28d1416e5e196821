//! One hickory resolver per region, asked local region first.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as HickoryDnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};

use crate::config::{Dependency, DnsSettings, Source, Topology};
use crate::error::{ConfigError, HaError};
use crate::metrics_names;

// === Answer ===

/// What one successful resolution gave.
///
/// An answer with no `addrs` (NXDOMAIN or NODATA) is still an answer: the region's DNS said the
/// name has no addresses, so [`DnsDiscovery`](super::DnsDiscovery) publishes an empty set. Only
/// *failures* (timeout, SERVFAIL, REFUSED, transport errors, answers with nothing but refused
/// addresses) make [`RegionalResolver::resolve`] ask the next region.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The allowed addresses, sorted and deduplicated.
    pub addrs: Vec<IpAddr>,
    /// Addresses of the answer outside [`Dependency::allowed_cidrs`], dropped (DNS poisoning).
    pub refused: Vec<IpAddr>,
    /// The smallest record TTL of the answer (the negative TTL for an empty answer), clamped by
    /// [`DnsSettings::clamp_ttl`].
    pub ttl: Duration,
    /// The region whose resolvers answered.
    pub region: Arc<str>,
    /// True when the answering region is not the local one.
    pub fallback: bool,
    /// The regions asked before the one that answered, and why each failed.
    pub failed: Vec<RegionAttempt>,
}

// === errors ===

/// Why one region's attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptError {
    /// No resolver of the region answered within `query_timeout`.
    Timeout(Duration),
    /// A resolver answered SERVFAIL.
    ServFail,
    /// A resolver answered REFUSED.
    Refused,
    /// A resolver answered another error code.
    ResponseCode(String),
    /// Every address of the answer was outside the allowed CIDRs.
    Poisoned {
        /// The refused addresses.
        refused: Vec<IpAddr>,
    },
    /// The query could not be sent or its answer not read (e.g. connection refused).
    Transport(String),
    /// The configured name is not a valid DNS name.
    InvalidName(String),
    /// Neither this region nor the local region has a name configured for the dependency.
    NoName,
    /// The region answered that the name has no addresses (NXDOMAIN or NODATA) while another
    /// region was being asked to confirm it (see [`DnsLookup::resolve_confirming`]).
    NoAddresses,
}

impl AttemptError {
    /// A short stable name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            AttemptError::Timeout(_) => "timeout",
            AttemptError::ServFail => "servfail",
            AttemptError::Refused => "refused",
            AttemptError::ResponseCode(_) => "response_code",
            AttemptError::Poisoned { .. } => "poisoned",
            AttemptError::Transport(_) => "transport",
            AttemptError::InvalidName(_) => "invalid_name",
            AttemptError::NoName => "no_name",
            AttemptError::NoAddresses => "no_addresses",
        }
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Timeout(t) => write!(f, "timed out after {t:?}"),
            AttemptError::ServFail => f.write_str("SERVFAIL"),
            AttemptError::Refused => f.write_str("REFUSED"),
            AttemptError::ResponseCode(c) => write!(f, "error response {c}"),
            AttemptError::Poisoned { refused } => {
                write!(f, "only addresses outside the allowed CIDRs: {refused:?}")
            }
            AttemptError::Transport(e) => write!(f, "transport error: {e}"),
            AttemptError::InvalidName(e) => write!(f, "invalid name: {e}"),
            AttemptError::NoName => f.write_str("no DNS name configured"),
            AttemptError::NoAddresses => f.write_str("no addresses (NXDOMAIN or NODATA)"),
        }
    }
}

/// One region's failed attempt: the region, the name asked and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionAttempt {
    /// The region.
    pub region: Arc<str>,
    /// The name that was asked (empty for [`AttemptError::NoName`]).
    pub name: String,
    /// What went wrong.
    pub error: AttemptError,
}

impl fmt::Display for RegionAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_empty() {
            write!(f, "{}: {}", self.region, self.error)
        } else {
            write!(f, "{} ({}): {}", self.region, self.name, self.error)
        }
    }
}

/// A resolution that gave no answer.
///
/// ```
/// use ha_core::dns::{AttemptError, DnsError, RegionAttempt};
/// let err = DnsError::AllRegionsFailed {
///     dependency: "profile".into(),
///     attempts: vec![RegionAttempt {
///         region: "north".into(),
///         name: "profile.north.lab.".into(),
///         error: AttemptError::ServFail,
///     }],
/// };
/// assert_eq!(err.to_string(), "dns resolution of profile failed in every region: north (profile.north.lab.): SERVFAIL");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    /// The dependency is not a DNS dependency (it has static addresses).
    #[error("dependency {dependency} is not resolved by dns")]
    NotDns {
        /// The dependency.
        dependency: Arc<str>,
    },
    /// Every region was asked and none answered; `attempts` says why, local region first.
    #[error(
        "dns resolution of {dependency} failed in every region: {}",
        join(attempts)
    )]
    AllRegionsFailed {
        /// The dependency.
        dependency: Arc<str>,
        /// What each region's attempt gave, in the order asked.
        attempts: Vec<RegionAttempt>,
    },
}

impl DnsError {
    /// The failed attempts, local region first (empty for [`DnsError::NotDns`]).
    pub fn attempts(&self) -> &[RegionAttempt] {
        match self {
            DnsError::NotDns { .. } => &[],
            DnsError::AllRegionsFailed { attempts, .. } => attempts,
        }
    }

    /// True when every attempt timed out.
    pub fn is_timeout(&self) -> bool {
        let a = self.attempts();
        !a.is_empty()
            && a.iter()
                .all(|x| matches!(x.error, AttemptError::Timeout(_)))
    }
}

fn join(attempts: &[RegionAttempt]) -> String {
    if attempts.is_empty() {
        return "no region to ask".into();
    }
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// === DnsLookup ===

/// Resolves a dependency: the seam between [`DnsDiscovery`](super::DnsDiscovery)'s refresh loop
/// and the network, implemented by [`RegionalResolver`] and by scripted fakes in tests.
pub trait DnsLookup: Send + Sync + 'static {
    /// Resolves `dependency` once.
    fn resolve(
        &self,
        dependency: &Dependency,
    ) -> impl Future<Output = Result<Answer, DnsError>> + Send;

    /// Resolves `dependency` to confirm an empty answer: asked after one region said the name
    /// has no addresses while addresses were published. Gives an empty answer only when every
    /// region agrees, the first region with addresses otherwise, and a failure when some region
    /// could not answer (the last set is then kept). The default asks [`DnsLookup::resolve`].
    fn resolve_confirming(
        &self,
        dependency: &Dependency,
    ) -> impl Future<Output = Result<Answer, DnsError>> + Send {
        self.resolve(dependency)
    }
}

// === RegionalResolver ===

/// One hickory resolver per region, whose name servers are exactly the region's configured
/// resolvers (UDP, with TCP for truncated answers). hickory's cache is off (`cache_size = 0`):
/// the answer cache is [`DnsDiscovery`](super::DnsDiscovery)'s published set.
///
/// ```no_run
/// # async fn demo(topo: &ha_core::Topology) -> Result<(), Box<dyn std::error::Error>> {
/// use ha_core::dns::RegionalResolver;
/// let resolver = RegionalResolver::new(topo)?;
/// let dep = topo.dependency("profile").expect("configured");
/// let answer = resolver.resolve(dep).await?;
/// println!("{:?} from {} (fallback: {})", answer.addrs, answer.region, answer.fallback);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RegionalResolver {
    /// Local region first.
    regions: Vec<RegionResolver>,
    local_region: Arc<str>,
    settings: DnsSettings,
}

#[derive(Clone)]
struct RegionResolver {
    name: Arc<str>,
    resolver: TokioResolver,
}

impl fmt::Debug for RegionalResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionalResolver")
            .field(
                "regions",
                &self.regions.iter().map(|r| &*r.name).collect::<Vec<_>>(),
            )
            .field("local_region", &self.local_region)
            .field("settings", &self.settings)
            .finish()
    }
}

impl RegionalResolver {
    /// Builds one resolver per region of `topology`, local region first, with the topology's
    /// `[dns]` settings.
    pub fn new(topology: &Topology) -> Result<RegionalResolver, HaError> {
        Self::with_settings(topology, *topology.dns())
    }

    /// Like [`RegionalResolver::new`] with the settings of one dependency (its `[dns]`
    /// overrides applied).
    pub fn for_dependency(
        topology: &Topology,
        dependency: &str,
    ) -> Result<RegionalResolver, HaError> {
        Self::with_settings(topology, *topology.dns_for(dependency))
    }

    fn with_settings(
        topology: &Topology,
        settings: DnsSettings,
    ) -> Result<RegionalResolver, HaError> {
        let mut regions = Vec::new();
        for region in topology.regions_local_first() {
            let servers = region
                .resolvers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut ns.connections {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect();
            let config = ResolverConfig::from_parts(None, Vec::new(), servers);
            let mut opts = ResolverOpts::default();
            // Our published set is the cache; hickory's would hide record changes from refreshes.
            opts.cache_size = 0;
            // Each family is timed by `ask` itself; hickory's own timeout is a backstop just
            // past it (and bounded, so no huge setting reaches its time arithmetic).
            opts.timeout = settings
                .query_timeout
                .saturating_add(Duration::from_millis(50))
                .min(Duration::from_secs(3600));
            // The refresh loop retries every `retry_interval` and other regions are the fallback:
            // a retry inside hickory would only delay both.
            opts.attempts = 0;
            opts.num_concurrent_reqs = 2;
            opts.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
            opts.edns0 = true;
            let mut builder =
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::new());
            *builder.options_mut() = opts;
            let resolver = builder.build().map_err(|e| {
                HaError::Config(ConfigError::new(
                    topology.file(),
                    format!("regions.{}.resolvers", region.name),
                    "",
                    format!("cannot build a resolver: {e}"),
                ))
            })?;
            regions.push(RegionResolver {
                name: region.name.clone(),
                resolver,
            });
        }
        Ok(RegionalResolver {
            regions,
            local_region: topology.local_region().name.clone(),
            settings,
        })
    }

    /// The DNS settings in use.
    pub fn settings(&self) -> &DnsSettings {
        &self.settings
    }

    /// Resolves `dependency`: the local region's resolvers first, querying the name configured
    /// for that region (or the local region's name when the region has none); on a failure
    /// (timeout after `query_timeout`, SERVFAIL, REFUSED, transport error, or an answer whose
    /// addresses are all outside the allowed CIDRs) the next region is asked.
    ///
    /// NXDOMAIN and NODATA are answers (with no addresses), not failures: the fallback is for
    /// DNS that cannot answer, not for DNS that says "no such host".
    pub async fn resolve(&self, dependency: &Dependency) -> Result<Answer, DnsError> {
        self.ask_regions(dependency, false).await
    }

    /// Like [`RegionalResolver::resolve`], but an empty answer does not end the search: every
    /// region is asked until one has addresses; the answer is empty only when every region says
    /// so (see [`DnsLookup::resolve_confirming`]).
    pub async fn resolve_confirming(&self, dependency: &Dependency) -> Result<Answer, DnsError> {
        self.ask_regions(dependency, true).await
    }

    async fn ask_regions(
        &self,
        dependency: &Dependency,
        confirming: bool,
    ) -> Result<Answer, DnsError> {
        let Source::Dns { names, .. } = &dependency.source else {
            return Err(DnsError::NotDns {
                dependency: dependency.name.clone(),
            });
        };
        let mut failed = Vec::new();
        let mut empty: Option<Answer> = None;
        for region in &self.regions {
            let Some(name) = names
                .get(&region.name)
                .or_else(|| names.get(&self.local_region))
            else {
                failed.push(RegionAttempt {
                    region: region.name.clone(),
                    name: String::new(),
                    error: AttemptError::NoName,
                });
                continue;
            };
            let outcome = self.ask(region, name, dependency).await;
            let label = match &outcome {
                Ok(_) => "ok",
                Err(AttemptError::Timeout(_)) => "timeout",
                Err(_) => "error",
            };
            metrics::counter!(metrics_names::DNS_LOOKUPS,
                "dependency" => dependency.name.to_string(),
                "region" => region.name.to_string(),
                "outcome" => label)
            .increment(1);
            match outcome {
                Ok(answer) if confirming && answer.addrs.is_empty() => {
                    tracing::debug!(dependency = %dependency.name, region = %region.name, "dns: empty answer, asking the next region to confirm");
                    failed.push(RegionAttempt {
                        region: region.name.clone(),
                        name: name.clone(),
                        error: AttemptError::NoAddresses,
                    });
                    if empty.is_none() {
                        empty = Some(answer);
                    }
                }
                Ok(mut answer) => {
                    tracing::debug!(dependency = %dependency.name, region = %region.name, addrs = ?answer.addrs, ttl = ?answer.ttl, "dns answer");
                    answer.fallback = region.name != self.local_region;
                    answer.failed = failed;
                    return Ok(answer);
                }
                Err(error) => {
                    tracing::debug!(dependency = %dependency.name, region = %region.name, %error, "dns attempt failed");
                    failed.push(RegionAttempt {
                        region: region.name.clone(),
                        name: name.clone(),
                        error,
                    });
                }
            }
        }
        // Confirming: empty only when every region that was asked said so.
        if let Some(mut answer) = empty
            && failed
                .iter()
                .all(|a| matches!(a.error, AttemptError::NoAddresses | AttemptError::NoName))
        {
            answer.fallback = answer.region != self.local_region;
            answer.failed = Vec::new();
            return Ok(answer);
        }
        Err(DnsError::AllRegionsFailed {
            dependency: dependency.name.clone(),
            attempts: failed,
        })
    }

    async fn ask(
        &self,
        region: &RegionResolver,
        name: &str,
        dependency: &Dependency,
    ) -> Result<Answer, AttemptError> {
        let mut qname =
            Name::from_ascii(name).map_err(|e| AttemptError::InvalidName(e.to_string()))?;
        // No search domains are configured: every configured name is absolute.
        qname.set_fqdn(true);
        let timeout = self.settings.query_timeout;
        // Belt and braces with cache_size = 0: never let hickory answer from memory.
        region.resolver.clear_cache();
        // Each family has its own timeout: a resolver that drops AAAA costs the AAAA query, never
        // the A answer (one shared timeout made such a region fail over to another region's
        // answer). A family the allowed CIDRs cannot accept is not asked at all.
        let (want_v4, want_v6) = families(dependency, &self.settings);
        let timed = |rtype: RecordType, wanted: bool| {
            let q = wanted.then(|| query(&region.resolver, qname.clone(), rtype));
            async move {
                let Some(q) = q else {
                    return Family::Skipped;
                };
                tokio::time::timeout(timeout, q)
                    .await
                    .unwrap_or(Family::Failed(AttemptError::Timeout(timeout)))
            }
        };
        let (v4, v6) = futures::future::join(
            timed(RecordType::A, want_v4),
            timed(RecordType::AAAA, want_v6),
        )
        .await;
        let (ips, ttl) = combine(v4, v6, timeout)?;
        let ttl = self
            .settings
            .clamp_ttl(ttl.unwrap_or(self.settings.min_ttl));
        let (mut addrs, mut refused): (Vec<IpAddr>, Vec<IpAddr>) =
            ips.into_iter().partition(|ip| dependency.allows(*ip));
        addrs.sort();
        addrs.dedup();
        refused.sort();
        refused.dedup();
        if !refused.is_empty() {
            metrics::counter!(metrics_names::DNS_POISONED,
                "dependency" => dependency.name.to_string(),
                "region" => region.name.to_string())
            .increment(refused.len() as u64);
            if addrs.is_empty() {
                return Err(AttemptError::Poisoned { refused });
            }
        }
        Ok(Answer {
            addrs,
            refused,
            ttl,
            region: region.name.clone(),
            fallback: false,
            failed: Vec::new(),
        })
    }
}

impl DnsLookup for RegionalResolver {
    fn resolve(
        &self,
        dependency: &Dependency,
    ) -> impl Future<Output = Result<Answer, DnsError>> + Send {
        RegionalResolver::resolve(self, dependency)
    }

    fn resolve_confirming(
        &self,
        dependency: &Dependency,
    ) -> impl Future<Output = Result<Answer, DnsError>> + Send {
        RegionalResolver::resolve_confirming(self, dependency)
    }
}

/// Which address families to ask for `dependency`: not AAAA with `ipv4_only`, and not a family
/// that no allowed CIDR covers (its every answer would be refused as poisoned).
fn families(dependency: &Dependency, settings: &DnsSettings) -> (bool, bool) {
    let v4 = dependency.allowed_cidrs.iter().any(|n| n.addr().is_ipv4());
    let v6 = dependency.allowed_cidrs.iter().any(|n| n.addr().is_ipv6());
    (v4, v6 && !settings.ipv4_only)
}

/// The result of one query of one record type.
enum Family {
    /// Addresses and the smallest record TTL.
    Records(Vec<IpAddr>, Option<Duration>),
    /// NXDOMAIN or NODATA, with the negative TTL when the SOA gave one.
    Empty(Option<Duration>),
    Failed(AttemptError),
    /// Not asked (see [`families`]).
    Skipped,
}

async fn query(resolver: &TokioResolver, name: Name, rtype: RecordType) -> Family {
    match resolver.lookup(name, rtype).await {
        Ok(lookup) => {
            let mut ips = Vec::new();
            let mut ttl: Option<u32> = None;
            for r in lookup.answers() {
                // CNAME TTLs count too: the chain is only as fresh as its shortest link.
                ttl = Some(ttl.map_or(r.ttl, |t| t.min(r.ttl)));
                match &r.data {
                    RData::A(a) => ips.push(IpAddr::V4(a.0)),
                    RData::AAAA(a) => ips.push(IpAddr::V6(a.0)),
                    _ => {}
                }
            }
            let ttl = ttl.map(|t| Duration::from_secs(u64::from(t)));
            if ips.is_empty() {
                Family::Empty(ttl)
            } else {
                Family::Records(ips, ttl)
            }
        }
        Err(NetError::Dns(HickoryDnsError::NoRecordsFound(nr))) => {
            Family::Empty(nr.negative_ttl.map(|t| Duration::from_secs(u64::from(t))))
        }
        Err(e) => Family::Failed(classify(e)),
    }
}

fn classify(e: NetError) -> AttemptError {
    match e {
        NetError::Timeout => AttemptError::Timeout(Duration::ZERO),
        NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::ServFail)) => {
            AttemptError::ServFail
        }
        NetError::Dns(HickoryDnsError::ResponseCode(ResponseCode::Refused)) => {
            AttemptError::Refused
        }
        NetError::Dns(HickoryDnsError::ResponseCode(code)) => {
            AttemptError::ResponseCode(code.to_string())
        }
        other => AttemptError::Transport(other.to_string()),
    }
}

/// Combines the A and AAAA results: addresses from either family make an answer; otherwise a
/// failure of either family fails the region; otherwise (both empty) the answer is empty.
fn combine(
    v4: Family,
    v6: Family,
    timeout: Duration,
) -> Result<(Vec<IpAddr>, Option<Duration>), AttemptError> {
    let min = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) | (None, x) => x,
    };
    let fix = |e: AttemptError| match e {
        AttemptError::Timeout(_) => AttemptError::Timeout(timeout),
        e => e,
    };
    match (v4, v6) {
        (Family::Records(mut a, ta), Family::Records(b, tb)) => {
            a.extend(b);
            Ok((a, min(ta, tb)))
        }
        (Family::Records(a, t), _) | (_, Family::Records(a, t)) => Ok((a, t)),
        (Family::Failed(e), _) | (_, Family::Failed(e)) => Err(fix(e)),
        (Family::Empty(ta), Family::Empty(tb)) => Ok((Vec::new(), min(ta, tb))),
        (Family::Empty(t), Family::Skipped) | (Family::Skipped, Family::Empty(t)) => {
            Ok((Vec::new(), t))
        }
        (Family::Skipped, Family::Skipped) => Ok((Vec::new(), None)),
    }
}
