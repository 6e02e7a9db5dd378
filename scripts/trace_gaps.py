#!/usr/bin/env python3
"""Where the GPU waits in one profiled training step: read a torch.profiler chrome trace (bench_train.py writes
profile_<phase>.trace.json next to its profile table) and report the time no compute kernel runs, split by what the
CPU was doing when it launched the kernel that ended each gap.

    python scripts/trace_gaps.py PATH/profile_opt_in.trace.json [--top 20]

A gap whose next kernel was launched after the previous kernel had finished is CPU-bound (the GPU ran out of
queued work); otherwise the kernel was queued in time and waited on something else (a stream or event wait, a copy).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
from pathlib import Path

COMPUTE = ("kernel", "gpu_memset")


def load(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X"]


def cpu_context(ops_by_tid: dict, tid, ts: float, depth: int = 3) -> str:
    """The outermost ``depth`` CPU ops (by start time) enclosing ``ts`` on thread ``tid``."""
    starts, ops = ops_by_tid.get(tid, ([], []))
    enclosing = []
    index = bisect.bisect_right(starts, ts)
    for op in reversed(ops[:index]):
        if op["ts"] <= ts <= op["ts"] + op.get("dur", 0):
            enclosing.append(op)
        if len(enclosing) > 40:
            break
    enclosing.sort(key=lambda op: op["ts"])
    names = [op["name"][:60] for op in enclosing if not op["name"].startswith(("cuda", "cu"))]
    return " > ".join(names[:depth]) or "(no CPU op)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--min-gap-us", type=float, default=2.0)
    args = parser.parse_args()
    events = load(args.trace)
    kernels = sorted((e for e in events if e.get("cat") in COMPUTE), key=lambda e: e["ts"])
    if not kernels:
        print("no GPU kernels in the trace")
        return 1
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_tid: dict = {}
    for op in sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"]):
        starts, ops = ops_by_tid.setdefault(op["tid"], ([], []))
        starts.append(op["ts"])
        ops.append(op)

    begin, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    busy_until, busy, gaps = begin, 0.0, []
    for kernel in kernels:
        start, stop = kernel["ts"], kernel["ts"] + kernel["dur"]
        if start > busy_until + args.min_gap_us:
            gaps.append((start - busy_until, busy_until, kernel))
        if stop > busy_until:
            busy += stop - max(start, busy_until)
            busy_until = stop
    window = end - begin
    idle = sum(g[0] for g in gaps)
    print(f"step window {window / 1e3:.1f} ms: compute kernels busy {busy / 1e3:.1f} ms, "
          f"idle {idle / 1e3:.1f} ms in {len(gaps)} gaps of > {args.min_gap_us:g} us")

    by_context: dict = collections.defaultdict(lambda: [0.0, 0, 0.0])
    largest = []
    for length, idle_from, kernel in gaps:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            context, cpu_bound = "(launch not in trace)", False
        else:
            context = cpu_context(ops_by_tid, launch["tid"], launch["ts"])
            cpu_bound = launch["ts"] + launch.get("dur", 0) >= idle_from
        entry = by_context[("CPU-bound" if cpu_bound else "queued") + ": " + context]
        entry[0] += length
        entry[1] += 1
        largest.append((length, context, kernel["name"][:50], cpu_bound))
    print(f"\n{'idle ms':>8} {'gaps':>5}  launched from (outermost CPU ops)")
    for context, (total, count, _) in sorted(by_context.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{total / 1e3:>8.2f} {count:>5}  {context}")
    print(f"\nlargest gaps:\n{'us':>8}  cpu-bound  next kernel  <-  CPU context")
    for length, context, name, cpu_bound in sorted(largest, reverse=True)[:args.top]:
        print(f"{length:>8.0f}  {str(cpu_bound):<9}  {name}  <-  {context}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
