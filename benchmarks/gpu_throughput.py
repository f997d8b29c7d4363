"""Training throughput of the paper's GPU configuration: ResNet-50 at 224×224, bf16, baseline vs SICoT.

    python -m benchmarks.gpu_throughput [--steps 200] [--batch 256] [--classes 10000] [--compile]

Random images and titles (the data pipeline is measured elsewhere), one device, the same training step
the engine runs (`SICoT.training_loss`, SGD with momentum). Prints JSON: images/s per mode, the
SICoT/baseline step-time ratio, and model FLOP utilisation = (FLOPs of one training step, counted
by torch's FlopCounterMode) × steps/s ÷ the card's dense bf16 peak. On a CPU it runs a tiny version
(`--steps 3 --batch 4 --image 64`) so the script itself can be checked anywhere.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}  # dense, SXM datasheets


def build(mode: str, classes: int, vocab: int, device):
    from sicot.model.backbone import create_backbone
    from sicot.model.classifier import ReplicatedClassifier
    from sicot.model.sicot import SICoT
    from sicot.model.text_encoders import create_text_encoder

    backbone, dim = create_backbone("resnet50")
    encoder = create_text_encoder("bilinear", torch.randn(vocab, 64) * 0.1, dim) if mode == "sicot" else None
    model = SICoT(backbone, dim, ReplicatedClassifier(dim, classes), encoder)
    return model.to(device).to(memory_format=torch.channels_last)


def measure(mode: str, args, device) -> dict:
    model = build(mode, args.classes, 5000, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(args.batch, 3, args.image, args.image, device=device).to(memory_format=torch.channels_last)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    tokens = torch.randint(2, 5000, (args.batch, 24), device=device)
    streams = torch.compile(model.streams) if args.compile else model.streams
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = model.training_loss(images, labels, tokens if mode == "sicot" else None, streams=streams)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    out = {"mode": mode, "step_ms": round(1000 * seconds, 2), "images_per_s": round(args.batch / seconds, 1),
           "tflop_per_step": round(counter.get_total_flops() / 1e12, 3)}
    if cuda:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if peak:
            out["mfu"] = round(counter.get_total_flops() / seconds / peak, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--classes", type=int, default=10000)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.steps, args.warmup, args.batch, args.image = min(args.steps, 3), 1, min(args.batch, 4), min(args.image, 64)
    torch.backends.cudnn.benchmark = True
    results = [measure(mode, args, device) for mode in ("baseline", "sicot")]
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "batch": args.batch, "image": args.image, "classes": args.classes, "compile": args.compile,
              "results": results,
              "sicot_over_baseline_step_time": round(results[1]["step_ms"] / results[0]["step_ms"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
