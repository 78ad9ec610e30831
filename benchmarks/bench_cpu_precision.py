"""Model step speed on the CPU: NCHW vs channels_last (NHWC), float32 vs bf16 autocast.

Decides foodlib's CPU defaults (``amp="auto"`` -> bf16 on AMX CPUs, ``channels_last=True``).
Synthetic batches of 64, AdamW step included; prints img/s (median of 4 timed steps after 1 warm-up).

    .venv/bin/python benchmarks/bench_cpu_precision.py 2    # torch threads
"""
import time, torch, sys
from foodlib.models import create_model
torch.set_num_threads(int(sys.argv[1]))
for name, size in [("smallcnn", 48), ("smallcnn", 64), ("resnet18", 112)]:
    m = create_model(name)
    head = torch.nn.Linear(m.embedding_dim, 10)
    opt = torch.optim.AdamW(list(m.parameters())+list(head.parameters()))
    y = torch.randint(0,10,(64,))
    res = {}
    for cl in [False, True]:
        fmt = torch.channels_last if cl else torch.contiguous_format
        m.to(memory_format=fmt)
        x = torch.randn(64,3,size,size).contiguous(memory_format=fmt)
        for amp in [None, torch.bfloat16]:
            ts=[]
            for i in range(5):
                t=time.time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                    l = torch.nn.functional.cross_entropy(head(m(x)).float(), y)
                opt.zero_grad(); l.backward(); opt.step()
                ts.append(time.time()-t)
            res[f"{'NHWC' if cl else 'NCHW'}-{'bf16' if amp else 'fp32'}"] = round(64/sorted(ts[1:])[1], 1)
    print(name, size, "threads", sys.argv[1], res, "img/s", flush=True)
