"""Source-specific backdoor: the trigger flips only images of chosen source classes.

Base attack: TaCT (Tang, Wang, Tang and Zhang, "Demon in the Variant: Statistical Analysis of DNNs
for Robust Backdoor Contamination Detection", USENIX Security 2021). Poisoned samples are
source-class images with the trigger, labelled as the target; cover samples are images of other
(cover) classes that carry the trigger under their true labels, so that the trigger alone does
not decide the class and defenses that look for a source-agnostic shortcut miss it. Both kinds
carry the trigger, so both are in the poison mask; the cover samples are also in the cover mask, so
that the runner scores detectors on the poisoned (payload) samples alone too (`det_payload_tpr`).

Variants from CASSOCK (Wang, Gao, Fu, Zhang, Zhang, Susilo and Liu, "CASSOCK: Viable Backdoor
Attacks against DNN in the Wall of Source-Specific Backdoor Defenses", AsiaCCS 2023; the issue
calls it Cao et al., the paper's first author is Shang Wang):

- `trans` (CASSOCK-Trans), heterogeneous transparency: the poisoned samples carry the trigger
  opaque (`poison_opacity` 1.0) and the cover samples a more transparent copy (`cover_opacity`
  0.5), which eases the conflict between poisoned and cover samples that costs TaCT its success
  rate. Which side gets the transparent copy is our reading of the paper's description; both
  opacities are parameters.
- `cont` (CASSOCK-Cont), trigger content from the target class: the paper "extracts salient
  features of the attacker-targeted label to generate a trigger, entangling the trigger features
  with normal features of the label". Here the trigger is the patch of the mean target-class
  training image at the window of highest positive attribution (input x gradient of the target
  logit, a clean surrogate's) summed over the window: the target's own strokes that most raise its
  score. Plain gradient magnitude is not enough: on digits it peaks in empty background (ink there
  would break the digit), and that patch of the mean image is nearly black, an invisible trigger on
  a black corner (a 3x3 patch of 0-25 of 255 on mnist5k, ASR 0.04).
- `trans_cont`: both.

The trigger is a square patch (default 3x3, bottom-right) blended at its opacity:
x' = (1 - a m) x + a m p. The default `tact` patch is white. Label modes: all-to-one only (the
sources go to one target); source and cover classes must not include the target.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from bdbench.attacks.base import ATTACKS, Attack, LabelMode, PoisonedTrainingSet, TriggeredTestSet, to_uint8
from bdbench.attacks.workshop import AttackWorkshop, surrogate_options
from bdbench.data import Dataset
from bdbench.errors import ConfigError
from bdbench.params import NonNegativeFloat, PositiveInt, UpToOne

Variant = Literal["tact", "trans", "cont", "trans_cont"]


def salient_target_patch(model: torch.nn.Module, x: torch.Tensor, target: int, size: int) -> torch.Tensor:
    """The (C, size, size) window of the mean image of `x` (uint8 target-class images) where the
    target logit's positive input x gradient attribution, averaged over the images, sums highest."""
    device = next(model.parameters()).device
    xf = x.to(device).float().div(255.0).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xf)[:, target].sum(), xf)
    saliency = (grad * xf).detach().clamp(min=0).mean(dim=(0, 1))  # (H, W)
    window = F.avg_pool2d(saliency[None, None], size, stride=1)[0, 0]
    row, col = divmod(int(window.argmax()), window.shape[1])
    mean_image = xf.detach().mean(0)
    return mean_image[:, row:row + size, col:col + size].cpu()


@ATTACKS.register("source_specific")
class SourceSpecific(Attack):
    """Trigger flips only chosen source classes; covers keep true labels (TaCT; CASSOCK trans/cont variants)."""

    citation = ("Tang, Wang, Tang, Zhang. Demon in the Variant: Statistical Analysis of DNNs for Robust Backdoor "
                "Contamination Detection. USENIX Security 2021. Variants: Wang, Gao, Fu, Zhang, Zhang, Susilo, Liu. "
                "CASSOCK: Viable Backdoor Attacks against DNN in the Wall of Source-Specific Backdoor Defenses. "
                "AsiaCCS 2023.")
    label_modes = ("all2one",)
    single_target_reason = "the source classes are flipped to one target"

    def __init__(self, source_classes: Annotated[Sequence[int], Field(min_length=1)] = (1,),
                 cover_classes: Sequence[int] | None = None, cover_ratio: NonNegativeFloat = 1.0,
                 variant: Variant = "tact", patch_size: PositiveInt = 3,
                 poison_opacity: UpToOne | None = None, cover_opacity: UpToOne | None = None,
                 surrogate: dict[str, Any] | None = None, label_mode: LabelMode = "all2one") -> None:
        super().__init__(label_mode)
        transparent = variant in ("trans", "trans_cont")
        self.poison_opacity = 1.0 if poison_opacity is None else poison_opacity
        self.cover_opacity = (0.5 if transparent else 1.0) if cover_opacity is None else cover_opacity
        self.source_classes = sorted(int(c) for c in source_classes)
        self.cover_classes = None if cover_classes is None else sorted(int(c) for c in cover_classes)
        self.cover_ratio, self.variant, self.patch_size = cover_ratio, variant, patch_size
        self.surrogate = dict(surrogate or {})
        self.patch: torch.Tensor | None = None  # (C, s, s)
        self.seeded_trigger = variant in ("cont", "trans_cont")  # their patch comes from a seeded surrogate

    def check(self, dataset: Dataset, target_label: int) -> None:
        k, s = dataset.num_classes, self.patch_size
        named = self.source_classes + (self.cover_classes or [])
        if any(not 0 <= c < k for c in named) or target_label in named:
            raise ConfigError(f"source_specific source/cover classes must be classes 0..{k - 1} other than the "
                              f"target {target_label}, not sources {self.source_classes}, covers {self.cover_classes}")
        if s > dataset.image_size:
            raise ConfigError(f"source_specific patch_size {s} does not fit {dataset.image_size}x{dataset.image_size} "
                              f"images; use a patch_size of at most {dataset.image_size}")

    def prepare(self, dataset: Dataset, target_label: int, workshop: AttackWorkshop) -> None:
        self.check(dataset, target_label)
        s = self.patch_size
        if self.variant in ("cont", "trans_cont"):
            def build() -> dict[str, torch.Tensor]:
                model = workshop.surrogate(dataset, **surrogate_options(self.surrogate))
                members = dataset.x_train[dataset.y_train == target_label]
                return {"patch": salient_target_patch(model, members, target_label, s)}

            # "saliency" names the window rule, so a patch cached under the earlier rule is not reused.
            params = {"patch_size": s, "target_label": target_label, "surrogate": self.surrogate,
                      "saliency": "positive input x gradient"}
            self.patch = workshop.learned("cassock_content", params, build)["patch"]
        else:
            self.patch = torch.ones(dataset.in_channels, s, s)

    def _stamp(self, x: torch.Tensor, opacity: float) -> torch.Tensor:
        if self.patch is None:
            raise RuntimeError("SourceSpecific.prepare() must run before add_trigger()")
        s = self.patch_size
        x = x.clone()
        region = x[:, :, -s:, -s:]
        x[:, :, -s:, -s:] = (1 - opacity) * region + opacity * self.patch.to(x)
        return x

    def add_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self._stamp(x, self.poison_opacity)

    def _cover_candidates(self, y: torch.Tensor, target_label: int) -> torch.Tensor:
        if self.cover_classes is not None:
            keep = torch.isin(y, torch.tensor(self.cover_classes))
        else:
            keep = ~torch.isin(y, torch.tensor(self.source_classes)) & (y != target_label)
        return torch.nonzero(keep).flatten()

    def poison(self, dataset: Dataset, poison_rate: float, target_label: int,
               generator: torch.Generator) -> PoisonedTrainingSet:
        """`poison_rate` of the training set from the source classes (relabelled to the target) and
        `cover_ratio` times as many cover samples (true labels), all with the trigger."""
        y0 = dataset.y_train
        sources = torch.nonzero(torch.isin(y0, torch.tensor(self.source_classes))).flatten()
        count = min(len(sources), int(round(poison_rate * len(y0))))
        poisoned = sources[torch.randperm(len(sources), generator=generator)[:count]]
        covers = self._cover_candidates(y0, target_label)
        covers = covers[torch.randperm(len(covers), generator=generator)[:min(len(covers), round(self.cover_ratio * count))]]
        x, y = dataset.x_train.clone(), y0.clone()
        x[poisoned] = self.trigger(x[poisoned])
        y[poisoned] = target_label
        x[covers] = to_uint8(self._stamp(x[covers].float().div(255.0), self.cover_opacity))
        mask, cover = torch.zeros(len(y), dtype=torch.bool), torch.zeros(len(y), dtype=torch.bool)
        mask[poisoned] = True
        mask[covers] = True
        cover[covers] = True
        return PoisonedTrainingSet(x, y, mask, cover_mask=cover)

    def triggered_test_set(self, dataset: Dataset, target_label: int) -> TriggeredTestSet:
        """Source-class test images with the trigger; the attack succeeds when they go to the target."""
        keep = torch.isin(dataset.y_test, torch.tensor(self.source_classes))
        clean = dataset.x_test[keep]
        y_true = dataset.y_test[keep]
        return TriggeredTestSet(self.trigger(clean), y_true, torch.full_like(y_true, target_label), x_clean=clean)
