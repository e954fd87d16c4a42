"""Shared helpers of weft's benchmarks: unique names, namespaces, processes, cleanup, statistics.

Every name a benchmark makes starts with ``wb<pid>`` (network namespaces, labs, tmp dirs) and
every process it starts carries ``WEFT_BENCH=wb<pid>`` in its environment. A run cleans up its
own things in ``finally`` blocks, and SIGTERM/SIGHUP are turned into exceptions so those run.
Whatever a run killed with SIGKILL left behind is removed by the next run (:func:`reap_stale`),
which only touches ``wb<pid>`` things whose pid is no longer a running benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
BUILD = REPO / "build" / "bench"
NETNS_DIR = Path("/run/netns")
ENV_MARK = "WEFT_BENCH"

if str(SRC) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(SRC))

PREFIX = f"wb{os.getpid()}"
_STALE_RE = re.compile(r"^wb(\d+)(?=[a-z-])")


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------- polling / processes
def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll ``predicate`` until it holds or the deadline passes (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def run(*argv: str, check: bool = True, timeout: float = 60, input_text: str | None = None,
        env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout, input=input_text,
                          env=bench_env(**(env or {})))
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: rc={proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env[ENV_MARK] = PREFIX
    env.update(extra)
    return env


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / netns}", *argv]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Processes:
    """Background processes of one benchmark, each in its own session; stopped by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, argv: Sequence[str], ready_line: str | None = None, timeout: float = 10.0,
              log: Path | None = None) -> subprocess.Popen[str]:
        """Start ``argv``; if ``ready_line`` is given, wait (with a deadline) for stdout to start with it.
        Without one, stdout and stderr go to ``log`` (or nowhere), so a chatty server never blocks."""
        if ready_line is None:
            out: Any = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out, text=True,
                                    start_new_session=True, env=bench_env())
            if log:
                out.close()
            self.procs.append(proc)
            return proc
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, env=bench_env())
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while not line:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{' '.join(argv)}: not ready after {timeout:g}s")
            readable, _, _ = select.select([proc.stdout], [], [], left)
            if readable:
                line = proc.stdout.readline()
                if not line:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise BenchError(f"{' '.join(argv)} exited with {proc.wait()}: {err.strip()}")
        if not line.startswith(ready_line):
            raise BenchError(f"{' '.join(argv)}: unexpected first line {line!r}")
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()


# ---------------------------------------------------------------------------- namespaces
def netns_add(name: str) -> str:
    run("ip", "netns", "add", name)
    run("ip", "-n", name, "link", "set", "lo", "up")
    return str(NETNS_DIR / name)


def netns_del(name: str) -> None:
    run("ip", "netns", "del", name, check=False)


def netns_del_many(names: Sequence[str]) -> None:
    """Delete many namespaces with one `ip -batch` (one exec instead of one per namespace)."""
    existing = [n for n in names if (NETNS_DIR / n).exists()]
    if existing:
        run("ip", "-force", "-batch", "-", input_text="".join(f"netns del {n}\n" for n in existing), check=False,
            timeout=300)


def netns_add_many(names: Sequence[str]) -> None:
    run("ip", "-batch", "-", input_text="".join(f"netns add {n}\n" for n in names), timeout=300)
    for n in names:
        run("ip", "-n", n, "link", "set", "lo", "up")


def sysctl(netns: str, key: str, value: str) -> None:
    run(*in_netns(netns, ["sysctl", "-qw", f"{key}={value}"]))


# ---------------------------------------------------------------------------- cleanup
def reap_stale() -> list[str]:
    """Remove what killed benchmark runs left: ``wb<pid>`` namespaces, labs, tmp dirs and processes
    whose run (pid) is gone. Returns what was removed."""
    from weft.lab.cluster import LABS_DIR, Lab

    def stale(name: str) -> bool:
        m = _STALE_RE.match(name)
        return m is not None and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))

    removed: list[str] = []
    if LABS_DIR.is_dir():
        for lab_dir in LABS_DIR.iterdir():
            if stale(lab_dir.name):
                Lab(lab_dir.name).down(quiet=True)
                removed.append(f"lab {lab_dir.name}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(f"{ENV_MARK}=".encode()) and stale(item.split(b"=", 1)[1].decode() + "-"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
                    removed.append(f"process {entry.name}")
    if NETNS_DIR.is_dir():
        names = [e.name for e in NETNS_DIR.iterdir() if stale(e.name)]
        netns_del_many(names)
        removed += [f"netns {n}" for n in names]
    for tmp in Path(tempfile.gettempdir()).glob("wb*"):
        if tmp.is_dir() and stale(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(f"dir {tmp}")
    return removed


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _raise_on_signal(signum: int, _frame: Any) -> None:
    # Once: a second signal must not cut the cleanup that this one starts.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def bench_session() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP/SIGINT into SystemExit (so every ``finally`` runs, and runs to its end even
    if more signals come) and reap stale leftovers."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _raise_on_signal)
    if os.geteuid() != 0:
        raise BenchError("benchmarks need root (network namespaces, bpffs)")
    for what in reap_stale():
        print(f"removed leftover of a killed run: {what}", file=sys.stderr)
    yield


def tmp_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{tag}-"))


def ensure_bpf() -> None:
    """Build the datapath objects the lab loads (as the privileged tests do)."""
    run("make", "-s", "-C", str(REPO), "bpf", timeout=600)


def build_tool(name: str) -> Path:
    """Compile bench/<name>.c into build/bench/<name> (again only if the source is newer)."""
    src = REPO / "bench" / f"{name}.c"
    out = BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        BUILD.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        run("gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(src), timeout=120)
        os.replace(tmp, out)
    return out


def build_rr() -> Path:
    """bench/rr.c, the request/response tool, built."""
    return build_tool("rr")


# ---------------------------------------------------------------------------- statistics / output
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a_i / b_i: each round's A and B ran back to back, so load that hits
    both cancels out. Shown next to the ratio of medians as a check on noise."""
    return median([x / y for x, y in zip(a, b, strict=True)])


def spread(values: Sequence[float]) -> str:
    """min..max of a sample, for the tables."""
    def fmt(x: float) -> str:
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"

    return f"{fmt(min(values))}..{fmt(max(values))}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class Result:
    """One target of the issue: ``ratio`` compared with ``target`` (>= or <=)."""

    name: str
    ratio: float
    target: float
    higher_is_better: bool = True
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        verdict = "PASS" if self.passed else "MISS"
        return f"RESULT {self.name} ratio={self.ratio:.3f} target={op}{self.target:g} {verdict}"

    def lines(self) -> list[str]:
        """The detail line (measured figures) followed by the RESULT line."""
        return ([f"# {self.name}: {self.detail}"] if self.detail else []) + [self.line()]


RESULT_RE = re.compile(r"^RESULT (\S+) ratio=(\S+) target=(>=|<=)(\S+) (PASS|MISS)$")
DETAIL_RE = re.compile(r"^# (\S+): (.*)$")


def parse_result(line: str) -> Result | None:
    m = RESULT_RE.match(line.strip())
    if not m:
        return None
    return Result(m.group(1), float(m.group(2)), float(m.group(4)), m.group(3) == ">=")


def dump_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=1))


def print_results(results: list[Result]) -> None:
    """Each result's figures, then its RESULT line (run.py reads both; RESULT lines come last)."""
    for res in results:
        say(res.lines()[0])
    for res in results:
        say(res.line())


def say(msg: str) -> None:
    print(msg, flush=True)


def wait_listening(netns: str, port: int, proc: subprocess.Popen[str] | None = None, timeout: float = 10.0) -> None:
    """Poll until a TCP socket listens on ``port`` inside ``netns`` (and ``proc`` is still running)."""

    def listening() -> bool:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server in {netns} exited with {proc.returncode} before listening on {port}")
        return bool(run(*in_netns(netns, ["ss", "-Hltn", f"sport = :{port}"])).strip())

    wait_for(f"a listener on port {port} in {netns}", listening, timeout=timeout)
