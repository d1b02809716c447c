//! A LazyFS mount for power-cut tests: a FUSE filesystem with its own page cache, so everything
//! not fsynced (contents, new names, renames, unlinks) can be dropped on command, as a power cut
//! would. The binary is built by `../shared/tools/lazyfs/build` (or named by REFEX_LAZYFS_BIN).
//! Must not: be used where /dev/fuse is missing, or where neither REFEX_LAZYFS_BIN nor the
//! shared build tool exists ([`LazyFs::mount`] returns `None` and says so, loudly).

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::wait_until;

pub struct LazyFs {
    pub mnt: PathBuf,
    bin: PathBuf,
    cfg: PathBuf,
    root: PathBuf,
    /// LazyFS's stderr (its `logfile` is empty, so faults and errors land here).
    log: PathBuf,
    fifo: PathBuf,
    /// LazyFS's notifier FIFO (`fifo_path_completed`), read end, non-blocking: LazyFS writes
    /// `finished::clear-cache` there once a clear has been applied.
    completed: fs::File,
    child: Child,
    watchdog: Watchdog,
    /// How often LazyFS crashed on its own and was mounted again ([`LazyFs::crashed_on_its_own`]).
    own_crashes: u32,
}

/// How many crashes of LazyFS's own a test takes as extra power cuts before it fails.
const OWN_CRASHES_TAKEN: u32 = 2;

/// How long a test may keep a LazyFS mount before the watchdog fires (see [`Watchdog`]); the
/// power-cut tests take seconds to two minutes here. REFEX_LAZYFS_WATCHDOG_SECS overrides it.
const WATCHDOG_LIMIT: Duration = Duration::from_secs(600);

/// A hung FUSE filesystem hangs its test for ever: a request LazyFS never answers leaves the
/// caller in the kernel's uninterruptible wait (a SIGKILLed daemon cannot even be reaped), so no
/// timeout in the test can fire. That happened once in CI (a power-cut test ran 80 minutes,
/// until CI's limit). The watchdog turns it into a failure with evidence: past its limit it
/// prints each process's state and kernel stack, LazyFS's threads (gdb, when installed) and its
/// log, then aborts the FUSE connection (every pending request fails with ENOTCONN, so the test
/// thread wakes and fails where it waited) and kills LazyFS. If the test still has not finished
/// two minutes later, it ends the test process with exit 101.
struct Watchdog {
    done: Arc<AtomicBool>,
    /// The current LazyFS process (it changes at [`LazyFs::remount`]).
    pid: Arc<AtomicU32>,
    limit_secs: Arc<AtomicU64>,
}

impl Watchdog {
    fn start(mnt: PathBuf, log: PathBuf, pid: u32) -> Self {
        let limit = std::env::var("REFEX_LAZYFS_WATCHDOG_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(WATCHDOG_LIMIT.as_secs());
        let me = Self {
            done: Arc::new(AtomicBool::new(false)),
            pid: Arc::new(AtomicU32::new(pid)),
            limit_secs: Arc::new(AtomicU64::new(limit)),
        };
        let (done, pid, limit) = (me.done.clone(), me.pid.clone(), me.limit_secs.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            if ended_within(&done, || Duration::from_secs(limit.load(Ordering::SeqCst))) {
                return;
            }
            let lazyfs = pid.load(Ordering::SeqCst);
            eprintln!(
                "WATCHDOG: a LazyFS test has held {} for {:?}; the filesystem or a process on it \
                 is stuck. What each process is doing:\n{}\n--- tail of {} ---\n{}",
                mnt.display(),
                start.elapsed(),
                stuck_report(lazyfs),
                log.display(),
                tail(&log)
            );
            match abort_fuse_connection(&mnt) {
                Ok(conn) => eprintln!("WATCHDOG: aborted FUSE connection {conn}"),
                Err(e) => eprintln!("WATCHDOG: could not abort the FUSE connection: {e}"),
            }
            let _ = Command::new("kill")
                .args(["-9", &lazyfs.to_string()])
                .status();
            if ended_within(&done, || Duration::from_secs(120)) {
                return;
            }
            eprintln!(
                "WATCHDOG: the test is still stuck 120 s after the abort; ending the test process"
            );
            std::process::exit(101);
        });
        me
    }
}

/// Whether the test set `done` before `limit` (read again at each look: a test may extend it)
/// passed; looks twice a second.
fn ended_within(done: &AtomicBool, limit: impl Fn() -> Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit() {
        if done.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    done.load(Ordering::SeqCst)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Every process of this test run (this one, its children such as the daemons, LazyFS): its
/// state, kernel wait channel and, when it is in an uninterruptible wait, its kernel stack; then
/// LazyFS's own threads as gdb sees them, when gdb is installed.
fn stuck_report(lazyfs: u32) -> String {
    let me = std::process::id();
    let mut out = String::new();
    let mut pids: Vec<u32> = vec![me, lazyfs];
    let children = fs::read_dir(format!("/proc/{me}/task"))
        .map(|d| {
            d.flatten()
                .flat_map(|t| {
                    fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect::<Vec<u32>>()
        })
        .unwrap_or_default();
    pids.extend(children);
    pids.sort_unstable();
    pids.dedup();
    for pid in pids {
        let cmd = fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ");
        for t in fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state is the field after the parenthesised command name.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.get(..1))
                .unwrap_or("?");
            let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            out.push_str(&format!(
                "pid {pid} task {} state {state} wchan {wchan} ({cmd})\n",
                t.file_name().to_string_lossy()
            ));
            if state == "D" {
                out.push_str(&fs::read_to_string(t.path().join("stack")).unwrap_or_default());
            }
        }
    }
    let gdb = Command::new("timeout")
        .args([
            "60",
            "gdb",
            "-p",
            &lazyfs.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt",
        ])
        .stdin(Stdio::null())
        .output();
    match gdb {
        Ok(o) => {
            out.push_str("--- LazyFS threads (gdb) ---\n");
            out.push_str(&String::from_utf8_lossy(&o.stdout));
            if !o.status.success() {
                out.push_str(&format!(
                    "(gdb: {}: {})\n",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
        }
        Err(e) => out.push_str(&format!("(no gdb backtrace of LazyFS: {e})\n")),
    }
    out
}

/// Aborts the FUSE connection of the mount at `mnt` (fusectl's `abort`), found by the mount's
/// device number in /proc/self/mountinfo; mounts fusectl first when it is not mounted.
fn abort_fuse_connection(mnt: &Path) -> Result<String, String> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let want = mnt.to_string_lossy();
    let dev = info
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[4] == want)
        .map(|f| f[2].to_owned())
        .ok_or("the mount is not in /proc/self/mountinfo")?;
    let minor = dev.rsplit(':').next().unwrap_or_default().to_owned();
    let conns = Path::new("/sys/fs/fuse/connections");
    if fs::read_dir(conns)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = Command::new("mount")
            .args(["-t", "fusectl", "none"])
            .arg(conns)
            .status();
    }
    fs::write(conns.join(&minor).join("abort"), "1").map_err(|e| format!("{dev}: {e}"))?;
    Ok(dev)
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The LazyFS binary: REFEX_LAZYFS_BIN, or built by the shared tool; `None` when neither is
/// there (a checkout without `../shared` beside it).
fn binary() -> Option<PathBuf> {
    if let Ok(b) = std::env::var("REFEX_LAZYFS_BIN") {
        return Some(b.into());
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = [
        here.join("../shared/tools/lazyfs/build"),
        PathBuf::from("/work/shared/tools/lazyfs/build"),
    ]
    .into_iter()
    .find(|p| p.exists())?;
    let out = std::env::temp_dir().join("lazyfs-build");
    let o = Command::new(script)
        .arg(&out)
        .output()
        .expect("run lazyfs build");
    assert!(
        o.status.success(),
        "lazyfs build failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
}

impl LazyFs {
    /// Mounts `root` (the backing directory) at `mnt`; `None` when /dev/fuse is missing.
    pub fn mount(work: &Path) -> Option<Self> {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: /dev/fuse is missing; power-cut tests need FUSE (LazyFS)");
            return None;
        }
        let Some(bin) = binary() else {
            eprintln!(
                "SKIPPED: LazyFS is not available (no REFEX_LAZYFS_BIN and no \
                 ../shared/tools/lazyfs/build beside the checkout); power-cut tests need it"
            );
            return None;
        };
        let (root, mnt, fifo, done) = (
            work.join("root"),
            work.join("mnt"),
            work.join("faults.fifo"),
            work.join("completed.fifo"),
        );
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
        assert!(st.success(), "mkfifo");
        let st = Command::new("mkfifo").arg(&done).status().unwrap();
        assert!(st.success(), "mkfifo");
        // Opened before LazyFS starts: its fault worker opens the write end and would block
        // until a reader exists. O_NONBLOCK (0o4000 on Linux) so the open does not wait either.
        let completed = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(0o4000)
                .open(&done)
                .unwrap()
        };
        let cfg = work.join("lazyfs.toml");
        fs::write(
            &cfg,
            format!(
                "[faults]\nfifo_path=\"{}\"\nfifo_path_completed=\"{}\"\n[cache]\napply_eviction=false\n[cache.simple]\ncustom_size=\"512mb\"\nblocks_per_page=1\n[filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                fifo.display(),
                done.display()
            ),
        )
        .unwrap();
        let child = spawn(&bin, &mnt, &cfg, &root, &work.join("lazyfs.log"));
        let watchdog = Watchdog::start(mnt.clone(), work.join("lazyfs.log"), child.id());
        let me = Self {
            watchdog,
            log: work.join("lazyfs.log"),
            bin,
            cfg,
            root,
            mnt,
            fifo,
            completed,
            child,
            own_crashes: 0,
        };
        me.wait_mounted();
        Some(me)
    }

    fn wait_mounted(&self) {
        wait_until(Duration::from_secs(30), "the LazyFS mount", || {
            fs::read_to_string("/proc/mounts")
                .unwrap_or_default()
                .contains(&*self.mnt.to_string_lossy())
        });
    }

    /// Sends one command to LazyFS's fault FIFO (e.g. `lazyfs::crash::timing=before::op=fsync::from_rgx=x`).
    pub fn command(&self, cmd: &str) {
        writeln!(self.open_fifo(), "{cmd}").unwrap();
    }

    /// The command FIFO, opened without waiting: LazyFS holds its read end while it lives, and a
    /// blocking open would wait for ever once it has died (ENXIO instead).
    fn open_fifo(&self) -> fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .write(true)
            .custom_flags(0o4000)
            .open(&self.fifo)
            .unwrap_or_else(|e| {
                panic!("LazyFS's command FIFO has no reader (is LazyFS gone?): {e}")
            })
    }

    /// Unmounts (a dead mount too) and reaps the LazyFS process.
    fn unmount(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// After LazyFS has died (a `crash` fault): unmounts the dead mount and mounts the same
    /// backing directory again; whatever LazyFS had not synced is gone.
    pub fn remount(&mut self) {
        self.unmount();
        self.child = spawn(&self.bin, &self.mnt, &self.cfg, &self.root, &self.log);
        self.watchdog.pid.store(self.child.id(), Ordering::SeqCst);
        self.wait_mounted();
    }

    /// The power loss: everything not fsynced is gone. Returns only once LazyFS says the clear
    /// is applied: the command FIFO is asynchronous, and a clear that landed after the daemons
    /// had restarted would drop writes of the *running* processes (data they had written and
    /// were about to fsync) — not a power cut, and a loss no daemon could prevent.
    pub fn clear_cache(&mut self) {
        use std::io::Read;
        self.assert_alive();
        let mut f = self.open_fifo();
        f.write_all(b"lazyfs::clear-cache\n").unwrap();
        drop(f);
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        wait_until(
            Duration::from_secs(60),
            "LazyFS to confirm clear-cache",
            || {
                match (&self.completed).read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("reading LazyFS's completion FIFO: {e}"),
                }
                String::from_utf8_lossy(&got).contains("finished::clear-cache")
            },
        );
        self.assert_alive();
        eprintln!("LazyFS after clear-cache: {}", self.memory());
    }

    /// Panics, saying why, when the LazyFS process has exited: a dead mount makes every daemon
    /// I/O fail with ENOTCONN, and a test waiting for a crash point would otherwise only time
    /// out. Power-cut tests call it in their wait loops.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().ok().flatten() {
            panic!(
                "LazyFS died ({st}); {}\n--- tail of {} ---\n{}",
                self.memory(),
                self.log.display(),
                self.log_tail()
            );
        }
    }

    /// True when the LazyFS process is gone (for a test that kills it on purpose).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// True, after saying so with the evidence, when LazyFS has died of a signal of its own
    /// (SIGSEGV, SIGABRT: a bug of LazyFS, not the SIGKILL its crash faults send it). CI saw
    /// one SIGSEGV in ~16 runs of the suite, while a named power-cut test drained after its ten
    /// clears. For the daemons that is one more power cut, at a moment nobody chose, and the
    /// guarantees hold there too: the caller kills them, remounts and starts them again. Taken
    /// at most [`OWN_CRASHES_TAKEN`] times a test; past that, or for any other death, it panics
    /// like [`Self::assert_alive`]. False while LazyFS lives.
    pub fn crashed_on_its_own(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let Some(st) = self.child.try_wait().ok().flatten() else {
            return false;
        };
        if st.signal().is_none_or(|s| s == 9) || self.own_crashes >= OWN_CRASHES_TAKEN {
            self.assert_alive();
        }
        self.own_crashes += 1;
        eprintln!(
            "LazyFS crashed on its own ({st}; {} of at most {OWN_CRASHES_TAKEN} taken): one \
             more power cut at an unchosen moment\n--- tail of {} ---\n{}",
            self.own_crashes,
            self.log.display(),
            self.log_tail()
        );
        true
    }

    /// Sends LazyFS `signal` (as `kill -SIGNAL` names it), as a test of a crash of its own.
    pub fn signal(&self, signal: &str) {
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill -{signal} LazyFS");
    }

    /// LazyFS's resident and peak memory (its page cache lives in its heap), from /proc.
    pub fn memory(&self) -> String {
        let status =
            fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l[k.len()..].trim().to_owned())
                .unwrap_or_else(|| "?".into())
        };
        format!("VmRSS {}, VmHWM {}", field("VmRSS:"), field("VmHWM:"))
    }

    /// The last 40 lines of LazyFS's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// How long this test may hold the mount before the watchdog fires (a long soak's own).
    pub fn set_watchdog_limit(&self, limit: Duration) {
        self.watchdog
            .limit_secs
            .store(limit.as_secs(), Ordering::SeqCst);
    }
}

fn spawn(bin: &Path, mnt: &Path, cfg: &Path, root: &Path, log: &Path) -> Child {
    Command::new(bin)
        // Beside its log, in the test's own directory: a core dump of a LazyFS crash (a test
        // makes one happen) must not land in the checkout.
        .current_dir(log.parent().unwrap_or(Path::new("/")))
        .arg(mnt)
        .arg("--config-path")
        .arg(cfg)
        .args(["-o", "allow_other", "-o", "modules=subdir"])
        .arg("-o")
        .arg(format!("subdir={}", root.display()))
        .arg("-f")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("start lazyfs")
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let st = self.child.try_wait().ok().flatten();
            eprintln!(
                "LazyFS at a panicking test's end: {}; {}\n--- tail of {} ---\n{}",
                st.map_or_else(|| "still running".to_owned(), |s| format!("exited ({s})")),
                self.memory(),
                self.log.display(),
                self.log_tail()
            );
        }
        self.unmount();
    }
}
