"""Config resolution: layers in order, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmctl.config import (
    CONFIG_KEYS,
    RunConfig,
    parse_duration,
    preset_names,
    resolve_config,
    suggest_key,
)
from llmctl.errors import UsageError

REQUIRED_KEYS = [
    "model.n_layer",
    "model.n_head",
    "model.n_kv_head",
    "model.d_model",
    "model.d_ff",
    "model.context_length",
    "model.vocab_size",
    "model.dropout",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.weight_decay",
    "train.grad_clip",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.max_steps",
    "train.max_time",
    "train.eval_every",
    "train.save_every",
    "train.precision",
    "train.compile",
    "train.seed",
    "train.early_stopping_patience",
]


def test_the_promised_key_names_exist():
    missing = [key for key in REQUIRED_KEYS if key not in CONFIG_KEYS]
    assert missing == []


def test_layers_apply_in_order(tmp_path: Path):
    config_file = tmp_path / "override.yaml"
    config_file.write_text("train:\n  lr: 1.0e-4\n  warmup_steps: 7\nmodel:\n  n_layer: 3\n")
    cfg = resolve_config(
        preset="rtx4060-8g",
        config_file=config_file,
        overrides=["train.lr=5e-5", "model.dropout=0.2"],
        flags={"train.max_steps": 42, "train.seed": None},
    )
    assert cfg.preset == "rtx4060-8g"
    assert cfg.model.d_model == 512  # from the preset
    assert cfg.model.n_layer == 3  # the file beats the preset
    assert cfg.train.warmup_steps == 7
    assert cfg.train.lr == pytest.approx(5e-5)  # --set beats the file
    assert cfg.model.dropout == pytest.approx(0.2)
    assert cfg.train.max_steps == 42  # flags beat everything
    assert cfg.train.seed == RunConfig().train.seed  # a None flag is "not given"


def test_the_resolved_config_says_which_layer_set_each_key(tmp_path: Path):
    config_file = tmp_path / "override.yaml"
    config_file.write_text("train:\n  lr: 1.0e-4\n  warmup_steps: 7\nmodel:\n  n_layer: 3\n")
    cfg = resolve_config(
        preset="rtx4060-8g",
        config_file=config_file,
        overrides=["train.lr=5e-5"],
        flags={"train.max_steps": 42, "train.seed": None},
        base={"data": {"tokenizer": "tok"}},
    )
    sources = cfg.sources
    assert sources["data.tokenizer"] == "base" and sources["model.d_model"] == "preset"
    assert sources["model.n_layer"] == "config" and sources["train.warmup_steps"] == "config"
    assert sources["train.lr"] == "set" and sources["train.max_steps"] == "flag"
    assert "train.seed" not in sources and "model.dropout" not in sources  # defaults
    assert cfg.set_by_user("train.lr") and cfg.set_by_user("model.n_layer")
    assert not cfg.set_by_user("model.d_model") and not cfg.set_by_user("data.tokenizer")
    # where values came from is not part of what the config is
    assert cfg == RunConfig.model_validate(cfg.model_dump()) and RunConfig.model_validate({}).sources == {}


def test_config_show_sources_names_the_layer_of_every_key(cli, tmp_path: Path):
    config_file = tmp_path / "override.yaml"
    config_file.write_text("train:\n  warmup_steps: 7\n")
    shown = cli(
        "config",
        "show",
        "--preset",
        "cpu-debug",
        "--config",
        config_file,
        "--set",
        "train.lr=1e-3",
        "--sources",
        "--json",
    )
    assert shown.exit_code == 0, shown.stderr
    rows = shown.json()
    assert rows["train.lr"] == {"value": 0.001, "source": "set"}
    assert rows["train.warmup_steps"] == {"value": 7, "source": "config"}
    assert rows["model.n_layer"]["source"] == "preset" and rows["train.seed"]["source"] == "default"
    assert set(rows) == set(CONFIG_KEYS)
    text = cli("config", "show", "--preset", "cpu-debug", "--sources").stdout
    assert "train.seed" in text and "[default]" in text and "[preset]" in text


def test_unknown_set_key_suggests_the_closest():
    with pytest.raises(UsageError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        resolve_config(overrides=["train.lrr=1e-4"])


def test_unknown_key_in_file_names_the_file(tmp_path: Path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("model:\n  n_layers: 4\n")
    with pytest.raises(UsageError, match=r"'model\.n_layers' in config file .*did you mean 'model\.n_layer'"):
        resolve_config(config_file=config_file)


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(UsageError, match=r"'train\.micro_batch_size'.*'eight'"):
        resolve_config(overrides=["train.micro_batch_size=eight"])
    with pytest.raises(UsageError, match=r"'model\.dropout'"):
        resolve_config(overrides=["model.dropout=1.5"])
    with pytest.raises(UsageError, match=r"divisible by model\.n_head"):
        resolve_config(overrides=["model.d_model=100", "model.n_head=3"])
    with pytest.raises(UsageError, match=r"train\.min_lr"):
        resolve_config(overrides=["train.lr=1e-4", "train.min_lr=1e-3"])


def test_malformed_yaml_names_line(tmp_path: Path):
    config_file = tmp_path / "broken.yaml"
    config_file.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(UsageError, match=r"not valid YAML at line \d+"):
        resolve_config(config_file=config_file)


def test_missing_config_file_and_unknown_preset():
    with pytest.raises(UsageError, match="does not exist"):
        resolve_config(config_file=Path("/nonexistent/x.yaml"))
    with pytest.raises(UsageError, match=r"unknown preset 'rtx4060'.*did you mean 'rtx4060-8g'"):
        resolve_config(preset="rtx4060")


def test_set_without_equals_is_a_usage_error():
    with pytest.raises(UsageError, match="dotted.key=value"):
        resolve_config(overrides=["train.lr"])


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400)]
)
def test_durations(text: str, seconds: float):
    assert parse_duration(text) == seconds
    assert resolve_config(overrides=[f"train.max_time={text}"]).train.max_time == seconds


def test_bad_duration():
    with pytest.raises(UsageError, match="train.max_time"):
        resolve_config(overrides=["train.max_time=soon"])


def test_compile_accepts_booleans():
    assert resolve_config(overrides=["train.compile=true"]).train.compile == "on"
    assert resolve_config(overrides=["train.compile=off"]).train.compile == "off"


def test_every_preset_validates_and_round_trips_through_yaml():
    import yaml

    assert {
        "cpu-debug",
        "rtx4060-8g",
        "compact-8g",
        "small-16g",
        "mini-27m",
        "mini-46m",
        "llm-200m",
        "gpt2-124m",
        "h100-80g",
    } <= set(preset_names())
    for name in preset_names():
        cfg = resolve_config(preset=name)
        again = RunConfig.model_validate(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg


def test_preset_shapes_are_as_promised():
    debug = resolve_config(preset="cpu-debug").model
    assert (debug.n_layer, debug.n_head, debug.d_model, debug.context_length) == (2, 4, 256, 128)
    rtx = resolve_config(preset="rtx4060-8g")
    rtx_shape = (rtx.model.n_layer, rtx.model.n_head, rtx.model.d_model, rtx.model.context_length)
    assert rtx_shape == (6, 8, 512, 256)
    assert rtx.global_batch_size == 32 and rtx.train.lr == pytest.approx(3e-4)
    compact = resolve_config(preset="compact-8g")
    assert compact.model.context_length == 384 and compact.train.grad_accum_steps == 2
    big = resolve_config(preset="llm-200m")
    big_shape = (big.model.n_layer, big.model.d_model, big.model.n_head, big.model.vocab_size)
    assert big_shape == (24, 768, 12, 32000)
    assert big.model.ff_dim == 2048 and big.model.context_length == 512
    assert (big.train.micro_batch_size, big.train.grad_accum_steps) == (8, 4)
    assert big.train.weight_decay == pytest.approx(0.01) and big.model.dropout == pytest.approx(0.1)
    assert big.train.grad_clip == 1.0 and big.train.early_stopping_patience == 5
    gpt2 = resolve_config(preset="gpt2-124m").model
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.vocab_size) == ("learned", "layernorm", "gelu", 50257)


def test_suggest_key_on_leaf_typos():
    assert suggest_key("train.warmup") == "train.warmup_steps"
    assert suggest_key("zzzz.qqqq") is None


def test_config_reference_documents_every_key():
    reference = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    undocumented = [key for key in CONFIG_KEYS if f"`{key}`" not in reference]
    assert undocumented == []
