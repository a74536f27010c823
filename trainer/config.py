"""Typed, frozen configuration for data, model and training, loaded from one YAML file.

Every field has a default, so an empty file (or a file with only a ``data:`` section, the
DESIGN.md contract) is valid. An unknown key is an error that names it with its full path
(``model.hiden_dim``), and a value of the wrong type names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from trainer.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataConfig:
    # The contract part (DESIGN.md): optional columns the model uses.
    cat_features: tuple[str, ...] = ()
    num_features: tuple[str, ...] = ()
    text_features: tuple[str, ...] = ()
    image_col: Optional[str] = None
    # Embed event names with the offline text model too (the seed's "event names as text").
    event_name_text: bool = False
    # Tokens/event names seen fewer times than this in training map to UNK.
    min_freq: int = 2
    # Use these well-known columns automatically when the file has them.
    auto_columns: tuple[str, ...] = ("group_id", "target_app", "file_extension")
    test_size: float = 0.10
    val_size: float = 0.10
    # Long sessions are cut into chunks of this many events for training (with overlap).
    chunk_len: int = 128
    image_size: int = 32
    # Screenshot encoder from a local file instead of the SmallCNN trained from scratch: a
    # TorchScript module or a SmallCNN state dict (see trainer.model.ImageBackbone). Never
    # downloaded; the artifact keeps a copy, so serving does not need the original path.
    image_backbone: Optional[str] = None
    freeze_backbone: bool = True
    # "group_id_only" keeps only the group_id column (as the event identity) and drops every
    # other feature: it measures how much the UI element / window grouping alone predicts.
    feature_set: Literal["full", "group_id_only"] = "full"
    # Sparse lexical features (words, word bigrams, character 4-grams of the event name and
    # the text columns, categorical values), fit on training sessions: a vocabulary of at
    # most `lexical_max` features seen `min_freq` times or more.
    lexical: bool = True
    lexical_max: int = 30000
    # character 4-grams of longer words among the lexical features (words and bigrams always);
    # on is also what encoders saved before the setting read as (docs/ablation.md: without
    # them training is ~2x faster, but placelab loses 0.007)
    char_ngrams: bool = True
    # where an event's 4-grams go among its lexical features: last, after the words and
    # bigrams of the name and every text column, so that MAX_LEX cuts them first (true); or
    # after each string's own words (false: what encoders fit before 2026-12-05 did, and
    # what they read as, so that a model is always served the features it was trained on)
    lex_chars_last: bool = True
    # the words and bigrams of each text column in a namespace of the column's own
    # (``text:w=budget``), apart from the event name's (``w=budget``): a word in both gets a
    # weight in each, as the CRF reference's name tokens and text tokens do. On a harder
    # window-focus profile it lifted the CRF member's first labels from 0.372 to 0.389
    # macro-F1 (docs/ablation.md). Off is what encoders saved before the setting read as.
    lex_by_column: bool = True
    # the time since the session's first event as a feature
    elapsed_time: bool = True
    # the part of the day an event happened in (four-hour parts: 0-3 h, 4-7 h, ...) among its
    # lexical features, and with time_of_day_hour the hour too: meals in a home, the morning
    # inbox. Read on the clock of data.timezone (the wall clock the timestamp was written
    # in, by default). true: every model reads it. On the real home logs it lifts macro-F1 by
    # 0.02-0.03, but on the window-focus profile, whose activities keep no hours, it lets 16
    # training days tie activities to the hours they happened to be worked (docs/ablation.md).
    # auto: only a candidate of model.arch auto reads it, ``crf_clock``, the causal CRF with
    # the part of the day. It is weighed beside the other candidates when, alone on held-out
    # sessions, it beats the causal crf without the clock; otherwise it gets no weight
    # (``train.clock_verdict``), so a log whose steps keep no hours is labelled as without it.
    # Every other model, and every model of a single arch, ignores it, and with the clock left
    # out the model is bit for bit the one trained with the setting off. Off (false) is what
    # encoders saved before the setting read as.
    time_of_day: Literal[False, True, "auto"] = "auto"   # auto: default since 2026-12-06
    time_of_day_hour: bool = False
    # the clock the time of day is read on: "local" (the default), the wall clock each
    # timestamp was written in: its own UTC offset (``09:00+05:00`` is 9 h), as written when
    # it has none, UTC for ``Z`` and epoch milliseconds; or a time zone name ("UTC",
    # "Europe/Berlin": an IANA name, summer time included), the instant on that zone's clock,
    # for agents that send UTC. Encoders saved before the setting read the UTC clock ("UTC").
    timezone: str = "local"
    # Clip standardised numbers to +-num_clip (null: no clipping), as the CRF reference clips
    # at 5, so that one outlier (an hours-long focus duration, z ~ 26) cannot outweigh an
    # event's other features. Off by default: at 5 it gained nothing under 5-fold CV
    # (docs/ablation.md). Off is also what encoders saved before the setting read as.
    num_clip: Optional[float] = None


# Fields of ``ModelConfig`` that the data fixes (vocabulary sizes, columns, the screenshot
# backbone named in ``data:``): training fills them in; a config file may not set them.
_FROM_DATA = {"from_data": True}
# Archs a checkpoint's ``Tagger`` can be: the networks and the CRFsuite CRF (``auto`` picks
# among these; ``logreg`` is the classic baseline, never a network).
NETWORK_ARCHS = ("bilstm", "transformer", "tcn", "bilstm_attn", "ht_transformer", "crf")
# What ``model.auto_archs`` may name: those, and ``crf_ahead``, a second CRF whose state
# features also read the next ``model.crf_ahead`` events, or ``crf_aheadN``, one that reads the
# next N, or ``<network>_causal`` (``bilstm_causal``, ...), that network reading no later
# event (``network_lookahead: 0``), trained for the label on arrival alone
# (``ModelConfig.candidate``)
AUTO_CANDIDATES = NETWORK_ARCHS + ("crf_ahead", "crf_aheadN", "<network>_causal")
_CRF_AHEAD_N = re.compile(r"crf_ahead([1-9][0-9]*)")
_CAUSAL = re.compile("(" + "|".join(a for a in NETWORK_ARCHS if a != "crf") + ")_causal")


# data.time_of_day auto: the candidate auto adds beside auto_archs, the causal CRF reading the
# time of day (the only model that reads it)
CLOCK_CANDIDATE = "crf_clock"


def arrival_only(candidate: str) -> bool:
    """Whether an ``auto_archs`` candidate is there for the label on arrival alone
    (``<network>_causal``): ``auto`` weighs it at k = 0 only."""
    return bool(_CAUSAL.fullmatch(candidate))


def candidate_of(member_args: Mapping[str, Any]) -> str:
    """The ``auto_archs`` name of a trained member (its ``model_args``): what
    ``ModelConfig.candidate`` made it from."""
    if member_args.get("read_clock"):
        return CLOCK_CANDIDATE
    future = member_args.get("crf_future") or 0
    if member_args.get("arch") != "crf" and member_args.get("network_lookahead") == 0:
        return f"{member_args.get('arch')}_causal"
    if member_args.get("arch") != "crf" or not future:
        return str(member_args.get("arch"))
    return "crf_ahead" if future == member_args.get("crf_ahead", 1) else f"crf_ahead{future}"


@dataclass(frozen=True)
class ModelConfig:
    """The network: the YAML ``model:`` section and, with the sizes the data fixes filled in
    by training (``sized``), the constructor arguments a checkpoint stores as ``model_args``;
    ``Tagger(ModelConfig.from_args(manifest["model_args"]))`` rebuilds the network (nanoGPT's
    ``GPTConfig``). Validated whichever way it is made."""

    # crf: a linear-chain CRF (CRFsuite) over the event and wide_past events before it,
    # served live like the networks (filtering on arrival, fixed-lag smoothing for finals);
    # logreg: the per-event classic baseline (offline only)
    # auto: each of auto_archs is validated (on session folds for small logs) and the one
    # whose held-out labels score best is trained; the table goes into the artifact's metrics
    arch: Literal["auto", "bilstm", "transformer", "tcn", "bilstm_attn", "ht_transformer", "crf",
                  "logreg"] = "auto"
    # crf_ahead: default since 2026-12-05; bilstm_causal (weighed for the labels on arrival
    # only) since 2026-12-07: fewer revisions on gen (edit overhead 0.108 -> 0.097 and 0.109 ->
    # 0.102 on two fold assignments), first labels up on gen, wf_hard and kasteren, down a
    # little on placelab, offline labels the same; it costs one more network to train, and about
    # a quarter more tagging CPU per event where auto keeps it (docs/ablation.md, thirtieth session)
    auto_archs: tuple[str, ...] = ("bilstm", "crf", "crf_ahead", "bilstm_causal")
    # late: one encoder and classifier per modality, logits summed
    fusion: Literal["concat", "gated", "sum", "cross_attention", "late"] = "concat"
    # Each event sees every earlier event (within `context`) and at most `lookahead` later
    # ones, in training and live alike: a live label is final after `lookahead` more events.
    # null means unbounded (offline-only, full bidirectional).
    # The default, 16 with networks reading 4 of them: in auto's mixture the CRF members
    # smooth over 16 later events, which on logs of long activity runs reaches what
    # whole-session smoothing reaches (docs/ablation.md, twenty-eighth session); a network
    # alone (arch bilstm, ...) is final after its 4. For fully bidirectional offline
    # networks set both to null.
    lookahead: Optional[int] = 16
    # A network (any arch but crf) reads at most this many later events, even when the
    # lookahead is longer; null: the whole lookahead. Beyond it a network's label is final
    # early, and in auto's mixture the CRF members alone smooth over the rest of the
    # lookahead (a CRF's fixed-lag smoothing gains from later events where a network
    # trained at every depth up to L gains less, docs/ablation.md)
    network_lookahead: Optional[int] = 4
    context: int = 64
    emb_event_dim: int = 64
    emb_token_dim: int = 32
    emb_cat_dim: int = 16
    num_proj_dim: int = 16
    text_proj_dim: int = 32
    image_proj_dim: int = 32
    hidden_dim: int = 64
    num_layers: int = 1
    nhead: int = 4
    ff_dim: int = 256
    dropout: float = 0.2
    # A linear-chain CRF output layer on a network (not arch crf, which is a CRF alone):
    # forward messages over the past, backward messages over half the lookahead (the encoder
    # gets the other half), so the lookahead bound holds. Was `crf` (still read, with a warning).
    crf_head: bool = False
    # ht_transformer: a history token after every this many events
    history_every: int = 8
    # lexical features (data.lexical): bag size into the event vector, and the wide path,
    # linear label scores of the features of events t-wide_past .. t+wide_future (capped by
    # the lookahead) added to the logits, a CRF-like linear model beside the network
    lex_dim: int = 64
    # arch crf: CRFsuite's L1 and L2 penalties; later events its state features read (0:
    # causal, labels on arrival are exact forward filtering)
    crf_c1: float = 0.05
    crf_c2: float = 0.05
    crf_future: int = 0
    # auto's candidate crf_ahead: a CRF whose state features read this many later events too.
    # Beside the causal crf, auto can weigh it for the labels that have seen them (finals)
    # and leave the arrival labels to the causal one
    crf_ahead: int = 1
    # arch crf: read the character 4-grams of the lexical features (data.char_ngrams too). Off
    # (the default) it gets zero weight for them and reads categorical values, words and
    # bigrams: in 5-fold CV better on wf, kasteren and gen, within 0.001 elsewhere, and
    # fit faster (docs/ablation.md)
    crf_char_ngrams: bool = False
    wide: bool = True
    wide_past: int = 2
    wide_future: int = 2
    # What the data fixes (training fills these in; see ``sized``).
    n_labels: int = field(default=0, metadata=_FROM_DATA)
    n_events: int = field(default=0, metadata=_FROM_DATA)
    n_tokens: int = field(default=0, metadata=_FROM_DATA)
    cat_sizes: tuple[int, ...] = field(default=(), metadata=_FROM_DATA)
    n_nums: int = field(default=0, metadata=_FROM_DATA)
    text_dim: int = field(default=0, metadata=_FROM_DATA)
    image_size: int = field(default=0, metadata=_FROM_DATA)
    n_lex: int = field(default=0, metadata=_FROM_DATA)
    # screenshots: a local TorchScript or SmallCNN state-dict file (never downloaded; from
    # data.image_backbone); inside an artifact, the file name of the copy beside the weights
    image_backbone: Optional[str] = field(default=None, metadata=_FROM_DATA)
    freeze_backbone: bool = field(default=True, metadata=_FROM_DATA)
    # data.time_of_day auto: the lexical ids of the time of day, which this model does not read
    # (masked; empty for the candidate crf_clock, which reads them: read_clock)
    lex_ignore: tuple[int, ...] = field(default=(), metadata=_FROM_DATA)
    read_clock: bool = field(default=False, metadata=_FROM_DATA)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            tp = _MODEL_HINTS[f.name]
            if typing.get_origin(tp) is Literal and getattr(self, f.name) not in typing.get_args(tp):
                raise ConfigError(f"model.{f.name}: {getattr(self, f.name)!r} is not one of "
                                  f"{list(typing.get_args(tp))}")
        if self.lookahead is not None and self.lookahead < 0:
            raise ConfigError("model.lookahead: must be >= 0 or null")
        if self.network_lookahead is not None and self.network_lookahead < 0:
            raise ConfigError("model.network_lookahead: must be >= 0 or null")
        for a in self.auto_archs:
            if a not in NETWORK_ARCHS + ("crf_ahead",) and not _CRF_AHEAD_N.fullmatch(a) and not _CAUSAL.fullmatch(a):
                raise ConfigError(f"model.auto_archs: {a!r} is not one of {list(AUTO_CANDIDATES)}")
        if not self.auto_archs:
            raise ConfigError("model.auto_archs: name at least one architecture")
        if self.context < 1:
            raise ConfigError("model.context: must be >= 1")
        if self.arch in ("transformer", "ht_transformer") and self.hidden_dim % self.nhead:
            raise ConfigError(f"model.hidden_dim ({self.hidden_dim}) must be divisible by model.nhead "
                              f"({self.nhead})")
        if self.history_every < 1:
            raise ConfigError("model.history_every: must be >= 1")
        if self.crf_ahead < 1:
            raise ConfigError("model.crf_ahead: must be >= 1 (later events the crf_ahead candidate reads)")

    def candidate(self, name: str) -> dict[str, Any]:
        """The ``model:`` overrides that make one of ``auto_archs`` (``AUTO_CANDIDATES``)."""
        if name == "crf_ahead":
            return {"arch": "crf", "crf_future": self.crf_ahead}
        if name == CLOCK_CANDIDATE:        # model_args(..., read_clock=True) lets it read the clock
            return {"arch": "crf", "crf_future": 0}
        if m := _CRF_AHEAD_N.fullmatch(name):
            return {"arch": "crf", "crf_future": int(m.group(1))}
        if m := _CAUSAL.fullmatch(name):
            return {"arch": m.group(1), "network_lookahead": 0}
        return {"arch": name}

    @property
    def network_horizon(self) -> Optional[int]:
        """The later events a network of this config reads: the lookahead, capped at
        ``network_lookahead``."""
        if self.network_lookahead is None:
            return self.lookahead
        return self.network_lookahead if self.lookahead is None else min(self.lookahead, self.network_lookahead)

    def sized(self, spec: Mapping[str, Any], n_labels: int, *, image_backbone: Optional[str] = None,
              freeze_backbone: bool = True, read_clock: bool = False) -> "ModelConfig":
        """This config with what the data fixes filled in: the label count and a fitted
        ``FeatureEncoder.spec()``. For arch crf, ``wide_future`` is ``crf_future`` (the later
        events its state features read); for a network, ``lookahead`` is ``network_horizon``.
        The spec's ``clock_lex`` (data.time_of_day auto) are ignored unless ``read_clock``."""
        return dataclasses.replace(
            self, n_labels=n_labels, n_events=spec["n_events"], n_tokens=spec["n_tokens"],
            cat_sizes=tuple(spec["cat_sizes"]), n_nums=len(spec["num_names"]), text_dim=spec["text_dim"],
            image_size=spec["image_size"], n_lex=spec.get("n_lex", 0),
            image_backbone=image_backbone if spec["image_size"] else None, freeze_backbone=freeze_backbone,
            wide_future=self.crf_future if self.arch == "crf" else self.wide_future,
            lookahead=self.lookahead if self.arch == "crf" else self.network_horizon,
            lex_ignore=() if read_clock else tuple(spec.get("clock_lex", ())), read_clock=read_clock)

    def to_args(self) -> dict[str, Any]:
        """The checkpoint's ``model_args``: every field, JSON-ready."""
        return to_plain(self, with_data=True)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ModelConfig":
        """Rebuild from a checkpoint's ``model_args``, including those older versions wrote:
        ``crf`` for ``crf_head``, and fewer keys (a key added later defaults to what the
        network was before it; hidden_dim and num_layers to the old ``ModelArgs`` defaults).
        A key this version does not know is an error that names it."""
        values = dict(args)
        if "crf" in values:
            values.setdefault("crf_head", values.pop("crf"))
        for key in ("n_labels", "n_events", "n_tokens"):
            if key not in values:
                raise ConfigError(f"model_args: {key!r} is missing")
        for key, value in _ARGS_DEFAULTS.items():
            values.setdefault(key, value)
        return build_section(cls, values, "model_args")


_MODEL_HINTS = typing.get_type_hints(ModelConfig)
# Keys whose default in the former ``ModelArgs`` (the checkpoint's arguments before this class
# served both) differed from the config section's; every artifact it wrote stores them, so
# this only keeps hand-made dicts meaning what they meant.
_ARGS_DEFAULTS = {"hidden_dim": 128, "num_layers": 2}


@dataclass(frozen=True)
class HPOConfig:
    enabled: bool = False
    k_folds: int = 3
    n_trials: int = 10
    epochs_per_fold: int = 8
    timeout_s: Optional[float] = None


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 1e-4
    epochs: int = 30
    patience: int = 4
    batch_size: int = 64
    min_steps_per_epoch: int = 8
    grad_clip: float = 1.0
    loss: Literal["ce", "focal"] = "ce"
    class_weights: bool = True
    # Oversample training chunks that hold rare steps (weight: mean inverse-sqrt frequency
    # of their labels), drawn with replacement each epoch.
    resample: bool = False
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    # Feature dropout while training the networks: each lexical feature id of an event is
    # dropped, and its template id read as unseen, with this probability, so that the
    # network learns to label events from the rest of their features (titles of a new day)
    feature_dropout: float = 0.0
    # Abstain unless the calibrated confidence clears a threshold chosen on validation so
    # that precision reaches this target (with `guarantee_confidence` via a binomial bound).
    precision_target: float = 0.95
    guarantee_confidence: float = 0.9
    # What the guarantee is over: "sessions" (the default), new sessions like the held-out
    # ones; the bound widens with how much precision varies between held-out sessions (a
    # clustered Clopper-Pearson bound, trainer.metrics.clustered_lower), since a day's events
    # are right or wrong together. "events": held-out events as independent draws (the
    # binomial bound; tighter, and on the window-focus profile the test days' precision fell
    # below the target in 4 of 6 cross-validations).
    guarantee_over: Literal["sessions", "events"] = "sessions"
    # Also fit a temperature and threshold per visible-future depth k = 0..lookahead on the
    # validation sessions replayed through Tagger.step (what the live worker emits).
    prefix_calibration: bool = True
    # Train every position at every visible-future depth k = 0..lookahead (k = lookahead half
    # the time): the label the worker shows on arrival is then a trained causal prediction.
    depth_training: bool = True
    # Early stopping and calibration: "split" (data.val_size sessions), "folds" (each of
    # val_folds session folds held out in turn; the final model sees every training session),
    # "auto" (folds when there are fewer than 60 training sessions, else split)
    validation: Literal["auto", "split", "folds"] = "auto"
    # Live abstention: "stable" (a label or abstention is shown on arrival and revised at most
    # once, at finality; see trainer.train.stable_policy) or "plain" (each depth's own
    # precision threshold; the final confidence alone decides the final label)
    abstention: Literal["stable", "plain"] = "stable"
    # Stable abstention: the most revisions (labels withdrawn, changed or filled in after
    # arrival) to allow, as edit overhead = revisions / (events + revisions), bounded on
    # held-out sessions (or events: guarantee_over); the arrival threshold moves to keep
    # within it.
    max_edit_overhead: float = 0.08
    # ... and when no arrival threshold is enough, true: the final threshold rises too (above
    # the precision target's), so fewer labels are filled in late. The budget then holds, but
    # final labels are withheld from the events later events decide (window-focus profile:
    # coverage 0.546 -> 0.235); false (the default): the fewest revisions at full coverage.
    edit_overhead_final: bool = False
    # model.arch auto: after the member weights, per visible depth a label bias
    # -tau * log(training prior) with tau from this grid, the one with the best held-out
    # top-1 macro-F1 (the smallest |tau| on ties; [0]: none). Moves labels towards rare steps,
    # which macro-F1 weighs as much as common ones (docs/ablation.md)
    auto_prior_taus: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # model.arch auto: the score of staying in the same step that the CRF members' transitions
    # gain (added to their diagonal after CRFsuite's fit, for filtering and smoothing alike),
    # the value from this grid whose mixture scores the best held-out top-1 macro-F1 on final
    # labels (the smallest on ties; [0]: none). A CRF alone is best with its own transitions,
    # but beside the BiLSTM a stickier chain mends the runs the network breaks up. Opt-in:
    # [0, 1, 2, 3, 4] lifted wf's lead over the CRF +-2 per fold and the window-focus logs'
    # first labels, but the held-out choice lost on kasteren and placelab (docs/ablation.md)
    auto_crf_sticky: tuple[float, ...] = (0.0,)
    # model.arch auto: 0 takes the member weights that score best on the pooled held-out
    # events; N > 0 takes the mean of the best weights on N bootstrap resamples of the
    # held-out sessions (bagged ensemble selection), less swayed by a few sessions
    auto_bags: int = 0
    val_folds: int = 4
    # Each network candidate is trained this many times with seeds seed, seed+1, ... and its
    # log-probabilities averaged (the CRF is deterministic: once); the members are served
    # together as one Mixture. Session folds stay those of `seed`.
    ensemble_seeds: int = 1
    seed: int = 42
    device: str = "auto"
    hpo: HPOConfig = field(default_factory=HPOConfig)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """A copy with some fields overridden, e.g. ``cfg.replace(model={"arch": "tcn"})``."""
        merged = self.to_dict()
        for name, values in sections.items():
            if name not in merged:
                raise ConfigError(f"unknown config section {name!r}")
            merged[name] = {**merged[name], **values}
        return from_dict(merged)


def to_plain(obj: Any, with_data: bool = False) -> Any:
    """Dataclasses as dicts and tuples as lists; ``ModelConfig``'s fields that the data fixes
    only ``with_data`` (a checkpoint's arguments, not a config file)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name), with_data) for f in dataclasses.fields(obj)
                if with_data or not f.metadata.get("from_data")}
    if isinstance(obj, tuple):
        return [to_plain(v, with_data) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build_section(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_section(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """A section dataclass from a mapping; an unknown key or a value of the wrong type is a
    ``ConfigError`` naming the key by its path (``where`` is the section's)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            path = f"{where}.{key}" if where else key
            settable = sorted(f.name for f in dataclasses.fields(cls) if not f.metadata.get("from_data"))
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(settable)})")
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def from_dict(values: dict[str, Any] | None) -> Config:
    values = dict(values or {})
    if isinstance(values.get("model"), dict):
        values["model"] = _model_section(values["model"])
    cfg = build_section(Config, values, "")
    _validate(cfg)
    return cfg


def _model_section(model: dict[str, Any]) -> dict[str, Any]:
    """The file's ``model:`` mapping, with the old name of ``crf_head`` mapped (and a warning),
    and the fields the data fixes refused by name."""
    model = dict(model)
    if "crf" in model:
        if "crf_head" in model:
            raise ConfigError("model.crf is the old name of model.crf_head; give only crf_head")
        log.warning("config: model.crf is deprecated, use model.crf_head (the CRF output layer; "
                    "model.arch: crf is the CRFsuite CRF)")
        model["crf_head"] = model.pop("crf")
    for f in dataclasses.fields(ModelConfig):
        if f.name in model and f.metadata.get("from_data"):
            raise ConfigError(f"unknown config key 'model.{f.name}': it is set from the data")
    return model


def _validate(cfg: Config) -> None:
    d, t = cfg.data, cfg.train
    if not 0 < t.precision_target <= 1:
        raise ConfigError("train.precision_target: must be in (0, 1]")
    if t.ensemble_seeds < 1:
        raise ConfigError("train.ensemble_seeds: must be >= 1")
    if t.auto_bags < 0:
        raise ConfigError("train.auto_bags: must be >= 0 (0: the best weights on all held-out events)")
    if 0.0 not in t.auto_prior_taus or any(not 0 <= x <= 4 for x in t.auto_prior_taus):
        raise ConfigError("train.auto_prior_taus: values in [0, 4], 0 among them (0: no bias)")
    if 0.0 not in t.auto_crf_sticky or any(not 0 <= x <= 20 for x in t.auto_crf_sticky):
        raise ConfigError("train.auto_crf_sticky: values in [0, 20], 0 among them (0: the CRFs' own transitions)")
    if not 0 <= t.feature_dropout < 1:
        raise ConfigError("train.feature_dropout: must be in [0, 1)")
    if not 0 < t.max_edit_overhead <= 1:
        raise ConfigError("train.max_edit_overhead: must be in (0, 1] (1: no limit)")
    if not 0 <= d.test_size < 1 or not 0 <= d.val_size < 1 or d.test_size + d.val_size >= 1:
        raise ConfigError("data.test_size and data.val_size must be in [0, 1) and sum below 1")
    if d.chunk_len < 8:
        raise ConfigError("data.chunk_len: must be >= 8")
    if d.num_clip is not None and not d.num_clip > 0:
        raise ConfigError(f"data.num_clip: must be > 0 or null, got {d.num_clip!r}")
    if d.feature_set == "group_id_only" and (d.text_features or d.image_col or d.event_name_text
                                             or d.cat_features or d.num_features):
        raise ConfigError("data.feature_set: group_id_only uses no other column; remove "
                          "cat_features, num_features, text_features, event_name_text and image_col")
    if d.image_backbone and not d.image_col:
        raise ConfigError("data.image_backbone: needs data.image_col")
    # (auto, the default, is off without the lexical features rather than an error)
    if d.time_of_day is True and (not d.lexical or d.feature_set == "group_id_only"):
        raise ConfigError("data.time_of_day: the part of the day is a lexical feature; it needs "
                          "data.lexical: true and data.feature_set: full")
    if d.time_of_day_hour and not d.time_of_day:
        raise ConfigError("data.time_of_day_hour: the hour comes with the part of the day; set "
                          "data.time_of_day: true (or auto) too")
    if d.timezone != "local":
        try:
            zoneinfo.ZoneInfo(d.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError, OSError):
            raise ConfigError(f"data.timezone: unknown time zone {d.timezone!r} (local, UTC, or an IANA "
                              "name such as Europe/Berlin)") from None
    if d.time_of_day_hour and (not d.lexical or d.feature_set == "group_id_only"):
        raise ConfigError("data.time_of_day_hour: the hour is a lexical feature; it needs "
                          "data.lexical: true and data.feature_set: full")


def load_config(path: str | Path | None) -> Config:
    """Load a YAML config; None gives the defaults."""
    if path is None:
        return from_dict({})
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
