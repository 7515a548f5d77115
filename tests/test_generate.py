"""The generation engine on real (tiny) models and real tokenizers: tokens and text compared exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from llmctl.config import GenerationConfig, ModelConfig
from llmctl.generate import Engine, IncrementalDecoder, StopMatcher, filter_logits
from llmctl.generate.sampling import Penalties
from llmctl.model.transformer import Transformer
from llmctl.tokenizer import LoadedTokenizer, load_tokenizer_file
from llmctl.tokenizer_build import build_byte_tokenizer, train_bpe

GREEDY = GenerationConfig(temperature=0, max_new_tokens=24)
PROMPTS = ["def add(a, b):", "x", "The quick brown fox jumps over", "import os\nimport sys\n"]
MULTIBYTE = "naïve café — 日本語のコード 🤖🦀 👩‍💻 ok ✓ Ελληνικά\n"
SHAPES = {
    # Llama shape with grouped-query attention, and the GPT-2 shape (learned positions, LayerNorm, GELU)
    "llama-gqa": {"n_head": 4, "n_kv_head": 2},
    "gpt2": {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small decode fastest on one thread; on a busy 2-core machine two threads spin
    against each other and every step takes milliseconds instead of microseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LoadedTokenizer:
    directory = tmp_path_factory.mktemp("byte-tokenizer")
    build_byte_tokenizer().save(str(directory / "tokenizer.json"))
    return load_tokenizer_file(directory)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> LoadedTokenizer:
    directory = tmp_path_factory.mktemp("bpe-tokenizer")
    texts = [Path(torch.__file__).read_text(encoding="utf-8"), MULTIBYTE * 20] * 3
    train_bpe(texts, vocab_size=600).save(str(directory / "tokenizer.json"))
    return load_tokenizer_file(directory)


def random_model(vocab_size: int, context_length: int = 64, seed: int = 0, **shape) -> Transformer:
    """Untrained, with a wide init so greedy decoding wanders instead of repeating one token."""
    torch.manual_seed(seed)
    options = {"n_layer": 2, "d_model": 64, "n_head": 4, "init_std": 0.5, **shape}
    cfg = ModelConfig(context_length=context_length, vocab_size=vocab_size, **options)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def engine(bpe_tokenizer: LoadedTokenizer) -> Engine:
    return Engine(random_model(bpe_tokenizer.vocab_size, **SHAPES["llama-gqa"]), bpe_tokenizer)


def greedy_by_full_forward(model: Transformer, ids: list[int], steps: int, stop_ids: set[int]) -> list[int]:
    """The reference: argmax of the full forward over the whole sequence, no cache, no engine."""
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            if token in stop_ids:
                break
            ids.append(token)
            out.append(token)
    return out


# ---------------------------------------------------------------- greedy, cache and batching


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_greedy_with_the_cache_equals_recomputing_the_full_sequence(shape: str, bpe_tokenizer):
    model = random_model(bpe_tokenizer.vocab_size, **SHAPES[shape])
    engine = Engine(model, bpe_tokenizer)
    for prompt in PROMPTS:
        ids = bpe_tokenizer.encode(prompt)
        expected = greedy_by_full_forward(model, ids, GREEDY.max_new_tokens, engine.stop_token_ids)
        cached = engine.generate([prompt], GREEDY)[0]
        recomputed = engine.generate([prompt], GREEDY, use_cache=False)[0]
        assert cached.token_ids == expected
        assert recomputed.token_ids == expected
        assert len(set(expected)) > 3, "the test model should not just repeat one token"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_batch_of_different_lengths_equals_each_prompt_alone(shape: str, use_cache: bool, bpe_tokenizer):
    engine = Engine(random_model(bpe_tokenizer.vocab_size, **SHAPES[shape]), bpe_tokenizer)
    config = GREEDY.model_copy(update={"max_new_tokens": 16})
    batched = engine.generate(PROMPTS, config, num_samples=2, use_cache=use_cache)
    alone = [engine.generate([prompt], config)[0] for prompt in PROMPTS]
    assert [(c.prompt_index, c.sample_index) for c in batched] == [(p, s) for p in range(4) for s in range(2)]
    for completion in batched:
        reference = alone[completion.prompt_index]
        assert completion.token_ids == reference.token_ids
        assert completion.text == reference.text
        assert completion.prompt_tokens == len(bpe_tokenizer.encode(PROMPTS[completion.prompt_index]))


def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(engine: Engine):
    """Each prompt's own greedy text gives a stop string that ends it at a different step."""
    alone = [engine.generate([prompt], GREEDY)[0] for prompt in PROMPTS]
    stops = [c.text[2 + 3 * i : 5 + 3 * i] for i, c in enumerate(alone)]
    for stop in stops:
        assert stop and len(stop) == 3
    for index, prompt in enumerate(PROMPTS):
        config = GREEDY.model_copy(update={"stop": [stops[index]]})
        expected = engine.generate([prompt], config)[0]
        batched = engine.generate(PROMPTS, config)
        assert batched[index].text == expected.text
        assert batched[index].token_ids == expected.token_ids


def test_top_k_1_equals_greedy(engine: Engine):
    greedy = engine.generate(PROMPTS, GREEDY)
    top_1 = engine.generate(
        PROMPTS, GREEDY.model_copy(update={"temperature": 1.3, "top_k": 1, "seed": 5}), num_samples=2
    )
    assert [c.token_ids for c in top_1] == [c.token_ids for c in greedy for _ in range(2)]


# ---------------------------------------------------------------- sampling


def test_a_seed_reproduces_samples_and_other_seeds_differ(engine: Engine):
    config = GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=20, seed=42)
    first = engine.generate(PROMPTS[:2], config, num_samples=3)
    again = engine.generate(PROMPTS[:2], config, num_samples=3)
    other = engine.generate(PROMPTS[:2], config.model_copy(update={"seed": 43}), num_samples=3)
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # the samples of one prompt differ from each other
    assert len({tuple(c.token_ids) for c in first[:3]}) == 3


def test_sampling_leaves_the_global_rng_alone(engine: Engine):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    engine.generate(PROMPTS[:1], GenerationConfig(temperature=1.0, max_new_tokens=8, seed=1))
    engine.generate(PROMPTS[:1], GenerationConfig(temperature=1.0, max_new_tokens=8))
    assert torch.equal(torch.rand(3), expected)


def test_top_k_top_p_and_min_p_keep_the_right_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    kept = lambda filtered: (filtered[0] > float("-inf")).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, 2, 1.0, 0.0)) == [0, 1]
    assert kept(filter_logits(logits, None, 0.75, 0.0)) == [0, 1]  # 0.5 + 0.25 reaches 0.75
    assert kept(filter_logits(logits, None, 0.76, 0.0)) == [0, 1, 2]
    assert kept(filter_logits(logits, None, 0.01, 0.0)) == [0]  # the likeliest always stays
    assert kept(filter_logits(logits, None, 1.0, 0.2)) == [0, 1, 2]  # 0.2 · 0.5 = 0.1
    assert kept(filter_logits(logits, 4, 0.9, 0.1)) == [0, 1, 2]
    # the filtered distribution renormalises over the kept tokens
    renormalised = filter_logits(logits, None, 0.75, 0.0).softmax(-1)[0]
    assert torch.allclose(renormalised[:2], torch.tensor([2 / 3, 1 / 3]))


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    config = GenerationConfig(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    penalties = Penalties(config, [[0, 1]], vocab_size=4, device=torch.device("cpu"))
    # prompt tokens 0 and 1 get the repetition penalty only: positive logits halve, negative double
    assert torch.equal(penalties.apply(logits), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    penalties.record(torch.tensor([3]))
    penalties.record(torch.tensor([3]))
    # token 3, generated twice: 3 / 2 - 0.5 - 2 · 0.25
    assert torch.equal(penalties.apply(logits), torch.tensor([[1.0, -2.0, 0.5, 0.5]]))


def test_a_repetition_penalty_stops_greedy_repeats(byte_tokenizer):
    engine = Engine(random_model(byte_tokenizer.vocab_size, init_std=0.02), byte_tokenizer)
    plain = engine.generate(["ab"], GREEDY)[0].token_ids
    penalised = engine.generate(["ab"], GREEDY.model_copy(update={"repetition_penalty": 1e6}))[0].token_ids
    assert len(set(plain)) < len(plain)  # a barely-initialised model repeats itself
    assert len(set(penalised)) == len(penalised)


# ---------------------------------------------------------------- stopping


def test_stop_strings_cut_exactly_where_they_start(engine: Engine):
    for prompt in PROMPTS:
        full = engine.generate([prompt], GREEDY)[0]
        stop = full.text[7:10]
        cut = engine.generate([prompt], GREEDY.model_copy(update={"stop": ["never there", stop]}))[0]
        assert cut.text == full.text[: full.text.index(stop)]
        assert (cut.finish_reason, cut.stop) == ("stop", stop)
        streamed = "".join(chunk.text for chunk in engine.stream([prompt], cut_config(stop)))
        assert streamed == cut.text


def cut_config(stop: str) -> GenerationConfig:
    return GREEDY.model_copy(update={"stop": [stop]})


def test_stop_tokens_end_a_sample_and_stay_out_of_its_text(engine: Engine):
    full = engine.generate([PROMPTS[0]], GREEDY)[0]
    stop_token = full.token_ids[5]
    first = full.token_ids.index(stop_token)
    cut = engine.generate([PROMPTS[0]], GREEDY, stop_token_ids=[stop_token])[0]
    assert cut.token_ids == full.token_ids[:first]
    # the untrained model emits stray bytes; a character it left unfinished is dropped at the end
    assert cut.text == engine.tokenizer.decode(full.token_ids[:first]).rstrip("\ufffd")
    assert cut.finish_reason == "stop"
    assert cut.stop == engine.tokenizer.decode([stop_token])


def test_stop_matcher_holds_back_a_possible_stop_and_releases_it_when_it_is_not_one():
    rng = random.Random(0)
    text = "abc<|e|> x <|end|> tail"
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher = StopMatcher(["<|end|>", "\n\n"])
        released = "".join(matcher.feed(piece) for piece in pieces)
        assert released == "abc<|e|> x "
        assert matcher.matched == "<|end|>"
        matcher = StopMatcher(["<|end|>!"])
        released = "".join(matcher.feed(piece) for piece in pieces) + matcher.flush()
        assert released == text and matcher.matched is None


def test_the_earliest_stop_string_wins():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == "hel"
    assert matcher.matched == "lo w"


# ---------------------------------------------------------------- streaming and text


def test_streaming_chunks_concatenate_to_the_final_text(engine: Engine):
    config = GenerationConfig(temperature=0.9, max_new_tokens=30, seed=3)
    generation = engine.stream(PROMPTS, config, num_samples=2)
    streamed: dict[int, str] = {}
    for chunk in generation:
        streamed[chunk.row] = streamed.get(chunk.row, "") + chunk.text
    completions = sorted(generation.completed, key=lambda c: (c.prompt_index, c.sample_index))
    assert len(completions) == 8
    for row, completion in enumerate(completions):
        assert streamed.get(row, "") == completion.text
        if completion.finish_reason != "stop":
            assert completion.text == engine.tokenizer.decode(completion.token_ids).rstrip("\ufffd")
    assert generation.stats.generated_tokens >= sum(len(c.token_ids) for c in completions)
    assert generation.stats.tokens_per_second > 0


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_incremental_decoding_never_releases_half_a_character(which: str, byte_tokenizer, bpe_tokenizer):
    tokenizer = byte_tokenizer if which == "byte" else bpe_tokenizer
    prompt_ids = tokenizer.encode("prefix 🤖")
    ids = tokenizer.encode(MULTIBYTE * 3)
    assert len(ids) > len(MULTIBYTE * 3)  # some characters do span several tokens
    decoder = IncrementalDecoder(tokenizer, prompt_ids)
    pieces = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == MULTIBYTE * 3
    # a sample cut inside a character ends before it
    decoder = IncrementalDecoder(tokenizer)
    emoji = tokenizer.encode("ok 🦀")
    pieces = [decoder.push(token) for token in emoji[:-1]] + [decoder.flush()]
    assert "".join(pieces) == "ok "


@pytest.fixture(scope="module")
def multibyte_model(byte_tokenizer) -> Transformer:
    """A byte-level model trained until it recites MULTIBYTE, so it emits whole multi-byte characters."""
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(n_layer=2, d_model=64, n_head=4, context_length=128, vocab_size=byte_tokenizer.vocab_size)
    )
    ids = torch.tensor(byte_tokenizer.encode(MULTIBYTE * 3))
    starts = range(0, len(ids) - 49)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(120):
        batch = torch.stack([ids[s : s + 49] for s in random.Random(step).sample(starts, 8)])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_streamed_multibyte_text_has_no_replacement_characters(multibyte_model, byte_tokenizer):
    engine = Engine(multibyte_model, byte_tokenizer)
    prompts = ["naïve café — 日本", "🤖", "ok ✓ Ελλ"]
    # min-p keeps only confident tokens: the continuation bytes of a character it has learned
    config = GenerationConfig(temperature=0.7, min_p=0.3, max_new_tokens=60, seed=0)
    generation = engine.stream(prompts, config, num_samples=2)
    chunks = list(generation)
    assert all("\ufffd" not in chunk.text for chunk in chunks)
    texts = [c.text for c in generation.completions()]
    multibyte_extra = sum(len(text.encode()) - len(text) for text in texts)
    assert multibyte_extra > 100, "the model should emit multi-byte text"
    greedy = engine.generate(prompts[:1], GREEDY)[0]
    assert greedy.text[:20] in MULTIBYTE * 3


# ---------------------------------------------------------------- the context window


def test_a_prompt_longer_than_the_window_keeps_its_end_and_says_so(engine: Engine, bpe_tokenizer):
    ids = [bpe_tokenizer.encode(" a b c d")[i % 4] for i in range(150)]
    generation = engine.stream([ids], GREEDY)
    (prompt,) = generation.prompts
    room = min(GREEDY.max_new_tokens, engine.context_length // 2)
    assert prompt.ids == ids[-(engine.context_length - room) :]
    assert prompt.dropped_tokens == 150 - (engine.context_length - room)
    (completion,) = generation.completions()
    assert completion.dropped_prompt_tokens == prompt.dropped_tokens
    assert completion.token_ids == engine.generate([prompt.ids], GREEDY)[0].token_ids


def test_generation_stops_at_the_context_window(engine: Engine):
    context = engine.context_length
    ids = list(range(10, 10 + context - 5))
    completion = engine.generate([ids, ids[:10]], GREEDY.model_copy(update={"max_new_tokens": 40}))
    assert (len(completion[0].token_ids), completion[0].finish_reason) == (5, "context")
    assert (len(completion[1].token_ids), completion[1].finish_reason) == (40, "length")


def test_an_empty_prompt_starts_after_the_end_of_text_token(engine: Engine):
    generation = engine.stream([""], GREEDY)
    assert generation.prompts[0].ids == [engine.tokenizer.eot_id]
    assert len(generation.completions()[0].token_ids) > 0


# ---------------------------------------------------------------- devices and precisions


def test_bf16_generation_on_cpu_agrees_with_itself_with_and_without_the_cache(bpe_tokenizer):
    engine = Engine(
        random_model(bpe_tokenizer.vocab_size, **SHAPES["llama-gqa"]), bpe_tokenizer, dtype=torch.bfloat16
    )
    assert engine.model.embed_tokens.weight.dtype == torch.bfloat16
    config = GREEDY.model_copy(update={"max_new_tokens": 6})
    cached = engine.generate(PROMPTS, config)
    recomputed = engine.generate(PROMPTS, config, use_cache=False)
    # bf16 rounds differently in a one-token step than in a full forward; the first tokens agree
    assert [c.token_ids[:2] for c in cached] == [c.token_ids[:2] for c in recomputed]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_generation_matches_the_full_forward(dtype: torch.dtype, bpe_tokenizer):
    model = random_model(bpe_tokenizer.vocab_size, **SHAPES["llama-gqa"])
    engine = Engine(model, bpe_tokenizer, device="cuda", dtype=dtype)
    config = GREEDY.model_copy(update={"max_new_tokens": 8})
    cached = engine.generate(PROMPTS, config, num_samples=2)
    recomputed = engine.generate(PROMPTS, config, num_samples=2, use_cache=False)
    agree = 8 if dtype == torch.float32 else 2
    assert [c.token_ids[:agree] for c in cached] == [c.token_ids[:agree] for c in recomputed]
    sampled = engine.generate(PROMPTS, GenerationConfig(temperature=1.0, max_new_tokens=8, seed=1))
    assert sampled == engine.generate(PROMPTS, GenerationConfig(temperature=1.0, max_new_tokens=8, seed=1))
