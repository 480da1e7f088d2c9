"""`mdpo-eval`: the first argument picks the subcommand.

    mdpo-eval [preference] CHECKPOINT [--data FILE]   held-out preference metrics of a checkpoint (mdpo.evaluate)
    mdpo-eval hallucination ...                      CHAIR, image reliance, margins side by side (mdpo.eval.hallucination)
    mdpo-eval pope | amber | suite ...               POPE, AMBER, all three in one call (mdpo.eval.suite)

Under several processes: `torchrun --nproc_per_node N -m mdpo.eval pope ...` (or `accelerate launch -m mdpo.eval ...`).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "hallucination":
        from .hallucination import main as hallucination_main

        return hallucination_main(argv[1:])
    if argv and argv[0] in ("pope", "amber", "suite"):
        from . import suite

        return {"pope": suite.pope_main, "amber": suite.amber_main, "suite": suite.suite_main}[argv[0]](argv[1:])
    from ..evaluate import preference_main

    return preference_main(argv[1:] if argv and argv[0] == "preference" else argv)


if __name__ == "__main__":
    raise SystemExit(main())
