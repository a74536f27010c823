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

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Decision:
    label: Optional[int]   # None = abstained
    confidence: float      # probability of the shown label (of the top label when abstained)

    def same_as(self, other: "Decision | None") -> bool:
        return other is not None and other.label == self.label


@dataclass(frozen=True)
class RevisionPolicy:
    margin: float = 0.10
    abstain_band: float = 0.02

    def decide(self, shown: Decision | None, probs: np.ndarray, threshold: float, *,
               hold: bool = False) -> Decision:
        """The label to show before an event is final. ``hold`` (the ``stable`` abstention
        policy): after the first decision nothing changes until the final one."""
        best = int(probs.argmax())
        p_best = float(probs[best])
        if shown is None:
            return self.final(probs, threshold)
        if hold:
            return Decision(shown.label, p_best if shown.label is None else float(probs[shown.label]))
        if shown.label is None:
            if p_best >= min(1.0, threshold + self.abstain_band):
                return Decision(best, p_best)
            return Decision(None, p_best)
        p_shown = float(probs[shown.label])
        if best != shown.label and p_best - p_shown >= self.margin and p_best >= threshold:
            return Decision(best, p_best)
        if p_shown < threshold - self.abstain_band:
            return Decision(None, p_best)
        return Decision(shown.label, p_shown)

    @staticmethod
    def final(probs: np.ndarray, threshold: float, agree_with: Decision | None = None) -> Decision:
        """The calibrated decision: the top label when its probability reaches the threshold,
        or (``stable`` policy, ``agree_with`` = the label shown since arrival) when it is that
        label; else abstain. ``LoadedModel.covered`` applies the same rule offline."""
        best = int(probs.argmax())
        p = float(probs[best])
        keep = p >= threshold or (agree_with is not None and agree_with.label == best)
        return Decision(best if keep else None, p)
