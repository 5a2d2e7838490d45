"""Privacy accounting over rounds: epsilon at delta of r rounds of the Gaussian mechanism (dp-accounting's RDP accountant).

dp-accounting is imported lazily (the `privacy` extra): a node without noise needs nothing.
Each round releases every shared user's row once, with no subsampling, so r rounds are the
r-fold composition of the Gaussian mechanism of the configured noise multiplier.
"""

from functools import lru_cache


class AccountingUnavailable(RuntimeError):
    """The accountant's library is not installed."""


def check_accountant() -> None:
    """AccountingUnavailable when dp-accounting cannot be imported (before any noise is added)."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as error:
        raise AccountingUnavailable("privacy.noise_multiplier > 0 needs dp-accounting: pip install 'cdimf[privacy]'") from error


@lru_cache(maxsize=1024)
def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` releases of the Gaussian mechanism with std = noise_multiplier * sensitivity."""
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if rounds == 0:
        return 0.0
    check_accountant()
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier), count=rounds)
    return float(accountant.get_epsilon(delta))
