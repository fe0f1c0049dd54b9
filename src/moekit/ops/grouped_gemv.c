/* moekit native kernel: the grouped matrix-vector product of the CPU decode path.

   y[n, :] = W[e] @ x[xrow[n], :] for every row n of expert e (x[n, :] when xrow is NULL). Rows
   are sorted by expert; ends[e] (int32) is one past expert e's last row (a cumulative count), so
   expert e owns rows ends[e-1] .. ends[e]. x has XN rows. Returns 0, 1 when out of memory, 2 when
   ends is not a non-decreasing count ending at N, 3 when an xrow is outside [0, XN).
   W is (E, O, I) row-major, float32 or bfloat16; x is (N, I) float32; y is (N, O) float32.

   Decode is memory-bound: a few rows per expert, so the cost is reading each touched expert's
   weight once. The work is split into blocks of `block` weight rows of the touched experts,
   statically over the OpenMP threads, so each thread streams one contiguous stretch of weights;
   every weight row (I values, a few KiB) is loaded once from memory and dotted, from L1, with
   all of its expert's input rows. Experts without rows are never read. Built and loaded by
   moekit/ops/native.py; linked against the libgomp that torch already loaded, so it shares
   torch's OpenMP threads. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

#define XROW(r) (x + (xrow ? xrow[(r)] : (r)) * I)
#define GROUPED_GEMV(NAME, WTYPE, LOAD)                                                          \
  int NAME(const float *x, const int64_t *xrow, const WTYPE *w, float *y, const int32_t *ends,     \
           int64_t N, int64_t XN, int64_t E, int64_t O, int64_t I, int64_t block, int nthreads) { \
    for (int64_t r = 0; r < N; r++)                                                              \
      if ((xrow ? xrow[r] : r) < 0 || (xrow ? xrow[r] : r) >= XN) return 3;                      \
    for (int64_t e = 0; e < E; e++)                                                              \
      if (ends[e] < (e ? ends[e - 1] : 0) || ends[e] > N) return 2;                               \
    if (E > 0 && ends[E - 1] != N) return 2;                                                     \
    int64_t *touched = malloc(sizeof(int64_t) * (E > 0 ? E : 1));                                 \
    if (!touched) return 1;                                                                      \
    int64_t n_touched = 0;                                                                       \
    for (int64_t e = 0; e < E; e++)                                                              \
      if (ends[e] > (e ? ends[e - 1] : 0)) touched[n_touched++] = e;                              \
    int64_t blocks = (O + block - 1) / block, items = n_touched * blocks;                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)")                           \
    for (int64_t it = 0; it < items; it++) {                                                     \
      int64_t e = touched[it / blocks], j0 = (it % blocks) * block;                              \
      int64_t j1 = j0 + block < O ? j0 + block : O;                                              \
      int64_t r0 = e ? ends[e - 1] : 0, r1 = ends[e];                                            \
      for (int64_t j = j0; j < j1; j++) {                                                        \
        const WTYPE *wj = w + (e * O + j) * I;                                                   \
        int64_t r = r0;                                                                          \
        for (; r + 4 <= r1; r += 4) { /* four rows per pass over the weight row */              \
          const float *x0 = XROW(r), *x1 = XROW(r + 1), *x2 = XROW(r + 2), *x3 = XROW(r + 3);    \
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;                                          \
          _Pragma("omp simd reduction(+ : s0, s1, s2, s3)")                                      \
          for (int64_t i = 0; i < I; i++) {                                                      \
            float wv = LOAD(wj[i]);                                                              \
            s0 += wv * x0[i];                                                                    \
            s1 += wv * x1[i];                                                                    \
            s2 += wv * x2[i];                                                                    \
            s3 += wv * x3[i];                                                                    \
          }                                                                                      \
          y[r * O + j] = s0;                                                                     \
          y[(r + 1) * O + j] = s1;                                                               \
          y[(r + 2) * O + j] = s2;                                                               \
          y[(r + 3) * O + j] = s3;                                                               \
        }                                                                                        \
        for (; r < r1; r++) {                                                                    \
          const float *xr = XROW(r);                                                             \
          float s = 0.f;                                                                         \
          _Pragma("omp simd reduction(+ : s)")                                                   \
          for (int64_t i = 0; i < I; i++) s += LOAD(wj[i]) * xr[i];                              \
          y[r * O + j] = s;                                                                      \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    free(touched);                                                                               \
    return 0;                                                                                    \
  }

#define LOAD_F32(v) (v)
GROUPED_GEMV(moekit_grouped_gemv_f32, float, LOAD_F32)
GROUPED_GEMV(moekit_grouped_gemv_bf16, uint16_t, bf16_to_f32)

/* The routing half of the decode path: a stable counting sort of the T*K assignments by expert.
   expert (T*K,) int64 is token-major (assignment n = t*K + k); writes ends (E,) int32 cumulative
   counts, counts (E,) float32, and for each sorted row its token (n / K) and its combine weight.
   Returns 2 when an expert id is outside [0, E). */
int moekit_sort_by_expert(const int64_t *expert, const float *weight, int64_t N, int64_t K, int64_t E,
                          int32_t *ends, float *counts, int64_t *token, float *gate) {
  for (int64_t e = 0; e < E; e++) ends[e] = 0;
  for (int64_t n = 0; n < N; n++) {
    if (expert[n] < 0 || expert[n] >= E) return 2;
    ends[expert[n]]++;
  }
  int32_t start = 0;
  for (int64_t e = 0; e < E; e++) {  /* counts -> starts, kept in ends until the fill below */
    int32_t c = ends[e];
    counts[e] = (float)c;
    ends[e] = start;
    start += c;
  }
  for (int64_t n = 0; n < N; n++) {  /* fill in assignment order: stable */
    int32_t r = ends[expert[n]]++;
    token[r] = n / K;
    gate[r] = weight[n];
  }
  return 0; /* each ends[e] has advanced from its start to its end */
}
