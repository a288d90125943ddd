"""The erasure edit of DESIGN §6.1, usable by any caller (ComfyUI patch, diffusers hook, evaluation).

Per token and erased concept c with strength γ_c, for each selected latent i ∈ S_c(t):
    z = TopK(pre(x));  z'_i = z_i·γ_c·μ_c(i, t) if z_i > θ(i, t) else z_i
    (exact mode, a concept the file calibrates (κ_c, DESIGN §6.7): z'_i = γ_c·κ_c·‖x − b_dec‖, x in the SAE's input
     space; paper mode is the released formula and ignores κ)
    exact:  out = x + Σ_i (z'_i − z_i)·W_dec[i]               (x itself, bit for bit, where nothing changes)
    paper:  out = 2·x̂ − x + Σ_i (z'_i − z_i)·W_dec[i]         (what the released SAeUron/SAEmnesia hooks return)
    replace: the latents only detect (z_i > θ); a detected token becomes x + α·(x_src − x), x_src the nearest
             undetected token of the same feature map, α = min(1, |γ_c|)   (DESIGN §6.4, after "Look But Don't Touch")
Only the encoder's dense pre-activations are n wide; x̂ and the change are gathers of a few decoder rows.
detection="threshold" (exact and replace modes) computes only the chosen latents' pre-activations and drops the
top-k membership test: m dot products per token instead of n (DESIGN §6.4).
A region (per item and token, weights in [0, 1]) limits any mode: out = x + w·(edited − x), x itself where w = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .concepts import MAX_STRENGTH, Concept, ConceptTables, check_known
from .sae import TopKSAE, block_to_tokens, pre_activations, sparse_decode, standardize
from .timesteps import bucket_index

MODES = ("exact", "paper", "replace")
DETECTIONS = ("topk", "threshold")


def _concept_indices(concepts: Sequence[Concept], labels) -> list[int]:
    index = {c.label: i for i, c in enumerate(concepts)}
    check_known(labels, list(index))
    return [index[label] for label in labels]


class _EditTables(NamedTuple):
    """The chosen concepts' statistics merged per bucket; S = union width."""

    latents: Tensor
    """[T, S] int64 latent ids, −1 = padding."""
    scale: Tensor
    """[T, S] float32 γ_c·μ_c(i, t), or γ_c·κ_c where `relative`."""
    relative: Tensor
    """[T, S] bool: the latent's concept is calibrated, so z' = scale·‖x − b_dec‖ instead of scale·z."""
    thresholds: Tensor
    """[T, S] float32 θ(i, t)."""
    blend: Tensor
    """[T, S] float32 min(1, |γ_c|): how far replace mode moves a detected token towards its source."""
    slots: Tensor
    """[T, S] int64 position of each latent in `rows`."""
    rows: Tensor
    """[U] int64 every latent id the edit may touch: the decoder rows to gather."""

    def to(self, device) -> _EditTables:
        return _EditTables(*(t.to(device) for t in self))


class _Code(NamedTuple):
    acts: Tensor
    """[b, N, k] top-k activations, in x's dtype."""
    indices: Tensor
    """[b, N, k]"""
    std: Tensor | None
    """[b, N, 1] the tokens' std under input_unit_norm, else None."""


class ConceptEraser:
    """Erase the chosen concepts from a block's activations; see the module docstring for the formula.

    `strengths` maps concept labels to γ (None = the concept's default strength); several concepts edit the
    union of their latents, each with its own γ and statistics. If two chosen concepts select the same latent in
    one bucket, the one later in the file's concept order applies, as in the released hooks (later overwrites).
    """

    def __init__(self, sae: TopKSAE, concepts: list[Concept], tables: ConceptTables,
                 strengths: dict[str, float | None], mode: str = "exact", detection: str = "topk"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if detection not in DETECTIONS or (detection == "threshold" and mode == "paper"):
            raise ValueError(f"detection must be one of {DETECTIONS} ('threshold' needs exact or replace mode: paper "
                             f"mode decodes the whole code), got {detection!r} in {mode} mode")
        if tables.latents.shape[0] != len(concepts):
            raise ValueError(f"{len(concepts)} concepts but tables for {tables.latents.shape[0]}")
        self.sae, self.concepts, self.tables, self.mode, self.detection = sae, list(concepts), tables, mode, detection
        chosen = sorted(_concept_indices(concepts, list(strengths)))
        self.strengths = {concepts[i].label: _strength(concepts[i], strengths[concepts[i].label]) for i in chosen}
        self._tables = {torch.device("cpu"): self._merge(chosen)}
        self.calibrated = bool(self._tables[torch.device("cpu")].relative.any())
        """Some chosen concept is calibrated: the edit needs the tokens' norms."""
        self._casts: dict[tuple, tuple[tuple, Tensor]] = {}

    @classmethod
    def from_file(cls, sae_file, strengths: dict[str, float | None], mode: str = "exact",
                  sae: TopKSAE | None = None, detection: str = "topk") -> ConceptEraser:
        """From a loaded SAEFile; builds the TopKSAE unless the caller already placed one."""
        return cls(sae if sae is not None else sae_file.build_sae(), sae_file.concepts, sae_file.concept_tables,
                   strengths, mode, detection)

    def _merge(self, chosen: list[int]) -> _EditTables:
        T = self.tables.num_buckets
        if not chosen or self.tables.latents.shape[2] == 0:  # nothing to edit (tables without latent slots too)
            return _EditTables(torch.full((T, 1), -1), torch.zeros(T, 1), torch.zeros(T, 1, dtype=torch.bool),
                               torch.zeros(T, 1), torch.zeros(T, 1), torch.zeros(T, 1, dtype=torch.int64),
                               torch.zeros(1, dtype=torch.int64))
        gamma = torch.tensor(list(self.strengths.values()), dtype=torch.float32)[:, None, None]
        kappa = torch.tensor([(self.mode != "paper" and self.concepts[i].calibration) or 0.0 for i in chosen],
                             dtype=torch.float32)[:, None, None]
        mean_acts = self.tables.mean_acts[chosen].float().cpu()
        calibrated = (kappa > 0).expand_as(mean_acts)

        def per_bucket(t: Tensor) -> Tensor:  # chosen concepts' [C', T, L] -> [T, C'·L]
            return t.cpu().transpose(0, 1).reshape(T, t.shape[0] * t.shape[2])

        latents = per_bucket(self.tables.latents[chosen])
        scale = per_bucket(torch.where(calibrated, gamma * kappa, gamma * mean_acts))
        relative = per_bucket(calibrated)
        thresholds = per_bucket(self.tables.thresholds[chosen].float())
        blend = per_bucket(gamma.abs().clamp(max=1).expand_as(mean_acts))
        # A latent listed again by a later concept is dropped from the earlier one (later overwrites).
        S = latents.shape[1]
        later = torch.ones(S, S, dtype=torch.bool).triu(1)
        repeated = ((latents[:, :, None] == latents[:, None, :]) & later).any(-1)
        latents = torch.where(repeated, -1, latents)
        # Move padding to the end and drop columns that are padding in every bucket.
        order = (latents < 0).to(torch.uint8).argsort(dim=1, stable=True)
        width = max(1, int((latents >= 0).sum(1).max()))
        latents, scale, relative, thresholds, blend = (t.gather(1, order)[:, :width]
                                                       for t in (latents, scale, relative, thresholds, blend))
        rows, slots = torch.unique(latents.clamp(min=0), return_inverse=True)
        return _EditTables(latents, scale, relative, thresholds, blend, slots, rows)

    def _tables_on(self, device: torch.device) -> _EditTables:
        if device not in self._tables:
            self._tables[device] = self._tables[torch.device("cpu")].to(device)
        return self._tables[device]

    def _weight(self, name: str, device: torch.device, dtype: torch.dtype, rows: bool = False) -> Tensor:
        """The SAE's tensor `name` (W_enc, b_enc, b_dec, W_dec; with `rows`, only the rows the edit may touch) in
        the activations' device and dtype. A cast or gathered copy is made once and kept until the SAE's own tensor
        changes (moved by ComfyUI's memory manager, or rewritten): an fp32 SAE editing an fp16 UNet would otherwise
        copy the whole encoder at every block call. A tensor that needs neither is used as it is."""
        source = {"W_enc": self.sae.encoder.weight, "b_enc": self.sae.encoder.bias, "b_dec": self.sae.b_dec,
                  "W_dec": self.sae.W_dec}[name]
        if not rows and source.device == device and source.dtype == dtype:
            return source
        # where the values live, and how often they were rewritten in place (untracked for inference tensors,
        # which ComfyUI makes when it loads the SAE under torch.inference_mode)
        stamp = (source.device, source.data_ptr(), None if source.is_inference() else source._version)
        key = (name, rows, device, dtype)
        kept = self._casts.get(key)
        if kept is None or kept[0] != stamp:
            picked = source[self._tables_on(source.device).rows] if rows else source
            kept = self._casts[key] = (stamp, picked.to(device, dtype))
        return kept[1]

    def _encoder(self, tokens: Tensor, rows: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(W_enc, b_enc, b_dec) for `tokens`: every latent, or with `rows` the latents the edit may touch."""
        dev, dt = tokens.device, tokens.dtype
        return self._weight("W_enc", dev, dt, rows), self._weight("b_enc", dev, dt, rows), self._weight("b_dec", dev, dt)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor | float, edit_mask: Tensor | None = None,
                 region: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] block output or [B, N, d] tokens; t ∈ [0, 1] (float or [B]); edit_mask bool [B]
        (None = every item); region [B, N] or [B, H, W] weights in [0, 1] (None = everywhere, DESIGN §6.5).
        Returns the edited activations, same shape and dtype; unedited items and tokens are x's values.
        In exact and replace mode with no concept chosen, returns x itself."""
        tokens = _tokens(x, self.sae.cfg.d_in)
        items = _items(edit_mask, tokens.shape[0], x.device)
        weights = _region(region, tokens.shape[:2], x.device)
        if weights is not None:
            items = items & (weights > 0).any(1)
        if (self.mode != "paper" and not self.strengths) or not bool(items.any()):
            return x
        tab = self._tables_on(x.device)
        buckets = bucket_index(t, self.tables.num_buckets).to(x.device).expand(tokens.shape[0])[items]
        x_in = tokens[items]                                                  # [b, N, d]
        lat = tab.latents[buckets]                                            # [b, S]
        if self.detection == "threshold":
            pre, std = _pre_activations(self.sae, x_in, *self._encoder(x_in, rows=True))
            slots = tab.slots[buckets][:, None].expand(*pre.shape[:2], -1)
            z = pre.float().gather(2, slots)                                  # [b, N, S] fp32
        else:
            code = _encode(self.sae, x_in, *self._encoder(x_in))
            z, std = _selected_acts(code, lat), code.std                      # [b, N, S] fp32
        fires = (z > tab.thresholds[buckets][:, None]) & (lat >= 0)[:, None]
        if self.mode == "replace":
            alpha = (fires * tab.blend[buckets][:, None]).amax(-1)            # [b, N]
            source = nearest_undetected(alpha > 0, x.shape[2:] if x.dim() == 4 else (1, x.shape[1]))
            x_src = x_in.gather(1, source.clamp(min=0)[..., None].expand_as(x_in))
            edited = _blend(x_in, x_src, torch.where(source >= 0, alpha, 0.0))
        else:
            scale = tab.scale[buckets][:, None]                              # [b, 1, S]
            target = z * scale
            if self.calibrated:
                norm = _token_norm(self.sae, x_in, self._weight("b_dec", x.device, torch.float32))
                target = torch.where(tab.relative[buckets][:, None], scale * norm, target)
            dz = torch.where(fires, target - z, 0.0)                          # z'_i − z_i
            rows = self._weight("W_dec", x.device, torch.float32, rows=True)
            delta = sparse_decode(dz, tab.slots[buckets][:, None].expand_as(dz), rows)   # [b, N, d] fp32
            if self.mode == "exact":
                if std is not None:
                    delta = delta * std.float()
                changed = (dz != 0).any(-1, keepdim=True)
                edited = torch.where(changed, (x_in.float() + delta).to(x.dtype), x_in)
            else:
                # The released hooks add error = x̂ − x to the edited reconstruction (x − x̂ would give back x),
                # hence 2·x̂ − x. They never undo input_unit_norm either, so x̂ and the change stay in the
                # standardised space.
                W_dec, b_dec = (self._weight(name, x.device, x.dtype) for name in ("W_dec", "b_dec"))
                x_hat = sparse_decode(code.acts, code.indices, W_dec) + b_dec
                edited = (2 * x_hat.float() - x_in.float() + delta).to(x.dtype)
        if weights is not None:
            edited = _blend(x_in, edited, weights[items])
        out = x.clone()
        _tokens(out, self.sae.cfg.d_in)[items] = edited
        return out


def nearest_undetected(detected: Tensor, grid: Sequence[int]) -> Tensor:
    """For each detected token, the index of the nearest undetected token of its feature map (Euclidean distance on
    the H×W grid, ties to the lowest index); −1 for undetected tokens and where every token is detected.

    detected bool [b, N] with N = H·W -> int64 [b, N]. Cost O(detected × undetected) per item, no N×N table.
    """
    H, W = (int(g) for g in grid)
    if detected.shape[1] != H * W:
        raise ValueError(f"{detected.shape[1]} tokens do not fill a {H}×{W} grid")
    position = torch.arange(H * W, device=detected.device)
    row, col = (position // W).float(), (position % W).float()
    source = torch.full(detected.shape, -1, dtype=torch.int64, device=detected.device)
    for item, mask in enumerate(detected):
        targets, candidates = mask.nonzero()[:, 0], (~mask).nonzero()[:, 0]
        if len(targets) == 0 or len(candidates) == 0:
            continue
        d2 = ((row[targets, None] - row[None, candidates]) ** 2 + (col[targets, None] - col[None, candidates]) ** 2)
        source[item, targets] = candidates[d2.argmin(1)]
    return source


def concept_activation_maps(sae: TopKSAE, concepts: list[Concept], tables: ConceptTables, x: Tensor,
                            t: Tensor | float, labels: Sequence[str]) -> Tensor:
    """Where each concept fires: Σ over its selected latents (bucket of t) of z_i per token; nothing is edited.

    x [B, C, H, W] -> [B, len(labels), H, W]; x [B, N, d] -> [B, len(labels), N]; float32.
    """
    chosen = _concept_indices(concepts, labels)
    with torch.no_grad():
        tokens = _tokens(x, sae.cfg.d_in)
        B, N, _ = tokens.shape
        buckets = bucket_index(t, tables.num_buckets).expand(B).cpu()
        lat = tables.latents[chosen].cpu()[:, buckets]                      # [C', B, L]
        lat = lat.transpose(0, 1).reshape(B, -1).to(x.device)               # [B, C'·L]
        weights = (p.to(x.device, x.dtype) for p in (sae.encoder.weight, sae.encoder.bias, sae.b_dec))
        z = _selected_acts(_encode(sae, tokens, *weights), lat)             # [B, N, C'·L]
        maps = z.reshape(B, N, len(chosen), -1).sum(-1).transpose(1, 2)     # [B, C', N]
    return maps.reshape(B, len(chosen), *x.shape[2:]) if x.dim() == 4 else maps


def _strength(concept: Concept, gamma: float | None) -> float:
    gamma = float(concept.default_strength if gamma is None else gamma)
    if not abs(gamma) <= MAX_STRENGTH:  # NaN fails too
        raise ValueError(f"strength of {concept.label!r} must be a number from -{MAX_STRENGTH:g} to "
                         f"{MAX_STRENGTH:g}, got {gamma}")
    return gamma


def _tokens(x: Tensor, d: int) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C] view; [B, N, d] as is."""
    if x.dim() == 4:
        x = block_to_tokens(x)
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"expected [B, {d}, H, W] or [B, N, {d}] activations, got shape {list(x.shape)}")
    return x


def _items(edit_mask: Tensor | None, batch: int, device) -> Tensor:
    if edit_mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    mask = torch.as_tensor(edit_mask, device=device).bool()
    if mask.shape != (batch,):
        raise ValueError(f"edit_mask must be bool [{batch}], got shape {list(mask.shape)}")
    return mask


def _region(region: Tensor | None, shape: Sequence[int], device) -> Tensor | None:
    """Region weights as float32 [B, N], checked; None stays None."""
    if region is None:
        return None
    B, N = shape
    weights = torch.as_tensor(region, device=device).float()
    if weights.shape[0] != B or weights[0].numel() != N:
        raise ValueError(f"region must hold one weight per token of each item ([{B}, {N}] or [{B}, H, W]), "
                         f"got shape {list(weights.shape)}")
    weights = weights.reshape(B, N)
    if not bool(((weights >= 0) & (weights <= 1)).all()):  # NaN fails too
        raise ValueError("region weights must lie in [0, 1]")
    return weights


def _blend(x: Tensor, target: Tensor, w: Tensor) -> Tensor:
    """x + w·(target − x) per token (w [b, N]): x itself where w = 0, target itself where w = 1."""
    w = w[..., None]
    mixed = (x.float() + w * (target.float() - x.float())).to(x.dtype)
    return torch.where(w <= 0, x, torch.where(w >= 1, target, mixed))


def _encode(sae: TopKSAE, tokens: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> _Code:
    """TopK code of [b, N, d] tokens; the weights are already in the tokens' dtype and device."""
    pre, std = _pre_activations(sae, tokens, W_enc, b_enc, b_dec)
    acts, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
    return _Code(acts, indices, std)


def _pre_activations(sae: TopKSAE, tokens: Tensor, W_enc: Tensor, b_enc: Tensor,
                     b_dec: Tensor) -> tuple[Tensor, Tensor | None]:
    """ReLU pre-activations of the latents whose encoder rows are given (all n, or the U rows threshold detection
    reads) -> ([b, N, n or U], the tokens' std under input_unit_norm, else None)."""
    sae_in, std = tokens, None
    if sae.cfg.input_unit_norm:
        sae_in, _, std = standardize(tokens)
    return pre_activations(sae_in, W_enc, b_enc, b_dec), std


def _token_norm(sae: TopKSAE, tokens: Tensor, b_dec: Tensor) -> Tensor:
    """‖x − b_dec‖ of [b, N, d] tokens in the SAE's input space (standardised under input_unit_norm), fp32 [b, N, 1]:
    the unit of a calibrated concept's strength."""
    sae_in = tokens.float()
    if sae.cfg.input_unit_norm:
        sae_in = standardize(sae_in).x
    return (sae_in - b_dec).norm(dim=-1, keepdim=True)


def _selected_acts(code: _Code, latents: Tensor) -> Tensor:
    """z_i of the latents [b, S] (per batch item) at every token -> [b, N, S] fp32 (0 where i is not in the top k)."""
    match = code.indices[..., :, None] == latents[:, None, None, :]         # [b, N, k, S]
    return (code.acts.float()[..., None] * match).sum(-2)
