//! The settings of a `kind = "rocketmq"` dependency in a ha-core topology file, read by
//! [`ProducerConfig::from_context`] and [`ConsumerConfig::from_context`], and the cluster checks
//! the producer's and the consumer's configs share.
//!
//! ```toml
//! [dependencies.events]
//! kind = "rocketmq"
//! [dependencies.events.settings]
//! group = "membership"            # the producer group (the consumer's is given in code)
//! attempt_timeout = "400ms"       # optional, default 400ms
//! deadline = "2s"                 # optional, default 2s
//! spool_dir = "/var/lib/x/spool"  # optional: the spool is off without it
//! spool_max_bytes = 1073741824    # optional, default 1 GiB; needs spool_dir
//! [[dependencies.events.settings.clusters]]
//! idc = "bj-a"
//! name_servers = ["127.0.1.220:9876"]
//! [[dependencies.events.settings.clusters]]
//! idc = "sh-a"
//! name_servers = ["127.0.3.220:9876"]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_core::config::parse_duration_at_most;
use ha_core::{ConfigError, HaContext};
use serde::Deserialize;

use crate::error::MqError;
use crate::producer::ClusterConfig;
#[cfg(doc)]
use crate::{ConsumerConfig, ProducerConfig};

/// The `kind` a RocketMQ dependency has in the topology file.
pub const KIND: &str = "rocketmq";

/// `[dependencies.NAME.settings]` of a RocketMQ dependency, as written (unknown fields are
/// refused). Durations are strings (`"400ms"`, `"2s"`), read with
/// [`ha_core::config::parse_duration`], each at most 24 h.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MqSettings {
    /// The producer group (required by [`ProducerConfig::from_context`]).
    pub group: Option<String>,
    /// [`ProducerConfig::attempt_timeout`] (default 400 ms).
    pub attempt_timeout: Option<String>,
    /// [`ProducerConfig::deadline`] (default 2 s).
    pub deadline: Option<String>,
    /// The spool's directory; the spool is off without it.
    pub spool_dir: Option<PathBuf>,
    /// The spool's bound on disk, [`SpoolConfig::max_bytes`](crate::spool::SpoolConfig::max_bytes)
    /// (default 1 GiB).
    pub spool_max_bytes: Option<u64>,
    /// One cluster per IDC.
    #[serde(default)]
    pub clusters: Vec<ClusterSettings>,
}

/// One `[[dependencies.NAME.settings.clusters]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterSettings {
    /// The IDC the cluster runs in: one of the topology's IDCs.
    pub idc: String,
    /// The cluster's name servers, `IP:port`.
    #[serde(default)]
    pub name_servers: Vec<String>,
    /// Instead of `name_servers`: another dependency of the topology whose endpoints are the
    /// cluster's name servers (its `dns` names per region with its `port`, resolved through
    /// ha-core's per-region DNS, or its `static_addrs`). Resolved once, when the config is
    /// made by [`ProducerConfig::discover`](crate::ProducerConfig::discover) or
    /// [`ConsumerConfig::discover`](crate::ConsumerConfig::discover).
    #[serde(default)]
    pub name_servers_from: Option<String>,
}

/// The name servers of every `name_servers_from` dependency, by name.
pub(crate) type Resolved = std::collections::HashMap<String, Vec<SocketAddr>>;

/// Resolves every `name_servers_from` of dependency `name` through `ctx`'s discovery (each
/// waits for its first answer, as `HaContext::discover` does). Unknown names are left for
/// [`read`] to report.
pub(crate) async fn resolve(ctx: &HaContext, name: &str) -> Result<Resolved, MqError> {
    let topology = ctx.topology();
    let dep = topology.require_dependency(name)?;
    let settings: MqSettings = dep.settings()?;
    let mut out = Resolved::new();
    for (i, c) in settings.clusters.iter().enumerate() {
        let Some(from) = &c.name_servers_from else {
            continue;
        };
        if out.contains_key(from) || topology.dependency(from).is_none() {
            continue;
        }
        let discovery = ctx.discover(from).await.map_err(|e| {
            ConfigError::new(
                topology.file(),
                format!("dependencies.{name}.settings.clusters[{i}].name_servers_from"),
                from,
                format!("cannot discover it: {e}"),
            )
        })?;
        let addrs: Vec<SocketAddr> = discovery
            .watch()
            .borrow()
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        out.insert(from.clone(), addrs);
    }
    Ok(out)
}

/// What [`read`] found: the settings, the clusters (local IDC first) and where errors point.
pub(crate) struct Read {
    pub(crate) settings: MqSettings,
    pub(crate) clusters: Vec<ClusterConfig>,
    pub(crate) file: PathBuf,
    pub(crate) prefix: String,
}

impl Read {
    /// The dotted path of a settings field.
    pub(crate) fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A duration setting, `default` when not given.
    pub(crate) fn duration(
        &self,
        name: &str,
        text: Option<&str>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match text {
            None => Ok(default),
            Some(t) => parse_duration_at_most(t, MAX_DURATION)
                .map_err(|reason| ConfigError::new(&self.file, self.field(name), t, reason)),
        }
    }
}

const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Reads dependency `name` of `ctx`'s topology: its kind must be `rocketmq`; its settings are
/// parsed and its clusters checked (every IDC known to the topology, addresses well formed,
/// [`validate_clusters`]) and ordered with the local IDC's first (the file's order otherwise).
pub(crate) fn read(ctx: &HaContext, name: &str, resolved: &Resolved) -> Result<Read, MqError> {
    let topology = ctx.topology();
    let file = topology.file().to_path_buf();
    let dep = topology.require_dependency(name)?;
    match dep.kind.as_deref() {
        Some(KIND) => {}
        other => {
            return Err(ConfigError::new(
                &file,
                format!("dependencies.{name}.kind"),
                other.unwrap_or(""),
                format!("ha-mq reads only kind = \"{KIND}\" dependencies"),
            )
            .into());
        }
    }
    let settings: MqSettings = dep.settings()?;
    let prefix = format!("dependencies.{name}.settings.");
    let mut clusters = Vec::with_capacity(settings.clusters.len());
    for (i, c) in settings.clusters.iter().enumerate() {
        if !c.idc.is_empty() && topology.idc(&c.idc).is_none() {
            let known: Vec<&str> = topology.idcs().iter().map(|d| &*d.name).collect();
            return Err(ConfigError::new(
                &file,
                format!("{prefix}clusters[{i}].idc"),
                &c.idc,
                format!("unknown IDC (known: {})", known.join(", ")),
            )
            .into());
        }
        let field = |f: &str| format!("{prefix}clusters[{i}].{f}");
        if let Some(from) = &c.name_servers_from {
            let bad = |why: &str| -> MqError {
                ConfigError::new(&file, field("name_servers_from"), from, why).into()
            };
            if !c.name_servers.is_empty() {
                return Err(bad("give name_servers or name_servers_from, not both"));
            }
            if topology.dependency(from).is_none() {
                return Err(bad("no such dependency in the topology"));
            }
            let Some(addrs) = resolved.get(from) else {
                return Err(bad(
                    "resolved only by ProducerConfig::discover or ConsumerConfig::discover \
                     (async); from_context takes name_servers",
                ));
            };
            if addrs.is_empty() {
                return Err(bad("its discovery answered no address"));
            }
            clusters.push(ClusterConfig::new(c.idc.clone(), addrs.clone()));
            continue;
        }
        let mut addrs = Vec::with_capacity(c.name_servers.len());
        for (j, text) in c.name_servers.iter().enumerate() {
            let addr: SocketAddr = text.trim().parse().map_err(|_| {
                ConfigError::new(
                    &file,
                    format!("{prefix}clusters[{i}].name_servers[{j}]"),
                    text,
                    "not an IP:port address such as 10.1.0.5:9876",
                )
            })?;
            addrs.push(addr);
        }
        clusters.push(ClusterConfig::new(c.idc.clone(), addrs));
    }
    validate_clusters(&clusters, &file, &prefix)?;
    let local = &*topology.local_idc().name;
    // A stable sort: the local IDC's cluster first, the others in the file's order.
    clusters.sort_by_key(|c| c.idc != local);
    Ok(Read {
        settings,
        clusters,
        file,
        prefix,
    })
}

/// The checks every list of clusters passes (the producer's and the consumer's): at least one,
/// each with an IDC and at least one name server, no IDC twice. Errors name
/// `{prefix}clusters[i].field` in `file`.
pub(crate) fn validate_clusters(
    clusters: &[ClusterConfig],
    file: &Path,
    prefix: &str,
) -> Result<(), ConfigError> {
    let bad =
        |field: String, value: String, why: &str| Err(ConfigError::new(file, field, value, why));
    if clusters.is_empty() {
        return bad(
            format!("{prefix}clusters"),
            "[]".into(),
            "needs at least one cluster",
        );
    }
    for (i, c) in clusters.iter().enumerate() {
        if c.idc.is_empty() {
            return bad(
                format!("{prefix}clusters[{i}].idc"),
                String::new(),
                "must not be empty",
            );
        }
        if c.name_servers.is_empty() {
            return bad(
                format!("{prefix}clusters[{i}].name_servers"),
                "[]".into(),
                "needs at least one name server",
            );
        }
        if clusters[..i].iter().any(|o| o.idc == c.idc) {
            return bad(
                format!("{prefix}clusters[{i}].idc"),
                c.idc.clone(),
                "duplicate IDC",
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::{ConsumerConfig, ProducerConfig};

    const HEAD: &str = r#"
[[regions]]
name = "north"
resolvers = ["127.0.1.53"]
[[regions]]
name = "south"
resolvers = ["127.0.3.53"]
[[idcs]]
name = "bj-a"
region = "north"
cidrs = ["127.0.1.0/24"]
[[idcs]]
name = "bj-b"
region = "north"
cidrs = ["127.0.2.0/24"]
[[idcs]]
name = "sh-a"
region = "south"
cidrs = ["127.0.3.0/24"]
"#;

    /// The shape of examples/membership-service's file (plus the `static_addrs` ha-core wants).
    const EVENTS: &str = r#"
[dependencies.events]
kind = "rocketmq"
static_addrs = ["127.0.1.220:9876"]
[dependencies.events.settings]
group = "membership"
[[dependencies.events.settings.clusters]]
idc = "bj-a"
name_servers = ["127.0.1.220:9876"]
[[dependencies.events.settings.clusters]]
idc = "sh-a"
name_servers = ["127.0.3.220:9876"]
"#;

    fn ctx(local: &str, deps: &str) -> HaContext {
        let text = format!("local_idc = \"{local}\"\n{HEAD}{deps}");
        HaContext::new(ha_core::Topology::from_toml_str(&text, "t.toml").unwrap())
    }

    fn idcs(c: &ProducerConfig) -> Vec<&str> {
        c.clusters.iter().map(|c| c.idc.as_str()).collect()
    }

    #[test]
    fn the_local_idc_comes_first_else_the_files_order() {
        let c = ProducerConfig::from_context(&ctx("bj-a", EVENTS), "events").unwrap();
        assert_eq!(idcs(&c), ["bj-a", "sh-a"]);
        assert_eq!(c.group, "membership");
        assert_eq!(c.dependency, "events");
        assert_eq!(c.attempt_timeout, Duration::from_millis(400));
        assert_eq!(c.deadline, Duration::from_secs(2));
        assert!(c.spool.is_none());
        assert_eq!(
            c.clusters[1].name_servers,
            vec!["127.0.3.220:9876".parse::<SocketAddr>().unwrap()]
        );
        let c = ProducerConfig::from_context(&ctx("sh-a", EVENTS), "events").unwrap();
        assert_eq!(idcs(&c), ["sh-a", "bj-a"]);
        // No cluster in bj-b: the file's order.
        let c = ProducerConfig::from_context(&ctx("bj-b", EVENTS), "events").unwrap();
        assert_eq!(idcs(&c), ["bj-a", "sh-a"]);
        let c =
            ConsumerConfig::from_context(&ctx("sh-a", EVENTS), "events", "history", "t").unwrap();
        assert_eq!(c.group, "history");
        assert_eq!(c.topic, "t");
        assert_eq!(c.dependency, "events");
        assert_eq!(c.clusters[0].idc, "sh-a");
    }

    #[test]
    fn optional_settings() {
        let deps = EVENTS.replace(
            "group = \"membership\"\n",
            "group = \"membership\"\nattempt_timeout = \"250ms\"\ndeadline = \"1.5s\"\n\
             spool_dir = \"/var/lib/x/spool\"\nspool_max_bytes = 1048576\n",
        );
        let c = ProducerConfig::from_context(&ctx("bj-a", &deps), "events").unwrap();
        assert_eq!(c.attempt_timeout, Duration::from_millis(250));
        assert_eq!(c.deadline, Duration::from_millis(1500));
        let spool = c.spool.unwrap();
        assert_eq!(spool.dir, Path::new("/var/lib/x/spool"));
        assert_eq!(spool.max_bytes, 1 << 20);
        assert!(spool.segment_bytes <= spool.max_bytes / 4);
        assert!(spool.validate().is_ok());
    }

    /// Each bad setting is a `MqError::Config` naming its dotted field in the file.
    #[test]
    fn bad_settings_name_the_field() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                EVENTS.replace("kind = \"rocketmq\"", "kind = \"kafka\""),
                "dependencies.events.kind",
                "kafka",
            ),
            (
                EVENTS.replace("kind = \"rocketmq\"\n", ""),
                "dependencies.events.kind",
                "",
            ),
            (
                EVENTS.replace("group = ", "groop = "),
                "dependencies.events.settings.groop",
                "",
            ),
            (
                EVENTS.replace("idc = \"sh-a\"", "idc = \"sh-a\"\nweight = 2"),
                "dependencies.events.settings.clusters[1].weight",
                "",
            ),
            (
                EVENTS.replace("group = \"membership\"\n", ""),
                "dependencies.events.settings.group",
                "",
            ),
            (
                EVENTS.split("[[dependencies").next().unwrap().to_string(),
                "dependencies.events.settings.clusters",
                "[]",
            ),
            (
                EVENTS.replace(
                    "group = \"membership\"",
                    "group = \"m\"\ndeadline = \"2 seconds\"",
                ),
                "dependencies.events.settings.deadline",
                "2 seconds",
            ),
            (
                EVENTS.replace(
                    "group = \"membership\"",
                    "group = \"m\"\nattempt_timeout = \"0ms\"",
                ),
                "dependencies.events.settings.attempt_timeout",
                "0ms",
            ),
            (
                EVENTS.replace(
                    "group = \"membership\"",
                    "group = \"m\"\ndeadline = \"48h\"",
                ),
                "dependencies.events.settings.deadline",
                "48h",
            ),
            (
                EVENTS.replace("127.0.3.220:9876\"]", "ns.sh-a.lab.\"]"),
                "dependencies.events.settings.clusters[1].name_servers[0]",
                "ns.sh-a.lab.",
            ),
            (
                EVENTS.replace("name_servers = [\"127.0.3.220:9876\"]", "name_servers = []"),
                "dependencies.events.settings.clusters[1].name_servers",
                "[]",
            ),
            (
                EVENTS.replace("idc = \"sh-a\"", "idc = \"bj-a\""),
                "dependencies.events.settings.clusters[1].idc",
                "bj-a",
            ),
            (
                EVENTS.replace("idc = \"sh-a\"", "idc = \"gz-a\""),
                "dependencies.events.settings.clusters[1].idc",
                "gz-a",
            ),
            (
                EVENTS.replace(
                    "group = \"membership\"",
                    "group = \"m\"\nspool_max_bytes = 4096",
                ),
                "dependencies.events.settings.spool_max_bytes",
                "4096",
            ),
            (
                EVENTS.replace(
                    "group = \"membership\"",
                    "group = \"m\"\nspool_dir = \"/tmp/s\"\nspool_max_bytes = 0",
                ),
                "dependencies.events.settings.spool_max_bytes",
                "0",
            ),
            (
                EVENTS.replace("group = \"membership\"", "group = \"m\"\nspool_dir = \"\""),
                "dependencies.events.settings.spool_dir",
                "",
            ),
        ];
        for (deps, field, value) in cases {
            let err = ProducerConfig::from_context(&ctx("bj-a", &deps), "events").unwrap_err();
            let MqError::Config(e) = &err else {
                panic!("{field}: not a config error: {err}");
            };
            assert_eq!(e.field(), field, "{err}");
            if !value.is_empty() {
                assert_eq!(e.value(), value, "{err}");
            }
            assert!(err.to_string().contains("t.toml"), "{err}");
        }
        // Kind and clusters are the consumer's too; an unknown dependency is named.
        let kafka = EVENTS.replace("kind = \"rocketmq\"", "kind = \"kafka\"");
        let err =
            ConsumerConfig::from_context(&ctx("bj-a", &kafka), "events", "g", "t").unwrap_err();
        assert!(err.to_string().contains("kafka"), "{err}");
        let err = ProducerConfig::from_context(&ctx("bj-a", EVENTS), "orders").unwrap_err();
        assert!(
            matches!(&err, MqError::Config(_)) && err.to_string().contains("orders"),
            "{err}"
        );
    }

    #[test]
    fn the_producer_and_the_consumer_check_clusters_alike() {
        let addr: SocketAddr = "127.0.0.1:9876".parse().unwrap();
        let dup = vec![
            ClusterConfig::new("bj-a", vec![addr]),
            ClusterConfig::new("bj-a", vec![addr]),
        ];
        let p = ProducerConfig::new("g", dup.clone())
            .validate()
            .unwrap_err();
        let c = ConsumerConfig::new("g", "t", dup).validate().unwrap_err();
        assert_eq!(p.field(), "clusters[1].idc");
        assert_eq!(c.field(), p.field());
        assert_eq!(c.reason(), p.reason());
    }
}
