"""Tests for foodlib.distributed: the single-process no-ops, launch's process handling, a real
two-process gloo group (127.0.0.1) for the collectives, and a two-process ``foodlib train`` under
torchrun compared with a one-process run.

Expected values are worked out by hand (python loops over tiny hand-made tensors) or come from a
single-process computation of the same global batch, never from the code under test.
"""
from __future__ import annotations

import doctest
import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import foodlib.distributed as D
from foodlib.config import Config, ConfigError
from foodlib.distributed import (DistInfo, average_batchnorm_statistics, broadcast_state, check_in_sync, dist_info,
                                 dump_rank_state, in_turns, maybe_sync_batchnorm, state_fingerprints)
from torchrun_launch import free_port, launch

LOCALHOST = "127.0.0.1"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


# ----- one process: who am I, and every helper is a no-op -----------------------------------------

def test_dist_info_reads_torchrun_environment(monkeypatch, no_torchrun_env):
    assert dist_info() == DistInfo(rank=0, world_size=1, local_rank=0)
    assert dist_info().is_main and not dist_info().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist_info()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert info.enabled and not info.is_main


def test_setup_without_rendezvous_address_says_to_use_torchrun(monkeypatch, no_torchrun_env):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT is not set: start distributed runs with torchrun"):
        D.setup_distributed(torch.device("cpu"))
    assert not dist.is_initialized()


def test_helpers_are_no_ops_in_one_process():
    assert not D.is_distributed()
    tensor = torch.tensor([1.0, 2.0])
    assert D.all_reduce_sum(tensor) is tensor and tensor.tolist() == [1.0, 2.0]
    calls = []
    assert in_turns(lambda a, b=0: calls.append((a, b)) or a + b, 2, b=5) == 7
    assert calls == [(2, 5)]  # exactly once
    bn = nn.BatchNorm1d(2)
    bn.running_mean.copy_(torch.tensor([0.25, -1.0]))
    average_batchnorm_statistics(bn)
    broadcast_state(bn)
    check_in_sync(bn)
    assert bn.running_mean.tolist() == [0.25, -1.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()


def test_state_fingerprints_by_hand_and_one_changed_value_changes_one_row():
    module = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    names, prints = state_fingerprints(module)
    assert names == ["Linear[0].weight"]
    # sum 1+2+3; squares 1+4+9; weights linspace(1, 2, 3) = 1, 1.5, 2: 1*1 + 2*1.5 + 3*2
    assert prints.tolist() == [[6.0, 14.0, 10.0]]

    other = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    names, before = state_fingerprints(module, other)
    with torch.no_grad():
        other[1].running_var[1] += 1e-6
    _, after = state_fingerprints(module, other)
    changed = [name for name, a, b in zip(names, before, after) if not torch.equal(a, b)]
    assert changed == ["Sequential[1].1.running_var"]


def test_sync_batchnorm_is_refused_on_cpu_and_converts_on_gpu_devices():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(ConfigError, match="sync_bn=True with 2 processes on cpu.*set sync_bn=False"):
        maybe_sync_batchnorm(model, True, torch.device("cpu"), world_size=2)
    assert maybe_sync_batchnorm(model, True, torch.device("cpu"), world_size=1) is model  # one process: nothing to sync
    assert maybe_sync_batchnorm(model, False, torch.device("cuda"), world_size=2) is model
    keys = list(model.state_dict())
    converted = maybe_sync_batchnorm(model, True, torch.device("cuda"), world_size=2)  # conversion needs no GPU
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert list(converted.state_dict()) == keys  # checkpoints load into a plain model
    assert Config.from_flat(sync_bn=True).train.sync_bn is True


def test_sync_batchnorm_keeps_timms_batchnorm_activation_layers():
    """EfficientNet-Lite's BatchNorm layers carry their activation (timm's BatchNormAct2d): torch's
    converter made them plain SyncBatchNorm, dropping the ReLU6; the converted net must compute
    what the plain one does (eval mode: the running statistics, no all-gather)."""
    from foodlib.models import create_model

    torch.manual_seed(0)
    plain = create_model("efficientnet_lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    expected = plain(x)
    converted = maybe_sync_batchnorm(plain, True, torch.device("cuda"), world_size=2).eval()
    assert not any(type(m) is nn.SyncBatchNorm for m in converted.backbone.modules())
    torch.testing.assert_close(converted(x), expected)


def test_dump_rank_state_writes_only_when_asked(tmp_path, monkeypatch):
    model, loss = nn.Linear(2, 2), nn.Linear(2, 3)
    monkeypatch.delenv(D.RANK_STATE_DIR_ENV, raising=False)
    assert dump_rank_state(model, loss) is None
    monkeypatch.setenv(D.RANK_STATE_DIR_ENV, str(tmp_path / "states"))
    path = dump_rank_state(model, loss)
    assert path == tmp_path / "states" / "rank0.pt"
    saved = torch.load(path)
    assert (saved["rank"], saved["world_size"]) == (0, 1)
    assert torch.equal(saved["model"]["weight"], model.weight) and torch.equal(saved["loss"]["bias"], loss.bias)


def test_docstring_examples_run(no_torchrun_env):
    assert doctest.testmod(D).failed == 0


# ----- two real processes (gloo on 127.0.0.1) ------------------------------------------------------

CENTER_START = [[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]
RANK_X = {0: [[1.0, 0.0], [4.0, 2.0], [3.0, 0.0]], 1: [[0.0, 2.0], [5.0, 0.0], [1.0, 1.0]]}
RANK_Y = {0: [0, 2, 0], 1: [0, 2, 2]}  # class 1 absent from the global batch


def paper_update_by_hand(centers, xs, ys, alpha):
    """c_j - alpha * sum_{i: y_i=j} (c_j - x_i) / (1 + n_j), with python loops."""
    out = []
    for j, c in enumerate(centers):
        rows = [x for x, y in zip(xs, ys) if y == j]
        delta = [sum(c[d] - x[d] for x in rows) / (1 + len(rows)) for d in range(len(c))]
        out.append([c[d] - alpha * delta[d] for d in range(len(c))])
    return out


DDP_CASES = {  # loss name -> options; every kind of class state fit() handles
    "center-paper": ("center", {"lam": 0.1, "alpha": 0.5, "update": "paper"}),
    "center-sgd": ("center", {"lam": 0.1, "update": "sgd"}),
    "island-paper": ("island", {"lam": 0.1, "lam_island": 0.5, "alpha": 0.5, "update": "paper"}),
    "lgm-diagonal": ("lgm", {"lam": 0.1, "alpha": 0.3, "covariance": "diagonal"}),
}
GLOBAL_BATCH, STEPS = 8, 3


def _ddp_case(case: str, world_size: int, rank: int):
    """Three fit()-style steps of a BatchNorm-free net + loss; each rank takes [rank::world_size] of every global batch.

    Returns the final (model state, loss state). world_size=1 is the single-process reference.
    """
    from foodlib.losses import create_loss
    from foodlib.train import _ModelAndLoss, build_optimizers

    name, options = DDP_CASES[case]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    loss = create_loss(name, embedding_dim=3, num_classes=4, **options)
    cfg = Config.from_flat(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, center_lr=0.5)
    optimizer, center_optimizer = build_optimizers(cfg, model, loss)
    step_module = _ModelAndLoss(model, loss)
    if world_size > 1:
        step_module = D.wrap_ddp(step_module, torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 6, generator=data)
        y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=data)
        x, y = x[rank::world_size], y[rank::world_size]
        embedding, out = step_module(x, y)
        optimizer.zero_grad()
        if center_optimizer is not None:
            center_optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if center_optimizer is not None:
            center_optimizer.step()
        loss.update_centers(embedding.detach(), y)
    return model.state_dict(), loss.state_dict()


def _two_rank_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from foodlib.losses import CenterLoss

    results = {}
    D.setup_distributed(torch.device("cpu"))
    try:
        results["is_distributed"] = D.is_distributed()

        # paper-mode center update: each rank has half the global batch
        loss = CenterLoss(2, 3, alpha=0.5)
        loss.centers.copy_(torch.tensor(CENTER_START))
        loss.update_centers(torch.tensor(RANK_X[rank]), torch.tensor(RANK_Y[rank]))
        results["centers"] = loss.centers.clone()

        # DDP + center all-reduce vs one process on the global batch
        results["ddp"] = {case: _ddp_case(case, world_size, rank) for case in DDP_CASES}

        # BatchNorm running statistics: averaged over the ranks
        bn = nn.BatchNorm1d(2)
        bn.running_mean.copy_(torch.tensor([1.0 + rank, -2.0 * rank]))
        bn.running_var.copy_(torch.tensor([1.0, 3.0]) * (rank + 1))
        average_batchnorm_statistics(bn)
        results["bn"] = (bn.running_mean.clone(), bn.running_var.clone())

        # broadcast_state: rank 0's values everywhere
        linear = nn.Linear(2, 2)
        with torch.no_grad():
            linear.weight.fill_(float(rank + 7))
        broadcast_state(linear)
        results["broadcast"] = linear.weight.clone()

        # check_in_sync: passes on equal state, names the tensor that differs
        check_in_sync(bn, linear)
        with torch.no_grad():
            if rank == 1:
                linear.bias[0] += 1e-7
        try:
            check_in_sync(bn, linear)
            results["out_of_sync"] = None
        except RuntimeError as error:
            results["out_of_sync"] = str(error)

        # in_turns: rank 0 first, and a failure on one rank stops every rank
        marker = Path(out_dir) / "prepared"

        def prepare():
            seen = marker.exists()
            marker.touch()
            return seen

        results["saw_marker"] = in_turns(prepare)

        def fail_on_rank_0():
            if dist.get_rank() == 0:
                raise ValueError("rank 0 could not decode the data")
            return "fine"

        try:
            results["failure"] = in_turns(fail_on_rank_0)
        except Exception as error:
            results["failure"] = f"{type(error).__name__}: {error}"
        D.barrier()
    finally:
        D.cleanup_distributed()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_collectives_under_a_real_two_process_gloo_group(tmp_path):
    """Two processes on 127.0.0.1: center update, DDP steps, BN statistics, broadcast, sync check, turns."""
    import torch.multiprocessing as mp

    # fork, not spawn: the children need not import torch again (15 s on a busy 2-core machine);
    # each sets one intra-op thread first, as DataLoader workers do, so the fork is safe.
    references = {case: _ddp_case(case, 1, 0) for case in DDP_CASES}  # also imports foodlib.train before the fork
    mp.start_processes(_two_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["is_distributed"] for r in ranks)

    # the paper update of the concatenated global batch, by hand, on both ranks
    expected = paper_update_by_hand(CENTER_START, RANK_X[0] + RANK_X[1], RANK_Y[0] + RANK_Y[1], alpha=0.5)
    # class 0: n=3, sum(c - x) = -(1 + 3 + 0), (0 - 2) -> delta (-4/4, -2/4); class 1 untouched;
    # class 2: n=3, rows (4,2) (5,0) (1,1): sum(c - x) = (6 - 10, 0 - 3) -> delta (-1, -0.75)
    assert expected == [[0.5, 0.25], [1.0, 1.0], [2.5, 0.375]]
    for r in ranks:
        assert torch.allclose(r["centers"], torch.tensor(expected), atol=1e-6, rtol=0)

    # DDP-averaged gradients + all-reduced center update == one process on the whole batch.
    # Tolerance 1e-5: the only difference is the order of float32 additions (per-rank partial
    # sums), amplified a little by three momentum steps.
    for case, reference in references.items():
        for r in ranks:
            for got, want in zip(r["ddp"][case], reference):
                assert got.keys() == want.keys()
                for key in want:
                    assert torch.allclose(got[key], want[key], atol=1e-5, rtol=0), (case, key)
        for got0, got1 in zip(ranks[0]["ddp"][case], ranks[1]["ddp"][case]):
            for key in got0:
                assert torch.equal(got0[key], got1[key]), (case, key)  # bitwise identical across ranks

    # BN statistics: mean of (1, 0) and (2, -2) -> (1.5, -1); variances (1, 3) and (2, 6) -> (1.5, 4.5)
    for r in ranks:
        assert r["bn"][0].tolist() == [1.5, -1.0] and r["bn"][1].tolist() == [1.5, 4.5]
        assert r["broadcast"].eq(7.0).all()
        assert r["out_of_sync"] is not None and "Linear[1].bias" in r["out_of_sync"]
        assert "BatchNorm1d" not in r["out_of_sync"]
    assert [r["saw_marker"] for r in ranks] == [False, True]  # rank 0 went first
    assert ranks[0]["failure"] == "ValueError: rank 0 could not decode the data"
    assert ranks[1]["failure"].startswith("RuntimeError: rank 1: another rank failed in 'fail_on_rank_0'")


# ----- foodlib train under torchrun, compared with one process -------------------------------------

def _files(run_dir: Path) -> set[str]:
    """The run folder's files; TensorBoard event files by kind (their names carry a time stamp and a pid)."""
    return {re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", str(p.relative_to(run_dir)))
            for p in run_dir.rglob("*") if p.is_file()}


def _tiny_center_config(tmp_path: Path, out: str) -> Config:
    return Config.from_flat(
        data="dishes", dishes_classes=4, dishes_per_class=30, image_size=32, backbone="smallcnn", epochs=2,
        batch_size=16, workers=0, quiet=True, loss="center", update="paper", augment="none", features=False,
        figures=False, out=str(tmp_path / out), cache_dir=str(tmp_path / "cache"),
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path, monkeypatch, capsys):
    """``foodlib train`` under torchrun (2 CPU processes, gloo) vs fit() in one process, same global batch.

    (a) Both ranks end training with bitwise identical weights, BatchNorm statistics and centers.
    (b) The result matches the one-process run within a tolerance. It cannot match exactly:
        smallcnn has BatchNorm, and each rank normalises its 8 images with their own statistics
        where one process uses the 16 images' (torch's SyncBatchNorm, ``sync_bn``, is GPU-only).
        Measured on this config: centers 12% apart (relative norm), val/test loss within 0.02,
        top-1 within 2 of 40 test images. The tolerances (35%, 0.15, 0.2) leave room for
        platform differences. Exact equality of everything except BatchNorm is checked with a
        BatchNorm-free network in test_collectives_under_a_real_two_process_gloo_group.
    """
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    metrics2 = launch(_tiny_center_config(tmp_path, "two"), nproc_per_node=2, timeout=300,
                      env={D.RANK_STATE_DIR_ENV: str(tmp_path / "states2")})
    output = capsys.readouterr().out
    assert output.count("epoch 1/2:") == 1 and output.count("epoch 2/2:") == 1  # rank 0 logs, rank 1 is quiet

    monkeypatch.setenv(D.RANK_STATE_DIR_ENV, str(tmp_path / "states1"))
    from foodlib.train import fit

    metrics1 = fit(_tiny_center_config(tmp_path, "one")).metrics

    # (a) identical state on both ranks
    rank0, rank1 = (torch.load(tmp_path / "states2" / f"rank{r}.pt") for r in range(2))
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    for part in ("model", "loss"):
        assert rank0[part].keys() == rank1[part].keys()
        for key in rank0[part]:
            assert torch.equal(rank0[part][key], rank1[part][key]), (part, key)

    # the run folder: the same layout as one process
    assert _files(two_dir) == _files(one_dir)
    expected = {"config.yaml", "run.json", "classes.json", "trace.csv", "last.pt", "best.pt", "metrics.json"}
    assert expected <= _files(two_dir)
    assert json.loads((two_dir / "run.json").read_text())["world_size"] == 2
    assert not list(two_dir.glob(".*tmp"))

    # metrics are reduced over the ranks: counts of the whole split, not of one shard
    for split in ("val", "test"):
        assert metrics2[split]["n"] == metrics1[split]["n"] == len(_tiny_split(one_dir, split))

    # (b) close to the one-process run (tolerances explained in the docstring)
    single = torch.load(tmp_path / "states1" / "rank0.pt")
    c2, c1 = rank0["loss"]["centers"], single["loss"]["centers"]
    assert float((c2 - c1).norm() / c1.norm()) < 0.35
    for split in ("val", "test"):
        assert abs(metrics2[split]["loss"] - metrics1[split]["loss"]) < 0.15
        assert abs(metrics2[split]["top1"] - metrics1[split]["top1"]) < 0.2


def _tiny_split(run_dir: Path, split: str) -> list[str]:
    """Lines of the run's split file (one image per line)."""
    files = [p for p in (run_dir / "splits").iterdir() if p.stem == split]
    assert files, f"no {split} split file in {run_dir / 'splits'}"
    return [line for line in files[0].read_text().splitlines() if line.strip()]
