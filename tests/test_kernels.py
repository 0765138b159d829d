"""The Triton GPTQ kernels (under the interpreter on CPU) against an fp64 reference built from the integer codes, the
custom op, and the per-GPU config table.

Shapes are small and deliberately not multiples of the block sizes; forced configs cover the paths the CPU
heuristic does not pick (split-K, K tiles straddling groups, the GPU block shapes, the dense route under a CUDA
graph capture)."""
import json
import random

import pytest
import torch

from qwen_quant import packing, synthetic
from qwen_quant.kernels import configs
from qwen_quant.kernels import gptq_matmul as gm
from qwen_quant.kernels.configs import MatmulConfig

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
H100 = ("NVIDIA H100 80GB HBM3", 132)


def random_gptq(K, N, bits, group_size, symmetric, act_order, seed):
    """Codes q [K, N], true zeros [G, N], fp16 scales [G, N] and g_idx [K] as a GPTQ quantizer would make them."""
    q, zeros, scale_draws, g_idx = synthetic.random_gptq(K, N, bits, group_size, symmetric=symmetric,
                                                         act_order=act_order, lowest_zero=0,
                                                         generator=torch.Generator().manual_seed(seed))
    return q, zeros, (scale_draws * 0.02 + 0.002).half(), g_idx.long()


def reference(x, q, zeros, scales, g_idx, bias):
    w = (q.double() - zeros.double()[g_idx]) * scales.double()[g_idx]  # [K, N]
    y = x.double() @ w
    return y + bias.double() if bias is not None else y


def run_kernel(x, q, zeros, scales, g_idx, bias, bits, group_size, symmetric, config=None):
    """What QuantLinear does for act-order: sort the input rows by group once, gather x columns to match."""
    perm = torch.argsort(g_idx, stable=True)
    zeros_arg = None if symmetric else zeros.to(x.dtype)
    return gm.gptq_matmul(x[:, perm], packing.pack_qweight(q[perm], bits), scales.to(x.dtype), zeros_arg,
                          bias, bits=bits, group_size=group_size, config=config)


def relative_error(y, r):
    return ((y.double() - r).norm() / r.norm()).item()


def check(K, N, M, bits, group_size, symmetric=True, act_order=False, dtype=torch.float32, bias=True, config=None,
          seed=0):
    q, zeros, scales, g_idx = random_gptq(K, N, bits, group_size, symmetric, act_order, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(M, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = run_kernel(x, q, zeros, scales, g_idx, b, bits, group_size, symmetric, config)
    assert y.dtype == dtype and y.shape == (M, N)
    assert relative_error(y, reference(x, q, zeros, scales, g_idx, b)) < TOLERANCE[dtype]


# K = 288 is 2.25 groups of 128 (a ragged last group), 9 of 32; at group 100 Int4 words straddle groups (each
# element scaled by its own group); N = 200 is no multiple of any block. M covers every bucket: the GEMV (1), tl.dot
# decode tiles (3, 16), short prompts (17, 64), the dense route (80).
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 64, 80])
@pytest.mark.parametrize("group_size", [32, 128, 100, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference(bits, M, group_size, symmetric):
    dtype = (torch.float16, torch.bfloat16, torch.float32)[(M + bits + group_size) % 3]
    check(288, 200, M, bits, group_size, symmetric, dtype=dtype, bias=M % 2 == 1, seed=M * 31 + bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("group_size", [32, 128])
def test_act_order(bits, M, group_size):
    check(256, 96, M, bits, group_size, symmetric=False, act_order=True, seed=7)


# Configs the CPU heuristic never picks: split-K (the GEMV and tl.dot tiles, with and without a bias, splits that
# leave some programs no K tile), K tiles wider than a group (per-element scales), the GPU's decode and prompt
# shapes, the dense route's dequantize tiles.
FORCED = {
    "gemv_splitk3": MatmulConfig(block_m=1, block_n=64, block_k=64, split_k=3),
    "gemv_splitk8_empty_splits": MatmulConfig(block_m=1, block_n=32, block_k=32, split_k=8),
    "dot_splitk2": MatmulConfig(block_m=16, block_n=64, block_k=64, split_k=2),
    "gemv_wide_k": MatmulConfig(block_m=1, block_n=128, block_k=256),
    "dot_wide_k_splitk2": MatmulConfig(block_m=16, block_n=64, block_k=128, split_k=2),
    "prompt_tiles": MatmulConfig(block_m=64, block_n=128, block_k=32, num_stages=3),
    "dense_wide_k": MatmulConfig(route="dense", block_n=32, block_k=256),
}


@pytest.mark.parametrize("name", FORCED)
@pytest.mark.parametrize("bits", [4, 8])
def test_forced_configs(name, bits):
    config = FORCED[name]
    M = 1 if config.block_m == 1 else 5
    check(320, 136, M, bits, 32, symmetric=False, dtype=torch.float16, bias=bits == 4, config=config, seed=3)


@pytest.mark.parametrize("bits", [4, 8])
def test_split_k_leaves_its_workspace_zeroed(bits):
    """Each call's last program per tile reads the partial sums back as it zeroes them, and resets its counter: the
    next call (of any layer) starts from zeros, with no memset."""
    config = MatmulConfig(block_m=1, block_n=64, block_k=64, split_k=4)
    q, zeros, scales, g_idx = random_gptq(256, 136, bits, 64, True, False, seed=1)
    qweight = packing.pack_qweight(q, bits)
    for M in (1, 5):
        x = torch.randn(M, 256)
        first = gm.gptq_matmul(x, qweight, scales.float(), None, bits=bits, group_size=64, config=config)
        partials, arrivals = gm.split_k_workspace(x.device, 136)
        assert not partials.any() and not arrivals.any()
        assert torch.equal(gm.gptq_matmul(x, qweight, scales.float(), None, bits=bits, group_size=64, config=config),
                           first)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 16, 64, 65])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gpu_heuristic_configs_compute_correctly(bits, M, group_size):
    """The heuristic's configs for an H100 (132 SMs) without a table, run here under the interpreter."""
    K, N = 512, 192
    config = configs.heuristic_config(configs.m_bucket(M), N, K, group_size, bits, sm_count=132)
    assert not configs.config_problems(config, bits)
    if M <= configs.SPLIT_K_MAX_M:
        assert config.block_m == (1 if M == 1 else 16) and config.split_k > 1  # 2 column tiles alone idle the SMs
    else:
        assert config.route == ("kernel" if M <= 64 else "dense")
    check(K, N, M, bits, group_size, dtype=torch.float16, config=config, seed=M)


@pytest.mark.parametrize("bits", [4, 8])
def test_decode_split_fills_an_h100(bits):
    config = configs.heuristic_config(1, 4096, 4096, 128, bits, sm_count=132)
    programs = -(-4096 // config.block_n) * config.split_k
    assert programs >= 2 * 132
    assert 4096 % (config.block_k * config.split_k) == 0  # every split holds whole groups
    assert 128 % config.block_k == 0  # no K tile straddles a group


def test_dense_route_falls_back_to_tiles_inside_a_graph_capture(monkeypatch):
    """Inside a CUDA graph capture the dense route cannot make its scratch (it would belong to the graph's pool):
    the call runs the fused tiles instead, with the same result, and makes no scratch."""
    monkeypatch.setattr(gm, "_SCRATCH", {})
    monkeypatch.setattr(gm, "_capturing", lambda device: True)
    check(288, 200, 80, 4, 128, symmetric=False, dtype=torch.float16, config=MatmulConfig(route="dense"), seed=4)
    assert gm._SCRATCH == {}
    monkeypatch.setattr(gm, "_capturing", lambda device: False)
    check(288, 200, 80, 4, 128, symmetric=False, dtype=torch.float16, config=MatmulConfig(route="dense"), seed=4)
    assert list(gm._SCRATCH) == [(torch.device("cpu"), torch.float16)]


def test_dense_scratch_is_shared_and_grows_once():
    device, dtype = torch.device("cpu"), torch.float64  # a dtype no other test makes a scratch of
    small = gm.dequantize_scratch(device, dtype, 100)
    large = gm.dequantize_scratch(device, dtype, 300)
    assert small.numel() == 100 and large.numel() == 300
    assert gm.dequantize_scratch(device, dtype, 200).data_ptr() == large.data_ptr()


def test_rejects_bad_inputs():
    q, zeros, scales, _ = random_gptq(64, 32, 4, 32, symmetric=True, act_order=False, seed=0)
    qweight = packing.pack_qweight(q, 4)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="bits"):
        gm.gptq_matmul(x, qweight, scales, None, bits=3, group_size=32)
    with pytest.raises(ValueError, match="qweight"):
        gm.gptq_matmul(torch.randn(2, 72), qweight, scales, None, bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        gm.gptq_matmul(x, qweight, scales[:1], None, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bias"):
        gm.gptq_matmul(x, qweight, scales, None, torch.randn(31), bits=4, group_size=32)
    with pytest.raises(TypeError, match="activations"):
        gm.gptq_matmul(x.double(), qweight, scales, None, bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"split_k=2 needs M <= 16 rows, got 17"):
        gm.gptq_matmul(torch.randn(17, 64), qweight, scales, None, bits=4, group_size=32,
                       config=MatmulConfig(block_m=16, block_n=32, block_k=32, split_k=2))
    with pytest.raises(ValueError, match=r"block_k=4 must be a multiple of 8"):
        gm.gptq_matmul(x, qweight, scales, None, bits=4, group_size=32, config=MatmulConfig(block_k=4))


@pytest.mark.parametrize("config, problem", [
    (MatmulConfig(route="cublas"), "route='cublas' must be one of"),
    (MatmulConfig(block_n=96), "block_n=96 must be a power of two"),
    (MatmulConfig(block_n=8), "block_n=8 must be at least 16"),
    (MatmulConfig(block_m=8, block_k=64), "block_m > 1 runs tl.dot"),
    (MatmulConfig(block_m=32, split_k=2), "split_k=2 needs route 'kernel' and block_m <= 16"),
    (MatmulConfig(route="dense", split_k=2), "split_k=2 needs route 'kernel'"),
    (MatmulConfig(split_k=True), "split_k=True must be an integer"),
    (MatmulConfig(num_warps=3), "num_warps=3 must be one of"),
    (MatmulConfig(num_stages=0), "num_stages=0 must be an integer from 1"),
])
def test_config_problems_name_the_field(config, problem):
    assert problem in "; ".join(configs.config_problems(config, 4))


# The custom op: what torch.compile puts in a graph.
def op_args(M, bits=4, config=MatmulConfig(), symmetric=False, bias=True):
    q, zeros, scales, _ = random_gptq(128, 48, bits, 32, symmetric, act_order=False, seed=M)
    x = torch.randn(M, 128, dtype=torch.float16)
    launch = gm.Launch.prepare(config, bits, 32, 128, 48)
    return (x, packing.pack_qweight(q, bits), scales, None if symmetric else zeros.half(),
            torch.randn(48).half() if bias else None, bits, 32, launch.op_config())


@pytest.mark.parametrize("M, config", [(1, MatmulConfig(block_m=1, block_n=32, block_k=32, split_k=2)),
                                       (3, MatmulConfig(block_m=16, block_n=32, block_k=32)),
                                       (20, MatmulConfig(route="dense", block_n=32, block_k=32))])
def test_custom_op_passes_opcheck(M, config):
    """torch.library.opcheck runs all of its tests (schema, fake tensor, autograd registration, AOT dispatch with
    dynamic shapes) under the interpreter."""
    results = torch.library.opcheck(torch.ops.qwen_quant.gptq_matmul.default, op_args(M, config=config))
    assert set(results.values()) == {"SUCCESS"}, results


def test_custom_op_equals_the_direct_call():
    args = op_args(3, bits=8, symmetric=True, bias=False)
    x, qweight, scales, zeros, bias, bits, group, _ = args
    assert torch.equal(torch.ops.qwen_quant.gptq_matmul(*args),
                       gm.gptq_matmul(x, qweight, scales, zeros, bias, bits=bits, group_size=group,
                                      config=MatmulConfig()))


# The per-GPU table.
def test_table_round_trips_and_is_used(tmp_path):
    path = tmp_path / "tuned.json"
    key = configs.shape_key(4, 128, 4096, 12288, 1)
    tuned = MatmulConfig(block_m=1, block_n=256, block_k=64, split_k=16, num_warps=8, num_stages=3)
    configs.write_table(H100[0], {key: tuned}, path)
    configs.write_table("NVIDIA H200", {key: MatmulConfig(block_n=32)}, path)  # keeps the H100's entry
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data["gpus"]) == {H100[0], "NVIDIA H200"}
    assert configs.choose_config(1, 12288, 4096, 128, 4, *H100, path=path) == tuned
    # Another bucket, another shape, another GPU: the heuristic.
    heuristic = configs.heuristic_config(16, 12288, 4096, 128, 4, H100[1])
    assert configs.choose_config(16, 12288, 4096, 128, 4, *H100, path=path) == heuristic
    assert configs.choose_config(1, 4096, 4096, 128, 4, *H100, path=path) == configs.heuristic_config(
        1, 4096, 4096, 128, 4, H100[1])
    assert configs.choose_config(1, 12288, 4096, 128, 4, "NVIDIA A100-SXM4-80GB", 108, path=path) == \
        configs.heuristic_config(1, 12288, 4096, 128, 4, 108)


def test_table_round_trips_random_entries(tmp_path):
    """Many random valid configs (seeded) written under random shape keys read back as the same configs."""
    rng = random.Random(0)
    path = tmp_path / "tuned.json"
    written = {}
    for _ in range(150):
        bits, bucket = rng.choice((4, 8)), rng.choice(configs.M_BUCKETS)
        key = configs.shape_key(bits, rng.choice((32, 64, 128, 4096)), rng.randrange(256, 20000, 32),
                                rng.randrange(256, 40000, 32), bucket)
        block_m = 1 if bucket == 1 else rng.choice((16, 32, 64, 128))
        config = MatmulConfig(route=rng.choice(configs.ROUTES) if block_m > 16 else "kernel", block_m=block_m,
                              block_n=rng.choice((16, 32, 64, 128, 256)), block_k=rng.choice((32, 64, 128, 256)),
                              split_k=rng.choice((1, 2, 8)) if block_m <= 16 else 1,
                              num_warps=rng.choice(configs.NUM_WARPS), num_stages=rng.randint(1, 5))
        assert not configs.config_problems(config, bits)
        written[key] = config
    configs.write_table("GPU", written, path)
    assert configs.read_table(path) == {"GPU": written}


def test_shipped_table_is_valid():
    """The package's table (written by the GPU check's autotune), if present, parses without a warning."""
    import warnings

    if configs.TABLE_PATH.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            table = configs.parse_table(json.loads(configs.TABLE_PATH.read_text(encoding="utf-8")),
                                        configs.TABLE_PATH)
        assert all(isinstance(c, MatmulConfig) for entries in table.values() for c in entries.values())


GOOD_KEY = configs.shape_key(4, 128, 4096, 4096, 1)
DAMAGED = {
    "not_json": (b"{\"format\": 1, \"gpus\": {", "is not valid JSON"),
    "not_utf8": (b"\xff\xfe{}", "is not UTF-8 text"),
    "no_table": (b"[1, 2, 3]", "is not a tuned-config table"),
    "old_format": (json.dumps({"format": 0, "gpus": {}}).encode(), "is not a tuned-config table"),
    "gpu_not_object": (json.dumps({"format": 1, "gpus": {"GPU": [1]}}).encode(),
                       "gpus['GPU'] must be an object of shape keys"),
    "bad_key": (json.dumps({"format": 1, "gpus": {"GPU": {"int4 everything": {}}}}).encode(),
                "the key is no shape key of 4 or 8 bits"),
    "unknown_field": (json.dumps({"format": 1, "gpus": {"GPU": {GOOD_KEY: {"blockn": 64}}}}).encode(),
                      "has unknown fields ['blockn']"),
    "bad_value": (json.dumps({"format": 1, "gpus": {"GPU": {GOOD_KEY: {"block_n": 100}}}}).encode(),
                  "block_n=100 must be a power of two"),
    "bool_value": (json.dumps({"format": 1, "gpus": {"GPU": {GOOD_KEY: {"num_warps": True}}}}).encode(),
                   "num_warps=True must be one of"),
}


@pytest.mark.parametrize("name", DAMAGED)
def test_damaged_table_warns_naming_the_file_and_falls_back(tmp_path, name):
    raw, problem = DAMAGED[name]
    path = tmp_path / "tuned_configs.json"
    path.write_bytes(raw)
    with pytest.warns(configs.TableWarning) as caught:
        config = configs.choose_config(1, 4096, 4096, 128, 4, "GPU", 132, path=path)
    message = str(caught[0].message)
    assert str(path) in message and problem in message and "the heuristic's configs run instead" in message
    assert config == configs.heuristic_config(1, 4096, 4096, 128, 4, 132)


def test_unreadable_table_warns_naming_the_file(tmp_path):
    path = tmp_path / "tuned_configs.json"
    path.mkdir()
    with pytest.warns(configs.TableWarning, match=f"cannot read the tuned-config table {path}: Is a directory"):
        assert configs.read_table(path) == {}


def test_damaged_entry_leaves_the_others_in_use(tmp_path):
    path = tmp_path / "tuned_configs.json"
    good = MatmulConfig(block_n=256, split_k=4)
    other_key = configs.shape_key(4, 128, 4096, 4096, 16)
    path.write_text(json.dumps({"format": 1, "gpus": {"GPU": {GOOD_KEY: good.as_json(),
                                                              other_key: {"split_k": 0}}}}))
    with pytest.warns(configs.TableWarning, match="split_k=0 must be an integer from 1"):
        assert configs.choose_config(1, 4096, 4096, 128, 4, "GPU", 132, path=path) == good


def test_m_buckets():
    assert [configs.m_bucket(M) for M in (1, 2, 16, 17, 64, 65, 4096)] == [1, 16, 16, 64, 64, None, None]
    assert [configs.bucket_name(b) for b in configs.M_BUCKETS] == ["1", "2-16", "17-64", "65+"]
