/* Per-row iALS solves in the eigenbasis of alpha*G (see ials.py next to this file for the maths).
 *
 * Every row r solves (diag(eig + shift_r) + V_r^T W_r V_r) x = V_r^T w_r + extra_r, where V_r
 * gathers the rotated factor rows of its interactions. Rows shorter than the rank go through
 * Woodbury (an n x n Cholesky), longer rows through a d x d Cholesky of the Gramian; an
 * optional mode runs warm-started conjugate gradient instead. Threads are Python's: each
 * caller grabs blocks of rows from a shared atomic cursor, so no OpenMP runtime is involved
 * (libgomp does not survive fork()).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RESTRICT __restrict__

/* Upper-triangular in-place Cholesky A = U^T U (row-major, leading dimension ld). */
static int cholesky_upper(float *RESTRICT a, int64_t n, int64_t ld) {
    for (int64_t k = 0; k < n; ++k) {
        float *RESTRICT row_k = a + k * ld;
        float pivot = row_k[k];
        if (!(pivot > 0.0f)) return -1;
        float diag = sqrtf(pivot);
        float inv = 1.0f / diag;
        row_k[k] = diag;
        for (int64_t j = k + 1; j < n; ++j) row_k[j] *= inv;
        for (int64_t i = k + 1; i < n; ++i) {
            float f = row_k[i];
            float *RESTRICT row_i = a + i * ld;
            /* start at the vector-aligned column below i: the extra entries lie in the
             * never-read lower triangle, and full-width loops avoid scalar remainders */
#pragma omp simd
            for (int64_t j = i & ~(int64_t)15; j < n; ++j) row_i[j] -= f * row_k[j];
        }
    }
    return 0;
}

/* Solve U^T U x = b in place, U from cholesky_upper. */
static void cholesky_solve(const float *RESTRICT u, int64_t n, int64_t ld, float *RESTRICT b) {
    for (int64_t k = 0; k < n; ++k) {
        const float *RESTRICT row_k = u + k * ld;
        float y = b[k] / row_k[k];
        b[k] = y;
#pragma omp simd
        for (int64_t j = k + 1; j < n; ++j) b[j] -= row_k[j] * y;
    }
    for (int64_t k = n - 1; k >= 0; --k) {
        const float *RESTRICT row_k = u + k * ld;
        float s = b[k];
        for (int64_t j = k + 1; j < n; ++j) s -= row_k[j] * b[j];
        b[k] = s / row_k[k];
    }
}

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static float dot(const float *RESTRICT x, const float *RESTRICT y, int64_t n) {
    if (n % 16 == 0) {
        /* whole vectors and a tree reduction: GCC's own epilogue for this goes through memory */
        v16 acc = {0};
        for (int64_t k = 0; k < n; k += 16) {
            v16 a, b;
            memcpy(&a, x + k, sizeof a);
            memcpy(&b, y + k, sizeof b);
            acc += a * b;
        }
        v8 half = __builtin_shufflevector(acc, acc, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(acc, acc, 8, 9, 10, 11, 12, 13, 14, 15);
        v4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
        return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
    }
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
    return s;
}

/* Upper triangle of A += sum_t c_t v_t v_t^T for four rows at once (fewer passes over A). */
static void rank4_update(float *RESTRICT a, int64_t d, const float *RESTRICT v0, const float *RESTRICT v1,
                         const float *RESTRICT v2, const float *RESTRICT v3, float c0, float c1, float c2,
                         float c3) {
    for (int64_t i = 0; i < d; ++i) {
        float f0 = c0 * v0[i], f1 = c1 * v1[i], f2 = c2 * v2[i], f3 = c3 * v3[i];
        float *RESTRICT row = a + i * d;
#pragma omp simd
        for (int64_t j = i & ~(int64_t)15; j < d; ++j) row[j] += f0 * v0[j] + f1 * v1[j] + f2 * v2[j] + f3 * v3[j];
    }
}

static void rank1_update(float *RESTRICT a, int64_t d, const float *RESTRICT v, float c) {
    for (int64_t i = 0; i < d; ++i) {
        float f = c * v[i];
        float *RESTRICT row = a + i * d;
#pragma omp simd
        for (int64_t j = i & ~(int64_t)15; j < d; ++j) row[j] += f * v[j];
    }
}

typedef struct {
    const int64_t *indptr;
    const int32_t *indices;
    const float *weights; /* NULL: all ones */
    const float *rotated; /* (n_cols, d) */
    const float *eigvals; /* (d,) */
    const double *shift;  /* (n_rows,) ridge + rho */
    const float *extra;   /* (n_extra, d) added to the right-hand sides of some rows, or NULL */
    const int32_t *extra_row; /* (n_rows,) row r's row of extra, -1 for none (read only with extra) */
    const float *start;   /* (n_rows, d) CG warm start in the eigenbasis, or NULL */
    float *out;           /* (n_rows, d) */
    int64_t d;
    int64_t cg_steps;     /* 0: exact */
} problem;

/* Ask for the factor rows a few interactions ahead: the gathers are random, and DRAM latency
 * (not arithmetic) bounds them once the other side's factors outgrow the cache. */
#define PREFETCH_AHEAD 8
static inline void prefetch_row(const problem *p, int64_t t, int64_t hi) {
    if (t < hi) {
        const char *v = (const char *)(p->rotated + (int64_t)p->indices[t] * p->d);
        for (int64_t byte = 0; byte < p->d * (int64_t)sizeof(float); byte += 64) __builtin_prefetch(v + byte);
    }
}

/* Row r's row of extra, or NULL: only the rows with a proximal term carry one, so no
 * (n_rows, d) array of mostly zeros exists. */
static inline const float *extra_of(const problem *p, int64_t r) {
    if (!p->extra || p->extra_row[r] < 0) return NULL;
    return p->extra + (int64_t)p->extra_row[r] * p->d;
}

/* b = extra_r, or zeros. */
static inline void rhs_start(const problem *p, int64_t r, float *RESTRICT b) {
    const float *e = extra_of(p, r);
    if (e) memcpy(b, e, (size_t)p->d * sizeof(float));
    else memset(b, 0, (size_t)p->d * sizeof(float));
}

/* The right-hand side V^T w + extra of row r into b. */
static void row_rhs(const problem *p, int64_t r, float *RESTRICT b) {
    const int64_t d = p->d;
    rhs_start(p, r, b);
    const int64_t hi = p->indptr[r + 1];
    for (int64_t t = p->indptr[r]; t < hi; ++t) {
        prefetch_row(p, t + PREFETCH_AHEAD, hi);
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[t] * d;
        float w = p->weights ? p->weights[t] : 1.0f;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) b[k] += w * v[k];
    }
}

static int solve_dense(const problem *p, int64_t r, float *RESTRICT a, float *RESTRICT b) {
    const int64_t d = p->d, lo = p->indptr[r], hi = p->indptr[r + 1];
    const float sh = (float)p->shift[r];
    memset(a, 0, (size_t)(d * d) * sizeof(float));
    for (int64_t k = 0; k < d; ++k) a[k * d + k] = p->eigvals[k] + sh;
    rhs_start(p, r, b);
    int64_t t = lo;
    for (; t + 4 <= hi; t += 4) {
        for (int64_t ahead = 0; ahead < 4; ++ahead) prefetch_row(p, t + PREFETCH_AHEAD + ahead, hi);
        const float *RESTRICT v0 = p->rotated + (int64_t)p->indices[t] * d;
        const float *RESTRICT v1 = p->rotated + (int64_t)p->indices[t + 1] * d;
        const float *RESTRICT v2 = p->rotated + (int64_t)p->indices[t + 2] * d;
        const float *RESTRICT v3 = p->rotated + (int64_t)p->indices[t + 3] * d;
        float c0 = 1.0f, c1 = 1.0f, c2 = 1.0f, c3 = 1.0f;
        if (p->weights) {
            c0 = p->weights[t];
            c1 = p->weights[t + 1];
            c2 = p->weights[t + 2];
            c3 = p->weights[t + 3];
        }
        rank4_update(a, d, v0, v1, v2, v3, c0, c1, c2, c3);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) b[k] += c0 * v0[k] + c1 * v1[k] + c2 * v2[k] + c3 * v3[k];
    }
    for (; t < hi; ++t) {
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[t] * d;
        float c = p->weights ? p->weights[t] : 1.0f;
        rank1_update(a, d, v, c);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) b[k] += c * v[k];
    }
    if (cholesky_upper(a, d, d)) return -1;
    cholesky_solve(a, d, d, b);
    memcpy(p->out + r * d, b, (size_t)d * sizeof(float));
    return 0;
}

/* Woodbury: A = D + S^T S with S = diag(sqrt w) V (n x d, n < d);
 * A^-1 b = D^-1 b - D^-1 S^T (I + S D^-1 S^T)^-1 S D^-1 b. */
static int solve_woodbury(const problem *p, int64_t r, float *RESTRICT k_mat, float *RESTRICT scaled,
                          float *RESTRICT b, float *RESTRICT dinv, float *RESTRICT sol) {
    const int64_t d = p->d, lo = p->indptr[r], n = p->indptr[r + 1] - lo;
    const float sh = (float)p->shift[r];
    for (int64_t k = 0; k < d; ++k) dinv[k] = 1.0f / (p->eigvals[k] + sh);
    row_rhs(p, r, b);
    for (int64_t k = 0; k < d; ++k) b[k] *= dinv[k]; /* b := D^-1 b */
    for (int64_t a = 0; a < n; ++a) {
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[lo + a] * d;
        float s = p->weights ? sqrtf(p->weights[lo + a]) : 1.0f;
        float *RESTRICT row = scaled + a * d; /* S D^-1, row a */
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) row[k] = s * v[k] * dinv[k];
    }
    /* zero first: the Cholesky's full-width loops read (never use) the lower triangle */
    memset(k_mat, 0, (size_t)(n * n) * sizeof(float));
    for (int64_t a = 0; a < n; ++a) {
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[lo + a] * d;
        float s = p->weights ? sqrtf(p->weights[lo + a]) : 1.0f;
        for (int64_t c = a; c < n; ++c) k_mat[a * n + c] = s * dot(v, scaled + c * d, d);
        k_mat[a * n + a] += 1.0f;
        sol[a] = s * dot(v, b, d);
    }
    if (cholesky_upper(k_mat, n, n)) return -1;
    cholesky_solve(k_mat, n, n, sol);
    float *RESTRICT x = p->out + r * d;
    memcpy(x, b, (size_t)d * sizeof(float));
    for (int64_t a = 0; a < n; ++a) {
        const float *RESTRICT row = scaled + a * d;
        float f = sol[a];
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) x[k] -= f * row[k];
    }
    return 0;
}

/* ---- Register-tiled paths for ranks that are multiples of 16 (the common 64/128/192). ---- */

#define TILE_ROWS 128 /* interactions per Gramian pass: their factor rows stay in L1/L2 */

static inline v16 load16(const float *p) {
    v16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void add_store16(float *p, v16 x) {
    v16 y = load16(p) + x;
    memcpy(p, &y, sizeof y);
}

/* Rows of A per register tile: 8 where there are 32 vector registers (AVX-512), else 4. */
#ifdef __AVX512F__
#define TILE_I 8
#else
#define TILE_I 4
#endif

/* Upper blocks of A (m x m, m % 16 == 0, leading dimension ld) += sum_t coef[t] rows[t] rows[t]^T.
 * Each TILE_I x 32 tile accumulates in registers over all t, so A is touched once per pass. */
static inline __attribute__((always_inline)) void gram_upper_body(float *RESTRICT a, int64_t m, int64_t ld,
                                                                  const float *const *rows,
                                                                  const float *RESTRICT coef, int64_t count,
                                                                  const int unit) {
    for (int64_t i0 = 0; i0 < m; i0 += TILE_I) {
        int64_t j0 = i0 & ~(int64_t)15;
        for (; j0 + 32 <= m; j0 += 32) {
            v16 acc0[TILE_I], acc1[TILE_I];
#pragma GCC unroll 8
            for (int q = 0; q < TILE_I; ++q) acc0[q] = acc1[q] = (v16){0};
            for (int64_t t = 0; t < count; ++t) {
                const float *v = rows[t];
                const float c = unit ? 1.0f : coef[t];
                const v16 x0 = load16(v + j0), x1 = load16(v + j0 + 16);
#pragma GCC unroll 8
                for (int q = 0; q < TILE_I; ++q) {
                    const float f = c * v[i0 + q];
                    acc0[q] += f * x0;
                    acc1[q] += f * x1;
                }
            }
#pragma GCC unroll 8
            for (int q = 0; q < TILE_I; ++q) {
                add_store16(a + (i0 + q) * ld + j0, acc0[q]);
                add_store16(a + (i0 + q) * ld + j0 + 16, acc1[q]);
            }
        }
        if (j0 < m) {
            v16 acc0[TILE_I];
#pragma GCC unroll 8
            for (int q = 0; q < TILE_I; ++q) acc0[q] = (v16){0};
            for (int64_t t = 0; t < count; ++t) {
                const float *v = rows[t];
                const float c = unit ? 1.0f : coef[t];
                const v16 x0 = load16(v + j0);
#pragma GCC unroll 8
                for (int q = 0; q < TILE_I; ++q) acc0[q] += (c * v[i0 + q]) * x0;
            }
#pragma GCC unroll 8
            for (int q = 0; q < TILE_I; ++q) add_store16(a + (i0 + q) * ld + j0, acc0[q]);
        }
    }
}

/* coef == NULL means all ones; the unit case compiles without the per-row scalings. */
static void gram_upper_tiled(float *RESTRICT a, int64_t m, int64_t ld, const float *const *rows,
                             const float *RESTRICT coef, int64_t count) {
    if (coef) gram_upper_body(a, m, ld, rows, coef, count, 0);
    else gram_upper_body(a, m, ld, rows, coef, count, 1);
}

static int solve_dense_tiled(const problem *p, int64_t r, float *RESTRICT a, float *RESTRICT b) {
    const int64_t d = p->d, lo = p->indptr[r], hi = p->indptr[r + 1];
    const float sh = (float)p->shift[r];
    const float *rows[TILE_ROWS];
    float coef[TILE_ROWS];
    memset(a, 0, (size_t)(d * d) * sizeof(float));
    for (int64_t k = 0; k < d; ++k) a[k * d + k] = p->eigvals[k] + sh;
    rhs_start(p, r, b);
    for (int64_t first = lo; first < hi; first += TILE_ROWS) {
        const int64_t count = hi - first < TILE_ROWS ? hi - first : TILE_ROWS;
        for (int64_t t = 0; t < count; ++t) {
            rows[t] = p->rotated + (int64_t)p->indices[first + t] * d;
            coef[t] = p->weights ? p->weights[first + t] : 1.0f;
            for (int64_t byte = 0; byte < d * (int64_t)sizeof(float); byte += 64)
                __builtin_prefetch((const char *)rows[t] + byte);
        }
        for (int64_t t = 0; t < count; ++t) {
            const float *RESTRICT v = rows[t];
            const float c = coef[t];
#pragma omp simd
            for (int64_t k = 0; k < d; ++k) b[k] += c * v[k];
        }
        gram_upper_tiled(a, d, d, rows, p->weights ? coef : NULL, count);
    }
    if (cholesky_upper(a, d, d)) return -1;
    cholesky_solve(a, d, d, b);
    memcpy(p->out + r * d, b, (size_t)d * sizeof(float));
    return 0;
}

/* Woodbury with K = I + S D^-1 S^T formed as the Gramian of the columns of S^T (d x n_pad,
 * zero-padded to a multiple of 16), weighted by D^-1: the same tiled kernel as the dense path. */
static int solve_woodbury_tiled(const problem *p, int64_t r, float *RESTRICT k_mat, float *RESTRICT st,
                                float *RESTRICT b, float *RESTRICT dinv, float *RESTRICT sol,
                                float *RESTRICT root_dinv) {
    const int64_t d = p->d, lo = p->indptr[r], n = p->indptr[r + 1] - lo;
    const int64_t n_pad = (n + 15) & ~(int64_t)15;
    const float sh = (float)p->shift[r];
    const float *rows[d];
    for (int64_t k = 0; k < d; ++k) dinv[k] = 1.0f / (p->eigvals[k] + sh);
    row_rhs(p, r, b);
    for (int64_t k = 0; k < d; ++k) b[k] *= dinv[k]; /* b := D^-1 b */
    float *RESTRICT x = p->out + r * d;
    memcpy(x, b, (size_t)d * sizeof(float));
    if (n == 0) return 0;
    memset(st, 0, (size_t)(d * n_pad) * sizeof(float));
    /* st = D^-1/2 S^T, so that K - I is its plain Gramian */
    for (int64_t k = 0; k < d; ++k) root_dinv[k] = sqrtf(dinv[k]);
    for (int64_t q = 0; q < n; ++q) {
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[lo + q] * d;
        const float s = p->weights ? sqrtf(p->weights[lo + q]) : 1.0f;
        for (int64_t k = 0; k < d; ++k) st[k * n_pad + q] = s * v[k] * root_dinv[k];
    }
    /* the padded block of K is the identity (its columns of S^T are zero), so the Cholesky
     * and the solves can run full-width over n_pad without scalar remainders */
    memset(k_mat, 0, (size_t)(n_pad * n_pad) * sizeof(float));
    for (int64_t q = 0; q < n_pad; ++q) k_mat[q * n_pad + q] = 1.0f;
    for (int64_t k = 0; k < d; ++k) rows[k] = st + k * n_pad;
    gram_upper_tiled(k_mat, n_pad, n_pad, rows, NULL, d);
    /* sol = S D^-1 b_orig = st^T (D^1/2 b), as b already holds D^-1 b_orig */
    memset(sol, 0, (size_t)n_pad * sizeof(float));
    for (int64_t k = 0; k < d; ++k) {
        const float f = b[k] / root_dinv[k];
        const float *RESTRICT col = st + k * n_pad;
#pragma omp simd
        for (int64_t q = 0; q < n_pad; ++q) sol[q] += f * col[q];
    }
    if (cholesky_upper(k_mat, n_pad, n_pad)) return -1;
    cholesky_solve(k_mat, n_pad, n_pad, sol);
    /* x = D^-1 b - D^-1 S^T sol, with S^T sol summed over the (cached) factor rows */
    memset(b, 0, (size_t)d * sizeof(float));
    for (int64_t q = 0; q < n; ++q) {
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[lo + q] * d;
        const float f = sol[q] * (p->weights ? sqrtf(p->weights[lo + q]) : 1.0f);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) b[k] += f * v[k];
    }
#pragma omp simd
    for (int64_t k = 0; k < d; ++k) x[k] -= dinv[k] * b[k];
    return 0;
}

/* y = (D + V^T W V) x for row r. */
static void apply_row(const problem *p, int64_t r, const float *RESTRICT x, float *RESTRICT y) {
    const int64_t d = p->d;
    const float sh = (float)p->shift[r];
    for (int64_t k = 0; k < d; ++k) y[k] = (p->eigvals[k] + sh) * x[k];
    const int64_t hi = p->indptr[r + 1];
    for (int64_t t = p->indptr[r]; t < hi; ++t) {
        prefetch_row(p, t + PREFETCH_AHEAD, hi);
        const float *RESTRICT v = p->rotated + (int64_t)p->indices[t] * d;
        float f = dot(v, x, d) * (p->weights ? p->weights[t] : 1.0f);
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) y[k] += f * v[k];
    }
}

/* A fixed number of conjugate-gradient steps from the warm start (as implicit's CG does). */
static void solve_cg(const problem *p, int64_t r, float *RESTRICT res, float *RESTRICT dir,
                     float *RESTRICT adir) {
    const int64_t d = p->d;
    float *RESTRICT x = p->out + r * d;
    memcpy(x, p->start + r * d, (size_t)d * sizeof(float));
    row_rhs(p, r, res);
    apply_row(p, r, x, adir);
    for (int64_t k = 0; k < d; ++k) res[k] -= adir[k];
    memcpy(dir, res, (size_t)d * sizeof(float));
    float rs_old = dot(res, res, d);
    for (int64_t step = 0; step < p->cg_steps && rs_old > 1e-20f; ++step) {
        apply_row(p, r, dir, adir);
        float curvature = dot(dir, adir, d);
        if (!(curvature > 0.0f)) break;
        float step_len = rs_old / curvature;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) {
            x[k] += step_len * dir[k];
            res[k] -= step_len * adir[k];
        }
        float rs_new = dot(res, res, d);
        float beta = rs_new / rs_old;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) dir[k] = res[k] + beta * dir[k];
        rs_old = rs_new;
    }
}

/* Solve rows order[i] for blocks of i grabbed from *cursor until none are left.
 * Rows whose Cholesky breaks down are flagged in failed[] (the caller re-solves them in
 * float64); returns how many failed, or -1 when scratch memory could not be allocated. */
int64_t ials_solve_rows(const int64_t *order, int64_t n_order, int64_t *cursor, int64_t block,
                        const int64_t *indptr, const int32_t *indices, const float *weights,
                        const float *rotated, const float *eigvals, const double *shift, const float *extra,
                        const int32_t *extra_row, const float *start, float *out, int64_t d, int64_t cg_steps, uint8_t *failed) {
    problem p = {indptr, indices, weights, rotated, eigvals, shift, extra, extra_row, start, out, d, cg_steps};
    size_t bytes = (size_t)(2 * d * d + 4 * d) * sizeof(float);
    float *scratch = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!scratch) return -1;
    float *mat = scratch, *scaled = scratch + d * d, *b = scaled + d * d, *dinv = b + d, *sol = dinv + d,
          *cg_buf = sol + d;
    const int tiled = d % 16 == 0;
    int64_t n_failed = 0;
    for (;;) {
        int64_t first = __atomic_fetch_add(cursor, block, __ATOMIC_RELAXED);
        if (first >= n_order) break;
        int64_t last = first + block < n_order ? first + block : n_order;
        for (int64_t i = first; i < last; ++i) {
            int64_t r = order[i];
            int64_t n = indptr[r + 1] - indptr[r];
            int status;
            if (cg_steps > 0) {
                solve_cg(&p, r, b, dinv, cg_buf);
                status = 0;
            } else if (n < d) {
                status = tiled ? solve_woodbury_tiled(&p, r, mat, scaled, b, dinv, sol, cg_buf)
                               : solve_woodbury(&p, r, mat, scaled, b, dinv, sol);
            } else {
                status = tiled ? solve_dense_tiled(&p, r, mat, b) : solve_dense(&p, r, mat, b);
            }
            if (status) {
                failed[r] = 1;
                ++n_failed;
            }
        }
    }
    free(scratch);
    return n_failed;
}
