"""FLTrust (Cao et al., NDSS 2021) against a hand-computed round, and its root set held out of the clients'
shares in a real federation."""

from __future__ import annotations

import pytest
import torch

from bdbench.errors import ConfigError
from bdbench.federated import SERVER_DEFENSES, FederatedConfig, RoundContext
from bdbench.federated.fltrust import trust_scores
from bdbench.federated.split import hold_out


def _context(server_update: torch.Tensor | None) -> RoundContext:
    return RoundContext(1, 10, 3, torch.Generator().manual_seed(0), server_update)


def test_trust_is_the_relu_of_the_cosine_with_the_server_update():
    g0 = torch.tensor([3.0, 4.0])
    updates = torch.tensor([[6.0, 8.0], [-3.0, -4.0], [4.0, -3.0], [1.0, 0.0]])
    assert trust_scores(updates, g0).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.6])


def test_fltrust_gives_an_opposite_update_no_weight_and_rescales_the_others_to_the_server_norm():
    g0 = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm 5
    updates = torch.tensor([[30.0, 40.0],    # cos 1, norm 50 -> (3, 4), weight 1
                            [-6.0, -8.0],    # cos -1 -> weight 0
                            [0.5, 0.0]], dtype=torch.float64)  # cos 0.6, norm 0.5 -> (5, 0), weight 0.6
    aggregate = SERVER_DEFENSES.build("fltrust", {}).aggregate(updates, torch.ones(3), _context(g0))
    expected = (1.0 * torch.tensor([3.0, 4.0]) + 0.6 * torch.tensor([5.0, 0.0])) / 1.6
    assert torch.allclose(aggregate, expected.double())
    # the attacker's scale does not matter: ten times the opposite update is still ignored
    updates[1] *= 10
    assert torch.allclose(SERVER_DEFENSES.build("fltrust", {}).aggregate(updates, torch.ones(3), _context(g0)),
                          expected.double())


def test_fltrust_leaves_the_model_where_no_update_agrees_with_the_server():
    g0 = torch.tensor([1.0, 0.0])
    aggregate = SERVER_DEFENSES.build("fltrust", {}).aggregate(torch.tensor([[-1.0, 0.0], [0.0, 2.0]]),
                                                                torch.ones(2), _context(g0))
    assert aggregate.tolist() == [0.0, 0.0]


def test_fltrust_without_a_server_update_is_refused():
    with pytest.raises(ConfigError, match="fltrust needs the server's update on its root set"):
        SERVER_DEFENSES.build("fltrust", {}).aggregate(torch.ones(2, 3), torch.ones(2), _context(None))


def test_the_root_set_is_held_out_and_a_root_set_too_large_is_refused():
    root, rest = hold_out(50, 10, seed=1)
    assert len(root) == 10 and len(rest) == 40
    assert sorted(torch.cat([root, rest]).tolist()) == list(range(50))
    with pytest.raises(ConfigError, match="a root set of 50 samples does not fit a training set of 50"):
        hold_out(50, 50, seed=1)


def test_an_fltrust_federation_trains_its_root_set_which_no_client_holds(digits, monkeypatch):
    """A real two-round federation: the server update reaches the rule every round, and the root rows are in
    no client's share."""
    from bdbench.federated import simulation
    from bdbench.models import create_model, with_normalization

    seen_updates, seen_shares = [], []
    real_round = simulation.Federation.run_round

    def spy(self, trainer, shares, local, root=None):
        seen_shares.append((shares, root))
        return real_round(self, trainer, shares, local, root)

    real_aggregate = SERVER_DEFENSES.get("fltrust").aggregate

    def spy_aggregate(self, updates, sizes, context):
        seen_updates.append(context.server_update)
        return real_aggregate(self, updates, sizes, context)

    monkeypatch.setattr(simulation.Federation, "run_round", spy)
    monkeypatch.setattr(SERVER_DEFENSES.get("fltrust"), "aggregate", spy_aggregate)
    torch.manual_seed(0)
    net = with_normalization(create_model("cnn-small", 10, 1, 8, width=8, norm="group"), digits.mean, digits.std)
    config = FederatedConfig(clients=4, rounds=2, local_epochs=1, batch_size=16, client_lr=0.05)
    result = simulation.run_federation(config, ("fltrust", {"root_size": 40}), digits, None, 0.0, 0, net, 0,
                                       torch.device("cpu"))
    assert len(seen_updates) == 2 and all(u is not None and u.abs().sum() > 0 for u in seen_updates)
    shares, root = seen_shares[0]
    assert len(root) == 40
    held = set(torch.cat(shares).tolist())
    assert not held & set(root.tolist()) and len(held) + 40 == len(digits.y_train)
    assert result.curve[-1]["clean_acc"] > 0.1
