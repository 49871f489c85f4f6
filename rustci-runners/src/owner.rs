//! Who owns what a runner leaves outside its own process (containers, pods): a token naming
//! this process, and a liveness check, so a start-up sweep removes only what a process
//! that is gone left behind.

/// Start time of a process (clock ticks since boot), which tells a process from a later
/// one that reuses its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// This host's name (from the kernel), empty when unknown.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// `host/pid/start-time` of this process.
pub fn owner_token() -> String {
    let pid = std::process::id();
    format!("{}/{pid}/{}", this_host(), start_time(pid).unwrap_or(0))
}

/// Whether the owner named by `token` is known to be alive: a live process of this host
/// with the same start time is alive, a vanished one is not, and `None` means the token
/// names another host (or is malformed), whose processes cannot be checked from here.
pub fn owner_alive(token: &str, host: &str) -> Option<bool> {
    let mut parts = token.split('/');
    let (Some(owner_host), Some(pid)) = (
        parts.next(),
        parts.next().and_then(|p| p.parse::<u32>().ok()),
    ) else {
        return None;
    };
    if owner_host != host {
        return None;
    }
    Some(
        match (
            start_time(pid),
            parts.next().and_then(|t| t.parse::<u64>().ok()),
        ) {
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
            (None, _) => false,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_dead_one_is_not() {
        let host = this_host();
        assert_eq!(owner_alive(&owner_token(), &host), Some(true));
        assert_eq!(
            owner_alive(&format!("{host}/999999999/1"), &host),
            Some(false)
        );
        let pid = std::process::id();
        assert_eq!(owner_alive(&format!("{host}/{pid}/1"), &host), Some(false));
        assert_eq!(owner_alive("elsewhere/1/1", &host), None);
        assert_eq!(owner_alive("garbage", &host), None);
    }
}
