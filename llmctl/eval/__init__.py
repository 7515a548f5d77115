"""Evaluation: HumanEval pass@k in a sandbox, and the model evals in their own modules.

Nothing here imports torch: scoring completions made elsewhere needs no model. The evals that
load a model import it, so they are imported from their modules: perplexity (loss, perplexity,
bits per byte), generation (completions for HumanEval), probes (code probes), classify
(classifier metrics), compare (several checkpoints at once), results (the registry rows).
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
from llmctl.eval.sandbox import (
    ExecutionResult,
    SandboxError,
    SandboxLimits,
    TestProgram,
    run_program,
    run_tests,
    sandbox_profile,
)

__all__ = [
    "STOP_SEQUENCES",
    "ExecutionResult",
    "HumanEvalReport",
    "Problem",
    "Sample",
    "SandboxError",
    "SandboxLimits",
    "TestProgram",
    "evaluate",
    "from_mbpp",
    "load_completions",
    "load_problems",
    "mean_pass_at_k",
    "pass_at_k",
    "run_program",
    "run_tests",
    "sandbox_profile",
    "truncate_completion",
    "write_results",
]
