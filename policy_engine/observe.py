"""Observed output speed per model and speed, feeding the `throughput.*` features.

The catalog's throughput figures are assumptions (60 output tokens per second, 1.5 s to
the first token). Once real responses have been seen, latency rules should use what the
API actually delivers, so the integrations time every response and feed this observer:

* a stream gives the time to its first content token (TTFT, per model: fast mode does
  not change it) and the generation rate after it (output tokens per second, per model
  and speed);
* a non-streaming response gives only its total time; its rate is taken after
  subtracting the TTFT observed on streams (none observed: nothing subtracted, so the
  figure is a lower bound).

Each figure is an exponentially weighted moving average (`alpha` is the weight of the
newest sample); samples with fewer than `min_output_tokens` tokens or no measurable
duration are too noisy to keep. Until a figure is observed the catalog's stands.

    observer = ThroughputObserver()
    engine = policy_engine.load("policy.yaml", throughput=observer)
"""

from __future__ import annotations

import threading
from typing import Any, Final

from ._fork import renew_in_child
from ._mypyc import mypyc_attr
from .catalog import ModelEntry

__all__ = ["ThroughputObserver", "DEFAULT_STANDARD_OTPS"]

DEFAULT_STANDARD_OTPS: Final = 60.0
"""Output tokens per second assumed for a model the catalog has no figure for."""

_MIN_SECONDS: Final = 1e-3


@mypyc_attr(allow_interpreted_subclasses=True)
class ThroughputObserver:
    """Thread-safe EWMAs of output tokens per second (per model and speed) and TTFT (per model)."""

    def __init__(self, *, alpha: float = 0.2, min_output_tokens: int = 16) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.min_output_tokens = min_output_tokens
        self._lock = threading.Lock()
        self._renewal: object = renew_in_child(self._renew_lock)
        self._otps: dict[tuple[str, str], float] = {}
        self._ttft: dict[str, float] = {}
        self._samples: dict[tuple[str, str], int] = {}

    def _renew_lock(self) -> None:
        self._lock = threading.Lock()  # in a forked child: a parent thread may have held it at the fork

    def _mix(self, table: dict[Any, float], key: Any, sample: float) -> None:
        old = table.get(key)
        table[key] = sample if old is None else old + self.alpha * (sample - old)

    def observe_stream(self, model: str, speed: str, output_tokens: int, ttft_s: float | None,
                       generation_s: float | None) -> None:
        """A finished stream: seconds to its first content token, and from there to its last."""
        with self._lock:
            if ttft_s is not None and ttft_s >= 0:
                self._mix(self._ttft, model, ttft_s)
            if output_tokens >= self.min_output_tokens and generation_s is not None and generation_s >= _MIN_SECONDS:
                self._mix(self._otps, (model, speed), output_tokens / generation_s)
                self._samples[(model, speed)] = self._samples.get((model, speed), 0) + 1

    def observe_response(self, model: str, speed: str, output_tokens: int, elapsed_s: float) -> None:
        """A non-streaming response that took `elapsed_s` from sending to its complete body."""
        if output_tokens < self.min_output_tokens:
            return
        generation_s = elapsed_s - self._ttft.get(model, 0.0)
        if generation_s < _MIN_SECONDS:
            return
        with self._lock:
            self._mix(self._otps, (model, speed), output_tokens / generation_s)
            self._samples[(model, speed)] = self._samples.get((model, speed), 0) + 1

    def otps(self, model: str, speed: str) -> float | None:
        """Observed output tokens per second, or None before any usable sample."""
        return self._otps.get((model, speed))

    def ttft(self, model: str) -> float | None:
        """Observed seconds to the first token, or None before any stream."""
        return self._ttft.get(model)

    def samples(self, model: str, speed: str) -> int:
        return self._samples.get((model, speed), 0)

    def features(self, model: ModelEntry | None, max_tokens: int, name: str | None = None) -> dict[str, float]:
        """The `throughput` features: observed figures where there are some, else the catalog's."""
        key = model.id if model is not None else (name or "")
        figures = model.throughput if model is not None else None
        std = self._otps.get((key, "standard")) or (figures.standard_otps if figures else None) or DEFAULT_STANDARD_OTPS
        ttft = self._ttft.get(key)
        if ttft is None:
            ttft = (figures.ttft_s if figures else None) or 0.0
        result = {"standard_otps": std, "ttft_s": ttft, "est_standard_s": ttft + max_tokens / std}
        if model is not None and model.fast.supported:
            fast = self._otps.get((key, "fast")) or (figures.fast_otps if figures else None)
            if fast:
                result["fast_otps"] = fast
                result["est_fast_s"] = ttft + max_tokens / fast
        return result
