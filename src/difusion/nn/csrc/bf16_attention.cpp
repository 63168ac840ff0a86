// Attention of bfloat16 queries, keys and values on CPUs with AVX512-BF16, for inference.
//
// PyTorch's CPU flash attention multiplies each block of queries by each block of keys
// with a general bf16 GEMM call; with Stable Diffusion's short head dims (40 at 64x64
// latents) those calls reach a quarter of the machine's bf16 matmul rate.  Here both
// products of the online softmax run through one register-tiled kernel of vdpbf16ps:
//
//   acc[r][c] += broadcast(A[r][pair p]) . B[p][c]      (c: 16 float lanes)
//
// with A = queries (pairs along the head dim) and B = keys packed for S = Q K^T, then
// A = probabilities (pairs along the keys) and B = values packed for O = P V.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRows = 8;       // rows of A in a register tile
constexpr int64_t kQBlock = 64;    // queries a task
constexpr int64_t kKVBlock = 512;  // keys per step of the online softmax

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// out[kRows, 16*C] (+)= A[kRows, npairs] B[npairs, 16*C]: A's row r at a + r*lda, B's
// zmm (p, c) at b + p*sp + c*sc, all in pairs (uint32).
template <int C>
inline void tile(const uint32_t* __restrict a, int64_t lda, const uint32_t* __restrict b,
                 int64_t sp, int64_t sc, int64_t npairs, float* __restrict out, int64_t ldo,
                 bool accumulate) {
  __m512 acc[kRows][C];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < npairs; ++p) {
    __m512bh bv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) bv[c] = (__m512bh)_mm512_loadu_si512(b + p * sp + c * sc);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * lda + p]);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av, bv[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      float* o = out + r * ldo + c * 16;
      _mm512_storeu_ps(o, accumulate ? _mm512_add_ps(acc[r][c], _mm512_loadu_ps(o)) : acc[r][c]);
    }
}

// out[rows, 16*ncols] (+)= A B over every row tile and column tile (tiles of 3, 2 or 1 zmm).
void product(const uint32_t* a, int64_t lda, int64_t rows, const uint32_t* b, int64_t sp,
             int64_t sc, int64_t npairs, int64_t ncols, float* out, int64_t ldo, bool accumulate) {
  for (int64_t c0 = 0; c0 < ncols;) {
    const int64_t C = std::min<int64_t>(3, ncols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const uint32_t* ar = a + r0 * lda;
      const uint32_t* bc = b + c0 * sc;
      float* o = out + r0 * ldo + c0 * 16;
      if (C == 3) tile<3>(ar, lda, bc, sp, sc, npairs, o, ldo, accumulate);
      else if (C == 2) tile<2>(ar, lda, bc, sp, sc, npairs, o, ldo, accumulate);
      else tile<1>(ar, lda, bc, sp, sc, npairs, o, ldo, accumulate);
    }
    c0 += C;
  }
}

constexpr float kLn2 = 0.6931471805599453f;
constexpr float kExp2Taylor[7] = {1.f,
                                  kLn2,
                                  kLn2 * kLn2 / 2,
                                  kLn2 * kLn2 * kLn2 / 6,
                                  kLn2 * kLn2 * kLn2 * kLn2 / 24,
                                  kLn2 * kLn2 * kLn2 * kLn2 * kLn2 / 120,
                                  kLn2 * kLn2 * kLn2 * kLn2 * kLn2 * kLn2 / 720};

// 2^x, relative error ~1e-7; 0 for x <= -150 and for -inf.
inline __m512 exp2(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);  // in [-1/2, 1/2]: 2^f = e^(f ln 2), Taylor to f^6
  __m512 p = _mm512_set1_ps(kExp2Taylor[6]);
  for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[i]));
  return _mm512_scalef_ps(p, n);
}

// q [B, H, Lq, D], k and v [B, H, Lk, D] -> out [B, H, Lq, D], all bfloat16 with the head
// dim contiguous and any other strides (out may be a view of [B, Lq, H*D]).  mask: None or
// bool [B, Lk], true = attend; a query that may attend to no key gets zeros.
void bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const std::optional<at::Tensor>& mask, double scale) {
  for (const at::Tensor* t : {&q, &k, &v, &out}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->dim() == 4,
                "bf16_attention takes 4-d bfloat16 CPU tensors");
    TORCH_CHECK(t->stride(3) == 1, "bf16_attention needs the head dim contiguous");
  }
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(D % 2 == 0, "bf16_attention needs an even head dim");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == D &&
                  out.sizes() == q.sizes(),
              "bf16_attention: q, k, v and out disagree in shape");
  at::Tensor keep;
  const bool* keep_ptr = nullptr;
  if (mask.has_value()) {
    keep = mask->to(at::kBool).contiguous();
    TORCH_CHECK(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == Lk,
                "bf16_attention: mask must be [B, Lk]");
    keep_ptr = keep.data_ptr<bool>();
  }
  const int64_t P = D / 2;                  // pairs along the head dim
  const int64_t Lkp = (Lk + 15) / 16 * 16;  // keys padded to whole zmm
  const int64_t Dp = (D + 15) / 16 * 16;    // head dim padded to whole zmm
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr());

  // keys as [Lkp/16][P][16 keys] pairs of the head dim; values as [Lkp/2][Dp] pairs of keys
  std::vector<uint32_t> kpack(B * H * Lkp * P), vpack(B * H * Lkp / 2 * Dp);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      uint32_t* kp = kpack.data() + bh * Lkp * P;
      auto* vp = reinterpret_cast<uint16_t*>(vpack.data() + bh * Lkp / 2 * Dp);
      for (int64_t j = 0; j < Lkp; ++j) {
        const uint16_t* kr = kd + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
        const uint16_t* vr = vd + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
        for (int64_t p = 0; p < P; ++p)
          kp[((j / 16) * P + p) * 16 + j % 16] = j < Lk ? load_pair(kr + 2 * p) : 0u;
        for (int64_t c = 0; c < Dp; ++c)
          vp[((j / 2) * Dp + c) * 2 + j % 2] = (j < Lk && c < D) ? vr[c] : 0;
      }
    }
  });

  const int64_t nqb = (Lq + kQBlock - 1) / kQBlock;
  const float scale2 = (float)(scale * 1.4426950408889634);  // e^x = 2^(x log2 e)
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qbuf(kQBlock * P);
    std::vector<float> s(kQBlock * kKVBlock), o(kQBlock * Dp), m(kQBlock), l(kQBlock);
    std::vector<uint16_t> pbuf(kQBlock * kKVBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, b = bh / H, h = bh % H, i0 = task % nqb * kQBlock;
      const int64_t rows = std::min(kQBlock, Lq - i0);
      const int64_t rows_pad = (rows + kRows - 1) / kRows * kRows;
      for (int64_t r = 0; r < rows_pad; ++r) {
        const uint16_t* qr = qd + b * q.stride(0) + h * q.stride(1) + (i0 + r) * q.stride(2);
        for (int64_t p = 0; p < P; ++p) qbuf[r * P + p] = r < rows ? load_pair(qr + 2 * p) : 0u;
      }
      std::fill(o.begin(), o.begin() + rows_pad * Dp, 0.f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.f);
      const uint32_t* kp = kpack.data() + bh * Lkp * P;
      const uint32_t* vp = vpack.data() + bh * Lkp / 2 * Dp;
      const bool* keep_b = keep_ptr ? keep_ptr + b * Lk : nullptr;
      for (int64_t j0 = 0; j0 < Lk; j0 += kKVBlock) {
        const int64_t kb = std::min(kKVBlock, Lkp - j0);  // a multiple of 16
        product(qbuf.data(), P, rows_pad, kp + j0 * P, 16, P * 16, P, kb / 16, s.data(),
                kKVBlock, false);
        const bool some_masked = j0 + kb > Lk || keep_b;
        for (int64_t r = 0; r < rows_pad; ++r) {
          float* sr = s.data() + r * kKVBlock;
          uint16_t* pr = pbuf.data() + r * kKVBlock;
          if (some_masked)
            for (int64_t j = 0; j < kb; ++j)
              if (j0 + j >= Lk || (keep_b && !keep_b[j0 + j])) sr[j] = neg_inf;
          __m512 vmax = _mm512_set1_ps(neg_inf);
          for (int64_t j = 0; j < kb; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sr + j));
          const float m_new = std::max(m[r], _mm512_reduce_max_ps(vmax) * scale2);
          if (m_new == neg_inf) {  // no key to attend to yet
            std::memset(pr, 0, kb * sizeof(uint16_t));
            continue;
          }
          const float alpha = std::exp2(m[r] - m_new);
          const __m512 vscale = _mm512_set1_ps(scale2), vm = _mm512_set1_ps(m_new);
          __m512 vsum = _mm512_setzero_ps();
          for (int64_t j = 0; j < kb; j += 16) {
            const __m512 e = exp2(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vscale, vm));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
          }
          l[r] = l[r] * alpha + _mm512_reduce_add_ps(vsum);
          m[r] = m_new;
          if (alpha != 1.f) {
            float* orow = o.data() + r * Dp;
            for (int64_t c = 0; c < Dp; c += 16)
              _mm512_storeu_ps(orow + c, _mm512_mul_ps(_mm512_loadu_ps(orow + c), _mm512_set1_ps(alpha)));
          }
        }
        product(reinterpret_cast<const uint32_t*>(pbuf.data()), kKVBlock / 2, rows_pad,
                vp + j0 / 2 * Dp, Dp, 16, kb / 2, Dp / 16, o.data(), Dp, true);
      }
      for (int64_t r = 0; r < rows; ++r) {
        uint16_t* orow = od + b * out.stride(0) + h * out.stride(1) + (i0 + r) * out.stride(2);
        const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
        alignas(32) uint16_t lanes[16];
        for (int64_t c = 0; c < D; c += 16) {
          const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(o.data() + r * Dp + c), inv);
          _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), (__m256i)_mm512_cvtneps_pbh(x));
          std::memcpy(orow + c, lanes, std::min<int64_t>(16, D - c) * sizeof(uint16_t));
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(difusion, m) {
  m.def("bf16_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor? mask, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(difusion, CPU, m) { m.impl("bf16_attention", &bf16_attention); }
