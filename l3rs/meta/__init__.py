"""Meta-training: specialize an L3RS optimizer to a task family (SPEC §5).

    from l3rs.meta import MetaConfig, train
    best_dir = train(l3rs.tasks.family("mnistcnn-digits"), "runs/digits", MetaConfig(estimator="pes"))
    opt = l3rs.L3RS.from_pretrained(best_dir, model.named_parameters())

Files: `config` (MetaConfig), `unroll` (one fine-tuning unroll, jobs), `estimators` (es, pes, bptt),
`distributed` (worker processes, torchrun), `sweeps` (λ0 and α of the untrained optimizer), `validation`
(held-out checks that pick the kept checkpoint), `train` (the loop, checkpoints), `command` (CLI).
"""

from l3rs.meta.config import MetaConfig
from l3rs.meta.sweeps import lr0_sweep
from l3rs.meta.train import train, tune_lr0
from l3rs.meta.unroll import Particle, unroll
from l3rs.meta.validation import validate

__all__ = ["MetaConfig", "Particle", "lr0_sweep", "train", "tune_lr0", "unroll", "validate"]
