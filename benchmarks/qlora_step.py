"""Where a QLoRA step's time goes on a CPU, on a Hugging Face Llama of deepseek-coder-1.3b-base's
shape (width 2048, 16 heads, MLP 5504, vocabulary 32,256, context 16,384; random weights made by
transformers, no hub).

    python benchmarks/qlora_step.py [--layers 24] [--length 128] [--steps 2] [--profile]

The base is saved in bf16 (as the hub's copy), then planned as `llmctl qlora --max-length LENGTH
--lora-targets q_proj,v_proj --prompt-style problem-solution` plans it, and built as the trainer
builds it (NF4 base, LoRA on q_proj/v_proj); each step is a forward, the loss and a backward over
one row of LENGTH tokens, then an AdamW step, timed by wall clock around the whole step. With
--profile the last step runs under torch.profiler and the ops taking the most time are printed.
Peak memory is the process's maximum resident set, printed beside the plan's estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from llmctl.model.sizing import human_bytes


def write_base(directory: Path, layers: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 50, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(
        directory
    )
    config = LlamaConfig(
        vocab_size=32_256,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=16_384,
        rope_theta=100_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype=torch.bfloat16,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    del model


def write_data(path: Path, length: int) -> None:
    words = [
        "def",
        "return",
        "for",
        "while",
        "if",
        "else",
        "import",
        "class",
        "self",
        "value",
        "total",
        "index",
    ]
    with path.open("w") as handle:
        for i in range(40):
            problem = " ".join(words[(i + k) % len(words)] for k in range(max(1, length // 32)))
            solution = " ".join(words[(3 * i + k) % len(words)] for k in range(length // 4))
            handle.write(json.dumps({"instruction": problem, "output": solution}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (the first includes warm-up)")
    parser.add_argument("--profile", action="store_true", help="profile the last step")
    args = parser.parse_args()
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    from llmctl.train.finetune import FinetuneOptions, build_model, make_plan
    from llmctl.train.finetune_data import make_batches
    from llmctl.train.losses import lm_loss
    from llmctl.train.optim import build_optimizer
    from llmctl.workspace import Workspace

    root = Path(tempfile.mkdtemp(prefix="llmctl-qlora-step-"))
    started = time.perf_counter()
    write_base(root / "base", args.layers)
    write_data(root / "data.jsonl", args.length)
    print(f"base written in {time.perf_counter() - started:.0f} s ({args.layers} layers)")
    options = FinetuneOptions(
        stage="qlora",
        model=str(root / "base"),
        data=str(root / "data.jsonl"),
        prompt_style="problem-solution",
        max_length=args.length,
        lora_targets=["q_proj", "v_proj"],
        overrides=["train.micro_batch_size=1"],
    )
    plan = make_plan(Workspace(root / "ws"), options, inspect_only=True)
    print(
        f"plan: {plan.params / 1e9:.2f}B parameters, {plan.trainable:,} trained, {plan.size.tokens_per_step} "
        f"tokens per step, activation checkpointing {plan.config.train.activation_checkpointing}, "
        f"{plan.precision.name}; memory estimate {human_bytes(plan.memory.total)}"
    )
    started = time.perf_counter()
    model = build_model(plan)
    print(f"model built (NF4 base + LoRA) in {time.perf_counter() - started:.0f} s")
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = plan.config.train.activation_checkpointing
    model.train()
    optimizer = build_optimizer(model, plan.config.train, plan.device)
    batches = make_batches(plan.config, plan.encoded, "sft", plan.tokenizer.pad_id, plan.device)

    def step() -> float:
        batch = batches.next_batch()
        began = time.perf_counter()
        result = lm_loss(model, batch)
        result.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began

    for index in range(args.steps):
        if args.profile and index == args.steps - 1:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
                seconds = step()
            print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            by_shape = profiler.key_averages(group_by_input_shape=True)
            print(by_shape.table(sort_by="self_cpu_time_total", row_limit=12, max_shapes_column_width=60))
        else:
            seconds = step()
        print(f"step {index + 1}: {seconds:.1f} s ({args.length / seconds:.1f} tokens/s)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak resident memory {human_bytes(peak)} · plan's estimate {human_bytes(plan.memory.total)}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
