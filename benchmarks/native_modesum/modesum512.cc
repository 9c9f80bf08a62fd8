// Mechanical 8-lane AVX-512F translation of modesum.cc (same reduction, _COS_C, Estrin; modes padded to 8).
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
__attribute__((target("avx512f"))) static void block(const double* x, const double* k,
    const double* beta, const double* amp, int64_t n, double* acc /* P*3 */) {
  __m512d sx[P][3];
  __m512d pos[P][3];
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < 3; ++d) { sx[p][d] = _mm512_setzero_pd(); pos[p][d] = _mm512_set1_pd(x[3 * p + d]); }
  const __m512d magic = _mm512_set1_pd(1.5 * 4503599627370496.0);
  for (int64_t i = 0; i < n; i += 8) {
    // SoA mode data: k (3, n), beta (n), amp (3, n), n a multiple of 4
    __m512d kx = _mm512_loadu_pd(k + i), ky = _mm512_loadu_pd(k + n + i), kz = _mm512_loadu_pd(k + 2 * n + i);
    __m512d b = _mm512_loadu_pd(beta + i);
    __m512d ax = _mm512_loadu_pd(amp + i), ay = _mm512_loadu_pd(amp + n + i), az = _mm512_loadu_pd(amp + 2 * n + i);
    for (int p = 0; p < P; ++p) {
      __m512d u = _mm512_fmadd_pd(pos[p][0], kx, _mm512_fmadd_pd(pos[p][1], ky, _mm512_fmadd_pd(pos[p][2], kz, b)));
      __m512d j = _mm512_roundscale_pd(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512d f = _mm512_sub_pd(u, j);
      __m512d z = _mm512_mul_pd(f, f);
#ifdef ESTRIN
      // Estrin, as crjax/field.py's _estrin: chunks of 4 (lowest power first) combined in z^4
      __m512d z2 = _mm512_mul_pd(z, z), z4 = _mm512_mul_pd(z2, z2);
#define CC(i) _mm512_set1_pd(C[8 - (i)])
      __m512d q0 = _mm512_fmadd_pd(z2, _mm512_fmadd_pd(CC(3), z, CC(2)), _mm512_fmadd_pd(CC(1), z, CC(0)));
      __m512d q1 = _mm512_fmadd_pd(z2, _mm512_fmadd_pd(CC(7), z, CC(6)), _mm512_fmadd_pd(CC(5), z, CC(4)));
      __m512d c = _mm512_fmadd_pd(z4, _mm512_fmadd_pd(z4, CC(8), q1), q0);
#else
      __m512d c = _mm512_set1_pd(C[0]);
      for (int t = 1; t < 9; ++t) c = _mm512_fmadd_pd(c, z, _mm512_set1_pd(C[t]));
#endif
      __m512i bits = _mm512_slli_epi64(_mm512_castpd_si512(_mm512_add_pd(j, magic)), 63);
      c = _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(c), bits));
      sx[p][0] = _mm512_fmadd_pd(ax, c, sx[p][0]);
      sx[p][1] = _mm512_fmadd_pd(ay, c, sx[p][1]);
      sx[p][2] = _mm512_fmadd_pd(az, c, sx[p][2]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int d = 0; d < 3; ++d) {
      alignas(64) double t[8];
      _mm512_store_pd(t, sx[p][d]);
      acc[3 * p + d] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
}

static ffi::Error ModeSumF64Impl(ffi::Buffer<ffi::F64> x, ffi::Buffer<ffi::F64> k,
    ffi::Buffer<ffi::F64> beta, ffi::Buffer<ffi::F64> amp, ffi::Buffer<ffi::F64> b0,
    ffi::ResultBuffer<ffi::F64> out) {
  const int64_t m = x.dimensions()[0], n = beta.dimensions()[0];
  if (n % 8) return ffi::Error::InvalidArgument("modes must be padded to a multiple of 4");
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
