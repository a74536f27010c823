"""Model artifacts: one self-describing folder per trained model version.

    DIR/
      manifest.json   format, version, kind, model arguments, feature spec, label map,
                      calibration (temperature, threshold), metrics summary, training-data
                      fingerprint, library versions, and a sha256 of every other file
      weights.pt      state dict only (loaded with ``weights_only=True``)
      encoder.json    the fitted feature encoder (vocabularies, scalers) as JSON
      config.yaml     the full training config
      metrics.json    the full evaluation report; *.png plots beside it
      image_backbone.pt  only when the model uses a screenshot backbone from a local file: a
                      copy of it, so the artifact does not depend on the original path

The calibration block holds the full-lookahead ``temperature`` and ``threshold`` (final and
offline decisions) and, for streamable models, ``prefix_temperatures`` / ``prefix_thresholds``:
one per visible-future depth k = 0..L, for the labels the live worker shows before an event is
final (``LoadedModel.prefix_probs`` / ``prefix_threshold``). Index L equals the full-lookahead
pair.

Nothing is unpickled. Loading checks the manifest, the file hashes and that the weights fit
the declared architecture, and says what is wrong when something does not.

``artifacts/current`` (a one-line file naming a version folder) is the pointer the live
worker follows; ``promote`` rewrites it atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from trainer import __version__
from trainer.errors import ArtifactError, ConfigError
from trainer.features import EncodedSession, FeatureEncoder
from trainer.model import Tagger, build_model, checkpoint_args, collate

FORMAT = "tagger-artifact"
FORMAT_VERSION = 1
POINTER = "current"
BACKBONE = "image_backbone.pt"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    import pandas
    import sklearn
    return {"tagger": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "pandas": pandas.__version__, "scikit-learn": sklearn.__version__}


def new_version(fingerprint: str) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + fingerprint[:8]


def softmax_t(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    z = logits / np.maximum(temperature, 1e-6)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def agreement_margin(value: Any) -> float:
    """The stable policy's bound on an agreeing final label's confidence, as the manifest
    holds it (``calibration.agreement_margin``; absent or null: unbounded, math.inf)."""
    return math.inf if value is None else float(value)


def covered_by(final_probs: np.ndarray, threshold: float, first_probs: np.ndarray | None = None,
               first_threshold: float = 1.0, agree_margin: float = math.inf) -> np.ndarray:
    """The abstention rule of final labels, one place for training, offline and live scoring:
    an event keeps its label when its final confidence reaches ``threshold`` or (stable policy
    with agreement: ``first_probs`` given) it was shown on arrival at ``first_threshold``, the
    final label is that one, and its confidence reaches ``threshold - agree_margin``."""
    conf = final_probs.max(-1)
    keep = conf >= threshold
    if first_probs is not None:
        keep |= ((first_probs.max(-1) >= first_threshold) & (first_probs.argmax(-1) == final_probs.argmax(-1))
                 & (conf >= threshold - agree_margin))
    return keep


@dataclass
class LoadedModel:
    """A loaded artifact: everything needed to label events, offline or live."""

    path: Path
    manifest: dict[str, Any]
    encoder: FeatureEncoder
    labels: list[str]
    temperature: float
    threshold: float
    kind: str = "neural"
    model: Tagger | None = None
    baseline: Any = None
    device: str = "cpu"
    base_dir: Path | None = field(default=None, repr=False)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def lookahead(self) -> int | None:
        return self.manifest.get("model_args", {}).get("lookahead")

    @cached_property
    def prefix_temperatures(self) -> list[float]:
        """Temperature per visible-future depth k = 0..L (the full-lookahead one when the
        artifact has no prefix calibration)."""
        L = self.lookahead or 0
        got = self.manifest["calibration"].get("prefix_temperatures")
        return [float(t) for t in got] if got and len(got) == L + 1 else [self.temperature] * (L + 1)

    @cached_property
    def prefix_thresholds(self) -> list[float]:
        L = self.lookahead or 0
        got = self.manifest["calibration"].get("prefix_thresholds")
        return [float(t) for t in got] if got and len(got) == L + 1 else [self.threshold] * (L + 1)

    @property
    def policy(self) -> str:
        """``stable``: a label is shown on arrival when its depth-0 confidence reaches
        ``first_threshold`` and kept at the end when the final label agrees with it or its own
        confidence reaches ``threshold``; ``plain``: the final confidence alone decides."""
        return self.manifest["calibration"].get("policy", "plain")

    @property
    def agreement(self) -> bool:
        """``stable`` policy: whether a final label that agrees with the one shown on arrival is
        kept below ``threshold`` (False when agreement was not precise enough on held-out data)."""
        return self.policy == "stable" and bool(self.manifest["calibration"].get("agreement", True))

    @property
    def agreement_margin(self) -> float:
        """``stable`` policy with agreement: an agreeing final label is kept when its confidence
        reaches ``threshold - agreement_margin`` (math.inf, the artifacts before the bound: any)."""
        return agreement_margin(self.manifest["calibration"].get("agreement_margin"))

    @property
    def first_threshold(self) -> float:
        return float(self.manifest["calibration"].get("first_threshold", self.prefix_threshold(0)))

    def covered(self, final_probs: np.ndarray, first_probs: np.ndarray | None) -> np.ndarray:
        """Which events keep a label (the rest abstain), from their calibrated final and
        on-arrival probabilities (n, C) each: the rule the live worker's final records follow."""
        return covered_by(final_probs, self.threshold,
                          first_probs if self.agreement else None, self.first_threshold, self.agreement_margin)

    def arrival_probs(self, sessions: Sequence[EncodedSession]) -> list[np.ndarray]:
        """Calibrated probabilities each event had on arrival (the depth-0 temperature)."""
        from trainer.model import arrival_logits
        t0 = self.prefix_temperatures[0] if self.prefix_temperatures else self.temperature
        return [softmax_t(z, t0) for z in arrival_logits(self.model, sessions, self.device)]

    def prefix_threshold(self, k: int) -> float:
        """Abstention threshold for a label shown while k later events are visible (k >= L:
        final, the full-lookahead threshold)."""
        thr = self.prefix_thresholds
        return thr[k] if 0 <= k < len(thr) else self.threshold

    def prefix_probs(self, logits: Any) -> np.ndarray:
        """Calibrate the (v, C) logits of one ``Tagger.step`` output (oldest first): row j has
        k = v - 1 - j later events visible and gets that depth's temperature."""
        z = logits.float().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        return self.prefix_probs_rows(z, [len(z)])

    def prefix_probs_rows(self, z: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        """``prefix_probs`` for several step outputs stacked row-wise (``sizes[i]`` rows
        each, oldest first within each), in one pass: the live worker calibrates a whole
        round at once."""
        if not len(z):
            return z
        temps = np.asarray(self.prefix_temperatures, dtype=np.float64)
        depth = np.concatenate([np.arange(v - 1, -1, -1) for v in sizes])  # later events visible
        return softmax_t(z, temps[np.minimum(depth, len(temps) - 1)][:, None])

    def predict_logits(self, sessions: Sequence[EncodedSession], batch_size: int = 16,
                       max_len: int = 4096) -> list[np.ndarray]:
        """Uncalibrated logits (n, C) per session, over whole sessions (as the live worker's
        final labels see them). Sessions longer than ``max_len`` run in overlapping chunks."""
        if self.model is None:
            raise ArtifactError(f"{self.path}: a {self.kind} baseline has no network logits")
        self.model.eval()
        out: list[np.ndarray | None] = [None] * len(sessions)
        order = sorted(range(len(sessions)), key=lambda i: len(sessions[i]))
        a = self.model.args
        overlap = a.context + (a.lookahead or a.context)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                short = [i for i in idx if len(sessions[i]) <= max_len]
                if short:
                    batch = collate([sessions[i] for i in short], self.device)
                    logits, _ = self.model(batch)
                    for j, i in enumerate(short):
                        out[i] = logits[j, :len(sessions[i])].float().cpu().numpy()
                for i in idx:
                    if len(sessions[i]) > max_len:
                        out[i] = self._chunked(sessions[i], max_len, overlap)
        return out  # type: ignore[return-value]

    def _chunked(self, s: EncodedSession, max_len: int, overlap: int) -> np.ndarray:
        n, step = len(s), max_len - 2 * overlap
        res = np.zeros((n, len(self.labels)), dtype=np.float32)
        for a in range(0, n, step):
            lo, hi = max(0, a - overlap), min(n, a + step + overlap)
            logits, _ = self.model(collate([s.rows(lo, hi)], self.device))
            res[a:min(n, a + step)] = logits[0, a - lo:a - lo + min(step, n - a)].cpu().numpy()
        return res

    def predict_proba(self, frame, base_dir: Path | None = None) -> tuple[list[str], list[np.ndarray]]:
        """Calibrated probabilities per session for a canonical frame."""
        sids, probs, _ = self.predict_decisions(frame, base_dir, arrival=False)
        return sids, probs

    def predict_decisions(self, frame, base_dir: Path | None = None, arrival: bool = True
                          ) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        """Per session: calibrated final probabilities and which events keep a label
        (``covered``; with ``arrival`` the on-arrival probabilities are computed too when the
        abstention policy needs them)."""
        if self.kind != "neural":
            probs = self.baseline.predict_proba(frame)
            sids = list(dict.fromkeys(frame["session_id"]))
            if self.temperature != 1.0:
                probs = [softmax_t(np.log(np.clip(p, 1e-12, 1)), self.temperature) for p in probs]
            return sids, probs, [p.max(-1) >= self.threshold for p in probs]
        sids, enc = self.encoder.transform_frame(frame, base_dir=base_dir or self.base_dir)
        probs = [softmax_t(l, self.temperature) for l in self.predict_logits(enc)]
        first = self.arrival_probs(enc) if arrival and self.agreement else [None] * len(probs)
        return sids, probs, [self.covered(p, f) for p, f in zip(probs, first)]


def save_artifact(out: Path, *, model: Tagger | None, encoder: FeatureEncoder, labels: Sequence[str],
                  temperature: float, threshold: float, calibration: Mapping[str, Any],
                  metrics: Mapping[str, Any], training: Mapping[str, Any], config: Mapping[str, Any],
                  kind: str = "neural", baseline: Any = None, version: str | None = None) -> Path:
    """Write a complete artifact folder; the manifest goes last, so a folder with a manifest
    is complete (a crash mid-write leaves no manifest and the folder is refused on load)."""
    import yaml
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest_path.unlink()
    files = []
    model_args = model.args.to_args() if model is not None else {}
    if model is not None:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "weights.pt")
        files.append("weights.pt")
        if getattr(model.args, "image_backbone", None):
            src = Path(model.args.image_backbone)
            if src.resolve() != (out / BACKBONE).resolve():
                shutil.copyfile(src, out / BACKBONE)
            model_args["image_backbone"] = BACKBONE
            files.append(BACKBONE)
    if baseline is not None:
        files += baseline.save(out)
    (out / "encoder.json").write_text(json.dumps(encoder.to_dict()), encoding="utf-8")
    (out / "config.yaml").write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default), encoding="utf-8")
    files += ["encoder.json", "config.yaml", "metrics.json"]
    fp = training.get("data_fingerprint", "0" * 8)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "version": version or new_version(fp),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_args": model_args,
        "feature_spec": encoder.spec(), "labels": list(labels),
        "calibration": {"temperature": float(temperature), "threshold": float(threshold), **calibration},
        "metrics": _summary(metrics), "training": dict(training), "libraries": library_versions(),
        "files": {name: sha256_file(out / name) for name in files},
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=json_default), encoding="utf-8")
    os.replace(tmp, manifest_path)
    return out


def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("token_accuracy", "macro_f1", "coverage", "selective_accuracy", "aurc", "threshold")
    out = {}
    for split, block in metrics.items():
        if isinstance(block, Mapping):
            out[split] = {k: block[k] for k in keep if k in block}
    return out


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for the numpy values in metrics and reports."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a model folder (it does not exist or is not a directory)")
    if not mpath.exists():
        raise ArtifactError(f"{path}: no manifest.json (incomplete or not a tagger artifact)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{mpath}: unreadable manifest: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a tagger artifact (format {manifest.get('format')!r})"
                            if isinstance(manifest, dict) else f"{mpath}: manifest is not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version {manifest.get('format_version')!r} is not "
                            f"supported by this tagger (expects {FORMAT_VERSION})")
    for key in ("version", "kind", "feature_spec", "labels", "calibration", "files"):
        if key not in manifest:
            raise ArtifactError(f"{mpath}: manifest lacks {key!r}")
    return manifest


def load_artifact(path: str | Path, device: str = "cpu", verify: bool = True) -> LoadedModel:
    """Load and check an artifact folder (``artifacts/`` itself follows its ``current`` pointer)."""
    path = resolve(path)
    manifest = read_manifest(path)
    if verify:
        for name, digest in manifest["files"].items():
            f = path / name
            if not f.exists():
                raise ArtifactError(f"{path}: {name} is missing")
            if sha256_file(f) != digest:
                raise ArtifactError(f"{path}: {name} is corrupt (sha256 differs from the manifest)")
    try:
        encoder = FeatureEncoder.from_dict(json.loads((path / "encoder.json").read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}/encoder.json: unreadable: {exc}") from exc
    if encoder.spec()["cat_sizes"] != manifest["feature_spec"]["cat_sizes"]:
        raise ArtifactError(f"{path}: encoder.json does not match the manifest's feature spec")
    cal = manifest["calibration"]
    loaded = LoadedModel(path=path, manifest=manifest, encoder=encoder, labels=list(manifest["labels"]),
                         temperature=float(cal["temperature"]), threshold=float(cal["threshold"]),
                         kind=manifest["kind"], device=device)
    if manifest["kind"] == "neural":
        margs = dict(manifest["model_args"])
        try:
            args = checkpoint_args(margs)
            if args.image_backbone:                                            # the artifact's own copy
                args = dataclasses.replace(args, image_backbone=str(path / args.image_backbone))
        except (ConfigError, TypeError, KeyError, ValueError) as exc:
            raise ArtifactError(f"{path}: model_args do not fit this tagger version: {exc}") from exc
        if args.n_labels != len(loaded.labels):
            raise ArtifactError(f"{path}: model has {args.n_labels} outputs but {len(loaded.labels)} labels")
        try:
            state = torch.load(path / "weights.pt", map_location=device, weights_only=True)
        except Exception as exc:  # torch raises several types for bad files
            raise ArtifactError(f"{path}/weights.pt: cannot load weights: {exc}") from exc
        try:
            model = build_model(args).to(device)
        except (ConfigError, ValueError, RuntimeError, OSError) as exc:
            raise ArtifactError(f"{path}: cannot build the declared model: {exc}") from exc
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: weights do not fit the declared architecture: "
                                f"{str(exc).splitlines()[0]}") from exc
        model.eval()
        loaded.model = model
    else:
        from trainer.baseline import BaselineLabeller
        loaded.baseline = BaselineLabeller.load(path)
    return loaded


def resolve(path: str | Path) -> Path:
    """A model folder, or an artifacts root whose ``current`` pointer names one."""
    path = Path(path)
    pointer = path / POINTER
    if not (path / "manifest.json").exists() and pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        target = Path(name) if Path(name).is_absolute() else path / name
        return target
    return path


def promote(model_dir: str | Path, artifacts_root: str | Path) -> Path:
    """Check an artifact and make it the current one (atomic pointer swap)."""
    model_dir = Path(model_dir).resolve()
    load_artifact(model_dir)  # refuse what would not load
    root = Path(artifacts_root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        target = os.path.relpath(model_dir, root.resolve())
    except ValueError:
        target = str(model_dir)
    tmp = root / (POINTER + ".tmp")
    tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, root / POINTER)
    return model_dir
