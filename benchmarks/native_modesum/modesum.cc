// Prototype (issue 12): B(x) mode sum of crjax's _PreparedField as one XLA FFI kernel, fp64 AVX2+FMA.
// Same math as crjax/field.py: u = x·k + β (k, β already /π), j = round(u), f = u - j,
// cos(πf) = 9-term polynomial in f² (_COS_C, Horner), sign (-1)^j via the parity bit of j + 1.5·2^52.
// Vectorised over 4 modes per register; P positions share each mode load (ILP across positions).
#include <immintrin.h>
#include <cstdint>
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;

static const double C[9] = {4.149564353942586e-06, -0.00010456655338748738, 0.0019295562724817132,
  -0.025806888737002202, 0.23533063012953284, -1.335262768843447, 4.058712126416497,
  -4.934802200544676, 1.0};

template <int P>
__attribute__((target("avx2,fma"))) static void block(const double* x, const double* k,
    const double* beta, const double* amp, int64_t n, double* acc /* P*3 */) {
  __m256d sx[P][3];
  __m256d pos[P][3];
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < 3; ++d) { sx[p][d] = _mm256_setzero_pd(); pos[p][d] = _mm256_set1_pd(x[3 * p + d]); }
  const __m256d magic = _mm256_set1_pd(1.5 * 4503599627370496.0);
  for (int64_t i = 0; i < n; i += 4) {
    // SoA mode data: k (3, n), beta (n), amp (3, n), n a multiple of 4
    __m256d kx = _mm256_loadu_pd(k + i), ky = _mm256_loadu_pd(k + n + i), kz = _mm256_loadu_pd(k + 2 * n + i);
    __m256d b = _mm256_loadu_pd(beta + i);
    __m256d ax = _mm256_loadu_pd(amp + i), ay = _mm256_loadu_pd(amp + n + i), az = _mm256_loadu_pd(amp + 2 * n + i);
    for (int p = 0; p < P; ++p) {
      __m256d u = _mm256_fmadd_pd(pos[p][0], kx, _mm256_fmadd_pd(pos[p][1], ky, _mm256_fmadd_pd(pos[p][2], kz, b)));
      __m256d j = _mm256_round_pd(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m256d f = _mm256_sub_pd(u, j);
      __m256d z = _mm256_mul_pd(f, f);
#ifdef ESTRIN
      // Estrin, as crjax/field.py's _estrin: chunks of 4 (lowest power first) combined in z^4
      __m256d z2 = _mm256_mul_pd(z, z), z4 = _mm256_mul_pd(z2, z2);
#define CC(i) _mm256_set1_pd(C[8 - (i)])
      __m256d q0 = _mm256_fmadd_pd(z2, _mm256_fmadd_pd(CC(3), z, CC(2)), _mm256_fmadd_pd(CC(1), z, CC(0)));
      __m256d q1 = _mm256_fmadd_pd(z2, _mm256_fmadd_pd(CC(7), z, CC(6)), _mm256_fmadd_pd(CC(5), z, CC(4)));
      __m256d c = _mm256_fmadd_pd(z4, _mm256_fmadd_pd(z4, CC(8), q1), q0);
#else
      __m256d c = _mm256_set1_pd(C[0]);
      for (int t = 1; t < 9; ++t) c = _mm256_fmadd_pd(c, z, _mm256_set1_pd(C[t]));
#endif
      __m256i bits = _mm256_slli_epi64(_mm256_castpd_si256(_mm256_add_pd(j, magic)), 63);
      c = _mm256_castsi256_pd(_mm256_xor_si256(_mm256_castpd_si256(c), bits));
      sx[p][0] = _mm256_fmadd_pd(ax, c, sx[p][0]);
      sx[p][1] = _mm256_fmadd_pd(ay, c, sx[p][1]);
      sx[p][2] = _mm256_fmadd_pd(az, c, sx[p][2]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < 3; ++d) {
      alignas(32) double t[4];
      _mm256_store_pd(t, sx[p][d]);
      acc[3 * p + d] = (t[0] + t[1]) + (t[2] + t[3]);
    }
}

static ffi::Error ModeSumF64Impl(ffi::Buffer<ffi::F64> x, ffi::Buffer<ffi::F64> k,
    ffi::Buffer<ffi::F64> beta, ffi::Buffer<ffi::F64> amp, ffi::Buffer<ffi::F64> b0,
    ffi::ResultBuffer<ffi::F64> out) {
  const int64_t m = x.dimensions()[0], n = beta.dimensions()[0];
  if (n % 4) return ffi::Error::InvalidArgument("modes must be padded to a multiple of 4");
  const double* xp = x.typed_data();
  double* o = out->typed_data();
  const double* bb = b0.typed_data();
  #ifndef NPOS
#define NPOS 4
#endif
  constexpr int P = NPOS;
  int64_t i = 0;
  double acc[3 * P];
  for (; i + P <= m; i += P) {
    block<P>(xp + 3 * i, k.typed_data(), beta.typed_data(), amp.typed_data(), n, acc);
    for (int q = 0; q < 3 * P; ++q) o[3 * i + q] = acc[q] + bb[q % 3];
  }
  for (; i < m; ++i) {
    block<1>(xp + 3 * i, k.typed_data(), beta.typed_data(), amp.typed_data(), n, acc);
    for (int q = 0; q < 3; ++q) o[3 * i + q] = acc[q] + bb[q];
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CrjaxModeSumF64, ModeSumF64Impl,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>()
        .Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>().Arg<ffi::Buffer<ffi::F64>>()
        .Ret<ffi::Buffer<ffi::F64>>());
