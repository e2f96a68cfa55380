"""A user's own trained model, for evaluation: safetensors weights plus a registered architecture.

Pickled checkpoints (.pt, .pth, .pkl, .ckpt, .bin) are refused, whatever their name says:
unpickling runs any code the file names, and backdoored models come from untrusted places.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bdbench.errors import ArtifactError, ConfigError
from bdbench.models import Normalize, NormalizedClassifier, create_model, with_normalization

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".tar")


def _looks_like_safetensors(path: Path) -> bool:
    """A little-endian u64 header length that fits in the file, then the header's JSON '{'."""
    with path.open("rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size and head[8:] == b"{"


def _refuse_pickle(path: Path) -> None:
    with path.open("rb") as handle:
        head = handle.read(2)
    # torch.save writes a zip archive (PK..) since 1.6, a bare pickle (0x80, protocol) before.
    pickled = head == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
    if path.suffix.lower() in PICKLE_SUFFIXES or (pickled and not _looks_like_safetensors(path)):
        raise ArtifactError(
            f"{path}: a pickled checkpoint; bdbench never unpickles model files, since unpickling runs "
            f"whatever code the file names. Convert it once, in an environment you trust: "
            f"safetensors.torch.save_file(torch.load('{path}'), 'model.safetensors') "
            f"(save the model's state_dict if the checkpoint holds more)")


def _fit(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` into `model`, or say in one line how the two differ."""
    expected = model.state_dict()
    # Exporters often drop BatchNorm's step counters; they do not change a prediction.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    if mismatched:
        key = mismatched[0]
        problems.append(f"{key} is {tuple(state[key].shape)} in the file but {tuple(expected[key].shape)} in the model")
    if problems:
        raise ArtifactError(f"{path}: the weights do not fit {what}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, arch: str, num_classes: int, in_channels: int = 3, image_size: int = 32, *,
               mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
               **options: Any) -> NormalizedClassifier:
    """A trained model from a .safetensors file and its registered architecture, in eval mode on the CPU.

    The result takes images in [0, 1], as every bdbench model. A file saved from a bdbench model
    carries its input normalisation (`normalize.mean`/`normalize.std` beside `net.*`); for a bare
    network's weights pass `mean` and `std` (per channel, in [0, 1] units; 0 and 1 if it was
    trained on unnormalised [0, 1] images), which also replace a file's own. `options` are the
    architecture's own, e.g. `width`.
    A DataParallel `module.` prefix is removed.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ArtifactError(f"{file}: no such file; give the path of the model's .safetensors weights")
    _refuse_pickle(file)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise ArtifactError(f"{file}: not a readable safetensors file ({lines[0]})") from None
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    carries_normalization = "normalize.mean" in state and "normalize.std" in state
    if (mean is None or std is None) and not carries_normalization:
        raise ConfigError(f"{file}: the weights carry no input normalisation; pass mean=... and std=... per channel "
                          f"(0 and 1 if the model was trained on unnormalised [0, 1] images)")
    if mean is not None and std is not None and not len(mean) == len(std) == in_channels:
        raise ConfigError(f"mean and std need {in_channels} values each, one per channel")
    net = create_model(arch, num_classes, in_channels, image_size, **options)
    model = with_normalization(net, (0.0,) * in_channels, (1.0,) * in_channels)
    what = f"{arch} for {num_classes} classes at {in_channels}x{image_size}x{image_size}"
    _fit(file, model if carries_normalization else net, state, what)
    if mean is not None and std is not None:  # given values win over the file's
        model.normalize = Normalize(mean, std)
    return model.eval()
