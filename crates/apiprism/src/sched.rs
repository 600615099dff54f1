//! A short scheduler slice for apiprism's thread, so that a wake-up preempts sooner on a busy core.
//!
//! What the profile of the 1 KiB round trips showed (hack/bench/apiprism.sh, `perf record`, `strace -c`): per
//! round trip, apiprism makes six splice(2) calls and two epoll_wait(2) calls, as few as HAProxy's
//! recv/send/epoll; almost all of its time is the kernel waking the peer (`sock_def_readable`) and being
//! scheduled in again (`finish_task_switch` under `schedule_hrtimeout_range`). The tail is the wait for the
//! CPU after a wake-up, when the core is shared (on a node: the kubelet, the container runtime, workloads).
//! Linux's EEVDF scheduler (6.6+) lets a task ask for a shorter slice (`sched_setattr`, `sched_runtime`, taken
//! as the slice for `SCHED_OTHER` since 6.12): its virtual deadline comes sooner, so a wake-up preempts a
//! long-running task instead of waiting for the end of its slice. A proxy that runs a few microseconds per
//! wake-up is what it is for. No privilege is needed; the nice value stays; older kernels ignore the field.

use std::io;
use std::time::Duration;

/// The slice asked for: the kernel's smallest.
pub const SLICE: Duration = Duration::from_micros(100);

/// Asks for [`SLICE`] on the calling thread (apiprism's one runtime thread). Best effort: logs the outcome.
pub fn request_short_slice() {
    match set_slice(SLICE) {
        Ok(()) => tracing::info!(slice = ?SLICE, "short scheduler slice requested"),
        Err(error) => tracing::info!(%error, "no short scheduler slice (kept the default)"),
    }
}

#[allow(unsafe_code)]
fn set_slice(slice: Duration) -> io::Result<()> {
    use nix::libc;
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain values and touches no memory of ours.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    let attr = libc::sched_attr {
        size: u32::try_from(std::mem::size_of::<libc::sched_attr>()).unwrap_or(48),
        sched_policy: u32::try_from(libc::SCHED_OTHER).unwrap_or(0),
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr(2) on the calling thread (0) reads `attr`, a local that outlives the call, of the
    // size it says.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &raw const attr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call is accepted on this kernel (unprivileged too: checked by hand with setpriv), and the nice value stays.
    #[test]
    fn asks_for_a_short_slice_and_keeps_the_nice_value() {
        let thread = std::thread::spawn(|| {
            let before = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
            let result = set_slice(SLICE);
            let after = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
            // Field 19 is the nice value (after the command name in parentheses).
            let nice = |s: &str| {
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().nth(16))
                    .map(str::to_owned)
            };
            (result, nice(&before), nice(&after))
        });
        let (result, before, after) = thread
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(before, after, "the nice value changed");
    }
}
