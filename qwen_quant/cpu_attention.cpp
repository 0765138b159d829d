// One query's attention over a KV cache on the CPU, for decoding: qwen_quant::one_query_attention(q, k, v, mask).
// Registered as a torch operator (with a Meta kernel), so a compiled decode step calls it like any aten op.
//
// Why: torch's attention for one query converts the cache to fp32 first (its half-precision kernel takes 3-4.5x as
// long) and attends over every slot of the cache, masked or not. Here the cache is read in its own dtype, once,
// only at the positions the mask lets through, with fp32 arithmetic. So the result does not depend on how long the
// cache is: an eager step (a cache of the exact length) and a compiled one (a cache rounded up to 256 positions)
// give the same bits, and the compiled step stops paying for the slots it has not reached.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // the dot products' partial sums: a fixed order whatever the vector width

inline float as_float(float x) { return x; }
inline float as_float(at::BFloat16 x) { return static_cast<float>(x); }

// out[d] = sum over positions p with a finite mask of softmax_p(q . k_p * scale + mask_p) * v_p[d], in fp32.
template <typename T>
inline __attribute__((always_inline)) void attend(const float* q, const T* k, const T* v, const float* mask,
                                                  int64_t L, int64_t D, float scale, float* scores, float* out) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < L; ++p) {
        if (mask[p] == -std::numeric_limits<float>::infinity())
            continue;
        float lanes[kLanes] = {};
        const T* key = k + p * D;
        for (int64_t d = 0; d < D; d += kLanes)
            for (int64_t j = 0; j < kLanes; ++j)
                lanes[j] += q[d + j] * as_float(key[d + j]);
        for (int64_t width = kLanes / 2; width > 0; width /= 2)
            for (int64_t j = 0; j < width; ++j)
                lanes[j] += lanes[j + width];
        scores[p] = lanes[0] * scale + mask[p];
        top = std::max(top, scores[p]);
    }
    float total = 0;
    for (int64_t d = 0; d < D; ++d)
        out[d] = 0;
    for (int64_t p = 0; p < L; ++p) {
        if (mask[p] == -std::numeric_limits<float>::infinity())
            continue;
        const float weight = std::exp(scores[p] - top);
        total += weight;
        const T* value = v + p * D;
        for (int64_t d = 0; d < D; ++d)
            out[d] += weight * as_float(value[d]);
    }
    for (int64_t d = 0; d < D; ++d)
        out[d] /= total;
}

// Built for AVX-512, AVX2 and plain x86-64, picked by the CPU at load (GCC's function multiversioning).
__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_bf16(const float* q, const at::BFloat16* k, const at::BFloat16* v, const float* mask, int64_t L, int64_t D,
                 float scale, float* scores, float* out) {
    attend(q, k, v, mask, L, D, scale, scores, out);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_fp32(const float* q, const float* k, const float* v, const float* mask, int64_t L, int64_t D, float scale,
                 float* scores, float* out) {
    attend(q, k, v, mask, L, D, scale, scores, out);
}

void check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
    TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes() && mask.dim() == 2,
                "one_query_attention: q [B, heads, D], k and v [B, kv heads, L, D], mask [B or 1, L]");
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(2) && q.size(1) % k.size(1) == 0 &&
                (mask.size(0) == 1 || mask.size(0) == q.size(0)) && mask.size(1) == k.size(2),
                "one_query_attention: shapes disagree");
    TORCH_CHECK(q.size(2) % kLanes == 0, "one_query_attention: head_dim must be a multiple of 16");
    TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                (k.scalar_type() == at::kBFloat16 || k.scalar_type() == at::kFloat) &&
                mask.scalar_type() == at::kFloat, "one_query_attention: a bf16 or fp32 cache, an fp32 mask");
}

at::Tensor one_query_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               const at::Tensor& mask_in) {
    check(q_in, k_in, v_in, mask_in);
    const at::Tensor q = q_in.to(at::kFloat).contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                     mask = mask_in.contiguous();
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), kv_heads = k.size(1), L = k.size(2);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    at::Tensor out = at::empty({B, H, D}, q.options());
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(L);
        for (int64_t row = begin; row < end; ++row) {
            const int64_t b = row / H, h = row % H;
            const int64_t cache = (b * kv_heads + h / (H / kv_heads)) * L * D;
            const float* m = mask.data_ptr<float>() + (mask.size(0) == 1 ? 0 : b) * L;
            const float* query = q.data_ptr<float>() + row * D;
            float* o = out.data_ptr<float>() + row * D;
            if (k.scalar_type() == at::kBFloat16)
                attend_bf16(query, k.data_ptr<at::BFloat16>() + cache, v.data_ptr<at::BFloat16>() + cache, m, L, D,
                            scale, scores.data(), o);
            else
                attend_fp32(query, k.data_ptr<float>() + cache, v.data_ptr<float>() + cache, m, L, D, scale,
                            scores.data(), o);
        }
    });
    return out.to(q_in.scalar_type());
}

at::Tensor one_query_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& mask) {
    check(q, k, v, mask);
    return at::empty_like(q);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_quant, m) {
    m.def("one_query_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(qwen_quant, CPU, m) {
    m.impl("one_query_attention", one_query_attention);
}

TORCH_LIBRARY_IMPL(qwen_quant, Meta, m) {
    m.impl("one_query_attention", one_query_attention_meta);
}
