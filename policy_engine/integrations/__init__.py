"""Runtime integrations: the anthropic SDK middleware (`.anthropic`) and httpx transports (`.httpx`).

Each is imported on its own, so using one never requires the other's package.
"""
