"""The tagger's exception tree. Every error a user can cause is one of these.

    TaggerError
     ├── ConfigError        a config file or value is wrong (names the key): the YAML file,
     │                      a model's arguments (``model.*``, also when a checkpoint's
     │                      ``model_args`` are rebuilt), generator and CLI values
     ├── DataError          input data is wrong (names file, line and field); also a
     │   (ValueError)       ValueError, as a bad timestamp from ``parse_timestamp`` always was
     ├── ArtifactError      a model folder is missing, corrupt or incompatible (loading wraps
     │                      the ConfigError of model_args that do not fit in one of these)
     └── StreamError        the live service cannot do what was asked (see stream.errors)

Third-party exceptions are translated at the boundary with ``raise ... from exc``. What is
left as a builtin is a caller's misuse of a function (``ValueError`` for an argument out of
range, as in ``trainer.metrics``) or an invariant of the tagger's own code: neither is
something a user's input or files can cause.
"""

from __future__ import annotations


class TaggerError(Exception):
    """Base of every error the tagger raises on purpose."""


class ConfigError(TaggerError):
    """A configuration file or value is invalid."""


class DataError(TaggerError, ValueError):
    """Input data is malformed. Carries where: file, line (1-based, header = 1) and field."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.reason = message


class ArtifactError(TaggerError):
    """A model artifact is missing, corrupt or incompatible with this code."""
