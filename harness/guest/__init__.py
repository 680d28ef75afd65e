"""A guest machine (floor 3): the image it boots, the QEMU process that runs it, and the ways in.

Owns the default guest image and its initramfs (image, cpio), QEMU command lines (qemu_argv), what a QEMU binary has
and grants for a ``-cpu`` model (qemu_cpu), the one QEMU process and its QMP monitor (machine), the serial console
(console), the SSH session (ssh) and a booted, ready guest built from them (boot). It knows nothing of probes or
verdicts. May import harness.host, harness.cpu and the ground modules.
"""
