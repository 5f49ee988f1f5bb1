"""``vrdma accel-bench``: FFT / Turbo kernels vs scipy, pyFFTW and scikit-commpy, and the accelerator service.

Prints one table (or ``--json``); ``--quick`` keeps it to seconds. The work is
done by :mod:`vrdma.accel_bench`; this module only wires it into the CLI.
"""
from __future__ import annotations

import argparse

NAME = "accel-bench"
HELP = "benchmark the FFT / Turbo accelerator kernels and the accelerator service"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vrdma import accel_bench

    accel_bench.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    from vrdma import accel_bench

    return accel_bench.run(args)
