"""The ``crjax`` command: ``reproduce``, ``simulate``, ``plot``, ``fit`` (``crjax <cmd> --help``).

    crjax reproduce --preset quick --out crjax_out       # seed §3 end to end (README command 1)
    crjax simulate --nside 4 --realisations 8 --out run1 # any setup: results.npz + summary.json
    crjax plot --run run1                                # figures of a finished run
    crjax fit run1/simulated_spectrum_par.txt            # fit p to a spectrum file
    crjax fit --model simulation FILE                    # fit (σ², rL, angle) via the emulator

Also ``python -m inference.cli ...``. Runs resume by default: the same command continues an
interrupted run (Ctrl-C or kill -9 stop at once and lose at most the chunk in flight) in the same
``--out``; changed parameters are an error naming them (``--no-resume`` refuses to touch an
existing run).

Bad input is answered by one line on stderr naming the parameter, file or line, and exit status 2;
every option is checked before anything is written. ``--debug`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from crjax.presets import DTYPES, GEOMETRIES, PRESETS, SOLVER_NAMES

__all__ = ["build_parser", "main"]

_FIT_LIKELIHOODS = ("auto", "lognormal", "split_normal", "variable_gaussian", "gaussian")
_FIT_NOISE = ("auto", "none", "fixed", "free")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``crjax fit: error: ... (crjax fit --help)`` and exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")


def _add_run_args(p: argparse.ArgumentParser, *, default_preset: str) -> None:
    p.add_argument("--out", default="crjax_out", help="run directory (default: %(default)s)")
    p.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                   help="preset: quick (CPU, < 1 min), paper (seed §3, ~1 h on 2 CPU cores), tiny (smoke test); "
                        "default %(default)s")
    p.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="continue an interrupted run in --out (default)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="refuse to continue an existing run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    # Distributed runs (crjax.distributed, docs/scaling.md): under srun / mpirun nothing is needed.
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes: address of process 0 (or CRJAX_COORDINATOR; detected "
                        "under srun/mpirun); each process writes its share of the chunks")
    p.add_argument("--num-processes", type=int, default=None,
                   help="number of processes of a distributed run (or CRJAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, default=None,
                   help="this process's index in [0, --num-processes) (or CRJAX_PROCESS_ID)")
    _add_common(p)


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spectrum", help="spectrum file (format: docs/spectrum_format.md)")
    p.add_argument("--lmin", "--ell-min", dest="lmin", type=int, default=None,
                   help="smallest multipole ℓ fitted (default 1)")
    p.add_argument("--lmax", "--ell-max", dest="lmax", type=int, default=None,
                   help="largest multipole ℓ fitted (default: all)")
    p.add_argument("--noise", choices=_FIT_NOISE, default="auto",
                   help="noise offset N: auto = none if subtracted, header noise_level if given, "
                        "else free")
    p.add_argument("--noise-level", type=float, default=None,
                   help="N for --noise fixed (overrides the header)")
    p.add_argument("--likelihood", choices=_FIT_LIKELIHOODS, default="auto",
                   help="likelihood for the (asymmetric) errors; see inference/likelihoods.py")
    p.add_argument("--nuts", action="store_true", help="also sample the posterior with NUTS")
    p.add_argument("--num-warmup", type=int, default=500)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-chains", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the data-vs-BGK figure here (e.g. fit.png)")
    p.add_argument("--output", default=None, help="write the fit report here as JSON")
    p.add_argument("--quiet", action="store_true", help="do not print the report")
    p.add_argument("--model", choices=("bgk", "simulation"), default="bgk",
                   help="bgk: fit p of seed (4.7) (default); simulation: fit (sigma2, rL/Lc, angle) "
                        "to the spectrum's shape through the emulator (inference/emulator.py)")
    p.add_argument("--emulator", default=None, metavar="PATH",
                   help="--model simulation: load this emulator (.npz) instead of building one")
    p.add_argument("--save-emulator", default=None, metavar="PATH",
                   help="--model simulation: write the emulator built here (.npz) for reuse")
    p.add_argument("--sigma2-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="--model simulation: design box in sigma2 (default 0.25 4)")
    p.add_argument("--rL-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="--model simulation: design box in rL/Lc (default 0.05 0.2)")
    p.add_argument("--design-points", type=int, default=None,
                   help="--model simulation: simulations in the design (default 16)")
    p.add_argument("--design-realisations", type=int, default=None,
                   help="--model simulation: realisations per design point (default 64)")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="crjax",
        description="Small-scale cosmic-ray anisotropy from relative diffusion (Ahlers & Mertsch "
                    "2015): backtrack ensembles, angular power spectra, BGK fit. Physics notes: "
                    "docs/physics.md.",
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
    s.add_argument("--sigma2", type=float, help="turbulence level <dB^2>/B0^2 (> 0)")
    s.add_argument("--gamma", type=float, help="spectral index of G_n = k^3/(1+(k Lc)^gamma)")
    s.add_argument("--lambda-min", type=float, help="shortest turbulence wavelength / Lc")
    s.add_argument("--lambda-max", type=float, help="longest turbulence wavelength / Lc")
    s.add_argument("--lmin", dest="old_lmin", type=float, help=argparse.SUPPRESS)
    s.add_argument("--lmax", dest="old_lmax", type=float, help=argparse.SUPPRESS)
    s.add_argument("--geometry", choices=GEOMETRIES)
    s.add_argument("--b0-direction", type=float, nargs=3, metavar=("X", "Y", "Z"),
                   help="direction of B0 (gradients are taken ∥ and ⊥ to it)")
    s.add_argument("--grad", type=float, help="|∇n/n| in 1/Lc (C_ℓ scale as its square)")
    s.add_argument("--t-omega", type=float, nargs=3, metavar=("MIN", "MAX", "N"),
                   help="N log-spaced save times tΩ from MIN to MAX")
    s.add_argument("--ell-max", type=int, help="highest multipole ℓ stored")
    s.add_argument("--fit-ell-max", type=int, help="highest multipole ℓ fitted")
    s.add_argument("--solver", choices=SOLVER_NAMES)
    s.add_argument("--dt", type=float, help="step size (default rL/20)")
    s.add_argument("--dtype", choices=DTYPES)
    s.add_argument("--seed", type=int, help="base PRNG seed; realisation r uses fold_in(seed, r)")

    pl = sub.add_parser("plot", help="draw fig2.png, fig3.png, skymap.png of a finished run",
                        description="Re-draw the figures from a run directory's results.npz.")
    pl.add_argument("--run", default="crjax_out", help="run directory (default: %(default)s)")
    _add_common(pl)

    f = sub.add_parser(
        "fit", help="fit the BGK exponent p to a spectrum file",
        description="Fit C_ℓ = A · bgk_spectrum(ℓ, p) (+ N) (seed (4.7)) to an angular power "
                    "spectrum file: maximum likelihood with a Laplace error (optax), optionally "
                    "the NUTS posterior (numpyro).")
    _add_fit_args(f)
    return parser


def _preset_from_args(args):
    import numpy as np

    from crjax.presets import get_preset

    for old, new in (("old_lmin", "--lambda-min"), ("old_lmax", "--lambda-max")):
        if getattr(args, old, None) is not None:
            raise ValueError(f"--{old[4:]} is now {new} (a turbulence wavelength in Lc); multipoles "
                             "are --ell-max / --fit-ell-max")
    base = get_preset(args.preset)
    names = {"nside": "nside", "realisations": "n_realisations", "chunk_size": "chunk_size",
             "modes": "n_modes", "rL": "rL", "sigma2": "sigma2", "gamma": "gamma",
             "lambda_min": "lambda_min", "lambda_max": "lambda_max", "geometry": "geometry",
             "grad": "grad", "ell_max": "ell_max", "fit_ell_max": "fit_ell_max",
             "solver": "solver", "dt": "dt", "dtype": "dtype", "seed": "seed"}
    changes = {f: getattr(args, a) for a, f in names.items() if getattr(args, a, None) is not None}
    if args.b0_direction is not None:
        changes["b0_direction"] = tuple(args.b0_direction)
    if args.t_omega is not None:
        lo, hi, n = args.t_omega
        if not (math.isfinite(n) and n == int(n) and n >= 3):
            raise ValueError(f"--t-omega N must be an integer >= 3; got {n:g}")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            raise ValueError(f"--t-omega MIN MAX must satisfy 0 < MIN < MAX; got {lo:g} {hi:g}")
        t = tuple(float(x) for x in np.geomspace(lo, hi, int(n)))
        changes["t_omega"] = t
        changes["fig3_t_omega"] = (t[len(t) // 3], t[(2 * len(t)) // 3], t[-1])
    if "nside" in changes and "ell_max" not in changes and changes["nside"] >= 1:
        changes["ell_max"] = min(base.ell_max, 3 * changes["nside"] - 1)
    if "ell_max" in changes and "fit_ell_max" not in changes:
        changes["fit_ell_max"] = min(base.fit_ell_max, changes["ell_max"])
    if changes:
        changes["name"] = "custom"
    return base.replace(**changes)


def _check_output_file(option: str, path: str | None) -> None:
    """A file the command will write: its directory must exist and be writable."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} {path!r} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{option} {path!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path!r}: no permission to write in {str(parent)!r}")


def _check_fit_args(args) -> None:
    """Every ``crjax fit`` option, before the spectrum is read or anything is written."""
    if args.lmin is not None and args.lmin < 0:
        raise ValueError(f"--lmin must be an integer >= 0; got {args.lmin}")
    if args.lmax is not None and args.lmax < max(1, args.lmin or 0):
        raise ValueError(f"--lmax must be an integer >= max(1, --lmin); got {args.lmax}")
    for opt, lo in (("num_warmup", 1), ("num_samples", 2), ("num_chains", 1)):
        if getattr(args, opt) < lo:
            raise ValueError(f"--{opt.replace('_', '-')} must be an integer >= {lo}; "
                             f"got {getattr(args, opt)}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32); got {args.seed}")
    if args.noise_level is not None:
        if not (math.isfinite(args.noise_level) and args.noise_level >= 0):
            raise ValueError(f"--noise-level must be finite and >= 0; got {args.noise_level}")
        if args.noise not in ("fixed", "auto"):
            raise ValueError(f"--noise-level is used only with --noise fixed; got --noise "
                             f"{args.noise}")
    spectrum = Path(args.spectrum)
    if not spectrum.exists():
        raise ValueError(f"spectrum file {args.spectrum!r} does not exist")
    if not spectrum.is_file():
        raise ValueError(f"spectrum file {args.spectrum!r} is not a regular file")
    if not os.access(spectrum, os.R_OK):
        raise ValueError(f"spectrum file {args.spectrum!r}: no permission to read it")
    _check_output_file("--output", args.output)
    _check_output_file("--plot", args.plot)
    if args.plot is not None:
        import matplotlib.figure

        kinds = matplotlib.figure.Figure().canvas.get_supported_filetypes()
        ext = Path(args.plot).suffix.lstrip(".").lower()
        if ext not in kinds:
            raise ValueError(f"--plot {args.plot!r}: the file name must end in one of "
                             f"{sorted('.' + k for k in kinds)}")
    if args.output is not None and args.plot is not None and \
            Path(args.output).resolve() == Path(args.plot).resolve():
        raise ValueError("--output and --plot must be different files")


_DESIGN_OPTS = {"sigma2_range": "--sigma2-range", "rL_range": "--rL-range",
                "design_points": "--design-points", "design_realisations": "--design-realisations"}


def _simulation_design(args):
    """The --model simulation options, checked (ValueError naming the option) before any work."""
    from .emulator import DEFAULT_DESIGN

    if args.model != "simulation":
        for a, opt in {**_DESIGN_OPTS, "emulator": "--emulator",
                       "save_emulator": "--save-emulator"}.items():
            if getattr(args, a) is not None:
                raise ValueError(f"{opt} is used only with --model simulation")
        return None
    for opt, bad in (("--nuts", args.nuts), ("--plot", args.plot is not None),
                     ("--likelihood", args.likelihood != "auto")):
        if bad:
            raise ValueError(f"{opt} is used only with --model bgk")
    if args.noise == "free":
        raise ValueError("--noise free is not available with --model simulation (auto, none, fixed)")
    if args.emulator is not None:
        given = [opt for a, opt in _DESIGN_OPTS.items() if getattr(args, a) is not None]
        if given or args.save_emulator is not None:
            raise ValueError(f"{(given or ['--save-emulator'])[0]} cannot be combined with "
                             "--emulator (the loaded emulator fixes its design)")
        if not Path(args.emulator).is_file():
            raise ValueError(f"--emulator {args.emulator!r}: no such file")
        return None
    _check_output_file("--save-emulator", args.save_emulator)
    changes = {}
    for a, f in (("sigma2_range", "sigma2_range"), ("rL_range", "rL_range")):
        if getattr(args, a) is not None:
            changes[f] = tuple(getattr(args, a))
    if args.design_points is not None:
        changes["n_points"] = args.design_points
    if args.design_realisations is not None:
        changes["n_realisations"] = args.design_realisations
    import dataclasses

    try:
        return dataclasses.replace(DEFAULT_DESIGN, **changes).check()
    except ValueError as err:  # name the option, not the field
        msg = str(err)
        for f, opt in (("sigma2_range", "--sigma2-range"), ("rL_range", "--rL-range"),
                       ("n_points", "--design-points"), ("n_realisations", "--design-realisations")):
            msg = msg.replace(f, opt)
        raise ValueError(msg) from err


def _fit(args) -> int:
    _check_fit_args(args)
    design = _simulation_design(args)
    if args.model == "simulation":
        from .emulator import DEFAULT_DESIGN, fit_simulation_file

        try:
            fit_simulation_file(args.spectrum, emulator=args.emulator,
                                design=design or DEFAULT_DESIGN,
                                save_emulator_to=args.save_emulator, lmin=args.lmin,
                                lmax=args.lmax, noise=args.noise, noise_level=args.noise_level,
                                output=args.output, quiet=args.quiet)
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.spectrum}: not a UTF-8 text file (undecodable byte at offset "
                             f"{err.start}); expected the format of docs/spectrum_format.md") from err
        return 0
    from .report import fit_spectrum_file

    try:
        fit_spectrum_file(
            args.spectrum, lmin=args.lmin, lmax=args.lmax, noise=args.noise,
            noise_level=args.noise_level, likelihood=args.likelihood, nuts=args.nuts,
            num_warmup=args.num_warmup, num_samples=args.num_samples,
            num_chains=args.num_chains, seed=args.seed, plot=args.plot, output=args.output,
            quiet=args.quiet,
        )
    except UnicodeDecodeError as err:  # a binary file: say so, with the byte
        raise ValueError(f"{args.spectrum}: not a UTF-8 text file (undecodable byte at offset "
                         f"{err.start}); expected the format of docs/spectrum_format.md") from err
    return 0


def _run(args) -> int:
    from crjax import use_cpu_cores

    if args.command == "plot":
        from .pipeline import plot_run

        paths = plot_run(args.run)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return 0
    # one JAX CPU device per core: the engine runs one integration loop per core. First, before
    # any JAX work (building a preset validates its field, which runs JAX). JAX may already be
    # running when main() is called as a library function (tests, notebooks): then keep its
    # devices (results do not depend on the count beyond round-off).
    # Join a distributed run first (before any JAX work); no-op for a single process.
    from crjax import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    with contextlib.suppress(RuntimeError):
        use_cpu_cores()
    # Everything is validated before anything is written: the preset here, the out directory
    # when the run store opens it.
    preset = args.preset if args.command == "reproduce" else _preset_from_args(args)
    from .pipeline import format_summary, reproduce

    summary = reproduce(preset, args.out, resume=args.resume, progress=args.progress,
                        figures=args.command == "reproduce")
    if summary.get("chunks_only"):  # a process other than 0 of a distributed run
        print(f"crjax: process {summary['process_index']}: its chunks are in "
              f"{summary['directory']}; process 0 writes the results")
    else:
        print(format_summary(summary))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``crjax`` command with ``argv`` (None: ``sys.argv[1:]``); returns the exit status."""
    if argv is None:  # the console script, not a library call
        # Ctrl-C must stop at once: a Python KeyboardInterrupt would wait for the running XLA
        # computation (a whole chunk: ~2 min for `paper` on 2 CPU cores). Stopping like kill -9 is safe:
        # chunks are written atomically and the same command resumes.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    prog = f"crjax {args.command}"
    try:
        return _fit(args) if args.command == "fit" else _run(args)
    except KeyboardInterrupt:  # library use (main(argv)): finished chunks are on disk
        print(f"\n{prog}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input, a path, a mismatched resume: one line
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not bad input: still one line, the traceback on request
        if args.debug:
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)} (run again with "
              "--debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
