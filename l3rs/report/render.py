"""The evaluation report: report.md + report.html + PNGs, from an `EvaluationResult`.

Both documents are rendered from one list of blocks (headings, paragraphs, tables, images), so the
Markdown and the HTML always say the same thing; the HTML embeds the PNGs by relative path.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from l3rs.report.plots import plot_curves, plot_trace
from l3rs.report.tables import Block, cost_table, summary_table, verdict
from l3rs.results import EvaluationResult


def blocks(result: EvaluationResult, plots: dict[str, str]) -> list[Block]:
    """The whole report as blocks (Markdown and HTML are both rendered from them)."""
    settings, info, mach = result.settings, result.optimizer.info, result.machine
    out: list[Block] = [
        ("h1", f"L3RS evaluation: {settings.task}"),
        ("p", f"Optimizer `{settings.optimizer}` (meta-trained on {info.get('task', 'an unrecorded task')}"
              + (f" by {info['estimator']}" if info.get("estimator") else "")
              + f", horizon {settings.base_horizon} steps, "
              f"{result.optimizer.meta_train_seconds.get('l3rs', 0.0):.0f} s of meta-training). "
              f"Horizons ×{', ×'.join(f'{h:g}' for h in settings.horizons)}; {settings.seeds} evaluation seeds "
              f"({settings.eval_seeds[0]}…, shared by every method); baselines tuned on the mean of seeds "
              f"{', '.join(str(s) for s in settings.tune_seeds)}. "
              f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, torch {mach['torch']}, "
              f"device {settings.device}. Total time {result.seconds:.0f} s."),
        *_reused(result),
        ("h2", "Verdict"),
        ("list", [verdict(scenario) for scenario in result.scenarios]),
    ]
    for i, scenario in enumerate(result.scenarios):
        examples = f", {scenario.train_size} training examples" if scenario.train_size else ""
        out += [("h2", f"{scenario.label} ({scenario.steps} steps{examples})"), summary_table(scenario),
                ("img", plots[f"curves{i}"], f"curves: {scenario.label}")]
    out += [("h2", "Cost"),
            ("p", "Seconds on this machine, summed over all scenarios. L3RS pays meta-training once; every "
                  "baseline repeats its LR sweep for each new horizon and dataset. A head-LR variant's "
                  "tuning includes the one-LR sweep it starts from."),
            cost_table(result),
            ("h2", "What the optimizer learned"),
            ("p", f"Coefficients of `l3rs` over one run on {result.trace.task} "
                  f"({result.trace.horizon} steps, seed {result.trace.seed})."),
            ("img", plots["lambda"], "step size per tensor"),
            ("img", plots["mix"], "mix per tensor and base"),
            ("img", plots["mix_area"], "mix per tensor over time"),
            ("h2", "Protocol"),
            ("list", ["LRs tuned on the validation split at the evaluated horizon by a log grid "
                      f"(SGD {_grid(settings.grids['sgd'])}, Adam-like {_grid(settings.grids['adam'])}; "
                      "extended past an edge when the best LR sits on it); then head LR × "
                      f"{', '.join(f'{m:g}' for m in settings.head_multipliers)} or the ATMO Adam share "
                      f"{', '.join(f'{m:g}' for m in settings.atmo_mixes)} at the best LR.",
                      "LR-free baselines (schedulefree-adamw, prodigy, dog, ldog) run at their packages' "
                      "defaults without a sweep; for schedule-free and averaged optimizers the evaluated weights "
                      "are the averaged ones.",
                      "Speed-up: steps the best tuned baseline needs to reach its own final validation loss "
                      "(mean curve over seeds) / steps the method needs; '>T' = never within the run.",
                      f"Intervals: 95% paired bootstrap over the evaluation seeds ({settings.bootstrap['resamples']} "
                      f"resamples, seed {settings.bootstrap['seed']}); loss ratio = method's mean final validation "
                      "loss / the best tuned baseline's; verdict better if the ratio's whole interval is below 1, "
                      "worse if above 1, else tie; speed-up 'never' = not within the run.",
                      f"Validation on the task's whole validation split, at least {settings.min_eval_points} "
                      "points per run (every step for shorter runs).",
                      "accuracy = the task's metric (accuracy unless the task sets metric_fn).",
                      "Every curve and setting is in evaluation.json."])]
    return out


def _reused(result: EvaluationResult) -> list[Block]:
    """One paragraph naming the baselines taken from a previous evaluation (nothing when none was given)."""
    settings = result.settings
    if settings.baselines_from is None:
        return []
    names = ", ".join(settings.reused) or "none matched this evaluation's scenarios, seeds and grids"
    return [("p", f"Baselines reused from `{settings.baselines_from}` (tuning and runs as recorded there, "
                  f"their seconds included; not run again): {names}.")]


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


def write(result: EvaluationResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Draw the plots and write report.md and report.html into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plots = {f"curves{i}": plot_curves(scenario, plot_dir / f"curves_{i}.png")
             for i, scenario in enumerate(result.scenarios)}
    plots.update(plot_trace(result.trace, plot_dir))
    rel = {k: p.relative_to(out_dir).as_posix() for k, p in plots.items()}
    doc = blocks(result, rel)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(doc))
    page.write_text(to_html(doc, f"L3RS evaluation: {result.settings.task}"))
    return md, page
