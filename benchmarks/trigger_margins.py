"""How far a learned trigger pulls a victim towards the target, against how far the image's own features hold it.

A diagnostic for clean-label attacks that stay under the attacks issue's ASR bar (SIG, DFB and Narcissus
on GTSRB). For every triggered test image x (source class y, target t) of a cached victim it reads the
victim's logits z on the clean image and on the triggered one and prints:

- the *clean gap* g = z_y(x) - z_t(x): how strongly the image's own features favour its class over the target;
- the *pull* of the trigger, g(x) - g(x + trigger): how much the trigger moves that gap towards the target;
- the ASR, and the ASR within each quarter of the clean gaps (the quartiles of this victim's own gaps).

A trigger that is learned but outweighed shows pulls of the same size on every image and an ASR that falls
from the quarter with the smallest gaps to the one with the largest; comparing the gaps and pulls of two data
sets' victims says whether the trigger is learned less or the images hold harder. Test labels are read only
to score: nothing here feeds back into any setting.

    PYTHONPATH=src .venv/bin/python benchmarks/trigger_margins.py --out GRID_OUT [--victims KEY,KEY] \\
        [--trigger-params '{"delta_test": 40}']

`GRID_OUT` is a grid's output folder; its cached victims (`cache/victims/<key>.json`) and attack artefacts
are read, never trained: a victim missing from the cache is an error. Without `--victims`, every cached
victim of a poisoning attack in the folder is read. Data set paths in the victims' specs are relative to
the directory this runs in, as the grid's were. `--trigger-params` changes attack parameters that act at
test time only (SIG's `delta_test`, the paper's stronger test signal), to read how the ASR moves with the
pull; the victim is the cached one either way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bdbench.attacks import ATTACKS
from bdbench.attacks.workshop import AttackWorkshop, dataset_key
from bdbench.data import load_dataset
from bdbench.errors import BdbenchError
from bdbench.experiment import new_model
from bdbench.grid import ExperimentSpec
from bdbench.seeding import derive_seed
from bdbench.store import ArtifactCache
from bdbench.training import predict_logits


def victim_spec(info: dict) -> ExperimentSpec:
    """The spec of a cached victim (its stored fields, scored undefended at full precision)."""
    return ExperimentSpec(**info["spec"], defense={"name": "none"}, precision="fp32", clean_budget={})


def workshop(spec: ExperimentSpec, cache: ArtifactCache) -> AttackWorkshop:
    """The attack's workshop as the grid had it. The victim's stored spec has its data set's parameters sorted;
    a cache written before artefact keys were sorted holds them under the config's order, which is found among
    the stored artefacts' descriptions."""
    as_written = spec.dataset.model_dump_json()
    for path in sorted((cache.root / "attacks").glob("*.json")):
        stored = json.loads(path.read_text()).get("dataset", "")
        if stored and json.loads(stored) == json.loads(as_written):
            as_written = stored
            break
    return AttackWorkshop(seed=derive_seed(spec.seed, "attack"), cache=cache, dataset_key=dataset_key(spec.dataset),
                          dataset_key_as_written=as_written)


def describe(key: str, cache: ArtifactCache, trigger_params: dict) -> str:
    info = cache.load_info("victims", key)
    if info is None:
        raise SystemExit(f"no cached victim {key} in {cache.root}/victims; give a key listed there")
    spec = victim_spec(info)
    if spec.victim_key != key:
        raise SystemExit(f"victim {key}: its stored spec hashes to {spec.victim_key} (made by other code); "
                         "run this from the commit that trained it")
    if ATTACKS.is_reference(spec.attack.name):
        return f"{key}: clean model, no trigger"
    dataset = load_dataset(spec.dataset.name, **spec.dataset.params)
    attack = ATTACKS.build(spec.attack.name, spec.attack.params)
    grid_workshop = workshop(spec, cache)
    attack.prepare(dataset, spec.target_label, grid_workshop)
    model = new_model(spec, dataset, "victim_init")
    if not cache.load("victims", key, model):
        raise SystemExit(f"victim {key}: its weights are missing or unreadable in {cache.root}/victims")
    if attack.learns_with_victim:
        state = cache.load_tensors("victims", f"{key}.attack")
        if state is None:
            raise SystemExit(f"victim {key}: the trigger its attack learned with it is missing from {cache.root}/victims")
        attack.load_victim_state(state)
    if trigger_params:  # test-time settings only (SIG's delta_test): the victim and its training data stay as they were
        params = {**spec.attack.params, **trigger_params}
        tester = ATTACKS.build(spec.attack.name, params)
        tester.prepare(dataset, spec.target_label, grid_workshop)
        same = [a.poison(dataset, spec.poison_rate, spec.target_label, torch.Generator().manual_seed(0)).x
                for a in (attack, tester)]
        if not torch.equal(*same):
            raise SystemExit(f"victim {key}: --trigger-params {json.dumps(trigger_params)} changes the training images "
                             "too, not only the test-time trigger; give test-time parameters only (sig: delta_test)")
        if attack.learns_with_victim:
            tester.load_victim_state(state)
        attack = tester
    triggered = attack.triggered_test_set(dataset, spec.target_label)
    assert triggered.x_clean is not None
    z_clean, z_trig = predict_logits(model, triggered.x_clean), predict_logits(model, triggered.x)
    rows = torch.arange(len(triggered.x))
    y, t = triggered.y_true, triggered.y_target
    gap = z_clean[rows, y] - z_clean[rows, t]
    pull = gap - (z_trig[rows, y] - z_trig[rows, t])
    success = z_trig.argmax(1) == t
    edges = torch.quantile(gap, torch.tensor([0.25, 0.5, 0.75]))
    quarter = torch.bucketize(gap, edges)
    by_quarter = " / ".join(f"{success[quarter == q].float().mean().item():.3f}" for q in range(4))
    shown = {**spec.attack.params, **trigger_params}
    attack_name = spec.attack.name + (json.dumps(shown, sort_keys=True) if shown else "")
    return (f"{key}: {spec.dataset.params.get('path', spec.dataset.name)} {attack_name} rate {spec.poison_rate} "
            f"target {spec.target_label}: ASR {success.float().mean().item():.3f}; clean gap median "
            f"{gap.median().item():.2f} (quartiles {edges[0].item():.2f} / {edges[1].item():.2f} / "
            f"{edges[2].item():.2f}); pull median {pull.median().item():.2f} (IQR {torch.quantile(pull, 0.25).item():.2f}"
            f"-{torch.quantile(pull, 0.75).item():.2f}); ASR by clean-gap quarter, smallest first: {by_quarter}")


def json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"delta_test\": 40}}', not {text!r}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="a grid's output folder")
    parser.add_argument("--victims", default="", help="comma-separated victim keys (default: all cached)")
    parser.add_argument("--trigger-params", default="{}", type=json_object,
                        help="attack parameters that change only the test-time trigger, as JSON: '{\"delta_test\": 40}'")
    args = parser.parse_args(argv)
    cache = ArtifactCache(args.out / "cache")
    keys = [k for k in args.victims.split(",") if k] or sorted(
        p.stem for p in (args.out / "cache" / "victims").glob("*.json") if "." not in p.stem)
    if not keys:
        raise SystemExit(f"no cached victims in {args.out}/cache/victims")
    for key in keys:
        try:
            print(describe(key, cache, args.trigger_params), flush=True)
        except BdbenchError as exc:  # a parameter the attack does not take, a data file moved since: one line
            raise SystemExit(f"victim {key}: {exc}") from None


if __name__ == "__main__":
    main()
