"""What bounds any trainer on this machine, for `make bench`: peak GFLOP/s, the OpenMP wait
policy, and the peak resident memory of a block of code."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


class PeakRSS:
    """Highest resident set size (MB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.mb, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.mb = max(self.mb, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, rss_mb())


def rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096 / 2**20


def peak_gflops(dtype: torch.dtype, repeats: int = 3) -> float:
    """Best GFLOP/s of warmed-up matmuls (512-2048) and 3x3 convs (64-256 ch, channels-last)."""
    best = 0.0

    def measure(fn, flops):
        nonlocal best
        fn()  # warm-up: oneDNN builds its kernels
        for _ in range(repeats):
            start, count = time.perf_counter(), 0
            while count < 3 or time.perf_counter() - start < 0.2:
                fn()
                count += 1
            best = max(best, flops * count / (time.perf_counter() - start) / 1e9)
        return time.perf_counter() - start

    with torch.no_grad():
        for n in (512, 1024, 2048):
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            if measure(lambda a=a, b=b: a @ b, 2 * n**3) > 2.0:
                break  # emulated dtype: bigger shapes would stall the bench
        for c, size in ((64, 64), (128, 32), (256, 32)):
            conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype)
            conv = conv.to(memory_format=torch.channels_last)
            x = (
                torch.randn(8, c, size, size)
                .to(dtype)
                .contiguous(memory_format=torch.channels_last)
            )
            if measure(lambda conv=conv, x=x: conv(x), 2 * 8 * c * c * 9 * size * size) > 2.0:
                break
    return best


# One fp32 channels-last train step of unet_buda at 1 x 3 x 128 x 128, best of 3, in img/s.
OMP_PROBE = """
import time, torch
from segexp.models import UNet
from segexp.performance import Mode, probe
net = UNet(3, 1, [32, 64, 128, 256, 512], batch_norm=True)
step = probe.train_step(net, (1, 3, 128, 128), torch.device("cpu"), Mode("32-true", True))
step()
times = []
for _ in range(3):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
print(1 / min(times))
"""


def omp_policies(rounds: int = 2) -> dict[str, float]:
    """img/s with OpenMP threads spinning (ACTIVE) vs sleeping (PASSIVE) at barriers.

    Fresh processes, since OpenMP reads the policy once; interleaved, best kept.
    """
    best = {"ACTIVE": 0.0, "PASSIVE": 0.0}
    for _ in range(rounds):
        for policy in best:
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            out = subprocess.run(
                [sys.executable, "-c", OMP_PROBE], env=env, capture_output=True, text=True
            )
            if out.returncode == 0:
                best[policy] = max(best[policy], float(out.stdout.split()[-1]))
    return best
