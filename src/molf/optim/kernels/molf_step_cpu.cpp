// MoLF CPU kernels: the native backend of MoLFAdamW (molf/optim/backends/native.py builds this
// file at first use and fills `MolfStep` through its ctypes mirror `KernelArgs`). The maths is
// docs/method.md section 3, the same as molf/optim/functional.py, which the tests compare it to.
// One pass per tensor advances m and v and accumulates the score partial; the winners of a
// module are then updated while their moments are still in cache. A whole module is one work
// item of one thread, so its result does not depend on the thread count and needs no barrier.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Dtype { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };
// Score kernels by id; `molf_score_kernels` lists their names in id order for the Python side.
enum Kind { EPD = 0, PFN = 1, N_KINDS = 2 };
enum Phase { FUSED = 0, SCORE = 1, APPLY = 2 };
const int64_t BLOCK = 2048;  // elements per float partial sum (then summed in double)
const int64_t CHUNK = 1 << 18;  // elements per work item of the plain AdamW tensors
const int MAX_EXPERTS = 64;

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half by bit manipulation (any C++ compiler; _Float16 needs GCC 12), round to nearest even.
inline float half_to_float(uint16_t h) {
  uint32_t u = uint32_t(h & 0x7fffu) << 13;
  const uint32_t exp = u & (0x7c00u << 13);
  u += (127 - 15) << 23;
  float f;
  if (exp == (0x7c00u << 13)) {  // inf or NaN
    u += (128 - 16) << 23;
    std::memcpy(&f, &u, 4);
  } else if (exp == 0) {  // zero or subnormal: renormalise through a float subtraction
    u += 1 << 23;
    std::memcpy(&f, &u, 4);
    f -= 6.103515625e-05f;  // 2^-14
  } else {
    std::memcpy(&f, &u, 4);
  }
  return (h & 0x8000u) ? -f : f;
}

inline uint16_t float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u >= 0x47800000u) return sign | (u > 0x7f800000u ? 0x7e00u : 0x7c00u);  // NaN, inf
  if (u < 0x38800000u) {  // subnormal or zero: let a float addition do the rounding
    float a;
    std::memcpy(&a, &u, 4);
    a += 0.5f;
    std::memcpy(&u, &a, 4);
    return sign | uint16_t(u - 0x3f000000u);
  }
  u += 0xc8000fffu + ((u >> 13) & 1u);  // rebias the exponent, round to nearest even
  return sign | uint16_t(u >> 13);
}

template <int D> struct Io;
template <> struct Io<F32> {
  typedef float T;
  template <class C> static inline C round(C x) { return C(float(x)); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(p[i]); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float(x); }
};
template <> struct Io<F64> {
  typedef double T;
  template <class C> static inline C round(C x) { return x; }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(p[i]); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = double(x); }
};
template <> struct Io<BF16> {
  typedef uint16_t T;
  template <class C> static inline C round(C x) { return C(bf16_to_float(float_to_bf16(float(x)))); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(bf16_to_float(p[i])); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float_to_bf16(float(x)); }
};
template <> struct Io<F16> {
  typedef uint16_t T;
  template <class C> static inline C round(C x) { return C(half_to_float(float_to_half(float(x)))); }
  template <class C> static inline C ld(const T* p, int64_t i) { return C(half_to_float(p[i])); }
  template <class C> static inline void st(T* p, int64_t i, C x) { p[i] = float_to_half(float(x)); }
};

// m <- m + c1 (g - m); v <- b2 v + c2 g^2 for element i, c = 1 - b computed in double (1 - 0.999
// in float is off by 1e-5); stores m and v and returns them as stored (rounded, for
// low-precision moments), which is what the score and the update read.
template <int G, int M, class C>
inline void advance(const typename Io<G>::T* g, typename Io<M>::T* m, typename Io<M>::T* v,
                    int64_t i, C c1, C b2, C c2, C& m_out, C& v_out) {
  const C gi = Io<G>::template ld<C>(g, i);
  const C mi = Io<M>::template ld<C>(m, i) + c1 * (gi - Io<M>::template ld<C>(m, i));
  const C vi = b2 * Io<M>::template ld<C>(v, i) + c2 * (gi * gi);
  Io<M>::st(m, i, mi);
  Io<M>::st(v, i, vi);
  m_out = Io<M>::round(mi);
  v_out = Io<M>::round(vi);
}

// p decay - step * m / (sqrt(v) + eps'): the Adam update of one element, where the caller folds
// the bias corrections into step = lr sqrt(bc2) / bc1 and eps' = eps sqrt(bc2) (one division and
// one square root per element, which bound these loops on CPUs with fast memory).
template <class C>
inline C updated(C p, C m, C v, C decay, C step, C eps) {
  return p * decay - step * (m / (std::sqrt(v) + eps));
}

// Advances m and v on [lo, hi) and returns the score partial of those elements.
template <int P, int G, int M, class C, int K>
double moments(const void* g_, void* m_, void* v_, int64_t lo, int64_t hi, C c1, C b2, C c2,
               C eps) {
  const typename Io<G>::T* g = static_cast<const typename Io<G>::T*>(g_);
  typename Io<M>::T* m = static_cast<typename Io<M>::T*>(m_);
  typename Io<M>::T* v = static_cast<typename Io<M>::T*>(v_);
  double total = 0.0;
  for (int64_t b = lo; b < hi; b += BLOCK) {
    const int64_t e = std::min(hi, b + BLOCK);
    C acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) {
      C ms, vs;
      advance<G, M, C>(g, m, v, i, c1, b2, c2, ms, vs);
      const C d = std::sqrt(vs) + eps;
      if (K == EPD) {
        acc += ms * ms / d;
      } else {
        const C u = ms / d;
        acc += u * u;
      }
    }
    total += double(acc);
  }
  return total;
}

// The winners' update on [lo, hi).
template <int P, int M, class C>
void apply(void* p_, const void* m_, const void* v_, int64_t lo, int64_t hi, C decay, C step,
           C eps) {
  typename Io<P>::T* p = static_cast<typename Io<P>::T*>(p_);
  const typename Io<M>::T* m = static_cast<const typename Io<M>::T*>(m_);
  const typename Io<M>::T* v = static_cast<const typename Io<M>::T*>(v_);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i)
    Io<P>::st(p, i,
              updated<C>(Io<P>::template ld<C>(p, i), Io<M>::template ld<C>(m, i),
                         Io<M>::template ld<C>(v, i), decay, step, eps));
}

// Plain AdamW in one pass, for parameters outside the wrapped modules.
template <int P, int G, int M, class C>
void adamw(void* p_, const void* g_, void* m_, void* v_, int64_t lo, int64_t hi, C c1, C b2, C c2,
           C decay, C step, C eps) {
  typename Io<P>::T* p = static_cast<typename Io<P>::T*>(p_);
  const typename Io<G>::T* g = static_cast<const typename Io<G>::T*>(g_);
  typename Io<M>::T* m = static_cast<typename Io<M>::T*>(m_);
  typename Io<M>::T* v = static_cast<typename Io<M>::T*>(v_);
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    C ms, vs;
    advance<G, M, C>(g, m, v, i, c1, b2, c2, ms, vs);
    Io<P>::st(p, i, updated<C>(Io<P>::template ld<C>(p, i), ms, vs, decay, step, eps));
  }
}

// The dtype combinations (param, grad, moments) the kernels are built for; "combo" codes are
// P + 4 G + 16 M. The Python side sends anything else to the eager path.
#define MOLF_COMBOS(X)        \
  X(F32, F32, F32, float)     \
  X(F64, F64, F64, double)    \
  X(BF16, BF16, F32, float)   \
  X(BF16, F32, F32, float)    \
  X(BF16, BF16, BF16, float)  \
  X(F16, F16, F32, float)     \
  X(F16, F32, F32, float)     \
  X(F16, F16, F16, float)

double run_moments(int64_t combo, int64_t kind, const void* g, void* m, void* v, int64_t lo,
                   int64_t hi, double b1, double b2, double eps) {
#define X(P, G, M, C)                                                                     \
  if (combo == P + 4 * G + 16 * M)                                                        \
    switch (kind) {                                                                       \
      case EPD:                                                                           \
        return moments<P, G, M, C, EPD>(g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(eps)); \
      case PFN:                                                                           \
        return moments<P, G, M, C, PFN>(g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(eps)); \
    }
  MOLF_COMBOS(X)
#undef X
  return NAN;
}

void run_apply(int64_t combo, void* p, const void* m, const void* v, int64_t lo, int64_t hi,
               double decay, double step, double eps) {
#define X(P, G, M, C)                                                                    \
  if (combo == P + 4 * G + 16 * M)                                                       \
    return apply<P, M, C>(p, m, v, lo, hi, C(decay), C(step), C(eps));
  MOLF_COMBOS(X)
#undef X
}

void run_adamw(int64_t combo, void* p, const void* g, void* m, void* v, int64_t lo, int64_t hi,
               double b1, double b2, double decay, double step, double eps) {
#define X(P, G, M, C)                                                                       \
  if (combo == P + 4 * G + 16 * M)                                                          \
    return adamw<P, G, M, C>(p, g, m, v, lo, hi, C(1 - b1), C(b2), C(1 - b2), C(decay), C(step), \
                             C(eps));
  MOLF_COMBOS(X)
#undef X
}

}  // namespace

extern "C" {

// The names of the score kernels, in the order of their ids (enum Kind).
const char* molf_score_kernels() { return "epd pfn"; }

// Mirrored field by field by the ctypes Structure `KernelArgs` in molf/optim/backends/native.py.
struct MolfStep {
  // routed tensors, module-major and expert-minor; module i owns [mod_start[i], mod_start[i+1])
  int64_t n_mod, n_exp;
  const int64_t* mod_start;
  const int64_t* expert;
  const int64_t* decay;      // 1: the tensor takes its expert's weight decay (0: wrapped biases)
  void* const* p;
  void* const* g;            // null: no gradient this step, the tensor is skipped (as torch's
                             // AdamW skips it): no moments, no step count, not in numel_exp
  void* const* m;
  void* const* v;
  float* const* step;
  const int64_t* numel;
  const int64_t* combo;
  const uint8_t* active;     // [n_mod]
  const double* numel_exp;   // [n_mod * n_exp] global element count of each expert's tensors
                             // with a gradient (0: it cannot win)
  const double* lr;          // [n_exp]
  const double* wd;          // [n_exp]
  int64_t* const* wins;      // [n_mod], null for inactive modules
  double* totals;            // [n_mod * n_exp] out (SCORE, FUSED)
  double* scores;            // [n_mod * n_exp] out (FUSED)
  uint8_t* winners;          // [n_mod * n_exp] out (FUSED) or in (APPLY)
  // parameters outside the wrapped modules: plain AdamW (APPLY, FUSED)
  int64_t n_plain;
  void* const* pp;
  void* const* pg;
  void* const* pm;
  void* const* pv;
  float* const* pstep;
  const int64_t* pnumel;
  const int64_t* pcombo;
  const double* plr;
  const double* pwd;
  double b1, b2, eps, score_eps;  // score_eps: the eps inside the score, not Adam's
  int64_t kind, top_k, phase, n_threads;
};

static void apply_winners(const MolfStep& s, int64_t i) {
  const int64_t E = s.n_exp;
  for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t) {
    const int64_t e = s.expert[t];
    if (!s.winners[i * E + e] || !s.g[t]) continue;
    const double t_ = double(*s.step[t]), bc2_sqrt = std::sqrt(1.0 - std::pow(s.b2, t_));
    const double wd = s.decay[t] ? s.wd[e] : 0.0;
    run_apply(s.combo[t], s.p[t], s.m[t], s.v[t], 0, s.numel[t], 1.0 - s.lr[e] * wd,
              s.lr[e] * bc2_sqrt / (1.0 - std::pow(s.b1, t_)), s.eps * bc2_sqrt);
  }
  if (s.wins[i])
    for (int64_t e = 0; e < E; ++e) s.wins[i][e] += s.winners[i * E + e];
}

static inline bool beats(double a, double b) {  // torch's order: NaN above everything
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

static void route_module(const MolfStep& s, int64_t i) {
  const int64_t E = s.n_exp;
  double total[MAX_EXPERTS] = {0.0};
  for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t)
    if (s.g[t])
      total[s.expert[t]] += run_moments(s.combo[t], s.kind, s.g[t], s.m[t], s.v[t], 0,
                                        s.numel[t], s.b1, s.b2, s.score_eps);
  for (int64_t e = 0; e < E; ++e) s.totals[i * E + e] = total[e];
  if (s.phase != FUSED) return;
  double score[MAX_EXPERTS];
  for (int64_t e = 0; e < E; ++e) {
    const double n = s.numel_exp[i * E + e];
    // kind is EPD or PFN (checked in molf_step); functional.finalize_scores is the Python copy
    if (n == 0)  // no tensor with a gradient: cannot win against one that has
      score[e] = -INFINITY;
    else
      score[e] = s.kind == EPD ? s.lr[e] * total[e] / n : std::sqrt(total[e]) / std::sqrt(n);
    s.scores[i * E + e] = score[e];
    s.winners[i * E + e] = s.top_k >= E;
  }
  // top_k >= E: every expert already won above; otherwise pick k, ties to the lower index
  for (int64_t k = 0; s.top_k < E && k < s.top_k; ++k) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (!s.winners[i * E + e] && (best < 0 || beats(score[e], score[best]))) best = e;
    s.winners[i * E + best] = 1;
  }
  // an expert without a gradient never wins, even when top_k leaves room for it
  for (int64_t e = 0; e < E; ++e)
    if (s.numel_exp[i * E + e] == 0) s.winners[i * E + e] = 0;
  apply_winners(s, i);
}

static void plain_chunk(const MolfStep& s, int64_t t, int64_t lo, int64_t hi) {
  const double t_ = double(*s.pstep[t]), bc2_sqrt = std::sqrt(1.0 - std::pow(s.b2, t_));
  run_adamw(s.pcombo[t], s.pp[t], s.pg[t], s.pm[t], s.pv[t], lo, hi, s.b1, s.b2,
            1.0 - s.plr[t] * s.pwd[t], s.plr[t] * bc2_sqrt / (1.0 - std::pow(s.b1, t_)),
            s.eps * bc2_sqrt);
}

// One optimizer phase over all tensors. Returns 0, -1 for too many experts, -2 for an unknown
// score kernel.
int molf_step(const MolfStep* sp) {
  const MolfStep& s = *sp;
  if (s.n_exp > MAX_EXPERTS) return -1;
  if (s.kind < 0 || s.kind >= N_KINDS) return -2;
  // Step counts first, serially: bias corrections below read them from any thread.
  if (s.phase != APPLY)
    for (int64_t i = 0; i < s.n_mod; ++i)
      if (s.active[i])
        for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t)
          if (s.g[t]) *s.step[t] += 1.0f;
  const bool plain = s.phase != SCORE;
  if (plain)
    for (int64_t t = 0; t < s.n_plain; ++t) *s.pstep[t] += 1.0f;
  // Work items, largest first so that the dynamic schedule balances: whole modules, then chunks
  // of the plain tensors.
  std::vector<std::pair<int64_t, int64_t>> items;  // (-cost, id); id >= 0 module, < 0 chunk
  std::vector<int64_t> chunk_tensor, chunk_lo;
  for (int64_t i = 0; i < s.n_mod; ++i) {
    if (!s.active[i]) continue;
    int64_t cost = 0;
    for (int64_t t = s.mod_start[i]; t < s.mod_start[i + 1]; ++t) cost += s.g[t] ? s.numel[t] : 0;
    items.push_back({-cost, i});
  }
  if (plain)
    for (int64_t t = 0; t < s.n_plain; ++t)
      for (int64_t lo = 0; lo < s.pnumel[t]; lo += CHUNK) {
        items.push_back({-std::min(CHUNK, s.pnumel[t] - lo), -1 - int64_t(chunk_tensor.size())});
        chunk_tensor.push_back(t);
        chunk_lo.push_back(lo);
      }
  std::stable_sort(items.begin(), items.end(),
                   [](const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) {
                     return a.first < b.first;
                   });
  const int64_t n_items = int64_t(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(int(s.n_threads)) if (s.n_threads > 1)
  for (int64_t w = 0; w < n_items; ++w) {
    const int64_t id = items[w].second;
    if (id >= 0) {
      if (s.phase == APPLY)
        apply_winners(s, id);
      else
        route_module(s, id);
    } else {
      const int64_t c = -1 - id, t = chunk_tensor[c], lo = chunk_lo[c];
      plain_chunk(s, t, lo, std::min(lo + CHUNK, s.pnumel[t]));
    }
  }
  return 0;
}

}  // extern "C"

