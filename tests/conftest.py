"""Fixtures shared by every test directory; the code lives in orch_support.py, which tests import by name."""

from orch_support import (  # noqa: F401 - pytest finds fixtures by name
    any_db_url,
    client_for,
    clock,
    make_orch,
    postgres_url,
    sqlite_url,
)
