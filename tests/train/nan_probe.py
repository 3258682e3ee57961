"""Run under torchrun (or alone): train the tiny model while the last rank's loss turns NaN
at the steps given on the command line (`BAD_STEPS RUN_DIR [overrides]`), as a numerical
blow-up on one rank would. Each rank writes `weights_rank<r>.json`: a checksum of its full
weights after every step, so the test sees which updates were applied."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pretrain import dist
from pretrain.__main__ import main
from pretrain.model.llama import Transformer
from pretrain.train.trainer import Trainer

bad_steps = {int(s) for s in sys.argv[1].split(",")}
run_dir = Path(sys.argv[2])
sys.argv = [sys.argv[0], f"run_dir={run_dir}", *sys.argv[3:]]
checksums: dict[int, float] = {}
step_now = [0]

forward = Transformer.forward


def forward_with_nan(self: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> object:
    loss = forward(self, tokens, targets)
    if dist.rank() == dist.world_size() - 1 and step_now[0] + 1 in bad_steps:
        loss = loss * float("nan")  # NaN loss and NaN gradients, on this rank only
    return loss


train_step = Trainer.train_step


def recording_train_step(self: Trainer) -> object:
    step_now[0] = self.state.step
    result = train_step(self)
    with torch.no_grad():
        checksums[self.state.step + 1] = sum(
            float(p.double().sum()) for p in self.module.engine.module.parameters()
        )
    (run_dir / f"weights_rank{dist.rank()}.json").write_text(json.dumps(checksums))
    return result


Transformer.forward = forward_with_nan
Trainer.train_step = recording_train_step
main()
