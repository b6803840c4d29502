"""The pack's version, written into released files (a test keeps it equal to pyproject.toml)."""

PACKAGE_VERSION = "0.1.0"
