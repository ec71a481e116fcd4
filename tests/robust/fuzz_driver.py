"""Runs many ``moesim`` command lines in one process under a memory cap: the fuzz suite's worker.

Usage: python fuzz_driver.py CASES.json RESULTS.json MEMORY_BYTES. Each case is {"id", "argv", "timeout"}; each
result {"id", "rc", "stderr", "seconds"}. A case that runs past its timeout is recorded with rc "timeout".
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import time


class _Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _Timeout


def main() -> None:
    cases_path, results_path, memory = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    from moesim.cli import main as moesim_main

    signal.signal(signal.SIGALRM, _alarm)
    results = []
    with open(cases_path) as f:
        cases = json.load(f)
    for case in cases:
        err, out = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        signal.alarm(int(case.get("timeout", 30)))
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    rc = moesim_main(case["argv"])
                except SystemExit as exc:
                    rc = exc.code
        except _Timeout:
            rc = "timeout"
        except BaseException as exc:  # a crash the CLI let through: recorded, the suite goes on
            rc = f"raised {type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
        results.append({"id": case["id"], "rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()[-2000:],
                        "seconds": time.perf_counter() - t0})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
