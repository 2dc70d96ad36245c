"""A real RoBERTa, tiny and random, built in code: for tests and CPU smoke runs with no network.

    python -m tti.text.tiny_roberta OUT_DIR --captions /data/coco     # a COCO root or caption files
    python -m tti.train ... --set text.name=OUT_DIR

writes the files roberta-base ships, so `from_pretrained(OUT_DIR)` takes RoBERTa's own road:
byte-level BPE (trained on the given captions), <s> <pad> </s> at ids 0 1 2, right padding,
position ids that start after padding_idx (= 1). The weights are random: it exercises the
code, it has learnt nothing. Same captions + seed = same files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# RoBERTa's special tokens in roberta-base's id order: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def build_tiny_roberta(out_dir, captions, seed: int = 0, max_length: int = 128,
                       vocab_size: int = 2000, hidden_size: int = 32, layers: int = 2,
                       heads: int = 2) -> str:
    """Train a byte-level BPE tokenizer on `captions` and save it with a random RoBERTa into
    `out_dir` (new or empty); returns out_dir as a string. roberta-base's shape, for
    realistic FLOPs: hidden_size=768, layers=12, heads=12.

    max_length: the longest token sequence it takes, <s> and </s> included (roberta-base: 512);
    the model has max_length + 2 positions, as RoBERTa's position ids start at padding_idx + 1.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; give a new one")
    captions = [c for c in captions if c.strip()]
    if not captions:
        raise ValueError("build_tiny_roberta: no captions to train the tokenizer on")
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.save_model(str(out))  # vocab.json + merges.txt, the files roberta-base ships
    tokenizer = RobertaTokenizerFast.from_pretrained(str(out), model_max_length=max_length)
    tokenizer.save_pretrained(str(out))
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                           num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden_size,
                           max_position_embeddings=max_length + 2, type_vocab_size=1,
                           bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)
        model = RobertaModel(config)
    model.save_pretrained(str(out))
    return str(out)


def read_captions(source) -> list[str]:
    """Captions from a COCO root (every annotations/captions_*.json), one COCO caption file,
    or a text file with one caption per line."""
    source = Path(source)
    if source.is_dir():
        files = sorted((source / "annotations").glob("captions_*.json"))
        if not files:
            raise FileNotFoundError(f"{source}: no annotations/captions_*.json in it")
        return [c for f in files for c in read_captions(f)]
    if source.suffix == ".json":
        try:
            annotations = json.loads(source.read_text(encoding="utf-8"))["annotations"]
            return [a["caption"] for a in annotations if isinstance(a.get("caption"), str)]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a COCO caption file ({type(e).__name__}: {e})") from None
    return source.read_text(encoding="utf-8").splitlines()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="new or empty folder to write the model into")
    parser.add_argument("--captions", nargs="+", required=True,
                        help="COCO roots, COCO caption .json files or .txt (one caption a line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=128,
                        help="longest token sequence the model takes (default 128)")
    args = parser.parse_args(argv)
    try:
        captions = [c for source in args.captions for c in read_captions(source)]
        path = build_tiny_roberta(args.out_dir, captions, seed=args.seed, max_length=args.max_length)
    except (OSError, ValueError) as e:  # the user's paths or files: no traceback
        sys.exit(f"tti.text.tiny_roberta: {e}")
    print(f"{path}: tiny RoBERTa from {len(captions)} captions; use --set text.name={os.path.abspath(path)}")


if __name__ == "__main__":
    main()
