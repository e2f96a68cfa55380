"""Compare the stored rows of two output folders, e.g. one grid run before and after a refactoring that must not
change results.

    python tools/compare_results.py OLD_OUT NEW_OUT

Rows are matched by experiment id. Every column that both databases hold is compared value for value (numbers
exactly, as stored), except the measurements of the run itself (timings, memory, when it finished, whether the
victim came from the cache), which differ from run to run and are only listed. Columns that one side lacks
(added or removed in between) are listed too. The databases are read with sqlite3 alone, so that folders written
by any version of bdbench can be compared. Exits 1 when an id or a compared value differs.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from pathlib import Path

# What each run measures about itself rather than about the experiment.
RUN_MEASUREMENTS = ("wall_s", "victim_train_s", "defense_s", "defense_method_s", "defense_retrain_s",
                    "defense_scoring_s", "peak_rss_mb", "finished_at", "victim_cached")


def read_rows(folder: Path) -> tuple[list[str], dict[str, dict[str, object]]]:
    """The column names and the rows (by experiment id) of `folder`'s results database, opened read-only."""
    path = folder / "results.sqlite"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; pass an output folder of `bdbench run`")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        cursor = db.execute("SELECT * FROM experiments")
        columns = [d[0] for d in cursor.description]
        rows = {row[0]: dict(zip(columns, row)) for row in cursor}
    return columns, rows


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare(old: Path, new: Path, common_only: bool = False, ignore: tuple[str, ...] = RUN_MEASUREMENTS) -> list[str]:
    """Print the comparison; return the differences: compared values, and ids held by one folder only unless
    `common_only` (runs that did not both finish)."""
    old_columns, old_rows = read_rows(old)
    new_columns, new_rows = read_rows(new)
    problems = []
    for label, ids in (("only in the old folder", old_rows.keys() - new_rows.keys()),
                       ("only in the new folder", new_rows.keys() - old_rows.keys())):
        if ids:
            print(f"{len(ids)} experiment(s) {label}: {', '.join(sorted(ids))}")
    common = sorted(old_rows.keys() & new_rows.keys())
    print(f"{len(common)} experiment(s) in both")
    for label, cols in (("columns only in the old folder", [c for c in old_columns if c not in new_columns]),
                        ("columns only in the new folder", [c for c in new_columns if c not in old_columns])):
        if cols:
            print(f"{label} (not compared): {', '.join(cols)}")
    compared = [c for c in old_columns if c in new_columns and c not in ignore]
    print(f"{len(compared)} columns compared; run measurements not compared: "
          f"{', '.join(c for c in ignore if c in old_columns and c in new_columns)}")
    for column in compared:
        differing = [i for i in common if not same(old_rows[i][column], new_rows[i][column])]
        for i in differing:
            problems.append(f"{i} {column}: {old_rows[i][column]!r} -> {new_rows[i][column]!r}")
    if not common_only:
        problems += [f"{i} is stored in one folder only" for i in sorted(old_rows.keys() ^ new_rows.keys())]
    for line in problems:
        print("DIFFERS", line)
    print("identical" if not problems else f"{len(problems)} difference(s)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--common-only", action="store_true",
                        help="compare only the experiments both folders hold (runs that did not finish)")
    args = parser.parse_args(argv)
    return 1 if compare(args.old, args.new, args.common_only) else 0


if __name__ == "__main__":
    sys.exit(main())
