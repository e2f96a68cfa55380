"""Projected gradient ascent on input images within an L-infinity ball (Madry, Makelov, Schmidt,
Tsipras and Vladu, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018): the
adversarial-example routine of the defenses that unlearn adversarial examples (PBE, SAU; NPD has its
authors' signed-step variant with an L2 ball, in `npd.py`), and the loss term that pushes a class's
probability down on them.
"""

from __future__ import annotations

from typing import Callable

import torch


def linf_pgd(objective: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, eps: float,
             step_size: float, steps: int, generator: torch.Generator | None = None,
             stop: Callable[[], bool] | None = None, start_offset: float | None = None,
             clip: bool = True) -> torch.Tensor:
    """Images within `eps` (L-infinity) of `images` (floats in [0, 1]) that maximise `objective`
    (a function of a batch of images to a scalar), by `steps` signed-gradient steps of `step_size`,
    each projected back on the ball and on [0, 1]. With a `generator` the start is uniform in the
    ball (drawn on the CPU, so a seed fixes it on any device); with a `start_offset` it is `images` plus that
    constant on every pixel (SAU's authors start at the corner +eps); with neither it is `images` itself.
    With `clip` False the images are projected on the ball only, not on [0, 1] (SAU's authors leave that
    clamp out). The result is detached; the caller's model is used as it is (its mode and its parameters'
    gradients are left alone). `stop`, asked after each step, ends the ascent early when it returns True
    (what the objective saw at that step decides, e.g. SAU's "every image already shared")."""
    if generator is not None and start_offset is not None:
        raise ValueError("linf_pgd: a random start (generator) or a constant one (start_offset), not both")
    if generator is not None:
        start = torch.rand(images.shape, generator=generator).to(images.device).mul_(2 * eps).sub_(eps)
    elif start_offset is not None:
        start = torch.full_like(images, start_offset).clamp_(-eps, eps)
    else:
        start = torch.zeros_like(images)
    adversarial = images + start
    adversarial = (adversarial.clamp(0.0, 1.0) if clip else adversarial).detach()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        grad, = torch.autograd.grad(objective(adversarial), adversarial)
        with torch.no_grad():
            moved = adversarial + step_size * grad.sign()
            adversarial = torch.min(torch.max(moved, images - eps), images + eps)
            if clip:
                adversarial.clamp_(0.0, 1.0)
        if stop is not None and stop():
            break
    return adversarial.detach()


def log_one_minus_softmax(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """log(1 - softmax(logits)[i, classes[i]]) per row, as the log-sum-exp of the other logits minus that of
    all: exact, and finite where the probability rounds to 1 (NPD's and SAU's unlearning terms)."""
    others = logits.scatter(1, classes.view(-1, 1), float("-inf"))
    return torch.logsumexp(others, 1) - torch.logsumexp(logits, 1)
