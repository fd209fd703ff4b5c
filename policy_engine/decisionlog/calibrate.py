"""`policy-engine calibrate`: measured throughput per model, speed and platform, from decision logs.

    calibration = calibrate(iter_log(open_log("decisions.jsonl")))
    print(calibration.render("text"))
    Path("measured.yaml").write_text(calibration.overlay_yaml())
    engine = policy_engine.load("policy.yaml", catalog="measured.yaml")

What is fitted, from the `latency` of settled records:

* time to first token: streams only, as the wait before generation starts, `total_s - output_tokens /
  output_tps` (the `ttft_s` that `throughput.est_*_s = ttft_s + max_tokens / otps` adds; the logged
  `latency.ttft_s`, first content seen, is later by the first delta's generation);
* output tokens per second: a stream's `latency.output_tps` (generation after message_start);
  a non-streaming response has only its total time, so its rate is
  `output_tokens / (total_s - TTFT)` with the TTFT fitted from the streams of the same model
  and platform; without such streams non-streaming records give no rate (counted as skipped).

The fitted figure is the median (p50); p10/p90/p99, the mean and the standard deviation show
the spread. Records whose response was served by several steps (fallback hops, advisors)
time more than one generation and are skipped, as are responses shorter than
`min_output_tokens` (timer noise dominates their rate).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog, load_catalog

__all__ = ["Stats", "Group", "Calibration", "calibrate"]

_SPEEDS = ("standard", "fast")


@dataclass(frozen=True)
class Stats:
    """The distribution of one measured figure."""

    count: int
    p10: float
    p50: float
    p90: float
    p99: float
    mean: float
    stdev: float

    @classmethod
    def of(cls, values: list[float]) -> Stats | None:
        if not values:
            return None
        ordered = sorted(values)
        return cls(len(ordered), _quantile(ordered, 0.10), _quantile(ordered, 0.50), _quantile(ordered, 0.90),
                   _quantile(ordered, 0.99), statistics.fmean(ordered),
                   statistics.stdev(ordered) if len(ordered) > 1 else 0.0)

    def to_dict(self) -> dict[str, float]:
        return {"count": self.count, "p10": round(self.p10, 6), "p50": round(self.p50, 6), "p90": round(self.p90, 6),
                "p99": round(self.p99, 6), "mean": round(self.mean, 6), "stdev": round(self.stdev, 6)}


def _quantile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Group:
    """The records of one (model, platform, speed)."""

    model: str
    platform: str
    speed: str
    known: bool
    ttft: list[float] = field(default_factory=list)
    otps: list[float] = field(default_factory=list)
    streams: int = 0
    non_streams: int = 0
    pending: list[tuple[int, float]] = field(default_factory=list)  # non-streams: (output tokens, total_s)
    first: str | None = None
    last: str | None = None

    def seen(self, ts: Any) -> None:
        if isinstance(ts, str):
            self.first = ts if self.first is None or ts < self.first else self.first
            self.last = ts if self.last is None or ts > self.last else self.last

    def to_dict(self) -> dict[str, Any]:
        ttft, otps = Stats.of(self.ttft), Stats.of(self.otps)
        return {"model": self.model, "platform": self.platform, "speed": self.speed, "known": self.known,
                "streams": self.streams, "non_streams": self.non_streams,
                "ttft_s": ttft.to_dict() if ttft else None, "output_tps": otps.to_dict() if otps else None,
                "from": self.first, "to": self.last}


@dataclass
class Calibration:
    """What `calibrate` measured: the groups, and the records it read and skipped (by reason)."""

    groups: dict[tuple[str, str, str], Group] = field(default_factory=dict)
    read: int = 0
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    catalog: Catalog | None = None

    # -- output ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "used": self.used, "skipped": dict(self.skipped.most_common()),
                "groups": [g.to_dict() for g in self._sorted()], "overlay": self.overlay()}

    def _sorted(self) -> list[Group]:
        return [self.groups[k] for k in sorted(self.groups)]

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return self.render_text()

    def render_text(self) -> str:
        lines = [f"{self.read} records read, {self.used} used"
                 + (": skipped " + ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
                    if self.skipped else "")]
        head = ("model", "platform", "speed", "figure", "n", "p10", "p50", "p90", "p99", "mean", "stdev")
        rows: list[tuple[str, ...]] = [head]
        for g in self._sorted():
            for name, values in (("ttft_s", g.ttft), ("output_tps", g.otps)):
                s = Stats.of(values)
                if s is None:
                    continue
                digits = 3 if name == "ttft_s" else 1
                rows.append((g.model, g.platform, g.speed, name, str(s.count),
                             *(f"{v:.{digits}f}" for v in (s.p10, s.p50, s.p90, s.p99, s.mean, s.stdev))))
        if len(rows) == 1:
            lines.append("no record had the timings to fit (settled records with `latency`)")
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
            for r in rows:
                lines.append("  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        ranges = sorted({(g.first, g.last) for g in self.groups.values() if g.first})
        if ranges:
            lines.append(f"from {min(r[0] for r in ranges)} to {max(r[1] for r in ranges)}; "
                         "the overlay takes each figure's p50")
        return "\n".join(lines) + "\n"

    # -- the catalog overlay --------------------------------------------------------------

    def overlay(self) -> dict[str, Any]:
        """A catalog file extending the packaged one: each measured model's `throughput` (per platform
        under `platforms.<id>.throughput`), the p50 of each figure. Models the catalog does not know are
        left out (a catalog entry needs prices)."""
        catalog = self.catalog or load_catalog()
        by_model: dict[tuple[str, str], dict[str, Group]] = {}
        for g in self.groups.values():
            if g.known:
                by_model.setdefault((g.model, g.platform), {})[g.speed] = g
        models: dict[str, Any] = {}
        for (model, platform), speeds in sorted(by_model.items()):
            entry = catalog.find(model, platform=platform)
            if entry is None:
                continue
            block = _throughput(entry, speeds)
            if block is None:
                continue
            if platform == "claude_api":
                models.setdefault(model, {})["throughput"] = block
            else:
                models.setdefault(model, {}).setdefault("platforms", {})[platform] = {
                    "model_id": entry.wire_id, "throughput": block}
        return {"providers": {"anthropic": {"models": models}}} if models else {}

    def overlay_yaml(self) -> str:
        import yaml

        head = ("# Measured throughput, written by `policy-engine calibrate` (p50 of each figure).\n"
                "# Use it as a catalog that extends the packaged one: policy_engine.load(policy, catalog=THIS_FILE)\n")
        # Timestamps stay quoted strings: YAML 1.1 would read an unquoted one as a timestamp, which is fine for
        # the catalog, but a quoted string round-trips exactly.
        return head + yaml.safe_dump(self.overlay() or {"providers": {}}, sort_keys=False)


def _throughput(entry: Any, speeds: dict[str, Group]) -> dict[str, Any] | None:
    measured: dict[str, float] = {}
    ttft: list[float] = []
    samples = 0
    first = last = None
    for speed, g in speeds.items():
        ttft += g.ttft
        if g.otps:
            measured[f"{speed}_otps"] = round(_quantile(sorted(g.otps), 0.5), 3)
        samples += len(g.otps) or len(g.ttft)
        first = g.first if first is None or (g.first and g.first < first) else first
        last = g.last if last is None or (g.last and g.last > last) else last
    if ttft:
        # The catalog has one TTFT for both speeds: the median of every stream's.
        measured["ttft_s"] = round(_quantile(sorted(ttft), 0.5), 6)
    if not measured:
        return None
    wanted = ["standard_otps", "ttft_s"] + (["fast_otps"] if entry.fast.supported else [])
    missing = [name for name in wanted if name not in measured]
    block: dict[str, Any] = dict(measured)
    # A figure left out keeps the packaged assumption (the overlay merges key by key), so the
    # block is a measurement only when every figure is.
    block["assumption"] = bool(missing)
    block["note"] = ("measured by policy-engine calibrate (p50)" if not missing else
                     f"measured by policy-engine calibrate (p50): {', '.join(sorted(measured))}; "
                     f"{', '.join(missing)} still the catalog's assumption")
    block["samples"] = samples
    if first:
        block["observed_from"] = first
        block["observed_to"] = last
    return block


def calibrate(lines: Iterable[tuple[int, str]], catalog: Catalog | None = None, *,
              min_output_tokens: int = 16) -> Calibration:
    """Fit TTFT and output speed from decision-log lines ((line number, text), as `simulate.iter_log` gives)."""
    catalog = catalog or load_catalog()
    result = Calibration(catalog=catalog)
    for _, text in lines:
        result.read += 1
        why = _add(result, catalog, text, min_output_tokens)
        if why is None:
            result.used += 1
        else:
            result.skipped[why] += 1
    # Non-streaming responses: their generation time is the total less the TTFT of the model's streams.
    for g in result.groups.values():
        if not g.pending:
            continue
        ttft = [t for other in result.groups.values()
                if (other.model, other.platform) == (g.model, g.platform) for t in other.ttft]
        if not ttft:
            result.used -= len(g.pending)
            result.skipped["non-streaming, no stream to fit the TTFT from"] += len(g.pending)
            continue
        fitted = _quantile(sorted(ttft), 0.5)
        for output, total in g.pending:
            if total - fitted <= 0:
                result.used -= 1
                result.skipped["non-streaming, total time not above the fitted TTFT"] += 1
            else:
                g.otps.append(output / (total - fitted))
        g.pending.clear()
    return result


def _add(result: Calibration, catalog: Catalog, text: str, min_output_tokens: int) -> str | None:
    """Add one line; the reason it was skipped, or None."""
    try:
        record = json.loads(text)
    except ValueError:
        return "not JSON"
    if not isinstance(record, dict) or record.get("record") != "policy_engine.decision":
        return "not a decision record"
    if record.get("event") != "settled":
        return f"{record.get('event')} (not settled)"
    latency = record.get("latency")
    decision = record.get("decision") if isinstance(record.get("decision"), dict) else {}
    if not isinstance(latency, dict):
        return "no latency"
    if len([s for s in record.get("steps") or () if isinstance(s, dict) and s.get("kind") != "compaction"]) > 1:
        return "several steps (fallback or advisor)"
    usage = record.get("usage") if isinstance(record.get("usage"), dict) else {}
    speed = usage.get("speed") if usage.get("speed") in _SPEEDS else decision.get("speed")
    model, platform = decision.get("model"), decision.get("platform") or "claude_api"
    if speed not in _SPEEDS or not isinstance(model, str) or not isinstance(platform, str):
        return "no model, platform or speed"
    output = usage.get("output_tokens")
    if type(output) is not int or output < min_output_tokens:
        return f"fewer than {min_output_tokens} output tokens"
    entry = catalog.find(model, platform=platform)
    name = entry.id if entry is not None else model
    key = (name, platform, speed)
    g = result.groups.get(key)
    if g is None:
        g = result.groups[key] = Group(name, platform, speed, entry is not None)
    g.seen(record.get("ts"))
    if latency.get("stream"):
        g.streams += 1
        total, tps = latency.get("total_s"), latency.get("output_tps")
        if _positive(tps):
            g.otps.append(float(tps))
            if _positive(total) and total - output / tps > 0:
                # The wait before generation: what `est_*_s = ttft_s + max_tokens / otps` adds. The logged
                # first-content time (`ttft_s`) is later by the first delta's generation.
                g.ttft.append(float(total) - output / float(tps))
        return None
    total = latency.get("total_s")
    if not _positive(total):
        return "no total time"
    g.non_streams += 1
    g.pending.append((output, float(total)))
    return None


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
