//! The process harness shared by `refex demo` and the integration tests: one real `refex run`
//! process per area, started from a generated config, stopped with SIGTERM, killed with
//! SIGKILL, and the files a provider sees (outbox, inbox, `rejected/`) listed.
//!
//! Every operation returns a [`HarnessError`] instead of panicking, so the demo can report it;
//! the tests wrap it in panicking helpers. A [`Daemon`] kills its process when dropped, so no
//! path leaves a daemon behind.
//! Must not: hold logic the daemon needs (this only drives the binary from outside).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::core::types::AreaId;
use crate::node::settings::Settings;

/// How long a daemon may take to start serving, or to stop after SIGTERM.
pub const START_STOP_LIMIT: Duration = Duration::from_secs(30);

/// The malloc environment the systemd unit gives a node (`systemd/refex.service` says why),
/// given to every daemon started here so that tests, benches and the demo run what ships.
pub const MALLOC_ENV: [(&str, &str); 2] = [
    ("MALLOC_ARENA_MAX", "2"),
    ("GLIBC_TUNABLES", "glibc.malloc.tcache_max=256"),
];

/// What went wrong driving a daemon.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{area}: {what}: {source}")]
    Io {
        area: AreaId,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{area} exited at start ({status}); see {log}")]
    ExitedAtStart {
        area: AreaId,
        status: ExitStatus,
        log: String,
    },
    #[error("{area} did not {what} within {limit:?}")]
    TimedOut {
        area: AreaId,
        what: &'static str,
        limit: Duration,
    },
    #[error("{area} is not running")]
    NotRunning { area: AreaId },
    #[error("{area}: cannot signal: {source}")]
    Signal {
        area: AreaId,
        source: rustix::io::Errno,
    },
}

/// One area's daemon, run as a real `refex run` process.
pub struct Daemon {
    pub area: AreaId,
    pub config: PathBuf,
    pub settings: Settings,
    /// Where the daemon's stderr is appended.
    pub log: PathBuf,
    /// The `refex` binary.
    pub exe: PathBuf,
    pub extra_env: Vec<(String, String)>,
    /// A command to run the daemon under (e.g. strace), prepended to `refex run`.
    pub wrapper: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    /// A daemon for `config` (not started), logging to `log`.
    pub fn new(exe: PathBuf, config: PathBuf, settings: Settings, log: PathBuf) -> Self {
        Self {
            area: settings.area.clone(),
            config,
            settings,
            log,
            exe,
            extra_env: Vec::new(),
            wrapper: Vec::new(),
            child: None,
        }
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
        move |source| HarnessError::Io {
            area: self.area.clone(),
            what,
            source,
        }
    }

    /// Starts the process and waits until its control socket exists (it is serving).
    pub fn start(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()?;
        self.wait_serving()
    }

    /// Starts the process and returns at once, for a daemon expected to exit at start (it never
    /// binds its control socket). A daemon killed or crashed leaves its socket behind; it is
    /// removed first, so [`Daemon::start`] waits for this daemon's own socket, which is bound
    /// only once start-up recovery is done.
    pub fn spawn(&mut self) -> Result<(), HarnessError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(self.io("open log"))?;
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.exe);
                c
            }
            None => Command::new(&self.exe),
        };
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(MALLOC_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        match fs::remove_file(&self.settings.control_socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(self.io("remove the stale control socket")(e))
            }
            _ => {}
        }
        let child = cmd.spawn().map_err(self.io("spawn refex run"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the spawned daemon's control socket exists; an exit before then is an error.
    fn wait_serving(&mut self) -> Result<(), HarnessError> {
        let start = Instant::now();
        while !self.settings.control_socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(HarnessError::ExitedAtStart {
                    area: self.area.clone(),
                    status,
                    log: self.log.display().to_string(),
                });
            }
            if start.elapsed() > START_STOP_LIMIT {
                return Err(HarnessError::TimedOut {
                    area: self.area.clone(),
                    what: "start",
                    limit: START_STOP_LIMIT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The daemon's process id (under a wrapper, the wrapper's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, pid: u32, sig: rustix::process::Signal) -> Result<(), HarnessError> {
        let pid = rustix::process::Pid::from_raw(pid as i32).ok_or(HarnessError::NotRunning {
            area: self.area.clone(),
        })?;
        rustix::process::kill_process(pid, sig).map_err(|source| HarnessError::Signal {
            area: self.area.clone(),
            source,
        })
    }

    /// SIGTERM, and waits for the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, HarnessError> {
        self.terminate()?;
        self.wait_stopped()
    }

    /// Sends SIGTERM and returns at once: with [`Daemon::wait_stopped`], many daemons stop
    /// together instead of one after the other ([`stop_all`]).
    pub fn terminate(&mut self) -> Result<(), HarnessError> {
        let child = self.child.as_ref().ok_or(HarnessError::NotRunning {
            area: self.area.clone(),
        })?;
        // Under a wrapper (strace), signal the daemon itself; the wrapper exits with it.
        let mut target = child.id();
        if !self.wrapper.is_empty() {
            let children = fs::read_to_string(format!("/proc/{target}/task/{target}/children"))
                .unwrap_or_default();
            target = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(target);
        }
        let signalled = self.signal(target, rustix::process::Signal::TERM);
        if signalled.is_err() {
            self.kill();
        }
        signalled
    }

    /// Waits for the exit status after [`Daemon::terminate`]; kills the daemon when it has not
    /// exited within the start/stop limit.
    pub fn wait_stopped(&mut self) -> Result<ExitStatus, HarnessError> {
        let mut child = self.child.take().ok_or(HarnessError::NotRunning {
            area: self.area.clone(),
        })?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().map_err(self.io("wait"))? {
                return Ok(status);
            }
            if start.elapsed() > START_STOP_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HarnessError::TimedOut {
                    area: self.area.clone(),
                    what: "stop after SIGTERM",
                    limit: START_STOP_LIMIT,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGHUP (reload keys and certificates).
    pub fn hangup(&self) -> Result<(), HarnessError> {
        self.send(rustix::process::Signal::HUP)
    }

    /// Sends `sig` to the daemon's process (e.g. STOP and CONT to freeze and thaw it).
    pub fn send(&self, sig: rustix::process::Signal) -> Result<(), HarnessError> {
        let pid = self.pid().ok_or(HarnessError::NotRunning {
            area: self.area.clone(),
        })?;
        self.signal(pid, sig)
    }

    /// SIGKILL: the process dies wherever it is.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn outbox(&self) -> &Path {
        &self.settings.paths.outbox
    }

    pub fn inbox(&self) -> &Path {
        &self.settings.paths.inbox
    }

    /// Drops a file the careful way a provider should: temporary name, then rename.
    pub fn drop_file(&self, name: &str, bytes: &[u8]) -> Result<(), HarnessError> {
        let tmp = self.outbox().join(format!(".{name}.tmp"));
        fs::write(&tmp, bytes).map_err(self.io("write to the outbox"))?;
        fs::rename(&tmp, self.outbox().join(name)).map_err(self.io("rename into the outbox"))
    }

    /// The delivered referral files (visible names only).
    pub fn inbox_files(&self) -> Vec<PathBuf> {
        inbox_files(self.inbox())
    }

    /// How many delivered referral files there are ([`count_inbox_files`]).
    pub fn inbox_count(&self) -> usize {
        count_inbox_files(self.inbox())
    }

    /// Files still waiting in the outbox (not `rejected/`).
    pub fn outbox_files(&self) -> Vec<PathBuf> {
        list(self.outbox(), |_| true)
            .into_iter()
            .filter(|p| p.is_file())
            .collect()
    }

    /// Everything in `outbox/rejected/`.
    pub fn rejected_files(&self) -> Vec<PathBuf> {
        list(&self.outbox().join("rejected"), |_| true)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `name` is a delivered referral file (a visible `*.json` name).
fn is_inbox_file(name: &str) -> bool {
    name.ends_with(".json") && !name.starts_with('.')
}

/// The delivered referral files of an inbox directory (visible `*.json` names), sorted.
pub fn inbox_files(dir: &Path) -> Vec<PathBuf> {
    list(dir, is_inbox_file)
}

/// How many delivered referral files an inbox directory holds; 0 when it cannot be read.
/// What the demos and benches poll while they wait: no path is built and nothing sorted
/// (listing and sorting 43 inboxes of ~2,000 paths four times a second took the national run
/// ~5 % longer, on the very cores it measures).
pub fn count_inbox_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(is_inbox_file))
        .count()
}

/// User + system CPU seconds process `pid` has used so far (all its threads, also those that
/// have ended): utime and stime, fields 14 and 15 of `/proc/PID/stat` (after the parenthesised
/// name, which may hold spaces); 0 when unreadable. Clock-tick resolution (10 ms).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: f64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse::<f64>().ok())
                .sum()
        })
        .unwrap_or(0.0);
    ticks / rustix::param::clock_ticks_per_second().max(1) as f64
}

/// Stops every daemon at once (SIGTERM to all, then each exit status, in order): a daemon
/// takes up to ~0.3 s to close its connections and sync, so 43 of them one after the other
/// would wait ~43 times that.
pub fn stop_all(daemons: &mut [Daemon]) -> Vec<Result<ExitStatus, HarnessError>> {
    let signalled: Vec<_> = daemons.iter_mut().map(Daemon::terminate).collect();
    daemons
        .iter_mut()
        .zip(signalled)
        .map(|(d, s)| s.and_then(|()| d.wait_stopped()))
        .collect()
}

/// The entries of `dir` whose names pass `keep`, sorted; empty when `dir` cannot be read.
pub fn list(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| keep(&n.to_string_lossy()))
                .unwrap_or(false)
        })
        .collect();
    v.sort();
    v
}

/// Polls `ok` until it holds; `false` after `limit`.
pub fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness's daemons run with exactly the malloc environment the shipped unit sets.
    #[test]
    fn daemons_get_the_malloc_environment_of_the_systemd_unit() {
        let unit = include_str!("../../systemd/refex.service");
        let set: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .filter(|kv| kv.starts_with("MALLOC_") || kv.starts_with("GLIBC_"))
            .collect();
        let ours: Vec<String> = MALLOC_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            set, ours,
            "systemd/refex.service and harness::MALLOC_ENV differ"
        );
    }
}
