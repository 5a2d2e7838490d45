"""Configuration of `cdimf reproduce`: the federation's domains (simulate's schema), models, early stopping, evaluation, paper numbers.

Read by cdimf.common.config's loader: errors are ConfigErrors naming the file and the dotted field.
"""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from cdimf.common.config import FederationDomain, load_config, unique_domain_names
from cdimf.common.core.params import ADMMParams, IALSParams, StrictModel

ModelName = Literal["ALS-separate", "ALS-joined", "CDIMF"]
MODELS: tuple[ModelName, ...] = ("ALS-separate", "ALS-joined", "CDIMF")


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
    valid_seed: int = Field(0, ge=0, description="seed of the leave-one-out validation carved from train (domains without valid_path)")


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

    ials: PerDomainIALS = Field(default_factory=PerDomainIALS)
    admm: ADMMParams = Field(default_factory=ADMMParams)
    aggregation_period: int = Field(1, ge=1)
    user_step: Literal["paper", "reference-code"] = Field(
        "paper",
        description="'paper': rho on both sides of the user system (the paper's equations); "
        "'reference-code': rho only on the right-hand side, scaled by lambda, as the authors' public code (nu = 0)",
    )


class ReproduceConfig(StrictModel):
    """Everything `cdimf reproduce` needs: the federation's `[[domains]]` (simulate's schema) and its own sections, all defaulted."""

    title: str = "CDIMF reproduction"
    domains: list[FederationDomain] = Field(min_length=2, description="the federation's domains, as `cdimf simulate` lists them")
    data: Any = Field(None, description="the former [data] table: refused with a note on where its fields went")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    stopping: StoppingConfig = Field(default_factory=StoppingConfig)
    separate: PerDomainIALS = Field(default_factory=PerDomainIALS)
    joined: IALSParams = Field(default_factory=IALSParams)
    cdimf: CDIMFConfig = Field(default_factory=CDIMFConfig)
    models: list[ModelName] = Field(default_factory=lambda: list(MODELS))
    paper: dict[str, dict[str, tuple[float, float]]] = Field(
        default_factory=dict, description="model -> domain -> (HR@10 %, NDCG@10 %) reported by the paper"
    )

    @field_validator("data")
    @classmethod
    def _no_data_table(cls, value: Any) -> None:
        """The old layout is refused with where each of its fields went, not a bare "extra input"."""
        if value is not None:
            raise ValueError(
                "the [data] table is gone: list each domain as [[domains]] with name, train_path, test_path, "
                "valid_path and data_format (the schema of `cdimf simulate` and the node config); valid_seed is "
                "now [stopping] valid_seed"
            )
        return None

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[FederationDomain]) -> list[FederationDomain]:
        """Unique names, a test file for every domain, and validation files for all domains or none."""
        unique_domain_names(value)
        if untested := [d.name for d in value if d.test_path is None]:
            raise ValueError(f"reproduce scores every domain on its test split: give test_path for {untested}")
        with_valid = [d.name for d in value if d.valid_path is not None]
        if with_valid and len(with_valid) != len(value):
            raise ValueError(f"give valid_path for every domain or none (only {with_valid} have one)")
        return value

    @model_validator(mode="after")
    def _known_domains(self) -> "ReproduceConfig":
        """Per-domain hyperparameters name domains of [[domains]]."""
        names = {d.name for d in self.domains}
        for section, params in (("separate", self.separate), ("cdimf.ials", self.cdimf.ials)):
            if unknown := sorted(set(params.domains) - names):
                raise ValueError(f"{section}.domains: unknown domain(s) {unknown}; [[domains]] has {sorted(names)}")
        return self


def load_reproduce_config(path: str | Path) -> ReproduceConfig:
    """Read a TOML config; relative data paths are taken from the config file's folder (no CDIMF_* variables apply)."""
    return load_config(ReproduceConfig, path, environ={})
