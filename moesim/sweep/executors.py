"""Where sweep cells run: this process, a local process pool (default: all cores), or Ray tasks.

Why: a grid spreads over cores of one machine with the standard library, and over many machines on Ray (an
engine researchers already run) — never a home-made scheduler. All three call the same cell code
(:mod:`moesim.sweep.cells`) and commit the same folders, so their tables are equal.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from moesim.errors import MoesimError
from moesim.sweep import cells

Done = Callable[[dict[str, Any]], None]  # called with each finished cell's record
Tick = Callable[[int], None]  # called with the number of cells running now


class Progress:
    """``sweep [#####.....] 12/40 cells (8 cached), 2 running, 1 failed, ETA 1m05s`` on stderr."""

    def __init__(self, total: int, cached: int, enabled: bool) -> None:
        self.total, self.cached, self.enabled = total, cached, enabled
        self.done = self.failed = self.running = 0
        self.t0 = time.monotonic()
        self.last = 0.0

    def finished(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.failed += record.get("status") != "ok"
        self.show(force=True)

    def tick(self, running: int) -> None:
        self.running = running
        self.show()

    def eta(self) -> str:
        left = self.total - self.cached - self.done
        if self.done == 0 or left <= 0:
            return "-" if left > 0 else "0s"
        s = (time.monotonic() - self.t0) / self.done * left
        return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        n = self.cached + self.done
        fill = int(30 * n / max(self.total, 1))
        sys.stderr.write(f"\rsweep [{'#' * fill}{'.' * (30 - fill)}] {n}/{self.total} cells ({self.cached} cached), "
                         f"{self.running} running, {self.failed} failed, ETA {self.eta()}   ")
        if n >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def run_serial(tasks: list[dict[str, Any]], done: Done, tick: Tick) -> None:
    """Every cell in this process, one after another (``--workers 1``)."""
    for task in tasks:
        tick(1)
        done(cells.local_cell(task))


def run_pool(tasks: list[dict[str, Any]], workers: int, done: Done, tick: Tick) -> None:
    """A pool of ``workers`` spawned processes; at most ``workers`` cells in flight, so a worker that dies
    (killed, out of memory) costs only the cells it was running: they are retried once, then recorded failed."""
    ctx = multiprocessing.get_context("spawn")
    queue = deque(tasks)
    tries: dict[str, int] = {}
    while queue:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        inflight: dict[Any, dict[str, Any]] = {}
        broken = False
        try:
            while (queue or inflight) and not broken:
                while queue and len(inflight) < workers:
                    task = queue.popleft()
                    inflight[pool.submit(cells.local_cell, task)] = task
                tick(len(inflight))
                finished, _ = wait(inflight, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    task = inflight.pop(fut)
                    try:
                        done(fut.result())
                    except BrokenProcessPool:
                        broken = True
                        inflight[fut] = task
                    except Exception as exc:  # the cell code catches its own errors: this is the pool's
                        done(_record_failure(task, f"worker error: {type(exc).__name__}: {exc}"))
            if broken:
                for task in inflight.values():
                    tries[task["key"]] = tries.get(task["key"], 0) + 1
                    if tries[task["key"]] > 1:
                        done(_record_failure(task, "its worker process died twice (killed or out of memory)"))
                    else:
                        queue.appendleft(task)
        finally:
            pool.shutdown(wait=not broken, cancel_futures=True)


def _record_failure(task: dict[str, Any], error: str) -> dict[str, Any]:
    import tempfile

    record = cells.failed_record(task, error)
    cells_dir = Path(task["cells_dir"])
    cells.commit(cells_dir, task["key"], Path(tempfile.mkdtemp(prefix=cells.TMP_PREFIX, dir=cells_dir)), record)
    return record


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MoesimError("--ray needs Ray: pip install 'moesim[ray]' (or pip install ray)") from None
    return ray


def run_ray(tasks: list[dict[str, Any]], address: str | None, done: Done, tick: Tick) -> None:
    """Each cell a Ray task (one CPU) on the cluster at ``address`` (None: start a local one).

    Workers need moesim and the input files at the same paths (a shared file system, or the same machine);
    each returns its cell's files, which this process commits into the sweep's folder.
    """
    import logging

    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     configure_logging=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise MoesimError(f"cannot connect to Ray at {address or 'a new local cluster'}: "
                              f"{' '.join(str(exc).split())[:200]}") from None
    try:
        remote = ray.remote(num_cpus=1, max_retries=1)(cells.remote_cell)
        refs = {remote.remote(task): task for task in tasks}
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        while refs:
            tick(min(len(refs), cpus))
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in ready:
                task = refs.pop(ref)
                try:
                    record, files = ray.get(ref)
                except Exception as exc:  # worker died, task cancelled ...
                    done(_record_failure(task, f"Ray task failed: {type(exc).__name__}: {str(exc)[:300]}"))
                    continue
                cells.commit_files(Path(task["cells_dir"]), task["key"], files, record)
                done(record)
    finally:
        if started:
            ray.shutdown()
