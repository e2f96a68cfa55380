"""`bdbench triggers`: the picture of clean and triggered test images with PSNR/SSIM per attack."""

import yaml
from click.testing import CliRunner
from PIL import Image

from bdbench.cli import main


def test_triggers_cli_draws_one_row_per_attack_with_psnr_and_ssim(tmp_path):
    out = tmp_path / "triggers.png"
    result = CliRunner().invoke(main, ["triggers", "--attack", "badnets", "--attack", "{name: sig, delta: 40}",
                                       "--dataset", "digits", "--out", str(tmp_path), "-o", str(out), "--images", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("badnets: PSNR ") and "SSIM" in lines[0]
    assert lines[1].startswith("sig (delta=40): PSNR ")
    width, height = Image.open(out).size
    assert width > height > 100  # two rows of three (clean, triggered) pairs


def test_triggers_cli_reads_a_grid_and_refuses_nothing_to_draw(tmp_path, tiny_grid):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid))
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(main, ["triggers", str(config), "--out", str(tmp_path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("badnets (patch_size=2): PSNR") and out.is_file()  # `none` has no row
    result = CliRunner().invoke(main, ["triggers", "-o", str(out)])
    assert result.exit_code == 2 and "needs a CONFIG or at least one --attack" in result.output
    result = CliRunner().invoke(main, ["triggers", "--attack", "nope", "-o", str(out)])
    assert result.exit_code == 2 and "unknown attack 'nope'" in result.output


def test_triggers_dataset_takes_a_mapping_as_set_dataset_does(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y_train=np.arange(40) % 2,
             x_test=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), y_test=np.arange(20) % 2)
    out = tmp_path / "npz.png"
    result = CliRunner().invoke(main, ["triggers", "--attack", "blended", "--dataset",
                                       f"{{name: npz, path: {data}, allow_hflip: true}}", "--out", str(tmp_path),
                                       "-o", str(out), "--images", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("blended: PSNR") and Image.open(out).size[0] > 0
    result = CliRunner().invoke(main, ["triggers", "--attack", "blended", "--dataset", "{name: npz, pth: x.npz}",
                                       "-o", str(out)])
    assert result.exit_code == 2 and "pth" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["triggers", "--attack", "blended", "--dataset", "{path: x.npz}", "-o", str(out)])
    assert result.exit_code == 2 and "--dataset" in result.output and "needs a 'name'" in result.output


def test_triggers_draws_a_victim_learned_trigger_from_the_grids_cached_victim_or_leaves_it_out(tmp_path,
                                                                                                 tiny_grid):
    import sqlite3

    from bdbench.runner import run_grid

    tiny_grid.update(attacks=[{"name": "inputaware", "mask_epochs": 2}, {"name": "badnets", "patch_size": 2}],
                     defenses=["none"], training={"epochs": 4, "batch_size": 64, "lr": 0.05})
    run_grid(tiny_grid, out=tmp_path / "run", progress=False)
    with sqlite3.connect(tmp_path / "run" / "results.sqlite") as db:
        psnr = db.execute("SELECT psnr FROM experiments WHERE attack = 'inputaware'").fetchone()[0]
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(tiny_grid))
    out = tmp_path / "grid.png"
    # The grid's cached victim holds the generator it trained: the row shows that trigger, as the result row does.
    result = CliRunner().invoke(main, ["triggers", str(config), "--out", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"inputaware (mask_epochs=2): PSNR {psnr:.2f} dB"), (psnr, result.output)
    # No cached victim: the row is left out with the reason, never drawn with an untrained generator.
    result = CliRunner().invoke(main, ["triggers", str(config), "--out", str(tmp_path / "empty"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("badnets (patch_size=2): PSNR")
    assert "inputaware (mask_epochs=2): not drawn: its trigger is learned with the victim" in result.output
    result = CliRunner().invoke(main, ["triggers", "--attack", "{name: inputaware, mask_epochs: 2}", "--dataset",
                                       "digits", "--out", str(tmp_path / "run"), "-o", str(out)])
    assert result.exit_code == 2 and "give the grid that trained its victim" in result.output
