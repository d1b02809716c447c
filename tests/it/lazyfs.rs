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
use std::time::Duration;

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
        let me = Self {
            log: work.join("lazyfs.log"),
            bin,
            cfg,
            root,
            mnt,
            fifo,
            completed,
            child,
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
        let mut f = fs::OpenOptions::new().write(true).open(&self.fifo).unwrap();
        writeln!(f, "{cmd}").unwrap();
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
        self.wait_mounted();
    }

    /// The power loss: everything not fsynced is gone. Returns only once LazyFS says the clear
    /// is applied: the command FIFO is asynchronous, and a clear that landed after the daemons
    /// had restarted would drop writes of the *running* processes (data they had written and
    /// were about to fsync) — not a power cut, and a loss no daemon could prevent.
    pub fn clear_cache(&mut self) {
        use std::io::Read;
        self.assert_alive();
        let mut f = fs::OpenOptions::new().write(true).open(&self.fifo).unwrap();
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
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

fn spawn(bin: &Path, mnt: &Path, cfg: &Path, root: &Path, log: &Path) -> Child {
    Command::new(bin)
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
