import torch

from bdbench.defenses.adversarial import linf_pgd


def test_linf_pgd_reaches_the_corner_of_the_ball_for_a_linear_objective_and_stays_in_range():
    images = torch.tensor([[0.5, 0.99, 0.01, 0.3]])
    w = torch.tensor([1.0, 1.0, -1.0, -2.0])
    generator = torch.Generator().manual_seed(0)
    adversarial = linf_pgd(lambda x: (x * w).sum(), images, eps=0.1, step_size=0.03, steps=10, generator=generator)
    # The maximiser of a linear objective over the ball intersected with [0, 1] is its corner.
    assert torch.allclose(adversarial, torch.tensor([[0.6, 1.0, 0.0, 0.2]]), atol=1e-6)
    assert not adversarial.requires_grad
    one_step = linf_pgd(lambda x: (x * w).sum(), images, eps=0.1, step_size=0.03, steps=1)
    assert torch.allclose(one_step, torch.tensor([[0.53, 1.0, 0.0, 0.27]]), atol=1e-6)  # no random start
