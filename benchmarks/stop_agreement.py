"""What distill's per-step stop/save agreement costs (distill.preemption.GracefulStop.after_step).

Under torchrun every step starts an asynchronous MAX all-reduce of two int64 on the CPU gloo group and
waits for the previous one. This times a loop of simulated training steps with and without
``after_step``, interleaved, in the same processes. A simulated step is a sleep of --step-ms (which
releases the GIL, as a GPU step's waits do) and, under torchrun, an all-reduce of --grad-floats
floats on the default group: DDP's gradient all-reduce, which already holds the ranks in step, so
the agreement's own cost is measured, not the rank-to-rank jitter it would otherwise absorb.

    python -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/stop_agreement.py
    python benchmarks/stop_agreement.py            # one process: no collective, the flag check only
"""
from __future__ import annotations

import argparse
import time

import torch

from mealkd.core.distributed import init_distributed, shutdown
from mealkd.distill.preemption import GracefulStop


def loop(steps: int, step_s: float, grads: torch.Tensor | None, stop: GracefulStop | None) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        time.sleep(step_s)
        if grads is not None:
            torch.distributed.all_reduce(grads)
        if stop is not None:
            stop.after_step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grad-floats", type=int, default=1 << 16)
    args = parser.parse_args()
    d = init_distributed(torch.device("cpu"))
    try:
        plain, agreed = [], []
        grads = torch.zeros(args.grad_floats) if d.active else None
        with GracefulStop(d) as stop:
            for _ in range(args.rounds):
                d.barrier()
                plain.append(loop(args.steps, args.step_ms / 1000, grads, None))
                d.barrier()
                agreed.append(loop(args.steps, args.step_ms / 1000, grads, stop))
            stop.at_epoch_end()
        if d.is_main:
            best_plain, best_agreed = min(plain), min(agreed)
            per_step_us = (best_agreed - best_plain) / args.steps * 1e6
            print(f"world {d.world_size}, {args.steps} steps of {args.step_ms} ms, best of {args.rounds}: "
                  f"plain {best_plain:.3f} s, with the agreement {best_agreed:.3f} s: "
                  f"{per_step_us:+.0f} us per step ({(best_agreed / best_plain - 1) * 100:+.2f}%)")
    finally:
        shutdown(d)


if __name__ == "__main__":
    main()
