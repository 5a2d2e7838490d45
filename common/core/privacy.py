"""Differential privacy of a domain's contribution X + U: per-row L2 clipping and Gaussian noise, plain numpy.

The unit of privacy is one user's row of one domain's contribution in one round. Neighbouring
inputs differ in one user's interactions in this domain, which may replace that user's row of
X + U by any other: after clipping every row to norm <= C, the release moves by at most 2C in
L2 (replace-one sensitivity; the rows of other users are held fixed, see README's privacy
section for what that leaves out). Gaussian noise of std noise_multiplier * 2C per coordinate
is then the Gaussian mechanism with that noise multiplier, which is what the accountant
composes over rounds.
"""

import hashlib

import numpy as np

from cdimf.common.core.params import PrivacyParams

FLOAT = np.float32
# one user's row replaced by another of norm <= C moves the release by at most 2C
REPLACE_ONE_SENSITIVITY = 2.0


def clip_rows(values: np.ndarray, max_norm: float) -> np.ndarray:
    """Each row scaled to L2 norm <= max_norm (rows within the bound unchanged); one float32 copy."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    values = np.asarray(values, dtype=FLOAT)
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    # min(1, C / norm), with a zero row left as it is (no division by its zero norm)
    scale = np.minimum(FLOAT(1.0), FLOAT(max_norm) / np.maximum(norms, np.finfo(FLOAT).tiny)).astype(FLOAT, copy=False)
    return values * scale[:, None]


def noise_std(clip_norm: float, noise_multiplier: float) -> float:
    """The Gaussian noise's standard deviation per coordinate: noise_multiplier times the sensitivity 2 * clip_norm."""
    return float(noise_multiplier) * REPLACE_ONE_SENSITIVITY * float(clip_norm)


def gaussian_noise(shape: tuple[int, int], std: float, rng: np.random.Generator) -> np.ndarray:
    """float32 N(0, std^2) noise of the given shape."""
    noise = rng.standard_normal(shape, dtype=FLOAT)
    noise *= FLOAT(std)
    return noise


def privatize(values: np.ndarray, clip_norm: float, noise_multiplier: float, rng: np.random.Generator) -> np.ndarray:
    """clip_rows(values, clip_norm) plus N(0, (noise_multiplier * 2 * clip_norm)^2) noise; a new float32 array."""
    released = gaussian_noise(values.shape, noise_std(clip_norm, noise_multiplier), rng) if noise_multiplier > 0 else None
    clipped = clip_rows(values, clip_norm)
    if released is None:
        return clipped
    released += clipped
    return released


def noise_rng(seed: int | None, domain: str, round_index: int) -> np.random.Generator:
    """The noise generator of one domain's push in one round: seeded by (seed, domain, round), or OS entropy when seed is None."""
    if seed is None:
        return np.random.default_rng()
    domain_key = int.from_bytes(hashlib.sha256(domain.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(np.random.SeedSequence([seed, domain_key, round_index]))


def release(values: np.ndarray, params: PrivacyParams, domain: str, round_index: int) -> np.ndarray:
    """What a domain sends in round `round_index` under `params`: its contribution privatized, or as it is when DP is off."""
    if params.clip_norm is None:
        return values
    return privatize(values, params.clip_norm, params.noise_multiplier, noise_rng(params.noise_seed, domain, round_index))
