"""Prototype A/B (issue 12): native FFI fp64 mode sum vs crjax's XLA _modesum; CPU time, interleaved."""
import ctypes, sys, time
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from crjax.field import paper_2015_field, realise_field

lib = ctypes.cdll.LoadLibrary(sys.argv[1])
jax.ffi.register_ffi_target("crjax_modesum_f64", jax.ffi.pycapsule(lib.CrjaxModeSumF64), platform="cpu")
field = realise_field(jax.random.PRNGKey(0), paper_2015_field(n_modes=256))
pf = field.prepare()
ex = realise_field(jax.random.PRNGKey(0), paper_2015_field(n_modes=256), exact_cos=True).prepare()
kS, bS, aS = pf.wavevectors.T, pf.phases, pf.amplitudes[:, :3].T  # SoA for the kernel

def native(x):
    return jax.ffi.ffi_call("crjax_modesum_f64", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="sequential")(x, kS, bS, aS, pf.b0)

m, pushes = 512, 400
v = jax.random.normal(jax.random.PRNGKey(1), (m, 3))
x = 3.0 * v
bx, bn, be = pf._modesum(x), native(x), ex._modesum(x)
print("max|native-xla|", float(jnp.max(jnp.abs(bn - bx))), " max|native-exact|", float(jnp.max(jnp.abs(bn - be))),
      " max|xla-exact|", float(jnp.max(jnp.abs(bx - be))))
loops = {name: jax.jit(lambda x, f=f: jax.lax.fori_loop(0, pushes, lambda i, y: y + 1e-6 * f(y), x))
         for name, f in (("xla", pf._modesum), ("native", native))}
for f in loops.values(): jax.block_until_ready(f(x))
best = {k: (9e9, 9e9) for k in loops}
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 7):
    for name, f in loops.items():
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(f(x))
        c, w = time.process_time() - c0, time.perf_counter() - t0
        best[name] = (min(best[name][0], c), min(best[name][1], w))
work = pushes * m * 256
for name, (c, w) in best.items():
    print(f"{name}: {c / work * 1e9:.3f} ns/mode-eval CPU, {w / work * 1e9:.3f} wall")
print(f"speed-up native/xla: CPU {best['xla'][0] / best['native'][0]:.2f}x  wall {best['xla'][1] / best['native'][1]:.2f}x")
