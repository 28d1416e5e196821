//! A per-region authoritative DNS server built on hickory-server, changed at run time.
//!
//! [`LabDns`] serves one zone over UDP and TCP on the same address. Records live in an
//! `arc-swap`ped map read by a custom [`RequestHandler`], so [`LabDns::set_records`] is effective
//! for the very next query, and the handler also implements the failure modes of [`DnsMode`]
//! and counts queries.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ha_lab::LabError> {
//! use ha_lab::dns::{DnsMode, LabDns};
//! let dns = LabDns::start("north", "127.0.1.53:0".parse().unwrap(), "lab.").await?;
//! dns.set_records("profile.north", &["127.0.1.11".parse().unwrap()], 1)?;
//! dns.set_mode(DnsMode::Silent); // clients now time out
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use hickory_proto::{
    op::{Edns, Header, HeaderCounts, Metadata, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, SOA},
    },
};
use hickory_server::{
    Server,
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::Mutex,
};

use crate::LabError;

/// How a [`LabDns`] answers queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DnsMode {
    /// Answer normally from the zone's records.
    Serve,
    /// Receive queries and never answer: clients time out.
    Silent,
    /// Answer every query with `REFUSED`.
    Refused,
    /// Answer every query with `SERVFAIL`.
    ServFail,
}

impl DnsMode {
    fn to_u8(self) -> u8 {
        match self {
            DnsMode::Serve => 0,
            DnsMode::Silent => 1,
            DnsMode::Refused => 2,
            DnsMode::ServFail => 3,
        }
    }

    fn from_u8(v: u8) -> DnsMode {
        match v {
            1 => DnsMode::Silent,
            2 => DnsMode::Refused,
            3 => DnsMode::ServFail,
            _ => DnsMode::Serve,
        }
    }
}

/// Idle timeout of a TCP DNS connection.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`LabDns::stop`] waits for hickory's graceful shutdown before aborting its tasks.
const STOP_GRACE: Duration = Duration::from_secs(2);

// === impl LabDns ===

/// A running authoritative DNS server for one region of the lab.
pub struct LabDns {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<Server<Handler>>>,
}

struct Shared {
    region: String,
    zone: Name,
    soa: ArcSwap<Record>,
    records: ArcSwap<HashMap<Name, Vec<Record>>>,
    mode: AtomicU8,
    queries: AtomicU64,
    drop_aaaa: AtomicBool,
}

impl std::fmt::Debug for LabDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabDns")
            .field("region", &self.shared.region)
            .field("zone", &self.shared.zone.to_string())
            .field("addr", &self.addr)
            .field("mode", &self.mode())
            .finish()
    }
}

impl LabDns {
    /// Serves zone `zone` (e.g. `"lab."`) on UDP and TCP at `bind` (port 0 allowed: one free port
    /// is chosen for both). `region` is a label for logs and `lab.json`.
    pub async fn start(region: &str, bind: SocketAddr, zone: &str) -> Result<LabDns, LabError> {
        let zone_name = parse_fqdn(zone)?;
        let soa = soa_record(&zone_name, 1)?;
        let shared = Arc::new(Shared {
            region: region.to_owned(),
            zone: zone_name,
            soa: ArcSwap::from_pointee(soa),
            records: ArcSwap::from_pointee(HashMap::new()),
            mode: AtomicU8::new(DnsMode::Serve.to_u8()),
            queries: AtomicU64::new(0),
            drop_aaaa: AtomicBool::new(false),
        });
        let (udp, tcp) = bind_pair(bind).await?;
        let addr = udp
            .local_addr()
            .map_err(|e| LabError::io(format!("local address of dns {region}"), e))?;
        let server = serve(&shared, udp, tcp);
        tracing::info!(region, %addr, zone, "lab dns started");
        Ok(LabDns {
            shared,
            addr,
            server: Mutex::new(Some(server)),
        })
    }

    /// The bound address (the same port for UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The region label given at start.
    pub fn region(&self) -> &str {
        &self.shared.region
    }

    /// Replaces all A and AAAA records of `name` (absolute, or relative to the zone, e.g.
    /// `"profile.north.lab."` or `"profile.north"`) with `ips`, TTL `ttl_secs`. Effective for the
    /// next query. An empty `ips` leaves the name existing with no addresses (NODATA).
    pub fn set_records(&self, name: &str, ips: &[IpAddr], ttl_secs: u32) -> Result<(), LabError> {
        let name = self.shared.in_zone(name)?;
        let records: Vec<Record> = ips
            .iter()
            .map(|ip| {
                let rdata = match ip {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                Record::from_rdata(name.clone(), ttl_secs, rdata)
            })
            .collect();
        self.shared.records.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(name.clone(), records.clone());
            map
        });
        tracing::debug!(region = %self.shared.region, %name, ?ips, ttl_secs, "dns records set");
        Ok(())
    }

    /// Removes every record of `name` (it answers NXDOMAIN afterwards).
    pub fn remove(&self, name: &str) -> Result<(), LabError> {
        let name = self.shared.in_zone(name)?;
        self.shared.records.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.remove(&name);
            map
        });
        Ok(())
    }

    /// The addresses currently published for `name` (empty when unknown).
    pub fn records(&self, name: &str) -> Result<Vec<IpAddr>, LabError> {
        let name = self.shared.in_zone(name)?;
        let map = self.shared.records.load();
        Ok(map
            .get(&name)
            .map(|rs| rs.iter().filter_map(record_ip).collect())
            .unwrap_or_default())
    }

    /// Sets how queries are answered, effective at once.
    pub fn set_mode(&self, mode: DnsMode) {
        tracing::info!(region = %self.shared.region, ?mode, "dns mode set");
        self.shared.mode.store(mode.to_u8(), Ordering::SeqCst);
    }

    /// When `true`, AAAA queries get no answer at all (a resolver or middlebox that drops them;
    /// clients time out on AAAA) while every other query is answered as the mode says.
    pub fn set_drop_aaaa(&self, drop: bool) {
        tracing::info!(region = %self.shared.region, drop, "dns drop AAAA set");
        self.shared.drop_aaaa.store(drop, Ordering::SeqCst);
    }

    /// Sets the negative TTL (the SOA's TTL and minimum, default 1 s) that NXDOMAIN and NODATA
    /// answers carry, e.g. a long one as real zones have.
    pub fn set_negative_ttl(&self, secs: u32) -> Result<(), LabError> {
        self.shared
            .soa
            .store(Arc::new(soa_record(&self.shared.zone, secs)?));
        Ok(())
    }

    /// The current answering mode.
    pub fn mode(&self) -> DnsMode {
        DnsMode::from_u8(self.shared.mode.load(Ordering::SeqCst))
    }

    /// Number of queries received since start (in any mode).
    pub fn queries(&self) -> u64 {
        self.shared.queries.load(Ordering::SeqCst)
    }

    /// True while the sockets are open.
    pub async fn is_running(&self) -> bool {
        self.server.lock().await.is_some()
    }

    /// Closes the sockets and stops answering (a dead DNS server: UDP clients get
    /// port-unreachable, TCP connects are refused). Idempotent.
    pub async fn stop(&self) {
        let Some(mut server) = self.server.lock().await.take() else {
            return;
        };
        // Graceful shutdown ends the accept/receive loops; open TCP connections could linger
        // until their idle timeout, so give up after a grace period and drop (abort) the tasks.
        match tokio::time::timeout(STOP_GRACE, server.shutdown_gracefully()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(region = %self.shared.region, error = %e, "dns shutdown"),
            Err(_) => tracing::debug!(region = %self.shared.region, "dns shutdown grace elapsed"),
        }
        drop(server);
        tracing::info!(region = %self.shared.region, addr = %self.addr, "lab dns stopped");
    }

    /// Re-opens on the same address with the same records and mode. On a running server this
    /// is a stop followed by a start.
    pub async fn restart(&self) -> Result<(), LabError> {
        self.stop().await;
        let mut guard = self.server.lock().await;
        let (udp, tcp) = bind_pair(self.addr).await?;
        *guard = Some(serve(&self.shared, udp, tcp));
        tracing::info!(region = %self.shared.region, addr = %self.addr, "lab dns restarted");
        Ok(())
    }
}

fn serve(shared: &Arc<Shared>, udp: UdpSocket, tcp: TcpListener) -> Server<Handler> {
    let mut server = Server::new(Handler(shared.clone()));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT, 16);
    server
}

/// Binds UDP and TCP on the same port; with port 0 retries a few times until a port is free
/// for both.
async fn bind_pair(bind: SocketAddr) -> Result<(UdpSocket, TcpListener), LabError> {
    let attempts = if bind.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = UdpSocket::bind(bind)
            .await
            .map_err(|source| LabError::Bind { addr: bind, source })?;
        let addr = udp
            .local_addr()
            .map_err(|source| LabError::Bind { addr: bind, source })?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) => last = Some(LabError::Bind { addr, source }),
        }
    }
    Err(last.unwrap_or(LabError::Bind {
        addr: bind,
        source: std::io::Error::other("no free port"),
    }))
}

fn parse_fqdn(name: &str) -> Result<Name, LabError> {
    let mut n = Name::from_ascii(name).map_err(|e| LabError::InvalidName {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n.to_lowercase())
}

fn soa_record(zone: &Name, negative_ttl: u32) -> Result<Record, LabError> {
    let prefixed = |label: &str| {
        Name::from_ascii(label)
            .and_then(|l| l.append_name(zone))
            .map_err(|e| LabError::InvalidName {
                name: zone.to_string(),
                reason: e.to_string(),
            })
    };
    let soa = SOA::new(
        prefixed("ns")?,
        prefixed("hostmaster")?,
        1,
        60,
        10,
        600,
        negative_ttl,
    );
    Ok(Record::from_rdata(
        zone.clone(),
        negative_ttl,
        RData::SOA(soa),
    ))
}

fn record_ip(r: &Record) -> Option<IpAddr> {
    match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

impl Shared {
    /// Resolves `name` relative to the zone unless it is absolute, and checks it is inside.
    fn in_zone(&self, name: &str) -> Result<Name, LabError> {
        let invalid = |reason: String| LabError::InvalidName {
            name: name.to_owned(),
            reason,
        };
        let parsed = Name::from_ascii(name).map_err(|e| invalid(e.to_string()))?;
        let full = if parsed.is_fqdn() {
            parsed
        } else {
            parsed
                .append_name(&self.zone)
                .map_err(|e| invalid(e.to_string()))?
        };
        let full = full.to_lowercase();
        if !self.zone.zone_of(&full) {
            return Err(invalid(format!("outside zone {}", self.zone)));
        }
        Ok(full)
    }
}

// === impl Handler ===

struct Handler(Arc<Shared>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let shared = &self.0;
        shared.queries.fetch_add(1, Ordering::SeqCst);
        let mode = DnsMode::from_u8(shared.mode.load(Ordering::SeqCst));
        let not_sent = || {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let mut edns = None;
        if let Some(req_edns) = &request.edns {
            let mut e = Edns::new();
            e.set_max_payload(req_edns.max_payload().max(512));
            edns = Some(e);
        }
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let code = match mode {
            DnsMode::Silent => return not_sent(),
            DnsMode::Refused => Some(ResponseCode::Refused),
            DnsMode::ServFail => Some(ResponseCode::ServFail),
            DnsMode::Serve => None,
        };
        let result = if let Some(code) = code {
            response_handle
                .send_response(builder.error_msg(&request.metadata, code))
                .await
        } else {
            let Ok(info) = request.request_info() else {
                return match response_handle
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::FormErr))
                    .await
                {
                    Ok(info) => info,
                    Err(_) => not_sent(),
                };
            };
            let qname: Name = Name::from(info.query.name()).to_lowercase();
            let qtype = info.query.query_type();
            if qtype == RecordType::AAAA && shared.drop_aaaa.load(Ordering::SeqCst) {
                return not_sent();
            }
            if !shared.zone.zone_of(&qname) {
                response_handle
                    .send_response(builder.error_msg(&request.metadata, ResponseCode::Refused))
                    .await
            } else {
                let map = shared.records.load_full();
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                let is_apex = qname == shared.zone;
                let entry = map.get(&qname);
                let answers: Vec<&Record> = match entry {
                    Some(rs) => rs
                        .iter()
                        .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                        .collect(),
                    None => Vec::new(),
                };
                let soa_record = shared.soa.load_full();
                let soa_answer = is_apex && matches!(qtype, RecordType::SOA | RecordType::ANY);
                if entry.is_none() && !is_apex {
                    metadata.response_code = ResponseCode::NXDomain;
                }
                let answers: Vec<&Record> = if soa_answer {
                    answers.into_iter().chain([&*soa_record]).collect()
                } else {
                    answers
                };
                let soa: Vec<&Record> = if answers.is_empty() {
                    vec![&*soa_record]
                } else {
                    Vec::new()
                };
                response_handle
                    .send_response(builder.build(metadata, answers, Vec::new(), soa, Vec::new()))
                    .await
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(region = %shared.region, error = %e, "dns response not sent");
                not_sent()
            }
        }
    }
}
