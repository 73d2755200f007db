/* Fused float32 kernels of the Engram mixing after its two projections (engram/model/native_mix.py).
 *
 * Shapes: B batch, T time, N = B*T rows, M residual branches, D width, C = M*D conv channels,
 * k conv taps, P = (k-1)*dilation conv history; tap j looks s_j = (k-1-j)*dilation steps back.
 *
 * Why C: past the projections the math is a chain of cheap elementwise steps over [N, M, D]; as torch
 * ops each step is a pass over memory and a freshly allocated (page-faulting) full-size temporary.
 * Here each kernel is one pass that keeps a row (or a few rows) in cache:
 *   engram_mix_gate_fwd  kr, h, v -> per (n, m) gate g, conv scale c and the scalars the backward needs;
 *   engram_mix_conv_fwd  out = silu(conv(z)) + g v with z = c v made on the fly (never stored);
 *   engram_mix_bwd       from d out: dv, dkr, dh and the weight gradients, recomputing y = conv(z) and
 *                        walking time backwards with a ring of the last P+1 rows of dy.
 * Vector code uses GCC/Clang vector extensions (8 floats); where the CPU has AVX2+FMA the same bodies
 * are also compiled for it and picked at run time. exp is computed here (Cephes' expf polynomial,
 * ~1 ulp) so that it vectorises without -ffast-math or a vector math library.
 */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The Python wrapper defines both first (its constants are the ones in force). */
#ifndef MAX_THREADS
#define MAX_THREADS 64
#endif
#ifndef MAX_TAPS
#define MAX_TAPS 64
#endif

#define GATE_FLOOR 1e-6 /* |s| is clamped here before the square root (as in engram/model/mix.py) */
#define VW 8

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi" /* 32-byte vectors only cross always-inlined calls */
#endif

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

#define AI static inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ENGRAM_MIX_GENERIC_ONLY)
#define HAVE_AVX2_PATH 1
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define HAVE_AVX2_PATH 0
#endif

/* ---- vector helpers ---------------------------------------------------------------------------- */

AI vf vsplat(float s) { return (vf){s, s, s, s, s, s, s, s}; }

/* n lanes from p (1 <= n <= VW), the rest zero: rows whose width is no multiple of VW end this way. */
AI vf vload(const float* p, int64_t n) {
  vf x = vsplat(0.0f);
  if (n == VW) __builtin_memcpy(&x, p, sizeof x);
  else for (int64_t i = 0; i < n; i++) x[i] = p[i];
  return x;
}

AI void vstore(float* p, vf x, int64_t n) {
  if (n == VW) __builtin_memcpy(p, &x, sizeof x);
  else for (int64_t i = 0; i < n; i++) p[i] = x[i];
}

AI vf vsel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

AI double vsum(vf x) {
  double s = 0.0;
  for (int i = 0; i < VW; i++) s += (double)x[i];
  return s;
}

/* exp(x) for x in [-87.3, 88.3] (clamped outside: only ever used inside a sigmoid, where that is exact
   to float precision). Cephes expf: n = round(x / ln2), r = x - n ln2 in two parts, a degree-7
   polynomial for e^r, times 2^n built in the exponent bits. */
AI vf vexp(vf x) {
  const vf lo = vsplat(-87.3f), hi = vsplat(88.3f);
  x = vsel(x < lo, lo, x);
  x = vsel(x > hi, hi, x);
  /* Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits. */
  const vf t = x * vsplat(1.44269504088896341f) + vsplat(12582912.0f);
  const vf n = t - vsplat(12582912.0f);
  const vi ni = (vi)t - 0x4B400000;
  vf r = x - n * vsplat(0.693359375f);
  r = r - n * vsplat(-2.12194440e-4f);
  const vf z = r * r;
  vf p = vsplat(1.9875691500e-4f);
  p = p * r + vsplat(1.3981999507e-3f);
  p = p * r + vsplat(8.3334519073e-3f);
  p = p * r + vsplat(4.1665795894e-2f);
  p = p * r + vsplat(1.6666665459e-1f);
  p = p * r + vsplat(5.0000001201e-1f);
  p = p * z + r + vsplat(1.0f);
  return p * (vf)((ni + 127) << 23);
}

AI vf vsigmoid(vf y) { return vsplat(1.0f) / (vsplat(1.0f) + vexp(-y)); }

/* ---- threads ----------------------------------------------------------------------------------- */

typedef void (*item_fn)(void* ctx, int64_t item, int tid);

typedef struct {
  item_fn fn; void* ctx; int64_t n_items; int64_t* next; int tid;
} worker_t;

/* Each thread takes the next item until none is left, so a thread the OS schedules out (busy
   machine) delays the call by one item, not by its whole share. */
static void* worker(void* arg) {
  worker_t* w = (worker_t*)arg;
  for (;;) {
    const int64_t i = __atomic_fetch_add(w->next, 1, __ATOMIC_RELAXED);
    if (i >= w->n_items) break;
    w->fn(w->ctx, i, w->tid);
  }
  return NULL;
}

/* Threads are created per call (fork-safe, nothing left running); thread 0 is the caller, and it
   takes the items of any thread that failed to start. */
static void parallel(item_fn fn, void* ctx, int64_t n_items, int64_t threads) {
  worker_t w[MAX_THREADS];
  pthread_t tids[MAX_THREADS];
  int started[MAX_THREADS];
  int64_t next = 0;
  if (threads > n_items) threads = n_items;
  if (threads < 1) threads = 1;
  for (int64_t t = 0; t < threads; t++) {
    worker_t x = {fn, ctx, n_items, &next, (int)t};
    w[t] = x;
  }
  for (int64_t t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], NULL, worker, &w[t]) == 0;
  worker(&w[0]);
  for (int64_t t = 1; t < threads; t++)
    if (started[t]) pthread_join(tids[t], NULL);
}

static int64_t clamp_threads(int64_t threads) {
  return threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
}

#if HAVE_AVX2_PATH
static int use_avx2(void) {
  static int cached = -1;
  if (cached < 0) {
    __builtin_cpu_init();
    cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  return cached;
}
#define PICK(name) (use_avx2() ? name##_avx2 : name##_generic)
#else
#define PICK(name) name##_generic
#endif

/* ---- gate forward ------------------------------------------------------------------------------ */

typedef struct {
  const float *kr, *h, *wkq, *v;
  float *g, *c, *aux;
  int64_t N, M, D, rows; /* rows per item */
  double eps_kq, eps_c;
} gate_fwd_t;

/* Per (n, m): a = <kr, h wkq>, |kr|^2, |h|^2 in one pass; then (in double, [N, M] only)
   rk = rsqrt(|kr|^2/D + eps), rq likewise, s = a rk rq / sqrt(D), g = sigmoid(sign(s) sqrt(max(|s|,
   floor))), rc = rsqrt(g^2 |v|^2/D + eps_c), c = g rc. aux[n, m] = (rc, rk, rq, a, s, root). */
AI void gate_fwd_body(const gate_fwd_t* p, int64_t item, const int full) {
  const int64_t M = p->M, D = p->D, C = M * D;
  const int64_t n0 = item * p->rows, n1 = n0 + p->rows < p->N ? n0 + p->rows : p->N;
  const double inv_sqrt_d = 1.0 / sqrt((double)D);
  for (int64_t n = n0; n < n1; n++) {
    const float* vn = p->v + n * D;
    vf sv = vsplat(0.0f);
    for (int64_t d = 0; d < D; d += VW) {
      const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
      const vf x = vload(vn + d, nl);
      sv += x * x;
    }
    const double msv = vsum(sv) / (double)D;
    for (int64_t m = 0; m < M; m++) {
      const float *kr = p->kr + n * C + m * D, *h = p->h + n * C + m * D, *w = p->wkq + m * D;
      vf sa = vsplat(0.0f), sk = vsplat(0.0f), sq = vsplat(0.0f);
      for (int64_t d = 0; d < D; d += VW) {
        const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
        const vf k = vload(kr + d, nl), q = vload(h + d, nl), wx = vload(w + d, nl);
        sa += k * (q * wx);
        sk += k * k;
        sq += q * q;
      }
      const double a = vsum(sa);
      const double rk = 1.0 / sqrt(vsum(sk) / (double)D + p->eps_kq);
      const double rq = 1.0 / sqrt(vsum(sq) / (double)D + p->eps_kq);
      const double s = a * rk * rq * inv_sqrt_d;
      const double root = sqrt(fabs(s) > GATE_FLOOR ? fabs(s) : GATE_FLOOR);
      const double arg = s > 0 ? root : (s < 0 ? -root : 0.0); /* sign(0) = 0 */
      const double g = 1.0 / (1.0 + exp(-arg));
      const double rc = 1.0 / sqrt(g * g * msv + p->eps_c);
      const int64_t i = n * M + m;
      p->g[i] = (float)g;
      p->c[i] = (float)(g * rc);
      float* aux = p->aux + i * 6;
      aux[0] = (float)rc; aux[1] = (float)rk; aux[2] = (float)rq;
      aux[3] = (float)a; aux[4] = (float)s; aux[5] = (float)root;
    }
  }
}

static void gate_fwd_generic(void* ctx, int64_t item, int tid) {
  (void)tid;
  const gate_fwd_t* p = (const gate_fwd_t*)ctx;
  if (p->D % VW == 0) gate_fwd_body(p, item, 1);
  else gate_fwd_body(p, item, 0);
}

#if HAVE_AVX2_PATH
TARGET_AVX2 static void gate_fwd_avx2(void* ctx, int64_t item, int tid) {
  (void)tid;
  const gate_fwd_t* p = (const gate_fwd_t*)ctx;
  if (p->D % VW == 0) gate_fwd_body(p, item, 1);
  else gate_fwd_body(p, item, 0);
}
#endif


int64_t engram_mix_gate_fwd(const float* kr, const float* h, const float* wkq, const float* v,
                            int64_t N, int64_t M, int64_t D, double eps_kq, double eps_c,
                            float* g, float* c, float* aux, int64_t rows_per_item, int64_t threads) {
  if (N <= 0) return 0;
  if (rows_per_item < 1) rows_per_item = 1;
  gate_fwd_t p = {kr, h, wkq, v, g, c, aux, N, M, D, rows_per_item, eps_kq, eps_c};
  item_fn fn = PICK(gate_fwd);
  parallel(fn, &p, (N + rows_per_item - 1) / rows_per_item, clamp_threads(threads));
  return 0;
}

/* ---- the conv's taps at one row ---------------------------------------------------------------- */

typedef struct {
  const float *v, *c, *we, *w, *state; /* state [B, P, C] in the conv input's units, or NULL */
  int64_t B, T, M, D, k, dil;
} conv_t;

/* The terms of y[b, t, m, :] = sum_j tap_j * sc_j * src_j: shift 0 first, then j = k-2 .. 0 (the order
   conv_taps in mix.py adds them). A tap inside the sequence reads z = c v (src = a row of v, sc = c,
   tap = we = conv_w * wc); one reaching before t = 0 reads the carried state (sc = 1, tap = conv_w),
   or nothing without one. Returns the number of terms. */
AI int64_t conv_terms(const conv_t* q, int64_t b, int64_t t, int64_t m, const float** src, float* sc,
                      const float** tap) {
  const int64_t k = q->k, D = q->D, M = q->M, C = M * D, P = (k - 1) * q->dil, n = b * q->T + t;
  int64_t nt = 0;
  for (int64_t j = k - 1; j >= 0; j--) {
    const int64_t s = (k - 1 - j) * q->dil;
    if (t >= s) {
      src[nt] = q->v + (n - s) * D;
      sc[nt] = q->c[(n - s) * M + m];
      tap[nt] = q->we + j * C + m * D;
      nt++;
    } else if (q->state) {
      src[nt] = q->state + (b * P + P - s + t) * C + m * D;
      sc[nt] = 1.0f;
      tap[nt] = q->w + j * C + m * D;
      nt++;
    }
  }
  return nt;
}

AI vf conv_at(int64_t nt, const float* const* src, const float* sc, const float* const* tap, int64_t d,
              int64_t nl) {
  vf y = vload(tap[0] + d, nl) * (vsplat(sc[0]) * vload(src[0] + d, nl));
  for (int64_t i = 1; i < nt; i++) y += vload(tap[i] + d, nl) * (vsplat(sc[i]) * vload(src[i] + d, nl));
  return y;
}

/* ---- conv forward ------------------------------------------------------------------------------ */

typedef struct {
  conv_t q;
  const float* g;
  float* out;
  int64_t rows;
} conv_fwd_t;

/* One row and branch. Called with nt = 4 as a constant for the default kernel size (all taps inside
   the sequence), so the tap loop unrolls and its pointers stay in registers. */
AI void conv_fwd_row(int64_t nt, const float* const* src, const float* sc, const float* const* tap, vf gm,
                     const float* vn, float* o, int64_t D, const int full) {
  for (int64_t d = 0; d < D; d += VW) {
    const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
    const vf y = conv_at(nt, src, sc, tap, d, nl);
    vstore(o + d, y * vsigmoid(y) + gm * vload(vn + d, nl), nl);
  }
}

AI void conv_fwd_body(const conv_fwd_t* p, int64_t item, const int full) {
  const conv_t* q = &p->q;
  const int64_t M = q->M, D = q->D, C = M * D, N = q->B * q->T;
  const int64_t n0 = item * p->rows, n1 = n0 + p->rows < N ? n0 + p->rows : N;
  const float* src[MAX_TAPS];
  const float* tap[MAX_TAPS];
  float sc[MAX_TAPS];
  for (int64_t n = n0; n < n1; n++) {
    const int64_t b = n / q->T, t = n % q->T;
    const float* vn = q->v + n * D;
    for (int64_t m = 0; m < M; m++) {
      const int64_t nt = conv_terms(q, b, t, m, src, sc, tap);
      const vf gm = vsplat(p->g[n * M + m]);
      float* o = p->out + n * C + m * D;
      if (nt == 4) conv_fwd_row(4, src, sc, tap, gm, vn, o, D, full);
      else conv_fwd_row(nt, src, sc, tap, gm, vn, o, D, full);
    }
  }
}

static void conv_fwd_generic(void* ctx, int64_t item, int tid) {
  (void)tid;
  const conv_fwd_t* p = (const conv_fwd_t*)ctx;
  if (p->q.D % VW == 0) conv_fwd_body(p, item, 1);
  else conv_fwd_body(p, item, 0);
}

#if HAVE_AVX2_PATH
TARGET_AVX2 static void conv_fwd_avx2(void* ctx, int64_t item, int tid) {
  (void)tid;
  const conv_fwd_t* p = (const conv_fwd_t*)ctx;
  if (p->q.D % VW == 0) conv_fwd_body(p, item, 1);
  else conv_fwd_body(p, item, 0);
}
#endif

/* out [N, C] = silu(y) + g v, y the causal depthwise conv of z = c v (with the state's taps). */
int64_t engram_mix_conv_fwd(const float* v, const float* c, const float* g, const float* we, const float* w,
                            const float* state, int64_t B, int64_t T, int64_t M, int64_t D, int64_t k,
                            int64_t dil, float* out, int64_t rows_per_item, int64_t threads) {
  const int64_t N = B * T;
  if (N <= 0) return 0;
  if (k < 1 || k > MAX_TAPS) return -1;
  if (rows_per_item < 1) rows_per_item = 1;
  conv_fwd_t p = {{v, c, we, w, state, B, T, M, D, k, dil}, g, out, rows_per_item};
  item_fn fn = PICK(conv_fwd);
  parallel(fn, &p, (N + rows_per_item - 1) / rows_per_item, clamp_threads(threads));
  return 0;
}

/* ---- backward ---------------------------------------------------------------------------------- */

typedef struct {
  float* ring;            /* [P+1, C] dy rows t .. t+P, row t at t % (P+1) */
  float* gbuf;            /* [C] the row of d out when it is not contiguous along D */
  float* dvrow;           /* [D] */
  float *pwe, *pwkq, *pbk, *pbv;      /* one item's sums: [k, C], [C], [C], [D] */
  double *awe, *asw, *awkq, *abk, *abv; /* the thread's sums: [k, C], [k, C], [C], [C], [D] */
} scratch_t;

typedef struct {
  conv_t q;
  const float* G; int64_t gsb, gst, gsm, gsd; /* d out [B, T, M, D], any strides (elements) */
  const float *g, *aux, *kr, *h, *wkq;
  float *dv, *dkr, *dh, *dstate;
  int64_t chunk, n_chunks;
  double eps_c;
  scratch_t* scratch; /* one per thread */
} bwd_t;

/* The row of d out at (b, t): a pointer to contiguous [C] values (gbuf filled when needed). */
AI const float* grad_row(const bwd_t* p, int64_t b, int64_t t, float* gbuf) {
  const int64_t M = p->q.M, D = p->q.D;
  const float* row = p->G + b * p->gsb + t * p->gst;
  if (p->gsd == 1 && p->gsm == D) return row;
  for (int64_t m = 0; m < M; m++) {
    const float* r = row + m * p->gsm;
    float* o = gbuf + m * D;
    if (p->gsd == 1) memcpy(o, r, (size_t)D * sizeof(float));
    else if (p->gsd == 0) for (int64_t d = 0; d < D; d++) o[d] = r[0]; /* e.g. the expanded ones of sum() */
    else for (int64_t d = 0; d < D; d++) o[d] = r[d * p->gsd];
  }
  return gbuf;
}

/* dy = d out * silu'(y): sigma (1 + y (1 - sigma)), sigma = sigmoid(y) (torch's silu_backward). */
AI vf dsilu(vf G, vf y) {
  const vf s = vsigmoid(y);
  return G * s * (vsplat(1.0f) + y * (vsplat(1.0f) - s));
}

/* dy of one row and branch past the chunk (the halo). */
AI void bwd_halo_row(int64_t nt, const float* const* src, const float* sc, const float* const* tap,
                     const float* Gm, float* ring_tm, int64_t D, const int full) {
  for (int64_t d = 0; d < D; d += VW) {
    const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
    vstore(ring_tm + d, dsilu(vload(Gm + d, nl), conv_at(nt, src, sc, tap, d, nl)), nl);
  }
}

/* The conv part of the backward at row t, branch m: dy into the ring; dz_t = sum_j we_j dy_{t+s_j} and
   dwe_j += dy_{t+s_j} z_t (zring[0] is row t itself); dv's terms G g + dz c added into dvrow (set when
   first); and the gate's sums gv = <G, v>, dc = <dz, v>. Called with nt = nz = 4 as constants for the
   default kernel size away from the sequence's ends, so the tap loops unroll. */
AI void bwd_conv_row(int64_t nt, const float* const* src, const float* sc, const float* const* tap, int64_t nz,
                     const float* const* zring, const float* const* ztap, float* const* zpwe, const float* Gm,
                     const float* vn, float* ring_tm, float* dvrow, float gm, float cm, int first, int64_t D,
                     const int full, double* gv, double* dc) {
  const vf gmv = vsplat(gm), cmv = vsplat(cm);
  vf sgv = vsplat(0.0f), sdc = vsplat(0.0f);
  for (int64_t d = 0; d < D; d += VW) {
    const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
    const vf G = vload(Gm + d, nl);
    const vf dy = dsilu(G, conv_at(nt, src, sc, tap, d, nl));
    vstore(ring_tm + d, dy, nl);
    const vf vx = vload(vn + d, nl);
    const vf z = cmv * vx;
    vf dz = vload(ztap[0] + d, nl) * dy;
    vstore(zpwe[0] + d, vload(zpwe[0] + d, nl) + dy * z, nl);
    for (int64_t i = 1; i < nz; i++) {
      const vf r = vload(zring[i] + d, nl);
      dz += vload(ztap[i] + d, nl) * r;
      vstore(zpwe[i] + d, vload(zpwe[i] + d, nl) + r * z, nl);
    }
    sgv += G * vx;
    sdc += dz * vx;
    const vf acc = first ? G * gmv : vload(dvrow + d, nl) + G * gmv;
    vstore(dvrow + d, acc + dz * cmv, nl);
  }
  *gv = vsum(sgv);
  *dc = vsum(sdc);
}

/* One (sequence, time chunk) item: rows [t0, t1) of sequence b, walked from the last to the first.
   dy is needed P rows past the chunk (dz_t = sum_j we_j dy_{t+s_j}), so those rows' dy are recomputed
   first (the halo); everything else at row t depends on row t and the ring only. */
AI void bwd_body(const bwd_t* p, int64_t item, int tid, const int full) {
  const conv_t* q = &p->q;
  const int64_t M = q->M, D = q->D, C = M * D, T = q->T, k = q->k, dil = q->dil, P = (k - 1) * dil;
  const int64_t b = item / p->n_chunks, t0 = (item % p->n_chunks) * p->chunk;
  const int64_t t1 = t0 + p->chunk < T ? t0 + p->chunk : T;
  const int64_t t_end = t1 + P < T ? t1 + P : T;
  const int64_t R = P + 1;
  const double inv_sqrt_d = 1.0 / sqrt((double)D), eps_c = p->eps_c;
  scratch_t* S = &p->scratch[tid];
  const float* src[MAX_TAPS];
  const float* tap[MAX_TAPS];
  float sc[MAX_TAPS];
  const float* zring[MAX_TAPS]; /* dy rows t + s_j inside the sequence, shift 0 first */
  const float* ztap[MAX_TAPS];
  float* zpwe[MAX_TAPS];
  memset(S->pwe, 0, (size_t)(k * C) * sizeof(float));
  memset(S->pwkq, 0, (size_t)C * sizeof(float));
  memset(S->pbk, 0, (size_t)C * sizeof(float));
  memset(S->pbv, 0, (size_t)D * sizeof(float));

  for (int64_t t = t_end - 1; t >= t0; t--) {
    const int64_t n = b * T + t;
    const float* Grow = grad_row(p, b, t, S->gbuf);
    float* ring_t = S->ring + (t % R) * C;
    const float* vn = q->v + n * D;
    if (t >= t1) { /* halo: dy only */
      for (int64_t m = 0; m < M; m++) {
        const int64_t nt = conv_terms(q, b, t, m, src, sc, tap);
        if (nt == 4) bwd_halo_row(4, src, sc, tap, Grow + m * D, ring_t + m * D, D, full);
        else bwd_halo_row(nt, src, sc, tap, Grow + m * D, ring_t + m * D, D, full);
      }
      continue;
    }
    double dmsv = 0.0;
    for (int64_t m = 0; m < M; m++) {
      const int64_t nt = conv_terms(q, b, t, m, src, sc, tap);
      int64_t nz = 0;
      for (int64_t j = k - 1; j >= 0; j--) {
        const int64_t s = (k - 1 - j) * dil;
        if (t + s >= T) continue;
        zring[nz] = S->ring + ((t + s) % R) * C + m * D;
        ztap[nz] = q->we + j * C + m * D;
        zpwe[nz] = S->pwe + j * C + m * D;
        nz++;
      }
      const float gm = p->g[n * M + m], cm = q->c[n * M + m];
      double gv, dc;
      if (nt == 4 && nz == 4)
        bwd_conv_row(4, src, sc, tap, 4, zring, ztap, zpwe, Grow + m * D, vn, ring_t + m * D, S->dvrow, gm, cm,
                     m == 0, D, full, &gv, &dc);
      else
        bwd_conv_row(nt, src, sc, tap, nz, zring, ztap, zpwe, Grow + m * D, vn, ring_t + m * D, S->dvrow, gm, cm,
                     m == 0, D, full, &gv, &dc);
      /* Per (n, m) scalars; c = g rc with rc = (g^2 msv + eps_c)^-1/2:
         dc/dg = eps_c rc^3, dc/dmsv = -g^3 rc^3 / 2; g = sigmoid(sign(s) root), root = sqrt(|s|). */
      const float* aux = p->aux + (n * M + m) * 6;
      const double rc = aux[0], rk = aux[1], rq = aux[2], a = aux[3], s = aux[4], root = aux[5];
      const double rc3 = rc * rc * rc, g = gm;
      const double dg = gv + eps_c * rc3 * dc;
      dmsv += dc * g * g * g * rc3;
      const double ds = fabs(s) > GATE_FLOOR ? dg * g * (1.0 - g) / (2.0 * root) : 0.0;
      const float da = (float)(ds * rk * rq * inv_sqrt_d);
      const float ck = (float)(-(ds * a * rq * inv_sqrt_d) * rk * rk * rk / (double)D);
      const float cq = (float)(-(ds * a * rk * inv_sqrt_d) * rq * rq * rq / (double)D);
      const vf dav = vsplat(da), ckv = vsplat(ck), cqv = vsplat(cq);
      const float *krm = p->kr + n * C + m * D, *hm = p->h + n * C + m * D, *wm = p->wkq + m * D;
      float *dkrm = p->dkr + n * C + m * D, *dhm = p->dh ? p->dh + n * C + m * D : NULL;
      float *pwkq = S->pwkq + m * D, *pbk = S->pbk + m * D;
      for (int64_t d = 0; d < D; d += VW) {
        const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
        const vf K = vload(krm + d, nl), H = vload(hm + d, nl), Wq = vload(wm + d, nl);
        const vf dk = (H * Wq) * dav + K * ckv;
        vstore(dkrm + d, dk, nl);
        if (dhm) vstore(dhm + d, (K * Wq) * dav + H * cqv, nl);
        vstore(pwkq + d, vload(pwkq + d, nl) + dav * (K * H), nl);
        vstore(pbk + d, vload(pbk + d, nl) + dk, nl);
      }
    }
    /* dv = sum_m (G g + dz c) + d msv * 2 v / D, with d msv = -1/2 sum_m dc g^3 rc^3 */
    const vf cv = vsplat((float)(-0.5 * dmsv * 2.0 / (double)D));
    float* dvn = p->dv + n * D;
    for (int64_t d = 0; d < D; d += VW) {
      const int64_t nl = full ? VW : (D - d < VW ? D - d : VW);
      const vf x = vload(S->dvrow + d, nl) + vload(vn + d, nl) * cv;
      vstore(dvn + d, x, nl);
      vstore(S->pbv + d, vload(S->pbv + d, nl) + x, nl);
    }
  }

  /* Taps that reached before t = 0 read the carried state: its gradient and its taps' gradient.
     Only the first chunk of a sequence gets here, and the ring then holds dy rows 0 .. P. */
  if (t0 == 0 && q->state) {
    for (int64_t j = k - 2; j >= 0; j--) {
      const int64_t s = (k - 1 - j) * dil, nrow = s < T ? s : T;
      for (int64_t t = 0; t < nrow; t++) {
        const float* dy = S->ring + (t % R) * C;
        const float* st = q->state + (b * P + P - s + t) * C;
        float* dst = p->dstate + (b * P + P - s + t) * C;
        const float* wj = q->w + j * C;
        double* asw = S->asw + j * C;
        for (int64_t ch = 0; ch < C; ch++) {
          asw[ch] += (double)(dy[ch] * st[ch]);
          dst[ch] += dy[ch] * wj[ch];
        }
      }
    }
  }
  /* Float sums over one item, double across items: the weight gradients keep float32 accuracy. */
  for (int64_t i = 0; i < k * C; i++) S->awe[i] += S->pwe[i];
  for (int64_t i = 0; i < C; i++) { S->awkq[i] += S->pwkq[i]; S->abk[i] += S->pbk[i]; }
  for (int64_t i = 0; i < D; i++) S->abv[i] += S->pbv[i];
}

static void bwd_generic(void* ctx, int64_t item, int tid) {
  const bwd_t* p = (const bwd_t*)ctx;
  if (p->q.D % VW == 0) bwd_body(p, item, tid, 1);
  else bwd_body(p, item, tid, 0);
}

#if HAVE_AVX2_PATH
TARGET_AVX2 static void bwd_avx2(void* ctx, int64_t item, int tid) {
  const bwd_t* p = (const bwd_t*)ctx;
  if (p->q.D % VW == 0) bwd_body(p, item, tid, 1);
  else bwd_body(p, item, tid, 0);
}
#endif

static void free_scratch(scratch_t* S) {
  free(S->ring); free(S->gbuf); free(S->dvrow);
  free(S->pwe); free(S->pwkq); free(S->pbk); free(S->pbv);
  free(S->awe); free(S->asw); free(S->awkq); free(S->abk); free(S->abv);
}

/* Gradients of out = silu(conv(c v)) + g v and of the gate, from d out (G, any strides):
   dv [N, D], dkr [N, C], dh [N, C] (unless NULL: h needs no gradient) written; dwe [k, C] (taps conv_w * wc), dsw [k, C] (state taps
   conv_w; only with a state), dwkq [C] (of wk * wq), dbk [C] (sum of dkr), dbv [D] (sum of dv) written;
   dstate [B, P, C] accumulated into (zeroed by the caller; only with a state).
   Returns 0, -1 for taps beyond MAX_TAPS, -2 when out of memory. */
int64_t engram_mix_bwd(const float* G, int64_t gsb, int64_t gst, int64_t gsm, int64_t gsd,
                       const float* v, const float* c, const float* g, const float* aux, const float* kr,
                       const float* h, const float* wkq, const float* we, const float* w, const float* state,
                       int64_t B, int64_t T, int64_t M, int64_t D, int64_t k, int64_t dil, double eps_c,
                       float* dv, float* dkr, float* dh, float* dwe, float* dsw, float* dwkq, float* dbk,
                       float* dbv, float* dstate, int64_t chunk, int64_t threads) {
  const int64_t C = M * D, P = (k - 1) * dil;
  if (k < 1 || k > MAX_TAPS) return -1;
  if (chunk < 1) chunk = 1;
  const int64_t n_chunks = T > 0 ? (T + chunk - 1) / chunk : 0, n_items = B * n_chunks;
  threads = clamp_threads(threads);
  if (threads > n_items) threads = n_items > 0 ? n_items : 1;
  scratch_t scratch[MAX_THREADS];
  memset(scratch, 0, sizeof scratch);
  int ok = 1;
  for (int64_t i = 0; i < threads && ok; i++) {
    scratch_t* S = &scratch[i];
    S->ring = malloc((size_t)((P + 1) * C) * sizeof(float));
    S->gbuf = malloc((size_t)C * sizeof(float));
    S->dvrow = malloc((size_t)D * sizeof(float));
    S->pwe = malloc((size_t)(k * C) * sizeof(float));
    S->pwkq = malloc((size_t)C * sizeof(float));
    S->pbk = malloc((size_t)C * sizeof(float));
    S->pbv = malloc((size_t)D * sizeof(float));
    S->awe = calloc((size_t)(k * C), sizeof(double));
    S->asw = calloc((size_t)(k * C), sizeof(double));
    S->awkq = calloc((size_t)C, sizeof(double));
    S->abk = calloc((size_t)C, sizeof(double));
    S->abv = calloc((size_t)D, sizeof(double));
    ok = S->ring && S->gbuf && S->dvrow && S->pwe && S->pwkq && S->pbk && S->pbv && S->awe && S->asw &&
         S->awkq && S->abk && S->abv;
  }
  if (ok && n_items > 0) {
    bwd_t p = {{v, c, we, w, state, B, T, M, D, k, dil}, G, gsb, gst, gsm, gsd, g, aux, kr, h, wkq,
               dv, dkr, dh, dstate, chunk, n_chunks, eps_c, scratch};
    item_fn fn = PICK(bwd);
    parallel(fn, &p, n_items, threads);
  }
  if (ok) { /* threads' sums, in thread order */
    for (int64_t i = 0; i < k * C; i++) {
      double x = 0.0, y = 0.0;
      for (int64_t t = 0; t < threads; t++) { x += scratch[t].awe[i]; y += scratch[t].asw[i]; }
      dwe[i] = (float)x;
      if (dsw) dsw[i] = (float)y;
    }
    for (int64_t i = 0; i < C; i++) {
      double x = 0.0, y = 0.0;
      for (int64_t t = 0; t < threads; t++) { x += scratch[t].awkq[i]; y += scratch[t].abk[i]; }
      dwkq[i] = (float)x;
      dbk[i] = (float)y;
    }
    for (int64_t i = 0; i < D; i++) {
      double x = 0.0;
      for (int64_t t = 0; t < threads; t++) x += scratch[t].abv[i];
      dbv[i] = (float)x;
    }
  }
  for (int64_t i = 0; i < threads; i++) free_scratch(&scratch[i]);
  return ok ? 0 : -2;
}
