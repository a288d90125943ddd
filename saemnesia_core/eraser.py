"""The erasure edit of DESIGN §6.1, usable by any caller (ComfyUI patch, diffusers hook, evaluation).

Per token and erased concept c with strength γ_c, for each selected latent i ∈ S_c(t):
    z = TopK(pre(x));  z'_i = z_i·γ_c·μ_c(i, t) if z_i > θ(i, t) else z_i
    (exact mode, a concept the file calibrates (κ_c, DESIGN §6.7): z'_i = γ_c·κ_c·‖x − b_dec‖, x in the SAE's input
     space; paper mode is the released formula and ignores κ)
    exact:  out = x + Σ_i (z'_i − z_i)·W_dec[i]               (x itself, bit for bit, where nothing changes)
    paper:  out = 2·x̂ − x + Σ_i (z'_i − z_i)·W_dec[i]         (what the released SAeUron/SAEmnesia hooks return)
    replace: the latents only detect (z_i > θ); a detected token becomes x + α·(x_src − x), x_src the nearest
             undetected token of the same feature map, α = min(1, |γ_c|)   (DESIGN §6.4, after "Look But Don't Touch")
    shift:  the latents only detect; every token of an item in which c is detected (on any token) moves by
            γ_c·Δ_c(t), Δ_c(t) the concept's mean difference from its absence at bucket t (`directions`, DESIGN §6.9):
            γ = −1 takes away what, on average, the concept adds to the block
Only the encoder's dense pre-activations are n wide; x̂ and the change are gathers of a few decoder rows.
detection="threshold" (exact and replace modes) computes only the chosen latents' pre-activations and drops the
top-k membership test: m dot products per token instead of n (DESIGN §6.4).
A region (per item and token, weights in [0, 1]) limits any mode: out = x + w·(edited − x), x itself where w = 0.

What the SAE reads (the file's `reads`, DESIGN §7): the block's output x, or its update u = x − x_in (x_in the
block's input, given as `base`). For an update-reading SAE every formula above encodes u instead of x and writes
back consistently: exact adds the same change to x (so x stays bit for bit where nothing changes), paper returns
x_in + 2·û − u + Δ, replace copies the source token's update onto the detected token's input.
Strength unit (the file's `strength_unit`): "mean", the formula above; "beta", SAEmnesia's `use_beta`:
z'_i = z_i·γ_c·β_i with β_i = ‖z‖₂ / ‖W_dec[i]‖₂ per token (‖z‖₂ of the token's whole code).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .concepts import MAX_STRENGTH, Concept, ConceptTables, concept_indices
from .regions import blend, checked_weights
from .sae import TopKSAE, block_to_tokens, pre_activations, sparse_decode, standardize
from .timesteps import bucket_of, item_buckets

MODES = ("exact", "paper", "replace", "shift")
BETA_EPS = 1e-8
"""Added to ‖W_dec[i]‖ in β, as SAEmnesia's hook does."""
DETECTIONS = ("topk", "threshold")
SIGNALS = ("output", "update")
"""What an SAE reads: the block's output, or its update (output − input)."""
STRENGTH_UNITS = ("mean", "beta")
"""What γ multiplies: the concept's mean activation μ_c (the papers), or SAEmnesia's β = ‖z‖₂ / ‖W_dec[i]‖₂."""


class _Plan(NamedTuple):
    """What one edit call needs of the chosen concepts, on one device: the latents it may touch, and per timestep
    bucket what each of them does. Bucket T (one past the last) is "off": items the call does not edit use it."""

    rows: Tensor
    """[U] int64: every latent a chosen concept selects in some bucket, ascending."""
    table: Tensor
    """[T + 1, U, 5] float32, per bucket and latent: θ (+inf where the latent is not selected, and in the off
    bucket), the scale (γ·μ, γ·κ for a calibrated concept, γ under the beta unit), scale − 1, replace mode's
    blend α = min(1, |γ|), and 1 where the concept is calibrated (z' = scale·‖x − b_dec‖)."""

    shifts: Tensor
    """[T + 1, C', d] float32 (shift mode; [T + 1, C', 0] otherwise): γ_c·Δ_c(t) per bucket and chosen concept, 0 in
    the off bucket."""
    owners: Tensor
    """[U, C'] float32: 1 where a latent is one its concept selects (shift mode: which concepts a firing latent
    detects)."""

    def to(self, device) -> _Plan:
        return _Plan(self.rows.to(device), self.table.to(device), self.shifts.to(device), self.owners.to(device))


THRESHOLD, SCALE, SCALE_MINUS_ONE, BLEND, RELATIVE = range(5)


class _Weights(NamedTuple):
    """The SAE's tensors one call uses, in the activations' device (and dtype, for the encoder)."""

    W_enc: Tensor
    """[n, d] (top-k detection) or [U, d] (threshold detection)."""
    b_enc: Tensor
    b_dec: Tensor
    pre: tuple[Tensor, Tensor] | None
    """(weight, bias) of SAEParate's pre-encoder, or None."""
    W_rows: Tensor
    """[U, d] float32: the decoder rows of the latents the edit may touch."""
    W_dec: Tensor | None
    """[n, d] in the activations' dtype, for paper mode's full reconstruction; None otherwise."""
    b_dec32: Tensor
    """[d] float32, the unit of a calibrated concept's strength (‖x − b_dec‖)."""


def _parameter(sae: TopKSAE, name: str) -> Tensor:
    if name in ("W_pre", "b_pre"):
        linear = sae.pre_encoder[0]
        return linear.weight if name == "W_pre" else linear.bias
    return {"W_enc": sae.encoder.weight, "b_enc": sae.encoder.bias, "b_dec": sae.b_dec, "W_dec": sae.W_dec}[name]


class ConceptEraser:
    """Erase the chosen concepts from a block's activations; see the module docstring for the formula.

    `strengths` maps concept labels to γ (None = the concept's default strength); several concepts edit the
    union of their latents, each with its own γ and statistics. If two chosen concepts select the same latent in
    one bucket, the one later in the file's concept order applies, as in the released hooks (later overwrites).

    A call (`__call__`) checks its inputs, returns x itself when nothing is to be edited, and otherwise runs
    `edit`: a function of tensors alone, without Python decisions on their values, which `torch.compile` captures
    whole (fullgraph) and which launches fewer kernels than the released dense hook.
    """

    def __init__(self, sae: TopKSAE, concepts: list[Concept], tables: ConceptTables,
                 strengths: dict[str, float | None], mode: str = "exact", detection: str = "topk", *,
                 reads: str = "output", strength_unit: str = "mean", directions: Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if detection not in DETECTIONS or (detection == "threshold" and mode == "paper"):
            raise ValueError(f"detection must be one of {DETECTIONS} ('threshold' needs exact or replace mode: paper "
                             f"mode decodes the whole code), got {detection!r} in {mode} mode")
        if reads not in SIGNALS or strength_unit not in STRENGTH_UNITS:
            raise ValueError(f"reads must be one of {SIGNALS} and strength_unit one of {STRENGTH_UNITS}, got "
                             f"{reads!r} and {strength_unit!r}")
        if strength_unit == "beta" and detection == "threshold":
            raise ValueError("the beta strength unit needs the whole code of a token (‖z‖₂): use top-k detection")
        if tables.latents.shape[0] != len(concepts):
            raise ValueError(f"{len(concepts)} concepts but tables for {tables.latents.shape[0]}")
        expected = (len(concepts), tables.num_buckets, sae.cfg.d_in)
        if mode == "shift" and directions is None and strengths:  # with nothing chosen, nothing needs them
            raise ValueError("shift mode needs each concept's mean difference from its absence (DESIGN §6.9), and "
                             "this SAE holds none: use exact, paper or replace mode")
        if mode == "shift" and directions is not None and tuple(directions.shape) != expected:
            raise ValueError(f"shift mode needs each concept's mean difference from its absence, directions of shape "
                             f"{list(expected)}; got {list(directions.shape)}")
        self.directions = directions if mode == "shift" else None
        self.sae, self.concepts, self.tables, self.mode, self.detection = sae, list(concepts), tables, mode, detection
        self.reads, self.beta = reads, strength_unit == "beta"
        chosen = sorted(concept_indices(concepts, list(strengths)))
        self.strengths = {concepts[i].label: _strength(concepts[i], strengths[concepts[i].label]) for i in chosen}
        self._plans = {torch.device("cpu"): self._plan(chosen)}
        self.calibrated = bool(self._plans[torch.device("cpu")].table[..., RELATIVE].any())
        """Some chosen concept is calibrated: the edit needs the tokens' norms."""
        self._casts: dict[tuple, tuple[tuple, Tensor]] = {}
        self._grids: dict[tuple, Tensor] = {}

    @classmethod
    def from_file(cls, sae_file, strengths: dict[str, float | None], mode: str = "exact",
                  sae: TopKSAE | None = None, detection: str = "topk") -> ConceptEraser:
        """From a loaded SAEFile (its concepts, tables, what it reads and its strength unit); builds the TopKSAE unless
        the caller already placed one."""
        tables = sae_file.concept_tables
        return cls(sae if sae is not None else sae_file.build_sae(), sae_file.concepts, tables, strengths, mode,
                   detection, reads=sae_file.reads, strength_unit=sae_file.strength_unit, directions=tables.directions)

    # ------------------------------------------------------------------------------------------ once per eraser

    def _plan(self, chosen: list[int]) -> _Plan:
        """The chosen concepts' statistics over the union of their latents, per bucket (later concepts overwrite)."""
        T, n = self.tables.num_buckets, self.sae.cfg.num_latents
        latents = self.tables.latents[chosen].cpu()                            # [C', T, L]
        rows = torch.unique(latents[latents >= 0]) if chosen else torch.zeros(0, dtype=torch.int64)
        table = torch.zeros(T + 1, max(1, len(rows)), 5)
        table[..., THRESHOLD] = float("inf")
        slot = torch.full((n,), -1, dtype=torch.int64)
        slot[rows] = torch.arange(len(rows))
        d = self.sae.cfg.d_in if self.directions is not None else 0
        shifts, owners = torch.zeros(T + 1, max(1, len(chosen)), d), torch.zeros(max(1, len(rows)), max(1, len(chosen)))
        for c, i in enumerate(chosen):  # in file order: a later concept's entry overwrites an earlier one's
            concept, gamma = self.concepts[i], self.strengths[self.concepts[i].label]
            kappa = concept.calibration if self.mode != "paper" else None
            if d:
                shifts[:T, c] = gamma * self.directions[i].float().cpu()
            for t_, l_ in (latents[c] >= 0).nonzero().tolist():
                u = slot[latents[c, t_, l_]]
                owners[u, c] = 1.0
                mu = 1.0 if self.beta else float(self.tables.mean_acts[i, t_, l_])
                scale = gamma * kappa if kappa else gamma * mu
                table[t_, u] = torch.tensor([float(self.tables.thresholds[i, t_, l_]), scale, scale - 1,
                                             min(1.0, abs(gamma)), 1.0 if kappa else 0.0])
        return _Plan(rows, table, shifts, owners)

    def _plan_on(self, device: torch.device) -> _Plan:
        if device not in self._plans:
            self._plans[device] = self._plans[torch.device("cpu")].to(device)
        return self._plans[device]

    def _weight(self, name: str, device: torch.device, dtype: torch.dtype, rows: bool = False) -> Tensor:
        """The SAE's tensor `name` (W_enc, b_enc, b_dec, W_dec, W_pre, b_pre; with `rows`, only the rows the edit may
        touch) in the activations' device and dtype. A cast or gathered copy is made once and kept until the SAE's
        own tensor changes (moved by ComfyUI's memory manager, or rewritten): an fp32 SAE editing an fp16 UNet would
        otherwise copy the whole encoder at every block call. A tensor that needs neither is used as it is."""
        source = _parameter(self.sae, name)
        if not rows and source.device == device and source.dtype == dtype:
            return source
        # where the values live, and how often they were rewritten in place (untracked for inference tensors,
        # which ComfyUI makes when it loads the SAE under torch.inference_mode)
        stamp = (source.device, source.data_ptr(), None if source.is_inference() else source._version)
        key = (name, rows, device, dtype)
        kept = self._casts.get(key)
        if kept is None or kept[0] != stamp:
            picked = source[self._plan_on(source.device).rows] if rows else source
            kept = self._casts[key] = (stamp, picked.to(device, dtype))
        return kept[1]

    def _weights(self, device: torch.device, dtype: torch.dtype) -> _Weights:
        rows = self.detection == "threshold"
        pre = (self._weight("W_pre", device, dtype), self._weight("b_pre", device, dtype)) \
            if self.sae.cfg.pre_encoder else None
        return _Weights(self._weight("W_enc", device, dtype, rows), self._weight("b_enc", device, dtype, rows),
                        self._weight("b_dec", device, dtype), pre,
                        self._weight("W_dec", device, torch.float32, rows=True),
                        self._weight("W_dec", device, dtype) if self.mode == "paper" else None,
                        self._weight("b_dec", device, torch.float32))

    def _nearest(self, grid: tuple[int, int], device) -> Tensor:
        """[N, N] squared distances between the tokens of an H×W grid, made once per grid and device."""
        key = (grid, device)
        if key not in self._grids:
            H, W = grid
            position = torch.arange(H * W, device=device)
            yx = torch.stack([position // W, position % W], -1).float()
            self._grids[key] = (yx[:, None] - yx[None]).pow(2).sum(-1)
        return self._grids[key]

    # ------------------------------------------------------------------------------------------ per call

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor | float | Sequence[float], edit_mask: Tensor | Sequence[bool] | None = None,
                 region: Tensor | None = None, base: Tensor | None = None) -> Tensor:
        """x [B, C, H, W] block output or [B, N, d] tokens; t ∈ [0, 1] (a number, one per item, or a tensor [B]);
        edit_mask bool [B] or one bool per item (None = every item); region [B, N] or [B, H, W] weights in [0, 1]
        (None = everywhere, DESIGN §6.5); base: the block's input, x's shape, for an SAE that reads the update
        (required there, ignored otherwise). Returns the edited activations, same shape and dtype; unedited items and
        tokens are x's values. In exact and replace mode with no concept chosen, or with no item to edit, returns x
        itself. Given t and edit_mask as Python numbers (as the ComfyUI patch does), its bookkeeping launches no
        kernel but the one that puts each item's bucket on x's device."""
        tokens = as_tokens(x, self.sae.cfg.d_in)
        base_tokens = self._base_tokens(base, x)
        B, T = tokens.shape[0], self.tables.num_buckets
        weights = checked_weights(region, tokens.shape[:2], x.device)
        if isinstance(t, Tensor) or isinstance(edit_mask, Tensor) or weights is not None:
            items = _items(edit_mask, B, x.device)
            if weights is not None:
                items = items & weights.gt(0).any(1)
            if (self.mode != "paper" and not self.strengths) or not bool(items.any()):
                return x
            index = item_buckets(t, T, B, x.device).masked_fill(~items, T)  # items not edited take the off bucket
            edited_items = items
        else:
            edit = [True] * B if edit_mask is None else [bool(e) for e in edit_mask]
            times = [float(t)] * B if isinstance(t, (int, float)) else [float(v) for v in t]
            if len(edit) != B or len(times) != B:
                raise ValueError(f"edit_mask and t must give one value per item ({B}), got {len(edit)} and "
                                 f"{len(times)}")
            if (self.mode != "paper" and not self.strengths) or not any(edit):
                return x
            buckets = [bucket_of(v, T) if e else T for v, e in zip(times, edit)]
            # one bucket for every item (cond and uncond of one step): its row, a view; else one small upload
            index = slice(buckets[0], buckets[0] + 1) if len(set(buckets)) == 1 else \
                torch.tensor(buckets, device=x.device)
            edited_items = None if all(edit) else torch.tensor(edit, device=x.device)
        plan = self._plan_on(x.device)
        grid = tuple(x.shape[2:]) if x.dim() == 4 else (1, x.shape[1])
        distances = self._nearest(grid, x.device) if self.mode == "replace" else None
        return self.edit(x, base_tokens, plan.table[index], edited_items, weights, plan.rows,
                         self._weights(x.device, x.dtype), distances,
                         (plan.shifts[index], plan.owners) if self.mode == "shift" else None)

    def edit(self, x: Tensor, base: Tensor | None, step: Tensor, edited_items: Tensor | None, region: Tensor | None,
             rows: Tensor, weights: _Weights, distances: Tensor | None,
             shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The edit itself, on tensors alone: x (a block [B, C, H, W] or tokens [B, N, d]), the block input's tokens
        (or None), the plan's table rows of each item's bucket [B or 1, U, 5] (the off bucket for items not edited),
        the items edited (bool [B], or None for all), the region [B, N] (or None), the latents the edit may touch
        [U], the weights, replace mode's [N, N] grid distances, and shift mode's (the plan's shifts of each item's
        bucket [B or 1, C', d], its owners [U, C']). Every Python decision here is on the eraser's settings and these
        arguments' presence, none on a tensor's values."""
        tokens = as_tokens(x, self.sae.cfg.d_in)
        signal = tokens if base is None else tokens - base                 # what the SAE reads
        B, N, d = tokens.shape
        step = step[:, None]                                                 # [B or 1, 1, U, 5]
        pre, std = sae_pre_activations(self.sae, signal, weights.W_enc, weights.b_enc, weights.b_dec, weights.pre)
        if self.detection == "threshold":
            z, code = pre.float(), None                                        # [B, N, U]: the rows' own
        else:
            code = pre.topk(self.sae.cfg.k, dim=-1)                            # sorted: the k-th is the last
            z = pre[..., rows]                                                 # [B, N, U]
            z = (z * (z >= code.values[..., -1:])).float()                    # 0 where not among the top k
        fires = z > step[..., THRESHOLD]
        if self.mode == "shift":
            shifts, owners = shift
            detected = (fires.any(1).float() @ owners) > 0                     # [B, C']: the concept fires somewhere
            move = (detected[..., None] * shifts).sum(1)                       # [B, d]: Σ_c γ_c·Δ_c(t) of those
            edited = torch.where(detected.any(-1)[:, None, None], (tokens.float() + move[:, None]).to(x.dtype), tokens)
        elif self.mode == "replace":
            alpha = (fires * step[..., BLEND]).amax(-1)                        # [B, N]
            edited = self._replaced(tokens, signal, base, alpha, distances)
        else:
            dz = z * step[..., SCALE_MINUS_ONE]                                # z'_i − z_i = z·γμ − z
            if self.beta:
                row_norms = weights.W_rows.norm(dim=-1)
                beta = code.values.float().norm(dim=-1, keepdim=True) / (row_norms + BETA_EPS)
                dz = z * step[..., SCALE] * beta - z
            if self.calibrated:
                norm = _token_norm(self.sae, signal, weights.b_dec32)
                dz = torch.where(step[..., RELATIVE] > 0, step[..., SCALE] * norm - z, dz)
            dz = dz * fires
            delta = (dz.reshape(B * N, -1) @ weights.W_rows).reshape(B, N, d)  # Σ_i (z'_i − z_i)·W_dec[i]
            if self.mode == "exact":
                if std is not None:
                    delta = delta * std.float()
                changed = (dz != 0).any(-1, keepdim=True)
                edited = torch.where(changed, (tokens.float() + delta).to(x.dtype), tokens)
            else:
                # The released hooks add error = x̂ − x to the edited reconstruction (x − x̂ would give back x),
                # hence 2·x̂ − x. They never undo input_unit_norm either, so x̂ and the change stay in the
                # standardised space. An update-reading SAE's result is added to the block's input.
                x_hat = sparse_decode(code.values, code.indices, weights.W_dec) + weights.b_dec
                edited_signal = 2 * x_hat.float() - signal.float() + delta
                edited = (edited_signal if base is None else base.float() + edited_signal).to(x.dtype)
                if edited_items is not None:
                    edited = torch.where(edited_items[:, None, None], edited, tokens)
        if region is not None:
            edited = blend(tokens, edited, region)
        return _untokens(edited, x)

    def _replaced(self, tokens: Tensor, signal: Tensor, base: Tensor | None, alpha: Tensor,
                  distances: Tensor) -> Tensor:
        """Replace mode: each detected token (alpha > 0) moves α of the way to the nearest undetected token of its
        feature map (ties to the lowest index), or, for an update-reading SAE, to its own input plus that token's
        update; a map detected everywhere is left as it is (DESIGN §6.4)."""
        detected = alpha > 0                                                   # [B, N]
        nearest = distances.masked_fill(detected[:, None, :], float("inf")).argmin(-1)  # [B, N], among undetected
        source = signal.gather(1, nearest[..., None].expand_as(signal))
        target = source if base is None else base + source
        return blend(tokens, target, alpha.masked_fill(detected.all(-1, keepdim=True), 0))  # none undetected: kept

    def _base_tokens(self, base: Tensor | None, x: Tensor) -> Tensor | None:
        """The block input's tokens for an update-reading SAE (checked); None for one that reads the output."""
        if self.reads == "output":
            return None
        if base is None:
            raise ValueError("this SAE reads the block's update (output − input), but the block's input was not given")
        if base.shape != x.shape:
            raise ValueError(f"the block's input has shape {list(base.shape)}, its output {list(x.shape)}: an SAE "
                             "that reads the update needs both of one shape")
        return as_tokens(base, self.sae.cfg.d_in)


def _strength(concept: Concept, gamma: float | None) -> float:
    gamma = float(concept.default_strength if gamma is None else gamma)
    if not abs(gamma) <= MAX_STRENGTH:  # NaN fails too
        raise ValueError(f"strength of {concept.label!r} must be a number from -{MAX_STRENGTH:g} to "
                         f"{MAX_STRENGTH:g}, got {gamma}")
    return gamma


def as_tokens(x: Tensor, d: int) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C] view; [B, N, d] as is."""
    if x.dim() == 4:
        x = block_to_tokens(x)
    if x.dim() != 3 or x.shape[-1] != d:
        raise ValueError(f"expected [B, {d}, H, W] or [B, N, {d}] activations, got shape {list(x.shape)}")
    return x


def _items(edit_mask: Tensor | Sequence[bool] | None, batch: int, device) -> Tensor:
    """The items to edit as bool [B]."""
    if edit_mask is None:
        return torch.ones(batch, dtype=torch.bool, device=device)
    mask = torch.as_tensor(edit_mask, device=device).bool()
    if mask.shape != (batch,):
        raise ValueError(f"edit_mask must be bool [{batch}], got shape {list(mask.shape)}")
    return mask


def sae_pre_activations(sae: TopKSAE, tokens: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                     pre: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """ReLU pre-activations of the latents whose encoder rows are given (all n, or the U rows threshold detection
    reads) -> ([b, N, n or U], the tokens' std under input_unit_norm, else None)."""
    sae_in, std = tokens, None
    if sae.cfg.input_unit_norm:
        sae_in, _, std = standardize(tokens)
    return pre_activations(sae_in, W_enc, b_enc, b_dec, pre), std


def _token_norm(sae: TopKSAE, tokens: Tensor, b_dec: Tensor) -> Tensor:
    """‖x − b_dec‖ of [b, N, d] tokens in the SAE's input space (standardised under input_unit_norm), fp32 [b, N, 1]:
    the unit of a calibrated concept's strength."""
    sae_in = tokens.float()
    if sae.cfg.input_unit_norm:
        sae_in = standardize(sae_in).x
    return (sae_in - b_dec).norm(dim=-1, keepdim=True)


def _untokens(tokens: Tensor, like: Tensor) -> Tensor:
    """[B, N, d] tokens back into `like`'s layout ([B, C, H, W] blocks; tokens as they are)."""
    return tokens.transpose(1, 2).reshape(like.shape) if like.dim() == 4 else tokens
