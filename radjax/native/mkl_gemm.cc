// XLA FFI custom call: out = op(A) @ op(B) in float32, through Intel MKL's GEMMs (bfloat16 x
// bfloat16 -> float32, float32 x float32 -> float32). radjax/mkl_gemm.py loads MKL (sequential
// threading layer) and passes its GEMMs to radjax_mkl_init. The handler splits the output into
// one tile per thread of XLA's intra-op pool and runs them there.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

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

}  // namespace

extern "C" void radjax_mkl_init(void* bf16, void* f32) {
  gemm_bf16 = reinterpret_cast<GemmFn>(bf16);
  gemm_f32 = reinterpret_cast<GemmFn>(f32);
}

static ffi::Error Gemm(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                       ffi::Result<ffi::Buffer<ffi::F32>> out, bool transpose_a, bool transpose_b) {
  if (a.element_type() != b.element_type()) return ffi::Error::InvalidArgument("MKL GEMM: operand dtypes differ");
  const GemmFn gemm = a.element_type() == ffi::DataType::BF16 ? gemm_bf16
                    : a.element_type() == ffi::DataType::F32  ? gemm_f32 : nullptr;
  if (gemm == nullptr) return ffi::Error::InvalidArgument("MKL GEMM: bf16 or f32 operands, after radjax_mkl_init");
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
  const int threads = static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  const int step = std::max(64, ((extent + threads - 1) / threads + 63) / 64 * 64);
  auto tiles = std::make_shared<Tiles>();
  tiles->total = (extent + step - 1) / step;

  auto run_tile = [=](int t) {
    const int lo = t * step, size = std::min(step, extent - lo);
    if (by_rows) {  // rows lo.. of out: rows of op(A)
      const char* pa_t = pa + static_cast<int64_t>(lo) * (transpose_a ? 1 : lda) * width;
      gemm(kRowMajor, ta, tb, size, n, k, 1.0f, pa_t, lda, pb, ldb, 0.0f, pc + static_cast<int64_t>(lo) * n, n);
    } else {  // columns lo.. of out: columns of op(B)
      const char* pb_t = pb + static_cast<int64_t>(lo) * (transpose_b ? ldb : 1) * width;
      gemm(kRowMajor, ta, tb, m, size, k, 1.0f, pa, lda, pb_t, ldb, 0.0f, pc + lo, n);
    }
  };
  auto work = [tiles, run_tile]() {
    for (int t; (t = tiles->next.fetch_add(1)) < tiles->total;) {
      run_tile(t);
      std::lock_guard<std::mutex> lock(tiles->mu);
      if (++tiles->done == tiles->total) tiles->finished.notify_all();
    }
  };
  for (int i = 1; i < tiles->total; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(tiles->mu);
  tiles->finished.wait(lock, [&] { return tiles->done == tiles->total; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(RadjaxMklGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
