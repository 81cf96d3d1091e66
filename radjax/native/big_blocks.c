// Freed big blocks kept for reuse: a thin layer over glibc's malloc that radjax's processes load
// with LD_PRELOAD (radjax/host_malloc.py).
//
// Why: XLA:CPU allocates a step's temporary buffer (1.3 GB for ViT-B/16 CLIP at batch 16) afresh
// for every execution, on one of its worker threads. Such a thread allocates from a glibc arena of
// its own, whose heaps hold at most 64 MiB, so glibc maps the block with mmap and unmaps it when
// it is freed, whatever the tunables say: the kernel faults in and zeroes its pages again each step
// (5 % of the ViT step's CPU time). Here a block of 64 MiB or more is mapped once and, when freed,
// kept for the next request of about its size.
//
// What it keeps: only free blocks that the next request fits (at least its size, at most a quarter
// more); a request that none fits first gives every free block back, so the process never holds
// more than it would with glibc's own blocks, give or take the quarter. A request that comes while
// the block it would reuse is still held (the next step's buffer is allocated a moment before the
// previous step's is freed) waits for it, at most 50 ms, rather than mapping a second block that
// would then stay resident beside the first.
//
// Everything else goes to glibc (__libc_malloc and the rest), which glibc supports: a pointer this
// layer did not map is freed, resized and measured by glibc.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

extern void* __libc_malloc(size_t size);
extern void __libc_free(void* p);
extern void* __libc_calloc(size_t count, size_t size);
extern void* __libc_realloc(void* p, size_t size);
extern void* __libc_memalign(size_t alignment, size_t size);

enum { kSlots = 32 };
static const size_t kBig = (size_t)64 << 20;   // glibc's largest thread-arena heap
static const size_t kGranule = (size_t)2 << 20;  // a huge page
static const size_t kPage = 4096;                // what mmap's addresses are aligned to
static const long kWaitNs = 50 * 1000 * 1000;

// Slot i holds a mapped block when start[i] != 0. start is read without the lock (free's test of
// ownership); everything else is read and written under it.
static _Atomic uintptr_t start[kSlots];
static _Atomic uintptr_t lowest = UINTPTR_MAX, highest;  // bounds of every block mapped so far
static size_t length[kSlots];
static int held[kSlots];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t released = PTHREAD_COND_INITIALIZER;

static int SlotOf(const void* p) {
  const uintptr_t a = (uintptr_t)p;
  if (a < atomic_load_explicit(&lowest, memory_order_relaxed) ||
      a >= atomic_load_explicit(&highest, memory_order_relaxed))
    return -1;
  for (int i = 0; i < kSlots; ++i)
    if (atomic_load_explicit(&start[i], memory_order_acquire) == a) return i;
  return -1;
}

static int Fits(int i, size_t want) { return length[i] >= want && length[i] - want <= want / 4; }

static void* MapBlock(int i, size_t want) {
  void* p = mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  madvise(p, want, MADV_HUGEPAGE);
  const uintptr_t a = (uintptr_t)p;
  uintptr_t low = atomic_load(&lowest), high = atomic_load(&highest);
  while (a < low && !atomic_compare_exchange_weak(&lowest, &low, a)) {}
  while (a + want > high && !atomic_compare_exchange_weak(&highest, &high, a + want)) {}
  length[i] = want;
  held[i] = 1;
  atomic_store_explicit(&start[i], a, memory_order_release);
  return p;
}

// For a request of kBig bytes or more, a block of at least size bytes, page-aligned; else, or
// when it cannot map one, NULL (then glibc serves the request).
static void* BigAlloc(size_t size) {
  if (size < kBig || size > SIZE_MAX - kGranule) return NULL;
  const size_t want = (size + kGranule - 1) / kGranule * kGranule;
  struct timespec deadline;
  clock_gettime(CLOCK_REALTIME, &deadline);
  deadline.tv_nsec += kWaitNs;
  if (deadline.tv_nsec >= 1000000000L) {
    deadline.tv_sec += 1;
    deadline.tv_nsec -= 1000000000L;
  }
  pthread_mutex_lock(&lock);
  int reuse = -1;
  for (;;) {
    int busy = 0;
    for (int i = 0; i < kSlots; ++i) {
      if (!start[i] || !Fits(i, want)) continue;
      if (held[i]) {
        busy = 1;
      } else if (reuse < 0 || length[i] < length[reuse]) {
        reuse = i;
      }
    }
    if (reuse >= 0 || !busy || pthread_cond_timedwait(&released, &lock, &deadline) != 0) break;
  }
  void* p = NULL;
  if (reuse >= 0) {
    held[reuse] = 1;
    p = (void*)start[reuse];
  } else {
    int empty = -1;
    for (int i = 0; i < kSlots; ++i) {
      if (start[i] && !held[i]) {  // free, and too small or too large for this request
        munmap((void*)start[i], length[i]);
        atomic_store_explicit(&start[i], 0, memory_order_release);
      }
      if (!start[i] && empty < 0) empty = i;
    }
    if (empty >= 0) p = MapBlock(empty, want);
  }
  pthread_mutex_unlock(&lock);
  return p;
}

static void Release(int i) {
  pthread_mutex_lock(&lock);
  held[i] = 0;
  pthread_cond_broadcast(&released);
  pthread_mutex_unlock(&lock);
}

static void* AlignedAlloc(size_t alignment, size_t size) {
  void* p = alignment <= kPage ? BigAlloc(size) : NULL;
  return p ? p : __libc_memalign(alignment, size);
}

void* malloc(size_t size) {
  void* p = BigAlloc(size);
  return p ? p : __libc_malloc(size);
}

void free(void* p) {
  const int i = SlotOf(p);
  if (i >= 0) {
    Release(i);
  } else {
    __libc_free(p);
  }
}

void* calloc(size_t count, size_t size) { return __libc_calloc(count, size); }

void* realloc(void* p, size_t size) {
  const int i = SlotOf(p);
  if (i < 0) return __libc_realloc(p, size);
  if (size == 0) {
    Release(i);
    return NULL;
  }
  const size_t have = length[i];  // fixed while the caller holds the block
  if (size <= have && size >= kBig) return p;
  void* q = malloc(size);
  if (q) {
    memcpy(q, p, size < have ? size : have);
    Release(i);
  }
  return q;
}

void* reallocarray(void* p, size_t count, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return realloc(p, total);
}

void* memalign(size_t alignment, size_t size) { return AlignedAlloc(alignment, size); }

void* aligned_alloc(size_t alignment, size_t size) { return AlignedAlloc(alignment, size); }

int posix_memalign(void** out, size_t alignment, size_t size) {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  void* p = AlignedAlloc(alignment, size);
  if (!p && size) return ENOMEM;
  *out = p;
  return 0;
}

size_t malloc_usable_size(void* p) {
  const int i = SlotOf(p);
  if (i >= 0) return length[i];
  static size_t (*glibc_usable_size)(void*);
  if (!glibc_usable_size) glibc_usable_size = (size_t (*)(void*))dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc_usable_size ? glibc_usable_size(p) : 0;
}

// A child forked while another thread held the lock would never see it released.
static void LockForFork(void) { pthread_mutex_lock(&lock); }
static void UnlockAfterFork(void) { pthread_mutex_unlock(&lock); }

__attribute__((constructor)) static void Init(void) {
  pthread_atfork(LockForFork, UnlockAfterFork, UnlockAfterFork);
}

// For tests and `radjax bench`: whether this layer is loaded (found with dlsym).
int radjax_big_blocks_loaded(void) { return 1; }
