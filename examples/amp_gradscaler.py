"""Mixed precision with a multi-task optimizer: autocast, torch.amp.GradScaler, clipping.

    python examples/amp_gradscaler.py                 # float16 autocast + GradScaler, on CUDA if present
    python examples/amp_gradscaler.py --steps 40 --device cpu   # what the test suite runs

The combined gradient is in ``.grad`` when ``opt.backward`` returns, so the usual
GradScaler recipe applies unchanged: scale each task's loss, unscale before
clipping, and let ``scaler.step`` skip a step whose gradients hold inf or NaN.
bfloat16 needs no scaler (``--dtype bfloat16``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from two_head_mlp import TwoHeadMLP, make_data

import gradtools
from gradtools import aggregation as agg


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    x_all, y_all, t_all = (t.to(device) for t in make_data(1024, 8, 4, args.seed))
    model = TwoHeadMLP(8, 64, 4).to(device)  # float32 weights; autocast runs the matmuls in dtype
    opt = gradtools.MultiTask(torch.optim.AdamW(model.parameters(), lr=args.lr), agg.UPGrad())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batches = torch.Generator().manual_seed(args.seed + 1)

    window: list[float] = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=batches).to(device)
        with torch.autocast(device.type, dtype=dtype):
            logits, prediction = model(x_all[idx])
            losses = [F.cross_entropy(logits, y_all[idx]), F.mse_loss(prediction.float(), t_all[idx])]
        opt.zero_grad()
        opt.backward([scaler.scale(loss) for loss in losses])  # one scaled loss per task
        scaler.unscale_(opt)                                    # .grad holds the combined gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        scaler.step(opt)                                        # skipped if a gradient is inf/NaN
        scaler.update()

        window.append(sum(loss.item() for loss in losses))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  "
                  f"grad norm {grad_norm.item():.3f}  scale {scaler.get_scale():.0f}", flush=True)
            window.clear()


if __name__ == "__main__":
    main()
