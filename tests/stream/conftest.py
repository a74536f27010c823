"""The stream tests use the shared fixtures of tests/conftest.py (broker, Redis, models)."""
