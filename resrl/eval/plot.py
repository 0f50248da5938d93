"""pass@k curves: load them from evaluation summaries and plot several overlaid.

Plots are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot, so no
global backend or figure state is touched and this works headless and from any thread.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from resrl.errors import InputError

_PASS_RE = re.compile(r"pass@(\d+)")


def pass_at_k_points(curve: dict[str, float], label: str = "curve") -> list[tuple[int, float]]:
    """The (k, value) pairs of a summary's top-level ``pass@k`` keys, sorted by k.

    Per-source keys such as ``"arith/pass@1"`` are ignored. ``label`` names the curve in errors.
    """
    if not isinstance(curve, dict):
        raise TypeError(f"curve {label!r} must be a dict of metrics, got {type(curve).__name__}")
    points = []
    for key, value in curve.items():
        m = _PASS_RE.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"curve {label!r}: {key} must be a finite number, got {value!r}")
        points.append((int(m.group(1)), float(value)))
    if not points:
        raise InputError(f"curve {label!r} has no 'pass@k' keys (keys: {sorted(curve)[:12]})")
    return sorted(points)


def plot_pass_at_k(
    curves: dict[str, dict[str, float]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    bands: dict[str, dict[str, float]] | None = None,
) -> Path:
    """Plot pass@k against k (log2 axis) for every curve, overlaid and labelled; save a PNG at ``path``.

    ``curves`` maps a legend label to a summary dict holding ``"pass@k"`` keys (other keys are
    ignored). ``bands`` optionally maps some of those labels to a ± spread per ``"pass@k"`` key
    (e.g. the std over seeds), drawn as a shaded band. Returns the path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves must be a non-empty dict {label: summary with pass@k keys}")
    bands = bands or {}
    unknown = sorted(set(bands) - set(curves))
    if unknown:
        raise ValueError(f"bands given for labels {unknown} that are not curves ({sorted(curves)})")

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ks: set[int] = set()
    for label, curve in curves.items():
        points = pass_at_k_points(curve, label)
        ks = [k for k, _ in points]
        values = [v for _, v in points]
        all_ks.update(ks)
        (line,) = ax.plot(ks, values, marker="o", markersize=3, label=str(label))
        if label in bands:
            spread = _band(bands[label], ks, label)
            ax.fill_between(
                ks,
                [v - s for v, s in zip(values, spread, strict=True)],
                [v + s for v, s in zip(values, spread, strict=True)],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    ax.set_xscale("log", base=2)
    ticks = sorted(all_ks)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ticks])
    if len(ticks) == 1:
        ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _band(band: dict[str, float], ks: list[int], label: str) -> list[float]:
    if not isinstance(band, dict):
        raise TypeError(f"bands[{label!r}] must be a dict of pass@k spreads, got {type(band).__name__}")
    spread = []
    for k in ks:
        value = band.get(f"pass@{k}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"bands[{label!r}]['pass@{k}'] must be a finite number >= 0, got {value!r}")
        spread.append(float(value))
    return spread


class _CurveFileNotFound(InputError, FileNotFoundError):
    """A summary path that names no file."""


def load_curve(path: str | os.PathLike) -> dict[str, float]:
    """The numeric metrics of an evaluation summary JSON, for ``plot_pass_at_k``.

    ``path`` is an evaluator ``<name>_summary.json``, or ``"<file>:<key>"`` to take the dict under
    ``key`` of a JSON object, e.g. ``"runs/x/summary.json:eval_after"`` for a trainer summary.
    Non-numeric entries are dropped; the result must hold at least one ``pass@k`` key.
    """
    file, key = Path(path), None
    if not file.is_file() and isinstance(path, str) and ":" in path:
        name, key = path.rsplit(":", 1)
        file = Path(name)
    if not file.is_file():
        raise _CurveFileNotFound(f"summary file not found: {file} (from {str(path)!r})")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{file}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: expected a JSON object, got {type(data).__name__}")
    if key is not None:
        if not isinstance(data.get(key), dict):
            options = sorted(k for k, v in data.items() if isinstance(v, dict))
            raise InputError(f"{file}: no metrics object under {key!r}; objects here: {options}")
        data = data[key]
    curve = {k: float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not any(_PASS_RE.fullmatch(k) for k in curve):
        options = sorted(k for k, v in data.items() if isinstance(v, dict))
        hint = f"; pick one of {options} with '{file}:<key>'" if options else ""
        raise InputError(f"{file}{':' + key if key else ''}: no 'pass@k' metrics{hint}")
    return curve
