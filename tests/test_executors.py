"""Executors: the same rows whichever runs the grid, each victim trained once, crash safety."""

import copy
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_GRID
from test_runner import kill_mid_grid_then_resume

from bdbench import run_grid
from bdbench.attacks import AttackWorkshop
from bdbench.errors import ConfigError
from bdbench.executors.base import Resources, available_cpus, run_staged
from bdbench.executors.ray_cluster import stored_artifacts
from bdbench.grid import expand, load_grid
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache

from plugin_helpers import python_env

METRICS = ["experiment_id", "status", "error", "clean_acc", "asr", "robust_acc", "der", "clean_acc_before",
           "asr_before", "robust_acc_before", "clean_budget", "torch_threads"]


def _grid_with_a_failing_attack() -> dict:
    grid = copy.deepcopy(TINY_GRID)
    # A surrogate's settings are read only when the attack learns its trigger, inside the experiment (in
    # the worker), so an unknown surrogate model fails there; grid settings the data set cannot take
    # (a patch outside the image) are refused before any experiment starts.
    grid["attacks"].append({"name": "trojannn", "surrogate": {"model": "no-such-model"}})
    return grid


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    """The reference: the grid run in this process with one torch thread, as each worker below has."""
    out = tmp_path_factory.mktemp("local")
    return run_grid(_grid_with_a_failing_attack(), out=out, threads=1, progress=False)


def _victims_trained(rows) -> int:
    return int((rows.status.eq("ok") & ~rows.victim_cached.astype(bool)).sum())


def test_local_reference_has_a_failed_attack_and_goes_on(local_rows):
    assert len(local_rows) == 6 and local_rows.status.tolist().count("error") == 2
    failed = local_rows[local_rows.status == "error"]
    assert failed.error.str.contains("unknown model 'no-such-model'").all()
    assert _victims_trained(local_rows) == 2 and (local_rows.torch_threads == 1).all()


def test_process_workers_give_the_local_rows_and_train_each_victim_once(tmp_path, local_rows):
    rows = run_grid(_grid_with_a_failing_attack(), out=tmp_path, executor="process", workers=2, threads=1,
                    progress=False)
    assert rows[METRICS].equals(local_rows[METRICS])
    assert _victims_trained(rows) == 2 and len(list((tmp_path / "cache" / "victims").glob("*.safetensors"))) == 2


def test_ray_workers_give_the_local_rows(tmp_path, local_rows):
    pytest.importorskip("ray", reason="the ray executor needs the optional extra: pip install 'bdbench[ray]'")
    import ray

    rows = run_grid(_grid_with_a_failing_attack(), out=tmp_path, executor="ray", workers=2, threads=1,
                    progress=False)
    assert not ray.is_initialized()  # the local cluster the run started is shut down
    assert rows[METRICS].equals(local_rows[METRICS])
    # Victims trained on Ray workers came back to the driver's cache and were reused there.
    assert _victims_trained(rows) == 2 and len(list((tmp_path / "cache" / "victims").glob("*.safetensors"))) == 2


def test_followers_start_only_after_their_victim_is_trained():
    grid = load_grid(TINY_GRID, ["seeds=[0,1]"])
    specs = expand(grid)  # 4 victims x 2 defenses
    events, running = [], []

    def submit(spec, shared):
        events.append(("start", spec.victim_key, shared))
        running.append(spec)
        return spec.experiment_id

    def finished(handles):
        return [handles[0]]  # the oldest finishes first

    def collect(handle):
        spec = next(s for s in running if s.experiment_id == handle)
        events.append(("done", spec.victim_key, None))
        return {"experiment_id": handle}, f"victim {spec.victim_key}"

    rows = list(run_staged(specs, submit, finished, collect, max_in_flight=2))
    assert sorted(r["experiment_id"] for r in rows) == sorted(s.experiment_id for s in specs)
    for victim in {s.victim_key for s in specs}:
        starts = [i for i, e in enumerate(events) if e[:2] == ("start", victim)]
        first_done = events.index(("done", victim, None))
        assert len(starts) == 2 and starts[0] < first_done < starts[1]
        assert events[starts[0]][2] is None and events[starts[1]][2] == f"victim {victim}"
    in_flight = max(sum(1 if e[0] == "start" else -1 for e in events[:i + 1]) for i in range(len(events)))
    assert in_flight == 2


def test_concurrent_workers_learn_a_shared_artifact_once(tmp_path):
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough that both workers ask while it is being built
        return {"trigger": torch.ones(1, 8, 8)}

    results = []

    def worker():
        workshop = AttackWorkshop(seed=0, cache=ArtifactCache(tmp_path), dataset_key="digits")
        results.append(workshop.learned("uap", {"eps": 0.1}, build))

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(results) == 2 and torch.equal(results[0]["trigger"], results[1]["trigger"])


def test_ray_driver_sends_a_lead_what_the_folder_holds_for_it(tmp_path):
    spec = expand(load_grid(TINY_GRID))[0]
    cache = ArtifactCache(tmp_path)
    mine = AttackWorkshop(seed=derive_seed(spec.seed, "attack"), cache=cache, dataset_key=spec.dataset.model_dump_json())
    other_seed = AttackWorkshop(seed=derive_seed(spec.seed + 1, "attack"), cache=cache,
                                dataset_key=spec.dataset.model_dump_json())
    mine.learned("uap", {}, lambda: {"t": torch.zeros(2)})
    other_seed.learned("uap", {}, lambda: {"t": torch.ones(2)})
    assert len(stored_artifacts(cache, spec)) == 1
    cache.save_tensors("victims", spec.victim_key, {"w": torch.ones(3)}, {"spec": "x"})
    sent = stored_artifacts(cache, spec)
    assert sorted(kind for kind, _ in sent) == ["attacks", "victims"]
    assert torch.equal(sent[("victims", spec.victim_key)][0]["w"], torch.ones(3))


def test_executor_options_are_checked(tmp_path):
    assert Resources(workers=2).threads_per_experiment == max(1, available_cpus() // 2)
    assert Resources(workers=64, threads=3).threads_per_experiment == 3
    with pytest.raises(ConfigError, match="use --executor process"):
        run_grid(TINY_GRID, out=tmp_path, workers=2, progress=False)
    with pytest.raises(ConfigError, match="needs --executor ray"):
        run_grid(TINY_GRID, out=tmp_path, executor="process", ray_address="head:6379", progress=False)
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        run_grid(TINY_GRID, out=tmp_path, executor="dask", progress=False)
    with pytest.raises(ConfigError, match="--workers must be at least 1"):
        run_grid(TINY_GRID, out=tmp_path, executor="process", workers=0, progress=False)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists worker processes through /proc (Linux)")
def test_process_executor_kill_minus_nine_mid_grid_then_resume(tmp_path, tiny_grid):
    tiny_grid["seeds"] = [0, 1]
    tiny_grid["training"]["epochs"] = 15  # slow enough to be killed mid-grid
    workers = kill_mid_grid_then_resume(tmp_path, tiny_grid, "--executor", "process", "--workers", "2",
                                        at_kill=lambda proc: _children(proc.pid))
    assert workers, "the driver had no worker processes"
    # They died with the driver (by the time the resumed run above finished, at the latest).
    assert not any(_alive(pid) for pid in workers), "worker processes outlived the killed driver"


def test_process_workers_log_as_the_driver_does(tmp_path, tiny_grid):
    """`bdbench run` logs at INFO; its spawned workers do too, so a defense's info lines reach the console."""
    (tmp_path / "byo_chatty_plugin.py").write_text(textwrap.dedent('''
        import logging
        import os

        from bdbench.defenses import DEFENSES, Defense, DefenseKind, DefenseOutcome

        @DEFENSES.register("chatty")
        class Chatty(Defense):
            """Test-only input detector that flags nothing and says where it ran."""

            kind = DefenseKind.INPUT_DETECTION

            def run(self, context):
                logging.getLogger("byo_chatty_plugin").info("chatty ran in process %d", os.getpid())
                return DefenseOutcome(input_detector=lambda x: (x.new_zeros(len(x)), x.new_zeros(len(x)).bool()),
                                      threshold=0.5)
        '''))
    tiny_grid.update(attacks=[{"name": "badnets", "patch_size": 2}], defenses=["chatty"], plugins=["byo_chatty_plugin"])
    tiny_grid["training"]["epochs"] = 1
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(tiny_grid))
    command = [sys.executable, "-m", "bdbench", "run", str(tmp_path / "grid.yaml"), "--out", str(tmp_path / "out"),
               "--executor", "process", "--workers", "1", "--threads", "1"]
    with subprocess.Popen(command, env=python_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as driver:
        _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr[-2000:]
    said = [line for line in stderr.splitlines() if line.startswith("chatty ran in process ")]
    assert len(said) == 1, stderr[-2000:]
    assert int(said[0].rsplit(" ", 1)[1]) != driver.pid  # a worker's line, not the driver's
