"""The protocol reference is generated from the models and must not drift."""

from protocol import docs
from protocol.models import METHODS


def test_protocol_reference_is_generated_from_the_current_models():
    assert docs.OUT.read_text() == docs.render(), "run: python -m protocol.docs"


def test_every_registered_server_method_has_models_in_protocol():
    import server.handlers  # noqa: F401  (registers the methods)
    from server.rpc import METHODS as SERVED

    test_only = {name for name in SERVED if name.startswith("test.")}
    assert set(SERVED) - test_only == set(METHODS)
    for name, method in SERVED.items():
        if name in METHODS:
            assert method.params is METHODS[name][0], name
