"""`bdbench scan`: audit a model you did not train for a backdoor.

The model is a .safetensors file and a registered architecture; the defender's clean data is a stratified
draw from one split of any data set bdbench reads (`--data`, `--split`, `--per-class` or `--fraction`).
Each detector (by default every registered model-detection defense, plugins included) runs on exactly
what it would see inside a grid, a `DefenseContext` with the model and the clean images, and gives its
model-level verdict through `Defense.detect` (Neural Cleanse without its unlearning repair). The draw and
each detector's seed are the grid's own: `--split train` with the grid's `clean_budget` and seed gives
the images and the verdict a grid cell gives the same model.

The result: a verdict per detector (anomaly index, threshold, suspected targets, seconds), each picture a
detector made as a PNG (Neural Cleanse's reversed trigger per label), a self-contained HTML page, and an
exit status for CI: 0 nothing flagged, 1 a detector flagged the model, 2 an error (a bad input, or a
detector that failed while none flagged).
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import io
import logging
import math
import re
import time
import traceback
import types
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from pydantic import ValidationError

from bdbench.data import DATASETS, Dataset, load_dataset
from bdbench.defenses import DEFENSES, DefenseContext, DefenseKind, DefenseOutcome
from bdbench.errors import ArtifactError, BdbenchError, ConfigError
from bdbench.grid import MODEL_SHAPE, CleanBudget, Component
from bdbench.models import MODELS, create_model, load_model, with_normalization
from bdbench.seeding import derive_seed
from bdbench.training import TrainConfig, default_device, predict, trains_in_bfloat16

log = logging.getLogger("bdbench")

EXIT_CLEAN, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2
SCAN_KINDS = (DefenseKind.MODEL_DETECTION,)  # kinds that give a verdict on a model from clean data alone


@dataclass
class Verdict:
    """One detector's finding on the model."""

    detector: str  # its variant name, e.g. nc or nc(epochs=10)
    name: str
    params: dict[str, Any]
    citation: str
    source: str
    detected: bool | None = None
    anomaly_index: float | None = None
    threshold: float | None = None
    suspected_targets: tuple[int, ...] = ()
    class_statistics: list[float] | None = None
    images: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # what the detector drew
    pictures: dict[str, Path] = field(default_factory=dict)  # those images as PNG files, once written
    seconds: float | None = None
    error: str | None = None

    @property
    def status(self) -> str:
        return "error" if self.error is not None else ("flagged" if self.detected else "not flagged")


@dataclass
class ScanReport:
    weights: Path
    sha256: str
    model: str
    model_params: dict[str, Any]
    data: str
    split: str
    images: int
    per_class: tuple[int, int]  # fewest and most images of a class in the draw
    budget_accuracy: float
    class_names: tuple[str, ...]
    seed: int
    device: str
    verdicts: list[Verdict]
    started: str
    seconds: float
    page: Path | None = None

    @property
    def exit_code(self) -> int:
        if any(v.detected for v in self.verdicts):
            return EXIT_FLAGGED
        return EXIT_ERROR if any(v.error for v in self.verdicts) else EXIT_CLEAN

    def lines(self) -> list[str]:
        """One line per detector, then the summary: what the command prints."""
        out = []
        for v in self.verdicts:
            if v.error is not None:
                out.append(f"{v.detector}: ERROR {v.error}")
                continue
            index = "n/a" if v.anomaly_index is None else f"{v.anomaly_index:.2f}"
            threshold = "" if v.threshold is None else f" (flags above {v.threshold:.2f})"
            targets = ", ".join(self.class_label(t) for t in v.suspected_targets) or "none"
            pictures = f", {len(v.images)} pictures" if v.images else ""
            out.append(f"{v.detector}: {'FLAGGED' if v.detected else 'not flagged'}: anomaly index {index}{threshold}, "
                       f"suspected target {targets} [{v.seconds:.1f} s{pictures}]")
        flagged = [v.detector for v in self.verdicts if v.detected]
        errors = [v.detector for v in self.verdicts if v.error is not None]
        if flagged:
            summary = f"verdict: BACKDOOR SUSPECTED by {', '.join(flagged)}"
        elif errors:
            summary = f"verdict: INCOMPLETE, {', '.join(errors)} failed and nothing was flagged"
        else:
            summary = "verdict: nothing flagged"
        out.append(f"{summary} (exit {self.exit_code})")
        return out

    def class_label(self, label: int) -> str:
        name = self.class_names[label] if 0 <= label < len(self.class_names) else ""
        return f"{label} ({name})" if name and name != str(label) else str(label)


# ---------------------------------------------------------------- inputs

def parse_detectors(text: str | None) -> list[Component]:
    """`nc,mmbd`, or a YAML list such as '[nc, {name: mmbd, steps: 100}]'; None: every model detector."""
    if text is None or not text.strip():
        names = [e.name for e in DEFENSES if getattr(e.obj, "kind", None) in SCAN_KINDS]
        return [Component(name=n) for n in names]
    import yaml

    if text.lstrip().startswith("["):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--detectors {text!r} is not a YAML list; write nc,mmbd or "
                              "'[nc, {name: mmbd, steps: 100}]'") from None
    else:
        items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ConfigError("--detectors names no detector; write for example --detectors nc,mmbd")
    components = []
    for item in items:
        try:
            components.append(Component.model_validate(item))
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"--detectors item {item!r}: {reason}; give a name or {{name: ..., <parameters>}}") from None
    seen = set()
    for component in components:
        entry = DEFENSES.entry(component.name)
        kind = getattr(entry.obj, "kind", None)
        if kind not in SCAN_KINDS:
            usable = ", ".join(e.name for e in DEFENSES if getattr(e.obj, "kind", None) in SCAN_KINDS)
            what = "needs the training set" if kind in (DefenseKind.DATA_DETECTION, DefenseKind.ROBUST_TRAINING) \
                else "gives no verdict on a model"
            raise ConfigError(f"--detectors: {component.name} is a {getattr(kind, 'value', kind)} defense and {what}; "
                              f"scan runs the model detectors: {usable}")
        DEFENSES.check(component.name, component.params)
        variant = DEFENSES.variant(component.name, component.params, component.label)
        if variant in seen:
            raise ConfigError(f"--detectors lists {variant} twice; list each detector once")
        seen.add(variant)
    return components


def parse_model_params(items: Iterable[str]) -> dict[str, Any]:
    """`--model-param width=0.25` (values are YAML) -> {"width": 0.25}."""
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-param {item!r} is not KEY=VALUE (for example --model-param width=0.25)")
        try:
            params[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            params[key.strip()] = raw
    return params


def parse_channels(text: str | None, option: str) -> tuple[float, ...] | None:
    """`--mean 0.49,0.48,0.45` -> a tuple of floats."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: give one number per channel, comma separated, e.g. "
                          f"{option} 0.49,0.48,0.45") from None


def clean_draw(dataset: Dataset, split: str, budget: CleanBudget, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The defender's clean images: a stratified draw from `split`, the grid's own draw (experiment.clean_budget,
    the same seed purpose), so that `--split train` gives a grid cell's budget."""
    from bdbench.experiment import clean_budget

    if split == "train":
        return clean_budget(dataset, budget, seed)
    # The same draw over the test split: clean_budget reads only these three attributes.
    test_view = types.SimpleNamespace(x_train=dataset.x_test, y_train=dataset.y_test, num_classes=dataset.num_classes)
    return clean_budget(test_view, budget, seed)  # type: ignore[arg-type]


def _carries_normalization(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception:  # load_model reports an unreadable file in its own words
        return True
    return {"normalize.mean", "normalize.std"} <= keys or {"module.normalize.mean", "module.normalize.std"} <= keys


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the scan

def scan(weights: str | Path, model: str, data: Component | str, *, model_params: dict[str, Any] | None = None,
         detectors: Sequence[Component] | str | None = None, split: str = "test", per_class: int | None = None,
         fraction: float | None = None, seed: int = 0, mean: tuple[float, ...] | None = None,
         std: tuple[float, ...] | None = None, output: str | Path | None = "scan-report.html",
         device: torch.device | None = None, cpu_bfloat16: bool = False) -> ScanReport:
    """Run the detectors on the model and write the page (and its pictures) to `output` (None: no files).
    The detectors' loops run in float32 on a CPU, or with `cpu_bfloat16` under bfloat16 autocast as a
    grid's `training.cpu_bfloat16` runs them (on CUDA they always do).
    Bad inputs are one-line `BdbenchError`s before any detector runs; a detector that fails is a verdict
    with `error` set, and the others still run."""
    started = _dt.datetime.now().isoformat(timespec="seconds")
    start = time.perf_counter()
    data = data if isinstance(data, Component) else Component.model_validate(data)
    components = detectors if isinstance(detectors, Sequence) and not isinstance(detectors, str) \
        else parse_detectors(detectors)
    model_params = dict(model_params or {})
    if split not in ("train", "test"):
        raise ConfigError(f"--split {split!r}: choose train or test")
    try:
        budget = CleanBudget(per_class=per_class) if per_class is not None and fraction is None else \
            CleanBudget(fraction=fraction) if fraction is not None and per_class is None else None
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}") from None
    if budget is None:
        if per_class is not None and fraction is not None:
            raise ConfigError("give --per-class or --fraction, not both")
        budget = CleanBudget(per_class=20)
    MODELS.check(model, model_params, supplied=MODEL_SHAPE)
    DATASETS.check(data.name, data.params)
    path = Path(weights).expanduser()
    if path.is_file() and (mean is None) != (std is None):
        raise ConfigError("give --mean and --std together (one value per channel each)")
    if path.is_file() and mean is None and not _carries_normalization(path):
        raise ConfigError(f"{path}: the weights carry no input normalisation; give the model's --mean and --std "
                          "(one value per channel, e.g. --mean 0.4914,0.4822,0.4465 --std 0.247,0.2435,0.2616; "
                          "--mean 0 --std 1 for a model trained on unnormalised [0, 1] images)")

    dataset = load_dataset(data.name, **data.params)
    if mean is not None and std is not None and len(mean) == len(std) == 1 and dataset.in_channels > 1:
        mean, std = mean * dataset.in_channels, std * dataset.in_channels  # one value for every channel
    network = load_model(path, model, dataset.num_classes, dataset.in_channels, dataset.image_size,
                         mean=mean, std=std, **model_params)
    device = device or default_device()
    network = network.to(device).eval()
    clean_x, clean_y = clean_draw(dataset, split, budget, seed)
    counts = torch.bincount(clean_y, minlength=dataset.num_classes)
    budget_accuracy = float((predict(network, clean_x, device=device) == clean_y).double().mean())
    log.info("scan: %s as %s on %d %s images of %s (%d-%d per class); the model's accuracy on them %.3f",
             path, model, len(clean_y), split, data.label or data.name, int(counts.min()), int(counts.max()),
             budget_accuracy)

    normalize = network.normalize
    normalization = (tuple(normalize.get_buffer("mean").flatten().tolist()),
                     tuple(normalize.get_buffer("std").flatten().tolist()))

    def new_model() -> torch.nn.Module:
        net = create_model(model, dataset.num_classes, dataset.in_channels, dataset.image_size, **model_params)
        return with_normalization(net, *normalization).to(device)

    verdicts = []
    config = TrainConfig(cpu_bfloat16=cpu_bfloat16)
    for component in components:
        verdicts.append(_run_detector(component, network, clean_x, clean_y, dataset, seed, device, new_model, config))
    report = ScanReport(weights=path, sha256=_sha256(path), model=model, model_params=model_params,
                        data=data.label or _data_text(data), split=split, images=len(clean_y),
                        per_class=(int(counts.min()), int(counts.max())), budget_accuracy=budget_accuracy,
                        class_names=tuple(dataset.class_names), seed=seed, verdicts=verdicts,
                        device=f"{device} ({'bfloat16' if trains_in_bfloat16(config, device) else 'float32'} loops)",
                        started=started, seconds=0.0)
    report.seconds = time.perf_counter() - start
    if output is not None:
        report.page = write_scan_page(report, Path(output))
    return report


def _data_text(data: Component) -> str:
    if not data.params:
        return data.name
    return "{" + ", ".join([f"name: {data.name}"] + [f"{k}: {v}" for k, v in data.params.items()]) + "}"


def _run_detector(component: Component, network: torch.nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor,
                  dataset: Dataset, seed: int, device: torch.device, new_model: Any, train_config: TrainConfig) -> Verdict:
    entry = DEFENSES.entry(component.name)
    verdict = Verdict(detector=DEFENSES.variant(component.name, component.params, component.label),
                      name=component.name, params=dict(component.params),
                      citation=getattr(entry.obj, "citation", ""), source=entry.source)
    context = DefenseContext(
        model=copy.deepcopy(network), clean_x=clean_x.clone(), clean_y=clean_y.clone(),
        num_classes=dataset.num_classes, in_channels=dataset.in_channels, image_size=dataset.image_size,
        crop_padding=dataset.crop_padding, allow_hflip=dataset.allow_hflip, train_config=train_config,
        # The grid's seed for this defense (experiment.py), so a scan and a grid cell draw alike.
        seed=derive_seed(seed, "defense", component.name), device=device, new_model=new_model)
    log.info("scan: running %s", verdict.detector)
    start = time.perf_counter()
    try:
        outcome: DefenseOutcome = DEFENSES.build(component.name, component.params).detect(context)
    except BdbenchError as exc:
        verdict.error = str(exc)
    except Exception as exc:  # a crashing detector is reported, and the others still run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        verdict.error = f"{type(exc).__name__}: {first}"
        log.debug("%s", traceback.format_exc())
    else:
        if outcome.detected is None:
            verdict.error = f"{component.name} returned no verdict (DefenseOutcome.detected is None)"
        else:
            verdict.detected = bool(outcome.detected)
            verdict.anomaly_index = None if outcome.anomaly_index is None else float(outcome.anomaly_index)
            verdict.threshold = None if outcome.threshold is None else float(outcome.threshold)
            verdict.suspected_targets = tuple(int(t) for t in outcome.suspected_targets or ())
            verdict.class_statistics = outcome.class_statistics_list()
            verdict.images = {k: v.detach().float().cpu() for k, v in (outcome.pictures or {}).items()}
    verdict.seconds = time.perf_counter() - start
    return verdict


# ---------------------------------------------------------------- pictures and page

def _png(image: torch.Tensor, min_side: int = 96) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes, enlarged (nearest) to at least `min_side` pixels a side."""
    from PIL import Image

    array = image.clamp(0, 1).mul(255).round().to(torch.uint8)
    array = array[0] if array.shape[0] == 1 else array.permute(1, 2, 0)
    picture = Image.fromarray(array.numpy())
    scale = max(1, math.ceil(min_side / max(picture.size)))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def write_scan_page(report: ScanReport, page: Path) -> Path:
    """Write each picture as a PNG in `<page stem>-pictures/` beside the page, then the page itself."""
    folder = page.parent / f"{page.stem}-pictures"
    try:
        page.parent.mkdir(parents=True, exist_ok=True)
        for verdict in report.verdicts:
            for name, image in verdict.images.items():
                folder.mkdir(exist_ok=True)
                target = folder / f"{_slug(verdict.detector)}-{_slug(name)}.png"
                target.write_bytes(_png(image))
                verdict.pictures[name] = target
        page.write_text(render_scan_page(report))
    except OSError as exc:
        raise ArtifactError(f"cannot write the scan report {page} ({exc.strerror or exc}); pick another -o") from None
    return page


def _number(value: float | None, digits: int = 2) -> str:
    return "&ndash;" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render_scan_page(report: ScanReport) -> str:
    from bdbench.report.assets import CSS

    flagged = [v for v in report.verdicts if v.detected]
    banner = ("bad", f"Backdoor suspected by {escape(', '.join(v.detector for v in flagged))}") if flagged else \
        ("warn", "Incomplete: a detector failed and none flagged") if report.exit_code == EXIT_ERROR else \
        ("good", "Nothing flagged")
    rows = []
    for v in report.verdicts:
        targets = ", ".join(report.class_label(t) for t in v.suspected_targets) or "&ndash;"
        status = escape(v.status.upper() if v.detected else v.status)
        note = f"<br><small>{escape(v.error)}</small>" if v.error else ""
        source = "" if v.source == "bdbench" else f"<br><small>plugin: {escape(v.source)}</small>"
        rows.append(f"<tr><td><b>{escape(v.detector)}</b>{source}</td><td class='{_status_class(v)}'>{status}{note}</td>"
                    f"<td>{_number(v.anomaly_index)}</td><td>{_number(v.threshold)}</td><td>{escape(targets)}</td>"
                    f"<td>{_number(v.seconds, 1)}</td><td><small>{escape(v.citation)}</small></td></tr>")
    sections = []
    for v in report.verdicts:
        if v.class_statistics is None and not v.pictures:
            continue
        cells = []
        for label in range(len(report.class_names)):
            key = f"label {label}"
            statistic = v.class_statistics[label] if v.class_statistics and label < len(v.class_statistics) else None
            mark = " class='flag'" if label in v.suspected_targets else ""
            image = ""
            if key in v.pictures:
                encoded = base64.b64encode(v.pictures[key].read_bytes()).decode()
                image = f"<img src='data:image/png;base64,{encoded}' alt='{escape(key)}'><br>"
            cells.append(f"<figure{mark}>{image}<figcaption>{escape(report.class_label(label))}<br>"
                         f"{_number(statistic, 3)}</figcaption></figure>")
        what = {"nc": "reversed trigger (mask x pattern) and its mask's L1 norm per label; the target's is small",
                "mmbd": "largest reachable classification margin per class; the target's is large"}.get(
            v.name, "per-class statistic")
        sections.append(f"<h2>{escape(v.detector)}: {escape(what)}</h2><div class='gallery'>{''.join(cells)}</div>")
    params = ", ".join(f"{k}={v}" for k, v in report.model_params.items())
    setup = [("weights", f"{report.weights} (sha256 {report.sha256[:16]}...)"),
             ("architecture", f"{report.model}{f' ({params})' if params else ''}"),
             ("clean data", f"{report.data}, {report.split} split: {report.images} images, "
                            f"{report.per_class[0]}-{report.per_class[1]} per class, drawn with seed {report.seed}"),
             ("model accuracy on them", f"{report.budget_accuracy:.3f}"),
             ("device", report.device), ("started", report.started), ("total seconds", f"{report.seconds:.1f}")]
    from bdbench import __version__

    setup.append(("bdbench", __version__))
    setup_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in setup)
    style = CSS + """
.verdict{padding:.6em 1em;border-radius:6px;font-size:1.2em;margin:1em 0}
.verdict.bad{background:#fde2e1}.verdict.good{background:#e1f5e4}.verdict.warn{background:#fff4d6}
td.flagged{color:#b00020;font-weight:bold}td.error{color:#8a6d00}
.gallery{display:flex;flex-wrap:wrap;gap:8px}.gallery figure{margin:0;text-align:center;font-size:.8em;
padding:4px;border:2px solid transparent}.gallery figure.flag{border-color:#b00020}
.gallery img{image-rendering:pixelated;width:96px;height:96px}
"""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bdbench scan: {escape(report.weights.name)}</title>
<style>{style}</style></head><body><main>
<h1>bdbench scan: {escape(report.weights.name)}</h1>
<div class="verdict {banner[0]}">{banner[1]} (exit {report.exit_code})</div>
<table><thead><tr><th>detector</th><th>verdict</th><th>anomaly index</th><th>flags above</th><th>suspected target</th>
<th>seconds</th><th>method</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<h2>Setup</h2><table>{setup_rows}</table>
{''.join(sections)}
<p><small>A detector sees the model and the clean images only, as inside a bdbench grid. A verdict is evidence,
not proof: these detectors miss some attacks and flag some clean models (see bdbench's benign-model rows).</small></p>
</main></body></html>
"""


def _status_class(verdict: Verdict) -> str:
    return "error" if verdict.error else ("flagged" if verdict.detected else "clean")
