"""vpmu harness: host facts, CPUID decoding, guest images, QEMU/QMP lifecycle and the SSH guest session.

PYTEST_DONT_REWRITE: the vpmu command imports this package before it starts pytest, and the pytest11 entry point
would then ask pytest to rewrite its asserts too late (a PytestAssertRewriteWarning on every run); its asserts are
internal invariants, not test assertions.
"""

__version__ = "0.1.0"
