"""GPTQ (Frantar et al. 2022) and round-to-nearest quantization of one linear layer's weight.

A layer y = x W^T with W [N, K] is quantized on a grid of 2^bits levels per output row and group of `group_size`
input columns: W[n, k] ~ (codes[n, k] - zero[g, n]) * scale[g, n], g = g_idx[k]; a group size that does not divide
K leaves a shorter last group (ceil(K / group_size) groups). GPTQ quantizes the columns one by one and spreads each
column's rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's output
error on calibration inputs, H = 2/n * sum(x x^T).

Both methods report the same `loss`: the mean squared error of the layer's outputs on the calibration tokens, per
output feature, tr((W - Q) H (W - Q)^T) / (2 N), so GPTQ and RTN can be compared on a layer directly.
"""
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .finite import all_finite
from .packing import check_bits, valid_group_size

# Clipping search (GPTQ's `mse` option): shrink the range by 0 %, 3 %, ... 45 % and keep, per row, the factor
# whose rounding error has the smallest 2.4-norm (an exponent above 2 weighs the large errors more), each column's
# error weighted by what it costs the layer's output (GPTQ's error_cost; unweighted, the search trades a costly
# column's error for cheap ones'). GPTQ's own grid of 80 steps of 1 % gave the same output error on our synthetic
# layers, at 5x the cost.
MSE_SHRINKS = [1 - 3 * i / 100 for i in range(16)]
MSE_NORM = 2.4
MSE_SLICE_ELEMENTS = 2**19  # 2 MiB of float32: a slice of rows that stays in cache
# The damping, as a fraction of the mean diagonal of H, is raised tenfold on each Cholesky failure up to this.
MAX_DAMP_PERCENT = 1.0


HESSIAN_BANDS = 4  # row bands of the upper-triangle accumulation: more bands skip more of the lower half
SQUARE_BAND = 512  # rows or columns per step where a [K, K] is mirrored or gathered in bands (temporaries that wide)


class HessianAccumulator:
    """Running H = 2/n * sum(x x^T) over the n token rows fed to a linear layer with `in_features` inputs.

    With `asymmetric`, also the running C = 2/n * sum((x_fp - x) x^T), where x_fp is what the full-precision model
    feeds the layer for the same token (see gptq_quantize's `asym_cross`).
    """

    def __init__(self, in_features: int, name: str = "", device=None, asymmetric: bool = False):
        self.name = name
        self.nsamples = 0
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.cross = torch.zeros_like(self._hessian) if asymmetric else None

    def add_batch(self, x: torch.Tensor, x_fp: torch.Tensor | None = None) -> None:
        """Add activations x [..., K] of any dtype: every row is one token; x_fp: the full-precision model's, with
        `asymmetric` (the same shape)."""
        if x.shape[-1] != self._hessian.shape[0]:
            raise ValueError(f"{self.name}: activations have {x.shape[-1]} features, expected {self._hessian.shape[0]}")
        if (x_fp is None) != (self.cross is None) or (x_fp is not None and x_fp.shape != x.shape):
            raise ValueError(f"{self.name}: full-precision activations must come with every batch of an asymmetric "
                             "accumulator, in the shape of the quantized model's, and only then")
        x = x.reshape(-1, x.shape[-1]).to(device=self._hessian.device, dtype=torch.float32)
        total = self.nsamples + x.shape[0]
        if total == 0:  # an empty first batch: nothing to average yet
            return
        if self.cross is not None:
            shift = x_fp.reshape(x.shape).to(x) - x
            self.cross.addmm_(shift.t(), x, beta=self.nsamples / total, alpha=2 / total)
        # A running mean (rescale the old sum, add the new rows) keeps the fp32 entries at the scale of one x x^T.
        # H is symmetric: only its upper triangle is accumulated, in bands of rows, for about half the arithmetic.
        k = x.shape[1]
        edges = [k * i // HESSIAN_BANDS for i in range(HESSIAN_BANDS)] + [k]
        for i0, i1 in zip(edges[:-1], edges[1:]):
            self._hessian[i0:i1, i0:].addmm_(x[:, i0:i1].t(), x[:, i0:], beta=self.nsamples / total, alpha=2 / total)
        self.nsamples = total

    def scale_inputs(self, scales: torch.Tensor) -> None:
        """What was accumulated, had every input x been x / scales (per feature)."""
        inverse = 1 / scales.to(self._hessian)
        self._hessian.mul_(inverse[:, None] * inverse[None, :])
        if self.cross is not None:
            self.cross.mul_(inverse[:, None] * inverse[None, :])

    @property
    def hessian(self) -> torch.Tensor:
        """H itself (not a copy: a [K, K] less at GPTQ's peak): its lower triangle mirrored from the accumulated
        upper one, in place and again after every add_batch."""
        if self.nsamples == 0:
            raise ValueError(f"{self.name}: no calibration tokens reached this layer, its Hessian is empty")
        H = self._hessian
        for i0 in range(0, H.shape[0], SQUARE_BAND):
            i1 = min(i0 + SQUARE_BAND, H.shape[0])
            H[i0:i1, :i0] = H[:i0, i0:i1].t()
            diagonal_block = H[i0:i1, i0:i1]
            diagonal_block.copy_(diagonal_block.triu() + diagonal_block.triu(1).t())
        # A NaN or inf anywhere in the activations reaches H: one check here instead of one per batch.
        if not all_finite(H):
            raise ValueError(f"{self.name}: activations contain NaN or inf")
        return H


@dataclass
class QuantResult:
    codes: torch.Tensor  # int32 [N, K], 0 .. 2^bits - 1, original column order
    scales: torch.Tensor  # float32 [G, N]
    zeros: torch.Tensor  # int32 [G, N], true zero points
    g_idx: torch.Tensor  # int32 [K], group of each input column
    loss: float | None  # tr((W - Q) H (W - Q)^T) / (2 N); None for RTN without a Hessian
    damp: float | None  # damp_percent actually used (raised when H needed more); None for RTN

    def dequantize(self) -> torch.Tensor:
        return _code_values(self.codes, self.zeros, self.g_idx, self.scales)


def _code_values(codes: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                 scales: torch.Tensor | None = None) -> torch.Tensor:
    """(codes - zero) * scale [N, K] in float32 (without scales: the offsets codes - zero), the group parameters
    gathered a band of columns at a time: no weight-sized gather beside the result."""
    values = codes.to(torch.float32, copy=True)
    g = g_idx.long()
    for c0 in range(0, values.shape[1], SQUARE_BAND):
        band = g[c0:c0 + SQUARE_BAND]
        part = values[:, c0:c0 + SQUARE_BAND].sub_(zeros[band].t())
        if scales is not None:
            part.mul_(scales[band].t())
    return values


def grid_params(w: torch.Tensor, bits: int, sym: bool, mse: bool,
                column_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) for w [R, C]; zero is a float holding an integer. column_weights ([C] or [R, C]): what a
    rounding error in each column costs, for the clipping search (None: all alike)."""
    # The clipping search is memory-bound: over slices of rows that stay in cache it runs about 4x faster.
    if mse and w.numel() > MSE_SLICE_ELEMENTS:
        rows = w.split(max(MSE_SLICE_ELEMENTS // w.shape[1], 1))
        weights = [None] * len(rows) if column_weights is None else column_weights.expand_as(w).split(len(rows[0]))
        slices = [grid_params(part, bits, sym, mse, part_weights) for part, part_weights in zip(rows, weights)]
        return torch.cat([scale for scale, _ in slices]), torch.cat([zero for _, zero in slices])
    maxq = 2**bits - 1
    # The range always holds 0, so an exact 0 stays representable and the zero point lies in [0, maxq].
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax

    def params_for(shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (xmax - xmin) * shrink / maxq
        # An all-zero row has no range: any finite scale does, its codes are then `zero` and dequantize to 0.
        scale = torch.where(scale > 0, scale, 1.0)
        zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-xmin * shrink / scale).clamp(0, maxq)
        return scale, zero

    scale, zero = params_for(1.0)
    if mse:
        best_error = _rounding_error(w, scale, zero, maxq, column_weights)
        for shrink in MSE_SHRINKS[1:]:
            candidate_scale, candidate_zero = params_for(shrink)
            error = _rounding_error(w, candidate_scale, candidate_zero, maxq, column_weights)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            scale = torch.where(better, candidate_scale, scale)
            zero = torch.where(better, candidate_zero, zero)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return (w / scale).round_().add_(zero).clamp_(0, maxq)  # in place: one weight-sized temporary, not four


def _rounding_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
                    column_weights: torch.Tensor | None = None) -> torch.Tensor:
    scale, zero = scale[:, None], zero[:, None]
    dequantized = (_quantize(w, scale, zero, maxq) - zero) * scale
    error = (dequantized - w).abs_().pow_(MSE_NORM)
    return (error if column_weights is None else error.mul_(column_weights)).sum(dim=1)


def num_groups(k: int, group_size: int) -> int:
    """ceil(K / group_size): input k is in group k // group_size, so the last group is shorter when the size does not
    divide K (AutoGPTQ's layout)."""
    return -(-k // group_size)


def _group_params(w: torch.Tensor, group_size: int, bits: int, sym: bool, mse: bool,
                  column_weights: torch.Tensor | None = None):
    """(scale, zero) [G, N] for w [N, K] cut into groups of `group_size` consecutive columns, the last one shorter
    when group_size does not divide K. column_weights [K]: as in grid_params."""
    n, k = w.shape
    whole = k - k % group_size
    groups = whole // group_size
    # Row r of the reshaped w is row r // groups, group r % groups of w.
    whole_weights = None if column_weights is None else column_weights[:whole].reshape(groups, group_size).repeat(n, 1)
    scale, zero = grid_params(w[:, :whole].reshape(n * groups, group_size), bits, sym, mse, whole_weights)
    scale, zero = scale.reshape(n, groups), zero.reshape(n, groups)
    if whole < k:
        last_scale, last_zero = grid_params(w[:, whole:], bits, sym, mse,
                                            None if column_weights is None else column_weights[whole:])
        scale, zero = torch.cat([scale, last_scale[:, None]], 1), torch.cat([zero, last_zero[:, None]], 1)
    return scale.t().contiguous(), zero.t().contiguous()


def _output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    return float((error @ hessian).mul_(error).sum() / (2 * error.shape[0]))


def _check_inputs(weight: torch.Tensor, bits: int, group_size: int, name: str) -> None:
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if not valid_group_size(group_size):
        raise ValueError(f"{name}: group_size {group_size} must be positive or -1 (per channel)")
    if not all_finite(weight):
        raise ValueError(f"{name}: weight contains NaN or inf")


def _check_hessian(hessian: torch.Tensor, k: int, name: str) -> None:
    if hessian.shape != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match in_features K={k}")
    if not all_finite(hessian):
        raise ValueError(f"{name}: Hessian contains NaN or inf")
    if not hessian.diagonal().any():
        raise ValueError(f"{name}: the Hessian is all zeros: no calibration tokens reached this layer")


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True, mse: bool = False,
                 hessian: torch.Tensor | None = None, name: str = "") -> QuantResult:
    """Round each weight to the nearest level of its group's grid; `loss` needs the layer's Hessian."""
    _check_inputs(weight, bits, group_size, name)
    w = weight.to(torch.float32)
    k = w.shape[1]
    group = group_size if group_size > 0 else k
    if hessian is not None:
        _check_hessian(hessian, k, name)
    scales, zeros = _group_params(w, group, bits, sym, mse)
    g_idx = torch.arange(k, device=w.device) // group
    codes = _quantize(w, scales[g_idx].t(), zeros[g_idx].t(), 2**bits - 1)
    result = QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx.to(torch.int32), None, None)
    if hessian is not None:
        result.loss = _output_error(w - result.dequantize(), hessian.to(w.device, torch.float32))
    return result


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True,
                  desc_act: bool = False, static_groups: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128, mse: bool = True, asym_cross: torch.Tensor | None = None,
                  group_act_order: bool = False, refine_passes: int = 0, free_cross: bool = False,
                  name: str = "") -> QuantResult:
    """Quantize weight [N, K] with GPTQ, given the Hessian H [K, K] of its calibration inputs.

    group_size: input columns per (scale, zero), -1 for one per output row. desc_act: act-order, the columns with
    the largest diag(H) first. static_groups: take every group's grid from the original weights up front (with
    desc_act this keeps g_idx = k // group_size). damp_percent: damping added to diag(H), as a fraction of its mean.
    block_size: columns per lazy batch update. mse: search a clipped grid (see MSE_SHRINKS). name: for messages.

    group_act_order: act-order that keeps every group's columns together (GPTQModel's group-aware reordering): the
    groups in descending order of their largest diag(H), the columns of each group likewise, each group's grid taken
    when its first column comes up. g_idx stays k // group_size, so the checkpoint runs as fast as one without
    act-order, and unlike static groups the grid sees the updates of the groups quantized before it.

    asym_cross: asymmetric calibration (GPTAQ, Li et al. 2025), a multiple alpha of C = 2/n sum((x_fp - x) x^T)
    (HessianAccumulator's `cross`). Quantizing only for the layer's own inputs x lets the errors of the layers before
    it pile up; the weight whose outputs on x best match the full-precision model's outputs W x_fp is
    W + W C H^-1 (least squares), and GPTQ on it under H minimizes ||Q x - W x_fp||^2 in closed form. alpha < 1
    moves only part of the way, which damps the estimate's noise. free_cross: the caller is done with asym_cross,
    whose memory is then released once used (before the inverse's Cholesky: one [K, K] less at GPTQ's peak).

    refine_passes: after GPTQ's one sweep, this many rounds of `refine` (least-squares scales for the codes, then
    every code re-chosen for the others), each lowering GPTQ's objective under the undamped H.
    """
    _check_inputs(weight, bits, group_size, name)
    n, k = weight.shape
    _check_hessian(hessian, k, name)
    if asym_cross is not None and asym_cross.shape != (k, k):
        raise ValueError(f"{name}: asym_cross shape {tuple(asym_cross.shape)} does not match in_features K={k}")
    check_group_act_order(group_act_order, desc_act, static_groups, group_size, name)
    if refine_passes < 0:
        raise ValueError(f"{name}: refine_passes must be >= 0, got {refine_passes}")
    # A NaN fails both comparisons: the damping loop below only ends for a finite start.
    if not 0 <= damp_percent <= MAX_DAMP_PERCENT or block_size <= 0:
        raise ValueError(f"{name}: damp_percent must be in [0, {MAX_DAMP_PERCENT:g}] and block_size > 0, "
                         f"got {damp_percent}, {block_size}")
    maxq = 2**bits - 1
    group = group_size if group_size > 0 else k
    target = weight.to(torch.float32).clone()
    hessian = hessian.to(device=target.device, dtype=torch.float32)
    dead = hessian.diagonal() == 0
    target[:, dead] = 0
    importance = hessian.diagonal().masked_fill(dead, 1)

    # Act-order: quantize the columns with the largest inputs first, while many columns remain to absorb errors.
    positions = torch.arange(k, device=target.device)
    permuted = desc_act or group_act_order
    perm = (_group_order(importance, group) if group_act_order
            else torch.argsort(importance, descending=True, stable=True) if desc_act else positions)
    # Without act-order W is `target` itself (updated in place; `target` is not needed afterwards then): no copies.
    W = target[:, perm] if permuted else target
    asymmetric = asym_cross is not None
    if asymmetric:  # C's columns of dead inputs are 0: the shift leaves those columns at 0
        C = asym_cross.to(device=W.device, dtype=torch.float32)
        shift = _times_permuted(W, C, perm) if permuted else W @ C
        if free_cross:  # the storage itself: the caller's references (and its call's arguments) would keep it
            asym_cross.untyped_storage().resize_(0)
        asym_cross = C = None
    # Row i of this upper Cholesky factor of H^-1 says how column i's error moves the columns after it.
    Hinv, damp, mean_diagonal = _inverse_hessian_cholesky(
        lambda: _free_dead_inputs(hessian, target.device, perm if permuted else None)[0], damp_percent, name)
    if asymmetric:  # W += W C H_damped^-1, with H_damped^-1 = Hinv^T Hinv, one weight-sized temporary at a time
        shift = shift @ Hinv.t()
        W += shift @ Hinv
        shift = None
        if permuted:
            target[:, perm] = W  # the fixed grid below reads the shifted weights in their original order

    # What GPTQ approximates (the shifted weights with asymmetric calibration), in original order, for refine.
    goal = (target if permuted else target.clone()) if refine_passes else None
    # What a rounding error in each position's column costs once the columns after it have absorbed what they can
    # (OBS: error^2 / [H^-1]_ii, H^-1 of the columns not yet quantized): the clipping search weighs errors by it.
    error_cost = Hinv.diagonal().square().reciprocal()
    # Per channel, or static groups: every group's grid comes from the weights to quantize, before any update.
    fixed_grid = static_groups or group_size == -1
    if fixed_grid:
        original_cost = torch.empty_like(error_cost)
        original_cost[perm] = error_cost
        scales, zeros = _group_params(target, group, bits, sym, mse, original_cost)
    else:
        scales = torch.empty(num_groups(k, group), n, device=target.device)
        zeros = torch.empty(num_groups(k, group), n, device=target.device)
    # The group of the column at each position: its own group when groups are fixed or kept whole, else the run of
    # `group` positions it falls in.
    position_group = (perm if fixed_grid or group_act_order else positions) // group
    group_at = position_group.tolist()
    # A group's grid is taken when its first column comes up, from weights that must carry every earlier column's
    # update: with blocks of whole groups those are the current block's own, already updated weights.
    if not fixed_grid:
        block_size = max(block_size // group, 1) * group

    codes = torch.empty(n, k, dtype=torch.uint8, device=W.device)  # levels 0 .. 255: a quarter of float32's bytes
    damped_output_error = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        errors = torch.empty(n, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            column = i1 + i
            if not fixed_grid and column % group == 0:
                scales[group_at[column]], zeros[group_at[column]] = grid_params(
                    W1[:, i:i + group], bits, sym, mse, error_cost[column:column + group])
            scale, zero = scales[group_at[column]], zeros[group_at[column]]
            q = _quantize(W1[:, i], scale, zero, maxq)
            codes[:, column] = q
            errors[:, i] = (W1[:, i] - (q - zero) * scale) / Hinv1[i, i]
            # Spread the error over the rest of the block now; over later blocks once, below, as one matmul.
            W1[:, i + 1:].addmm_(errors[:, i:i + 1], Hinv1[i:i + 1, i + 1:], alpha=-1)
        W[:, i2:].addmm_(errors, Hinv[i1:i2, i2:], alpha=-1)
        damped_output_error += errors.square().sum(dtype=torch.float64)

    g_idx = torch.empty(k, dtype=torch.int32, device=W.device)
    g_idx[perm] = position_group.to(torch.int32)
    if permuted:
        original_order = torch.empty_like(codes)
        original_order[:, perm] = codes
        codes = original_order
    if refine_passes:
        W = Hinv = None  # GPTQ's working copies: freed, refine takes H in the original order
        codes, scales, objective = refine(goal, codes, scales, zeros, g_idx,
                                          _free_dead_inputs(hessian, goal.device, copy=False)[0], maxq, refine_passes)
    result = QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, None, damp)
    target = goal = codes = W = None  # weight-sized copies the loss below does not need
    if refine_passes and not asymmetric:  # the goal was the layer's own weights: refine measured the loss
        result.loss = objective / (2 * n)
        return result
    # Every update adds an error times a row of Hinv, so W - Q = errors @ Hinv, and Hinv H_damped Hinv^T = I: the
    # sum of squared errors is tr((W - Q) H_damped (W - Q)^T). Taking the damping's part off leaves the output error
    # under H itself, without the N x K x K product that computing it directly costs.
    error = result.dequantize().neg_().add_(weight)  # weight - Q, in the dequantized copy
    error[:, dead] = 0  # the dead columns' codes sit at the zero point: both are 0 there
    if asymmetric:  # the shifted weights were the target: measure against the layer's own weights
        result.loss = _output_error(error, hessian.to(error))
        return result
    damping_part = damp * mean_diagonal * error.square_().sum(dtype=torch.float64)
    result.loss = float(damped_output_error - damping_part) / (2 * n)
    return result


def _times_permuted(W: torch.Tensor, C: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """W @ C[perm][:, perm], gathering C a band of columns at a time: no permuted [K, K] copy at GPTQ's peak."""
    product = torch.empty_like(W)
    for j0 in range(0, C.shape[1], SQUARE_BAND):
        columns = perm[j0:j0 + SQUARE_BAND]
        product[:, j0:j0 + len(columns)] = W @ C[perm[:, None], columns]
    return product


def _free_dead_inputs(hessian: torch.Tensor, device, perm: torch.Tensor | None = None,
                      copy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 H with a unit diagonal at dead inputs, the dead mask): an input that is always 0 leaves its column
    free, so it is quantized to 0 and H stays invertible there. perm: H's rows and columns in this order (one gather,
    no second [K, K]). Without copy, H itself when it needs no change."""
    H = hessian.to(device=device, dtype=torch.float32)
    dead = H.diagonal() == 0
    if perm is not None:
        H, dead = H[perm[:, None], perm], dead[perm]
    elif copy or dead.any():
        H = H.clone()
    H[dead, dead] = 1
    return H, dead


def refine(goal: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
           H: torch.Tensor, maxq: int, passes: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lower tr((goal - Q) H (goal - Q)^T) from a GPTQ result by alternating exact steps (QuantEase-style descent):
    the least-squares scales for the codes, then one sweep re-choosing each code as the nearest level to its
    optimum given all the others; the scales once more at the end. Zero points stay (the symmetric grid's is fixed).
    Returns the codes, the scales and the objective (summed over rows)."""
    for _ in range(passes):
        scales, _ = _fit_scales(goal, codes, zeros, scales, g_idx, H)
        codes = _descend_codes(goal, codes, zeros, scales, g_idx, H, maxq)
    scales, objective = _fit_scales(goal, codes, zeros, scales, g_idx, H)
    return codes, scales, objective


def _fit_scales(goal, codes, zeros, scales, g_idx, H) -> tuple[torch.Tensor, float]:
    """Per row n the scales s [G] that minimize (w - D s)^T H (w - D s), D [K, G] holding row n's code offsets
    (codes - zero) in its groups' columns: the normal equations (D^T H D) s = D^T H w, one G x G system per row.
    A group whose codes are all at the zero point (or a failed solve, or a scale that comes out <= 0) keeps its
    scale. Returns the scales [G, N] and the objective they reach (summed over rows)."""
    n, k = goal.shape
    groups = scales.shape[0]
    g = g_idx.long()
    offsets = _code_values(codes, zeros, g_idx)  # [N, K]
    group_columns = [(g == j).nonzero().squeeze(1) for j in range(groups)]
    # Groups that are runs of columns (no column act-order): sums per group are slices, and the symmetric normal
    # matrix needs only the groups from j on for its column j (half the arithmetic).
    in_order = bool((g[1:] >= g[:-1]).all())

    def per_group(x: torch.Tensor, first: int) -> torch.Tensor:
        """x [N, K] -> [N, G - first]: sums over the columns of each group from `first` on (in order, x holds only
        the columns from that group's first one)."""
        if not in_order:
            return torch.zeros(n, groups, device=x.device).index_add_(1, g, x)[:, first:]
        start = int(group_columns[first][0])
        return torch.stack([x[:, c[0] - start:c[-1] + 1 - start].sum(dim=1) for c in group_columns[first:]], dim=1)

    # goal @ H is computed again by every fit rather than kept: a weight-sized matrix less at refine's peak.
    weighted_goal = goal @ H
    rhs = per_group(offsets * weighted_goal, 0)
    goal_energy = (goal * weighted_goal).sum(dim=1)
    weighted_goal = None
    normal = torch.empty(n, groups, groups, device=goal.device)
    for j, columns in enumerate(group_columns):
        # Row n: H D_n's column j (the j-th group's offsets through H), then D_n^T of it, summed per group.
        start = int(columns[0]) if in_order else 0
        column = per_group((offsets[:, columns] @ H[columns, start:]).mul_(offsets[:, start:]), j)
        normal[:, j:, j] = column
        normal[:, j, j:] = column
    diagonal = normal.diagonal(dim1=1, dim2=2)
    unused = (diagonal <= 0).float()
    diagonal.add_(unused)  # a group with nothing to scale: a unit row keeps the system solvable; its scale is kept
    fitted, info = torch.linalg.solve_ex(normal, rhs)
    keep = (unused > 0) | (info != 0)[:, None] | ~torch.isfinite(fitted) | (fitted <= 0)
    fitted = torch.where(keep, scales.t(), fitted)
    diagonal.sub_(unused)
    # The objective: w H w - 2 s . D^T H w + s^T (D^T H D) s.
    objective = (goal_energy - 2 * (fitted * rhs).sum(dim=1)
                 + (fitted[:, None, :] @ normal @ fitted[:, :, None]).flatten())
    return fitted.t().contiguous(), float(objective.sum())


def _descend_codes(goal, codes, zeros, scales, g_idx, H, maxq: int, block_size: int = 128) -> torch.Tensor:
    """One sweep of coordinate descent on the codes (updated in place): each column in turn moves to the level
    nearest its optimum given every other column, goal_k - (E H)_k / H_kk + E_k for the error E = Q - goal. Columns
    go in blocks: E H for a block's columns is one matmul at its start, kept current within the block by rank-1
    updates."""
    g = g_idx.long()
    error = _code_values(codes, zeros, g_idx, scales).sub_(goal)
    for i1 in range(0, goal.shape[1], block_size):
        i2 = min(i1 + block_size, goal.shape[1])
        error_h = error @ H[:, i1:i2]
        scale, zero = scales[g[i1:i2]].t(), zeros[g[i1:i2]].t()
        for i in range(i2 - i1):
            k = i1 + i
            optimum = goal[:, k] + error[:, k] - error_h[:, i] / H[k, k]
            q = _quantize(optimum, scale[:, i], zero[:, i], maxq)
            new_error = (q - zero[:, i]) * scale[:, i] - goal[:, k]
            error_h.addr_(new_error - error[:, k], H[k, i1:i2])
            error[:, k], codes[:, k] = new_error, q
    return codes


def check_group_act_order(group_act_order: bool, desc_act: bool, static_groups: bool, group_size: int,
                          name: str = "") -> None:
    if group_act_order and (desc_act or static_groups or group_size == -1):
        raise ValueError(f"{name + ': ' if name else ''}group_act_order orders whole groups: it takes neither "
                         "desc_act nor static_groups, and needs a group size (not -1)")


def _group_order(importance: torch.Tensor, group: int) -> torch.Tensor:
    """Positions -> columns for group_act_order: whole groups, the most important (largest diag(H)) first, each
    group's columns by importance; a shorter last group stays last, so every group starts at a multiple of `group`."""
    k = importance.shape[0]
    whole = k - k % group
    by_group = importance[:whole].reshape(-1, group)
    within = torch.argsort(by_group, dim=1, descending=True, stable=True)
    order = torch.argsort(by_group.max(dim=1).values, descending=True, stable=True)
    perm = (within + torch.arange(0, whole, group, device=importance.device)[:, None])[order].reshape(-1)
    tail = torch.argsort(importance[whole:], descending=True, stable=True) + whole
    return torch.cat([perm, tail])


# The default strength of asymmetric calibration (gptq_quantize's asym_cross): benchmarks/RESULTS.md, "Quality
# ablation", measured 0.5 best of 0.25 / 0.5 / 1 on stories260k_qwen and a large gain on SmolLM2-135M.
DEFAULT_ASYM_ALPHA = 0.5

# Rounds of `refine` after GPTQ's sweep by default: benchmarks/RESULTS.md, "Refine after GPTQ" (never measurably worse
# on either real model, lower output error in every layer, 4-bit g32 on stories260k 0.437 -> 0.385 of RTN's loss).
DEFAULT_REFINE_PASSES = 2

# Input scaling (AWQ, Lin et al. 2024): per input channel k, s_k = rms(x_k)^a, normalized to a geometric mean of 1;
# the exponent a is searched on this grid (a = 0 leaves the weights as they are).
INPUT_SCALE_EXPONENTS = [i / 10 for i in range(11)]


def input_scales(weights: list, hessian: torch.Tensor, bits: int, group_size: int, sym: bool = True,
                 mse: bool = True) -> torch.Tensor:
    """Scales s [K] for the inputs of linears that share them: quantizing W diag(s) (the inputs divided by s, which
    a preceding norm can absorb) gives larger inputs finer steps. s minimizes the summed output error of
    round-to-nearest under H, which W diag(s) and H / (s s^T) leave unchanged in value but not in rounding."""
    rms = (hessian.diagonal() / 2).clamp(min=torch.finfo(torch.float32).tiny).sqrt()
    best, best_scales = float("inf"), torch.ones_like(rms)
    weights = [w.float() for w in weights]
    for exponent in INPUT_SCALE_EXPONENTS:
        scales = rms**exponent
        scales = scales / scales.log().mean().exp()
        scaled_hessian = hessian / (scales[:, None] * scales[None, :])
        loss = sum(rtn_quantize(w * scales, bits, group_size, sym, mse=mse, hessian=scaled_hessian).loss
                   for w in weights)
        if loss < best:
            best, best_scales = loss, scales
    return best_scales


def _inverse_hessian_cholesky(working_copy: Callable[[], torch.Tensor], damp_percent: float,
                               name: str) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, the damp it took to be positive definite and
    mean(diag H), for the H that working_copy() returns afresh (damped in place, so called again for a retry). Each
    step drops its input once its output exists: two [K, K] at a time besides the caller's."""
    H = working_copy()
    mean_diagonal = H.diagonal().mean()
    if not torch.isfinite(mean_diagonal):  # finite entries can still overflow their sum
        raise ValueError(f"{name}: the Hessian's diagonal is too large to damp (its mean is {float(mean_diagonal)})")
    damp = damp_percent  # in [0, MAX_DAMP_PERCENT]: at most four tenfold raises reach the limit
    while True:
        H = working_copy() if H is None else H
        H.diagonal().add_(damp * mean_diagonal)
        lower, info = torch.linalg.cholesky_ex(H)
        H = None
        if info == 0:
            inverse, lower = torch.cholesky_inverse(lower), None
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            inverse = None
            if info == 0 and all_finite(upper):
                if damp != damp_percent:
                    warnings.warn(f"{name}: the Hessian is not positive definite with damp_percent={damp_percent}; "
                                  f"used damp_percent={damp:g}")
                return upper, damp, mean_diagonal
        if damp >= MAX_DAMP_PERCENT:
            raise ValueError(f"{name}: the Hessian is not positive definite even with damp_percent={damp:g}")
        # From zero, restart at a tenth of the usual 1 %.
        damp = max(10 * damp, 1e-3)
