"""The authorisation rules of both servers as plain functions of the caller's proved identity."""

import asyncio

from cdimf.common.rpc import auth
from cdimf.common.security.pki import PartyIdentity

SPORT, CLOTH = PartyIdentity("domain", "sport"), PartyIdentity("domain", "cloth")
OPERATOR, AGGREGATOR = PartyIdentity("operator", "operator"), PartyIdentity("aggregator", "aggregator")


def test_a_domain_speaks_only_for_itself() -> None:
    """Only sport's certificate may speak for sport; operator and aggregator speak for no domain."""
    rule = auth.speaks_for("sport")
    assert rule(SPORT) is None
    assert rule(CLOTH) == "certificate of domain 'cloth' cannot speak for domain 'sport'"
    assert rule(OPERATOR) == "certificate of cdimf://operator/operator cannot speak for a domain"
    assert rule(AGGREGATOR) is not None


def test_the_control_api_is_for_operators_and_the_aggregator() -> None:
    """No domain may start, stop or watch runs."""
    assert auth.controls_runs(OPERATOR) is None and auth.controls_runs(AGGREGATOR) is None
    assert auth.controls_runs(SPORT) == "certificate of cdimf://domain/sport cannot control runs"


def test_a_node_answers_the_operator_the_aggregator_and_its_own_domain() -> None:
    """Another domain may not query a node: its answers derive from the node's private data."""
    rule = auth.reads_node("sport")
    assert rule(OPERATOR) is None and rule(AGGREGATOR) is None and rule(SPORT) is None
    assert rule(CLOTH) == "domain 'cloth' may not query domain 'sport'"


def test_plaintext_allows_everything_without_reading_the_call() -> None:
    """An insecure Authorizer never touches the context (None here)."""

    async def scenario() -> None:
        authorizer = auth.Authorizer(insecure=True)
        assert await authorizer.require_domain(None, "sport") == "sport"  # type: ignore[arg-type]
        await authorizer.require_operator(None)  # type: ignore[arg-type]
        await authorizer.require_node_reader(None, "sport")  # type: ignore[arg-type]

    asyncio.run(scenario())
