"""Federated attacks (`bdbench.federated.attacks`): DBA's trigger parts, model replacement's scaling and Neurotoxin's
masked steps against hand-computed cases, their place in a federation's rounds and checkpoints, the grid's
`client_attack`, and (effect tests) each implanting its backdoor against FedAvg on digits."""

from __future__ import annotations

import pytest
import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.workshop import AttackWorkshop
from bdbench.errors import ConfigError
from bdbench.federated import FederatedConfig
from bdbench.federated.attacks import (
    CLIENT_ATTACKS,
    CraftContext,
    MaliciousClients,
    bottom_mask,
    build_client_attack,
    grid_shape,
    split_footprint,
    trigger_footprint,
)
from bdbench.federated.simulation import client_shares, poison_shares, run_federation
from bdbench.grid import expand, load_grid
from bdbench.models import create_model, with_normalization

from effects import test_seed


def _prepared(digits, name: str, **params):
    attack = ATTACKS.build(name, params)
    attack.prepare(digits, 7, AttackWorkshop(seed=0, device=torch.device("cpu"), cache=None, dataset_key="digits"))
    return attack


# ---------------------------------------------------------------- DBA

def test_grid_shape_is_the_most_square_split():
    assert [grid_shape(p) for p in (1, 2, 3, 4, 6, 9)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]


def test_a_4x4_patch_splits_into_four_2x2_quadrants_whose_union_is_the_trigger(digits):
    attack = _prepared(digits, "badnets", patch_size=4)  # bottom-right of 8x8: rows and columns 4..7
    footprint = trigger_footprint(attack, (1, 8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:, 4:] = True
    assert torch.equal(footprint, expected)
    parts = split_footprint(footprint, 4)
    quadrants = [(slice(4, 6), slice(4, 6)), (slice(4, 6), slice(6, 8)), (slice(6, 8), slice(4, 6)),
                 (slice(6, 8), slice(6, 8))]
    for part, (rows, cols) in zip(parts, quadrants):
        want = torch.zeros(8, 8, dtype=torch.bool)
        want[rows, cols] = True
        assert torch.equal(part, want)
    assert torch.equal(torch.stack(parts).sum(0), expected.long())  # disjoint, and together the global trigger


def test_a_3x3_patch_splits_unevenly_and_a_checkerboard_keeps_only_its_own_pixels(digits):
    square = split_footprint(trigger_footprint(_prepared(digits, "badnets", patch_size=3), (1, 8, 8)), 4)
    assert [int(p.sum()) for p in square] == [4, 2, 2, 1]  # rows 5-6 | 7, columns 5-6 | 7
    board = _prepared(digits, "badnets", patch_size=3, pattern="checkerboard", color=255)
    footprint = trigger_footprint(board, (1, 8, 8))
    # the black squares of the checkerboard change a white image: the footprint is the whole 3x3 patch
    assert int(footprint.sum()) == 9 and bool(footprint[5:, 5:].all())


def test_each_dba_attacker_stamps_its_own_part_and_the_test_set_carries_the_whole_trigger(digits):
    attack = _prepared(digits, "badnets", patch_size=4)
    config = FederatedConfig(clients=6, malicious=4, client_attack="dba")
    dba = build_client_attack(config)
    shares = client_shares(digits.y_train, config, 0)
    x, y, poisoned = poison_shares(digits, shares, config.malicious_ids, attack, 0.5, 7, 0, dba)
    assert poisoned > 0
    parts = split_footprint(trigger_footprint(attack, (1, 8, 8)), 4)
    for index, client in enumerate(config.malicious_ids):
        rows = shares[client]
        changed = (x[rows] != digits.x_train[rows]).any(dim=1)  # (n, 8, 8)
        hit = changed.any(dim=(1, 2))
        assert hit.sum() > 0
        # every changed pixel lies in the attacker's own part; relabelled samples are exactly the stamped ones
        assert not (changed & ~parts[index]).any()
        assert torch.equal(y[rows][hit], torch.full((int(hit.sum()),), 7))
    benign = torch.cat([shares[c] for c in range(4, 6)])
    assert torch.equal(x[benign], digits.x_train[benign])
    triggered = attack.triggered_test_set(digits, 7)
    assert bool((triggered.x[:, :, 4:, 4:] == 255).all())  # the global trigger at test time


def test_dba_refuses_fewer_attackers_than_parts_and_attacks_that_poison_their_own_way(digits):
    with pytest.raises(ConfigError, match="dba cuts the trigger into 4 parts, one per attacker, but the federation "
                                          "has 2 malicious clients; set dba parts to at most 2"):
        build_client_attack(FederatedConfig(clients=6, malicious=2, client_attack="dba"))
    with pytest.raises(ConfigError, match=r"cannot cut a 1x1 trigger into 2x2 parts"):
        split_footprint(trigger_footprint(_prepared(digits, "badnets", patch_size=1), (1, 8, 8)), 4)


# ---------------------------------------------------------------- scaling

def test_scaling_multiplies_the_update_by_gamma_and_defaults_to_n_over_eta():
    update = torch.tensor([0.5, -1.0, 2.0])
    context = CraftContext(per_round=10, server_lr=0.5)
    assert CLIENT_ATTACKS.build("scaling", {"gamma": 3.0}).craft(update, context).tolist() == [1.5, -3.0, 6.0]
    assert CLIENT_ATTACKS.build("scaling").craft(update, context).tolist() == [10.0, -20.0, 40.0]  # 10 / 0.5
    once = CLIENT_ATTACKS.build("scaling", {"gamma": 3.0, "rounds": [4]})
    assert once.craft(update, CraftContext(10, 0.5, round=3)).tolist() == [0.5, -1.0, 2.0]  # not its round
    assert once.craft(update, CraftContext(10, 0.5, round=4)).tolist() == [1.5, -3.0, 6.0]
    with pytest.raises(ConfigError, match="scaling round 12 is after the federation's last round 10"):
        build_client_attack(FederatedConfig(rounds=10, client_attack={"name": "scaling", "rounds": [12]}))


def test_only_malicious_participants_updates_are_crafted():
    malicious = MaliciousClients(CLIENT_ATTACKS.build("scaling", {"gamma": 2.0}), [1, 4], CraftContext(3, 1.0))
    updates = torch.tensor([[1.0, 1.0], [2.0, 3.0], [5.0, 7.0]])
    crafted = malicious.craft(updates, torch.tensor([0, 1, 3]), 1)  # client 1 is malicious, 0 and 3 are not
    assert crafted.tolist() == [[1.0, 1.0], [4.0, 6.0], [5.0, 7.0]]
    assert updates.tolist() == [[1.0, 1.0], [2.0, 3.0], [5.0, 7.0]]  # the trained updates are left as they were


# ---------------------------------------------------------------- Neurotoxin

def test_neurotoxin_masks_the_largest_coordinates_of_the_last_global_update():
    step = torch.tensor([0.1, -5.0, 0.0, 3.0, -0.2, 0.05, 1.0, 0.0, 0.0, 0.3])
    # top 20% of 10 coordinates = the 2 of largest magnitude: -5.0 (index 1) and 3.0 (index 3)
    assert bottom_mask(step, 0.2).tolist() == [1, 0, 1, 0, 1, 1, 1, 1, 1, 1]
    neurotoxin = CLIENT_ATTACKS.build("neurotoxin", {"top_ratio": 0.2})
    assert neurotoxin.step_mask() is None  # nothing seen yet: the first round trains unmasked
    neurotoxin.observe(step)
    malicious = MaliciousClients(neurotoxin, [2], CraftContext(3, 1.0))
    masks = malicious.step_masks(torch.tensor([0, 2, 5]), 10, torch.device("cpu"))
    assert masks.tolist() == [[1] * 10, [1, 0, 1, 0, 1, 1, 1, 1, 1, 1], [1] * 10]
    assert malicious.step_masks(torch.tensor([0, 5]), 10, torch.device("cpu")) is None  # no attacker this round


def test_a_neurotoxin_attacker_update_is_zero_on_the_masked_coordinates(digits):
    """Two rounds of a federation: in round 2 the attacker's update (weight decay included) is exactly zero on
    the top 5% coordinates of round 1's global update, and a benign client's is not."""
    from bdbench.federated.aggregation import SERVER_DEFENSES
    from bdbench.federated.clients import ClientTrainer, LocalSGD
    from bdbench.federated.simulation import Federation, _flat

    config = FederatedConfig(clients=3, malicious=[1], rounds=2, local_epochs=1, batch_size=32, client_lr=0.1,
                             weight_decay=1e-3, client_attack={"name": "neurotoxin"})
    net = _template(digits, width=8)
    federation = Federation(config, SERVER_DEFENSES.build("fedavg"), net, 0, torch.device("cpu"),
                            build_client_attack(config))
    shares = client_shares(digits.y_train, config, 0)
    trainer = ClientTrainer(net, digits.x_train, digits.y_train, torch.device("cpu"))
    local = LocalSGD(1, 32, 0.1, weight_decay=1e-3)
    before = _flat({n: w.unsqueeze(0) for n, w in federation.weights.items()}, federation.names)[0]
    federation.run_round(trainer, shares, local)
    after = _flat({n: w.unsqueeze(0) for n, w in federation.weights.items()}, federation.names)[0]
    masked = bottom_mask(after - before, 0.05) == 0
    assert int(masked.sum()) == int(0.05 * len(after))
    captured = {}
    train = trainer.train

    def spy(start, plans, config_, masks, vectorised):
        captured["start"], captured["trained"] = start, train(start, plans, config_, masks, vectorised)
        return captured["trained"]

    trainer.train = spy  # type: ignore[method-assign]
    federation.run_round(trainer, shares, local)
    updates = (_flat(captured["trained"], federation.names) - _flat(captured["start"], federation.names))
    assert torch.count_nonzero(updates[1][masked]) == 0  # client 1, the attacker
    assert torch.count_nonzero(updates[1][~masked]) > 0.5 * int((~masked).sum())
    assert torch.count_nonzero(updates[0][masked]) > 0.5 * int(masked.sum())  # a benign client moves there


def test_neurotoxin_carries_its_estimate_through_a_checkpoint(digits, tmp_path):
    from bdbench.store import ArtifactCache, StoredCheckpoint

    attack = _prepared(digits, "badnets", patch_size=3)
    config = FederatedConfig(clients=4, malicious=1, rounds=3, local_epochs=1, batch_size=32, client_lr=0.05,
                             checkpoint_every=1, client_attack={"name": "neurotoxin", "top_ratio": 0.1})

    def run(**kwargs):
        return run_federation(config, ("fedavg", {}), digits, attack, 0.5, 7, _template(digits, width=8), 0,
                              torch.device("cpu"), **kwargs)

    whole = run()
    cache = ArtifactCache(tmp_path)
    run(checkpoint=StoredCheckpoint(cache, "federated", "k"), stop_after=2)
    assert "client_attack.neurotoxin.last_step" in StoredCheckpoint(cache, "federated", "k").load()
    resumed = run(checkpoint=StoredCheckpoint(cache, "federated", "k"))
    assert resumed.resumed_from == 2
    for (n, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


# ---------------------------------------------------------------- the grid

FED_GRID = {"dataset": "digits", "model": {"name": "cnn-small", "width": 8, "norm": "group"},
            "attacks": ["none", {"name": "badnets", "patch_size": 4}], "poison_rates": [0.5], "target_label": 7,
            "seeds": [0], "federated": {"clients": 6, "malicious": 4, "rounds": 2, "local_epochs": 1,
                                        "batch_size": 32, "client_attack": "dba"}}


def test_a_grid_client_attack_is_checked_named_in_rows_and_keys_the_victim(tmp_path):
    from bdbench.runner import run_grid

    with pytest.raises(ConfigError, match="unknown federated client attack 'dbb'"):
        load_grid({**FED_GRID, "federated": {**FED_GRID["federated"], "client_attack": "dbb"}})
    with pytest.raises(ConfigError, match="scaling' parameter 'gamma'"):
        load_grid({**FED_GRID, "federated": {**FED_GRID["federated"], "client_attack": {"name": "scaling",
                                                                                        "gamma": -1}}})
    with pytest.raises(ConfigError, match="dba parts to at most 2"):
        load_grid({**FED_GRID, "federated": {**FED_GRID["federated"], "malicious": 2}})
    plain = {**FED_GRID, "federated": {k: v for k, v in FED_GRID["federated"].items() if k != "client_attack"}}
    benign, attacked = expand(load_grid(FED_GRID))
    plain_benign, plain_attacked = expand(load_grid(plain))
    # the attacked federation is another model; the benign one (no client runs the attack) is the same model
    assert attacked.victim_key != plain_attacked.victim_key and benign.victim_key == plain_benign.victim_key
    assert "vs dba" in attacked.describe() and "vs" not in benign.describe()
    rows = run_grid(FED_GRID, out=tmp_path, progress=False)
    assert list(rows.status) == ["ok", "ok"]
    assert rows.fed_client_attack.isna().tolist() == [True, False] and rows.fed_client_attack[1] == "dba"


# ---------------------------------------------------------------- effects

def _template(digits, width: int = 16):
    torch.manual_seed(test_seed())
    return with_normalization(create_model("cnn-small", 10, 1, 8, width=width, norm="group"), digits.mean, digits.std)


def _late_asr(digits, malicious: int, client_attack, share: float = 0.5, patch: int = 4, rounds: int = 8) -> float:
    """Eight clients of digits, `malicious` of them poisoning `share` of their non-target samples with a BadNets
    patch (target 7) under FedAvg: the mean ASR of the last three rounds (single rounds swing)."""
    attack = _prepared(digits, "badnets", patch_size=patch)
    config = FederatedConfig(clients=8, malicious=malicious, rounds=rounds, local_epochs=2, batch_size=16,
                             client_lr=0.05, client_momentum=0.9, client_attack=client_attack)
    curve = run_federation(config, ("fedavg", {}), digits, attack, share, 7, _template(digits), test_seed(),
                           torch.device("cpu")).curve
    return sum(point["asr"] for point in curve[-3:]) / 3


def test_dba_neurotoxin_and_scaling_each_implant_the_backdoor_against_fedavg(digits, effect):
    """The clean baseline: the same federation with nothing poisoned (share 0), scored with the same trigger."""
    baseline = _late_asr(digits, 4, None, share=0.0)
    effect.check("clean-model ASR of the global trigger", baseline, "<", 0.2)
    effect.check("DBA (4 attackers, 4 parts) ASR", _late_asr(digits, 4, "dba"), ">", baseline + 0.5)
    effect.check("Neurotoxin (4 attackers) ASR", _late_asr(digits, 4, "neurotoxin"), ">", baseline + 0.5)
    # one attacker: poisoning alone is diluted by seven benign clients; scaled by n / eta = 8 it replaces the model
    alone = _late_asr(digits, 1, None, share=0.2)
    scaled = _late_asr(digits, 1, "scaling", share=0.2)
    effect.check("scaling (1 attacker, gamma 8) ASR", scaled, ">", baseline + 0.5)
    effect.check("scaling's ASR gain over the same attacker unscaled", scaled - alone, ">", 0.2)
