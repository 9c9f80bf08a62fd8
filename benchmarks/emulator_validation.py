"""Emulator validation and recovery at the default design (docs/gradients.md, emulator): ~25 s on 2 cores.

    python benchmarks/emulator_validation.py
"""
import dataclasses, jax, numpy as np, crjax
crjax.use_cpu_cores(2)
from inference import emulator as E
emu = E.build_emulator(E.DEFAULT_DESIGN)
loo = E.loo_validation(emu); ho = E.holdout_validation(emu, 6)
for n, r in (("LOO", loo), ("hold-out", ho)):
    print(n, {k: round(v, 3) for k, v in r.items() if isinstance(v, float)})
d = dataclasses.replace(E.DEFAULT_DESIGN, n_realisations=256)
for i, truth in enumerate([(1.0, 0.1, 0.6), (2.0, 0.07, 1.2)]):
    c, _ = E.simulate_components(d, truth[0], truth[1], jax.random.PRNGKey(10**7 + i))
    per = np.sin(truth[2])**2 * c[:, 0] + np.cos(truth[2])**2 * c[:, 1]
    fit = E.fit_shape(emu, np.arange(1, 12), per.mean(0), per.std(0, ddof=1) / 16)
    print("truth", truth, "fit", fit.theta.round(3), "68%", fit.intervals.round(3).tolist(),
          "edge", fit.at_boundary.tolist(), f"chi2 {fit.chi2:.2f}/{fit.dof} p {fit.pvalue:.3f}")
