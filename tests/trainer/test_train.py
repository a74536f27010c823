"""Training policies: how a network is validated, the depths it trains at, and what training
says about the labels shown before they are final."""

from __future__ import annotations

import numpy as np

from trainer.config import from_dict
from trainer.fit import sample_horizons
from trainer.train import FOLDS_BELOW, depth_summary, validation_plan


def test_few_sessions_are_validated_on_folds_many_on_a_split():
    auto = from_dict({})
    assert validation_plan(20, auto) == "folds"
    assert validation_plan(FOLDS_BELOW, auto) == "split"
    assert validation_plan(20, from_dict({"train": {"validation": "split"}})) == "split"
    assert validation_plan(500, from_dict({"train": {"validation": "folds"}})) == "folds"
    assert validation_plan(1, from_dict({"train": {"validation": "folds"}})) == "split"


def test_every_depth_is_trained_and_the_final_one_most():
    k = sample_horizons((200, 50), 4, np.random.default_rng(0)).numpy()
    share = np.bincount(k.ravel(), minlength=5) / k.size
    assert set(np.unique(k)) == {0, 1, 2, 3, 4}
    assert 0.45 < share[4] < 0.55 and all(0.1 < s < 0.15 for s in share[:4])


def test_training_says_in_one_line_which_depths_will_abstain():
    depths = [{"k": 0, "top1_accuracy": 0.41, "top1_macro_f1": 0.3, "coverage": 0.0, "feasible": False},
              {"k": 1, "top1_accuracy": 0.52, "top1_macro_f1": 0.4, "coverage": 0.0, "feasible": False},
              {"k": 2, "top1_accuracy": 0.61, "top1_macro_f1": 0.5, "coverage": 0.2, "feasible": True}]
    lines = depth_summary(depths, 0.95)
    assert "k=0: top-1 acc 0.410, macro-F1 0.300, coverage 0.000" in lines[0]
    assert len(lines) == 2 and "k = 0, 1" in lines[1] and "precision 0.95" in lines[1]
    assert len(depth_summary(depths[2:], 0.95)) == 1
