"""Plugins: components from entry points and from a grid's `plugins:` modules, in the driver and in
`process` and `ray` workers; where each entry comes from; clashes and broken plugins as one line.

Entry points are read once per process, so the tests that install a distribution (a `.dist-info` folder on
PYTHONPATH, see plugin_helpers) run bdbench in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from bdbench import plugins
from bdbench.defenses import DEFENSES
from bdbench.errors import ConfigError
from bdbench.grid import expand, load_grid

from plugin_helpers import EXAMPLE_SRC, python_env, run_bdbench, shrinkpad_distribution, write_distribution


def test_list_shows_an_installed_plugin_with_its_source(tmp_path):
    dist = shrinkpad_distribution(tmp_path)
    table = run_bdbench(["list", "defenses"], dist, EXAMPLE_SRC)
    assert table.returncode == 0, table.stderr
    line = next(line for line in table.stdout.splitlines() if line.startswith("shrinkpad"))
    assert "[model_repair] ShrinkPad (Li et al. 2021)" in line and line.endswith("(plugin: bdbench-shrinkpad 0.1.0)")
    assert "plugin:" not in next(line for line in table.stdout.splitlines() if line.startswith("nc "))
    listed = json.loads(run_bdbench(["list", "defenses", "--format", "json"], dist, EXAMPLE_SRC).stdout)
    sources = {entry["name"]: entry["source"] for entry in listed}
    assert sources["shrinkpad"] == "bdbench-shrinkpad 0.1.0" and sources["nc"] == "bdbench"
    assert next(e for e in listed if e["name"] == "shrinkpad")["citation"].startswith("Li, Zhai, Wu")


def test_an_entry_point_named_like_a_builtin_is_one_line(tmp_path):
    dist = write_distribution(tmp_path, "bad-plugin", "2.0", {"bdbench.defenses": {"ft": "bdbench_shrinkpad:ShrinkPad"}})
    result = run_bdbench(["list", "defenses"], dist, EXAMPLE_SRC)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: defense 'ft' from bad-plugin 2.0 clashes with bdbench's built-in defense 'ft'; register it under "
        "another name"]


def test_two_plugins_with_one_name_and_a_broken_plugin_are_one_line(tmp_path):
    first = shrinkpad_distribution(tmp_path / "a")
    second = write_distribution(tmp_path / "b", "other-plugin", "1.0",
                                {"bdbench.defenses": {"shrinkpad": "bdbench_shrinkpad.defense:ShrinkPad"}})
    # The same class under the same name from two distributions is still two claims on one name... unless it
    # is the same object: both entry points here load bdbench_shrinkpad's one ShrinkPad class.
    assert run_bdbench(["list", "defenses"], first, second, EXAMPLE_SRC).returncode == 0
    clash = write_distribution(tmp_path / "c", "other-plugin", "1.0",
                               {"bdbench.defenses": {"shrinkpad": "bdbench.defenses.ft:FineTuning"}})
    result = run_bdbench(["list", "defenses"], first, clash, EXAMPLE_SRC)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "defense 'shrinkpad' from " in result.stderr and "clashes with the one from " in result.stderr
    broken = write_distribution(tmp_path / "d", "broken-plugin", "0.3", {"bdbench.attacks": {"x": "no_such_module:X"}})
    result = run_bdbench(["list", "attacks"], broken)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: plugin broken-plugin 0.3: entry point x = no_such_module:X in group bdbench.attacks cannot be loaded "
        "(ModuleNotFoundError: No module named 'no_such_module'); fix or uninstall that distribution "
        "(pip uninstall broken-plugin)"]


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A plugin module on sys.path that registers a defense `ft-once`; removed again afterwards."""
    (tmp_path / "byo_test_plugin.py").write_text(textwrap.dedent('''
        from bdbench.defenses import DEFENSES
        from bdbench.defenses.ft import FineTuning

        @DEFENSES.register("ft-once")
        class FineTuneOnce(FineTuning):
            """Fine-tuning for one epoch (a test's plugin module)."""

            def __init__(self, lr: float = 0.01) -> None:
                super().__init__(epochs=1, lr=lr)
        '''))
    (tmp_path / "byo_clashing_plugin.py").write_text(textwrap.dedent('''
        from bdbench.defenses import DEFENSES
        from bdbench.defenses.ft import FineTuning

        @DEFENSES.register("nc")
        class OtherCleanse(FineTuning):
            """Not Neural Cleanse."""
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "byo_test_plugin"
    for name in ("byo_test_plugin", "byo_clashing_plugin"):
        sys.modules.pop(name, None)
        plugins._IMPORTED.discard(name)
    if "ft-once" in DEFENSES:
        DEFENSES.unregister("ft-once")


def test_a_grid_imports_its_plugin_modules_and_ids_do_not_depend_on_them(plugin_module, tiny_grid):
    with pytest.raises(ConfigError, match="unknown defense 'ft-once'"):
        load_grid({**tiny_grid, "defenses": ["none", "ft-once"]})
    grid = load_grid({**tiny_grid, "defenses": ["none", "ft-once"], "plugins": [plugin_module]})
    specs = expand(grid)
    assert grid.plugins == [plugin_module] and all(s.plugins == (plugin_module,) for s in specs)
    assert DEFENSES.entry("ft-once").source == f"module {plugin_module}"
    # The plugin list reaches workers with each spec but is no part of its identity.
    plain = expand(load_grid(tiny_grid))
    with_plugins = expand(load_grid({**tiny_grid, "plugins": [plugin_module]}))
    assert [s.experiment_id for s in plain] == [s.experiment_id for s in with_plugins]
    assert "plugins" not in json.loads(json.dumps(specs[0].model_dump(mode="json")))


def test_grid_plugin_errors_are_one_line(plugin_module, tiny_grid):
    with pytest.raises(ConfigError) as missing:
        load_grid({**tiny_grid, "plugins": ["byo_no_such_plugin"]})
    assert str(missing.value) == (
        "plugin module 'byo_no_such_plugin' cannot be imported (ModuleNotFoundError: No module named "
        "'byo_no_such_plugin'); install its package (pip install -e PATH) or put its folder on PYTHONPATH")
    with pytest.raises(ConfigError, match=r"^defense 'nc' from module byo_clashing_plugin clashes with bdbench's "
                                          r"built-in defense 'nc'; register it under another name$"):
        load_grid({**tiny_grid, "plugins": ["byo_clashing_plugin"]})
    with pytest.raises(ConfigError, match="plugins: 3 is not a list of module names"):
        load_grid({**tiny_grid, "plugins": 3})


def test_list_imports_a_plugin_module(plugin_module, tmp_path):
    result = run_bdbench(["list", "defenses", "--plugin", plugin_module], tmp_path)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("ft-once") and line.endswith(f"(plugin: module {plugin_module})")
               for line in result.stdout.splitlines())


# The example plugin (an entry point) and a grid plugin module in the built-in `model-defenses` grid, beside
# published defenses, under every executor, in a fresh driver.
_DRIVER = textwrap.dedent('''
    import json, sys
    from bdbench import run_grid

    if __name__ == "__main__":
        overrides, out, executor = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
        rows = run_grid("model-defenses", out=out, overrides=overrides, executor=executor, workers=1, threads=1,
                        progress=False)
        print(rows.to_json(orient="records"))
    ''')
ROW_KEYS = ["experiment_id", "attack", "defense", "defense_variant", "defense_kind", "status", "error", "clean_acc",
            "asr", "robust_acc", "der", "clean_acc_before", "asr_before", "clean_budget"]


def test_the_example_plugin_runs_in_model_defenses_with_the_same_rows_under_local_process_and_ray(tmp_path):
    executors = ["local", "process"]
    try:
        import ray  # noqa: F401

        executors.append("ray")
    except ImportError:
        pass  # the process executor still shows plugins reaching spawned workers
    dist = shrinkpad_distribution(tmp_path / "site")
    module_dir = tmp_path / "modules"
    module_dir.mkdir()
    (module_dir / "byo_grid_plugin.py").write_text(textwrap.dedent('''
        from bdbench.defenses import DEFENSES
        from bdbench.defenses.ft import FineTuning

        @DEFENSES.register("ft-once")
        class FineTuneOnce(FineTuning):
            """Fine-tuning for one epoch (a grid's plugin module)."""

            def __init__(self, lr: float = 0.01) -> None:
                super().__init__(epochs=1, lr=lr)
        '''))
    (tmp_path / "driver.py").write_text(_DRIVER)
    # model-defenses as published, shrunk to one BadNets victim of one epoch (the grid's data, model and budget).
    overrides = {"attacks": ["badnets"], "seeds": [0], "training.epochs": 1, "plugins": ["byo_grid_plugin"],
                 "defenses": ["none", "ft", "shrinkpad", {"name": "shrinkpad", "shrink": 2}, "ft-once"]}
    rows = {}
    for executor in executors:
        result = subprocess.run([sys.executable, str(tmp_path / "driver.py"), json.dumps(overrides),
                                 str(tmp_path / executor), executor], env=python_env(dist, EXAMPLE_SRC, module_dir),
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, result.stderr[-2000:]
        rows[executor] = [{k: row.get(k) for k in ROW_KEYS} for row in json.loads(result.stdout.splitlines()[-1])]
    local = rows["local"]
    assert len(local) == 5 and all(row["status"] == "ok" for row in local), local
    assert [row["defense_variant"] for row in local] == ["none", "ft", "shrinkpad", "shrinkpad(shrink=2)", "ft-once"]
    assert all(row["attack"] == "badnets" and row["clean_budget"] == 200 for row in local), local  # 5% of 4,000
    for executor in executors[1:]:
        assert rows[executor] == local, executor
