"""QEMU command-line construction: argv lists, comma escaping, loopback-only forwarding."""

from __future__ import annotations

from pathlib import Path

from harness.guest.image import Image
from harness.guest.qemu_argv import BASE_CMDLINE, MachineConfig, build_argv, quote_optarg


def fake_image(tmp_path: Path) -> Image:
    return Image(tmp_path, tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "key", "ssh-ed25519 AAAA", "6.1", {})


def test_quote_optarg():
    assert quote_optarg("/tmp/a,b") == "/tmp/a,,b"


def test_argv(tmp_path):
    config = MachineConfig(image=fake_image(tmp_path), accel="tcg", cpu="max,pmu=on", extra_cmdline="foo=1")
    argv = build_argv(config, qmp_fd=7)
    assert argv[0] == "qemu-system-x86_64"
    assert argv[argv.index("-cpu") + 1] == "max,pmu=on"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-append") + 1] == f"{BASE_CMDLINE} foo=1"
    assert "nmi_watchdog=0" in BASE_CMDLINE and "panic=-1" in BASE_CMDLINE
    assert "-no-reboot" in argv and "-nodefaults" in argv
    assert "socket,id=qmp0,fd=7" in argv
    netdev = argv[argv.index("-netdev") + 1]
    assert "hostfwd=tcp:127.0.0.1:0-:22" in netdev  # loopback only, port picked by the kernel


def test_cmdline_override(tmp_path):
    config = MachineConfig(image=fake_image(tmp_path), accel="kvm", cpu="host", cmdline="console=ttyS0 rdinit=/x")
    argv = build_argv(config, qmp_fd=3)
    assert argv[argv.index("-append") + 1] == "console=ttyS0 rdinit=/x"
