"""Vectorised sampler of bounded-depth Dyck sequences, and the skeleton hold-out rule.

Token layout shared with :mod:`illusion_probe.tasks.dyck`: ``BOS_ID = 0``, ``PAD_ID = 1``,
opening bracket of type ``i`` is ``2 + i``, closing bracket of type ``i`` is ``2 + k + i``.

The process (DESIGN section 5): start with BOS; at depth 0 stop with probability 1/2 once the
sequence holds at least ``min_len`` tokens, else open a uniformly chosen type; at
``0 < depth < max_depth`` close with probability 1/2, else open; at ``max_depth`` close. A close
always closes the type on top of the stack. Sequences that would grow past ``max_len`` tokens
are rejected, so accepted sequences follow the process conditioned on ``length <= max_len``.

:func:`sample_batch` has no loop over time or sequences: the depth path is a folded free random
walk (a cumulative sum), and brackets are paired by one sort per batch (see :func:`_walks` and
:func:`sample_batch`); bracket types are then drawn per pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
    """

    tokens: Int[Tensor, "n max_len"]
    lengths: Int[Tensor, " n"]
    max_depth: Int[Tensor, " n"]
    has_held_out: Bool[Tensor, " n"]


def sample_batch(
    spec: SamplerSpec, batch_size: int, generator: torch.Generator, holdout: SkeletonHoldout | None = None
) -> SampleBatch:
    """Run the process for ``batch_size`` candidates and keep those that stop within ``spec.max_len``."""
    depth, lengths = _walks(spec, batch_size, generator)
    n, width = depth.shape
    positions = torch.arange(width, dtype=torch.int16).expand(n, width)
    real = positions < lengths.unsqueeze(1)
    opens = torch.zeros_like(real)
    opens[:, 1:] = depth[:, 1:] > depth[:, :-1]
    opens &= real
    closes = real ^ opens
    closes[:, 0] = False
    # Number each bracket's level (depth after an open, before a close). Within a level, opens and
    # closes alternate, so sorting by (level, position) puts every open right before its close;
    # BOS and PAD sort last.
    key = ((depth + closes) * width + positions).masked_fill_(~(opens | closes), torch.iinfo(torch.int16).max)
    order = key.argsort(dim=1)
    pairs = width // 2
    pair_types = torch.randint(spec.k, (n, pairs), generator=generator) + FIRST_OPEN_ID
    tokens = torch.empty(n, width, dtype=torch.long)
    tokens.scatter_(1, order[:, 0 : 2 * pairs : 2], pair_types)
    tokens.scatter_(1, order[:, 1 : 2 * pairs : 2], pair_types + spec.k)
    tokens.masked_fill_(~real, PAD_ID)  # pairs past the last bracket wrote only on BOS and PAD
    tokens[:, 0] = BOS_ID
    deepest = (depth * real).amax(dim=1).long()
    if holdout is None:
        has_held_out = torch.zeros(n, dtype=torch.bool)
    else:
        has_held_out = _held_out_blocks(opens, closes, depth, positions, holdout).any(dim=1)
    return SampleBatch(tokens, lengths, deepest, has_held_out)


def _walks(spec: SamplerSpec, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Depth paths ``[n, max_len]`` and lengths ``[n]`` of the accepted candidates.

    Between stops, the depth is a fair walk on ``{0..m}`` forced up at 0 and down at ``m``: exactly
    a free +-1 walk folded onto ``[0, m]`` by ``x -> min(x mod 2m, 2m - x mod 2m)``. At each visit
    to depth 0 an independent fair coin decides whether to stop. So no loop over time is needed.
    """
    width, m = spec.max_len, spec.max_depth
    bits = _random_bits(batch_size, 2 * width, generator)
    walk = torch.zeros(batch_size, width)  # float32: exact for these small integers, and fast
    torch.cumsum(bits[:, : width - 1] * 2.0 - 1, dim=1, out=walk[:, 1:])
    folded = torch.remainder(walk, 2 * m)
    depth = torch.minimum(folded, 2 * m - folded)
    can_stop = (depth == 0) & bits[:, width:].bool()
    can_stop[:, : spec.min_len - 1] = False  # a sequence of t + 1 tokens may stop once t + 1 >= min_len
    first = can_stop.to(torch.uint8).argmax(dim=1)
    accepted = can_stop.gather(1, first.unsqueeze(1)).squeeze(1)
    return depth[accepted].to(torch.int16), first[accepted] + 1


def _random_bits(rows: int, n_bits: int, generator: torch.Generator) -> Tensor:
    """``[rows, n_bits]`` fair bits (uint8), unpacked from random bytes."""
    bytes_ = torch.randint(0, 256, (rows, -(-n_bits // 8)), dtype=torch.uint8, generator=generator)
    bits = (bytes_.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(rows, -1)[:, :n_bits]


def _held_out_blocks(opens: Tensor, closes: Tensor, depth: Tensor, positions: Tensor,
                     holdout: SkeletonHoldout) -> Tensor:
    """``[n, pos]`` True at the last token of each top-level block whose skeleton is held out.

    The rolling hash of ``SkeletonHoldout.is_held_out`` in closed form: a block at positions
    ``a..e`` hashes to ``h0 * B^(e-a+1) + sum_j c_j B^(e-j)``, and the sum is ``B^e`` times a
    difference of prefix sums of ``c_j B^-j`` (all modulo the prime ``P``).
    """
    width = depth.shape[1]
    positions = positions.long()
    inverse = pow(_BASE, _P - 2, _P)
    base_pow = torch.tensor([pow(_BASE, j, _P) for j in range(width + 1)])
    inverse_pow = torch.tensor([pow(inverse, j, _P) for j in range(width)])
    start_pow = torch.tensor([holdout.initial_hash * pow(_BASE, j, _P) % _P for j in range(width + 1)])
    codes = opens.long() + 2 * closes.long()
    prefix = torch.remainder((codes * inverse_pow).cumsum(dim=1), _P)
    ends = closes & (depth == 0)
    last_zero = torch.where(depth == 0, positions, 0).cummax(dim=1).values
    before = torch.zeros_like(last_zero)
    before[:, 1:] = last_zero[:, :-1]  # position just before the block that ends here
    inner = torch.remainder(prefix - prefix.gather(1, before), _P) * base_pow[:width] % _P
    size = positions - before
    block_hash = (inner + start_pow[size]) % _P
    return ends & (size >= 2 * holdout.min_pairs) & (_finalise(block_hash) < holdout.threshold)


def iter_batches(
    spec: SamplerSpec, n: int, batch_size: int, generator: torch.Generator, holdout: SkeletonHoldout | None = None
) -> Iterator[SampleBatch]:
    """Yield accepted batches until ``n`` sequences in all; only one batch is alive at a time."""
    remaining = n
    while remaining > 0:
        batch = sample_batch(spec, batch_size, generator, holdout)
        if len(batch.lengths) > remaining:
            batch = SampleBatch(*(x[:remaining] for x in (batch.tokens, batch.lengths, batch.max_depth,
                                                         batch.has_held_out)))
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
