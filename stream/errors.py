"""Errors of the live service: one tree, rooted at ``StreamError``.

    trainer.errors.TaggerError           every error the tagger raises on purpose
     ├── trainer.errors.ConfigError       a setting is wrong (re-exported here: TAGGER_* values)
     └── StreamError                      the live service cannot do what was asked
          ├── StackError                  the embedded broker or Redis could not be started,
          │                               reached or stopped; a worker did not become ready
          ├── InvalidEvent                an input message breaks the event contract (carries
          │                               the DLQ reason; stream.records)
          ├── LabelContractError          a label record would break the output contract
          │                               (also a ValueError, as before)
          ├── ModelNotServable            a model cannot serve live: a baseline, or unbounded
          │                               lookahead (also a ValueError, as before)
          └── StoreUnavailable            Redis cannot be reached (stream.session_store)

``StreamError`` derives from ``TaggerError`` so the command line prints every one of them as
one ``error:`` line with exit 2. Errors of the libraries underneath (aiokafka, redis-py,
jsonschema) are translated where they are caught, with ``raise ... from exc``.
"""

from __future__ import annotations

from trainer.errors import ConfigError, TaggerError

__all__ = ["ConfigError", "StreamError", "StackError", "LabelContractError", "ModelNotServable"]


class StreamError(TaggerError):
    """The live service failed in a way the caller must handle."""


class StackError(StreamError):
    """The embedded stack (tansu broker, Redis) or a worker process failed to start, answer or stop."""


class LabelContractError(StreamError, ValueError):
    """A label record breaks ``label.schema.json`` (names the field)."""


class ModelNotServable(StreamError, ValueError):
    """The model cannot label live events (a baseline, or unbounded lookahead)."""
