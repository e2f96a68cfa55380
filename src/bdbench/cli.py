"""The command line: `bdbench run`, `bdbench results`, `bdbench report`, `bdbench triggers`, `bdbench scan`,
`bdbench list`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from bdbench.errors import BdbenchError
from bdbench.registry import Registry
from bdbench.schema import TABLE_COLUMNS

EXIT_USER_ERROR = 2  # a bad config, file or folder: nothing ran, or nothing more could
EXIT_EXPERIMENT_ERRORS = 3  # the grid ran and its rows are stored, but at least one experiment ended in `error`


class _OneLineErrors(click.Group):
    """Show user errors as one line (`error: ...`) with exit status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BdbenchError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted: finished experiments are stored; run the same command again to do the rest",
                       err=True)
            sys.exit(130)


@click.group(cls=_OneLineErrors)
@click.version_option(package_name="bdbench")
def main() -> None:
    """Evaluate backdoor attacks and defenses for image classifiers."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


_PLUGIN_OPTION = click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
                              help="Import a plugin module first, as a grid's `plugins:` does (repeatable); "
                                   "installed plugins (entry points) need no option.")


@main.command()
@click.argument("config", default="demo")
@click.option("--out", default="bdbench-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: results.sqlite, cached models, logs.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a grid key, e.g. --set seeds=[0,1] --set dataset.path=data.npz (repeatable).")
@click.option("--executor", default="local", show_default=True,
              help="How to run experiments: local (in this process), process (worker processes), ray (a Ray cluster).")
@click.option("--workers", default=1, show_default=True, type=int, help="Experiments run at once (process, ray).")
@click.option("--threads", default=None, type=int,
              help="Torch threads per experiment  [default: this machine's cores / workers]")
@click.option("--ray-address", default=None, metavar="HOST:PORT",
              help="Join this Ray cluster (with --executor ray); otherwise a local one is started for the run.")
@click.option("--retry-errors", is_flag=True, help="Run experiments stored with status error again.")
def run(config: str, out: str, overrides: tuple[str, ...], executor: str, workers: int, threads: int | None,
        ray_address: str | None, retry_errors: bool) -> None:
    """Run a grid (a YAML file or a built-in name) into --out; stored experiments are skipped."""
    from bdbench.runner import run_grid

    rows = run_grid(config, out=out, overrides=overrides, executor=executor, retry_errors=retry_errors,
                    workers=workers, threads=threads, ray_address=ray_address)
    counts = rows["status"].value_counts().to_dict()
    tally = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    click.echo(_table(rows))
    click.echo(_report_line(out))
    errored = counts.get("error", 0)
    summary = f"{len(rows)} experiment{'s'[:len(rows) != 1]}: {tally}; rows in {Path(out) / 'results.sqlite'}"
    if errored:
        click.echo(f"{summary}; {errored} experiment{'s'[:errored != 1]} ended in error (the error column of "
                   f"`bdbench results --out {out}`, tracebacks in {Path(out) / 'logs'}); --retry-errors runs "
                   f"{'them' if errored != 1 else 'it'} again")
        sys.exit(EXIT_EXPERIMENT_ERRORS)
    click.echo(summary)


def _table(rows) -> str:
    """The rows as a text table; attacks and defenses are shown as their variants (`badnets(patch_size=4)`)."""
    from bdbench.store import with_variants

    rows = with_variants(rows)
    rows["attack"], rows["defense"] = rows["attack_variant"], rows["defense_variant"]
    columns = [c for c in TABLE_COLUMNS if c in rows and rows[c].notna().any()]
    return rows[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _report_line(out: str) -> str:
    """Write the run's report; a report that cannot be made is one line, never the run's failure: the rows
    are stored and `bdbench report` can make it later."""
    from bdbench import report

    try:
        return f"report: {report.report_from_out(out)}"
    except BdbenchError as exc:
        reason = str(exc)
    except Exception as exc:  # a bug in the report must not cost the experiments their exit status
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return f"report: could not be made ({reason}); the rows are stored, try `bdbench report --out {out}` later"


@main.command()
@click.option("--out", default="bdbench-out", show_default=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "parquet"]), default="table",
              show_default=True, help="csv and parquet write the JSON columns as JSON text (bdbench.store.read_exported "
                                      "reads them back); parquet keeps every other column's type.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="File to write instead of standard output (required for parquet).")
def results(out: str, fmt: str, output: str | None) -> None:
    """Print (or write) the stored results of an output folder."""
    from bdbench.store import export_frame, load_results, no_rows_error

    rows = load_results(out)
    if rows.empty:
        raise no_rows_error(out)
    if fmt == "parquet":
        if output is None:
            raise BdbenchError("--format parquet writes a file: give it with -o results.parquet")
        try:
            export_frame(rows).to_parquet(output, index=False)
        except ImportError:
            raise BdbenchError("--format parquet needs pyarrow: pip install pyarrow (or bdbench[dev])") from None
        click.echo(output)
        return
    if fmt == "json":
        text = rows.to_json(orient="records", indent=2)
    elif fmt == "csv":
        text = export_frame(rows).to_csv(index=False)
    else:
        text = _table(rows) + "\n"
    if output is None:
        click.echo(text, nl=fmt == "json")
    else:
        Path(output).write_text(text if fmt != "json" else text + "\n")
        click.echo(output)


@main.command()
@click.option("--out", default="bdbench-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder holding results.sqlite.")
@click.option("-o", "--output", "output", default=None, type=click.Path(dir_okay=False),
              help="HTML file to write  [default: OUT/report.html]")
def report(out: str, output: str | None) -> None:
    """Write the self-contained HTML report of an output folder and print its path."""
    from bdbench.report import report_from_out

    click.echo(str(report_from_out(out, output)))


@main.command()
@click.argument("config", required=False)
@click.option("--attack", "attacks", multiple=True, metavar="NAME",
              help="An attack name or mapping, e.g. --attack sig --attack '{name: badnets, patch_size: 4}' (repeatable).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--dataset", default=None, help="Data set  [default: the grid's, else mnist5k]")
@click.option("--out", default="bdbench-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder whose cache holds learned triggers and surrogates.")
@click.option("--images", default=4, show_default=True, type=click.IntRange(1, 16), help="Test images per attack.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a key of CONFIG.")
def triggers(config: str | None, attacks: tuple[str, ...], output: str, dataset: str | None, out: str,
             images: int, overrides: tuple[str, ...]) -> None:
    """Draw clean test images beside their triggered versions, one row per attack, with PSNR/SSIM."""
    from bdbench.errors import ConfigError
    from bdbench.triggers import write_trigger_picture

    if config is None and not attacks:
        raise ConfigError("bdbench triggers needs a CONFIG or at least one --attack NAME")
    picture = write_trigger_picture(output, config, attacks, dataset, out, images, overrides)
    for row in picture.rows:
        psnr = "n/a" if row.psnr is None else f"{row.psnr:.2f}"
        ssim = "n/a" if row.ssim is None else f"{row.ssim:.4f}"
        click.echo(f"{row.label}: PSNR {psnr} dB, SSIM {ssim}")
    for note in picture.left_out:
        click.echo(note)
    click.echo(output)



@main.command()
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--model", "model", required=True, metavar="NAME", help="The registered architecture (bdbench list models).")
@click.option("--model-param", "model_params", multiple=True, metavar="KEY=VALUE",
              help="An architecture parameter, e.g. --model-param width=0.25 (repeatable).")
@click.option("--data", required=True, metavar="SPEC",
              help="The defender's clean data: a data set name or mapping, e.g. mnist5k or "
                   "'{name: npz, path: clean.npz}' or '{name: imagefolder, root: imgs, size: 32}'.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="The split of --data the clean images are drawn from.")
@click.option("--per-class", type=int, default=None,
              help="Clean images drawn per class, stratified  [default: 20, unless --fraction]")
@click.option("--fraction", type=float, default=None, help="Or this share of each class of the split.")
@click.option("--detectors", default=None, metavar="LIST",
              help="Comma-separated detectors, or a YAML list with parameters: '[nc, {name: mmbd, steps: 100}]'  "
                   "[default: every model-detection defense]")
@click.option("--mean", default=None, metavar="M1,M2,..", help="The model's input normalisation, where the file has none.")
@click.option("--std", default=None, metavar="S1,S2,..", help="(with --mean)")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the clean draw and the detectors.")
@click.option("--cpu-bfloat16", is_flag=True,
              help="On a CPU, run the detectors' loops in bfloat16 (as a grid's training.cpu_bfloat16); CUDA always does.")
@click.option("-o", "--output", default="scan-report.html", show_default=True, type=click.Path(dir_okay=False),
              help="HTML page to write; the pictures go to a folder beside it (<name>-pictures/).")
@_PLUGIN_OPTION
def scan(weights: str, model: str, model_params: tuple[str, ...], data: str, split: str, per_class: int | None,
         fraction: float | None, detectors: str | None, mean: str | None, std: str | None, seed: int,
         cpu_bfloat16: bool, output: str, plugins: tuple[str, ...]) -> None:
    """Audit a model's weights for a backdoor: exit 0 nothing flagged, 1 flagged, 2 error."""
    from bdbench.plugins import import_modules
    from bdbench.scan import parse_channels, parse_model_params
    from bdbench.scan import scan as run_scan
    from bdbench.triggers import parse_component

    try:
        import_modules(plugins)
        report = run_scan(weights, model, parse_component(data, "--data"),
                          model_params=parse_model_params(model_params), detectors=detectors, split=split,
                          per_class=per_class, fraction=fraction, seed=seed, mean=parse_channels(mean, "--mean"),
                          std=parse_channels(std, "--std"), output=output, cpu_bfloat16=cpu_bfloat16)
    except BdbenchError:
        raise
    except Exception as exc:  # exit 1 means "flagged": a crash must not read as a finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"error: {type(exc).__name__}: {first} (a bug in bdbench or a plugin; nothing was scanned)",
                   err=True)
        sys.exit(EXIT_USER_ERROR)
    for line in report.lines():
        click.echo(line)
    click.echo(f"report: {report.page}")
    sys.exit(report.exit_code)


@main.command(name="list")
@click.argument("what", type=click.Choice(["configs", "datasets", "models", "attacks", "defenses", "server-defenses",
                                           "client-attacks", "precisions"]))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@_PLUGIN_OPTION
def list_(what: str, fmt: str, plugins: tuple[str, ...]) -> None:
    """List built-in grids or registered datasets, models, attacks, defenses, federated server defenses, federated
    client attacks, precisions (with a plugin's source)."""
    from bdbench.plugins import import_modules

    import_modules(plugins)
    entries = _catalogue(what)
    if fmt == "json":
        click.echo(json.dumps(entries, indent=2))
        return
    width = max(len(e["name"]) for e in entries)
    for entry in entries:
        extra = f"[{entry['kind']}] " if "kind" in entry else ""
        source = f" (plugin: {entry['source']})" if entry.get("source", "bdbench") != "bdbench" else ""
        click.echo(f"{entry['name']:<{width}}  {extra}{entry['description']}{source}")


def _catalogue(what: str) -> list[dict]:
    if what == "configs":
        from bdbench.grid import builtin_configs

        return [{"name": n, "description": d} for n, d in builtin_configs().items()]
    registry: Registry[Any]
    if what == "datasets":
        from bdbench.data import DATASETS as registry
    elif what == "models":
        from bdbench.models import MODELS as registry
    elif what == "attacks":
        from bdbench.attacks import ATTACKS as registry
    elif what == "defenses":
        from bdbench.defenses import DEFENSES as registry
    elif what == "server-defenses":
        from bdbench.federated import SERVER_DEFENSES as registry
    elif what == "client-attacks":
        from bdbench.federated.attacks import CLIENT_ATTACKS as registry
    else:
        from bdbench.precision import PRECISIONS as registry
    entries = []
    for entry in registry:
        item: dict[str, Any] = {"name": entry.name, "description": entry.description,
                                 "source": entry.source}
        if hasattr(entry.obj, "citation"):
            item["citation"] = entry.obj.citation
        if hasattr(entry.obj, "kind"):
            item["kind"] = entry.obj.kind.value
        if what == "models":
            from bdbench.models import count_parameters

            item["params"] = count_parameters(entry.name)  # at 32x32x3, 10 classes, default width
        entries.append(item)
    return entries
