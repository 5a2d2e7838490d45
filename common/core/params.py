"""Hyperparameter models shared by the engine, the nodes and the aggregator."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown fields and is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IALSParams(StrictModel):
    """Local iALS hyperparameters of one domain (Rendle et al. 2021 form)."""

    rank: int = Field(64, ge=1, le=4096, description="latent dimension d")
    alpha: float = Field(0.1, gt=0, description="weight of the all-pairs term pulling scores to 0")
    lam: float = Field(0.1, ge=0, description="ridge strength lambda")
    nu: float = Field(0.0, ge=0, le=2, description="frequency scaling exponent of the ridge")
    sigma: float = Field(0.1, gt=0, description="init factors ~ N(0, sigma / sqrt(d))")
    seed: int = Field(0, ge=0, description="seed of the initial factors")
    threads: int | None = Field(None, ge=1, le=64, description="solver threads (default: available cores, max 8)")
    backend: Literal["auto", "numpy", "native"] = Field("auto", description="iALS solver backend; auto: native where it builds")


class ADMMParams(StrictModel):
    """Consensus (ADMM) hyperparameters of a federated run."""

    rho: float = Field(1.0, ge=0, description="ADMM penalty; 0 means independent single-domain ALS")
    prox: Literal["identity", "l2"] = Field("identity", description="prox applied to the mean of X_i + U_i")
    lambda_z: float = Field(0.0, ge=0, description="strength of the L2 prox: Z = mean * N rho / (N rho + lambda_z)")

    @model_validator(mode="after")
    def _l2_needs_strength(self) -> "ADMMParams":
        if self.prox == "l2" and self.lambda_z <= 0:
            raise ValueError("prox = 'l2' needs lambda_z > 0")
        return self
