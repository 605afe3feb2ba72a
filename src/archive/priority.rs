//! A pass that has its process to itself gives the application's server
//! processes the cores first while the application writes.
//!
//! Resting ([`super::yielding`]) keeps a pass idle two thirds of the time; in
//! the third it works, pgfold's own threads (receiving the chosen events and
//! encoding them as Parquet, a third of a pass's CPU) compete with the
//! writers' server processes for a core, and on 2 cores every commit that
//! wakes behind them waits. At a lower priority they take what the writers
//! leave. The benchmark's archive phase (2,000 appends a second from 8
//! writers, 3 rounds each): a writer's p99 during a pass 2.04-2.12x its p99
//! without one at the default priority, 1.64-1.81x with the pass's threads at
//! nice 15 while the application writes, for a pass of 52 s rather than 45-50 s
//! under writers, and 4.1-4.4 s alone as before.
//!
//! Only while the application writes: a pass alone at nice 15 took 5.4 s
//! instead of 4.1 s, its own threads behind its two server processes. And
//! only in a process of its own (`pgfold archive`): niceness is per thread,
//! and in `pgfold run` the pass shares its threads with the projectors,
//! whose freshness comes first.

/// The niceness of a pass's threads while the application writes.
const NICE_WHILE_WRITING: i32 = 15;

/// Whether the pass has the process to itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Process {
    /// `pgfold archive`: nothing else runs in it.
    Own,
    /// `pgfold run`'s `archive.interval`: projectors share its threads.
    #[default]
    Shared,
}

/// Lowers the priority of every thread of the process while the application
/// writes (`writing`), or asks for the default one back once it is quiet,
/// which only a process allowed to raise its priority (`CAP_SYS_NICE`) gets;
/// otherwise the pass goes on at the lower one. Nothing for a shared process.
pub fn follow(process: Process, writing: bool) {
    if process == Process::Shared {
        return;
    }
    let nice = if writing { NICE_WHILE_WRITING } else { 0 };
    match set_all_threads(nice) {
        Ok(()) => tracing::debug!(nice, "archive: the pass's threads reniced"),
        Err(e) => {
            tracing::debug!(nice, error = %e, "archive: the pass's threads keep their priority")
        }
    }
}

/// Threads a new thread inherits its creator's niceness from: every thread the
/// process has now, so that those it starts later follow.
#[cfg(target_os = "linux")]
fn set_all_threads(nice: i32) -> std::io::Result<()> {
    for task in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<libc::id_t>().ok())
        else {
            continue;
        };
        // On Linux, PRIO_PROCESS with a thread id sets that thread's niceness.
        // SAFETY: setpriority reads only its integer arguments.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended since the directory was read.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn set_all_threads(_nice: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn niceness_of_this_thread() -> i32 {
        // SAFETY: gettid and getpriority read no memory of ours.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    #[test]
    fn a_pass_of_its_own_lowers_every_thread_and_a_shared_one_none() {
        // A thread of its own: the test harness's other threads are reniced
        // too, which changes nothing they assert.
        let (ready, wait) = std::sync::mpsc::channel();
        let (done, finish) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            ready.send(()).unwrap();
            finish.recv().unwrap();
            niceness_of_this_thread()
        });
        wait.recv().unwrap();
        let before = niceness_of_this_thread();
        follow(Process::Shared, true);
        assert_eq!(niceness_of_this_thread(), before);
        follow(Process::Own, true);
        assert_eq!(niceness_of_this_thread(), NICE_WHILE_WRITING.max(before));
        done.send(()).unwrap();
        assert_eq!(other.join().unwrap(), NICE_WHILE_WRITING.max(before));
        // Back to the default where the process may (as root).
        follow(Process::Own, false);
    }
}
