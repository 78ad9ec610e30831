"""foodlib.gpu_slots: with several GPUs, each concurrent suite run gets its own (the device list is faked)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import nbformat
import pytest
import torch

import foodlib.suite as S
from foodlib.gpu_slots import GpuSlots, kernel_manager_with_env, visible_gpu_ids
from tests.test_suite import FakePapermill, suite_text


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs."""
    def fake(n: int, visible: str | None = None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return fake


def test_visible_ids_follow_the_parent_environment(gpus):
    gpus(0)
    assert visible_gpu_ids() == []
    gpus(3)
    assert visible_gpu_ids() == ["0", "1", "2"]
    gpus(2, visible="4,6")
    assert visible_gpu_ids() == ["4", "6"]  # the ids the suite itself may use, not 0 and 1


def test_slots_only_where_runs_may_choose_a_gpu(gpus):
    gpus(4)
    assert GpuSlots.for_suite(jobs=2, device=None).gpu_ids == ["0", "1", "2", "3"]
    assert GpuSlots.for_suite(jobs=2, device="cuda").enabled
    assert not GpuSlots.for_suite(jobs=2, device="cpu").enabled
    assert not GpuSlots.for_suite(jobs=2, device="cuda:1").enabled
    assert not GpuSlots.for_suite(jobs=1, device=None).enabled  # one run at a time: nothing to spread
    with GpuSlots.for_suite(jobs=2, device=None).slot("cuda:2") as env:
        assert env is None  # the run asked for a GPU itself
    gpus(1)
    assert not GpuSlots.for_suite(jobs=2, device=None).enabled


def test_more_jobs_than_gpus_share_round_robin(gpus):
    gpus(2)
    slots = GpuSlots.for_suite(jobs=3, device=None)
    with slots.slot() as a, slots.slot() as b, slots.slot() as c:
        assert [a, b, c] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "1", "0")]


def test_concurrent_suite_runs_each_get_their_own_gpu(tmp_path, monkeypatch, gpus):
    gpus(3)
    lock, in_use, seen = threading.Lock(), set(), []
    overlap = threading.Barrier(3, timeout=10)  # the first three runs must execute together

    class OnGpus(FakePapermill):
        def __call__(self, notebook, output, parameters, quiet=False, env=None):
            if Path(output).name == "compare.ipynb":
                return super().__call__(notebook, output, parameters, quiet)
            gpu = env["CUDA_VISIBLE_DEVICES"]
            with lock:
                assert gpu not in in_use, f"GPU {gpu} handed to two concurrent runs"
                in_use.add(gpu)
                seen.append(gpu)
                first_wave = len(seen) <= 3
            if first_wave:
                overlap.wait()
            time.sleep(0.05)
            with lock:
                in_use.discard(gpu)
            super().__call__(notebook, output, parameters, quiet)

    fake = OnGpus()
    monkeypatch.setattr(S, "execute_notebook", fake)
    lines = []
    result = S.run_suite(S.load_suite(suite_text(seeds=[0, 1, 2]), tmp_path), jobs=3, log=lines.append)
    assert result.exit_code == 0 and len(seen) == 6
    assert sorted(seen[:3]) == ["0", "1", "2"]
    assert any("one GPU per run" in line for line in lines)
    # --device cpu: no placement, the fake receives no env
    monkeypatch.setattr(S, "execute_notebook", FakePapermill())
    S.run_suite(S.load_suite(suite_text(seeds=[3]), tmp_path), jobs=2, device="cpu", log=lambda line: None)


def test_the_kernel_starts_with_its_slots_environment(tmp_path):
    """A real kernel (no GPU needed): the variable reaches the notebook's process."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                        "display_name": "Python 3"}})
    params = nbformat.v4.new_code_cell("out = ''")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os\nopen(out, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))")]
    nbformat.write(nb, tmp_path / "env.ipynb")
    target = tmp_path / "seen.txt"
    S.execute_notebook(tmp_path / "env.ipynb", tmp_path / "ran.ipynb", {"out": str(target)}, quiet=True,
                       env={"CUDA_VISIBLE_DEVICES": "5"})
    assert target.read_text() == "5"
    assert kernel_manager_with_env({"X": "1"}).__name__ == "EnvKernelManager"
