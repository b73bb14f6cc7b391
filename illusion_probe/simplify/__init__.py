"""Simplifiers (PCA, SVD, k-means, sparse autoencoders and transcoders, one-hot attention, ablations) and the proxies built from them."""

from illusion_probe.simplify.ablation import MeanAblation, ZeroAblation
from illusion_probe.simplify.attention import OneHotAttention
from illusion_probe.simplify.base import FittedSimplifier, Simplifier
from illusion_probe.simplify.collect import collect_activations
from illusion_probe.simplify.external import ExternalSAE
from illusion_probe.simplify.fitting import fit_proxies, fit_proxy
from illusion_probe.simplify.kmeans import KMeans
from illusion_probe.simplify.pca import PCA, SVD
from illusion_probe.simplify.proxy import Proxy
from illusion_probe.simplify.random_baselines import RandomCentroids, RandomSubspace
from illusion_probe.simplify.sae import SAE
from illusion_probe.simplify.transcoder import Transcoder

__all__ = [
    "PCA",
    "SAE",
    "SVD",
    "ExternalSAE",
    "FittedSimplifier",
    "KMeans",
    "MeanAblation",
    "OneHotAttention",
    "Proxy",
    "RandomCentroids",
    "RandomSubspace",
    "Simplifier",
    "Transcoder",
    "ZeroAblation",
    "collect_activations",
    "fit_proxies",
    "fit_proxy",
]
