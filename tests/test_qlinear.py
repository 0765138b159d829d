"""QuantLinear built from checkpoint tensors packed with qwen_quant.packing, against an fp64 reference computed in
this file straight from the random integer codes: W[n, k] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]."""
import logging
import math
import random

import pytest
import torch

from qwen_quant import cpu_prefill, packing, qlinear, synthetic
from qwen_quant.cpu import BF16_ENV
from qwen_quant.qlinear import QuantLinear

BF16_TOLERANCE = 1e-2  # the cpu backend computes with bf16 activations, scales and zeros


class Layer:
    """Random GPTQ codes for one linear and the checkpoint tensors that store them."""

    def __init__(self, K, N, bits, group_size, *, symmetric=True, act_order=False, checkpoint_format="gptq",
                 bias=True, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.K, self.N, self.bits, self.group_size, self.format = K, N, bits, group_size, checkpoint_format
        lowest = 1 if checkpoint_format == "gptq" else 0  # v1 stores zero - 1, so it cannot hold a zero of 0
        self.q, self.zeros, scale_draws, self.g_idx = synthetic.random_gptq(
            K, N, bits, group_size, symmetric=symmetric, act_order=act_order, lowest_zero=lowest, generator=gen)
        self.scales = (scale_draws * 0.02 + 0.002).half()
        self.bias = torch.randn(N, generator=gen).half() if bias else None

    def packed(self):
        return (packing.pack_qweight(self.q, self.bits), packing.pack_qzeros(self.zeros, self.bits, self.format),
                self.scales, self.g_idx, self.bias)

    def build(self, backend="auto", dtype=torch.float32, **kwargs) -> QuantLinear:
        return QuantLinear.from_packed(*self.packed(), bits=self.bits, group_size=self.group_size,
                                       checkpoint_format=self.format, backend=backend, dtype=dtype,
                                       name="transformer.h.0.mlp.w1", **kwargs)

    def weight(self) -> torch.Tensor:
        """The reference weight, fp64 [N, K]."""
        g = self.g_idx.long()
        return ((self.q.double() - self.zeros.double()[g]) * self.scales.double()[g]).t()

    def expected(self, x):
        y = x.double() @ self.weight().t()
        return y + self.bias.double() if self.bias is not None else y


def relative_error(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


GROUPS = [32, 64, 128, -1]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_torch_backend_equals_reference(bits, group_size, symmetric, act_order):
    layer = Layer(320, 64, bits, group_size, symmetric=symmetric, act_order=act_order, seed=bits + group_size)
    module = layer.build("torch")
    assert module.backend == "torch"
    torch.testing.assert_close(module.dequantize().double(), layer.weight(), rtol=0, atol=0)
    x = torch.randn(2, 3, layer.K)
    y = module(x)
    assert y.shape == (2, 3, layer.N) and y.dtype == torch.float32
    assert relative_error(y, layer.expected(x)) < 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_backend_within_bf16(bits, group_size, symmetric, act_order):
    layer = Layer(512, 96, bits, group_size, symmetric=symmetric, act_order=act_order, seed=bits * group_size)
    module = layer.build("cpu")
    assert module.backend == "cpu"
    assert relative_error(module.dequantize(), layer.weight()) < BF16_TOLERANCE / 2
    for M in (1, 16, 64, 300):  # decode, short prompts, prefill
        x = torch.randn(M, layer.K)
        y = module(x)
        assert y.dtype == torch.float32
        assert relative_error(y, layer.expected(x)) < BF16_TOLERANCE
        # dequantize() is the weight the kernel applies, so forward agrees with it far better than with the
        # fp16-scale reference.
        assert relative_error(y, x.double() @ module.dequantize().double().t() + layer.bias.double()) < 4e-3


def test_cpu_int8_group_not_dividing_k():
    """K = 2.5 groups: the short last group is padded with zero weights."""
    layer = Layer(320, 48, 8, 128, symmetric=False, act_order=True)
    module = layer.build("cpu")
    x = torch.randn(3, layer.K)
    assert relative_error(module(x), layer.expected(x)) < BF16_TOLERANCE


@pytest.fixture
def prefill_probe(monkeypatch):
    """Sets what the cpu backends' prefill probe measures (no timing): set(rows) makes every kind of layer measure
    lines that cross half a row below `rows` (None: the tiles never win). Returns (set, the kinds probed)."""
    probed = []

    def set_crossover(rows_from):
        probe_rows = qlinear.CPU_PREFILL_PROBE_ROWS
        kernel = tuple(1e-4 * rows for rows in probe_rows)  # a GEMV per row
        tile_slope, crossover = (2e-5, rows_from - 0.5) if rows_from is not None else (1e-4, 0)
        tiles = tuple(tile_slope * rows + crossover * (1e-4 - tile_slope) for rows in probe_rows)
        monkeypatch.setattr(qlinear, "_time_prefill_routes", lambda *kind: probed.append(kind) or (kernel, tiles))
        qlinear._measured_prefill_rows.cache_clear()

    yield set_crossover, probed
    qlinear._measured_prefill_rows.cache_clear()  # the next test measures for itself


def spy_routes(monkeypatch) -> list:
    """How every prompt product runs from now on: "native" (cpu_prefill's GEMM) or the eager tiles' dtype."""
    runs, tiled_matmul, native_matmul = [], qlinear._tiled_matmul, cpu_prefill.matmul
    monkeypatch.setattr(qlinear, "_tiled_matmul",
                        lambda x2, spans, weight_tile, dtype: runs.append(dtype) or tiled_matmul(x2, spans,
                                                                                                 weight_tile, dtype))

    def spy_native(*args, **kwargs):
        y = native_matmul(*args, **kwargs)
        if y is not None:
            runs.append("native")
        return y
    monkeypatch.setattr(cpu_prefill, "matmul", spy_native)
    return runs


def prompt_route(cpu_bf16: bool, int4pack: bool = True):
    """What a prompt past the crossover runs (see spy_routes): fp32 tiles without bf16 matmuls; with them the native
    GEMM for int4pack layouts (Int4, grouped Int8) on a CPU where it runs (AVX-512-BF16), else bf16 tiles."""
    if not cpu_bf16:
        return torch.float32
    return "native" if int4pack and cpu_prefill.module() is not None else torch.bfloat16


@pytest.fixture(params=["native", "eager"])
def native(request, monkeypatch) -> bool:
    """The bf16 route as it runs here, and with the native GEMM taken away (its fallback, the eager bf16 tiles)."""
    if request.param == "eager":
        monkeypatch.setattr(cpu_prefill, "module", lambda: None)
    return request.param == "native"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_prefill_tiles_apply_the_kernels_weight(bits, group_size, symmetric, act_order, cpu_bf16, native,
                                                    prefill_probe, monkeypatch):
    """Long prompts apply the kernels' weight: through tiles of it rounded to the tiles' dtype (bf16 on CPUs with
    fast bf16 matmuls, fp32 on the others; both forced here, whatever this CPU is), or through the native GEMM, which
    rounds it to bf16 from cpu_prefill.SCALED_FROM_ROWS rows and applies it exactly below (to x rounded to bf16).
    Identity rows (320 of them) read the applied weight back element by element. N = 592 spans a full tile, a partial
    one and int4pack's short last block (CPU_PREFILL_TILE_WEIGHTS is lowered to make tiles of 192 columns); K = 320
    ends in a short group at g128."""
    set_crossover, _ = prefill_probe
    set_crossover(8)
    monkeypatch.setattr(qlinear, "CPU_PREFILL_TILE_WEIGHTS", 320 * 192)
    runs = spy_routes(monkeypatch)
    layer = Layer(320, 592, bits, group_size, symmetric=symmetric, act_order=act_order, bias=False,
                  seed=bits + group_size)
    module = layer.build("cpu")
    applied = module.dequantize().t().double()  # [K, N], checkpoint input order
    read_back = module(torch.eye(layer.K)).double()
    route = prompt_route(cpu_bf16, int4pack=bits == 4 or group_size != -1)
    assert runs == [route]
    # Int8 tiles hold (q - 128) * s, its zero points subtracted after them in fp32, as in the kernels' path.
    zero_scales = (layer.zeros - 128).double() * layer.scales.bfloat16().double()
    zero_term = 0 if bits == 4 else zero_scales[layer.g_idx.long()]
    # Each weight read back is the applied one rounded to the tiles' dtype (the native GEMM's at 320 rows: bf16):
    # within half a unit in its last place (plus fp32 rounding where the applied weight nearly cancels to zero).
    half_ulp = 2.0 ** -24 if route == torch.float32 else 2.0 ** -8
    slack = 2.0 ** -20 * applied.abs().max()
    assert ((read_back - applied).abs() <= half_ulp * (applied + zero_term).abs() + slack).all()
    x = torch.randn(8, layer.K)
    y = module(x)
    assert y.dtype == torch.float32 and runs == [route] * 2
    assert relative_error(y, layer.expected(x)) < BF16_TOLERANCE
    if route != torch.bfloat16:  # fp32 weights and sums (the native GEMM's code panels at 8 rows): far closer to
        x_applied = x if route == torch.float32 else x.bfloat16()  # the kernels' weight than the kernels get
        assert relative_error(y, x_applied.double() @ applied) < 1e-5
    kernel_rows = module(x[:7])  # one row fewer than measured: the kernels
    assert runs == [route] * 2
    assert 1e-5 < relative_error(kernel_rows, x[:7].double() @ applied) < 4e-3


KINDS = [(4, 128, True, False), (4, -1, False, True), (8, 128, True, False), (8, 64, False, True),
         (8, -1, True, False), (8, -1, False, False)]


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", KINDS)
def test_cpu_prefill_route_follows_the_measurement(bits, group_size, symmetric, act_order, cpu_bf16, prefill_probe,
                                                   monkeypatch):
    """Prompts from the measured crossover on run the tiles, shorter ones the kernel; one row always the kernel; a
    probe where the tiles never win keeps every prompt on the kernel. Each kind of layer is probed once."""
    set_crossover, probed = prefill_probe
    runs = spy_routes(monkeypatch)
    layer = Layer(256, 128, bits, group_size, symmetric=symmetric, act_order=act_order, seed=bits)
    module = layer.build("cpu")
    dtype = torch.bfloat16 if cpu_bf16 else torch.float32
    tiles = prompt_route(cpu_bf16, int4pack=bits == 4 or group_size != -1)
    set_crossover(40)
    for rows, route in ((39, []), (40, [tiles]), (1, []), (300, [tiles])):
        runs.clear()
        x = torch.randn(rows, layer.K)
        assert relative_error(module(x), layer.expected(x)) < BF16_TOLERANCE
        assert runs == route, rows
    assert probed == [(bits, bits == 8 and group_size == -1, dtype)]  # Int4's channels run int4pack's groups
    set_crossover(-5)  # tiles faster at any length the probe saw: still never one row
    runs.clear()
    module(torch.randn(1, layer.K))
    module(torch.randn(2, layer.K))
    assert runs == [tiles]
    set_crossover(None)
    runs.clear()
    module(torch.randn(1000, layer.K))
    assert runs == []


def test_crossover_rows_is_where_the_lines_cross():
    """Each route's seconds at the two probed lengths define a line; the tiles run from where their line drops
    below the kernel's, and never when it is at least as steep."""
    rng = random.Random(0)
    m1, m2 = qlinear.CPU_PREFILL_PROBE_ROWS
    for _ in range(200):
        kernel_start, kernel_slope = rng.uniform(0, 1e-3), rng.uniform(1e-6, 1e-3)
        tile_start, tile_slope = rng.uniform(0, 5e-3), rng.uniform(0, 2e-3)
        kernel = tuple(kernel_start + kernel_slope * m for m in (m1, m2))
        tiles = tuple(tile_start + tile_slope * m for m in (m1, m2))
        crossover = qlinear.crossover_rows(kernel, tiles)
        if tile_slope >= kernel_slope:
            assert crossover == math.inf
            continue
        for rows in range(max(0, math.floor(crossover) - 3), math.ceil(crossover) + 4):
            tiles_faster = tile_start + tile_slope * rows < kernel_start + kernel_slope * rows
            assert tiles_faster == (rows > crossover) or abs(rows - crossover) < 1e-6


@pytest.mark.parametrize("bits, per_channel", [(4, False), (8, False), (8, True)])
def test_prefill_probe_times_both_routes(bits, per_channel, cpu_bf16, monkeypatch):
    """The probe runs the kernel and the tiles of its kind at both lengths (what the times are is this machine's
    business; none is asserted)."""
    monkeypatch.setattr(qlinear, "CPU_PREFILL_PROBE_SHAPE", (256, 128))
    runs = spy_routes(monkeypatch)
    kernel, tiles = qlinear._time_prefill_routes(bits, per_channel, torch.bfloat16 if cpu_bf16 else torch.float32)
    assert len(kernel) == len(tiles) == 2 and min(kernel + tiles) > 0
    assert runs == [prompt_route(cpu_bf16, int4pack=not per_channel)] * 8  # a warm-up and three calls, two lengths


def test_best_seconds_is_the_fastest_call_after_a_warm_up(monkeypatch):
    from qwen_quant import cpu

    clock = iter([0.0, 5.0, 10.0, 12.0, 20.0, 27.0])  # start and end of each timed call: 5, 2 and 7 seconds
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: next(clock))
    calls = []
    assert cpu.best_seconds(lambda: calls.append(1)) == 2.0
    assert len(calls) == 4  # the untimed warm-up and three timed calls


def test_prefill_tiles_run_in_and_out_of_inference_mode(prefill_probe):
    """The tiles' scratch is made once and reused: a prompt under generate's inference mode, then one outside it."""
    set_crossover, _ = prefill_probe
    set_crossover(2)
    layer = Layer(256, 128, 8, 128, symmetric=False)
    module = layer.build("cpu")
    x = torch.randn(4, layer.K)
    with torch.inference_mode():
        inside = module(x)
    outside = module(x)
    with torch.no_grad():
        torch.testing.assert_close(module(x), outside, rtol=0, atol=0)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_prefill_spans_cover_the_columns_in_whole_blocks():
    rng = random.Random(0)
    for _ in range(200):
        block, K = rng.choice([32, 64]), rng.choice([64, 320, 2048, 5504, 2**21])
        N = rng.randrange(1, 40) * 16
        spans = qlinear._column_spans(N, K, block)
        assert spans[0][0] == 0 and spans[-1][1] == N
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        widths = [n1 - n0 for n0, n1 in spans]
        assert all(width % block == 0 for width in widths[:-1])  # whole blocks, then maybe the short last one
        assert widths[-1] % block == 0 or widths[-1] < block
        assert all(width <= max(block, qlinear.CPU_PREFILL_TILE_WEIGHTS // K) for width in widths)


def test_cpu_bf16_switch_names_itself_when_misspelled(monkeypatch):
    monkeypatch.setenv(BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"\$QWEN_QUANT_CPU_BF16='yes' must be 1 .* 0 .* or auto"):
        Layer(64, 64, 4, 32).build("cpu")(torch.randn(2, 64))


def test_cpu_int4_per_channel_uses_largest_kernel_group():
    module = Layer(768, 32, 4, -1).build("cpu")
    assert module.kernel_group == 256


def test_triton_backend_under_interpreter_matches_torch():
    for bits in (4, 8):
        layer = Layer(288, 80, bits, 32, symmetric=False, act_order=True)
        triton_module, torch_module = layer.build("triton"), layer.build("torch")
        for M in (1, 20):
            x = torch.randn(M, layer.K)
            assert relative_error(triton_module(x), torch_module(x).double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_half_precision_activations_keep_their_dtype(dtype, backend):
    layer = Layer(256, 64, 4, 128)
    module = layer.build(backend, dtype=dtype)
    x = torch.randn(4, layer.K).to(dtype)
    y = module(x)
    assert y.dtype == dtype
    assert relative_error(y, layer.expected(x)) < BF16_TOLERANCE


def test_module_dtype_conversion_keeps_cpu_backend_working():
    for bits in (4, 8):
        layer = Layer(256, 64, bits, 64, symmetric=False)
        module = layer.build("cpu").half()  # what a loader may do to a whole model
        x = torch.randn(2, layer.K).half()
        assert relative_error(module(x), layer.expected(x)) < BF16_TOLERANCE


def test_gptq_v2_format_reads_true_zeros():
    layer = Layer(256, 64, 4, 32, symmetric=False, checkpoint_format="gptq_v2", seed=5)
    assert (layer.zeros == 0).any()  # a zero the v1 format cannot store
    for backend in ("torch", "cpu"):
        module = layer.build(backend)
        x = torch.randn(3, layer.K)
        assert relative_error(module(x), layer.expected(x)) < BF16_TOLERANCE
    torch.testing.assert_close(layer.build("torch").dequantize().double(), layer.weight(), rtol=0, atol=0)


def test_v1_and_v2_of_the_same_weight_agree():
    v1 = Layer(256, 64, 8, 128, symmetric=False, checkpoint_format="gptq", seed=2)
    v2 = Layer(256, 64, 8, 128, symmetric=False, checkpoint_format="gptq_v2", seed=2)
    v2.zeros = v1.zeros
    torch.testing.assert_close(v1.build("torch").dequantize(), v2.build("torch").dequantize(), rtol=0, atol=0)


def test_auto_backend_on_cpu(caplog):
    caplog.set_level(logging.INFO, logger="qwen_quant")
    qlinear._LOGGED_CHOICES.clear()
    assert Layer(256, 64, 4, 128).build().backend == "cpu"
    assert Layer(256, 64, 4, 128, seed=1).build().backend == "cpu"
    assert sum("backend cpu" in r.getMessage() for r in caplog.records) == 1  # logged once, not per layer
    assert Layer(256, 64, 8, 32, act_order=True).build().backend == "cpu"
    assert Layer(256, 64, 2, 128).build().backend == "torch"
    assert Layer(256, 64, 3, 128).build().backend == "torch"
    assert Layer(256, 40, 4, 128).build().backend == "torch"  # int4pack needs N % 16 == 0
    assert Layer(264, 64, 8, -1).build().backend == "torch"  # int8pack_mm needs K % 16 == 0
    assert any("not cpu: int4pack needs out_features divisible by 16" in r.getMessage() for r in caplog.records)


def test_irregular_g_idx_falls_back_to_torch():
    """Groups of unequal size (each still within group_size) cannot use the kernels' k // group rule."""
    layer = Layer(288, 64, 4, 128, symmetric=False)
    sizes = torch.cat([torch.zeros(100), torch.ones(128), torch.full((60,), 2)]).int()  # standard: 128, 128, 32
    layer.g_idx = sizes[torch.randperm(288, generator=torch.Generator().manual_seed(0))]
    module = layer.build()
    assert module.backend == "torch" and module.row_group is not None
    x = torch.randn(2, layer.K)
    assert relative_error(module(x), layer.expected(x)) < 1e-6
    with pytest.raises(ValueError, match="equal contiguous groups"):
        layer.build("cpu")


def test_memory_bytes_counts_what_the_backend_keeps():
    layer = Layer(256, 64, 4, 128)  # symmetric: no zeros kept
    torch_module = layer.build("torch", dtype=torch.float16)
    assert torch_module.memory_bytes() == 256 * 64 // 2 + 2 * 64 * 2 + 64 * 2  # codes, fp16 scales, fp16 bias
    cpu_module = layer.build("cpu", dtype=torch.float16)
    assert cpu_module.memory_bytes() == 256 * 64 // 2 + 2 * 64 * 2 * 2 + 64 * 2  # codes, bf16 scale+zero, bias
    act_order = Layer(256, 64, 4, 128, act_order=True).build("torch", dtype=torch.float16)
    assert act_order.memory_bytes() == torch_module.memory_bytes() + 256 * 8  # int64 perm


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [64, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_a_backend_keeps_the_buffers_it_declares(backend, bits, group_size, symmetric):
    # 528 inputs in groups of 64: a ragged last group of 16, which the cpu kernels cannot run.
    for K in (512, 528) if backend != "cpu" else (512,):
        layer = Layer(K, 48, bits, group_size, symmetric=symmetric, act_order=not symmetric)
        module = layer.build(backend, dtype=torch.float16)
        buffers = {name: (tuple(t.shape), t.dtype) for name, t in module.named_buffers()}
        assert buffers == type(module).declared_buffers(K, 48, bits, group_size, dtype=torch.float16,
                                                        symmetric=symmetric, act_order=not symmetric, bias=True)


def test_the_torch_backend_declares_the_row_groups_it_keeps():
    # 240 inputs in groups of 64 whose short group comes first: not k // 64, so each row's group is kept.
    layer = Layer(240, 32, 4, 64)
    layer.g_idx = torch.cat([torch.zeros(48), torch.arange(1, 4).repeat_interleave(64)]).int()
    module = layer.build("torch", dtype=torch.float16)
    buffers = {name: (tuple(t.shape), t.dtype) for name, t in module.named_buffers()}
    assert buffers == qlinear.TorchQuantLinear.declared_buffers(240, 32, 4, 64, dtype=torch.float16,
                                                                contiguous_groups=False)
    assert "row_group" in buffers


def test_backend_layouts_stay_out_of_state_dict():
    for backend in ("torch", "cpu"):
        module = Layer(256, 64, 8, 128, symmetric=False, act_order=True).build(backend)
        assert module.state_dict() == {} and module.memory_bytes() > 0


def test_extra_repr_and_input_check():
    module = Layer(256, 64, 4, 128, act_order=True).build("cpu")
    assert "bits=4, group_size=128, backend=cpu, act_order=True" in repr(module)
    with pytest.raises(ValueError, match="expects 256 input features"):
        module(torch.randn(2, 255))


NAME = "transformer.h.0.mlp.w1"


def build(layer, **overrides):
    qweight, qzeros, scales, g_idx, bias = layer.packed()
    tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, bias=bias)
    options = dict(bits=layer.bits, group_size=layer.group_size, name=NAME)
    for key, value in overrides.items():
        (tensors if key in tensors else options)[key] = value
    return QuantLinear.from_packed(**tensors, **options)


def test_error_messages_name_the_layer_and_tensor():
    layer = Layer(256, 64, 4, 128)
    qweight = packing.pack_qweight(layer.q, 4)
    with pytest.raises(ValueError, match=rf"{NAME}\.qweight has shape \[32, 64\] .* bits=4, group_size=128, "
                                         r"in_features=512, out_features=64 need \[64, 64\]"):
        build(layer, in_features=512)
    with pytest.raises(ValueError, match=rf"{NAME}\.qweight has shape \[16, 64\]"):
        build(layer, qweight=qweight[:16], in_features=256)
    with pytest.raises(ValueError, match=rf"{NAME}\.scales has shape \[1, 64\]"):
        build(layer, scales=layer.scales[:1])
    with pytest.raises(ValueError, match=rf"{NAME}\.scales .* dtype int32"):
        build(layer, scales=layer.scales.int())
    with pytest.raises(ValueError, match=rf"{NAME}\.qzeros has shape \[2, 4\]"):
        build(layer, qzeros=layer.packed()[1][:, :4])
    with pytest.raises(ValueError, match=rf"{NAME}\.bias has shape \[63\]"):
        build(layer, bias=layer.bias[:63])
    with pytest.raises(ValueError, match=rf"{NAME}\.g_idx has shape \[255\]"):
        build(layer, g_idx=layer.g_idx[:255])
    bad_g_idx = layer.g_idx.clone()
    bad_g_idx[7] = 2
    with pytest.raises(ValueError, match=rf"{NAME}\.g_idx has values in \[0, 2\] .* need values in \[0, 1\]"):
        build(layer, g_idx=bad_g_idx)
    with pytest.raises(ValueError, match=rf"{NAME}\.g_idx puts 129 inputs in one group but group_size=128"):
        build(layer, g_idx=torch.cat([torch.zeros(129), torch.ones(127)]).int())
    with pytest.raises(ValueError, match=rf"{NAME}\.qweight: bits=5 is not supported"):
        build(layer, bits=5)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        build(layer, backend="gpu")
    with pytest.raises(ValueError, match=rf"{NAME}: backend 'triton' cannot run this weight: .* not 2"):
        build(Layer(256, 64, 2, 128), backend="triton")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="Triton needs a CUDA device"):
        Layer(256, 64, 4, 128).build("triton")


@pytest.mark.parametrize("bits", [4, 8])
def test_triton_compiled_forward_equals_eager(bits):
    """torch.compile(fullgraph=True) puts the custom op qwen_quant::gptq_matmul in the graph (a graph break would be
    an error): the compiled forward gives exactly the eager result in every M bucket (GEMV, tiles, dense route)."""
    layer = Layer(96, 48, bits, 32, symmetric=False, act_order=True, seed=bits)
    module = layer.build("triton")
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    for lead in ((1, 1), (2, 3), (30,), (2, 40)):  # 1, 6, 30, 80 rows: the GEMV, decode tiles, prompt tiles, dense
        x = torch.randn(*lead, layer.K)
        assert torch.equal(compiled(x), module(x))
        assert relative_error(compiled(x), layer.expected(x)) < 1e-6


def test_triton_call_uses_the_launches_prepared_at_load(monkeypatch):
    """Configs are chosen once, at load, for every M bucket: a call chooses nothing."""
    from qwen_quant.kernels import configs

    module = Layer(288, 80, 4, 128).build("triton")
    assert set(module._launches) == set(configs.M_BUCKETS)
    monkeypatch.setattr(configs, "choose_config", lambda *args, **kwargs: pytest.fail("a call chose a config"))
    for M in (1, 16, 64, 65):
        module(torch.randn(M, 288))


def test_triton_layer_uses_this_gpus_tuned_table(tmp_path, monkeypatch):
    """A layer built on a GPU with a table entry for its shape class runs that entry (here: a pretend GPU's table,
    under the interpreter); other buckets, and GPUs without a table, get the heuristic."""
    from qwen_quant.kernels import configs
    from qwen_quant.kernels import gptq_matmul as kernels

    layer = Layer(256, 96, 8, 64, symmetric=False)
    tuned = configs.MatmulConfig(block_m=1, block_n=32, block_k=32, split_k=4, num_warps=2)
    path = tmp_path / "tuned_configs.json"
    configs.write_table("Pretend GPU", {configs.shape_key(8, 64, 256, 96, 1): tuned}, path)
    monkeypatch.setattr(configs, "TABLE_PATH", path)
    monkeypatch.setattr(kernels, "device_config_source", lambda device: ("Pretend GPU", 132))
    module = layer.build("triton")
    assert module._launches[1].config == tuned
    assert module._launches[16].config == configs.heuristic_config(16, 96, 256, 64, 8, 132)
    x = torch.randn(1, layer.K)
    assert relative_error(module(x), layer.expected(x)) < 1e-6
    monkeypatch.setattr(kernels, "device_config_source", lambda device: ("Another GPU", 108))
    assert layer.build("triton")._launches[1].config == configs.heuristic_config(1, 96, 256, 64, 8, 108)


def test_triton_module_deep_copies():
    """Copies (the GPU check's weight copies) hold their own tensors and compute the same."""
    import copy

    module = Layer(128, 64, 4, 32).build("triton")
    twin = copy.deepcopy(module)
    assert twin.qweight.data_ptr() != module.qweight.data_ptr()
    x = torch.randn(3, 128)
    assert torch.equal(twin(x), module(x))


def test_cpu_backend_refuses_to_record_a_gradient_and_the_torch_backend_passes_one():
    """The cpu backend's routes (torch's int4pack kernel, the native prompt GEMM, the eager tiles) have no backward:
    an x that autograd records is refused with a message, for one row and for a prompt; the torch backend passes the
    gradient of x @ W back, and no_grad runs the cpu backend as always."""
    layer = Layer(256, 128, 4, 64, symmetric=True, seed=4)
    cpu, torch_backend = layer.build("cpu"), layer.build("torch")
    for rows in (1, 64):
        x = torch.randn(rows, layer.K, requires_grad=True)
        with pytest.raises(RuntimeError, match="cannot pass a gradient back to x.*backend='torch'"):
            cpu(x)
        torch_backend(x).sum().backward()
        expected = torch_backend.dequantize().t().sum(1)  # d(sum of x @ W) / dx: each input's row of W summed
        torch.testing.assert_close(x.grad, expected.expand(rows, -1).to(x.grad.dtype), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            assert relative_error(cpu(x), layer.expected(x.detach())) < BF16_TOLERANCE


def validated(layer: Layer, name: str) -> tuple:
    return qlinear.validate_on(torch.device("cpu"), *layer.packed(), bits=layer.bits, group_size=layer.group_size,
                               checkpoint_format=layer.format, in_features=layer.K, out_features=layer.N, name=name)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_joined_siblings_give_each_ones_output(backend, bits, act_order):
    """q/k/v (or gate/up) as one layer: each sibling's outputs side by side, as its own layer computes them, and
    within fp64's reach; a sibling without a bias beside ones with a bias adds zeros."""
    siblings = [Layer(256, n, bits, 128, symmetric=False, act_order=act_order, bias=n != 64, seed=bits + n)
                for n in (128, 64, 64)]
    for layer in siblings[1:]:  # GPTQ sorts siblings' inputs alike: they share a Hessian
        layer.g_idx = siblings[0].g_idx
    parts = qlinear.join_outputs([validated(layer, f"h.0.{i}") for i, layer in enumerate(siblings)])
    joined = QuantLinear.from_sorted(*parts, group_size=128, backend=backend, dtype=torch.bfloat16, name="h.0.qkv",
                                     device="cpu")
    assert joined.backend == backend and joined.out_features == 256 and (joined.perm is not None) == act_order
    apart = [layer.build(backend, dtype=torch.bfloat16) for layer in siblings]
    with torch.no_grad():
        for M in (1, 5, 70):  # the decode kernel, and the prompt routes
            x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)).bfloat16()
            y = joined(x)
            torch.testing.assert_close(y, torch.cat([m(x) for m in apart], -1), rtol=0, atol=0)
            want = torch.cat([layer.expected(x) for layer in siblings], -1)
            assert relative_error(y, want) < BF16_TOLERANCE


def test_siblings_whose_inputs_sort_otherwise_stay_apart():
    """Act-order linears sorted by different g_idx (another quantizer's file) cannot share one matmul; nor can
    weights of another width or bit count."""
    first, second = (Layer(256, 64, 4, 128, act_order=True, seed=seed) for seed in (1, 2))
    assert not torch.equal(first.g_idx, second.g_idx)
    assert qlinear.join_outputs([validated(first, "a"), validated(second, "b")]) is None
    in_order = Layer(256, 64, 4, 128, seed=3)
    assert qlinear.join_outputs([validated(first, "a"), validated(in_order, "b")]) is None
    assert qlinear.join_outputs([validated(in_order, "a"), validated(Layer(256, 64, 8, 128, seed=4), "b")]) is None
    assert qlinear.join_outputs([validated(in_order, "a"), validated(Layer(512, 64, 4, 128, seed=5), "b")]) is None
    assert qlinear.join_outputs([validated(in_order, "a"), validated(Layer(256, 64, 4, 64, seed=6), "b")]) is None
