"""The jaxtyping shapes written at the public boundaries hold at run time.

Each boundary is wrapped here with ``jaxtyped(typechecker=beartype)`` and called on real inputs of
several shapes: an annotation that disagreed with what the code takes or returns would raise. The
package itself is not instrumented, so its own one-line errors for bad input stay what users see.
"""

from __future__ import annotations

import pytest
import torch
from beartype import beartype
from jaxtyping import Float, TypeCheckError, jaxtyped
from torch import Tensor

import illusion_probe as ip
from illusion_probe.backends import Backend
from illusion_probe.metrics import Predictions, cross_entropy
from illusion_probe.simplify.base import FittedSimplifier
from illusion_probe.training import predict


def checked(fn):
    return jaxtyped(typechecker=beartype)(fn)


def test_the_checker_is_real() -> None:
    @checked
    def keeps(x: Float[Tensor, "n d"]) -> Float[Tensor, "n d"]:
        return x.T

    with pytest.raises(TypeCheckError):
        keeps(torch.zeros(2, 3))


@pytest.mark.parametrize("shape", [(50, 6), (5, 10, 6), (3, 4, 2, 6)])
def test_fitted_simplifiers_keep_the_activation_shape(shape) -> None:
    acts = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for simplifier in (ip.PCA(rank=2), ip.SVD(rank=2), ip.KMeans(n_clusters=3), ip.MeanAblation()):
        fitted = checked(type(simplifier).fit)(simplifier, acts)
        out = checked(FittedSimplifier.__call__)(fitted, acts)
        assert out.shape == acts.shape
    pca = ip.PCA(rank=1).fit(acts)  # a 4-D activation without per_head is one feature vector of head * d_head
    assert checked(ip.PCA.explained_variance_ratio.fget)(pca).shape == pca.fitted_shape


def test_attention_and_splits() -> None:
    pattern = torch.softmax(torch.randn(2, 3, 5, 5), -1)
    assert checked(ip.OneHotAttention.__call__)(ip.OneHotAttention(), pattern).shape == pattern.shape
    tokens = torch.randint(1, 9, (4, 7))
    tokens[0, 5:] = 0
    split = checked(ip.Split.from_tokens)(tokens, "id", pad_id=0)
    checked(ip.Split)(split.name, split.role, split.tokens, split.eval_mask, split.targets, split.real_mask)
    assert split.lengths.tolist() == [5, 7, 7, 7]


def test_predictions_and_cross_entropy() -> None:
    logits = torch.randn(6, 11)
    answers = torch.tensor([2, 5, 7])
    predictions = checked(Predictions)(logits, answers)
    assert checked(Predictions.logp.func)(predictions).shape == (6, 11)
    assert set(checked(Predictions.pred.func)(predictions).tolist()) <= {2, 5, 7}
    assert checked(cross_entropy)(predictions.logp, torch.arange(6)).shape == (6,)
    assert checked(predict)(torch.randn(2, 4, 11), answers).shape == (2, 4)


def test_backend_passes(model_family, random_train_split) -> None:
    backend = Backend.of(model_family)
    batch = random_train_split.head(4)
    with torch.no_grad():
        logits = checked(type(backend).logits)(backend, batch.tokens, batch.real_mask)
        final = checked(type(backend).final_residual)(backend, batch.tokens, batch.real_mask)
        head = checked(type(backend).head)(backend, final[batch.real_mask])
    assert logits.shape[:2] == final.shape[:2] and head.shape[-1] == backend.d_vocab_out
