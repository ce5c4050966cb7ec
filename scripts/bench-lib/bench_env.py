"""The world scripts/bench measures in: a scratch directory under target/, `shacachefs
serve` over a scratch store, blobs and signed entries loaded through `shacachefs upload`
(the product's own hashing and signing; nothing here knows the store's layout), and the
mount, whose `user.shacachefs.status` attribute says whether FUSE passthrough was on."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench_util import (ROOT, SIGN_CERT, SIGN_KEY, STATUS_XATTR, VENV, BenchError, Runner,
                        RssSampler, free_port, is_mounted, log, proc_status_kib, tail)

DIR_TTL = 60
# Set-aside caches are removed during the run only below this much free space.
SWEEP_BELOW_FREE = 20 << 30
# The longest wait for idle disks before a scenario.
SETTLE_LIMIT = 60


def disk_activity():
    """(I/Os completed of every kind, I/Os in flight) over the whole block devices, from
    /proc/diskstats (partitions and virtual devices left out)."""
    done = in_flight = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            name = fields[2]
            if not os.path.exists(f"/sys/block/{name}/device"):
                continue
            nums = [int(x) for x in fields[3:]]
            # reads, writes, in flight, then (newer kernels) discards and flushes.
            done += nums[0] + nums[4] + sum(nums[11:12]) + sum(nums[15:16])
            in_flight += nums[8]
    return (done, in_flight)


class Env(Runner):
    def __init__(self, args, profile):
        super().__init__(profile["cmd_timeout"])
        self.args, self.p = args, profile
        self.bin = ROOT / "target" / "release" / "shacachefs"
        self.scratch = None
        self.procs = []  # every long-running process started, for cleanup
        self.server = None
        self.mount_proc = None
        self.mount_count = 0
        self.passthrough = set()  # what the mounts' status attribute said
        self.last_status = None  # the status document read before the last unmount

    def selected(self, sid):
        return not self.args.only or sid in self.args.only

    # ----- set-up ----------------------------------------------------------------------

    def prepare(self):
        if os.geteuid() != 0:
            raise BenchError("run as root: FUSE passthrough and drop_caches need it")
        log("scripts/setup-test-deps")
        self.run([ROOT / "scripts" / "setup-test-deps"], timeout=900)
        if not self.args.no_build:
            log("cargo build --release")
            self.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, timeout=1800)
        if not self.bin.exists():
            raise BenchError(f"{self.bin} missing (build it, or drop --no-build)")
        (ROOT / "target").mkdir(exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=ROOT / "target"))
        self.mnt = self.scratch / "mnt"
        self.mnt.mkdir()
        self.cache = self.scratch / "cache"
        self.old_caches = self.scratch / "old-caches"
        self.store = self.scratch / "store"
        self.data = self.scratch / "data"
        self.data.mkdir()
        # A copy, so that a rebuild during the run cannot change the binary under test.
        shutil.copy2(self.bin, self.scratch / "shacachefs")
        self.bin = self.scratch / "shacachefs"
        log(f"scratch {self.scratch}")

    def start_server(self):
        for _ in range(3):
            self.port = free_port()
            with open(self.scratch / "serve.log", "ab") as logf:
                # Every client of this loopback server shares one address: the default
                # cap of 64 connections per client would answer 503 to a baseline while a
                # daemon's 64 size probes keep their connections.
                proc = subprocess.Popen([self.bin, "serve", "--root", self.store, "--listen",
                                         f"127.0.0.1:{self.port}",
                                         "--max-connections-per-client", "1024"],
                                        stdout=logf, stderr=logf)
            self.procs.append(proc)
            for _ in range(100):
                if proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    self.server = proc
                    self.base = f"http://127.0.0.1:{self.port}"
                    self.write_config()
                    log(f"shacachefs serve on {self.base}")
                    return
                except OSError:
                    time.sleep(0.05)
            proc.kill()
            proc.wait()
        raise BenchError("shacachefs serve did not start:\n" + tail(self.scratch / "serve.log"))

    def write_config(self):
        cert = "\n".join("  " + line for line in SIGN_CERT.read_text().strip().splitlines())
        self.cfg = self.scratch / "bench.cfg"
        self.cfg.write_text(
            "[networkcache]\n"
            f"download-cache-url = {self.base}/shacache\n"
            f"download-dir-url = {self.base}/shadir\n"
            f"upload-cache-url = {self.base}/shacache\n"
            f"upload-dir-url = {self.base}/shadir\n"
            f"signature-private-key-file = {SIGN_KEY}\n"
            f"signature-certificate-list =\n{cert}\n")

    def ref(self, *args):
        """A reference client command (`networkcache-…`) on the suite's configuration."""
        return [VENV / args[0], "-c", self.cfg, *args[1:]]

    # ----- data ------------------------------------------------------------------------

    def random_file(self, path, size):
        """Incompressible pseudo-random bytes (AES-CTR keystream: fast, unlike urandom)."""
        key, iv = os.urandom(16).hex(), os.urandom(16).hex()
        q = shlex.quote(str(path))
        # openssl dies of SIGPIPE when head has enough: the size check is the status.
        self.run(f"openssl enc -aes-128-ctr -nosalt -K {key} -iv {iv} -in /dev/zero "
                 f"2>/dev/null | head -c {size} > {q}; test $(stat -c %s {q}) = {size}")

    @staticmethod
    def small_files(directory, prefix, n, size):
        """`n` files of `size` random bytes named PREFIX00000…; their names."""
        directory.mkdir(parents=True, exist_ok=True)
        width = max(4, len(str(n - 1)))
        names = [f"{prefix}{i:0{width}d}" for i in range(n)]
        for name in names:
            (directory / name).write_bytes(os.urandom(size))
        return names

    def upload(self, path, key, name):
        """`shacachefs upload -f PATH -k KEY file=NAME`; the blob's SHA-512."""
        r = self.run([self.bin, "upload", "-c", self.cfg, "-f", path, "-k", key,
                      f"file={name}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        sha = r.stdout.decode().strip().split()[-1]
        if len(sha) != 128:
            raise BenchError(f"upload printed {r.stdout!r}")
        return sha

    def upload_many(self, directory, names, key):
        """Every file of `names` in `directory` as one signed entry of `key`, through
        `shacachefs upload --files-from`; then `shacachefs ls` must trust them all."""
        listing = self.scratch / f"{key}.list"
        listing.write_text("".join(f"{directory / n}\n" for n in names))
        t = time.perf_counter()
        r = self.run([self.bin, "upload", "-c", self.cfg, "-k", key, "-j", "8",
                      "--files-from", listing], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, timeout=max(self.timeout, 1200))
        lines = r.stdout.decode().splitlines()
        if len(lines) != len(names):
            raise BenchError(f"upload --files-from printed {len(lines)} lines, not {len(names)}")
        log(f"{len(names)} entries uploaded and published under {key} in "
            f"{time.perf_counter() - t:.1f} s")
        r = self.run([self.bin, "ls", "-c", self.cfg, "--json", key],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        got = len(json.loads(r.stdout))
        if got != len(names):
            raise BenchError(f"shacachefs ls {key} shows {got} trusted entries, not "
                             f"{len(names)}")

    # ----- the mount -------------------------------------------------------------------

    def mount(self, fresh=True, dir_ttl=DIR_TTL):
        """A new daemon in the foreground; `fresh` empties the cache directory first."""
        self.umount()
        if fresh and self.cache.exists():
            # Set aside, removed at the end (or by sweep_caches when space runs short):
            # removing thousands of files right before a sample would charge this
            # housekeeping to it (ext4 without a journal, as on these machines, skips
            # every inode freed in the last 30 s at each allocation; BENCHMARKS.md).
            self.old_caches.mkdir(exist_ok=True)
            self.cache.rename(self.old_caches / f"cache-{self.mount_count}")
        self.mount_count += 1
        self.mount_log = self.scratch / f"mount-{self.mount_count}.log"
        with open(self.mount_log, "wb") as logf:
            proc = subprocess.Popen([self.bin, "mount", "-f", "-c", self.cfg, "--cache-dir",
                                     self.cache, "--dir-ttl", str(dir_ttl), self.mnt],
                                    stdout=logf, stderr=logf)
        self.procs.append(proc)
        self.mount_proc = proc
        deadline = time.monotonic() + 30
        while not is_mounted(self.mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("mount did not come up:\n" + tail(self.mount_log))
            time.sleep(0.02)
        return proc

    def sweep_caches(self):
        """Removes the cache directories of the earlier fresh daemons, but only when the
        disk runs short (the scratch directory goes at the end anyway), then waits for
        idle disks: removing gigabytes between scenarios put the file system's work
        (ext4 without a journal skips inodes freed in the last 30 s at each allocation:
        fifth pass; `/` is mounted with `discard`, so frees also send TRIMs) next to the
        next scenario's samples."""
        if shutil.disk_usage(self.scratch).free < SWEEP_BELOW_FREE:
            shutil.rmtree(self.old_caches, ignore_errors=True)
        self.settle()

    def settle(self):
        """Waits until the block devices have been idle for a second (bounded): what an
        earlier step left in flight (writeback, discards) is not timed with the next."""
        os.sync()
        deadline = time.monotonic() + SETTLE_LIMIT
        last, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = disk_activity()
            if now != last or now[-1] > 0:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= 1.0:
                return
            time.sleep(0.1)
        log(f"the disks were still busy after {SETTLE_LIMIT} s; going on")

    def memory_mib(self):
        """The daemon's (VmRSS, VmHWM) in MiB."""
        rss, hwm = proc_status_kib(self.mount_proc.pid, "VmRSS", "VmHWM")
        return rss / 1024, hwm / 1024

    def hwm_mib(self):
        return self.memory_mib()[1]

    def timed_watched(self, cmd, cold=False):
        """`timed` on the mount, plus the daemon's VmHWM after it and its memory peaks
        during it: (seconds, VmHWM MiB, peaks as text)."""
        with RssSampler(self.mount_proc.pid) as sampler:
            s = self.timed(cmd, cold=cold)
        return s, self.hwm_mib(), sampler.summary()

    def status(self):
        """The daemon's status document (the root's `user.shacachefs.status`)."""
        return json.loads(os.getxattr(self.mnt, STATUS_XATTR))

    def umount(self):
        proc, self.mount_proc = self.mount_proc, None
        if is_mounted(self.mnt):
            try:
                self.last_status = self.status()
                self.passthrough.add("on" if self.last_status.get("passthrough") else "off")
            except (OSError, ValueError) as e:
                log(f"status attribute unreadable: {e}")
            for attempt in range(20):
                r = subprocess.run(["umount", self.mnt], stderr=subprocess.PIPE)
                if r.returncode == 0 or not is_mounted(self.mnt):
                    break
                time.sleep(0.25)
            else:
                subprocess.run(["umount", "-l", self.mnt])
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cleanup(self):
        try:
            self.umount()
        except Exception as e:  # keep cleaning
            log(f"umount: {e}")
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.scratch and not self.args.keep:
            if is_mounted(self.mnt):
                subprocess.run(["umount", "-l", self.mnt])
            shutil.rmtree(self.scratch, ignore_errors=True)
        elif self.scratch:
            log(f"kept {self.scratch}")
