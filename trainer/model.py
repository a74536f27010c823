"""The sequence-labelling network: multimodal event embedding, fusion, encoder, token classifier.

Everything about the network is in this file (nanoGPT style). Its constructor arguments are
``trainer.config.ModelConfig``, the YAML ``model:`` section with the sizes the data fixes
filled in; the checkpoint stores them, so ``Tagger(ModelConfig.from_args(manifest["model_args"]))``
rebuilds it.

Bounded lookahead is the key idea. With ``lookahead = L`` each event sees every earlier event
(within ``context`` for attention) and at most L later ones, in training and live alike. So
a live label is final after L more events, and the live model sees exactly what it saw in
training. ``step()`` advances many sessions by one event each using cached state, with work
per event bounded by L and ``context``, never by the session's length:

- BiLSTM: a causal multi-layer forward LSTM (state cached) plus a backward LSTM that reads
  only the window of the event and its L successors.
- Transformer: causal self-attention layers over the last ``context`` events (their outputs
  are cached: a causal layer's output never changes), and a last layer that may also look L
  events ahead. Positions are relative (a learned bias per head and distance), so position
  1000 of a session costs what position 10 does.
- TCN: causal dilated convolutions (receptive field cached as a buffer), then a lookahead
  convolution over the next L events.
- History-token Transformer (after HT-Transformer, arXiv 2508.01474): the Transformer above
  plus a history token after every ``history_every`` events. Token j attends to its span of
  events and to token j-1, so it summarises the whole prefix at bounded cost; the lookahead
  layer lets each event attend to the latest complete history token besides its context
  window. Tokens are causal, so they are computed once and cached.

Two options sit around any encoder:

- ``crf_head``: a linear-chain CRF output layer read as marginals with bounded lookahead. The
  label distribution at t is softmax(alpha_t + beta_t): alpha is the forward message
  (causal; cached by ``step()``), beta the backward message over only the next W = L // 2
  events. The encoder then gets lookahead L - W, so the whole model still sees exactly L
  events ahead. Trained by cross-entropy on these marginals, which are what is served.
- ``fusion="late"``: one encoder and classifier per modality (tabular, text, image) whose
  logits are summed, instead of fusing the modalities before the encoder.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from trainer.config import ModelConfig
from trainer.errors import ConfigError

IGNORE = -100


# ------------------------------------------------------------------------------------------
# Event embedding and fusion
# ------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Screenshot encoder trained with the tagger: no pretrained backbone is needed."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, out_dim))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img: (N, 3, S, S) uint8 -> (N, out_dim)
        return self.net(img.float() / 255.0)


class ImageBackbone(nn.Module):
    """A screenshot encoder loaded from a local file, then a trained projection.

    The file is a TorchScript module (any network mapping (N, 3, S, S) floats in [0, 1] to
    (N, D) or (N, D, ...) features) or a state dict of ``SmallCNN`` (for example one trained
    with an earlier tagger). Nothing is ever downloaded. Frozen by default: its weights stay
    as loaded and it runs in eval mode, so batch statistics never drift."""

    def __init__(self, path: str, out_dim: int, image_size: int, freeze: bool = True):
        super().__init__()
        self.frozen = freeze
        try:
            net = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError):
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "net.8.weight" not in state:
                raise ConfigError(f"{path}: neither a TorchScript module nor a SmallCNN state dict")
            net = SmallCNN(state["net.8.weight"].shape[0])
            net.load_state_dict(state)
            net = _Scaled(net)
        self.net = net
        with torch.no_grad():
            dim = self.net(torch.zeros(1, 3, image_size, image_size)).reshape(1, -1).shape[1]
        self.proj = nn.Linear(dim, out_dim)
        if freeze:
            for p in self.net.parameters():
                p.requires_grad_(False)
            self.net.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.net.eval()
        return self

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img: (N, 3, S, S) uint8 -> (N, out_dim)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            f = self.net(img.float() / 255.0)
        return self.proj(f.reshape(len(img), -1))


class _Scaled(nn.Module):
    """SmallCNN takes uint8 pixels; a backbone takes [0, 1] floats."""

    def __init__(self, cnn: SmallCNN):
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.net(x)


def bag_index(ids: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(..., X) 0-padded feature ids -> ``bag``'s lookup plan: the present ids, each event's
    offset into them and its count (None without lexical features). A live round computes it
    once for every lookup over the same ids (the embedder's and each member's wide path)."""
    if ids.shape[-1] == 0:
        return None
    flat = ids.reshape(-1, ids.shape[-1])
    present = flat != 0
    counts = present.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    return flat[present], offsets, counts


def with_lex_index(events: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A live round's inputs (B, 1, ...) with ``lex_index``, the lookup plan every lexical bag of
    the round shares (computed once, also across a mixture's members)."""
    if "lex" not in events or "lex_index" in events:
        return events
    return {**events, "lex_index": bag_index(events["lex"][:, 0])}


def bag(weight: torch.Tensor, ids: torch.Tensor, mean: bool = False,
        index: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """(..., X) 0-padded feature ids -> (prod(...), D) rows of ``weight`` summed (or averaged)
    per event; an event without features gives 0. Padding is dropped before the lookup, so
    the cost follows the features present, not the padded width. ``index``: ``bag_index(ids)``
    when the caller has it already."""
    if ids.shape[-1] == 0:                     # no lexical features at all (data.lexical: false)
        return weight.new_zeros(math.prod(ids.shape[:-1]), weight.shape[1])
    present, offsets, counts = index if index is not None else bag_index(ids)
    out = F.embedding_bag(present, weight, offsets, mode="sum")
    if mean:
        out = out / counts.clamp(min=1)[:, None]
    return out


class EventEmbedder(nn.Module):
    """Per-event multimodal features -> one vector of ``hidden_dim`` (the fusion layer).

    With ``fusion="late"`` it fuses nothing: ``forward`` returns one vector per modality
    (tabular first, then text, then image) for the tagger's per-modality encoders."""

    def __init__(self, a: ModelConfig):
        super().__init__()
        self.a = a
        self.event = nn.Embedding(a.n_events, a.emb_event_dim, padding_idx=0)
        self.token = nn.Embedding(a.n_tokens, a.emb_token_dim, padding_idx=0)
        self.cats = nn.ModuleList(nn.Embedding(n, min(a.emb_cat_dim, max(2, n)), padding_idx=0)
                                  for n in a.cat_sizes)
        self.nums = nn.Linear(a.n_nums, a.num_proj_dim) if a.n_nums else None
        # mean bag; without rows for the ids it does not read (lex_ignore: the last ids, masked
        # before the lookup), so that it starts as it would without them
        self.lex = nn.Embedding(a.n_lex - len(a.lex_ignore), a.lex_dim, padding_idx=0) if a.n_lex else None
        tab_dim = a.emb_event_dim + a.emb_token_dim + sum(e.embedding_dim for e in self.cats) + (
            a.num_proj_dim if a.n_nums else 0) + (a.lex_dim if a.n_lex else 0)
        self.text = nn.Linear(a.text_dim, a.text_proj_dim) if a.text_dim else None
        if not a.image_size:
            self.image = None
        elif a.image_backbone:
            self.image = ImageBackbone(a.image_backbone, a.image_proj_dim, a.image_size, a.freeze_backbone)
        else:
            self.image = SmallCNN(a.image_proj_dim)
        extra = [d for d, m in ((a.text_proj_dim, self.text), (a.image_proj_dim, self.image)) if m is not None]
        self.n_streams = 1 + len(extra) if a.fusion == "late" else 1
        h = a.hidden_dim
        if a.fusion == "late":
            self.proj = nn.Linear(tab_dim, h)
            self.extra_proj = nn.ModuleList(nn.Linear(d, h) for d in extra)
            self.extra_norm = nn.ModuleList(nn.LayerNorm(h) for _ in extra)
        elif a.fusion == "concat":
            self.proj = nn.Linear(tab_dim + sum(extra), h)
        elif a.fusion in ("gated", "sum", "cross_attention"):
            self.proj = nn.Linear(tab_dim, h)
            self.extra_proj = nn.ModuleList(nn.Linear(d, h) for d in extra)
            if a.fusion == "gated":
                self.gates = nn.ModuleList(nn.Linear(2 * h, h) for _ in extra)
            if a.fusion == "cross_attention":
                self.xattn = nn.MultiheadAttention(h, 1, batch_first=True)
        else:
            raise ConfigError(f"model.fusion: unknown {a.fusion!r}")
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(a.dropout)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        # every input is (B, T, ...); output (B, T, hidden), or a list of them for late fusion
        tok = b["tokens"]
        tok_emb = self.token(tok)                                     # (B, T, MT, Et)
        n_tok = (tok != 0).sum(-1, keepdim=True).clamp(min=1)
        parts = [self.event(b["event"]), tok_emb.sum(-2) / n_tok]
        parts += [emb(b["cats"][..., j]) for j, emb in enumerate(self.cats)]
        if self.nums is not None:
            parts.append(self.nums(b["nums"]))
        if self.lex is not None:
            lex = b["lex"]                                            # (B, T, X)
            B, T, X = lex.shape
            parts.append(bag(self.lex.weight, lex, mean=True, index=b.get("lex_index")).reshape(B, T, -1))
        tab = torch.cat(parts, -1)
        extra = []
        if self.text is not None:
            extra.append(self.text(b["text"]))
        if self.image is not None:
            img = b["image"]
            B, T = img.shape[:2]
            extra.append(self.image(img.reshape(B * T, *img.shape[2:])).reshape(B, T, -1))
        if self.a.fusion == "late":
            out = [self.drop(self.norm(F.gelu(self.proj(tab))))]
            out += [self.drop(n(F.gelu(p(e)))) for p, n, e in zip(self.extra_proj, self.extra_norm, extra)]
            return out
        if self.a.fusion == "concat":
            x = self.proj(torch.cat([tab] + extra, -1))
        else:
            x = self.proj(tab)
            mods = [p(e) for p, e in zip(self.extra_proj, extra)]
            if self.a.fusion == "sum":
                x = x + sum(mods) if mods else x
            elif self.a.fusion == "gated":
                for gate, m in zip(self.gates, mods):
                    x = x + torch.sigmoid(gate(torch.cat([x, m], -1))) * m
            elif mods:  # cross_attention: the event attends over its own modalities
                B, T, H = x.shape
                kv = torch.stack([x] + mods, 2).reshape(B * T, 1 + len(mods), H)
                att, _ = self.xattn(x.reshape(B * T, 1, H), kv, kv, need_weights=False)
                x = x + att.reshape(B, T, H)
        return self.drop(self.norm(F.gelu(x)))


# ------------------------------------------------------------------------------------------
# Encoders. Each maps (B, T, H) + lengths -> (B, T, H_out) and has a cached one-step twin.
# ------------------------------------------------------------------------------------------

class LookaheadLSTM(nn.Module):
    """Causal forward LSTM + backward LSTM over each event's next L events (or all, L=None)."""

    def __init__(self, a: ModelConfig):
        super().__init__()
        h = a.hidden_dim
        self.L = a.lookahead
        self.fwd = nn.LSTM(h, h, a.num_layers, batch_first=True,
                           dropout=a.dropout if a.num_layers > 1 else 0.0)
        # bounded lookahead: a cell stepped over each event's short window (no packing needed);
        # unbounded: an ordinary backward LSTM over the whole sequence
        self.bwd = nn.LSTM(h, h, 1, batch_first=True) if self.L is None else nn.LSTMCell(h, h)
        self.out_dim = 2 * h

    supports_horizon = True

    @property
    def _fwd_weights(self) -> list[tuple[torch.Tensor, ...]]:
        # (w_ih, w_hh, b_ih, b_hh) of each layer of the forward LSTM, for torch.lstm_cell
        f = self.fwd
        return [tuple(getattr(f, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                for k in range(f.num_layers)]

    def backward_windows(self, x: torch.Tensor, lengths: torch.Tensor,
                         horizon: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: (B, T, H). Position i's window is x[i+l-1], ..., x[i] with l = min(L+1, len-i):
        # read in reverse, so the final state has seen i's future within the lookahead.
        # horizon (B, T): position i sees only its next horizon[i] events (training at every
        # visible depth, so that the label shown on arrival is a trained prediction).
        B, T, H = x.shape
        L = self.L
        i = torch.arange(T, device=x.device)
        l = torch.minimum(torch.full((B, T), L + 1, device=x.device), lengths[:, None].to(x.device) - i)
        if horizon is not None:
            l = torch.minimum(l, horizon.to(x.device) + 1)
        l = l.clamp(min=1)                                             # (B, T)
        # Window step k reads x[i + l - 1 - k]; only rows with k < l take it. The cell is
        # written out (nn.LSTMCell's gate order and weights) so that the input half of the
        # gates is computed once per position rather than once per window step, and each
        # step runs on its valid rows only: about 2.5x fewer FLOPs than stepping
        # nn.LSTMCell over every padded row, the bulk of a live BiLSTM step.
        cell = self.bwd
        gx = F.linear(x.reshape(B * T, H), cell.weight_ih, cell.bias_ih)  # (B*T, 4H)
        h = x.new_zeros(B * T, H)
        c = x.new_zeros(B * T, H)
        base = (torch.arange(B, device=x.device)[:, None] * T + i[None, :]).reshape(-1)
        lf = l.reshape(-1)
        for k in range(L + 1):
            rows = torch.nonzero(k < lf).squeeze(1)
            if rows.numel() == 0:
                break
            h_new, c_new = self._cell(gx[base[rows] + lf[rows] - 1 - k], h[rows], c[rows])
            h = h.index_copy(0, rows, h_new)
            c = c.index_copy(0, rows, c_new)
        return h.reshape(B, T, H)

    def _cell(self, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # one step of the backward cell (nn.LSTMCell's gates) given its input half gx (N, 4H)
        cell = self.bwd
        gi, gf, gg, go = (gx + F.linear(h, cell.weight_hh, cell.bias_hh)).chunk(4, 1)
        c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
        return torch.sigmoid(go) * torch.tanh(c), c

    def full_backward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        i = torch.arange(T, device=x.device)
        rev = (lengths[:, None].to(x.device) - 1 - i).clamp(min=0)     # reverse the valid part
        xr = torch.gather(x, 1, rev[..., None].expand(B, T, H))
        packed = pack_padded_sequence(xr, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.bwd(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        return torch.gather(out, 1, rev[..., None].expand(B, T, H))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor,
                horizon: Optional[torch.Tensor] = None) -> torch.Tensor:
        f, _ = self.fwd(x)                                             # causal: pads are at the end
        b = (self.full_backward(x, lengths) if self.L is None
             else self.backward_windows(x, lengths, horizon))
        return torch.cat([f, b], -1)

    # ---- streaming ---------------------------------------------------------------------
    def init_state(self, device) -> dict[str, Any]:
        # x / f: the inputs and forward outputs of the last L + 1 events, right-aligned in
        # fixed-size buffers (the first L + 1 - k rows are padding), so that a round stacks
        # the sessions' buffers in one call whatever their lengths
        H, N = self.fwd.hidden_size, self.fwd.num_layers
        K = (self.L or 0) + 1
        return {"h": torch.zeros(N, H, device=device), "c": torch.zeros(N, H, device=device),
                "x": torch.zeros(K, H, device=device), "f": torch.zeros(K, H, device=device), "k": 0}

    def step(self, states: list[dict], x_new: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        # x_new: (B, H), one new event per session. Returns new states and, per session, the
        # encoder outputs of the positions whose labels may change: (v, 2H), oldest first.
        # Every op runs once for the whole round; only the final split is per session.
        B, H = x_new.shape
        K = self.L + 1
        h = torch.stack([s["h"] for s in states], 1)                   # (layers, B, H)
        c = torch.stack([s["c"] for s in states], 1)
        # the forward LSTM's one step, layer by layer: torch.lstm_cell is one fused op per
        # layer where nn.LSTM on a length-1 sequence costs several times more per call
        inp, hs, cs = x_new, [], []
        for layer in range(self.fwd.num_layers):
            hl, cl = torch.lstm_cell(inp, (h[layer], c[layer]), *self._fwd_weights[layer])
            hs.append(hl)
            cs.append(cl)
            inp = hl
        h2, c2 = torch.stack(hs), torch.stack(cs)
        xs = torch.cat([torch.stack([s["x"] for s in states])[:, 1:], x_new[:, None]], 1)  # (B, K, H)
        fs = torch.cat([torch.stack([s["f"] for s in states])[:, 1:], inp[:, None]], 1)
        counts = [min(s["k"] + 1, K) for s in states]
        # Every window of the buffer ends at the newest event (nothing later has arrived), so
        # each position's backward state is one reverse scan's state there: a scan from the
        # newest row back to the oldest any session has gives every window at once (rows
        # before a session's start are computed from padding and dropped below).
        cell = self.bwd
        hb = cb = x_new.new_zeros(B, H)
        b = []
        for r in range(K - 1, K - 1 - max(counts), -1):
            hb, cb = torch.lstm_cell(xs[:, r], (hb, cb), cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            b.append(hb)
        b = torch.stack(b[::-1], 1)                                    # (B, max(counts), H)
        out = torch.cat([fs[:, K - b.shape[1]:], b], -1)               # (B, max(counts), 2H)
        # one unbind per tensor rather than an index per session (each a dispatch of its own)
        new_states = [{"h": h, "c": c, "x": x, "f": f, "k": n}
                      for h, c, x, f, n in zip(h2.unbind(1), c2.unbind(1), xs.unbind(0), fs.unbind(0), counts)]
        width = out.shape[1]
        return new_states, [o[width - n:] for o, n in zip(out.unbind(0), counts)]


class Block(nn.Module):
    """Pre-LN transformer block whose queries and keys may be different slices of a sequence."""

    def __init__(self, a: ModelConfig):
        super().__init__()
        h = a.hidden_dim
        self.nhead = a.nhead
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q, self.kv, self.o = nn.Linear(h, h), nn.Linear(h, 2 * h), nn.Linear(h, h)
        self.ff = nn.Sequential(nn.Linear(h, a.ff_dim), nn.GELU(), nn.Linear(a.ff_dim, h))
        self.drop = nn.Dropout(a.dropout)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # xq: (B, Tq, H), xkv: (B, Tk, H), bias: (B or 1, nh, Tq, Tk) with -inf where masked
        B, Tq, H = xq.shape
        nh = self.nhead
        q = self.q(self.ln1(xq)).reshape(B, Tq, nh, H // nh).transpose(1, 2)
        k, v = self.kv(self.ln1(xkv)).reshape(B, -1, 2, nh, H // nh).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = xq + self.drop(self.o(att.transpose(1, 2).reshape(B, Tq, H)))
        return x + self.drop(self.ff(self.ln2(x)))


class LookaheadTransformer(nn.Module):
    """Causal windowed attention layers, then one layer that may look L events ahead."""

    def __init__(self, a: ModelConfig):
        super().__init__()
        self.L, self.C, self.nhead = a.lookahead, a.context, a.nhead
        self.blocks = nn.ModuleList(Block(a) for _ in range(max(1, a.num_layers)))
        self.max_future = a.context if a.lookahead is None else a.lookahead
        # relative position bias per layer and head, for distances -C+1 .. +max_future
        self.rel = nn.Parameter(torch.zeros(len(self.blocks), a.nhead, a.context + self.max_future))
        self.ln = nn.LayerNorm(a.hidden_dim)
        self.out_dim = a.hidden_dim

    def _bias(self, layer: int, qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor) -> torch.Tensor:
        # qpos: (Tq,), kpos: (Tk,) absolute positions; kvalid: (B, Tk) -> (B, nh, Tq, Tk)
        d = kpos[None, :] - qpos[:, None]                             # key - query
        last = layer == len(self.blocks) - 1
        future = (self.L if self.L is not None else 10 ** 9) if last else 0
        if self.L is None:
            future = 10 ** 9
        allowed = (d > -self.C) & (d <= future)
        idx = d.clamp(-self.C + 1, self.max_future) + self.C - 1
        bias = self.rel[layer][:, idx]                                 # (nh, Tq, Tk)
        # a query always sees itself, so padded rows are never all -inf (NaN in softmax)
        mask = (allowed[None, None] & kvalid[:, None, None, :]) | (d == 0)[None, None]
        return torch.where(mask, bias[None], torch.tensor(float("-inf"), device=bias.device))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        valid = pos[None, :] < lengths[:, None].to(x.device)
        for layer, blk in enumerate(self.blocks):
            x = blk(x, x, self._bias(layer, pos, pos, valid))
        return self.ln(x)

    # ---- streaming ---------------------------------------------------------------------
    def init_state(self, device) -> dict[str, Any]:
        H = self.blocks[0].q.in_features
        return {"n": 0, "layers": [torch.zeros(0, H, device=device) for _ in self.blocks]}

    def step(self, states: list[dict], x_new: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        # Per session, layers[l] caches layer l's inputs for the last C + L positions. Causal
        # layers' outputs never change, so only the new position runs through them; the last
        # layer re-runs for the positions still inside the lookahead (at most L + 1).
        L = self.L if self.L is not None else 0
        keep = self.C + L
        new_states, outs = [], []
        for i, s in enumerate(states):  # B is small per round; buffers differ in length
            n = s["n"]
            layers = [lay for lay in s["layers"]]
            h = x_new[i:i + 1]                                          # (1, H)
            for l, blk in enumerate(self.blocks[:-1]):
                buf = torch.cat([layers[l], h])[-keep:]
                layers[l] = buf
                kpos = torch.arange(n + 1 - len(buf), n + 1, device=h.device)
                qpos = kpos[-1:]
                valid = torch.ones(1, len(buf), dtype=torch.bool, device=h.device)
                h = blk(h[None], buf[None], self._bias(l, qpos, kpos, valid))[0]
            last = len(self.blocks) - 1
            buf = torch.cat([layers[last], h])[-keep:]
            layers[last] = buf
            kpos = torch.arange(n + 1 - len(buf), n + 1, device=h.device)
            v = min(L + 1, len(buf))
            qpos = kpos[-v:]
            valid = torch.ones(1, len(buf), dtype=torch.bool, device=h.device)
            out = self.blocks[last](buf[None, -v:], buf[None], self._bias(last, qpos, kpos, valid))[0]
            outs.append(self.ln(out))
            new_states.append({"n": n + 1, "layers": layers})
        return new_states, outs


class HistoryTransformer(LookaheadTransformer):
    """Transformer with history tokens (after HT-Transformer, arXiv 2508.01474).

    After every S = ``history_every`` events a history token is formed: it attends to the S
    events of its span (their inputs to the lookahead layer, which are causal) and to the
    previous history token, so token j summarises events 0 .. (j+1)S - 1 at a cost bounded by
    S. In the lookahead layer each event attends, besides its context window, to the latest
    history token complete at its own position: history beyond ``context`` reaches it at
    constant cost. History tokens are causal, so ``step()`` forms each one once and keeps the
    few the positions still inside the lookahead refer to."""

    def __init__(self, a: ModelConfig):
        super().__init__(a)
        self.S = max(1, a.history_every)
        self.hist0 = nn.Parameter(torch.zeros(a.hidden_dim))
        self.hist_block = Block(a)
        self.hist_ln = nn.LayerNorm(a.hidden_dim)
        self.hist_bias = nn.Parameter(torch.zeros(a.nhead))
        L = a.lookahead if a.lookahead is not None else 0
        self.keep_hist = (L + 1) // self.S + 2

    def _history(self, m: torch.Tensor, span: torch.Tensor, span_valid: torch.Tensor) -> torch.Tensor:
        # m: (B, H) previous token; span: (B, S, H); span_valid: (B, S) -> next token (B, H)
        q = m[:, None]
        kv = torch.cat([q, span], 1)
        ok = torch.cat([torch.ones_like(span_valid[:, :1]), span_valid], 1)
        bias = torch.zeros(ok.shape, dtype=span.dtype, device=span.device).masked_fill(~ok, float("-inf"))
        return self.hist_ln(self.hist_block(q, kv, bias[:, None, None, :])[:, 0])

    def _hist_bias(self, qpos: torch.Tensor, hidx: torch.Tensor) -> torch.Tensor:
        # qpos: (Tq,) positions; hidx: (J,) history token numbers -> (1, nh, Tq, J)
        latest = (qpos + 1) // self.S - 1                               # token complete at qpos
        allowed = hidx[None, :] == latest[:, None]
        return torch.where(allowed[None, None], self.hist_bias[None, :, None, None],
                           torch.tensor(float("-inf"), device=qpos.device))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        valid = pos[None, :] < lengths[:, None].to(x.device)
        for layer, blk in enumerate(self.blocks[:-1]):
            x = blk(x, x, self._bias(layer, pos, pos, valid))
        last = len(self.blocks) - 1
        bias = self._bias(last, pos, pos, valid)                       # (B, nh, T, T)
        J = T // self.S
        if J:
            m, hist = self.hist0.expand(B, -1), []
            for j in range(J):
                sl = slice(j * self.S, (j + 1) * self.S)
                m = self._history(m, x[:, sl], valid[:, sl])
                hist.append(m)
            hist = torch.stack(hist, 1)                                # (B, J, H)
            hb = self._hist_bias(pos, torch.arange(J, device=x.device)).expand(B, -1, -1, -1)
            x = self.blocks[last](x, torch.cat([x, hist], 1), torch.cat([bias, hb], -1))
        else:
            x = self.blocks[last](x, x, bias)
        return self.ln(x)

    def init_state(self, device) -> dict[str, Any]:
        s = super().init_state(device)
        s["m"] = self.hist0.detach().clone()
        s["hist"] = []                                                 # [(j, token (H,))], recent
        return s

    def step(self, states: list[dict], x_new: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        L = self.L if self.L is not None else 0
        keep = max(self.C + L, self.S)
        last = len(self.blocks) - 1
        new_states, outs = [], []
        for i, s in enumerate(states):
            n = s["n"]
            layers = list(s["layers"])
            h = x_new[i:i + 1]
            for l, blk in enumerate(self.blocks[:-1]):
                buf = torch.cat([layers[l], h])[-keep:]
                layers[l] = buf
                kpos = torch.arange(n + 1 - len(buf), n + 1, device=h.device)
                valid = torch.ones(1, len(buf), dtype=torch.bool, device=h.device)
                h = blk(h[None], buf[None], self._bias(l, kpos[-1:], kpos, valid))[0]
            buf = torch.cat([layers[last], h])[-keep:]
            layers[last] = buf
            m, hist = s["m"], list(s["hist"])
            if (n + 1) % self.S == 0:                                  # a span just completed
                span = buf[-self.S:][None]
                m = self._history(m[None], span, torch.ones(1, self.S, dtype=torch.bool, device=h.device))[0]
                hist = (hist + [((n + 1) // self.S - 1, m)])[-self.keep_hist:]
            kpos = torch.arange(n + 1 - len(buf), n + 1, device=h.device)
            v = min(L + 1, len(buf))
            qpos = kpos[-v:]
            valid = torch.ones(1, len(buf), dtype=torch.bool, device=h.device)
            bias = self._bias(last, qpos, kpos, valid)
            if hist:
                hidx = torch.tensor([j for j, _ in hist], device=h.device)
                kv = torch.cat([buf, torch.stack([t for _, t in hist])])
                bias = torch.cat([bias, self._hist_bias(qpos, hidx)], -1)
            else:
                kv = buf
            out = self.blocks[last](buf[None, -v:], kv[None], bias)[0]
            outs.append(self.ln(out))
            new_states.append({"n": n + 1, "layers": layers, "m": m, "hist": hist})
        return new_states, outs


def crf_advance(alpha: torch.Tensor, e: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """A CRF's forward message, normalised: ``alpha`` (..., C) the previous position's, ``e``
    (..., C) this one's emissions, ``trans`` (..., C, C) [from, to], broadcast over the leading
    dimensions (one CRF offline, several side by side live: ``ChainBank``)."""
    # log_softmax normalises in one kernel, where ``a - logsumexp(a)`` takes about ten ops
    return torch.log_softmax(e + torch.logsumexp(alpha[..., :, None] + trans, -2), -1)


def crf_retreat(nxt: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """A CRF's backward message, normalised: ``nxt`` (..., C) the next position's emissions
    plus its backward message; ``crf_advance`` run backwards."""
    return torch.log_softmax(torch.logsumexp(trans + nxt[..., None, :], -1), -1)


class LookaheadCRF(nn.Module):
    """Linear-chain CRF marginals with a bounded backward window.

    Output at t: log softmax(alpha_t + beta_t). alpha_t(y) = e_t(y) + logsumexp_y'(alpha_{t-1}(y')
    + A[y', y]) is the forward message (causal, so the live step caches it: ``ChainBank``);
    beta_t sums over the label paths of only the next ``window`` events (None: to the
    session's end). Messages are renormalised as they go, which the final log-softmax makes
    harmless."""

    def __init__(self, n_labels: int, window: Optional[int]):
        super().__init__()
        self.trans = nn.Parameter(torch.zeros(n_labels, n_labels))     # A[from, to]
        self.W = window

    def _beta(self, e: torch.Tensor, next_valid: torch.Tensor, window: int) -> torch.Tensor:
        # e: (B, T, C); next_valid: (B, T) whether t + 1 exists -> beta (B, T, C)
        B, T, C = e.shape
        beta = e.new_zeros(B, T, C)
        for _ in range(window):
            b = crf_retreat(torch.cat([e[:, 1:] + beta[:, 1:], e.new_zeros(B, 1, C)], 1), self.trans)
            beta = torch.where(next_valid[..., None], b, torch.zeros_like(b))
        return beta

    def forward(self, e: torch.Tensor, lengths: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        # window: look at most that many events ahead instead of self.W (never more)
        B, T, C = e.shape
        a = torch.log_softmax(e[:, 0], -1)
        alphas = [a]
        for t in range(1, T):
            a = crf_advance(a, e[:, t], self.trans)
            alphas.append(a)
        alpha = torch.stack(alphas, 1)
        pos = torch.arange(T, device=e.device)
        next_valid = pos[None, :] + 1 < lengths[:, None].to(e.device)
        W = T - 1 if self.W is None else self.W
        if window is not None:
            W = min(W, window)
        return torch.log_softmax(alpha + self._beta(e, next_valid, W), -1)


class LookaheadTCN(nn.Module):
    """Causal dilated residual convolutions, then a convolution over the next L events."""

    def __init__(self, a: ModelConfig):
        super().__init__()
        h = a.hidden_dim
        self.L = a.lookahead if a.lookahead is not None else 8
        self.dil = [2 ** i for i in range(max(1, a.num_layers + 1))]
        self.convs = nn.ModuleList(nn.Conv1d(h, h, 3, dilation=d) for d in self.dil)
        self.ahead = nn.Conv1d(h, h, self.L + 1)
        self.drop = nn.Dropout(a.dropout)
        self.receptive = sum(2 * d for d in self.dil)
        self.out_dim = 2 * h

    def _causal(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, H, T) -> (B, H, T), position t sees t - receptive .. t
        for conv, d in zip(self.convs, self.dil):
            x = x + self.drop(F.gelu(conv(F.pad(x, (2 * d, 0)))))
        return x

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        mask = (torch.arange(T, device=x.device)[None] < lengths[:, None].to(x.device)).float()
        c = self._causal((x * mask[..., None]).transpose(1, 2)) * mask[:, None]
        a = self.ahead(F.pad(c, (0, self.L)))                        # sees t .. t+L (zeros past end)
        return torch.cat([c, a], 1).transpose(1, 2)

    def init_state(self, device) -> dict[str, Any]:
        H = self.ahead.in_channels
        return {"x": torch.zeros(0, H, device=device), "c": torch.zeros(0, H, device=device)}

    def step(self, states: list[dict], x_new: torch.Tensor) -> tuple[list[dict], list[torch.Tensor]]:
        new_states, outs = [], []
        for i, s in enumerate(states):
            # the buffer holds exactly the receptive field, so the newest causal output is exact
            xs = torch.cat([s["x"], x_new[i:i + 1]])[-(self.receptive + 1):]
            c_new = self._causal(xs.T[None])[0, :, -1]
            cs = torch.cat([s["c"], c_new[None]])[-(self.L + 1):]
            a = self.ahead(F.pad(cs.T[None], (0, self.L)))[0].T         # (v, H)
            outs.append(torch.cat([cs, a], -1))
            new_states.append({"x": xs, "c": cs})
        return new_states, outs


class AttentionLSTM(LookaheadLSTM):
    """BiLSTM + attention: each event also attends over the forward states of its context."""

    def __init__(self, a: ModelConfig):
        super().__init__(a)
        self.C = a.context
        self.att = nn.MultiheadAttention(a.hidden_dim, a.nhead, batch_first=True)
        self.out_dim = 3 * a.hidden_dim

    def forward(self, x: torch.Tensor, lengths: torch.Tensor,
                horizon: Optional[torch.Tensor] = None) -> torch.Tensor:
        fb = super().forward(x, lengths, horizon)
        f = fb[..., :self.fwd.hidden_size]
        T = x.shape[1]
        i = torch.arange(T, device=x.device)
        d = i[None, :] - i[:, None]
        blocked = (d > 0) | (d <= -self.C)                             # causal, within context
        ctx, _ = self.att(f, f, f, attn_mask=blocked, need_weights=False)
        return torch.cat([fb, ctx], -1)

    def init_state(self, device):
        s = super().init_state(device)
        s["hist"] = torch.zeros(0, self.fwd.hidden_size, device=device)
        return s

    def step(self, states, x_new):
        new_states, outs = super().step(states, x_new)
        res = []
        for s_old, s, o in zip(states, new_states, outs):
            hist = torch.cat([s_old["hist"], s["f"][-1:]])[-(self.C + self.L):]
            s["hist"] = hist
            v = len(o)
            # position j (of the v affected) attends over history up to itself
            ctxs = []
            for j in range(v):
                upto = len(hist) - (v - 1 - j)
                kv = hist[max(0, upto - self.C):upto][None]
                c, _ = self.att(kv[:, -1:], kv, kv, need_weights=False)
                ctxs.append(c[0, 0])
            res.append(torch.cat([o, torch.stack(ctxs)], -1))
        return new_states, res


ENCODERS = {"bilstm": LookaheadLSTM, "transformer": LookaheadTransformer, "tcn": LookaheadTCN,
            "bilstm_attn": AttentionLSTM, "ht_transformer": HistoryTransformer}


def crf_split(lookahead: Optional[int], crf: bool) -> tuple[Optional[int], Optional[int]]:
    """(encoder lookahead, CRF backward window) that together see ``lookahead`` events ahead."""
    if not crf:
        return lookahead, 0
    if lookahead is None:
        return None, None
    w = lookahead // 2
    return lookahead - w, w


class WidePath(nn.Module):
    """The linear part: label scores from the features of the event and its neighbours, one
    weight table per offset o = -P .. +F (lexical ids through an EmbeddingBag, numbers through
    a linear map), a learned score for a neighbour before the session's start, and a label
    bias: a CRF's state features over a window. Offsets past what a position may see (the
    lookahead, or its ``horizon`` while training at every depth) contribute nothing.

    Beside a network it adds CRF-like lexical strength; alone under a ``LookaheadCRF`` it is
    the linear-chain CRF of ``arch="crf"``. Live, ``WideBank`` steps it."""

    def __init__(self, n_lex: int, n_nums: int, n_labels: int, past: int, future: int, lookahead: int):
        super().__init__()
        self.P, self.F, self.L = past, future, lookahead
        O = past + future + 1
        self.O, self.C = O, n_labels
        # one table for every offset slot: row = feature id, columns = slot * C + label
        self.table = nn.Parameter(torch.zeros(max(n_lex, 1), O * n_labels))
        self.nums = nn.Parameter(torch.zeros(O, n_nums, n_labels))
        self.before_start = nn.Parameter(torch.zeros(past, n_labels))   # offset -P .. -1
        self.bias = nn.Parameter(torch.zeros(n_labels))

    def scores(self, lex: torch.Tensor, nums: torch.Tensor, index=None) -> torch.Tensor:
        # lex (B, T, X), nums (B, T, M) -> (B, T, O, C): each event's scores at every offset
        # slot. ``index``: ``bag_index(lex)``, when the caller has it.
        B, T = lex.shape[:2]
        sc = bag(self.table, lex, index=index)                         # (B*T, O*C)
        M = self.nums.shape[1]
        if M:  # one matmul against the (M, O*C) view of the number weights
            sc = sc + nums.reshape(B * T, M) @ self.nums.transpose(0, 1).reshape(M, self.O * self.C)
        return sc.reshape(B, T, self.O, self.C)

    def forward(self, lex: torch.Tensor, nums: torch.Tensor, lengths: torch.Tensor,
                horizon: Optional[torch.Tensor] = None) -> torch.Tensor:
        sc = self.scores(lex, nums)                                    # (B, T, O, C)
        B, T = lex.shape[:2]
        pos = torch.arange(T, device=lex.device)
        valid = pos[None, :] < lengths[:, None].to(lex.device)          # (B, T)
        out = sc.new_zeros(B, T, sc.shape[-1]) + self.bias
        for slot, o in enumerate(range(-self.P, self.F + 1)):
            src = pos + o                                               # position read by t
            ok = (src >= 0) & (src < T)
            col = torch.zeros_like(out)
            col[:, ok] = sc[:, src[ok], slot]
            if o < 0:                                                   # before the start
                col[:, src < 0] = self.before_start[slot]
            keep = valid & torch.cat([valid[:, o:], valid.new_zeros(B, min(o, T))], 1) if o > 0 else valid
            if horizon is not None and o > 0:
                keep = keep & (horizon.to(lex.device) >= o)
            out = out + col * keep[..., None]
        return out


# ------------------------------------------------------------------------------------------
# Streaming: wide paths and CRFs advanced by one event per session, many at once
# ------------------------------------------------------------------------------------------

def last_rows(n: Sequence[int], K: int, device) -> Optional[torch.Tensor]:
    """Indices into a round's B * K rows (session after session, K each, oldest first) of
    each session's last min(n_i, K) rows: the positions it has. None when every session has K."""
    if min(n) >= K:
        return None
    return torch.tensor([i * K + r for i, m in enumerate(n) for r in range(K - min(m, K), K)], device=device)


class WideBank:
    """``WidePath``s advanced by one event per session together: a network's own, a CRF's, or
    every member's of a ``Mixture`` (one set of ops per round for all of them). Nothing is
    copied: each step reads the paths' own weights, so what is trained or loaded is what runs.

    A session's state is one buffer of every path's scores of its last Kw events at each of
    the path's offsets (Kw: the longest P + L + 1), computed once per event, when it arrives.
    ``step`` gives each path's emissions of the session's last L_m + 1 events, which sum their
    terms from the buffer in one gather and one ``index_add_`` for all paths, in the order
    ``WidePath.forward`` adds them; rows before a session's start are for the caller to drop."""

    def __init__(self, wides: Sequence[WidePath]):
        self.wides = list(wides)
        if len({w.C for w in wides}) != 1 or len({w.nums.shape[1] for w in wides}) != 1:
            raise ConfigError("wide paths stepped together need the same labels and numbers")
        self.C = wides[0].C
        self.Kw = max(w.P + w.L + 1 for w in wides)
        self.V = [w.L + 1 for w in wides]                              # emission rows per path
        self.v_off = list(accumulate(self.V, initial=0))
        o_off = list(accumulate((w.O for w in wides), initial=0))
        p_off = list(accumulate((w.P for w in wides), initial=0))
        # one term per (output row, offset): the buffer row and slot it reads, whether it reads
        # an earlier event, and the before-start score it reads instead when that event is
        # older than the session
        terms = [(self.v_off[m] + j, self.Kw - self.V[m] + j + o, o_off[m] + slot, o < 0,
                  p_off[m] + min(slot, max(w.P - 1, 0)))
                 for m, w in enumerate(wides)
                 for j in range(self.V[m])                              # row j: depth V_m-1-j
                 for slot, o in enumerate(range(-w.P, min(w.F, self.V[m] - 1 - j) + 1))]
        self._terms = [torch.tensor(t) for t in zip(*terms)]           # js, rows, slots, past, before
        self.Osum, self.any_past = o_off[-1], p_off[-1] > 0
        self._on: dict[str, tuple[torch.Tensor, ...]] = {}

    def init_state(self, device) -> torch.Tensor:
        return torch.zeros(self.Kw, self.Osum, self.C, device=device, dtype=self.wides[0].bias.dtype)

    def _scores(self, lex: torch.Tensor, nums: torch.Tensor, index) -> torch.Tensor:
        # lex (B, X), nums (B, M_n) -> (B, Osum, C): the new event's scores at every path's
        # offsets (each path's own lookup, then one product for the numbers)
        sc = torch.cat([bag(w.table, lex[:, None], index=index) for w in self.wides], 1)
        n_nums = self.wides[0].nums.shape[1]
        if n_nums:
            sc = sc + nums @ torch.cat([w.nums.transpose(0, 1).reshape(n_nums, w.O * self.C) for w in self.wides], 1)
        return sc.reshape(lex.shape[0], self.Osum, self.C)

    def step(self, bufs: Sequence[torch.Tensor], n: Sequence[int], events: dict[str, Any]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """``bufs``: each session's state; ``n``: the events each has seen, the new one
        included; ``events``: the round's (B, 1, ...) inputs (with ``lex_index``). Returns the
        new states (B, Kw, Osum, C) and the emissions (B, sum_m L_m + 1, C), path after path."""
        new = self._scores(events["lex"][:, 0], events["nums"][:, 0], events.get("lex_index"))
        buf = torch.cat([torch.stack(list(bufs))[:, 1:], new[:, None]], 1)
        key = str(buf.device)
        if key not in self._on:                                         # index tensors, once per device
            self._on[key] = tuple(t.to(buf.device) for t in self._terms)
        js, rows, slots, past, before = self._on[key]
        val = buf[:, rows, slots]                                       # (B, Q, C)
        if self.any_past and min(n) < self.Kw:    # rows older than a session read before-start
            fresh = past[None, :] & ((self.Kw - 1 - rows)[None, :] >= torch.tensor(n, device=buf.device)[:, None])
            val = torch.where(fresh[..., None], torch.cat([w.before_start for w in self.wides])[before], val)
        out = torch.cat([w.bias.expand(v, self.C) for w, v in zip(self.wides, self.V)]).expand(len(n), -1, -1).clone()
        out.index_add_(1, js, val)
        return buf, out


class ChainBank:
    """``LookaheadCRF``s advanced by one event per session together, each over its own
    emissions: a network's CRF output layer, a CRF's, or every CRF member's of a ``Mixture``
    (one set of ops per round for all of them, with their own weights).

    CRF m has Le_m provisional rows (the events after an event that its emissions still
    read: a CRF's state features, a network's lookahead) and a backward window of W_m; they
    share K = Le_m + W_m + 1, the lookahead plus one. So each one's segment of a session's last
    K events is laid out the same way: W_m + 1 final rows, then Le_m provisional ones.

    A session's state holds, per CRF, the K rows of emissions and of forward messages of its
    segment, ``(2, M, K, C)`` (rows past the final ones are overwritten each round). Forward
    messages advance from the first row that is cached in no CRF, a ``where`` taking the
    cached one for those that have it, and restart at a session's first event; the backward
    chains run all at once, one per CRF to the segment's end and one per provisional row
    r < Le_m, whose window stops at row r + W_m. ``step`` gives, per CRF, the log-marginals of
    each session's K rows: forward filtering on the newest, fixed-lag smoothing on the oldest.
    The backward chains step in probability space (``_retreat``), in log space when a sum
    underflows there (``_retreat_log``, ``LookaheadCRF._beta``'s steps); the forward messages,
    which the state keeps, are ``crf_advance``'s, as offline."""

    def __init__(self, crfs: Sequence[LookaheadCRF], provisional: Sequence[int]):
        self.crfs = list(crfs)
        self.Le = list(provisional)
        self.W = [c.W or 0 for c in crfs]                              # backward windows
        K = {le + w + 1 for le, w in zip(self.Le, self.W)}
        if len(K) != 1 or len({c.trans.shape[0] for c in crfs}) != 1:
            raise ConfigError("CRFs stepped together need the same lookahead and labels")
        self.K, self.C = K.pop(), crfs[0].trans.shape[0]
        V = [le + 1 for le in self.Le]
        v_off = list(accumulate(V, initial=0))
        self.rows = v_off[-1]                  # emission rows per session: CRF after CRF, Le_m + 1 each
        # where each CRF's emissions go in its segment (its last Le_m + 1 rows); the index past
        # the last emission row reads a zero row
        ep_index = [[v_off[m] + r - (self.K - V[m]) if r >= self.K - V[m] else self.rows for r in range(self.K)]
                    for m in range(len(crfs))]
        self.W_min = min(self.W)
        self._chains = [(m, self.K - 1) for m in range(len(crfs))]
        self._chains += [(m, r + self.W[m]) for m in range(len(crfs)) for r in range(self.Le[m])]
        self.end_min = min(e for _, e in self._chains)
        # CRF m's row r takes its backward message from chain m's row r, or from the short chain
        # c whose end is r + W_m: index into the chains' (N * K) rows. With W_m = 0 that is the
        # chain's end, where the message is 0, as in row K - 1 of every chain (the only end row
        # that ``_retreat`` fills in: rows at or after a chain's end are read nowhere else)
        pick = [m * self.K + r for m in range(len(crfs)) for r in range(self.K)]
        for c, (m, e) in enumerate(self._chains[len(crfs):], len(crfs)):
            pick[m * self.K + e - self.W[m]] = c * self.K + e - self.W[m] if self.W[m] else m * self.K + self.K - 1
        self._index = [torch.tensor(ep_index), torch.tensor([[r < w for r in range(self.K)] for w in self.W]),
                       torch.tensor([m for m, _ in self._chains]), torch.tensor([e for _, e in self._chains]),
                       torch.tensor(pick)]
        self._on: dict[str, tuple[torch.Tensor, ...]] = {}

    def init_state(self, device) -> torch.Tensor:
        return torch.zeros(2, len(self.crfs), self.K, self.C, device=device, dtype=self.crfs[0].trans.dtype)

    def _retreat(self, ec: torch.Tensor, tc: torch.Tensor, ce: torch.Tensor) -> Optional[torch.Tensor]:
        """The chains' backward messages, (N, K, B, C), in probability space: two small ops
        per row where ``crf_retreat`` (log space) takes an exp over (N, B, C, C) and about ten.
        With R (N, C) each row of the transitions' maximum, beta_r = R + log s_r up to a
        constant per chain, row and session (the marginals' log_softmax drops it), where
        s_r = exp(A - R) @ v and v = softmax(e_{r+1} + R) * s_{r+1}, or softmax(e_{r+1}) at
        the chain's end (beta = 0 there). In float64; None when a sum fell below 2 ** -490 or
        is NaN, as underflowed terms could then weigh more than rounding: the caller runs
        ``_retreat_log`` instead (the same messages, slower)."""
        N, B, K, C = ec.shape
        if K == 1:
            return ec.new_zeros(N, 1, B, C)
        tc = tc.double()
        R = tc.amax(-1)                                                  # (N, C) [from]
        Et = torch.exp(tc - R[..., None]).transpose(1, 2)               # (N, C, C) [to, from], in (0, 1]
        g = torch.softmax(ec + R[:, None, None], -1).unbind(2)         # float64, as R is
        h = torch.softmax(ec[:, :, self.end_min:], -1, dtype=torch.float64).unbind(2)
        s = torch.bmm(h[-1], Et)                                         # (N, B, C): row K - 2
        sums = [s]
        for r in range(K - 3, -1, -1):
            v = g[r + 1] * s
            if r + 1 >= self.end_min:       # a chain that ends at row r + 1 starts there
                v = torch.where((ce <= r + 1)[:, None, None], h[r + 1 - self.end_min], v)
            if r % 4 == 0:                  # sums only shrink (g sums to 1, exp(A - R) <= 1)
                v = v / v.amax(-1, keepdim=True)
            s = torch.bmm(v, Et)
            sums.append(s)
        S = torch.stack(sums[::-1], 1)                                   # (N, K - 1, B, C)
        # v's maximum is at least the smallest s / C (softmax's maximum is >= 1 / C), so with
        # every s >= 2 ** -490 the terms that underflowed (< 2 ** -1074 each, times at most C,
        # C / v's maximum after a rescale) are under C**3 * 2 ** -94 of a sum: below rounding
        if not bool(S.amin() >= 2.0 ** -490):
            return None
        return F.pad(S.log_() + R[:, None, None], (0, 0, 0, 0, 0, 1)).to(ec.dtype)

    def _retreat_log(self, ec: torch.Tensor, tc: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """``_retreat`` in log space, ``crf_retreat`` row by row, as the offline
        ``LookaheadCRF._beta`` runs it."""
        C, K, tc = self.C, self.K, tc[:, None]                           # (N, 1, C, C)
        betas = [ec.new_zeros(ec.shape[:2] + (C,))]
        for r in range(K - 2, -1, -1):
            b = crf_retreat(ec[:, :, r + 1] + betas[-1], tc)
            # a chain that ends at or before row r has nothing after it there
            betas.append(torch.where((ce > r)[:, None, None], b, torch.zeros_like(b)) if r >= self.end_min else b)
        return torch.stack(betas[::-1], 1)                               # (N, K, B, C)

    def step(self, segs: Sequence[torch.Tensor], n: Sequence[int], emissions: torch.Tensor
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``segs``: each session's state; ``n``: the events each has seen, the new one
        included; ``emissions``: (B, rows, C), CRF after CRF each session's current emissions of
        its last Le_m + 1 events, oldest first (rows before its start are not read). Returns
        the new states and the log-marginals (M, B, K, C)."""
        M, K, C = len(self.crfs), self.K, self.C
        B = len(n)
        dev = emissions.device
        if str(dev) not in self._on:
            self._on[str(dev)] = tuple(t.to(dev) for t in self._index)
        ep_index, cached, cm, ce, pick = self._on[str(dev)]
        ep = torch.cat([emissions, emissions.new_zeros(B, 1, C)], 1)[:, ep_index].transpose(0, 1)  # (M, B, K, C)
        seg = torch.stack(list(segs), 2)                                 # (2, M, B, K, C)
        cached = cached[:, None, :, None]                                # (M, 1, K, 1)
        # final rows move up one (the oldest drops out); the others take this round's emissions
        # (rows before a session's start hold what they may: no row at or after it reads them,
        # as the forward messages restart at position 0 and the backward ones read later rows)
        e = torch.where(cached, torch.cat([seg[0, :, :, 1:], seg.new_zeros(M, B, 1, C)], 2), ep)
        trans = torch.stack([c.trans for c in self.crfs])                # (M, C, C)
        # -- forward messages: rows before W_m are cached (the last round's row r + 1), the rest
        # advance from the row before (the first from the last round's row 0, when W_m is 0)
        old = seg[1]
        a, fresh = old[:, :, self.W_min], []                              # row W_min - 1
        for r in range(self.W_min, K):
            er = e[:, :, r]
            a = crf_advance(a, er, trans[:, None])
            if K - r in n:                        # row r is some session's first event
                first = torch.tensor([k == K - r for k in n], device=dev)[None, :, None]
                a = torch.where(first, torch.log_softmax(er, -1), a)
            if r < K - 1:
                a = torch.where(cached[:, :, r], old[:, :, r + 1], a)
            fresh.append(a)
        alpha = torch.cat([old[:, :, 1:self.W_min + 1], torch.stack(fresh, 2)], 2)   # (M, B, K, C)
        # -- backward messages: every chain at once, from the segment's end back
        ec, tc = e[cm], trans[cm]                                        # (N, B, K, C), (N, C, C)
        chains = self._retreat(ec, tc, ce)
        if chains is None:                        # a sum underflowed: the same in log space
            chains = self._retreat_log(ec, tc, ce)
        if len(self._chains) > M:
            chains = chains.flatten(0, 1)[pick].view(M, K, B, C)
        beta = chains.transpose(1, 2)                                    # (M, B, K, C)
        return list(torch.stack([e, alpha]).unbind(2)), torch.log_softmax(alpha + beta, -1)


# ------------------------------------------------------------------------------------------
# The tagger
# ------------------------------------------------------------------------------------------

class Tagger(nn.Module):
    """Embedder -> encoder(s) -> classifier(s) -> optional CRF layer.

    ``encoder``/``head`` serve the fused features (or, with late fusion, the tabular
    modality; ``extra_encoders``/``extra_heads`` serve text and image). Emissions are the sum
    of the heads; with ``crf`` the output is the CRF's bounded-lookahead log-marginals."""

    def __init__(self, args: ModelConfig, class_weights: Optional[torch.Tensor] = None,
                 loss: str = "ce", focal_gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        if args.arch not in ENCODERS and args.arch != "crf":
            raise ConfigError(f"model.arch: {args.arch!r} is not a network; choose from "
                              f"{sorted(ENCODERS) + ['crf']}")
        self.args = args
        if args.lex_ignore and sorted(args.lex_ignore) != list(range(args.n_lex - len(args.lex_ignore), args.n_lex)):
            raise ConfigError(f"model_args: lex_ignore {list(args.lex_ignore)} must be the last lexical ids "
                              f"(up to n_lex {args.n_lex})")
        self.extra_encoders, self.extra_heads = nn.ModuleList(), nn.ModuleList()
        if args.arch == "crf":
            # the linear-chain CRF: causal state features (event and wide_past before it),
            # forward filtering on arrival, fixed-lag smoothing over the lookahead for finals
            self.embed = self.encoder = self.head = None
            # (with wide_future F > 0, state features also read the next F events: emissions
            # are final F events later and the CRF's own window is the rest of the lookahead)
            F_ = 0 if args.lookahead is None else min(args.wide_future, args.lookahead)
            self.enc_lookahead = F_
            crf_window = None if args.lookahead is None else args.lookahead - F_
            self.crf = LookaheadCRF(args.n_labels, crf_window)
            self.wide = WidePath(args.n_lex, args.n_nums, args.n_labels, args.wide_past, F_, F_)
        else:
            self.embed = EventEmbedder(args)
            self.enc_lookahead, crf_window = crf_split(args.lookahead, args.crf_head)
            enc_args = replace(args, lookahead=self.enc_lookahead)
            self.encoder = ENCODERS[args.arch](enc_args)
            self.head = nn.Sequential(nn.Dropout(args.dropout), nn.Linear(self.encoder.out_dim, args.n_labels))
            extra = self.embed.n_streams - 1
            self.extra_encoders = nn.ModuleList(ENCODERS[args.arch](enc_args) for _ in range(extra))
            self.extra_heads = nn.ModuleList(
                nn.Sequential(nn.Dropout(args.dropout), nn.Linear(self.encoder.out_dim, args.n_labels))
                for _ in range(extra))
            self.crf = LookaheadCRF(args.n_labels, crf_window) if args.crf_head else None
            self.wide = None
            if args.n_lex and args.wide and self.enc_lookahead is not None:
                self.wide = WidePath(args.n_lex, args.n_nums, args.n_labels, args.wide_past,
                                     min(args.wide_future, self.enc_lookahead), self.enc_lookahead)
        # live, the wide path and the CRF advance one event per session (plain attributes:
        # they step the modules above with their weights)
        bounded = args.lookahead is not None
        self._wide_step = WideBank([self.wide]) if self.wide is not None and bounded else None
        self._crf_step = ChainBank([self.crf], [self.enc_lookahead]) if self.crf is not None and bounded else None
        self.register_buffer("class_weights", class_weights if class_weights is not None
                             else torch.ones(args.n_labels), persistent=False)
        # lexical ids this model does not read (data.time_of_day auto: the time of day, read by
        # auto's crf_clock alone). Masked before the embedder and the wide path in training, so
        # the wide path's rows for them stay 0 and a WideBank stepping the unmasked ids (a
        # Mixture's, shared with a member that reads them) gives the same scores; live, masked
        # before the embedder's bag
        self.register_buffer("lex_ignore", torch.tensor(args.lex_ignore, dtype=torch.long)
                             if args.lex_ignore else None, persistent=False)
        self.loss_kind, self.focal_gamma, self.label_smoothing = loss, focal_gamma, label_smoothing

    def _unread(self, events: dict[str, Any]) -> dict[str, Any]:
        """``events`` with the ids of ``lex_ignore`` blanked (0, padding), and the lookup plan
        made for the unmasked ids dropped."""
        if self.lex_ignore is None or "lex" not in events:
            return events
        lex = events["lex"]
        out = {k: v for k, v in events.items() if k != "lex_index"}
        out["lex"] = lex.masked_fill(torch.isin(lex, self.lex_ignore), 0)
        return out

    def _streams(self):
        if self.encoder is None:
            return []
        return [(self.encoder, self.head)] + list(zip(self.extra_encoders, self.extra_heads))

    def forward(self, batch: dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        """batch tensors are (B, T, ...) with ``lengths`` (B,); returns (logits (B,T,C), loss)."""
        batch = self._unread(batch)
        xs = self.embed(batch) if self.embed is not None else []       # (B, T, H) or a list
        if not isinstance(xs, list):
            xs = [xs]
        horizon = batch.get("horizon")                                 # (B, T) or None
        logits = 0
        for (enc, head), x in zip(self._streams(), xs):
            if horizon is not None and getattr(enc, "supports_horizon", False):
                logits = logits + head(enc(x, batch["lengths"], horizon))
            else:
                logits = logits + head(enc(x, batch["lengths"]))
        if self.wide is not None:
            logits = logits + self.wide(batch["lex"], batch["nums"], batch["lengths"], horizon)
        if self.crf is not None:
            # with causal emissions (arch crf) a uniform horizon k is the CRF looking k ahead
            window = int(horizon.max()) if horizon is not None and self.encoder is None else None
            logits = self.crf(logits, batch["lengths"], window)         # (B, T, C) log-marginals
        loss = None
        if targets is not None:
            loss = self.loss(logits, targets)
        return logits, loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat, tgt = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if self.loss_kind == "focal":
            keep = tgt != IGNORE
            flat, tgt = flat[keep], tgt[keep]
            logp = F.log_softmax(flat, -1).gather(1, tgt[:, None])[:, 0]
            w = self.class_weights[tgt]
            return (-(1 - logp.exp()) ** self.focal_gamma * logp * w).sum() / w.sum().clamp(min=1e-9)
        return F.cross_entropy(flat, tgt, weight=self.class_weights, ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)

    # ---- streaming: advance sessions one event at a time ---------------------------------
    @property
    def streamable(self) -> bool:
        return self.args.lookahead is not None

    @property
    def depth_exact(self) -> bool:
        """Whether ``forward`` with a uniform ``horizon`` k gives exactly what ``step`` shows
        with k later events in (the contract suite checks it): the CRF arch, or encoders that
        take a horizon without a CRF head (whose emissions would still be provisional)."""
        if self.encoder is None:                                       # arch crf
            return self.wide.F == 0
        return self.crf is None and all(getattr(enc, "supports_horizon", False) for enc, _ in self._streams())

    def init_state(self, device=None, own_wide: bool = True) -> dict[str, Any]:
        """A new session's state. ``own_wide=False``: without the wide path's, for a caller
        that steps it (a ``Mixture`` steps all its members' together)."""
        device = device or next(self.parameters()).device
        state = {"n": 0, "enc": [enc.init_state(device) for enc, _ in self._streams()]}
        if self._wide_step is not None and own_wide:
            state["wide"] = self._wide_step.init_state(device)
        if self._crf_step is not None:
            state["crf"] = self._crf_step.init_state(device)
        return state

    @torch.no_grad()
    def step(self, states: list[dict], events: dict[str, torch.Tensor], wide: Optional[torch.Tensor] = None
             ) -> tuple[list[dict], list[torch.Tensor]]:
        """Append one event to each session. ``events`` tensors are (B, 1, ...). ``wide``: the
        wide path's rows of the round, (B, enc_lookahead + 1, C), from a caller that steps it
        (states made with ``own_wide=False``).

        Returns the new states and, per session, logits (v, C) for its last v events (the ones
        whose label the new event may still change, oldest first; the oldest is final when
        v == lookahead + 1)."""
        events = with_lex_index(events)
        n = [s["n"] + 1 for s in states]                                 # events seen
        new = [{"n": m, "enc": []} for m in n]
        V = self.enc_lookahead + 1                                       # emission rows
        dev = events["event"].device
        # the round's emissions as one (rows, C) tensor, each session's last min(n, V) rows
        # oldest first, split per session at the end: a few ops per round, not per session
        xs = self.embed(with_lex_index(self._unread(events))) if self.embed is not None else []
        if not isinstance(xs, list):
            xs = [xs]
        emissions = None
        for m, ((enc, head), x) in enumerate(zip(self._streams(), xs)):
            enc_states, outs = enc.step([s["enc"][m] for s in states], x[:, 0])
            for ns, es in zip(new, enc_states):
                ns["enc"].append(es)
            logits = head(torch.cat(outs))
            emissions = logits if emissions is None else emissions + logits
        have = last_rows(n, V, dev)          # where those rows sit among B * V (None: all V)
        if self._wide_step is not None and wide is None:
            bufs, wide = self._wide_step.step([s["wide"] for s in states], n, events)
            for ns, b in zip(new, bufs.unbind(0)):
                ns["wide"] = b
        if self._crf_step is None:
            if wide is not None:
                w = wide.reshape(-1, wide.shape[-1])
                w = w if have is None else w[have]
                emissions = w if emissions is None else emissions + w
            return new, list(emissions.split([min(m, V) for m in n]))
        # the CRF reads every session's V rows (B, V, C); rows before a session's start are 0
        if emissions is not None and have is not None:
            emissions = emissions.new_zeros(len(n) * V, emissions.shape[-1]).index_copy_(0, have, emissions)
        if emissions is not None:
            emissions = emissions.reshape(len(n), V, -1)
        if wide is not None:
            emissions = wide if emissions is None else emissions + wide
        segs, lm = self._crf_step.step([s["crf"] for s in states], n, emissions)
        for ns, sg in zip(new, segs):
            ns["crf"] = sg
        K = self._crf_step.K
        rows = lm[0].reshape(len(n) * K, -1)
        keep = last_rows(n, K, dev)
        return new, list((rows if keep is None else rows[keep]).split([min(m, K) for m in n]))


# ------------------------------------------------------------------------------------------
# A mixture of taggers
# ------------------------------------------------------------------------------------------

def longest_lookahead(lookaheads: Iterable[Optional[int]]) -> Optional[int]:
    """The lookahead of models combined: the longest (None, unbounded, if any is)."""
    Ls = list(lookaheads)
    return None if None in Ls else max(Ls)


@dataclass
class MixtureConfig:
    """A ``Mixture``'s constructor arguments (stored in the checkpoint like ``ModelConfig``):
    its members' arguments and, per visible depth k = 0..L, one weight per member."""

    members: list[dict[str, Any]]
    depth_weights: list[list[float]]
    # per depth 0..L, one bias per label added to the mixed log-probabilities (``auto``'s
    # prior correction, ``trainer.train.prior_bias``); None: none (and older checkpoints)
    depth_bias: Optional[list[list[float]]] = None
    arch: str = "mixture"

    @property
    def n_labels(self) -> int:
        return self.members[0]["n_labels"]

    @property
    def lookahead(self) -> Optional[int]:
        # the longest member's: a member that reads fewer later events (a network under
        # ``model.network_lookahead``) is final early and holds its final output
        return longest_lookahead(m["lookahead"] for m in self.members)

    @property
    def context(self) -> int:
        return max(m.get("context", 0) for m in self.members)

    image_backbone = None
    image_size = 0

    def to_args(self) -> dict[str, Any]:
        return {"arch": self.arch, "members": [dict(m) for m in self.members],
                "depth_weights": [list(map(float, w)) for w in self.depth_weights],
                "lookahead": self.lookahead, "n_labels": self.n_labels,
                **({"depth_bias": [list(map(float, b)) for b in self.depth_bias]}
                   if self.depth_bias is not None else {})}

    @classmethod
    def from_args(cls, d: dict[str, Any]) -> "MixtureConfig":
        unknown = sorted(set(d) - {"arch", "members", "depth_weights", "depth_bias", "lookahead", "n_labels"})
        if unknown:  # as for ModelConfig: a key this version does not know is an error
            raise ConfigError(f"model_args: unknown mixture argument(s) {unknown}")
        for key in ("members", "depth_weights"):
            if key not in d:
                raise ConfigError(f"model_args: {key!r} is missing")
        bias = d.get("depth_bias")
        return cls([dict(m) for m in d["members"]], [list(map(float, w)) for w in d["depth_weights"]],
                   None if bias is None else [list(map(float, b)) for b in bias])


class Mixture(nn.Module):
    """Taggers combined by a weighted sum of their log-probabilities (a product of experts),
    with weights that depend on how many later events the label has seen: a network and a
    CRF, say, err differently, and which one to trust more changes between the label shown on
    arrival and the final one. ``model.arch: auto`` fits the weights on held-out sessions.

    Same interface as ``Tagger``: ``forward`` gives the final (depth L) output, ``step`` the
    outputs of the last v events, each at its own depth; so finals still equal offline.
    ``step`` advances every member's wide path as one (``WideBank``) and the CRF members' CRFs
    as one (``ChainBank``): a further CRF member adds rows to the same ops (and its own
    lookup), not a set of ops of its own."""

    def __init__(self, args: MixtureConfig):
        super().__init__()
        self.args = args
        self.members = nn.ModuleList(Tagger(ModelConfig.from_args(m)) for m in args.members)
        self.L = L = args.lookahead             # the longest member's
        if L is None:
            raise ConfigError("mixture members need a bounded lookahead")
        if len(args.depth_weights) != L + 1 or any(len(w) != len(self.members) for w in args.depth_weights):
            raise ConfigError("mixture weights: one row per depth 0..L, one weight per member")
        self.register_buffer("weights", torch.tensor(args.depth_weights, dtype=torch.float32))
        bias = args.depth_bias
        if bias is not None and (len(bias) != L + 1 or any(len(b) != args.n_labels for b in bias)):
            raise ConfigError("mixture depth_bias: one row per depth 0..L, one bias per label")
        # None when there is none: older checkpoints load unchanged, and no add per round
        self.register_buffer("bias", None if bias is None else torch.tensor(bias, dtype=torch.float32))
        # live, every member's wide path steps in one bank, the CRF members' first (their rows
        # are the CRF bank's emissions), and the CRF members' CRFs in another (plain
        # attributes: the members own the weights); the networks step themselves, with their
        # wide path's rows from the bank
        self._crf_members = [i for i, m in enumerate(self.members) if m.args.arch == "crf"]
        order = self._crf_members + [i for i, m in enumerate(self.members)
                                     if m.args.arch != "crf" and m.wide is not None]
        self.wide_bank = WideBank([self.members[i].wide for i in order]) if order else None
        self._wide_rows = {i: slice(self.wide_bank.v_off[k], self.wide_bank.v_off[k + 1]) for k, i in enumerate(order)}
        crfs = [self.members[i] for i in self._crf_members]
        self.chain_bank = ChainBank([m.crf for m in crfs], [m.enc_lookahead for m in crfs]) if crfs else None
        # live, each member's rows are only those of the depths that weigh it: 0..R_i - 1, R_i
        # one past the deepest depth with a non-zero weight (its rows at deeper depths would be
        # multiplied by 0). A member that reads fewer later events than that (L_i + 1 < R_i)
        # has its final rows of the events between held in the session's state, D_i of them;
        # one weighed on arrival only (``bilstm_causal``) gives one row per session, holds none
        reach = [1 + max((d for d, w in enumerate(args.depth_weights) if w[i] != 0), default=-1)
                 for i in range(len(self.members))]
        self._rows = {i: (r, m.args.lookahead + 1) for i, (r, m) in enumerate(zip(reach, self.members))
                      if r < L + 1 or m.args.lookahead < L}
        self._held = {i: r - v for i, (r, v) in self._rows.items() if r > v}

    @property
    def streamable(self) -> bool:
        return True

    @property
    def depth_exact(self) -> bool:
        return all(m.depth_exact for m in self.members)

    def forward(self, batch: dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None):
        # each position is weighted by the depth it has: its horizon, at most L, and at most
        # the events after it in its session (a session's tail at its end is final with the
        # weights of the depth it reached, as the live worker finalises it)
        L = self.L
        lengths = batch["lengths"].to(self.weights.device)
        T = batch["event"].shape[1]
        pos = torch.arange(T, device=self.weights.device)
        depth = (lengths[:, None] - 1 - pos[None, :]).clamp(0, L)
        horizon = batch.get("horizon")
        if horizon is not None:
            depth = torch.minimum(depth, horizon.to(depth.device).clamp(0, L))
        w = self.weights[depth]                                                 # (B, T, M)
        out = sum(w[..., i:i + 1] * torch.log_softmax(m(batch)[0], -1) for i, m in enumerate(self.members))
        if self.bias is not None:
            out = out + self.bias[depth]
        return out, None

    def init_state(self, device=None) -> dict[str, Any]:
        # a CRF member's state is in the banks' (None in its own place)
        device = device or self.weights.device
        crf = set(self._crf_members)
        state = {"n": 0, "members": [None if i in crf else m.init_state(device, own_wide=False)
                                     for i, m in enumerate(self.members)]}
        if self.wide_bank is not None:
            state["wide"] = self.wide_bank.init_state(device)
        if self.chain_bank is not None:
            state["crf"] = self.chain_bank.init_state(device)
        if self._held:
            C = self.args.n_labels
            state["held"] = {i: torch.zeros(d, C, device=device) for i, d in self._held.items()}
        return state

    @torch.no_grad()
    def step(self, states: list[dict], events: dict[str, torch.Tensor]) -> tuple[list[dict], list[torch.Tensor]]:
        events = with_lex_index(events)  # one lookup plan for every member
        n = [s["n"] + 1 for s in states]                                 # events seen
        new = [{"n": m, "members": [None] * len(self.members)} for m in n]
        rows_by_member: list[Optional[torch.Tensor]] = [None] * len(self.members)
        K = self.L + 1                               # every member labels a session's last
        keep = last_rows(n, K, self.weights.device)  # min(n, K) events
        wide = None
        if self.wide_bank is not None:
            bufs, wide = self.wide_bank.step([s["wide"] for s in states], n, events)
            for ns, b in zip(new, bufs.unbind(0)):
                ns["wide"] = b
        if self.chain_bank is not None:
            segs, lm = self.chain_bank.step([s["crf"] for s in states], n, wide[:, :self.chain_bank.rows])
            for ns, sg in zip(new, segs):
                ns["crf"] = sg
            lm = lm.reshape(lm.shape[0], len(n) * K, -1)
            for i, rows in zip(self._crf_members, (lm if keep is None else lm[:, keep]).unbind(0)):
                rows_by_member[i] = rows
        for i, m in enumerate(self.members):
            if rows_by_member[i] is not None:                            # a CRF member
                continue
            ms, outs = m.step([s["members"][i] for s in states], events,
                              wide[:, self._wide_rows[i]] if i in self._wide_rows else None)
            for ns, st in zip(new, ms):
                ns["members"][i] = st
            rows_by_member[i] = torch.cat(outs)
        # the whole round at once (row-wise ops, so each row is what it would be alone): rows
        # of all sessions stacked, one log_softmax per member, the weights of each row's depth,
        # added member by member in the order ``forward`` sums them (so finals equal offline)
        sizes = [min(m, K) for m in n]
        depth = torch.tensor([d for v in sizes for d in range(v - 1, -1, -1)], device=self.weights.device)
        w = self.weights[depth]                                             # (rows, M); row r of a
        mixed = None                                                        # session has v-1-r
        for i, rows in enumerate(rows_by_member):                           # later events
            # its rows at the depths that weigh it, and where they go (None: every row)
            rows, at = self._member_rows(i, states, new, n, rows) if i in self._rows else (rows, None)
            if at is None:
                term = w[:, i:i + 1] * torch.log_softmax(rows, -1)
                mixed = term if mixed is None else mixed + term
                continue
            term = w[at, i:i + 1] * torch.log_softmax(rows, -1)
            mixed = (torch.zeros(len(depth), term.shape[-1], dtype=term.dtype, device=term.device)
                     if mixed is None else mixed).index_add_(0, at, term)
        if self.bias is not None:
            mixed = mixed + self.bias[depth]
        return new, list(mixed.split(sizes))

    def _member_rows(self, i: int, states: list[dict], new: list[dict], n: Sequence[int], rows: torch.Tensor
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Member i's rows of the round at the depths that weigh it (each session's last
        min(n, R) events, R from ``_rows``) and where they go among the round's rows (None:
        R is L + 1, so they are every row of the round, in order). Its
        ``step`` gave each session's last min(n, L_i + 1); where R is more, they are preceded
        by the final rows it gave the events L_i + 1 .. R - 1 back, which the sessions' states
        hold; the held rows move on by one, taking the event that became final for it now."""
        (R, V), K, dev = self._rows[i], self.L + 1, rows.device
        if R <= V:                                   # the last R of its own rows
            if R < V:
                got = [min(m, V) for m in n]
                start = accumulate(got[:-1], initial=0)
                rows = rows[torch.tensor([s + g - r for s, g, m in zip(start, got, n)
                                          for r in range(min(m, R), 0, -1)], device=dev)]
        else:
            D = R - V
            have = last_rows(n, V, dev)              # the member's rows, right-aligned in V slots
            if have is not None:
                rows = rows.new_zeros(len(n) * V, rows.shape[-1]).index_copy_(0, have, rows)
            full = torch.cat([torch.stack([s["held"][i] for s in states]), rows.reshape(len(n), V, -1)], 1)
            for ns, h in zip(new, full[:, 1:D + 1].unbind(0)):   # (rows before a session's start are
                ns.setdefault("held", {})[i] = h                    # never read: see last_rows)
            keep = last_rows(n, R, dev)
            rows = full.reshape(len(n) * R, -1)
            rows = rows if keep is None else rows[keep]
        if R == K:
            return rows, None
        end = accumulate(min(m, K) for m in n)       # each session's rows end there in the round
        at = torch.tensor([e - r for e, m in zip(end, n) for r in range(min(m, R), 0, -1)], device=dev)
        return rows, at


def checkpoint_args(model_args: dict[str, Any]) -> ModelConfig | MixtureConfig:
    """A checkpoint's ``model_args`` as the config they describe (older versions' included)."""
    if model_args.get("arch") == "mixture":
        return MixtureConfig.from_args(model_args)
    return ModelConfig.from_args(model_args)


def build_model(args: ModelConfig | MixtureConfig) -> nn.Module:
    """The network a config describes: a ``Tagger`` or a ``Mixture``."""
    return Mixture(args) if isinstance(args, MixtureConfig) else Tagger(args)


@torch.no_grad()
def session_logits(model: nn.Module, sessions, device=None, batch_size: int = 32) -> list:
    """Per session, every event's logits at the model's full lookahead (what offline
    prediction and the final labels use), as numpy (n, C); sessions batched by length."""
    model.eval()
    out = [None] * len(sessions)
    order = sorted(range(len(sessions)), key=lambda i: len(sessions[i]))
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        logits, _ = model(collate([sessions[i] for i in idx], device))
        for j, i in enumerate(idx):
            out[i] = logits[j, :len(sessions[i])].float().cpu().numpy()
    return out


@torch.no_grad()
def arrival_logits(model: nn.Module, sessions, device=None, batch_size: int = 16) -> list:
    """Per session, every event's logits on arrival (no later event visible: what the live
    worker's first record is decided on), as numpy (n, C). A ``depth_exact`` model gives them
    in one forward pass at horizon 0; any other is replayed through ``step``."""
    model.eval()
    out = [None] * len(sessions)
    if getattr(model, "depth_exact", False):
        for g in range(0, len(sessions), batch_size):
            group = list(range(g, min(g + batch_size, len(sessions))))
            batch = collate([sessions[i] for i in group], device)
            batch["horizon"] = torch.zeros(batch["event"].shape[:2], dtype=torch.long, device=batch["event"].device)
            logits, _ = model(batch)
            for j, i in enumerate(group):
                out[i] = logits[j, :len(sessions[i])].float().cpu().numpy()
        return out
    for i, s in enumerate(sessions):
        state = [model.init_state(device)]
        rows = []
        for t in range(len(s)):
            batch = collate([s.rows(t, t + 1)], device)
            batch.pop("lengths")
            state, outs = model.step(state, batch)
            rows.append(outs[0][-1])
        out[i] = torch.stack(rows).float().cpu().numpy()
    return out


def collate(sessions, device=None, with_targets: bool = False):
    """Encoded sessions (``features.EncodedSession``) -> padded (B, T, ...) tensors.

    Pads at the end, so causal parts of the encoders never see padding."""
    lengths = [len(s) for s in sessions]
    B, T = len(sessions), max(lengths)

    def pad(name, dtype):
        first = getattr(sessions[0], name)
        rest = first.shape[1:]
        if name == "lex":                                              # widths differ by session
            rest = (max(s.lex.shape[1] for s in sessions),)
        out = torch.zeros((B, T) + rest, dtype=dtype)
        for i, s in enumerate(sessions):
            a = getattr(s, name)
            if name == "lex":
                out[i, :len(s), :a.shape[1]] = torch.from_numpy(a)
            else:
                out[i, :len(s)] = torch.from_numpy(a)
        return out.to(device) if device is not None else out

    batch = {"event": pad("event", torch.long), "tokens": pad("tokens", torch.long),
             "cats": pad("cats", torch.long), "nums": pad("nums", torch.float32),
             "text": pad("text", torch.float32), "image": pad("image", torch.uint8),
             "lex": pad("lex", torch.long), "lengths": torch.tensor(lengths, dtype=torch.long)}
    if not with_targets:
        return batch
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, s in enumerate(sessions):
        tgt[i, :len(s)] = torch.from_numpy(s.labels)
    return batch, (tgt.to(device) if device is not None else tgt)
