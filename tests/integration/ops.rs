//! Operating shacachefs: `mount -t fuse.shacachefs` through the mount helper, `status`
//! counters from the running daemon, and no secret in a debug log. Real mounts, as root;
//! these fail (never skip) when FUSE cannot be used.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

/// The filesystem type /proc/mounts gives for the mount on `mnt`.
fn mount_type(mnt: &Path) -> Option<String> {
    let want = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1).copied() == want.to_str())
        .and_then(|f| f.get(2).map(|t| t.to_string()))
}

/// Writes a file and closes it, returning the error of `close()` (which `std::fs::write`
/// and `File`'s drop ignore): that is where shacachefs reports a failed upload.
fn write_and_close(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    support::close_checked(f)
}

#[test]
fn status_counters_follow_reads_and_uploads() {
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "cfg");
    let src = dir.path().join("blob.bin");
    std::fs::write(&src, pseudo_random_bytes(3 << 20, 7)).unwrap();
    run(shacachefs([
        "upload".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-f".as_ref(),
        src.as_os_str(),
        "-k".as_ref(),
        "k".as_ref(),
        "file=blob.bin".as_ref(),
    ]))
    .assert_success();
    let m = Mount::in_dir(&cfg, dir.path(), &["-k", "k"]);
    let before = status_json(&m.mountpoint);
    assert_eq!(before["shadir"], "answers", "{before}");
    assert_eq!(before["shacache"], "answers", "{before}");
    assert_eq!(before["signature_mode"], "verified (1 certificates)");
    assert_eq!(before["writable"], true);
    assert_eq!(before["bytes_fetched"], 0);

    let data = std::fs::read(m.mountpoint.join("k/blob.bin")).unwrap();
    assert_eq!(data.len(), 3 << 20);
    let after_read = status_json(&m.mountpoint);
    assert_eq!(after_read["bytes_fetched"], 3 << 20, "{after_read}");
    assert_eq!(after_read["misses"], 1, "{after_read}");
    assert_eq!(after_read["cache"]["blobs"], 1, "{after_read}");

    write_and_close(
        &m.mountpoint.join("k/new.txt"),
        b"uploaded through the mount\n",
    )
    .unwrap();
    let after_write = status_json(&m.mountpoint);
    assert_eq!(after_write["entries_published"], 1, "{after_write}");
    assert_eq!(after_write["bytes_uploaded"], 27, "{after_write}");
    assert_eq!(after_write["outbox_pending"], 0, "{after_write}");

    // The human form names the same figures.
    let text = run(shacachefs(["status".as_ref(), m.mountpoint.as_os_str()]));
    text.assert_success();
    assert!(
        text.stdout_text()
            .contains("1 entries published, 27 bytes uploaded"),
        "{}",
        text.stdout_text()
    );
    // Not a shacachefs mount: a clear error.
    run(shacachefs(["status".as_ref(), dir.path().as_os_str()])).assert_failure();
}

#[test]
fn no_secret_in_a_debug_log_of_an_authenticated_upload() {
    let secret = "s3cr3t-Pa55";
    let server = Server::start_with(|o| o.upload_user = Some(("uploader".into(), secret.into())));
    let dir = tempdir();
    let with_creds =
        |base: &str| base.replacen("http://", &format!("http://uploader:{secret}@"), 1);
    let mut conf = server.config().signer_a();
    conf.upload_cache_url = Some(with_creds(&server.cache_url()));
    conf.upload_dir_url = Some(with_creds(&server.dir_url()));
    let cfg = conf.write(dir.path(), "cfg");

    // Through the mount, at debug level.
    let m = Mount::builder(&cfg, &dir.path().join("cache"), &dir.path().join("mnt"))
        .log_level("debug")
        .args(&["-k", "auth-key"])
        .start();
    std::fs::create_dir_all(m.mountpoint.join("auth-key")).ok();
    write_and_close(&m.mountpoint.join("auth-key/a.txt"), b"authenticated\n").unwrap();
    let listing = std::fs::read_dir(m.mountpoint.join("auth-key"))
        .unwrap()
        .count();
    assert!(listing >= 1);
    drop(m);
    let log = std::fs::read_to_string(dir.path().join("mnt.log")).unwrap();
    assert!(
        log.contains("a.txt published"),
        "the upload happened: {log}"
    );
    assert!(
        !log.contains(secret),
        "the password leaked into the mount's debug log"
    );

    // Through the command, at debug level, including a refused upload's error message.
    let src = dir.path().join("b.txt");
    std::fs::write(&src, b"b").unwrap();
    let out = run(shacachefs([
        "--log-level".as_ref(),
        "debug".as_ref(),
        "upload".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-f".as_ref(),
        src.as_os_str(),
        "-k".as_ref(),
        "auth-key".as_ref(),
        "file=b.txt".as_ref(),
    ]));
    out.assert_success();
    assert!(
        !out.stderr_text().contains(secret),
        "the password leaked: {}",
        out.stderr_text()
    );
    let mut wrong = conf.clone();
    wrong.upload_cache_url = Some(server.cache_url().replacen(
        "http://",
        "http://uploader:wrong-Pa55@",
        1,
    ));
    let bad = wrong.write(dir.path(), "bad.cfg");
    let src2 = dir.path().join("c.txt");
    std::fs::write(&src2, b"c is new").unwrap();
    let out = run(shacachefs([
        "--log-level".as_ref(),
        "debug".as_ref(),
        "upload".as_ref(),
        "-c".as_ref(),
        bad.as_os_str(),
        "-f".as_ref(),
        src2.as_os_str(),
        "-k".as_ref(),
        "auth-key".as_ref(),
        "file=c.txt".as_ref(),
    ]));
    out.assert_failure();
    assert!(
        out.stderr_text().contains("refused"),
        "{}",
        out.stderr_text()
    );
    assert!(
        !out.stderr_text().contains("wrong-Pa55"),
        "the password leaked: {}",
        out.stderr_text()
    );
}

/// `mount -t fuse.shacachefs CFG MNT -o OPTS` with extra environment variables.
fn mount_t(cfg: &Path, mnt: &Path, opts: &str, env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "fuse.shacachefs"])
        .arg(cfg)
        .arg(mnt)
        .args(["-o", opts]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    without_proxy(&mut cmd);
    run_with_timeout(cmd, Duration::from_secs(30))
}

/// Tests that install `/sbin/mount.fuse.shacachefs` take turns.
static HELPER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Installs `/sbin/mount.fuse.shacachefs` for the test's duration: a link to the binary
/// under test (what the README suggests for a non-package install), or the shipped
/// helper script (`contrib/`), which finds the binary itself. One left there (by hand)
/// is put back afterwards.
struct HelperLink {
    saved: Option<PathBuf>,
    _turn: std::sync::MutexGuard<'static, ()>,
}

const HELPER_PATH: &str = "/sbin/mount.fuse.shacachefs";

impl HelperLink {
    fn install() -> HelperLink {
        Self::with(|p| std::os::unix::fs::symlink(shacachefs_bin(), p))
    }

    fn script() -> HelperLink {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mount.fuse.shacachefs");
        Self::with(|p| std::fs::copy(&src, p).map(|_| ()))
    }

    fn with(make: impl FnOnce(&Path) -> std::io::Result<()>) -> HelperLink {
        let turn = HELPER.lock().unwrap_or_else(|p| p.into_inner());
        let path = Path::new(HELPER_PATH);
        let saved = path.symlink_metadata().is_ok().then(|| {
            let s = PathBuf::from(format!("{HELPER_PATH}.saved-by-tests"));
            std::fs::rename(path, &s).expect("moving the existing helper aside");
            s
        });
        make(path).expect("cannot install /sbin/mount.fuse.shacachefs");
        HelperLink { saved, _turn: turn }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(HELPER_PATH);
        if let Some(s) = &self.saved {
            let _ = std::fs::rename(s, HELPER_PATH);
        }
    }
}

/// `mount -t fuse.shacachefs` with the shipped helper script and the binary installed
/// by `cargo install` (in `$CARGO_HOME/bin`, not in `/usr/bin` nor on the PATH).
#[test]
fn mount_helper_finds_a_cargo_installed_binary() {
    require_fuse();
    assert!(
        !Path::new("/usr/bin/shacachefs").exists(),
        "/usr/bin/shacachefs exists (a package installed?): this test needs the cargo layout"
    );
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "cfg");
    let cargo_home = dir.path().join("cargo-home");
    std::fs::create_dir_all(cargo_home.join("bin")).unwrap();
    std::os::unix::fs::symlink(shacachefs_bin(), cargo_home.join("bin/shacachefs")).unwrap();
    let _helper = HelperLink::script();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let opts = format!(
        "cache_dir={},key=helper-key",
        dir.path().join("cache").display()
    );
    let out = mount_t(
        &cfg,
        &mnt,
        &opts,
        &[
            ("CARGO_HOME", cargo_home.as_os_str()),
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".as_ref()),
        ],
    );
    let ok = out.success() && is_mounted(&mnt);
    let names: Vec<String> = std::fs::read_dir(&mnt)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let _ = Command::new("umount").arg(&mnt).status();
    if is_mounted(&mnt) {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    assert!(ok, "mount -t fuse.shacachefs failed: {}", out.describe());
    assert!(names.contains(&"helper-key".to_string()), "{names:?}");
    // Without any binary to find, it says so.
    let mut cmd = Command::new("bash");
    cmd.arg(HELPER_PATH)
        .arg(&cfg)
        .arg(&mnt)
        .env("CARGO_HOME", dir.path().join("nowhere"))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", dir.path());
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    if !Path::new("/usr/local/bin/shacachefs").exists()
        && !Path::new("/root/.cargo/bin/shacachefs").exists()
    {
        out.assert_failure();
        assert!(
            out.stderr_text().contains("shacachefs not found"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn fstab_style_mount_and_umount() {
    require_fuse();
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "cfg");
    let src = dir.path().join("f.txt");
    std::fs::write(&src, b"mounted the usual way\n").unwrap();
    run(shacachefs([
        "upload".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-f".as_ref(),
        src.as_os_str(),
        "-k".as_ref(),
        "fstab-key".as_ref(),
        "file=f.txt".as_ref(),
    ]))
    .assert_success();
    let _link = HelperLink::install();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let opts = format!(
        "cache_dir={},key=fstab-key,dir_ttl=5,_netdev,nofail",
        dir.path().join("cache").display()
    );
    let out = mount_t(&cfg, &mnt, &opts, &[]);
    out.assert_success();
    assert!(
        is_mounted(&mnt),
        "mount -t fuse.shacachefs returned but nothing is mounted"
    );
    let fstype = mount_type(&mnt);
    let read = std::fs::read(mnt.join("fstab-key/f.txt"));
    let names: Vec<String> = std::fs::read_dir(&mnt)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let umount = Command::new("umount").arg(&mnt).status().expect("umount");
    if !umount.success() {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    assert_eq!(
        read.expect("read through the fstab-style mount"),
        b"mounted the usual way\n"
    );
    assert!(names.contains(&"fstab-key".to_string()), "{names:?}");
    assert_eq!(
        fstype.as_deref(),
        Some("fuse.shacachefs"),
        "the type /proc/mounts shows"
    );
    assert!(umount.success(), "umount failed");
    assert!(!is_mounted(&mnt));
    // The daemon ends with the unmount.
    let exited = wait_until(Duration::from_secs(10), || {
        let out = Command::new("pgrep")
            .args(["-f", &format!("mount -c {}", cfg.display())])
            .output();
        out.map(|o| o.stdout.is_empty()).unwrap_or(true)
    });
    assert!(exited, "timed out waiting for the daemon to exit");
}

#[test]
fn pending_uploads_are_reported_at_mount_time() {
    let server = Server::start();
    let dir = tempdir();
    // Uploads go to a port nobody listens on: the copy fails and stays pending.
    let mut broken = server.config().signer_a();
    broken.upload_cache_url = Some("http://127.0.0.1:9/shacache".into());
    let broken = broken.write(dir.path(), "broken.cfg");
    let good = server.config().signer_a().write(dir.path(), "good.cfg");
    {
        let m = Mount::in_dir(&broken, dir.path(), &["-k", "p"]);
        std::fs::create_dir_all(m.mountpoint.join("p")).ok();
        let err = write_and_close(&m.mountpoint.join("p/late.txt"), b"not yet\n").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    }
    // Another mountpoint over the same cache: a log of its own.
    let mnt2 = dir.path().join("mnt2");
    let m = Mount::start(&good, &dir.path().join("cache"), &mnt2, &["-k", "p"]);
    assert!(
        m.log_text().contains("1 upload(s) pending"),
        "{}",
        m.log_text()
    );
    let out = Command::new("getfattr")
        .args(["-n", "user.shacachefs.pending", "--only-values"])
        .arg(m.mountpoint.join("p/late.txt"))
        .output()
        .expect("getfattr");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("127.0.0.1:9"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::read(m.mountpoint.join("p/late.txt")).unwrap(),
        b"not yet\n"
    );
}
