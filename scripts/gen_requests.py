#!/usr/bin/env python3
"""Generate a reproducible synthetic Messages API request log (JSON Lines) for `policy-engine simulate`.

    python scripts/gen_requests.py --n 10000 --seed 7 --out data/requests.jsonl.gz

The same seed always gives the same bytes (gzip headers carry no timestamp). The mix
is meant to look like one organization's traffic over a day and a half:

* chat: multi-turn streamed conversations, mostly Opus, with latency SLOs and prompt caching;
* long documents: 30K-230K-token prompts (a document block) with short or medium answers;
* agents: tool-using loops of 3-15 steps, some with extended thinking;
* batch: offline Message Batches work at night;
* several tenants (one untagged share), a few Priority Tier and US-residency requests,
  and today's model mix (`MODELS`): models with and without fast mode, one retired.

A log line is a compact JSON object; only `request` is required:

    {"ts": "2026-12-01T09:15:02.250Z", "context": {...}, "input_tokens": 5120, "batch": true,
     "usage": {"input_tokens": 120, "cache_read_input_tokens": 5000, "output_tokens": 811},
     "request": {...Messages API params...}}

Prompts are not logged (a production log would not hold them either): each message
carries a one-character placeholder, and `input_tokens` gives the prompt's exact size,
as a count_tokens call or the response's usage would have.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import io
import json
import math
import random
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

START = datetime(2026, 12, 1, 0, 0, tzinfo=timezone.utc)
TENANTS = [("acme", 0.34, "fast"), ("globex", 0.24, "standard"), ("initech", 0.14, "standard"),
           ("umbrella", 0.1, "standard"), ("hooli", 0.12, "fast"), (None, 0.06, None)]
KINDS = [("chat", 0.40), ("document", 0.15), ("agent", 0.25), ("batch", 0.20)]
# Today's model mix, by kind of work (December 2026): mostly Opus 5.5, Opus 5 where a team
# has not moved yet, Sonnet and Haiku where speed of answer matters less than price, a little
# Fable 5.2, and stragglers still on Opus 4.8, whose fast mode was retired on 2026-12-01.
MODELS = {
    "agent": [("claude-opus-5-5", 0.6), ("claude-opus-5", 0.2), ("claude-fable-5-2", 0.1), ("claude-opus-4-8", 0.05),
              ("claude-sonnet-5-5", 0.05)],
    "chat": [("claude-opus-5-5", 0.45), ("claude-sonnet-5-5", 0.25), ("claude-opus-5", 0.1), ("claude-haiku-5-5", 0.1),
             ("claude-fable-5-2", 0.05), ("claude-opus-4-8", 0.05)],
    "document": [("claude-opus-5-5", 0.7), ("claude-sonnet-5-5", 0.2), ("claude-fable-5-2", 0.1)],
    "batch": [("claude-sonnet-5-5", 0.4), ("claude-haiku-5-5", 0.3), ("claude-opus-5-5", 0.3)],
}
_SEP = (",", ":")


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([w[0] for w in weighted], [w[1] for w in weighted])[0]


def _messages(turns: int, blocks: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in range(turns):
        if turn:
            messages.append({"role": "assistant", "content": "."})
        messages.append({"role": "user", "content": "."})
    if blocks:
        messages[-1] = {"role": "user", "content": [*blocks, {"type": "text", "text": "."}]}
    return messages


def _output(rng: random.Random, max_tokens: int, share: float) -> int:
    # Answers use a lognormal share of max_tokens: most stop well short, a few run to the limit.
    return max(1, min(max_tokens, int(max_tokens * share * math.exp(rng.gauss(0, 0.6)))))


def _tenant(rng: random.Random) -> dict[str, Any]:
    name, _, plan = _pick(rng, [(t, t[1]) for t in TENANTS])
    context: dict[str, Any] = {}
    if name is not None:
        context["tenant"] = name
        context["labels"] = {"plan": plan}
    return context


def _when(rng: random.Random, hours: float, night: bool = False) -> float:
    """Seconds after START: office hours (New York) dominate, except for batch work."""
    while True:
        at = rng.uniform(0, hours * 3600)
        local_hour = ((at / 3600) - 5) % 24
        busy = 0 <= local_hour - 8 < 11
        if night != busy or rng.random() < 0.15:
            return at


def _session(rng: random.Random, kind: str, serial: int, hours: float) -> Iterator[tuple[float, dict[str, Any]]]:
    context = _tenant(rng)
    if kind == "batch":
        at = _when(rng, hours, night=True)
        model = _pick(rng, MODELS["batch"])
        max_tokens = rng.choice([1024, 2048, 4096])
        prompt = rng.randint(500, 8000)
        request = {"model": model, "max_tokens": max_tokens, "messages": _messages(1)}
        usage = {"input_tokens": prompt, "output_tokens": _output(rng, max_tokens, 0.4)}
        yield at, {"request": request, "context": {**context, "interactive": False}, "batch": True,
                   "input_tokens": prompt, "usage": usage}
        return

    at = _when(rng, hours)
    if kind == "document":
        max_tokens = rng.choice([512, 1024, 1024, 4096])
        prompt = int(rng.triangular(30_000, 230_000, 120_000))
        cache = rng.random() < 0.5
        block: dict[str, Any] = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "."}}
        if cache:
            block["cache_control"] = {"type": "ephemeral"}
        request = {"model": _pick(rng, MODELS["document"]), "max_tokens": max_tokens, "messages": _messages(1, [block])}
        interactive = rng.random() < 0.5
        ctx = {**context, "interactive": interactive}
        if interactive and rng.random() < 0.6:
            ctx["latency_slo_ms"] = rng.choice([15_000, 30_000, 60_000])
        output = _output(rng, max_tokens, 0.5)
        usage = ({"input_tokens": 40, "cache_creation_input_tokens": prompt - 40, "output_tokens": output} if cache
                 else {"input_tokens": prompt, "output_tokens": output})
        yield at, {"request": request, "context": ctx, "input_tokens": prompt, "usage": usage}
        return

    model = _pick(rng, MODELS[kind])
    steps = rng.randint(3, 15) if kind == "agent" else rng.randint(1, 8)
    interactive = rng.random() < (0.7 if kind == "agent" else 0.95)
    ctx: dict[str, Any] = {**context, "interactive": interactive, "conversation_id": f"{kind[0]}-{serial}"}
    if rng.random() < 0.3:
        ctx["user"] = f"u-{rng.randint(1, 400)}"
    if interactive and rng.random() < 0.75:
        ctx["latency_slo_ms"] = rng.choice([5_000, 10_000, 20_000, 30_000, 60_000])
    if rng.random() < 0.1:
        ctx["priority"] = "high"
    system = rng.randint(800, 4000)
    tools = [{"name": f"tool_{i}", "input_schema": {"type": "object"}} for i in range(rng.randint(3, 12))] if kind == "agent" else []
    thinking = kind == "agent" and rng.random() < 0.3
    tier = "priority" if rng.random() < 0.03 else None
    geo = "us" if rng.random() < 0.05 else None
    prefix = 0
    for step in range(steps):
        max_tokens = rng.choice([4096, 8192, 16000]) if kind == "agent" else rng.choice([512, 1024, 2048, 4096, 8192])
        added = rng.randint(200, 3000) if kind == "agent" else rng.randint(30, 800)
        prompt = system + prefix + added
        request: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                                   "system": [{"type": "text", "text": ".", "cache_control": {"type": "ephemeral"}}],
                                   "messages": _messages(step + 1)}
        if kind == "chat":
            request["stream"] = True
        if tools:
            request["tools"] = tools
        if thinking:
            request["thinking"] = {"type": "enabled", "budget_tokens": max_tokens // 2}
        if tier:
            request["service_tier"] = tier
        if geo:
            request["inference_geo"] = geo
        output = _output(rng, max_tokens, 0.15 if kind == "agent" else 0.3)
        cached = system + prefix if step else 0
        usage = {"input_tokens": added if step else 0, "cache_read_input_tokens": cached,
                 "cache_creation_input_tokens": prompt - cached - (added if step else 0), "output_tokens": output}
        yield at, {"request": request, "context": ctx, "input_tokens": prompt, "usage": usage}
        prefix += added + output
        at += rng.uniform(5, 30) if kind == "agent" else rng.uniform(20, 150)


def generate(n: int, seed: int = 7, hours: float = 36.0) -> Iterator[dict[str, Any]]:
    """`n` log records, in timestamp order."""
    rng = random.Random(seed)
    pending: list[tuple[float, int, dict[str, Any]]] = []
    serial = 0
    # Sessions span time, so draw them all first and emit in order; n is small enough for memory.
    while len(pending) < n:
        serial += 1
        for at, record in _session(rng, _pick(rng, KINDS), serial, hours):
            pending.append((at, len(pending), record))
    pending = heapq.nsmallest(n, pending)
    for at, _, record in pending:
        stamp = START + timedelta(seconds=round(at, 3))
        request = record.pop("request")
        # `request` goes last: simulate keys its parse cache on that tail of the line.
        yield {"ts": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z", **record, "request": request}


def write(records: Iterator[dict[str, Any]], out: io.BufferedIOBase | Any) -> int:
    count = 0
    for record in records:
        out.write(json.dumps(record, separators=_SEP).encode("utf-8") + b"\n")
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="number of requests (default 10000)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    parser.add_argument("--hours", type=float, default=36.0, help="time span of the log in hours (default 36)")
    parser.add_argument("--out", default="-", help="output file; .gz is compressed; - for stdout (default)")
    args = parser.parse_args(argv)
    records = generate(args.n, args.seed, args.hours)
    if args.out == "-":
        write(records, sys.stdout.buffer)
    elif args.out.endswith(".gz"):
        with open(args.out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as out:
            write(records, out)
    else:
        with open(args.out, "wb") as out:
            write(records, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
