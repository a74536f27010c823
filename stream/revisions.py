"""The revision policy: when a label shown to consumers is changed, and when it is final.

A label that flips back and forth on every event is worse than a late one, so changes
before finality go through hysteresis: an event already labelled A switches to B only when
B's calibrated probability beats A's by ``margin`` (and B clears the abstention threshold),
and the abstain/label boundary has a band of ``abstain_band`` either side of the threshold.

The final decision has no hysteresis: it is the model's calibrated decision with its full
lookahead (label when the top probability reaches the threshold, else abstain), which is
exactly what offline prediction gives, so final labels equal offline labels.

Models trained with the ``stable`` abstention policy (the default, see
``trainer.train.stable_policy``) hold the first decision until the final one, and keep a
final label that agrees with the label shown on arrival: a label is revised at most once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Decision:
    # The step *name* (None = abstained), never an index into a model's label list: label
    # lists are the sorted steps of each training set, so a retrained model with a step added
    # or removed shifts every index, and a decision outlives the model that made it (pending
    # labels across a hot swap, snapshots in Redis).
    label: Optional[str]
    confidence: float      # probability of the shown label (of the top label when abstained)

    def same_as(self, other: "Decision | None") -> bool:
        return other is not None and other.label == self.label


def _index(labels: Sequence[str], name: Optional[str]) -> Optional[int]:
    """Position of ``name`` in the model's labels; None for an abstention or a step the model
    does not know (it left the label set in a retrain)."""
    if name is None:
        return None
    try:
        return labels.index(name)
    except ValueError:
        return None


@dataclass(frozen=True)
class RevisionPolicy:
    margin: float = 0.10
    abstain_band: float = 0.02

    def decide(self, shown: Decision | None, probs: np.ndarray, threshold: float,
               labels: Sequence[str], *, hold: bool = False) -> Decision:
        """The label to show before an event is final. ``probs`` is over ``labels`` (the
        serving model's). ``hold`` (the ``stable`` abstention policy): after the first
        decision nothing changes until the final one. A shown step that is not in ``labels``
        (a model without it was swapped in) is decided afresh, as on arrival."""
        best = int(probs.argmax())
        p_best = float(probs[best])
        i_shown = _index(labels, shown.label) if shown is not None else None
        if shown is None or (shown.label is not None and i_shown is None):
            return self.final(probs, threshold, labels)
        if hold:
            return Decision(shown.label, p_best if i_shown is None else float(probs[i_shown]))
        if i_shown is None:
            if p_best >= min(1.0, threshold + self.abstain_band):
                return Decision(labels[best], p_best)
            return Decision(None, p_best)
        p_shown = float(probs[i_shown])
        if best != i_shown and p_best - p_shown >= self.margin and p_best >= threshold:
            return Decision(labels[best], p_best)
        if p_shown < threshold - self.abstain_band:
            return Decision(None, p_best)
        return Decision(shown.label, p_shown)

    @staticmethod
    def final(probs: np.ndarray, threshold: float, labels: Sequence[str],
              agree_with: Decision | None = None, agree_margin: float = math.inf) -> Decision:
        """The calibrated decision: the top label when its probability reaches the threshold,
        or (``stable`` policy, ``agree_with`` = the label shown since arrival) when it is that
        label and its probability reaches ``threshold - agree_margin``; else abstain.
        ``LoadedModel.covered`` applies the same rule offline."""
        best = int(probs.argmax())
        p = float(probs[best])
        keep = p >= threshold or (agree_with is not None and agree_with.label == labels[best]
                                  and p >= threshold - agree_margin)
        return Decision(labels[best] if keep else None, p)
