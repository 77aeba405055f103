// The engine's CPU kernels, XLA FFI handlers (`qvl_jax.engine.cpu_kernel` compiles this file on
// first use and registers them):
// - QvlPagedDecode: decode attention over the paged KV cache, reading each row's blocks where they lie;
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
#include <thread>
#include <vector>

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
  int64_t end = p.window;
  while (end > 0 && !mask[end - 1]) --end;
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

template <typename T>
void Run(const Problem& p, ffi::ThreadPool& pool) {
  // Tasks of whole rows read each key's heads as one contiguous run; a few rows are split over kv
  // heads so that every thread has work.
  int64_t split = 1;
  while (p.rows * split < 8 && p.kv % (split * 2) == 0) split *= 2;
  const int64_t per = p.kv / split, tasks = p.rows * split;
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [p, tasks, split, per, shared]() {
    std::vector<float> buf;
    for (int64_t t; (t = shared->next.fetch_add(1)) < tasks;) {
      Task<T>(p, t / split, (t % split) * per, (t % split + 1) * per, buf);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  // Helpers on XLA's intra-op pool take tasks while this thread takes them too; a helper that starts
  // late finds none left, so this never waits on a helper that has not begun.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

ffi::Error PagedDecode(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kp, ffi::AnyBuffer vp,
                       ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> out,
                       int64_t block_size) {
  auto qd = q.dimensions(), kd = kp.dimensions(), td = table.dimensions(), md = mask.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || td.size() != 2 || md.size() != 2)
    return ffi::Error::InvalidArgument("qvl_paged_decode: q [r, n, h], pools [slots, kv, h], table [r, blocks], mask [r, window]");
  if (q.element_type() != kp.element_type() || kp.element_type() != vp.element_type() ||
      out->element_type() != q.element_type())
    return ffi::Error::InvalidArgument("qvl_paged_decode: q, the pools and out must share one dtype");
  Problem p{qd[0], qd[1], kd[1], qd[2], td[1], md[1], block_size, q.untyped_data(), kp.untyped_data(),
            vp.untyped_data(), table.typed_data(), mask.typed_data(), out->untyped_data()};
  if (kd[2] != p.h || p.heads % p.kv != 0 || td[0] != p.rows || md[0] != p.rows || p.window > p.blocks * block_size)
    return ffi::Error::InvalidArgument("qvl_paged_decode: shapes do not agree");
  if (p.rows == 0) return ffi::Error::Success();
  switch (q.element_type()) {
    case ffi::DataType::F32:
      Run<float>(p, pool);
      break;
    case ffi::DataType::BF16:
      Run<uint16_t>(p, pool);
      break;
    default:
      return ffi::Error::InvalidArgument("qvl_paged_decode: float32 or bfloat16 only");
  }
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
