"""Scenarios T1-T8 of scripts/bench (issue 5): big reads and writes, a 1,000-entry key,
many cached small reads, peak memory."""

import os
import shlex
import time

from bench_env import DIR_TTL
from bench_util import (WARMUP_ROUNDS, MiB, BenchError, alternate, fmt_size, fmt_time,
                        log, swingy_runs)

# Scenarios whose single sample lasts milliseconds get this many more samples.
SMALL_REPEAT = 5


class Classic:
    def __init__(self, env, report):
        self.env, self.report, self.p = env, report, env.p

    def load(self):
        """Blobs and entries T1-T8 read (only those of the selected scenarios)."""
        env, p, sel = self.env, self.p, self.env.selected
        t = time.perf_counter()
        if any(sel(s) for s in ("T1", "T2", "T5")):
            self.big = env.data / "big.bin"
            env.random_file(self.big, p["big"])
            self.big_sha = env.upload(self.big, "bench-big", "big.bin")
        if sel("T6"):
            self.par_shas = []
            for i in range(p["par_n"]):
                f = env.data / f"par{i}.bin"
                env.random_file(f, p["par"])
                self.par_shas.append(env.upload(f, "bench-par", f"par{i}.bin"))
                f.unlink()
        if sel("T8"):
            self.huge = env.data / "huge.bin"
            env.random_file(self.huge, p["huge"])
            env.upload(self.huge, "bench-huge", "huge.bin")
        if sel("T5") or sel("T8"):
            # The key T5 and T8 copy into must exist for a lookup by name.
            seed = env.data / "seed.txt"
            seed.write_text("seed\n")
            env.upload(seed, "bench-up", "seed.txt")
        log(f"T1-T8 blobs loaded in {time.perf_counter() - t:.1f} s")
        if any(sel(s) for s in ("T3", "T4", "T7")):
            # Small distinct files, each one signed entry of bench-ls; the same files
            # are the local directory of T4's and T7's baselines.
            self.local_dir = env.data / "local"
            self.entry_names = env.small_files(self.local_dir, "e", p["entries"], p["small"])
            env.upload_many(self.local_dir, self.entry_names, "bench-ls")

    def run(self):
        sel = self.env.selected
        for sid, fn in (("T1", self.t1), ("T2", self.t2), ("T3", self.t3), ("T4", self.t4),
                        ("T7", self.t7), ("T6", self.t6), ("T5", self.t5), ("T8", self.t8)):
            if sel(sid):
                fn()
                self.env.sweep_caches()

    def t1(self):
        """Cold cat of the big entry."""
        env, hwm = self.env, []
        path = env.mnt / "bench-big" / "big.bin"

        def sfs():
            env.mount()
            s, vm, peaks = env.timed_watched(["cat", path], cold=True)
            hwm.append((vm, peaks))
            return s

        url = f"{env.base}/shacache/{self.big_sha}"
        samples = alternate([
            ("shacachefs", sfs),
            ("networkcache-download", lambda: env.timed(
                env.ref("networkcache-download", "-k", "bench-big"), cold=True)),
            ("curl | sha512sum", lambda: env.timed(
                f"set -o pipefail; curl -sfS {url} | sha512sum > /dev/null", cold=True)),
        ], swingy_runs(self.p["runs"]))
        env.umount()
        self.report.memory += [f"T1 cold `cat` of {fmt_size(self.p['big'])}: VmHWM "
                               f"{vm:.1f} MiB (peaks: {peaks})"
                               for vm, peaks in hwm[WARMUP_ROUNDS:]]
        self.report.record(
            "T1", f"cold `cat` of a {fmt_size(self.p['big'])} entry to /dev/null", samples,
            ["networkcache-download", "curl | sha512sum"], ("<=", 0.8),
            extra=f"daemon VmHWM {max(h[0] for h in hwm[WARMUP_ROUNDS:]):.1f} MiB")

    def t2(self):
        """Warm cat: blob cached, new open, page cache dropped."""
        env = self.env
        env.mount()
        path = env.mnt / "bench-big" / "big.bin"
        env.timed(["cat", path])  # caches the blob
        # The cached copy is the one file of the cache directory named by its hash.
        found = [f for f in env.cache.rglob(self.big_sha) if f.is_file()]
        if len(found) != 1:
            raise BenchError(f"cached blob {self.big_sha[:16]}… not found once: {found}")
        blob = found[0]
        samples = alternate([
            ("shacachefs", lambda: env.timed(["cat", path], cold=True)),
            ("cat cached blob", lambda: env.timed(["cat", blob], cold=True)),
        ], self.p["runs"])
        env.umount()
        self.report.record("T2", "warm `cat` of the same (blob cached, new open, page cache "
                           "dropped)", samples, ["cat cached blob"], ("<=", 1.25))

    def t3(self):
        env, n = self.env, self.p["entries"]
        key = env.mnt / "bench-ls"

        def sfs():
            env.mount()
            return env.timed(["ls", "-l", key], cold=True)

        samples = alternate([
            ("shacachefs", sfs),
            ("networkcache-download -l", lambda: env.timed(
                env.ref("networkcache-download", "-l", "-k", "bench-ls"), cold=True)),
        ], self.p["runs"])
        env.umount()
        self.report.record("T3", f"`ls -l` of a key with {n} signed entries, cold", samples,
                           ["networkcache-download -l"], ("<=", 0.05))

    def t4(self):
        env, n = self.env, self.p["entries"]
        key = env.mnt / "bench-ls"
        env.mount()
        env.timed(["ls", "-l", key])  # the listing, now within the TTL
        started = time.monotonic()
        samples = alternate([
            ("shacachefs", lambda: env.timed(["ls", "-l", key])),
            ("ls -l local dir", lambda: env.timed(["ls", "-l", self.local_dir])),
        ], self.p["runs"] * SMALL_REPEAT)
        if time.monotonic() - started > DIR_TTL * 0.9:
            raise BenchError("T4 ran past the dir TTL")
        env.umount()
        self.report.record("T4", f"the same `ls -l` again, within the dir TTL ({n} entries)",
                           samples, ["ls -l local dir"], ("<=", 5))

    def t7(self):
        env, n = self.env, self.p["entries"]
        env.mount()
        sfs_files = [env.mnt / "bench-ls" / name for name in self.entry_names]
        local_files = [self.local_dir / name for name in self.entry_names]
        env.timed(["cat", *sfs_files])  # fetches every blob into the cache
        env.timed(["cat", *local_files])
        started = time.monotonic()
        samples = alternate([
            ("shacachefs", lambda: env.timed(["cat", *sfs_files])),
            ("cat local dir", lambda: env.timed(["cat", *local_files])),
        ], self.p["runs"] * SMALL_REPEAT)
        if time.monotonic() - started > DIR_TTL * 0.9:
            raise BenchError("T7 ran past the dir TTL")
        env.umount()
        self.report.record("T7", f"`cat` of {n} cached {fmt_size(self.p['small'])} entries "
                           "(page cache warm on both sides)", samples, ["cat local dir"],
                           ("<=", 3))

    def t6(self):
        env, n, size = self.env, self.p["par_n"], self.p["par"]
        paths = [env.mnt / "bench-par" / f"par{i}.bin" for i in range(n)]
        urls = [f"{env.base}/shacache/{sha}" for sha in self.par_shas]

        def sfs():
            env.mount()
            # The listing first, so that the four opens race for blobs, not for the key.
            env.timed(["ls", "-l", env.mnt / "bench-par"])
            return env.timed_parallel([["cat", p] for p in paths], cold=True)

        samples = alternate([
            ("shacachefs", sfs),
            (f"{n}× curl | sha512sum", lambda: env.timed_parallel(
                [f"set -o pipefail; curl -sfS {u} | sha512sum > /dev/null" for u in urls],
                cold=True)),
        ], self.p["runs"])
        env.umount()

        def mibs(s):
            return f"{n * size / MiB / s:.0f} MiB/s"

        self.report.record("T6", f"{n} concurrent cold `cat`s of distinct {fmt_size(size)} "
                           "entries (aggregate throughput)", samples,
                           [f"{n}× curl | sha512sum"], (">=", 0.9), kind="throughput",
                           unit=mibs)

    @staticmethod
    def new_content(path):
        """A new blob in place: rewrites the first bytes (no upload can be skipped)."""
        with open(path, "r+b") as f:
            f.write(os.urandom(64))
        os.sync()  # the previous run's writeback does not land in the next run

    def t5(self):
        env, src = self.env, self.big
        url = f"{env.base}/shacache"
        counter = iter(range(10**6))
        hwm = []
        env.mount()

        def sfs():
            self.new_content(src)
            s, vm, peaks = env.timed_watched(
                ["cp", src, env.mnt / "bench-up" / f"cp-{next(counter)}.bin"])
            hwm.append((vm, peaks))
            return s

        def reference():
            self.new_content(src)
            return env.timed(env.ref("networkcache-upload", "-f", src, "-k", "bench-up-ref",
                                     f"file=ref-{next(counter)}.bin"))

        def curl():
            self.new_content(src)
            q = shlex.quote(str(src))
            return env.timed(
                f"set -o pipefail; sha512sum {q} > /dev/null && test \"$(curl -sS -o "
                f"/dev/null -w '%{{http_code}}' -H 'Content-Type: application/octet-stream'"
                f" --data-binary @{q} {url})\" = 201")

        samples = alternate([("shacachefs", sfs), ("networkcache-upload", reference),
                             ("sha512sum + curl POST", curl)],
                            swingy_runs(self.p["runs"]))
        env.umount()
        self.report.memory += [f"T5 `cp` of {fmt_size(self.p['big'])} (one daemon for all "
                               f"runs): VmHWM {vm:.1f} MiB (peaks: {peaks})"
                               for vm, peaks in hwm[WARMUP_ROUNDS:]]
        self.report.record("T5", f"`cp` of a {fmt_size(self.p['big'])} file into a key (until "
                           "`cp` returns; new content each run)", samples,
                           ["networkcache-upload", "sha512sum + curl POST"], ("<=", 0.8),
                           extra=f"daemon VmHWM {max(h[0] for h in hwm[WARMUP_ROUNDS:]):.1f} MiB")

    def t8(self):
        env, size = self.env, fmt_size(self.p["huge"])
        env.mount()
        s_cat, cat_hwm, cat_peaks = env.timed_watched(
            ["cat", env.mnt / "bench-huge" / "huge.bin"], cold=True)
        env.mount()
        self.new_content(self.huge)
        s_cp, cp_hwm, cp_peaks = env.timed_watched(
            ["cp", self.huge, env.mnt / "bench-up" / "huge-cp.bin"])
        env.umount()
        for what, hwm, s, peaks in (("cold `cat`", cat_hwm, s_cat, cat_peaks),
                                    ("`cp`", cp_hwm, s_cp, cp_peaks)):
            self.report.memory.append(f"T8 {what} of {size} (fresh daemon): VmHWM "
                                      f"{hwm:.1f} MiB (peaks: {peaks})")
            self.report.row("T8", f"daemon peak RSS (VmHWM), {what} of a {size} file",
                            f"{hwm:.1f} MiB (took {fmt_time(s)})", "—", "—", "≤ 64 MiB",
                            hwm <= 64)
