"""Why bf16 gains less in training than in inference on this CPU: convolution forward / input gradient /
weight gradient per dtype and layout, for ResNet-18's 3x3 convolutions at 112 px input (N=64).

The weight gradient is also computed as one ``unfold`` + matmul, the same product in a form oneDNN's
matmul handles well, to show what the convolution kernel leaves on the table (checked against torch's
result before timing). Medians of 7 calls after 2 warm-ups.

    .venv/bin/python benchmarks/bench_conv_grad.py            # torch's threads
    .venv/bin/python benchmarks/bench_conv_grad.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(64, 64, 28), (64, 128, 14), (64, 256, 7), (64, 512, 4)]  # N, C (in = out), H = W at 112 px input


def median_ms(fn, calls: int = 7) -> float:
    fn(), fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[calls // 2] * 1000


def conv_backward(grad_out, x, weight, mask):
    return torch.ops.aten.convolution_backward(grad_out, x, weight, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)


def weight_grad_matmul(grad_out, x):
    n, c, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(n * h * w, c * 9)
    g = grad_out.permute(0, 2, 3, 1).reshape(n * h * w, grad_out.shape[1])
    return (g.t() @ cols).view(grad_out.shape[1], c, 3, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call (median of 7)\n")
    print("| N, C, HxW | dtype | layout | forward | input grad | weight grad | weight grad as unfold + matmul |")
    print("|---|---|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for n, c, h in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in (torch.contiguous_format, torch.channels_last):
                x, w, grad_out = (torch.randn(*shape, generator=g).to(dtype).to(memory_format=layout)
                                  for shape in ((n, c, h, h), (c, c, 3, 3), (n, c, h, h)))
                reference = conv_backward(grad_out, x, w, [False, True, False])[1].float()
                mine = weight_grad_matmul(grad_out, x).float()
                tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-3
                if (mine - reference).abs().max() > tolerance * reference.abs().max():
                    raise SystemExit(f"unfold + matmul disagrees with torch's weight gradient at {n, c, h}, {dtype}")
                times = timings(x, w, grad_out)
                print(f"| {n}, {c}, {h}x{h} | {str(dtype)[6:]} | {'NHWC' if layout is torch.channels_last else 'NCHW'} "
                      + "".join(f"| {t:.1f} " for t in times) + "|", flush=True)


def timings(x, w, grad_out) -> list[float]:
    """forward, input gradient, weight gradient, weight gradient as unfold + matmul (ms)."""
    return [median_ms(lambda: F.conv2d(x, w, padding=1)),
            median_ms(lambda: conv_backward(grad_out, x, w, [True, False, False])),
            median_ms(lambda: conv_backward(grad_out, x, w, [False, True, False])),
            median_ms(lambda: weight_grad_matmul(grad_out, x))]

if __name__ == "__main__":
    main()
