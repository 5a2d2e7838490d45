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
    """The test protocols: the paper code's and DisenCDR/UniCDR's sampled ones (n_negatives each), and the full catalog."""

    n_negatives: int = Field(999, ge=1)
    k: int = Field(10, ge=1)
    seed: int = Field(0, ge=0)
    seen_test_pairs: Literal["drop", "keep"] = Field(
        "drop", description="test pairs that also occur in train: 'drop' leaves them out of every metric, 'keep' scores them"
    )


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


class DomainLocal(StrictModel):
    """One domain's own local hyperparameters over a model's shared ones (the rank stays shared)."""

    alpha: float | None = Field(None, gt=0, description="this domain's alpha; unset: the model's")
    lam: float | None = Field(None, ge=0, description="this domain's lambda; unset: the model's")
    nu: float | None = Field(None, ge=0, le=2, description="this domain's nu; unset: the model's")


class PerDomainIALS(IALSParams):
    """A model's iALS hyperparameters, with optional per-domain alpha/lam/nu under `domains.NAME`."""

    domains: dict[str, DomainLocal] = Field(default_factory=dict, description="domain name -> its own alpha/lam/nu")

    def for_domain(self, name: str) -> IALSParams:
        """The local model of domain `name`: the shared values with its own ones put over them."""
        values = self.model_dump(exclude={"domains"})
        own = self.domains.get(name)
        if own is not None:
            values.update(own.model_dump(exclude_none=True))
        return IALSParams.model_validate(values)


class CDIMFConfig(StrictModel):
    """CDIMF's local model, consensus and aggregation period (local epochs between exchanges)."""

    ials: PerDomainIALS
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
    separate: PerDomainIALS
    joined: IALSParams
    cdimf: CDIMFConfig
    models: list[ModelName] = Field(default_factory=lambda: list(MODELS))
    paper: dict[str, dict[str, tuple[float, float]]] = Field(
        default_factory=dict, description="model -> domain -> (HR@10 %, NDCG@10 %) reported by the paper"
    )

    @model_validator(mode="after")
    def _known_domains(self) -> "ReproduceConfig":
        """Per-domain hyperparameters name domains of [data]."""
        names = {d.name for d in self.data.domains}
        for section, params in (("separate", self.separate), ("cdimf.ials", self.cdimf.ials)):
            if unknown := sorted(set(params.domains) - names):
                raise ValueError(f"{section}.domains: unknown domain(s) {unknown}; [data] has {sorted(names)}")
        return self


def load_reproduce_config(path: str | Path) -> ReproduceConfig:
    """Read a TOML config; relative data paths are taken from the config file's folder (no CDIMF_* variables apply)."""
    return load_config(ReproduceConfig, path, environ={})
