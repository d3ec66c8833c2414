"""The evaluation report (report.md + report.html + PNGs) and `l3rs inspect`: what an optimizer learned.

    recorded = trace("runs/opt/best", task, steps=200)  # λ [steps, tensors] and μ [steps, tensors, bases]
    write(result, "runs/eval")                          # result: the EvaluationResult `evaluate` returns

    trace  (a run with a coefficient-recording step callback)   plots  (PNG figures from records)
    tables (tables and verdict sentences as text)               render (blocks -> Markdown / HTML; write)
    command (`l3rs inspect`)
"""

from l3rs.report.plots import plot_trace
from l3rs.report.render import write
from l3rs.report.trace import trace

__all__ = ["plot_trace", "trace", "write"]
