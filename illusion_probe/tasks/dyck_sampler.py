"""Vectorised sampler of bounded-depth Dyck sequences, and the skeleton hold-out rule.

Token layout shared with :mod:`illusion_probe.tasks.dyck`: ``BOS_ID = 0``, ``PAD_ID = 1``,
opening bracket of type ``i`` is ``2 + i``, closing bracket of type ``i`` is ``2 + k + i``.

The process (DESIGN section 5): start with BOS; at depth 0 stop with probability 1/2 once the
sequence holds at least ``min_len`` tokens, else open a uniformly chosen type; at
``0 < depth < max_depth`` close with probability 1/2, else open; at ``max_depth`` close. A close
always closes the type on top of the stack. Sequences that would grow past ``max_len`` tokens
are rejected, so accepted sequences follow the process conditioned on ``length <= max_len``.

:func:`sample_batch` has no loop over tokens or sequences: depth paths advance eight tokens per
table lookup (:func:`_depth_paths`), brackets are paired by one stable radix sort per batch, and
bracket types are drawn per pair.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

BOS_ID = 0
PAD_ID = 1
FIRST_OPEN_ID = 2

# Skeleton hash: polynomial rolling hash modulo a Mersenne prime (all products stay below 2**63),
# then a xor-shift/multiply finaliser. `SkeletonHoldout.is_held_out` is the plain-Python definition.
_P = 2**31 - 1
_BASE = 1_000_003
_MIX = (0x2C1B3C6D, 0x297A2D39)

_STEPS = 8  # tokens per byte of coins, taken at once by a table lookup


@dataclass(frozen=True)
class SamplerSpec:
    """Bounds of one run of the process.

    Attributes:
        k: number of bracket types.
        max_depth: depth bound; at this depth the process must close.
        min_len: the process may stop only once the sequence has this many tokens (BOS included).
        max_len: longest accepted sequence, BOS included; longer draws are rejected.
    """

    k: int
    max_depth: int
    min_len: int
    max_len: int


@dataclass(frozen=True)
class SkeletonHoldout:
    """Which top-level block skeletons (bracket types erased, e.g. ``"(()())"``) are held out.

    A skeleton with at least ``min_pairs`` bracket pairs is held out when its seeded hash falls
    below ``fraction`` of the hash range; smaller skeletons are never held out. The set is thus
    defined for every skeleton without enumerating any.

    Attributes:
        fraction: probability-like share of eligible skeletons held out, in (0, 1).
        min_pairs: smallest skeleton (in bracket pairs) that may be held out.
        seed: picks which skeletons.
    """

    fraction: float
    min_pairs: int
    seed: int

    @property
    def threshold(self) -> int:
        """Hashes below this integer are held out."""
        return int(self.fraction * 2**31)

    @property
    def initial_hash(self) -> int:
        """Hash of the empty skeleton: the seed enters here."""
        return _finalise(self.seed % _P)

    def is_held_out(self, skeleton: str) -> bool:
        """The definition: is this skeleton (a balanced string of ``(`` and ``)``) held out?"""
        if len(skeleton) < 2 * self.min_pairs:
            return False
        h = self.initial_hash
        for char in skeleton:
            h = (h * _BASE + (1 if char == "(" else 2)) % _P
        return _finalise(h) < self.threshold


def _finalise(h: int | Tensor) -> int | Tensor:
    """Scramble a hash below 2**31 (a Python int or an int64 tensor) into another below 2**31."""
    h = h ^ (h >> 15)
    h = (h * _MIX[0]) % _P
    h = h ^ (h >> 12)
    h = (h * _MIX[1]) % _P
    return h ^ (h >> 15)


@dataclass(frozen=True)
class SampleBatch:
    """Accepted sequences of one batch.

    Attributes:
        tokens: ``[n, max_len]`` token ids, right-padded with ``PAD_ID``.
        lengths: ``[n]`` real tokens per sequence (BOS included).
        max_depth: ``[n]`` deepest nesting reached.
        has_held_out: ``[n]`` True when some top-level block has a held-out skeleton
            (all False when sampled without a hold-out rule).
        held_out_anywhere: ``[n]`` True when some block at any depth, nested ones included, has a
            held-out skeleton (so ``has_held_out`` implies it).
    """

    tokens: Int[Tensor, "n max_len"]
    lengths: Int[Tensor, " n"]
    max_depth: Int[Tensor, " n"]
    has_held_out: Bool[Tensor, " n"]
    held_out_anywhere: Bool[Tensor, " n"]


def sample_batch(
    spec: SamplerSpec, batch_size: int, generator: torch.Generator, holdout: SkeletonHoldout | None = None
) -> SampleBatch:
    """Run the process for ``batch_size`` candidates and keep those that stop within ``spec.max_len``."""
    depth = _depth_paths(spec, batch_size, generator)
    real = depth >= 0
    lengths = real.sum(dim=1)
    n, width = depth.shape
    # A bracket's level is the depth inside it: the larger of the depths before and after it.
    # Within one level of one row opens and closes alternate, so a stable sort of the flattened
    # levels puts every open right before its close. Viewed unsigned, PAD's -1 is the largest key.
    unsigned = depth.numpy().view(f"u{depth.element_size()}")
    level = np.empty_like(unsigned)
    level[:, 0] = np.iinfo(level.dtype).max  # BOS sorts last too
    np.maximum(unsigned[:, 1:], unsigned[:, :-1], out=level[:, 1:])
    order = np.argsort(level.reshape(-1), kind="stable")  # a radix sort for 8- and 16-bit keys
    n_pairs = (int(lengths.sum()) - n) // 2
    pair_types = torch.randint(spec.k, (n_pairs,), generator=generator).numpy() + FIRST_OPEN_ID
    tokens = np.full(n * width, PAD_ID, dtype=np.int64)
    tokens[order[0 : 2 * n_pairs : 2]] = pair_types
    tokens[order[1 : 2 * n_pairs : 2]] = pair_types + spec.k
    tokens = torch.from_numpy(tokens).view(n, width)
    tokens[:, 0] = BOS_ID
    deepest = depth.amax(dim=1).long()
    if holdout is None:
        return SampleBatch(tokens, lengths, deepest, *torch.zeros(2, n, dtype=torch.bool))
    held = _held_out_blocks(depth, holdout)
    return SampleBatch(tokens, lengths, deepest, (held & (depth == 0)).any(dim=1), held.any(dim=1))


def reference_sample(spec: SamplerSpec, rng: random.Random) -> list[int] | None:
    """One draw of the process token by token, the way DESIGN section 5 states it; ``None`` when it would
    exceed ``max_len``. Slow: it is the definition :func:`sample_batch` is tested and benchmarked against."""
    seq, stack = [BOS_ID], []
    while True:
        if not stack and len(seq) >= spec.min_len and rng.random() < 0.5:
            return seq
        if len(seq) == spec.max_len:
            return None
        if not stack or (len(stack) < spec.max_depth and rng.random() >= 0.5):
            stack.append(rng.randrange(spec.k))
            seq.append(FIRST_OPEN_ID + stack[-1])
        else:
            seq.append(FIRST_OPEN_ID + spec.k + stack.pop())


def _depth_paths(spec: SamplerSpec, batch_size: int, generator: torch.Generator) -> Tensor:
    """``[n, max_len]`` depth after each token of the accepted candidates, -1 past their end.

    The process spends one fair coin per token: at depth 0 it is the stop coin (the next token is
    an open either way), between 0 and the bound it picks open or close, at the bound it is unused.
    Tokens are taken :data:`_STEPS` at a time: a table maps (state, byte of coins) to the next
    ``_STEPS`` depths and the state after them, so the loop runs over ``max_len / 8`` chunks,
    never over single tokens.
    """
    width = spec.max_len
    n_chunks = -(-(width + 1) // _STEPS)  # one position past max_len: stopped there means accepted
    coins = torch.randint(0, 256, (n_chunks, batch_size), generator=generator)
    depth_max = min(spec.max_depth, n_chunks * _STEPS)  # a deeper bound never binds within the window
    dtype = next(d for d in (torch.int8, torch.int16, torch.int32) if depth_max < torch.iinfo(d).max)
    start = torch.zeros(batch_size, dtype=torch.long)  # row of the table: state * 256
    chunks = []
    for chunk in range(n_chunks):
        first_stop = min(max(spec.min_len - 1 - chunk * _STEPS, 0), _STEPS)
        depths, next_start = _chunk_table(depth_max, first_stop, dtype)
        row = start + coins[chunk]
        chunks.append(depths.index_select(0, row))  # index_select: a fraction of `depths[row]`'s overhead
        start = next_start.index_select(0, row)
    depth = torch.stack(chunks, dim=1).view(dtype).view(batch_size, -1)
    accepted = (depth[:, width] < 0).nonzero().squeeze(1)
    return depth[:, :width].index_select(0, accepted)


@functools.cache
def _chunk_table(max_depth: int, first_stop: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The process over :data:`_STEPS` tokens, for every start state and byte of coins.

    States are depths ``0..max_depth`` and STOP (``max_depth + 1``, absorbing). Coin ``i`` (bit
    ``i`` of the byte) decides token ``i`` of the chunk; a stop is allowed from token
    ``first_stop`` on. Returns ``depths[state * 256 + byte]``: the depth at the chunk's tokens
    (STOP written as -1), packed into int64 words, and ``next_start``: the state after the
    chunk, times 256.
    """
    stop = max_depth + 1
    state = torch.arange(stop + 1).repeat_interleave(256)
    coins = torch.arange(256).repeat(stop + 1)
    depths = torch.empty(len(state), _STEPS, dtype=dtype)
    for i in range(_STEPS):
        depths[:, i] = torch.where(state == stop, -1, state)
        heads = (coins >> i) & 1 == 1
        inside = torch.where(heads & (state < max_depth), state + 1, state - 1)
        at_zero = torch.where(heads & (i >= first_stop), stop, 1)
        state = torch.where(state == 0, at_zero, torch.where(state == stop, stop, inside))
    return depths.view(torch.int64), state * 256


def _held_out_blocks(depth: Tensor, holdout: SkeletonHoldout) -> Tensor:
    """``[n, pos]`` True at the last token of each block (a bracket pair and what it encloses, at any
    depth) whose skeleton is held out; the top-level blocks are those ending at depth 0.

    ``depth`` is :func:`_depth_paths`' output: depth after each token, -1 past the end.

    The rolling hash of ``SkeletonHoldout.is_held_out`` in closed form: a block at positions
    ``a..e`` hashes to ``h0 * B^(e-a+1) + sum_j c_j B^(e-j)``, and the sum is ``B^e`` times a
    difference of prefix sums of ``c_j B^-j`` (all modulo the prime ``P``).
    """
    n, width = depth.shape
    positions = torch.arange(width).expand(n, width)
    opens = torch.zeros_like(depth, dtype=torch.bool)
    opens[:, 1:] = depth[:, 1:] > depth[:, :-1]
    closes = (depth >= 0) & ~opens
    closes[:, 0] = False
    depth = depth.long()
    inverse = pow(_BASE, _P - 2, _P)
    base_pow = torch.tensor([pow(_BASE, j, _P) for j in range(width + 1)])
    inverse_pow = torch.tensor([pow(inverse, j, _P) for j in range(width)])
    start_pow = torch.tensor([holdout.initial_hash * pow(_BASE, j, _P) % _P for j in range(width + 1)])
    codes = opens.long() + 2 * closes.long()
    prefix = torch.remainder((codes * inverse_pow).cumsum(dim=1), _P)
    # A block closing at e (depth d after it) opens right after the last earlier position at depth d.
    before = torch.zeros_like(positions)
    for level in range(int(depth.max()) + 1):
        at_level = depth == level
        last = torch.where(at_level, positions, 0).cummax(dim=1).values
        before[:, 1:] = torch.where(at_level[:, 1:], last[:, :-1], before[:, 1:])
    inner = torch.remainder(prefix - prefix.gather(1, before), _P) * base_pow[:width] % _P
    size = positions - before
    block_hash = (inner + start_pow[size]) % _P
    return closes & (size >= 2 * holdout.min_pairs) & (_finalise(block_hash) < holdout.threshold)


def iter_batches(
    spec: SamplerSpec, n: int, batch_size: int, generator: torch.Generator, holdout: SkeletonHoldout | None = None
) -> Iterator[SampleBatch]:
    """Yield accepted batches until ``n`` sequences in all; only one batch is alive at a time."""
    remaining = n
    while remaining > 0:
        batch = sample_batch(spec, batch_size, generator, holdout)
        if len(batch.lengths) > remaining:
            batch = SampleBatch(*(getattr(batch, field.name)[:remaining] for field in fields(batch)))
        remaining -= len(batch.lengths)
        yield batch


def bracket_labels(
    tokens: Int[Tensor, "n pos"], k: int
) -> tuple[Int[Tensor, "n pos"], Bool[Tensor, "n pos"], Int[Tensor, "n pos"]]:
    """Per-position depth, next-is-closing mask and matching-open position.

    Returns:
        depth: unclosed brackets *after* the token at each position (0 at BOS and PAD).
        next_closes: True where the next token is a closing bracket.
        match_pos: where ``next_closes``, the position of the opening bracket that the next token
            closes; -1 elsewhere.
    """
    is_open = (tokens >= FIRST_OPEN_ID) & (tokens < FIRST_OPEN_ID + k)
    is_close = tokens >= FIRST_OPEN_ID + k
    depth = (is_open.long() - is_close.long()).cumsum(dim=1)
    next_closes = torch.zeros_like(is_close)
    next_closes[:, :-1] = is_close[:, 1:]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    match_pos = torch.full_like(tokens, -1)
    for d in range(1, int(depth.max()) + 1 if depth.numel() else 1):
        # The bracket closed next is the latest opening that brought the depth to the current depth.
        last_open = torch.where(is_open & (depth == d), positions, -1).cummax(dim=1).values
        match_pos = torch.where(next_closes & (depth == d), last_open, match_pos)
    return depth, next_closes, match_pos
