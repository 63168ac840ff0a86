// Attention on CPUs with AVX-512, for inference: bfloat16 (with AVX512-BF16) and float32.
//
// PyTorch's CPU flash attention multiplies each block of queries by each block of keys
// with a general GEMM call; with Stable Diffusion's short head dims (40 at 64x64 latents)
// those calls fall well short of the machine's matmul rate.  Here both products of the
// online softmax run through one register-tiled kernel,
//
//   acc[r][c] += broadcast(A[r][unit p]) . B[p][c]      (c: 16 float lanes)
//
// where a unit is a pair of bf16 for vdpbf16ps or one float for an FMA.  In bf16, A =
// queries (pairs along the head dim) and B = keys packed for S = Q K^T, then A =
// probabilities (pairs along the keys) and B = values packed for O = P V.  In float32 the
// products are transposed (see f32_attention).
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

// The multiply-add of a register tile, over units of A and rows of B: a unit is a pair of
// bfloat16 for vdpbf16ps (acc[c] += a.x b[c].x + a.y b[c].y), one float for an FMA.
struct Bf16Pairs {
  using Unit = uint32_t;
  using Row = __m512bh;
  static Row load(const Unit* b) { return (__m512bh)_mm512_loadu_si512(b); }
  static __m512 madd(__m512 acc, Unit a, Row b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32((int)a), b);
  }
};
struct Floats {
  using Unit = float;
  using Row = __m512;
  static Row load(const Unit* b) { return _mm512_loadu_ps(b); }
  static __m512 madd(__m512 acc, Unit a, Row b) {
    return _mm512_fmadd_ps(_mm512_set1_ps(a), b, acc);
  }
};

// out[kRows, 16*C] (+)= A[kRows, n] B[n, 16*C]: A's row r at a + r*lda, B's zmm (p, c) at
// b + p*sp + c*sc, in units.
template <class M, int C>
inline void tile(const typename M::Unit* __restrict a, int64_t lda,
                 const typename M::Unit* __restrict b, int64_t sp, int64_t sc, int64_t n,
                 float* __restrict out, int64_t ldo, bool accumulate) {
  __m512 acc[kRows][C];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    typename M::Row bv[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) bv[c] = M::load(b + p * sp + c * sc);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const typename M::Unit av = a[r * lda + p];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = M::madd(acc[r][c], av, bv[c]);
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
template <class M>
void product(const typename M::Unit* a, int64_t lda, int64_t rows, const typename M::Unit* b,
             int64_t sp, int64_t sc, int64_t n, int64_t ncols, float* out, int64_t ldo,
             bool accumulate) {
  for (int64_t c0 = 0; c0 < ncols;) {
    const int64_t C = std::min<int64_t>(3, ncols - c0);
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const auto* ar = a + r0 * lda;
      const auto* bc = b + c0 * sc;
      float* o = out + r0 * ldo + c0 * 16;
      if (C == 3) tile<M, 3>(ar, lda, bc, sp, sc, n, o, ldo, accumulate);
      else if (C == 2) tile<M, 2>(ar, lda, bc, sp, sc, n, o, ldo, accumulate);
      else tile<M, 1>(ar, lda, bc, sp, sc, n, o, ldo, accumulate);
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

// Checks q [B, H, Lq, D], k and v [B, H, Lk, D] and out (q's shape), all CPU tensors of
// `dtype` with the head dim contiguous; returns the mask [B, Lk] as contiguous bools, or an
// undefined tensor for none.
at::Tensor checked_mask(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const std::optional<at::Tensor>& mask,
                        at::ScalarType dtype) {
  for (const at::Tensor* t : {&q, &k, &v, &out}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu() && t->dim() == 4,
                "attention takes 4-d CPU tensors of one dtype, here ", dtype);
    TORCH_CHECK(t->stride(3) == 1, "attention needs the head dim contiguous");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3) && out.sizes() == q.sizes(),
              "attention: q, k, v and out disagree in shape");
  if (!mask.has_value()) return at::Tensor();
  at::Tensor keep = mask->to(at::kBool).contiguous();
  TORCH_CHECK(keep.dim() == 2 && keep.size(0) == q.size(0) && keep.size(1) == k.size(2),
              "attention: mask must be [B, Lk]");
  return keep;
}

// q [B, H, Lq, D], k and v [B, H, Lk, D] -> out [B, H, Lq, D], all bfloat16 with the head
// dim contiguous and any other strides (out may be a view of [B, Lq, H*D]).  mask: None or
// bool [B, Lk], true = attend; a query that may attend to no key gets zeros.
void bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const std::optional<at::Tensor>& mask, double scale) {
  const at::Tensor keep = checked_mask(q, k, v, out, mask, at::kBFloat16);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(D % 2 == 0, "bf16_attention needs an even head dim");
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;
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
        product<Bf16Pairs>(qbuf.data(), P, rows_pad, kp + j0 * P, 16, P * 16, P, kb / 16,
                           s.data(), kKVBlock, false);
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
        product<Bf16Pairs>(reinterpret_cast<const uint32_t*>(pbuf.data()), kKVBlock / 2,
                           rows_pad, vp + j0 / 2 * Dp, Dp, 16, kb / 2, Dp / 16, o.data(), Dp,
                           true);
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

// The same attention in float32, transposed so that queries run along the lanes: S^T = K Q^T
// (keys as rows of A, queries packed as B), then O^T += V^T P^T.  The online softmax then
// reduces over rows (lane-wise max and sum, no horizontal reductions), and no product pads
// the head dim to whole registers.
constexpr int64_t kF32QBlock = 48;    // queries a task: one tile of 3 zmm
constexpr int64_t kF32KVBlock = 256;  // keys per step of the online softmax

void f32_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const std::optional<at::Tensor>& mask, double scale) {
  const at::Tensor keep = checked_mask(q, k, v, out, mask, at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const bool* keep_ptr = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  const int64_t Lkp = (Lk + kRows - 1) / kRows * kRows;  // keys padded to whole row tiles
  const int64_t Dr = (D + kRows - 1) / kRows * kRows;    // head dim padded likewise, for V^T
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  float* od = out.data_ptr<float>();

  // keys as [Lkp][D]; values as [Dr][Lkp]
  std::vector<float> kpack(B * H * Lkp * D), vpack(B * H * Dr * Lkp);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* kp = kpack.data() + bh * Lkp * D;
      float* vp = vpack.data() + bh * Dr * Lkp;
      std::fill(kp + Lk * D, kp + Lkp * D, 0.f);
      std::fill(vp, vp + Dr * Lkp, 0.f);
      for (int64_t j = 0; j < Lk; ++j) {
        const float* kr = kd + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
        const float* vr = vd + b * v.stride(0) + h * v.stride(1) + j * v.stride(2);
        std::memcpy(kp + j * D, kr, D * sizeof(float));
        for (int64_t c = 0; c < D; ++c) vp[c * Lkp + j] = vr[c];
      }
    }
  });

  constexpr int64_t QB = kF32QBlock, NC = QB / 16;
  const int64_t nqb = (Lq + QB - 1) / QB;
  const float scale2 = (float)(scale * 1.4426950408889634);  // e^x = 2^(x log2 e)
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  at::parallel_for(0, B * H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D * QB), s(kF32KVBlock * QB), ot(Dr * QB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / nqb, b = bh / H, h = bh % H, i0 = task % nqb * QB;
      const int64_t rows = std::min(QB, Lq - i0);
      std::fill(qt.begin(), qt.end(), 0.f);
      for (int64_t i = 0; i < rows; ++i) {  // Q^T, scaled for exp2
        const float* qr = qd + b * q.stride(0) + h * q.stride(1) + (i0 + i) * q.stride(2);
        for (int64_t c = 0; c < D; ++c) qt[c * QB + i] = qr[c] * scale2;
      }
      std::fill(ot.begin(), ot.end(), 0.f);
      __m512 m[NC], l[NC];
      for (int64_t c = 0; c < NC; ++c) m[c] = neg_inf, l[c] = _mm512_setzero_ps();
      const float* kp = kpack.data() + bh * Lkp * D;
      const float* vp = vpack.data() + bh * Dr * Lkp;
      const bool* keep_b = keep_ptr ? keep_ptr + b * Lk : nullptr;
      for (int64_t j0 = 0; j0 < Lk; j0 += kF32KVBlock) {
        const int64_t kb = std::min(kF32KVBlock, Lkp - j0);  // a multiple of kRows
        product<Floats>(kp + j0 * D, D, kb, qt.data(), QB, 16, D, NC, s.data(), QB, false);
        for (int64_t j = 0; j < kb; ++j)
          if (j0 + j >= Lk || (keep_b && !keep_b[j0 + j]))
            for (int64_t c = 0; c < NC; ++c) _mm512_storeu_ps(s.data() + j * QB + c * 16, neg_inf);
        for (int64_t c = 0; c < NC; ++c) {
          float* sc = s.data() + c * 16;
          __m512 vmax = m[c];
          for (int64_t j = 0; j < kb; ++j) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sc + j * QB));
          // a query with no key to attend to yet keeps m = -inf; exp2(x - 0) is 0 for it
          const __m512 shift = _mm512_mask_blend_ps(
              _mm512_cmp_ps_mask(vmax, neg_inf, _CMP_EQ_OQ), vmax, _mm512_setzero_ps());
          const __m512 alpha = exp2(_mm512_sub_ps(m[c], shift));
          __m512 vsum = _mm512_setzero_ps();
          for (int64_t j = 0; j < kb; ++j) {
            const __m512 e = exp2(_mm512_sub_ps(_mm512_loadu_ps(sc + j * QB), shift));
            vsum = _mm512_add_ps(vsum, e);
            _mm512_storeu_ps(sc + j * QB, e);
          }
          l[c] = _mm512_fmadd_ps(l[c], alpha, vsum);
          m[c] = vmax;
          for (int64_t d = 0; d < D; ++d)
            _mm512_storeu_ps(ot.data() + d * QB + c * 16,
                             _mm512_mul_ps(_mm512_loadu_ps(ot.data() + d * QB + c * 16), alpha));
        }
        product<Floats>(vp + j0, Lkp, Dr, s.data(), QB, 16, kb, NC, ot.data(), QB, true);
      }
      alignas(64) float inv[QB];
      for (int64_t c = 0; c < NC; ++c) {
        const __m512 lc = l[c];
        const __mmask16 some = _mm512_cmp_ps_mask(lc, _mm512_setzero_ps(), _CMP_GT_OQ);
        _mm512_store_ps(inv + c * 16, _mm512_maskz_div_ps(some, _mm512_set1_ps(1.f), lc));
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* orow = od + b * out.stride(0) + h * out.stride(1) + (i0 + i) * out.stride(2);
        for (int64_t c = 0; c < D; ++c) orow[c] = ot[c * QB + i] * inv[i];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(difusion, m) {
  m.def("bf16_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor? mask, float scale) -> ()");
  m.def("f32_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor? mask, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(difusion, CPU, m) {
  m.impl("bf16_attention", &bf16_attention);
  m.impl("f32_attention", &f32_attention);
}
