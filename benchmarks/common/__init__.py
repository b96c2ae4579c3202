"""What every study shares: the provenance of its numbers, where results live, the Trainer
(``build_trainer``) and, in ``benchmarks.common.results``, the handling of a resumable study's
results file.

Evaluation has no copy here: a study evaluates a ``DPCausalLM`` with lit_dp's own
``DPCausalLM.evaluate_loss(loader)`` (token-mean NLL of the current weights over a loader,
default the validation set; inside ``module.evaluation_weights()`` the EMA weights), the same
loss the module logs as ``val/loss``.
"""

from benchmarks.common.provenance import CODE_PATHS, RESULTS, ROOT, git_commit, provenance
from benchmarks.common.trainer import build_trainer

__all__ = ["CODE_PATHS", "RESULTS", "ROOT", "build_trainer", "git_commit", "provenance"]
