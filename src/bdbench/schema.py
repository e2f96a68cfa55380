"""The result row: one typed schema for every experiment's row.

Everything that names a result column derives from `ResultRow`: the SQLite columns and their types
(`sql_columns`), which columns hold booleans and which JSON (`BOOL_COLUMNS`, `JSON_COLUMNS`), the columns
`bdbench run` and `bdbench results` print (`TABLE_COLUMNS`), the report's every-experiment table
(`REPORT_COLUMNS`) and the README's column table (`markdown_table`; a test holds the README to it).

A row is built through the dataclass, so a misspelled column is a `TypeError` where the row is made (and a
mypy error before anything runs), never a failed write after the experiment. Only stdlib is imported here:
the command line and the report read the schema without loading torch.

Column names and meanings never change: databases written by earlier versions are read back, and columns
added since are added to them (`store.ResultStore`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# What a column's Python type is stored as in SQLite.
_SQL_TYPES = {str: "TEXT", float: "REAL", int: "INTEGER", bool: "INTEGER", dict: "TEXT", list: "TEXT"}


def _column(doc: str, *, table: bool = False, report: bool = False) -> Any:
    """A nullable result column. `table`: printed by `bdbench run` and `bdbench results`; `report`: a column of
    the report's every-experiment table."""
    return field(default=None, metadata={"doc": doc, "table": table, "report": report})


@dataclass(slots=True, kw_only=True)
class ResultRow:
    """One experiment's result. Columns a row does not use stay None (NULL in the database)."""

    experiment_id: str = field(metadata={"doc": "stable hash of the experiment's spec (the primary key)",
                                         "table": False, "report": True})
    dataset: str | None = _column("the data set's own name (its `label`, an npz file's stem, an image folder's name, "
                                  "else the registered name with non-default parameters)", table=True, report=True)
    dataset_loader: str | None = _column("the loader that read the data set (`npz`, `cifar10`, ...)")
    model: str | None = _column("architecture", table=True, report=True)
    attack: str | None = _column("registered attack name", table=True, report=True)
    attack_params: dict[str, Any] | None = _column("the attack's parameters as the spec gives them (JSON)")
    attack_variant: str | None = _column("the attack's setting: its `label`, else the name with non-default "
                                         "parameters (`badnets(patch_size=4)`)")
    poison_rate: float | None = _column("share of the training set poisoned", table=True, report=True)
    target_label: int | None = _column("the attack's target class", table=True, report=True)
    defense: str | None = _column("registered defense name", table=True, report=True)
    defense_params: dict[str, Any] | None = _column("the defense's parameters as the spec gives them (JSON)")
    defense_variant: str | None = _column("the defense's setting, named as `attack_variant`")
    defense_kind: str | None = _column("model_repair, model_detection, data_detection, input_detection, "
                                       "robust_training or none", report=True)
    precision: str | None = _column("deployed precision (`fp32`, `int8-static`, ...)", table=True, report=True)
    precision_order: str | None = _column("`quantize_then_defend` or `defend_then_quantize`")
    quantized_layers: str | None = _column("layers the precision quantized (`Linear x2`), or `none`")
    proxy: str | None = _column("`ste` where the defense got the deployed model's straight-through twin")
    seed: int | None = _column("the experiment's seed", table=True, report=True)
    status: str | None = _column("`ok`, `error` or `not_applicable`", table=True, report=True)
    error: str | None = _column("why a row is `error` or `not_applicable`, in one line")
    clean_acc: float | None = _column("clean test accuracy of the deployed model after the defense", table=True,
                                      report=True)
    asr: float | None = _column("attack success rate after the defense", table=True, report=True)
    robust_acc: float | None = _column("share of triggered test images still given their true label", table=True,
                                       report=True)
    der: float | None = _column("defense effectiveness rating against the same deployed model undefended",
                                table=True, report=True)
    clean_acc_before: float | None = _column("`clean_acc` of the deployed model before the defense", report=True)
    asr_before: float | None = _column("`asr` before the defense", report=True)
    robust_acc_before: float | None = _column("`robust_acc` before the defense")
    psnr: float | None = _column("mean PSNR (dB) of the triggered test images against the clean ones", table=True)
    ssim: float | None = _column("mean SSIM of the triggered test images against the clean ones", table=True)
    detected: bool | None = _column("a model detector's verdict: the model is backdoored", table=True, report=True)
    anomaly_index: float | None = _column("a model detector's anomaly index", report=True)
    suspected_targets: list[int] | None = _column("the target classes a model detector suspects (JSON)")
    det_tpr: float | None = _column("detection true-positive rate: share of the poisoned training samples flagged "
                                    "(cover samples included) or of the triggered test inputs", table=True,
                                    report=True)
    det_fpr: float | None = _column("detection false-positive rate: share of the clean training samples flagged "
                                    "(never poisoned, so cover samples are left out) or of the clean test inputs",
                                    table=True, report=True)
    det_auroc: float | None = _column("detection AUROC: poisoned training samples (cover included) against clean "
                                      "ones, or triggered against clean test inputs", report=True)
    det_threshold: float | None = _column("the score above which the detector flags, set on the clean budget")
    clean_budget: int | None = _column("images in the defender's clean budget")
    victim_cached: bool | None = _column("the victim was loaded from the cache, not trained")
    victim_train_s: float | None = _column("seconds spent training the victim (null when cached)")
    victim_train_cpu_s: float | None = _column("CPU seconds of this process training the victim, all its threads "
                                               "(null when cached)")
    wall_s: float | None = _column("seconds the whole experiment took", report=True)
    defense_s: float | None = _column("all the defense costs its user, in seconds: the three parts below", table=True,
                                      report=True)
    defense_method_s: float | None = _column("seconds of the defense method itself")
    defense_retrain_s: float | None = _column("seconds retraining on the samples a training-data detector kept")
    defense_scoring_s: float | None = _column("seconds an input detector spent scoring the test images")
    defense_cpu_s: float | None = _column("CPU seconds of this process over the same three parts, all its threads: "
                                          "what other processes sharing a core cannot inflate")
    peak_rss_mb: float | None = _column("the process's peak resident memory over the defense's parts (MB)",
                                        report=True)
    device: str | None = _column("the torch device the experiment ran on")
    torch_threads: int | None = _column("torch threads the experiment used")
    train_dtype: str | None = _column("`float32` or `bfloat16` training")
    cpu_kernels: str | None = _column("the CPU kernel set (`AVX512`, `AVX2`, ...)")
    victim_key: str | None = _column("hash of what trained the victim (the cached model's name)")
    spec: str | None = _column("the experiment's whole spec (JSON text)")
    finished_at: str | None = _column("UTC time the row was made")
    # Added in 0.2 (new columns go last: older databases gain them at the end).
    server_defense: str | None = _column("federated runs: the server's aggregation rule (`fedavg`, `krum`, `lockdown`, ...)",
                                         table=True, report=True)
    server_defense_params: dict[str, Any] | None = _column("the server defense's parameters as the spec gives them (JSON)")
    server_defense_variant: str | None = _column("the server defense's setting, named as `attack_variant`")
    fed_clients: int | None = _column("federated runs: clients in the federation")
    fed_malicious: int | None = _column("federated runs: clients that train on poisoned data (on clean data "
                                        "where the attack is `none`)")
    fed_participation: float | None = _column("federated runs: share of clients chosen each round")
    fed_split: str | None = _column("federated runs: how the training set is shared (`iid`, `dirichlet(alpha=0.5)`)")
    rounds: int | None = _column("federated runs: communication rounds", report=True)
    bytes_up: float | None = _column("federated runs: bytes all participating clients sent per round (mean over "
                                     "rounds; float32 values, Lockdown's masked coordinates only)", report=True)
    bytes_down: float | None = _column("federated runs: bytes the server sent the participating clients per round "
                                       "(mean over rounds)")
    server_defense_s: float | None = _column("federated runs: seconds of server-side aggregation over all rounds",
                                             report=True)
    round_metrics: list[dict[str, Any]] | None = _column("federated runs: the per-round curve (JSON; also in the "
                                                         "`federated_rounds` table)")
    fed_client_attack: str | None = _column("federated runs: what the malicious clients do besides poisoning their "
                                            "share (`dba`, `scaling(gamma=10)`, `neurotoxin`; empty: data poisoning "
                                            "only)", table=True, report=True)
    # Added after them (also last).
    settings: dict[str, Any] | None = _column("every parameter the experiment's data set, model, attack and defense "
                                              "(and server defense, client attack) ran with, the code's defaults "
                                              "filled in (JSON); a resumed grid runs a row again whose settings the "
                                              "code's current defaults change")
    det_payload_tpr: float | None = _column(
        "share of the backdoor's payload flagged: the poisoned training samples that carry the backdoor, cover "
        "samples (a trigger under the true label: adaptive_blend, adaptive_patch, source_specific) left out (Qi et "
        "al.'s elimination rate); for an input detector the triggered test inputs, as `det_tpr`; equal to `det_tpr` "
        "for attacks without cover samples; null in rows written before it existed", table=True, report=True)
    det_payload_fpr: float | None = _column(
        "share of the training samples that are not payload flagged, clean and cover samples alike (Qi et al.'s "
        "sacrifice rate); for an input detector the clean test inputs, as `det_fpr`; equal to `det_fpr` for attacks "
        "without cover samples", report=True)
    det_payload_auroc: float | None = _column("detection AUROC, payload against every other sample (clean and "
                                              "cover); for an input detector as `det_auroc`", report=True)
    class_statistics: list[float] | None = _column(
        "a detector's per-class statistic behind its verdict, indexed by class (JSON): Neural Cleanse's "
        "reversed-mask norms, MM-BD's largest margins, CTI's success gaps, CETF's flip rates, SCAn's J*; another "
        "outlier rule or threshold can be applied to it afterwards")
    repair_declined: bool | None = _column(
        "a repair bound by an accuracy budget (PT, NAD, I-BAU, CTI's reference) found no attempt within "
        "`max_accuracy_drop` of the deployed model's clean-budget accuracy after its `backoffs` halvings, and kept "
        "the deployed model; false where an attempt was kept")

    def update(self, **values: Any) -> None:
        """Set several columns; an unknown name is a `TypeError` naming it."""
        unknown = sorted(set(values) - _NAMES)
        if unknown:
            raise TypeError(f"unknown result column {unknown[0]!r}")
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """Every column, None where unused (what executors return and `store.ResultStore.write` stores)."""
        return {name: getattr(self, name) for name in COLUMN_NAMES}


def _base_type(hint: Any) -> type:
    """`str` for `str | None`, `dict` for `dict[str, Any] | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    base = typing.get_origin(args[0]) or args[0]
    if base not in _SQL_TYPES:
        raise TypeError(f"result column type {hint} has no SQLite type")
    return base


_FIELDS = dataclasses.fields(ResultRow)
_HINTS = typing.get_type_hints(ResultRow)
COLUMN_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)
_NAMES = frozenset(COLUMN_NAMES)
BOOL_COLUMNS: tuple[str, ...] = tuple(f.name for f in _FIELDS if _base_type(_HINTS[f.name]) is bool)
JSON_COLUMNS: tuple[str, ...] = tuple(f.name for f in _FIELDS if _base_type(_HINTS[f.name]) in (dict, list))
TABLE_COLUMNS: tuple[str, ...] = tuple(f.name for f in _FIELDS if f.metadata["table"])
REPORT_COLUMNS: tuple[str, ...] = tuple(f.name for f in _FIELDS if f.metadata["report"])


def sql_columns() -> dict[str, str]:
    """Column name -> SQLite type, in row order; the first column is the primary key."""
    types_ = {name: _SQL_TYPES[_base_type(_HINTS[name])] for name in COLUMN_NAMES}
    types_[COLUMN_NAMES[0]] += " PRIMARY KEY"
    return types_


def check_columns(row: dict[str, Any]) -> None:
    """Refuse a row that names a column the schema lacks (a `TypeError` naming it)."""
    unknown = sorted(set(row) - _NAMES)
    if unknown:
        raise TypeError(f"unknown result column {unknown[0]!r}")


def to_sql(value: Any) -> Any:
    """A value as SQLite stores it: booleans as 0/1, lists and mappings (the JSON columns) as JSON text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def markdown_table() -> str:
    """The README's table of result columns."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    for f in _FIELDS:
        base = _base_type(_HINTS[f.name])
        kind = "JSON" if base in (dict, list) else base.__name__
        lines.append(f"| `{f.name}` | {kind} | {f.metadata['doc']} |")
    return "\n".join(lines)


__all__ = ["BOOL_COLUMNS", "COLUMN_NAMES", "JSON_COLUMNS", "REPORT_COLUMNS", "TABLE_COLUMNS", "ResultRow",
           "check_columns", "markdown_table", "sql_columns", "to_sql"]
