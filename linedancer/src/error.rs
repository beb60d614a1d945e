//! The errors of starting a server.

use std::io;
use std::net::SocketAddr;

/// Why a server could not start. The message names the value at fault.
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
}
