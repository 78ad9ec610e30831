"""L-GM start options on raw pooled ResNet-18 features: starting penalty, feature spread, val top-1.

Every option trains the same ResNet-18 (same seed, same batches, same augmentation) on the
embedded dishes for ``--steps`` steps at the authors' settings: margin 0.1 -> 0.3 (the default
warm-up, first third of the run), lam 0.1, identity covariance, no neck (512-d pooled features),
AdamW at foodlib's default lr with its cosine schedule. Printed per option:

* ``penalty0``: ``(alpha + lam) * mean d_y`` on the first training batch right after the start,
  with alpha and lam at their final values (nats; ``ln C`` is 2.3 for 10 classes);
* ``ce0``: the cross-entropy of that batch (margin at its warm-up start);
* ``x.x 0 -> N``: mean ``||x||^2`` of the raw embeddings of the first training batch and of
  the last 10 (train-mode BatchNorm, as the loss sees them);
* ``spread N/0``: feature spread, the embeddings' mean squared distance to their batch mean (raw
  units), last 10 batches over the first; ~0 is the collapse;
* ``d_k std 0 -> N``: mean over samples of the standard deviation of ``d_k`` across classes (the
  spread of the prediction logits), first batch and last 10; ~0 means every class looks alike;
* ``train CE end``: mean CE (margin logits) of the last 20 steps;
* ``val top-1`` from ``loss.predict`` (margin-free) after the last step, chance = 1 / C.

    PYTHONPATH=$PWD nice -n 10 python benchmarks/bench_lgm_scale.py --steps 150 --threads 1 --jobs 6
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from foodlib.config import Config
from foodlib.data import load_data
from foodlib.data.augment import augment_options, eval_transform, train_transform
from foodlib.train import build_model_and_loss, build_optimizers, epoch_generator, lr_factor

#: name -> (LGMLoss options, embedding_dim). "neck-64" is the earlier workaround, for reference.
OPTIONS = {
    "none (authors' start)": (dict(start="none"), None),
    "learned scale from 1": (dict(start="none", learn_scale=True), None),
    "means = batch class means": (dict(start="means"), None),
    "scale: penalty 1 nat": (dict(start="scale"), None),
    "scale + means": (dict(start="scale_means"), None),
    "none + neck 64": (dict(start="none"), 64),
}


@torch.no_grad()
def val_embeddings(model, data, cfg):
    model.eval()
    xs, ys = [], []
    for images, labels in data.loader("val", 256, shuffle=False):
        xs.append(model(eval_transform(images, cfg.data.image_size, False)).float())
        ys.append(labels)
    model.train()
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def batch_spread(loss, x):
    """Feature statistics of one training batch ``(N, D)`` (train-mode BatchNorm, as the loss sees it)."""
    x = x.detach().float()
    return torch.tensor([x.pow(2).sum(1).mean(), (x - x.mean(0)).pow(2).sum(1).mean(), loss.predict(x).std(1).mean()])


@torch.no_grad()
def val_top1(model, loss, data, cfg):
    x, y = val_embeddings(model, data, cfg)  # (N, D)
    return float((loss.predict(x).argmax(1) == y).float().mean())


def run_option(name, options, embedding_dim, data, args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if data is None:  # in a worker process: the decoded cache is shared on disk
        data = load_data(Config.from_flat(data="dishes", image_size=args.image_size), progress=False)
    cfg = Config.from_flat(data="dishes", image_size=args.image_size, backbone="resnet18", embedding_dim=embedding_dim,
                           loss="lgm", lam=args.lam, alpha=0.3, augment="flip", seed=args.seed, amp="off",
                           channels_last=False, batch_size=args.batch_size)
    steps_per_epoch = len(data.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed))
    epochs = math.ceil(args.steps / steps_per_epoch)
    cfg = cfg.with_overrides(epochs=epochs)
    model, loss = build_model_and_loss(cfg, data.num_classes)
    # rebuild the loss with this option (same seed for its means as the model's build)
    from foodlib.losses import LGMLoss
    torch.manual_seed(cfg.train.seed + 1)
    loss = LGMLoss(model.embedding_dim, data.num_classes, lam=args.lam, alpha=0.3, **options)
    optimizer, _ = build_optimizers(cfg, model, loss)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    before = None
    t0 = time.time()
    step = 0
    ce_last, last_batches = [], []
    for epoch in range(epochs):
        loss.set_progress(epoch, epochs)
        generator = epoch_generator(cfg.train.seed, epoch)
        loader = data.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.train.seed)
        loader.set_epoch(epoch)
        for images, labels in loader:
            if step >= args.steps:
                break
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * lr_factor(cfg, step, steps_per_epoch)
            x = train_transform(images, cfg.data.image_size, generator, channels_last=False,
                                **augment_options(cfg.train.augment))
            embedding = model(x)
            out = loss(embedding, labels)  # the first call starts the loss
            if step == 0:
                d_y = loss.half_mahalanobis(embedding.detach().float()).gather(1, labels[:, None]).mean()
                penalty0 = float((loss.alpha + loss.lam) * d_y.detach())
                ce0 = float(out.terms["ce"])
                before = batch_spread(loss, embedding)
            if step >= args.steps - 10:
                last_batches.append(batch_spread(loss, embedding))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            ce_last.append(float(out.terms["ce"]))
            step += 1
    after = torch.stack(last_batches).mean(0)
    before = dict(zip(("x2", "spread", "dk_std"), before.tolist()))
    after = dict(zip(("x2", "spread", "dk_std"), after.tolist()), top1=val_top1(model, loss, data, cfg))
    result = {"name": name, "penalty0": penalty0, "ce0": ce0, "before": before, "after": after,
            "ce_end": sum(ce_last[-20:]) / len(ce_last[-20:]), "scale": math.exp(float(loss.log_scale.detach())),
            "seconds": time.time() - t0}
    print(result, flush=True)  # each option as it ends
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="options trained in parallel processes")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of option names to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(Config.from_flat(data="dishes", image_size=args.image_size), progress=False)
    print(f"dishes: {data.num_classes} classes, {len(data.labels('train'))} train / {len(data.labels('val'))} val, "
          f"{args.image_size} px, batch {args.batch_size}, {args.steps} steps, lam {args.lam}, alpha 0.1 -> 0.3, seed {args.seed}")
    header = ("| start | penalty0 (nats) | ce0 | s | x.x 0 -> N | spread N/0 | d_k std 0 -> N | train CE end "
              "| val top-1 | s/option |")
    rows = []
    chosen = {name: value for name, value in OPTIONS.items() if not args.only or any(o in name for o in args.only)}
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_option, name, options, dim, None, args) for name, (options, dim) in chosen.items()]
            results = [f.result() for f in futures]  # in the table's order
    else:
        results = [run_option(name, options, dim, data, args) for name, (options, dim) in chosen.items()]
    for r in results:
        b, a = r["before"], r["after"]
        rows.append(f"| {r['name']} | {r['penalty0']:.2f} | {r['ce0']:.2f} | {r['scale']:.3g} | {b['x2']:.3g} -> {a['x2']:.3g} "
                    f"| {a['spread'] / b['spread']:.3g} | {b['dk_std']:.3g} -> {a['dk_std']:.3g} | {r['ce_end']:.3f} "
                    f"| {a['top1']:.3f} | {r['seconds']:.0f} |")
        print(rows[-1], flush=True)
    print()
    print(header)
    print("|" + "---|" * 10)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
