//! IDC classification of addresses (longest-prefix CIDR match) and locality relative to the local IDC.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::Idc;

/// Where an endpoint is relative to the local IDC. Ordered nearest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// In the local IDC.
    SameIdc,
    /// In another IDC of the local region.
    SameRegion,
    /// In another region, or in no configured IDC.
    Remote,
}

impl Locality {
    /// All tiers, nearest first.
    pub const ALL: [Locality; 3] = [Locality::SameIdc, Locality::SameRegion, Locality::Remote];

    /// The tier's index, 0 for `SameIdc`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short stable name for labels: `same_idc`, `same_region`, `remote`.
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::SameIdc => "same_idc",
            Locality::SameRegion => "same_region",
            Locality::Remote => "remote",
        }
    }
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The IDC (and region) an address belongs to, and its locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The IDC, or `None` for an address in no configured range.
    pub idc: Option<Arc<str>>,
    /// The IDC's region.
    pub region: Option<Arc<str>>,
    /// Relative to the local IDC.
    pub locality: Locality,
}

/// Classifies addresses into IDCs by longest-prefix match over every IDC's CIDRs.
///
/// ```
/// use ha_core::{Locality, Topology};
///
/// let topo = Topology::from_toml_str(r#"
/// local_idc = "bj-a"
/// [[regions]]
/// name = "north"
/// resolvers = ["127.0.1.53"]
/// [[regions]]
/// name = "south"
/// resolvers = ["127.0.3.53"]
/// [[idcs]]
/// name = "bj-a"
/// region = "north"
/// cidrs = ["127.0.1.0/24"]
/// [[idcs]]
/// name = "bj-b"
/// region = "north"
/// cidrs = ["127.0.2.0/24"]
/// [[idcs]]
/// name = "sh-a"
/// region = "south"
/// cidrs = ["127.0.3.0/24"]
/// "#, "t.toml").unwrap();
/// let c = topo.classifier();
/// assert_eq!(c.classify("127.0.1.7".parse().unwrap()).locality, Locality::SameIdc);
/// assert_eq!(c.classify("127.0.2.7".parse().unwrap()).locality, Locality::SameRegion);
/// assert_eq!(c.classify("127.0.3.7".parse().unwrap()).locality, Locality::Remote);
/// assert_eq!(c.classify("10.9.9.9".parse().unwrap()).idc, None);
/// ```
#[derive(Debug, Clone)]
pub struct IdcClassifier {
    /// (range, idc index), longest prefix first.
    ranges: Vec<(IpNet, usize)>,
    idcs: Vec<(Arc<str>, Arc<str>)>,
    local_idc: Arc<str>,
    local_region: Arc<str>,
}

impl IdcClassifier {
    /// Builds a classifier for `idcs`, with localities relative to `local_idc`.
    pub fn new(idcs: &[Idc], local_idc: &str) -> IdcClassifier {
        let mut ranges: Vec<(IpNet, usize)> = idcs
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.cidrs.iter().map(move |c| (*c, i)))
            .collect();
        ranges.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        let local_region = idcs
            .iter()
            .find(|d| &*d.name == local_idc)
            .map(|d| d.region.clone())
            .unwrap_or_else(|| "".into());
        IdcClassifier {
            ranges,
            idcs: idcs
                .iter()
                .map(|d| (d.name.clone(), d.region.clone()))
                .collect(),
            local_idc: local_idc.into(),
            local_region,
        }
    }

    /// The local IDC's name.
    pub fn local_idc(&self) -> &Arc<str> {
        &self.local_idc
    }

    /// The local region's name.
    pub fn local_region(&self) -> &Arc<str> {
        &self.local_region
    }

    /// The placement of `ip`: its IDC by longest prefix, and its locality.
    pub fn classify(&self, ip: IpAddr) -> Placement {
        let hit = self
            .ranges
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, i)| &self.idcs[*i]);
        match hit {
            Some((idc, region)) => Placement {
                idc: Some(idc.clone()),
                region: Some(region.clone()),
                locality: self.locality_of(idc, region),
            },
            None => Placement {
                idc: None,
                region: None,
                locality: Locality::Remote,
            },
        }
    }

    /// The locality of an IDC of `region`.
    pub fn locality_of(&self, idc: &str, region: &str) -> Locality {
        if idc == &*self.local_idc {
            Locality::SameIdc
        } else if region == &*self.local_region {
            Locality::SameRegion
        } else {
            Locality::Remote
        }
    }

    /// Classifies a socket address into an [`Endpoint`].
    pub fn endpoint(&self, addr: SocketAddr) -> Endpoint {
        let p = self.classify(addr.ip());
        Endpoint {
            addr,
            idc: p.idc,
            region: p.region,
            locality: p.locality,
            meta: EndpointMeta::default(),
        }
    }
}

/// One address of a dependency with its placement, and what a backend knows about it.
///
/// Built by [`IdcClassifier::endpoint`]; a backend adds its own facts with
/// [`Endpoint::with_role`], [`Endpoint::with_cluster`] and [`Endpoint::with_name`] (a Sentinel
/// replica watcher marks replicas, a RocketMQ route poller names the broker and its cluster)
/// instead of forking the type.
///
/// ```
/// use ha_core::{IdcClassifier, Role};
/// let c = IdcClassifier::new(&[], "bj-a");
/// let e = c.endpoint("127.0.1.20:6380".parse().unwrap()).with_role(Role::Replica);
/// assert_eq!(e.meta.role, Some(Role::Replica));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Endpoint {
    /// The address calls go to.
    pub addr: SocketAddr,
    /// The IDC the address is in, `None` when it is in no configured range.
    pub idc: Option<Arc<str>>,
    /// The region of that IDC.
    pub region: Option<Arc<str>>,
    /// Relative to the local IDC.
    pub locality: Locality,
    /// What the backend that published the endpoint knows about it.
    pub meta: EndpointMeta,
}

/// The role of a node in a replicated group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// Takes writes (a Redis master, a MySQL primary, a RocketMQ master broker).
    Primary,
    /// Serves reads and follows a primary.
    Replica,
}

impl Role {
    /// `primary` or `replica`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Backend facts about an endpoint; every field is optional and empty by default. Two
/// endpoints with the same address but different facts are different to a
/// [`Publisher`](crate::discovery::Publisher): a role change is published as a change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct EndpointMeta {
    /// The node's role, when the backend knows it.
    pub role: Option<Role>,
    /// The cluster the node belongs to (a RocketMQ cluster, a Redis master name).
    pub cluster: Option<Arc<str>>,
    /// The node's own name (a broker name, a MySQL server id).
    pub name: Option<Arc<str>>,
}

impl Endpoint {
    /// The IDC's name, or `"unknown"`.
    pub fn idc_name(&self) -> &str {
        self.idc.as_deref().unwrap_or("unknown")
    }

    /// The endpoint with its role set.
    pub fn with_role(mut self, role: Role) -> Endpoint {
        self.meta.role = Some(role);
        self
    }

    /// The endpoint with its cluster identity set.
    pub fn with_cluster(mut self, cluster: impl Into<Arc<str>>) -> Endpoint {
        self.meta.cluster = Some(cluster.into());
        self
    }

    /// The endpoint with its node name set.
    pub fn with_name(mut self, name: impl Into<Arc<str>>) -> Endpoint {
        self.meta.name = Some(name.into());
        self
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.addr, self.idc_name(), self.locality)
    }
}
