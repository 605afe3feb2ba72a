//! A pass gives the application's server processes the cores first while
//! the application writes.
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
//! only the pass's threads: niceness is per thread, so `pgfold archive`, which
//! has its process to itself, lowers all of them, and `pgfold run` runs each
//! of its `interval` passes on a runtime of its own ([`on_own_threads`]) and
//! lowers that runtime's threads alone, never the projectors'.

use std::future::Future;
use std::sync::{Arc, Mutex};

/// The niceness of a pass's threads while the application writes.
const NICE_WHILE_WRITING: i32 = 15;

/// Which threads are the pass's.
#[derive(Clone, Debug)]
pub enum Process {
    /// `pgfold archive`: every thread of the process.
    Own,
    /// The threads of the pass's own runtime in a process that runs other
    /// work (see [`on_own_threads`]).
    Threads(Arc<Mutex<Registered>>),
}

/// The threads of a pass's runtime, and the niceness they are at: a thread
/// that starts later takes it as it registers (it inherits its creator's,
/// which may be a thread of another part of the process).
#[derive(Debug, Default)]
pub struct Registered {
    threads: Vec<ThreadId>,
    nice: i32,
}

/// A thread's id, as `setpriority` takes it.
pub type ThreadId = libc::id_t;

/// Lowers the priority of the pass's threads while the application writes
/// (`writing`), or asks for the default one back once it is quiet, which only
/// a process allowed to raise its priority (`CAP_SYS_NICE`) gets; otherwise
/// the pass goes on at the lower one.
pub fn follow(process: &Process, writing: bool) {
    let nice = if writing { NICE_WHILE_WRITING } else { 0 };
    let set = match process {
        Process::Own => set_all_threads(nice),
        Process::Threads(registered) => {
            // Held while renicing, so that a thread registering meanwhile
            // takes the new niceness itself.
            let mut registered = registered.lock().unwrap_or_else(|e| e.into_inner());
            registered.nice = nice;
            set_threads(&registered.threads, nice)
        }
    };
    match set {
        Ok(()) => tracing::debug!(nice, "archive: the pass's threads reniced"),
        Err(e) => {
            tracing::debug!(nice, error = %e, "archive: the pass's threads keep their priority")
        }
    }
}

/// Runs what `pass` makes on a runtime of its own, on threads of its own (two
/// workers, and its blocking threads), handing it those threads as its
/// [`Process`]; the result arrives on the receiver. The runtime ends with the
/// future, on its own thread.
pub fn on_own_threads<T, F, Fut>(pass: F) -> std::io::Result<tokio::sync::oneshot::Receiver<T>>
where
    T: Send + 'static,
    F: FnOnce(Process) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let threads: Arc<Mutex<Registered>> = Arc::default();
    let register = {
        let threads = threads.clone();
        move || {
            if let Some(tid) = this_thread() {
                let mut registered = threads.lock().unwrap_or_else(|e| e.into_inner());
                registered.threads.push(tid);
                if registered.nice != 0 {
                    let _ = set_threads(&[tid], registered.nice);
                }
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pgfold-archive")
        .on_thread_start(register.clone())
        .enable_all()
        .build()?;
    let (send, receive) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("pgfold-archive".into())
        .spawn(move || {
            // This thread polls the pass's own future: one of its threads too.
            register();
            let _ = send.send(runtime.block_on(pass(Process::Threads(threads))));
        })?;
    Ok(receive)
}

#[cfg(target_os = "linux")]
fn this_thread() -> Option<ThreadId> {
    // SAFETY: gettid takes nothing and cannot fail.
    Some(unsafe { libc::syscall(libc::SYS_gettid) } as ThreadId)
}

#[cfg(not(target_os = "linux"))]
fn this_thread() -> Option<ThreadId> {
    None
}

/// Sets every thread of the process to `nice`. A new thread inherits its
/// creator's niceness, so those the process starts later follow. A listing of
/// the threads skips one now and then when another ends as it is read (the
/// kernel lists them by position), so the process is listed again until a
/// listing finds no thread not set yet.
fn set_all_threads(nice: i32) -> std::io::Result<()> {
    let mut set: Vec<ThreadId> = Vec::new();
    loop {
        let new: Vec<ThreadId> = all_threads()?
            .into_iter()
            .filter(|tid| !set.contains(tid))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        set_threads(&new, nice)?;
        set.extend(new);
    }
}

/// The threads of the process, as one listing shows them.
#[cfg(target_os = "linux")]
fn all_threads() -> std::io::Result<Vec<ThreadId>> {
    let mut tids = Vec::new();
    // An entry that cannot be read is a thread that ended as it was listed.
    for task in std::fs::read_dir("/proc/self/task")?.flatten() {
        if let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) {
            tids.push(tid);
        }
    }
    Ok(tids)
}

#[cfg(target_os = "linux")]
fn set_threads(tids: &[ThreadId], nice: i32) -> std::io::Result<()> {
    let mut first_error = None;
    for &tid in tids {
        // On Linux, PRIO_PROCESS with a thread id sets that thread's niceness.
        // SAFETY: setpriority reads only its integer arguments.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile is no error; one refused does not
            // keep the others from trying.
            if e.raw_os_error() != Some(libc::ESRCH) {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(not(target_os = "linux"))]
fn all_threads() -> std::io::Result<Vec<ThreadId>> {
    Ok(Vec::new())
}

#[cfg(not(target_os = "linux"))]
fn set_threads(_tids: &[ThreadId], _nice: i32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn niceness_of_this_thread() -> i32 {
        let tid = this_thread().expect("a thread id on Linux");
        // SAFETY: getpriority reads only its integer arguments.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
    }

    #[test]
    fn a_pass_lowers_its_own_threads_alone_or_its_whole_process() {
        // One test, not two: the second half renices every thread of the
        // test process, which the first half's caller must not be yet.
        let before = niceness_of_this_thread();
        let receive = on_own_threads(|process| async move {
            follow(&process, true);
            // A worker of the pass's runtime, and the thread polling the pass.
            let worker = tokio::spawn(async { niceness_of_this_thread() })
                .await
                .unwrap();
            (worker, niceness_of_this_thread())
        })
        .unwrap();
        let (worker, polling) = receive.blocking_recv().unwrap();
        assert_eq!(worker, NICE_WHILE_WRITING.max(before));
        assert_eq!(polling, NICE_WHILE_WRITING.max(before));
        assert_eq!(niceness_of_this_thread(), before, "the caller's thread");

        // The whole process: a thread started before, and this one.
        let (ready, wait) = std::sync::mpsc::channel();
        let (done, finish) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            ready.send(()).unwrap();
            finish.recv().unwrap();
            niceness_of_this_thread()
        });
        wait.recv().unwrap();
        follow(&Process::Own, true);
        assert_eq!(niceness_of_this_thread(), NICE_WHILE_WRITING.max(before));
        done.send(()).unwrap();
        assert_eq!(other.join().unwrap(), NICE_WHILE_WRITING.max(before));
        // Back to the default where the process may (as root).
        follow(&Process::Own, false);
    }
}
