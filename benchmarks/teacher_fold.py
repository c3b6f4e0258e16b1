"""Teacher forward time with and without BatchNorm folded into the convolutions (run by hand; CPU or CUDA).

Stage one folds each teacher's BatchNorm (``core.models.inference.fold_batchnorm``). This measures
what that saves per batch, interleaved in one run: the same torchvision teachers (random weights),
the same batch, eval mode, as ``TeacherEnsemble`` runs them (``--precision`` autocast and
channels_last on CUDA, ``inference_mode``).

    PYTHONPATH=. python benchmarks/teacher_fold.py [--archs resnet50,mobilenet_v3_large] [--size 128] [--batch 16]
"""
from __future__ import annotations

import argparse
import time

import torch
import torchvision

from mealkd.core.accel import as_model_input, autocast_for, resolve_precision
from mealkd.core.models.inference import fold_batchnorm


def seconds_per_batch(model: torch.nn.Module, x: torch.Tensor, precision: str, repeats: int) -> float:
    with torch.inference_mode(), autocast_for(x.device, precision):
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="resnet50,mobilenet_v3_large", help="Comma list of torchvision architectures.")
    parser.add_argument("--size", type=int, default=128, help="Input size in pixels (default 128).")
    parser.add_argument("--batch", type=int, default=16, help="Crops per batch (default 16).")
    parser.add_argument("--repeats", type=int, default=3, help="Batches per timing; the best of 4 interleaved timings is kept.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu).")
    parser.add_argument("--precision", default="auto", help="As precompute's --precision (auto: bf16 on CUDA, fp32 on CPU).")
    ns = parser.parse_args()
    device = torch.device(ns.device)
    precision = resolve_precision(ns.precision, device)
    torch.manual_seed(0)
    x = as_model_input(torch.randn(ns.batch, 3, ns.size, ns.size, device=device))
    print(f"{device}, {precision}, batch {ns.batch} at {ns.size} px, {torch.get_num_threads()} CPU threads")
    for arch in ns.archs.split(","):
        plain = torchvision.models.get_model(arch, num_classes=1000).eval()
        folded, done = fold_batchnorm(plain, ns.size)
        if not done:
            print(f"{arch:>22}: not folded")
            continue
        models = {}
        for name, model in (("plain", plain), ("folded", folded)):
            model = model.to(device)
            models[name] = model.to(memory_format=torch.channels_last) if device.type == "cuda" else model
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(4):
            for name, model in models.items():
                times[name].append(seconds_per_batch(model, x, precision, ns.repeats))
        best = {name: min(values) for name, values in times.items()}
        print(f"{arch:>22}: plain {best['plain'] * 1e3:.1f} ms, folded {best['folded'] * 1e3:.1f} ms per batch: "
              f"{best['plain'] / best['folded']:.2f}x")


if __name__ == "__main__":
    main()
