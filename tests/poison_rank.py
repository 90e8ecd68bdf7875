"""`python -m tests.poison_rank RANK CALL prefkit-args…`: prefkit's CLI with the objective's loss made NaN on one
process only, at its CALL-th training forward (1-based), for the multi-process --nan_policy skip test."""

from __future__ import annotations

import os
import sys

import torch

from prefkit.cli import main
from prefkit.objectives.objective import Objective


def poison(rank: int, call: int) -> None:
    real = Objective.__call__
    seen = [0]

    def poisoned(self, logps):
        out = real(self, logps)
        if logps.chosen.requires_grad:  # a training forward (not the dynamics probe)
            seen[0] += 1
            if seen[0] == call and int(os.environ.get("RANK", "0")) == rank:
                out.loss = out.loss * torch.tensor(float("nan"))
        return out

    Objective.__call__ = poisoned


if __name__ == "__main__":
    poison(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
