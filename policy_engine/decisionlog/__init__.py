"""Decision logs: one JSON record per request, written off the request path, replayable by `simulate` and `diff`.

A record holds every feature the policy language declares, so any later policy can be decided
again from it, and never a byte of prompt text (see `_record` for what it holds and `_log` for
how it is written).
"""

from __future__ import annotations

from ._log import DecisionLog
from ._record import RECORD_KIND, RECORD_VERSION, DecisionRecord, Observed
from ._sinks import JsonlFile, LoggerSink, OtelLogSink, Sink

__all__ = ["RECORD_KIND", "RECORD_VERSION", "DecisionLog", "DecisionRecord", "JsonlFile", "LoggerSink", "Observed",
           "OtelLogSink", "Sink"]
