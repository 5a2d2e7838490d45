"""Configuration of `cdimf reproduce`: data paths, models, early stopping, evaluation, paper numbers.

Read by cdimf.common.config's loader: errors are ConfigErrors naming the file and the dotted field.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cdimf.common.config import load_config
from cdimf.common.core.params import ADMMParams, IALSParams, StrictModel
from cdimf.common.security.names import validate_party_name

ModelName = Literal["ALS-separate", "ALS-joined", "CDIMF"]
MODELS: tuple[ModelName, ...] = ("ALS-separate", "ALS-joined", "CDIMF")


class DomainPaths(StrictModel):
    """One domain's files; relative paths are resolved against the config file's folder."""

    name: str
    train: Path
    test: Path
    valid: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """A domain name by the federation's one rule."""
        return validate_party_name(value, "domain name")


class DataConfig(StrictModel):
    """The pair (or more) of domains and how to read them."""

    domains: list[DomainPaths] = Field(min_length=2)
    format: Literal["auto", "paper", "csv", "tsv", "parquet"] = "auto"
    valid_seed: int = Field(0, ge=0, description="seed of the leave-one-out validation carved from train")

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        return self


class EvaluationConfig(StrictModel):
    """The paper's sampled protocol: target + n_negatives uniform negatives, top-k metrics."""

    n_negatives: int = Field(999, ge=1)
    k: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)


class StoppingConfig(StrictModel):
    """Early stopping on validation NDCG@k averaged over domains."""

    max_rounds: int = Field(40, ge=1)
    patience: int = Field(3, ge=1)
    valid_negatives: int = Field(
        99, ge=1, description="negatives per validation row: fewer than the test's 999 keeps per-round checks cheap"
    )
    refit: bool = Field(
        True,
        description="after choosing the round count on a split carved from train, retrain on all of train",
    )


class CDIMFConfig(StrictModel):
    """CDIMF's local model, consensus and aggregation period (local epochs between exchanges)."""

    ials: IALSParams
    admm: ADMMParams
    aggregation_period: int = Field(1, ge=1)
    user_step: Literal["paper", "reference-code"] = Field(
        "paper",
        description="'paper': rho on both sides of the user system (the paper's equations); "
        "'reference-code': rho only on the right-hand side, scaled by lambda, as the authors' public code (nu = 0)",
    )


class ReproduceConfig(StrictModel):
    """Everything `cdimf reproduce` needs to train and evaluate ALS-separate, ALS-joined and CDIMF."""

    title: str = "CDIMF reproduction"
    data: DataConfig
    evaluation: EvaluationConfig = EvaluationConfig()
    stopping: StoppingConfig = StoppingConfig()
    separate: IALSParams
    joined: IALSParams
    cdimf: CDIMFConfig
    models: list[ModelName] = Field(default_factory=lambda: list(MODELS))
    paper: dict[str, dict[str, tuple[float, float]]] = Field(
        default_factory=dict, description="model -> domain -> (HR@10 %, NDCG@10 %) reported by the paper"
    )


def load_reproduce_config(path: str | Path) -> ReproduceConfig:
    """Read a TOML config; relative data paths are taken from the config file's folder (no CDIMF_* variables apply)."""
    return load_config(ReproduceConfig, path, environ={})
