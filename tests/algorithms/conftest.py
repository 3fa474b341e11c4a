import pytest

try:  # Flower stamps every new Message with a task identity: the Flower tests' fixture gives this process one
    from tests.flower.test_app import task_identity  # noqa: F401
except pytest.skip.Exception:  # Flower is not installed
    pass
