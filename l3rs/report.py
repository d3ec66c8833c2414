"""The evaluation report (report.md + report.html + PNGs) and `l3rs inspect`: what an optimizer learned.

    trace = trace("runs/opt/best", task, steps=200)     # λ [steps, tensors] and μ [steps, tensors, bases]
    write(result, "runs/eval")                         # result: what `l3rs.evaluate.evaluate` returns

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images), so the
Markdown and the HTML always say the same thing; the HTML embeds the PNGs by relative path.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from l3rs.evaluate import EVAL_SEED, aligned, base_horizon  # noqa: E402
from l3rs.finetune import finetune  # noqa: E402
from l3rs.io import save_json  # noqa: E402
from l3rs.optim import L3RS, load_meta  # noqa: E402

Block = tuple  # ("h1"|"h2"|"p", text) | ("list", [items]) | ("table", headers, rows) | ("img", path, alt)
MAX_SMALL_MULTIPLES = 24  # the heatmaps show every tensor; these show a sample


# ------------------------------------------------------------------------------------ coefficient traces
class _Recorder:
    """Handed to `finetune` as the LR scheduler (stepped after every optimizer step): records λ and μ."""

    def __init__(self, opt: L3RS, every: int, total: int) -> None:
        self.opt, self.every, self.total, self.t = opt, every, total, 0
        self.steps: list[int] = []
        self.lr: list[list[float]] = []
        self.mix: list[list[list[float]]] = []

    def step(self) -> None:
        self.t += 1
        if self.t == 1 or self.t % self.every == 0 or self.t == self.total:
            coeffs = self.opt.coefficients()
            self.steps.append(self.t)
            self.lr.append([c["lr"] for c in coeffs.values()])
            self.mix.append([list(c["mix"].values()) for c in coeffs.values()])


def trace(optimizer_dir: str | os.PathLike, task: Any, steps: int, every: int | None = None,
          seed: int = EVAL_SEED, device: Any = None) -> dict[str, Any]:
    """Fine-tune `task` with the saved optimizer for `steps` steps, recording `opt.coefficients()`.

    Returns {"names", "bases", "steps", "lr" [S][T], "mix" [S][T][P], ...}: what each tensor's step size and
    base mix were, and when (the data behind the λ heatmap and the μ plots).
    """
    every = every or max(1, steps // 50)
    box: dict[str, _Recorder] = {}

    def make(named: Any, total_steps: int) -> tuple[L3RS, _Recorder]:
        opt = L3RS.from_pretrained(optimizer_dir, named, total_steps=total_steps)
        box["rec"] = _Recorder(opt, every, total_steps)
        return opt, box["rec"]

    run = finetune(task, make, steps, seed, device=device)
    rec = box["rec"]
    return {"task": task.name, "horizon": steps, "seed": seed, "names": rec.opt.param_names,
            "bases": list(rec.opt.config.bases), "steps": rec.steps, "lr": rec.lr, "mix": rec.mix,
            "diverged": run.diverged, "final_val_loss": run.final_val_loss}


# ------------------------------------------------------------------------------------------------ plots
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


def _train_curve(runs: list[dict[str, Any]], steps: int) -> np.ndarray:
    rows = np.full((len(runs), steps), np.nan)
    for i, r in enumerate(runs):
        values = _arr(r["train_loss"])[:steps]
        rows[i, :len(values)] = values
    return np.nanmean(np.where(np.isfinite(rows), rows, np.nan), axis=0)


def plot_curves(scenario: dict[str, Any], path: Path) -> Path:
    """Training loss, validation loss (log) and accuracy vs steps: mean and ±std band over seeds."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    grid = np.array(scenario["eval_steps"])
    warm = cold = 0
    for name, m in scenario["methods"].items():
        style = _style(name, warm if name.startswith("l3rs") else cold)
        warm, cold = (warm + 1, cold) if name.startswith("l3rs") else (warm, cold + 1)
        window = max(1, scenario["steps"] // 40)
        train = _smooth(_train_curve(m["runs"], scenario["steps"]), window)
        axes[0].plot(np.arange(1, len(train) + 1) + window - 1, train, label=name, **style)
        for ax, key in ((axes[1], "val_loss"), (axes[2], "val_metric")):
            rows = _arr([aligned(r, key, scenario["eval_steps"], np.nan) for r in m["runs"]])
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
    fig.suptitle(f"{scenario['label']}: mean over seeds, band = ±1 std")
    return _save(fig, path)


def _tensor_axis(ax: Any, names: list[str]) -> None:
    step = max(1, math.ceil(len(names) / 80))  # at most ~80 labels, however big the model
    ticks = list(range(0, len(names), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([short(names[i]) for i in ticks], fontsize=7)
    ax.set_ylabel("tensor")


def _height(num_tensors: int) -> float:
    return min(40.0, max(3.5, 0.2 * min(num_tensors, 80) + 1.8))


def plot_lambda(tr: dict[str, Any], path: Path) -> Path:
    """Heatmap of the step size λ (log colour scale) per tensor over the run."""
    lam = _arr(tr["lr"]).T  # [T, S]
    finite = lam[np.isfinite(lam) & (lam > 0)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (1e-8, 1.0)
    lo, hi = (lo / 1.5, hi * 1.5) if hi <= lo * 1.0001 else (lo, hi)
    steps = tr["steps"]
    fig, ax = plt.subplots(figsize=(10, _height(len(tr["names"]))))
    im = ax.imshow(lam, aspect="auto", interpolation="nearest", norm=LogNorm(lo, hi), cmap="viridis",
                   extent=(steps[0], steps[-1], len(tr["names"]) - 0.5, -0.5))
    _tensor_axis(ax, tr["names"])
    ax.set(xlabel="step", title=f"step size λ per tensor ({tr['task']}, horizon {tr['horizon']})")
    fig.colorbar(im, ax=ax, label="λ (per-element step size, log scale)")
    return _save(fig, path)


def plot_mix_heatmap(tr: dict[str, Any], path: Path) -> Path:
    """One heatmap per base: its weight μ per tensor over the run (which layers prefer it, and when)."""
    mix, bases, steps = _arr(tr["mix"]), tr["bases"], tr["steps"]  # mix: [S, T, P]
    fig, axes = plt.subplots(1, len(bases), figsize=(3.2 * len(bases) + 2.5, _height(len(tr["names"]))),
                             sharey=True, squeeze=False)
    lo, hi = min(0.0, np.nanmin(mix)), np.nanmax(mix) + 1e-3  # up to the largest weight: contrast
    for p, (ax, base) in enumerate(zip(axes[0], bases, strict=True)):
        im = ax.imshow(mix[:, :, p].T, aspect="auto", interpolation="nearest", vmin=lo, vmax=hi, cmap="magma",
                       extent=(steps[0], steps[-1], len(tr["names"]) - 0.5, -0.5))
        ax.set(title=f"μ[{base}]", xlabel="step")
    _tensor_axis(axes[0][0], tr["names"])
    fig.colorbar(im, ax=axes[0].tolist(), label="mix weight μ")
    fig.suptitle(f"base mix per tensor over time ({tr['task']})", y=1.03)
    return _save(fig, path)


def plot_mix_area(tr: dict[str, Any], path: Path) -> Path:
    """Small multiples, one per tensor: the mix μ over time as stacked areas (lines for signed mixes)."""
    mix, bases, steps, names = _arr(tr["mix"]), tr["bases"], np.array(tr["steps"]), tr["names"]
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


def plot_trace(tr: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    return {"lambda": plot_lambda(tr, out_dir / "lambda_heatmap.png"),
            "mix": plot_mix_heatmap(tr, out_dir / "mix_heatmap.png"),
            "mix_area": plot_mix_area(tr, out_dir / "mix_area.png")}


# --------------------------------------------------------------------------------------------- tables
def _pm(stats: dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _hp(hp: dict[str, float]) -> str:
    parts = [f"lr={hp['lr']:.2g}"] if "lr" in hp else ["none (meta-trained)"]
    if "head" in hp:
        parts.append(f"head lr ×{hp['head']:g}")
    if "mix" in hp:
        parts.append(f"adam share {hp['mix']:g}")
    return ", ".join(parts)


def _ci(interval: list[float] | None, digits: int = 4, unit: str = "") -> str:
    if interval is None:
        return "—"
    return "[" + ", ".join(_number(v, digits, unit) for v in interval) + "]"


def _number(value: float | None, digits: int, unit: str = "") -> str:
    """A figure as text; a speed-up of 0 means the method never reached the target."""
    if value is None or (unit == "x" and value == 0):
        return "never" if unit == "x" else "—"
    return f"{value:.{digits}g}{unit}" if math.isfinite(value) else "inf"


def vs_best_text(vs: dict[str, Any]) -> tuple[str, str]:
    """(loss ratio with its interval, speed-up with its interval) against the best tuned baseline."""
    return (f"{_number(vs['ratio'], 3)} {_ci(vs['ratio_ci95'], 3)}",
            f"{_number(vs['speedup'], 3, 'x')} {_ci(vs['speedup_ci95'], 3, 'x')}")


def summary_table(sc: dict[str, Any]) -> Block:
    best = sc["best_baseline"]
    headers = ["method", "tuned hyper-parameters", "final val loss", "95% CI", f"loss ratio vs {best} [95% CI]",
               f"speed-up vs {best} [95% CI]", "verdict", "val acc", "test acc",
               f"steps to {best}'s final val loss", "run s", "diverged"]
    rows = []
    for name, m in sc["methods"].items():
        s, sp, vs = m["summary"], m["speedup"], m["vs_best"]
        ratio, speed = vs_best_text(vs) if name != best else ("1 (reference)", "1x (reference)")
        rows.append([f"**{name}**" if name == "l3rs" else name, _hp(m["hp"]), _pm(s["val_loss"]),
                     _ci(s["val_loss"].get("ci95")), ratio, speed, vs["verdict"] if name != best else "—",
                     _pm(s["val_metric"]), _pm(s["test_metric"]), sp["steps_text"], _pm(s["seconds"], 2),
                     f"{s['diverged']}/{s['seeds']}"])
    return ("table", headers, rows)


def cost_table(result: dict[str, Any]) -> Block:
    """Meta-training (paid once) + runs for L3RS vs the LR sweeps every baseline repeats per scenario."""
    meta = result["optimizer"]["meta_train_seconds"]
    headers = ["method", "tuning runs", "tuning steps", "tuning s", "meta-training s", "evaluation runs s",
               "total s"]
    rows = []
    for name in result["scenarios"][0]["methods"]:
        per = [sc["methods"][name] for sc in result["scenarios"]]
        runs = sum(len(m["tuning"]["trials"]) for m in per)
        steps = sum(m["tuning"]["steps"] for m in per)
        tune_s = sum(m["tuning"]["seconds"] for m in per)
        eval_s = sum(r["seconds"] for m in per for r in m["runs"])
        meta_s = meta.get(name, 0.0)
        rows.append([name, str(runs), str(steps), f"{tune_s:.1f}", f"{meta_s:.1f}" if name in meta else "—",
                     f"{eval_s:.1f}", f"{tune_s + meta_s + eval_s:.1f}"])
    return ("table", headers, rows)


VERDICT_WORDS = {"better": "better than", "worse": "worse than", "tie": "tied with"}


def verdict(sc: dict[str, Any]) -> str:
    """One honest sentence per scenario: L3RS against the best tuned baseline, read from the intervals."""
    best, ours = sc["methods"][sc["best_baseline"]]["summary"], sc["methods"]["l3rs"]
    head = f"{sc['label']}: "
    if ours["summary"]["val_loss"]["mean"] is None:
        return head + f"L3RS diverged on every seed; best tuned baseline {sc['best_baseline']} reached " \
                      f"{_pm(best['val_loss'])}."
    vs = ours["vs_best"]
    ratio, speed = vs_best_text(vs)
    caveat = " (one seed: the intervals are empty)" if ours["summary"]["seeds"] < 2 else ""
    return (head + f"L3RS is **{VERDICT_WORDS[vs['verdict']]}** the best tuned baseline {sc['best_baseline']}: "
            f"final val loss {_pm(ours['summary']['val_loss'])} vs {_pm(best['val_loss'])}, ratio {ratio} (95% CI)"
            f"{caveat}; speed-up {speed}; test acc {_pm(ours['summary']['test_metric'])} vs "
            f"{_pm(best['test_metric'])}.")


# -------------------------------------------------------------------------------------------- document
def blocks(result: dict[str, Any], plots: dict[str, str]) -> list[Block]:
    st, info, mach = result["settings"], result["optimizer"]["info"], result["machine"]
    out: list[Block] = [
        ("h1", f"L3RS evaluation: {st['task']}"),
        ("p", f"Optimizer `{st['optimizer']}` (meta-trained on {info.get('task', 'an unrecorded task')}"
              + (f" by {info['estimator']}" if info.get("estimator") else "")
              + f", horizon {st['base_horizon']} steps, "
              f"{result['optimizer']['meta_train_seconds'].get('l3rs', 0.0):.0f} s of meta-training). "
              f"Horizons ×{', ×'.join(f'{h:g}' for h in st['horizons'])}; {st['seeds']} evaluation seeds "
              f"({st['eval_seeds'][0]}…, shared by every method); baselines tuned on the mean of seeds "
              f"{', '.join(str(s) for s in st['tune_seeds'])}. "
              f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, torch {mach['torch']}, "
              f"device {st['device']}. Total time {result['seconds']:.0f} s."),
        ("h2", "Verdict"),
        ("list", [verdict(sc) for sc in result["scenarios"]]),
    ]
    for i, sc in enumerate(result["scenarios"]):
        out += [("h2", f"{sc['label']} ({sc['steps']} steps)"), summary_table(sc),
                ("img", plots[f"curves{i}"], f"curves: {sc['label']}")]
    out += [("h2", "Cost"),
            ("p", "Seconds on this machine, summed over all scenarios. L3RS pays meta-training once; every "
                  "baseline repeats its LR sweep for each new horizon and dataset. A head-LR variant's "
                  "tuning includes the one-LR sweep it starts from."),
            cost_table(result),
            ("h2", "What the optimizer learned"),
            ("p", f"Coefficients of `l3rs` over one run on {result['trace']['task']} "
                  f"({result['trace']['horizon']} steps, seed {result['trace']['seed']})."),
            ("img", plots["lambda"], "step size per tensor"),
            ("img", plots["mix"], "mix per tensor and base"),
            ("img", plots["mix_area"], "mix per tensor over time"),
            ("h2", "Protocol"),
            ("list", ["LRs tuned on the validation split at the evaluated horizon by a log grid "
                      f"(SGD {_grid(st['grids']['sgd'])}, Adam-like {_grid(st['grids']['adam'])}; "
                      "extended past an edge when the best LR sits on it); then head LR × "
                      f"{', '.join(f'{m:g}' for m in st['head_multipliers'])} or the ATMO Adam share "
                      f"{', '.join(f'{m:g}' for m in st['atmo_mixes'])} at the best LR.",
                      "Speed-up: steps the best tuned baseline needs to reach its own final validation loss "
                      "(mean curve over seeds) / steps the method needs; '>T' = never within the run.",
                      f"Intervals: 95% paired bootstrap over the evaluation seeds ({st['bootstrap']['resamples']} "
                      f"resamples, seed {st['bootstrap']['seed']}); loss ratio = method's mean final validation "
                      "loss / the best tuned baseline's; verdict better if the ratio's whole interval is below 1, "
                      "worse if above 1, else tie; speed-up 'never' = not within the run.",
                      f"Validation on the task's whole validation split, at least {st['min_eval_points']} "
                      "points per run (every step for shorter runs).",
                      "accuracy = the task's metric (accuracy unless the task sets metric_fn).",
                      "Every curve and setting is in evaluation.json."])]
    return out


def _grid(values: list[float]) -> str:
    return f"{min(values):.0e}…{max(values):.0e}"


def to_markdown(doc: list[Block]) -> str:
    lines: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def _html_inline(text: str) -> str:
    """Escape, then render the two Markdown marks we use (**bold**, `code`)."""
    parts = html.escape(text).split("**")
    text = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(doc: list[Block], title: str) -> str:
    body: list[str] = []
    for block in doc:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_html_inline(block[1])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_html_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_html_inline(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_html_inline(c)}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(block[1])}" alt="{html.escape(block[2])}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write(result: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Draw the plots and write report.md and report.html into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plots = {f"curves{i}": plot_curves(sc, plot_dir / f"curves_{i}.png")
             for i, sc in enumerate(result["scenarios"])}
    plots.update(plot_trace(result["trace"], plot_dir))
    rel = {k: p.relative_to(out_dir).as_posix() for k, p in plots.items()}
    doc = blocks(result, rel)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(doc))
    page.write_text(to_html(doc, f"L3RS evaluation: {result['settings']['task']}"))
    return md, page


# ---------------------------------------------------------------------------------------------- inspect
def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("optimizer", help="directory of a saved L3RS optimizer")
    parser.add_argument("--task", default=None, help="task to run it on (default: its meta-training task)")
    parser.add_argument("--out", default=None, help="where to write the plots (default: OPTIMIZER/inspect)")
    parser.add_argument("--steps", type=int, default=None, help="run length (default: meta-training horizon)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from l3rs import tasks
    from l3rs.cli import UsageError

    info = load_meta(args.optimizer)["info"]
    spec = args.task or info.get("task")
    if not spec:
        raise UsageError(f"{args.optimizer} does not say which task it was meta-trained on: pass --task")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    task = tasks.get(spec)
    tr = trace(args.optimizer, task, args.steps or base_horizon(info, task), device=args.device)
    out = Path(args.out) if args.out else Path(args.optimizer) / "inspect"
    out.mkdir(parents=True, exist_ok=True)
    paths = [*plot_trace(tr, out).values(), save_json(tr, out / "trace.json")]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read an evaluation.json back (non-finite numbers come back as None; the plots accept that)."""
    return json.loads(Path(path).read_text())
