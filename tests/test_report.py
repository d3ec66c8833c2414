"""Report: coefficient traces, plots, Markdown/HTML rendering and `l3rs inspect`."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import l3rs
from l3rs import report, results
from l3rs.cli import main
from l3rs.evaluate import evaluate
from l3rs.evaluate.stats import summarize
from l3rs.mixer import depth
from l3rs.report import plots, render
from l3rs.results import EVAL_SEED, Trace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def opt_dir(tiny: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An optimizer whose coefficients move with the features (non-zero last mixer layer)."""
    task = l3rs.tasks.get(tiny)
    named = list(task.model_fn(0).named_parameters())
    config = l3rs.Config()
    meta = config.init_meta(len(named), seed=1)
    last = f"layers.{depth(meta)}.weight"
    meta[last] = 0.5 * torch.randn(meta[last].shape, generator=torch.Generator().manual_seed(2))
    path = tmp_path_factory.mktemp("opt") / "opt"
    opt = l3rs.L3RS(named, lr=1e-2, total_steps=task.horizon, config=config, meta=meta)
    opt.save_pretrained(path, task=tiny)
    return str(path)


def test_trace_records_the_coefficients_the_optimizer_reports(tiny: str, opt_dir: str) -> None:
    task = l3rs.tasks.get(tiny)
    recorded = report.trace(opt_dir, task, steps=12, every=4)
    assert recorded.steps == [1, 4, 8, 12]
    assert recorded.names == ["0.weight", "0.bias", "2.weight", "2.bias"] and len(recorded.bases) == 5
    lam, mix = torch.tensor(recorded.lr), torch.tensor(recorded.mix)
    assert lam.shape == (4, 4) and mix.shape == (4, 4, 5)
    assert (lam[:-1] > 0).all() and (lam[-1] >= 0).all()  # the base schedule ends the run at λ = 0
    assert torch.allclose(mix.sum(-1), torch.ones(4, 4))
    assert not torch.allclose(lam[0], lam[-1])  # a snapshot per recorded step, not one repeated
    # the same run by hand ends with the same coefficients
    model = task.model_fn(EVAL_SEED)
    opt = l3rs.L3RS.from_pretrained(opt_dir, model.named_parameters(), total_steps=12)
    for x, y in task.batches(EVAL_SEED, 12):
        opt.zero_grad()
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step(loss=loss.detach())
    assert [c["lr"] for c in opt.coefficients().values()] == pytest.approx(recorded.lr[-1], rel=1e-5)


def fake_trace(num_tensors: int, steps: int = 6) -> Trace:
    bases = ["sgd", "adam"]
    gen = torch.Generator().manual_seed(0)
    mix = torch.softmax(torch.randn(steps, num_tensors, len(bases), generator=gen), -1)
    return Trace(task="fake", horizon=steps * 10, seed=0, bases=bases,
                 names=[f"features._blocks.{i}._depthwise_conv.batchnorm.weight" for i in range(num_tensors)],
                 steps=list(range(10, 10 * steps + 1, 10)), mix=mix.tolist(),
                 lr=(torch.rand(steps, num_tensors, generator=gen) * 1e-2).tolist(), diverged=False,
                 final_val_loss=1.0)


def test_short_names_keep_the_informative_tail() -> None:
    name = "features._blocks.12._depthwise_conv.batchnorm.weight"
    assert plots.short(name) == "fea.blo.12.dep.bat.weight"
    assert plots.short("_blocks.12._depthwise_conv.weight") == "blo.12._depthwise_conv.weight"
    assert plots.short("fc.bias") == "fc.bias"
    assert plots.short("a" * 50 + ".weight") == "aaa.weight"
    assert plots.short("x" * 50) == "…" + "x" * 29


@pytest.mark.parametrize("num_tensors", [3, 150])
def test_coefficient_plots_for_small_and_large_models(tmp_path, num_tensors: int) -> None:
    paths = plots.plot_trace(fake_trace(num_tensors), tmp_path)
    for p in paths.values():
        assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000


def test_html_escapes_and_renders_marks() -> None:
    doc = [("h1", "a <b> & c"), ("p", "**bold** and `code`"), ("table", ["x"], [["<y>"]]),
           ("img", "p.png", "alt")]
    page = render.to_html(doc, "t")
    assert "a &lt;b&gt; &amp; c" in page and "<b>bold</b>" in page and "<code>code</code>" in page
    assert "<td>&lt;y&gt;</td>" in page and 'src="p.png"' in page
    md = render.to_markdown(doc)
    assert "# a <b> & c" in md and "| <y> |" in md and "![alt](p.png)" in md


def test_report_from_saved_json_with_a_diverged_run(tiny: str, opt_dir: str, tmp_path) -> None:
    result = evaluate(opt_dir, tiny, tmp_path / "a", horizons=(1,), seeds=2, baselines=["adamw"], shifts=(),
                      progress=False)
    adamw = result.scenarios[0].methods["adamw"]
    adamw.runs[1].val_loss[-1], adamw.runs[1].diverged = math.inf, True
    result.scenarios[0].methods["adamw"] = dataclasses.replace(adamw, summary=summarize(adamw.runs))
    saved = results.load(results.save(result, tmp_path / "evaluation.json"))
    assert saved.scenarios[0].methods["adamw"].runs[1].val_loss[-1] is None  # JSON has no inf
    md, page = report.write(saved, tmp_path / "b")
    text = md.read_text()
    assert "1/2" in text and "adamw" in text and "Verdict" in text and "Cost" in text
    assert page.read_text().count("<img") == 4  # curves, λ heatmap, μ heatmap, μ small multiples


def test_inspect_defaults_to_the_optimizer_task(opt_dir: str, tmp_path, capsys) -> None:
    assert main(["inspect", opt_dir, "--out", str(tmp_path), "--steps", "8"]) == 0
    for name in ("lambda_heatmap.png", "mix_heatmap.png", "mix_area.png", "trace.json"):
        assert (tmp_path / name).stat().st_size > 100
    assert "lambda_heatmap.png" in capsys.readouterr().out


def test_inspect_errors_are_one_line(tiny: str, tmp_path, capsys) -> None:
    model = l3rs.tasks.get(tiny).model_fn(0)
    l3rs.L3RS(model.named_parameters(), lr=1e-3).save_pretrained(tmp_path / "notask")
    for argv in (["inspect", str(tmp_path / "notask")],
                 ["inspect", str(tmp_path / "missing"), "--task", tiny]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
