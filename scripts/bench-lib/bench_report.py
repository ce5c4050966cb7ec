"""The results of scripts/bench: table rows, samples, memory notes, and the markdown
block written between the markers of BENCHMARKS.md (or of another file)."""

import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench_util import ROOT, fmt_time, log

RESULTS_BEGIN = "<!-- bench:results:begin -->"
RESULTS_END = "<!-- bench:results:end -->"


class Report:
    def __init__(self):
        self.results = []  # rows of the table
        self.details = []  # lines of the "samples" section
        self.memory = []  # notes on the daemon's memory
        self.notes = []  # other notes (daemon counters, baselines on fewer files, …)

    def row(self, sid, scenario, sfs, base, ratio, target, met):
        """One table row from formatted cells; `met` is True, False or None (not
        available: not counted)."""
        self.results.append(dict(id=sid, scenario=scenario, sfs=sfs, base=base, ratio=ratio,
                                 target=target,
                                 met={True: "yes", False: "**no**", None: "n/a"}[met]))
        log(f"{sid}: {sfs}; {base}; " + {True: "met", False: "NOT met",
                                         None: "not available"}[met])

    def record(self, sid, scenario, samples, baselines, target, kind="time", unit=None,
               extra="", absolute=None):
        """One table row from samples. `samples` maps label -> seconds; the first label
        is shacachefs, `baselines` lists the others, the first of them is the target's.
        With `absolute` (seconds), the target is shacachefs's median time instead."""
        med = {k: statistics.median(v) for k, v in samples.items()}
        sfs = med["shacachefs"]
        if kind == "time":
            ratios = {b: sfs / med[b] for b in baselines}
        else:  # throughput over the same bytes: baseline time / shacachefs time
            ratios = {b: med[b] / sfs for b in baselines}
        ratio = ratios[baselines[0]]
        op, bound = target
        if absolute is not None:
            met = sfs <= absolute
            target_text = f"time ≤ {absolute:g} s"
        else:
            met = ratio <= bound if op == "<=" else ratio >= bound
            what = "throughput" if kind != "time" else "time"
            sign = "≤" if op == "<=" else "≥"
            target_text = f"{what} {sign} {bound} × {baselines[0]}"
        cells = [fmt_time(sfs) + (f" ({unit(sfs)})" if unit else "")]
        for b in baselines:
            cells.append(f"{b}: {fmt_time(med[b])}" + (f" ({unit(med[b])})" if unit else "")
                         + f", ×{ratios[b]:.2f}")
        self.results.append(dict(id=sid, scenario=scenario, sfs=cells[0],
                                 base="<br>".join(cells[1:]), ratio=f"{ratio:.3f}",
                                 target=target_text, met="yes" if met else "**no**"))
        for k, v in samples.items():
            note = extra if k == "shacachefs" else ""
            self.details.append(f"| {sid} | {k.replace('|', chr(92) + '|')} | "
                                + ", ".join(fmt_time(x) for x in v)
                                + f" | {fmt_time(med[k])} | {note} |")
        log(f"{sid}: shacachefs {fmt_time(sfs)}, "
            + ", ".join(f"{b} {fmt_time(med[b])} (×{ratios[b]:.3f})" for b in baselines)
            + (" met" if met else " NOT met"))

    def text(self, header):
        """The block: `header` lines, the table, the samples, the notes."""
        lines = header + [
            "",
            "| id | scenario | shacachefs (median) | baselines (median, ratio shacachefs/baseline) "
            "| ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.results:
            cells = [r[c].replace("|", "\\|") for c in
                     ("id", "scenario", "sfs", "base", "ratio", "target", "met")]
            lines.append("| " + " | ".join(cells) + " |")
        counted = [r for r in self.results if r["met"] != "n/a"]
        met = sum(r["met"] == "yes" for r in counted)
        skipped = len(self.results) - len(counted)
        lines += ["", f"Targets met: {met} of {len(counted)}"
                  + (f" ({skipped} not available)." if skipped else "."), ""]
        if self.notes:
            lines += [f"- {n}" for n in self.notes] + [""]
        lines += ["Samples, in the order they were taken (alternating sides):", "",
                  "| id | side | samples | median | note |", "| --- | --- | --- | --- | --- |",
                  *self.details]
        if self.memory:
            lines += ["", "Daemon memory, after each watched run (VmHWM) and its peaks during "
                      "the run (sampled every 10 ms):", ""] + [f"- {m}" for m in self.memory]
        return "\n".join(lines) + "\n"


def machine():
    mem = cpu = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), {mem} RAM"


def commit():
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=30)
        return r.stdout.decode().strip() if r.returncode == 0 else ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "Cargo.toml")
    return head + (" (with uncommitted changes in src/)" if dirty else "")


def header(started_at, load_before, load_after, elapsed, runs_text, passthrough):
    return [
        f"- date: {started_at}",
        f"- command: `{' '.join(['scripts/bench'] + sys.argv[1:])}`"
        f" ({runs_text}; took {elapsed / 60:.1f} min)",
        f"- machine: {machine()}; load average before the run: {load_before}, after: "
        f"{load_after}",
        f"- kernel: {os.uname().release}",
        f"- commit: {commit()}",
        f"- FUSE passthrough (the mounts' `user.shacachefs.status`): {passthrough}",
    ]


def write(out, block_text, intro):
    """Replaces the block between the markers of `out` (or writes `intro` + block)."""
    out = Path(out)
    block = f"{RESULTS_BEGIN}\n{block_text}{RESULTS_END}"
    old = out.read_text() if out.exists() else ""
    if RESULTS_BEGIN in old and RESULTS_END in old:
        head, rest = old.split(RESULTS_BEGIN, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = intro + "\n" + block + "\n"
    out.write_text(text)
    log(f"wrote {out}")
