"""Real-stack integration tests (see conftest.py)."""
