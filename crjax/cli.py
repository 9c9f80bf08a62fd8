"""The ``crjax`` command: ``simulate``, ``reproduce``, ``fit``, ``plot`` (``crjax <cmd> --help``).

    crjax reproduce --preset quick --out crjax_out     # seed §3 end to end (README command 1)
    crjax simulate --nside 4 --realisations 8 --out run1 # any setup: results.npz + summary.json
    crjax plot --run run1                              # figures of a finished run
    crjax fit ...                                      # fit p to a spectrum file (inference.cli)

Runs resume by default: the same command continues an interrupted run (Ctrl-C or kill -9 stop at
once and lose at most the chunk in flight) in the same ``--out``; changed parameters are an error
naming them (``--no-resume`` refuses to touch an existing run).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def _add_run_args(p: argparse.ArgumentParser, *, default_preset: str) -> None:
    p.add_argument("--out", default="crjax_out", help="run directory (default: %(default)s)")
    p.add_argument("--preset", default=default_preset, choices=["quick", "paper", "tiny"],
                   help="preset: quick (CPU, minutes), paper (seed §3, GPU), tiny (smoke test); "
                        "default %(default)s")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run in --out (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to continue an existing run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crjax",
        description="Small-scale cosmic-ray anisotropy from relative diffusion (Ahlers & Mertsch "
                    "2015): backtrack ensembles, angular power spectra, BGK fit.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("reproduce", help="the seed's §3 pipeline end to end, with figures",
                       description="simulate → ⟨C_ℓ⟩(T) for ∇n ∥ and ⊥ B0 → noise N(T) → Ĉ_ℓ → "
                                   "fit p → fig2.png, fig3.png, skymap.png, summary.json")
    _add_run_args(r, default_preset="quick")

    s = sub.add_parser("simulate", help="backtrack an ensemble with any parameters; write results",
                       description="Run an ensemble (start from --preset, override any value) and "
                                   "write params.json, chunk files, results.npz, summary.json. "
                                   "Units: Lc = 1, |B0| = 1, c = 1, times as tΩ = t/rL.")
    _add_run_args(s, default_preset="quick")
    s.add_argument("--nside", type=int, help="HEALPix resolution (power of two)")
    s.add_argument("--realisations", type=int, help="number of field realisations (>= 2)")
    s.add_argument("--chunk-size", type=int, help="realisations per chunk (resumption unit)")
    s.add_argument("--modes", type=int, help="number of harmonic modes")
    s.add_argument("--rL", type=float, help="gyroradius in B0, units of Lc")
    s.add_argument("--sigma2", type=float, help="turbulence level <dB^2>/B0^2")
    s.add_argument("--gamma", type=float, help="spectral index of G_n = k^3/(1+(k Lc)^gamma)")
    s.add_argument("--lmin", type=float, help="shortest wavelength / Lc")
    s.add_argument("--lmax", type=float, help="longest wavelength / Lc")
    s.add_argument("--geometry", choices=["isotropic", "slab"])
    s.add_argument("--b0-direction", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="direction of B0 (gradients are taken ∥ and ⊥ to it)")
    s.add_argument("--grad", type=float, help="|∇n/n| in 1/Lc (C_ℓ scale as its square)")
    s.add_argument("--t-omega", type=float, nargs=3, metavar=("MIN", "MAX", "N"),
                   help="N log-spaced save times tΩ from MIN to MAX")
    s.add_argument("--ell-max", type=int, help="highest multipole stored")
    s.add_argument("--fit-ell-max", type=int, help="highest multipole fitted")
    s.add_argument("--solver", choices=["boris", "tsit5", "dopri8"])
    s.add_argument("--dt", type=float, help="step size (default rL/20)")
    s.add_argument("--dtype", choices=["float64", "float32"])
    s.add_argument("--seed", type=int, help="base PRNG seed; realisation r uses fold_in(seed, r)")

    pl = sub.add_parser("plot", help="draw fig2.png, fig3.png, skymap.png of a finished run",
                        description="Re-draw the figures from a run directory's results.npz.")
    pl.add_argument("--run", default="crjax_out", help="run directory (default: %(default)s)")

    sub.add_parser("fit", help="fit the BGK exponent p to a spectrum file (inference.cli)",
                   add_help=False)
    return parser


def _preset_from_args(args):
    from .presets import get_preset

    import numpy as np

    base = get_preset(args.preset)
    names = {"nside": "nside", "realisations": "n_realisations", "chunk_size": "chunk_size",
             "modes": "n_modes", "rL": "rL", "sigma2": "sigma2", "gamma": "gamma",
             "lmin": "lmin", "lmax": "lmax", "geometry": "geometry", "grad": "grad",
             "ell_max": "ell_max", "fit_ell_max": "fit_ell_max", "solver": "solver",
             "dt": "dt", "dtype": "dtype", "seed": "seed"}
    changes = {f: getattr(args, a) for a, f in names.items() if getattr(args, a, None) is not None}
    if args.b0_direction is not None:
        changes["b0_direction"] = tuple(args.b0_direction)
    if args.t_omega is not None:
        lo, hi, n = args.t_omega
        if n != int(n) or n < 3:
            raise ValueError(f"--t-omega N must be an integer >= 3; got {n}")
        t = tuple(float(x) for x in np.geomspace(lo, hi, int(n)))
        changes["t_omega"] = t
        changes["fig3_t_omega"] = (t[len(t) // 3], t[(2 * len(t)) // 3], t[-1])
    if "nside" in changes and "ell_max" not in changes:
        changes["ell_max"] = min(base.ell_max, 3 * changes["nside"] - 1)
    if "ell_max" in changes and "fit_ell_max" not in changes:
        changes["fit_ell_max"] = min(base.fit_ell_max, changes["ell_max"])
    if changes:
        changes["name"] = "custom"
    return base.replace(**changes)


def _fit(argv: Sequence[str]) -> int:
    try:
        from inference.cli import main as fit_main
    except ImportError as err:  # the theory/inference engineer's CLI is not installed
        print(f"crjax fit: inference.cli is not available ({err})", file=sys.stderr)
        return 2
    return int(fit_main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the console script, not a library call
        # Ctrl-C must stop at once: a Python KeyboardInterrupt would wait for the running XLA
        # computation (a whole chunk: ~20 min for `paper` on CPU). Stopping like kill -9 is safe:
        # chunks are written atomically and the same command resumes.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fit":  # its options belong to inference.cli
        return _fit(argv[1:])
    args = build_parser().parse_args(argv)
    from . import use_cpu_cores

    # one JAX CPU device per core: the engine runs one integration loop per core. JAX may already
    # be running when main() is called as a library function (tests, notebooks): then keep its
    # devices (results do not depend on the count).
    with contextlib.suppress(RuntimeError):
        use_cpu_cores()
    from . import reproduce as rp

    try:
        if args.command == "reproduce":
            summary = rp.reproduce(args.preset, args.out, resume=args.resume,
                                   progress=args.progress)
        elif args.command == "simulate":
            summary = rp.reproduce(_preset_from_args(args), args.out, resume=args.resume,
                                   progress=args.progress, figures=False)
        elif args.command == "plot":
            paths = rp.plot_run(args.run)
            print("\n".join(f"{k}: {v}" for k, v in paths.items()))
            return 0
    except ValueError as err:  # bad input / mismatched resume: one clear line, no traceback
        print(f"crjax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # library use (main(argv)): finished chunks are on disk
        print(f"\ncrjax {args.command}: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    print(rp.format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
