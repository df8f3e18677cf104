"""TensorRT optimization profiles from the command line: "BxS" shapes (batch x sequence) and their checks.

Everything here is plain Python, so a bad profile is reported before any model is loaded or TensorRT imported.
"""

from __future__ import annotations

import re

from bidir_core.artifacts import Profile
from bidir_core.errors import BidirError

_SHAPE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_shape(text: str, what: str = "shape") -> tuple[int, int]:
    """ "32x128" -> (32, 128): batch x sequence, both positive."""
    match = _SHAPE.match(str(text))
    if not match:
        raise BidirError(f"{what} {text!r} is not BATCHxSEQ, e.g. 32x128")
    batch, seq = int(match.group(1)), int(match.group(2))
    if batch < 1 or seq < 1:
        raise BidirError(f"{what} {text!r}: batch and sequence must be at least 1")
    return batch, seq


# The verification runs PyTorch and the artifact on a batch of this shape; memory grows with batch x seq (and seq^2
# in attention), so a typo such as 99999999999x1 must be refused before the export, not fail in an allocation.
MAX_VERIFY_TOKENS = 65536


def check_verify_shape(shape) -> None:
    """(batch, seq), both >= 1 and batch * seq <= MAX_VERIFY_TOKENS."""
    if len(shape) != 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise BidirError(f"verify shape must be (batch, seq) >= 1, got {shape!r}")
    if shape[0] * shape[1] > MAX_VERIFY_TOKENS:
        raise BidirError(
            f"verify shape {shape[0]}x{shape[1]}: at most {MAX_VERIFY_TOKENS} tokens (batch x seq) are verified, "
            f"e.g. 4x128 or 64x1024"
        )


def parse_profile(text: str) -> Profile:
    """ "1x1,32x128,64x512" (min, opt, max) -> Profile, checked with check_profile (no length limit yet)."""
    parts = str(text).split(",")
    if len(parts) != 3:
        raise BidirError(f"profile {text!r} is not MIN,OPT,MAX, e.g. 1x1,32x128,64x512")
    profile = Profile(*(parse_shape(p, name) for p, name in zip(parts, ("min", "opt", "max"), strict=True)))
    check_profile(profile)
    return profile


def check_profile(profile: Profile, max_length: int | None = None, where: str = "profile") -> None:
    """min <= opt <= max on both axes, and the longest sequence within the model's max_length."""
    for axis, name in ((0, "batch"), (1, "sequence")):
        lo, mid, hi = profile.min[axis], profile.opt[axis], profile.max[axis]
        if not lo <= mid <= hi:
            raise BidirError(
                f"{where} {_fmt(profile)}: {name} needs min <= opt <= max, got {lo}, {mid}, {hi}"
            )
    if max_length is not None and profile.max[1] > max_length:
        raise BidirError(
            f"{where} {_fmt(profile)}: max sequence {profile.max[1]} is longer than the model's "
            f"max_length {max_length}"
        )


def check_profiles(profiles: tuple[Profile, ...], max_length: int) -> None:
    if not profiles:
        raise BidirError("at least one optimization profile is needed (--min/--opt/--max or --profile)")
    for i, profile in enumerate(profiles):
        check_profile(profile, max_length, where=f"profile {i}")


def _fmt(profile: Profile) -> str:
    return ",".join(f"{b}x{s}" for b, s in (profile.min, profile.opt, profile.max))
