// XLA FFI custom calls through Intel MKL's GEMMs (bfloat16 x bfloat16 -> float32, float32 x float32
// -> float32): out = op(A) @ op(B) (RadjaxMklGemm), and the same for every (batch, head) matrix of
// 4-D attention operands, read and written in place whether heads come before or after the rows
// (RadjaxMklBatchedGemm), and stride-1 convolutions as GEMMs over shifted rows of the padded input
// (RadjaxMklConv, RadjaxMklConvWeightGrad). radjax/mkl_gemm.py loads MKL (sequential threading
// layer) and passes its GEMMs to radjax_mkl_init. Work is split into one tile per thread of XLA's
// intra-op pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// CBLAS enums and signatures (MKL's LP64 interface: 32-bit integers).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
using GemmFn = void (*)(int, int, int, int, int, int, float, const void*, int, const void*, int,
                        float, float*, int);

GemmFn gemm_bf16 = nullptr, gemm_f32 = nullptr;

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
  for (int i = 1; i < total; ++i) pool.Schedule(decltype(work)(work));
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

}  // namespace

extern "C" void radjax_mkl_init(void* bf16, void* f32) {
  gemm_bf16 = reinterpret_cast<GemmFn>(bf16);
  gemm_f32 = reinterpret_cast<GemmFn>(f32);
}

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

  // Split the output's larger dimension into one tile per thread, in multiples of 64 (finer
  // tiles measured slower: MKL packs the whole other operand for each).
  const bool by_rows = m >= n;
  const int extent = by_rows ? m : n;
  const int threads = PoolThreads(pool);
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

// A 4-D operand as B x H matrices of R x C elements: [B, H, R, C] (heads_first), or [B, R, H, C],
// where matrix (b, h) starts at element b R H C + h C with rows H C apart (no transpose needed).
struct Matrices {
  int64_t batch, heads, rows, cols, ld;
  bool heads_first;
  static Matrices Of(ffi::Span<const int64_t> d, bool heads_first) {
    return heads_first ? Matrices{d[0], d[1], d[2], d[3], d[3], true}
                       : Matrices{d[0], d[2], d[1], d[3], d[2] * d[3], false};
  }
  int64_t Offset(int64_t b, int64_t h) const {
    return heads_first ? (b * heads + h) * rows * cols : b * rows * heads * cols + h * cols;
  }
};

static ffi::Error BatchedGemm(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                              ffi::Result<ffi::Buffer<ffi::F32>> out, bool transpose_a,
                              bool transpose_b, bool a_heads_first, bool b_heads_first,
                              bool out_heads_first) {
  const GemmFn gemm = GemmFor(a.element_type(), b.element_type());
  if (gemm == nullptr) return ffi::Error::InvalidArgument("MKL batched GEMM: two bf16 or two f32 operands, after radjax_mkl_init");
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 || out->dimensions().size() != 4)
    return ffi::Error::InvalidArgument("MKL batched GEMM: 4-D operands and output");
  const Matrices ma = Matrices::Of(a.dimensions(), a_heads_first);
  const Matrices mb = Matrices::Of(b.dimensions(), b_heads_first);
  const Matrices mc = Matrices::Of(out->dimensions(), out_heads_first);
  const int64_t m = transpose_a ? ma.cols : ma.rows, k = transpose_a ? ma.rows : ma.cols;
  const int64_t n = transpose_b ? mb.rows : mb.cols;
  if ((transpose_b ? mb.cols : mb.rows) != k || ma.batch != mb.batch || ma.heads != mb.heads ||
      mc.batch != ma.batch || mc.heads != ma.heads || mc.rows != m || mc.cols != n)
    return ffi::Error::InvalidArgument("MKL batched GEMM: operand and output shapes do not match");
  const int64_t count = ma.batch * ma.heads;
  if (count == 0 || m == 0 || n == 0) return ffi::Error::Success();
  const int width = ffi::ByteWidth(a.element_type());
  const char* pa = static_cast<const char*>(a.untyped_data());
  const char* pb = static_cast<const char*>(b.untyped_data());
  float* pc = out->typed_data();
  const int ta = transpose_a ? kTrans : kNoTrans, tb = transpose_b ? kTrans : kNoTrans;
  const int threads = PoolThreads(pool);
  const int64_t per_tile = (count + threads - 1) / threads;
  RunTiles(pool, static_cast<int>((count + per_tile - 1) / per_tile), [=](int t) {
    for (int64_t i = t * per_tile; i < std::min(count, (t + 1) * per_tile); ++i) {
      const int64_t bi = i / ma.heads, hi = i % ma.heads;
      float* c = pc + mc.Offset(bi, hi);
      if (k == 0) {  // an empty sum (BLAS would reject the zero leading dimensions)
        for (int64_t r = 0; r < m; ++r) std::fill(c + r * mc.ld, c + r * mc.ld + n, 0.0f);
        continue;
      }
      gemm(kRowMajor, ta, tb, m, n, k, 1.0f, pa + ma.Offset(bi, hi) * width, ma.ld,
           pb + mb.Offset(bi, hi) * width, mb.ld, 0.0f, c, mc.ld);
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
  RunTiles(pool, tiles.total, [=](int t) {
    tiles.ForBlocks(t, block, [=](int64_t r, int rows) {
      for (int64_t i = 0; i < kh; ++i) {
        for (int64_t j = 0; j < kw; ++j) {
          const int64_t tap = flip ? (kh - 1 - i) * kw + (kw - 1 - j) : i * kw + j;
          gemm(kRowMajor, kNoTrans, tb, rows, n, c, 1.0f, px + (r + grid.Shift(i, j)) * c * width,
               c, pw + tap * c * n * width, transpose_w ? c : n, i + j == 0 ? 0.0f : 1.0f,
               po + r * n, n);
        }
      }
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
  RunTiles(pool, tiles.total, [=](int t) {
    float* acc = t == 0 ? po : ps + (t - 1) * size;
    tiles.ForBlocks(t, block, [=](int64_t r, int rows) {
      for (int64_t i = 0; i < kh; ++i) {
        for (int64_t j = 0; j < kw; ++j) {
          gemm(kRowMajor, kTrans, kNoTrans, c, n, rows, 1.0f, px + (r + grid.Shift(i, j)) * c * width,
               c, pg + r * n * width, n, 1.0f, acc + (i * kw + j) * c * n, n);
        }
      }
    });
  });
  for (int t = 1; t < tiles.total; ++t) {
    const float* part = ps + (t - 1) * size;
    for (int64_t e = 0; e < size; ++e) po[e] += part[e];
  }
  return ffi::Error::Success();
}

// What every handler takes: XLA's pool, two operands and a float32 output.
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklBatchedGemm, BatchedGemm,
                              GemmBinding()
                                  .Attr<bool>("a_heads_first")
                                  .Attr<bool>("b_heads_first")
                                  .Attr<bool>("out_heads_first"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklConv, Conv,
                              TwoOperandBinding().Attr<bool>("flip").Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklConvWeightGrad, ConvWeightGrad, TwoOperandBinding());
