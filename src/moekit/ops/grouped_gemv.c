/* moekit native kernel: the grouped matrix-vector product of the CPU decode path.

   y[n, :] = W[e] @ x[xrow[n], :] for every row n of expert e (x[n, :] when xrow is NULL). Rows
   are sorted by expert; ends[e] (int32) is one past expert e's last row (a cumulative count), so
   expert e owns rows ends[e-1] .. ends[e]. x has XN rows. Returns 0, 1 when out of memory, 2 when
   ends is not a non-decreasing count ending at N (with no expert, N must be 0), 3 when an xrow is
   outside [0, XN), 4 when a size is negative or too large or a needed pointer is NULL.

   Every exported function checks its sizes and pointers itself and answers with a status, even
   though ops/native.py checks the same before calling: a wrong call from Python must not read
   past a buffer or divide by zero. Empty tensors may come as NULL pointers (torch allocates
   nothing for them), so a pointer is required only where its buffer is read or written.
   W is (E, O, I) row-major, float32 or bfloat16; x is (N, I) float32; y is (N, O) float32.

   Decode is memory-bound: a few rows per expert, so the cost is reading each touched expert's
   weight once. The work is split into blocks of `block` weight rows of the touched experts,
   statically over the OpenMP threads, so each thread streams one contiguous stretch of weights;
   every weight row (I values, a few KiB) is loaded once from memory and dotted, from L1, with
   all of its expert's input rows. Experts without rows are never read. An expert with 1-3 rows
   takes four weight rows per pass, so each pass keeps 4-12 independent sums in registers and
   loads each input value once for four weight rows (faster than one weight row per pass:
   docs/performance.md, "Numbers behind the code"); with 4 or more rows, four input rows go per
   pass over a weight row. Built and loaded by
   moekit/ops/native.py; linked against the libgomp that torch already loaded, so it shares
   torch's OpenMP threads. */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

/* statuses: 2 is a value out of its range (ends, an expert id, K), 4 a wrong size or pointer */
enum { OK = 0, NO_MEMORY = 1, BAD_VALUE = 2, BAD_INDEX = 3, BAD_ARGUMENT = 4 };

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

#define XROW(r) (x + (xrow ? xrow[(r)] : (r)) * I)
/* The work items of the touched experts, split over the threads of the enclosing parallel region
   (an orphaned `omp for`: called outside one, a single thread does all of them). */
#define GEMV_ITEMS(NAME, WTYPE, LOAD)                                                            \
  static void NAME(const float *x, const int64_t *xrow, const WTYPE *w, float *y, const int32_t *ends, \
                   const int64_t *touched, int64_t n_touched, int64_t O, int64_t I, int64_t block) { \
    int64_t blocks = (O + block - 1) / block, items = n_touched * blocks;                        \
    _Pragma("omp for schedule(static)")                                                          \
    for (int64_t it = 0; it < items; it++) {                                                     \
      int64_t e = touched[it / blocks], j0 = (it % blocks) * block;                              \
      int64_t j1 = j0 + block < O ? j0 + block : O;                                              \
      int64_t r0 = e ? ends[e - 1] : 0, r1 = ends[e];                                            \
      int64_t j = j0;                                                                            \
      if (r1 - r0 == 1) /* one row (a token's expert): four weight rows per pass over x */       \
        for (; j + 4 <= j1; j += 4) {                                                            \
          const WTYPE *wa = w + (e * O + j) * I, *wb = wa + I, *wc = wb + I, *wd = wc + I;       \
          const float *x0 = XROW(r0);                                                            \
          float a0 = 0.f, b0 = 0.f, c0 = 0.f, d0 = 0.f;                                          \
          _Pragma("omp simd reduction(+ : a0, b0, c0, d0)")                                      \
          for (int64_t i = 0; i < I; i++) {                                                      \
            float xv = x0[i];                                                                    \
            a0 += LOAD(wa[i]) * xv;                                                              \
            b0 += LOAD(wb[i]) * xv;                                                              \
            c0 += LOAD(wc[i]) * xv;                                                              \
            d0 += LOAD(wd[i]) * xv;                                                              \
          }                                                                                      \
          float *y0 = y + r0 * O + j;                                                            \
          y0[0] = a0, y0[1] = b0, y0[2] = c0, y0[3] = d0;                                        \
        }                                                                                        \
      else if (r1 - r0 == 2) /* two rows: four weight rows by two rows of x */                   \
        for (; j + 4 <= j1; j += 4) {                                                            \
          const WTYPE *wa = w + (e * O + j) * I, *wb = wa + I, *wc = wb + I, *wd = wc + I;       \
          const float *x0 = XROW(r0), *x1 = XROW(r0 + 1);                                        \
          float a0 = 0.f, b0 = 0.f, c0 = 0.f, d0 = 0.f, a1 = 0.f, b1 = 0.f, c1 = 0.f, d1 = 0.f;  \
          _Pragma("omp simd reduction(+ : a0, b0, c0, d0, a1, b1, c1, d1)")                      \
          for (int64_t i = 0; i < I; i++) {                                                      \
            float va = LOAD(wa[i]), vb = LOAD(wb[i]), vc = LOAD(wc[i]), vd = LOAD(wd[i]);        \
            float u = x0[i], v = x1[i];                                                          \
            a0 += va * u, b0 += vb * u, c0 += vc * u, d0 += vd * u;                              \
            a1 += va * v, b1 += vb * v, c1 += vc * v, d1 += vd * v;                              \
          }                                                                                      \
          float *y0 = y + r0 * O + j, *y1 = y0 + O;                                              \
          y0[0] = a0, y0[1] = b0, y0[2] = c0, y0[3] = d0;                                        \
          y1[0] = a1, y1[1] = b1, y1[2] = c1, y1[3] = d1;                                        \
        }                                                                                        \
      else if (r1 - r0 == 3) /* three rows: four weight rows by three rows of x */               \
        for (; j + 4 <= j1; j += 4) {                                                            \
          const WTYPE *wa = w + (e * O + j) * I, *wb = wa + I, *wc = wb + I, *wd = wc + I;       \
          const float *x0 = XROW(r0), *x1 = XROW(r0 + 1), *x2 = XROW(r0 + 2);                    \
          float a0 = 0.f, b0 = 0.f, c0 = 0.f, d0 = 0.f, a1 = 0.f, b1 = 0.f, c1 = 0.f, d1 = 0.f;  \
          float a2 = 0.f, b2 = 0.f, c2 = 0.f, d2 = 0.f;                                          \
          _Pragma("omp simd reduction(+ : a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2)")      \
          for (int64_t i = 0; i < I; i++) {                                                      \
            float va = LOAD(wa[i]), vb = LOAD(wb[i]), vc = LOAD(wc[i]), vd = LOAD(wd[i]);        \
            float u = x0[i], v = x1[i], t = x2[i];                                               \
            a0 += va * u, b0 += vb * u, c0 += vc * u, d0 += vd * u;                              \
            a1 += va * v, b1 += vb * v, c1 += vc * v, d1 += vd * v;                              \
            a2 += va * t, b2 += vb * t, c2 += vc * t, d2 += vd * t;                              \
          }                                                                                      \
          float *y0 = y + r0 * O + j, *y1 = y0 + O, *y2 = y1 + O;                                \
          y0[0] = a0, y0[1] = b0, y0[2] = c0, y0[3] = d0;                                        \
          y1[0] = a1, y1[1] = b1, y1[2] = c1, y1[3] = d1;                                        \
          y2[0] = a2, y2[1] = b2, y2[2] = c2, y2[3] = d2;                                        \
        }                                                                                        \
      for (; j < j1; j++) {                                                                      \
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
  }

#define LOAD_F32(v) (v)
GEMV_ITEMS(gemv_items_f32, float, LOAD_F32)
GEMV_ITEMS(gemv_items_bf16, uint16_t, bf16_to_f32)

/* 0 when ends is a non-decreasing count ending at N, else 2 (also for rows without any expert:
   nothing would write them); fills the touched experts. */
static int touched_experts(const int32_t *ends, int64_t N, int64_t E, int64_t *touched, int64_t *n_touched) {
  for (int64_t e = 0; e < E; e++)
    if (ends[e] < (e ? ends[e - 1] : 0) || ends[e] > N) return BAD_VALUE;
  if ((E > 0 ? ends[E - 1] : 0) != N) return BAD_VALUE;
  *n_touched = 0;
  for (int64_t e = 0; e < E; e++)
    if (ends[e] > (e ? ends[e - 1] : 0)) touched[(*n_touched)++] = e;
  return 0;
}

#define GROUPED_GEMV(NAME, WTYPE, ITEMS)                                                         \
  int NAME(const float *x, const int64_t *xrow, const WTYPE *w, float *y, const int32_t *ends,     \
           int64_t N, int64_t XN, int64_t E, int64_t O, int64_t I, int64_t block, int nthreads) { \
    if (N < 0 || N > INT32_MAX || XN < 0 || E < 0 || O < 0 || I < 0 || block < 1) return BAD_ARGUMENT; \
    if ((E > 0 && !ends) || (N > 0 && O > 0 && (!y || (I > 0 && (!x || !w))))) return BAD_ARGUMENT; \
    if (nthreads < 1) nthreads = 1;                                                              \
    for (int64_t r = 0; r < N; r++)                                                              \
      if ((xrow ? xrow[r] : r) < 0 || (xrow ? xrow[r] : r) >= XN) return BAD_INDEX;              \
    int64_t *touched = malloc(sizeof(int64_t) * (E > 0 ? E : 1)), n_touched = 0;                 \
    if (!touched) return NO_MEMORY;                                                              \
    int status = touched_experts(ends, N, E, touched, &n_touched);                               \
    if (status == 0) {                                                                           \
      _Pragma("omp parallel num_threads(nthreads)")                                              \
      ITEMS(x, xrow, w, y, ends, touched, n_touched, O, I, block);                               \
    }                                                                                            \
    free(touched);                                                                               \
    return status;                                                                               \
  }

GROUPED_GEMV(moekit_grouped_gemv_f32, float, gemv_items_f32)
GROUPED_GEMV(moekit_grouped_gemv_bf16, uint16_t, gemv_items_bf16)

/* The first step of the fused decode call below: a stable counting sort of the T*K assignments
   by expert. expert (T*K,) int64 is token-major (assignment n = t*K + k); writes ends (E,) int32
   cumulative counts, counts (E,) float32, and for each sorted row its token (n / K) and its
   combine weight. Returns 2 when an expert id is outside [0, E). */
static int sort_by_expert(const int64_t *expert, const float *weight, int64_t N, int64_t K, int64_t E,
                          int32_t *ends, float *counts, int64_t *token, float *gate) {
  for (int64_t e = 0; e < E; e++) ends[e] = 0;
  for (int64_t n = 0; n < N; n++) {
    if (expert[n] < 0 || expert[n] >= E) return BAD_VALUE;
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

/* ---- the fused decode step: the whole routed FFN of a few tokens in one call ---------------- */

/* Whether the temporaries of decode_ffn (N rows of H + F + D + 1 floats, N + E int64, E int32)
   have a byte count that fits an int64: each size is below 2^31 here (checked first), but their
   products need not be. */
static int temporaries_fit(int64_t N, int64_t E, int64_t D, int64_t H, int64_t F) {
  const int64_t limit = INT64_MAX / 16; /* bytes / 16: room for the element sizes and the sums */
  int64_t per_row = H + F + D + 2;     /* below 2^34 */
  return N == 0 || (per_row <= limit / N && N * per_row + E < limit);
}

enum { ACT_SWIGLU = 0, ACT_GEGLU = 1, ACT_GELU = 2, ACT_RELU = 3, ACT_SILU = 4 };

static inline float act_apply(float z, int act) {
  switch (act) {
    case ACT_SWIGLU:
    case ACT_SILU: return z / (1.f + expf(-z));
    case ACT_GEGLU: /* tanh approximation, as F.gelu(approximate="tanh") */
      return 0.5f * z * (1.f + tanhf(0.7978845608028654f * (z + 0.044715f * z * z * z)));
    case ACT_GELU: return 0.5f * z * (1.f + erff(z * 0.7071067811865476f));
    default: return z > 0.f ? z : 0.f;
  }
}

/* out (T, D) = sum over k of weight[t, k] * FFN_{expert[t, k]}(x[t]), the dropless MoE combine:
   sort the T*K assignments by expert (stably), h = W_in[e] x[token] for each sorted row, a =
   act(h) * gate, y = W_out[e] a, and out[t] = the sum of t's rows in sorted order (what
   `zeros.index_add_` gives). Weights W_in (E, H, D) and W_out (E, D, F), H = 2F for the gated
   activations (gate columns first) else F. counts (E) receives the rows per expert, dropped and
   offered the dropped (0) and offered (T*K) assignment counts. The temporaries (N rows of H, F and D floats)
   are allocated here; each touched expert's weights are read once. Returns 0, 1 when out of
   memory, 2 when an expert id is outside [0, E), 4 when a size, the activation code or a needed
   pointer is wrong (H must be 2F for the gated activations, else F: the activation reads h by
   those widths; T*K must fit the int32 row counts). */
#define DECODE_FFN(NAME, WTYPE, ITEMS)                                                           \
  int NAME(const float *x, const int64_t *expert, const float *weight, const WTYPE *w_in,        \
           const WTYPE *w_out, int64_t T, int64_t K, int64_t E, int64_t D, int64_t H, int64_t F,  \
           int act, float *out, float *counts, float *dropped, float *offered, int64_t block,      \
           int nthreads) {                     \
    if (T < 0 || K < 0 || E < 0 || D < 0 || F < 0 || block < 1 || act < ACT_SWIGLU || act > ACT_SILU) \
      return BAD_ARGUMENT;                                                                       \
    if (T > INT32_MAX || K > INT32_MAX || T * K > INT32_MAX || E > INT32_MAX || D > INT32_MAX ||  \
        F > INT32_MAX)                                                                           \
      return BAD_ARGUMENT;                                                                       \
    if (H != ((act == ACT_SWIGLU || act == ACT_GEGLU) ? 2 * F : F)) return BAD_ARGUMENT;         \
    if (!temporaries_fit(T * K, E, D, H, F)) return NO_MEMORY;                                   \
    if (!dropped || !offered || (E > 0 && !counts) || (T > 0 && D > 0 && !out)) return BAD_ARGUMENT; \
    if (T * K > 0 && (!expert || !weight || (D > 0 && !x) || (H > 0 && D > 0 && !w_in) ||       \
                      (D > 0 && F > 0 && !w_out)))                                               \
      return BAD_ARGUMENT;                                                                       \
    if (nthreads < 1) nthreads = 1;                                                              \
    int64_t N = T * K;                                                                           \
    int64_t floats = N * (H + F + D) + N;                                                        \
    char *mem = malloc(sizeof(float) * floats + sizeof(int64_t) * (N + E) + sizeof(int32_t) * E + 64); \
    if (!mem) return NO_MEMORY;                                                                  \
    int64_t *token = (int64_t *)mem, *touched = token + N;                                       \
    float *h = (float *)(touched + E), *a = h + N * H, *y = a + N * F, *gate = y + N * D;        \
    int32_t *ends = (int32_t *)(gate + N);                                                       \
    int status = sort_by_expert(expert, weight, N, K, E, ends, counts, token, gate);             \
    int64_t n_touched = 0;                                                                       \
    if (status == 0) status = touched_experts(ends, N, E, touched, &n_touched);                  \
    if (status != 0) {                                                                           \
      free(mem);                                                                                 \
      return status;                                                                             \
    }                                                                                            \
    *dropped = 0.f;                                                                              \
    *offered = (float)N;                                                                         \
    int gated = act == ACT_SWIGLU || act == ACT_GEGLU;                                           \
    _Pragma("omp parallel num_threads(nthreads)")                                                \
    {                                                                                            \
      ITEMS(x, token, w_in, h, ends, touched, n_touched, H, D, block);                           \
      _Pragma("omp for schedule(static)")                                                        \
      for (int64_t r = 0; r < N; r++)                                                            \
        for (int64_t f = 0; f < F; f++) {                                                        \
          float v = act_apply(h[r * H + f], act);                                                \
          if (gated) v *= h[r * H + F + f];                                                      \
          a[r * F + f] = v * gate[r];                                                            \
        }                                                                                        \
      ITEMS(a, NULL, w_out, y, ends, touched, n_touched, D, F, block);                           \
      _Pragma("omp for schedule(static)")                                                        \
      for (int64_t d0 = 0; d0 < D; d0 += 64) {                                                   \
        int64_t d1 = d0 + 64 < D ? d0 + 64 : D;                                                  \
        for (int64_t t = 0; t < T; t++)                                                          \
          for (int64_t d = d0; d < d1; d++) out[t * D + d] = 0.f;                                \
        for (int64_t r = 0; r < N; r++)                                                          \
          for (int64_t d = d0; d < d1; d++) out[token[r] * D + d] += y[r * D + d];               \
      }                                                                                          \
    }                                                                                            \
    free(mem);                                                                                   \
    return 0;                                                                                    \
  }

DECODE_FFN(moekit_decode_ffn_f32, float, gemv_items_f32)
DECODE_FFN(moekit_decode_ffn_bf16, uint16_t, gemv_items_bf16)

/* The softmax top-k router of a few tokens: logits = x W^T (W (E, D) float32), probs = softmax,
   the K largest probabilities (ties to the lower expert id, in descending order) and their
   weights, renormalised to sum to 1 when norm, and each token's first weight (priority). Losses:
   lb the Switch load-balancing loss E * sum_e f_e P_e over all T*K assignments (f_e the fraction
   of assignments to e, P_e the mean probability of e), z the ST-MoE z-loss, the mean over tokens
   of logsumexp(logits)^2, and aux = aux_coef * lb (+ z_coef * z where z_coef > 0). With no
   token (T = 0) the losses are 0, as the MoE layer's on an empty batch (the means over no token
   are 0 / 0). Returns 0, 2 when K is outside [1, E], 4 when a size or a needed pointer is wrong. */
int moekit_route_softmax_topk(const float *x, const float *w, int64_t T, int64_t D, int64_t E, int64_t K,
                              int norm, float aux_coef, float z_coef, float *logits, float *probs,
                              int64_t *idx, float *weight, float *priority, float *lb_loss, float *z_loss,
                              float *aux, int nthreads) {
  if (K < 1 || K > E) return BAD_VALUE;
  if (T < 0 || D < 0 || T > INT32_MAX || D > INT32_MAX || E > INT32_MAX) return BAD_ARGUMENT;
  if (!lb_loss || !z_loss || !aux) return BAD_ARGUMENT;
  if (T > 0 && (!logits || !probs || !idx || !weight || !priority || (D > 0 && (!x || !w))))
    return BAD_ARGUMENT;
  if (nthreads < 1) nthreads = 1;
  if (T == 0) {
    *lb_loss = *z_loss = *aux = 0.f;
    return OK;
  }
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t te = 0; te < T * E; te++) {
    const float *xt = x + (te / E) * D, *we = w + (te % E) * D;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < D; i++) s += xt[i] * we[i];
    logits[te] = s;
  }
  float z_sum = 0.f;
  for (int64_t t = 0; t < T; t++) {
    const float *l = logits + t * E;
    float *p = probs + t * E, m = l[0], sum = 0.f, chosen = 0.f;
    for (int64_t e = 1; e < E; e++) m = l[e] > m ? l[e] : m;
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(l[e] - m));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    float lse = m + logf(sum);
    z_sum += lse * lse;
    for (int64_t k = 0; k < K; k++) { /* K passes: K is small */
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++) {
        int taken = 0;
        for (int64_t j = 0; j < k; j++) taken |= idx[t * K + j] == e;
        if (!taken && (best < 0 || p[e] > p[best])) best = e;
      }
      idx[t * K + k] = best;
      weight[t * K + k] = p[best];
      chosen += p[best];
    }
    if (norm)
      for (int64_t k = 0; k < K; k++) weight[t * K + k] /= chosen;
    priority[t] = weight[t * K];
  }
  float lb = 0.f;
  for (int64_t e = 0; e < E; e++) {
    float count = 0.f, mean_p = 0.f;
    for (int64_t n = 0; n < T * K; n++) count += idx[n] == e;
    for (int64_t t = 0; t < T; t++) mean_p += probs[t * E + e];
    lb += (count / (float)(T * K)) * (mean_p / (float)T);
  }
  *lb_loss = (float)E * lb;
  *z_loss = z_sum / (float)T;
  float total = aux_coef * *lb_loss;
  if (z_coef > 0.f) total += z_coef * *z_loss;
  *aux = total;
  return 0;
}
