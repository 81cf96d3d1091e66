// XLA FFI custom calls through Intel MKL's GEMMs (bfloat16 x bfloat16 -> float32, float32 x float32
// -> float32): out = op(A) @ op(B) (RadjaxMklGemm), the same plus a bias rounded to the operands'
// dtype in cache (RadjaxMklGemmBias), with the erf GELU or its derivative applied there too
// (RadjaxMklGemmBiasGelu, RadjaxMklGemmGeluGrad), stride-1 convolutions as GEMMs over shifted
// rows of the padded input (RadjaxMklConv, RadjaxMklConvWeightGrad), and softmax attention fused
// per (batch, head) (RadjaxMklAttention, RadjaxMklAttentionGrad; its bf16 GEMMs on the AMX tiles
// directly where the CPU has them, AmxGemm); besides, LayerNorm in one pass
// per row each way (RadjaxLayerNorm, RadjaxLayerNormGrad) and training-mode BatchNorm with its
// residual add and ReLU in two passes each way (RadjaxBatchNorm, RadjaxBatchNormGrad).
// radjax/mkl_gemm.py loads MKL (sequential threading layer) and passes its GEMMs to
// radjax_mkl_init. Work is split into tiles run on XLA's intra-op pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define RADJAX_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS enums and signatures (MKL's LP64 interface: 32-bit integers).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using GemmFn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                        float, float*, int);

GemmFn gemm_bf16 = nullptr, gemm_f32 = nullptr;

// MKL's pack API: B packed once for many GEMMs (cblas_*_pack_get_size, _pack, _compute).
constexpr int kPacked = 151, kBMatrix = 162;
using PackSizeFn = size_t (*)(int, int, int, int);
using PackBf16Fn = void (*)(int, int, int, int, int, int, const void*, int, void*);
using PackF32Fn = void (*)(int, int, int, int, int, int, float, const void*, int, void*);
using ComputeBf16Fn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*,
                               int, float, float*, int);
using ComputeF32Fn = void (*)(int, int, int, int, int, int, const void*, int, const void*, int,
                              float, float*, int);
PackSizeFn pack_size_bf16 = nullptr, pack_size_f32 = nullptr;
PackBf16Fn pack_bf16 = nullptr;
PackF32Fn pack_f32 = nullptr;
ComputeBf16Fn compute_bf16 = nullptr;
ComputeF32Fn compute_f32 = nullptr;
bool amx_permitted = false;  // Linux granted this process the AMX tile state (radjax_mkl_init)

// The tiles of one call, claimed by the calling thread and by tasks on XLA's intra-op pool. The
// caller never waits for a tile nobody has claimed (it claims it itself), so no thread blocks on
// work queued behind it; a task that starts after the last tile was claimed does nothing.
struct Tiles {
  int total = 0;
  std::atomic<int> next{0};
  int done = 0;
  std::mutex mu;
  std::condition_variable finished;
};

// Runs run(t) for t in [0, total) on the calling thread and XLA's pool; returns when all are done.
template <typename Run>
void RunTiles(ffi::ThreadPool& pool, int total, Run run) {
  auto tiles = std::make_shared<Tiles>();
  tiles->total = total;
  auto work = [tiles, run]() {
    for (int t; (t = tiles->next.fetch_add(1)) < tiles->total;) {
      run(t);
      std::lock_guard<std::mutex> lock(tiles->mu);
      if (++tiles->done == tiles->total) tiles->finished.notify_all();
    }
  };
  // Helpers beyond the pool's threads would find no tile left.
  const int helpers = std::min<int64_t>(total, std::max<int64_t>(1, pool.num_threads())) - 1;
  for (int i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(tiles->mu);
  tiles->finished.wait(lock, [&] { return tiles->done == tiles->total; });
}

GemmFn GemmFor(ffi::DataType a, ffi::DataType b) {
  if (a != b) return nullptr;
  return a == ffi::DataType::BF16 ? gemm_bf16 : a == ffi::DataType::F32 ? gemm_f32 : nullptr;
}

int PoolThreads(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
}

// out[e] += parts[p * size + e] for p in [0, count), each element summed in that order, the
// elements split over XLA's pool: what tiles that each computed a whole partial result add up.
void AddParts(ffi::ThreadPool& pool, float* out, const float* parts, int count, int64_t size) {
  if (count == 0 || size == 0) return;
  const int64_t per_tile = (size + PoolThreads(pool) - 1) / PoolThreads(pool);
  RunTiles(pool, static_cast<int>((size + per_tile - 1) / per_tile), [=](int t) {
    const int64_t lo = t * per_tile, hi = std::min(size, lo + per_tile);
    for (int p = 0; p < count; ++p) {
      const float* from = parts + p * size;
#pragma omp simd
      for (int64_t e = lo; e < hi; ++e) out[e] += from[e];
    }
  });
}

// f(T{}) with T the C++ type of a bf16 (uint16_t, its bits) or f32 buffer.
template <typename F>
void ForElementType(ffi::DataType type, F f) {
  if (type == ffi::DataType::BF16) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}

// Grows-only per-thread buffers (XLA's pool threads live as long as the process).
float* Scratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[10];
  std::vector<float>& buffer = buffers[slot];
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

uint16_t* ScratchBf16(int slot, size_t count) {
  return reinterpret_cast<uint16_t*>(Scratch(slot, (count + 1) / 2));
}

inline int64_t RoundUp(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// op(B) matrices [K, N] packed by MKL for GEMMs of up to `rows` rows, in this thread's scratch
// slot 2, so that GEMMs which share a B (a convolution's kernel taps, over each block of rows) pack
// it once.
template <typename T>
class PackedBs {
 public:
  // count matrices at b + i * k * n, op(B) = B [K, N] (ldb) or, with transpose_b, B^T of [N, K].
  PackedBs(int count, int transpose_b, int n, int k, const T* b, int ldb, int rows) : n_(n), k_(k) {
    if (count == 0) return;
    constexpr bool bf16 = std::is_same_v<T, uint16_t>;
    bytes_ = (bf16 ? pack_size_bf16 : pack_size_f32)(kBMatrix, rows, n, k);
    bytes_ = (bytes_ + 63) / 64 * 64;
    base_ = reinterpret_cast<char*>(Scratch(2, (count * bytes_ + sizeof(float) - 1) / sizeof(float)));
    for (int i = 0; i < count; ++i) {
      const T* bi = b + static_cast<int64_t>(i) * k * n;
      if constexpr (bf16) {
        pack_bf16(kRowMajor, kBMatrix, transpose_b, rows, n, k, bi, ldb, base_ + i * bytes_);
      } else {
        pack_f32(kRowMajor, kBMatrix, transpose_b, rows, n, k, 1.0f, bi, ldb, base_ + i * bytes_);
      }
    }
  }
  // c [rows, N] = beta c + op(a) @ op(B_i): op(a) = a [rows, K] (lda K), or with transpose_a a^T
  // of a [K, rows] with leading dimension lda.
  void Compute(int64_t i, int rows, const T* a, float beta, float* c, bool transpose_a = false,
               int lda = 0) const {
    const void* packed = base_ + i * bytes_;
    const int ta = transpose_a ? kTrans : kNoTrans;
    lda = lda > 0 ? lda : k_;
    if constexpr (std::is_same_v<T, uint16_t>) {
      compute_bf16(kRowMajor, ta, kPacked, rows, n_, k_, 1.0f, a, lda, packed, n_, beta, c, n_);
    } else {
      compute_f32(kRowMajor, ta, kPacked, rows, n_, k_, a, lda, packed, n_, beta, c, n_);
    }
  }

 private:
  int n_, k_;
  size_t bytes_ = 0;
  char* base_ = nullptr;
};

}  // namespace

extern "C" void radjax_mkl_init(void* bf16, void* f32, void* bf16_pack_size, void* bf16_pack,
                                void* bf16_compute, void* f32_pack_size, void* f32_pack,
                                void* f32_compute) {
  gemm_bf16 = reinterpret_cast<GemmFn>(bf16);
  gemm_f32 = reinterpret_cast<GemmFn>(f32);
  pack_size_bf16 = reinterpret_cast<PackSizeFn>(bf16_pack_size);
  pack_bf16 = reinterpret_cast<PackBf16Fn>(bf16_pack);
  compute_bf16 = reinterpret_cast<ComputeBf16Fn>(bf16_compute);
  pack_size_f32 = reinterpret_cast<PackSizeFn>(f32_pack_size);
  pack_f32 = reinterpret_cast<PackF32Fn>(f32_pack);
  compute_f32 = reinterpret_cast<ComputeF32Fn>(f32_compute);
#ifdef RADJAX_AMX
  // Linux leaves the AMX tile state off until a process asks for it; refused by an older kernel.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
  amx_permitted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
#endif
}

// Whether the fused attention can take AMX tiles here (built for a CPU with them, and granted).
extern "C" int radjax_amx_permitted() { return amx_permitted; }

static ffi::Error Gemm(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                       ffi::Result<ffi::Buffer<ffi::F32>> out, bool transpose_a, bool transpose_b) {
  const GemmFn gemm = GemmFor(a.element_type(), b.element_type());
  if (gemm == nullptr) return ffi::Error::InvalidArgument("MKL GEMM: two bf16 or two f32 operands, after radjax_mkl_init");
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("MKL GEMM: 2-D operands");
  const int m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k) return ffi::Error::InvalidArgument("MKL GEMM: contracting dims differ");
  const int lda = ad[1], ldb = bd[1], width = ffi::ByteWidth(a.element_type());
  const char* pa = static_cast<const char*>(a.untyped_data());
  const char* pb = static_cast<const char*>(b.untyped_data());
  float* pc = out->typed_data();
  const int ta = transpose_a ? kTrans : kNoTrans, tb = transpose_b ? kTrans : kNoTrans;
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum (BLAS would reject the zero leading dimensions)
    std::fill(pc, pc + static_cast<int64_t>(m) * n, 0.0f);
    return ffi::Error::Success();
  }

  const int threads = PoolThreads(pool);
  if (threads > 1 && k >= 2 * std::max(m, n)) {
    // K dominant (a weight gradient x^T g over many rows): each thread sums its own range of K,
    // packing only its share of both operands (split by M or N, each would pack all of the
    // other); then the partial products are added, split over the threads too. RN50 bf16 step
    // +5-9 %; its [12544, 256]^T [12544, 64] alone 386 -> 583 GFLOP/s.
    const int kstep = ((k + threads - 1) / threads + 63) / 64 * 64;
    const int parts = (k + kstep - 1) / kstep;
    const int64_t size_c = static_cast<int64_t>(m) * n;
    float* partial = Scratch(3, (parts - 1) * size_c);
    RunTiles(pool, parts, [=](int t) {
      const int lo = t * kstep, size = std::min(kstep, k - lo);
      const char* pa_t = pa + static_cast<int64_t>(lo) * (transpose_a ? lda : 1) * width;
      const char* pb_t = pb + static_cast<int64_t>(lo) * (transpose_b ? 1 : ldb) * width;
      gemm(kRowMajor, ta, tb, m, n, size, 1.0f, pa_t, lda, pb_t, ldb, 0.0f,
           t == 0 ? pc : partial + (t - 1) * size_c, n);
    });
    AddParts(pool, pc, partial, parts - 1, size_c);
    return ffi::Error::Success();
  }
  // Split the output's larger dimension into one tile per thread, in multiples of 64 (finer
  // tiles measured slower: MKL packs the whole other operand for each).
  const bool by_rows = m >= n;
  const int extent = by_rows ? m : n;
  const int step = std::max(64, ((extent + threads - 1) / threads + 63) / 64 * 64);
  RunTiles(pool, (extent + step - 1) / step, [=](int t) {
    const int lo = t * step, size = std::min(step, extent - lo);
    if (by_rows) {  // rows lo.. of out: rows of op(A)
      const char* pa_t = pa + static_cast<int64_t>(lo) * (transpose_a ? 1 : lda) * width;
      gemm(kRowMajor, ta, tb, size, n, k, 1.0f, pa_t, lda, pb, ldb, 0.0f, pc + static_cast<int64_t>(lo) * n, n);
    } else {  // columns lo.. of out: columns of op(B)
      const char* pb_t = pb + static_cast<int64_t>(lo) * (transpose_b ? ldb : 1) * width;
      gemm(kRowMajor, ta, tb, m, size, k, 1.0f, pa, lda, pb_t, ldb, 0.0f, pc + lo, n);
    }
  });
  return ffi::Error::Success();
}

// Stride-1 2-D convolutions as shifted GEMMs. x is the zero-padded input [B, Hp, Wp, C], read as
// one matrix of B Hp Wp rows: output pixel (y, x) of image b sums, over the kh kw taps (i, j), row
// r + i Wp + j of it times the tap's [C, N] kernel, where r = (b Hp + y) Wp + x. So each tap is
// one GEMM over contiguous rows, no patches built; the output comes on the same wide grid
// [B, Hp, Wp, N], its rows with y >= Ho or x >= Wo garbage for the caller to slice off (those
// within the last kh - 1 rows of x's end are zeros). Rows go in blocks that keep the block's
// output and input in L2 across the taps.
namespace {

int RowBlock(int64_t bytes_per_row) {
  const int64_t rows = (int64_t{1} << 20) / std::max<int64_t>(1, bytes_per_row);
  return static_cast<int>(std::clamp<int64_t>(rows / 16 * 16, 64, 4096));
}

// Rows [0, count) as one tile per pool thread (multiples of 16 rows), each walked in blocks.
struct RowTiles {
  int64_t count, per_tile;
  int total;
  RowTiles(int64_t count, int threads)
      : count(count), per_tile(((count + threads - 1) / threads + 15) / 16 * 16),
        total(static_cast<int>((count + per_tile - 1) / per_tile)) {}
  // body(first_row, rows) for each block of at most `block` rows of tile t.
  template <typename Body>
  void ForBlocks(int t, int block, Body body) const {
    const int64_t end = std::min(count, (t + 1) * per_tile);
    for (int64_t r = t * per_tile; r < end; r += block)
      body(r, static_cast<int>(std::min<int64_t>(block, end - r)));
  }
};

// Column sums [N] accumulated per tile (no locks, no order dependence), then added together.
struct TileSums {
  int count;
  int64_t n;
  std::vector<float> parts;
  TileSums(const RowTiles& tiles, int64_t n)
      : count(tiles.total), n(n), parts(static_cast<size_t>(tiles.total) * n, 0.0f) {}
  float* Of(int t) { return parts.data() + t * n; }
  void AddTo(float* out) const {
    for (int t = 0; t < count; ++t)
      for (int64_t j = 0; j < n; ++j) out[j] += parts[t * n + j];
  }
};

// Rows of x that tap (i, j) starts at, and the rows every tap can read: all but the last shift.
struct WideGrid {
  int64_t rows, wp, last_shift;
  static WideGrid Of(ffi::Span<const int64_t> d, int64_t kh, int64_t kw) {
    return {d[0] * d[1] * d[2], d[2], (kh - 1) * d[2] + (kw - 1)};
  }
  int64_t Shift(int64_t i, int64_t j) const { return i * wp + j; }
  int64_t Computed() const { return std::max<int64_t>(0, rows - last_shift); }
};

}  // namespace

// out [B, Hp, Wp, N] = sum over taps of x's shifted rows times w's tap: w [kh, kw, C, N], or with
// transpose_w [kh, kw, N, C] read transposed; flip takes tap (kh-1-i, kw-1-j) for (i, j). The
// input gradient of a convolution is this with both (the full correlation of the padded cotangent).
static ffi::Error Conv(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                       ffi::Result<ffi::Buffer<ffi::F32>> out, bool flip, bool transpose_w) {
  const GemmFn gemm = GemmFor(x.element_type(), w.element_type());
  if (gemm == nullptr) return ffi::Error::InvalidArgument("MKL convolution: two bf16 or two f32 operands, after radjax_mkl_init");
  const auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || wd.size() != 4 || od.size() != 4) return ffi::Error::InvalidArgument("MKL convolution: 4-D operands and output");
  const int64_t kh = wd[0], kw = wd[1], c = transpose_w ? wd[3] : wd[2], n = transpose_w ? wd[2] : wd[3];
  if (xd[3] != c || od[0] != xd[0] || od[1] != xd[1] || od[2] != xd[2] || od[3] != n)
    return ffi::Error::InvalidArgument("MKL convolution: input, kernel and output shapes do not match");
  const WideGrid grid = WideGrid::Of(xd, kh, kw);
  const int width = ffi::ByteWidth(x.element_type());
  const char* px = static_cast<const char*>(x.untyped_data());
  const char* pw = static_cast<const char*>(w.untyped_data());
  float* po = out->typed_data();
  const int64_t computed = grid.Computed();
  std::fill(po + computed * n, po + grid.rows * n, 0.0f);
  if (computed == 0 || n == 0) return ffi::Error::Success();
  if (c == 0) {
    std::fill(po, po + computed * n, 0.0f);
    return ffi::Error::Success();
  }
  const int tb = transpose_w ? kTrans : kNoTrans;
  const int block = RowBlock(n * 4 + c * width);
  const RowTiles tiles(computed, PoolThreads(pool));
  ForElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* xs = reinterpret_cast<const T*>(px);
    const T* ws = reinterpret_cast<const T*>(pw);
    // Every tap's kernel packed once, on the calling thread, for every tile's GEMMs.
    const PackedBs<T> taps(static_cast<int>(kh * kw), tb, static_cast<int>(n), static_cast<int>(c), ws,
                           transpose_w ? static_cast<int>(c) : static_cast<int>(n), block);
    RunTiles(pool, tiles.total, [=, &tiles, &taps](int t) {
      tiles.ForBlocks(t, block, [&](int64_t r, int rows) {
        for (int64_t i = 0; i < kh; ++i) {
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t tap = flip ? (kh - 1 - i) * kw + (kw - 1 - j) : i * kw + j;
            taps.Compute(tap, rows, xs + (r + grid.Shift(i, j)) * c, i + j == 0 ? 0.0f : 1.0f, po + r * n);
          }
        }
      });
    });
  });
  return ffi::Error::Success();
}

// The kernel gradient [kh, kw, C, O]: for each tap, x's shifted rows transposed times g, the
// cotangent on the same wide grid [B, Hp, Wp, O] with zeros outside the Ho x Wo output. Each
// tile sums its own range of rows; tiles past the first into scratch, added at the end.
static ffi::Error ConvWeightGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g,
                                 ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const GemmFn gemm = GemmFor(x.element_type(), g.element_type());
  if (gemm == nullptr) return ffi::Error::InvalidArgument("MKL convolution kernel gradient: two bf16 or two f32 operands, after radjax_mkl_init");
  const auto xd = x.dimensions(), gd = g.dimensions(), od = out->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || od.size() != 4) return ffi::Error::InvalidArgument("MKL convolution kernel gradient: 4-D operands and output");
  const int64_t kh = od[0], kw = od[1], c = od[2], n = od[3];
  if (xd[3] != c || gd[3] != n || gd[0] != xd[0] || gd[1] != xd[1] || gd[2] != xd[2])
    return ffi::Error::InvalidArgument("MKL convolution kernel gradient: input, cotangent and output shapes do not match");
  const WideGrid grid = WideGrid::Of(xd, kh, kw);
  const int width = ffi::ByteWidth(x.element_type());
  const char* px = static_cast<const char*>(x.untyped_data());
  const char* pg = static_cast<const char*>(g.untyped_data());
  const int64_t size = kh * kw * c * n, computed = grid.Computed();
  float* po = out->typed_data();
  std::fill(po, po + size, 0.0f);
  if (computed == 0 || size == 0) return ffi::Error::Success();
  const int block = RowBlock((c + n) * width);
  const RowTiles tiles(computed, PoolThreads(pool));
  std::vector<float> scratch(static_cast<size_t>(tiles.total - 1) * size, 0.0f);
  float* ps = scratch.data();
  ForElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* xs = reinterpret_cast<const T*>(px);
    const T* gs = reinterpret_cast<const T*>(pg);
    RunTiles(pool, tiles.total, [=, &tiles](int t) {
      float* acc = t == 0 ? po : ps + (t - 1) * size;
      tiles.ForBlocks(t, block, [&](int64_t r, int rows) {
        // The block's cotangent rows are every tap's B: packed once for the kh kw GEMMs.
        const PackedBs<T> g_rows(1, kNoTrans, static_cast<int>(n), rows, gs + r * n, static_cast<int>(n),
                                 static_cast<int>(c));
        for (int64_t i = 0; i < kh; ++i) {
          for (int64_t j = 0; j < kw; ++j) {
            g_rows.Compute(0, static_cast<int>(c), xs + (r + grid.Shift(i, j)) * c, 1.0f,
                           acc + (i * kw + j) * c * n, /*transpose_a=*/true, static_cast<int>(c));
          }
        }
      });
    });
  });
  AddParts(pool, po, ps, tiles.total - 1, size);
  return ffi::Error::Success();
}

// Softmax attention fused per (batch, head): q [B, T, N, H], k and v [B, S, N, H] (bf16 or f32,
// read in place), a mask broadcastable to [B, N, T, S] (true = attend) and causality. For each
// block of query rows, the scaled logits q k^T, their softmax and its product with v stay in this
// thread's scratch (L2) instead of round trips through memory of [B, N, T, S] float32 arrays.
// The forward keeps each row's max and 1 / sum; the backward recomputes the probabilities from
// them with the same operations, as flash attention does. Probabilities and dS are rounded to the operands'
// dtype for the GEMMs that read them, like XLA's path; everything else is float32.
namespace {

inline float FromBf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t ToBf16(float f) {  // round to nearest even (NaN stays NaN, like XLA's convert)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float Load(const float* p, int64_t i) { return p[i]; }
inline float Load(const uint16_t* p, int64_t i) { return FromBf16(p[i]); }
inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = ToBf16(v); }

// exp(x) for x <= 0, within 2 ulp; 0 below float's normal range; NaN stays NaN. Branch-free and
// without libm, so the softmax loops vectorise.
inline float ExpNonPositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + kRound;
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, 4);
  const int32_t n = static_cast<int32_t>(shifted_bits - 0x4B400000u);  // round(x / ln 2)
  const float nf = shifted - kRound;
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // x - n ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(n + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return x < -87.3f ? 0.0f : p * scale;
}

// A mask broadcastable to [B, N, T, S] as element strides (0 along its broadcast dims).
struct Mask {
  const bool* data;
  int64_t b, n, t, s;
  static Mask Of(const bool* data, ffi::Span<const int64_t> d) {
    const int64_t s = d[3] == 1 ? 0 : 1, t = d[2] == 1 ? 0 : d[3];
    const int64_t n = d[1] == 1 ? 0 : d[2] * d[3], b = d[0] == 1 ? 0 : d[1] * d[2] * d[3];
    return {data, b, n, t, s};
  }
};

// What one (batch, head) pair of an attention call reads and writes.
struct AttentionShape {
  int64_t batch, t, s, heads, h;
  bool causal;
  float scale;
  bool amx;  // bf16 GEMMs on AMX tiles (AmxGemm) instead of MKL's
  int64_t Ld() const { return heads * h; }  // q, k, v rows are all heads' wide
  int64_t QOffset(int64_t b, int64_t n) const { return b * t * heads * h + n * h; }
  int64_t KOffset(int64_t b, int64_t n) const { return b * s * heads * h + n * h; }
  int64_t StatsOffset(int64_t b, int64_t n, int64_t row) const { return ((b * heads + n) * t + row) * 2; }
  // Query rows per block: the block's float32 logits within 256 KiB.
  int64_t RowBlock() const { return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(1, s), 16, 1024); }
};

// Logits of query rows [t0, t0 + rows) of (b, n), x [rows, S] (ld floats apart) holding q k^T
// times `multiplier`: scaled by it here and masked, masked entries set to float's lowest (as XLA's
// path does, so a row with no key allowed is uniform). Without a mask, nothing is done here and
// the multiplier is returned for the softmax to apply; else 1.
float ScaleAndMask(const AttentionShape& a, const Mask& mask, int64_t b, int64_t n, int64_t t0,
                   int64_t rows, float multiplier, float* x, int64_t ld) {
  if (!a.causal && mask.b == 0 && mask.n == 0 && mask.t == 0 && mask.s == 0 && mask.data[0])
    return multiplier;
  constexpr float kLowest = -std::numeric_limits<float>::max();
  for (int64_t i = 0; i < rows; ++i) {
    float* row = x + i * ld;
    const int64_t t = t0 + i;
    const bool* m = mask.data + b * mask.b + n * mask.n + t * mask.t;
    if (mask.s != 0) {
#pragma omp simd
      for (int64_t j = 0; j < a.s; ++j) row[j] = m[j] ? row[j] * multiplier : kLowest;
    } else if (!m[0]) {
      std::fill(row, row + a.s, kLowest);
    } else if (multiplier != 1.0f) {
#pragma omp simd
      for (int64_t j = 0; j < a.s; ++j) row[j] *= multiplier;
    }
    if (a.causal)  // key j may attend to query t when j <= t + S - T (jnp.tril's offset)
      std::fill(row + std::clamp<int64_t>(t + a.s - a.t + 1, 0, a.s), row + a.s, kLowest);
  }
  return 1.0f;
}

// The same through MKL: scale q k^T into x [rows, S], then masked.
template <typename T>
void MaskedLogits(GemmFn gemm, const AttentionShape& a, const T* q, const T* k, const Mask& mask,
                  int64_t b, int64_t n, int64_t t0, int64_t rows, float* x) {
  const int64_t ld = a.Ld();
  gemm(kRowMajor, kNoTrans, kTrans, rows, a.s, a.h, a.scale, q + a.QOffset(b, n) + t0 * ld, ld,
       k + a.KOffset(b, n), ld, 0.0f, x, a.s);
  ScaleAndMask(a, mask, b, n, t0, rows, 1.0f, x, a.s);
}

// max(x[0, s)) (float's lowest for none), NaNs skipped. GCC leaves a max reduction scalar even
// under omp simd (and at -mprefer-vector-width=512 also the 16-lane form of it), so AVX-512 gets
// its intrinsics: MAXPS returns its second operand when either is NaN, the running maximum here.
// Logits are scale x.
inline float RowMax(const float* x, int64_t s, float scale) {
  constexpr float kLowest = -std::numeric_limits<float>::max();
#ifdef __AVX512F__
  // Two running maxima, so that consecutive MAXPS do not wait on each other.
  const __m512 factor = _mm512_set1_ps(scale);
  __m512 lanes = _mm512_set1_ps(kLowest), other = lanes;
  int64_t j = 0;
  for (; j + 32 <= s; j += 32) {
    lanes = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), factor), lanes);
    other = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j + 16), factor), other);
  }
  lanes = _mm512_max_ps(other, lanes);
  for (; j + 16 <= s; j += 16) lanes = _mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), factor), lanes);
  if (j < s) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (s - j)) - 1);
    lanes = _mm512_mask_max_ps(lanes, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + j), factor), lanes);
  }
  return _mm512_reduce_max_ps(lanes);
#else
  float max = kLowest;
  for (int64_t j = 0; j < s; ++j) max = x[j] * scale > max ? x[j] * scale : max;
  return max;
#endif
}

#ifdef __AVX512F__
// ExpNonPositive on 16 lanes, the same float operations and results (2^n by VSCALEFPS; GCC
// contracts the scalar form's products and sums into the same FMAs). GCC vectorises the scalar
// form too, but as a fully masked loop with a serial sum at the end.
inline __m512 ExpNonPositive16(__m512 x) {
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __m512 nf = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round), round);
  const __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), p, nf);
}

// The first min(16, count) lanes.
inline __mmask16 FirstLanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}

inline __m512 Load16(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
inline __m512 Load16(const uint16_t* p, __mmask16 lanes) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p)), 16));
}

// Store's rounding on 16 lanes, storing those in `lanes`.
inline void Store16(float* p, __mmask16 lanes, __m512 v) { _mm512_mask_storeu_ps(p, lanes, v); }
inline __m256i Bf16x16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16));
}
// Probabilities (and dS) round with AVX512-BF16's conversion where the CPU has it: the same
// round-to-nearest-even, but it flushes float32 denormals to zero, which only a probability
// below 1.2e-38 is.
inline void Store16(uint16_t* p, __mmask16 lanes, __m512 v) {
#ifdef __AVX512BF16__
  _mm256_mask_storeu_epi16(p, lanes, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
#else
  _mm256_mask_storeu_epi16(p, lanes, Bf16x16(v));
#endif
}
#endif

// p = exp(l - max) / sum for one row of s logits l = scale x, in T; returns (max, 1 / sum) for
// the backward. Scaling here instead of in its own pass over x saves a third of the passes.
template <typename T>
void SoftmaxRow(float* x, int64_t s, float scale, T* p, float* stats) {
  const float max = RowMax(x, s, scale);
#ifdef __AVX512F__
  const __m512 lane_max = _mm512_set1_ps(max), factor = _mm512_set1_ps(scale);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t j = 0; j < s; j += 16) {
    const __mmask16 lanes = FirstLanes(s - j);
    const __m512 logits = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + j), factor);
    const __m512 e = ExpNonPositive16(_mm512_sub_ps(logits, lane_max));
    _mm512_mask_storeu_ps(x + j, lanes, e);  // in place of the logit
    sums = _mm512_mask_add_ps(sums, lanes, sums, e);
  }
  const float inv_sum = 1.0f / _mm512_reduce_add_ps(sums);
  const __m512 lane_inv_sum = _mm512_set1_ps(inv_sum);
  for (int64_t j = 0; j < s; j += 16) {
    const __mmask16 lanes = FirstLanes(s - j);
    Store16(p + j, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + j), lane_inv_sum));
  }
#else
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < s; ++j) {
    x[j] = ExpNonPositive(x[j] * scale - max);  // in place of the logit
    sum += x[j];
  }
  const float inv_sum = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < s; ++j) Store(p, j, x[j] * inv_sum);
#endif
  stats[0] = max;
  stats[1] = inv_sum;
}

// The forward's probabilities again, from its (max, 1 / sum): the same float operations.
template <typename T>
void ProbabilitiesRow(const float* x, int64_t s, float scale, const float* stats, T* p) {
  const float max = stats[0], inv_sum = stats[1];
#ifdef __AVX512F__
  const __m512 lane_max = _mm512_set1_ps(max), lane_inv_sum = _mm512_set1_ps(inv_sum);
  const __m512 factor = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < s; j += 16) {
    const __mmask16 lanes = FirstLanes(s - j);
    const __m512 logits = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + j), factor);
    const __m512 e = ExpNonPositive16(_mm512_sub_ps(logits, lane_max));
    Store16(p + j, lanes, _mm512_mul_ps(e, lane_inv_sum));
  }
#else
#pragma omp simd
  for (int64_t j = 0; j < s; ++j) Store(p, j, ExpNonPositive(x[j] * scale - max) * inv_sum);
#endif
}

// dS = p (dp - delta) for one row of s scores, in place of p (T), delta = sum(dO o) over the
// row's h outputs.
template <typename T>
void ScoresGradRow(const T* do_row, const T* o_row, int64_t h, const float* dp, int64_t s, T* p) {
  float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
  for (int64_t j = 0; j < h; ++j) delta += Load(do_row, j) * Load(o_row, j);
#ifdef __AVX512F__
  const __m512 lane_delta = _mm512_set1_ps(delta);
  for (int64_t j = 0; j < s; j += 16) {
    const __mmask16 lanes = FirstLanes(s - j);
    Store16(p + j, lanes, _mm512_mul_ps(Load16(p + j, lanes), _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + j), lane_delta)));
  }
#else
#pragma omp simd
  for (int64_t j = 0; j < s; ++j) Store(p, j, Load(p, j) * (dp[j] - delta));
#endif
}

// rows x cols float32 (dense) -> T rows ld apart.
template <typename T>
void StoreRows(const float* from, int64_t rows, int64_t cols, T* to, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) Store(to + i * ld, j, from[i * cols + j]);
  }
}

template <typename T>
void AttentionPair(GemmFn gemm, const AttentionShape& a, const T* q, const T* k, const T* v,
                   const Mask& mask, int64_t b, int64_t n, T* o, float* stats) {
  const int64_t ld = a.Ld(), block = a.RowBlock();
  float* x = Scratch(0, block * a.s);
  T* p = reinterpret_cast<T*>(Scratch(1, block * a.s));
  float* out = Scratch(2, block * a.h);
  for (int64_t t0 = 0; t0 < a.t; t0 += block) {
    const int64_t rows = std::min(block, a.t - t0);
    MaskedLogits(gemm, a, q, k, mask, b, n, t0, rows, x);
    for (int64_t i = 0; i < rows; ++i)
      SoftmaxRow(x + i * a.s, a.s, 1.0f, p + i * a.s, stats + a.StatsOffset(b, n, t0 + i));
    gemm(kRowMajor, kNoTrans, kNoTrans, rows, a.h, a.s, 1.0f, p, a.s, v + a.KOffset(b, n), ld, 0.0f,
         out, a.h);
    StoreRows(out, rows, a.h, o + a.QOffset(b, n) + t0 * ld, ld);
  }
}

template <typename T>
void AttentionGradPair(GemmFn gemm, const AttentionShape& a, const T* q, const T* k, const T* v,
                       const Mask& mask, const T* o, const float* stats, const T* d_o, int64_t b,
                       int64_t n, T* dq, T* dk, T* dv) {
  const int64_t ld = a.Ld(), block = a.RowBlock();
  float* x = Scratch(0, block * a.s);
  T* p = reinterpret_cast<T*>(Scratch(1, block * a.s));  // then dS
  float* out = Scratch(2, std::max(block, a.s) * a.h);
  float* dkv = Scratch(3, 2 * a.s * a.h);  // dk, dv accumulated over the row blocks
  float *dk_acc = dkv, *dv_acc = dkv + a.s * a.h;
  const int64_t qo = a.QOffset(b, n), ko = a.KOffset(b, n);
  for (int64_t t0 = 0; t0 < a.t; t0 += block) {
    const int64_t rows = std::min(block, a.t - t0);
    const float beta = t0 == 0 ? 0.0f : 1.0f;
    // The block's rows of o, read after four GEMMs for dS: fetched now, they arrive meanwhile.
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < a.h * int64_t{sizeof(T)}; j += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(o + qo + (t0 + i) * ld) + j);
    MaskedLogits(gemm, a, q, k, mask, b, n, t0, rows, x);
    for (int64_t i = 0; i < rows; ++i)
      ProbabilitiesRow(x + i * a.s, a.s, 1.0f, stats + a.StatsOffset(b, n, t0 + i), p + i * a.s);
    // dv += p^T do; dp = do v^T (into x); dS = p (dp - rowsum(do o)).
    gemm(kRowMajor, kTrans, kNoTrans, a.s, a.h, rows, 1.0f, p, a.s, d_o + qo + t0 * ld, ld, beta,
         dv_acc, a.h);
    gemm(kRowMajor, kNoTrans, kTrans, rows, a.s, a.h, 1.0f, d_o + qo + t0 * ld, ld, v + ko, ld, 0.0f,
         x, a.s);
    for (int64_t i = 0; i < rows; ++i)
      ScoresGradRow(d_o + qo + (t0 + i) * ld, o + qo + (t0 + i) * ld, a.h, x + i * a.s, a.s, p + i * a.s);
    // dq = scale dS k; dk += scale dS^T q.
    gemm(kRowMajor, kNoTrans, kNoTrans, rows, a.h, a.s, a.scale, p, a.s, k + ko, ld, 0.0f, out, a.h);
    StoreRows(out, rows, a.h, dq + qo + t0 * ld, ld);
    gemm(kRowMajor, kTrans, kNoTrans, a.s, a.h, rows, a.scale, p, a.s, q + qo + t0 * ld, ld, beta,
         dk_acc, a.h);
  }
  StoreRows(dk_acc, a.s, a.h, dk + ko, ld);
  StoreRows(dv_acc, a.s, a.h, dv + ko, ld);
}

// AMX tiles for the attention's bf16 GEMMs. Per (batch, head) of a ViT-B/16 these are [197, 64]
// by [64, 197] and back: MKL spends longer packing such small operands than multiplying them.
// Here q, dO and the probabilities are read in place (or copied once, contiguous), k and v are
// packed once per (batch, head), and the products land in the scratch the softmax reads.
#ifdef RADJAX_AMX

// All eight tiles 16 rows x 64 bytes: a [16, 32] bf16 operand or a [16, 16] float32 accumulator.
// Loaded per (batch, head): MKL's own AMX kernels configure the tiles their way on the same threads.
void ConfigureTiles() {
  alignas(64) uint8_t config[64] = {};
  config[0] = 1;  // palette 1
  for (int tile = 0; tile < 8; ++tile) {
    config[16 + 2 * tile] = 64;  // bytes per row
    config[48 + tile] = 16;      // rows
  }
  _tile_loadconfig(config);
}

using Bf16Pair = uint32_t __attribute__((may_alias));  // two adjacent bf16, read as one

// r[i][j] = r[j][i] for 16 vectors of 16 32-bit lanes.
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// out[c * ld_out + r] = in[r * ld_in + c] for a 16 x 16 block of bf16 pairs; rows of `in` from
// `rows` on read as zeros.
void TransposeBlock(const Bf16Pair* in, int64_t ld_in, int64_t rows, Bf16Pair* out, int64_t ld_out) {
  __m512i r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_si512(in + i * ld_in) : _mm512_setzero_si512();
  Transpose16x16(r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ld_out, r[i]);
}

// AmxGemm's B operands, packed: B [K, N] (K a multiple of 32, N of 16) in blocks of 16 columns,
// each [K / 2, 16, 2] (rows 2i and 2i + 1 interleaved, as TDPBF16PS reads them), one after another.

// B = x^T for x [rows, depth] (rows ld apart, ld even, depth a multiple of 32): N = rows rounded
// up to 16, zeros past rows.
void PackTransposed(const uint16_t* x, int64_t rows, int64_t ld, int64_t depth, uint16_t* out) {
  const int64_t pairs = depth / 2;
  const Bf16Pair* in = reinterpret_cast<const Bf16Pair*>(x);
  Bf16Pair* packed = reinterpret_cast<Bf16Pair*>(out);
  for (int64_t j = 0; j * 16 < rows; ++j)
    for (int64_t i = 0; i < pairs; i += 16)
      TransposeBlock(in + j * 8 * ld + i, ld / 2, rows - j * 16, packed + (j * pairs + i) * 16, 16);
}

alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                  8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// Columns [j, j + 16) of x's rows 2i and 2i + 1 (zeros from row `rows` on), interleaved.
inline __m512i RowPair(const uint16_t* x, int64_t rows, int64_t ld, int64_t i, int64_t j) {
  const auto row = [&](int64_t r) {
    return r < rows ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * ld + j)) : _mm256_setzero_si256();
  };
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(row(2 * i)), row(2 * i + 1), 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both);
}

// B = x for x [rows, cols] (rows ld apart, cols a multiple of 16): K = depth (a multiple of 32,
// at least rows), zeros past rows.
void PackRowPairs(const uint16_t* x, int64_t rows, int64_t ld, int64_t cols, int64_t depth,
                  uint16_t* out) {
  const int64_t pairs = depth / 2;
  for (int64_t i = 0; i < pairs; ++i)
    for (int64_t j = 0; j < cols; j += 16)
      _mm512_storeu_si512(out + ((j / 16) * pairs + i) * 32, RowPair(x, rows, ld, i, j));
}

// An A operand x^T [cols, depth] for x [rows, cols] (rows ld apart, cols a multiple of 16, depth
// of 32), zero columns past rows: row pairs interleaved, then transposed 16 x 16 pairs at a time.
void TransposeRows(const uint16_t* x, int64_t rows, int64_t ld, int64_t cols, int64_t depth,
                   uint16_t* out) {
  const int64_t pairs = depth / 2;
  Bf16Pair* transposed = reinterpret_cast<Bf16Pair*>(out);
  __m512i r[16];
  for (int64_t i0 = 0; i0 < pairs; i0 += 16) {
    for (int64_t j = 0; j < cols; j += 16) {
      for (int i = 0; i < 16; ++i) r[i] = RowPair(x, rows, ld, i0 + i, j);
      Transpose16x16(r);
      for (int c = 0; c < 16; ++c) _mm512_storeu_si512(transposed + (j + c) * pairs + i0, r[c]);
    }
  }
}

// An A operand [rows_out, cols]: x's rows (ld apart) copied contiguous, zero rows past rows.
void CopyRows(const uint16_t* x, int64_t rows, int64_t ld, int64_t cols, int64_t rows_out, uint16_t* out) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * cols, x + r * ld, cols * sizeof(uint16_t));
  std::fill(out + rows * cols, out + rows_out * cols, 0);
}

// StoreRows for bf16 rows of a multiple of 32: whole cache lines, written past the cache where
// aligned. The next op reads them, not this core, and a plain store would first read each line
// of the freshly allocated output in.
void StreamRows(const float* from, int64_t rows, int64_t cols, uint16_t* to, int64_t ld,
                float multiplier = 1.0f) {
  const __m512 factor = _mm512_set1_ps(multiplier);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; j += 32) {
      const float* f = from + i * cols + j;
      const __m256i low = Bf16x16(_mm512_mul_ps(factor, _mm512_loadu_ps(f)));
      const __m256i high = Bf16x16(_mm512_mul_ps(factor, _mm512_loadu_ps(f + 16)));
      const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
      uint16_t* t = to + i * ld + j;
      if (reinterpret_cast<uintptr_t>(t) % 64 == 0) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(t), line);
      } else {
        _mm512_storeu_si512(t, line);
      }
    }
  }
  _mm_sfence();  // the streamed lines visible before the pool reports this work done
}

// One MR x NR block of 16 x 16 tiles of AmxGemm: tiles 0-3 accumulate, 4-5 hold A, 6-7 B, so each
// operand tile loaded serves two products when MR = NR = 2.
template <int MR, int NR>
void AmxBlock(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t b_block, int64_t k_steps,
              float* c, int64_t ldc, bool accumulate) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  float* const c_low = c + 16 * ldc;
  if (accumulate) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NR == 2) _tile_loadd(1, c + 16, c_stride);
    if constexpr (MR == 2) _tile_loadd(2, c_low, c_stride);
    if constexpr (MR == 2 && NR == 2) _tile_loadd(3, c_low + 16, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NR == 2) _tile_zero(1);
    if constexpr (MR == 2) _tile_zero(2);
    if constexpr (MR == 2 && NR == 2) _tile_zero(3);
  }
  for (int64_t kk = 0; kk < k_steps; ++kk) {
    _tile_loadd(4, a + kk * 32, a_stride);
    _tile_loadd(6, b + kk * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR == 2) {
      _tile_loadd(7, b + b_block + kk * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (MR == 2) {
      _tile_loadd(5, a + 16 * lda + kk * 32, a_stride);
      _tile_dpbf16ps(2, 5, 6);
    }
    if constexpr (MR == 2 && NR == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NR == 2) _tile_stored(1, c + 16, c_stride);
  if constexpr (MR == 2) _tile_stored(2, c_low, c_stride);
  if constexpr (MR == 2 && NR == 2) _tile_stored(3, c_low + 16, c_stride);
}

// c [16 mt, 16 nt] (rows ldc floats apart) = a b, or c + a b when accumulating: a [16 mt, 32 k_steps]
// bf16 (rows lda apart), b packed [32 k_steps, 16 nt]. Float32 sums of bf16 products, as MKL's.
void AmxGemm(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t k_steps, int64_t mt,
             int64_t nt, float* c, int64_t ldc, bool accumulate) {
  const int64_t b_block = k_steps * 512;
  for (int64_t i = 0; i < mt; i += 2) {
    const uint16_t* ai = a + i * 16 * lda;
    for (int64_t j = 0; j < nt; j += 2) {
      const uint16_t* bj = b + j * b_block;
      float* cij = c + i * 16 * ldc + j * 16;
      if (i + 1 < mt && j + 1 < nt) {
        AmxBlock<2, 2>(ai, lda, bj, b_block, k_steps, cij, ldc, accumulate);
      } else if (i + 1 < mt) {
        AmxBlock<2, 1>(ai, lda, bj, b_block, k_steps, cij, ldc, accumulate);
      } else if (j + 1 < nt) {
        AmxBlock<1, 2>(ai, lda, bj, b_block, k_steps, cij, ldc, accumulate);
      } else {
        AmxBlock<1, 1>(ai, lda, bj, b_block, k_steps, cij, ldc, accumulate);
      }
    }
  }
}

// AttentionPair on AMX tiles (bf16, H a multiple of 32): logits and outputs padded to multiples
// of 16 rows and keys, the probabilities to 32 keys (zeros), as the tiles take them.
void AmxAttentionPair(const AttentionShape& a, const uint16_t* q, const uint16_t* k,
                      const uint16_t* v, const Mask& mask, int64_t b, int64_t n, uint16_t* o,
                      float* stats) {
  const int64_t ld = a.Ld(), h = a.h, block = RoundUp(a.RowBlock(), 16);
  const int64_t s16 = RoundUp(a.s, 16), s32 = RoundUp(a.s, 32);
  float* x = Scratch(0, block * s16);
  uint16_t* p = ScratchBf16(1, block * s32);
  float* out = Scratch(2, block * h);
  uint16_t* k_packed = ScratchBf16(4, s16 * h);
  uint16_t* v_packed = ScratchBf16(5, s32 * h);
  uint16_t* q_rows = ScratchBf16(6, block * h);
  const int64_t qo = a.QOffset(b, n), ko = a.KOffset(b, n);
  PackTransposed(k + ko, a.s, ld, h, k_packed);
  PackRowPairs(v + ko, a.s, ld, h, s32, v_packed);
  ConfigureTiles();
  for (int64_t t0 = 0; t0 < a.t; t0 += block) {
    const int64_t rows = std::min(block, a.t - t0), rows16 = RoundUp(rows, 16);
    CopyRows(q + qo + t0 * ld, rows, ld, h, rows16, q_rows);
    AmxGemm(q_rows, h, k_packed, h / 32, rows16 / 16, s16 / 16, x, s16, false);
    const float scale = ScaleAndMask(a, mask, b, n, t0, rows, a.scale, x, s16);
    for (int64_t i = 0; i < rows; ++i) {
      SoftmaxRow(x + i * s16, a.s, scale, p + i * s32, stats + a.StatsOffset(b, n, t0 + i));
      std::fill(p + i * s32 + a.s, p + (i + 1) * s32, 0);
    }
    AmxGemm(p, s32, v_packed, s32 / 32, rows16 / 16, h / 16, out, h, false);
    StreamRows(out, rows, h, o + qo + t0 * ld, ld);
  }
  _tile_release();
}

// AttentionGradPair on AMX tiles: dv = p^T dO and dk = dS^T q with p^T and dS^T as A operands,
// dO and q as packed row pairs.
void AmxAttentionGradPair(const AttentionShape& a, const uint16_t* q, const uint16_t* k,
                          const uint16_t* v, const Mask& mask, const uint16_t* o,
                          const float* stats, const uint16_t* d_o, int64_t b, int64_t n,
                          uint16_t* dq, uint16_t* dk, uint16_t* dv) {
  const int64_t ld = a.Ld(), h = a.h, block = RoundUp(a.RowBlock(), 32);
  const int64_t s16 = RoundUp(a.s, 16), s32 = RoundUp(a.s, 32);
  float* x = Scratch(0, block * s16);  // logits, then dp
  uint16_t* p = ScratchBf16(1, block * s32);  // then dS
  float* out = Scratch(2, block * h);
  float* dkv = Scratch(3, 2 * s16 * h);  // dk, dv accumulated over the row blocks
  float *dk_acc = dkv, *dv_acc = dkv + s16 * h;
  uint16_t* k_transposed = ScratchBf16(4, s16 * h);
  uint16_t* v_transposed = ScratchBf16(5, s16 * h);
  uint16_t* k_pairs = ScratchBf16(6, s32 * h);
  uint16_t* rows_copy = ScratchBf16(7, block * h);  // q's or dO's rows, contiguous
  uint16_t* p_transposed = ScratchBf16(8, s16 * block);  // p^T, then dS^T
  uint16_t* rows_pairs = ScratchBf16(9, block * h);  // dO's, then q's, row pairs
  const int64_t qo = a.QOffset(b, n), ko = a.KOffset(b, n);
  PackTransposed(k + ko, a.s, ld, h, k_transposed);
  PackTransposed(v + ko, a.s, ld, h, v_transposed);
  PackRowPairs(k + ko, a.s, ld, h, s32, k_pairs);
  ConfigureTiles();
  for (int64_t t0 = 0; t0 < a.t; t0 += block) {
    const int64_t rows = std::min(block, a.t - t0), rows16 = RoundUp(rows, 16), rows32 = RoundUp(rows, 32);
    const bool accumulate = t0 > 0;
    const uint16_t *q_block = q + qo + t0 * ld, *do_block = d_o + qo + t0 * ld;
    CopyRows(q_block, rows, ld, h, rows16, rows_copy);
    AmxGemm(rows_copy, h, k_transposed, h / 32, rows16 / 16, s16 / 16, x, s16, false);
    const float scale = ScaleAndMask(a, mask, b, n, t0, rows, a.scale, x, s16);
    for (int64_t i = 0; i < rows; ++i) {
      ProbabilitiesRow(x + i * s16, a.s, scale, stats + a.StatsOffset(b, n, t0 + i), p + i * s32);
      std::fill(p + i * s32 + a.s, p + (i + 1) * s32, 0);
    }
    // dv += p^T dO
    TransposeRows(p, rows, s32, s16, rows32, p_transposed);
    PackRowPairs(do_block, rows, ld, h, rows32, rows_pairs);
    AmxGemm(p_transposed, rows32, rows_pairs, rows32 / 32, s16 / 16, h / 16, dv_acc, h, accumulate);
    // dp = dO v^T (into x); dS = p (dp - rowsum(dO o)), in place of p.
    CopyRows(do_block, rows, ld, h, rows16, rows_copy);
    AmxGemm(rows_copy, h, v_transposed, h / 32, rows16 / 16, s16 / 16, x, s16, false);
    for (int64_t i = 0; i < rows; ++i)
      ScoresGradRow(do_block + i * ld, o + qo + (t0 + i) * ld, h, x + i * s16, a.s, p + i * s32);
    // dq = scale dS k; dk += dS^T q (scaled at the end).
    AmxGemm(p, s32, k_pairs, s32 / 32, rows16 / 16, h / 16, out, h, false);
    StreamRows(out, rows, h, dq + qo + t0 * ld, ld, a.scale);
    TransposeRows(p, rows, s32, s16, rows32, p_transposed);
    PackRowPairs(q_block, rows, ld, h, rows32, rows_pairs);
    AmxGemm(p_transposed, rows32, rows_pairs, rows32 / 32, s16 / 16, h / 16, dk_acc, h, accumulate);
  }
  _tile_release();
  StreamRows(dk_acc, a.s, h, dk + ko, ld, a.scale);
  StreamRows(dv_acc, a.s, h, dv + ko, ld);
}
#endif  // RADJAX_AMX

// The (batch, head) pairs [0, pairs) spread over the pool; body(b, n) for each.
template <typename Body>
void ForPairs(ffi::ThreadPool& pool, const AttentionShape& a, Body body) {
  const int64_t pairs = a.batch * a.heads;
  RunTiles(pool, static_cast<int>(pairs), [=](int i) { body(i / a.heads, i % a.heads); });
}

ffi::Error CheckAttention(const char* what, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                          ffi::Span<const int64_t> mask, bool causal, float scale, bool amx,
                          AttentionShape* shape) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (GemmFor(q.element_type(), k.element_type()) == nullptr || v.element_type() != q.element_type())
    return ffi::Error::InvalidArgument(std::string(what) + ": q, k, v all bf16 or all f32, after radjax_mkl_init");
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || mask.size() != 4)
    return ffi::Error::InvalidArgument(std::string(what) + ": 4-D q, k, v and mask");
  bool fits = kd[0] == qd[0] && kd[2] == qd[2] && kd[3] == qd[3] && std::equal(kd.begin(), kd.end(), vd.begin());
  const int64_t target[4] = {qd[0], qd[2], qd[1], kd[1]};
  for (int i = 0; i < 4; ++i) fits = fits && (mask[i] == 1 || mask[i] == target[i]);
  if (!fits) return ffi::Error::InvalidArgument(std::string(what) + ": q [B, T, N, H], k and v [B, S, N, H], mask broadcastable to [B, N, T, S]");
  if (qd[1] == 0 || kd[1] == 0 || qd[3] == 0)
    return ffi::Error::InvalidArgument(std::string(what) + ": no queries, keys or head dims");
  *shape = {qd[0], qd[1], kd[1], qd[2], qd[3], causal, scale,
            amx && amx_permitted && q.element_type() == ffi::DataType::BF16 && qd[3] % 32 == 0};
  return ffi::Error::Success();
}

template <typename T>
const T* In(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }

template <typename T>
T* Out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

}  // namespace

// o [B, T, N, H] in q's dtype and stats [B, N, T, 2] float32: each query row's max logit and
// 1 / sum of exponentials, for AttentionGrad.
static ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                           ffi::AnyBuffer v, ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> o,
                           ffi::Result<ffi::Buffer<ffi::F32>> stats, bool causal, float scale,
                           bool amx) {
  AttentionShape a;
  if (auto e = CheckAttention("MKL attention", q, k, v, mask.dimensions(), causal, scale, amx, &a); e.failure()) return e;
  const GemmFn gemm = GemmFor(q.element_type(), k.element_type());
  const Mask m = Mask::Of(mask.typed_data(), mask.dimensions());
  float* st = stats->typed_data();
#ifdef RADJAX_AMX
  if (a.amx) {
    const uint16_t *pq = In<uint16_t>(q), *pk = In<uint16_t>(k), *pv = In<uint16_t>(v);
    uint16_t* po = Out<uint16_t>(o);
    ForPairs(pool, a, [=](int64_t b, int64_t n) { AmxAttentionPair(a, pq, pk, pv, m, b, n, po, st); });
    return ffi::Error::Success();
  }
#endif
  ForElementType(q.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *pq = In<T>(q), *pk = In<T>(k), *pv = In<T>(v);
    T* po = Out<T>(o);
    ForPairs(pool, a, [=](int64_t b, int64_t n) { AttentionPair(gemm, a, pq, pk, pv, m, b, n, po, st); });
  });
  return ffi::Error::Success();
}

// dq, dk, dv of Attention, given its inputs, its output o and stats, and the cotangent d_o.
static ffi::Error AttentionGrad(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                               ffi::AnyBuffer v, ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer o,
                               ffi::Buffer<ffi::F32> stats, ffi::AnyBuffer d_o,
                               ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                               ffi::Result<ffi::AnyBuffer> dv, bool causal, float scale, bool amx) {
  AttentionShape a;
  if (auto e = CheckAttention("MKL attention gradient", q, k, v, mask.dimensions(), causal, scale, amx, &a); e.failure()) return e;
  if (o.element_type() != q.element_type() || d_o.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("MKL attention gradient: o and its cotangent in q's dtype");
  const GemmFn gemm = GemmFor(q.element_type(), k.element_type());
  const Mask m = Mask::Of(mask.typed_data(), mask.dimensions());
  const float* st = stats.typed_data();
#ifdef RADJAX_AMX
  if (a.amx) {
    const uint16_t *pq = In<uint16_t>(q), *pk = In<uint16_t>(k), *pv = In<uint16_t>(v);
    const uint16_t *po = In<uint16_t>(o), *pdo = In<uint16_t>(d_o);
    uint16_t *pdq = Out<uint16_t>(dq), *pdk = Out<uint16_t>(dk), *pdv = Out<uint16_t>(dv);
    ForPairs(pool, a, [=](int64_t b, int64_t n) {
      AmxAttentionGradPair(a, pq, pk, pv, m, po, st, pdo, b, n, pdq, pdk, pdv);
    });
    return ffi::Error::Success();
  }
#endif
  ForElementType(q.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *pq = In<T>(q), *pk = In<T>(k), *pv = In<T>(v), *po = In<T>(o), *pdo = In<T>(d_o);
    T *pdq = Out<T>(dq), *pdk = Out<T>(dk), *pdv = Out<T>(dv);
    ForPairs(pool, a, [=](int64_t b, int64_t n) {
      AttentionGradPair(gemm, a, pq, pk, pv, m, po, st, pdo, b, n, pdq, pdk, pdv);
    });
  });
  return ffi::Error::Success();
}

// GEMMs whose float32 product is finished in cache: a [M, K] @ op(b), b [K, N] (or [N, K] with
// transpose_b). Rows split into one tile per thread; each thread packs B once (MKL's pack API) and
// computes its rows in blocks whose float32 product stays in its scratch, where the handler
// finishes it (bias, rounding, GELU or its derivative), so only results in the operands' dtype
// reach memory (RadjaxMklGemm's float32 output is twice the bytes, and XLA's fusions read it back).
namespace {

constexpr int64_t kBiasRowBlock = 256;

// The shapes of a row-blocked GEMM, checked against its outputs' [M, N].
struct RowGemm {
  int m, n, k, transpose_b, ldb;
};

ffi::Error CheckRowGemm(const std::string& what, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                        bool transpose_b, std::initializer_list<const ffi::AnyBuffer*> outputs,
                        RowGemm* g) {
  const ffi::DataType type = a.element_type();
  if (GemmFor(type, b.element_type()) == nullptr || pack_bf16 == nullptr)
    return ffi::Error::InvalidArgument(what + ": a and b both bf16 or both f32, after radjax_mkl_init");
  const auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument(what + ": 2-D a and b");
  const int64_t m = ad[0], k = ad[1], n = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != k) return ffi::Error::InvalidArgument(what + ": contracting dims differ");
  for (const ffi::AnyBuffer* o : outputs) {
    const auto od = o->dimensions();
    if (o->element_type() != type || od.size() != 2 || od[0] != m || od[1] != n)
      return ffi::Error::InvalidArgument(what + ": [M, N] arrays in a's dtype expected");
  }
  *g = {static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
        transpose_b ? kTrans : kNoTrans, static_cast<int>(bd[1])};
  return ffi::Error::Success();
}

// A vector of n elements (a bias or its gradient); ``expected`` names it and its dim.
ffi::Error CheckVector(const std::string& what, const char* expected, ffi::Span<const int64_t> dims,
                       int64_t n) {
  if (dims.size() == 1 && dims[0] == n) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(what + ": " + expected + " expected");
}

// For each block of the rows of tile t: finish(t, first_row, rows, c), c [rows, N] the block's
// float32 product in this thread's scratch.
template <typename T, typename Finish>
void ForProductBlocks(ffi::ThreadPool& pool, const RowTiles& tiles, const RowGemm& g, const T* a,
                      const T* b, Finish finish) {
  // op(B) packed once, on the calling thread, for every tile.
  const PackedBs<T> packed(g.k > 0 ? 1 : 0, g.transpose_b, g.n, g.k, b, g.ldb, kBiasRowBlock);
  RunTiles(pool, tiles.total, [=, &tiles, &packed](int t) {
    float* c = Scratch(0, kBiasRowBlock * g.n);
    tiles.ForBlocks(t, kBiasRowBlock, [&](int64_t r, int rows) {
      if (g.k == 0) {
        std::fill(c, c + static_cast<int64_t>(rows) * g.n, 0.0f);
      } else {
        packed.Compute(0, rows, a + r * g.k, 0.0f, c);
      }
      finish(t, r, rows, c);
    });
  });
}

// v rounded to T and back (bf16's rounding; float32's is none).
inline float Rounded(float v, float) { return v; }
inline float Rounded(float v, uint16_t) { return FromBf16(ToBf16(v)); }

// The erf GELU, 0.5 h (1 + erf(h / sqrt 2)), and its derivative, 0.5 (1 + erf(h / sqrt 2)) +
// h exp(-h^2 / 2) / sqrt(2 pi), from one exponential: 1 + erf(h / sqrt 2) is erfc(|h| / sqrt 2)
// for h < 0 and 2 minus it otherwise, and erfc(x) = P(1 / (1 + p x)) exp(-x^2) with Abramowitz
// and Stegun's 7.1.26 polynomial (absolute error under 1.5e-7), so the negative tail comes
// without cancellation. Branch-free: the loops calling these vectorise.
//
// 1 + erf(h / sqrt 2), given gauss = exp(-h^2 / 2).
inline float TwiceNormalCdf(float h, float gauss) {
  const float t = 1.0f / (1.0f + 0.3275911f * 0.70710678118654752f * std::fabs(h));
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float tail = p * t * gauss;  // erfc(|h| / sqrt 2)
  return h < 0.0f ? tail : 2.0f - tail;
}

inline float Gelu(float h) { return 0.5f * h * TwiceNormalCdf(h, ExpNonPositive(-0.5f * h * h)); }

inline float GeluSlope(float h) {
  const float gauss = ExpNonPositive(-0.5f * h * h);
  return 0.5f * TwiceNormalCdf(h, gauss) + h * gauss * 0.39894228040143268f;  // 1 / sqrt(2 pi)
}

}  // namespace

// out = a @ op(b) + bias, rounded to a's dtype; bias [N] float32.
static ffi::Error GemmBias(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> out,
                           bool transpose_b) {
  RowGemm g;
  if (auto e = CheckRowGemm("MKL GEMM + bias", a, b, transpose_b, {&*out}, &g); e.failure()) return e;
  if (auto e = CheckVector("MKL GEMM + bias", "bias [N]", bias.dimensions(), g.n); e.failure()) return e;
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  const float* pbias = bias.typed_data();
  const RowTiles tiles(g.m, PoolThreads(pool));
  ForElementType(a.element_type(), [&](auto zero) {
    using T = decltype(zero);
    T* po = Out<T>(out);
    ForProductBlocks(pool, tiles, g, In<T>(a), In<T>(b), [=](int, int64_t r, int rows, const float* c) {
      for (int64_t i = 0; i < rows; ++i) {
        T* row = po + (r + i) * g.n;
        const float* from = c + i * g.n;
#pragma omp simd
        for (int64_t j = 0; j < g.n; ++j) Store(row, j, from[j] + pbias[j]);
      }
    });
  });
  return ffi::Error::Success();
}

// A dense layer and its erf GELU: pre = a @ op(b) + bias rounded to a's dtype, and out = GELU(pre)
// (of the rounded pre, as XLA's path computes it), rounded too. pre is what the backward takes.
static ffi::Error GemmBiasGelu(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                               ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::AnyBuffer> pre, bool transpose_b) {
  RowGemm g;
  if (auto e = CheckRowGemm("MKL GEMM + bias + GELU", a, b, transpose_b, {&*out, &*pre}, &g); e.failure()) return e;
  if (auto e = CheckVector("MKL GEMM + bias + GELU", "bias [N]", bias.dimensions(), g.n); e.failure()) return e;
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  const float* pbias = bias.typed_data();
  const RowTiles tiles(g.m, PoolThreads(pool));
  ForElementType(a.element_type(), [&](auto zero) {
    using T = decltype(zero);
    T *po = Out<T>(out), *ppre = Out<T>(pre);
    ForProductBlocks(pool, tiles, g, In<T>(a), In<T>(b), [=](int, int64_t r, int rows, const float* c) {
      for (int64_t i = 0; i < rows; ++i) {
        T *row = po + (r + i) * g.n, *pre_row = ppre + (r + i) * g.n;
        const float* from = c + i * g.n;
#pragma omp simd
        for (int64_t j = 0; j < g.n; ++j) {
          const float h = Rounded(from[j] + pbias[j], T{});
          Store(pre_row, j, h);
          Store(row, j, Gelu(h));
        }
      }
    });
  });
  return ffi::Error::Success();
}

// The backward of GemmBiasGelu's GELU, from the cotangent of the next layer's input: out =
// (a @ op(b)) * GELU'(pre), rounded to a's dtype, and dbias [N] float32, out's column sums before
// rounding (the bias gradient of the layer that made pre).
static ffi::Error GemmGeluGrad(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                               ffi::AnyBuffer pre, ffi::Result<ffi::AnyBuffer> out,
                               ffi::Result<ffi::Buffer<ffi::F32>> dbias, bool transpose_b) {
  RowGemm g;
  if (auto e = CheckRowGemm("MKL GEMM x GELU'", a, b, transpose_b, {&pre, &*out}, &g); e.failure()) return e;
  if (auto e = CheckVector("MKL GEMM x GELU'", "dbias [N]", dbias->dimensions(), g.n); e.failure()) return e;
  float* pdbias = dbias->typed_data();
  std::fill(pdbias, pdbias + g.n, 0.0f);
  if (g.m == 0 || g.n == 0) return ffi::Error::Success();
  const RowTiles tiles(g.m, PoolThreads(pool));
  TileSums sums(tiles, g.n);
  ForElementType(a.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* ppre = In<T>(pre);
    T* po = Out<T>(out);
    ForProductBlocks(pool, tiles, g, In<T>(a), In<T>(b), [=, &sums](int t, int64_t r, int rows, const float* c) {
      float* tile_sums = sums.Of(t);
      for (int64_t i = 0; i < rows; ++i) {
        T* row = po + (r + i) * g.n;
        const T* pre_row = ppre + (r + i) * g.n;
        const float* from = c + i * g.n;
#pragma omp simd
        for (int64_t j = 0; j < g.n; ++j) {
          const float h = Load(pre_row, j);
          const float d = from[j] * GeluSlope(h);
          tile_sums[j] += d;
          Store(row, j, d);
        }
      }
    });
  });
  sums.AddTo(pdbias);
  return ffi::Error::Success();
}

// LayerNorm over the last dim of x [M, D] (bf16 or f32) with float32 scale and bias [D]: y =
// (x - mean) rstd scale + bias in float32, rounded to y's dtype, and stats [M, 2] = (mean, rstd)
// for the backward. A row's statistics take two passes over it while it sits in L1 (XLA's path
// ran the reductions and the normalisation as separate passes over memory). Rows split over the
// pool's threads; the backward's scale and bias gradients are summed per tile, then added.
namespace {

struct Rows {
  int64_t m, d;
};

ffi::Error CheckLayerNorm(const std::string& what, const ffi::AnyBuffer& x, ffi::Span<const int64_t> scale,
                          ffi::Span<const int64_t> stats, const ffi::AnyBuffer& y, Rows* rows) {
  const auto xd = x.dimensions(), yd = y.dimensions();
  const auto is_float = [](ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::F32; };
  if (!is_float(x.element_type()) || !is_float(y.element_type()))
    return ffi::Error::InvalidArgument(what + ": bf16 or f32 arrays");
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || yd[1] != xd[1] || scale.size() != 1 ||
      scale[0] != xd[1] || stats.size() != 2 || stats[0] != xd[0] || stats[1] != 2)
    return ffi::Error::InvalidArgument(what + ": x and y [M, D], scale [D], stats [M, 2]");
  *rows = {xd[0], xd[1]};
  return ffi::Error::Success();
}

template <typename F>
void ForElementTypes(ffi::DataType a, ffi::DataType b, F f) {
  ForElementType(a, [&](auto x) { ForElementType(b, [&](auto y) { f(x, y); }); });
}

}  // namespace

static ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::AnyBuffer> y,
                            ffi::Result<ffi::Buffer<ffi::F32>> stats, float epsilon) {
  Rows r;
  if (auto e = CheckLayerNorm("LayerNorm", x, scale.dimensions(), stats->dimensions(), *y, &r); e.failure()) return e;
  if (auto e = CheckVector("LayerNorm", "bias [D]", bias.dimensions(), r.d); e.failure()) return e;
  if (r.m == 0) return ffi::Error::Success();
  const float *pscale = scale.typed_data(), *pbias = bias.typed_data();
  float* pstats = stats->typed_data();
  const RowTiles tiles(r.m, PoolThreads(pool));
  ForElementTypes(x.element_type(), y->element_type(), [&](auto x_zero, auto y_zero) {
    using X = decltype(x_zero);
    using Y = decltype(y_zero);
    const X* px = In<X>(x);
    Y* py = Out<Y>(y);
    RunTiles(pool, tiles.total, [=, &tiles](int t) {
      tiles.ForBlocks(t, 1, [=](int64_t i, int) {
        const X* row = px + i * r.d;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < r.d; ++j) sum += Load(row, j);
        const float mean = r.d > 0 ? sum / r.d : 0.0f;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t j = 0; j < r.d; ++j) {
          const float centred = Load(row, j) - mean;
          squares += centred * centred;
        }
        const float rstd = 1.0f / std::sqrt((r.d > 0 ? squares / r.d : 0.0f) + epsilon);
        Y* out = py + i * r.d;
#pragma omp simd
        for (int64_t j = 0; j < r.d; ++j) Store(out, j, (Load(row, j) - mean) * rstd * pscale[j] + pbias[j]);
        pstats[2 * i] = mean;
        pstats[2 * i + 1] = rstd;
      });
    });
  });
  return ffi::Error::Success();
}

// dx (x's dtype), dscale and dbias (float32 [D]) of LayerNorm for the cotangent dy of y (y's
// dtype), from x, scale and LayerNorm's stats.
static ffi::Error LayerNormGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> stats, ffi::AnyBuffer dy,
                                ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                                ffi::Result<ffi::Buffer<ffi::F32>> dbias) {
  Rows r;
  if (auto e = CheckLayerNorm("LayerNorm gradient", x, scale.dimensions(), stats.dimensions(), dy, &r); e.failure()) return e;
  const auto dxd = dx->dimensions();
  if (dx->element_type() != x.element_type() || dxd.size() != 2 || dxd[0] != r.m || dxd[1] != r.d)
    return ffi::Error::InvalidArgument("LayerNorm gradient: dx like x expected");
  if (auto e = CheckVector("LayerNorm gradient", "dscale [D]", dscale->dimensions(), r.d); e.failure()) return e;
  if (auto e = CheckVector("LayerNorm gradient", "dbias [D]", dbias->dimensions(), r.d); e.failure()) return e;
  float *pdscale = dscale->typed_data(), *pdbias = dbias->typed_data();
  std::fill(pdscale, pdscale + r.d, 0.0f);
  std::fill(pdbias, pdbias + r.d, 0.0f);
  if (r.m == 0) return ffi::Error::Success();
  const float *pscale = scale.typed_data(), *pstats = stats.typed_data();
  const RowTiles tiles(r.m, PoolThreads(pool));
  TileSums scale_sums(tiles, r.d), bias_sums(tiles, r.d);
  ForElementTypes(x.element_type(), dy.element_type(), [&](auto x_zero, auto y_zero) {
    using X = decltype(x_zero);
    using Y = decltype(y_zero);
    const X* px = In<X>(x);
    const Y* pdy = In<Y>(dy);
    X* pdx = Out<X>(dx);
    RunTiles(pool, tiles.total, [=, &tiles, &scale_sums, &bias_sums](int t) {
      float *sums_scale = scale_sums.Of(t), *sums_bias = bias_sums.Of(t);
      tiles.ForBlocks(t, 1, [=](int64_t i, int) {
        const X* row = px + i * r.d;
        const Y* g = pdy + i * r.d;
        const float mean = pstats[2 * i], rstd = pstats[2 * i + 1];
        // dx = rstd (dy scale - mean(dy scale) - x_hat mean(dy scale x_hat)).
        float mean_g = 0.0f, mean_g_xhat = 0.0f;
#pragma omp simd reduction(+ : mean_g, mean_g_xhat)
        for (int64_t j = 0; j < r.d; ++j) {
          const float x_hat = (Load(row, j) - mean) * rstd, dy_j = Load(g, j);
          const float g_j = dy_j * pscale[j];
          mean_g += g_j;
          mean_g_xhat += g_j * x_hat;
          sums_scale[j] += dy_j * x_hat;
          sums_bias[j] += dy_j;
        }
        mean_g /= r.d;
        mean_g_xhat /= r.d;
        X* out = pdx + i * r.d;
#pragma omp simd
        for (int64_t j = 0; j < r.d; ++j) {
          const float x_hat = (Load(row, j) - mean) * rstd;
          Store(out, j, rstd * (Load(g, j) * pscale[j] - mean_g - x_hat * mean_g_xhat));
        }
      });
    });
  });
  scale_sums.AddTo(pdscale);
  bias_sums.AddTo(pdbias);
  return ffi::Error::Success();
}

// BatchNorm in training mode over the rows of x [M, C] (bf16 or f32; C the channels, the rows every
// other axis): per-channel batch mean and variance (E[x^2] - E[x]^2, as flax's fast variance), y
// = (x - mean) rstd scale + bias, optionally plus a residual [M, C] and through a ReLU, rounded
// to y's dtype. One pass over x for the moments, one for y (XLA's path made separate passes for
// the moments, the normalisation, the residual's add and the ReLU, and ran most of them on one
// thread). The moments are summed in float32 over blocks of kMomentRows rows and the blocks in
// float64, so a [50176, 64] map loses nothing to a long float32 running sum.
namespace {

constexpr int kMomentRows = 64;

// Per-channel sums of two quantities over the rows of each tile, in float64, then added together.
struct ChannelSums {
  int64_t c;
  std::vector<double> parts;  // [tiles, 2, C]
  ChannelSums(const RowTiles& tiles, int64_t c) : c(c), parts(static_cast<size_t>(tiles.total) * 2 * c, 0.0) {}
  // body(r, rows, first, second) for each block of tile t: it adds the block's rows into the
  // float32 [C] sums first and second (zeroed), which are then added to the tile's.
  template <typename Body>
  void Accumulate(const RowTiles& tiles, int t, Body body) {
    float* block = Scratch(0, 2 * c);
    double* tile = parts.data() + static_cast<int64_t>(t) * 2 * c;
    tiles.ForBlocks(t, kMomentRows, [&](int64_t r, int rows) {
      std::fill(block, block + 2 * c, 0.0f);
      body(r, rows, block, block + c);
      for (int64_t j = 0; j < 2 * c; ++j) tile[j] += block[j];
    });
  }
  // The totals [2, C]: (first, second) summed over every row.
  std::vector<double> Totals() const {
    std::vector<double> out(2 * c, 0.0);
    for (size_t p = 0; p < parts.size(); ++p) out[p % (2 * c)] += parts[p];
    return out;
  }
};

struct Channels {
  int64_t m, c;
};

// x [M, C] bf16 or f32, the arrays like_x [M, C] in its dtype, the vectors [C], moments [2, C].
ffi::Error CheckBatchNorm(const std::string& what, const ffi::AnyBuffer& x,
                          std::initializer_list<const ffi::AnyBuffer*> like_x,
                          std::initializer_list<ffi::Span<const int64_t>> vectors,
                          ffi::Span<const int64_t> moments, Channels* ch) {
  const auto xd = x.dimensions();
  if ((x.element_type() != ffi::DataType::BF16 && x.element_type() != ffi::DataType::F32) || xd.size() != 2)
    return ffi::Error::InvalidArgument(what + ": x [M, C] bf16 or f32 expected");
  for (const ffi::AnyBuffer* b : like_x) {
    const auto bd = b->dimensions();
    if (b->element_type() != x.element_type() || bd.size() != 2 || bd[0] != xd[0] || bd[1] != xd[1])
      return ffi::Error::InvalidArgument(what + ": [M, C] arrays in x's dtype expected");
  }
  for (const auto& v : vectors)
    if (v.size() != 1 || v[0] != xd[1])
      return ffi::Error::InvalidArgument(what + ": per-channel vectors [C] expected");
  if (moments.size() != 2 || moments[0] != 2 || moments[1] != xd[1])
    return ffi::Error::InvalidArgument(what + ": moments [2, C] expected");
  *ch = {xd[0], xd[1]};
  return ffi::Error::Success();
}

// Whether an optional array is given: [M, C] in x's dtype yes, [0] no; else an error.
ffi::Error Optional(const std::string& what, const char* name, const ffi::AnyBuffer& b,
                    const ffi::AnyBuffer& x, const Channels& ch, bool* given) {
  const auto d = b.dimensions();
  *given = d.size() == 2;
  if ((d.size() == 1 && d[0] == 0) ||
      (*given && d[0] == ch.m && d[1] == ch.c && b.element_type() == x.element_type()))
    return ffi::Error::Success();
  return ffi::Error::InvalidArgument(what + ": " + name + " [M, C] in x's dtype, or [0], expected");
}

}  // namespace

// y [M, C] and moments [2, C] = (batch mean, batch variance) of x; residual [M, C] or [0] (none).
static ffi::Error BatchNorm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::AnyBuffer residual,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> moments,
                            float epsilon, bool relu) {
  const std::string what = "BatchNorm";
  Channels ch;
  if (auto e = CheckBatchNorm(what, x, {&*y}, {scale.dimensions(), bias.dimensions()},
                              moments->dimensions(), &ch); e.failure()) return e;
  bool add_residual;
  if (auto e = Optional(what, "residual", residual, x, ch, &add_residual); e.failure()) return e;
  const int64_t c = ch.c;
  float* pmoments = moments->typed_data();
  if (ch.m == 0) {
    std::fill(pmoments, pmoments + 2 * c, 0.0f);
    return ffi::Error::Success();
  }
  const RowTiles tiles(ch.m, PoolThreads(pool));
  ChannelSums sums(tiles, c);
  std::vector<float> slope(c);
  ForElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* px = In<T>(x);
    RunTiles(pool, tiles.total, [=, &tiles, &sums](int t) {
      sums.Accumulate(tiles, t, [=](int64_t r, int rows, float* sum, float* squares) {
        for (int64_t i = r; i < r + rows; ++i) {
          const T* row = px + i * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float v = Load(row, j);
            sum[j] += v;
            squares[j] += v * v;
          }
        }
      });
    });
    const std::vector<double> totals = sums.Totals();
    const float *pscale = scale.typed_data(), *pbias = bias.typed_data();
    for (int64_t j = 0; j < c; ++j) {
      const double mean = totals[j] / ch.m;
      const double var = std::max(0.0, totals[c + j] / ch.m - mean * mean);
      pmoments[j] = static_cast<float>(mean);
      pmoments[c + j] = static_cast<float>(var);
      slope[j] = pscale[j] / std::sqrt(static_cast<float>(var) + epsilon);
    }
    // (x - mean) a + bias, not x a + (bias - mean a): with a large a (a channel of near-constant
    // x) the latter cancels two large terms.
    const float *a = slope.data(), *b = pbias, *pmean = pmoments;
    const T* pr = add_residual ? In<T>(residual) : nullptr;
    T* py = Out<T>(y);
    RunTiles(pool, tiles.total, [=, &tiles](int t) {
      tiles.ForBlocks(t, 1, [=](int64_t i, int) {
        const T* row = px + i * c;
        T* out = py + i * c;
        if (pr != nullptr) {
          const T* res = pr + i * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float v = (Load(row, j) - pmean[j]) * a[j] + b[j] + Load(res, j);
            Store(out, j, relu ? std::max(v, 0.0f) : v);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float v = (Load(row, j) - pmean[j]) * a[j] + b[j];
            Store(out, j, relu ? std::max(v, 0.0f) : v);
          }
        }
      });
    });
  });
  return ffi::Error::Success();
}

// The backward of BatchNorm for the cotangent dy of its output y: dx (x's dtype), dresidual (the
// cotangent of the residual: dy through the ReLU, in x's dtype; [0] when there was none),
// dscale and dbias [C] float32. x, scale and the moments as BatchNorm took and gave them; y is
// read for the ReLU's mask only (any [M, C] array without ``relu``).
static ffi::Error BatchNormGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                                ffi::Buffer<ffi::F32> moments, ffi::AnyBuffer y, ffi::AnyBuffer dy,
                                ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dresidual,
                                ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                                ffi::Result<ffi::Buffer<ffi::F32>> dbias, float epsilon, bool relu) {
  const std::string what = "BatchNorm gradient";
  Channels ch;
  if (auto e = CheckBatchNorm(what, x, {&y, &dy, &*dx}, {scale.dimensions(), dscale->dimensions(),
                              dbias->dimensions()}, moments.dimensions(), &ch); e.failure()) return e;
  bool to_residual;
  if (auto e = Optional(what, "dresidual", *dresidual, x, ch, &to_residual); e.failure()) return e;
  const int64_t c = ch.c;
  float *pdscale = dscale->typed_data(), *pdbias = dbias->typed_data();
  if (ch.m == 0) {
    std::fill(pdscale, pdscale + c, 0.0f);
    std::fill(pdbias, pdbias + c, 0.0f);
    return ffi::Error::Success();
  }
  const float *pmean = moments.typed_data(), *pvar = pmean + c, *pscale = scale.typed_data();
  std::vector<float> rstd(c), slope(c), centred_slope(c), shift(c);
  for (int64_t j = 0; j < c; ++j) rstd[j] = 1.0f / std::sqrt(pvar[j] + epsilon);
  const RowTiles tiles(ch.m, PoolThreads(pool));
  ChannelSums sums(tiles, c);
  ForElementType(x.element_type(), [&](auto zero) {
    using T = decltype(zero);
    const T *px = In<T>(x), *pg = In<T>(dy), *py = In<T>(y);
    // The cotangent through the ReLU: dy where y > 0.
    const auto through_relu = [relu](float g, float out) { return relu && !(out > 0.0f) ? 0.0f : g; };
    RunTiles(pool, tiles.total, [=, &tiles, &sums](int t) {
      sums.Accumulate(tiles, t, [=](int64_t r, int rows, float* sum_g, float* sum_g_centred) {
        for (int64_t i = r; i < r + rows; ++i) {
          const T *row = px + i * c, *g = pg + i * c, *out = py + i * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float g_j = through_relu(Load(g, j), Load(out, j));
            sum_g[j] += g_j;
            sum_g_centred[j] += g_j * (Load(row, j) - pmean[j]);
          }
        }
      });
    });
    // dx = a (g - mean(g) - x_hat mean(g x_hat)), a = scale rstd, x_hat = (x - mean) rstd.
    const std::vector<double> totals = sums.Totals();
    for (int64_t j = 0; j < c; ++j) {
      pdbias[j] = static_cast<float>(totals[j]);
      pdscale[j] = static_cast<float>(totals[c + j]) * rstd[j];
      slope[j] = pscale[j] * rstd[j];
      centred_slope[j] = -slope[j] * rstd[j] * pdscale[j] / ch.m;
      shift[j] = -slope[j] * pdbias[j] / ch.m;
    }
    const float *a = slope.data(), *b = centred_slope.data(), *d = shift.data();
    T* pdx = Out<T>(dx);
    T* pdr = to_residual ? Out<T>(dresidual) : nullptr;
    RunTiles(pool, tiles.total, [=, &tiles](int t) {
      tiles.ForBlocks(t, 1, [=](int64_t i, int) {
        const T *row = px + i * c, *g = pg + i * c, *out = py + i * c;
        T* to = pdx + i * c;
        if (pdr != nullptr) {
          T* res = pdr + i * c;
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float g_j = through_relu(Load(g, j), Load(out, j));
            Store(res, j, g_j);
            Store(to, j, g_j * a[j] + (Load(row, j) - pmean[j]) * b[j] + d[j]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < c; ++j) {
            const float g_j = through_relu(Load(g, j), Load(out, j));
            Store(to, j, g_j * a[j] + (Load(row, j) - pmean[j]) * b[j] + d[j]);
          }
        }
      });
    });
  });
  return ffi::Error::Success();
}

// What the GEMM and convolution handlers take: XLA's pool, two operands and a float32 output.
static auto TwoOperandBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// The GEMMs' binding: those and whether A and B come transposed.
static auto GemmBinding() {
  return TwoOperandBinding().Attr<bool>("transpose_a").Attr<bool>("transpose_b");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklGemm, Gemm, GemmBinding());

// What the bias GEMMs take first: XLA's pool, a, b and the float32 bias.
static auto BiasGemmInputsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // a
      .Arg<ffi::AnyBuffer>()  // b
      .Arg<ffi::Buffer<ffi::F32>>();  // bias
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklGemmBias, GemmBias,
                              BiasGemmInputsBinding()
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklGemmBiasGelu, GemmBiasGelu,
                              BiasGemmInputsBinding()
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // pre
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklGemmGeluGrad, GemmGeluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::AnyBuffer>()  // pre
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklConv, Conv,
                              TwoOperandBinding().Attr<bool>("flip").Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklConvWeightGrad, ConvWeightGrad, TwoOperandBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // stats
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxLayerNormGrad, LayerNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // stats
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dbias

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxBatchNorm, BatchNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::AnyBuffer>()  // residual, or [0]
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // moments
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxBatchNormGrad, BatchNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // moments
                                  .Arg<ffi::AnyBuffer>()  // y
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dresidual, or [0]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("relu"));

// What both attention handlers take first: XLA's pool, q, k, v and the mask.
static auto AttentionInputsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()  // q
      .Arg<ffi::AnyBuffer>()  // k
      .Arg<ffi::AnyBuffer>()  // v
      .Arg<ffi::Buffer<ffi::PRED>>();  // mask
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklAttention, Attention,
                              AttentionInputsBinding()
                                  .Ret<ffi::AnyBuffer>()  // o
                                  .Ret<ffi::Buffer<ffi::F32>>()  // stats
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<bool>("amx"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklAttentionGrad, AttentionGrad,
                              AttentionInputsBinding()
                                  .Arg<ffi::AnyBuffer>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // stats
                                  .Arg<ffi::AnyBuffer>()  // d_o
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Attr<bool>("amx"));
