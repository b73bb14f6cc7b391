"""Audit your own hooked model: fit PCA and k-means on one hook, compare in and out of distribution.

No task, no training: the model is whatever you have, and the splits are token
sets you define with ``ip.Split.from_tokens``. Here:

- model A: a ``TransformerBridge`` around a Hugging Face architecture (a small
  random GPT-2, saved with ``save_pretrained`` inside ``--out`` and booted
  offline with ``TransformerBridge.boot_transformers``);
- model B: a ``HookedTransformer`` built from a ``HookedTransformerConfig``, when
  the installed TransformerLens still has it (3.x); skipped on 4.x.

The in-distribution text is uniformly random tokens from the lower half of the
vocabulary; the shifted sets are (a) tokens from the upper half and (b) a random
half-sequence repeated twice (the copying pattern induction heads exploit).
With ``task=None`` every position followed by a real token is scored and the
prediction is the argmax over the full vocabulary.

    python examples/02_audit_any_hooked_model.py --out runs/example_02
    python examples/02_audit_any_hooked_model.py --tiny
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import illusion_probe as ip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_02", help="output directory (everything is written here)")
    parser.add_argument("--tiny", action="store_true", default=os.environ.get("ILLUSION_PROBE_TINY") == "1",
                        help="toy sizes that run in seconds (also: ILLUSION_PROBE_TINY=1)")
    return parser.parse_args()


def token_splits(d_vocab: int, n_ctx: int, n: int, seed: int = 0) -> ip.SplitSet:
    """Train and test from one distribution; two shifted distributions as OOD splits."""
    generator = torch.Generator().manual_seed(seed)
    half = d_vocab // 2

    def lower(count: int) -> torch.Tensor:
        return torch.randint(0, half, (count, n_ctx), generator=generator)

    upper = torch.randint(half, d_vocab, (n, n_ctx), generator=generator)
    first_half = torch.randint(0, d_vocab, (n, n_ctx // 2), generator=generator)
    repeated = torch.cat([first_half, first_half], dim=1)
    return ip.SplitSet([
        ip.Split.from_tokens(lower(n), "train", name="train"),
        ip.Split.from_tokens(lower(n), "id", name="test"),
        ip.Split.from_tokens(upper, "ood", name="ood_upper_vocab"),
        ip.Split.from_tokens(repeated, "ood", name="ood_repeated"),
    ])


def hf_gpt2_bridge(folder: Path, n_layers: int, d_model: int, n_heads: int, d_vocab: int, n_ctx: int):
    """A TransformerBridge around a random HF GPT-2, booted from a local folder with no network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=d_vocab, n_positions=n_ctx)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    model = TransformerBridge.boot_transformers(str(folder), device="cpu")
    model.eval()
    return model


def hooked_transformer(n_layers: int, d_model: int, n_heads: int, d_vocab: int, n_ctx: int):
    """A HookedTransformer built directly with TransformerLens 3.x (not through illusion-probe)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_model // n_heads,
                                  d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu_new", normalization_type="LN",
                                  device="cpu")
    torch.manual_seed(0)
    model = HookedTransformer(cfg)
    model.eval()
    return model


def audit(model: torch.nn.Module, label: str, splits: ip.SplitSet, hook: str, args: argparse.Namespace,
          out: Path) -> None:
    """Fit PCA and k-means at ``hook`` on the train split, evaluate on every split, save everything."""
    rank, clusters = (4, 8) if args.tiny else (8, 32)
    n_fit = len(splits["train"])

    # The lowest level: a simplifier is a TransformerLens hook function. Fit it on cached activations
    # of the train split (every leading dimension is a sample) and pass it in fwd_hooks, no glue.
    batches = ip.collect_activations(model, splits["train"], [hook])
    acts = torch.cat([batch[hook] for batch in batches])  # [n_tokens, d_model]
    pca = ip.PCA(rank=rank).fit(acts)
    tokens = splits["test"].tokens[:4]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, pca)])
    print(f"[{label}] run_with_hooks with a fitted PCA: logits {tuple(logits.shape)}")

    # The usual level: fit_proxy fits copies on the train split; evaluate scores every split.
    proxies = {
        f"pca({rank})": ip.fit_proxy(model, {hook: ip.PCA(rank=rank)}, splits["train"], n_sequences=n_fit),
        f"kmeans({clusters})": ip.fit_proxy(model, {hook: ip.KMeans(n_clusters=clusters, seed=0)}, splits["train"],
                                            n_sequences=n_fit),
    }
    results = ip.evaluate(model, proxies, splits, task=None, n_boot=50 if args.tiny else 1000, progress=False)
    for name in proxies:
        cells = ", ".join(f"{split} {results.value(split, name, 'agreement'):.3f}" for split in results.splits)
        print(f"[{label}] {name} agreement: {cells}")
        for gap in results.gap("kl", "test"):
            if gap.proxy == name:
                print(f"[{label}] {name} KL gap test - {gap.ood_split}: {gap.value:+.4f} "
                      f"[{gap.ci_low:+.4f}, {gap.ci_high:+.4f}]")
    folder = out / label
    folder.mkdir(parents=True, exist_ok=True)
    results.to_json(folder / "results.json")
    ip.write_report(results, folder / "report.html", title=f"Audit of {label} at {hook}")
    proxies[f"pca({rank})"].save(folder / "pca_proxy")  # safetensors + JSON; ip.Proxy.load reads it back


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_layers, d_model, n_heads, d_vocab, n_ctx = (2, 32, 4, 50, 16) if args.tiny else (4, 128, 4, 512, 64)
    splits = token_splits(d_vocab, n_ctx, n=48 if args.tiny else 1000)
    print(splits)

    bridge = hf_gpt2_bridge(out / "tiny_gpt2", n_layers, d_model, n_heads, d_vocab, n_ctx)
    audit(bridge, "hf_gpt2_bridge", splits, "blocks.1.hook_resid_pre", args, out)

    if "hooked" in ip.available_backends():
        model = hooked_transformer(n_layers, d_model, n_heads, d_vocab, n_ctx)
        audit(model, "hooked_transformer", splits, "blocks.1.hook_resid_pre", args, out)
    else:
        print("HookedTransformer part skipped: this TransformerLens "
              "has no HookedTransformer (removed in 4.0; install 'transformer-lens<4' to run it)")


if __name__ == "__main__":
    main()
