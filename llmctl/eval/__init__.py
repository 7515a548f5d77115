"""Evaluation: HumanEval pass@k in a sandbox (more evals join as models load).

Nothing here imports torch: scoring completions made elsewhere needs no model.
"""

from llmctl.eval.humaneval import (
    STOP_SEQUENCES,
    HumanEvalReport,
    Problem,
    Sample,
    evaluate,
    from_mbpp,
    load_completions,
    load_problems,
    truncate_completion,
    write_results,
)
from llmctl.eval.passk import mean_pass_at_k, pass_at_k
from llmctl.eval.sandbox import ExecutionResult, SandboxError, SandboxLimits, run_program, sandbox_profile

__all__ = [
    "STOP_SEQUENCES",
    "ExecutionResult",
    "HumanEvalReport",
    "Problem",
    "Sample",
    "SandboxError",
    "SandboxLimits",
    "evaluate",
    "from_mbpp",
    "load_completions",
    "load_problems",
    "mean_pass_at_k",
    "pass_at_k",
    "run_program",
    "sandbox_profile",
    "truncate_completion",
    "write_results",
]
