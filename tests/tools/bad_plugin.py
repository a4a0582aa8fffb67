"""A --load-plugin module whose import fails (tests/tools/test_cli_robustness.py)."""
raise ValueError("plugin is broken")
