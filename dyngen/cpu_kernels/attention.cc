// Fused softmax self-attention for XLA:CPU, forward and backward, behind the XLA FFI.
//
// Why it exists: XLA:CPU runs the attention backward as four separate batched products with the (T, T)
// probability and score-gradient matrices going through memory between them, and reads q, k, v out of the
// qkv projection through layout copies. Here one (batch, head) at a time runs all of its products on tiles that
// stay in the core's caches, reads q, k, v in place from the (..., T, 3, H, Dh) qkv tensor, and writes the
// gradient back in that layout. The products use one register-blocked micro-kernel written with GCC vector
// extensions, so the same source compiles to AVX-512 or AVX2 for the machine that builds it (-march=native).
//
// Shapes (float32, row-major; leading dimensions are batch):
//   forward   qkv (..., T, 3, H, Dh) -> out (..., T, H, Dh), logsumexp (..., H, T)
//   backward  qkv, out, logsumexp, d_out -> d_qkv (..., T, 3, H, Dh)
// The softmax scale is Dh^-1/2, as in every model here.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;     // floats per vector register
constexpr int kTileRows = 14;  // 14 x 2 accumulators + 2 loads + 1 broadcast of 32 zmm registers
#else
constexpr int kLanes = 8;
constexpr int kTileRows = 6;   // 6 x 2 accumulators + 2 loads + 1 broadcast of 16 ymm registers
#endif
constexpr int kTileVectors = 2;
constexpr int kTileCols = kLanes * kTileVectors;
// Query rows per block: the block's scores and their gradient, 2 x rows x T floats, stay within about 2 MiB.
constexpr int64_t kBlockFloats = 1 << 18;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(Vec)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
inline Vec Splat(float x) { return Vec{} + x; }

// exp by 2^n · e^r with |r| <= ln2/2 and Cephes' degree-6 polynomial for e^r (about 2 ulp). Arguments below
// -87.3 give 2^-126 instead of 0, which no softmax here can tell apart; NaN stays NaN.
inline Vec Exp(Vec x) {
  const Vec lo = Splat(-87.33654f), hi = Splat(88.3762626647949f);
  Vec clamped = x < lo ? lo : x;
  clamped = clamped > hi ? hi : clamped;
  const Vec round_magic = Splat(12582912.0f);  // 1.5 · 2^23: adding and subtracting it rounds to nearest
  Vec n = (clamped * 1.44269504088896341f + round_magic) - round_magic;
  Vec r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  IntVec bits;
  std::memcpy(&bits, &p, sizeof(Vec));
  bits += __builtin_convertvector(n, IntVec) << 23;
  Vec result;
  std::memcpy(&result, &bits, sizeof(Vec));
  return x == x ? result : x;
}

// C[R x kTileCols] (= or +=) alpha · sum_k a(r, k) b(k, :), with a(r, k) = a[r·a_row + k·a_col] and
// b(k, j) = b[k·ldb + j]. The accumulators stay in registers for the whole k loop.
template <int R>
void Tile(int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c,
          int64_t ldc, float alpha, bool accumulate) {
  Vec acc[R][kTileVectors];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVectors; ++v) acc[r][v] = Vec{};
  for (int64_t k = 0; k < depth; ++k) {
    Vec bk[kTileVectors];
    for (int v = 0; v < kTileVectors; ++v) bk[v] = Load(b + k * ldb + v * kLanes);
    const float* ak = a + k * a_col;
    for (int r = 0; r < R; ++r) {
      const float ar = ak[r * a_row];
      for (int v = 0; v < kTileVectors; ++v) acc[r][v] += ar * bk[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kTileVectors; ++v) {
      float* out = c + r * ldc + v * kLanes;
      Vec value = acc[r][v] * alpha;
      Store(out, accumulate ? value + Load(out) : value);
    }
}

using TileFn = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, float,
                        bool);

template <int... R>
constexpr auto MakeTileTable(std::integer_sequence<int, R...>) {
  return std::array<TileFn, sizeof...(R)>{&Tile<R + 1>...};
}
// kTileFns[r - 1] computes r rows: the last rows of a matrix whose height is not a multiple of kTileRows.
constexpr auto kTileFns = MakeTileTable(std::make_integer_sequence<int, kTileRows>{});

// Per-thread buffers, kept between calls so that steady-state calls touch no fresh memory.
struct Scratch {
  std::vector<float> queries, keys, values, d_out;  // (T, Dh): one head's rows, packed dense
  std::vector<float> keys_t, values_t;              // (Dh, T): the right-hand sides of q kᵀ and do vᵀ
  std::vector<float> probs, d_probs;    // (rows, T) for one query block
  std::vector<float> edge_b, edge_c;    // a right-hand panel and its result, padded to kTileCols columns
  static Scratch& Get() {
    thread_local Scratch scratch;
    return scratch;
  }
};

void Reserve(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
}

// C (M x N, ldc) (= or +=) alpha · A B with A given by (a_row, a_col) strides (so Aᵀ is free) and B row-major.
void Gemm(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
          int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  Scratch& scratch = Scratch::Get();
  for (int64_t j = 0; j < n; j += kTileCols) {
    const int64_t cols = std::min<int64_t>(kTileCols, n - j);
    const float* panel = b + j;
    int64_t panel_ld = ldb;
    if (cols < kTileCols) {  // the right edge: zero-pad the panel to a whole tile
      Reserve(scratch.edge_b, depth * kTileCols);
      Reserve(scratch.edge_c, kTileRows * kTileCols);
      for (int64_t k = 0; k < depth; ++k) {
        float* row = scratch.edge_b.data() + k * kTileCols;
        std::memcpy(row, b + k * ldb + j, cols * sizeof(float));
        std::fill(row + cols, row + kTileCols, 0.0f);
      }
      panel = scratch.edge_b.data();
      panel_ld = kTileCols;
    }
    for (int64_t i = 0; i < m; i += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i));
      const float* a_block = a + i * a_row;
      if (cols == kTileCols) {
        kTileFns[rows - 1](depth, a_block, a_row, a_col, panel, panel_ld, c + i * ldc + j, ldc, alpha, accumulate);
        continue;
      }
      float* edge = scratch.edge_c.data();
      kTileFns[rows - 1](depth, a_block, a_row, a_col, panel, panel_ld, edge, kTileCols, alpha, false);
      for (int r = 0; r < rows; ++r) {
        float* out = c + (i + r) * ldc + j;
        for (int64_t col = 0; col < cols; ++col)
          out[col] = accumulate ? out[col] + edge[r * kTileCols + col] : edge[r * kTileCols + col];
      }
    }
  }
}

// dst (Dh x T) = the Dh columns of src's T rows (stride ld): the right-hand side of a product with xᵀ.
// A vector of kLanes tokens is gathered per column and stored whole: storing one float per row of dst
// instead hits the same few cache sets (dst's rows are T floats apart) and runs 5x slower.
void PackTransposed(const float* src, int64_t ld, int64_t length, int64_t head_dim, float* dst) {
  const int64_t whole = length - length % kLanes;
  for (int64_t t0 = 0; t0 < whole; t0 += kLanes)
    for (int64_t d = 0; d < head_dim; ++d) {
      Vec column;
      for (int l = 0; l < kLanes; ++l) column[l] = src[(t0 + l) * ld + d];
      Store(dst + d * length + t0, column);
    }
  for (int64_t t = whole; t < length; ++t)
    for (int64_t d = 0; d < head_dim; ++d) dst[d * length + t] = src[t * ld + d];
}

// dst (T x Dh, dense) = src's T rows of Dh (stride ld). The strided rows of one head come from memory with
// little hardware prefetch (each is on its own page stretch); copying them in one pass overlaps those misses,
// which the products' inner loops cannot.
void PackRows(const float* src, int64_t ld, int64_t length, int64_t head_dim, float* dst) {
  for (int64_t t = 0; t < length; ++t) std::memcpy(dst + t * head_dim, src + t * ld, head_dim * sizeof(float));
}

float HorizontalMax(Vec v) {
  float m = v[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
  return m;
}
float HorizontalSum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// row <- softmax(row) in place; returns the row's logsumexp.
float SoftmaxRow(float* row, int64_t length) {
  const int64_t whole = length - length % kLanes;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Vec max_vec = Splat(neg_inf);
  for (int64_t j = 0; j < whole; j += kLanes) {
    Vec x = Load(row + j);
    max_vec = x > max_vec ? x : max_vec;
  }
  float row_max = HorizontalMax(max_vec);
  for (int64_t j = whole; j < length; ++j) row_max = std::max(row_max, row[j]);
  Vec sum_vec = Vec{};
  for (int64_t j = 0; j < whole; j += kLanes) {
    Vec e = Exp(Load(row + j) - row_max);
    Store(row + j, e);
    sum_vec += e;
  }
  float sum = HorizontalSum(sum_vec);
  for (int64_t j = whole; j < length; ++j) {
    row[j] = Exp(Splat(row[j] - row_max))[0];
    sum += row[j];
  }
  const float inv = 1.0f / sum;
  for (int64_t j = 0; j < length; ++j) row[j] *= inv;
  return row_max + std::log(sum);
}

// row <- exp(row - log_sum_exp): the probabilities again, from the saved statistic.
void ExpRow(float* row, int64_t length, float log_sum_exp) {
  const int64_t whole = length - length % kLanes;
  for (int64_t j = 0; j < whole; j += kLanes) Store(row + j, Exp(Load(row + j) - log_sum_exp));
  for (int64_t j = whole; j < length; ++j) row[j] = Exp(Splat(row[j] - log_sum_exp))[0];
}

struct Geometry {
  int64_t batch, length, heads, head_dim;
  int64_t qkv_ld() const { return 3 * heads * head_dim; }  // between tokens in qkv
  int64_t out_ld() const { return heads * head_dim; }      // between tokens in out
  int64_t block_rows() const {
    return std::clamp<int64_t>(kBlockFloats / std::max<int64_t>(length, 1), kTileRows, std::max<int64_t>(length, 1));
  }
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(head_dim)); }
};

ffi::ErrorOr<Geometry> GeometryOf(ffi::Buffer<ffi::F32>::Dimensions dims) {
  if (dims.size() < 4 || dims[dims.size() - 3] != 3)
    return ffi::ErrorOr<Geometry>(ffi::Error::InvalidArgument("cpu attention: qkv must be (..., T, 3, H, Dh)"));
  Geometry g;
  const size_t rank = dims.size();
  g.length = dims[rank - 4];
  g.heads = dims[rank - 2];
  g.head_dim = dims[rank - 1];
  g.batch = 1;
  for (size_t i = 0; i + 4 < rank; ++i) g.batch *= dims[i];
  return g;
}

// Runs body(0 .. n-1) on the caller and on XLA's intra-op threads. The caller also takes work and waits only
// for items that another thread has started, so a busy pool cannot deadlock it; a task that starts after the
// last item finds nothing to do and touches nothing but the shared counters.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  const Body* body_ptr = &body;
  auto work = [state, n, body_ptr] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*body_ptr)(i);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done.load() == n; });
}

// Where one (batch, head) work unit's rows start: in qkv (and d_qkv) its q; k and v follow H * Dh later. In
// out (and d_out) its output rows; in the logsumexp its T statistics.
struct HeadOffsets {
  int64_t qkv, out, log_sum_exp, qkv_part;
  HeadOffsets(const Geometry& g, int64_t unit) {
    const int64_t b = unit / g.heads, h = unit % g.heads;
    qkv = b * g.length * g.qkv_ld() + h * g.head_dim;
    out = b * g.length * g.out_ld() + h * g.head_dim;
    log_sum_exp = unit * g.length;
    qkv_part = g.heads * g.head_dim;
  }
};

void ForwardHead(const Geometry& g, const float* qkv, float* out, float* log_sum_exp, int64_t unit) {
  const int64_t T = g.length, D = g.head_dim, ld = g.qkv_ld(), out_ld = g.out_ld(), rows = g.block_rows();
  const HeadOffsets at(g, unit);
  const float* q = qkv + at.qkv;
  const float* k = q + at.qkv_part;
  const float* v = k + at.qkv_part;
  float* o = out + at.out;
  float* lse = log_sum_exp + at.log_sum_exp;
  Scratch& s = Scratch::Get();
  for (auto* buffer : {&s.queries, &s.keys_t, &s.values}) Reserve(*buffer, T * D);
  Reserve(s.probs, rows * T);
  PackRows(q, ld, T, D, s.queries.data());
  PackTransposed(k, ld, T, D, s.keys_t.data());
  PackRows(v, ld, T, D, s.values.data());
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t m = std::min(rows, T - i0);
    float* p = s.probs.data();
    Gemm(m, T, D, s.queries.data() + i0 * D, D, 1, s.keys_t.data(), T, p, T, g.scale(), false);
    for (int64_t i = 0; i < m; ++i) lse[i0 + i] = SoftmaxRow(p + i * T, T);
    Gemm(m, D, T, p, T, 1, s.values.data(), D, o + i0 * out_ld, out_ld, 1.0f, false);
  }
}

void BackwardHead(const Geometry& g, const float* qkv, const float* out, const float* log_sum_exp,
                  const float* d_out, float* d_qkv, int64_t unit) {
  const int64_t T = g.length, D = g.head_dim, ld = g.qkv_ld(), out_ld = g.out_ld(), rows = g.block_rows();
  const float scale = g.scale();
  const HeadOffsets at(g, unit);
  const float* q = qkv + at.qkv;
  const float* k = q + at.qkv_part;
  const float* v = k + at.qkv_part;
  float* dq = d_qkv + at.qkv;
  float* dk = dq + at.qkv_part;
  float* dv = dk + at.qkv_part;
  const float* o = out + at.out;
  const float* lse = log_sum_exp + at.log_sum_exp;
  Scratch& s = Scratch::Get();
  for (auto* buffer : {&s.queries, &s.keys, &s.keys_t, &s.values_t, &s.d_out}) Reserve(*buffer, T * D);
  Reserve(s.probs, rows * T);
  Reserve(s.d_probs, rows * T);
  const float* qs = s.queries.data();
  const float* ks = s.keys.data();
  const float* d_o = s.d_out.data();
  PackRows(q, ld, T, D, s.queries.data());
  PackRows(k, ld, T, D, s.keys.data());
  PackTransposed(k, ld, T, D, s.keys_t.data());
  PackTransposed(v, ld, T, D, s.values_t.data());
  PackRows(d_out + at.out, out_ld, T, D, s.d_out.data());
  for (int64_t i0 = 0; i0 < T; i0 += rows) {
    const int64_t m = std::min(rows, T - i0);
    const bool accumulate = i0 > 0;  // dk, dv sum over query blocks
    float* p = s.probs.data();
    float* dp = s.d_probs.data();
    Gemm(m, T, D, qs + i0 * D, D, 1, s.keys_t.data(), T, p, T, scale, false);
    for (int64_t i = 0; i < m; ++i) ExpRow(p + i * T, T, lse[i0 + i]);
    // dv (+)= pᵀ do
    Gemm(T, D, m, p, 1, T, d_o + i0 * D, D, dv, ld, 1.0f, accumulate);
    // dp = do vᵀ;  ds = p ⊙ (dp − rowsum(do ⊙ o)) · scale, in place of dp
    Gemm(m, T, D, d_o + i0 * D, D, 1, s.values_t.data(), T, dp, T, 1.0f, false);
    for (int64_t i = 0; i < m; ++i) {
      const float* o_row = o + (i0 + i) * out_ld;
      const float* d_o_row = d_o + (i0 + i) * D;
      float delta = 0.0f;
      for (int64_t d = 0; d < D; ++d) delta += o_row[d] * d_o_row[d];
      float* dp_row = dp + i * T;
      const float* p_row = p + i * T;
      for (int64_t j = 0; j < T; ++j) dp_row[j] = p_row[j] * (dp_row[j] - delta) * scale;
    }
    // dq = ds k;  dk (+)= dsᵀ q
    Gemm(m, D, T, dp, T, 1, ks, D, dq + i0 * ld, ld, 1.0f, false);
    Gemm(T, D, m, dp, 1, T, qs + i0 * D, D, dk, ld, 1.0f, accumulate);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> log_sum_exp) {
  ffi::ErrorOr<Geometry> g = GeometryOf(qkv.dimensions());
  if (g.has_error()) return g.error();
  const float* qkv_data = qkv.typed_data();
  float* out_data = out->typed_data();
  float* lse_data = log_sum_exp->typed_data();
  ParallelFor(pool, g->batch * g->heads,
              [&](int64_t unit) { ForwardHead(*g, qkv_data, out_data, lse_data, unit); });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> log_sum_exp, ffi::Buffer<ffi::F32> d_out,
                    ffi::ResultBuffer<ffi::F32> d_qkv) {
  ffi::ErrorOr<Geometry> g = GeometryOf(qkv.dimensions());
  if (g.has_error()) return g.error();
  const float* qkv_data = qkv.typed_data();
  const float* out_data = out.typed_data();
  const float* lse_data = log_sum_exp.typed_data();
  const float* d_out_data = d_out.typed_data();
  float* d_qkv_data = d_qkv->typed_data();
  ParallelFor(pool, g->batch * g->heads, [&](int64_t unit) {
    BackwardHead(*g, qkv_data, out_data, lse_data, d_out_data, d_qkv_data, unit);
  });
  return ffi::Error::Success();
}

}  // namespace

// The library is built with hidden visibility; only the two handlers are its interface.
#define DYNGEN_EXPORT extern "C" __attribute__((visibility("default")))
DYNGEN_EXPORT XLA_FFI_Error* DyngenAttentionForward(XLA_FFI_CallFrame* call_frame);
DYNGEN_EXPORT XLA_FFI_Error* DyngenAttentionBackward(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DyngenAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DyngenAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
