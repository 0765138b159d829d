import warnings

import pytest
import torch

from qwen_quant.gptq import (HessianAccumulator, QuantResult, _group_params, gptq_quantize, grid_params, input_scales,
                             rtn_quantize)

K, N = 256, 64


def correlated_layer(seed: int, k: int = K, n: int = N, tokens: int = 1024):
    """Weight [n, k] and the Hessian 2/t * X^T X of correlated activations X = Z A."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen) @ torch.randn(k, k, generator=gen)
    return torch.randn(n, k, generator=gen), 2 / tokens * x.t() @ x


def output_error(weight: torch.Tensor, result: QuantResult, hessian: torch.Tensor) -> float:
    e = (weight - result.dequantize()).double()
    return float(torch.trace(e @ hessian.double() @ e.t()) / (2 * weight.shape[0]))


def reference_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Plain min/max round-to-nearest per group: (codes [N, K], scales [G, N], zeros [G, N])."""
    maxq = 2**bits - 1
    n, k = weight.shape
    g = group_size if group_size > 0 else k
    groups = weight.reshape(n, k // g, g)
    low = groups.amin(dim=2).clamp(max=0)
    high = groups.amax(dim=2).clamp(min=0)
    if sym:
        high = torch.maximum(high, -low)
        low = -high
    scale = (high - low) / maxq
    scale[scale == 0] = 1
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-low / scale)
    codes = torch.clamp(torch.round(groups / scale[..., None]) + zero[..., None], 0, maxq)
    return codes.reshape(n, k).int(), scale.t(), zero.t().int()


def reference_gptq(weight, hessian, bits, group_size, sym, damp_percent=0.01):
    """GPTQ without its speedups, in float64: quantize column by column, update the rest with the full inverse
    Hessian, then remove the quantized column from it (the OBS downdate)."""
    maxq = 2**bits - 1
    w, h = weight.double().clone(), hessian.double().clone()
    n, k = w.shape
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    codes = torch.empty(n, k, dtype=torch.int32)
    for i in range(k):
        if i % group_size == 0:
            scale, zero = grid_params(w[:, i:i + group_size], bits, sym, mse=False)
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, maxq)
        codes[:, i] = q.int()
        error = (w[:, i] - (q - zero) * scale) / hinv[i, i]
        w -= error[:, None] * hinv[i][None, :]
        hinv -= hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


def check_invariants(result: QuantResult, bits: int, group_size: int, sym: bool, n: int, k: int) -> None:
    group = group_size if group_size > 0 else k
    groups = -(-k // group)
    assert result.codes.shape == (n, k) and result.codes.dtype == torch.int32
    assert result.scales.shape == (groups, n) and result.scales.dtype == torch.float32
    assert result.zeros.shape == (groups, n) and result.zeros.dtype == torch.int32
    assert result.g_idx.shape == (k,) and result.g_idx.dtype == torch.int32
    assert 0 <= int(result.codes.min()) and int(result.codes.max()) <= 2**bits - 1
    assert 0 <= int(result.zeros.min()) and int(result.zeros.max()) <= 2**bits - 1
    assert torch.isfinite(result.scales).all() and (result.scales > 0).all()
    if sym:
        assert (result.zeros == 2 ** (bits - 1)).all()
    # Every group holds group_size columns (the last one the rest of K), whatever order they were quantized in.
    sizes = torch.full((groups,), group)
    sizes[-1] = k - (groups - 1) * group
    assert torch.equal(torch.bincount(result.g_idx, minlength=groups), sizes)
    expected = torch.stack([(result.codes[:, j] - result.zeros[result.g_idx[j]]) * result.scales[result.g_idx[j]]
                            for j in range(k)], dim=1)
    assert torch.equal(result.dequantize(), expected)


def test_hessian_accumulator_is_the_running_mean_of_2_x_xt():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 32, generator=gen), torch.randn(5, 32, generator=gen).bfloat16(),
               torch.randn(0, 32), torch.randn(1, 3, 32, generator=gen).half()]
    acc = HessianAccumulator(32, name="h.0.attn.c_attn")
    for x in batches:
        acc.add_batch(x)
    rows = torch.cat([x.reshape(-1, 32).double() for x in batches])
    assert acc.nsamples == 14 + 5 + 3
    assert torch.allclose(acc.hessian.double(), 2 / rows.shape[0] * rows.t() @ rows, rtol=1e-5, atol=1e-5)
    assert acc.hessian.dtype == torch.float32


def test_hessian_accumulator_mirrors_in_place_across_bands_and_batches():
    """H is the accumulator's own storage (no [K, K] copy at GPTQ's peak), mirrored from its upper triangle band by
    band; read between batches, it still ends as the mean of all; GPTQ leaves it as it was."""
    gen = torch.Generator().manual_seed(3)
    k = 1100  # three bands of mirroring, the last one shorter
    batches = [torch.randn(700, k, generator=gen), torch.randn(900, k, generator=gen)]
    acc = HessianAccumulator(k)
    acc.add_batch(batches[0])
    first = acc.hessian
    assert torch.equal(first, first.t())
    acc.add_batch(batches[1])
    H = acc.hessian
    assert H.data_ptr() == first.data_ptr()  # the storage itself
    assert torch.equal(H, H.t())
    rows = torch.cat(batches).double()
    assert torch.allclose(H.double(), 2 / rows.shape[0] * rows.t() @ rows, rtol=1e-4, atol=1e-4)
    before = H.clone()
    weight = torch.randn(16, k, generator=gen)
    gptq_quantize(weight, H, 4, 128, group_act_order=True, refine_passes=1)
    gptq_quantize(weight, H, 4, 128, desc_act=True)
    assert torch.equal(H, before)


def test_the_permuted_product_gathers_in_bands_what_a_whole_gather_gives():
    from qwen_quant.gptq import _times_permuted

    gen = torch.Generator().manual_seed(4)
    k = 1100  # bands of columns, the last one shorter
    W, C, perm = torch.randn(24, k, generator=gen), torch.randn(k, k, generator=gen), torch.randperm(k, generator=gen)
    assert torch.allclose(_times_permuted(W, C, perm), W @ C[perm][:, perm], rtol=1e-5, atol=1e-4)


def test_hessian_accumulator_fails_loudly():
    acc = HessianAccumulator(8, name="h.3.mlp.c_proj")
    with pytest.raises(ValueError, match="h.3.mlp.c_proj.*no calibration tokens"):
        acc.hessian
    with pytest.raises(ValueError, match="h.3.mlp.c_proj.*9 features, expected 8"):
        acc.add_batch(torch.ones(2, 9))
    assert acc.nsamples == 0
    acc.add_batch(torch.tensor([[1.0] * 7 + [float("inf")]]))
    with pytest.raises(ValueError, match="h.3.mlp.c_proj.*NaN or inf"):  # checked once, when H is read
        acc.hessian


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_equals_plain_min_max_rounding(bits, group_size, sym):
    weight, _ = correlated_layer(1)
    weight[3] = 0  # an all-zero row
    weight[5, 64:96] = 0  # an all-zero group
    weight[7, 32:64] = weight[7, 32:64].abs()  # a group without negative weights: its asymmetric zero point is 0
    result = rtn_quantize(weight, bits, group_size, sym, mse=False)
    codes, scales, zeros = reference_rtn(weight, bits, group_size, sym)
    assert torch.equal(result.codes, codes)
    assert torch.equal(result.scales, scales)
    assert torch.equal(result.zeros, zeros)
    assert torch.equal(result.g_idx, torch.arange(K, dtype=torch.int32) // (group_size if group_size > 0 else K))
    check_invariants(result, bits, group_size, sym, N, K)
    assert (result.dequantize()[3] == 0).all() and (result.dequantize()[5, 64:96] == 0).all()


@pytest.mark.parametrize("sym", [True, False])
def test_mse_clipping_never_worsens_the_rounding_error_it_minimizes(sym):
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((512, 64))
    for bits in (2, 4):
        plain_scale, plain_zero = grid_params(weight, bits, sym, mse=False)
        scale, zero = grid_params(weight, bits, sym, mse=True)

        def error(s, z):
            q = torch.clamp(torch.round(weight / s[:, None]) + z[:, None], 0, 2**bits - 1)
            return ((q - z[:, None]) * s[:, None] - weight).abs().pow(2.4).sum(dim=1)

        assert (error(scale, zero) <= error(plain_scale, plain_zero)).all()
        # Heavy tails make clipping pay off on most rows.
        assert (scale < plain_scale).float().mean() > 0.5


def test_clipping_search_weighs_each_columns_error_by_its_cost():
    torch.manual_seed(0)
    # More rows than one cache-sized slice of the search (MSE_SLICE_ELEMENTS), the last slice shorter.
    weight = torch.rand(17000, 32) * 2 - 1
    weight[:, 0] = 6.0  # an outlier column: clipping it trades its error for finer steps elsewhere
    plain_scale, _ = grid_params(weight, 4, True, mse=False)
    unweighted, _ = grid_params(weight, 4, True, mse=True)
    outlier_costly = torch.ones(32)
    outlier_costly[0] = 1e6
    outlier_free = torch.ones(32)
    outlier_free[0] = 0
    kept, _ = grid_params(weight, 4, True, mse=True, column_weights=outlier_costly)
    clipped, _ = grid_params(weight, 4, True, mse=True, column_weights=outlier_free)
    assert torch.equal(kept, plain_scale)  # any clipping of a column that costs 1e6 per unit is the worst choice
    assert (clipped <= unweighted).all() and (clipped < unweighted).float().mean() > 0.5
    # A weight per element ([R, C]) picks each row's factor as the same row's [C] weights do.
    rowwise = torch.where(torch.arange(17000)[:, None] % 2 == 0, outlier_costly, outlier_free)
    mixed, _ = grid_params(weight, 4, True, mse=True, column_weights=rowwise)
    assert torch.equal(mixed[0::2], kept[0::2]) and torch.equal(mixed[1::2], clipped[1::2])


def test_group_grids_take_their_own_columns_weights():
    torch.manual_seed(1)
    weight = torch.distributions.StudentT(3.0).sample((6, 80))
    costs = torch.rand(80) ** 4
    scales, zeros = _group_params(weight, 32, 3, False, True, costs)  # groups of 32, 32 and a last one of 16
    for g, (a, b) in enumerate([(0, 32), (32, 64), (64, 80)]):
        scale, zero = grid_params(weight[:, a:b], 3, False, True, costs[a:b])
        assert torch.equal(scales[g], scale) and torch.equal(zeros[g], zero)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_output_error_is_below_rtn(bits, group_size, sym, desc_act, static_groups):
    weight, hessian = correlated_layer(2)
    result = gptq_quantize(weight, hessian, bits, group_size, sym, desc_act, static_groups, mse=False, name="lin")
    rtn = rtn_quantize(weight, bits, group_size, sym, mse=False, hessian=hessian)
    check_invariants(result, bits, group_size, sym, N, K)
    assert result.loss == pytest.approx(output_error(weight, result, hessian), rel=1e-4)
    assert rtn.loss == pytest.approx(output_error(weight, rtn, hessian), rel=1e-3)
    assert result.loss < 0.8 * rtn.loss
    assert result.damp == 0.01

    g = group_size if group_size > 0 else K
    if desc_act and not static_groups:
        # Groups are runs of g columns in act-order: the largest inputs first.
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        assert torch.equal(result.g_idx[order], torch.arange(K, dtype=torch.int32) // g)
    else:
        assert torch.equal(result.g_idx, torch.arange(K, dtype=torch.int32) // g)


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, 64, False), (2, -1, True)])
def test_gptq_with_mse_clipping_beats_plain_rtn(bits, group_size, sym):
    weight, hessian = correlated_layer(3)
    result = gptq_quantize(weight, hessian, bits, group_size, sym, desc_act=True, static_groups=True, mse=True)
    check_invariants(result, bits, group_size, sym, N, K)
    assert result.loss < 0.8 * rtn_quantize(weight, bits, group_size, sym, mse=False, hessian=hessian).loss


@pytest.mark.parametrize("group_size,block_size", [(8, 16), (32, 16), (-1, 24)])
def test_gptq_matches_the_unoptimized_algorithm(group_size, block_size):
    weight, hessian = correlated_layer(4, k=64, n=32)
    result = gptq_quantize(weight, hessian, 4, group_size, sym=False, block_size=block_size, mse=False)
    # Per channel, the reference's one group takes its grid from the original weights, as GPTQ does.
    expected = reference_gptq(weight, hessian, 4, group_size if group_size > 0 else 64, sym=False)
    # float32 against float64: only a rare tie may round the other way.
    assert (result.codes != expected).float().mean() < 0.01
    assert (result.codes - expected).abs().max() <= 1


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_quantizes_a_shorter_last_group_on_its_own(sym):
    weight, _ = correlated_layer(10, k=200)
    result = rtn_quantize(weight, 4, 64, sym, mse=False)
    check_invariants(result, 4, 64, sym, N, 200)
    assert torch.equal(result.g_idx, torch.arange(200, dtype=torch.int32) // 64)  # groups of 64, 64, 64, 8
    for first, last in ((0, 64), (64, 128), (128, 192), (192, 200)):
        alone = rtn_quantize(weight[:, first:last], 4, -1, sym, mse=False)
        assert torch.equal(result.codes[:, first:last], alone.codes)
        assert torch.equal(result.scales[first // 64], alone.scales[0])


@pytest.mark.parametrize("desc_act,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_with_a_shorter_last_group(desc_act, static_groups):
    weight, hessian = correlated_layer(11, k=200)
    result = gptq_quantize(weight, hessian, 4, 64, desc_act=desc_act, static_groups=static_groups, block_size=32,
                           mse=False)
    check_invariants(result, 4, 64, True, N, 200)
    assert result.loss == pytest.approx(output_error(weight, result, hessian), rel=1e-4)
    assert result.loss < 0.8 * rtn_quantize(weight, 4, 64, mse=False, hessian=hessian).loss
    if not desc_act:
        assert torch.equal(result.g_idx, torch.arange(200, dtype=torch.int32) // 64)
        expected = reference_gptq(weight, hessian, 4, 64, sym=True)
        assert (result.codes != expected).float().mean() < 0.01


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_without_correlations_is_rtn(desc_act, group_size):
    """With H = c I no error can be compensated: GPTQ must round exactly like RTN."""
    weight, _ = correlated_layer(5)
    result = gptq_quantize(weight, 3 * torch.eye(K), 4, group_size, desc_act=desc_act, mse=False)
    rtn = rtn_quantize(weight, 4, group_size, mse=False)
    assert torch.equal(result.codes, rtn.codes) and torch.equal(result.scales, rtn.scales)


@pytest.mark.parametrize("desc_act", [False, True])
def test_dead_input_columns_quantize_to_zero(desc_act):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(512, K, generator=gen) @ torch.randn(K, K, generator=gen)
    x[:, [0, 17, 200]] = 0
    hessian = 2 / 512 * x.t() @ x
    weight = torch.randn(N, K, generator=gen)
    result = gptq_quantize(weight, hessian, 4, 32, desc_act=desc_act, mse=False)
    check_invariants(result, 4, 32, True, N, K)
    assert (result.dequantize()[:, [0, 17, 200]] == 0).all()
    assert result.loss == pytest.approx(output_error(weight, result, hessian), rel=1e-4)
    assert result.loss < rtn_quantize(weight, 4, 32, mse=False, hessian=hessian).loss

    # Their unit diagonal keeps an otherwise well-conditioned H positive definite without any damping.
    x = torch.randn(1024, K, generator=gen)
    x[:, [0, 17, 200]] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = gptq_quantize(weight, 2 / 1024 * x.t() @ x, 4, 32, desc_act=desc_act, damp_percent=0, mse=False)
    assert result.damp == 0 and (result.dequantize()[:, [0, 17, 200]] == 0).all()


def test_singular_hessian_raises_the_damping_with_a_warning():
    weight, _ = correlated_layer(7, k=64, n=16)
    hessian = torch.eye(64)
    hessian[0, 1] = hessian[1, 0] = 1  # inputs 0 and 1 are always equal: H is singular
    with pytest.warns(UserWarning, match="h.0.mlp.w1.*damp_percent=0; used damp_percent=0.001"):
        result = gptq_quantize(weight, hessian, 4, 32, damp_percent=0, name="h.0.mlp.w1")
    assert result.damp == 0.001
    assert result.loss == pytest.approx(output_error(weight, result, hessian), rel=1e-4)
    check_invariants(result, 4, 32, True, 16, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gptq_quantize(weight, hessian, 4, 32, damp_percent=0.01).damp == 0.01


def test_a_hessian_that_no_damping_fixes_is_an_error():
    weight, _ = correlated_layer(8, k=64, n=16)
    with pytest.raises(ValueError, match="h.2.attn.c_proj.*not positive definite even with damp_percent=1"):
        gptq_quantize(weight, -torch.eye(64), 4, 32, name="h.2.attn.c_proj")


def test_bad_inputs_are_named():
    weight, hessian = correlated_layer(9)
    with pytest.raises(ValueError, match="bits=5"):
        gptq_quantize(weight, hessian, 5, 32, name="lin")
    with pytest.raises(ValueError, match="bits=1"):
        rtn_quantize(weight, 1, 32)
    for group_size in (0, -2):
        with pytest.raises(ValueError, match=f"lin: group_size {group_size} must be positive or -1"):
            gptq_quantize(weight, hessian, 4, group_size, name="lin")
        with pytest.raises(ValueError, match=f"lin: group_size {group_size} must be positive or -1"):
            rtn_quantize(weight, 4, group_size, name="lin")
    bad = weight.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="h.1.mlp.w2: weight contains NaN or inf"):
        gptq_quantize(bad, hessian, 4, 32, name="h.1.mlp.w2")
    with pytest.raises(ValueError, match="h.1.mlp.w2: weight contains NaN or inf"):
        rtn_quantize(bad, 4, 32, name="h.1.mlp.w2")
    bad_hessian = hessian.clone()
    bad_hessian[0, 0] = float("inf")
    with pytest.raises(ValueError, match="lin: Hessian contains NaN or inf"):
        gptq_quantize(weight, bad_hessian, 4, 32, name="lin")
    with pytest.raises(ValueError, match="lin: Hessian shape \\(128, 128\\) does not match in_features K=256"):
        gptq_quantize(weight, hessian[:128, :128], 4, 32, name="lin")
    with pytest.raises(ValueError, match="lin: the Hessian is all zeros"):
        gptq_quantize(weight, torch.zeros(K, K), 4, 32, name="lin")
    with pytest.raises(ValueError, match=r"lin: damp_percent must be in \[0, 1\]"):
        gptq_quantize(weight, hessian, 4, 32, damp_percent=-0.1, name="lin")


def group_aware_order(importance: torch.Tensor, group: int) -> list:
    """Whole groups by their largest diag(H), each group's columns likewise, a shorter last group last."""
    k = importance.shape[0]
    starts = [s for s in range(0, k, group) if s + group <= k]
    starts.sort(key=lambda s: -float(importance[s:s + group].max()))
    order = []
    for s in starts + ([k - k % group] if k % group else []):
        columns = list(range(s, min(s + group, k)))
        order += sorted(columns, key=lambda c: -float(importance[c]))
    return order


@pytest.mark.parametrize("k", [K, 200])
def test_group_act_order_is_plain_gptq_on_whole_groups_in_importance_order(k):
    weight, hessian = correlated_layer(12, k=k)
    hessian = hessian * torch.linspace(0.2, 3, k).sqrt()[:, None] * torch.linspace(0.2, 3, k).sqrt()  # uneven inputs
    result = gptq_quantize(weight, hessian, 4, 64, group_act_order=True, block_size=32, mse=False)
    check_invariants(result, 4, 64, True, N, k)
    # The checkpoint looks like one without act-order: groups in place, so no run-time permutation.
    assert torch.equal(result.g_idx, torch.arange(k, dtype=torch.int32) // 64)
    assert result.loss == pytest.approx(output_error(weight, result, hessian), rel=1e-4)
    assert result.loss < 0.8 * rtn_quantize(weight, 4, 64, mse=False, hessian=hessian).loss

    order = torch.tensor(group_aware_order(hessian.diagonal(), 64))
    plain = gptq_quantize(weight[:, order], hessian[order][:, order], 4, 64, block_size=32, mse=False)
    assert torch.equal(result.codes[:, order], plain.codes)
    assert torch.equal(result.scales[order[::64] // 64], plain.scales)


def test_group_act_order_refuses_column_act_order_and_per_channel():
    weight, hessian = correlated_layer(13)
    for kwargs in (dict(desc_act=True), dict(static_groups=True), dict(group_size=-1)):
        with pytest.raises(ValueError, match="lin: group_act_order"):
            gptq_quantize(weight, hessian, 4, **{"group_size": 64, **kwargs}, group_act_order=True, name="lin")


def drifted_inputs(seed: int, k: int = K, tokens: int = 2048):
    """Full-precision inputs x_fp of a layer and the quantized model's inputs x: x_fp plus an error correlated with
    it (what earlier quantized layers leave)."""
    gen = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(tokens, k, generator=gen) @ torch.randn(k, k, generator=gen)
    return x_fp, x_fp + 0.3 * x_fp @ torch.randn(k, k, generator=gen) / k**0.5


def test_hessian_accumulator_cross_term_is_the_running_mean_of_2_dx_xt():
    x_fp, x = drifted_inputs(14, k=32, tokens=300)
    acc = HessianAccumulator(32, asymmetric=True)
    for rows in (slice(0, 100), slice(100, 300)):
        acc.add_batch(x[rows], x_fp[rows])
    assert torch.allclose(acc.cross, 2 / 300 * (x_fp - x).t() @ x, rtol=1e-4, atol=1e-3)
    assert torch.allclose(acc.hessian, 2 / 300 * x.t() @ x, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="full-precision activations"):
        acc.add_batch(x[:10])
    with pytest.raises(ValueError, match="full-precision activations"):
        HessianAccumulator(32).add_batch(x[:10], x_fp[:10])


@pytest.mark.parametrize("group_act_order", [False, True])
def test_asymmetric_calibration_brings_the_outputs_closer_to_full_precision(group_act_order):
    x_fp, x = drifted_inputs(15)
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(16))
    acc = HessianAccumulator(K, asymmetric=True)
    acc.add_batch(x, x_fp)

    def error_to_full_precision(result) -> float:  # what the full-precision model's next layer would have seen
        return float((x @ result.dequantize().t() - x_fp @ weight.t()).square().mean())

    kwargs = dict(bits=4, group_size=32, mse=False, group_act_order=group_act_order)
    plain = gptq_quantize(weight, acc.hessian, **kwargs)
    assert torch.equal(gptq_quantize(weight, acc.hessian, asym_cross=0 * acc.cross, **kwargs).codes, plain.codes)
    errors = [error_to_full_precision(gptq_quantize(weight, acc.hessian, asym_cross=a * acc.cross, **kwargs))
              for a in (0.5, 1.0)]
    assert errors[1] < errors[0] < 0.8 * error_to_full_precision(plain)
    # The reported loss stays the output error of the layer's own weight on its own inputs.
    result = gptq_quantize(weight, acc.hessian, asym_cross=acc.cross, **kwargs)
    assert result.loss == pytest.approx(output_error(weight, result, acc.hessian), rel=1e-4)


@pytest.mark.parametrize("group_act_order", [False, True])
def test_a_cross_term_given_up_is_freed_before_the_cholesky_with_the_same_result(group_act_order, monkeypatch):
    from qwen_quant import gptq

    x_fp, x = drifted_inputs(18, tokens=600)
    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(19))
    acc = HessianAccumulator(K, asymmetric=True)
    acc.add_batch(x, x_fp)
    kwargs = dict(bits=4, group_size=32, group_act_order=group_act_order, refine_passes=1)
    kept = gptq_quantize(weight, acc.hessian, asym_cross=acc.cross, **kwargs)  # the caller keeps C
    cross_bytes_at_cholesky = []
    cholesky = gptq._inverse_hessian_cholesky

    def watched(*args):
        cross_bytes_at_cholesky.append(acc.cross.untyped_storage().nbytes())
        return cholesky(*args)

    monkeypatch.setattr(gptq, "_inverse_hessian_cholesky", watched)
    handed = gptq_quantize(weight, acc.hessian, asym_cross=acc.cross, free_cross=True, **kwargs)
    assert cross_bytes_at_cholesky == [0]
    for name in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(handed, name), getattr(kept, name)), name


def test_input_scales_never_worsen_rounding_and_help_outlier_inputs():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2048, K, generator=gen)
    x[:, :4] *= 30  # a few outlier input channels, as LLM norms produce
    hessian = 2 / 2048 * x.t() @ x
    weights = [torch.randn(N, K, generator=gen), torch.randn(2 * N, K, generator=gen)]
    scales = input_scales(weights, hessian, 4, 32)
    assert scales.shape == (K,) and torch.isfinite(scales).all() and (scales > 0).all()
    assert float(scales.log().mean()) == pytest.approx(0, abs=1e-4)
    assert scales[:4].min() > scales[4:].max()  # the outliers get the finer steps

    def rounding_loss(s):
        return sum(rtn_quantize(w * s, 4, 32, hessian=hessian / (s[:, None] * s[None, :])).loss for w in weights)

    assert rounding_loss(scales) < 0.8 * rounding_loss(torch.ones(K))


def test_hessian_accumulator_scale_inputs_is_accumulating_scaled_inputs():
    x_fp, x = drifted_inputs(18, k=16, tokens=64)
    scales = torch.linspace(0.5, 2, 16)
    scaled = HessianAccumulator(16, asymmetric=True)
    scaled.add_batch(x / scales, x_fp / scales)
    acc = HessianAccumulator(16, asymmetric=True)
    acc.add_batch(x, x_fp)
    acc.scale_inputs(scales)
    assert torch.allclose(acc.hessian, scaled.hessian, rtol=1e-4, atol=1e-4)
    assert torch.allclose(acc.cross, scaled.cross, rtol=1e-4, atol=1e-4)


def test_all_finite_checks_every_slice_of_a_large_tensor():
    from qwen_quant.finite import SLICE_ELEMENTS, all_finite

    t = torch.zeros(3 * SLICE_ELEMENTS + 6, dtype=torch.bfloat16)
    assert all_finite(t) and all_finite(t.reshape(-1, 6)[:, :3])  # a strided view too
    for where, value in ((0, float("nan")), (2 * SLICE_ELEMENTS + 1, float("inf")), (-1, float("-inf"))):
        bad = t.clone()
        bad[where] = value
        assert not all_finite(bad)
        assert not all_finite(bad.reshape(-1, 6).t())  # a transposed one, checked in bands of rows
    assert all_finite(torch.zeros(0)) and all_finite(torch.zeros(0, 4).t())


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, True), (3, 64, True), (4, 200 // 3, False), (4, -1, True)])
@pytest.mark.parametrize("order", ["none", "group", "desc"])
def test_refine_lowers_gptqs_output_error_and_keeps_the_layout(bits, group_size, sym, order):
    k = 200  # 200 // 3 = 66: groups of 66, 66, 66 and 2
    weight, hessian = correlated_layer(20, k=k)
    if order == "group" and group_size == -1:
        return
    kwargs = dict(bits=bits, group_size=group_size, sym=sym, desc_act=order == "desc",
                  group_act_order=order == "group", name="lin")
    plain = gptq_quantize(weight, hessian, **kwargs)
    losses = []
    for passes in (1, 2):
        refined = gptq_quantize(weight, hessian, refine_passes=passes, **kwargs)
        check_invariants(refined, bits, group_size, sym, N, k)
        assert torch.equal(refined.g_idx, plain.g_idx) and torch.equal(refined.zeros, plain.zeros)
        # The reported loss is refine's own objective: the output error of the written weights.
        assert refined.loss == pytest.approx(output_error(weight, refined, hessian), rel=1e-4)
        losses.append(refined.loss)
    assert losses[1] <= losses[0] < 0.99 * plain.loss


def test_fitted_scales_are_the_least_squares_optimum_for_their_codes():
    from qwen_quant.gptq import _fit_scales

    weight, hessian = correlated_layer(21, k=96)
    result = gptq_quantize(weight, hessian, 4, 32)
    scales, objective = _fit_scales(weight, result.codes.float(), result.zeros.float(), result.scales,
                                    result.g_idx, hessian)
    fitted = QuantResult(result.codes, scales, result.zeros, result.g_idx, None, None)
    assert objective == pytest.approx(2 * N * output_error(weight, fitted, hessian), rel=1e-4)
    # No scale moved alone, up or down by 1 %, lowers the output error: the gradient is zero.
    for g, n in ((0, 0), (1, 5), (2, 63)):
        for factor in (0.99, 1.01):
            moved = scales.clone()
            moved[g, n] *= factor
            trial = QuantResult(result.codes, moved, result.zeros, result.g_idx, None, None)
            assert output_error(weight, trial, hessian) > output_error(weight, fitted, hessian)


def test_a_group_whose_codes_all_sit_at_the_zero_point_keeps_its_scale():
    from qwen_quant.gptq import _fit_scales

    weight, hessian = correlated_layer(22, k=64)
    weight[3, :32] = 0  # row 3's first group: every code at the zero point, nothing to fit
    result = gptq_quantize(weight, hessian, 4, 32, mse=False)
    assert (result.codes[3, :32] == result.zeros[0, 3]).all()
    scales, _ = _fit_scales(weight, result.codes.float(), result.zeros.float(), result.scales, result.g_idx, hessian)
    assert scales[0, 3] == result.scales[0, 3] and torch.isfinite(scales).all() and (scales > 0).all()


def test_each_descended_code_is_the_nearest_level_to_its_optimum_given_the_others():
    from qwen_quant.gptq import _descend_codes

    weight, hessian = correlated_layer(23, k=64, n=8)
    result = gptq_quantize(weight, hessian, 3, 16)
    codes = _descend_codes(weight, result.codes.float(), result.zeros.float(), result.scales, result.g_idx, hessian,
                           maxq=7, block_size=24)
    # After the sweep, the last column's code is optimal given all the others (nothing changed after it): checked
    # by trying every level of that column in float64.
    g = result.g_idx.long()
    scale, zero = result.scales[g].t().double(), result.zeros[g].t().double()
    for row in range(8):
        errors = []
        for level in range(8):
            trial = codes[row].double().clone()
            trial[-1] = level
            e = (trial - zero[row]) * scale[row] - weight[row].double()
            errors.append(float(e @ hessian.double() @ e))
        assert errors[int(codes[row, -1])] == pytest.approx(min(errors), rel=1e-9, abs=1e-9)
    before = QuantResult(result.codes, result.scales, result.zeros, result.g_idx, None, None)
    after = QuantResult(codes.int(), result.scales, result.zeros, result.g_idx, None, None)
    assert output_error(weight, after, hessian) <= output_error(weight, before, hessian)


def test_negative_refine_passes_are_refused():
    weight, hessian = correlated_layer(24, k=64)
    with pytest.raises(ValueError, match="lin: refine_passes must be >= 0"):
        gptq_quantize(weight, hessian, 4, 32, refine_passes=-1, name="lin")
