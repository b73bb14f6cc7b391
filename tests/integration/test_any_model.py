"""Any model in, any text in: local Hugging Face models of four architectures, text files, padding."""

from __future__ import annotations

import json

import pytest
import torch

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.loading import load_model
from illusion_probe.registry import SIMPLIFIERS
from illusion_probe.simplify.dictionary import SparseDictionary
from illusion_probe.tasks.text import read_documents
from tests.helpers import hook_count
from tests.hf_models import ARCHITECTURES, N_CTX, VOCAB, boot, save_tiny


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("hf")
    return {a: boot(save_tiny(a, folder / a, tokenizer=a == "llama")) for a in ARCHITECTURES}


def _splits(n: int = 12, length: int = 10) -> ip.SplitSet:
    gen = torch.Generator().manual_seed(0)
    return ip.SplitSet([ip.Split.from_tokens(torch.randint(4, VOCAB, (n, length), generator=gen), "train", name="train"),
                        ip.Split.from_tokens(torch.randint(4, VOCAB, (n, length), generator=gen), "id", name="test"),
                        ip.Split.from_tokens(torch.randint(4, 12, (n, length), generator=gen), "ood", name="ood_few")])


#: Where each family is tried, in order: the first group with a hook the family accepts is used.
PLACES = (("blocks.1.hook_resid_pre", "blocks.1.attn.hook_k"), ("blocks.1.attn.hook_pattern",), ("blocks.1.hook_mlp_out",))
TINY = {"rank": 2, "n_clusters": 3, "d_sae": 8}  # each family's size option, at a tiny size


class _IdentitySAE:
    """A stand-in for a dictionary trained elsewhere: encode and decode change nothing."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def _tiny(method: str) -> ip.Simplifier:
    """An unfitted simplifier of the built-in family ``method``, small and quick to fit."""
    if method == "external_sae":
        return ip.ExternalSAE(_IdentitySAE())
    cls = SIMPLIFIERS.get(method)
    fast = {"k": 2, "epochs": 2} if issubclass(cls, SparseDictionary) else {}
    return ip.Simplifier.create(method, TINY[cls.size_option] if cls.size_option else None, **fast)


def _accepts(simplifier: ip.Simplifier, hook: str) -> bool:
    try:
        simplifier.check_hook(hook)
    except ip.IllusionProbeError:
        return False
    return True


def _every_family() -> dict[str, dict[str, ip.Simplifier]]:
    """``{proxy name: {hook: simplifier}}``: every built-in registered family, at the hooks of ``PLACES`` it accepts."""
    wanted = {}
    for method in SIMPLIFIERS.names():
        if not SIMPLIFIERS.get(method).__module__.startswith("illusion_probe."):
            continue  # a family a test registered for itself
        simplifier = _tiny(method)
        hooks = next((found for group in PLACES if (found := [h for h in group if _accepts(simplifier, h)])), [])
        assert hooks, f"{method} accepts none of the tested hooks; add its hook to PLACES"
        wanted.update({f"{method}@{hook}": {hook: simplifier} for hook in hooks})
    return wanted


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_simplifier_family_fits_and_evaluates(hf_models, architecture: str) -> None:
    model, splits = hf_models[architecture], _splits()
    wanted = {**_every_family(), "identity": {"blocks.1.hook_resid_pre": ip.PCA(model.cfg.d_model)}}
    proxies = ip.fit_proxies(model, wanted, splits["train"])
    results = ip.evaluate(model, proxies, splits, n_boot=0, progress=False)
    assert {r.proxy for r in results.records} == set(proxies)
    assert {"sae@blocks.1.attn.hook_k", "external_sae@blocks.1.attn.hook_k", "transcoder@blocks.1.hook_mlp_out",
            "onehot_attention@blocks.1.attn.hook_pattern", "random_centroids@blocks.1.hook_resid_pre"} <= set(proxies)
    dictionaries = [name for name, proxy in proxies.items() if any(s.has_latents for s in proxy.simplifiers.values())]
    for split in splits:
        assert results.value(split, "identity", "agreement") == 1.0
        assert abs(results.value(split, "identity", "kl")) < 1e-6
        assert all(results.value(split, name, "l0") >= 0 for name in dictionaries)
    assert results.meta["backend"] == "bridge_hf" and hook_count(model) == 0


def test_load_model_from_each_kind_of_source(hf_models, tmp_path, monkeypatch) -> None:
    checkpoint = ip.save_checkpoint(tmp_path / "ckpt", ip.build_model(ip.ModelSizes(d_vocab=9, n_ctx=8),
                                                                      ip.ModelConfig(n_layers=1, d_model=8, n_heads=2)))
    assert load_model(checkpoint, "cpu").cfg.d_vocab == 9
    hf = load_model(save_tiny("gpt2", tmp_path / "gpt2"), "cpu")
    assert Backend.of(hf).kind == "bridge_hf" and hf.cfg.n_ctx == N_CTX
    (tmp_path / "empty").mkdir()
    with pytest.raises(ip.IllusionProbeError, match="neither an illusion-probe checkpoint nor a Hugging Face"):
        load_model(tmp_path / "empty", "cpu")
    with pytest.raises(ip.IllusionProbeError, match="no such directory"):
        load_model(str(tmp_path / "missing"), "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ip.IllusionProbeError, match="hub name, but HF_HUB_OFFLINE is set") as err:
        load_model("gpt2", "cpu")
    assert "save_pretrained" in str(err.value) and "\n" not in str(err.value)


def test_documents_from_each_file_format(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\nnot json\n" + json.dumps({"body": "x"}) + "\n"
                                      + json.dumps({"text": "two"}) + "\n")
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "x.py").write_text("print(1)\n")
    (folder / "sub" / "y.md").write_text("# title\n")
    (folder / ".hidden").write_text("secret")
    (folder / "bad.bin").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "c.py").write_text("def f():\n    return 1\n")
    assert read_documents(tmp_path / "a.txt").texts == ("first line", "second line")
    docs = read_documents(tmp_path / "b.jsonl")
    assert docs.texts == ("one", "two") and docs.skipped == {"not JSON": 1, "no 'text' text field": 1}
    docs = read_documents(folder)
    assert docs.texts == ("# title\n", "print(1)\n") and docs.skipped == {"not UTF-8": 1}  # sorted paths
    assert read_documents(tmp_path / "c.py").texts == ("def f():\n    return 1\n",)
    with pytest.raises(ip.IllusionProbeError, match="not found"):
        read_documents(tmp_path / "nope.txt")


def test_text_becomes_windows_with_the_models_tokenizer(hf_models, tmp_path) -> None:
    model = hf_models["llama"]
    text = " ".join(["the cat sat on the mat"] * 4)  # 24 words, one token each
    split = ip.Split.from_text(model, [text, "hello", "   "], role="ood", window=10, name="ood_cats")
    bos = model.tokenizer.bos_token_id
    assert split.tokens.shape == (4, 10) and (split.tokens[:, 0] == bos).all()  # 9 words per window, BOS first
    assert split.lengths.tolist() == [10, 10, 7, 2]  # 24 words in 9 + 9 + 6; "hello" is BOS + one token
    assert split.meta["skipped"] == {"empty": 1} and split.meta["documents_used"] == 2
    assert model.tokenizer.decode(split.tokens[0, 1:]).split() == text.split()[:9]
    overlapping = ip.Split.from_text(model, [text], window=10, stride=5, max_sequences=3)
    assert len(overlapping) == 3 and torch.equal(overlapping.tokens[1, 1:5], overlapping.tokens[0, 6:10])
    capped = ip.Split.from_text(model, [text, text], window=10, max_sequences=2)  # 3 windows per document
    assert len(capped) == 2 and capped.meta["documents_used"] == 1
    assert capped.meta["skipped"] == {"windows beyond max_sequences": 4}
    with pytest.raises(ip.IllusionProbeError, match="max_sequences must be a positive integer"):
        ip.Split.from_text(model, [text], max_sequences=0)
    (tmp_path / "t.txt").write_text("the cat\nsat on the mat\n")
    assert len(ip.Split.from_text(model, tmp_path / "t.txt", window=5)) == 2
    with pytest.raises(ip.IllusionProbeError, match="does not fit the model's context of 32"):
        ip.Split.from_text(model, [text], window=64)
    with pytest.raises(ip.IllusionProbeError, match="placeholder"):
        ip.Split.from_text(hf_models["gpt2"], [text])  # saved without a tokenizer
    with pytest.raises(ip.IllusionProbeError, match="no window of at least two tokens"):
        ip.Split.from_text(model, ["   "])


def _ragged(n: int = 10, length: int = 9) -> ip.Split:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 30, (n, length), generator=gen)
    lengths = torch.randint(3, length + 1, (n,), generator=gen)
    real = torch.arange(length)[None, :] < lengths[:, None]
    return ip.Split.next_token(torch.where(real, tokens, 0), real, "id", name="test")


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("bert")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=N_CTX)).eval().save_pretrained(folder)
    return boot(folder)


@pytest.fixture(scope="module")
def bidirectional_bridge() -> torch.nn.Module:
    """A native bridge whose attention is bidirectional (its padding is masked, not merely unreachable)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=32,
                                  act_fn="gelu", attention_dir="bidirectional", seed=0)
    return TransformerBridge.boot_native(cfg, device="cpu").eval()


PADDED = {"hooked": "hooked_transformer", "bridge": "native_bridge", "bridge_hf": "hf_gpt2_bridge", "bert": "bert",
          "bridge_bidirectional": "bidirectional_bridge"}


@pytest.mark.parametrize("family", list(PADDED))
def test_padding_cannot_change_a_result(family, request, random_train_split) -> None:
    """The same sequences, padded into shared batches or each in a batch of its own (no padding), fit and score
    alike."""
    model = request.getfixturevalue(PADDED[family])
    split, train = _ragged(), random_train_split
    wanted = {"p": {"blocks.1.hook_resid_pre": ip.PCA(rank=3)}, "mean": {"blocks.1.attn.hook_k": ip.MeanAblation()}}
    shared, own = (ip.fit_proxies(model, wanted, train, batch_size=size) for size in (64, 1))
    for name, proxy in shared.items():
        (hook, simplifier), = proxy.simplifiers.items()
        probe = torch.randn(2, 5, *proxy.feature_shapes[hook], generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(simplifier(probe), own[name].simplifiers[hook](probe), atol=1e-5, rtol=1e-5)
    splits = ip.SplitSet([train, split])
    padded = ip.evaluate(model, {"p": shared["p"]}, splits, n_boot=0, batch_size=64, progress=False)
    alone = ip.evaluate(model, {"p": shared["p"]}, splits, n_boot=0, batch_size=1, progress=False)
    for a, b in zip(padded.records, alone.records, strict=True):
        assert (a.split, a.metric, a.hook) == (b.split, b.metric, b.hook)
        assert a.value == pytest.approx(b.value, rel=1e-4, abs=1e-5, nan_ok=True), (a.split, a.metric)


def test_a_bidirectional_hooked_transformer_refuses_padding() -> None:
    if "hooked" not in ip.available_backends():
        pytest.skip("HookedTransformer needs TransformerLens < 4")
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=40,
                                                          n_ctx=12, act_fn="relu", attention_dir="bidirectional"))
    split = _ragged()
    with pytest.raises(ip.IllusionProbeError, match="ignores attention masks"):
        ip.fit_proxy(model, {"blocks.0.hook_resid_pre": ip.PCA(rank=2)}, ip.SplitSet([split])["test"],
                     allow_non_train=True)
