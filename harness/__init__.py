"""vpmu harness: host facts, CPUID decoding, guest images, QEMU/QMP lifecycle and the SSH guest session."""

__version__ = "0.1.0"
