// The cpu backend's prompt GEMM: y = x @ W for a weight in torch's int4pack layout, W = code * scale + offset with a
// scale and offset per group of input rows and output column: qwen_quant::prefill_matmul, a torch operator (see
// qwen_quant/cpu_prefill.py).
//
// Each thread takes a block of 64 output columns at a time and writes the block's weights for all K rows into a panel
// in oneDNN's VNNI layout (pairs of rows side by side, [K / 2][64][2] bf16: 256 KiB for K = 2048, in L2), which
// oneDNN's batch-reduce GEMM microkernel (at::native::cpublas::brgemm: bf16 dot products into fp32) multiplies by 64
// prompt rows at a time. No dequantized weight is written out beyond the panel. Two kinds of panel:
// - codes (exact bf16 numbers 0..15 or 0..255): one GEMM per group of rows, each group's partial * scale +
//   group_sum(x) * offset added to an fp32 accumulator. The scale multiplies an fp32 sum: more exact than rounding
//   each weight to bf16. For short prompts (the panel's cost, a table lookup per 32 codes, stays small).
// - scaled (code * scale + offset in fp32, rounded once to bf16, as a bf16 model's weights are): one GEMM over all K
//   rows and no per-group work, which costs M x N x K / 128 fp32 operations (8 % of a 512-row product). For long
//   prompts.
//
// int4pack (as _convert_weight_to_int4pack_for_cpu lays it out on AVX-512 CPUs) stores whole blocks of 64 output
// columns one after another, each as rows of 32 bytes: byte j of a row holds column j in its low nibble and column
// 32 + j in its high one; a short last block (N % 64 columns) stores columns 2j and 2j + 1 in byte j. Int8 codes
// are two int4pack rows apiece (qlinear.CpuInt8QuantLinear): their high nibbles in rows 0..K-1, low ones in K..2K-1.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kColumns = 64;  // output columns a thread takes at a time: one int4pack block (AVX-512's layout)
constexpr int64_t kRows = 64;     // prompt rows multiplied at a time by one block's panel
constexpr int64_t kDepth = 1024;  // scaled panels: rows of K per GEMM (a 128 KiB slice; all of K = 11008 at once,
                                  // 1.4 MiB, ran 256-row prompts at half the speed: it left L2 for every 64 rows)

struct Weight {
    const uint8_t* packed;
    const float* scales;   // [G, N]
    const float* offsets;  // [G, N]
    int64_t K, N, group_rows, bits;
};

uint16_t bf16_bits(float f) {  // rounded to nearest even, as vcvtne2ps2bf16 rounds (codes 0..255 are exact)
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Rows k0..k0 + rows (even, one group) of columns n0..n0 + width (a whole block, or the short last one) into
// panel[(k - k0) / 2][n - n0][(k - k0) % 2] as bf16: the codes, or (scaled) code * scale + offset.
void panel_generic(const Weight& w, int64_t n0, int64_t width, int64_t k0, int64_t rows, bool scaled,
                   uint16_t* panel) {
    const float* scale = w.scales + k0 / w.group_rows * w.N + n0;
    const float* offset = w.offsets + k0 / w.group_rows * w.N + n0;
    const bool whole = width == kColumns;
    const int64_t half = width / 2, all_rows = w.bits == 8 ? 2 * w.K : w.K;
    const uint8_t* base = w.packed + n0 * all_rows / 2;
    for (int64_t k = k0; k < k0 + rows; ++k) {
        for (int64_t j = 0; j < width; ++j) {
            const int64_t byte = whole ? j % half : j / 2;
            const bool high = whole ? j >= half : j % 2 == 1;
            const auto nibble = [&](int64_t row) {
                const uint8_t b = base[row * half + byte];
                return high ? b >> 4 : b & 15;
            };
            const float code = w.bits == 8 ? nibble(k) << 4 | nibble(w.K + k) : nibble(k);
            panel[((k - k0) / 2 * width + j) * 2 + (k - k0) % 2] =
                bf16_bits(scaled ? std::fma(code, scale[j], offset[j]) : code);
        }
    }
}

#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Two rows' 32 values of the same 32 columns, bf16 words, interleaved into the VNNI order of those columns.
AVX512BF16 inline void store_pairs(__m512i a, __m512i b, uint16_t* out) {
    const __m512i first = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                           37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
    _mm512_storeu_si512(out, _mm512_permutex2var_epi16(a, first, b));
    _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(a, second, b));
}

// A whole 64-column block, 4 bits: a row's 32 bytes hold columns 0..31 (low nibbles) and 32..63 (high). vpermw reads
// 5 bits of an index, so a table of the 16 codes' bf16 values, twice over, finds a low nibble without masking.
AVX512BF16 void panel_int4_avx512(const Weight& w, int64_t n0, int64_t k0, int64_t rows, uint16_t* panel) {
    const uint8_t* base = w.packed + n0 * w.K / 2;
    const __m512i codes = _mm512_set_epi16(0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0,
                                           0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000, 0x4170, 0x4160,
                                           0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,
                                           0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
    for (int64_t k = k0; k < k0 + rows; k += 2) {
        const __m512i a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(base + k * 32)));
        const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(base + (k + 1) * 32)));
        uint16_t* out = panel + (k - k0) / 2 * 2 * kColumns;
        store_pairs(_mm512_permutexvar_epi16(a, codes), _mm512_permutexvar_epi16(b, codes), out);
        store_pairs(_mm512_permutexvar_epi16(_mm512_srli_epi16(a, 4), codes),
                    _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), codes), out + 64);
    }
}

// 32 codes (bytes) of 32 columns as bf16 code * scale + offset, each rounded once (scale 1, offset 0: the codes).
AVX512BF16 inline __m512i weights_bf16(__m256i codes, const __m512* scale, const __m512* offset) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes)));
    const __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(b, scale[1], offset[1]),
                                        _mm512_fmadd_ps(a, scale[0], offset[0]));
}

// A whole 64-column block's rows k0..k0 + rows (one group) into the panel, each row's codes a byte per column
// (8 bits: the nibbles of rows k, high, and K + k, low, joined): as codes, or (scaled) code * scale + offset.
AVX512BF16 void panel_avx512(const Weight& w, int64_t n0, int64_t k0, int64_t rows, bool scaled, uint16_t* panel) {
    const uint8_t* base = w.packed + n0 * w.K * w.bits / 8;  // the blocks before n0: K (or 2K) rows of 32 bytes
    const __m256i low4 = _mm256_set1_epi8(15);
    __m512 scale[4], offset[4];  // columns 16q..16q + 15
    for (int q = 0; q < 4; ++q) {
        scale[q] = scaled ? _mm512_loadu_ps(w.scales + k0 / w.group_rows * w.N + n0 + 16 * q) : _mm512_set1_ps(1);
        offset[q] = scaled ? _mm512_loadu_ps(w.offsets + k0 / w.group_rows * w.N + n0 + 16 * q) : _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k0 + rows; k += 2) {
        __m512i values[2][2];  // [row k, k + 1][columns 0..31, 32..63]
        for (int r = 0; r < 2; ++r) {
            const __m256i hi = _mm256_loadu_si256((const __m256i*)(base + (k + r) * 32));
            __m256i codes[2] = {_mm256_and_si256(hi, low4), _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4)};
            if (w.bits == 8) {
                const __m256i lo = _mm256_loadu_si256((const __m256i*)(base + (w.K + k + r) * 32));
                codes[0] = _mm256_or_si256(_mm256_slli_epi16(codes[0], 4), _mm256_and_si256(lo, low4));
                codes[1] = _mm256_or_si256(_mm256_slli_epi16(codes[1], 4),
                                           _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4));
            }
            values[r][0] = weights_bf16(codes[0], scale, offset);
            values[r][1] = weights_bf16(codes[1], scale + 2, offset + 2);
        }
        uint16_t* out = panel + (k - k0) / 2 * 2 * kColumns;
        store_pairs(values[0][0], values[1][0], out);
        store_pairs(values[0][1], values[1][1], out + 64);
    }
}

// total[m][n] (+)= fma(partial[m][n], scale[n], sums[m * G] * offset[n]): a group's sums of code products, scaled,
// plus its offset times the group's sum of x. The portable loop and the AVX-512 one compute the same roundings.
void add_group(float* total, const float* partial, const float* scale, const float* offset, const float* sums,
               int64_t G, int64_t M, int64_t width, bool first) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < width; ++n) {
            const float term = std::fma(partial[m * kColumns + n], scale[n], sums[m * G] * offset[n]);
            total[m * kColumns + n] = first ? term : total[m * kColumns + n] + term;
        }
}

void store_bf16(const float* total, at::BFloat16* out, int64_t ld, int64_t M, int64_t width) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < width; ++n)
            out[m * ld + n] = at::BFloat16(total[m * kColumns + n]);
}

AVX512BF16 void add_group_avx512(float* total, const float* partial, const float* scale, const float* offset,
                                 const float* sums, int64_t G, int64_t M, bool first) {
    __m512 s[4], o[4];
    for (int q = 0; q < 4; ++q) {
        s[q] = _mm512_loadu_ps(scale + 16 * q);
        o[q] = _mm512_loadu_ps(offset + 16 * q);
    }
    for (int64_t m = 0; m < M; ++m) {
        const __m512 sum = _mm512_set1_ps(sums[m * G]);
        for (int q = 0; q < 4; ++q) {
            float* t = total + m * kColumns + 16 * q;
            const __m512 term = _mm512_fmadd_ps(_mm512_loadu_ps(partial + m * kColumns + 16 * q), s[q],
                                                _mm512_mul_ps(sum, o[q]));
            _mm512_storeu_ps(t, first ? term : _mm512_add_ps(_mm512_loadu_ps(t), term));
        }
    }
}

AVX512BF16 void store_bf16_avx512(const float* total, at::BFloat16* out, int64_t ld, int64_t M) {
    for (int64_t m = 0; m < M; ++m)
        for (int q = 0; q < 4; q += 2)
            _mm512_storeu_si512(out + m * ld + 16 * q,
                                (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(total + m * kColumns + 16 * q + 16),
                                                             _mm512_loadu_ps(total + m * kColumns + 16 * q)));
}

bool has_avx512_bf16() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}

// x (bf16 [M, K], contiguous) @ W, W [K, N] = code * scales + offsets over G equal groups of rows (fp32 [G, N],
// contiguous), the codes in int4pack `packed` of 64-column blocks (AVX-512's layout); fp32 [M, N] (bf16 if out_bf16).
// scaled: through scaled panels (see the top). vector: the AVX-512 code for whole blocks (else the portable loops
// throughout, which compute the same bits).
at::Tensor prefill_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          const at::Tensor& offsets, int64_t bits, bool scaled, bool vector, bool out_bf16) {
    const int64_t M = x.size(0), K = x.size(1), G = scales.size(0), N = scales.size(1);
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                packed.numel() * 2 == N * K * (bits == 8 ? 2 : 1), "packed must hold the int4pack codes");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat && scales.is_contiguous() &&
                offsets.is_contiguous() && offsets.sizes() == scales.sizes() && G > 0 && K % G == 0,
                "scales and offsets must be contiguous fp32 [G, N] with G dividing K");
    TORCH_CHECK((bits == 4 || bits == 8) && N % 16 == 0 && (K / G) % 2 == 0, "bits, N or the group's rows");
    TORCH_CHECK(has_avx512_bf16(), "the prompt GEMM needs AVX-512-BF16");
    const int64_t group_rows = K / G;
    const Weight w{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), offsets.data_ptr<float>(), K, N, group_rows,
                   bits};
    at::Tensor y = at::empty({M, N}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
    if (M == 0)
        return y;
    const at::Tensor group_sums =  // [M, G]: the codes' offsets multiply them
        scaled ? at::zeros({1}, x.options().dtype(at::kFloat))
               : x.view({M, G, group_rows}).to(at::kFloat).sum(-1).contiguous();
    const float* sums = group_sums.data_ptr<float>();
    const auto* a = reinterpret_cast<const at::BFloat16*>(x.data_ptr());
    at::parallel_for(0, (N + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
        // Per thread, kept between calls (a fresh megabyte costs a page fault per 4 KiB): the panel of a whole block,
        // and the sums of kRows prompt rows (16 KiB each; 64 rows ran 5-7 % faster than 32, as fast as 128); scaled
        // panels sum every prompt row in `total`.
        thread_local std::vector<uint16_t> panel;
        thread_local std::vector<float> partial(kRows * kColumns), total(kRows * kColumns);
        panel.resize(std::max<size_t>(panel.size(), K * kColumns));
        for (int64_t task = begin; task < end; ++task) {
            const int64_t n0 = task * kColumns, width = std::min(kColumns, N - n0);
            const bool whole = vector && width == kColumns;  // the AVX-512 code's case
            for (int64_t g = 0; g < G; ++g) {
                uint16_t* group_panel = panel.data() + g * group_rows * width;  // [K / 2][width][2] in all
                if (whole && bits == 4 && !scaled)
                    panel_int4_avx512(w, n0, g * group_rows, group_rows, group_panel);
                else if (whole)
                    panel_avx512(w, n0, g * group_rows, group_rows, scaled, group_panel);
                else
                    panel_generic(w, n0, width, g * group_rows, group_rows, scaled, group_panel);
            }
            const auto* b = reinterpret_cast<const at::BFloat16*>(panel.data());
            const auto store = [&](const float* t, int64_t m0, int64_t rows) {  // sums of rows m0.. -> y
                if (!out_bf16)
                    for (int64_t m = 0; m < rows; ++m)
                        std::memcpy(y.data_ptr<float>() + (m0 + m) * N + n0, t + m * kColumns, width * sizeof(float));
                else if (whole)
                    store_bf16_avx512(t, y.data_ptr<at::BFloat16>() + m0 * N + n0, N, rows);
                else
                    store_bf16(t, y.data_ptr<at::BFloat16>() + m0 * N + n0, N, rows, width);
            };
            if (scaled) {  // slices of kDepth panel rows (in L2), each over every prompt row, summed in `total`
                total.resize(std::max<size_t>(total.size(), M * kColumns));
                for (int64_t k0 = 0; k0 < K; k0 += kDepth)
                    for (int64_t m0 = 0; m0 < M; m0 += kRows)
                        at::native::cpublas::brgemm(std::min(kRows, M - m0), width, std::min(kDepth, K - k0), K, width,
                                                    kColumns, k0 > 0, a + m0 * K + k0, b + k0 * width,
                                                    total.data() + m0 * kColumns, true);
                store(total.data(), 0, M);
                continue;
            }
            for (int64_t m0 = 0; m0 < M; m0 += kRows) {  // codes: a GEMM per group, then its scale
                const int64_t rows = std::min(kRows, M - m0);
                for (int64_t g = 0; g < G; ++g) {
                    const int64_t k0 = g * group_rows;
                    at::native::cpublas::brgemm(rows, width, group_rows, K, width, kColumns, false, a + m0 * K + k0,
                                                b + k0 * width, partial.data(), true);
                    const float *scale = w.scales + g * N + n0, *offset = w.offsets + g * N + n0;
                    if (whole)
                        add_group_avx512(total.data(), partial.data(), scale, offset, sums + m0 * G + g, G, rows,
                                         g == 0);
                    else
                        add_group(total.data(), partial.data(), scale, offset, sums + m0 * G + g, G, rows, width,
                                  g == 0);
                }
                store(total.data(), m0, rows);
            }
        }
        at::native::cpublas::brgemm_release(true);  // per thread: AMX keeps a tile configuration per thread
    });
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_quant, m) {
    m.def("prefill_matmul(Tensor x, Tensor packed, Tensor scales, Tensor offsets, int bits, bool scaled, "
          "bool vector, bool out_bf16) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen_quant, CPU, m) {
    m.impl("prefill_matmul", prefill_matmul);
}
