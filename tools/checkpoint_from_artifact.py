#!/usr/bin/env python3
"""A stand-in float checkpoint made from an artifact, for quantization experiments where no float checkpoint of
a trained model is at hand (a CPU machine, say, with an artifact copied from a GPU run):

    python3 tools/checkpoint_from_artifact.py logs/run.ptz stand_in.pt [--noise 0.5] [--seed 0]
    python3 tools/artifact_frontier.py --checkpoint stand_in.pt --combo base= --combo tcq=GPTQ_TCQ=1

Every int tensor is dequantized and gets Gaussian noise of --noise grid steps (its row's scale); fp16 tensors
are kept as stored. The result has the trained weights' distributions, but it is not the model that was trained
(its val_bpb is worse), and the quantizers compared on it must not be favoured by the old grid: with noise of
a step or less spread uniformly inside each cell, scalar GPTQ finds the old grid points again, so the default
is Gaussian noise of half a step. The file is what SAVE_CHECKPOINT writes: the state dict and the model settings
stored in the artifact, so LOAD_CHECKPOINT and tools/artifact_frontier.py take it.
"""
import argparse
import io
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402


def stand_in_state(qstate: dict, noise_steps: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = tg.dequantize_state(qstate)
    for name, qt in qstate.items():
        if qt.kind == "int":
            step = qt.scale.float()[:, None]
            noise = torch.randn(state[name].shape, generator=generator) * (noise_steps * step)
            state[name] = (state[name].float() + noise).to(qt.dtype)
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a .ptz written by train_gpt.py")
    parser.add_argument("out", type=Path, help="the checkpoint to write (refused if it exists)")
    parser.add_argument("--noise", type=float, default=0.5, help="std of the added noise, in grid steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"error: {args.out} exists: choose another path or delete it")
    if args.noise < 0:
        sys.exit(f"error: --noise {args.noise} must be >= 0")
    try:
        qstate, stored, _ = tg.read_artifact(args.artifact)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    model_names = {x.name for x in tg.SETTINGS if x.role == "model"}
    s = tg.Settings(environ={}, **{k.lower(): v for k, v in stored.items() if k in model_names})
    model = tg.GPT(s)
    model.load_state_dict(stand_in_state(qstate, args.noise, args.seed), strict=True)
    buffer = io.BytesIO()
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "settings": tg.checkpoint_settings(s)}, buffer)
    tg.write_atomic(args.out, buffer.getvalue())
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters from {args.artifact}, "
          f"noise {args.noise} grid steps")


if __name__ == "__main__":
    main()
