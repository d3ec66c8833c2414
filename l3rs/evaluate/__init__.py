"""Is a meta-trained L3RS optimizer worth it? Compare it with LR-tuned baselines, honestly; write a report.

    result = evaluate("runs/opt/best", "mlp-mnist1d-shift", "runs/eval", horizons=(1, 2, 5), seeds=5)

Protocol (SPEC §6). Every baseline gets its LR tuned on the validation split, at the evaluated horizon, by a
log grid (extended past an edge when the best LR sits on it), by the mean final validation loss over two
tuning head seeds (999, 998) that are neither meta-training nor evaluation seeds (1000, 1001, ...). Every
method then runs on the same evaluation seeds, i.e. the same head initialization and batch order (paired).
Validation uses the task's whole validation split (<= 1,000 examples for the built-in tasks), at least
30 times per run. Speed-up = steps the best tuned baseline needs to reach its own final validation loss
(mean curve over seeds) / steps the method needs to reach it. Against the best tuned baseline every method
gets the ratio of mean final validation losses and the speed-up, each with a 95% paired-bootstrap interval
over the evaluation seeds, and a verdict read from the ratio's interval: better (hi < 1), worse (lo > 1),
else tie. Everything lands in ``out_dir/evaluation.json`` (`l3rs.results`) + report.md/html (`l3rs.report`).

    methods  (catalogue, optimizer factories)     runs   (cached runs of one scenario, process pool)
    tuning   (LR grids over the tuning seeds)     stats  (summaries, speed-up, paired bootstrap)
    protocol (scenarios, ablations, `evaluate`)   command (`l3rs evaluate`)
    reuse    (a previous evaluation's baselines, `baselines_from`)
"""

from l3rs.evaluate.methods import ABLATIONS, BASELINES, Method
from l3rs.evaluate.protocol import SHIFT_SCENARIOS, evaluate

__all__ = ["ABLATIONS", "BASELINES", "SHIFT_SCENARIOS", "Method", "evaluate"]
