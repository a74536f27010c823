from __future__ import annotations

import pytest

from tests.helpers import make_log, train_tiny


@pytest.fixture(scope="session")
def gen_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.fixture(scope="session")
def tiny_model(gen_dir):
    """A small BiLSTM (lookahead 3) trained on generated logs, shared by the stream tests."""
    return train_tiny(make_log(gen_dir, 150, 11), gen_dir / "model_a")


@pytest.fixture(scope="session")
def tiny_model_b(gen_dir):
    """A second model with different weights and lookahead, for hot-swap tests."""
    return train_tiny(make_log(gen_dir, 150, 12), gen_dir / "model_b",
                      model={"lookahead": 2, "hidden_dim": 48})


@pytest.fixture(scope="session")
def heldout_log(gen_dir):
    return make_log(gen_dir, 40, 99, "heldout.csv")
