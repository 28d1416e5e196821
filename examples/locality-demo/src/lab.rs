//! The demo's lab: two regional DNS servers and six `/who` backends, each behind a fault proxy.
//!
//! | IDC | region | backends (who :18080, proxy :18081) | DNS (:15353) |
//! |---|---|---|---|
//! | `bj-a` | north | 127.0.1.11, 127.0.1.12 | north 127.0.1.53 |
//! | `bj-b` | north | 127.0.2.11, 127.0.2.12 | |
//! | `sh-a` | south | 127.0.3.11, 127.0.3.12 | south 127.0.3.53 |
//!
//! Every port is shifted by the port offset. Both DNS servers publish the proxies' addresses for
//! [`DNS_NAME`]; the client only ever talks to the proxies, so a proxy fault is what the client
//! sees of a backend.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ha_lab::dns::{DnsMode, LabDns};
use ha_lab::http::WhoServer;
use ha_lab::proxy::{Fault, FaultProxy};

use crate::DemoError;

/// The DNS name of the `profile` dependency, in both regions.
pub const DNS_NAME: &str = "profile.north.lab.";
/// The zone the lab's DNS servers serve.
pub const ZONE: &str = "lab.";
/// The TTL of the published records, in seconds.
pub const RECORD_TTL_SECS: u32 = 1;
/// The IDCs of the lab: name, region and the third octet of their `127.0.x.0/24` range.
pub const IDCS: [(&str, &str, u8); 3] = [
    ("bj-a", "north", 1),
    ("bj-b", "north", 2),
    ("sh-a", "south", 3),
];
/// The address a poisoned answer adds (outside every allowed CIDR).
pub const POISON_IP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);

/// The ports of one lab, shifted by an offset so several labs can run side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// DNS (UDP and TCP) of both regions.
    pub dns: u16,
    /// The `/who` backends.
    pub who: u16,
    /// The fault proxies, the port published in DNS.
    pub proxy: u16,
}

impl Ports {
    /// The default ports (15353, 18080, 18081) plus `offset`.
    pub fn with_offset(offset: u16) -> Result<Ports, DemoError> {
        let add = |base: u16| {
            base.checked_add(offset)
                .ok_or_else(|| DemoError::Usage(format!("port offset {offset} is too large")))
        };
        Ok(Ports {
            dns: add(15353)?,
            who: add(18080)?,
            proxy: add(18081)?,
        })
    }
}

/// One backend: its `/who` server and the fault proxy in front of it.
#[derive(Debug)]
pub struct Backend {
    /// `who-<idc>-<n>`.
    pub name: String,
    /// The backend's IDC.
    pub idc: &'static str,
    /// The HTTP server.
    pub who: WhoServer,
    /// The proxy whose address DNS publishes.
    pub proxy: FaultProxy,
}

/// Everything the demo starts, stopped by [`DemoLab::stop`].
#[derive(Debug)]
pub struct DemoLab {
    /// The `north` region's DNS server (127.0.1.53).
    pub north: LabDns,
    /// The `south` region's DNS server (127.0.3.53).
    pub south: LabDns,
    /// Two backends per IDC, in the order of [`IDCS`].
    pub backends: Vec<Backend>,
    /// The ports in use.
    pub ports: Ports,
}

/// The `n`-th host address (11, 12, ...) of an IDC's range.
pub fn host_ip(octet: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, octet, host))
}

impl DemoLab {
    /// Starts both DNS servers and the six backends with their proxies, and publishes the
    /// proxies' addresses in both regions.
    pub async fn start(ports: Ports) -> Result<DemoLab, DemoError> {
        let north =
            LabDns::start("north", SocketAddr::new(host_ip(1, 53), ports.dns), ZONE).await?;
        let south =
            LabDns::start("south", SocketAddr::new(host_ip(3, 53), ports.dns), ZONE).await?;
        let mut backends = Vec::new();
        for (idc, _region, octet) in IDCS {
            for n in 1..=2u8 {
                let ip = host_ip(octet, 10 + n);
                let name = format!("who-{idc}-{n}");
                let who = WhoServer::start(&name, idc, SocketAddr::new(ip, ports.who)).await?;
                let proxy = FaultProxy::start(SocketAddr::new(ip, ports.proxy), who.addr()).await?;
                backends.push(Backend {
                    name,
                    idc,
                    who,
                    proxy,
                });
            }
        }
        let lab = DemoLab {
            north,
            south,
            backends,
            ports,
        };
        lab.publish_good_records()?;
        Ok(lab)
    }

    /// The proxies' IPs: what DNS publishes.
    pub fn proxy_ips(&self) -> Vec<IpAddr> {
        self.backends.iter().map(|b| b.proxy.addr().ip()).collect()
    }

    /// Publishes the six proxy IPs for [`DNS_NAME`] in both regions.
    pub fn publish_good_records(&self) -> Result<(), DemoError> {
        let ips = self.proxy_ips();
        self.north.set_records(DNS_NAME, &ips, RECORD_TTL_SECS)?;
        self.south.set_records(DNS_NAME, &ips, RECORD_TTL_SECS)?;
        Ok(())
    }

    /// The backends of one IDC.
    pub fn backends_of<'a>(&'a self, idc: &'a str) -> impl Iterator<Item = &'a Backend> + 'a {
        self.backends.iter().filter(move |b| b.idc == idc)
    }

    /// Undoes every fault: restarts stopped servers, sets every proxy to `Pass`, both DNS
    /// servers to `Serve` with the good records.
    pub async fn heal_all(&self) -> Result<(), DemoError> {
        for b in &self.backends {
            if !b.who.is_running().await {
                b.who.restart().await?;
            }
            if !b.proxy.is_running().await {
                b.proxy.restart().await?;
            }
            b.proxy.set_fault(Fault::Pass);
        }
        self.north.set_mode(DnsMode::Serve);
        self.south.set_mode(DnsMode::Serve);
        self.publish_good_records()
    }

    /// Stops everything the lab started.
    pub async fn stop(&self) {
        for b in &self.backends {
            b.proxy.stop().await;
            b.who.stop().await;
        }
        self.north.stop().await;
        self.south.stop().await;
    }
}
