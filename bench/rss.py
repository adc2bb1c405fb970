"""Memory and CPU of a process tree, sampled from /proc (Linux; psutil is not a dependency).

RSS of the tree = the sum of ``VmRSS`` over a process and all its descendants, found through
``/proc/<pid>/task/*/children`` (or, on kernels without that file, by scanning every ``/proc/<pid>/stat`` for
its parent), each address space once (a child not yet past exec repeats its parent's memory). Pages shared by
independent processes (forked workers after exec, shared libraries) count once per process, so the sum
over-counts those, never under-counts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children_file(pid: int) -> list[int] | None:
    """Direct children from the task ``children`` files; None when the kernel does not provide them."""
    tasks = PROC / str(pid) / "task"
    try:
        task_ids = os.listdir(tasks)
    except OSError:
        return []
    found: list[int] = []
    for tid in task_ids:
        try:
            text = (tasks / tid / "children").read_text()
        except FileNotFoundError:
            if (tasks / tid).exists():
                return None  # the task is there but has no children file: not supported by this kernel
            continue
        except OSError:
            continue
        found.extend(int(x) for x in text.split())
    return found


def _parent_map() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir(PROC):
        if not entry.isdigit():
            continue
        try:
            stat = (PROC / entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: parse after its closing parenthesis.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that exist right now (``pid`` first)."""
    tree = [pid]
    parents: dict[int, list[int]] | None = None
    i = 0
    while i < len(tree):
        kids = _children_file(tree[i])
        if kids is None:
            if parents is None:
                parents = _parent_map()
            kids = parents.get(tree[i], [])
        tree.extend(k for k in kids if k not in tree)
        i += 1
    return tree


def rss_detail(pid: int) -> dict[str, int]:
    """``VmRSS`` and its parts ``RssAnon`` (heap, stacks: what the process really holds) and ``RssFile``
    (mapped files, e.g. memory-mapped blocks: page cache the kernel can drop), in bytes; {} once it exited."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(line.split()[1]) * 1024
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of one process in bytes; 0 once it has exited (or is a zombie)."""
    return rss_detail(pid).get("VmRSS", 0)


def process_name(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3 of stat is index 0 here)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (not its children); None once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "exe")
    except OSError:
        return None


def _is_clone_of_a_thread(pid: int, parent: int) -> bool:
    """True if ``pid`` runs its parent's executable under the name of another of the parent's threads."""
    name = process_name(pid)
    if parent <= 1 or name == process_name(parent) or _exe(pid) is None or _exe(pid) != _exe(parent):
        return False
    try:
        threads = os.listdir(PROC / str(parent) / "task")
    except OSError:
        return False
    for tid in threads:
        try:
            if (PROC / str(parent) / "task" / tid / "comm").read_text().strip() == name:
                return True
        except OSError:
            continue
    return False


def address_space(pid: int) -> tuple[str, ...] | int:
    """What identifies the process's memory: its code and stack addresses (fields 26-28 of stat).

    A child between fork/vfork and exec has its parent's layout: with vfork it *is* the parent's memory (the
    JVM starts every helper process that way), with fork its pages are shared copy-on-write. Either way its
    VmRSS repeats the parent's, and counting both would double the tree. Independent processes get different
    addresses (ASLR). Where the fields are hidden (0), the pid stands for itself. A child that still runs its
    parent's executable under another name (the name of the parent's thread that cloned it, e.g. a JVM
    thread starting ``chmod``) has not exec'd yet: it is its parent's memory whatever the fields show.
    """
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 26:
        return pid
    parent = int(fields[1])
    if _is_clone_of_a_thread(pid, parent):
        return address_space(parent)
    if fields[23:26] == ["0", "0", "0"]:
        return pid
    return tuple(fields[23:26])


def tree_rss_bytes(pid: int) -> int:
    """RSS of the tree, each address space counted once."""
    per_space: dict[tuple[str, ...] | int, int] = {}
    for p in process_tree(pid):
        space = address_space(p)
        per_space[space] = max(per_space.get(space, 0), rss_bytes(p))
    return sum(per_space.values())


@dataclass
class TreeSampler:
    """Samples the tree rooted at ``pid`` every ``interval`` seconds on a daemon thread.

    ``peak_bytes``: the largest tree RSS seen; ``peak_anon_bytes``: the largest tree ``RssAnon``;
    ``peak_by_name``: per process name (``java``, ``python``), the largest RSS one such process had;
    ``series``: (seconds since start, bytes) pairs; ``cpu_seconds``: CPU of every process seen in the tree,
    each at its last sample.
    """

    pid: int
    interval: float = 0.05
    peak_bytes: int = 0
    peak_anon_bytes: int = 0
    peak_by_name: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    series: list[tuple[float, int]] = field(default_factory=list)
    max_processes: int = 0
    _cpu: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = 0.0

    def start(self) -> TreeSampler:
        self._t0 = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def sample(self) -> int:
        pids = process_tree(self.pid)
        spaces: dict[tuple[str, ...] | int, tuple[int, int, str]] = {}
        for p in pids:
            detail = rss_detail(p)
            rss = detail.get("VmRSS", 0)
            # Read every time: a launcher script (spark-submit) becomes the JVM by exec under the same pid.
            name = process_name(p)
            space = address_space(p)
            if rss >= spaces.get(space, (-1, 0, ""))[0]:
                spaces[space] = (rss, detail.get("RssAnon", rss), name)
            cpu = cpu_seconds(p)
            if cpu is not None:
                self._cpu[p] = cpu
        total = sum(rss for rss, _, _ in spaces.values())
        anon = sum(a for _, a, _ in spaces.values())
        for rss, _, name in spaces.values():
            self.peak_by_name[name] = max(self.peak_by_name.get(name, 0), rss)
        self.samples += 1
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon)
        self.max_processes = max(self.max_processes, len(pids))
        self.series.append((time.monotonic() - self._t0, total))
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> TreeSampler:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values())

    def __enter__(self) -> TreeSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SampledRun:
    """A finished subprocess: exit code, wall seconds, peak tree RSS (all, anonymous, per process name), tree
    CPU seconds, its log file."""

    returncode: int
    wall_seconds: float
    peak_rss_bytes: int
    cpu_seconds: float
    samples: int
    log_path: Path
    peak_anon_bytes: int = 0
    peak_by_name: dict[str, int] = field(default_factory=dict)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def run_sampled(argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                cwd: str | Path | None = None, timeout: float = 3600.0, interval: float = 0.05) -> SampledRun:
    """Run ``argv`` to completion in a fresh process while sampling its tree; output goes to ``log_path``.

    A run past ``timeout`` seconds is killed (with its process group) and reported with return code -9.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        sampler = TreeSampler(proc.pid, interval=interval).start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        finally:
            sampler.stop()
        wall = time.perf_counter() - t0
    # A child of the run (the Spark JVM) may linger for a moment after its parent exited: end it too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return SampledRun(returncode=code, wall_seconds=wall, peak_rss_bytes=sampler.peak_bytes,
                      cpu_seconds=sampler.cpu_seconds, samples=sampler.samples, log_path=log_path,
                      peak_anon_bytes=sampler.peak_anon_bytes, peak_by_name=dict(sampler.peak_by_name))
