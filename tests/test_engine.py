"""The walk of one page on the tiny model: parity with transformers, positions, guard, output."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from service.engine import Cancelled, OcrOptions
from service.engine.assemble import assemble_prompt
from service.engine.decode.generate import generate
from service.engine.decode.sequence import NGramGuard
from service.engine.layout import visual_token_count
from service.engine.postprocess import decode_text, parse_boxes, to_markdown
from service.engine.preprocess import preprocess
from service.engine.prompts import build_prompt, tokenize_prompt
from service.engine.stats import StageTimer
from tests.helpers import text_page

NO_GUARD = {"ngram_size": 0, "ngram_window": 0}


def _prompt(tokenizer, task: str, n_visual: int) -> tuple[torch.Tensor, int]:
    """Input ids of a task's prompt around ``n_visual`` image placeholders, and where they start."""
    prompt = tokenize_prompt(tokenizer, build_prompt(task))
    return torch.tensor(prompt.ids(n_visual)), prompt.image_start


def unpruned_prompt(engine, mode: str = "tiny"):
    """Prefill inputs of a text page with its whole visual block, for generate() tests."""
    model = engine.model
    block = model.encode([preprocess(text_page(), mode)])[0]
    ids, start = _prompt(model.tokenizer, "free", block.n_tokens)
    return assemble_prompt(
        model.embed(ids), start, block.n_tokens, block.features, torch.arange(block.n_tokens), "original"
    )


def transformers_generate(engine, image, mode: str, max_new_tokens: int) -> list[int]:
    """Reference: the unpruned model through transformers' own forward (masked_scatter) and generate."""
    model = engine.model
    page = preprocess(image, mode, version=model.version)
    n_visual = visual_token_count(page, model.version)
    input_ids, _ = _prompt(model.tokenizer, "markdown", n_visual)
    kwargs = {"pixel_values": page.global_view[None]}
    if page.tiles is not None:
        kwargs.update(pixel_values_local=page.tiles, num_local_patches=[page.num_tiles])
        if model.version == "v1":
            kwargs["patches_grid"] = [list(page.grid)]
    out = model.model.generate(
        input_ids=input_ids[None],
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=1,
        suppress_tokens=list(range(model.vocab_limit, model.text_config.vocab_size)),
    )
    tokens = out[0, input_ids.shape[0] :].tolist()
    return tokens[: tokens.index(1)] if 1 in tokens else tokens


@pytest.mark.parametrize("mode,size", [("tiny", (600, 800)), ("large", (1100, 800)), ("gundam", (1100, 800))])
def test_unpruned_output_matches_transformers_generate(tiny_engine, mode, size):
    image = text_page(size)
    expected_tokens = transformers_generate(tiny_engine, image, mode, max_new_tokens=12)
    assert len(expected_tokens) == 12
    # every id of the tiny tokenizer decodes to a distinct string, so equal text means equal tokens
    expected = decode_text(tiny_engine.model.tokenizer, expected_tokens)
    for pruner, retention in (("none", "auto"), ("rtprune", 1.0), ("norm", 1.0)):
        result = tiny_engine.run(
            image, OcrOptions(mode=mode, pruner=pruner, retention=retention, max_new_tokens=12, **NO_GUARD)
        )
        assert result.stats.visual_tokens_kept == result.stats.visual_tokens
        assert result.stats.output_tokens == 12
        assert result.text == expected, f"{pruner}@{retention} differs from transformers' generate"


@pytest.fixture(scope="module")
def tiny_v2_engine(preset_cache):
    from service.engine import OCREngine

    return OCREngine.load("tiny-v2", device="cpu", cache_dir=preset_cache)


@pytest.mark.parametrize(
    "mode,size,expected",
    [("gundam", (1100, 800), 256 + 6 * 144 + 1), ("gundam", (600, 700), 257), ("small", (600, 800), 145)],
)
def test_deepseek_ocr2_through_the_same_engine(tiny_v2_engine, mode, size, expected):
    image = text_page(size)
    expected_text = decode_text(
        tiny_v2_engine.model.tokenizer, transformers_generate(tiny_v2_engine, image, mode, max_new_tokens=8)
    )
    unpruned = tiny_v2_engine.run(image, OcrOptions(mode=mode, pruner="none", max_new_tokens=8, **NO_GUARD))
    assert unpruned.stats.visual_tokens == expected
    assert unpruned.text == expected_text  # token for token what transformers' own generate gives
    pruned = tiny_v2_engine.run(image, OcrOptions(mode=mode, retention=0.5, max_new_tokens=2))
    # v2 has no newline tokens: only the separator is protected
    assert pruned.stats.visual_tokens_kept == (expected - 1) // 2 + 1


def test_deepseek_ocr2_rejects_v1_only_modes(tiny_v2_engine):
    with pytest.raises(ValueError, match="not available for DeepSeek-OCR v2"):
        tiny_v2_engine.run(text_page(), OcrOptions(mode="large"))


def _decode_with_recompute(engine, prompt, tokens):
    """Greedy next tokens recomputed from scratch (no cache) after each prefix."""
    model = engine.model
    choices = []
    for i in range(len(tokens)):
        prefix = torch.tensor(tokens[:i], dtype=torch.long)
        embeds = torch.cat([prompt.embeds, model.embed(prefix)])
        positions = torch.cat([prompt.position_ids, prompt.next_position + torch.arange(i)])
        with torch.inference_mode():
            out = model.decoder(
                inputs_embeds=embeds[None],
                position_ids=positions[None],
                attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            )
        choices.append(int(model.logits(out.last_hidden_state[0, -1]).argmax()))
    return choices


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_decoding_equals_full_recompute(tiny_engine, positions):
    from pruning import RTPrune

    model = tiny_engine.model
    block = model.encode([preprocess(text_page(), "large")])[0]
    pruned = RTPrune(0.6)(block.features, block.protected, block.newline)
    ids, start = _prompt(model.tokenizer, "free", block.n_tokens)
    prompt = assemble_prompt(model.embed(ids), start, block.n_tokens, pruned.features, pruned.kept_indices, positions)
    if positions == "original":
        assert prompt.next_position == ids.shape[0] > prompt.length  # continues from the unpruned length
        assert prompt.position_ids[start : start + pruned.n_kept].tolist() == (start + pruned.kept_indices).tolist()
    else:
        assert prompt.position_ids.tolist() == list(range(prompt.length))
    generation = generate(model, prompt, max_new_tokens=10, guard=NGramGuard(0, 0), timer=StageTimer())
    assert len(generation.tokens) == 10
    assert _decode_with_recompute(tiny_engine, prompt, generation.tokens) == generation.tokens


def test_pruned_prompt_lengths_and_stats(tiny_engine):
    result = tiny_engine.run(text_page(), OcrOptions(mode="large", retention=0.5, max_new_tokens=3))
    stats = result.stats
    assert stats.visual_tokens == 421
    # 400 grid tokens -> 200 kept; 20 newlines + separator are protected (some may collapse)
    assert 200 < stats.visual_tokens_kept <= 221
    n_text = tokenize_prompt(tiny_engine.model.tokenizer, build_prompt("markdown")).length(0)
    assert stats.prompt_tokens == n_text + stats.visual_tokens_kept
    assert (stats.grid_tokens, stats.grid_tokens_kept, stats.retention) == (400, 200, 0.5)
    assert stats.visual_share == pytest.approx(stats.visual_tokens_kept / 421, abs=1e-6)
    assert stats.retention_requested.value == 0.5 and stats.retention_requested.dynamic is None
    assert stats.output_tokens == 3 and stats.finish_reason == "length"
    latency = stats.latency_ms
    work = ("preprocess", "vision", "prune", "assemble", "prefill", "decode")
    assert all(getattr(latency, s) > 0 for s in work)
    assert latency.total == pytest.approx(sum(getattr(latency, s) for s in ("queue", *work)), abs=0.01)
    assert stats.decode_tokens_per_s > 0


def test_dynamic_ratio_reports_its_terms(tiny_engine):
    stats = tiny_engine.run(text_page(), OcrOptions(mode="base", max_new_tokens=1)).stats
    requested = stats.retention_requested
    assert requested.value == "auto"
    assert requested.dynamic == pytest.approx(1 - (1 - requested.r_sim) * (1 - requested.r_txt))
    assert 0 < requested.r_txt < 1 and stats.visual_tokens_kept < stats.visual_tokens


def test_end_to_end_from_a_pil_image_in_seconds(tiny_engine):
    import time

    start = time.perf_counter()
    result = tiny_engine.run(text_page((600, 800)), OcrOptions(max_new_tokens=16))
    assert time.perf_counter() - start < 20
    assert result.stats.visual_tokens == 903 and result.text and isinstance(result.markdown, str)


def test_cancellation_stops_decoding(tiny_engine):
    calls = []

    def stop_after_three():
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(Cancelled):
        tiny_engine.run(
            text_page(), OcrOptions(mode="tiny", max_new_tokens=50, **NO_GUARD), should_stop=stop_after_three
        )
    assert len(calls) == 3


def test_ngram_guard_blocks_a_repeat():
    guard = NGramGuard(size=3, window=10)
    assert guard.banned([5, 6, 7, 5, 6]) == {7}  # 5 6 -> 7 seen: forbid completing it again
    assert guard.banned([5, 6, 7, 8, 9]) == set()
    assert NGramGuard(size=3, window=3).banned([5, 6, 7, 1, 5, 6]) == set()  # outside the window
    assert guard.banned([128821, 4, 128821, 128821, 4]) == set()  # <td> is exempt
    with pytest.raises(ValueError):
        NGramGuard(size=30, window=10)


def test_guard_stops_a_looping_generation(tiny_engine):
    model = tiny_engine.model
    prompt = unpruned_prompt(tiny_engine)

    def run(guard):
        return generate(model, prompt, max_new_tokens=24, guard=guard, timer=StageTimer()).tokens

    free, guarded = run(NGramGuard(0, 0)), run(NGramGuard(size=2, window=24))
    bigrams = list(itertools.pairwise(free))
    assert len(set(bigrams)) < len(bigrams), "the random tiny model is expected to loop without a guard"
    guarded_bigrams = list(itertools.pairwise(guarded))
    assert len(guarded_bigrams) == len(set(guarded_bigrams))  # no bigram repeats under the guard


def test_max_new_tokens_is_bounded_by_positions(tiny_engine):
    model = tiny_engine.model
    prompt = unpruned_prompt(tiny_engine)
    original = model.max_positions
    try:
        model.max_positions = prompt.next_position + 2
        generation = generate(model, prompt, max_new_tokens=100, guard=NGramGuard(0, 0), timer=StageTimer())
        assert len(generation.tokens) <= 2
    finally:
        model.max_positions = original


def test_box_parsing_and_markdown():
    text = (
        "<|ref|>title<|/ref|><|det|>[[0, 0, 999, 100]]<|/det|>\n# Report\n\n"
        "<|ref|>text<|/ref|><|det|>[[100, 200, 500, 600], [10, 10, 20, 20]]<|/det|>\nBody \\coloneqq x\n\n"
        "<|ref|>image<|/ref|><|det|>[[1, 2, bad]]<|/det|>\n"
    )
    boxes = parse_boxes(text, (1000, 2000))
    assert [b.label for b in boxes] == ["title", "text", "text"]
    assert boxes[0].box == [0, 0, 1000, 200]
    assert boxes[1].box == [100, 400, 500, 1201]
    assert to_markdown(text) == "# Report\n\nBody := x"


def test_prompt_rules():
    assert build_prompt("locate", ref="the title") == "<image>\nLocate <|ref|>the title<|/ref|> in the image."
    with pytest.raises(ValueError, match="needs `ref`"):
        build_prompt("locate")
    with pytest.raises(ValueError, match="exactly one <image>"):
        build_prompt(prompt="no placeholder")
    assert build_prompt(prompt="<image>\nRead it.") == "<image>\nRead it."


def test_cli_json_prints_one_page_object(tmp_path, preset_cache, capsys, monkeypatch):
    from service import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(preset_cache.parent))
    monkeypatch.setattr("service.engine.weights.presets.default_cache_dir", lambda: preset_cache)
    path = tmp_path / "page.png"
    text_page((500, 400)).save(path)
    code = cli.main(
        [
            "ocr",
            str(path),
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--mode",
            "tiny",
            "--retention",
            "0.5",
            "--max-new-tokens",
            "4",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    page = json.loads(captured.out)
    assert set(page) == {"page", "markdown", "text", "boxes", "stats"} and page["page"] == 1
    assert page["stats"]["visual_tokens"] == 73 and page["stats"]["output_tokens"] == 4
    assert "RANDOM weights" in captured.err


def test_cli_rejects_bad_options_before_loading(tmp_path, capsys):
    from service import cli

    assert cli.main(["ocr", str(tmp_path / "x.png"), "--model", "tiny", "--retention", "2"]) == 2
    assert "retention" in capsys.readouterr().err
