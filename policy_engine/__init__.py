"""policy_engine: decide, per Messages API request, whether to run it in fast mode."""

from __future__ import annotations

__version__ = "0.1.0"
