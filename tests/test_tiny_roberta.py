"""The tiny RoBERTa built in code is a RoBERTa as from_pretrained("roberta-base") gives one:
its tokenizer class, special tokens, right padding, byte-level BPE, position-id offset; and
it is the same for the same seed."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from coco_fixture import write_coco_fixture
from transformers import AutoModel, AutoTokenizer

from tti.text.encoder import TextEncoder
from tti.text.tiny_roberta import build_tiny_roberta, main

MAX_LENGTH = 24
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco")).all_captions()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, captions):
    return build_tiny_roberta(tmp_path_factory.mktemp("roberta") / "m", captions,
                              max_length=MAX_LENGTH)


def test_loads_through_auto_classes_as_roberta(folder):
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    assert type(model).__name__ == "RobertaModel" and model.config.model_type == "roberta"
    assert "Roberta" in type(tokenizer).__name__ and tokenizer.is_fast
    # roberta-base's special tokens at roberta-base's ids, and its padding side.
    assert (tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token) == ("<s>", "<pad>", "</s>")
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == model.embeddings.padding_idx == 1


def test_captions_are_wrapped_and_right_padded(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(["a red circle", "a blue square to the left of a green triangle"],
                    padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    short = int(mask[0].sum())
    assert ids[0, 0] == ids[1, 0] == 0 and ids[0, short - 1] == 2 and ids[1, -1] == 2
    assert (ids[0, short:] == 1).all() and (mask[0, short:] == 0).all() and mask[1].all()


def test_byte_level_bpe_round_trips_any_text(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Un cercle rouge à gauche d’un carré — naïve café ☕ 犬"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # bytes, never unknown
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_position_ids_start_after_padding_idx(folder):
    # RoBERTa numbers real tokens from padding_idx + 1 = 2, so a model with P positions takes
    # sequences of P - 2 tokens: MAX_LENGTH fits, one more does not.
    model = AutoModel.from_pretrained(folder)
    assert model.config.max_position_embeddings == MAX_LENGTH + 2
    ids = torch.full((1, MAX_LENGTH), 5)
    assert model(input_ids=ids).last_hidden_state.shape == (1, MAX_LENGTH, model.config.hidden_size)
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        model(input_ids=torch.full((1, MAX_LENGTH + 1), 5))
    # Padding sits at position padding_idx itself: a caption's states do not depend on it.
    encoder = TextEncoder(folder, max_length=MAX_LENGTH, cache=False)
    alone = encoder(["a red circle"])
    padded = encoder(["a red circle", "a blue square to the left of a green triangle"])
    n = int(alone.mask.sum())
    torch.testing.assert_close(padded.tokens[0, :n], alone.tokens[0])


def test_same_seed_same_files_other_seed_other_weights(tmp_path, captions, folder):
    build_tiny_roberta(tmp_path / "again", captions, max_length=MAX_LENGTH)
    build_tiny_roberta(tmp_path / "other", captions, max_length=MAX_LENGTH, seed=1)
    names = sorted(p.name for p in (tmp_path / "again").iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (Path(folder) / name).read_bytes()
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() == \
        (tmp_path / "again" / "tokenizer.json").read_bytes()
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != \
        (tmp_path / "again" / "model.safetensors").read_bytes()


def test_cli_writes_a_model_and_never_overwrites(tmp_path, capsys):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\na red square\n", encoding="utf-8")
    main([str(tmp_path / "m"), "--captions", str(captions)])
    assert f"--set text.name={tmp_path / 'm'}" in capsys.readouterr().out
    assert AutoModel.from_pretrained(str(tmp_path / "m")).config.model_type == "roberta"
    proc = subprocess.run([sys.executable, "-m", "tti.text.tiny_roberta", str(tmp_path / "m"),
                           "--captions", str(captions)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not an empty folder" in proc.stderr
