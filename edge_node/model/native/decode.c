/* edgefed native decode step: one call runs a whole single-token step of a Llama-family decoder (RMSNorm,
 * q|k|v GEMV, RoPE, KV-cache write, GQA attention over the cache, o-proj, residual, RMSNorm, gate|up GEMV,
 * SiLU * up, down GEMV, residual; then the final norm and the head), plus a matmul for prompts.
 *
 * Weights: float32, int8 or int4 codes with float32 scales (and zeros) per group of input columns:
 *   q8: w = q * s + z   (q int8; z absent for symmetric layouts)
 *   q4: w = q * s + z   (q in [0, 15]; the 16 bytes of a 32-column block hold column j in the low nibble of
 *                        byte j and column j + 16 in the high one; z already holds the loader's offset)
 *   q8p, q4p (packed, where the CPU has AVX512-VNNI): the same codes regrouped per 16 output rows, so that one
 *       64-byte load holds 4 input columns (q8p) or 8 (q4p, two nibbles a byte) of 16 rows: for row block b,
 *       the bytes of column group c (4 or 8 columns) of row i sit at b * row_stride + c * 64 + i * 4 + j.
 *       q8p bytes hold q + 128; q4p byte j holds column 8c + j (low nibble) and 8c + 4 + j (high one), and
 *       w = (q - 8) s + z. Scales and zeros are (rows / 16, cols / group, 16) in float32, bfloat16 or float16. A packed GEMV quantizes its input to int8 per block of 32
 *       (one float scale each, as llama.cpp's Q8_0 activations) and multiplies in int32 with vpdpbusd.
 * Otherwise activations and accumulation are float32: no bfloat16 rounding anywhere.
 *
 * Threads: a small pthread pool (the calling thread is thread 0). Work is split by output rows (GEMVs),
 * by heads (attention); threads meet at spin barriers inside a step and sleep on a condition variable
 * between calls once they have spun for EF_SPIN_US microseconds. No OpenMP: torch bundles its own runtime.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { EF_F32 = 0, EF_Q8 = 1, EF_Q4 = 2, EF_F32T = 3, EF_Q8P = 4, EF_Q4P = 5 }; /* F32T: float32 column-major */
#define PACKED(w) ((w)->kind == EF_Q8P || (w)->kind == EF_Q4P)
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define EF_VNNI 1
#endif

enum { EF_S_F32 = 0, EF_S_BF16 = 1, EF_S_F16 = 2 }; /* packed layouts' scale and zero storage */

typedef struct {
    int32_t kind, rows, cols, group; /* group: input columns per scale (q8, q4) */
    int32_t sdtype, pad_;            /* packed kinds: EF_S_*; plain kinds: float32 */
    int64_t row_stride;              /* elements per row: floats (f32) or bytes (q8, q4); bytes per 16 rows (packed) */
    const void *data;
    const float *scales; /* (rows, cols / group) */
    const float *zeros;  /* (rows, cols / group) or NULL */
    const float *bias;   /* (rows,) or NULL */
} ef_linear;

typedef struct {
    ef_linear qkv, o, w13, w2;
    const float *ln1, *ln2;
    float *k, *v; /* (kv_heads, cap, head_dim) each */
    int64_t cap;
    int32_t window; /* 0: full causal */
    int32_t pad_;
} ef_layer;

typedef struct {
    int32_t n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, max_pos;
    float eps;
    int32_t pad_;
    ef_layer *layers;
    const float *embed; /* (vocab, hidden): element [t, h] at t * embed_rs + h * embed_cs */
    int64_t embed_rs, embed_cs;
    const float *norm;
    ef_linear head;
    float *scratch; /* owned by C: ef_model_init / ef_model_free */
} ef_model;

/* ---------------------------------------------------------------- thread pool */

#define EF_MAX_THREADS 64
typedef void (*ef_fn)(void *arg, int ith, int nth);

static struct {
    int n; /* workers started (threads 1..n) */
    pthread_t tid[EF_MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic int64_t seq; /* job number */
    _Atomic int done;    /* workers finished with the current job */
    _Atomic int done_sleepers;
    _Atomic int sleeping;
    ef_fn fn;
    void *arg;
    int nth;
    long spin_ns;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER, .spin_ns = 300000};

static pid_t pool_pid;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Waits spin for a few microseconds (the other thread is usually that close), then sleep on a futex: on a
 * machine with more runnable threads than cores, a spinning waiter would hold the core the thread it waits
 * for needs. */
#define EF_SPIN_BARRIER 16384 /* the most a wait spins; it never spins less than a sixteenth of that */

static void futex_wait(_Atomic int *addr, int val) { syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0); }
static void futex_wake(_Atomic int *addr) { syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0); }

/* wait until *addr != val. The spin budget adapts per thread: a wait that ends asleep halves it (the machine has
 * more runnable threads than cores: sleep early and give the core away), one that ends spinning doubles it. */
static __thread int spin_limit = EF_SPIN_BARRIER;

static void wait_change(_Atomic int *addr, int val, _Atomic int *sleepers) {
    int spins = 0;
    while (atomic_load_explicit(addr, memory_order_acquire) == val && spins < spin_limit) {
        cpu_relax();
        spins++;
    }
    if (atomic_load_explicit(addr, memory_order_acquire) != val) {
        if (spin_limit < EF_SPIN_BARRIER) spin_limit *= 2;
        return;
    }
    if (spin_limit > EF_SPIN_BARRIER / 16) spin_limit /= 2;
    while (atomic_load_explicit(addr, memory_order_acquire) == val) {
        atomic_fetch_add(sleepers, 1);
        if (atomic_load_explicit(addr, memory_order_acquire) == val) futex_wait(addr, val);
        atomic_fetch_sub(sleepers, 1);
    }
}

typedef struct {
    _Atomic int count;
    _Atomic int phase;
    _Atomic int sleepers;
} barrier_t;

static void barrier(barrier_t *b, int nth) {
    if (nth == 1) return;
    int ph = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->phase, 1, memory_order_seq_cst);
        if (atomic_load(&b->sleepers)) futex_wake(&b->phase);
        return;
    }
    wait_change(&b->phase, ph, &b->sleepers);
}

static void *worker(void *p) {
    int ith = (int)(intptr_t)p;
    int64_t seen = 0;
    for (;;) {
        int64_t s = atomic_load_explicit(&pool.seq, memory_order_acquire);
        if (s == seen) {
            long t0 = now_ns();
            int spins = 0;
            while ((s = atomic_load_explicit(&pool.seq, memory_order_acquire)) == seen) {
                cpu_relax();
                if (++spins % 256 == 0 && now_ns() - t0 > pool.spin_ns) {
                    pthread_mutex_lock(&pool.mu);
                    atomic_fetch_add(&pool.sleeping, 1);
                    while ((s = atomic_load(&pool.seq)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                    atomic_fetch_sub(&pool.sleeping, 1);
                    pthread_mutex_unlock(&pool.mu);
                    break;
                }
            }
        }
        seen = s;
        if (s < 0) return NULL; /* shutdown */
        if (ith < pool.nth) pool.fn(pool.arg, ith, pool.nth);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_seq_cst);
        if (atomic_load(&pool.done_sleepers)) futex_wake(&pool.done);
    }
}

int ef_threads_start(int n, long spin_us) {
    if (n < 1) n = 1;
    if (n > EF_MAX_THREADS) n = EF_MAX_THREADS;
    pool.spin_ns = spin_us * 1000L;
    if (pool.n && getpid() != pool_pid) pool.n = 0;
    pool_pid = getpid();
    for (int i = pool.n + 1; i < n; i++) {
        if (pthread_create(&pool.tid[i], NULL, worker, (void *)(intptr_t)i)) return pool.n + 1;
        pool.n = i;
    }
    return pool.n + 1;
}

/* One job at a time: callers on several threads (two generations served at once; ctypes drops the GIL) queue
 * here, each job keeping its own arguments and buffers. A forked child never takes it (it runs on one thread). */
static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER;

static void run_locked(ef_fn fn, void *arg, int nth);

static void run(ef_fn fn, void *arg, int nth) {
    if (pool.n && getpid() != pool_pid) pool.n = 0; /* a forked child has none of the parent's workers */
    if (nth > pool.n + 1) nth = pool.n + 1;
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pthread_mutex_lock(&run_mu);
    run_locked(fn, arg, nth);
    pthread_mutex_unlock(&run_mu);
}

static void run_locked(ef_fn fn, void *arg, int nth) {
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_fetch_add(&pool.seq, 1); /* seq_cst: ordered against the workers' `sleeping` */
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(arg, 0, nth);
    /* every worker reports (those with ith >= nth at once): the next job's fields stay theirs until then */
    for (int d; (d = atomic_load_explicit(&pool.done, memory_order_acquire)) < pool.n;)
        wait_change(&pool.done, d, &pool.done_sleepers);
}

/* ---------------------------------------------------------------- small vector helpers */

static inline void split(int n, int ith, int nth, int align, int *a, int *b) {
    int chunks = (n + align - 1) / align;
    int lo = (int)((int64_t)chunks * ith / nth), hi = (int)((int64_t)chunks * (ith + 1) / nth);
    *a = lo * align < n ? lo * align : n;
    *b = hi * align < n ? hi * align : n;
}

#ifdef __AVX512F__
static inline __mmask16 tail_mask(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
#endif

static float dot(const float *a, const float *b, int n) {
#ifdef __AVX512F__
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#else
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = dot(x, x, n) / (float)n;
    float r = 1.0f / sqrtf(ss + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

#ifdef __AVX512F__
/* exp for 16 floats: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], degree-6 polynomial: ~1 ulp */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
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
#endif

/* y[i] = exp(x[i] - m); returns the sum */
static float exp_sub_sum(float *y, const float *x, float m, int n) {
#ifdef __AVX512F__
    __m512 s = _mm512_setzero_ps(), mv = _mm512_set1_ps(m);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = tail_mask(n - i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
        _mm512_mask_storeu_ps(y + i, k, e);
        s = _mm512_mask_add_ps(s, k, s, e);
    }
    return _mm512_reduce_add_ps(s);
#else
    float s = 0.f;
    for (int i = 0; i < n; i++) s += (y[i] = expf(x[i] - m));
    return s;
#endif
}

/* out[i] = silu(g[i]) * u[i] */
static void silu_mul(float *out, const float *g, const float *u, int n) {
#ifdef __AVX512F__
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = tail_mask(n - i);
        __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(s, uv));
    }
#else
    for (int i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
#endif
}

/* ---------------------------------------------------------------- GEMV: one token, rows [r0, r1) */

/* sums of x over each group of `group` columns (the zeros' factor) */
static void group_sums(float *xs, const float *x, int cols, int group) {
    for (int g = 0; g < cols / group; g++) {
        float s = 0.f;
        for (int i = 0; i < group; i++) s += x[g * group + i];
        xs[g] = s;
    }
}

static inline float zero_dot(const float *z, const float *xs, int ng) { return z ? dot(z, xs, ng) : 0.f; }

#ifdef __AVX512F__
static inline __m512 load_q8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* y[r] = (add ? y[r] : 0) + W[r] . x (+ bias): R rows at a time keeps 2R independent FMA chains */
#define GEMV_ROWS(R, BODY_INIT, BODY_GROUP)                                                                  \
    for (; r + R <= r1; r += R) {                                                                            \
        __m512 acc[R];                                                                                       \
        for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();                                            \
        for (int g = 0; g < ng; g++) {                                                                       \
            __m512 t[R];                                                                                     \
            for (int i = 0; i < R; i++) t[i] = _mm512_setzero_ps();                                          \
            for (int k = g * G; k < (g + 1) * G; k += 32) {                                                  \
                __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);                       \
                for (int i = 0; i < R; i++) { BODY_GROUP }                                                   \
            }                                                                                                \
            for (int i = 0; i < R; i++)                                                                      \
                acc[i] = _mm512_fmadd_ps(t[i], _mm512_set1_ps(w->scales[(int64_t)(r + i) * ng + g]), acc[i]); \
        }                                                                                                    \
        for (int i = 0; i < R; i++) {                                                                        \
            float v = _mm512_reduce_add_ps(acc[i]) +                                                         \
                      (w->zeros ? zero_dot(w->zeros + (int64_t)(r + i) * ng, xs, ng) : 0.f);                 \
            if (w->bias) v += w->bias[r + i];                                                                \
            y[r + i] = add ? y[r + i] + v : v;                                                               \
        }                                                                                                    \
    }
#endif

/* column-major float32: y[r0:r1] = sum_k x[k] W[k, r0:r1], 256 outputs (16 accumulators) at a time */
static void gemv_t(const ef_linear *w, const float *x, float *y, int r0, int r1, int add) {
    const float *W = (const float *)w->data;
    for (int r = r0; r < r1; r += 256) {
        int n = r1 - r < 256 ? r1 - r : 256;
#ifdef __AVX512F__
        __m512 acc[16];
        for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
        for (int k = 0; k < w->cols; k++) {
            const float *p = W + (int64_t)k * w->row_stride + r;
            __m512 xv = _mm512_set1_ps(x[k]);
            if (n == 256) {
                for (int j = 0; j < 16; j++) acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16 * j), xv, acc[j]);
            } else {
                for (int j = 0; j * 16 < n; j++)
                    acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask(n - 16 * j), p + 16 * j), xv, acc[j]);
            }
        }
        float out[256];
        for (int j = 0; j < 16; j++) _mm512_storeu_ps(out + 16 * j, acc[j]);
#else
        float out[256] = {0};
        for (int k = 0; k < w->cols; k++)
            for (int j = 0; j < n; j++) out[j] += x[k] * W[(int64_t)k * w->row_stride + r + j];
#endif
        for (int j = 0; j < n; j++) {
            float v = out[j] + (w->bias ? w->bias[r + j] : 0.f);
            y[r + j] = add ? y[r + j] + v : v;
        }
    }
}

static void gemv(const ef_linear *w, const float *x, float *y, int r0, int r1, int add, float *xs) {
    const int cols = w->cols;
    int r = r0;
    if (w->kind == EF_F32T) {
        gemv_t(w, x, y, r0, r1, add);
        return;
    }
    if (w->kind == EF_F32) {
        const float *W = (const float *)w->data;
#ifdef __AVX512F__
        for (; r + 4 <= r1; r += 4) {
            __m512 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_ps();
            const float *p0 = W + (int64_t)r * w->row_stride;
            int k = 0;
            for (; k + 32 <= cols; k += 32) {
                __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
                for (int i = 0; i < 4; i++) {
                    const float *p = p0 + i * w->row_stride + k;
                    a[2 * i] = _mm512_fmadd_ps(_mm512_loadu_ps(p), x0, a[2 * i]);
                    a[2 * i + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16), x1, a[2 * i + 1]);
                }
            }
            for (; k < cols; k += 16) {
                __mmask16 m = tail_mask(cols - k);
                __m512 x0 = _mm512_maskz_loadu_ps(m, x + k);
                for (int i = 0; i < 4; i++)
                    a[2 * i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, p0 + i * w->row_stride + k), x0, a[2 * i]);
            }
            for (int i = 0; i < 4; i++) {
                float v = _mm512_reduce_add_ps(_mm512_add_ps(a[2 * i], a[2 * i + 1]));
                if (w->bias) v += w->bias[r + i];
                y[r + i] = add ? y[r + i] + v : v;
            }
        }
#endif
        for (; r < r1; r++) {
            float v = dot(W + (int64_t)r * w->row_stride, x, cols);
            if (w->bias) v += w->bias[r];
            y[r] = add ? y[r] + v : v;
        }
        return;
    }
    const int G = w->group, ng = cols / G;
    if (w->zeros) group_sums(xs, x, cols, G);
#ifdef __AVX512F__
    if (w->kind == EF_Q8) {
        const int8_t *Q = (const int8_t *)w->data;
#define Q8_BODY                                                                               \
    const int8_t *p = Q + (int64_t)(r + i) * w->row_stride + k;                               \
    t[i] = _mm512_fmadd_ps(load_q8(p + 16), x1, _mm512_fmadd_ps(load_q8(p), x0, t[i]));
        GEMV_ROWS(4, , Q8_BODY)
        GEMV_ROWS(1, , Q8_BODY)
    } else {
        const uint8_t *Q = (const uint8_t *)w->data;
        const __m128i lo4 = _mm_set1_epi8(0x0F);
#define Q4_BODY                                                                                             \
    __m128i b = _mm_loadu_si128((const __m128i *)(Q + (int64_t)(r + i) * w->row_stride + k / 2));           \
    __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, lo4)));                            \
    __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), lo4)));         \
    t[i] = _mm512_fmadd_ps(q1, x1, _mm512_fmadd_ps(q0, x0, t[i]));
        GEMV_ROWS(4, , Q4_BODY)
        GEMV_ROWS(1, , Q4_BODY)
    }
#else
    for (; r < r1; r++) {
        float v = 0.f;
        for (int g = 0; g < ng; g++) {
            float t = 0.f;
            for (int k = g * G; k < (g + 1) * G; k++) {
                float q;
                if (w->kind == EF_Q8) {
                    q = ((const int8_t *)w->data)[(int64_t)r * w->row_stride + k];
                } else {
                    int blk = k / 32, j = k % 32;
                    uint8_t b = ((const uint8_t *)w->data)[(int64_t)r * w->row_stride + blk * 16 + (j & 15)];
                    q = (float)(j < 16 ? (b & 15) : (b >> 4));
                }
                t += q * x[k];
            }
            v += t * w->scales[(int64_t)r * ng + g];
        }
        if (w->zeros) v += zero_dot(w->zeros + (int64_t)r * ng, xs, ng);
        if (w->bias) v += w->bias[r];
        y[r] = add ? y[r] + v : v;
    }
#endif
}

/* ---------------------------------------------------------------- packed int8 / int4 (AVX512-VNNI) */

/* One block of 32 input values in two int8 levels: x ~ q d + q2 d2, where q2 rounds what q leaves (x - q d) to
 * int8 on its own scale, so a product's input keeps ~16 bits (one level of int8 costs SmolLM2 ~2.5 points of
 * top-1 agreement with float inputs; two cost one more vpdpbusd per weight vector, which the loads hide). */
typedef struct {
    int8_t q[32], q2[32];
    float d, d2;        /* scales: max|x| / 127, max|x - q d| / 127 */
    int32_t sum, sum2;  /* sums of the codes (the packed layouts' offsets: q8p bytes are q + 128, q4p's q - 8) */
} ef_qblock;

typedef ef_qblock ef_qx; /* (cols / 32) blocks */

/* one level: v -> codes (round half to even of v * 127 / max|v|), returns the scale max|v| / 127 */
static float quantize32(const float *v, int8_t *q, int32_t *sum) {
#ifdef __AVX512F__
    __m512 a = _mm512_loadu_ps(v), c = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
    float id = amax > 0.f ? 127.f / amax : 0.f;
    __m512i ia = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(id)));
    __m512i ic = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(id)));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtsepi32_epi8(ia));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtsepi32_epi8(ic));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(ia, ic));
#else
    float amax = 0.f;
    for (int i = 0; i < 32; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
    float id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t s = 0;
    for (int i = 0; i < 32; i++) {
        int32_t k = (int32_t)nearbyintf(v[i] * id);
        q[i] = (int8_t)k;
        s += k;
    }
    *sum = s;
#endif
    return amax / 127.f;
}

/* x (cols, a multiple of 32) -> two int8 levels per block of 32 */
static void quantize_x(const float *x, int cols, ef_qx *o) {
    for (int b = 0; b < cols / 32; b++) {
        ef_qblock *B = o + b;
        float r[32];
        B->d = quantize32(x + 32 * b, B->q, &B->sum);
        for (int i = 0; i < 32; i++) r[i] = fmaf(-(float)B->q[i], B->d, x[32 * b + i]); /* exact, one rounding */
        B->d2 = quantize32(r, B->q2, &B->sum2);
    }
}

#ifdef EF_VNNI
/* 16 consecutive scales or zeros of a packed layout, as float32 */
static inline __m512 load_s16(const void *p, int64_t off, int dt) {
    if (dt == EF_S_F32) return _mm512_loadu_ps((const float *)p + off);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + off));
    if (dt == EF_S_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

/* One 32-column block of NB row blocks: int32 partial sums per row (16 lanes), started at `init`. */
#define DP2(ACC, ACC2, W, OFF)                                                                         \
    ACC = _mm512_dpbusd_epi32(ACC, W, _mm512_set1_epi32(*(const int32_t *)(B->q + (OFF))));            \
    ACC2 = _mm512_dpbusd_epi32(ACC2, W, _mm512_set1_epi32(*(const int32_t *)(B->q2 + (OFF))));
#define Q8P_BLOCK(NB)                                                                                  \
    for (int k = 0; k < 8; k++) {                                                                      \
        for (int b = 0; b < NB; b++) {                                                                 \
            __m512i v = _mm512_loadu_si512(wp[b] + 64 * k);                                            \
            DP2(ia[b], ib[b], v, 4 * k)                                                                \
        }                                                                                              \
    }
#define Q4P_BLOCK(NB)                                                                                  \
    for (int k = 0; k < 4; k++) {                                                                      \
        for (int b = 0; b < NB; b++) {                                                                 \
            __m512i v = _mm512_loadu_si512(wp[b] + 64 * k);                                            \
            __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4); \
            DP2(ia[b], ib[b], lo, 8 * k)                                                               \
            DP2(ia[b], ib[b], hi, 8 * k + 4)                                                           \
        }                                                                                              \
    }

/* NB row blocks (16 rows each) starting at block rb: out (NB * 16) = W x^ for the quantized input */
#define GEMV_PACKED(NB, BLOCK)                                                                                   \
    static void gemv_packed_##BLOCK##_##NB(const ef_linear *w, const ef_qx *qx, int rb, float *out) {            \
        const int cols = w->cols, G = w->group, ng = cols / G, per = G / 32;                                     \
        const int colbytes = w->kind == EF_Q8P ? 32 : 16; /* bytes of one 32-column block of 16 rows / 16 */  \
        const uint8_t *W = (const uint8_t *)w->data;                                                             \
        const __m512i lo4 = _mm512_set1_epi8(0x0F);                                                              \
        (void)lo4;                                                                                               \
        __m512 acc[NB];                                                                                          \
        for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();                                               \
        for (int g = 0; g < ng; g++) {                                                                           \
            __m512 gacc[NB];                                                                                     \
            float zs = 0.f;                                                                                      \
            for (int b = 0; b < NB; b++) gacc[b] = _mm512_setzero_ps();                                          \
            for (int j = g * per; j < (g + 1) * per; j++) {                                                      \
                const ef_qblock *B = qx + j;                                                                     \
                const uint8_t *wp[NB];                                                                           \
                __m512i ia[NB], ib[NB];                                                                          \
                const int off = w->kind == EF_Q8P ? -128 : -8; /* the codes' offset, folded in up front */      \
                __m512i init = _mm512_set1_epi32(off * B->sum), init2 = _mm512_set1_epi32(off * B->sum2);        \
                for (int b = 0; b < NB; b++) {                                                                   \
                    wp[b] = W + (int64_t)(rb + b) * w->row_stride + (int64_t)j * 16 * colbytes;                  \
                    ia[b] = init;                                                                                \
                    ib[b] = init2;                                                                               \
                }                                                                                                \
                BLOCK(NB)                                                                                        \
                __m512 dv = _mm512_set1_ps(B->d), dv2 = _mm512_set1_ps(B->d2);                                   \
                for (int b = 0; b < NB; b++)                                                                     \
                    gacc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib[b]), dv2,                                    \
                                              _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[b]), dv, gacc[b]));          \
                zs += B->d * (float)B->sum + B->d2 * (float)B->sum2;                                             \
            }                                                                                                    \
            for (int b = 0; b < NB; b++) {                                                                       \
                int64_t off = ((int64_t)(rb + b) * ng + g) * 16;                                                 \
                acc[b] = _mm512_fmadd_ps(gacc[b], load_s16(w->scales, off, w->sdtype), acc[b]);                   \
                if (w->zeros) acc[b] = _mm512_fmadd_ps(load_s16(w->zeros, off, w->sdtype), _mm512_set1_ps(zs), acc[b]); \
            }                                                                                                    \
        }                                                                                                        \
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(out + 16 * b, acc[b]);                                     \
    }
GEMV_PACKED(1, Q8P_BLOCK)
GEMV_PACKED(4, Q8P_BLOCK)
GEMV_PACKED(1, Q4P_BLOCK)
GEMV_PACKED(4, Q4P_BLOCK)
#endif

/* y[r0:r1] = (add ? y : 0) + W x^ (+ bias) for a packed weight and the quantized input qx */
static void gemv_packed(const ef_linear *w, const ef_qx *qx, float *y, int r0, int r1, int add) {
#ifdef EF_VNNI
    float out[64];
    for (int rb = r0 / 16; rb * 16 < r1;) {
        int nb = (r1 - rb * 16 >= 64 && rb * 16 >= r0) ? 4 : 1;
        if (w->kind == EF_Q8P)
            (nb == 4 ? gemv_packed_Q8P_BLOCK_4 : gemv_packed_Q8P_BLOCK_1)(w, qx, rb, out);
        else
            (nb == 4 ? gemv_packed_Q4P_BLOCK_4 : gemv_packed_Q4P_BLOCK_1)(w, qx, rb, out);
        int lo = rb * 16 > r0 ? rb * 16 : r0, hi = (rb + nb) * 16 < r1 ? (rb + nb) * 16 : r1;
        for (int r = lo; r < hi; r++) {
            float v = out[r - rb * 16] + (w->bias ? w->bias[r] : 0.f);
            y[r] = add ? y[r] + v : v;
        }
        rb += nb;
    }
#else
    (void)w, (void)qx, (void)y, (void)r0, (void)r1, (void)add;
    abort(); /* packed layouts are only made where ef_has_vnni() */
#endif
}

/* row r of w as float32 (cols) */
static void dequant_row(const ef_linear *w, int r, float *out) {
    const int cols = w->cols;
    if (w->kind == EF_F32T) {
        for (int k = 0; k < cols; k++) out[k] = ((const float *)w->data)[(int64_t)k * w->row_stride + r];
        return;
    }
    if (w->kind == EF_F32) {
        memcpy(out, (const float *)w->data + (int64_t)r * w->row_stride, sizeof(float) * cols);
        return;
    }
    const int G = w->group, ng = cols / G;
    const float *S = w->scales + (int64_t)r * ng, *Z = w->zeros ? w->zeros + (int64_t)r * ng : NULL;
    if (w->kind == EF_Q8) {
        const int8_t *q = (const int8_t *)w->data + (int64_t)r * w->row_stride;
        for (int g = 0; g < ng; g++) {
            float s = S[g], z = Z ? Z[g] : 0.f;
#ifdef __AVX512F__
            __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
            for (int k = g * G; k < (g + 1) * G; k += 16) _mm512_storeu_ps(out + k, _mm512_fmadd_ps(load_q8(q + k), sv, zv));
#else
            for (int k = g * G; k < (g + 1) * G; k++) out[k] = q[k] * s + z;
#endif
        }
        return;
    }
    const uint8_t *q = (const uint8_t *)w->data + (int64_t)r * w->row_stride;
    for (int g = 0; g < ng; g++) {
        float s = S[g], z = Z ? Z[g] : 0.f;
        for (int k = g * G; k < (g + 1) * G; k += 32) {
            const uint8_t *b = q + k / 2;
#ifdef __AVX512F__
            __m512 sv = _mm512_set1_ps(s), zv = _mm512_set1_ps(z);
            __m128i v = _mm_loadu_si128((const __m128i *)b), lo4 = _mm_set1_epi8(0x0F);
            _mm512_storeu_ps(out + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, lo4))), sv, zv));
            _mm512_storeu_ps(out + k + 16, _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), lo4))), sv, zv));
#else
            for (int j = 0; j < 16; j++) {
                out[k + j] = (float)(b[j] & 15) * s + z;
                out[k + 16 + j] = (float)(b[j] >> 4) * s + z;
            }
#endif
        }
    }
}

/* ---------------------------------------------------------------- matmul: T tokens (prompts) */

typedef struct {
    const ef_linear *w;
    const float *x; /* (T, cols) */
    float *y;       /* (T, rows) */
    int T;
    float *buf; /* per thread: 4 * cols floats */
} mm_args;

static void mm_fn(void *a_, int ith, int nth) {
    mm_args *a = a_;
    const ef_linear *w = a->w;
    const int cols = w->cols, T = a->T;
    float *wb = a->buf + (int64_t)ith * 4 * cols;
    int r0, r1;
    split(w->rows, ith, nth, 4, &r0, &r1);
    for (int r = r0; r < r1; r += 4) {
        int R = r1 - r < 4 ? r1 - r : 4;
        for (int i = 0; i < R; i++) dequant_row(w, r + i, wb + i * cols);
        for (int t0 = 0; t0 < T; t0 += 4) {
            int TT = T - t0 < 4 ? T - t0 : 4;
            float out[4][4] = {{0}};
#ifdef __AVX512F__
            __m512 acc[4][4];
            for (int i = 0; i < 4; i++)
                for (int t = 0; t < 4; t++) acc[i][t] = _mm512_setzero_ps();
            for (int k = 0; k < cols; k += 16) {
                __mmask16 m = tail_mask(cols - k);
                __m512 wv[4], xv[4];
                for (int i = 0; i < 4; i++) wv[i] = _mm512_maskz_loadu_ps(m, wb + (i < R ? i : 0) * cols + k);
                for (int t = 0; t < 4; t++)
                    xv[t] = _mm512_maskz_loadu_ps(m, a->x + (int64_t)(t0 + (t < TT ? t : 0)) * cols + k);
                for (int i = 0; i < 4; i++)
                    for (int t = 0; t < 4; t++) acc[i][t] = _mm512_fmadd_ps(wv[i], xv[t], acc[i][t]);
            }
            for (int i = 0; i < R; i++)
                for (int t = 0; t < TT; t++) out[i][t] = _mm512_reduce_add_ps(acc[i][t]);
#else
            for (int i = 0; i < R; i++)
                for (int t = 0; t < TT; t++) out[i][t] = dot(wb + i * cols, a->x + (int64_t)(t0 + t) * cols, cols);
#endif
            for (int i = 0; i < R; i++)
                for (int t = 0; t < TT; t++)
                    a->y[(int64_t)(t0 + t) * w->rows + r + i] = out[i][t] + (w->bias ? w->bias[r + i] : 0.f);
        }
    }
}

#ifdef EF_VNNI
/* Prompts on a packed weight: TT tokens of one row block (16 rows) at a time, every weight vector loaded once
 * for the TT tokens' two levels; out (TT, 16) rows of y (ldy floats apart). */
#define GEMM_PACKED(TT, BLOCK)                                                                                   \
    static void gemm_packed_##BLOCK##_##TT(const ef_linear *w, const ef_qx *qx, int nbk, int rb, float *y,      \
                                            int64_t ldy) {                                                       \
        const int cols = w->cols, G = w->group, ng = cols / G, per = G / 32;                                     \
        const int colbytes = w->kind == EF_Q8P ? 32 : 16;                                                        \
        const int off = w->kind == EF_Q8P ? -128 : -8;                                                           \
        const uint8_t *W = (const uint8_t *)w->data + (int64_t)rb * w->row_stride;                               \
        const __m512i lo4 = _mm512_set1_epi8(0x0F);                                                              \
        (void)lo4;                                                                                               \
        __m512 acc[TT];                                                                                          \
        for (int t = 0; t < TT; t++) acc[t] = _mm512_setzero_ps();                                               \
        for (int g = 0; g < ng; g++) {                                                                           \
            __m512 gacc[TT];                                                                                     \
            float zs[TT];                                                                                        \
            for (int t = 0; t < TT; t++) gacc[t] = _mm512_setzero_ps(), zs[t] = 0.f;                             \
            for (int j = g * per; j < (g + 1) * per; j++) {                                                      \
                const uint8_t *wp = W + (int64_t)j * 16 * colbytes;                                              \
                const ef_qblock *B[TT];                                                                          \
                __m512i ia[TT], ib[TT];                                                                          \
                for (int t = 0; t < TT; t++) {                                                                   \
                    B[t] = qx + (int64_t)t * nbk + j;                                                            \
                    ia[t] = _mm512_set1_epi32(off * B[t]->sum);                                                  \
                    ib[t] = _mm512_set1_epi32(off * B[t]->sum2);                                                 \
                }                                                                                                \
                BLOCK(TT)                                                                                        \
                for (int t = 0; t < TT; t++) {                                                                   \
                    gacc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib[t]), _mm512_set1_ps(B[t]->d2),              \
                                              _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[t]), _mm512_set1_ps(B[t]->d), \
                                                              gacc[t]));                                         \
                    zs[t] += B[t]->d * (float)B[t]->sum + B[t]->d2 * (float)B[t]->sum2;                          \
                }                                                                                                \
            }                                                                                                    \
            int64_t so = ((int64_t)rb * ng + g) * 16;                                                            \
            __m512 sv = load_s16(w->scales, so, w->sdtype);                                                      \
            __m512 zv = w->zeros ? load_s16(w->zeros, so, w->sdtype) : _mm512_setzero_ps();                      \
            for (int t = 0; t < TT; t++)                                                                         \
                acc[t] = _mm512_fmadd_ps(zv, _mm512_set1_ps(zs[t]), _mm512_fmadd_ps(gacc[t], sv, acc[t]));       \
        }                                                                                                        \
        __m512 bv = w->bias ? _mm512_loadu_ps(w->bias + (int64_t)rb * 16) : _mm512_setzero_ps();                 \
        for (int t = 0; t < TT; t++) _mm512_storeu_ps(y + t * ldy + (int64_t)rb * 16, _mm512_add_ps(acc[t], bv)); \
    }
/* the same weight vector against TT tokens, both levels */
#define Q8P_GEMM(TT)                                                                                   \
    for (int k = 0; k < 8; k++) {                                                                      \
        __m512i v = _mm512_loadu_si512(wp + 64 * k);                                                   \
        for (int t = 0; t < TT; t++) {                                                                 \
            ia[t] = _mm512_dpbusd_epi32(ia[t], v, _mm512_set1_epi32(*(const int32_t *)(B[t]->q + 4 * k)));   \
            ib[t] = _mm512_dpbusd_epi32(ib[t], v, _mm512_set1_epi32(*(const int32_t *)(B[t]->q2 + 4 * k)));  \
        }                                                                                              \
    }
#define Q4P_GEMM(TT)                                                                                   \
    for (int k = 0; k < 4; k++) {                                                                      \
        __m512i v = _mm512_loadu_si512(wp + 64 * k);                                                   \
        __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);    \
        for (int t = 0; t < TT; t++) {                                                                 \
            ia[t] = _mm512_dpbusd_epi32(ia[t], lo, _mm512_set1_epi32(*(const int32_t *)(B[t]->q + 8 * k)));      \
            ib[t] = _mm512_dpbusd_epi32(ib[t], lo, _mm512_set1_epi32(*(const int32_t *)(B[t]->q2 + 8 * k)));     \
            ia[t] = _mm512_dpbusd_epi32(ia[t], hi, _mm512_set1_epi32(*(const int32_t *)(B[t]->q + 8 * k + 4)));  \
            ib[t] = _mm512_dpbusd_epi32(ib[t], hi, _mm512_set1_epi32(*(const int32_t *)(B[t]->q2 + 8 * k + 4))); \
        }                                                                                              \
    }
GEMM_PACKED(4, Q8P_GEMM)
GEMM_PACKED(1, Q8P_GEMM)
GEMM_PACKED(4, Q4P_GEMM)
GEMM_PACKED(1, Q4P_GEMM)
#endif

typedef struct {
    const ef_linear *w;
    const float *x; /* (T, cols) */
    float *y;       /* (T, rows) */
    int T;
    ef_qx *qx; /* (T, cols / 32): the tokens, quantized */
    barrier_t bar;
} pm_args;

static void pm_fn(void *a_, int ith, int nth) {
    pm_args *a = a_;
    const ef_linear *w = a->w;
    const int nbk = w->cols / 32;
    int t0, t1;
    split(a->T, ith, nth, 1, &t0, &t1); /* first each thread rounds its share of the tokens */
    for (int t = t0; t < t1; t++) quantize_x(a->x + (int64_t)t * w->cols, w->cols, a->qx + (int64_t)t * nbk);
    barrier(&a->bar, nth);
#ifdef EF_VNNI
    int r0, r1;
    split(w->rows, ith, nth, 16, &r0, &r1);
    for (int rb = r0 / 16; rb < r1 / 16; rb++) {
        int t = 0;
        for (; t + 4 <= a->T; t += 4) {
            const ef_qx *q = a->qx + (int64_t)t * nbk;
            float *y = a->y + (int64_t)t * w->rows;
            (w->kind == EF_Q8P ? gemm_packed_Q8P_GEMM_4 : gemm_packed_Q4P_GEMM_4)(w, q, nbk, rb, y, w->rows);
        }
        for (; t < a->T; t++) {
            const ef_qx *q = a->qx + (int64_t)t * nbk;
            float *y = a->y + (int64_t)t * w->rows;
            (w->kind == EF_Q8P ? gemm_packed_Q8P_GEMM_1 : gemm_packed_Q4P_GEMM_1)(w, q, nbk, rb, y, w->rows);
        }
    }
#endif
}

typedef struct {
    const ef_linear *w;
    const float *x;
    float *y;
    float *xs; /* per thread: cols floats */
    ef_qx *qx; /* packed weights: the input, quantized once */
} mv_args;

static void mv_fn(void *a_, int ith, int nth) {
    mv_args *a = a_;
    int r0, r1;
    split(a->w->rows, ith, nth, 16, &r0, &r1);
    if (PACKED(a->w))
        gemv_packed(a->w, a->qx, a->y, r0, r1, 0);
    else
        gemv(a->w, a->x, a->y, r0, r1, 0, a->xs + (int64_t)ith * a->w->cols);
}

/* y (T, rows) = x (T, cols) W^T (+ bias); threads split the rows */
int ef_matmul(const ef_linear *w, const float *x, float *y, int T, int nth) {
    if (T == 1) {
        /* per thread: cols floats of group sums; then the quantized input (packed weights) */
        float *xs = malloc(sizeof(float) * (size_t)w->cols * (size_t)(nth > 0 ? nth : 1) +
                           sizeof(ef_qblock) * (size_t)(w->cols / 32));
        if (!xs) return -1;
        mv_args a = {w, x, y, xs, (ef_qx *)(xs + (int64_t)w->cols * (nth > 0 ? nth : 1))};
        if (PACKED(w)) quantize_x(x, w->cols, a.qx);
        run(mv_fn, &a, nth);
        free(xs);
        return 0;
    }
    if (PACKED(w)) { /* the tokens in two int8 levels, as a decode step rounds its one */
        pm_args a = {w, x, y, T, malloc(sizeof(ef_qblock) * (size_t)T * (size_t)(w->cols / 32)), {0, 0, 0}};
        if (!a.qx) return -1;
        run(pm_fn, &a, nth);
        free(a.qx);
        return 0;
    }
    float *buf = malloc(sizeof(float) * 4 * (size_t)w->cols * (size_t)(nth > 0 ? nth : 1));
    if (!buf) return -1;
    mm_args a = {w, x, y, T, buf};
    run(mm_fn, &a, nth);
    free(buf);
    return 0;
}

typedef struct {
    const ef_linear *w;
    int r0, r1;
    float *out; /* (r1 - r0, cols) */
} dq_args;

static void dq_fn(void *a_, int ith, int nth) {
    dq_args *a = a_;
    int lo, hi;
    split(a->r1 - a->r0, ith, nth, 1, &lo, &hi);
    for (int r = lo; r < hi; r++) dequant_row(a->w, a->r0 + r, a->out + (int64_t)r * a->w->cols);
}

/* rows [r0, r1) of w as float32 (r1 - r0, cols): prompts then run a float GEMM over blocks of rows */
int ef_dequant(const ef_linear *w, int r0, int r1, float *out, int nth) {
    if (r0 < 0 || r1 > w->rows || r0 > r1 || PACKED(w)) return -1; /* packed prompts run the int8 GEMM */
    dq_args a = {w, r0, r1, out};
    run(dq_fn, &a, nth);
    return 0;
}

/* ---------------------------------------------------------------- the decode step */

typedef struct {
    ef_model *m;
    int pos;
    const float *cos, *sin; /* (head_dim): this position's rows, sin's first half negated */
    float *logits;
    barrier_t bar;
} step_args;

/* scratch layout (floats): x hidden | qkv | att | h13 (2 inter) | act inter |
 * per thread: xn hidden, xs widest, scores max_pos, the quantized input (widest / 32 ef_qblocks) */
static int64_t per_thread(const ef_model *m) {
    int64_t widest = m->hidden > m->inter ? m->hidden : m->inter;
    return m->hidden + widest + m->max_pos + (int64_t)(widest / 32) * (sizeof(ef_qblock) / sizeof(float)) + 32;
}

static inline float *S_x(ef_model *m) { return m->scratch; }
static inline float *S_qkv(ef_model *m) { return S_x(m) + m->hidden; }
static inline float *S_att(ef_model *m) {
    return S_qkv(m) + (int64_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
}
static inline float *S_h13(ef_model *m) { return S_att(m) + (int64_t)m->heads * m->head_dim; }
static inline float *S_act(ef_model *m) { return S_h13(m) + 2 * (int64_t)m->inter; }
static inline float *S_thread(ef_model *m, int ith) {
    return S_act(m) + m->inter + (int64_t)ith * per_thread(m);
}

static void rope(float *out, const float *x, const float *c, const float *s, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) out[i] = x[i] * c[i] + x[i + h] * s[i];
    for (int i = h; i < D; i++) out[i] = x[i] * c[i] + x[i - h] * s[i];
}

/* y[a0:a1] (+)= W in for any layout: a packed weight quantizes `in` first (each thread its own copy) */
#define GEMV(W, IN, Y, A0, A1, ADD)                             \
    do {                                                        \
        if (PACKED(W)) {                                        \
            quantize_x(IN, (W)->cols, qx);                      \
            gemv_packed(W, qx, Y, A0, A1, ADD);                 \
        } else {                                                \
            gemv(W, IN, Y, A0, A1, ADD, xs);                    \
        }                                                       \
    } while (0)

static void step_fn(void *a_, int ith, int nth) {
    step_args *a = a_;
    ef_model *m = a->m;
    const int H = m->hidden, D = m->head_dim, NH = m->heads, NKV = m->kv_heads, I = m->inter, pos = a->pos;
    float *x = S_x(m), *qkv = S_qkv(m), *att = S_att(m), *h13 = S_h13(m), *act = S_act(m);
    float *xn = S_thread(m, ith), *xs = xn + H, *sc = xs + (H > I ? H : I);
    ef_qx *qx = (ef_qx *)(sc + m->max_pos);
    const float scale = 1.0f / sqrtf((float)D);
    int head_rows = D; /* q|k|v rows per thread: whole heads, in whole 16-row blocks (lcm(D, 16)) */
    while (head_rows % 16) head_rows += D;
    int a0, a1;
    for (int l = 0; l < m->n_layers; l++) {
        ef_layer *L = &m->layers[l];
        rmsnorm(xn, x, L->ln1, H, m->eps);
        split(L->qkv.rows, ith, nth, head_rows, &a0, &a1); /* whole heads: a thread writes the K/V it computed */
        GEMV(&L->qkv, xn, qkv, a0, a1, 0);
        for (int kh = 0; kh < NKV; kh++) { /* its KV heads' rotated keys and values into the cache */
            int64_t kr = (int64_t)(NH + kh) * D, vr = (int64_t)(NH + NKV + kh) * D;
            if (kr >= a0 && kr < a1) rope(L->k + ((int64_t)kh * L->cap + pos) * D, qkv + kr, a->cos, a->sin, D);
            if (vr >= a0 && vr < a1) memcpy(L->v + ((int64_t)kh * L->cap + pos) * D, qkv + vr, sizeof(float) * D);
        }
        barrier(&a->bar, nth);
        split(NH, ith, nth, 1, &a0, &a1);
        int t0 = L->window > 0 && pos + 1 > L->window ? pos + 1 - L->window : 0, n = pos + 1 - t0;
        for (int h = a0; h < a1; h++) {
            float q[512];
            int kh = h / (NH / NKV);
            rope(q, qkv + (int64_t)h * D, a->cos, a->sin, D);
            const float *K = L->k + ((int64_t)kh * L->cap + t0) * D, *V = L->v + ((int64_t)kh * L->cap + t0) * D;
            float mx = -INFINITY;
            for (int t = 0; t < n; t++) {
                sc[t] = dot(q, K + (int64_t)t * D, D) * scale;
                if (sc[t] > mx) mx = sc[t];
            }
            float inv = 1.0f / exp_sub_sum(sc, sc, mx, n);
            float *o = att + (int64_t)h * D;
            for (int d = 0; d < D; d++) o[d] = 0.f;
            for (int t = 0; t < n; t++) {
                float p = sc[t] * inv;
                const float *vt = V + (int64_t)t * D;
                for (int d = 0; d < D; d++) o[d] += p * vt[d];
            }
        }
        barrier(&a->bar, nth);
        split(H, ith, nth, 16, &a0, &a1);
        GEMV(&L->o, att, x, a0, a1, 1); /* x += o_proj(att) */
        barrier(&a->bar, nth);
        rmsnorm(xn, x, L->ln2, H, m->eps);
        split(I, ith, nth, 16, &a0, &a1); /* gate rows [a0, a1) and the matching up rows */
        GEMV(&L->w13, xn, h13, a0, a1, 0);
        if (PACKED(&L->w13))
            gemv_packed(&L->w13, qx, h13, I + a0, I + a1, 0);
        else
            gemv(&L->w13, xn, h13, I + a0, I + a1, 0, xs);
        silu_mul(act + a0, h13 + a0, h13 + I + a0, a1 - a0);
        barrier(&a->bar, nth);
        split(H, ith, nth, 16, &a0, &a1);
        GEMV(&L->w2, act, x, a0, a1, 1); /* x += down(act) */
        barrier(&a->bar, nth);
    }
    if (a->logits) {
        rmsnorm(xn, x, m->norm, H, m->eps);
        split(m->head.rows, ith, nth, 16, &a0, &a1);
        GEMV(&m->head, xn, a->logits, a0, a1, 0);
    }
}

int ef_model_init(ef_model *m, int max_threads) {
    if (m->head_dim > 512 || m->heads % m->kv_heads) return -1;
    int64_t shared = m->hidden + (int64_t)(m->heads + 2 * m->kv_heads) * m->head_dim +
                     (int64_t)m->heads * m->head_dim + 3 * (int64_t)m->inter;
    m->scratch = aligned_alloc(64, sizeof(float) * (size_t)((shared + per_thread(m) * max_threads + 15) / 16 * 16));
    return m->scratch ? 0 : -1;
}

void ef_model_free(ef_model *m) {
    free(m->scratch);
    m->scratch = NULL;
}

/* One token at position pos through every layer: writes its K/V at pos in each layer's cache and the
 * logits (vocab) if logits is not NULL; the final hidden state (before the norm) is left in `hidden`. */
int ef_step(ef_model *m, int token, int pos, const float *cos, const float *sin, float *logits, float *hidden,
            int nth) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_pos) return -1;
    for (int l = 0; l < m->n_layers; l++)
        if (pos >= m->layers[l].cap) return -2;
    for (int h = 0; h < m->hidden; h++) S_x(m)[h] = m->embed[(int64_t)token * m->embed_rs + h * m->embed_cs];
    step_args a = {m, pos, cos, sin, logits, {0, 0, 0}};
    run(step_fn, &a, nth);
    if (hidden) memcpy(hidden, S_x(m), sizeof(float) * m->hidden);
    return 0;
}

int ef_has_vnni(void) {
#ifdef EF_VNNI
    return 1;
#else
    return 0;
#endif
}

int ef_has_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
