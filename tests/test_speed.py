"""Speed settings: the probe and its cache, compile and BN folding, the benchmark's own pieces."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segexp.models import UNet
from segexp.performance import Mode, probe, runtime, speed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed
from benchmarks import bench, bounds, reference  # noqa: E402

SHAPE = (2, 3, 32, 32)
AUTO = {"channels_last": "auto", "compile": "false"}


def tiny_net() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, features=[4, 8], batch_norm=True)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "speed").glob("*.json"))


def test_explicit_settings_probe_nothing(tmp_path):
    start = time.perf_counter()
    choice = speed.resolve(
        "32-true", {"channels_last": True, "compile": False}, tiny_net(), SHAPE, tmp_path
    )
    assert (choice.precision, choice.channels_last, choice.compile) == ("32-true", True, False)
    assert choice.figures == {"speed.source": "explicit"}
    assert not (tmp_path / "speed").exists() and time.perf_counter() - start < 0.5


def test_auto_probes_once_then_reads_the_cache(tmp_path, any_load_is_idle):
    net = tiny_net()
    first = speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    assert first.figures["speed.source"] == "probe"
    assert len(cache_files(tmp_path)) == 1
    measured = {
        k.removeprefix("speed.img_s."): float(v)
        for k, v in first.figures.items()
        if k.startswith("speed.img_s.")
    }
    assert "32-true/contiguous" in measured and "32-true/channels_last" in measured
    best = max(measured, key=measured.get)
    assert Mode(first.precision, first.channels_last).name == best
    again = speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    assert again.figures["speed.source"] == "cache"
    assert (again.precision, again.channels_last) == (first.precision, first.channels_last)
    # another input shape is another model shape: probed and cached on its own
    speed.resolve("auto", AUTO, net, (2, 3, 64, 64), tmp_path)
    assert len(cache_files(tmp_path)) == 2


def test_a_probe_sharing_the_cpu_is_used_but_not_cached(tmp_path, monkeypatch):
    net = tiny_net()
    # real load: one busy process per core the probe may use
    load = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(runtime.usable_cores())
    ]
    try:
        time.sleep(0.5)
        loaded = speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    finally:
        for busy in load:
            busy.kill()
            busy.wait()
    assert loaded.figures["speed.source"] == "probe (contended)", loaded.figures
    assert float(loaded.figures["speed.contended"].split()[2]) > speed.CONTENDED_SHARE
    assert f"speed.img_s.{Mode(loaded.precision, loaded.channels_last).name}" in loaded.figures
    assert not any(
        "img_s" in speed.load_cache(f) and speed.load_cache(f)["img_s"]
        for f in cache_files(tmp_path)
    )
    monkeypatch.setattr(speed, "CONTENDED_SHARE", math.inf)  # the machine may be loaded anyway
    idle = speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    assert idle.figures["speed.source"] == "probe" and "speed.contended" not in idle.figures
    assert speed.resolve("auto", AUTO, net, SHAPE, tmp_path).figures["speed.source"] == "cache"


PROBE_WHEN_TOLD = """
import sys, time
from pathlib import Path
import torch
from segexp.models import UNet
from segexp.performance import speed
torch.set_num_threads(1)  # a sweep job's share of the cores
speed.CONTENDED_SHARE = float("inf")  # the machine may be loaded anyway: the turns are tested
torch.manual_seed(0)
net = UNet(3, 1, features=[4, 8], batch_norm=True)
go = Path(sys.argv[1])
Path(sys.argv[3]).touch()  # imported, built: ready
while not go.exists():
    time.sleep(0.005)
choice = speed.resolve("auto", {"channels_last": "auto", "compile": "false"}, net, (2, 3, 32, 32),
                       sys.argv[2])
print(choice.figures["speed.source"])
"""


def test_parallel_jobs_probe_one_at_a_time_and_share_the_figures(tmp_path):
    go = tmp_path / "go"
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", PROBE_WHEN_TOLD, str(go), str(tmp_path), str(tmp_path / f"{i}")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both start probing together, as a sweep's first jobs do
    sources = sorted(job.communicate(timeout=120)[0].strip() for job in jobs)
    # unserialized, both would probe, beside each other
    assert sources == ["cache", "probe"], sources
    assert speed.load_cache(cache_files(tmp_path)[0])["img_s"]


@pytest.mark.parametrize("fastest", ["32-true/channels_last", "bf16-mixed/contiguous"])
def test_auto_follows_the_measurement_not_the_cpu_flags(tmp_path, fastest):
    net = tiny_net()
    path = tmp_path / "speed" / f"{speed.cache_key(net, SHAPE, torch.device('cpu'))}.json"
    # the cache keeps modes by name, as caches written before `Mode` have them
    modes = [
        f"{p}/{layout}" for p in speed.CPU_PRECISIONS for layout in ("contiguous", "channels_last")
    ]
    speed.save_cache(path, {"img_s": {m: 9.0 if m == fastest else 3.0 for m in modes}})
    choice = speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    assert Mode(choice.precision, choice.channels_last).name == fastest
    assert choice.figures["speed.choice"] == fastest
    assert choice.figures["speed.source"] == "cache"
    # an explicit precision narrows the choice to that precision's layouts
    pinned = speed.resolve("32-true", AUTO, net, SHAPE, tmp_path)
    assert pinned.precision == "32-true"
    assert pinned.channels_last == (fastest == "32-true/channels_last")


def test_probe_leaves_the_net_and_the_random_stream_alone(tmp_path):
    net = tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    speed.resolve("auto", AUTO, net, SHAPE, tmp_path)
    assert torch.equal(torch.rand(3), expected)  # seeded training stays reproducible
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(("speedup", "images", "on"), [(1.3, 10**6, True), (1.3, 50, False)])
def test_compile_auto_weighs_speedup_against_compile_time(tmp_path, speedup, images, on):
    if not speed.compiler_available():
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    net = tiny_net()
    path = tmp_path / "speed" / f"{speed.cache_key(net, SHAPE, torch.device('cpu'))}.json"
    mode = "32-true/contiguous"
    entry = {"img_s": {mode: 100.0}, "compile": {mode: {"seconds": 60.0, "speedup": speedup}}}
    speed.save_cache(path, entry)
    performance = {"channels_last": False, "compile": "auto"}
    choice = speed.resolve("32-true", performance, net, SHAPE, tmp_path, run_images=images)
    assert choice.compile is on, choice.figures
    assert choice.figures["speed.compile_speedup"] == f"{speedup:.2f}"


@pytest.mark.slow  # torch.compile of a net costs ~25 s on 2 cores
def test_compiled_net_trains_to_the_same_loss_and_saves_plain_keys():
    if not speed.compiler_available():
        pytest.skip("no C++ compiler: inductor cannot compile on this CPU")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    losses = []
    for compiled in (False, True):
        net = runtime.compile_net(tiny_net()) if compiled else tiny_net()
        optimizer = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            loss = net(x).sigmoid().mean()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    # checkpoints of a compiled net load into an eager one: the same keys, no `_orig_mod.`
    assert net.state_dict().keys() == tiny_net().state_dict().keys()
    tiny_net().load_state_dict(net.state_dict())


def test_bn_folded_eval_net_gives_the_same_logits():
    net = tiny_net()
    net.train()(torch.randn(SHAPE))  # running stats away from their initial 0 / 1
    x = torch.randn(SHAPE)
    folded = runtime.fuse_for_eval(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded(x), net.eval()(x), atol=1e-5)


def concatenating_forward(net: UNet, x: torch.Tensor) -> torch.Tensor:
    """UNet.forward as written in the papers: each decoder on cat([up, skip])."""
    skips = []
    for encoder in net.encoders:
        skips.append(x := encoder(x))
        x = net.pool(x)
    x = net.bottleneck(x)
    for up, decoder, skip in zip(net.ups, net.decoders, reversed(skips), strict=True):
        x = decoder(torch.cat([up(x), skip], dim=1))
    return net.head(x)


def saved_for_backward_bytes(forward) -> tuple[torch.Tensor, int]:
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return out, sum(storages.values())


def test_unet_training_keeps_no_concatenated_skip_yet_computes_the_same():
    torch.manual_seed(0)
    net = UNet(3, 1, [8, 16, 32], batch_norm=True).train()
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out, split_bytes = saved_for_backward_bytes(lambda: net(x))
    out.square().mean().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.load_state_dict(state)  # the same BatchNorm running stats for the second pass
    net.zero_grad()
    reference, cat_bytes = saved_for_backward_bytes(lambda: concatenating_forward(net, x))
    reference.square().mean().backward()
    assert torch.allclose(out, reference, atol=1e-5)
    for grad, p in zip(grads, net.parameters(), strict=True):
        assert torch.allclose(grad, p.grad, rtol=1e-4, atol=1e-6)
    skips = 4 * 2 * (8 * 64 * 64 + 16 * 32 * 32)  # bytes of the skip tensors, float32
    assert cat_bytes - split_bytes >= 0.9 * skips
    with torch.no_grad():  # eval keeps the concatenating form (which fuse_for_eval folds)
        assert torch.allclose(net.eval()(x), concatenating_forward(net, x), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # so does 16-bit: one rounding, not two
        out, autocast_bytes = saved_for_backward_bytes(lambda: net.train()(x))
        reference, autocast_cat_bytes = saved_for_backward_bytes(
            lambda: concatenating_forward(net, x)
        )
    assert autocast_bytes == autocast_cat_bytes and torch.equal(out, reference)


def test_loader_settings_keep_small_cpus_in_process():
    assert runtime.loader_settings("cpu", cores=2) == {
        "num_workers": 0,
        "persistent_workers": False,
        "pin_memory": False,
    }
    gpu = runtime.loader_settings("cuda", cores=16)
    assert gpu["pin_memory"] and gpu["persistent_workers"] and gpu["num_workers"] == 8


def test_flags_reject_typos():
    assert speed.parse_flag("True", "compile") is True and speed.parse_flag("auto", "x") == "auto"
    with pytest.raises(ValueError, match="compile='fast'"):
        speed.parse_flag("fast", "compile")


def test_bench_parses_its_own_last_line():
    summary = {"vs_reference": 3.14159, "auto_vs_best": 1.0, "compile_speedup": math.nan}
    text = f"some row   1.0\nbench: stale=1\n{bench.format_summary(summary)}\n"
    parsed = bench.parse_summary(text)
    assert parsed["vs_reference"] == 3.14 and parsed["auto_vs_best"] == 1.0
    assert math.isnan(parsed["compile_speedup"]) and "stale" not in parsed


def test_reference_port_matches_the_reference_model_and_loss():
    net = reference.ReferenceUNet()
    assert sum(p.numel() for p in net.parameters()) == 7_763_041  # the reference U-Net's count
    p = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])
    t = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # 1 - (2 * 1.5 + 1) / (1.75 + 2 + 1)
    assert reference.ReferenceDiceLoss()(p, t).item() == pytest.approx(1 - 4 / 4.75)
    # the commit the port was read from: a full git object id, not a branch that moves
    assert re.fullmatch(r"[0-9a-f]{40}", reference.COMMIT)


def test_probe_extrapolates_a_fixed_plus_per_pixel_step_time():
    sample = (16, 3, 256, 256)
    n0, n1 = probe.probe_batches(sample)
    assert probe.probe_shape(sample)[2:] == (128, 128) and (n0, n1) == (1, probe.PROBE_BATCH)
    fixed, per_image = 0.5, 0.1  # seconds per step, per 128 x 128 image
    img_s = probe.extrapolate(fixed + per_image * n0, fixed + per_image * n1, (n0, n1), sample)
    # the real step: the same fixed cost plus 16 images of 4x the pixels
    assert img_s == pytest.approx(16 / (fixed + per_image * 16 * 4))
    assert probe.probe_batches((2, 3, 32, 32)) == (2, 2)  # small enough to time as it is


def test_bench_summary_compares_auto_with_the_reference_and_the_best():
    reference_name = "reference (fp32, its loop)"
    img_s = {reference_name: 2.0, "32-true/contiguous": 3.0, "32-true/channels_last": 4.0}
    img_s.update({"bf16-mixed/contiguous": 5.0, "bf16-mixed/channels_last": 6.0})
    auto, fp32 = speed.Choice("bf16-mixed", True, False), speed.Choice("32-true", False, False)
    race = bench.RaceFigures(
        img_s, reference_name, "bf16-mixed/channels_last", auto, fp32, math.nan
    )
    runs = {"auto": bench.RunFigures(steady=5.0, e2e=4.0, rss_mb=2048.0, choice="")}
    data = bench.DataFigures([], loader_img_s=50.0, gflop=10.0)
    bounds = bench.Bounds({"fp32": 100.0, "bf16": 200.0}, {"ACTIVE": 1.0, "PASSIVE": 2.0})
    summary = bench.summarize(bounds, runs, data, race)
    assert summary["vs_reference"] == 3.0 and summary["fp32_vs_reference"] == 1.5
    assert summary["vs_reference_e2e"] == 2.0 and summary["auto_vs_best"] == 1.0
    assert summary["peak_share"] == pytest.approx(10 * 6 / 200)
    assert summary["loader_margin"] == 10.0 and summary["rss_gb"] == 2.0
    assert summary["omp_passive_speedup"] == 2.0 and math.isnan(summary["compile_speedup"])


def test_bench_omp_probe_runs_a_step(capsys):
    exec(bounds.OMP_PROBE, {})  # the script each OpenMP-policy process runs
    assert float(capsys.readouterr().out.split()[-1]) > 0
