"""One model config: the YAML ``model:`` section and the checkpoint's arguments."""

from __future__ import annotations

import logging

import pytest

from trainer.config import ModelConfig, from_dict, load_config
from trainer.errors import ConfigError

SPEC = {"n_events": 40, "n_tokens": 60, "cat_sizes": [4, 9], "num_names": ["a", "b", "c"], "text_dim": 0,
        "image_size": 0, "n_lex": 77}


def test_the_model_section_sized_for_the_data_is_what_the_checkpoint_stores():
    cfg = from_dict({"model": {"arch": "bilstm", "hidden_dim": 32, "crf_head": True}})
    args = cfg.model.sized(SPEC, 6)
    assert (args.n_labels, args.n_events, args.cat_sizes, args.n_nums, args.n_lex) == (6, 40, (4, 9), 3, 77)
    assert args.hidden_dim == 32 and args.crf_head
    assert ModelConfig.from_args(args.to_args()) == args
    # the config file never shows what the data fixes
    assert "n_labels" not in cfg.to_dict()["model"] and cfg.replace(model={"dropout": 0.3}).model.dropout == 0.3


def test_arch_crf_reads_crf_future_later_events():
    args = from_dict({"model": {"arch": "crf", "crf_future": 1, "wide_future": 2}}).model.sized(SPEC, 3)
    assert args.wide_future == 1


def test_a_network_reads_at_most_network_lookahead_later_events_and_a_crf_the_whole_lookahead():
    def reads(**model):
        return from_dict({"model": model}).model.sized(SPEC, 3).lookahead
    assert reads(arch="bilstm", lookahead=6, network_lookahead=4) == 4
    assert reads(arch="crf", lookahead=6, network_lookahead=4) == 6
    assert reads(arch="bilstm", lookahead=3, network_lookahead=4) == 3       # never past the lookahead
    assert reads(arch="bilstm", lookahead=None, network_lookahead=4) == 4
    assert reads(arch="bilstm", lookahead=6, network_lookahead=None) == 6
    # the defaults: finals after 16 later events, a network reading 4 of them
    assert reads(arch="bilstm") == 4 and reads(arch="crf") == 16
    with pytest.raises(ConfigError, match="model.network_lookahead"):
        ModelConfig(network_lookahead=-1)


def test_a_causal_network_candidate_reads_no_later_event():
    """``bilstm_causal`` in ``auto_archs``: the BiLSTM with ``network_lookahead: 0``, sized to
    read no later event while the others keep the lookahead; its trained args name it back."""
    import dataclasses

    from trainer.config import candidate_of
    cfg = from_dict({"model": {"auto_archs": ["bilstm", "crf", "bilstm_causal"]}}).model
    assert cfg.candidate("bilstm_causal") == {"arch": "bilstm", "network_lookahead": 0}
    member = dataclasses.replace(cfg, **cfg.candidate("bilstm_causal")).sized(SPEC, 3)
    assert member.lookahead == 0 and cfg.sized(SPEC, 3).lookahead == 4
    assert candidate_of(member.to_args()) == "bilstm_causal"
    assert candidate_of(dataclasses.replace(cfg, arch="bilstm").sized(SPEC, 3).to_args()) == "bilstm"
    for bad in ("crf_causal", "lstm_causal"):
        with pytest.raises(ConfigError, match=f"{bad!r} is not one of"):
            from_dict({"model": {"auto_archs": ["bilstm", bad]}})


def test_auto_crf_sticky_keeps_the_crfs_own_transitions_among_its_choices():
    assert from_dict({"train": {"auto_crf_sticky": [0, 1.5, 3]}}).train.auto_crf_sticky == (0.0, 1.5, 3.0)
    for bad in ([1.0, 2.0], [0.0, -1.0], [0.0, 50.0]):
        with pytest.raises(ConfigError, match="train.auto_crf_sticky"):
            from_dict({"train": {"auto_crf_sticky": bad}})


def test_auto_bags_must_not_be_negative():
    assert from_dict({"train": {"auto_bags": 16}}).train.auto_bags == 16
    with pytest.raises(ConfigError, match="train.auto_bags"):
        from_dict({"train": {"auto_bags": -1}})


def test_the_time_of_day_is_a_lexical_feature_and_the_hour_comes_with_the_part_of_the_day():
    assert from_dict({"data": {"time_of_day": True, "time_of_day_hour": True}}).data.time_of_day_hour
    with pytest.raises(ConfigError, match="data.time_of_day: .*data.lexical: true"):
        from_dict({"data": {"time_of_day": True, "lexical": False}})
    with pytest.raises(ConfigError, match="data.time_of_day_hour: .*data.time_of_day: true"):
        from_dict({"data": {"time_of_day": False, "time_of_day_hour": True}})
    assert from_dict({"data": {"time_of_day": "auto", "time_of_day_hour": True}}).data.time_of_day == "auto"
    # auto, the default, is off without the lexical features, not an error; asking for the hour is
    assert from_dict({"data": {"lexical": False}}).data.time_of_day == "auto"
    assert from_dict({"data": {"feature_set": "group_id_only"}}).data.time_of_day == "auto"
    with pytest.raises(ConfigError, match="data.time_of_day_hour: .*data.lexical: true"):
        from_dict({"data": {"time_of_day_hour": True, "lexical": False}})
    with pytest.raises(ConfigError, match=r"data.time_of_day: 'sometimes' is not one of \[False, True, 'auto'\]"):
        from_dict({"data": {"time_of_day": "sometimes"}})
    # the clock it is read on: local (the default), UTC, or an IANA zone name
    assert from_dict({}).data.timezone == "local"
    assert from_dict({"data": {"timezone": "Europe/Berlin"}}).data.timezone == "Europe/Berlin"
    for bad in ("Mars/Olympus", "Europe", "../etc/passwd", "", "utc"):
        with pytest.raises(ConfigError, match="data.timezone: unknown time zone"):
            from_dict({"data": {"timezone": bad}})


def test_what_the_data_fixes_is_not_a_config_key():
    with pytest.raises(ConfigError, match="'model.n_labels'"):
        from_dict({"model": {"n_labels": 3}})


def test_the_checkpoint_arguments_are_validated_too():
    args = from_dict({"model": {"arch": "transformer"}}).model.sized(SPEC, 3).to_args()
    with pytest.raises(ConfigError, match="nhead"):
        ModelConfig.from_args({**args, "nhead": 5})
    with pytest.raises(ConfigError, match="model.fusion"):
        ModelConfig(fusion="average")
    with pytest.raises(ConfigError, match="model.lookahead"):
        ModelConfig(lookahead=-1)


def test_the_old_name_of_the_crf_head_still_works_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  arch: bilstm\n  crf: true\n")
    with caplog.at_level(logging.WARNING, logger="trainer.config"):
        cfg = load_config(path)
    assert cfg.model.crf_head
    assert [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()] == [
        "config: model.crf is deprecated, use model.crf_head (the CRF output layer; model.arch: crf "
        "is the CRFsuite CRF)"]
    with pytest.raises(ConfigError, match="crf_head"):
        from_dict({"model": {"crf": True, "crf_head": False}})
