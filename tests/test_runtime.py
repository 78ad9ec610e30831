"""foodlib.precision: the start-of-run line names the device, the number format and the reason."""
import torch

from foodlib.runtime import describe_device_and_precision

CPU = torch.device("cpu")


def test_cpu_only_wheel_and_float32_without_amx():
    line = describe_device_and_precision("auto", CPU, None, cpu_name="AMD EPYC", cuda_build=None)
    assert line.startswith("device cpu (AMD EPYC; this torch is a CPU-only build")
    assert line.endswith("precision float32 (amp=auto: this CPU has no AMX units, where bf16 is slower than float32)")


def test_cuda_wheel_without_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = describe_device_and_precision("auto", CPU, torch.bfloat16, cpu_name="Xeon", cuda_build="12.8")
    assert "built for CUDA 12.8 but sees no GPU" in line
    assert line.endswith("precision bf16 (amp=auto: this CPU has AMX units, where bf16 trains about 2x faster than float32)")


def test_asked_for_precisions_say_so():
    assert describe_device_and_precision("off", CPU, None, cpu_name="x", cuda_build=None).endswith("float32 (amp=off)")
    assert describe_device_and_precision("fp16", CPU, torch.float16, cpu_name="x", cuda_build=None).endswith(
        "precision fp16 (amp=fp16 was asked for)")
