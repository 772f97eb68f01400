"""The LLM trainer's parts without Ray: tokenizer, corpora, model step code, config and search checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainers import specs
from trainers.llm_model import PRESETS, build_model, make_optimizer, to_blocks, train_step
from trainers.specs import SpecError, build_config
from trainers.text_data import CORPORA, load_corpus
from trainers.tune import parse_space, sample_configs, validate_search


def test_the_rebuilt_tokenizer_gives_gpt2s_known_ids(gpt2_tokenizer):
    tokenizer, source = gpt2_tokenizer
    assert source == "pypi:openai-whisper==20250625" and len(tokenizer) == 50257
    assert tokenizer("Hello, my dog is cute")["input_ids"] == [15496, 11, 616, 3290, 318, 13779]
    text = " The quick brown fox: naïve café, 1,234 tokens!\n\nDone."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: round-trips anything
    assert tokenizer.eos_token_id == 50256


def test_the_pydoc_corpus_is_real_english_held_out_by_document(tmp_path):
    corpus = load_corpus(tmp_path, "pydoc")
    assert len(corpus.train) > 300_000 and len(corpus.validation) > 30_000
    assert corpus.source.startswith("stdlib-docstrings:") and "Return" in corpus.train
    assert corpus.validation[:200] not in corpus.train
    assert load_corpus(tmp_path, "pydoc") == corpus  # cached


def test_catalog_repeats_the_presets_and_corpora_exactly():
    assert specs.LLM_CONTEXT == {name: p["n_positions"] for name, p in PRESETS.items()}
    assert specs.LLM_CORPORA == CORPORA


@pytest.mark.parametrize("params,message", [
    ({"model": "gpt-5"}, "--model must be one of distilgpt2, tiny"),
    ({"model": "tiny", "block_size": 512}, "--block-size must be in [8, 256] (tiny's context is 256 tokens)"),
    ({"block_size": 2048}, "distilgpt2's context is 1024 tokens"),
    ({"dataset": "imagenet"}, "--dataset must be one of"),
    ({"max_steps": 0}, "--max-steps must be at least 1"),
    ({"precision": "int4"}, "--precision must be one of"),
])
def test_bad_llm_configs_are_refused_with_the_reason(params, message):
    with pytest.raises(SpecError) as err:
        build_config("llm", params)
    assert message in str(err.value)


def test_blocks_and_schedule():
    ids = torch.arange(1000).numpy()
    blocks = to_blocks(ids, 64)
    assert blocks.shape == (15, 64) and blocks[1, 0].item() == 64
    assert to_blocks(ids, 64, limit_tokens=200).shape == (3, 64)
    model = torch.nn.Linear(4, 4)
    opt, sched = make_optimizer(model, lr=1.0, weight_decay=0.0, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(1 / 8) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    # Resuming at step 6 continues the same schedule.
    _, resumed = make_optimizer(model, lr=1.0, weight_decay=0.0, warmup_steps=4, total_steps=12, done_steps=6)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[6])


def test_a_few_steps_of_the_tiny_model_lower_the_loss():
    torch.manual_seed(0)
    model, source = build_model("tiny", vocab_size=512, offline=True)
    assert source.startswith("scratch:tiny")
    opt, sched = make_optimizer(model, lr=3e-3, weight_decay=0.01, warmup_steps=0, total_steps=30)
    batch = torch.randint(0, 512, (4, 32))
    first = train_step(model, opt, sched, [batch[:2], batch[2:]], device=torch.device("cpu"),
                       amp=torch.autocast("cpu", enabled=False), scaler=None)
    for _ in range(15):
        last = train_step(model, opt, sched, [batch], device=torch.device("cpu"),
                          amp=torch.autocast("cpu", enabled=False), scaler=None)
    assert first.tokens == 128 and last.loss < first.loss - 1.0


def test_search_spaces_are_validated_before_any_trial():
    dims = parse_space("mnist", ["lr=loguniform:1e-4:1e-2", "batch_size=choice:64,128", "width=randint:8:32"])
    configs = sample_configs("mnist", dims, {"epochs": 2}, 6, seed=3)
    assert len(configs) == 6 and all(1e-4 <= c["lr"] <= 1e-2 and c["batch_size"] in (64, 128) for c in configs)
    assert configs == sample_configs("mnist", dims, {"epochs": 2}, 6, seed=3)  # seeded
    with pytest.raises(SpecError, match="--width must be in"):  # a draw the catalog refuses
        sample_configs("mnist", parse_space("mnist", ["width=choice:1024"]), {}, 1, seed=0)
    with pytest.raises(SpecError, match="no parameter 'depth'"):
        parse_space("mnist", ["depth=choice:1,2"])
    with pytest.raises(SpecError, match="--budget-usd must be a positive amount"):
        validate_search(["mnist", "--budget-usd", "-1"])
    trainer, trial = validate_search(["llm", "--model", "tiny", "--max-steps", "20"])
    assert trainer == "llm" and dataclasses.asdict(trial)["model"] == "tiny"
