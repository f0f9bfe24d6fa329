// CPU kernels of the attention family: prefill_attention (varlen, causal or not, K/V contiguous) and
// paged_attention (new queries over a paged KV cache; decode is one query per sequence).
//
// Math, per query q_i and head: o_i = sum_j p_ij v_j / sum_j p_ij, p_ij = exp(scale * q_i . k_j - m_i), over
// the keys j the query sees (all of its sequence; j <= i when causal; for paged, cached positions
// <= seq_len - q_len + i). fp32 throughout. Layouts: q, k, v [T, H, D] with element strides (token, head, 1);
// caches [num_pages, page_size, H, D] contiguous (a page holds page_size rows of one head at stride H * D);
// out [T, H, D] contiguous.
//
// Blocks of queries (prefill, and paged with q_len > 1): an online softmax over chunks of kKeyChunk keys
// (flash-attention's recurrence): per chunk S = scale * Q K^T, m' = max(m, rowmax S), P = exp(S - m'),
// l = l exp(m - m') + rowsum P, O = O exp(m - m') + P V; o = O / l at the end. Each chunk's keys are widened to
// fp32 and transposed into Kt [D, kKeyChunk] and its values into V [kKeyChunk, D] (per-thread buffers, whatever
// the dtype or paging), so both products are small dense GEMMs on register tiles of kTileRows queries x
// kTileCols columns.
// A single query (decode): nothing is copied; three passes over the sequence's cache rows, read in place.
// Pass 1 walks the K rows in memory order (a cached row holds every head) and computes s[p, h] =
// (scale q_h) . k_p,h, fp32 dot products straight from the rows, 4 heads at a time; pass 2 turns s into
// p = exp(s - max) with l_h = sum_p p[p, h] (per-thread buffer [len, heads]); pass 3 walks the V pages,
// o_h = (sum_p p[p, h] v_p,h) / l_h, each head's output columns in registers over a page's rows. Every K and V
// element is read once. The AVX2 passes prefetch the next page's rows into L2 while they use a page's.
// Both paths have AVX2 + FMA (+ F16C) versions, chosen at run time (vec_avx2.h: PHI_FAST_CPU_PORTABLE=1 opts
// out), and portable loops. head_dim must be a multiple of kTileCols = 16 (64 and 80 are).
// Threads: tasks are (sequence, block of up to kQueryBlock queries, head) for blocks and (sequence, group of
// heads) for a single query (one group per sequence unless there are fewer sequences than threads), handed out
// one at a time from a shared counter (costs differ: causal blocks, mixed lengths; a thread the OS delays just
// takes fewer). A team is formed only when the estimated work pays for it (kernel_utils.h): decode over a
// short context on a small model runs on the calling thread.
#include "cpu/attention.h"

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/vec_avx2.h"

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

#ifdef PHI_FAST_CPU_AVX2
// The same tiles with AVX2 + FMA intrinsics (rows x 16 columns = 2 * rows ymm accumulators), compiled for that
// target only and chosen at run time when the CPU has it: about 2.5x the portable tiles' throughput.

template <int64_t rows, bool accumulate>
PHI_FAST_TARGET_AVX2 inline void gemm_tile_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                                int64_t ldc, int64_t depth) {
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
PHI_FAST_TARGET_AVX2 void small_gemm_avx2(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                          int64_t ldc, int64_t m, int64_t n, int64_t depth) {
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
#endif

// C[m, n] (+)= A[m, depth] B[depth, n], row-major with leading dims lda, ldb, ldc; n a multiple of kTileCols.
template <bool accumulate>
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m, int64_t n,
          int64_t depth) {
#ifdef PHI_FAST_CPU_AVX2
  if (avx2::enabled()) return small_gemm_avx2<accumulate>(a, lda, b, ldb, c, ldc, m, n, depth);
#endif
  small_gemm<accumulate>(a, lda, b, ldb, c, ldc, m, n, depth);
}

// One unit of work: queries [first_query, first_query + num_queries) of `seq`, heads [head, head + num_heads)
// (one head for a block of queries; a group of heads for a single query).
struct Task {
  int64_t seq, first_query, num_queries, head, num_heads;
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

// ---- a single query over paged rows (decode) ----

// Where a sequence's cached rows are: position p is row p % page_size of page pages[p / page_size], and row r of
// page g starts at cache[(g * page_size + r) * row_stride]. The caches are offset to the task's first head;
// head i of the task is i * head_dim further.
template <typename T>
struct PagedRows {
  const T* key_cache;
  const T* value_cache;
  const int32_t* pages;
  int64_t page_size, row_stride;

  int64_t page_offset(int64_t page_index) const {
    return static_cast<int64_t>(pages[page_index]) * page_size * row_stride;
  }
};

// How many pages ahead of its use decode prefetches a page's rows (prefetch_l2): 1 and 2 measured alike.
constexpr int64_t kPagesAhead = 1;

// [p, p + bytes) into L2, a line at a time: a later page's rows while this page's are used. The pages of a
// sequence lie anywhere in the cache and a task reads a slice of each row (its heads), so the hardware prefetchers
// find no stream to follow: without this, decode over a long context read its cold K/V at a third of the
// bandwidth the same kernel reaches from L3 (bench/NOTES.md).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p), end = begin + bytes;
  for (uintptr_t line = begin & ~uintptr_t{63}; line < end; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

// Floats of per-thread scratch a single query over `heads` heads and `len` positions needs.
int64_t decode_scratch_floats(int64_t heads, int64_t len, int64_t d) { return heads * (2 * d + len + 2); }

// Portable decode of one query over positions 0 .. len - 1, head by head: out = softmax(scale q K^T) V.
// q: [heads, D] with head stride q_hs; out: [heads, D] contiguous.
template <typename T>
void decode_query(T* out, const T* q, int64_t q_hs, const PagedRows<T>& rows, int64_t len, int64_t heads,
                  int64_t d, float scale, float* scratch) {
  float* qf = scratch;         // [D] scale * q
  float* acc = scratch + d;    // [D] sum_p p v_p
  float* s = scratch + 2 * d;  // [len] scores, then probabilities
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t c = 0; c < d; ++c) qf[c] = to_float(q[i * q_hs + c]) * scale;
    float max_score = kNegInf;
    for (int64_t p0 = 0, g = 0; p0 < len; p0 += rows.page_size, ++g) {
      const T* k = rows.key_cache + rows.page_offset(g) + i * d;
      const int64_t n = std::min(rows.page_size, len - p0);
      for (int64_t j = 0; j < n; ++j) {
        const T* kj = k + j * rows.row_stride;
        float dot = 0.0f;
        for (int64_t c = 0; c < d; ++c) dot += qf[c] * to_float(kj[c]);
        s[p0 + j] = dot;
        max_score = std::max(max_score, dot);
      }
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < len; ++p) {
      s[p] = exp_f32(s[p] - max_score);
      sum += s[p];
    }
    std::fill(acc, acc + d, 0.0f);
    for (int64_t p0 = 0, g = 0; p0 < len; p0 += rows.page_size, ++g) {
      const T* v = rows.value_cache + rows.page_offset(g) + i * d;
      const int64_t n = std::min(rows.page_size, len - p0);
      for (int64_t j = 0; j < n; ++j) {
        const T* vj = v + j * rows.row_stride;
        const float pj = s[p0 + j];
        for (int64_t c = 0; c < d; ++c) acc[c] += pj * to_float(vj[c]);
      }
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < d; ++c) out[i * d + c] = from_float<T>(acc[c] * inv);
  }
}

#ifdef PHI_FAST_CPU_AVX2
// The 4 dot products a_i . b_i of d values (d a multiple of 8).
template <typename T>
PHI_FAST_TARGET_AVX2 inline __m128 dot4_avx2(const float* a0, const float* a1, const float* a2, const float* a3,
                                             const T* b0, const T* b1, const T* b2, const T* b3, int64_t d) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + c), avx2::load8(b0 + c), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + c), avx2::load8(b1 + c), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + c), avx2::load8(b2 + c), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + c), avx2::load8(b3 + c), s3);
  }
  return avx2::hsum4(s0, s1, s2, s3);
}

template <typename T>
PHI_FAST_TARGET_AVX2 inline float dot_avx2(const float* a, const T* b, int64_t d) {
  __m256 s = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), avx2::load8(b + c), s);
  return avx2::hsum(s);
}

// Scores of one cached row (all `heads` heads, contiguous) against the heads' scaled queries qf [heads, D]:
// s[i] = qf_i . row_i, 4 heads at a time; max[i] = max(max[i], s[i]).
template <typename T>
PHI_FAST_TARGET_AVX2 void row_scores_avx2(float* s, float* max, const float* qf, const T* row, int64_t heads,
                                          int64_t d) {
  int64_t i = 0;
  for (; i + 4 <= heads; i += 4) {
    const float* q0 = qf + i * d;
    const T* r0 = row + i * d;
    const __m128 four = dot4_avx2(q0, q0 + d, q0 + 2 * d, q0 + 3 * d, r0, r0 + d, r0 + 2 * d, r0 + 3 * d, d);
    _mm_storeu_ps(s + i, four);
    _mm_storeu_ps(max + i, _mm_max_ps(_mm_loadu_ps(max + i), four));
  }
  for (; i < heads; ++i) {
    s[i] = dot_avx2(qf + i * d, row + i * d, d);
    max[i] = std::max(max[i], s[i]);
  }
}

// acc += p_j v_j over the n rows v_j = v + j * row_stride with weights p_j = p[j * p_stride], 8 * kChunks
// columns held in registers.
template <int kChunks, typename T>
PHI_FAST_TARGET_AVX2 void accumulate_values_avx2(__m256 (&acc)[kChunks], const float* p, int64_t p_stride,
                                                 const T* v, int64_t row_stride, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T* vj = v + j * row_stride;
    const __m256 pj = _mm256_broadcast_ss(p + j * p_stride);
    for (int u = 0; u < kChunks; ++u) acc[u] = _mm256_fmadd_ps(pj, avx2::load8(vj + 8 * u), acc[u]);
  }
}

// out_i = inv_i sum_p probs[p, i] v_i,p for each head i: per page, each head's 8 * kChunks-column blocks
// accumulate over the page's rows in registers, then go back to acc [heads, D] (L1-resident).
template <int kChunks, typename T>
PHI_FAST_TARGET_AVX2 void weighted_values_avx2(T* out, float* acc, const float* probs, const float* inv,
                                               const PagedRows<T>& rows, int64_t len, int64_t heads, int64_t d) {
  std::fill(acc, acc + heads * d, 0.0f);
  const int64_t num_pages = (len + rows.page_size - 1) / rows.page_size;
  for (int64_t p0 = 0, g = 0; p0 < len; p0 += rows.page_size, ++g) {
    const T* page = rows.value_cache + rows.page_offset(g);
    const int64_t n = std::min(rows.page_size, len - p0);
    // The rows of the page kPagesAhead on, spread over this page's heads: head i's slices with head i.
    const int64_t ahead = g + kPagesAhead;
    const T* next = ahead < num_pages ? rows.value_cache + rows.page_offset(ahead) : page;
    const int64_t n_next = ahead < num_pages ? std::min(rows.page_size, len - ahead * rows.page_size) : 0;
    for (int64_t i = 0; i < heads; ++i) {
      for (int64_t j = 0; j < n_next; ++j) {
        prefetch_l2(next + j * rows.row_stride + i * d, d * static_cast<int64_t>(sizeof(T)));
      }
      for (int64_t c0 = 0; c0 < d; c0 += 8 * kChunks) {
        float* a = acc + i * d + c0;
        __m256 regs[kChunks];
        for (int u = 0; u < kChunks; ++u) regs[u] = _mm256_loadu_ps(a + 8 * u);
        accumulate_values_avx2<kChunks>(regs, probs + p0 * heads + i, heads, page + i * d + c0, rows.row_stride, n);
        for (int u = 0; u < kChunks; ++u) _mm256_storeu_ps(a + 8 * u, regs[u]);
      }
    }
  }
  for (int64_t i = 0; i < heads; ++i) {
    const __m256 vinv = _mm256_set1_ps(inv[i]);
    for (int64_t c = 0; c < d; c += 8) {
      avx2::store8(out + i * d + c, _mm256_mul_ps(_mm256_loadu_ps(acc + i * d + c), vinv));
    }
  }
}

// decode_query with AVX2, all of the task's heads together: pass 1 walks the K rows in memory order (each
// cached row holds every head) writing scores position-major, s [len, heads], so that each row's scores are
// one contiguous store; pass 2 turns them into probabilities (8 heads per vector); pass 3 walks the V pages.
template <typename T>
PHI_FAST_TARGET_AVX2 void decode_query_avx2(T* out, const T* q, int64_t q_hs, const PagedRows<T>& rows, int64_t len,
                                            int64_t heads, int64_t d, float scale, float* scratch) {
  float* qf = scratch;           // [heads, D] scale * q
  float* acc = qf + heads * d;   // [heads, D] sum_p p v_p
  float* s = acc + heads * d;    // [len, heads] scores, then probabilities
  float* max = s + len * heads;  // [heads] running max
  float* sum = max + heads;      // [heads] sum of probabilities, then its inverse
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < heads; ++i) {
    for (int64_t c = 0; c < d; c += 8) {
      _mm256_storeu_ps(qf + i * d + c, _mm256_mul_ps(avx2::load8(q + i * q_hs + c), vscale));
    }
  }
  std::fill(max, max + heads, kNegInf);
  const int64_t num_pages = (len + rows.page_size - 1) / rows.page_size;
  const int64_t slice = heads * d * static_cast<int64_t>(sizeof(T));  // the task's bytes of one cached row
  for (int64_t p0 = 0, g = 0; p0 < len; p0 += rows.page_size, ++g) {
    const T* page = rows.key_cache + rows.page_offset(g);
    // Row j of the page kPagesAhead on: keys, then (past the last page of keys) the first pages of values.
    const int64_t ahead = g + kPagesAhead;
    const T* next = ahead < num_pages ? rows.key_cache + rows.page_offset(ahead)
                    : ahead < 2 * num_pages ? rows.value_cache + rows.page_offset(ahead - num_pages) : nullptr;
    const int64_t n = std::min(rows.page_size, len - p0);
    for (int64_t j = 0; j < n; ++j) {
      if (next != nullptr) prefetch_l2(next + j * rows.row_stride, slice);
      row_scores_avx2(s + (p0 + j) * heads, max, qf, page + j * rows.row_stride, heads, d);
    }
  }
  std::fill(sum, sum + heads, 0.0f);
  for (int64_t p = 0; p < len; ++p) {
    float* sp = s + p * heads;
    int64_t i = 0;
    for (; i + 8 <= heads; i += 8) {
      const __m256 e = avx2::exp8(_mm256_sub_ps(_mm256_loadu_ps(sp + i), _mm256_loadu_ps(max + i)));
      _mm256_storeu_ps(sp + i, e);
      _mm256_storeu_ps(sum + i, _mm256_add_ps(_mm256_loadu_ps(sum + i), e));
    }
    for (; i < heads; ++i) {
      sp[i] = exp_f32(sp[i] - max[i]);
      sum[i] += sp[i];
    }
  }
  for (int64_t i = 0; i < heads; ++i) sum[i] = 1.0f / sum[i];
  if (d % 80 == 0) {
    weighted_values_avx2<10>(out, acc, s, sum, rows, len, heads, d);
  } else if (d % 64 == 0) {
    weighted_values_avx2<8>(out, acc, s, sum, rows, len, heads, d);
  } else {
    weighted_values_avx2<2>(out, acc, s, sum, rows, len, heads, d);
  }
}
#endif

// ---- tasks and the two kernels ----

// Block tasks (one head each) of sequences whose queries are token ranges [query_bounds[s], query_bounds[s + 1]).
// With single_query_groups > 0, a sequence with exactly one query instead gets that many tasks, each over a
// contiguous group of heads (decode reads every head of a cached row together).
std::vector<Task> make_tasks(const int32_t* query_bounds, int64_t num_seqs, int64_t num_heads,
                             int64_t single_query_groups = 0) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = query_bounds[s + 1] - query_bounds[s];
    if (q_len == 1 && single_query_groups > 0) {
      for (int64_t g = 0; g < single_query_groups; ++g) {
        const Range heads = part_of(num_heads, static_cast<int>(g), static_cast<int>(single_query_groups));
        if (heads.begin < heads.end) tasks.push_back({s, query_bounds[s], 1, heads.begin, heads.end - heads.begin});
      }
      continue;
    }
    for (int64_t q0 = query_bounds[s]; q0 < query_bounds[s + 1]; q0 += kQueryBlock) {
      const int64_t nq = std::min<int64_t>(kQueryBlock, query_bounds[s + 1] - q0);
      for (int64_t h = 0; h < num_heads; ++h) tasks.push_back({s, q0, nq, h, 1});
    }
  }
  return tasks;
}

// Estimated single-core nanoseconds of a task: nq queries over `keys` keys of head_dim elements of `bytes` each.
// A single query streams its K and V rows; a block also widens them and runs two GEMMs.
double task_ns(int64_t nq, int64_t keys, int64_t head_dim, size_t bytes) {
  const double streamed = stream_ns(2.0 * keys * head_dim * bytes);
  return nq == 1 ? streamed : streamed + 4.0 * nq * keys * head_dim / kGemmFlopsPerNs;
}

// Runs run_task(task index, thread state) for every task on up to `threads` threads; tasks are taken one at
// a time from a shared counter. State is default-constructed once per thread.
template <typename State, typename RunTask>
void run_tasks(int64_t num_tasks, int threads, RunTask&& run_task) {
  std::atomic<int64_t> next{0};
  run_threads(static_cast<int>(std::min<int64_t>(threads, num_tasks)), [&](int, int team) {
    State state;
    if (team == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) run_task(t, state);
      return;
    }
    for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < num_tasks;
         t = next.fetch_add(1, std::memory_order_relaxed)) {
      run_task(t, state);
    }
  });
}

// Per-thread scratch: a query block (made on first use) and the decode buffer.
struct AttentionScratch {
  std::optional<QueryBlock> block;
  std::vector<float> decode;

  QueryBlock& query_block(int64_t head_dim) {
    if (!block) block.emplace(head_dim);
    return *block;
  }
  float* decode_buffer(int64_t floats) {
    if (static_cast<int64_t>(decode.size()) < floats) decode.resize(floats);
    return decode.data();
  }
};

void check_head_dim(int64_t head_dim) {
  if (head_dim % kTileCols != 0) {
    throw std::invalid_argument("phi_fast cpu attention: head_dim " + std::to_string(head_dim) +
                                " is not a multiple of " + std::to_string(kTileCols));
  }
}

template <typename T>
void prefill_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* k, int64_t k_ts,
                              int64_t k_hs, const T* v, int64_t v_ts, int64_t v_hs, const int32_t* cu_seqlens,
                              int64_t num_seqs, int64_t num_heads, int64_t head_dim, float scale, bool causal,
                              int num_threads) {
  const std::vector<Task> tasks = make_tasks(cu_seqlens, num_seqs, num_heads);
  double work_ns = 0.0;
  for (const Task& task : tasks) {
    const int64_t seq_len = cu_seqlens[task.seq + 1] - cu_seqlens[task.seq];
    const int64_t keys = causal ? task.first_query - cu_seqlens[task.seq] + task.num_queries : seq_len;
    work_ns += task_ns(task.num_queries, keys, head_dim, sizeof(T));
  }
  run_tasks<AttentionScratch>(
      static_cast<int64_t>(tasks.size()), threads_for(work_ns, num_threads), [&](int64_t t, AttentionScratch& scratch) {
        const Task& task = tasks[t];
        QueryBlock& block = scratch.query_block(head_dim);
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
      });
}

template <typename T>
void paged_attention_kernel(T* out, const T* q, int64_t q_ts, int64_t q_hs, const T* key_cache,
                            const T* value_cache, const int32_t* block_table, int64_t block_table_stride,
                            const int32_t* seq_lens, const int32_t* cu_seqlens_q, int64_t num_seqs,
                            int64_t num_heads, int64_t head_dim, int64_t page_size, float scale, int num_threads) {
  // Sequence s's new queries sit at its last q_len cached positions: its query i (from 0) sees positions up to
  // seq_len - q_len + i.
  double work_ns = 0.0;
  int64_t max_len = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s];
    if (q_len == 0) continue;
    max_len = std::max<int64_t>(max_len, seq_lens[s]);
    for (int64_t i = 0; i < q_len; i += kQueryBlock) {
      const int64_t nq = std::min(kQueryBlock, q_len - i);
      work_ns += num_heads * task_ns(nq, seq_lens[s] - q_len + i + nq, head_dim, sizeof(T));
    }
  }
  const int threads = threads_for(work_ns, num_threads);
  // Decode tasks cover groups of heads; split each sequence's heads when there are fewer sequences than threads.
  const int64_t groups = std::clamp<int64_t>((threads + num_seqs - 1) / std::max<int64_t>(num_seqs, 1), 1, num_heads);
  const std::vector<Task> tasks = make_tasks(cu_seqlens_q, num_seqs, num_heads, groups);
  const int64_t row_stride = num_heads * head_dim;  // between consecutive tokens of one head in a page
  const int64_t scratch_floats = decode_scratch_floats((num_heads + groups - 1) / groups, max_len, head_dim);
#ifdef PHI_FAST_CPU_AVX2
  const bool use_avx2 = avx2::enabled();
#endif
  run_tasks<AttentionScratch>(static_cast<int64_t>(tasks.size()), threads, [&](int64_t t, AttentionScratch& scratch) {
    const Task& task = tasks[t];
    const int64_t q_len = cu_seqlens_q[task.seq + 1] - cu_seqlens_q[task.seq];
    const int64_t limit = seq_lens[task.seq] - q_len + (task.first_query - cu_seqlens_q[task.seq]);
    const int64_t key_end = limit + task.num_queries;
    const PagedRows<T> rows{key_cache + task.head * head_dim, value_cache + task.head * head_dim,
                            block_table + task.seq * block_table_stride, page_size, row_stride};
    const T* q_rows = q + task.first_query * q_ts + task.head * q_hs;
    T* out_rows = out + (task.first_query * num_heads + task.head) * head_dim;
    if (task.num_queries == 1) {
      float* buffer = scratch.decode_buffer(scratch_floats);
#ifdef PHI_FAST_CPU_AVX2
      if (use_avx2) {
        return decode_query_avx2(out_rows, q_rows, q_hs, rows, key_end, task.num_heads, head_dim, scale, buffer);
      }
#endif
      return decode_query(out_rows, q_rows, q_hs, rows, key_end, task.num_heads, head_dim, scale, buffer);
    }
    QueryBlock& block = scratch.query_block(head_dim);
    // Row of cached position p: page pages[p / page_size], slot p % page_size.
    auto row = [&](const T* cache, int64_t p) {
      return cache + rows.page_offset(p / page_size) + (p % page_size) * row_stride;
    };
    block.start(q_rows, q_ts, task.num_queries);
    for (int64_t key0 = 0; key0 < key_end; key0 += kKeyChunk) {
      const int64_t n = std::min(kKeyChunk, key_end - key0);
      block.load_chunk<T>(n, [&](int64_t j) { return row(rows.key_cache, key0 + j); },
                          [&](int64_t j) { return row(rows.value_cache, key0 + j); });
      block.attend(key0, n, scale, true, limit);
    }
    block.finish(out_rows, row_stride);
  });
}

}  // namespace

void prefill_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride, const void* k,
                       int64_t k_token_stride, int64_t k_head_stride, const void* v, int64_t v_token_stride,
                       int64_t v_head_stride, const int32_t* cu_seqlens, int64_t num_seqs, int64_t /*num_tokens*/,
                       int64_t num_heads, int64_t head_dim, float scale, bool causal, DType dtype, int num_threads) {
  check_head_dim(head_dim);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    prefill_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                             static_cast<const T*>(k), k_token_stride, k_head_stride, static_cast<const T*>(v),
                             v_token_stride, v_head_stride, cu_seqlens, num_seqs, num_heads, head_dim, scale,
                             causal, num_threads);
  });
}

void paged_attention(void* out, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                     const void* key_cache, const void* value_cache, const int32_t* block_table,
                     int64_t block_table_stride, const int32_t* seq_lens, const int32_t* cu_seqlens_q,
                     int64_t num_seqs, int64_t /*num_tokens*/, int64_t num_heads, int64_t head_dim,
                     int64_t page_size, int64_t /*max_pages_per_seq*/, float scale, DType dtype, int num_threads) {
  check_head_dim(head_dim);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    paged_attention_kernel(static_cast<T*>(out), static_cast<const T*>(q), q_token_stride, q_head_stride,
                           static_cast<const T*>(key_cache), static_cast<const T*>(value_cache), block_table,
                           block_table_stride, seq_lens, cu_seqlens_q, num_seqs, num_heads, head_dim, page_size,
                           scale, num_threads);
  });
}

}  // namespace phi_fast::cpu
