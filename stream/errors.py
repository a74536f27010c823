"""Errors of the live service. The root is ``trainer.errors.StreamError``; see that module's tree.

    StreamError
     └── StackError     the embedded broker or Redis could not be started, reached or stopped
"""

from __future__ import annotations

from trainer.errors import ConfigError, StreamError

__all__ = ["ConfigError", "StreamError", "StackError"]


class StackError(StreamError):
    """The embedded stack (tansu broker, Redis) failed to start, answer or stop."""
