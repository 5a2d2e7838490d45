"""Runtime configuration of the aggregator and the domain nodes as pydantic models, and the only TOML loader.

Loaded from TOML files, environment variables and command-line flags:
`load_config(NodeConfig, "node.toml")`. Precedence: the models' defaults < the TOML file <
environment variables < flags (`overrides`). An environment variable `CDIMF_<FIELD>` sets one
field, nested fields joined by `__` (`CDIMF_IALS__LAM=0.5`, `CDIMF_TLS__INSECURE=true`); a value
that parses as JSON (numbers, booleans, objects) is used as such, anything else as a string.
A variable or flag sets exactly its field: the other fields of its table keep the value the
file or the default gave them. Relative paths are resolved against the folder of the TOML file
that names them (against the working directory for variables and flags). Every error is a
ConfigError naming the file, variable or flag and the dotted field.

The models hold no wire code: their protobuf forms are in cdimf.common.wire.serde.
"""

import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator

from cdimf.common.core.params import ADMMParams, IALSParams, LocalIALSParams, PrivacyParams, StrictModel
from cdimf.common.security.names import shown, validate_party_name
from cdimf.common.security.pseudonyms import load_secret
from cdimf.common.toml_lines import key_lines

ENV_PREFIX = "CDIMF_"
DataFormat = Literal["auto", "paper", "csv", "tsv", "parquet"]
_ADDRESS = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class ConfigError(ValueError):
    """A configuration could not be read or validated; the message names where and which field."""


def check_address(value: str, allow_port_zero: bool) -> str:
    """The value when it is host:port with a valid port, else ValueError."""
    match = _ADDRESS.match(value)
    if match is None:
        raise ValueError(f"{shown(value)} is not host:port")
    port = int(match.group("port"))
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"port {port} out of range in {shown(value)}")
    return value


class TLSConfig(StrictModel):
    """Transport security: mutual TLS files, or an explicit opt-out for plaintext on loopback/tests."""

    insecure: bool = Field(False, description="plaintext gRPC; only for tests and loopback demos")
    ca_file: Path | None = Field(None, description="federation CA certificate (PEM)")
    cert_file: Path | None = Field(None, description="this party's certificate (PEM)")
    key_file: Path | None = Field(None, description="this party's private key (PEM)")

    @model_validator(mode="after")
    def _files_unless_insecure(self) -> "TLSConfig":
        """Mutual TLS needs all three files."""
        if not self.insecure:
            missing = [name for name in ("ca_file", "cert_file", "key_file") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"mutual TLS needs {', '.join(missing)} (or set insecure = true for plaintext)")
        return self


class RunParams(StrictModel):
    """Parameters of one federated training run, set by the operator when starting it."""

    run_id: str | None = Field(None, description="run identifier (default: the aggregator picks one)")
    rounds: int = Field(10, ge=1, le=1_000_000, description="consensus rounds")
    rank: int = Field(64, ge=1, le=4096, description="latent dimension shared by all domains")
    admm: ADMMParams = Field(default_factory=ADMMParams)
    aggregation_period: int = Field(1, ge=1, le=10_000, description="local epochs per round")
    domain_aggregation_period: dict[str, int] = Field(default_factory=dict, description="per-domain override")
    round_deadline_s: float = Field(0.0, ge=0, description="0: synchronous rounds (wait for every domain)")
    min_domains: int = Field(1, ge=1, le=64, description="domains a deadline needs to close a round")
    max_staleness: int = Field(0, ge=0, description="rounds a late contribution may lag behind")
    secure_aggregation: bool = Field(False, description="the aggregator sees only masked ring sums; nodes unmask and apply the prox")

    @field_validator("run_id")
    @classmethod
    def _run_id_text(cls, value: str | None) -> str | None:
        """A run id is 1-64 portable characters (it names files and appears in logs)."""
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError(f"{shown(value)} must be 1-64 of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("domain_aggregation_period")
    @classmethod
    def _periods(cls, value: dict[str, int]) -> dict[str, int]:
        """Per-domain periods name valid domains and lie in 1..10000."""
        for name, period in value.items():
            validate_party_name(name, "domain name")
            if not 1 <= period <= 10_000:
                raise ValueError(f"aggregation period of {shown(name)} must be in 1..10000, got {period}")
        return value

    def period_for(self, domain: str, node_period: int | None = None) -> int:
        """Local epochs per round of `domain`: the node's own period when it sets one, else the run's for it."""
        if node_period is not None:
            return node_period
        return self.domain_aggregation_period.get(domain, self.aggregation_period)


class AggregatorConfig(StrictModel):
    """The aggregator process: where it listens, where it keeps run state, its TLS material."""

    listen: str = Field("127.0.0.1:7070", description="host:port to serve on (port 0: any free port)")
    state_dir: Path = Field(Path("state/aggregator"), description="folder of the atomically written run state")
    fsync_state: bool = Field(True, description="fsync state writes (off: survives killed processes, not power loss)")
    tls: TLSConfig
    run: RunParams | None = Field(None, description="a run to start as soon as min_domains domains registered")
    max_concurrent_streams: int = Field(64, ge=1, le=4096, description="per-connection HTTP/2 stream limit")
    metrics_listen: str = Field("", description="host:port of the Prometheus /metrics endpoint; empty: none")
    exit_after_run: bool = Field(False, description="stop serving once a run this process served ended (one-shot simulations)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True) if value else value


# Negatives per validation row: the same default as `cdimf reproduce`'s [stopping] valid_negatives.
# Per-round checks only monitor and steer a run, so 99 (not the paper's 999, which the test
# split keeps) makes them ~10x cheaper than ranking 1000 candidates per row.
VALID_NEGATIVES = 99


class ValidationParams(StrictModel):
    """A node's per-round validation: how often, against how many negatives, at which cut-off."""

    every: int = Field(1, ge=0, le=1_000_000, description="validate every N rounds and after the last one; 0: never")
    negatives: int = Field(VALID_NEGATIVES, ge=1, le=100_000, description="uniform negatives per validation row (test keeps 999)")
    k: int = Field(10, ge=1, le=1000, description="cut-off of the per-round HR@k / NDCG@k")

    def due(self, round_index: int, rounds: int) -> bool:
        """Whether round `round_index` (1-based) of a `rounds`-round run is validated."""
        return self.every > 0 and (round_index % self.every == 0 or round_index == rounds)


class DomainFiles(StrictModel):
    """One domain's own files: the fields a node config and each `[[domains]]` entry of simulate and reproduce share."""

    train_path: Path = Field(description="training interactions")
    valid_path: Path | None = Field(None, description="validation interactions (default: one pair per user carved from train)")
    test_path: Path | None = Field(None, description="test interactions")
    data_format: DataFormat = Field("auto", description="file format; auto: from the extension and first line")


class FederationDomain(DomainFiles):
    """One `[[domains]]` entry of a federation (simulate, reproduce): its name and its files, as its node config holds them."""

    name: str = Field(description="the domain's name (unique in the federation; a node config calls it `domain`)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        """A domain name by the federation's one rule."""
        return validate_party_name(value, "domain name")

    def node_fields(self) -> dict[str, Any]:
        """This domain's fields of a NodeConfig (JSON values, paths made absolute)."""
        fields: dict[str, Any] = {"domain": self.name, "data_format": self.data_format}
        for name in ("train_path", "valid_path", "test_path"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = str(Path(value).resolve())
        return fields


def unique_domain_names(domains: Sequence[FederationDomain]) -> None:
    """ValueError unless the domains' names are unique."""
    names = [domain.name for domain in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique, got {names}")


class ColdStartPolicy(StrictModel):
    """Whether other domains may receive this domain's users as cold-start receiver rows, and how many at most.

    A receiver row elsewhere gets the holder's user factors through Z: the holder decides. At most
    one cap; none: every receiver is served. The aggregator enforces it at registration.
    """

    serve: bool = Field(True, description="serve this domain's users to other domains' cold-start receivers")
    max_served: int | None = Field(None, ge=0, description="at most this many receiver rows, over all other domains; unset: no count cap")
    max_served_fraction: float | None = Field(None, ge=0, le=1,
                                              description="at most this fraction of this domain's users with interactions (rounded down); unset: none")

    @model_validator(mode="after")
    def _one_cap(self) -> "ColdStartPolicy":
        """A count or a fraction, not both: two caps would leave which one holds unclear."""
        if self.max_served is not None and self.max_served_fraction is not None:
            raise ValueError("give at most one of cold_start.max_served and cold_start.max_served_fraction")
        return self

    def cap(self, holder_rows: int) -> int | None:
        """The most receiver rows this policy serves for a domain of `holder_rows` users with interactions (None: no cap)."""
        if not self.serve:
            return 0
        if self.max_served is not None:
            return self.max_served
        if self.max_served_fraction is not None:
            return int(self.max_served_fraction * holder_rows)
        return None

    def describe(self) -> str:
        """The policy in words, as logs and refusals name it."""
        if not self.serve:
            return "serve = false"
        if self.max_served is not None:
            return f"max_served = {self.max_served}"
        if self.max_served_fraction is not None:
            return f"max_served_fraction = {self.max_served_fraction:g}"
        return "serve, no cap"


class NodeConfig(DomainFiles):
    """One domain node: its private data, its own server, the aggregator it dials, its secret."""

    domain: str = Field(description="this domain's name (unique in the federation)")
    listen: str = Field("127.0.0.1:0", description="host:port of the node's own server")
    aggregator: str = Field("127.0.0.1:7070", description="host:port of the aggregator")
    state_dir: Path = Field(description="folder of the atomically written training state")
    secret: SecretStr | None = Field(None, description="federation secret (prefer secret_file)")
    secret_file: Path | None = Field(None, description="file holding the federation secret")
    ials: LocalIALSParams = Field(default_factory=LocalIALSParams, description="local model; its rank is the run's")
    aggregation_period: int | None = Field(None, ge=1, le=10_000, description="local epochs per round; None: the run's")
    tls: TLSConfig
    rpc_timeout_s: float = Field(30.0, gt=0, description="deadline of each unary aggregator call")
    checkpoint_retry_s: float = Field(60.0, ge=0, le=86_400,
                                      description="a checkpoint that cannot be written (full or read-only disk) is retried this long, then the node exits")
    validation: ValidationParams = Field(default_factory=ValidationParams)
    privacy: PrivacyParams = Field(default_factory=PrivacyParams, description="clipping and Gaussian noise of the pushed X + U (off by default)")
    metrics_listen: str = Field("", description="host:port of the Prometheus /metrics endpoint; empty: none")
    exit_after_run: bool = Field(False, description="after a run finished: print the test table (999 negatives) and exit")
    cold_start: ColdStartPolicy = Field(default_factory=ColdStartPolicy, description="which of its users other domains' cold-start rows may receive")

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return validate_party_name(value, "domain name")

    @field_validator("listen", "aggregator")
    @classmethod
    def _addresses(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True)

    @field_validator("metrics_listen")
    @classmethod
    def _metrics_listen(cls, value: str) -> str:
        return check_address(value, allow_port_zero=True) if value else value

    @model_validator(mode="after")
    def _one_secret(self) -> "NodeConfig":
        """Exactly one of secret and secret_file."""
        if (self.secret is None) == (self.secret_file is None):
            raise ValueError("give exactly one of secret or secret_file")
        return self

    def federation_secret(self) -> bytes:
        """The federation secret bytes (read from secret_file when given)."""
        literal = self.secret.get_secret_value() if self.secret is not None else None
        return load_secret(literal, self.secret_file)

    def model_params(self, run: RunParams) -> IALSParams:
        """The local model's parameters in `run`: this node's hyperparameters at the run's rank."""
        try:
            return self.ials.at_rank(run.rank)
        except ValueError as error:
            raise ConfigError(f"domain {self.domain}, run {run.run_id}: {error}") from error

    def period(self, run: RunParams) -> int:
        """Local epochs per round of this node in `run`."""
        return run.period_for(self.domain, self.aggregation_period)


Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Override:
    """One field set from outside the file (a command-line flag): its path, value and origin."""

    path: tuple[str, ...]
    value: Any
    origin: str


def _env_value(text: str) -> Any:
    """A JSON value when the text is one (numbers, booleans, objects), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _env_overrides(model: type[BaseModel], environ: Mapping[str, str], prefix: str) -> list[Override]:
    """Overrides from PREFIX<FIELD>[__<FIELD>...] variables whose first field exists."""
    overrides = []
    for name, text in sorted(environ.items()):
        if not name.startswith(prefix):
            continue
        path = tuple(part.lower() for part in name[len(prefix):].split("__"))
        # other CDIMF_* variables (e.g. a config file path) are not fields of this model
        if path[0] not in model.model_fields or not all(path):
            continue
        overrides.append(Override(path, _env_value(text), f"environment variable {name}"))
    return overrides


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field annotation holds (`Model` or `Model | None`), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _apply(data: dict[str, Any], model: type[BaseModel] | None, override: Override) -> None:
    """Set one field in nested `data`; a table the data lacks starts from the field's default.

    So an override changes exactly its field: its siblings keep their default (a table made by
    a default factory, e.g. simulate's run) instead of falling back to their class's defaults.
    """
    target = data
    for depth, part in enumerate(override.path[:-1]):
        info = model.model_fields.get(part) if model is not None else None
        if part not in target:
            default = info.get_default(call_default_factory=True) if info is not None else None
            target[part] = default.model_dump() if isinstance(default, BaseModel) else {}
        target = target[part]
        if not isinstance(target, dict):
            raise ConfigError(f"{override.origin}: {'.'.join(override.path[:depth + 1])} is set as a value and as a table")
        model = _nested_model(info.annotation) if info is not None else None
    target[override.path[-1]] = override.value


def _resolve_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative path fields of a TOML table (and of its tables and lists of tables) relative to the file's folder."""
    resolved = dict(data)
    for name, field in model.model_fields.items():
        if name not in resolved:
            continue
        annotation = field.annotation
        args = typing.get_args(annotation)
        value = resolved[name]
        nested = _nested_model(annotation)
        if typing.get_origin(annotation) is list and args and _nested_model(args[0]) is not None and isinstance(value, list):
            item_model = _nested_model(args[0])
            assert item_model is not None
            resolved[name] = [_resolve_paths(item_model, item, base) if isinstance(item, dict) else item for item in value]
        elif nested is not None and isinstance(value, dict):
            resolved[name] = _resolve_paths(nested, value, base)
        elif (annotation is Path or Path in args) and isinstance(value, str) and not Path(value).is_absolute():
            resolved[name] = str(base / value)
    return resolved


def _describe(error: ValidationError, source: str, origins: Mapping[tuple[str, ...], str], table: tuple[str, ...],
              lines: Mapping[tuple[str, ...], int] | None = None) -> str:
    """One line per problem: where it came from (the flag, the variable, or the file and the key's line), the dotted field, what is wrong."""
    described = []
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"])
        # the origin of the field, or of the table that set it as a whole (CDIMF_RUN='{...}')
        where = next((origins[location[:end]] for end in range(len(location), 0, -1) if location[:end] in origins), None)
        if where is None and not location:
            # a rule across fields (a node rank against the run's): blame the flags or variables it names
            named = [origin for path, origin in origins.items() if re.search(rf"\b{re.escape('.'.join(path))}\b", problem["msg"])]
            where = ", ".join(named) or None
        if where is None:
            where = source
            # the key's own line, or the line of the table a missing key belongs in
            line = next(((lines or {})[location[:end]] for end in range(len(location), -1, -1) if location[:end] in (lines or {})), None)
            if line is not None:
                where = f"{source}:{line}"
        field = ".".join((*table, *location)) or "(top level)"
        described.append(f"{where}: field {field}: {problem['msg']}")
    return "\n".join(described)


def validate_config(
    model: type[Model], data: Mapping[str, Any], source: str,
    origins: Mapping[tuple[str, ...], str] | None = None, table: tuple[str, ...] = (),
    lines: Mapping[tuple[str, ...], int] | None = None,
) -> Model:
    """`model` from plain data; a ConfigError names `source` (and the key's line), or a field's origin, and each bad dotted field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_describe(error, source, origins or {}, table, lines)) from error


def read_toml(path: str | Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    """The TOML file's tables and the line of each key; ConfigError naming the file when it cannot be read, decoded or parsed."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}:{line}: not a TOML text file: byte 0x{raw[error.start]:02x} at offset {error.start} is not UTF-8") from error
    try:
        return tomllib.loads(text), key_lines(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from error


def load_config(
    model: type[Model],
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    prefix: str = ENV_PREFIX,
    overrides: Sequence[Override] = (),
    table: str | None = None,
) -> Model:
    """Load `model` from an optional TOML file, then PREFIX* environment variables, then `overrides` (flags).

    `table`: read only that table of the file (e.g. the [tls] table of any of our files); the
    overrides are then fields of that table's model, and so are the variables, named
    PREFIX<TABLE>__<FIELD> as they would be for the whole file (CDIMF_TLS__CA_FILE).
    """
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    source = "defaults (no config file given)"
    within = (table,) if table is not None else ()
    if path is not None:
        source = str(path)
        data, lines = read_toml(path)
        if table is not None:
            lines = {key[1:]: line for key, line in lines.items() if key[:1] == (table,)}
            data = data.get(table, {})
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: field {table}: expected a table")
        data = _resolve_paths(model, data, Path(path).resolve().parent)
    env_prefix = prefix if table is None else f"{prefix}{table.upper()}__"
    layers = [*_env_overrides(model, os.environ if environ is None else environ, env_prefix), *overrides]
    origins: dict[tuple[str, ...], str] = {}
    for override in layers:
        _apply(data, model, override)
        origins[override.path] = override.origin
    return validate_config(model, data, source, origins, within, lines)
