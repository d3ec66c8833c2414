"""The report's figures: validation curves with seed bands, and what an optimizer learned (λ and μ per
tensor over a run). Every function reads records (`l3rs.results`) and writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from l3rs.finetune import RunResult  # noqa: E402
from l3rs.results import ScenarioResult, Trace, aligned  # noqa: E402

MAX_SMALL_MULTIPLES = 24  # the heatmaps show every tensor; these show a sample


def short(name: str, width: int = 30) -> str:
    """A tensor name that fits a tick label: abbreviate module names from the left to 3 letters, keeping
    block indices and the final weight/bias (so `_blocks.12._depthwise_conv.weight` stays telling)."""
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= width:
            break
        parts[i] = parts[i] if parts[i].isdigit() else parts[i].strip("_")[:3]
    name = ".".join(parts)
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _arr(values: Any) -> np.ndarray:
    """Float array from (nested) lists that may hold None (how JSON stores non-finite numbers)."""
    return np.array(_denone(values), dtype=float)


def _denone(x: Any) -> Any:
    return [_denone(v) for v in x] if isinstance(x, (list, tuple)) else (np.nan if x is None else x)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _style(name: str, index: int) -> dict[str, Any]:
    """L3RS variants: solid and thick in warm colours; baselines: dashed in the tab10 cycle."""
    if name.startswith("l3rs"):
        warm = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2", "#bcbd22"]
        return {"color": warm[index % len(warm)], "lw": 2.2 if name == "l3rs" else 1.6, "ls": "-"}
    return {"color": plt.get_cmap("tab10")(index % 10), "lw": 1.2, "ls": "--"}


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(x) < window:
        return x
    return np.convolve(x, np.ones(window) / window, mode="valid")


def _train_curve(runs: list[RunResult], steps: int) -> np.ndarray:
    rows = np.full((len(runs), steps), np.nan)
    for i, r in enumerate(runs):
        values = _arr(r.train_loss)[:steps]
        rows[i, :len(values)] = values
    return np.nanmean(np.where(np.isfinite(rows), rows, np.nan), axis=0)


def plot_curves(scenario: ScenarioResult, path: Path) -> Path:
    """Training loss, validation loss (log) and accuracy vs steps: mean and ±std band over seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    grid = np.array(scenario.eval_steps)
    warm = cold = 0
    for name, method in scenario.methods.items():
        style = _style(name, warm if name.startswith("l3rs") else cold)
        warm, cold = (warm + 1, cold) if name.startswith("l3rs") else (warm, cold + 1)
        window = max(1, scenario.steps // 40)
        train = _smooth(_train_curve(method.runs, scenario.steps), window)
        axes[0].plot(np.arange(1, len(train) + 1) + window - 1, train, label=name, **style)
        for ax, key in ((axes[1], "val_loss"), (axes[2], "val_metric")):
            rows = _arr([aligned(r, key, scenario.eval_steps, np.nan) for r in method.runs])
            rows[~np.isfinite(rows)] = np.nan  # diverged seeds drop out of the band
            mean, std = np.nanmean(rows, axis=0), np.nanstd(rows, axis=0)
            ax.plot(grid, mean, label=name, **style)
            ax.fill_between(grid, mean - std, mean + std, color=style["color"], alpha=0.12, lw=0)
    for ax, title, ylabel, log in ((axes[0], "training loss (smoothed)", "loss", True),
                                   (axes[1], "validation loss", "loss", True),
                                   (axes[2], "validation accuracy", "accuracy (task metric)", False)):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[2].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"{scenario.label}: mean over seeds, band = ±1 std")
    return _save(fig, path)


def _tensor_axis(ax: Any, names: list[str]) -> None:
    step = max(1, math.ceil(len(names) / 80))  # at most ~80 labels, however big the model
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([short(names[i]) for i in ticks], fontsize=7)
    ax.set_ylabel("tensor")


def _height(num_tensors: int) -> float:
    return min(40.0, max(3.5, 0.2 * min(num_tensors, 80) + 1.8))


def plot_lambda(trace: Trace, path: Path) -> Path:
    """Heatmap of the step size λ (log colour scale) per tensor over the run."""
    lam = _arr(trace.lr).T  # [T, S]
    finite = lam[np.isfinite(lam) & (lam > 0)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (1e-8, 1.0)
    lo, hi = (lo / 1.5, hi * 1.5) if hi <= lo * 1.0001 else (lo, hi)
    steps = trace.steps
    fig, ax = plt.subplots(figsize=(10, _height(len(trace.names))))
    im = ax.imshow(lam, aspect="auto", interpolation="nearest", norm=LogNorm(lo, hi), cmap="viridis",
                   extent=(steps[0], steps[-1], len(trace.names) - 0.5, -0.5))
    _tensor_axis(ax, trace.names)
    ax.set(xlabel="step", title=f"step size λ per tensor ({trace.task}, horizon {trace.horizon})")
    fig.colorbar(im, ax=ax, label="λ (per-element step size, log scale)")
    return _save(fig, path)


def plot_mix_heatmap(trace: Trace, path: Path) -> Path:
    """One heatmap per base: its weight μ per tensor over the run (which layers prefer it, and when)."""
    mix, bases, steps = _arr(trace.mix), trace.bases, trace.steps  # mix: [S, T, P]
    fig, axes = plt.subplots(1, len(bases), figsize=(3.2 * len(bases) + 2.5, _height(len(trace.names))),
                             sharey=True, squeeze=False)
    lo, hi = min(0.0, np.nanmin(mix)), np.nanmax(mix) + 1e-3  # up to the largest weight: contrast
    for p, (ax, base) in enumerate(zip(axes[0], bases, strict=True)):
        im = ax.imshow(mix[:, :, p].T, aspect="auto", interpolation="nearest", vmin=lo, vmax=hi, cmap="magma",
                       extent=(steps[0], steps[-1], len(trace.names) - 0.5, -0.5))
        ax.set(title=f"μ[{base}]", xlabel="step")
    _tensor_axis(axes[0][0], trace.names)
    fig.colorbar(im, ax=axes[0].tolist(), label="mix weight μ")
    fig.suptitle(f"base mix per tensor over time ({trace.task})", y=1.03)
    return _save(fig, path)


def plot_mix_area(trace: Trace, path: Path) -> Path:
    """Small multiples, one per tensor: the mix μ over time as stacked areas (lines for signed mixes)."""
    mix, bases, steps, names = _arr(trace.mix), trace.bases, np.array(trace.steps), trace.names
    count = min(len(names), MAX_SMALL_MULTIPLES)
    picks = np.unique(np.linspace(0, len(names) - 1, count).round().astype(int))
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.3 * rows + 0.8), sharex=True, squeeze=False)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(bases))]
    for ax, t in zip(axes.flat, picks, strict=False):
        series = mix[:, t, :].T
        if np.nanmin(series) >= 0:
            ax.stackplot(steps, series, labels=bases, colors=colors)
            ax.set_ylim(0, 1)
        else:
            for p, base in enumerate(bases):
                ax.plot(steps, series[p], label=base, color=colors[p])
        ax.set_title(short(names[t], 36), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(picks):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("μ")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.91, 0.5), title="base")
    shown = "" if len(picks) == len(names) else f" ({len(picks)} of {len(names)} tensors, evenly spaced)"
    fig.subplots_adjust(hspace=0.45, wspace=0.25, top=1 - 0.6 / fig.get_figheight())
    fig.suptitle(f"mix μ per tensor over time{shown}")
    return _save(fig, path)


def plot_trace(trace: Trace, out_dir: Path) -> dict[str, Path]:
    return {"lambda": plot_lambda(trace, out_dir / "lambda_heatmap.png"),
            "mix": plot_mix_heatmap(trace, out_dir / "mix_heatmap.png"),
            "mix_area": plot_mix_area(trace, out_dir / "mix_area.png")}


