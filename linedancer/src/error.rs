//! The errors of starting and running a server.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Why a server could not start, or could not do what it was asked. The message names
/// the value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The listening socket could not be made: the address is in use, not local, or
    /// needs privileges.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address we tried to listen on.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// A Unix socket could not be listened on: a server listens on it already ("in
    /// use"), a file that is not a socket is in the way, or its directory is missing or
    /// not ours.
    #[error("cannot listen on unix:{path}: {source}", path = path.display())]
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The sockets passed by a supervisor (`LISTEN_FDS`, `LISTEN_PID`) cannot be used:
    /// a variable that is not a number, or a descriptor that is not a listening TCP or
    /// Unix stream socket.
    #[error("socket activation: {reason}")]
    Activation {
        /// What is wrong, naming the descriptor.
        reason: String,
    },
    /// Taking over the listening sockets of a running server failed
    /// ([`Builder::upgrade_from`](crate::Builder::upgrade_from)); that server goes on
    /// serving.
    #[error("cannot take over from the server at {path}: {reason}", path = path.display())]
    Upgrade {
        /// Its upgrade socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A listening address given as text ([`Builder::address`](crate::Builder::address))
    /// is not `host:port`, or does not resolve.
    #[error("invalid address '{value}': {source}")]
    Address {
        /// The text given.
        value: String,
        /// Why it is not an address.
        source: io::Error,
    },
    /// The server is shutting down and takes no more connections
    /// ([`ServerHandle::serve`](crate::ServerHandle::serve)).
    #[error("the server is shutting down")]
    Stopped,
    /// The signal handlers could not be installed
    /// ([`ServerHandle::run_until_signal`](crate::ServerHandle::run_until_signal)).
    #[error("cannot install the signal handlers: {0}")]
    Signals(io::Error),
    /// A setting has a value the server cannot run with.
    #[error("invalid {setting} {value}: {reason}")]
    Config {
        /// The setting's name, as the builder method that sets it.
        setting: &'static str,
        /// The value given.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A TLS certificate or key file cannot be used: unreadable, not PEM, no
    /// certificate or key in it, or a key that does not match its certificate.
    #[error("cannot use {path}: {reason}", path = path.display())]
    Certificate {
        /// The file at fault.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}
