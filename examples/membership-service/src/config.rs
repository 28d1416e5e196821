//! The service's configuration: one TOML file holding the ha-core topology and, under `[app]`,
//! the service's own settings (see `membership-service.example.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ha_core::ConfigError;
use ha_core::Topology;
use ha_core::config::parse_duration_at_most;
use ha_ratelimit::RateLimitConfig;
use ipnet::IpNet;
use serde::Deserialize;

/// The service's own settings: the `[app]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSettings {
    /// Where the HTTP server listens (the command line's `--listen` wins).
    pub listen: Option<SocketAddr>,
    /// This instance's name (the job lease's holder). Default `<local idc>-<pid>`.
    pub instance: Option<String>,
    /// The topic of member events. Default `member_events`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// The consumer group writing events to the history table. Default `membership-history`.
    #[serde(default = "default_group")]
    pub consumer_group: String,
    /// Instances of the service in this IDC (an IDC capacity share is divided among them).
    #[serde(default = "default_instances")]
    pub instances: u32,
    /// Proxies whose `X-Forwarded-For` is believed. Default none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// The admin routes' bearer token.
    #[serde(default)]
    pub admin: AdminSettings,
    /// The expiry job.
    #[serde(default)]
    pub job: JobSettings,
    /// ha-ratelimit's configuration; keys `client_ip`, `route`, `server`.
    #[serde(default)]
    pub limits: RateLimitConfig,
    /// Where the producer spools events when every cluster is down. Default none (a send
    /// that no cluster takes fails the request with 503).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// The dependency names. Defaults `cache`, `db`, `events`.
    #[serde(default)]
    pub dependencies: DependencyNames,
    /// Time-outs of one request's calls.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// `[app.admin]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// The token itself.
    pub token: Option<String>,
    /// A file holding the token (trailing whitespace ignored).
    pub token_file: Option<PathBuf>,
}

/// `[app.job]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    /// The lease's time to live. Default 5 s.
    #[serde(default = "default_ttl")]
    pub lease_ttl: String,
    /// How often the holder runs the job. Default 1 s.
    #[serde(default = "default_interval")]
    pub interval: String,
}

impl Default for JobSettings {
    fn default() -> Self {
        JobSettings {
            lease_ttl: default_ttl(),
            interval: default_interval(),
        }
    }
}

/// `[app.dependencies]`: which topology dependencies the service uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependencyNames {
    /// Redis through Sentinel.
    #[serde(default = "default_cache")]
    pub cache: String,
    /// MySQL.
    #[serde(default = "default_db")]
    pub db: String,
    /// RocketMQ.
    #[serde(default = "default_events")]
    pub events: String,
}

impl Default for DependencyNames {
    fn default() -> Self {
        DependencyNames {
            cache: default_cache(),
            db: default_db(),
            events: default_events(),
        }
    }
}

/// `[app.timeouts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Bound on a whole write request (MySQL, Redis, the event). Default 6 s: a switch of the
    /// MySQL primary or of the Redis master is a pause, not an error.
    #[serde(default = "default_write")]
    pub write: String,
    /// Bound on a whole read request. Default 3 s.
    #[serde(default = "default_read")]
    pub read: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            write: default_write(),
            read: default_read(),
        }
    }
}

fn default_topic() -> String {
    "member_events".into()
}
fn default_group() -> String {
    "membership-history".into()
}
fn default_instances() -> u32 {
    1
}
fn default_ttl() -> String {
    "5s".into()
}
fn default_interval() -> String {
    "1s".into()
}
fn default_cache() -> String {
    "cache".into()
}
fn default_db() -> String {
    "db".into()
}
fn default_events() -> String {
    "events".into()
}
fn default_write() -> String {
    "6s".into()
}
fn default_read() -> String {
    "3s".into()
}

/// The whole configuration, validated.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The topology.
    pub topology: Topology,
    /// `[app]`.
    pub app: AppSettings,
    /// The admin token (from `token` or `token_file`).
    pub admin_token: String,
    /// The lease's time to live.
    pub lease_ttl: Duration,
    /// The job's interval.
    pub job_interval: Duration,
    /// Bound on a write request.
    pub write_timeout: Duration,
    /// Bound on a read request.
    pub read_timeout: Duration,
    /// The instance's name.
    pub instance: String,
}

fn bad(file: &Path, field: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::new(file, field, value, reason)
}

fn duration(file: &Path, field: &str, text: &str, max: Duration) -> Result<Duration, ConfigError> {
    parse_duration_at_most(text, max).map_err(|reason| bad(file, field, text, &reason))
}

impl ServiceConfig {
    /// Reads and validates the file; `HA_IDC`, when set, names the local IDC.
    pub fn load(path: impl AsRef<Path>) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::from_topology(Topology::load(path)?)
    }

    /// Validates TOML text (`file` labels the errors).
    pub fn from_toml_str(text: &str, file: impl AsRef<Path>) -> Result<ServiceConfig, ConfigError> {
        ServiceConfig::from_topology(Topology::from_toml_str(text, file)?)
    }

    /// Validates the `[app]` table of a topology.
    pub fn from_topology(topology: Topology) -> Result<ServiceConfig, ConfigError> {
        let app: AppSettings = topology.app()?;
        let file = topology.file().to_path_buf();
        let token = match (&app.admin.token, &app.admin.token_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    &file,
                    "app.admin",
                    "",
                    "give token or token_file, not both",
                ));
            }
            (Some(t), None) => t.clone(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    bad(
                        &file,
                        "app.admin.token_file",
                        &path.display().to_string(),
                        &format!("cannot read it: {e}"),
                    )
                })?
                .trim_end()
                .to_string(),
            (None, None) => {
                return Err(bad(
                    &file,
                    "app.admin.token",
                    "",
                    "the admin routes need a token (token or token_file)",
                ));
            }
        };
        if token.len() < 8 {
            return Err(bad(
                &file,
                "app.admin.token",
                "(hidden)",
                "the token must be at least 8 bytes",
            ));
        }
        if app.instances == 0 {
            return Err(bad(&file, "app.instances", "0", "must be at least 1"));
        }
        if app.topic.is_empty() {
            return Err(bad(&file, "app.topic", "", "must not be empty"));
        }
        if app.consumer_group.is_empty() {
            return Err(bad(&file, "app.consumer_group", "", "must not be empty"));
        }
        let hour = Duration::from_secs(3600);
        let lease_ttl = duration(&file, "app.job.lease_ttl", &app.job.lease_ttl, hour)?;
        let job_interval = duration(&file, "app.job.interval", &app.job.interval, hour)?;
        let write_timeout = duration(&file, "app.timeouts.write", &app.timeouts.write, hour)?;
        let read_timeout = duration(&file, "app.timeouts.read", &app.timeouts.read, hour)?;
        app.limits
            .validate()
            .map_err(|e| bad(&file, "app.limits", "", &e.to_string()))?;
        for (field, name) in [
            ("app.dependencies.cache", &app.dependencies.cache),
            ("app.dependencies.db", &app.dependencies.db),
            ("app.dependencies.events", &app.dependencies.events),
        ] {
            if topology.dependency(name).is_none() {
                return Err(bad(
                    &file,
                    field,
                    name,
                    "no such dependency in the topology ([dependencies.NAME])",
                ));
            }
        }
        let instance = app
            .instance
            .clone()
            .unwrap_or_else(|| format!("{}-{}", topology.local_idc().name, std::process::id()));
        if instance.is_empty() || instance.len() > 128 {
            return Err(bad(
                &file,
                "app.instance",
                &instance,
                "must be 1 to 128 bytes",
            ));
        }
        Ok(ServiceConfig {
            topology,
            app,
            admin_token: token,
            lease_ttl,
            job_interval,
            write_timeout,
            read_timeout,
            instance,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const EXAMPLE: &str = include_str!("../membership-service.example.toml");

    #[test]
    fn the_example_file_is_valid() {
        let c = ServiceConfig::from_toml_str(EXAMPLE, "example.toml").unwrap();
        assert_eq!(c.instance, "bj-a-1");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.app.limits.limits.len(), 2);
        assert_eq!(c.admin_token, "change-me");
    }

    fn with(replace: &str, by: &str) -> Result<ServiceConfig, ConfigError> {
        assert!(EXAMPLE.contains(replace), "{replace}");
        ServiceConfig::from_toml_str(&EXAMPLE.replace(replace, by), "t.toml")
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = with("instances = 1", "instances = 0").unwrap_err();
        assert_eq!(e.field, "app.instances");
        let e = with("lease_ttl = \"5s\"", "lease_ttl = \"0s\"").unwrap_err();
        assert_eq!(e.field, "app.job.lease_ttl");
        let e = with("token = \"change-me\"", "token = \"short\"").unwrap_err();
        assert_eq!(e.field, "app.admin.token");
        let e = with("token = \"change-me\"", "").unwrap_err();
        assert_eq!(e.field, "app.admin.token");
        let e = with("instances = 1", "instances = 1\nbogus = 2").unwrap_err();
        assert_eq!(e.field, "app.bogus", "{e}");
        let e = with("listen = \"127.0.1.100:18090\"", "listen = \"nope\"").unwrap_err();
        assert_eq!(e.field, "app.listen");
        let e = with("rate = \"500r/s\"", "rate = \"fast\"").unwrap_err();
        assert!(e.field.starts_with("app.limits"), "{e}");
        let e = with("[app]", "[app.dependencies]\ncache = \"nope\"\n[app]").unwrap_err();
        assert!(
            e.to_string().contains("duplicate") || e.field.starts_with("app"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_dependency_is_refused() {
        let e = with(
            "[app.admin]",
            "[app.dependencies]\ncache = \"redis2\"\n[app.admin]",
        )
        .unwrap_err();
        assert_eq!(e.field, "app.dependencies.cache");
    }

    #[test]
    fn a_token_file_is_read() {
        let dir = std::env::temp_dir().join(format!("ms-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "from-the-file-123\n").unwrap();
        let c = with(
            "token = \"change-me\"",
            &format!("token_file = {:?}", path.display().to_string()),
        )
        .unwrap();
        assert_eq!(c.admin_token, "from-the-file-123");
        let e = with("token = \"change-me\"", "token_file = \"/nonexistent/x\"").unwrap_err();
        assert_eq!(e.field, "app.admin.token_file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
