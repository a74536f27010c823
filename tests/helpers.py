"""Factories shared by the test packages: generated logs, small trained models, a root that
serves one."""

from __future__ import annotations

from pathlib import Path

from trainer.artifacts import promote
from trainer.config import ModelConfig, from_dict
from trainer.generate import generate
from trainer.train import train

# ``auto`` without the default's fourth candidate (``bilstm_causal``, one more network to
# train in every test that trains): the session fixtures that the worker, restore and chaos
# tests serve train the default's candidates (``DEFAULT_ARCHS``), as a user's model would
TINY = {"model": {"hidden_dim": 32, "emb_event_dim": 32, "num_layers": 1, "lookahead": 3, "context": 32,
                  "auto_archs": ["bilstm", "crf", "crf_ahead"]},
        "train": {"epochs": 6, "patience": 3, "batch_size": 16}}
DEFAULT_ARCHS = {"auto_archs": list(ModelConfig().auto_archs)}


def make_log(folder: Path, sessions: int, seed: int, name: str | None = None) -> Path:
    path = Path(folder) / (name or f"gen_{sessions}_{seed}.csv")
    if not path.exists():
        generate(sessions, seed, path)
    return path


def train_tiny(data: Path, out: Path, **overrides) -> Path:
    cfg = from_dict(TINY)
    if overrides:
        cfg = cfg.replace(**overrides)
    train(data, out, cfg, progress=False, echo=lambda *_: None)
    return out


def serving_root(tmp_path: Path, model_dir: Path) -> Path:
    """An artifacts root under ``tmp_path`` whose ``current`` pointer serves ``model_dir``
    (what ``TAGGER_ARTIFACTS`` points a worker at)."""
    root = Path(tmp_path) / "artifacts"
    promote(model_dir, root)
    return root.resolve()
