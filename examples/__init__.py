"""Runnable examples of zae-limiter (run from the repository root: `python -m examples.<name>`)."""
