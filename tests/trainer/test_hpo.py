"""k-fold HPO grouped by session: it runs, refits on train+val, and calibrates on out-of-fold
predictions (the test split is scored once, by the final model)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import TINY, make_log
from trainer.config import from_dict
from trainer.train import train


def test_hpo_searches_refits_and_records_its_choice(tmp_path):
    data = make_log(tmp_path, 60, 31)
    cfg = from_dict({**TINY, "model": {**TINY["model"], "arch": "bilstm"}, "train": {**TINY["train"], "hpo": {"enabled": True, "k_folds": 2, "n_trials": 2,
                                                                 "epochs_per_fold": 2}}})
    metrics = train(data, tmp_path / "m", cfg, progress=False, echo=lambda *_: None)
    hpo = metrics["hpo"]
    assert hpo["trials"] == 2 and hpo["k_folds"] == 2 and len(hpo["fold_scores"]) == 2
    assert 0.0 <= hpo["cv_macro_f1"] <= 1.0 and hpo["epochs"] >= 1
    assert {"hidden_dim", "lr", "dropout"} <= set(hpo["params"])
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert manifest["model_args"]["hidden_dim"] == hpo["params"]["hidden_dim"]
    assert "test" in saved and 0.0 < manifest["calibration"]["temperature"] < 20


def test_hpo_with_auto_arch_says_to_pick_one(tmp_path):
    from trainer.errors import ConfigError
    data = make_log(tmp_path, 20, 32)
    cfg = from_dict({**TINY, "train": {**TINY["train"], "hpo": {"enabled": True}}})
    with pytest.raises(ConfigError, match="set model.arch"):
        train(data, tmp_path / "m", cfg, progress=False, echo=lambda *_: None)
