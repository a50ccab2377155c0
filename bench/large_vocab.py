"""A benchmark model directory with a real-sized vocabulary: a shape's config.json beside a byte-level BPE
tokenizer trained here to ~128k tokens, for benchmarks that need a tokenizer (structured decoding's grammar
masks scale with the vocabulary) where no model hub is reachable.

    python bench/large_vocab.py --shape llama-3.1-8b --out /tmp/llama-3.1-8b-tok

The corpus is generated (pseudo-words of 1-5 syllables drawn with a heavy tail, numbers and JSON punctuation),
so the vocabulary has Llama 3's size and a realistic spread of token lengths, but not English's statistics.
Training takes ~8 s on two cores; the result is the same on every run (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "configs"
EOS = "<|endoftext|>"
_PUNCT = ['{"', '":', '",', '"}', "[", "]", "(", ")", "=", ";", ".", ",", ":"]


def corpus(seed: int = 0, lines: int = 20_000, words_per_line: int = 100) -> Iterator[str]:
    rng = random.Random(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    syllables += ["th", "sh", "ch", "ng", "st", "er", "an", "in", "on"]
    words = list(dict.fromkeys("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4, 5))))
                               for _ in range(400_000)))
    for _ in range(lines):
        line = []
        for _ in range(words_per_line):
            r = rng.random()
            if r < 0.05:
                line.append(str(rng.randrange(100_000)))
            elif r < 0.08:
                line.append(rng.choice(_PUNCT))
            elif rng.random() < 0.5:
                line.append(words[min(int(rng.paretovariate(0.7)) - 1, len(words) - 1)])
            else:
                line.append(rng.choice(words))
        yield " ".join(line)


def build(shape: str, out: Path, vocab_size: int | None = None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    config = json.loads((CONFIGS / shape / "config.json").read_text())
    size = vocab_size or min(128_000, int(config["vocab_size"]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=2, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS).save_pretrained(out)
    eos_id = tok.token_to_id(EOS)
    config.update(eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("generation_config.json",):  # a shape's own eos ids would name tokens this vocabulary lacks
        (out / extra).unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", help="a folder of bench/configs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, help="default: the shape's, at most 128,000")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    print("wrote", build(args.shape, args.out, args.vocab_size))


if __name__ == "__main__":
    main()
