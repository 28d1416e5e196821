//! Settings of a MySQL dependency, as plain data, read from `[dependencies.NAME.settings]`.

use std::path::Path;
use std::time::Duration;

use ha_core::ConfigError;
use ha_core::config::parse_duration_at_most;
use serde::Deserialize;

/// Settings of one MySQL dependency. Defaults: `user` `root`, no `password`, no `database`,
/// `max_connections` 16, `connect_timeout` 1 s (one connect plus its role check), `timeout`
/// 2 s (the default deadline of a write), `startup_timeout` 5 s, `role_check_interval` 1 s,
/// `verify_interval` 1 s, no `replicas`, `max_lag` 1 s (compared with
/// `Seconds_Behind_Master`, whole seconds), `lag_check_interval` 500 ms,
/// `replica_connections` 8 (per replica), `read_your_writes_timeout` 100 ms, `standby` true.
///
/// In a topology file:
///
/// ```toml
/// [dependencies.members_db]
/// kind = "mysql"
/// port = 3306
/// dns = { north = "db.north.example.", south = "db.south.example." }
/// [dependencies.members_db.settings]
/// user = "app"
/// password = "secret"
/// database = "members"
/// max_connections = 32
/// timeout = "1s"
/// replicas = ["10.2.0.21:3306", "10.3.0.21:3306"]
/// max_lag = "2s"
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MysqlSettings {
    /// The user.
    pub user: String,
    /// The password.
    pub password: Option<String>,
    /// The database.
    pub database: Option<String>,
    /// Maximum connections of the writer pool.
    pub max_connections: usize,
    /// Bound on one connect plus its role check.
    pub connect_timeout: Duration,
    /// Default deadline of a write.
    pub timeout: Duration,
    /// Bound on start-up.
    pub startup_timeout: Duration,
    /// At most this often a pooled connection's role is re-checked at checkout.
    pub role_check_interval: Duration,
    /// How often the follower verifies the primary when nothing happens.
    pub verify_interval: Duration,
    /// The replicas reads may go to (each classified into its IDC by address).
    pub replicas: Vec<std::net::SocketAddr>,
    /// A replica further behind than this is not read from.
    pub max_lag: Duration,
    /// How often each replica's lag is checked.
    pub lag_check_interval: Duration,
    /// Maximum connections per replica pool.
    pub replica_connections: usize,
    /// How long a read-your-writes read waits on a replica for the write's GTID before it
    /// goes to the primary.
    pub read_your_writes_timeout: Duration,
    /// Keep one warm connection to each replica (and, with fixed addresses, to each
    /// candidate), pinged every `verify_interval`, for the follower's probes: a promoted
    /// replica is then verified in its role check's round trips, without a connect, a
    /// handshake and an authentication first (a few round trips, each one cross-IDC after a
    /// failover to another IDC). Costs one idle connection per node.
    pub standby: bool,
}

impl Default for MysqlSettings {
    fn default() -> Self {
        MysqlSettings {
            user: "root".into(),
            password: None,
            database: None,
            max_connections: 16,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            startup_timeout: Duration::from_secs(5),
            role_check_interval: Duration::from_secs(1),
            verify_interval: Duration::from_secs(1),
            replicas: Vec::new(),
            max_lag: Duration::from_secs(1),
            lag_check_interval: Duration::from_millis(500),
            replica_connections: 8,
            read_your_writes_timeout: Duration::from_millis(100),
            standby: true,
        }
    }
}

/// The settings table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSettings {
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    timeout: Option<String>,
    startup_timeout: Option<String>,
    role_check_interval: Option<String>,
    verify_interval: Option<String>,
    replicas: Option<Vec<String>>,
    max_lag: Option<String>,
    lag_check_interval: Option<String>,
    replica_connections: Option<usize>,
    read_your_writes_timeout: Option<String>,
    standby: Option<bool>,
}

const MAX: Duration = Duration::from_secs(3600);

impl RawSettings {
    pub(crate) fn validate(self, file: &Path, dep: &str) -> Result<MysqlSettings, ConfigError> {
        let d = MysqlSettings::default();
        let field = |name: &str| format!("dependencies.{dep}.settings.{name}");
        let dur = |name: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(text) => parse_duration_at_most(&text, MAX)
                .map_err(|reason| ConfigError::new(file, field(name), &text, reason)),
        };
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(ConfigError::new(
                file,
                field("max_connections"),
                0,
                "must be at least 1",
            ));
        }
        let user = self.user.unwrap_or(d.user);
        if user.is_empty() {
            return Err(ConfigError::new(
                file,
                field("user"),
                "",
                "must not be empty",
            ));
        }
        let mut replicas = Vec::new();
        for (i, text) in self.replicas.unwrap_or_default().iter().enumerate() {
            let addr = text.parse().map_err(|_| {
                ConfigError::new(
                    file,
                    format!("{}[{i}]", field("replicas")),
                    text,
                    "not an IP:port address",
                )
            })?;
            replicas.push(addr);
        }
        Ok(MysqlSettings {
            replicas,
            max_lag: dur("max_lag", self.max_lag, d.max_lag)?,
            lag_check_interval: dur(
                "lag_check_interval",
                self.lag_check_interval,
                d.lag_check_interval,
            )?,
            replica_connections: self.replica_connections.unwrap_or(d.replica_connections),
            standby: self.standby.unwrap_or(d.standby),
            read_your_writes_timeout: dur(
                "read_your_writes_timeout",
                self.read_your_writes_timeout,
                d.read_your_writes_timeout,
            )?,
            user,
            password: self.password,
            database: self.database,
            max_connections,
            connect_timeout: dur("connect_timeout", self.connect_timeout, d.connect_timeout)?,
            timeout: dur("timeout", self.timeout, d.timeout)?,
            startup_timeout: dur("startup_timeout", self.startup_timeout, d.startup_timeout)?,
            role_check_interval: dur(
                "role_check_interval",
                self.role_check_interval,
                d.role_check_interval,
            )?,
            verify_interval: dur("verify_interval", self.verify_interval, d.verify_interval)?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn raw(text: &str) -> Result<RawSettings, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_and_fields() {
        let s = raw("")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap();
        assert_eq!(s, MysqlSettings::default());
        let s = raw("user = \"app\"\ntimeout = \"250ms\"\nmax_connections = 4")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap();
        assert_eq!(s.user, "app");
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.max_connections, 4);
        assert!(s.standby, "standby connections are on by default");
        let s = raw("standby = false")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap();
        assert!(!s.standby);
        assert!(raw("standby = \"no\"").is_err(), "a string is not a bool");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = raw("timeout = \"soon\"")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap_err();
        assert_eq!(e.field, "dependencies.db.settings.timeout");
        assert_eq!(e.value, "soon");
        let e = raw("max_connections = 0")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap_err();
        assert_eq!(e.field, "dependencies.db.settings.max_connections");
        let e = raw("user = \"\"")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap_err();
        assert_eq!(e.field, "dependencies.db.settings.user");
        assert!(raw("pasword = \"x\"").is_err());
        let e = raw("replicas = [\"127.0.2.1:3306\", \"db-b\"]")
            .unwrap()
            .validate(Path::new("t.toml"), "db")
            .unwrap_err();
        assert_eq!(e.field, "dependencies.db.settings.replicas[1]");
    }
}
