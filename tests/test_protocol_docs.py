"""The protocol reference is generated from the declarations and must not
drift, and every declared method is served."""

from protocol import docs
from protocol.models import METHODS


def test_protocol_reference_is_generated_from_the_current_models():
    assert docs.OUT.read_text() == docs.render(), "run: python -m protocol.docs"


def test_every_protocol_method_has_exactly_one_handler():
    import server.handlers  # noqa: F401  (registers the methods)
    from server.rpc import METHODS as SERVED

    # Registering a name twice fails at import, so one entry is one handler.
    assert sorted(set(METHODS) - set(SERVED)) == [], "declared in protocol, no handler"
    assert sorted(set(SERVED) - set(METHODS)) == [], "served, not declared in protocol"
    for name, method in SERVED.items():
        assert method.spec is METHODS[name], name
