"""The reference tests' fixtures (tests/conftest.py), for the study's tests."""

from tests.conftest import tok, world  # noqa: F401
