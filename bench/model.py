"""Emulated instructions per second of ``textpoke.model``, per ISA and variant.

Run as ``python bench/model.py [--steps N] [--runs N] [--cpus N]``.  Random mode,
the CLI's defaults otherwise.  Failing variants stop each interleaving at its
first violation, so their runs are short and setup weighs more; the passing
variants (proposed, merged) are the throughput figure (goal: >= 100k instructions/s).  The
first line per ISA is the bare machine -- single steps, no checks, no patcher --
and "of bare" the model's share of it, which a loaded machine changes less.
"""

from __future__ import annotations

import argparse
import time

from textpoke.model import Arch, ModelConfig, Variant, run_model, spec_for
from textpoke.model.kernel import INITIAL_SITE_STATE
from textpoke.model.scheduler import World


def bare_steps(arch: Arch, *, cpus: int, steps: int) -> float:
    """Instructions/s of the machine alone, round-robin over the CPUs."""
    with World(ModelConfig(arch=arch, cpus=cpus)) as world:
        world.machine.reset(world.image(INITIAL_SITE_STATE))
        machine_cpus = world.machine.cpus
        start = time.perf_counter()
        for i in range(steps):
            machine_cpus[i % cpus].step()
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20_000, help="instructions per interleaving")
    parser.add_argument("--runs", type=int, default=20, help="interleavings per variant (the CLI default)")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    print(f"{'arch':<7} {'variant':<9} {'interleavings':>13} {'instructions':>12} {'seconds':>8} "
          f"{'insn/s':>9} {'of bare':>7}  result")
    for arch in Arch:
        bare = bare_steps(arch, cpus=args.cpus, steps=args.steps)
        print(f"{arch.value:<7} {'(bare)':<9} {'-':>13} {args.steps:>12} {'-':>8} {bare:>9,.0f} {'':>7}  "
              "single steps, no checks")
        for variant in Variant:
            config = ModelConfig(arch=arch, variant=variant, cpus=args.cpus, steps=args.steps,
                                 runs=args.runs, seed=1)
            report = run_model(config)
            expect = spec_for(variant, arch).expect
            kinds = ", ".join(k.value for k in report.kinds) or "no violation"
            verdict = "as expected" if set(report.kinds) == ({expect} if expect else set()) else "UNEXPECTED"
            rate = report.instructions_per_second
            print(f"{arch.value:<7} {variant.value:<9} {report.interleavings:>13} {report.instructions:>12} "
                  f"{report.seconds:>8.2f} {rate:>9,.0f} {rate / bare:>7.0%}  {kinds} ({verdict})")


if __name__ == "__main__":
    main()
