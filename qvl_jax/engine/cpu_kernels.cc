// The engine's CPU kernels, XLA FFI handlers (`qvl_jax.engine.cpu_kernel` compiles this file on
// first use and registers them):
// - QvlPagedDecode: decode attention over the paged KV cache, reading each row's blocks where they lie;
// - QvlPagedPrefill: the same for several query tokens a row (a prefill chunk), in tiles (AMX or FMAs);
//   QvlPagedPrefillPacked: for the chunks of several rows packed into one sequence (a mixed step);
// - QvlGemmPacked: a bfloat16 product x . w^T with w packed as the tile unit reads it (AMX, or
//   AVX512_BF16 vectors);
// - QvlTakeRows / QvlPutRows: rows of a table read / written in place (the token embeddings' lookup,
//   the KV pools' writes). XLA:CPU has no bfloat16 gather or scatter of its own: it converts the
//   whole operand to float32 and back around one (docs/performance.md), which for a layer's pools is
//   more than the step's arithmetic. These copy the rows' bytes, whatever the dtype.
//
// QvlPagedDecode: one query token per row: q [r, n, h]; the layer's pools kp, vp [num_blocks * block_size,
// kv, h]; table [r, blocks] (each row's blocks); mask [r, blocks * block_size] (the cache indices
// each row attends to). out [r, n, h]: query head i uses kv head i / (n / kv), as transformers'
// repeat_kv. The same arithmetic as `qvl_jax.modeling.attention.attend` on the gathered window:
// scores and softmax in float32, the probabilities rounded to the activation dtype, the weighted
// sum in float32; only the order of the additions differs. A row with no allowed key (an idle
// row) gets zeros. What XLA's gather-then-attend costs on the CPU, and this instead: the gather
// copies every row's whole window bucket into fresh memory each step; this reads only the allowed
// keys, in place (docs/performance.md).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AMX_TILE__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define QVL_AMX 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && !defined(QVL_AMX)
#define QVL_DPBF16 1  // AVX512_BF16 without AMX (AMD Zen 4 / 5): VDPBF16PS runs the bfloat16 products
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static float load(const float* p) { return *p; }
  static float round(float x) { return x; }
  static void store(float* p, float x) { *p = x; }
};
template <>
struct Elem<uint16_t> {  // bfloat16
  static float load(const uint16_t* p) { return bf16_to_f32(*p); }
  static float round(float x) { return bf16_to_f32(f32_to_bf16(x)); }
  static void store(uint16_t* p, float x) { *p = f32_to_bf16(x); }
};

constexpr int kLanes = 16;

// sum_d a[d] * b[d] in float32: 16 independent partial sums (vectorizable without reassociation).
template <typename T>
inline float dot(const float* a, const T* b, int64_t h) {
  float part[kLanes] = {0};
  int64_t d = 0;
  for (; d + kLanes <= h; d += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * Elem<T>::load(b + d + l);
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  for (; d < h; ++d) s += a[d] * Elem<T>::load(b + d);
  return s;
}

// 1 + the index of the last true entry of mask [0, n) (0: none), scanning back 8 entries at a time.
inline int64_t MaskEnd(const bool* mask, int64_t n) {
  while (n >= 8) {
    uint64_t word;
    std::memcpy(&word, mask + n - 8, 8);
    if (word) break;
    n -= 8;
  }
  while (n > 0 && !mask[n - 1]) --n;
  return n;
}

struct Problem {
  int64_t rows, heads, kv, h, blocks, window, block_size;
  const void *q, *kp, *vp;
  const int32_t* table;
  const bool* mask;
  void* out;
};

// One task: kv heads [k0, k1) of one row, their query heads over the row's allowed keys.
template <typename T>
void Task(const Problem& p, int64_t row, int64_t k0, int64_t k1, std::vector<float>& buf) {
  const int64_t g = p.heads / p.kv, h = p.h, nh = (k1 - k0) * g;  // query heads in this task
  const bool* mask = p.mask + row * p.window;
  const int32_t* table = p.table + row * p.blocks;
  T* out = static_cast<T*>(p.out) + (row * p.heads + k0 * g) * h;
  const int64_t end = MaskEnd(mask, p.window);
  if (end == 0) {
    for (int64_t i = 0; i < nh * h; ++i) Elem<T>::store(out + i, 0.0f);
    return;
  }
  buf.assign(nh * h * 2 + nh * end + 2 * nh, 0.0f);
  float* q = buf.data();
  float* acc = q + nh * h;
  float* scores = acc + nh * h;  // [nh, end]
  float* top = scores + nh * end;
  float* total = top + nh;
  const T* qrow = static_cast<const T*>(p.q) + (row * p.heads + k0 * g) * h;
  for (int64_t i = 0; i < nh * h; ++i) q[i] = Elem<T>::load(qrow + i);
  for (int64_t i = 0; i < nh; ++i) top[i] = -INFINITY;
  const float scale = 1.0f / std::sqrt(static_cast<float>(h));
  const T* kp = static_cast<const T*>(p.kp);
  const T* vp = static_cast<const T*>(p.vp);
  for (int64_t j = 0; j < end; ++j) {
    if (!mask[j]) continue;
    const int64_t slot = static_cast<int64_t>(table[j / p.block_size]) * p.block_size + j % p.block_size;
    const T* key = kp + (slot * p.kv + k0) * h;  // kv heads k0.. of this key, contiguous
    for (int64_t i = 0; i < nh; ++i) {
      const float s = dot(q + i * h, key + (i / g) * h, h) * scale;
      scores[i * end + j] = s;
      top[i] = std::max(top[i], s);
    }
  }
  for (int64_t i = 0; i < nh; ++i)
    for (int64_t j = 0; j < end; ++j) {
      const float e = mask[j] ? std::exp(scores[i * end + j] - top[i]) : 0.0f;
      scores[i * end + j] = e;
      total[i] += e;
    }
  for (int64_t j = 0; j < end; ++j) {
    if (!mask[j]) continue;
    const int64_t slot = static_cast<int64_t>(table[j / p.block_size]) * p.block_size + j % p.block_size;
    const T* value = vp + (slot * p.kv + k0) * h;
    for (int64_t i = 0; i < nh; ++i) {
      const float w = Elem<T>::round(scores[i * end + j] / total[i]);
      float* a = acc + i * h;
      const T* v = value + (i / g) * h;
      for (int64_t d = 0; d < h; ++d) a[d] += w * Elem<T>::load(v + d);
    }
  }
  for (int64_t i = 0; i < nh * h; ++i) Elem<T>::store(out + i, acc[i]);
}

#if defined(__AVX512F__)
// Task in 16-lane vectors, for head_dim 16 * HV (HV 1, 2, 4 or 8; other head dims take Task): the
// scores of 16 keys at a time (each dot's 16 partial sums added as a tree, the 16 trees side by side),
// the softmax in vectors (Exp512 and RoundBf16 below, as the prefill kernel's), the weighted sums of
// values over blocks of 16 keys in registers; each block's keys (and values) prefetched while the
// block before is in use. Keys outside the mask are never read. Per head, the same additions whatever
// the task's kv heads, so a row's answer does not depend on how its heads were split.
inline __m512 LoadLanes(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 LoadLanes(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// exp(x) in float32 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, then
// scaled by 2^n), within about 1 ulp; underflows to 0 below about -104.
inline __m512 Exp512(__m512 x) {
  const __m512 hi = _mm512_set1_ps(88.3762626647949f);
  x = _mm512_min_ps(x, hi);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 mask bytes (bool) as a lane mask.
inline __mmask16 Mask16(const bool* m) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
  return _mm_test_epi8_mask(b, b);
}

// x rounded to bfloat16 (nearest even, as XLA's convert) and back to float32, NaN kept.
inline __m512 RoundBf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

inline void StoreLanes(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void StoreLanes(uint16_t* p, __m512 v) {  // as f32_to_bf16
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(RoundBf16(v)), 16)));
}

// Lane k: the sum of v[k]'s 16 lanes.
inline __m512 SumLanes16(const __m512* v) {
  __m512 w[8], z[4];
  for (int k = 0; k < 8; ++k)  // lanes 0-7: v[2k]'s halves added, 8-15: v[2k+1]'s
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44), _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int m = 0; m < 4; ++m)  // 128-bit block b: 4 partial sums of key 4m + b
    z[m] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0x88), _mm512_shuffle_f32x4(w[2 * m], w[2 * m + 1], 0xDD));
  const __m512 u0 = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x44), _mm512_shuffle_ps(z[0], z[1], 0xEE));
  const __m512 u1 = _mm512_add_ps(_mm512_shuffle_ps(z[2], z[3], 0x44), _mm512_shuffle_ps(z[2], z[3], 0xEE));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x88), _mm512_shuffle_ps(u0, u1, 0xDD));
  // r's lane 4b + e holds key 4e + b
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

template <typename T, int HV>
void TaskVec(const Problem& p, int64_t row, int64_t k0, int64_t k1, std::vector<float>& buf) {
  constexpr int64_t h = HV * 16;
  const int64_t g = p.heads / p.kv, nh = (k1 - k0) * g;
  const bool* mask = p.mask + row * p.window;
  const int32_t* table = p.table + row * p.blocks;
  T* out = static_cast<T*>(p.out) + (row * p.heads + k0 * g) * h;
  const int64_t end = MaskEnd(mask, p.window);
  if (end == 0) {
    for (int64_t i = 0; i < nh * h; i += 16) StoreLanes(out + i, _mm512_setzero_ps());
    return;
  }
  const int64_t ep = (end + 15) / 16 * 16;
  buf.resize(nh * h + nh * ep);
  float* q = buf.data();
  float* scores = q + nh * h;  // [nh, ep]: scaled scores, then the rounded weights
  const T* qrow = static_cast<const T*>(p.q) + (row * p.heads + k0 * g) * h;
  for (int64_t i = 0; i < nh * h; i += 16) _mm512_storeu_ps(q + i, LoadLanes(qrow + i));
  const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(h)));
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  const T* kp = static_cast<const T*>(p.kp);
  const T* vp = static_cast<const T*>(p.vp);
  auto at = [&](const T* pool, int64_t j) {  // key j's kv heads k0.. (contiguous)
    const int64_t slot = static_cast<int64_t>(table[j / p.block_size]) * p.block_size + j % p.block_size;
    return pool + (slot * p.kv + k0) * h;
  };
  const int64_t lines = (k1 - k0) * h * static_cast<int64_t>(sizeof(T)) / 64;  // a key's cache lines here
  auto gather = [&](const T* pool, int64_t j0, const T** ptr) {  // keys [j0, j0 + 16); the next 16 prefetched
    __mmask16 live = 0;
    for (int k = 0; k < 16; ++k) {
      const int64_t j = j0 + k, n = j + 16;
      const bool in = j < end && mask[j];
      live |= static_cast<__mmask16>(in) << k;
      ptr[k] = in ? at(pool, j) : nullptr;
      if (n < end && mask[n]) {
        const char* next = reinterpret_cast<const char*>(at(pool, n));
        for (int64_t l = 0; l < lines; ++l) _mm_prefetch(next + l * 64, _MM_HINT_T0);
      }
    }
    return live;
  };
  for (int64_t j0 = 0; j0 < ep; j0 += 16) {
    const T* key[16];
    const __mmask16 live = gather(kp, j0, key);
    for (int64_t i = 0; i < nh; ++i) {
      __m512 qv[HV], part[16];
      for (int c = 0; c < HV; ++c) qv[c] = _mm512_loadu_ps(q + i * h + c * 16);
      const int64_t off = (i / g) * h;
      for (int k = 0; k < 16; ++k) {
        if (!key[k]) {
          part[k] = _mm512_setzero_ps();
          continue;
        }
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int c = 0; c + 1 < HV; c += 2) {
          a0 = _mm512_fmadd_ps(qv[c], LoadLanes(key[k] + off + c * 16), a0);
          a1 = _mm512_fmadd_ps(qv[c + 1], LoadLanes(key[k] + off + c * 16 + 16), a1);
        }
        if (HV % 2) a0 = _mm512_fmadd_ps(qv[HV - 1], LoadLanes(key[k] + off + (HV - 1) * 16), a0);
        part[k] = _mm512_add_ps(a0, a1);
      }
      const __m512 s = _mm512_mul_ps(SumLanes16(part), scale);
      _mm512_storeu_ps(scores + i * ep + j0, _mm512_mask_mov_ps(ninf, live, s));
    }
  }
  for (int64_t i = 0; i < nh; ++i) {  // softmax over the live keys (the others' scores are -inf: 0)
    float* sc = scores + i * ep;
    __m512 top = ninf;
    for (int64_t j = 0; j < ep; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(sc + j));
    const float t = _mm512_reduce_max_ps(top);
    __m512 tot = _mm512_setzero_ps();
    for (int64_t j = 0; j < ep; j += 16) {
      const __m512 x = _mm512_loadu_ps(sc + j);
      const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, Exp512(_mm512_sub_ps(x, _mm512_set1_ps(t))));
      _mm512_storeu_ps(sc + j, e);
      tot = _mm512_add_ps(tot, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(tot));
    for (int64_t j = 0; j < ep; j += 16) {
      __m512 w = _mm512_div_ps(_mm512_loadu_ps(sc + j), total);
      if (sizeof(T) == 2) w = RoundBf16(w);  // the probabilities in the activation dtype
      _mm512_storeu_ps(sc + j, w);
    }
  }
  float* sums = q;  // q is spent: each head's weighted sum of values, carried over blocks of 16 keys
  for (int64_t i = 0; i < nh * h; i += 16) _mm512_storeu_ps(sums + i, _mm512_setzero_ps());
  for (int64_t j0 = 0; j0 < ep; j0 += 16) {
    const T* value[16];
    gather(vp, j0, value);
    for (int64_t i = 0; i < nh; ++i) {
      const float* w = scores + i * ep + j0;
      const int64_t off = (i / g) * h;
      __m512 acc[HV];
      for (int c = 0; c < HV; ++c) acc[c] = _mm512_loadu_ps(sums + i * h + c * 16);
      for (int k = 0; k < 16; ++k) {
        if (!value[k]) continue;
        const __m512 wk = _mm512_set1_ps(w[k]);
        for (int c = 0; c < HV; ++c) acc[c] = _mm512_fmadd_ps(wk, LoadLanes(value[k] + off + c * 16), acc[c]);
      }
      for (int c = 0; c < HV; ++c) _mm512_storeu_ps(sums + i * h + c * 16, acc[c]);
    }
  }
  for (int64_t i = 0; i < nh * h; i += 16) StoreLanes(out + i, _mm512_loadu_ps(sums + i));
}
#endif

// Runs fn(task) for task in [0, tasks) on this thread and on helpers of XLA's intra-op pool; returns
// when every task is done. A helper that starts late finds no task left, so this never waits on a
// helper that has not begun.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, Fn fn) {
  if (tasks <= 0) return;
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [tasks, shared, fn]() {
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      fn(t);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

template <typename T>
void Run(const Problem& p, ffi::ThreadPool& pool) {
  // Tasks of whole rows read each key's heads as one contiguous run; a few rows are split over kv
  // heads so that every thread has work.
  int64_t split = 1;
  while (p.rows * split < 8 && p.kv % (split * 2) == 0) split *= 2;
  const int64_t per = p.kv / split;
  ParallelFor(pool, p.rows * split, [&p, split, per](int64_t t) {
    thread_local std::vector<float> buf;
    const int64_t row = t / split, k0 = (t % split) * per, k1 = (t % split + 1) * per;
#if defined(__AVX512F__)
    if (p.h == 128) return TaskVec<T, 8>(p, row, k0, k1, buf);
    if (p.h == 64) return TaskVec<T, 4>(p, row, k0, k1, buf);
    if (p.h == 32) return TaskVec<T, 2>(p, row, k0, k1, buf);
    if (p.h == 16) return TaskVec<T, 1>(p, row, k0, k1, buf);
#endif
    Task<T>(p, row, k0, k1, buf);
  });
}

// Runs run(float{}) or run(uint16_t{}) (bfloat16) for an attention handler's q, pools and out, which
// must share one of those dtypes; else an InvalidArgument naming the handler.
template <typename Run>
ffi::Error ForAttentionDtype(const char* name, const ffi::AnyBuffer& q, const ffi::AnyBuffer& kp,
                             const ffi::AnyBuffer& vp, const ffi::AnyBuffer& out, Run run) {
  const auto type = q.element_type();
  if (kp.element_type() != type || vp.element_type() != type || out.element_type() != type)
    return ffi::Error::InvalidArgument(std::string(name) + ": q, the pools and out must share one dtype");
  if (type == ffi::DataType::F32)
    run(float{});
  else if (type == ffi::DataType::BF16)
    run(uint16_t{});
  else
    return ffi::Error::InvalidArgument(std::string(name) + ": float32 or bfloat16 only");
  return ffi::Error::Success();
}

ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                       ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> out,
                       int64_t block_size) {
  auto qd = q.dimensions(), kd = kp.dimensions(), td = table.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || td.size() != 2 || md.size() != 2)
    return ffi::Error::InvalidArgument("qvl_paged_decode: q [r, n, h], pools [slots, kv, h], table [r, blocks], mask [r, window]");
  Problem p{qd[0], qd[1], kd[1], qd[2], td[1], md[1], block_size, q.untyped_data(), kp.untyped_data(),
            vp.untyped_data(), table.typed_data(), mask.typed_data(), out->untyped_data()};
  if (kd[2] != p.h || p.heads % p.kv != 0 || td[0] != p.rows || md[0] != p.rows || p.window > p.blocks * block_size)
    return ffi::Error::InvalidArgument("qvl_paged_decode: shapes do not agree");
  return ForAttentionDtype("qvl_paged_decode", q, kp, vp, *out, [&](auto elem) {
    if (p.rows > 0) Run<decltype(elem)>(p, pool);
  });
}

// Float buffers kept between calls: fresh memory of a chunk's size costs page faults on every call
// (about as much as the attention's arithmetic), so each call takes a kept buffer and gives it back.
class BufferPool {
 public:
  std::unique_ptr<std::vector<float>> Take(size_t n) {
    std::unique_ptr<std::vector<float>> b;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        b = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!b) b = std::make_unique<std::vector<float>>();
    if (b->size() < n) b->resize(n);
    return b;
  }
  void Give(std::unique_ptr<std::vector<float>> b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < 4) free_.push_back(std::move(b));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<std::vector<float>>> free_;
};

BufferPool& Buffers() {
  static BufferPool* pool = new BufferPool();  // never destroyed: helpers may outlive static teardown
  return *pool;
}

// QvlPagedPrefill: several query tokens per row (a prefill chunk; a speculative verify's tokens):
// q [r, t, n, h]; the layer's pools kp, vp [slots, kv, h]; table [r, blocks]; mask [r, t, window]
// (the cache indices each query attends to). out [r, t, n, h], the same arithmetic as PagedDecode
// (scores and softmax in float32, the probabilities rounded to the activation dtype, the weighted
// sum in float32; only the order of the additions differs; the normalisation multiplies by the
// reciprocal of the sum, as XLA computes jax.nn.softmax). A query with no allowed key gets zeros.
//
// Each row's keys and values up to its last allowed index are first read from their blocks: into
// float32 (keys transposed, [kv, h, keys]), or for bfloat16 on AMX or AVX512_BF16 as bfloat16 pairs
// (keys [kv, h/2, keys], values [kv, keys/2, h]: the tile product's layouts, which VDPBF16PS reads as
// vectors of 16 pairs), 16 keys at a time with AVX-512
// (GatherPairs16, GatherFloat16; element by element elsewhere). Then each task, one kv head of a block
// of query tokens, computes its scores (register tiles of 8 queries x 32 keys, or 16 x 16 AMX
// tiles), the softmax over each query's own keys, and the weighted sums (tiles of 6 queries x 64
// values, or AMX tiles). Only keys up to the last one a block's queries may see are computed: XLA's
// attention over a window bucket computes every key of the bucket and materialises the [queries,
// window] scores in float32 several times.
struct Prefill {
  int64_t rows, t, heads, kv, h, blocks, window, block_size, slots;
  const void *q, *kp, *vp;
  const int32_t* table;
  const bool* mask;
  void* out;
  const int64_t* qs;  // [rows + 1]: row r's queries are the flat query tokens [qs[r], qs[r + 1])
};

typedef uint16_t __attribute__((may_alias)) u16a;

constexpr int64_t kQueryBlock = 16;  // query tokens a task
constexpr int64_t kKeyAlign = 32;  // keys gathered and scored in multiples of this: whole 32-key tiles
static_assert(kKeyAlign % 32 == 0, "the AMX weighted sums take whole 32-key tiles of the scored keys");

#if defined(__AVX512F__)
// out[u, 0:64] = sum_{j < e} w[u * ep + j] * v[j * stride, 0:64] for ROWS queries u (out rows h apart).
template <int ROWS>
inline void PvTile(const float* w, int64_t ep, const float* v, int64_t stride, int64_t e, float* out) {
  __m512 c[ROWS][4];
  for (int u = 0; u < ROWS; ++u)
    for (int x = 0; x < 4; ++x) c[u][x] = _mm512_setzero_ps();
  for (int64_t j = 0; j < e; ++j) {
    const float* vj = v + j * stride;
    const __m512 v0 = _mm512_loadu_ps(vj), v1 = _mm512_loadu_ps(vj + 16), v2 = _mm512_loadu_ps(vj + 32),
                 v3 = _mm512_loadu_ps(vj + 48);
    for (int u = 0; u < ROWS; ++u) {
      const __m512 b = _mm512_set1_ps(w[u * ep + j]);
      c[u][0] = _mm512_fmadd_ps(b, v0, c[u][0]);
      c[u][1] = _mm512_fmadd_ps(b, v1, c[u][1]);
      c[u][2] = _mm512_fmadd_ps(b, v2, c[u][2]);
      c[u][3] = _mm512_fmadd_ps(b, v3, c[u][3]);
    }
  }
  for (int u = 0; u < ROWS; ++u)
    for (int x = 0; x < 4; ++x) _mm512_storeu_ps(out + u * stride + x * 16, c[u][x]);
}
constexpr int64_t kPvRows = 6;  // a tile of the weighted sums: 6 queries x 64 values (24 accumulators)
#endif


#if defined(QVL_AMX)
// AMX (Intel's tile unit): bfloat16 products into float32 tiles of 16 x 16, what XLA's own bfloat16
// products run on where the CPU has it. Linux grants the tile state to a process on request.
bool AmxReady() {
  static const bool ready = [] {
    constexpr long kReqPerm = 0x1023, kXTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqPerm, kXTileData) == 0;
  }();
  return ready;
}

struct TileConfig {  // the LDTILECFG layout, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

// Tiles 0, 1: float32 accumulators [16, 16]; 4: the left operand [16, 32 bfloat16]; 5: the right
// operand [16 pairs, 16 columns] (pairs of bfloat16 along the contraction, as the gather lays keys
// and values out).
inline void AmxConfigure() {
  TileConfig c;
  for (int i : {0, 1, 4, 5}) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}
#else
bool AmxReady() { return false; }
#endif

#if defined(QVL_AMX) || defined(QVL_DPBF16)
// A task's nq query rows (token-major, then the group's heads) as bfloat16 pairs [nq16, h/2], rows
// nq.. zero: the left operand of the tile unit's and VDPBF16PS's scores.
template <typename T>
const uint32_t* QueryWords(const T* qsrc, const Prefill& p, int64_t r, int64_t k, int64_t i0, int64_t nq,
                           int64_t nq16) {
  const int64_t g = p.heads / p.kv, h = p.h, hw = h / 2;
  thread_local std::vector<uint32_t> qwords;
  if (static_cast<int64_t>(qwords.size()) < nq16 * hw) qwords.resize(nq16 * hw);
  for (int64_t a = 0; a < nq16; ++a) {
    if (a >= nq) {
      std::fill(qwords.data() + a * hw, qwords.data() + (a + 1) * hw, 0u);
      continue;
    }
    const int64_t i = i0 + a / g, n = k * g + a % g;
    std::memcpy(qwords.data() + a * hw, qsrc + ((p.qs[r] + i) * p.heads + n) * h, h * 2);
  }
  return qwords.data();
}

// The probabilities sc [nq16, ep] (already rounded to bfloat16, so exact) as bfloat16 [nq16, ep],
// rows nq.. zero.
inline const uint16_t* ProbabilityWords(const float* sc, int64_t nq, int64_t nq16, int64_t ep) {
  thread_local std::vector<uint16_t> pw;
  if (static_cast<int64_t>(pw.size()) < nq16 * ep) pw.resize(nq16 * ep);
  for (int64_t a = 0; a < nq16; ++a)
    for (int64_t j = 0; j < ep; j += 16) {
      const __m512 x = a < nq ? _mm512_loadu_ps(sc + a * ep + j) : _mm512_setzero_ps();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pw.data() + a * ep + j), (__m256i)_mm512_cvtneps_pbh(x));
    }
  return pw.data();
}
#endif

#if defined(QVL_AMX)
// A task's scores sc [nq16, ep] (unscaled) of its nq query rows (token-major, then the group's heads;
// rows nq.. zero) over the row's keys kw ([kv, h/2, s] bfloat16 pairs), on the tile unit.
template <typename T>
void AmxScores(const T* qsrc, const Prefill& p, int64_t r, int64_t k, int64_t i0, int64_t nq, int64_t nq16,
               int64_t ep, int64_t s, const float* kbase, float* sc) {
  const int64_t h = p.h, hw = h / 2;
  const uint32_t* qwords = QueryWords(qsrc, p, r, k, i0, nq, nq16);
  const uint32_t* kw = reinterpret_cast<const uint32_t*>(kbase) + k * hw * s;
  AmxConfigure();
  for (int64_t a0 = 0; a0 < nq16; a0 += 16)
    for (int64_t j0 = 0; j0 < ep; j0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t kk = 0; kk < h / 32; ++kk) {
        _tile_loadd(4, qwords + a0 * hw + kk * 16, hw * 4);
        _tile_loadd(5, kw + kk * 16 * s + j0, s * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, kw + kk * 16 * s + j0 + 16, s * 4);
        _tile_dpbf16ps(1, 4, 5);
      }
      _tile_stored(0, sc + a0 * ep + j0, ep * 4);
      _tile_stored(1, sc + a0 * ep + j0 + 16, ep * 4);
    }
  _tile_release();
}

// acc [nq16, h] = the probabilities sc [nq16, ep] (already rounded to bfloat16) times the values vw
// ([kv, s/2, h] pairs of keys), over keys [0, ep) (ep: the block's last allowed key, rounded up to
// kKeyAlign = 32, one tile's pairs), on the tile unit.
inline void AmxWeightedSums(const float* sc, int64_t nq, int64_t nq16, int64_t ep, int64_t h,
                            int64_t s, int64_t k, const float* vbase, float* acc) {
  const uint16_t* pw = ProbabilityWords(sc, nq, nq16, ep);  // [nq16, ep]
  const uint32_t* vw = reinterpret_cast<const uint32_t*>(vbase) + k * (s / 2) * h;
  AmxConfigure();
  for (int64_t a0 = 0; a0 < nq16; a0 += 16)
    for (int64_t d0 = 0; d0 < h; d0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t j0 = 0; j0 < ep; j0 += 32) {
        _tile_loadd(4, pw + a0 * ep + j0, ep * 2);
        _tile_loadd(5, vw + (j0 / 2) * h + d0, h * 4);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, vw + (j0 / 2) * h + d0 + 16, h * 4);
        _tile_dpbf16ps(1, 4, 5);
      }
      _tile_stored(0, acc + a0 * h + d0, h * 4);
      _tile_stored(1, acc + a0 * h + d0 + 16, h * 4);
    }
  _tile_release();
}
#endif

#if defined(QVL_DPBF16)
// AVX512_BF16 without AMX: the same layouts as the tile unit's (keys as pairs along h, values as
// pairs of keys), read as VDPBF16PS operands: 16 keys' (or 16 elements') pairs in one vector, a
// query's (or a probability's) pair broadcast beside it. The float32 sums run in another order.
template <typename T>
void DpScores(const T* qsrc, const Prefill& p, int64_t r, int64_t k, int64_t i0, int64_t nq, int64_t nq16,
              int64_t ep, int64_t s, const float* kbase, float* sc) {
  const int64_t h = p.h, hw = h / 2;
  const int32_t* qwords = reinterpret_cast<const int32_t*>(QueryWords(qsrc, p, r, k, i0, nq, nq16));
  const int32_t* kw = reinterpret_cast<const int32_t*>(kbase) + k * hw * s;
  for (int64_t a0 = 0; a0 < nq16; a0 += 8)
    for (int64_t j0 = 0; j0 < ep; j0 += 32) {  // 8 queries x 32 keys
      __m512 c[8][2];
      for (int u = 0; u < 8; ++u) c[u][0] = c[u][1] = _mm512_setzero_ps();
      for (int64_t w = 0; w < hw; ++w) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kw + w * s + j0);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kw + w * s + j0 + 16);
        for (int u = 0; u < 8; ++u) {
          const __m512bh q = (__m512bh)_mm512_set1_epi32(qwords[(a0 + u) * hw + w]);
          c[u][0] = _mm512_dpbf16_ps(c[u][0], q, k0);
          c[u][1] = _mm512_dpbf16_ps(c[u][1], q, k1);
        }
      }
      for (int u = 0; u < 8; ++u) {
        _mm512_storeu_ps(sc + (a0 + u) * ep + j0, c[u][0]);
        _mm512_storeu_ps(sc + (a0 + u) * ep + j0 + 16, c[u][1]);
      }
    }
}

// acc [nq16, h] = the probabilities sc [nq16, ep] (already rounded to bfloat16) times the values vw
// ([kv, s/2, h] pairs of keys) over keys [0, ep) (a multiple of 32).
inline void DpWeightedSums(const float* sc, int64_t nq, int64_t nq16, int64_t ep, int64_t h, int64_t s,
                           int64_t k, const float* vbase, float* acc) {
  const uint16_t* pw = ProbabilityWords(sc, nq, nq16, ep);  // [nq16, ep]
  const int32_t* pwords = reinterpret_cast<const int32_t*>(pw);  // [nq16, ep / 2]
  const int32_t* vw = reinterpret_cast<const int32_t*>(vbase) + k * (s / 2) * h;
  for (int64_t a0 = 0; a0 < nq16; a0 += 8)
    for (int64_t d0 = 0; d0 < h; d0 += 32) {  // 8 queries x 32 elements
      __m512 c[8][2];
      for (int u = 0; u < 8; ++u) c[u][0] = c[u][1] = _mm512_setzero_ps();
      for (int64_t jw = 0; jw < ep / 2; ++jw) {
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vw + jw * h + d0);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vw + jw * h + d0 + 16);
        for (int u = 0; u < 8; ++u) {
          const __m512bh w = (__m512bh)_mm512_set1_epi32(pwords[(a0 + u) * (ep / 2) + jw]);
          c[u][0] = _mm512_dpbf16_ps(c[u][0], w, v0);
          c[u][1] = _mm512_dpbf16_ps(c[u][1], w, v1);
        }
      }
      for (int u = 0; u < 8; ++u) {
        _mm512_storeu_ps(acc + (a0 + u) * h + d0, c[u][0]);
        _mm512_storeu_ps(acc + (a0 + u) * h + d0 + 16, c[u][1]);
      }
    }
}
#endif

// The pool slot of key j of row r (its queries [qs[r], qs[r + 1])), or -1 where no query of the row
// may see it, or it lies outside the table or the pools: such a key is read as zeros (whatever its
// slot holds; its weight is 0).
inline int64_t KeySlot(const Prefill& p, const int64_t* qs, int64_t r, const int32_t* table, int64_t j) {
  bool seen = false;
  for (int64_t i = qs[r + 1] - 1; i >= qs[r] && !seen && j < p.window; --i) seen = p.mask[i * p.window + j];
  const int64_t block = j / p.block_size < p.blocks ? table[j / p.block_size] : -1;
  const int64_t slot = block * p.block_size + j % p.block_size;
  return seen && block >= 0 && slot < p.slots ? slot : -1;
}

#if (defined(QVL_AMX) || defined(QVL_DPBF16)) && defined(__AVX512BW__)
// The AMX layouts of 16 keys [jb, jb + 16) of row r (jb a multiple of 16, the row's span s a multiple
// of kKeyAlign): keys as bfloat16 pairs along h, kw words [kv, h/2, s] (word w of key j: its
// elements 2w, 2w + 1, the pair the tile product takes), values as pairs of consecutive keys, vw
// words [kv, s/2, h] (word d of pair j/2: element d of keys j and j + 1). A key no query of the row
// may see, or one outside the table or the pools, is zeros (`KeySlot`). Word gathers for the keys (16 keys'
// word w in one 64-byte store) and 16-bit interleaves for the values: the same words as storing
// every element on its own (that cost ~3.5 ms a layer for 1024 keys at 2B widths, 2 cores).
inline void GatherPairs16(const Prefill& p, const int64_t* qs, int64_t r, int64_t jb, int64_t s,
                          const int32_t* table, float* kbase, float* vbase) {
  const int64_t h = p.h, hw = h / 2;
  alignas(64) int32_t slot_words[16];
  const uint16_t* vrow[16];
  __mmask16 ok = 0;
  for (int u = 0; u < 16; ++u) {
    const int64_t slot = KeySlot(p, qs, r, table, jb + u);
    ok |= static_cast<__mmask16>(slot >= 0) << u;
    slot_words[u] = slot >= 0 ? static_cast<int32_t>(slot * p.kv * hw) : 0;
    vrow[u] = slot >= 0 ? static_cast<const uint16_t*>(p.vp) + slot * p.kv * h : nullptr;
  }
  const int32_t* kwords = static_cast<const int32_t*>(p.kp);
  uint32_t* kw = reinterpret_cast<uint32_t*>(kbase);
  uint32_t* vw = reinterpret_cast<uint32_t*>(vbase);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i base = _mm512_load_si512(slot_words);
  // Element i of an interleave: a[i / 2] (even i) or b[i / 2] (odd: index 32 + i / 2); hi from a[16].
  alignas(64) static constexpr uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                   8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                   24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kLo), hi = _mm512_load_si512(kHi);
  for (int64_t k = 0; k < p.kv; ++k) {
    __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int32_t>(k * hw)));
    for (int64_t w = 0; w < hw; ++w) {
      const __m512i got = _mm512_mask_i32gather_epi32(zero, ok, idx, kwords, 4);
      _mm512_storeu_si512(kw + (k * hw + w) * s + jb, got);
      idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
    }
    for (int u = 0; u < 16; u += 2) {
      uint32_t* dst = vw + (k * (s / 2) + (jb + u) / 2) * h;
      const uint16_t* a = vrow[u] ? vrow[u] + k * h : nullptr;
      const uint16_t* b = vrow[u + 1] ? vrow[u + 1] + k * h : nullptr;
      for (int64_t d0 = 0; d0 < h; d0 += 32) {
        const __m512i va = a ? _mm512_loadu_si512(a + d0) : zero;
        const __m512i vb = b ? _mm512_loadu_si512(b + d0) : zero;
        _mm512_storeu_si512(dst + d0, _mm512_permutex2var_epi16(va, lo, vb));
        _mm512_storeu_si512(dst + d0 + 16, _mm512_permutex2var_epi16(va, hi, vb));
      }
    }
  }
}
#endif

#if defined(__AVX512F__)
// Float32 pools: keys [jb, jb + 16) of row r transposed into kt [kv, h, s] (16 keys' element d in
// one 64-byte store, from a gather), values copied row by row into vf [kv, s, h]; a key no query of
// the row may see, or one outside the table or the pools, is zeros (`KeySlot`).
inline void GatherFloat16(const Prefill& p, const int64_t* qs, int64_t r, int64_t jb, int64_t s,
                          const int32_t* table, float* kt, float* vf) {
  const int64_t h = p.h;
  alignas(64) int32_t slot_elems[16];
  const float* vrow[16];
  __mmask16 ok = 0;
  for (int u = 0; u < 16; ++u) {
    const int64_t slot = KeySlot(p, qs, r, table, jb + u);
    ok |= static_cast<__mmask16>(slot >= 0) << u;
    slot_elems[u] = slot >= 0 ? static_cast<int32_t>(slot * p.kv * h) : 0;
    vrow[u] = slot >= 0 ? static_cast<const float*>(p.vp) + slot * p.kv * h : nullptr;
  }
  const float* kp = static_cast<const float*>(p.kp);
  const __m512 zero = _mm512_setzero_ps();
  const __m512i base = _mm512_load_si512(slot_elems);
  for (int64_t k = 0; k < p.kv; ++k) {
    __m512i idx = _mm512_add_epi32(base, _mm512_set1_epi32(static_cast<int32_t>(k * h)));
    for (int64_t d = 0; d < h; ++d) {
      _mm512_storeu_ps(kt + (k * h + d) * s + jb, _mm512_mask_i32gather_ps(zero, ok, idx, kp, 4));
      idx = _mm512_add_epi32(idx, _mm512_set1_epi32(1));
    }
    for (int u = 0; u < 16; ++u) {
      float* dst = vf + (k * s + jb + u) * h;
      if (vrow[u])
        std::memcpy(dst, vrow[u] + k * h, h * sizeof(float));
      else
        std::fill(dst, dst + h, 0.0f);
    }
  }
}
#endif

template <typename T>
void PrefillRun(const Prefill& p, ffi::ThreadPool& pool) {
  const int64_t g = p.heads / p.kv, h = p.h;
  const int64_t* qs = p.qs;
  // ends[qs[r] + i]: 1 + the last key query i of row r may see (0: none).
  std::vector<int64_t> ends(qs[p.rows]), span(p.rows, 0), base(p.rows + 1, 0);
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t i = 0; i < qs[r + 1] - qs[r]; ++i) {
      const int64_t e = MaskEnd(p.mask + (qs[r] + i) * p.window, p.window);
      ends[qs[r] + i] = e;
      span[r] = std::max(span[r], e);
    }
    span[r] = (span[r] + kKeyAlign - 1) / kKeyAlign * kKeyAlign;  // keys gathered (a multiple of kKeyAlign)
    base[r + 1] = base[r] + span[r] * p.kv * h;
  }
  auto kbuf = Buffers().Take(base[p.rows]);
  auto vbuf = Buffers().Take(base[p.rows]);
  float* kt = kbuf->data();  // row r at base[r]: [kv, h, span[r]]
  float* vf = vbuf->data();  // row r at base[r]: [kv, span[r], h]
  const T* kp = static_cast<const T*>(p.kp);
  const T* vp = static_cast<const T*>(p.vp);
  // bfloat16 on a CPU with AMX: the products run on the tile unit, which takes the bfloat16 values
  // in pairs (keys and values then kept as bfloat16 words); else everything is read into float32.
#if defined(QVL_DPBF16)
  const bool pairs = sizeof(T) == 2 && h % 32 == 0;  // VDPBF16PS takes the same pairs
#else
  const bool pairs = sizeof(T) == 2 && h % 32 == 0 && AmxReady();
#endif
  constexpr int64_t kGather = 64;
  std::vector<int64_t> gather_start(p.rows + 1, 0);
  for (int64_t r = 0; r < p.rows; ++r) gather_start[r + 1] = gather_start[r] + (span[r] + kGather - 1) / kGather;
  ParallelFor(pool, gather_start[p.rows], [&](int64_t task) {
    const int64_t r = std::upper_bound(gather_start.begin(), gather_start.end(), task) - gather_start.begin() - 1;
    const int64_t j0 = (task - gather_start[r]) * kGather, j1 = std::min(span[r], j0 + kGather), s = span[r];
    const int32_t* table = p.table + r * p.blocks;
#if (defined(QVL_AMX) || defined(QVL_DPBF16)) && defined(__AVX512BW__)
    if (pairs && p.slots * p.kv * (h / 2) < (int64_t{1} << 31)) {  // word indices fit int32 gathers
      for (int64_t jb = j0; jb < j1; jb += 16) GatherPairs16(p, qs, r, jb, s, table, kt + base[r], vf + base[r]);
      return;
    }
#endif
#if defined(__AVX512F__)
    if constexpr (sizeof(T) == 4) {
      if (p.slots * p.kv * h < (int64_t{1} << 31)) {  // element indices fit int32 gathers
        for (int64_t jb = j0; jb < j1; jb += 16) GatherFloat16(p, qs, r, jb, s, table, kt + base[r], vf + base[r]);
        return;
      }
    }
#endif
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t slot = KeySlot(p, qs, r, table, j);
      const bool ok = slot >= 0;
      if (pairs) {  // bfloat16 words: keys [kv, h/2, s] (pairs along h), values [kv, s/2, h] (pairs of keys)
        u16a* kw = reinterpret_cast<u16a*>(kt + base[r]);
        u16a* vw = reinterpret_cast<u16a*>(vf + base[r]);
        for (int64_t k = 0; k < p.kv; ++k) {
          const u16a* ks = ok ? reinterpret_cast<const u16a*>(kp + (slot * p.kv + k) * h) : nullptr;
          const u16a* vs = ok ? reinterpret_cast<const u16a*>(vp + (slot * p.kv + k) * h) : nullptr;
          for (int64_t d = 0; d < h; ++d) {
            kw[2 * ((k * (h / 2) + d / 2) * s + j) + d % 2] = ok ? ks[d] : 0;
            vw[2 * ((k * (s / 2) + j / 2) * h + d) + j % 2] = ok ? vs[d] : 0;
          }
        }
        continue;
      }
      for (int64_t k = 0; k < p.kv; ++k) {
        float* kd = kt + base[r] + k * h * s + j;
        float* vd = vf + base[r] + (k * s + j) * h;
        if (!ok) {
          for (int64_t d = 0; d < h; ++d) kd[d * s] = vd[d] = 0.0f;
          continue;
        }
        const T* ks = kp + (slot * p.kv + k) * h;
        const T* vs = vp + (slot * p.kv + k) * h;
        for (int64_t d = 0; d < h; ++d) {
          kd[d * s] = Elem<T>::load(ks + d);
          vd[d] = Elem<T>::load(vs + d);
        }
      }
    }
  });

  // Tasks: one kv head of a block of kQueryBlock query tokens of one row; row r's from task_start[r].
  std::vector<int64_t> task_start(p.rows + 1, 0);
  for (int64_t r = 0; r < p.rows; ++r)
    task_start[r + 1] = task_start[r] + p.kv * ((qs[r + 1] - qs[r] + kQueryBlock - 1) / kQueryBlock);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(h)));
  const bool wide = h % 64 == 0;  // the vector tiles' shape
  ParallelFor(pool, task_start[p.rows], [&](int64_t task) {
    const int64_t r = std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin() - 1;
    const int64_t t = qs[r + 1] - qs[r], qblocks = (t + kQueryBlock - 1) / kQueryBlock;
    const int64_t k = (task - task_start[r]) / qblocks, qb = (task - task_start[r]) % qblocks;
    const int64_t i0 = qb * kQueryBlock, i1 = std::min(t, i0 + kQueryBlock), nq = (i1 - i0) * g;
    const int64_t s = span[r];
    int64_t e_max = 0;
    for (int64_t i = i0; i < i1; ++i) e_max = std::max(e_max, ends[qs[r] + i]);
    const int64_t ep = (e_max + kKeyAlign - 1) / kKeyAlign * kKeyAlign;
    const int64_t nq16 = (nq + 15) / 16 * 16;  // query rows padded to whole tiles (8 x 32 FMA, 16 x 16 AMX)
    thread_local std::vector<float> scratch;
    if (static_cast<int64_t>(scratch.size()) < nq16 * h + nq16 * std::max<int64_t>(ep, 1) + nq16 * h)
      scratch.resize(nq16 * h + nq16 * std::max<int64_t>(ep, 1) + nq16 * h);
    float* qf = scratch.data();     // [nq16, h]: query rows (token-major, then the group's heads)
    float* sc = qf + nq16 * h;       // [nq16, ep]: scores, then probabilities
    float* acc = sc + nq16 * std::max<int64_t>(ep, 1);  // [nq16, h]
    const T* qsrc = static_cast<const T*>(p.q);
    for (int64_t a = 0; a < nq16 && !pairs; ++a) {  // float32 copies (the AMX path reads q itself)
      if (a >= nq) {
        std::fill(qf + a * h, qf + (a + 1) * h, 0.0f);
        continue;
      }
      const int64_t i = i0 + a / g, n = k * g + a % g;
      const T* src = qsrc + ((qs[r] + i) * p.heads + n) * h;
      for (int64_t d = 0; d < h; ++d) qf[a * h + d] = Elem<T>::load(src + d);
    }
    const float* kr = kt + base[r] + k * h * s;  // [h, s]
    const float* vr = vf + base[r] + k * s * h;  // [s, h]
    // Scores.
#if defined(QVL_AMX)
    if (pairs) {
      AmxScores(qsrc, p, r, k, i0, nq, nq16, ep, s, kt + base[r], sc);
      for (int64_t x = 0; x < nq16 * ep; x += 16)
        _mm512_storeu_ps(sc + x, _mm512_mul_ps(_mm512_loadu_ps(sc + x), _mm512_set1_ps(scale)));
    } else
#endif
#if defined(QVL_DPBF16)
    if (pairs) {
      DpScores(qsrc, p, r, k, i0, nq, nq16, ep, s, kt + base[r], sc);
      for (int64_t x = 0; x < nq16 * ep; x += 16)
        _mm512_storeu_ps(sc + x, _mm512_mul_ps(_mm512_loadu_ps(sc + x), _mm512_set1_ps(scale)));
    } else
#endif
    {
#if defined(__AVX512F__)
    for (int64_t a0 = 0; a0 < nq16; a0 += 8) {
      const float* qa = qf + a0 * h;
      for (int64_t j0 = 0; j0 < ep; j0 += 32) {  // 8 queries x 32 keys (ep: a multiple of kKeyAlign)
        __m512 c[8], c2[8];
        for (int u = 0; u < 8; ++u) c[u] = c2[u] = _mm512_setzero_ps();
        for (int64_t d = 0; d < h; ++d) {
          const __m512 k0 = _mm512_loadu_ps(kr + d * s + j0), k1 = _mm512_loadu_ps(kr + d * s + j0 + 16);
          for (int u = 0; u < 8; ++u) {
            const __m512 b = _mm512_set1_ps(qa[u * h + d]);
            c[u] = _mm512_fmadd_ps(b, k0, c[u]);
            c2[u] = _mm512_fmadd_ps(b, k1, c2[u]);
          }
        }
        for (int u = 0; u < 8; ++u) {
          _mm512_storeu_ps(sc + (a0 + u) * ep + j0, _mm512_mul_ps(c[u], _mm512_set1_ps(scale)));
          _mm512_storeu_ps(sc + (a0 + u) * ep + j0 + 16, _mm512_mul_ps(c2[u], _mm512_set1_ps(scale)));
        }
      }
    }
#else
    for (int64_t a = 0; a < nq; ++a)
      for (int64_t j = 0; j < ep; ++j) {
        float c = 0.0f;
        for (int64_t d = 0; d < h; ++d) c += qf[a * h + d] * kr[d * s + j];
        sc[a * ep + j] = c * scale;
      }
#endif
    }
    // Softmax over each query's allowed keys; the probabilities rounded to T.
    for (int64_t a = 0; a < nq; ++a) {
      const int64_t i = i0 + a / g, e = ends[qs[r] + i];
      const bool* m = p.mask + (qs[r] + i) * p.window;
      float* row = sc + a * ep;
      if (e == 0) {
        std::fill(row, row + ep, 0.0f);
        continue;
      }
      int64_t j = 0;
      float top = -INFINITY, total = 0.0f;
#if defined(__AVX512F__)
      __m512 vtop = _mm512_set1_ps(-INFINITY);
      for (; j + 16 <= e; j += 16)
        vtop = _mm512_mask_max_ps(vtop, Mask16(m + j), vtop, _mm512_loadu_ps(row + j));
      top = _mm512_reduce_max_ps(vtop);
#endif
      for (int64_t jj = j; jj < e; ++jj)
        if (m[jj]) top = std::max(top, row[jj]);
      j = 0;
#if defined(__AVX512F__)
      __m512 vsum = _mm512_setzero_ps();
      const __m512 vt = _mm512_set1_ps(top);
      for (; j + 16 <= e; j += 16) {
        const __m512 x = _mm512_maskz_mov_ps(Mask16(m + j), Exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), vt)));
        _mm512_storeu_ps(row + j, x);
        vsum = _mm512_add_ps(vsum, x);
      }
      total = _mm512_reduce_add_ps(vsum);
#endif
      for (; j < e; ++j) {
        row[j] = m[j] ? std::exp(row[j] - top) : 0.0f;
        total += row[j];
      }
      const float inv = 1.0f / total;
      j = 0;
#if defined(__AVX512F__)
      const __m512 vinv = _mm512_set1_ps(inv);
      for (; j + 16 <= e; j += 16) {
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), vinv);
        if (sizeof(T) == 2) x = RoundBf16(x);
        _mm512_storeu_ps(row + j, x);
      }
#endif
      for (; j < e; ++j) row[j] = Elem<T>::round(row[j] * inv);
      std::fill(row + e, row + ep, 0.0f);
    }
    // Weighted sums of the values.
    std::fill(acc, acc + nq16 * h, 0.0f);
#if defined(QVL_AMX)
    if (pairs) {
      AmxWeightedSums(sc, nq, nq16, ep, h, s, k, vf + base[r], acc);
    } else
#endif
#if defined(QVL_DPBF16)
    if (pairs) {
      DpWeightedSums(sc, nq, nq16, ep, h, s, k, vf + base[r], acc);
    } else
#endif
#if defined(__AVX512F__)
    if (wide) {
      for (int64_t a0 = 0; a0 < nq; a0 += kPvRows) {
        const int64_t na = std::min<int64_t>(kPvRows, nq - a0);
        int64_t e = 0;
        for (int64_t u = 0; u < na; ++u) e = std::max(e, ends[qs[r] + i0 + (a0 + u) / g]);
        for (int64_t d0 = 0; d0 < h; d0 += 64) {
          float* dst = acc + a0 * h + d0;
          const float* w = sc + a0 * ep;
          if (na == kPvRows)
            PvTile<kPvRows>(w, ep, vr + d0, h, e, dst);
          else
            for (int64_t u = 0; u < na; ++u) PvTile<1>(w + u * ep, ep, vr + d0, h, e, dst + u * h);
        }
      }
    } else
#endif
    {
      for (int64_t a = 0; a < nq; ++a) {
        const int64_t e = ends[qs[r] + i0 + a / g];
        for (int64_t j = 0; j < e; ++j) {
          const float w = sc[a * ep + j];
          for (int64_t d = 0; d < h; ++d) acc[a * h + d] += w * vr[j * h + d];
        }
      }
    }
    T* out = static_cast<T*>(p.out);
    for (int64_t a = 0; a < nq; ++a) {
      const int64_t i = i0 + a / g, n = k * g + a % g;
      T* dst = out + ((qs[r] + i) * p.heads + n) * h;
      for (int64_t d = 0; d < h; ++d) Elem<T>::store(dst + d, acc[a * h + d]);
    }
  });
  Buffers().Give(std::move(kbuf));
  Buffers().Give(std::move(vbuf));
}

ffi::Error PagedPrefill(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                        ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> out,
                        int64_t block_size) {
  auto qd = q.dimensions(), kd = kp.dimensions(), td = table.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || td.size() != 2 || md.size() != 3)
    return ffi::Error::InvalidArgument(
        "qvl_paged_prefill: q [r, t, n, h], pools [slots, kv, h], table [r, blocks], mask [r, t, window]");
  std::vector<int64_t> qs(qd[0] + 1);
  for (int64_t r = 0; r <= qd[0]; ++r) qs[r] = r * qd[1];
  Prefill p{qd[0], qd[1], qd[2], kd[1], qd[3], td[1], md[2], block_size, kd[0], q.untyped_data(),
            kp.untyped_data(), vp.untyped_data(), table.typed_data(), mask.typed_data(), out->untyped_data(), qs.data()};
  if (kd[2] != p.h || p.heads % p.kv != 0 || td[0] != p.rows || md[0] != p.rows || md[1] != p.t ||
      p.window > p.blocks * block_size || vp.dimensions()[0] != kd[0])
    return ffi::Error::InvalidArgument("qvl_paged_prefill: shapes do not agree");
  return ForAttentionDtype("qvl_paged_prefill", q, kp, vp, *out, [&](auto elem) {
    if (p.rows > 0 && p.t > 0) PrefillRun<decltype(elem)>(p, pool);
  });
}

// QvlPagedPrefillPacked: QvlPagedPrefill over the prompt chunks of several rows packed into one
// sequence (a mixed step's): q [1, T, n, h], table [r, blocks], mask [1, T, window] (query i's
// allowed cache indices in its own row), starts [r + 1] (int32, ascending, starts[r] <= T): row r's
// queries are tokens [starts[r], starts[r + 1]). Tokens outside [starts[0], starts[r]) get zeros.
ffi::Error PagedPrefillPacked(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                              ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> starts,
                              ffi::Result<ffi::AnyBuffer> out, int64_t block_size) {
  auto qd = q.dimensions(), kd = kp.dimensions(), td = table.dimensions(), md = mask.dimensions();
  auto sd = starts.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || td.size() != 2 || md.size() != 3 || sd.size() != 1 || qd[0] != 1)
    return ffi::Error::InvalidArgument(
        "qvl_paged_prefill_packed: q [1, T, n, h], pools [slots, kv, h], table [r, blocks], mask [1, T, window], "
        "starts [r + 1]");
  const int64_t rows = td[0], t = qd[1];
  std::vector<int64_t> qs(rows + 1);
  if (sd[0] != rows + 1) return ffi::Error::InvalidArgument("qvl_paged_prefill_packed: starts must be [rows + 1]");
  for (int64_t r = 0; r <= rows; ++r) {
    qs[r] = starts.typed_data()[r];
    if (qs[r] < 0 || qs[r] > t || (r > 0 && qs[r] < qs[r - 1]))
      return ffi::Error::InvalidArgument("qvl_paged_prefill_packed: starts must ascend within [0, T]");
  }
  Prefill p{rows, t, qd[2], kd[1], qd[3], td[1], md[2], block_size, kd[0], q.untyped_data(),
            kp.untyped_data(), vp.untyped_data(), table.typed_data(), mask.typed_data(), out->untyped_data(), qs.data()};
  if (kd[2] != p.h || p.heads % p.kv != 0 || md[0] != 1 || md[1] != t || p.window > p.blocks * block_size ||
      vp.dimensions()[0] != kd[0])
    return ffi::Error::InvalidArgument("qvl_paged_prefill_packed: shapes do not agree");
  const size_t token_bytes = out->size_bytes() / std::max<int64_t>(t, 1);
  char* o = static_cast<char*>(out->untyped_data());
  std::memset(o, 0, qs[0] * token_bytes);
  std::memset(o + qs[rows] * token_bytes, 0, (t - qs[rows]) * token_bytes);
  return ForAttentionDtype("qvl_paged_prefill_packed", q, kp, vp, *out, [&](auto elem) {
    if (rows > 0 && qs[rows] > qs[0]) PrefillRun<decltype(elem)>(p, pool);
  });
}

// QvlGemmPacked: y [M, N] = x [M, K] . w^T of bfloat16 operands, the float32 sums as they are (a
// float32 out) or rounded once (a bfloat16 out), as XLA's bfloat16 product with a float32
// accumulator, with w [N, K] given packed as the tile unit reads
// its right operand (`cpu_kernel.pack_weight`): wp [N/32, K/32, 2, 16, 32], block (nb, kb, h) the
// 16 x 16 pairs (w[n, k], w[n, k + 1]) of rows n = nb*32 + h*16 + j and k = kb*32 + 2i at [i, 2j..].
// A weight's column panel is then contiguous; x is copied into [16 rows x 32] blocks once a call.
// On the tile unit: 2 x 2 accumulator tiles of 16 x 16 (32 rows of x by 32 of w) over the whole
// contraction, x in chunks of ~1 MB that stay in L2 while the panels stream past them (the order
// that made this as fast as oneDNN's product here, 1.5x XLA's: docs/performance.md). With AVX512_BF16
// and no AMX (AMD Zen 4 / 5): VDPBF16PS over the same panels (DpGemm below), the float32 sums in
// another order. Elsewhere a float32 loop, the same sums in another order again. skip [2] (lo, hi):
// rows [lo, hi) of x are not computed and their outputs are zeros (a mixed step's padding tokens,
// `packed.skip_rows`); (0, 0) computes every row.
constexpr int64_t kGemmChunkBytes = 1 << 20;

#if defined(QVL_AMX)
inline void GemmConfigure() {  // tiles 0-3: accumulators; 4, 5: x blocks; 6, 7: weight blocks
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  _tile_loadconfig(&c);
}

inline void StoreRows(const float* c, uint16_t* y, int64_t ldy, int64_t m0, int64_t m, int64_t n0) {
  for (int j = 0; j < 16 && m0 + j < m; ++j) {
    __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(c + j * 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + j) * ldy + n0), (__m256i)b);
  }
}

inline void StoreRows(const float* c, float* y, int64_t ldy, int64_t m0, int64_t m, int64_t n0) {
  for (int j = 0; j < 16 && m0 + j < m; ++j) _mm512_storeu_ps(y + (m0 + j) * ldy + n0, _mm512_loadu_ps(c + j * 16));
}

// Rows [mc, mend) of y (multiples of 32 of the padded rows) by weight blocks [nb0, nb1).
template <typename Out>
void GemmTask(const uint16_t* xp, const uint16_t* wp, Out* y, int64_t m, int64_t n, int64_t kb_count,
              int64_t mc, int64_t mend, int64_t nb0, int64_t nb1, int64_t lo, int64_t hi) {
  GemmConfigure();
  alignas(64) float c[4][256];
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint16_t* bp = wp + nb * kb_count * 1024;
    for (int64_t r = mc; r < mend; r += 32) {
      if (r >= lo && r + 32 <= hi) continue;  // skipped rows: their zeros are written
      const uint16_t* a0 = xp + (r / 16) * kb_count * 512;
      const uint16_t* a1 = a0 + kb_count * 512;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        _tile_loadd(4, a0 + kb * 512, 64);
        _tile_loadd(6, bp + kb * 1024, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, bp + kb * 1024 + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + kb * 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      _tile_stored(2, c[2], 64);
      _tile_stored(3, c[3], 64);
      StoreRows(c[0], y, n, r, m, nb * 32);
      StoreRows(c[1], y, n, r, m, nb * 32 + 16);
      StoreRows(c[2], y, n, r + 16, m, nb * 32);
      StoreRows(c[3], y, n, r + 16, m, nb * 32 + 16);
    }
  }
  _tile_release();
}
#endif

#if defined(QVL_DPBF16)
// AVX512_BF16 (Zen 4/5 and others without AMX): the same packed panels read as vector operands. Row
// i of a block (nb, kb, h) holds 16 columns' pairs (w[n, k], w[n, k + 1]): one 64-byte vector, what
// VDPBF16PS takes beside a broadcast pair of x (x[r, k], x[r, k + 1]), adding both products into 16
// float32 sums. MR rows of x by NP panels of 32 columns, over the whole contraction, in registers.
inline void Store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
inline void Store16(uint16_t* y, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(v));
}

constexpr int64_t kDpRows = 12;
constexpr int64_t kDpPanels = 4, kDpChunk = 252, kDpSlice = 16;

// MR rows of x (xb: their pairs, [k/2][kDpRows] as DpGemm copies them) by NP panels from nb: each
// weight vector loaded once and used for every row, each pair of x a broadcast operand.
template <int MR, int NP, typename Out>
void DpTile(const int32_t* xb, const uint16_t* ws, int64_t kbs, Out* y, int64_t n, int64_t r0, int64_t nb) {
  __m512 acc[MR][NP][2];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < kbs; ++kb) {
    const uint16_t* panel[NP];
    for (int p = 0; p < NP; ++p) panel[p] = ws + ((nb + p) * kbs + kb) * 1024;
    const int32_t* xq = xb + kb * 16 * kDpRows;
    for (int i = 0; i < 16; ++i) {
      __m512bh b[NP][2];
      for (int p = 0; p < NP; ++p)
        for (int h = 0; h < 2; ++h) {
          // A decode step's rows: the panel 16 KB ahead into L2 (the hardware's prefetch alone left
          // the arithmetic of 8 rows unhidden behind the read: its products 54 -> 41 ms at 2B widths;
          // at 12 rows, a 2B decoder's 4 layers 31.7 -> 14.2 ms).
          _mm_prefetch(reinterpret_cast<const char*>(panel[p] + 16384 + h * 512 + i * 32), _MM_HINT_T1);
          b[p][h] = (__m512bh)_mm512_loadu_si512(panel[p] + h * 512 + i * 32);
        }
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(xq[i * kDpRows + r]);
        for (int p = 0; p < NP; ++p)
          for (int h = 0; h < 2; ++h) acc[r][p][h] = _mm512_dpbf16_ps(acc[r][p][h], a, b[p][h]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < NP; ++p) {
      Store16(y + (r0 + r) * n + (nb + p) * 32, acc[r][p][0]);
      Store16(y + (r0 + r) * n + (nb + p) * 32 + 16, acc[r][p][1]);
    }
}

// A prompt chunk's rows: MR rows of x by one panel over weight blocks [kb0, kb1) of the contraction,
// the sums carried in c (float32, row stride ldc) from the blocks before and to the blocks after;
// the last blocks store the sums to y. pf (or null): kb1 - kb0 blocks more (the next slice) to
// prefetch into L2 meanwhile, a 2 KB block of them for each block of the panel.
template <int MR, typename Out>
void DpTileK(const int32_t* xb, const uint16_t* ws, int64_t kbs, int64_t kb0, int64_t kb1, float* c, int64_t ldc,
             Out* y, int64_t n, int64_t r0, int64_t nb, const uint16_t* pf) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h)
      acc[r][h] = kb0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc + h * 16);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint16_t* panel = ws + (nb * kbs + kb) * 1024;
    const int32_t* xq = xb + kb * 16 * kDpRows;
    const uint16_t* pk = pf ? pf + (kb - kb0) * 1024 : nullptr;
    for (int i = 0; i < 16; ++i) {
      if (pk) {  // two of the 32 cache lines of the next slice's block
        _mm_prefetch(reinterpret_cast<const char*>(pk + i * 64), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pk + i * 64 + 32), _MM_HINT_T1);
      }
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + i * 32);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + 512 + i * 32);
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(xq[i * kDpRows + r]);
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int h = 0; h < 2; ++h) {
      if (kb1 == kbs)
        Store16(y + (r0 + r) * n + nb * 32 + h * 16, acc[r][h]);
      else
        _mm512_storeu_ps(c + r * ldc + h * 16, acc[r][h]);
    }
}

template <typename Out>
void DpBlockK(int rows, const int32_t* xb, const uint16_t* ws, int64_t kbs, int64_t kb0, int64_t kb1, float* c,
              int64_t ldc, Out* y, int64_t n, int64_t r0, int64_t nb, const uint16_t* pf) {
  switch (rows) {
#define QVL_DP_CASE(R) \
  case R:              \
    return DpTileK<R>(xb, ws, kbs, kb0, kb1, c, ldc, y, n, r0, nb, pf);
    QVL_DP_CASE(1) QVL_DP_CASE(2) QVL_DP_CASE(3) QVL_DP_CASE(4) QVL_DP_CASE(5) QVL_DP_CASE(6) QVL_DP_CASE(7)
    QVL_DP_CASE(8) QVL_DP_CASE(9) QVL_DP_CASE(10) QVL_DP_CASE(11) QVL_DP_CASE(12)
#undef QVL_DP_CASE
    default:
      return;
  }
}

// Rows [r0, r0 + rows) (rows <= 12) by panels [nb0, nb1): the widest tile the registers hold (MR x NP
// x 2 accumulators in 31 of the 32), panels one at a time where NP does not divide. Every row in one
// tile, so each panel streams from memory once while the arithmetic runs (7 or 8 rows as two tiles
// of 4 over 3 panels read each panel twice, the second time with nothing streaming: a 2B decode
// step's products at 8 rows 43-46 -> 36-38 ms).
template <int MR, typename Out>
void DpRows(const int32_t* xb, const uint16_t* ws, int64_t kbs, Out* y, int64_t n, int64_t r0, int64_t nb0,
            int64_t nb1) {
  constexpr int NP = MR == 1 ? 8 : MR == 2 ? 5 : MR == 3 ? 4 : MR == 4 ? 3 : MR <= 6 ? 2 : 1;
  int64_t nb = nb0;
  for (; nb + NP <= nb1; nb += NP) DpTile<MR, NP>(xb, ws, kbs, y, n, r0, nb);
  for (; nb < nb1; ++nb) DpTile<MR, 1>(xb, ws, kbs, y, n, r0, nb);
}

template <typename Out>
void DpBlock(int rows, const int32_t* xb, const uint16_t* ws, int64_t kbs, Out* y, int64_t n, int64_t r0,
             int64_t nb0, int64_t nb1) {
  switch (rows) {
#define QVL_DP_CASE(R) \
  case R:              \
    return DpRows<R>(xb, ws, kbs, y, n, r0, nb0, nb1);
    QVL_DP_CASE(1) QVL_DP_CASE(2) QVL_DP_CASE(3) QVL_DP_CASE(4) QVL_DP_CASE(5) QVL_DP_CASE(6) QVL_DP_CASE(7)
    QVL_DP_CASE(8) QVL_DP_CASE(9) QVL_DP_CASE(10) QVL_DP_CASE(11) QVL_DP_CASE(12)
#undef QVL_DP_CASE
    default:
      return;
  }
}


// y = x . w^T on AVX512_BF16: x copied into blocks of 12 rows' pairs, then a decode step's rows (one
// block) against every panel once, or a prompt chunk's blocks by panels and slices of the contraction.
template <typename Out>
void DpGemm(ffi::ThreadPool& pool, const uint16_t* xs, int64_t m, int64_t k, const uint16_t* ws, int64_t nbs,
            Out* y, int64_t lo, int64_t hi) {
  const int64_t n = nbs * 32, kbs = k / 32, blocks = (m + kDpRows - 1) / kDpRows;
  // x's pairs by blocks of 14 rows, [block][k/2][14] (rows past m zero): the rows' pairs of one
  // step side by side, where rows k apart would share cache sets.
  auto buf = Buffers().Take(static_cast<size_t>(blocks * kDpRows * k / 2));
  int32_t* xp = reinterpret_cast<int32_t*>(buf->data());
  ParallelFor(pool, blocks, [&](int64_t bl) {
    int32_t* dst = xp + bl * (k / 2) * kDpRows;
    for (int64_t j = 0; j < kDpRows; ++j) {
      const int64_t r = bl * kDpRows + j;
      if (r < m && !(r >= lo && r < hi)) {
        const int32_t* src = reinterpret_cast<const int32_t*>(xs + r * k);
        for (int64_t q = 0; q < k / 2; ++q) dst[q * kDpRows + j] = src[q];
      } else {
        for (int64_t q = 0; q < k / 2; ++q) dst[q * kDpRows + j] = 0;
      }
    }
  });
  if (blocks == 1) {  // a decode step's rows: each weight vector read once, for every row
    const int64_t groups = std::min<int64_t>(nbs, 32);
    ParallelFor(pool, groups, [&](int64_t g) {
      DpBlock(static_cast<int>(m), xp, ws, kbs, y, n, 0, g * nbs / groups, (g + 1) * nbs / groups);
    });
  } else {
    // A prompt chunk's rows, in the order that keeps each operand in its cache: tasks of kDpPanels
    // panels; in each, up to kDpChunk rows at a time, the contraction in slices of kDpSlice weight
    // blocks (a panel's slice, 16 KB, stays in L1 over the rows; the rows' slice of x in L2), the
    // sums of the task's panels carried between slices in a float32 buffer that stays in L2.
    const int64_t tasks = (nbs + kDpPanels - 1) / kDpPanels;
    ParallelFor(pool, tasks, [&](int64_t t) {
      thread_local std::vector<float> cbuf;
      cbuf.resize(kDpChunk * kDpPanels * 32);
      const int64_t nb0 = t * kDpPanels, nb1 = std::min(nbs, nb0 + kDpPanels), ldc = kDpPanels * 32;
      for (int64_t b0 = 0; b0 < blocks; b0 += kDpChunk / kDpRows) {
        const int64_t b1 = std::min(blocks, b0 + kDpChunk / kDpRows);
        for (int64_t kb0 = 0; kb0 < kbs; kb0 += kDpSlice) {
          const int64_t kb1 = std::min(kbs, kb0 + kDpSlice);
          for (int64_t nb = nb0; nb < nb1; ++nb) {
            // The slice that comes next (the next panel's, else the first panel's next one) is
            // prefetched while this slice's first row block runs: the hardware's prefetch alone left
            // the read unhidden (a 2B decoder's 4 layers at 24 rows 44 -> 28 ms, 48: 70 -> 53).
            const bool last_panel = nb + 1 == nb1;
            const int64_t pkb = last_panel ? kb1 : kb0, pnb = last_panel ? nb0 : nb + 1;
            const uint16_t* next = pkb < kbs && std::min(kbs, pkb + kDpSlice) - pkb == kb1 - kb0
                                       ? ws + (pnb * kbs + pkb) * 1024 : nullptr;
            for (int64_t bl = b0; bl < b1; ++bl) {
              if (bl * kDpRows >= lo && std::min(m, (bl + 1) * kDpRows) <= hi) continue;  // skipped rows
              const int rows = static_cast<int>(std::min<int64_t>(kDpRows, m - bl * kDpRows));
              float* c = cbuf.data() + (bl - b0) * kDpRows * ldc + (nb - nb0) * 32;
              DpBlockK(rows, xp + bl * (k / 2) * kDpRows, ws, kbs, kb0, kb1, c, ldc, y, n, bl * kDpRows, nb, next);
              next = nullptr;
            }
          }
        }
      }
    });
  }
  Buffers().Give(std::move(buf));
}
#endif

ffi::Error GemmPacked(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer wp, ffi::Buffer<ffi::S32> skip,
                      ffi::Result<ffi::AnyBuffer> out) {
  auto xd = x.dimensions(), wd = wp.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 5 || od.size() != 2 || wd[2] != 2 || wd[3] != 16 || wd[4] != 32)
    return ffi::Error::InvalidArgument("qvl_gemm_packed: x [m, k], wp [n/32, k/32, 2, 16, 32], out [m, n]");
  const int64_t m = xd[0], k = xd[1], nbs = wd[0], kbs = wd[1], n = nbs * 32;
  if (kbs * 32 != k || od[0] != m || od[1] != n)
    return ffi::Error::InvalidArgument("qvl_gemm_packed: shapes do not agree");
  const bool f32_out = out->element_type() == ffi::DataType::F32;
  if (x.element_type() != ffi::DataType::BF16 || wp.element_type() != ffi::DataType::BF16 ||
      (!f32_out && out->element_type() != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("qvl_gemm_packed: bfloat16 operands, a bfloat16 or float32 result");
  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* ws = static_cast<const uint16_t*>(wp.untyped_data());
  uint16_t* y = static_cast<uint16_t*>(out->untyped_data());
  float* y32 = static_cast<float*>(out->untyped_data());
  if (m == 0) return ffi::Error::Success();
  if (skip.element_count() != 2) return ffi::Error::InvalidArgument("qvl_gemm_packed: skip [2] (lo, hi)");
  // Rows [lo, hi) (a mixed step's padding) are not computed: their outputs are zeros.
  const int64_t lo = std::clamp<int64_t>(skip.typed_data()[0], 0, m);
  const int64_t hi = std::clamp<int64_t>(skip.typed_data()[1], lo, m);
  const auto skipped = [lo, hi](int64_t r) { return r >= lo && r < hi; };
  for (int64_t r = lo; r < hi; ++r) {
    if (f32_out)
      std::fill(y32 + r * n, y32 + (r + 1) * n, 0.0f);
    else
      std::fill(y + r * n, y + (r + 1) * n, uint16_t{0});
  }
#if defined(QVL_AMX)
  if (AmxReady()) {
    const int64_t mp = (m + 31) / 32 * 32;
    auto buf = Buffers().Take(static_cast<size_t>(mp * k / 2));  // mp * k bfloat16
    uint16_t* xp = reinterpret_cast<uint16_t*>(buf->data());
    ParallelFor(pool, mp / 16, [&](int64_t b) {  // x into [16 rows x 32] blocks, rows past m zero
      for (int64_t kb = 0; kb < kbs; ++kb)
        for (int j = 0; j < 16; ++j) {
          const int64_t r = b * 16 + j;
          __m512i v = r < m && !skipped(r) ? _mm512_loadu_si512(xs + r * k + kb * 32) : _mm512_setzero_si512();
          _mm512_storeu_si512(xp + ((b * kbs + kb) * 16 + j) * 32, v);
        }
    });
    const int64_t chunk = std::max<int64_t>(32, std::min<int64_t>(mp, kGemmChunkBytes / (2 * k) / 32 * 32));
    const int64_t chunks = (mp + chunk - 1) / chunk, groups = std::min<int64_t>(nbs, 8);
    ParallelFor(pool, chunks * groups, [&](int64_t t) {  // chunk-major: the threads share a chunk of x
      const int64_t ch = t / groups, g = t % groups;
      const int64_t r0 = ch * chunk, r1 = std::min(mp, (ch + 1) * chunk), n0 = g * nbs / groups, n1 = (g + 1) * nbs / groups;
      if (f32_out)
        GemmTask(xp, ws, y32, m, n, kbs, r0, r1, n0, n1, lo, hi);
      else
        GemmTask(xp, ws, y, m, n, kbs, r0, r1, n0, n1, lo, hi);
    });
    Buffers().Give(std::move(buf));
    return ffi::Error::Success();
  }
#endif
#if defined(QVL_DPBF16)
  if (f32_out)
    DpGemm(pool, xs, m, k, ws, nbs, y32, lo, hi);
  else
    DpGemm(pool, xs, m, k, ws, nbs, y, lo, hi);
  return ffi::Error::Success();
#endif
  ParallelFor(pool, m, [&](int64_t r) {
    if (skipped(r)) return;
    std::vector<float> acc(n, 0.0f);
    for (int64_t nb = 0; nb < nbs; ++nb)
      for (int64_t kb = 0; kb < kbs; ++kb)
        for (int h = 0; h < 2; ++h) {
          const uint16_t* blk = ws + ((nb * kbs + kb) * 2 + h) * 512;
          for (int i = 0; i < 16; ++i) {
            const float x0 = bf16_to_f32(xs[r * k + kb * 32 + 2 * i]), x1 = bf16_to_f32(xs[r * k + kb * 32 + 2 * i + 1]);
            for (int j = 0; j < 16; ++j)
              acc[nb * 32 + h * 16 + j] += x0 * bf16_to_f32(blk[i * 32 + 2 * j]) + x1 * bf16_to_f32(blk[i * 32 + 2 * j + 1]);
          }
        }
    for (int64_t j = 0; j < n; ++j) {
      if (f32_out)
        y32[r * n + j] = acc[j];
      else
        y[r * n + j] = f32_to_bf16(acc[j]);
    }
  });
  return ffi::Error::Success();
}

// Bytes of one row of a buffer [n, ...] (its leading dimension indexed), and n.
inline void RowShape(const ffi::AnyBuffer& b, int64_t& n, size_t& bytes) {
  auto d = b.dimensions();
  n = d.size() == 0 ? 0 : d[0];
  bytes = n == 0 ? 0 : b.size_bytes() / n;
}

// out[i] = table[ids[i]] for ids [m] (an id outside [0, n) gives a zero row).
ffi::Error TakeRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::AnyBuffer> out) {
  int64_t n, m = ids.element_count();
  size_t bytes;
  RowShape(table, n, bytes);
  if (out->element_type() != table.element_type() || out->size_bytes() != m * bytes)
    return ffi::Error::InvalidArgument("qvl_take_rows: out must be [ids, row of table] in table's dtype");
  const char* src = static_cast<const char*>(table.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < m; ++i) {
    if (id[i] >= 0 && id[i] < n)
      std::memcpy(dst + i * bytes, src + static_cast<int64_t>(id[i]) * bytes, bytes);
    else
      std::memset(dst + i * bytes, 0, bytes);
  }
  return ffi::Error::Success();
}

// table[at[i]] = rows[i] for at [m], in place: out is table's buffer (the caller aliases them). An
// index outside [0, n) is dropped, as XLA's scatter drops it; of two rows for one index the later wins.
ffi::Error PutRows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> at, ffi::AnyBuffer rows,
                   ffi::Result<ffi::AnyBuffer> out) {
  int64_t n, m = at.element_count();
  size_t bytes;
  RowShape(table, n, bytes);
  if (rows.element_type() != table.element_type() || rows.size_bytes() != m * bytes ||
      out->size_bytes() != table.size_bytes())
    return ffi::Error::InvalidArgument("qvl_put_rows: rows must be [at, row of table] in table's dtype");
  char* dst = static_cast<char*>(out->untyped_data());
  if (dst != table.untyped_data()) std::memcpy(dst, table.untyped_data(), table.size_bytes());
  const char* src = static_cast<const char*>(rows.untyped_data());
  const int32_t* idx = at.typed_data();
  for (int64_t i = 0; i < m; ++i)
    if (idx[i] >= 0 && idx[i] < n) std::memcpy(dst + static_cast<int64_t>(idx[i]) * bytes, src + i * bytes, bytes);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlTakeRows, TakeRows,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlPutRows, PutRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlPagedDecode, PagedDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlPagedPrefillPacked, PagedPrefillPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlGemmPacked, GemmPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(QvlPagedPrefill, PagedPrefill,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block_size"));

// What runs this build's packed bfloat16 products: 1 AMX tiles, 2 AVX512_BF16 vectors (the compiler
// targeted them), 0 the plain loop: what `cpu_kernel.product_unit()` reads to choose packed weights
// by default.
extern "C" int QvlProductUnit() {
#if defined(QVL_AMX)
  return 1;
#elif defined(QVL_DPBF16)
  return 2;
#else
  return 0;
#endif
}
