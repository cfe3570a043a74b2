"""generate(): batching by prompt length, JSONL records, prompts preserved."""

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from megadiff.eval.generate import generate


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[PAD]", "a", "b", "c", "d", "the", "cat", "[MASK]"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_generate_writes_jsonl(tmp_path):
    tok = _tokenizer()
    calls = []

    def model_fn(x):
        calls.append(x.shape)
        return torch.randn(x.shape + (16,), generator=torch.Generator().manual_seed(int(x.sum())))

    prompts = ["the cat", "a b", "", "the"]
    recs = generate(model_fn, tok, prompts, gen_length=6, sampler="first_hitting", batch_size=2,
                    out_path=tmp_path / "s.jsonl", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert lines == recs and [r["prompt"] for r in recs] == prompts
    for r in recs:
        assert set(r) == {"prompt", "sample", "steps", "nfe", "seconds"}
        assert r["nfe"] == 6 and len(r["sample"].split()) == 6 and "[MASK]" not in r["sample"]
    assert {s[1] for s in calls} == {6, 7, 8}  # prompt lengths 0, 1, 2 batched separately
