//! Typed errors of ha-mysql and the classification of MySQL/MariaDB failures.

use std::net::SocketAddr;
use std::time::Duration;

use ha_core::{ConfigError, DefaultClassifier, ErrorClass, HaError};

/// MySQL/MariaDB error codes this crate acts on.
pub mod codes {
    /// `ER_OPTION_PREVENTS_STATEMENT`: `--read-only` (also `--secure-file-priv` and others,
    /// hence it is "not executed" only when the node's `read_only` confirms it).
    pub const READ_ONLY: u16 = 1290;
    /// `ER_READ_ONLY_MODE`: running in read-only mode.
    pub const READ_ONLY_MODE: u16 = 1836;
    /// `ER_ACCESS_DENIED_ERROR`: wrong user or password.
    pub const ACCESS_DENIED: u16 = 1045;
    /// `ER_DBACCESS_DENIED_ERROR`: no access to the database.
    pub const DB_ACCESS_DENIED: u16 = 1044;
    /// `ER_BAD_DB_ERROR`: unknown database.
    pub const BAD_DB: u16 = 1049;
    /// `ER_SPECIFIC_ACCESS_DENIED_ERROR`: a privilege is missing (e.g. `SLAVE MONITOR`).
    pub const SPECIFIC_ACCESS_DENIED: u16 = 1227;
    /// `ER_CON_COUNT_ERROR`: too many connections (the handshake was refused; nothing ran).
    pub const TOO_MANY_CONNECTIONS: u16 = 1040;
    /// `ER_TOO_MANY_USER_CONNECTIONS`: the user's connection limit (nothing ran).
    pub const TOO_MANY_USER_CONNECTIONS: u16 = 1203;
    /// `ER_QUERY_INTERRUPTED`.
    pub const QUERY_INTERRUPTED: u16 = 1317;
    /// `ER_SERVER_SHUTDOWN`.
    pub const SERVER_SHUTDOWN: u16 = 1053;
    /// `ER_CONNECTION_KILLED`.
    pub const CONNECTION_KILLED: u16 = 1927;
    /// `CR_SERVER_GONE_ERROR` (client side; mysql_async reports it as an I/O error).
    pub const SERVER_GONE: u16 = 2006;
    /// `CR_SERVER_LOST` (client side; mysql_async reports it as an I/O error).
    pub const SERVER_LOST: u16 = 2013;
}

/// What went wrong in ha-mysql: at start-up, when a pool makes a connection, or when a
/// statement was refused for a reason the crate proved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MysqlError {
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Connecting to `addr` failed (refused, reset, or an error of the handshake).
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The node.
        addr: SocketAddr,
        /// The driver's error.
        #[source]
        source: mysql_async::Error,
    },
    /// Connecting to `addr` (or checking its role) took longer than the connect timeout.
    #[error("connect to {addr}: no answer within {after:?}")]
    ConnectTimeout {
        /// The node.
        addr: SocketAddr,
        /// The bound that passed.
        after: Duration,
    },
    /// The server refused the credentials.
    #[error("access denied for user {user:?} at {addr}: {message}")]
    AccessDenied {
        /// The node.
        addr: SocketAddr,
        /// The user.
        user: String,
        /// The server's message.
        message: String,
    },
    /// The database does not exist (or the user may not use it).
    #[error("unknown database {database:?} at {addr}: {message}")]
    UnknownDatabase {
        /// The node.
        addr: SocketAddr,
        /// The database.
        database: String,
        /// The server's message.
        message: String,
    },
    /// The node is read-only (`@@read_only = 1`): it is not the primary.
    #[error("{addr} is read-only: not the primary")]
    ReadOnly {
        /// The node.
        addr: SocketAddr,
    },
    /// The node replicates from another one: it is not the primary.
    #[error("{addr} is a replica: not the primary")]
    Replica {
        /// The node.
        addr: SocketAddr,
    },
    /// No primary is known right now (it was lost and no successor is confirmed yet).
    #[error("no verified primary for {dependency}")]
    NoPrimary {
        /// The dependency.
        dependency: String,
    },
    /// The primary's name resolved to nothing.
    #[error("the primary of {dependency} resolves to no address ({name})")]
    Unresolvable {
        /// The dependency.
        dependency: String,
        /// The name (or names, per region).
        name: String,
    },
    /// No candidate could be reached; the last error is attached.
    #[error("no primary reachable for {dependency} within {after:?}: {last}")]
    Unreachable {
        /// The dependency.
        dependency: String,
        /// How long start-up tried.
        after: Duration,
        /// The last failure.
        last: Box<MysqlError>,
    },
    /// A connection made for an older primary was refused.
    #[error(transparent)]
    Fenced(HaError),
}

impl MysqlError {
    /// The class of this error (see [`ErrorClass`]): connect failures are `NotSent` (nothing
    /// was sent), a confirmed read-only node, a replica, no primary and a fenced connection are
    /// `Refused`, credentials, databases and configuration are `Final`.
    pub fn class(&self) -> ErrorClass {
        match self {
            MysqlError::Connect { source, .. } => match source {
                // A full server refused the connection: nothing ran, another try may pass.
                mysql_async::Error::Server(s)
                    if s.code == codes::TOO_MANY_CONNECTIONS
                        || s.code == codes::TOO_MANY_USER_CONNECTIONS =>
                {
                    ErrorClass::NotSent
                }
                // The handshake reached a server that said no: not a sick endpoint.
                mysql_async::Error::Server(_) => ErrorClass::Final,
                _ => ErrorClass::NotSent,
            },
            MysqlError::ConnectTimeout { .. } | MysqlError::Unreachable { .. } => {
                ErrorClass::NotSent
            }
            MysqlError::ReadOnly { .. }
            | MysqlError::Replica { .. }
            | MysqlError::NoPrimary { .. }
            | MysqlError::Fenced(_) => ErrorClass::Refused,
            MysqlError::Config(_)
            | MysqlError::AccessDenied { .. }
            | MysqlError::UnknownDatabase { .. }
            | MysqlError::Unresolvable { .. } => ErrorClass::Final,
        }
    }

    /// True for [`MysqlError::AccessDenied`].
    pub fn is_access_denied(&self) -> bool {
        matches!(self, MysqlError::AccessDenied { .. })
    }

    /// True for [`MysqlError::UnknownDatabase`].
    pub fn is_unknown_database(&self) -> bool {
        matches!(self, MysqlError::UnknownDatabase { .. })
    }

    /// True for [`MysqlError::Unreachable`], [`MysqlError::Connect`] (not a server's answer)
    /// and [`MysqlError::ConnectTimeout`].
    pub fn is_unreachable(&self) -> bool {
        match self {
            MysqlError::Unreachable { .. } | MysqlError::ConnectTimeout { .. } => true,
            MysqlError::Connect { source, .. } => !matches!(source, mysql_async::Error::Server(_)),
            _ => false,
        }
    }

    /// True for [`MysqlError::ReadOnly`] and [`MysqlError::Replica`].
    pub fn is_not_primary(&self) -> bool {
        matches!(
            self,
            MysqlError::ReadOnly { .. } | MysqlError::Replica { .. }
        )
    }

    /// True for [`MysqlError::Config`].
    pub fn is_config(&self) -> bool {
        matches!(self, MysqlError::Config(_))
    }

    /// True for [`MysqlError::Unresolvable`].
    pub fn is_unresolvable(&self) -> bool {
        matches!(self, MysqlError::Unresolvable { .. })
    }
}

/// The class of a driver error (see [`MysqlClassifier`]).
pub fn classify_mysql(err: &mysql_async::Error) -> ErrorClass {
    match err {
        mysql_async::Error::Server(s) => match s.code {
            // Refused by the server before execution, or the session was cut mid-statement:
            // either way the statement's fate is not known from the code alone.
            codes::QUERY_INTERRUPTED | codes::SERVER_SHUTDOWN | codes::CONNECTION_KILLED => {
                ErrorClass::MaybeSent
            }
            // 1290/1836 are "not executed" only once the node's read_only confirms it (see
            // `HaMysql::write`); unconfirmed they are the server's answer.
            _ => ErrorClass::Answered,
        },
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => {
            ha_core::error::classify_io(io.kind()).max_maybe()
        }
        // TLS errors, when another crate turns a TLS feature on.
        #[allow(unreachable_patterns)]
        mysql_async::Error::Io(_) => ErrorClass::MaybeSent,
        mysql_async::Error::Driver(d) => match d {
            mysql_async::DriverError::ConnectionClosed
            | mysql_async::DriverError::PacketOutOfOrder
            | mysql_async::DriverError::PacketTooLarge => ErrorClass::MaybeSent,
            _ => ErrorClass::Answered,
        },
        mysql_async::Error::Other(_) => ErrorClass::MaybeSent,
        mysql_async::Error::Url(_) => ErrorClass::Final,
    }
}

trait MaxMaybe {
    fn max_maybe(self) -> ErrorClass;
}

impl MaxMaybe for ErrorClass {
    /// An I/O error on an established connection: whatever its kind, the statement may have
    /// been written (a refused connect cannot happen here; connect failures are wrapped in
    /// [`MysqlError::Connect`]).
    fn max_maybe(self) -> ErrorClass {
        match self {
            ErrorClass::NotSent | ErrorClass::Answered => ErrorClass::MaybeSent,
            other => other,
        }
    }
}

/// True for a server error whose code says "read-only" (1290, 1836); see
/// [`codes::READ_ONLY`] for why that alone does not prove the statement was not executed.
pub fn is_read_only_code(err: &mysql_async::Error) -> bool {
    matches!(err, mysql_async::Error::Server(s) if s.code == codes::READ_ONLY || s.code == codes::READ_ONLY_MODE)
}

/// The [`ha_core::Classify`] of MySQL failures: walks the source chain for a [`MysqlError`]
/// (its [`MysqlError::class`]) or a driver error ([`classify_mysql`]), else falls back to
/// [`DefaultClassifier`].
///
/// ```
/// use ha_core::{Classify, ErrorClass};
/// use ha_mysql::MysqlClassifier;
///
/// let lost = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
/// assert_eq!(MysqlClassifier.classify(&lost), ErrorClass::MaybeSent);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct MysqlClassifier;

impl ha_core::Classify for MysqlClassifier {
    fn classify(&self, err: &(dyn std::error::Error + 'static)) -> ErrorClass {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(m) = e.downcast_ref::<MysqlError>() {
                return m.class();
            }
            if let Some(m) = e.downcast_ref::<mysql_async::Error>() {
                return classify_mysql(m);
            }
            if let Some(ha) = e.downcast_ref::<HaError>()
                && !ha.is_backend()
            {
                return DefaultClassifier.classify(e);
            }
            cur = e.source();
        }
        DefaultClassifier.classify(err)
    }
}

/// Maps a driver error of a connect attempt to a typed start-up error.
pub(crate) fn connect_error(
    addr: SocketAddr,
    user: &str,
    database: Option<&str>,
    source: mysql_async::Error,
) -> MysqlError {
    if let mysql_async::Error::Server(s) = &source {
        match s.code {
            codes::ACCESS_DENIED => {
                return MysqlError::AccessDenied {
                    addr,
                    user: user.to_owned(),
                    message: s.message.clone(),
                };
            }
            codes::BAD_DB | codes::DB_ACCESS_DENIED => {
                return MysqlError::UnknownDatabase {
                    addr,
                    database: database.unwrap_or_default().to_owned(),
                    message: s.message.clone(),
                };
            }
            _ => {}
        }
    }
    MysqlError::Connect { addr, source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use ha_core::Classify;

    fn server(code: u16) -> mysql_async::Error {
        mysql_async::Error::Server(mysql_async::ServerError {
            code,
            message: "x".into(),
            state: "HY000".into(),
        })
    }

    #[test]
    fn read_only_is_an_answer_until_confirmed() {
        assert_eq!(classify_mysql(&server(1290)), ErrorClass::Answered);
        assert!(is_read_only_code(&server(1290)));
        assert!(is_read_only_code(&server(1836)));
        let confirmed = MysqlError::ReadOnly {
            addr: "127.0.1.1:3306".parse().unwrap(),
        };
        assert_eq!(MysqlClassifier.classify(&confirmed), ErrorClass::Refused);
        assert!(MysqlClassifier.classify(&confirmed).is_retryable(false));
    }

    #[test]
    fn a_full_server_refusing_the_handshake_ran_nothing() {
        let addr: SocketAddr = "127.0.1.1:3306".parse().unwrap();
        for code in [
            codes::TOO_MANY_CONNECTIONS,
            codes::TOO_MANY_USER_CONNECTIONS,
        ] {
            let e = MysqlError::Connect {
                addr,
                source: server(code),
            };
            assert_eq!(e.class(), ErrorClass::NotSent, "{code}");
        }
        let other = MysqlError::Connect {
            addr,
            source: server(1130),
        };
        assert_eq!(other.class(), ErrorClass::Final);
    }

    #[test]
    fn lost_connections_are_maybe_sent() {
        for kind in [
            std::io::ErrorKind::UnexpectedEof,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionRefused,
        ] {
            let e = mysql_async::Error::Io(mysql_async::IoError::Io(kind.into()));
            assert_eq!(
                MysqlClassifier.classify(&e),
                ErrorClass::MaybeSent,
                "{kind:?}"
            );
        }
        let closed = mysql_async::Error::Driver(mysql_async::DriverError::ConnectionClosed);
        assert!(!MysqlClassifier.classify(&closed).is_retryable(false));
    }

    #[test]
    fn connect_failures_are_not_sent_and_typed() {
        let addr: SocketAddr = "127.0.1.1:3306".parse().unwrap();
        let refused = mysql_async::Error::Io(mysql_async::IoError::Io(
            std::io::ErrorKind::ConnectionRefused.into(),
        ));
        let e = connect_error(addr, "app", Some("app"), refused);
        assert_eq!(MysqlClassifier.classify(&e), ErrorClass::NotSent);
        assert!(e.is_unreachable());
        let denied = connect_error(addr, "app", Some("app"), server(1045));
        assert!(denied.is_access_denied());
        assert_eq!(denied.class(), ErrorClass::Final);
        let db = connect_error(addr, "app", Some("nope"), server(1049));
        assert!(db.is_unknown_database());
        // Wrapped in HaError::Backend, the chain is still walked.
        let wrapped = HaError::backend(MysqlError::NoPrimary {
            dependency: "db".into(),
        });
        assert_eq!(MysqlClassifier.classify(&wrapped), ErrorClass::Refused);
        let fenced = HaError::Fenced {
            connection: 1,
            current: 2,
        };
        assert_eq!(MysqlClassifier.classify(&fenced), ErrorClass::Refused);
    }
}
