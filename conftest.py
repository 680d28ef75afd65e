"""Register the vpmu pytest plugin (options, fixtures, markers) for the suite and the self-tests."""

pytest_plugins = ["harness.pytest_plugin"]
