"""Register the vpmu pytest plugin (options, fixtures, markers) for the suite and the self-tests."""

pytest_plugins = ["harness.suite.pytest_plugin"]
