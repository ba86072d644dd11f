/* Row-sparse SGD on the host in one pass: momentum read, update, stochastic rounding and write-back.

   For each sampled row b (slice row ids[b]) and column d, with w = rows[b][d] (the W row gathered for the
   step, fp32) and g = grad[b][d]:

       g    <- fma(w, wd, g)                      if apply_wd (the caller's wd != 0, tested before rounding to fp32)
       m    <- g + m * mu                         m read from and written to momentum[ids[b]]   (if momentum)
       step <- fma(m, mu, g) if nesterov else m   (g without momentum)
       w    <- fma(step, -lr, w)                  written to weight[ids[b]]

   The operation order, fused multiply-adds and fp32 rounding of lr, mu and wd are those of torch's vectorised
   fused CPU SGD kernel (dampening 0), so an fp32 result has the same bits as torch.optim.sgd(fused=True) on
   gathered rows followed by a scatter (except NaN sign and payload bits, and the few elements torch leaves to
   its scalar remainder loop when a block is not a whole number of its vectors). A bf16 destination (weight or momentum) is written rounded stochastically with
   the 16-bit noise word k of that element: high 16 bits of (fp32 bits + k), the rule of
   largefr.heads.stochastic_round, with W and momentum sharing an element's k as the optimizer's torch path does.

   What it saves against that torch path: the fp32 copy of the momentum rows, the widened noise, the
   rounded copies and the separate scatters; each momentum row is read and written while in cache.
   ids must be distinct and inside the slice (the Python wrapper checks that they increase strictly and
   lie in the slice; it also checks every shape, dtype and layout); rows, grad and noise are
   row-major [num_rows, dim]. Returns 0, or 1 if a 16-bit destination has no noise, 2 for an unsupported
   combination. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_float(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

INLINE uint16_t float_to_bf16_stochastic(float value, uint32_t noise) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (uint16_t)((bits + noise) >> 16);  /* the carry from the dropped half rounds up with its probability */
}

/* The flags are compile-time constants at every call site, so each combination becomes its own loop with
   no branch inside, which the compiler vectorises. */
INLINE void update_row(const float *restrict w_row, const float *restrict g_row, const uint16_t *restrict noise,
                       void *restrict w_out, void *restrict m_io, int64_t dim, float neg_lr, float mu, float wd,
                       const int w16, const int m16, const int has_m, const int nesterov, const int has_wd) {
    for (int64_t d = 0; d < dim; ++d) {
        const float w = w_row[d];
        float g = g_row[d];
        if (has_wd) g = fmaf(w, wd, g);
        float step = g;
        const uint32_t k = (w16 || m16) ? noise[d] : 0;
        if (has_m) {
            float m = m16 ? bf16_to_float(((const uint16_t *)m_io)[d]) : ((const float *)m_io)[d];
            m = g + m * mu;
            if (m16) ((uint16_t *)m_io)[d] = float_to_bf16_stochastic(m, k);
            else ((float *)m_io)[d] = m;
            step = nesterov ? fmaf(m, mu, g) : m;
        }
        const float w_new = fmaf(step, neg_lr, w);
        if (w16) ((uint16_t *)w_out)[d] = float_to_bf16_stochastic(w_new, k);
        else ((float *)w_out)[d] = w_new;
    }
}

INLINE void update_rows(const int64_t *ids, int64_t num_rows, int64_t dim, const float *rows, const float *grad,
                        char *weight, char *momentum, const uint16_t *noise, float neg_lr, float mu, float wd,
                        const int w16, const int m16, const int has_m, const int nesterov, const int has_wd) {
    const int64_t w_row_bytes = dim * (w16 ? 2 : 4), m_row_bytes = dim * (m16 ? 2 : 4);
    for (int64_t b = 0; b < num_rows; ++b) {
        update_row(rows + b * dim, grad + b * dim, noise ? noise + b * dim : 0, weight + ids[b] * w_row_bytes,
                   has_m ? momentum + ids[b] * m_row_bytes : 0, dim, neg_lr, mu, wd, w16, m16, has_m, nesterov, has_wd);
    }
}

#define CASE(W16, M16, HAS_M, NESTEROV, HAS_WD)                                                                  \
    if (w16 == W16 && m16 == M16 && has_m == HAS_M && nesterov == NESTEROV && has_wd == HAS_WD) {              \
        update_rows(ids, num_rows, dim, rows, grad, weight, momentum, noise, -lr, mu, wd, W16, M16, HAS_M,      \
                    NESTEROV, HAS_WD);                                                                          \
        return 0;                                                                                               \
    }

int row_sgd_update(const int64_t *ids, int64_t num_rows, int64_t dim, const float *rows, const float *grad,
                   char *weight, int w16, char *momentum, int m16, const uint16_t *noise, float lr, float mu,
                   float wd, int apply_wd, int nesterov) {
    const int has_m = momentum != 0, has_wd = apply_wd != 0;
    w16 = w16 != 0;
    m16 = has_m && m16 != 0;
    nesterov = has_m && nesterov != 0;
    if ((w16 || m16) && !noise) return 1;
    CASE(0, 0, 0, 0, 0) CASE(0, 0, 0, 0, 1) CASE(1, 0, 0, 0, 0) CASE(1, 0, 0, 0, 1)
    CASE(0, 0, 1, 0, 0) CASE(0, 0, 1, 0, 1) CASE(0, 0, 1, 1, 0) CASE(0, 0, 1, 1, 1)
    CASE(0, 1, 1, 0, 0) CASE(0, 1, 1, 0, 1) CASE(0, 1, 1, 1, 0) CASE(0, 1, 1, 1, 1)
    CASE(1, 0, 1, 0, 0) CASE(1, 0, 1, 0, 1) CASE(1, 0, 1, 1, 0) CASE(1, 0, 1, 1, 1)
    CASE(1, 1, 1, 0, 0) CASE(1, 1, 1, 0, 1) CASE(1, 1, 1, 1, 0) CASE(1, 1, 1, 1, 1)
    return 2;
}
