"""Training img/s alone and beside a one-core busy loop, under each CPU thread policy.

Each (policy, condition, batch) cell is a fresh process (OpenMP reads its environment when
torch loads) that times training steps of the UNet of configs/shapes32.yaml (forward +
backward + AdamW on a fixed batch, as bench/train_throughput.py) in fp32. "beside a busy
core" starts `python -c "while True: pass"` first and stops it after. Policies:
  torch default                  torch's own choice: one OpenMP thread per CPU
  OMP_WAIT_POLICY=PASSIVE        the same threads, sleeping instead of spinning at barriers
  OMP_NUM_THREADS=1              one thread, what the README advised on a shared box
  tti.infra.threads                    use_free_cpus(), what the entry points call
Run from the repository root when the machine is otherwise idle (the load is printed):
    python -m bench.busy_core                      # ~5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tti.infra.threads import busy_cpus, use_free_cpus

POLICIES = {
    "torch default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
    "tti.infra.threads": {},
}
BUSY_LOOP = [sys.executable, "-c", "while True: pass"]


def worker(policy: str, batch: int, steps: int, warmup: int, precision: str) -> dict:
    """Time `steps` training steps in this process; the thread policy applied first."""
    if policy == "tti.infra.threads":
        use_free_cpus()
    import statistics

    import torch

    from bench.train_throughput import Trainer, call_ours
    from tti.config.load import load_config
    from tti.infra.precision import amp_dtype
    from tti.models.backbones.unet import UNet

    torch.manual_seed(0)
    model = UNet(load_config("configs/shapes32.yaml").model.unet, 32, context_dim=384)
    device = torch.device("cpu")
    trainer = Trainer(policy, model, call_ours, batch, 32, 14, 384, device,
                      amp_dtype(precision, device))
    for i in range(warmup + steps):
        trainer.step(record=i >= warmup)
    return {"threads": torch.get_num_threads(),
            "img_s": batch / statistics.median(trainer.times)}


def measure(policy: str, busy: bool, batch: int, args) -> dict:
    """One cell, in a fresh process; with `busy`, beside a one-core busy loop."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(POLICIES[policy])
    others = busy_cpus(os.sched_getaffinity(0))  # other engineers' jobs on a shared machine
    loop = subprocess.Popen(BUSY_LOOP) if busy else None
    try:
        if loop:
            time.sleep(0.5)  # the loop is running before the worker looks for free CPUs
        out = subprocess.run([sys.executable, "-m", "bench.busy_core", "--worker", policy,
                              "--batch", str(batch), "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--precision", args.precision],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if loop:
            loop.kill()
            loop.wait()
    return dict(json.loads(out.strip().splitlines()[-1]), others=others)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="32,8", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=4, help="timed steps per cell (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of: "
                   + ", ".join(POLICIES))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one cell
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.steps, args.warmup, args.precision)))
        return
    policies = [s.strip() for s in args.policies.split(",")]
    unknown = [s for s in policies if s not in POLICIES]
    if unknown:
        p.error(f"--policies: unknown {unknown}; choose from {list(POLICIES)}")
    print(f"{os.cpu_count()} CPUs, load average before {os.getloadavg()}, {args.precision}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print("| policy | batch | threads alone / busy | img/s alone | img/s beside a busy core "
          "| busy / alone | CPUs others kept busy before each |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batches.split(",")):
        for policy in policies:
            alone, busy = measure(policy, False, batch, args), measure(policy, True, batch, args)
            print(f"| {policy} | {batch} | {alone['threads']} / {busy['threads']} | "
                  f"{alone['img_s']:.1f} | {busy['img_s']:.1f} | "
                  f"{busy['img_s'] / alone['img_s']:.2f} | "
                  f"{alone['others']:.1f} / {busy['others']:.1f} |", flush=True)
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
