"""Audit a model you trained elsewhere, on your own text: `illusion-probe audit` from a model folder and text files.

The "elsewhere" here is a tiny GPT-2 trained for a few hundred steps on Python source and saved
with ``save_pretrained``, with a byte-level BPE tokenizer beside it: exactly what a user brings.
The text comes from files on every machine: the running interpreter's standard library (Python
source: fitted on one set of files, held out on another) and the English prose of Python's own
documentation topics (``pydoc_data.topics``, out of distribution). The audit fits PCA of the
residual stream and k-means of the keys on the Python text, then asks how faithful they stay on
held-out Python and on English.

    python examples/05_audit_your_model.py --out runs/example_05
    python examples/05_audit_your_model.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
from pathlib import Path

import torch

import illusion_probe as ip
from illusion_probe.cli import main as cli


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_05", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    return parser.parse_args()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def python_files(count: int) -> list[str]:
    """Sources of the standard library's top-level modules, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("[a-z]*.py"))[:count]]


def english_topics(count: int) -> list[str]:
    """Paragraphs of English from Python's documentation topics."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.split()) > 20]
    return paragraphs[:count]


def save_model(folder: Path, corpus: list[str], steps: int) -> None:
    """A tiny GPT-2 with a byte-level BPE tokenizer, trained briefly on ``corpus`` with a plain torch loop and
    saved with ``save_pretrained``: a model trained elsewhere, as a user brings it."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = torch.tensor([i for text in corpus for i in tokenizer(text)["input_ids"]])
    windows = ids[: len(ids) // 64 * 64].reshape(-1, 64)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = windows[torch.randint(len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained a tiny GPT-2 for {steps} steps on Python source: loss {loss.item():.2f}")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    text = out / "text"
    text.mkdir(parents=True, exist_ok=True)
    n_files, n_prose, steps = (12, 40, 30) if args.tiny else (60, 400, 400)
    python = python_files(2 * n_files)
    fit = write_jsonl(text / "python_fit.jsonl", python[::2])
    test = write_jsonl(text / "python_held_out.jsonl", python[1::2])
    prose = write_jsonl(text / "english.jsonl", english_topics(n_prose))
    save_model(out / "model", python[::2], steps)

    # The command a user runs; main() is the console script, so this is exactly `illusion-probe audit ...`.
    argv = ["audit", "--model", str(out / "model"), "--fit", str(fit), "--split", f"test={test}",
            "--split", f"ood_english={prose}", "--proxy", "pca:4,16,32@blocks.1.hook_resid_pre",
            "--proxy", "kmeans:8,32@blocks.1.attn.hook_k", "--window", "64", "--max-sequences",
            "100" if args.tiny else "1000", "--out", str(out / "audit"), "--device", "cpu",
            "--set", f"evaluation.n_boot={50 if args.tiny else 1000}"]
    print("illusion-probe " + " ".join(argv))
    if cli(argv) != 0:
        raise SystemExit("the audit failed; see the message above")
    results = ip.Results.from_json(out / "audit" / "results.json")
    for gap in results.gap("agreement", "test", "ood_english"):
        print(f"{gap.proxy}: agreement gap held-out Python - English {gap.value:+.3f} "
              f"[{gap.ci_low:+.3f}, {gap.ci_high:+.3f}]")


if __name__ == "__main__":
    main()
