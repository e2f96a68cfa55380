"""What makes the expensive defenses cheaper (issue 26) and the benchmark that measures it: defense loops
take the trainer's numerics and a pass size chosen by device, and find the same thing that way."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml

from bdbench.defenses import DEFENSES
from bdbench.defenses import anp as anp_module
from bdbench.defenses.anp import AdversarialNeuronPruning
from bdbench.defenses.mmbd import max_margins
from bdbench.defenses.nc import reverse_engineer_triggers
from bdbench.models import MODELS
from bdbench.training import LoopPrecision, TrainConfig, images_per_pass, loop_precision

from defense_fixtures import toy_context, untrained

REPO = Path(__file__).resolve().parents[1]


def test_defense_loops_run_as_the_trainer_would_train_the_victim():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fp32 = loop_precision(TrainConfig(), cpu)
    assert not fp32.bf16 and fp32.memory_format == torch.channels_last  # a layout, not a precision: faster on oneDNN
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    bf16 = loop_precision(TrainConfig(cpu_bfloat16=True), cpu)
    assert bf16.bf16 and bf16.memory_format == torch.channels_last
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert loop_precision(TrainConfig(), cuda).bf16  # CUDA always trains under bfloat16 autocast
    # Small passes on a CPU (cache-sized), big ones on a GPU (a small pass leaves it idle).
    assert images_per_pass(cpu) == 128 and images_per_pass(cuda) == 2048


@dataclass(frozen=True)
class _DefaultLayout(LoopPrecision):
    """float32 loops in the default (contiguous) layout, as before channels-last became the loops' layout."""

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.contiguous_format


def test_float32_loops_in_channels_last_find_what_the_default_layout_finds(badnets, monkeypatch):
    # Channels-last changes the order of the float32 sums, nothing else: the same triggers, margins and masks
    # to rounding, which Adam's normalised steps and ANP's signed noise steps carry into the fourth digit (a layout
    # mix-up, e.g. a permuted image, would move norms by whole units and masks by tenths).
    context = badnets.context(sees_training_set=False)
    layouts = (_DefaultLayout("cpu", False), loop_precision(TrainConfig(), torch.device("cpu")))
    norms = [reverse_engineer_triggers(context.model, context.clean_x, 10, torch.Generator().manual_seed(0),
                                       epochs=2, precision=layout).norms for layout in layouts]
    assert torch.allclose(norms[0], norms[1], rtol=1e-3)
    margins = [max_margins(context.model, 10, (1, 8, 8), torch.Generator().manual_seed(0), restarts=4, steps=20,
                           precision=layout) for layout in layouts]
    assert torch.allclose(margins[0], margins[1], rtol=1e-4)
    masks = []
    for layout in layouts:
        monkeypatch.setattr(anp_module, "loop_precision", lambda config, device, layout=layout: layout)
        neurons = AdversarialNeuronPruning(iterations=20).optimise_masks(context)
        masks.append(torch.cat([m.detach().flatten() for m in neurons.masks]))
    assert torch.allclose(masks[0], masks[1], atol=2e-3)  # the noise's signed steps: a flipped sign near zero
    assert all(p.is_contiguous() for p in context.model.parameters())


def _bf16_context(poisoned):
    context = poisoned.context(sees_training_set=False)
    return replace(context, train_config=context.train_config.model_copy(update={"cpu_bfloat16": True}))


def test_nc_and_mmbd_in_bfloat16_find_the_target_that_float32_finds(badnets, effect):
    # test_nc_flags_the_badnets_target and test_mmbd_finds_the_target_... hold these in float32.
    before = [p.detach().clone() for p in badnets.model.parameters()]
    context = _bf16_context(badnets)
    nc = DEFENSES.build("nc", {}).run(context)
    assert nc.detected and 0 in nc.suspected_targets and len(nc.suspected_targets) <= 2
    effect.check("nc anomaly index in bfloat16", nc.anomaly_index, ">", 2)
    mmbd = DEFENSES.build("mmbd", {}).run(context)
    assert mmbd.detected and mmbd.suspected_targets == (0,)
    effect.check("mmbd -log10 p in bfloat16", mmbd.anomaly_index, ">", mmbd.threshold)
    # The shared model comes back as it was: same weights, default layout.
    assert all(torch.equal(a, b) for a, b in zip(before, badnets.model.parameters()))
    assert all(p.is_contiguous() for p in badnets.model.parameters())


def test_anp_masks_in_bfloat16_follow_the_float32_masks(badnets, effect):
    # On this tiny model 100 ANP iterations leave masks that move with the CPU's kernels even in float32: on an AMD
    # EPYC (AVX-512) and on its AVX2 kernels the float32 runs put different neurons below ANP's 0.2 threshold
    # ({82} against {74, 88, 94}), and the ranks of the bulk of masks (0.7-0.9, near-ties) against bfloat16 correlate
    # 0.58 / 0.69 (the bar 0.8 held only on a Xeon with AMX). What does not move: the mask values correlate
    # (measured 0.85 AVX-512, 0.68 AVX2; independent masks would give about 0) and the lowest masks overlap. Those
    # figures predate the unprojected noise step; with it, AVX2, one thread, seeds 0/1/2: 0.60/0.83/0.77.
    anp = AdversarialNeuronPruning(iterations=100)
    masks = []
    for context in (badnets.context(sees_training_set=False), _bf16_context(badnets)):
        neurons = anp.optimise_masks(context)
        masks.append(torch.cat([m.detach().flatten() for m in neurons.masks]))
    fp32, bf16 = masks
    effect.check("correlation of ANP mask values, bfloat16 vs float32", torch.corrcoef(torch.stack(masks))[0, 1],
                 ">", 0.5)
    # Since the noise step follows the authors' code (no projection back to [-eps, eps]), more masks fall low and
    # the lowest three need not share a neuron (AVX2, one thread, seeds 0/1/2: 0/1/2 shared); the eight lowest
    # shared 5/5/6, where independent masks would share 8 x 8 / 96 = 0.67 on average.
    shared = set(fp32.argsort()[:8].tolist()) & set(bf16.argsort()[:8].tolist())
    effect.check("shared among the 8 lowest masks", len(shared), ">=", 3)


def test_the_cost_benchmark_prints_each_defense_over_its_victims_training_time(tmp_path, tiny_grid):
    tiny_grid["defenses"] = ["none", {"name": "ft", "epochs": 1}, {"name": "mmbd", "restarts": 2, "steps": 3}]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_grid))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "benchmarks" / "defense_cost.py"), "--grid", str(config),
               "--out", str(tmp_path / "out"), "--json", str(tmp_path / "cost.json")]
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "victim training" in first.stdout and "(trained now)" in first.stdout
    result = json.loads((tmp_path / "cost.json").read_text())
    ft, mmbd = "ft(epochs=1)", "mmbd(restarts=2, steps=3)"  # rows are named by variant
    assert set(result["rows"]) == {"none", ft, mmbd}
    for name in (ft, mmbd):
        row = result["rows"][name]
        assert row["status"] == "ok" and row["defense_s"] > 0 and row["defense_cpu_s"] > 0
        assert row["peak_rss_mb"] > 0 and row["maxrss_mb"] > 0
        assert 0 < row["defense_start_rss_mb"] <= row["peak_rss_mb"]
        assert f"\n{name} " in first.stdout
    assert result["rows"][mmbd]["detected"] is not None
    # A second run reuses the victim in --out for the defenses and times a fresh training of it.
    second = subprocess.run([*command, "--defenses", "ft"], capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "trained again now" in second.stdout and json.loads((tmp_path / "cost.json").read_text())[
        "rows"][ft]["victim_cached"]


@pytest.mark.parametrize("architecture", MODELS.names())
def test_the_bfloat16_loops_run_on_every_architecture_and_leave_the_model_as_it_was(architecture, digits):
    model = untrained(architecture, digits)
    context = toy_context(model, digits.x_train[:16], digits.y_train[:16], num_classes=10, crop_padding=1,
                          train_config=TrainConfig(epochs=1, batch_size=8, cpu_bfloat16=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cheap = {"nc": {"epochs": 1, "unlearning_epochs": 1}, "mmbd": {"restarts": 2, "steps": 2},
             "anp": {"iterations": 2, "batch_size": 8}}
    for name, params in cheap.items():
        outcome = DEFENSES.build(name, params).run(context)
        if outcome.model is not None:
            with torch.no_grad():
                assert torch.isfinite(outcome.model.eval()(digits.x_test[:4].float() / 255)).all(), name
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), name
        assert all(p.is_contiguous() for p in model.parameters()), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the refusal on a machine without CUDA")
def test_the_gpu_check_refuses_without_cuda_and_names_its_four_benchmarks(tmp_path):
    script = str(REPO / "benchmarks" / "gpu_check.py")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([sys.executable, script, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                             env=env, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1 and "no CUDA device" in refused.stderr
    assert not (tmp_path / "out").exists()  # nothing was started
    listed = subprocess.run([sys.executable, script, "--dry-run"], capture_output=True, text=True, env=env, check=True)
    commands = [line.split() for line in listed.stdout.splitlines() if not line.startswith("#")]
    assert [Path(argv[1]).name for argv in commands] == ["trainer_vs_dataloader.py", "nc_batched_vs_per_label.py",
                                                          "vectorised_seeds.py", "defense_cost.py"]
    assert all(Path(argv[1]).is_file() for argv in commands)
    assert ["--device", "cuda"] == commands[0][2:4] == commands[1][2:4] == commands[2][2:4]


def test_the_batched_nc_benchmark_starts():
    # gpu_check.py runs it; its imports must name what defenses.nc exports (--help stops after them).
    script = str(REPO / "benchmarks" / "nc_batched_vs_per_label.py")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
