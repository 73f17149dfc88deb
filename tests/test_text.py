import json

import pytest
import torch

from tests.oracles import randomize
from wanx.models.t5 import UMT5Encoder
from wanx.text import TextEncoder, Tokenizer, clean_prompt

CORPUS = ["a cat walks on the grass", "a dog runs in the park at night", "小猫在草地上走", "the camera pans left"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small T5-style tokenizer (unigram, EOS appended) built here: nothing downloaded."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 20, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("umt5-tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}),
        encoding="utf-8")
    return folder


def test_clean_prompt():
    assert clean_prompt("  a  cat\n\twalks &amp;amp; runs ") == "a cat walks & runs"
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_padding_lengths_eos_and_truncation(tokenizer_dir):
    tok = Tokenizer(tokenizer_dir, length=12)
    ids, mask = tok(["a cat", "a dog runs in the park at night " * 4])
    assert ids.shape == mask.shape == (2, 12)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()  # EOS, then padding
    assert mask[1].all() and ids[1, -1] == 1  # truncated, EOS kept


def test_same_ids_as_transformers_autotokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = [clean_prompt(p) for p in CORPUS + ["a  cat &amp; a dog"]]
    expected = reference(prompts, padding="max_length", truncation=True, max_length=16, add_special_tokens=True,
                         return_tensors="pt")
    ids, mask = Tokenizer(tokenizer_dir, length=16)(prompts)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])


def test_text_encoder_trims_pads_and_caches(tokenizer_dir, monkeypatch):
    model = randomize(UMT5Encoder("tiny"), 0, std=0.3)
    encoder = TextEncoder(model, Tokenizer(tokenizer_dir, length=24))
    emb, lengths = encoder.encode(["a cat walks", "the camera pans left on the grass"])
    assert emb.shape == (2, 24, 32)
    for row, n in enumerate(lengths.tolist()):
        assert (emb[row, n:] == 0).all() and (emb[row, n - 1] != 0).any()
    # Official semantics: a prompt's states equal encoding it alone (the mask isolates it).
    ids, mask = encoder.tokenizer(["a cat walks"])
    with torch.no_grad():
        alone = model(ids, mask)[0, : lengths[0]]
    assert torch.allclose(emb[0, : lengths[0]], alone, atol=1e-5)

    calls = []
    monkeypatch.setattr(model, "forward", lambda *a: calls.append(a) or torch.zeros(1, 24, 32))
    again, _ = encoder.encode(["a cat walks"])
    assert not calls and torch.equal(again[0], emb[0])  # cached: the very same states, not encoded twice


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer(tmp_path)
