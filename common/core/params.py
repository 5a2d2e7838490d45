"""Hyperparameter models shared by the engine, the nodes and the aggregator."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields, infinities and NaNs, and is immutable."""

    # no setting means "forever" or "undefined" by inf/nan: rho = inf broke every solve and
    # a deadline of inf never closes a round
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LocalIALSParams(StrictModel):
    """Local iALS hyperparameters of one domain (Rendle et al. 2021 form) as a node configures them.

    In a federation the run's rank (RunParams.rank) is the only rank: a node leaves `rank` unset,
    or gives the run's; `at_rank` builds the local model's parameters from both.
    """

    rank: int | None = Field(None, ge=1, le=4096, description="latent dimension d; unset: the run's (when given, it must equal the run's)")
    alpha: float = Field(0.1, gt=0, description="weight of the all-pairs term pulling scores to 0")
    lam: float = Field(0.1, ge=0, description="ridge strength lambda")
    nu: float = Field(0.0, ge=0, le=2, description="frequency scaling exponent of the ridge")
    sigma: float = Field(0.1, gt=0, description="init factors ~ N(0, sigma / sqrt(d))")
    seed: int = Field(0, ge=0, description="seed of the initial factors")
    threads: int | None = Field(None, ge=1, le=64, description="solver threads (default: available cores, max 8)")
    backend: Literal["auto", "numpy", "native"] = Field("auto", description="iALS solver backend; auto: native where it builds")

    def at_rank(self, rank: int) -> "IALSParams":
        """The local model's parameters at `rank`; ValueError when this gives another rank."""
        if self.rank is not None and self.rank != rank:
            raise ValueError(f"ials.rank = {self.rank} differs from the run's rank {rank} (leave ials.rank unset)")
        return IALSParams.model_validate({**self.model_dump(), "rank": rank})


class IALSParams(LocalIALSParams):
    """Local iALS hyperparameters with a definite rank: what the local model is built from."""

    rank: int = Field(64, ge=1, le=4096, description="latent dimension d")


class ADMMParams(StrictModel):
    """Consensus (ADMM) hyperparameters of a federated run."""

    rho: float = Field(1.0, ge=0, description="ADMM penalty; 0 means independent single-domain ALS")
    prox: str = Field("identity", description="prox applied to the mean of X_i + U_i (a name in cdimf.common.core.admm.PROX_OPERATORS)")
    lambda_z: float = Field(0.0, ge=0, description="strength of the L2 prox: Z = mean * N rho / (N rho + lambda_z)")

    @field_validator("prox")
    @classmethod
    def _known_prox(cls, value: str) -> str:
        """A prox operator of the registry."""
        # imported here: admm builds on these models, so it cannot be imported at module level
        from cdimf.common.core.admm import PROX_OPERATORS

        if value not in PROX_OPERATORS:
            raise ValueError(f"unknown prox {value!r}; known: {', '.join(sorted(PROX_OPERATORS))}")
        return value

    @model_validator(mode="after")
    def _l2_needs_strength(self) -> "ADMMParams":
        if self.prox == "l2" and self.lambda_z <= 0:
            raise ValueError("prox = 'l2' needs lambda_z > 0")
        return self


class PrivacyParams(StrictModel):
    """Differential privacy of what a domain sends (off by default): per-row clipping of X + U, then Gaussian noise.

    The noise's standard deviation is noise_multiplier * 2 * clip_norm: one user's row replaced
    by any other row of norm <= clip_norm moves the release by at most 2 * clip_norm (see
    cdimf.common.core.privacy). Epsilon at `delta` over the rounds is the RDP accountant's for
    the Gaussian mechanism of this noise multiplier (cdimf.common.privacy_accounting).
    """

    clip_norm: float | None = Field(None, gt=0, description="L2 bound of each pushed row of X + U; unset: no clipping")
    noise_multiplier: float = Field(0.0, ge=0, le=1e6, description="Gaussian noise std over the sensitivity 2 * clip_norm; 0: no noise")
    delta: float = Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) reported per round")
    noise_seed: int | None = Field(None, ge=0, description="seed of the noise, per (seed, domain, round): experiments only; unset: OS entropy")

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> "PrivacyParams":
        """Noise is calibrated to the clipping bound: without one it protects nothing."""
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ValueError("noise_multiplier > 0 needs clip_norm (the noise is calibrated to the clipping bound)")
        return self

    @property
    def noisy(self) -> bool:
        """Whether Gaussian noise is added (then an epsilon is accounted)."""
        return self.noise_multiplier > 0
