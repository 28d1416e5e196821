use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// Errors of the lab: every variant carries the context needed to act on it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A socket could not be bound (address in use, address not local, ...).
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address that could not be bound.
        addr: SocketAddr,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A port offset moves a server's port past 65535.
    #[error("port offset {offset} moves {server}'s port {port} past 65535 (largest offset for it: {max})", max = u16::MAX - port)]
    PortOverflow {
        /// The offset asked for (the total, when offsets were added up).
        offset: u32,
        /// The server whose port overflows.
        server: String,
        /// Its port before any offset.
        port: u16,
    },
    /// A DNS name could not be parsed or lies outside the served zone.
    #[error("invalid dns name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A program needed by the lab is not on `PATH`.
    #[error("program {program:?} not found on PATH (install the Debian package {package:?})")]
    MissingBinary {
        /// The program that was looked for.
        program: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A program the lab builds with `cargo install` (the RocketMQ servers) is neither on `PATH`
    /// nor in the project's install location.
    #[error("program {program:?} not found on PATH nor in {searched} (install it with `{install}`)", searched = searched.display())]
    MissingProgram {
        /// The program that was looked for.
        program: String,
        /// The directory searched after `PATH`.
        searched: PathBuf,
        /// The command that installs it.
        install: String,
    },
    /// A child process could not be spawned.
    #[error("spawn {name} ({program}): {source}")]
    Spawn {
        /// The server name.
        name: String,
        /// The program.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A child process did not become ready in time.
    #[error("{name} not ready within {timeout:?} (log: {log})", log = log.display())]
    NotReady {
        /// The server name.
        name: String,
        /// How long we waited.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
    },
    /// Another process already serves the address a child was started for: the address answers,
    /// but no socket of the child's process group listens on it (a leftover server, another
    /// lab). The child was killed, or had exited with `status`.
    #[error("{name}: {addr} is already in use by a process that is not ours (our child: {status}; log: {log})", log = log.display())]
    AddressInUse {
        /// The server name.
        name: String,
        /// The address that answered without our child listening on it.
        addr: SocketAddr,
        /// What became of our child: `pid N, not listening` or its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A child process exited while it was being started.
    #[error("{name} exited during start-up with {status} (log: {log})", log = log.display())]
    Exited {
        /// The server name.
        name: String,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A server of that name is already running.
    #[error("{name} is already running (pid {pid})")]
    AlreadyRunning {
        /// The server name.
        name: String,
        /// Its pid.
        pid: u32,
    },
    /// No server of that name is known.
    #[error("unknown server {name:?} (known: {known})")]
    UnknownServer {
        /// The name asked for.
        name: String,
        /// The known names, comma separated.
        known: String,
    },
    /// The server is known but not running.
    #[error("{name} is not running")]
    NotRunning {
        /// The server name.
        name: String,
    },
    /// A signal could not be delivered.
    #[error("send {signal} to {name} (pid {pid}): {source}")]
    Signal {
        /// The server name.
        name: String,
        /// The pid signalled.
        pid: u32,
        /// The signal name.
        signal: &'static str,
        /// The underlying error.
        source: nix::errno::Errno,
    },
    /// `nft` failed.
    #[error("nft {action}: {message}")]
    Nft {
        /// What was attempted.
        action: String,
        /// nft's stderr or the io error.
        message: String,
    },
    /// The fault does not apply to that kind of server.
    #[error("fault {fault} does not apply to {name} ({kind}){hint}")]
    Unsupported {
        /// The fault asked for.
        fault: String,
        /// The server name.
        name: String,
        /// The server kind.
        kind: String,
        /// A hint of what to do instead, starting with "; " when present.
        hint: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The control socket of a lab daemon failed or answered an error.
    #[error("control: {0}")]
    Control(String),
    /// A JSON document could not be read or written.
    #[error("{context}: {source}")]
    Json {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: serde_json::Error,
    },
}

impl LabError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }

    /// True when a program is missing from `PATH` (or, for the RocketMQ servers, also from their
    /// install location).
    pub fn is_missing_binary(&self) -> bool {
        matches!(
            self,
            LabError::MissingBinary { .. } | LabError::MissingProgram { .. }
        )
    }

    /// True when a server's address was already taken by a process that is not ours.
    pub fn is_address_in_use(&self) -> bool {
        matches!(self, LabError::AddressInUse { .. })
    }

    /// True when a port offset moved a port past 65535.
    pub fn is_port_overflow(&self) -> bool {
        matches!(self, LabError::PortOverflow { .. })
    }

    /// True when a server name was not known.
    pub fn is_unknown_server(&self) -> bool {
        matches!(self, LabError::UnknownServer { .. })
    }
}
