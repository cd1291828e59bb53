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


def test_the_contributing_guide_says_where_every_method_lives():
    """docs/CONTRIBUTING.md's "Where is a method" table has a row for every
    declared method, naming the handler that serves it."""
    import re
    from pathlib import Path

    import server.handlers  # noqa: F401  (registers the methods)
    from server.rpc import METHODS as SERVED

    guide = (Path(__file__).resolve().parents[1] / "docs" / "CONTRIBUTING.md").read_text()
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| `([a-z]+\.[a-z]+)` \| `(\w+)\.py` `(\w+)` \|", guide, re.M)}
    assert sorted(set(METHODS) - set(rows)) == [], "methods missing from the guide's table"
    assert sorted(set(rows) - set(METHODS)) == [], "the guide's table names methods that are not declared"
    for name, (module, function) in rows.items():
        handler = SERVED[name].handler
        assert (handler.__module__, handler.__name__) == (f"server.handlers.{module}", function), name
