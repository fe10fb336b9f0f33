"""Fixtures shared by every test directory."""

# Modules in this directory import by their bare names because tests/ is not a package.
pytest_plugins = ["fixtures_s3"]
