"""Shared pytest set-up. Fixtures live in tests/fixtures/, one module per component."""

pytest_plugins = [
    "tests.fixtures.images",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.slurm",
    "tests.fixtures.threads",
    "tests.fixtures.training",
]
