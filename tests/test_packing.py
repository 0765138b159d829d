"""qwen_quant.packing on its own: codes and zero points to AutoGPTQ's int32 words and back, for every width, both
formats and ragged groups, against a bit-stream reader written here apart from the packer."""
import pytest
import torch

from qwen_quant import packing
from qwen_quant.gptq import gptq_quantize
from test_gptq import K, N, correlated_layer


def unpack_reference(words: torch.Tensor, bits: int, count: int) -> list[int]:
    """Read `count` values of `bits` bits from int32 words as one little-endian bit stream (written here, apart
    from the project's packer)."""
    stream = 0
    for i, w in enumerate(words.tolist()):
        stream |= (w & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(count)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (96, 40), dtype=torch.int32)
    packed = packing.pack_qweight(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (96 * bits // 32, 40)
    assert torch.equal(packing.unpack_qweight(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_round_trips_gptq_output(bits):
    weight, hessian = correlated_layer(10)
    result = gptq_quantize(weight, hessian, bits, 32, sym=True, desc_act=True, mse=True)
    qweight = packing.pack_qweight(result.codes.t(), bits)
    qzeros = packing.pack_qzeros(result.zeros, bits, "gptq")
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (K // 32, N * bits // 32)
    assert torch.equal(packing.unpack_qweight(qweight, bits), result.codes.t())
    assert torch.equal(packing.unpack_qzeros(qzeros, bits, "gptq"), result.zeros)
    assert torch.equal(packing.dequantize(qweight, qzeros, result.scales, result.g_idx, bits), result.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_qweight_is_one_little_endian_bit_stream_per_column(bits):
    codes = torch.randint(0, 2 ** bits, (64, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(bits))
    packed = packing.pack_qweight(codes, bits)
    for col in range(3):
        assert unpack_reference(packed[:, col], bits, 64) == codes[:, col].tolist()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("checkpoint_format", packing.FORMATS)
def test_qzeros_round_trip_in_both_formats(bits, checkpoint_format):
    lowest = 1 if checkpoint_format == "gptq" else 0
    zeros = torch.randint(lowest, 2 ** bits, (5, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    qzeros = packing.pack_qzeros(zeros, bits, checkpoint_format)
    assert qzeros.shape == (5, 32 * bits // 32)
    assert torch.equal(packing.unpack_qzeros(qzeros, bits, checkpoint_format), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_v1_stores_each_zero_point_minus_one(bits):
    zeros = torch.randint(1, 2 ** bits, (3, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    qzeros = packing.pack_qzeros(zeros, bits, "gptq")
    for g in range(3):  # qzeros packs along N: each row of groups is one bit stream
        assert unpack_reference(qzeros[g], bits, 32) == (zeros[g] - 1).tolist()
    assert torch.equal(qzeros, packing.pack_qzeros(zeros - 1, bits, "gptq_v2"))
    # Read with the wrong format, every zero point is off by one.
    assert torch.equal(packing.unpack_qzeros(qzeros, bits, "gptq_v2"), zeros - 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_with_a_shorter_last_group(bits):
    # 96 inputs in groups of 64: the last group holds 32, and g_idx = k // 64 gives ceil(96 / 64) = 2 groups.
    gen = torch.Generator().manual_seed(3)
    k, n, group = 96, 32, 64
    codes = torch.randint(0, 2 ** bits, (k, n), dtype=torch.int32, generator=gen)
    zeros = torch.randint(1, 2 ** bits, (2, n), dtype=torch.int32, generator=gen)
    scales = torch.rand(2, n, generator=gen).half()
    g_idx = torch.arange(k, dtype=torch.int32) // group
    w = packing.dequantize(packing.pack_qweight(codes, bits), packing.pack_qzeros(zeros, bits), scales, g_idx, bits)
    g = g_idx.long()
    assert torch.equal(w, ((codes - zeros[g]).float() * scales.float()[g]).t())
    assert w.shape == (n, k)


def test_values_per_period():
    assert [packing.values_per_period(b) for b in (2, 3, 4, 8)] == [(16, 1), (32, 3), (8, 1), (4, 1)]


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"bits=5 is not supported: choose one of \(2, 3, 4, 8\)"):
        packing.pack_qweight(torch.zeros(32, 4, dtype=torch.int32), 5)
    with pytest.raises(ValueError, match="NAME.qweight: bits=1 is not supported"):
        packing.check_bits(1, "NAME.qweight: ")
    with pytest.raises(ValueError, match="cannot pack 12 3-bit values: the count must be a multiple of 32"):
        packing.pack_qweight(torch.zeros(12, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"integer codes out of range for 4 bits: \[0, 16\]"):
        packing.pack_qweight(torch.tensor([[0]] * 7 + [[16]], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="4 packed rows do not hold whole groups of 3 words for 3 bits"):
        packing.unpack_qweight(torch.zeros(4, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"cannot store a zero point of 0 .* write checkpoint_format gptq_v2"):
        packing.pack_qzeros(torch.zeros(1, 8, dtype=torch.int32), 4, "gptq")
    with pytest.raises(ValueError, match=r"checkpoint_format 'gptq_v3' is not supported: choose one of"):
        packing.unpack_qzeros(torch.zeros(1, 1, dtype=torch.int32), 4, "gptq_v3")


def test_valid_bits_and_group_sizes():
    assert [b for b in (1, 2, 3, 4, 5, 8, 16, True, 4.0) if packing.valid_bits(b)] == [2, 3, 4, 8]
    assert [g for g in (-2, -1, 0, 1, 128, 4096, True, 128.0) if packing.valid_group_size(g)] == [-1, 1, 128, 4096]
