// CPU kernels of the attention family: prefill_attention (varlen, causal or not, K/V contiguous) and
// paged_attention (new queries over a paged KV cache; decode is one query per sequence).
//
// Math, per query q_i and head: o_i = sum_j p_ij v_j / sum_j p_ij, p_ij = exp(scale * q_i . k_j - m_i), over
// the keys j the query sees (all of its sequence; j <= i when causal; for paged, cached positions
// <= seq_len - q_len + i). Computed as an online softmax over chunks of kKeyChunk keys (flash-attention's
// recurrence): per chunk S = scale * Q K^T, m' = max(m, rowmax S), P = exp(S - m'), l = l exp(m - m') + rowsum P,
// O = O exp(m - m') + P V; o = O / l at the end. fp32 throughout.
// Layouts: q, k, v [T, H, D] with element strides (token, head, 1); caches [num_pages, page_size, H, D]
// contiguous (a page holds page_size rows of one head at stride H * D); out [T, H, D] contiguous.
// Each chunk's keys are widened to fp32 and transposed into Kt [D, kKeyChunk] and its values into
// V [kKeyChunk, D] (per-thread buffers, whatever the dtype or paging), so both products are small dense GEMMs
// on register tiles of kTileRows queries x kTileCols columns: AVX2+FMA intrinsics when the CPU has them
// (checked at run time; PHI_FAST_CPU_PORTABLE=1 opts out), else portable loops that the compiler vectorizes.
// Threads: one task per (sequence, block of up to kQueryBlock queries, head), OpenMP dynamic schedule (causal
// blocks differ in cost). head_dim must be a multiple of kTileCols = 16 (64 and 80 are).
#include "cpu/attention.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu/kernel_utils.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kQueryBlock = 32;  // queries sharing each widened K/V chunk in one task
constexpr int64_t kKeyChunk = 64;    // keys per online-softmax step
constexpr int64_t kTileRows = 4;     // register tile: query rows ...
constexpr int64_t kTileCols = 16;    // ... x output columns; key chunks are zero-padded to a multiple of this
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Portable register tile, rows x kTileCols: c[r][j] = (accumulate ? c[r][j] : 0) + sum_k a[r * lda + k] b[k * ldb + j].
// The inner loop over j is unit-stride and vectorizes; acc stays in registers.
template <int64_t rows, bool accumulate>
inline void gemm_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                      float* __restrict c, int64_t ldc, int64_t depth) {
  float acc[rows][kTileCols] = {};
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    for (int64_t r = 0; r < rows; ++r) {
      const float ar = a[r * lda + k];
      for (int64_t j = 0; j < kTileCols; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < kTileCols; ++j) c[r * ldc + j] = (accumulate ? c[r * ldc + j] : 0.0f) + acc[r][j];
  }
}

// C[m, n] (+)= A[m, depth] B[depth, n] with the portable tiles; n a multiple of kTileCols.
template <bool accumulate>
void small_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                int64_t n, int64_t depth) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    for (int64_t j = 0; j < n; j += kTileCols) {
      gemm_tile<kTileRows, accumulate>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
  }
  for (; i < m; ++i) {
    for (int64_t j = 0; j < n; j += kTileCols) {
      gemm_tile<1, accumulate>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same tiles with AVX2 + FMA intrinsics (rows x 16 columns = 2 * rows ymm accumulators), compiled for that
// target only and chosen at run time when the CPU has it: about 2.5x the portable tiles' throughput.
#define PHI_FAST_CPU_AVX2 1

template <int64_t rows, bool accumulate>
__attribute__((target("avx2,fma"))) inline void gemm_tile_avx2(const float* a, int64_t lda, const float* b,
                                                               int64_t ldb, float* c, int64_t ldc, int64_t depth) {
  __m256 acc[rows][2];
  for (int64_t r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
    for (int64_t r = 0; r < rows; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(cr));
      acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, acc[r][0]);
    _mm256_storeu_ps(cr + 8, acc[r][1]);
  }
}

template <bool accumulate>
__attribute__((target("avx2,fma"))) void small_gemm_avx2(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                          float* c, int64_t ldc, int64_t m, int64_t n, int64_t depth) {
  static_assert(kTileCols == 16, "the AVX2 tile is two ymm registers wide");
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    for (int64_t j = 0; j < n; j += kTileCols) {
      gemm_tile_avx2<kTileRows, accumulate>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
  }
  for (; i < m; ++i) {
    for (int64_t j = 0; j < n; j += kTileCols) {
      gemm_tile_avx2<1, accumulate>(a + i * lda, lda, b + j, ldb, c + i * ldc + j, ldc, depth);
    }
  }
}

// Whether to use the AVX2 tiles: the CPU has AVX2 and FMA, and PHI_FAST_CPU_PORTABLE=1 does not ask for the
// portable ones (which is how the tests reach them on AVX2 machines).
bool use_avx2_tiles() {
  static const bool use = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("PHI_FAST_CPU_PORTABLE") == nullptr;
  return use;
}
#endif

// C[m, n] (+)= A[m, depth] B[depth, n], row-major with leading dims lda, ldb, ldc; n a multiple of kTileCols.
template <bool accumulate>
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m, int64_t n,
          int64_t depth) {
#ifdef PHI_FAST_CPU_AVX2
  if (use_avx2_tiles()) return small_gemm_avx2<accumulate>(a, lda, b, ldb, c, ldc, m, n, depth);
#endif
  small_gemm<accumulate>(a, lda, b, ldb, c, ldc, m, n, depth);
}

// One unit of work: queries [first_query, first_query + num_queries) of `seq`, head `head`.
struct Task {
  int64_t seq, first_query, num_queries, head;
};

// Per-thread state of up to kQueryBlock queries (fp32 q, running max/sum, unnormalized output) and the
// scratch of one chunk: Kt [D, kKeyChunk], V [kKeyChunk, D], scores/probabilities [kQueryBlock, kKeyChunk].
class QueryBlock {
 public:
  explicit QueryBlock(int64_t head_dim)
      : d_(head_dim), q_(kQueryBlock * head_dim), out_(kQueryBlock * head_dim), max_(kQueryBlock),
        sum_(kQueryBlock), keys_t_(head_dim * kKeyChunk), values_(kKeyChunk * head_dim),
        scores_(kQueryBlock * kKeyChunk) {}

  // Loads nq query rows (row stride q_stride) and clears the accumulators.
  template <typename T>
  void start(const T* q, int64_t q_stride, int64_t nq) {
    nq_ = nq;
    for (int64_t i = 0; i < nq; ++i) load_row(q_.data() + i * d_, q + i * q_stride, d_);
    std::fill(out_.begin(), out_.begin() + nq * d_, 0.0f);
    std::fill(max_.begin(), max_.begin() + nq, kNegInf);
    std::fill(sum_.begin(), sum_.begin() + nq, 0.0f);
  }

  // Widens chunk keys/values j < n, given as row pointers key_row(j), value_row(j), into Kt and V.
  template <typename T, typename KeyRow, typename ValueRow>
  void load_chunk(int64_t n, KeyRow key_row, ValueRow value_row) {
    const int64_t padded = round_up(n);
    for (int64_t j = 0; j < n; ++j) {
      const T* k = key_row(j);
      for (int64_t c = 0; c < d_; ++c) keys_t_[c * kKeyChunk + j] = to_float(k[c]);
      load_row(values_.data() + j * d_, value_row(j), d_);
    }
    for (int64_t c = 0; c < d_; ++c) {  // zero key columns up to the tile width: finite, masked scores
      std::fill(keys_t_.begin() + c * kKeyChunk + n, keys_t_.begin() + c * kKeyChunk + padded, 0.0f);
    }
  }

  // Folds the loaded chunk (keys key0 .. key0 + n - 1) into the state. Query i sees keys with index
  // <= first_limit + i when causal, all keys otherwise.
  void attend(int64_t key0, int64_t n, float scale, bool causal, int64_t first_limit) {
    const int64_t padded = round_up(n);
    float* s = scores_.data();
    gemm<false>(q_.data(), d_, keys_t_.data(), kKeyChunk, s, kKeyChunk, nq_, padded, d_);  // S = Q Kt
    for (int64_t i = 0; i < nq_; ++i) {
      float* si = s + i * kKeyChunk;
      const int64_t visible = causal ? std::clamp<int64_t>(first_limit + i - key0 + 1, 0, n) : n;
      float chunk_max = kNegInf;
      for (int64_t j = 0; j < visible; ++j) chunk_max = std::max(chunk_max, si[j] * scale);
      const float new_max = std::max(max_[i], chunk_max);
      float chunk_sum = 0.0f;
      if (new_max != kNegInf) {  // some score so far is finite: p = exp(s - max)
#pragma omp simd reduction(+ : chunk_sum)
        for (int64_t j = 0; j < visible; ++j) {
          si[j] = exp_f32(si[j] * scale - new_max);
          chunk_sum += si[j];
        }
      }
      std::fill(si + (new_max != kNegInf ? visible : 0), si + n, 0.0f);  // masked keys weigh nothing
      const float rescale = new_max != kNegInf ? exp_f32(max_[i] - new_max) : 1.0f;
      max_[i] = new_max;
      sum_[i] = sum_[i] * rescale + chunk_sum;
      if (rescale != 1.0f) {
        float* oi = out_.data() + i * d_;
        for (int64_t c = 0; c < d_; ++c) oi[c] *= rescale;
      }
    }
    gemm<true>(s, kKeyChunk, values_.data(), d_, out_.data(), d_, nq_, d_, n);  // O += P V
  }

  // Writes o_i = O_i / l_i to out rows (row stride out_stride).
  template <typename T>
  void finish(T* out, int64_t out_stride) const {
    for (int64_t i = 0; i < nq_; ++i) {
      const float inv = 1.0f / sum_[i];
      const float* oi = out_.data() + i * d_;
      T* o = out + i * out_stride;
      for (int64_t c = 0; c < d_; ++c) o[c] = from_float<T>(oi[c] * inv);
    }
  }

 private:
  static int64_t round_up(int64_t n) { return (n + kTileCols - 1) / kTileCols * kTileCols; }

  int64_t d_, nq_ = 0;
  std::vector<float> q_, out_, max_, sum_, keys_t_, values_, scores_;
};

// Tasks of sequences whose queries are token ranges [query_bounds[s], query_bounds[s + 1]).
std::vector<Task> make_tasks(const int32_t* query_bounds, int64_t num_seqs, int64_t num_heads) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t q0 = query_bounds[s]; q0 < query_bounds[s + 1]; q0 += kQueryBlock) {
      const int64_t nq = std::min<int64_t>(kQueryBlock, query_bounds[s + 1] - q0);
      for (int64_t h = 0; h < num_heads; ++h) tasks.push_back({s, q0, nq, h});
    }
  }
  return tasks;
}

void check_head_dim(int64_t head_dim) {
  if (head_dim % kTileCols != 0) {
    throw std::invalid_argument("phi_fast cpu attention: head_dim " + std::to_string(head_dim) +
                                " is not a multiple of " + std::to_string(kTileCols));
  }
}

template <typename T>
void prefill_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* k, int64_t k_ts,
                              int64_t k_hs, const T* v, int64_t v_ts, int64_t v_hs, const int32_t* cu_seqlens,
                              int64_t num_seqs, int64_t num_heads, int64_t head_dim, float scale, bool causal) {
  const std::vector<Task> tasks = make_tasks(cu_seqlens, num_seqs, num_heads);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel if (num_tasks > 1)
  {
    QueryBlock block(head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task& task = tasks[t];
      const int64_t seq_start = cu_seqlens[task.seq], h = task.head;
      const int64_t first = task.first_query - seq_start;  // index of the block's first query in its sequence
      const int64_t key_end = causal ? first + task.num_queries : cu_seqlens[task.seq + 1] - seq_start;
      block.start(q + task.first_query * q_ts + h * q_hs, q_ts, task.num_queries);
      for (int64_t key0 = 0; key0 < key_end; key0 += kKeyChunk) {
        const T* k0 = k + (seq_start + key0) * k_ts + h * k_hs;
        const T* v0 = v + (seq_start + key0) * v_ts + h * v_hs;
        const int64_t n = std::min(kKeyChunk, key_end - key0);
        block.load_chunk<T>(n, [&](int64_t j) { return k0 + j * k_ts; }, [&](int64_t j) { return v0 + j * v_ts; });
        block.attend(key0, n, scale, causal, first);
      }
      block.finish(out + (task.first_query * num_heads + h) * head_dim, num_heads * head_dim);
    }
  }
}

template <typename T>
void paged_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* key_cache,
                            const T* value_cache, const int32_t* block_table, int64_t block_table_stride,
                            const int32_t* seq_lens, const int32_t* cu_seqlens_q, int64_t num_seqs,
                            int64_t num_heads, int64_t head_dim, int64_t page_size, float scale) {
  const std::vector<Task> tasks = make_tasks(cu_seqlens_q, num_seqs, num_heads);
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t row_stride = num_heads * head_dim;  // between consecutive tokens of one head in a page
#pragma omp parallel if (num_tasks > 1)
  {
    QueryBlock block(head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t) {
      const Task& task = tasks[t];
      const int64_t s = task.seq, h = task.head;
      const int64_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
      // The block's first query sits at cached position seq_len - q_len + (its index among the new queries).
      const int64_t first_limit = seq_lens[s] - q_len + (task.first_query - cu_seqlens_q[s]);
      const int64_t key_end = first_limit + task.num_queries;
      const int32_t* pages = block_table + s * block_table_stride;
      // Row of cached position p for head h: page pages[p / page_size], slot p % page_size.
      auto row = [&](const T* cache, int64_t p) {
        return cache + ((static_cast<int64_t>(pages[p / page_size]) * page_size + p % page_size) * num_heads + h) *
                           head_dim;
      };
      block.start(q + task.first_query * q_ts + h * q_hs, q_ts, task.num_queries);
      for (int64_t key0 = 0; key0 < key_end; key0 += kKeyChunk) {
        const int64_t n = std::min(kKeyChunk, key_end - key0);
        block.load_chunk<T>(n, [&](int64_t j) { return row(key_cache, key0 + j); },
                            [&](int64_t j) { return row(value_cache, key0 + j); });
        block.attend(key0, n, scale, true, first_limit);
      }
      block.finish(out + (task.first_query * num_heads + h) * head_dim, row_stride);
    }
  }
}

}  // namespace

void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t /*num_tokens*/,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype) {
  check_head_dim(head_dim);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    prefill_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                             static_cast<const T*>(k), k_token_stride, k_head_stride, static_cast<const T*>(v),
                             v_token_stride, v_head_stride, cu_seqlens, num_seqs, num_heads, head_dim, scale,
                             causal);
  });
}

void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t /*num_tokens*/, int64_t num_heads, int64_t head_dim,
                     int64_t page_size, int64_t /*max_pages_per_seq*/, float scale, DType dtype) {
  check_head_dim(head_dim);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    paged_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                           static_cast<const T*>(key_cache), static_cast<const T*>(value_cache), block_table,
                           block_table_stride, seq_lens, cu_seqlens_q, num_seqs, num_heads, head_dim, page_size,
                           scale);
  });
}

}  // namespace phi_fast::cpu
