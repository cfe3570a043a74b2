"""Runs from a table (`megadiff sweep fit --csv FILE`) and exclusion rules (`--exclude`, `--exclude-top`).

CSV columns (header row, any order; names are case-insensitive):

    N, D, loss                       required: parameters, training tokens, final validation loss (nats/token)
    objective                        default "csv" (compared MDM-vs-AR only when the names are megadiff objectives)
    budget                           the IsoFLOP group; default C (below) rounded to 2 significant digits
    C                                training FLOPs in the kernel convention; default unknown (6 N D is used)
    unique_tokens, epochs            data-constrained runs (either one gives the other: D = U x epochs)
    name                             default row<i>

N is taken as the count the 6 N D convention uses (non-embedding parameters, as in SMDM and
Kaplan et al.): ``C_6nd = 6 N D``. Every fit writes its runs as ``runs.csv`` in this format, so a
sweep's table can be refitted, merged with published grids, or trimmed by hand.
"""

from __future__ import annotations

import csv
import fnmatch
import math
from pathlib import Path
from typing import Sequence

from megadiff import MegadiffError
from megadiff.sweeps.fit import Observation

REQUIRED = ("n", "d", "loss")
OPTIONAL = ("objective", "budget", "c", "unique_tokens", "epochs", "name")


def _num(row: dict, key: str, where: str) -> float | None:
    v = (row.get(key) or "").strip()
    if not v:
        return None
    try:
        x = float(v)
    except ValueError:
        raise MegadiffError(f"{where}: column {key!r} is {v!r}, not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise MegadiffError(f"{where}: column {key!r} must be a positive finite number, got {v!r}")
    return x


def _round2(x: float) -> float:
    return float(f"{x:.2g}")


def read_csv(path: str | Path) -> list[Observation]:
    p = Path(path)
    if not p.is_file():
        raise MegadiffError(f"--csv {str(p)!r} not found")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise MegadiffError(f"{p}: empty file; the first row must name the columns (N, D, loss, ...)")
        cols = [c.strip().lower() for c in reader.fieldnames]
        missing = [c for c in REQUIRED if c not in cols]
        unknown = [c for c in cols if c not in REQUIRED + OPTIONAL]
        if missing or unknown:
            raise MegadiffError(f"{p}: columns {reader.fieldnames}: "
                                + (f"missing {', '.join(missing)}; " if missing else "")
                                + (f"unknown {', '.join(unknown)}; " if unknown else "")
                                + f"expected N, D, loss and optionally {', '.join(OPTIONAL)}")
        rows = [{k.strip().lower(): v for k, v in r.items()} for r in reader]
    obs = []
    for i, row in enumerate(rows):
        where = f"{p} row {i + 2}"
        n, d, loss = (_num(row, k, where) for k in REQUIRED)
        if n is None or d is None or loss is None:
            raise MegadiffError(f"{where}: N, D and loss are required")
        u, ep = _num(row, "unique_tokens", where), _num(row, "epochs", where)
        if u is not None and ep is not None and abs(u * ep / d - 1) > 0.01:
            raise MegadiffError(f"{where}: unique_tokens x epochs = {u * ep:.4g} but D = {d:.4g}")
        u = u if u is not None else (d / ep if ep is not None else d)
        c6 = 6.0 * n * d
        c = _num(row, "c", where) or 0.0
        budget = _num(row, "budget", where) or _round2(c or c6)
        obs.append(Observation((row.get("name") or "").strip() or f"row{i + 2}",
                               (row.get("objective") or "").strip() or "csv", budget, n, d, c, loss,
                               c_6nd=c6, unique_tokens=u, epochs=d / u))
    if not obs:
        raise MegadiffError(f"{p}: no rows")
    return obs


def write_csv(obs: Sequence[Observation], path: str | Path) -> Path:
    """The runs in the --csv format (N as the fit used it; C in the kernel convention when known)."""
    import io

    from megadiff.utils.io import atomic_write_text

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["name", "objective", "budget", "N", "D", "loss", "C", "unique_tokens", "epochs"])
    for o in obs:
        w.writerow([o.name, o.objective] + [repr(float(x)) for x in (o.budget, o.n, o.d, o.loss)]
                   + [repr(float(o.c)) if o.c else "", repr(float(o.unique_tokens or o.d)), repr(float(o.epochs))])
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def exclude(obs: Sequence[Observation], names: Sequence[str] = (), top: int = 0
            ) -> tuple[list[Observation], list[tuple[Observation, str]]]:
    """(kept, [(excluded, why)]): runs matching a name/glob, and the `top` highest losses per objective."""
    out: list[tuple[Observation, str]] = []
    all_names = [o.name for o in obs]
    for pat in names:
        if not fnmatch.filter(all_names, pat):
            raise MegadiffError(f"--exclude {pat!r} matches no run; the runs are: {', '.join(all_names)}")
    for o in obs:
        hit = next((pat for pat in names if fnmatch.fnmatch(o.name, pat)), None)
        if hit is not None:
            out.append((o, f"--exclude {hit}"))
    gone = {id(o) for o, _ in out}
    if top > 0:
        for obj in sorted({o.objective for o in obs}):
            rows = sorted((o for o in obs if o.objective == obj and id(o) not in gone), key=lambda o: -o.loss)
            for o in rows[:top]:
                out.append((o, f"--exclude-top {top} ({obj})"))
                gone.add(id(o))
    return [o for o in obs if id(o) not in gone], out
