//! CPU time of processes on this machine, for the benchmark's cost figures: this
//! process's own (client, and the in-process server when there is one) and the
//! broker's when it runs here, found by the port it listens on. Linux only (`/proc`);
//! elsewhere the figures are left out and the output says so.

use std::path::Path;

/// Clock ticks per second of the times in `/proc/<pid>/stat` (`USER_HZ`: 100 on every
/// Linux architecture we build for; the kernel converts to it for user space).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process whose CPU time is read: this one, or another by PID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Process {
    /// This process.
    Me,
    /// Another process.
    Pid(u32),
}

impl Process {
    /// User plus system CPU seconds the process has used so far (`None` when it cannot
    /// be read: not Linux, the process is gone, or not ours to read).
    pub(super) fn cpu_seconds(self) -> Option<f64> {
        let path = match self {
            Process::Me => "/proc/self/stat".to_string(),
            Process::Pid(pid) => format!("/proc/{pid}/stat"),
        };
        let stat = std::fs::read_to_string(path).ok()?;
        stat_cpu_seconds(&stat)
    }
}

/// User plus system time from the text of a `/proc/<pid>/stat`. The command name (field
/// 2) is in parentheses and may itself hold spaces or parentheses, so the fields are
/// counted from the last `)`: `utime` and `stime` are fields 14 and 15.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / TICKS_PER_SECOND)
}

/// The process on this machine that listens on TCP `port` (IPv4 or IPv6), if one does
/// and its file descriptors can be read.
pub(super) fn listening_process(port: u16) -> Option<u32> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| listening_inodes(&table, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| holds_any_socket(*pid, &wanted))
}

/// The socket inodes of the rows of a `/proc/net/tcp` table that listen on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let local_port = fields.get(1)?.rsplit_once(':')?.1;
            let listening = *fields.get(3)? == LISTEN;
            (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                .then(|| fields.get(9).map(|inode| inode.to_string()))
                .flatten()
        })
        .collect()
}

/// Whether process `pid` has one of the `sockets` (`socket:[inode]`) open.
fn holds_any_socket(pid: u32, sockets: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
        return false;
    };
    fds.filter_map(|fd| fd.ok())
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| sockets.iter().any(|s| target.as_os_str() == s.as_str()))
}

/// The port of a `host:port` address whose host is this machine (a loopback name or
/// address), `None` for any other host.
pub(super) fn local_port(address: &str) -> Option<u16> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    local.then(|| port.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (tansu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9";
        assert_eq!(stat_cpu_seconds(stat), Some(3.0));
        assert_eq!(stat_cpu_seconds("garbage"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time() {
        assert!(Process::Me.cpu_seconds().is_some_and(|s| s >= 0.0));
    }

    #[test]
    fn the_listener_of_a_port_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        assert_eq!(listening_process(port), Some(std::process::id()));
        drop(listener);
        assert_eq!(listening_process(port), None);
    }

    #[test]
    fn only_loopback_hosts_are_local() {
        assert_eq!(local_port("127.0.0.1:9092"), Some(9092));
        assert_eq!(local_port("localhost:6380"), Some(6380));
        assert_eq!(local_port("[::1]:8085"), Some(8085));
        assert_eq!(local_port("kafka.example.com:9092"), None);
        assert_eq!(local_port("10.1.2.3:9092"), None);
    }
}
