"""The LAMB update alone, on a model's real parameter shapes: eager (foreach) against compiled
(inductor), and on the GPU each also replayed as a CUDA graph (what `cuda_graphs` captures).

    python benchmarks/lamb_update.py --model resnet50 --steps 50 [--json-out F]

Why: on the H200 the A3 step alone ran at 10,106 img/s at a70b3c8 against 11,812 at 915cdf8; in
between, the update became compiled (with device-scalar LRs) and the step alone began to mix each
batch as training does (`throughput.py --variants step,mixing=false` measures it without). This
separates the update's own time from the step's. Per variant: the wall time of an update with the device
synchronized (the GPU's pace or the host's launches, whichever is slower) and the host's time to
issue one (the launches alone). Gradients are random, fixed; weights change as they would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastrsb.optim import Lamb, param_groups  # noqa: E402
from fastrsb.pipelines.cuda_graphs import capture, on_side_stream  # noqa: E402


def build(model_name: str, compiled: bool, device: str) -> Lamb:
    import timm
    model = timm.create_model(model_name, num_classes=1000).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator, device=device) * 1e-3
    return Lamb(param_groups(model, 0.02), lr=5e-3, weight_decay=0.02, compiled=compiled)


def measure(optimizer: Lamb, graphed: bool, steps: int, device: str) -> dict:
    cuda = device == "cuda"

    def update(work: list[dict]) -> torch.Tensor:
        optimizer.update(work)
        return torch.zeros((), device=device)  # something for the stream helpers to hand back

    if graphed:
        side = torch.cuda.Stream()
        for _ in range(3):  # warm-up (and compilation) on one side stream, as GraphedStep does
            on_side_stream(lambda: update(optimizer.prepare()), side)
        optimizer.advance()
        graph, _ = capture(lambda: update(optimizer.work()))

        def one():
            optimizer.advance()
            graph.replay()
    else:
        def one():
            optimizer.update(optimizer.prepare())
        for _ in range(3):
            one()
    if cuda:
        torch.cuda.synchronize()
    host, start = 0.0, time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        one()
        host += time.perf_counter() - before
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"ms_per_update": 1000 * wall / steps, "host_ms_per_update": 1000 * host / steps}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a timm model name: its parameter shapes are timed")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [("eager", False, False), ("compiled", True, False)]
    if device == "cuda":
        variants += [("eager+graph", False, True), ("compiled+graph", True, True)]
    results = []
    for name, compiled, graphed in variants:
        result = {"mode": "lamb_update", "model": args.model, "device": device, "variant": name,
                  "device_name": torch.cuda.get_device_name() if device == "cuda" else None,
                  "steps": args.steps, **measure(build(args.model, compiled, device), graphed, args.steps, device)}
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
    for r in results:
        print(f"{r['variant']:<16} {r['ms_per_update']:8.3f} ms an update, the host {r['host_ms_per_update']:8.3f} ms")
    return results


if __name__ == "__main__":
    main()
