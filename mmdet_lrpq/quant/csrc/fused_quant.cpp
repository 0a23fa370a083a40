// Fused CPU kernels for the quantizers of mmdet_lrpq.quant.functional.
//
// Same float operations, in the same order, as the PyTorch path they replace, one pass instead of
// four to seven:
//   uniform:   y = clamp(rint(x / delta), -zp, levels - zp)   (IEEE division, round half to even)
//              fake_quant = y * delta,  error = x - y * delta   (no FMA contraction: built with
//                                                               -ffp-contract=off)
//   log-sqrt2: code = clamp(rint(-2 * log2(x / delta)), 0, 2^b), fake_quant = table[code],
//              error = table[code] - x; the code read off the float's exponent and mantissa
//              wherever that provably equals PyTorch's log2 (which defines the codes), from
//              PyTorch's own log2 (at::log2_) everywhere else (see log_sqrt2_from_bits)
// Built at first use by mmdet_lrpq/quant/_ext.py (torch.utils.cpp_extension); the PyTorch path
// stays the reference and the fallback (CUDA tensors, no compiler, MMDET_LRPQ_NO_EXT=1).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;      // independent float accumulators (vectorizable without reassociation)
constexpr int64_t kBlock = 8192;    // columns per task: partial sums in float over a block, then double

inline float quant_index(float x, float d, float lo, float hi) {
  float y = std::nearbyint(x / d);
  y = y < lo ? lo : y;   // clamp_min then clamp_max, NaN propagates like torch.clamp
  y = y > hi ? hi : y;
  return y;
}

// total + sum over i < n of err(i)^2 (n <= kBlock): kLanes float accumulators, then the remainder
// and the lanes added to `total` in float64. The one summation order of every squared-error score.
template <typename Err>
inline double lane_sum_sq(int64_t n, Err err, double total = 0.0) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float e = err(i + j);
      acc[j] += e * e;
    }
  for (; i < n; ++i) {
    const float e = err(i);
    total += static_cast<double>(e * e);
  }
  for (int64_t j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

// Sum of squared errors of a block for one candidate.
double block_sq_err(const float* x, int64_t n, float d, float z, float levels) {
  const float lo = -z, hi = levels - z;
  return lane_sum_sq(n, [&](int64_t i) { return x[i] - quant_index(x[i], d, lo, hi) * d; });
}

// A dense (sizes, strides) layout laid over the start of `scratch`: it spans exactly numel values.
torch::Tensor scratch_view(const torch::Tensor& buf, at::IntArrayRef sizes, at::IntArrayRef strides, int64_t numel) {
  TORCH_CHECK(buf.scalar_type() == torch::kFloat && buf.is_contiguous() && buf.numel() >= numel,
              "scratch: contiguous float32 with at least as many elements as the output");
  return buf.as_strided(sizes, strides, 0);
}

// The output tensor: x's layout (x dense), in `scratch` (a reused contiguous buffer) if given.
torch::Tensor output_for(const torch::Tensor& x, const std::optional<torch::Tensor>& scratch) {
  if (!scratch.has_value() || !x.is_non_overlapping_and_dense()) return torch::empty_like(x);
  return scratch_view(*scratch, x.sizes(), x.strides(), x.numel());
}

}  // namespace

// rows [C, M] float32; delta, zero_point [P, C] float32 -> [P, C] float64 sums of squared error.
torch::Tensor uniform_sq_err(torch::Tensor rows, torch::Tensor delta, torch::Tensor zero_point, int64_t levels) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat && rows.dim() == 2, "rows: [C, M] float32 CPU");
  rows = rows.contiguous();
  delta = delta.to(torch::kFloat).contiguous();
  zero_point = zero_point.to(torch::kFloat).contiguous();
  const int64_t C = rows.size(0), M = rows.size(1), P = delta.size(0);
  TORCH_CHECK(delta.dim() == 2 && delta.size(1) == C && zero_point.sizes() == delta.sizes(), "delta/zero_point: [P, C]");
  const int64_t nb = std::max<int64_t>(1, (M + kBlock - 1) / kBlock);
  std::vector<double> partial(static_cast<size_t>(P * C * nb), 0.0);
  const float* x = rows.data_ptr<float>();
  const float* d = delta.data_ptr<float>();
  const float* z = zero_point.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  at::parallel_for(0, C * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t / nb, b = t % nb;
      const int64_t start = b * kBlock, n = std::min(M, start + kBlock) - start;
      for (int64_t p = 0; p < P; ++p)
        partial[(p * C + c) * nb + b] = block_sq_err(x + c * M + start, n, d[p * C + c], z[p * C + c], lv);
    }
  });
  auto out = torch::zeros({P, C}, torch::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t pc = 0; pc < P * C; ++pc) {
    double s = 0.0;
    for (int64_t b = 0; b < nb; ++b) s += partial[pc * nb + b];
    o[pc] = s;
  }
  return out;
}

// x float32 viewed as [outer, C, inner] (C = delta.numel(); C = 1 per tensor, inner = 1 for the last
// axis, outer = 1 for the first): clamp(rint(x/Δ_c), -zp_c, L-zp_c)·Δ_c.
torch::Tensor fake_quant_uniform(torch::Tensor x, torch::Tensor delta, torch::Tensor zero_point, int64_t levels,
                                 int64_t inner, std::optional<torch::Tensor> scratch) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat, "x: float32 CPU");
  delta = delta.to(torch::kFloat).contiguous().reshape(-1);
  zero_point = zero_point.to(torch::kFloat).contiguous().reshape(-1);
  const int64_t C = delta.numel(), N = x.numel();
  TORCH_CHECK(zero_point.numel() == C && inner >= 1 && N % (C * inner) == 0, "delta/zero_point: one per channel");
  // Per tensor, any dense layout is processed in memory order and the output keeps x's strides (as
  // PyTorch's element-wise ops do); per channel, x is made contiguous.
  if (!(C == 1 && x.is_non_overlapping_and_dense())) x = x.contiguous();
  auto out = output_for(x, scratch);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float* d = delta.data_ptr<float>();
  const float* z = zero_point.data_ptr<float>();
  const float lv = static_cast<float>(levels);
  std::vector<float> lo(C), hi(C);
  for (int64_t c = 0; c < C; ++c) { lo[c] = -z[c]; hi[c] = lv - z[c]; }
  if (C == 1) {
    const float dd = d[0], l = lo[0], h = hi[0];
    at::parallel_for(0, N, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dst[i] = quant_index(src[i], dd, l, h) * dd;
    });
  } else if (inner > 1) {  // runs of `inner` values share one channel
    const int64_t runs = N / inner;
    at::parallel_for(0, runs, std::max<int64_t>(1, (1 << 15) / inner), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t c = r % C;
        const float dd = d[c], l = lo[c], h = hi[c];
        const float* s = src + r * inner;
        float* o = dst + r * inner;
        for (int64_t i = 0; i < inner; ++i) o[i] = quant_index(s[i], dd, l, h) * dd;
      }
    });
  } else {  // channels along the last axis
    const int64_t R = N / C;
    at::parallel_for(0, R, std::max<int64_t>(1, (1 << 15) / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* s = src + r * C;
        float* o = dst + r * C;
        for (int64_t c = 0; c < C; ++c) o[c] = quant_index(s[c], d[c], lo[c], hi[c]) * d[c];
      }
    });
  }
  return out;
}

// Rows read ahead with a software prefetch: the hardware prefetchers follow a strided row walk
// poorly (stage-0 keys of Swin-T, rows of 96 floats every 288 in the qkv output, 6.0 M values:
// 7.5 -> 5.4 ms in bench/kernel_speed.py; contiguous rows unchanged).
constexpr int64_t kRowsAhead = 8;

// Per tensor on rows [R, L] with unit inner stride and any row stride (e.g. q/k/v sliced out of a
// fused qkv projection): the result is a contiguous [R, L] (in `scratch` if given).
torch::Tensor fake_quant_uniform_rows(torch::Tensor x, torch::Tensor delta, torch::Tensor zero_point, int64_t levels,
                                      std::optional<torch::Tensor> scratch) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 2 && x.stride(1) == 1,
              "x: [R, L] float32 CPU with unit inner stride");
  TORCH_CHECK(delta.numel() == 1 && zero_point.numel() == 1, "per tensor only");
  const int64_t R = x.size(0), L = x.size(1), rs = x.stride(0);
  const torch::Tensor out = scratch.has_value() ? scratch_view(*scratch, {R, L}, {L, 1}, R * L)
                                                 : torch::empty({R, L}, torch::kFloat);
  const float d = delta.to(torch::kFloat).item<float>(), z = zero_point.to(torch::kFloat).item<float>();
  const float lo = -z, hi = static_cast<float>(levels) - z;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(L, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* s = src + r * rs;
      float* o = dst + r * L;
      if (r + kRowsAhead < end)
        for (int64_t i = 0; i < L; i += 16) __builtin_prefetch(s + kRowsAhead * rs + i);
      for (int64_t i = 0; i < L; ++i) o[i] = quant_index(s[i], d, lo, hi) * d;
    }
  });
  return out;
}

namespace {

constexpr int64_t kLogBlock = 1 << 15;  // values per step: fallback log2 inputs stay in L2
constexpr int64_t kLogChunk = 64;       // values per vectorized step (a chunk with a flagged value
                                        // sends that value to the fallback)

inline float log_sqrt2_value(float l, const float* table, float top) {
  float c = std::nearbyint(l * -2.0f);
  if (c != c) return c;  // NaN input stays NaN
  c = c < 0.0f ? 0.0f : c;
  c = c > top ? top : c;
  return table[static_cast<int64_t>(c)];
}

// Codes from the bits of t = x / delta. For a positive normal t = f * 2^E (f in [1, 2)),
// -2 log2(t) = -2E - 2 log2(f), so the exact code is -2E - [f > 2^(1/4)] - [f > 2^(3/4)]: it only
// changes where f crosses 2^(1/4) or 2^(3/4), irrational numbers no float equals. PyTorch's float
// log2 rounds (and ties of -2 log2 at k + 1/2 round to even), so near a crossing its code may differ
// from the exact one — measured over every normal binade: up to 37 mantissa steps away. Outside a
// guard of kLogGuard = 256 steps around both crossings the two codes are provably the same (PyTorch's
// log2 would have to be off by several ulps); inside it (about 1e-4 of post-softmax values), and for
// negative, -0, Inf or NaN t (and +0 / subnormal t at 8 bits), the code comes from PyTorch's own log2
// (at::log2_, element-wise, on the gathered values), which defines the codes as in RepQ-ViT's formula.
constexpr int64_t kLogGuard = 256;

inline uint32_t float_bits(float f) {  // std::bit_cast without C++20
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Mantissa thresholds: f > 2^(1/4) <=> mantissa > m1, f > 2^(3/4) <=> mantissa > m2 (outside the guard).
struct LogSqrt2Codes {
  uint32_t m1 = static_cast<uint32_t>((std::pow(2.0, 0.25) - 1.0) * (1 << 23));
  uint32_t m2 = static_cast<uint32_t>((std::pow(2.0, 0.75) - 1.0) * (1 << 23));
};

// Fake-quantized values of src[0..n) into out[0..n); the flagged values' positions and x / delta go
// to (pos, val) for the fallback. Returns how many.
inline int64_t log_sqrt2_from_bits(const float* __restrict src, int64_t n, float delta,
                                   const float* __restrict table, int32_t top, const LogSqrt2Codes& k,
                                   float* __restrict out, int64_t* pos, float* val) {
  const uint32_t m1 = k.m1, m2 = k.m2;
  const uint32_t m1_lo = m1 - kLogGuard, m2_lo = m2 - kLogGuard, span = 2 * kLogGuard + 1;  // guard bands
  // +0 and subnormal t (e = 0: masked attention) have -2 log2(t) >= 252 whatever the log2 rounds to,
  // so their code is the top one wherever that is below 252 (b <= 7); for b = 8 they are flagged.
  const uint32_t e_lo = top < 252 ? 0u : 1u;
  const auto flagged = [=](uint32_t u) {  // exponent >= 255 (also: sign set), e = 0 for b = 8, guard
    const uint32_t e = u >> 23, m = u & 0x7fffffu;
    return static_cast<uint32_t>(e - e_lo >= 255u - e_lo) | static_cast<uint32_t>(m - m1_lo < span) |
           static_cast<uint32_t>(m - m2_lo < span);
  };
  int64_t count = 0;
  for (int64_t s = 0; s < n; s += kLogChunk) {
    const int64_t len = std::min(kLogChunk, n - s);
    const float* __restrict x = src + s;
    float* __restrict o = out + s;
    uint32_t any = 0;
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t u = float_bits(x[i] / delta);
      const int32_t e = static_cast<int32_t>(u >> 23);  // biased exponent; >= 256 if negative
      const uint32_t m = u & 0x7fffffu;
      int32_t code = 2 * (127 - e) - static_cast<int32_t>(m > m1) - static_cast<int32_t>(m > m2);
      code = code < 0 ? 0 : code;
      code = code > top ? top : code;
      o[i] = table[code];
      any |= flagged(u);
    }
    if (any) {
      for (int64_t i = 0; i < len; ++i) {
        const float t = x[i] / delta;
        if (flagged(float_bits(t))) {
          pos[count] = s + i;
          val[count++] = t;
        }
      }
    }
  }
  return count;
}

// For every block of x (in parallel): its fake-quantized values into dst (or, if dst is null, into a
// per-thread block buffer), the flagged ones fixed with PyTorch's log2; then
// fn(block index, start, length, values).
template <typename Fn>
void for_log_sqrt2_blocks(const torch::Tensor& x, float delta, const torch::Tensor& table, float* dst, Fn fn) {
  static const LogSqrt2Codes k;
  const float* src = x.data_ptr<float>();
  const float* tab = table.data_ptr<float>();
  const int32_t top = static_cast<int32_t>(table.numel() - 1);
  const float ftop = static_cast<float>(top);
  const int64_t n = x.numel(), nb = (n + kLogBlock - 1) / kLogBlock;
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    auto fallback = torch::empty({kLogBlock}, torch::kFloat);
    float* val = fallback.data_ptr<float>();
    std::vector<int64_t> pos(kLogBlock);
    std::vector<float> local(dst == nullptr ? kLogBlock : 0);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kLogBlock, len = std::min(n, start + kLogBlock) - start;
      float* o = dst == nullptr ? local.data() : dst + start;
      const int64_t count = log_sqrt2_from_bits(src + start, len, delta, tab, top, k, o, pos.data(), val);
      if (count > 0) {
        auto view = fallback.narrow(0, 0, count);
        at::log2_(view);
        for (int64_t j = 0; j < count; ++j) o[pos[j]] = log_sqrt2_value(val[j], tab, ftop);
      }
      fn(b, start, len, o);
    }
  });
}

void check_log_args(const torch::Tensor& x, const torch::Tensor& delta, const torch::Tensor& table) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 CPU");
  TORCH_CHECK(delta.numel() == 1, "delta: one value (per tensor)");
  TORCH_CHECK(table.scalar_type() == torch::kFloat && table.is_contiguous() && table.dim() == 1 && table.numel() >= 2,
              "table: [2^b + 1] float32");
}

}  // namespace

// table[clamp(rint(-2 log2(x / delta)), 0, 2^b)] for contiguous x.
torch::Tensor log_sqrt2_fake_quant(torch::Tensor x, torch::Tensor delta, torch::Tensor table,
                                   std::optional<torch::Tensor> scratch) {
  check_log_args(x, delta, table);
  auto out = output_for(x, scratch);
  float* dst = out.data_ptr<float>();
  for_log_sqrt2_blocks(x, delta.item<float>(), table, dst, [](int64_t, int64_t, int64_t, const float*) {});
  return out;
}

// sum((table[code] - x)^2) in float64 over fixed blocks (deterministic for any thread count).
double log_sqrt2_sq_err(torch::Tensor x, torch::Tensor delta, torch::Tensor table) {
  check_log_args(x, delta, table);
  const float* xp = x.data_ptr<float>();
  const int64_t nb = (x.numel() + kLogBlock - 1) / kLogBlock;
  std::vector<double> partial(static_cast<size_t>(nb), 0.0);
  for_log_sqrt2_blocks(
      x, delta.item<float>(), table, nullptr,
      [&](int64_t b, int64_t start, int64_t len, const float* q) {
        double total = 0.0;
        for (int64_t s = 0; s < len; s += kBlock) {
          const float* v = xp + start + s;
          const float* c = q + s;
          total = lane_sum_sq(std::min(kBlock, len - s), [&](int64_t i) { return c[i] - v[i]; }, total);
        }
        partial[b] = total;
      });
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

namespace {

struct Compacted { int64_t above, below, eq_hi, eq_lo; };

// One pass over v[0..n): the values > hi into up[] and < lo into down[] (in input order; each
// buffer needs n + 1 slots), and the counts equal to hi / lo. Branch-free (every value is stored,
// the cursor only advances for a hit): post-ReLU input puts half the values on a threshold, where
// a branch would mispredict.
inline Compacted compact_tails(const float* v, int64_t n, float hi, float lo, float* up, float* down) {
  Compacted c{0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    const float e = v[i];
    up[c.above] = e;
    c.above += e > hi;
    c.eq_hi += e == hi;
    down[c.below] = e;
    c.below += e < lo;
    c.eq_lo += e == lo;
  }
  return c;
}

}  // namespace

// Both tails of every row of a contiguous [C, M] float32 matrix, exactly: top [C, k_top] (descending)
// and bottom [C, k_bot] (ascending), and ok [C] (false where the sampled threshold was too tight:
// the caller takes those rows' tails with topk). Per row: thresholds from every 32nd value with
// slack, one branch-free compaction pass, then a partial sort of the few values beyond them; values
// equal to a threshold are only counted (post-ReLU rows tie many at it).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> row_tails(torch::Tensor rows, int64_t k_top, int64_t k_bot) {
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kFloat && rows.is_contiguous() && rows.dim() == 2,
              "rows: contiguous [C, M] float32 CPU");
  // (same sample rule as _sample_threshold in functional.py: every 32nd value, 2k/32 + 64 deep)
  const int64_t C = rows.size(0), M = rows.size(1), stride = 32, ns = (M + stride - 1) / stride;
  TORCH_CHECK(k_top >= 0 && k_bot >= 0 && k_top <= M && k_bot <= M, "k out of range");
  auto top = torch::empty({C, k_top}, torch::kFloat), bot = torch::empty({C, k_bot}, torch::kFloat);
  auto ok = torch::ones({C}, torch::kBool);
  const float* x = rows.data_ptr<float>();
  float* tp = top.data_ptr<float>();
  float* bp = bot.data_ptr<float>();
  bool* okp = ok.data_ptr<bool>();
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sample(ns), up(M + 1), down(M + 1);
    for (int64_t r = begin; r < end; ++r) {
      const float* v = x + r * M;
      for (int64_t i = 0; i < ns; ++i) sample[i] = v[i * stride];
      float hi = std::numeric_limits<float>::infinity(), lo = -hi;
      if (k_top) {
        const int64_t ks = std::min<int64_t>(ns, 2 * (k_top / stride) + 64);
        std::nth_element(sample.begin(), sample.begin() + (ks - 1), sample.end(), std::greater<float>());
        hi = sample[ks - 1];
      }
      if (k_bot) {
        const int64_t ks = std::min<int64_t>(ns, 2 * (k_bot / stride) + 64);
        std::nth_element(sample.begin(), sample.begin() + (ks - 1), sample.end());
        lo = sample[ks - 1];
      }
      const Compacted t = compact_tails(v, M, hi, lo, up.data(), down.data());
      const int64_t na = t.above, nd = t.below;
      if ((k_top && na + t.eq_hi < k_top) || (k_bot && nd + t.eq_lo < k_bot)) {
        okp[r] = false;
        continue;
      }
      auto finish = [](std::vector<float>& vals, int64_t n, int64_t k, float thr, float* out, bool largest) {
        const int64_t m = std::min(n, k);
        if (largest)
          std::partial_sort(vals.begin(), vals.begin() + m, vals.begin() + n, std::greater<float>());
        else
          std::partial_sort(vals.begin(), vals.begin() + m, vals.begin() + n);
        std::copy(vals.begin(), vals.begin() + m, out);
        std::fill(out + m, out + k, thr);
      };
      if (k_top) finish(up, na, k_top, hi, tp + r * k_top, true);
      if (k_bot) finish(down, nd, k_bot, lo, bp + r * k_bot, false);
    }
  });
  return std::make_tuple(top, bot, ok);
}

// One pass over a contiguous float32 vector: the values strictly above hi and strictly below lo
// (in input order) and how many equal hi / lo. Both tails of a quantile search at once.
std::tuple<torch::Tensor, int64_t, torch::Tensor, int64_t> tails_beyond(torch::Tensor flat, double hi, double lo) {
  TORCH_CHECK(flat.device().is_cpu() && flat.scalar_type() == torch::kFloat && flat.is_contiguous() && flat.dim() == 1,
              "flat: contiguous 1-D float32 CPU");
  const float h = static_cast<float>(hi), l = static_cast<float>(lo);
  const float* x = flat.data_ptr<float>();
  const int64_t n = flat.numel(), block = 1 << 16, nb = std::max<int64_t>(1, (n + block - 1) / block);
  std::vector<std::vector<float>> above(nb), below(nb);
  std::vector<int64_t> eq_hi(nb, 0), eq_lo(nb, 0);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> up(block + 1), down(block + 1);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * block;
      const Compacted t = compact_tails(x + start, std::min(n, start + block) - start, h, l, up.data(), down.data());
      above[b].assign(up.begin(), up.begin() + t.above);
      below[b].assign(down.begin(), down.begin() + t.below);
      eq_hi[b] = t.eq_hi;
      eq_lo[b] = t.eq_lo;
    }
  });
  auto gather = [&](const std::vector<std::vector<float>>& parts) {
    int64_t total = 0;
    for (const auto& p : parts) total += static_cast<int64_t>(p.size());
    auto out = torch::empty({total}, torch::kFloat);
    float* o = out.data_ptr<float>();
    for (const auto& p : parts) o = std::copy(p.begin(), p.end(), o);
    return out;
  };
  int64_t nh = 0, nl = 0;
  for (int64_t b = 0; b < nb; ++b) { nh += eq_hi[b]; nl += eq_lo[b]; }
  return std::make_tuple(gather(above), nh, gather(below), nl);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform_sq_err", &uniform_sq_err, "per-row sum of squared uniform fake-quant error for P candidates");
  m.def("fake_quant_uniform", &fake_quant_uniform, "uniform fake-quant, per tensor or per channel");
  m.def("row_tails", &row_tails, "exact top/bottom tails of every row, one compaction pass per row");
  m.def("tails_beyond", &tails_beyond, "values beyond two thresholds and the counts equal to them, one pass");
  m.def("fake_quant_uniform_rows", &fake_quant_uniform_rows, "per-tensor uniform fake-quant of strided rows");
  m.def("log_sqrt2_fake_quant", &log_sqrt2_fake_quant, "log-sqrt2 fake-quant (codes from PyTorch's log2)");
  m.def("log_sqrt2_sq_err", &log_sqrt2_sq_err, "sum of squared log-sqrt2 fake-quant error");
}
