"""Time (and optionally save) the speedrun's q2a4 block-wise PTQ on the first N blocks of SmolLM2-135M-Instruct.

    .venv/bin/python scripts/bench-blockwise-ptq.py --blocks 3 --cache runs/sr16/cache/out
    .venv/bin/python scripts/bench-blockwise-ptq.py --blocks 2 --sequences 64 --steps 20 --save /tmp/a.pt

The settings are the default recipe's q2a4_init stage (k-means LUTs, 4 tighten rounds, sequential GPTQ, 100
reconstruction steps per block at lr 1e-3, 256 calibration sequences of a KD cache). `--save` writes the blocks'
state dict, to compare two versions of the code tensor by tensor (docs/benchmarks.md, "Q cached between
forwards"). `--profile` prints the cProfile table of the calibration.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from lutq.models import load_model
from lutq.quant.calibrate import calibration_blocks
from lutq.quant.reconstruct import ReconstructConfig, quantize_blockwise
from lutq.speedrun.stages import QuantizeParams, stage_quant_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3, help="decoder blocks to keep")
    ap.add_argument("--cache", required=True, help="KD cache directory (calibration data)")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="reconstruction steps per block")
    ap.add_argument("--save", help="write the quantized blocks' state dict here")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m-instruct")
    model.model.layers = model.model.layers[: args.blocks]
    model.config.num_hidden_layers = args.blocks
    config = {"tighten_rounds": 4, "gptq_refit_rounds": 0}
    cfg = stage_quant_config(QuantizeParams(model="-", preset="q2a4", lut_kind="kmeans", config=config))
    blocks = calibration_blocks(args.cache, tok, num_sequences=args.sequences, seq_len=256)
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    quantize_blockwise(model, cfg, blocks, ReconstructConfig(steps=args.steps, lr=1e-3), show_progress=False)
    if prof:
        prof.disable()
    print(f"block-wise PTQ of {args.blocks} blocks: {time.perf_counter() - t0:.1f} s")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    if args.save:
        torch.save({k: v for k, v in model.state_dict().items() if ".layers." in k}, args.save)


if __name__ == "__main__":
    main()
