"""`llmctl presets`: the shipped presets and what each one costs."""

from __future__ import annotations

import typer

from llmctl.cli.common import out, print_json

app = typer.Typer(
    help="The shipped presets: model shape, training settings and intended hardware.", no_args_is_help=True
)


@app.command("list")
def list_presets(as_json: bool = typer.Option(False, "--json", help="Print one JSON document.")) -> None:
    """A table of presets: parameters, context, batch, precision and estimated training memory.

    Example: llmctl presets list
    """
    from rich.table import Table

    from llmctl.config import preset_names, resolve_config
    from llmctl.model.sizing import count_parameters, estimate_training_memory, human_bytes, human_count

    rows = []
    for name in preset_names():
        cfg = resolve_config(preset=name)
        memory = estimate_training_memory(cfg.model, cfg.train)
        rows.append(
            {
                "name": name,
                "params": count_parameters(cfg.model),
                "layers": cfg.model.n_layer,
                "d_model": cfg.model.d_model,
                "context": cfg.model.context_length,
                "vocab": cfg.model.vocab_size,
                "micro_batch": cfg.train.micro_batch_size,
                "grad_accum": cfg.train.grad_accum_steps,
                "precision": cfg.train.precision,
                "est_memory_bytes": memory.total,
                "hardware": _hardware_line(name),
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="presets", title_justify="left")
    for column in ("name", "params", "shape", "context", "batch", "precision", "est. memory", "for"):
        numeric = column in ("params", "context", "est. memory")
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(
            row["name"],
            human_count(row["params"]),
            f"{row['layers']}L × {row['d_model']}",
            str(row["context"]),
            f"{row['micro_batch']} × {row['grad_accum']}",
            row["precision"],
            human_bytes(row["est_memory_bytes"]),
            row["hardware"],
        )
    out.print(table)


def _hardware_line(name: str) -> str:
    """Each preset's first line reads '# NAME — hardware: WHAT IT IS FOR'."""
    from llmctl.config import presets_dir

    first = (presets_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    return first.partition("hardware:")[2].strip()
