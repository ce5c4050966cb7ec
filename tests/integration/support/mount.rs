//! The one mount guard: a `shacachefs mount -f` child that is waited for (bounded) until
//! the kernel lists the mount, and always unmounted (`umount`, then `umount -l`) and
//! ended when dropped, even when the test failed or killed the daemon.
//!
//! [`Mount::start`] covers most tests; [`Mount::builder`] adds what a few need (a
//! wrapper such as `prlimit … --`, another log level). The daemon's output goes to
//! `MOUNTPOINT.log`, started afresh by each mount.
//!
//! [`Tmpfs`] is the same guard for a small tmpfs disk.
//!
//! Real-mount tests fail (never skip) when FUSE cannot be used.

use super::{run_with_timeout, shacachefs_bin, without_proxy};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a mount may take to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `umount` and the daemon's exit after it may take.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(15);

/// Fails the test unless FUSE can be mounted here (as root, with /dev/fuse).
#[track_caller]
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "real-mount tests need FUSE: /dev/fuse is missing (load the fuse module; \
         scripts/setup-test-deps installs fuse3)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "real-mount tests must run as root (they mount FUSE filesystems)"
    );
}

/// Is something mounted exactly on `mp` (as `/proc/mounts` spells it)?
pub fn is_mounted(mp: &Path) -> bool {
    let want = mp
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// Waits for a child at most `limit`; kills it when it runs over.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Runs a command to its end or kills it after `limit`; never panics (used in `Drop`).
fn quiet_status(mut c: Command, limit: Duration) -> Option<ExitStatus> {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().ok()?;
    wait_within(&mut child, limit)
}

/// Unmounts `mp` if it is mounted: `umount`, else `umount -l`.
pub fn force_unmount(mp: &Path) {
    if is_mounted(mp) {
        let mut c = Command::new("umount");
        c.arg(mp);
        quiet_status(c, Duration::from_secs(10));
    }
    if is_mounted(mp) {
        let mut c = Command::new("umount");
        c.arg("-l").arg(mp);
        quiet_status(c, Duration::from_secs(10));
    }
}

/// What a [`Mount`] is started with.
pub struct MountBuilder {
    cfg: PathBuf,
    cache: PathBuf,
    mountpoint: PathBuf,
    args: Vec<OsString>,
    wrapper: Vec<OsString>,
    log_level: String,
}

impl MountBuilder {
    /// More arguments of `mount` (options such as `-k KEY`, `--no-passthrough`).
    pub fn args<S: AsRef<std::ffi::OsStr>>(mut self, extra: &[S]) -> Self {
        self.args
            .extend(extra.iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Runs the daemon under this command (`prlimit --nofile=… --`).
    pub fn wrapped_in(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(OsString::from).collect();
        self
    }

    /// `--log-level` of the daemon (default `info`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts the daemon and waits, bounded, until the mount is listed in /proc/mounts.
    #[track_caller]
    pub fn start(self) -> Mount {
        require_fuse();
        let mountpoint = self.mountpoint;
        std::fs::create_dir_all(&mountpoint).expect("creating the mountpoint");
        let log = mountpoint.with_extension("log");
        let logf = std::fs::File::create(&log).expect("creating the mount log");
        let mut c = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(shacachefs_bin());
                c
            }
            None => Command::new(shacachefs_bin()),
        };
        without_proxy(&mut c)
            .arg("--log-level")
            .arg(&self.log_level)
            .args(["mount", "-f", "-c"])
            .arg(&self.cfg)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(&self.args)
            .arg(&mountpoint)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file"))
            .stderr(logf);
        let child = c.spawn().expect("starting shacachefs mount");
        let mut m = Mount {
            mountpoint,
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&m.mountpoint) {
            if let Ok(Some(status)) = m.child.as_mut().expect("child").try_wait() {
                panic!(
                    "shacachefs mount exited ({status}) before mounting:\n{}",
                    m.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not mounted after {MOUNT_TIMEOUT:?}:\n{}",
                m.mountpoint.display(),
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

/// A `shacachefs mount -f` child; unmounted and ended when dropped.
pub struct Mount {
    pub mountpoint: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// What to mount: `cfg`, the cache directory `cache`, on `mountpoint`.
    pub fn builder(cfg: &Path, cache: &Path, mountpoint: &Path) -> MountBuilder {
        MountBuilder {
            cfg: cfg.to_path_buf(),
            cache: cache.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            args: Vec::new(),
            wrapper: Vec::new(),
            log_level: "info".to_string(),
        }
    }

    /// Mounts `mountpoint` in the foreground with `--log-level info` and `extra`
    /// options, and waits (bounded) until it is mounted.
    #[track_caller]
    pub fn start(cfg: &Path, cache: &Path, mountpoint: &Path, extra: &[&str]) -> Mount {
        Mount::builder(cfg, cache, mountpoint).args(extra).start()
    }

    /// [`Mount::start`] with the cache in `DIR/cache` and the mountpoint `DIR/mnt`.
    #[track_caller]
    pub fn in_dir(cfg: &Path, dir: &Path, extra: &[&str]) -> Mount {
        Mount::start(cfg, &dir.join("cache"), &dir.join("mnt"), extra)
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// What the daemon printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory of the daemon so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status of the daemon");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `umount`, then the daemon must exit successfully by itself.
    #[track_caller]
    pub fn unmount(&mut self) {
        let mut c = Command::new("umount");
        c.arg(&self.mountpoint);
        let out = run_with_timeout(c, UNMOUNT_TIMEOUT);
        assert!(
            out.success(),
            "umount failed:\n{}\n--- daemon log ---\n{}",
            out.describe(),
            self.log_text()
        );
        let mut child = self.child.take().expect("daemon running");
        let status = wait_within(&mut child, UNMOUNT_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "the daemon did not exit cleanly after umount ({status:?}):\n{}",
            self.log_text()
        );
        assert!(!is_mounted(&self.mountpoint));
    }

    /// `kill -9` of the daemon, then `umount -l` of the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: a plain syscall on the pid of the daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = wait_within(&mut child, Duration::from_secs(10));
        }
        force_unmount(&self.mountpoint);
        assert!(
            !is_mounted(&self.mountpoint),
            "the dead mount {} could not be cleaned",
            self.mountpoint.display()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        force_unmount(&self.mountpoint);
        if let Some(mut child) = self.child.take() {
            if wait_within(&mut child, Duration::from_secs(10)).is_none() {
                eprintln!("shacachefs mount had to be killed:\n{}", self.log_text());
            }
        }
    }
}

/// A tmpfs of `size` (e.g. `8m`) mounted for one test (a small disk), unmounted
/// (lazily if busy) when dropped.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    #[track_caller]
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "small-disk tests mount a tmpfs: run them as root");
        std::fs::create_dir_all(dir).expect("creating the tmpfs mountpoint");
        let mut c = Command::new("mount");
        c.args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir);
        run_with_timeout(c, Duration::from_secs(30)).assert_success();
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        force_unmount(&self.dir);
    }
}
