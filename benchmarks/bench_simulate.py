"""Replay a generated 200,000-request log through `policy-engine simulate` and report requests/s.

The baseline, measured in the same run, is the straightforward replay: `Engine.decide`
and `Engine.settle` per line on a json-parsed record, as a user would write it by hand.
The last line is the figure: `simulate: N requests/s` (target: N >= 50,000 on one core).
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from gen_requests import generate, write  # noqa: E402

from policy_engine.compile import compile_file  # noqa: E402
from policy_engine.decide import load  # noqa: E402
from policy_engine.errors import CeilingExceeded  # noqa: E402
from policy_engine.ledger import MemoryLedger  # noqa: E402
from policy_engine.simulate import Replayer, iter_log, open_log  # noqa: E402

N = int(os.environ.get("BENCH_SIMULATE_N", "200000"))
BASELINE_N = int(os.environ.get("BENCH_SIMULATE_BASELINE_N", "20000"))
POLICY = str(ROOT / "policies" / "default.yaml")


def baseline(lines: list[str]) -> float:
    clock = [0.0]
    engine = load(POLICY, ledger=MemoryLedger(clock=lambda: clock[0], settled_memory_s=0.0))
    started = time.perf_counter()
    for line in lines:
        record = json.loads(line)
        now = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        clock[0] = now.timestamp()
        try:
            decision = engine.decide(record["request"], record.get("context"), now=now,
                                     batch=record.get("batch", False), input_tokens=record.get("input_tokens"))
        except CeilingExceeded:
            continue
        engine.settle(decision, dict(record["usage"], speed=decision.speed))
    return len(lines) / (time.perf_counter() - started)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "requests.jsonl.gz")
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=1) as out:
            write(generate(N, seed=11, hours=24 * 7), out)
        compiled = compile_file(POLICY)
        with open_log(path) as stream:
            lines = list(iter_log(stream))  # read first: the figure is the replay, not gunzip
        started = time.perf_counter()
        report = Replayer(compiled).run(lines)
        elapsed = time.perf_counter() - started
    rate = report.decided / elapsed
    base = baseline([text for _, text in lines[:BASELINE_N]])
    print(f"policy {compiled.name}: {report.decided} requests in {elapsed:.2f} s "
          f"({report.speeds.get('fast', 0)} fast, {report.speeds.get('standard', 0)} standard, "
          f"{report.speeds.get('rejected', 0)} rejected, {report.invalid} invalid)")
    print(f"baseline (Engine.decide + settle per line, {min(BASELINE_N, len(lines))} lines): {base:,.0f} requests/s")
    print(f"ratio simulate / baseline: {rate / base:.2f}x   target 50,000 requests/s: "
          f"{'met' if rate >= 50_000 else 'NOT met'}")
    print(f"simulate: {rate:.0f} requests/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
