//! What the bench asks of the operating system: the server's CPU time, memory and open
//! sockets from `/proc`, and room for many sockets in this process.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use tracing::warn;

/// The server process whose usage is reported.
#[derive(Debug)]
pub struct Server {
    /// Its pid.
    pid: u32,
    /// Clock ticks per second, the unit of `/proc/PID/stat`'s CPU times.
    ticks_per_sec: u64,
}

impl Server {
    /// The process `pid`, if its `/proc` entries can be read.
    pub fn new(pid: u32) -> io::Result<Server> {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let server = Server {
            pid,
            ticks_per_sec: u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100),
        };
        server.read_cpu_time()?;
        server.read_rss()?;
        Ok(server)
    }

    /// The CPU time (user + system) the server has used so far, or `None` (with a
    /// warning) if it can no longer be read.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.read_cpu_time()
            .map_err(|error| warn!(pid = self.pid, %error, "cannot read the server's CPU time"))
            .ok()
    }

    /// The server's resident memory (VmRSS) in bytes, or `None` (with a warning) if it
    /// can no longer be read.
    pub fn rss(&self) -> Option<u64> {
        self.read_rss()
            .map_err(|error| warn!(pid = self.pid, %error, "cannot read the server's memory"))
            .ok()
    }

    /// The server's open sockets, counted in `/proc/PID/fd`; or `None` (with a
    /// warning) if they cannot be read, as for another user's process.
    pub fn descriptors(&self) -> Option<Descriptors> {
        self.read_descriptors()
            .map_err(|error| warn!(pid = self.pid, %error, "cannot read the server's descriptors"))
            .ok()
    }

    fn read_descriptors(&self) -> io::Result<Descriptors> {
        let mut sockets = 0;
        for entry in std::fs::read_dir(format!("/proc/{}/fd", self.pid))? {
            match std::fs::read_link(entry?.path()) {
                Ok(target) => sockets += u64::from(is_socket(&target)),
                // Closed between the listing and the reading of its link.
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(Descriptors { sockets })
    }

    fn read_cpu_time(&self) -> io::Result<Duration> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path)?;
        let ticks = parse_cpu_ticks(&stat).ok_or_else(|| unreadable(&path))?;
        Ok(Duration::from_micros(
            ticks.saturating_mul(1_000_000) / self.ticks_per_sec,
        ))
    }

    fn read_rss(&self) -> io::Result<u64> {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path)?;
        parse_vm_rss(&status).ok_or_else(|| unreadable(&path))
    }
}

/// What `/proc` tells of a process's descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// Open sockets (listening, connected, of any family).
    pub sockets: u64,
}

fn unreadable(path: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected contents in {path}"),
    )
}

/// Whether a link in `/proc/PID/fd` names a socket: its target is `socket:[INODE]`.
fn is_socket(target: &Path) -> bool {
    target.as_os_str().as_bytes().starts_with(b"socket:[")
}

/// utime + stime, in clock ticks, from the contents of `/proc/PID/stat`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may itself hold spaces and parentheses: the
    // fields are counted from the last ')'. After it come state (field 3), and then
    // utime and stime as fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in bytes, from the contents of `/proc/PID/status` (which gives it in kB).
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Raises this process's soft limit on open files towards `wanted`, as far as the hard
/// limit allows, so that many connections do not fail for want of descriptors.
pub fn raise_open_files_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for getrlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 || limit.rlim_cur >= wanted
    {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: wanted.min(limit.rlim_max),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: `raised` is a valid rlimit, its soft limit within the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        warn!(error = %io::Error::last_os_error(), "cannot raise the open files limit");
    } else if raised.rlim_cur < wanted {
        warn!(
            limit = raised.rlim_cur,
            wanted, "the open files limit is lower than the connections need"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (my (odd) server) S 1 4242 4242 0 -1 4194560 \
                    1010 0 0 0 250 75 0 0 20 0 2 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (truncated) S 1"), None);
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tserver\nVmPeak:\t  20000 kB\nVmRSS:\t    1536 kB\nThreads:\t2\n";
        assert_eq!(parse_vm_rss(status), Some(1536 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthread\n"), None);
    }

    #[test]
    fn socket_links_are_told_from_other_descriptors() {
        assert!(is_socket(Path::new("socket:[123456]")));
        assert!(!is_socket(Path::new("anon_inode:[eventpoll]")));
        assert!(!is_socket(Path::new("/tmp/socket:[1]")));
        assert!(!is_socket(Path::new("pipe:[42]")));
    }

    #[test]
    fn this_process_can_be_read() {
        let me = Server::new(std::process::id()).expect("our own /proc entries");
        assert!(me.rss().expect("our memory") > 0);
        assert!(me.cpu_time().is_some());
        // No other unit test of this binary opens sockets, so the count moves only with
        // these listeners.
        let before = me.descriptors().expect("our descriptors");
        let listeners: Vec<_> = (0..300)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
            .collect();
        let open = me.descriptors().expect("our descriptors");
        assert_eq!(open.sockets, before.sockets + 300);
        drop(listeners);
        let closed = me.descriptors().expect("our descriptors");
        assert_eq!(closed.sockets, before.sockets);
    }
}
