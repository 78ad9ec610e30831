"""What the discriminative losses cost: their share of a training step, and Center Loss's scaling.

Two measurements, each in one run with interleaved rounds (medians over rounds):

1. Overhead: forward + backward (+ the paper-mode center update ``fit()`` calls after each step) of
   the center, L-GM and island losses at N=64, D=512 and C in {10, 59, 1000}, as a fraction of one
   ResNet-18 training step (forward, softmax loss, backward, AdamW) at the same N, timed in the
   same rounds. The step runs as ``fit()`` runs it on this machine (bf16 autocast + channels_last by
   default: the fastest step, so the largest, most conservative fraction). Target: <= 3%.
2. Scaling: Center Loss's center term as foodlib computes it (each sample's own center gathered
   with ``centers[labels]``, O(N*D)) against the N x C distance-matrix formulation common in
   public implementations (``||x||^2 + ||c||^2 - 2 x c^T``, masked by the labels, O(N*C*D)), forward
   + backward, at C=10,000, N=256, D=512; for both center update modes (paper: gradient to the
   features only; sgd: to the centers as well), and the paper-mode center update (``index_add_``)
   against a one-hot matrix product. Target: >= 5x.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_losses.py
    .venv/bin/python benchmarks/bench_losses.py --threads 1 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import Trainer, machine_info, _loadavg  # noqa: E402
from foodlib.losses import create_loss  # noqa: E402
from foodlib.losses.center import half_squared_distance_to_centers  # noqa: E402

OVERHEAD_LOSSES = ("softmax", "center", "lgm", "island")


def seconds_per_call(fn: Callable[[], None], calls: int) -> float:
    """Mean seconds of ``fn`` over ``calls`` back-to-back calls (after one untimed call)."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


# ----- 1. loss overhead in a training step --------------------------------------------------------

def loss_step(name: str, num_classes: int, batch: int, dim: int, amp: bool) -> Callable[[], None]:
    """One loss forward + backward (+ paper-mode center update) as fit() runs it, on a bf16/fp32 embedding."""
    torch.manual_seed(0)
    loss = create_loss(name, embedding_dim=dim, num_classes=num_classes)
    dtype = torch.bfloat16 if amp else torch.float32
    embedding = torch.randn(batch, dim, dtype=dtype, requires_grad=True)  # what the autocast network hands over
    labels = torch.randint(0, num_classes, (batch,))

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = loss(embedding, labels)
        out.loss.backward()
        embedding.grad = None
        loss.zero_grad(set_to_none=True)
        loss.update_centers(embedding.detach().float(), labels)

    return run


def measure_overhead(args, log) -> dict:
    trainer = Trainer(num_classes=10, amp=args.amp == "bf16", channels_last=args.amp == "bf16", device=torch.device("cpu"))
    images = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 10, (args.batch,))
    trainer.step(images, labels)  # warm-up: allocator, oneDNN primitives
    cases = {(name, c): loss_step(name, c, args.batch, args.dim, args.amp == "bf16")
             for c in args.classes for name in OVERHEAD_LOSSES}
    rounds: list[dict] = []
    for r in range(args.rounds):
        row = {"step": seconds_per_call(lambda: trainer.step(images, labels), args.step_calls)}
        for key, fn in cases.items():
            row[key] = seconds_per_call(fn, args.loss_calls)
        rounds.append(row)
        log(f"  round {r + 1}/{args.rounds}: step {row['step'] * 1000:.0f} ms; "
            + ", ".join(f"{n}@{c} {row[(n, c)] * 1000:.2f} ms" for n, c in cases))
    step_ms = statistics.median(r["step"] for r in rounds) * 1000
    results = []
    for (name, c) in cases:
        loss_ms = statistics.median(r[(name, c)] for r in rounds) * 1000
        paired = statistics.median(r[(name, c)] / r["step"] for r in rounds)
        results.append({"loss": name, "classes": c, "loss_ms": loss_ms, "fraction_of_medians": loss_ms / step_ms,
                        "median_paired_fraction": paired})
    return {"step_ms": step_ms, "step_windows_ms": [round(r["step"] * 1000) for r in rounds], "losses": results}


# ----- 2. Center Loss against the distance matrix -------------------------------------------------

def distance_matrix_center_term(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``1/2 mean_i ||x_i - c_{y_i}||^2`` through the full (N, C) squared-distance matrix, then a label mask."""
    squared = x.pow(2).sum(1, keepdim=True) + centers.pow(2).sum(1) - 2.0 * x @ centers.T  # (N, C)
    own = F.one_hot(labels, centers.shape[0]).to(squared.dtype)  # (N, C), 1 at the sample's class
    return 0.5 * (squared * own).clamp_min(0).sum() / x.shape[0]


def gather_center_term(x: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """foodlib's form (CenterLoss): each sample's own center, ``centers[labels]`` ``(N, D)``."""
    return half_squared_distance_to_centers(x, centers[labels])


def term_step(term, x, centers, labels) -> Callable[[], None]:
    def run() -> None:
        term(x, centers, labels).backward()
        x.grad = None
        centers.grad = None

    return run


def update_index_add(loss, x, labels) -> Callable[[], None]:
    return lambda: loss.update_centers(x, labels)  # foodlib's paper-mode update: index_add_ of (c - x) and counts


def update_one_hot(centers: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> Callable[[], None]:
    """Algorithm 1 through a (N, C) one-hot matrix: sums and counts as dense matrix products."""
    def run() -> None:
        with torch.no_grad():
            own = F.one_hot(labels, centers.shape[0]).to(x.dtype)  # (N, C)
            counts = own.sum(0)[:, None]  # (C, 1)
            sums = counts * centers - own.T @ x  # (C, D): sum over the class's samples of (c_j - x_i)
            centers.sub_(alpha * sums / (1.0 + counts))

    return run


def measure_scaling(args, log) -> dict:
    torch.manual_seed(0)
    n, c, d = args.scale_batch, args.scale_classes, args.dim
    x = torch.randn(n, d, requires_grad=True)
    labels = torch.randint(0, c, (n,))
    frozen = torch.randn(c, d)  # paper mode: the centers are a buffer, no gradient
    learnable = torch.randn(c, d, requires_grad=True)  # sgd mode: the centers get a gradient
    with torch.no_grad():  # the two forms agree before we time them
        a, b = gather_center_term(x, frozen, labels), distance_matrix_center_term(x, frozen, labels)
        assert torch.allclose(a, b, rtol=1e-3), (float(a), float(b))
    center_loss = create_loss("center", embedding_dim=d, num_classes=c)
    cases = {
        "paper_gather": term_step(gather_center_term, x, frozen, labels),
        "paper_matrix": term_step(distance_matrix_center_term, x, frozen, labels),
        "sgd_gather": term_step(gather_center_term, x, learnable, labels),
        "sgd_matrix": term_step(distance_matrix_center_term, x, learnable, labels),
        "update_index_add": update_index_add(center_loss, x.detach(), labels),
        "update_one_hot": update_one_hot(torch.randn(c, d), x.detach(), labels),
    }
    rounds = []
    for r in range(args.rounds):
        rounds.append({k: seconds_per_call(fn, args.scale_calls) for k, fn in cases.items()})
        log(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in rounds[-1].items()))
    med = {k: statistics.median(r[k] for r in rounds) * 1000 for k in cases}
    out = {"n": n, "classes": c, "dim": d, "ms": med, "rows": []}
    for label, fast, slow in (("center term f+b, paper mode (gradient to x)", "paper_gather", "paper_matrix"),
                              ("center term f+b, sgd mode (gradient to x and centers)", "sgd_gather", "sgd_matrix"),
                              ("paper-mode center update (Algorithm 1)", "update_index_add", "update_one_hot")):
        paired = statistics.median(r[slow] / r[fast] for r in rounds)
        out["rows"].append({"label": label, "foodlib_ms": med[fast], "matrix_ms": med[slow],
                            "speedup_of_medians": med[slow] / med[fast], "median_paired_speedup": paired})
    return out


# ----- report ---------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    m, a, o, s = report["machine"], report["args"], report["overhead"], report["scaling"]
    lines = [
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} compute thread(s), "
        f"AMX-bf16 {'yes' if m['amx_bf16'] else 'no'}; load average {m['loadavg_start']} at start, "
        f"{m['loadavg_end']} at end. Date {report['date']}, wall time {report['wall_s']:.0f} s, "
        f"{a['rounds']} interleaved rounds.",
        "",
        f"Loss overhead: ResNet-18 training step at N={a['batch']}, {a['image_size']} px, amp={a['amp']}"
        f"{' + channels_last' if a['amp'] == 'bf16' else ''}: median {o['step_ms']:.0f} ms "
        f"(rounds: {', '.join(map(str, o['step_windows_ms']))} ms). Loss = forward + backward + center update, D={a['dim']}.",
        "",
        "| loss | C | loss ms | fraction of the step (of medians) | median paired fraction |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in o["losses"]:
        lines.append(f"| {row['loss']} | {row['classes']} | {row['loss_ms']:.2f} | {100 * row['fraction_of_medians']:.2f}% "
                     f"| {100 * row['median_paired_fraction']:.2f}% |")
    lines += [
        "",
        f"Center Loss scaling at C={s['classes']:,}, N={s['n']}, D={s['dim']} (float32):",
        "",
        "| operation | foodlib (gather / index_add) ms | N x C matrix form ms | speedup (of medians) | median paired speedup |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in s["rows"]:
        lines.append(f"| {row['label']} | {row['foodlib_ms']:.2f} | {row['matrix_ms']:.2f} | "
                     f"{row['speedup_of_medians']:.1f}x | {row['median_paired_speedup']:.1f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch compute threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--amp", choices=["bf16", "off"], default="bf16", help="precision of the ResNet-18 step")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 59, 1000])
    p.add_argument("--step-calls", type=int, default=2, help="timed ResNet-18 steps per round")
    p.add_argument("--loss-calls", type=int, default=20, help="timed loss calls per case and round")
    p.add_argument("--scale-batch", type=int, default=256)
    p.add_argument("--scale-classes", type=int, default=10_000)
    p.add_argument("--scale-calls", type=int, default=5)
    p.add_argument("--skip-overhead", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    machine = machine_info()
    log("loss overhead")
    overhead = {"step_ms": float("nan"), "step_windows_ms": [], "losses": []} if args.skip_overhead else measure_overhead(args, log)
    log("center loss scaling")
    scaling = measure_scaling(args, log)
    machine["loadavg_end"] = _loadavg()
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/bench_losses.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "args": vars(args),
        "overhead": overhead, "scaling": scaling, "wall_s": time.perf_counter() - t_start,
    }
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
