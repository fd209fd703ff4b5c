"""Helpers for testing policies and integrations offline: the embedded-test runner and the local API emulator."""
