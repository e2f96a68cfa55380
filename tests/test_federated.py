"""Federated learning: server aggregation rules against hand-computed cases, Lockdown's masks, the vectorised
clients against one-at-a-time training, splits, the grid's federated section, rows, curves and resuming."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch

from bdbench.errors import ConfigError
from bdbench.federated import SERVER_DEFENSES, FederatedConfig, RoundContext
from bdbench.federated.aggregation import krum_scores
from bdbench.federated.clients import ClientPlan, ClientTrainer, LocalSGD, check_template
from bdbench.federated.config import DirichletSplit
from bdbench.federated.lockdown import consensus, erk_densities, init_masks, prune, prune_ratio, regrow
from bdbench.federated.split import split_dirichlet, split_iid
from bdbench.grid import expand, load_grid
from bdbench.models import create_model, with_normalization

from effects import test_seed


def _context(round_: int = 1) -> RoundContext:
    return RoundContext(round_, 10, 5, torch.Generator().manual_seed(0))


def _aggregate(name: str, updates: list[list[float]], sizes: list[float] | None = None, **params) -> torch.Tensor:
    u = torch.tensor(updates, dtype=torch.float64)
    n = torch.tensor(sizes if sizes is not None else [1.0] * len(u), dtype=torch.float64)
    return SERVER_DEFENSES.build(name, params).aggregate(u, n, _context())


# ---------------------------------------------------------------- aggregation rules, by hand

def test_fedavg_weights_by_samples_or_uniformly():
    # (1*[1, 0] + 3*[5, 4]) / 4 = [4, 3]
    assert _aggregate("fedavg", [[1, 0], [5, 4]], [1, 3]).tolist() == [4.0, 3.0]
    assert _aggregate("fedavg", [[1, 0], [5, 4]], [1, 3], weighting="uniform").tolist() == [3.0, 2.0]


def test_norm_clipping_scales_long_updates_to_the_bound_and_adds_noise_when_asked():
    # [3, 4] has norm 5 -> [1.2, 1.6] at M = 2; [0.6, 0.8] (norm 1) is kept; mean [0.9, 1.2]
    out = _aggregate("clip", [[3, 4], [0.6, 0.8]], max_norm=2.0)
    assert torch.allclose(out, torch.tensor([0.9, 1.2], dtype=torch.float64))
    noisy = _aggregate("clip", [[3, 4], [0.6, 0.8]], max_norm=2.0, noise_std=0.5)
    assert not torch.allclose(noisy, out) and (noisy - out).abs().max() < 3.0


def test_krum_scores_and_picks_the_update_closest_to_its_neighbours():
    updates = [[0.0], [1.0], [2.0], [10.0], [11.0]]
    # n=5, f=1: each score sums the n-f-2 = 2 smallest squared distances to others.
    # 0: 1+4=5; 1: 1+1=2; 2: 1+4=5; 3 (to 11 and 2): 1+64=65; 4 (to 10 and 2): 1+81=82
    scores = krum_scores(torch.tensor(updates, dtype=torch.float64), f=1)
    assert scores.tolist() == [5.0, 2.0, 5.0, 65.0, 82.0]
    assert _aggregate("krum", updates, f=1).tolist() == [1.0]
    # Multi-Krum m=3 averages the three lowest scores: updates 1, 0, 2 -> 1.0; m=4 adds update 3 -> 13/4
    assert _aggregate("krum", updates, f=1, m=3).tolist() == [1.0]
    assert _aggregate("krum", updates, f=1, m=4).tolist() == [13 / 4]


def test_krum_refuses_too_few_clients_for_f():
    with pytest.raises(ConfigError, match=r"krum f=2 needs more than 2f \+ 2 = 6 clients per round"):
        SERVER_DEFENSES.build("krum", {"f": 2}).check(6, 6)


def test_median_and_trimmed_mean_work_coordinate_by_coordinate():
    updates = [[1, 100, -3], [2, -50, 0], [3, 0, 9], [4, 7, 1], [1000, 8, 2]]
    # per coordinate, sorted: [1,2,3,4,1000] [-50,0,7,8,100] [-3,0,1,2,9]
    assert _aggregate("median", updates).tolist() == [3.0, 7.0, 1.0]
    assert _aggregate("median", updates[:4]).tolist() == [2.5, 3.5, 0.5]  # even count: mean of the middle two
    # beta = 0.2 of 5 drops one value at each end: means of [2,3,4], [0,7,8], [0,1,2]
    assert _aggregate("trimmed-mean", updates, beta=0.2).tolist() == [3.0, 5.0, 1.0]
    assert _aggregate("trimmed-mean", updates, beta=0.0).tolist() == torch.tensor(updates, dtype=torch.float64).mean(0).tolist()


def test_rlr_flips_the_learning_rate_where_the_sign_vote_is_below_theta():
    updates = [[1, 1, -1], [1, -1, -1], [1, 1, -1], [1, -1, 1]]
    # sign sums: 4, 0, -2 -> |.| >= 3 only for the first coordinate; mean [1, 0, -0.5]
    out = _aggregate("rlr", updates, theta=3)
    assert out.tolist() == [1.0, -0.0, 0.5]
    assert _aggregate("rlr", updates, theta=2).tolist() == [1.0, -0.0, -0.5]


def test_server_defense_parameters_are_checked_in_one_line():
    with pytest.raises(ConfigError, match="server defense 'trimmed-mean' parameter 'beta'"):
        SERVER_DEFENSES.build("trimmed-mean", {"beta": 0.5})
    with pytest.raises(ConfigError, match="unknown server defense 'krumm'; choose one of"):
        SERVER_DEFENSES.build("krumm", {})


# ---------------------------------------------------------------- Lockdown

def test_erk_keeps_the_overall_density_and_gives_small_layers_more():
    shapes = {"conv": torch.Size([16, 8, 3, 3]), "fc": torch.Size([10, 64]), "bias": torch.Size([10])}
    densities = erk_densities(shapes, 0.25)
    total = sum(math.prod(s) for s in shapes.values())
    kept = sum(densities[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(0.25 * total)
    assert densities["bias"] == 1.0 and densities["fc"] > densities["conv"]  # sum/prod: thin layers denser


def test_lockdown_masks_keep_their_density_through_prune_and_regrow():
    shapes = {"w": torch.Size([6, 5]), "b": torch.Size([40])}
    masks = init_masks(shapes, clients=3, density=0.5, generator=torch.Generator().manual_seed(0), rule="uniform",
                       same=False)
    before = {n: m.reshape(3, -1).sum(1) for n, m in masks.items()}
    assert before["w"].tolist() == [15.0] * 3 and before["b"].tolist() == [20.0] * 3
    weights = {n: torch.randn(3, *s, generator=torch.Generator().manual_seed(1)) for n, s in shapes.items()}
    pruned, removed = prune(masks, weights, ratio=0.2)
    assert removed["w"].tolist() == [3] * 3 and removed["b"].tolist() == [4] * 3  # ceil(0.2 * 15), ceil(0.2 * 20)
    for n in shapes:  # the smallest kept weights went, nothing outside the mask was touched
        for k in range(3):
            dropped = (masks[n][k] - pruned[n][k]).flatten().bool()
            kept = pruned[n][k].flatten().bool()
            assert weights[n][k].flatten()[dropped].abs().max() <= weights[n][k].flatten()[kept].abs().min()
    grads = {n: torch.randn(3, *s, generator=torch.Generator().manual_seed(2)) for n, s in shapes.items()}
    regrown = regrow(pruned, grads, removed)
    for n in shapes:
        assert regrown[n].reshape(3, -1).sum(1).tolist() == before[n].tolist()
        for k in range(3):  # the regrown coordinates are the zeros of largest |gradient|
            new = (regrown[n][k] - pruned[n][k]).flatten().bool()
            still_zero = ~regrown[n][k].flatten().bool()
            assert grads[n][k].flatten()[new].abs().min() >= grads[n][k].flatten()[still_zero].abs().max()


def test_prune_ratio_decays_by_cosine_and_consensus_keeps_what_theta_masks_hold():
    assert prune_ratio(0, 100, 0.2) == pytest.approx(0.2)
    assert prune_ratio(50, 100, 0.2) == pytest.approx(0.1)
    assert prune_ratio(100, 100, 0.2) == pytest.approx(0.0)
    masks = {"w": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])}
    fused = consensus({"w": torch.tensor([5.0, 6.0, 7.0])}, masks, theta=2)
    assert fused["w"].tolist() == [5.0, 6.0, 0.0]


def test_lockdown_refuses_a_theta_above_the_number_of_clients():
    with pytest.raises(ConfigError, match="lockdown theta=20 is more masks than the federation's 10 clients"):
        SERVER_DEFENSES.build("lockdown", {}).check(10, 10)


# ---------------------------------------------------------------- clients and splits

def _digits_template(digits, norm="group"):
    torch.manual_seed(0)
    return with_normalization(create_model("cnn-small", 10, 1, 8, width=8, norm=norm), digits.mean, digits.std)


def test_vectorised_clients_compute_what_one_client_at_a_time_computes(digits):
    net = _digits_template(digits)
    weights = {n: p.detach().unsqueeze(0).expand(3, *p.shape).clone() for n, p in net.named_parameters()}
    trainer = ClientTrainer(net, digits.x_train, digits.y_train, torch.device("cpu"))
    local = LocalSGD(1, 16, 0.05, momentum=0.9, weight_decay=1e-4, crop_padding=1)
    # uneven shares: the third client has fewer steps and must stop updating when they are done
    rows = [torch.arange(0, 64), torch.arange(64, 128), torch.arange(128, 160)]
    plans = [ClientPlan.draw(r, local, seed) for seed, r in enumerate(rows)]
    masks = {n: (torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5).float() for n, w in weights.items()}
    for m in (None, masks):
        together = trainer.train(weights, plans, local, m, vectorised=True)
        apart = trainer.train(weights, plans, local, m, vectorised=False)
        for n in weights:
            assert torch.allclose(together[n], apart[n], atol=1e-5), n
            assert not torch.equal(together[n], weights[n])
        if m is not None:  # masked coordinates never move
            for n in weights:
                assert torch.equal(together[n][m[n] == 0], weights[n][m[n] == 0])
    sums = trainer.gradient_sums(weights, plans, vectorised=True)
    sums_apart = trainer.gradient_sums(weights, plans, vectorised=False)
    assert all(torch.allclose(sums[n], sums_apart[n], atol=1e-5) for n in sums)


def test_a_model_with_batchnorm_statistics_is_refused_for_federated_clients(digits):
    with pytest.raises(ConfigError, match=r"keeps BatchNorm running statistics .* \{name: cnn-small, norm: group\}"):
        check_template(_digits_template(digits, norm="batch"), "cnn-small")


def test_iid_split_is_stratified_and_dirichlet_is_skewed_with_a_minimum(digits):
    y = digits.y_train
    shares = split_iid(y, 5, seed=0)
    assert sorted(torch.cat(shares).tolist()) == list(range(len(y)))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:  # each class within one sample of an even deal
        counts = torch.bincount(y[share], minlength=10)
        assert (counts - torch.bincount(y, minlength=10) / 5).abs().max() <= 1
    skewed = split_dirichlet(y, 5, DirichletSplit(dirichlet=0.1, min_samples=20), seed=0)
    assert sorted(torch.cat(skewed).tolist()) == list(range(len(y)))
    assert min(map(len, skewed)) >= 20
    top_share = max(float(torch.bincount(y[s], minlength=10).max()) / len(s) for s in skewed)
    assert top_share > 0.4  # one class dominates some client's share (IID would be about 0.1)
    with pytest.raises(ConfigError, match="left some client below min_samples=1000"):
        split_dirichlet(y, 5, DirichletSplit(dirichlet=0.1, min_samples=1000), seed=0, attempts=5)


# ---------------------------------------------------------------- the grid's federated section

FED_GRID = {
    "name": "fed-tiny",
    "dataset": "digits",
    "model": {"name": "cnn-small", "width": 8, "norm": "group"},
    "attacks": ["none", {"name": "badnets", "patch_size": 2}],
    "poison_rates": [0.5],
    "target_label": 7,
    "federated": {"clients": 6, "malicious": 2, "rounds": 3, "local_epochs": 1, "batch_size": 32,
                  "client_lr": 0.05, "client_momentum": 0.9, "checkpoint_every": 1,
                  "server_defenses": ["fedavg", {"name": "lockdown", "theta": 3, "alpha0": 0.5}]},
}


def test_the_federated_section_expands_into_one_experiment_per_server_defense():
    specs = expand(load_grid(FED_GRID))
    assert [(s.attack.name, s.federated.server_defense.name) for s in specs] == [
        ("none", "fedavg"), ("none", "lockdown"), ("badnets", "fedavg"), ("badnets", "lockdown")]
    assert len({s.experiment_id for s in specs}) == len({s.victim_key for s in specs}) == 4
    # how often the curve is scored changes the experiment, not the trained global model
    other = expand(load_grid(FED_GRID, ["federated.eval_every=2"]))
    assert other[0].victim_key == specs[0].victim_key and other[0].experiment_id != specs[0].experiment_id
    # where the clients train (in this process or on Ray workers) changes no number: same ids and keys
    on_ray = expand(load_grid(FED_GRID, ["federated.client_workers=2"]))
    assert [(s.experiment_id, s.victim_key) for s in on_ray] == [(s.experiment_id, s.victim_key) for s in specs]
    # a centralized grid's ids do not move because the federated field exists
    centralized = {k: v for k, v in FED_GRID.items() if k != "federated"}
    assert "federated" not in expand(load_grid(centralized))[0]._fields()


@pytest.mark.parametrize(("override", "message"), [
    ("federated.clientz=3", "unknown key 'federated.clientz' in grid spec; valid keys: clients"),
    ("federated.malicious=9", "malicious 9 is not a count of 0..6 clients"),
    ("federated.malicious=[1,1]", "malicious ids"),
    ("model.norm=batch", "keeps BatchNorm running statistics"),
    ("federated.server_defenses=[{name: krum, f: 2}]", "krum f=2 needs more than 2f"),
    ("attacks=[wanet]", "attack wanet controls the victim's training through a hook"),
    ("federated.split={dirichlet: 0}", "federated.split"),
    ("federated.client_workers=0", "federated.client_workers"),
])
def test_a_bad_federated_section_is_one_line_naming_the_problem(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        load_grid(FED_GRID, [override])
    assert "\n" not in str(info.value)


def test_clients_too_small_for_a_batch_are_refused_before_any_work(tmp_path):
    from bdbench.runner import run_grid

    with pytest.raises(ConfigError, match=r"6 IID clients of digits hold 239 training images each, fewer than "
                                          r"federated\.batch_size 300"):
        run_grid(FED_GRID, out=tmp_path, overrides=["federated.batch_size=300"], progress=False)
    assert not (tmp_path / "results.sqlite").exists()


def test_a_federated_grid_runs_into_rows_and_per_round_curves(tmp_path):
    from bdbench.runner import run_grid
    from bdbench.store import load_rounds

    rows = run_grid(FED_GRID, out=tmp_path, progress=False)
    assert list(rows.status) == ["ok"] * 4
    assert list(rows.server_defense) == ["fedavg", "lockdown", "fedavg", "lockdown"]
    assert set(rows.rounds) == {3} and set(rows.fed_clients) == {6} and set(rows.fed_split) == {"iid"}
    fedavg, lockdown = rows.iloc[2], rows.iloc[3]
    # Lockdown sends the values of its masks only: about a quarter of FedAvg's bytes at density 0.25
    assert 0.2 < lockdown.bytes_up / fedavg.bytes_up < 0.35
    assert lockdown.bytes_down / fedavg.bytes_down == pytest.approx(lockdown.bytes_up / fedavg.bytes_up, rel=0.2)
    assert all(r.server_defense_s >= 0 for r in rows.itertuples())
    curves = load_rounds(tmp_path)
    assert len(curves) == 12 and set(curves["round"]) == {1, 2, 3}
    last = curves[(curves.experiment_id == fedavg.experiment_id) & (curves["round"] == 3)].iloc[0]
    assert last.clean_acc == pytest.approx(fedavg.clean_acc) and last.asr == pytest.approx(fedavg.asr)
    # a second run reuses every row
    again = run_grid(FED_GRID, out=tmp_path, progress=False)
    assert list(again.wall_s) == list(rows.wall_s)
    with sqlite3.connect(tmp_path / "results.sqlite") as db:
        assert db.execute("SELECT count(*) FROM federated_rounds").fetchone()[0] == 12


def test_a_killed_federation_resumes_from_its_checkpoint_with_the_same_weights(digits, tmp_path):
    from bdbench.federated.simulation import run_federation
    from bdbench.store import ArtifactCache, StoredCheckpoint

    config = FederatedConfig(clients=4, rounds=4, local_epochs=1, batch_size=32, client_lr=0.05,
                             checkpoint_every=1)
    defense = ("lockdown", {"theta": 2, "alpha0": 0.5})
    whole = run_federation(config, defense, digits, None, 0.0, 0, _digits_template(digits), 0, torch.device("cpu"))
    cache = ArtifactCache(tmp_path)
    run_federation(config, defense, digits, None, 0.0, 0, _digits_template(digits), 0, torch.device("cpu"),
                   checkpoint=StoredCheckpoint(cache, "federated", "k"), stop_after=2)  # "killed" after round 2
    resumed = run_federation(config, defense, digits, None, 0.0, 0, _digits_template(digits), 0,
                             torch.device("cpu"), checkpoint=StoredCheckpoint(cache, "federated", "k"))
    assert resumed.resumed_from == 2
    for (n, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert [e["round"] for e in resumed.curve] == [1, 2, 3, 4]
    assert [e["clean_acc"] for e in resumed.curve] == [e["clean_acc"] for e in whole.curve]


# ---------------------------------------------------------------- effects

def _federate(digits, defense: tuple[str, dict]) -> list[dict]:
    """Six clients of digits, two of them poisoning half their non-target samples with a 3x3 BadNets patch
    (target 7), ten rounds: the per-round curve."""
    from bdbench.attacks import ATTACKS
    from bdbench.attacks.workshop import AttackWorkshop
    from bdbench.federated.simulation import run_federation

    attack = ATTACKS.build("badnets", {"patch_size": 3})
    attack.prepare(digits, 7, AttackWorkshop(seed=0, device=torch.device("cpu"), cache=None, dataset_key="digits"))
    torch.manual_seed(test_seed())
    net = with_normalization(create_model("cnn-small", 10, 1, 8, width=16, norm="group"), digits.mean, digits.std)
    config = FederatedConfig(clients=6, malicious=2, rounds=10, local_epochs=2, batch_size=16, client_lr=0.05,
                             client_momentum=0.9)
    return run_federation(config, defense, digits, attack, 0.5, 7, net, test_seed(), torch.device("cpu")).curve


def test_fedavg_lets_malicious_clients_implant_the_backdoor_and_krum_keeps_it_out(digits, effect):
    """Means over the last three rounds (single rounds of a small federation swing)."""
    fedavg, krum = _federate(digits, ("fedavg", {})), _federate(digits, ("krum", {"f": 1}))

    def late(curve, what):
        return sum(point[what] for point in curve[-3:]) / 3

    effect.check("FedAvg ASR", late(fedavg, "asr"), ">", 0.5)
    effect.check("FedAvg clean accuracy", late(fedavg, "clean_acc"), ">", 0.5)
    effect.check("Krum ASR", late(krum, "asr"), "<", 0.1)
    effect.check("Krum clean accuracy", late(krum, "clean_acc"), ">", 0.4)


def test_a_federated_run_killed_with_minus_nine_resumes_from_its_checkpoint(tmp_path):
    """`bdbench run` killed mid-federation (after its round-2 checkpoint) and run again resumes from the
    checkpoint and stores the row an uninterrupted run stores."""
    import json
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from bdbench.runner import run_grid
    from bdbench.store import load_results

    grid = {**FED_GRID, "attacks": [{"name": "badnets", "patch_size": 2}],
            "federated": {**FED_GRID["federated"], "rounds": 8,
                          "server_defenses": [{"name": "lockdown", "theta": 3, "alpha0": 0.5}]}}
    whole = run_grid(grid, out=tmp_path / "whole", progress=False).iloc[0]
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(grid))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bdbench", "run", str(config), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            infos = list((out / "cache" / "federated").glob("*.json"))
            if infos and json.loads(infos[0].read_text() or "{}").get("round", 0) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "results.sqlite").exists() or load_results(out).empty
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumes after round" in done.stderr
    row = load_results(out).iloc[0]
    assert row.clean_acc == whole.clean_acc and row.asr == whole.asr
    assert [p["clean_acc"] for p in row.round_metrics] == [p["clean_acc"] for p in whole.round_metrics]
    assert not list((out / "cache" / "federated").glob("*.safetensors"))  # the checkpoint went with the finished model
