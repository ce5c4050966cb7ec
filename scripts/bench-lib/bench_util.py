"""Small helpers of scripts/bench: constants, logging, formatting, processes, /proc."""

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20
FIXTURES = ROOT / "tests" / "fixtures" / "signature"
SIGN_KEY = FIXTURES / "signer-a.pkcs1.key"
SIGN_CERT = FIXTURES / "signer-a.crt"
VENV = ROOT / ".venv" / "bin"
STATUS_XATTR = "user.shacachefs.status"

T0 = time.monotonic()


class BenchError(Exception):
    """A step of the suite failed: the suite does not work."""


class Abort(BaseException):
    """A signal or the global deadline: stop and clean up."""


def log(msg):
    print(f"[bench {time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt_size(n):
    return f"{n // MiB} MiB" if n >= MiB else f"{n // 1024} KiB"


def fmt_time(s):
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.1f} ms"


def tail(path, n=15):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def drop_caches():
    """Write back dirty pages, then drop the page cache, dentries and inodes."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path):
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == str(path):
                return True
    return False


def proc_status_kib(pid, *fields):
    """Values (KiB) of /proc/PID/status lines such as VmRSS, VmHWM."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k = line.split(":", 1)[0]
            if k in fields:
                found[k] = int(line.split()[1])
    missing = [k for k in fields if k not in found]
    if missing:
        raise BenchError(f"no {', '.join(missing)} for pid {pid}")
    return [found[k] for k in fields]


class RssSampler:
    """Polls /proc/PID/status every 10 ms while a command runs, for the peaks of
    anonymous and file-backed resident memory (VmHWM alone does not say which)."""

    FIELDS = ("RssAnon", "RssFile", "RssShmem")

    def __init__(self, pid):
        self.pid, self.peak = pid, dict.fromkeys(self.FIELDS, 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    for line in f:
                        k = line.split(":", 1)[0]
                        if k in self.peak:
                            self.peak[k] = max(self.peak[k], int(line.split()[1]))
            except OSError:
                return
            self.stop.wait(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self):
        return ", ".join(f"{k} {v / 1024:.1f}" for k, v in self.peak.items()) + " MiB"


class Runner:
    """Bounded child processes: run to completion, time one or several."""

    def __init__(self, timeout):
        self.timeout = timeout

    def run(self, cmd, **kw):
        """Run a command to completion, bounded; raise BenchError on failure."""
        kw.setdefault("timeout", self.timeout)
        shell = isinstance(cmd, str)
        shown = cmd if shell else shlex.join(map(str, cmd))
        try:
            r = subprocess.run(cmd, shell=shell, executable="/bin/bash" if shell else None,
                               **kw)
        except subprocess.TimeoutExpired:
            raise BenchError(f"timed out after {kw['timeout']} s: {shown}")
        if r.returncode != 0:
            err = r.stderr.decode(errors="replace")[-2000:] if isinstance(r.stderr, bytes) else ""
            raise BenchError(f"exit {r.returncode}: {shown}\n{err}")
        return r

    def timed(self, cmd, cold=False):
        """Seconds one command takes (stdout to /dev/null); drop caches first if cold."""
        if cold:
            drop_caches()
        t = time.perf_counter()
        self.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return time.perf_counter() - t

    def timed_parallel(self, cmds, cold=False):
        """Wall-clock seconds for several commands started together."""
        if cold:
            drop_caches()
        t = time.perf_counter()
        ps = [subprocess.Popen(c, shell=isinstance(c, str), executable="/bin/bash"
                               if isinstance(c, str) else None, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE) for c in cmds]
        try:
            errs = [p.communicate(timeout=self.timeout)[1] for p in ps]
        except subprocess.TimeoutExpired:
            raise BenchError(f"timed out after {self.timeout} s: {cmds}")
        finally:
            for p in ps:  # after a timeout or a signal, none is left behind
                if p.poll() is None:
                    p.kill()
                    p.wait()
        elapsed = time.perf_counter() - t
        for c, p, e in zip(cmds, ps, errs):
            if p.returncode != 0:
                raise BenchError(f"exit {p.returncode}: {c}\n{e.decode(errors='replace')}")
        return elapsed


# Rounds run before the recorded ones (see `alternate`).
WARMUP_ROUNDS = 1


def swingy_runs(runs):
    """Runs a side for T1 and T5 (cold reads and writes of 512 MiB), whose samples swing
    by a third with the page cache and the disk: at least five, except in a one-run
    smoke test."""
    return max(runs, 5) if runs > 1 else runs


def alternate(sides, runs, warmup=WARMUP_ROUNDS):
    """Runs each side `runs` times, alternating (the first side rotates each round);
    `sides` is [(label, callable returning seconds)]. Returns {label: [seconds]}.

    First, `warmup` rounds whose samples are thrown away: the first sample of a scenario
    was its slowest (most likely the idle second before it: on these VMs, memory freed a
    few seconds ago goes back to the host and is slow to touch again; BENCHMARKS.md,
    sixth pass), and the rotation put shacachefs first in every scenario."""
    for _ in range(warmup):
        for _label, fn in reversed(sides):
            fn()
    samples = {label: [] for label, _ in sides}
    for r in range(runs):
        for k in range(len(sides)):
            label, fn = sides[(r + k) % len(sides)]
            samples[label].append(fn())
    return samples
