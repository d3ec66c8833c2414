"""The report's tables and verdict sentences, as text from records (no figure is computed here)."""

from __future__ import annotations

import math

from l3rs.results import EvaluationResult, ScenarioResult, Stat, VsBest

Block = tuple  # ("h1"|"h2"|"p", text) | ("list", [items]) | ("table", headers, rows) | ("img", path, alt)
VERDICT_WORDS = {"better": "better than", "worse": "worse than", "tie": "tied with"}


def plus_minus(stat: Stat, digits: int = 4) -> str:
    return "—" if stat.mean is None else f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def _hp(hp: dict[str, float], kind: str) -> str:
    untuned = "none (meta-trained)" if kind == "l3rs" else "none (package defaults)"
    parts = [f"lr={hp['lr']:.2g}"] if "lr" in hp else [untuned]
    if "head" in hp:
        parts.append(f"head lr ×{hp['head']:g}")
    if "mix" in hp:
        parts.append(f"adam share {hp['mix']:g}")
    return ", ".join(parts)


def _number(value: float | None, digits: int, unit: str = "") -> str:
    """A figure as text; a speed-up of 0 means the method never reached the target."""
    if value is None or (unit == "x" and value == 0):
        return "never" if unit == "x" else "—"
    return f"{value:.{digits}g}{unit}" if math.isfinite(value) else "inf"


def _interval(bounds: list[float | None] | None, digits: int = 4, unit: str = "") -> str:
    return "—" if bounds is None else "[" + ", ".join(_number(v, digits, unit) for v in bounds) + "]"


def vs_best_text(vs: VsBest) -> tuple[str, str]:
    """(loss ratio with its interval, speed-up with its interval) against the best tuned baseline."""
    return (f"{_number(vs.ratio, 3)} {_interval(vs.ratio_ci95, 3)}",
            f"{_number(vs.speedup, 3, 'x')} {_interval(vs.speedup_ci95, 3, 'x')}")


def summary_table(scenario: ScenarioResult) -> Block:
    best = scenario.best_baseline
    headers = ["method", "tuned hyper-parameters", "final val loss", "95% CI", f"loss ratio vs {best} [95% CI]",
               f"speed-up vs {best} [95% CI]", "verdict", "val acc", "test acc",
               f"steps to {best}'s final val loss", "run s", "diverged"]
    rows = []
    for name, method in scenario.methods.items():
        summary = method.summary
        ratio, speed = vs_best_text(method.vs_best) if name != best else ("1 (reference)", "1x (reference)")
        verdict_text = method.vs_best.verdict if name != best else "—"
        rows.append([f"**{name}**" if name == "l3rs" else name, _hp(method.hp, method.kind),
                     plus_minus(summary.val_loss), _interval(summary.val_loss.ci95), ratio, speed, verdict_text,
                     plus_minus(summary.val_metric), plus_minus(summary.test_metric), method.speedup.steps_text,
                     plus_minus(summary.seconds, 2), f"{summary.diverged}/{summary.seeds}"])
    return ("table", headers, rows)


def cost_table(result: EvaluationResult) -> Block:
    """Meta-training (paid once) + runs for L3RS vs the LR sweeps every baseline repeats per scenario."""
    meta = result.optimizer.meta_train_seconds
    headers = ["method", "tuning runs", "tuning steps", "tuning s", "meta-training s", "evaluation runs s",
               "total s"]
    rows = []
    for name in result.scenarios[0].methods:
        per = [scenario.methods[name] for scenario in result.scenarios]
        runs = sum(len(t.val_losses) for m in per for t in m.tuning.trials)
        steps = sum(m.tuning.steps for m in per)
        tune_s = sum(m.tuning.seconds for m in per)
        eval_s = sum(r.seconds for m in per for r in m.runs)
        meta_s = meta.get(name, 0.0)
        rows.append([name, str(runs), str(steps), f"{tune_s:.1f}", f"{meta_s:.1f}" if name in meta else "—",
                     f"{eval_s:.1f}", f"{tune_s + meta_s + eval_s:.1f}"])
    return ("table", headers, rows)


def verdict(scenario: ScenarioResult) -> str:
    """One honest sentence per scenario: L3RS against the best tuned baseline, read from the intervals."""
    best, ours = scenario.methods[scenario.best_baseline].summary, scenario.methods["l3rs"]
    head = f"{scenario.label}: "
    if ours.summary.val_loss.mean is None:
        return head + f"L3RS diverged on every seed; best tuned baseline {scenario.best_baseline} reached " \
                      f"{plus_minus(best.val_loss)}."
    ratio, speed = vs_best_text(ours.vs_best)
    caveat = " (one seed: the intervals are empty)" if ours.summary.seeds < 2 else ""
    text = (head + f"L3RS is **{VERDICT_WORDS[ours.vs_best.verdict]}** the best tuned baseline "
            f"{scenario.best_baseline}: final val loss {plus_minus(ours.summary.val_loss)} vs "
            f"{plus_minus(best.val_loss)}, ratio {ratio} (95% CI){caveat}; speed-up {speed}; test acc "
            f"{plus_minus(ours.summary.test_metric)} vs {plus_minus(best.test_metric)}.")
    lowest, vs = scenario.lowest_baseline, scenario.vs_lowest
    if lowest is not None and vs is not None:
        ratio, speed = vs_best_text(vs)
        text += (f" The lowest loss of any baseline is {lowest}'s (outside the tuned pool), "
                 f"{plus_minus(scenario.methods[lowest].summary.val_loss)}: L3RS is "
                 f"{VERDICT_WORDS[vs.verdict]} it, ratio {ratio}, speed-up {speed}.")
    return text
