"""Torch's float32 vector math called once on the process's own threads before a model stage's first forward.

On the 2-core AMX Xeon in bfloat16, the first float32 `cos` of a model stage (the rotary embedding's, in its first
forward) sometimes came out inaccurate over one thread's half of the tensor: errors of 3e-5 to 1.5e-4 where float32
rounds at 6e-8, with inputs equal to the bit, while `sin` beside it and every later call were exact. Cast to bf16,
a few cos entries then move one bf16 step, so the first samples of a PPO run (its held-out curve at step 0, before
the curve existed its first rollout) and the first step of SFT or RM could differ from run to run: the
nondeterminism of issue 33, item 3. In that stage's setting 17 of 63 processes were hit (oneDNN held to
AVX512_CORE_BF16; 4 of 17 with AMX); after these calls, made first, none of 30 was. A bare torch
process does not show it, so the library's first call depends on what the stage loaded before it; which library
state is not pinned down (docs/findings.md). The calls take well under a millisecond and change no later result.
"""

from __future__ import annotations

FUNCTIONS = ("cos", "sin", "exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "erf")
SIZE = 4096  # a little larger than the rotary table that showed it (56 x 64); the size measured to work


def vector_math() -> None:
    """Calls each of FUNCTIONS once on a float32 tensor, before any model's forward."""
    import torch

    x = torch.linspace(0.5, 30.0, SIZE)
    for name in FUNCTIONS:
        getattr(torch, name)(x)
