//! `pgfold` (or another binary built on its command line, such as an example or
//! the benchmark run as pgfold) as a child process, for the tests, the torture
//! test and the benchmark: its output, peak RSS and CPU, SIGTERM and SIGKILL.
//! The child is SIGKILLed when its [`Daemon`] is dropped, so a test or benchmark
//! that fails half-way leaves nothing running.
//!
//! The binary's path comes from the caller: `env!("CARGO_BIN_EXE_pgfold")` is
//! known only when compiling an integration test or a bench.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where a child's stdout or stderr goes.
#[derive(Debug)]
pub enum Sink {
    /// Nowhere.
    Null,
    /// Collected line by line, for [`Daemon::lines`].
    Lines,
    /// Appended to this file (a clone of it per child; several children, or
    /// stdout and stderr, may share one). [`Daemon::output`] reads it back.
    File(File),
}

/// How to start a child: program, arguments, environment and where its output
/// goes. By default DATABASE_URL is removed from the environment, RUST_LOG is
/// `warn`, stdin and stdout are null and stderr is collected line by line.
#[derive(Debug)]
pub struct Spawn {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    stdout: Sink,
    stderr: Sink,
    watch_peak_rss: bool,
}

impl Spawn {
    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Spawn
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one environment variable (after the defaults, so it wins over them).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Spawn {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Sets these environment variables.
    pub fn envs<I, K, V>(mut self, vars: I) -> Spawn
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    /// Where stdout goes.
    pub fn stdout(mut self, sink: Sink) -> Spawn {
        self.stdout = sink;
        self
    }

    /// Where stderr goes.
    pub fn stderr(mut self, sink: Sink) -> Spawn {
        self.stderr = sink;
        self
    }

    /// Polls the child's peak RSS (VmHWM) every ~10 ms, for
    /// [`Daemon::peak_rss_kib`].
    pub fn watch_peak_rss(mut self) -> Spawn {
        self.watch_peak_rss = true;
        self
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        cmd
    }

    /// Starts a child; this `Spawn` can start more alike.
    pub fn spawn(&self) -> anyhow::Result<Daemon> {
        let name = self.program.display().to_string();
        let stdio = |sink: &Sink| -> anyhow::Result<Stdio> {
            Ok(match sink {
                Sink::Null => Stdio::null(),
                Sink::Lines => Stdio::piped(),
                Sink::File(f) => Stdio::from(f.try_clone().context("clone the log file")?),
            })
        };
        let mut child = self
            .command()
            .stdout(stdio(&self.stdout)?)
            .stderr(stdio(&self.stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id();

        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>);
        for pipe in [stdout, stderr].into_iter().flatten() {
            let sink = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    match line {
                        Ok(line) => sink.lock().unwrap().push(line),
                        Err(_) => break,
                    }
                }
            }));
        }
        let log = match (&self.stderr, &self.stdout) {
            (Sink::File(f), _) | (_, Sink::File(f)) => {
                Some(f.try_clone().context("clone the log file")?)
            }
            _ => None,
        };

        let peak_kib = Arc::new(AtomicU64::new(0));
        let watching = Arc::new(AtomicBool::new(true));
        let watcher = self.watch_peak_rss.then(|| {
            let (peak, watching) = (peak_kib.clone(), watching.clone());
            std::thread::spawn(move || {
                while watching.load(Ordering::Relaxed) {
                    if let Some(k) = vm_hwm_kib(pid) {
                        peak.fetch_max(k, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        });
        Ok(Daemon {
            child,
            lines,
            readers,
            log,
            peak_kib,
            watching,
            watcher,
        })
    }

    /// Runs the program to its end and returns what it printed (stdout and stderr
    /// captured, whatever the sinks say).
    pub fn output(&self) -> anyhow::Result<Output> {
        self.command()
            .output()
            .with_context(|| format!("cannot run {}", self.program.display()))
    }
}

/// A running child (see the module doc).
pub struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    log: Option<File>,
    peak_kib: Arc<AtomicU64>,
    watching: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

impl Daemon {
    /// How to start `program` (see [`Spawn`] for the defaults).
    pub fn command(program: impl AsRef<Path>) -> Spawn {
        Spawn {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stdout: Sink::Null,
            stderr: Sink::Lines,
            watch_peak_rss: false,
        }
    }

    /// Starts `program ARGS` with `env`, its stderr collected line by line; panics
    /// if it cannot be started (for tests).
    pub fn spawn(program: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let spawn = Daemon::command(program)
            .args(args)
            .envs(env.iter().copied());
        spawn.spawn().unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines collected so far (from the [`Sink::Lines`] outputs).
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything written so far: the log file's contents with a [`Sink::File`]
    /// (read from its start, through the offset the child shares: call it once
    /// the child has exited), otherwise the collected lines.
    pub fn output(&mut self) -> String {
        match &mut self.log {
            Some(file) => {
                let mut s = String::new();
                let _ = file.rewind();
                let _ = file.read_to_string(&mut s);
                s
            }
            None => self.lines().join("\n"),
        }
    }

    /// Whether it is still running (it has not exited on its own).
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// An error, with the last lines of its output, if it has exited.
    pub fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "pgfold exited early ({status}); its log:\n{}",
                tail(&self.output(), 30)
            );
        }
        Ok(())
    }

    /// utime + stime so far, in clock ticks.
    pub fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks(self.pid())
    }

    /// The peak RSS seen (with [`Spawn::watch_peak_rss`]), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed)
    }

    /// Waits for it to exit on its own.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = self.child.wait()?;
        self.finish();
        Ok(status)
    }

    /// SIGKILL, reap it, and collect the rest of its output.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.finish();
    }

    /// SIGTERM, then waits for it to exit on its own (up to `within`); `None` if
    /// it is still running then.
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        let pid = self.pid().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.finish();
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// SIGTERM, then SIGKILL if it has not exited within `within`.
    pub fn stop(&mut self, within: Duration) -> std::io::Result<ExitStatus> {
        match self.terminate(within) {
            Some(status) => Ok(status),
            None => {
                let _ = self.child.kill();
                self.wait()
            }
        }
    }

    /// Once it has exited: the rest of its output read, the RSS watcher stopped.
    fn finish(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.watching.store(false, Ordering::Relaxed);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `program ARGS` with `env` to its end, as [`Daemon::command`] would start
/// it; panics if it cannot be started (for tests).
pub fn run(program: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let run = Daemon::command(program)
        .args(args)
        .envs(env.iter().copied());
    run.output().unwrap_or_else(|e| panic!("{e:#}"))
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// VmHWM (peak resident set) of a process, in KiB.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// VmRSS (resident set now) of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A `field:` line of `/proc/<pid>/status` given in kB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0; utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if that fails).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
