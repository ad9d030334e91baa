"""Helpers that tests share: real tools started for a test and stopped after it (no mocks).

Imported as `tests.support...`: run pytest from the repository root as `.venv/bin/python -m pytest`,
which puts the root on sys.path (tests/service/conftest.py also does, for a bare `pytest`).
"""
