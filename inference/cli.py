"""``crjax fit``: fit the BGK exponent p (seed eq. 4.7) to a spectrum file (``docs/spectrum_format.md``)."""

from __future__ import annotations

import argparse

__all__ = ["build_parser", "main"]


def build_parser(prog: str = "crjax fit") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Fit C_l = A * bgk_spectrum(l, p) (+ N) to an angular power spectrum file: maximum likelihood "
            "with a Laplace error (optax), optionally the NUTS posterior (numpyro)."
        ),
    )
    ap.add_argument("spectrum", help="spectrum file (format: docs/spectrum_format.md)")
    ap.add_argument("--lmin", type=int, default=None, help="smallest multipole fitted (default 1)")
    ap.add_argument(
        "--lmax", type=int, default=None, help="largest multipole fitted (default: all)"
    )
    ap.add_argument(
        "--noise",
        choices=("auto", "none", "fixed", "free"),
        default="auto",
        help="noise offset N: auto = none if subtracted, header noise_level if given, else free",
    )
    ap.add_argument(
        "--noise-level", type=float, default=None, help="N for --noise fixed (overrides the header)"
    )
    ap.add_argument(
        "--likelihood",
        choices=("auto", "lognormal", "split_normal", "variable_gaussian", "gaussian"),
        default="auto",
        help="likelihood for the (asymmetric) errors; see inference/fit.py",
    )
    ap.add_argument("--nuts", action="store_true", help="also sample the posterior with NUTS")
    ap.add_argument("--num-warmup", type=int, default=500)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--num-chains", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", default=None, help="write the data-vs-BGK figure here (e.g. fit.png)")
    ap.add_argument("--output", default=None, help="write the fit report here as JSON")
    ap.add_argument("--quiet", action="store_true", help="do not print the report")
    return ap


def main(argv=None) -> int:
    """Parse ``argv`` (list of strings; None = sys.argv) and run ``inference.fit.fit_spectrum_file``."""
    args = build_parser().parse_args(argv)
    from inference.fit import fit_spectrum_file

    fit_spectrum_file(
        args.spectrum,
        lmin=args.lmin,
        lmax=args.lmax,
        noise=args.noise,
        noise_level=args.noise_level,
        likelihood=args.likelihood,
        nuts=args.nuts,
        num_warmup=args.num_warmup,
        num_samples=args.num_samples,
        num_chains=args.num_chains,
        seed=args.seed,
        plot=args.plot,
        output=args.output,
        quiet=args.quiet,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
