"""Run one benchmark job in this process: python -m benchmarks.worker JOB.json RESULT.json (see benchmarks.jobs)."""
from __future__ import annotations

import json
import sys
import traceback

from sqllava_edge.fileutil import atomic_write


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    from benchmarks.jobs import run_job

    job = json.loads(open(argv[0]).read())
    try:
        result = run_job(job)
    except Exception as exc:  # reported in the benchmark's output instead of aborting the whole run
        traceback.print_exc()
        result = {"kind": job.get("kind"), "label": job.get("label"), "error": f"{type(exc).__name__}: {exc}"}
    with atomic_write(argv[1], "w") as handle:
        json.dump(result, handle, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
