"""Build the default guest image: a distro kernel plus a small initramfs with busybox, dropbear and modules.

The image directory holds ``vmlinuz``, ``initramfs.cpio.gz``, the client key pair, the pinned host public key and
``manifest.json``. It is cached by a key that hashes every input (kernel package version or kernel file,
binaries and their libraries, the init files, the module list), so a second build with the same inputs is a
no-op. Every tool the build runs is checked first and a missing one names the package that provides it on this host
(Debian/Ubuntu or Fedora/CentOS Stream/RHEL names: harness.host.hostpkg).

Computing that key (apt-cache to resolve the Debian kernel, ldd of each binary, sha256 of every input) took about
2 s of every ``exec``; :class:`KeyMemo` keeps each of those answers in the cache directory, keyed by the identity
(path, size, mtime_ns, ctime_ns, inode, device) of every file it was computed from, so a second ``exec`` only
stats files. Any change to an input file — or to apt's state, or to ld.so.cache — changes an identity and the
answer is computed again.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from harness import outputs
from harness.errors import ImageBuildError, OutputError, ToolMissingError, UsageError
from harness.guest import cpio
from harness.host import hostpkg
from harness.paths import IMAGES_DIR, cache_root

#: Bump when the image layout or the way it is assembled changes, so old caches are not reused.
BUILDER_VERSION = 2
DEFAULT_KERNEL_PACKAGE = "linux-image-cloud-amd64"
#: Modules the guest needs: the NIC for SSH (virtio-net on virtio-pci), and the msr/cpuid character devices
#: the probes read (/dev/cpu/N/msr, /dev/cpu/N/cpuid). Their dependencies are resolved by depmod.
GUEST_MODULES = ("virtio_net", "virtio_pci", "msr", "cpuid")
#: Printed by rc.sysinit once userspace is up; the launcher waits for it on the serial console.
READY_MARKER = "VPMU-GUEST-READY"
#: QEMU user-mode networking's fixed guest address and gateway (docs/system/devices/net.rst, "slirp").
GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
#: dropbear execs this path for the SFTP subsystem (compile-time SFTPSERVER_PATH in Debian's build); a dropbear
#: built otherwise (Fedora's: /usr/libexec/openssh/sftp-server) names its own path, read from the binary.
GUEST_SFTP_SERVER = "usr/lib/sftp-server"
HOST_SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
#: Where hosts keep OpenSSH's sftp-server: Debian/Ubuntu, then Fedora/CentOS Stream/RHEL.
HOST_SFTP_SERVERS = (HOST_SFTP_SERVER, Path("/usr/libexec/openssh/sftp-server"))

IMAGE_FILES = ("vmlinuz", "initramfs.cpio.gz", "id_ed25519", "id_ed25519.pub", "host_key.pub", "manifest.json")

Log = Callable[[str], None]
LOG = logging.getLogger(__name__)
#: errnos of a write that failed because of where it goes (the user's --out or cache), not because of an input.
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


@dataclass(frozen=True)
class Image:
    """A built guest image; everything the launcher and the SSH session need."""

    directory: Path
    kernel: Path
    initrd: Path
    client_key: Path
    host_key: str
    kernel_release: str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> Image:
        """Load an image directory; :class:`UsageError` if it is not a complete image."""
        directory = Path(directory)
        missing = [name for name in IMAGE_FILES if not (directory / name).is_file()]
        if missing:
            raise UsageError(
                f"{directory}: not a vpmu guest image (missing {', '.join(missing)}); "
                f"build one with `python -m harness image build --out {directory}`"
            )
        rebuild = f"rebuild it with `python -m harness image build --out {directory}`"
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
            host_key = (directory / "host_key.pub").read_text().strip()
        except OSError as exc:
            raise UsageError(f"{directory}: cannot read the image: {exc.filename}: {outputs.reason(exc)}") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise UsageError(f"{directory}: damaged image ({type(exc).__name__} in manifest.json or host_key.pub); "
                             f"{rebuild}") from None  # fmt: skip
        if not isinstance(manifest, dict) or not isinstance(manifest.get("kernel_release"), str):
            raise UsageError(f"{directory}: manifest.json has no 'kernel_release'; {rebuild}")
        return cls(
            directory=directory,
            kernel=directory / "vmlinuz",
            initrd=directory / "initramfs.cpio.gz",
            client_key=directory / "id_ed25519",
            host_key=host_key,
            kernel_release=manifest["kernel_release"],
            manifest=manifest,
        )


@dataclass(frozen=True)
class BuildResult:
    image: Image
    built: bool
    seconds: float


def _which(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        raise ToolMissingError(f"`{tool}` not found; {hostpkg.install_hint(tool)}")
    return path


def _run(argv: list[str], what: str, cwd: Path | None = None, timeout_s: float = 600) -> str:
    """Run a build step; :class:`ImageBuildError` naming the step and its stderr when it fails."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=cwd, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: timed out after {timeout_s:.0f} s: {' '.join(argv)}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ImageBuildError(f"{what} failed (exit {done.returncode}): {' | '.join(detail)}")
    return done.stdout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the cache-key memo -------------------------------------------------------------------------------------

#: The memo file in the cache directory, and its format version (a different version is ignored, not read).
KEY_MEMO = "key-memo.json"
MEMO_VERSION = 1
#: Entries kept per kind (the least recently used go first).
MEMO_ENTRIES = 256
#: A file modified less than this long ago is not memoized: a second write within the file system's timestamp
#: granularity could leave size and mtime unchanged (git's "racy clean" problem).
RACY_NS = 2_000_000_000
#: What apt-cache's answer depends on: the package lists, dpkg's status, sources, pins and configuration.
APT_STATE = (Path("/var/lib/apt/lists"), Path("/var/lib/dpkg/status"), Path("/etc/apt/sources.list"),
             Path("/etc/apt/sources.list.d"), Path("/etc/apt/preferences"), Path("/etc/apt/preferences.d"),
             Path("/etc/apt/apt.conf"), Path("/etc/apt/apt.conf.d"))  # fmt: skip
#: What ldd's answer depends on besides the binary: the loader's cache and its search path.
LD_CACHE = Path("/etc/ld.so.cache")


def identity(path: Path) -> list[Any]:
    """``[path, size, mtime_ns, ctime_ns, inode, device]`` of a file (symlinks followed), or ``[path, None]``
    when it does not exist: any rewrite, replacement or rename onto it changes the list."""
    try:
        st = os.stat(path)
    except OSError:
        return [str(path), None]
    return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _tree_identity(paths: tuple[Path, ...]) -> list[list[Any]]:
    """Identities of files and of the entries of directories (one level, as apt reads them)."""
    found = []
    for path in paths:
        found.append(identity(path))
        if path.is_dir():
            found += [identity(entry) for entry in sorted(path.iterdir()) if entry.is_file()]
    return found


def _settled(ident: list[Any]) -> bool:
    """The file exists and was not modified within RACY_NS (its identity can be trusted as a memo key)."""
    return ident[1] is not None and time.time_ns() - ident[2] >= RACY_NS


class KeyMemo:
    """Answers that go into the image cache key, remembered by the identities of the files they came from.

    Kinds: ``sha256`` (file identity -> digest), ``ldd`` (binary + ld.so.cache identity -> library paths),
    ``apt`` (apt state identities + package -> resolved package and version). Stored in the cache directory,
    written atomically; an unreadable or foreign memo is ignored and rewritten, one that cannot be written is
    skipped (it only saves time).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {"sha256": {}, "ldd": {}, "apt": {}}
        self.dirty = False
        if path is None:
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == MEMO_VERSION and isinstance(data.get("entries"), dict):
            for kind in self.entries:
                stored = data["entries"].get(kind)
                if isinstance(stored, dict):
                    self.entries[kind] = stored

    @classmethod
    def in_cache(cls) -> KeyMemo:
        return cls(cache_root() / KEY_MEMO)

    def get(self, kind: str, key: Any) -> Any:
        table = self.entries[kind]
        text = json.dumps(key, sort_keys=True)
        if text not in table:
            return None
        table[text] = table.pop(text)  # most recently used last
        return table[text]

    def put(self, kind: str, key: Any, value: Any) -> None:
        table = self.entries[kind]
        table[json.dumps(key, sort_keys=True)] = value
        while len(table) > MEMO_ENTRIES:
            del table[next(iter(table))]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        try:
            outputs.prepare_parent(self.path)
            outputs.write_text(self.path, json.dumps({"version": MEMO_VERSION, "entries": self.entries}) + "\n")
            self.dirty = False
        except OutputError as exc:
            LOG.debug("image key memo not saved: %s", exc)

    def sha256(self, path: Path) -> str:
        """sha256 of ``path``'s content, remembered by its identity."""
        ident = identity(path)
        digest = self.get("sha256", ident)
        if digest is None:
            digest = _sha256(path)
            if _settled(ident):
                self.put("sha256", ident, digest)
        return digest

    def libraries(self, binary: Path) -> list[Path]:
        """``shared_libraries(binary)``, remembered by the binary's and the loader cache's identities (and the
        loader's environment)."""
        ident = identity(binary)
        key = [ident, identity(LD_CACHE), os.environ.get("LD_LIBRARY_PATH"), os.environ.get("LD_PRELOAD")]
        libs = self.get("ldd", key)
        if libs is None:
            libs = [str(lib) for lib in shared_libraries(binary)]
            if _settled(ident):
                self.put("ldd", key, libs)
        return [Path(lib) for lib in libs]


#: A memo that remembers nothing: the functions below compute every answer when none is given.
NO_MEMO = KeyMemo()


# --- kernel sources -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSource:
    """Where the guest kernel comes from, and the part of the cache key that identifies it."""

    description: str
    key: str
    package: str | None = None
    version: str | None = None
    kernel_path: Path | None = None
    modules_dir: Path | None = None


def resolve_debian_kernel(meta_package: str = DEFAULT_KERNEL_PACKAGE, memo: KeyMemo = NO_MEMO) -> KernelSource:
    """Resolve the meta package to the concrete ``linux-image-<release>-cloud-amd64`` and its candidate version.

    apt-cache takes about 1.5 s; its answer is remembered by the identities of apt's state (package lists, dpkg
    status, sources, pins, configuration): ``apt-get update`` or a changed pin asks apt-cache again.
    """
    key = [meta_package, os.environ.get("APT_CONFIG"), _tree_identity(APT_STATE)]
    known = memo.get("apt", key)
    if known is None:
        known = _resolve_with_apt_cache(meta_package)
        memo.put("apt", key, known)
    package, version = known
    return KernelSource(f"{package} {version} (Debian)", f"deb:{package}={version}", package=package, version=version)


def _resolve_with_apt_cache(meta_package: str) -> list[str]:
    """``[package, candidate version]`` of the meta package's linux-image dependency, from apt-cache."""
    depends = _run([_which("apt-cache"), "depends", meta_package], f"apt-cache depends {meta_package}")
    match = re.search(r"Depends:\s*(linux-image-\S+)", depends)
    if match is None:
        raise ImageBuildError(
            f"{meta_package} depends on no linux-image package; run `apt-get update` first, or build from a "
            "kernel you have with --kernel PATH"
        )
    package = match.group(1)
    policy = _run([_which("apt-cache"), "policy", package], f"apt-cache policy {package}")
    version = re.search(r"Candidate:\s*(\S+)", policy)
    if version is None or version.group(1) == "(none)":
        raise ImageBuildError(f"no installable version of {package}; run `apt-get update` first")
    return [package, version.group(1)]


def kernel_release_of(bzimage: Path) -> str:
    """Read the release string from a bzImage's setup header (Documentation/arch/x86/boot.rst, kernel_version)."""
    try:
        data = bzimage.read_bytes()[:0x10000]
    except OSError as exc:
        raise UsageError(f"--kernel {bzimage}: cannot read: {exc.strerror}") from None
    if data[0x202:0x206] != b"HdrS":
        raise UsageError(f"--kernel {bzimage}: not an x86 bzImage (no 'HdrS' setup header)")
    offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    release = data[offset:].split(b"\0", 1)[0].split(b" ", 1)[0].decode(errors="replace")
    if not release:
        raise UsageError(f"--kernel {bzimage}: the setup header carries no kernel version")
    return release


def local_kernel(kernel: Path, modules_dir: Path | None, memo: KeyMemo = NO_MEMO) -> KernelSource:
    """A user-supplied kernel; its modules come from ``modules_dir`` or ``/lib/modules/<release>``."""
    kernel = Path(kernel)
    release = kernel_release_of(kernel)
    modules = Path(modules_dir) if modules_dir else Path("/lib/modules") / release
    if not modules.is_dir():
        raise UsageError(
            f"--kernel {kernel}: modules directory {modules} does not exist "
            f"(give it with --modules DIR, the lib/modules/{release} of that kernel)"
        )
    return KernelSource(
        f"{kernel} ({release})", f"file:{memo.sha256(kernel)}:{release}", kernel_path=kernel, modules_dir=modules
    )


# --- assembling the initramfs -------------------------------------------------------------------------------


def shared_libraries(binary: Path) -> list[Path]:
    """Return the shared objects ``binary`` loads (from ldd), the dynamic loader included; [] if static."""
    out = subprocess.run([_which("ldd"), str(binary)], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


class RootfsBuilder:
    """Collects initramfs entries, creating parent directories on demand and never adding a path twice."""

    def __init__(self) -> None:
        self.entries: list[cpio.Entry] = []
        self._names: set[str] = set()

    def _add(self, entry: cpio.Entry) -> None:
        """Add ``entry`` after its parent directories; the first entry for a path wins."""
        name = entry.name.strip("/")
        if name in self._names:
            return
        parts = name.split("/")
        for i in range(1, len(parts)):
            self.directory("/".join(parts[:i]))
        self._names.add(name)
        self.entries.append(entry)

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._add(cpio.Entry.directory(name.strip("/"), perm))

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._add(cpio.Entry.file(name.strip("/"), data, perm))

    def symlink(self, name: str, target: str) -> None:
        self._add(cpio.Entry.symlink(name.strip("/"), target))

    def binary(self, host_path: Path, guest_path: str | None = None) -> None:
        """Add an executable and the shared libraries it needs, at their host paths."""
        self.file(guest_path or str(host_path), host_path.read_bytes(), 0o755)
        for lib in shared_libraries(host_path):
            self.file(str(lib), lib.resolve().read_bytes(), 0o755)


def resolve_module_order(root: Path, release: str, names: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """Return module paths relative to ``root``, dependencies first, as ``modprobe --show-depends`` orders them.

    Built-in modules are skipped (nothing to load); a module that is neither built in nor found is an error.
    """
    argv = [_which("modprobe"), "-d", str(root), "-S", release, "--show-depends", "-a", *names]
    out = _run(argv, "resolving guest module dependencies (modprobe --show-depends)")
    order: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "insmod":
            rel = os.path.relpath(parts[1], root)
            if rel not in order:
                order.append(rel)
    return order


def module_payload(root: Path, module: str) -> tuple[str, bytes]:
    """A module as the guest's busybox insmod takes it: a plain ``.ko``. Fedora, RHEL and newer Ubuntu kernels
    compress their modules (xz, zstd); those are decompressed here, and the guest path loses the suffix.

    :raises ToolMissingError: a zstd-compressed module and no ``zstd`` program.
    """
    data = (root / module).read_bytes()
    if module.endswith(".ko.xz"):
        return module.removesuffix(".xz"), lzma.decompress(data)
    if module.endswith(".ko.gz"):
        return module.removesuffix(".gz"), gzip.decompress(data)
    if module.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ToolMissingError(f"{module} is zstd-compressed and `zstd` is not installed (package zstd)")
        done = subprocess.run([zstd, "-dcq"], input=data, capture_output=True, timeout=60, check=False)
        if done.returncode != 0:
            raise ImageBuildError(f"zstd could not decompress {module}: {done.stderr.decode(errors='replace')}")
        return module.removesuffix(".zst"), done.stdout
    return module, data


def _binaries() -> dict[str, Path]:
    found = {
        "busybox": Path(_which("busybox")),
        "dropbear": Path(_which("dropbear")),
        "dropbearkey": Path(_which("dropbearkey")),
    }
    sftp = next((path for path in HOST_SFTP_SERVERS if path.exists()), None)
    if sftp is None:
        raise ToolMissingError(f"OpenSSH's sftp-server not found ({' or '.join(map(str, HOST_SFTP_SERVERS))}); "
                               f"{hostpkg.install_hint('sftp-server')}")  # fmt: skip
    found["sftp-server"] = sftp
    return found


def guest_sftp_server(dropbear: Path) -> str:
    """Where the guest must hold sftp-server: the SFTPSERVER_PATH compiled into ``dropbear`` (the one absolute path
    ending in /sftp-server among its strings), else Debian's."""
    match = re.search(rb"\0(/[A-Za-z0-9_./-]*/sftp-server)\0", dropbear.read_bytes())
    return match.group(1).decode().lstrip("/") if match else GUEST_SFTP_SERVER


def cache_key(source: KernelSource, binaries: dict[str, Path], memo: KeyMemo = NO_MEMO) -> str:
    """Hash every input of the image; the image directory is named by it. ``memo`` only saves the work of
    reading files that did not change: the key is the same with or without it."""
    libraries = {lib.resolve() for p in binaries.values() for lib in memo.libraries(p)}
    inputs = {
        "builder": BUILDER_VERSION,
        "kernel": source.key,
        "modules": list(GUEST_MODULES),
        "rendered": [READY_MARKER, GUEST_IP, GATEWAY_IP, guest_sftp_server(binaries["dropbear"])],
        "binaries": {name: memo.sha256(path) for name, path in sorted(binaries.items())},
        "libraries": sorted({memo.sha256(lib) for lib in libraries}),
        "files": {p.name: memo.sha256(p) for p in sorted(IMAGES_DIR.iterdir()) if p.is_file()},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _fetch_kernel(source: KernelSource, work: Path, log: Log) -> tuple[Path, Path, str, bool]:
    """Return (vmlinuz, modules root, release, run_depmod) for ``source``, downloading the .deb if needed."""
    if source.kernel_path is not None:
        assert source.modules_dir is not None
        release = kernel_release_of(source.kernel_path)
        mods = source.modules_dir.resolve()
        if mods.parent.name == "modules" and mods.parent.parent.name == "lib" and mods.name == release:
            root = mods.parent.parent.parent
        else:
            root = work / "modroot"
            (root / "lib" / "modules").mkdir(parents=True)
            (root / "lib" / "modules" / release).symlink_to(mods)
        return source.kernel_path, root, release, not (mods / "modules.dep").exists()
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    deb = downloads / f"{source.package}_{source.version}_amd64.deb"
    if not deb.exists():
        log(f"downloading {source.package} {source.version} with apt-get download")
        fetch = work / "fetch"
        fetch.mkdir()
        _run([_which("apt-get"), "download", f"{source.package}={source.version}"], "apt-get download", cwd=fetch)
        fetched = next(fetch.glob("*.deb"), None)
        if fetched is None:
            raise ImageBuildError(f"apt-get download {source.package} produced no .deb")
        shutil.move(str(fetched), deb)
    root = work / "kernel"
    _run([_which("dpkg-deb"), "-x", str(deb), str(root)], f"unpacking {deb.name}")
    vmlinuz = next((root / "boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise ImageBuildError(f"{deb.name} contains no boot/vmlinuz-*")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    if (root / "usr" / "lib" / "modules").is_dir() and not (root / "lib" / "modules").exists():
        (root / "lib").mkdir(exist_ok=True)
        (root / "lib" / "modules").symlink_to(root / "usr" / "lib" / "modules")
    return vmlinuz, root, release, True


def _generate_keys(work: Path) -> tuple[bytes, str, bytes, str]:
    """Return (client private key, client public line, dropbear host key, host public line); fresh per image."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    client = Ed25519PrivateKey.generate()
    private = client.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = (
        client.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    )
    host_key = work / "dropbear_ed25519_host_key"
    _run([_which("dropbearkey"), "-t", "ed25519", "-f", str(host_key)], "generating the dropbear host key")
    shown = _run([_which("dropbearkey"), "-y", "-f", str(host_key)], "reading the dropbear host public key")
    host_public = next((ln for ln in shown.splitlines() if ln.startswith("ssh-ed25519 ")), None)
    if host_public is None:
        raise ImageBuildError("dropbearkey -y printed no ssh-ed25519 public key")
    return private, public + " vpmu-harness", host_key.read_bytes(), " ".join(host_public.split()[:2])


#: busybox applets the harness runs in the guest besides the shell and what init needs: every probe runs under
#: ``timeout -s KILL`` (harness.probe.runner GUEST_KILL_MARGIN_S).
REQUIRED_APPLETS = ("timeout",)


def assemble_rootfs(
    kernel_root: Path, release: str, binaries: dict[str, Path], client_public: str, host_key: bytes
) -> tuple[RootfsBuilder, list[str]]:
    """Lay out the initramfs: busybox applets, dropbear + sftp-server, modules, keys and the init files."""
    fs = RootfsBuilder()
    for directory in ("dev", "proc", "sys", "tmp", "run", "var/log", "mnt", "etc/vpmu"):
        fs.directory(directory)
    fs.directory("root", 0o700)
    fs.directory("root/.ssh", 0o700)
    fs.binary(binaries["busybox"], "bin/busybox")
    applets = _run([str(binaries["busybox"]), "--list-full"], "listing busybox applets").split()
    missing = sorted(set(REQUIRED_APPLETS) - {Path(applet).name for applet in applets})
    if missing:
        raise ImageBuildError(f"{binaries['busybox']} has no applet {', '.join(missing)}, which the harness runs in "
                              "the guest (probes run under `timeout -s KILL`); install the Debian package "
                              "busybox-static")  # fmt: skip
    for applet in applets:
        fs.symlink(applet, "/bin/busybox")
    fs.binary(binaries["dropbear"], "usr/sbin/dropbear")
    fs.binary(binaries["sftp-server"], guest_sftp_server(binaries["dropbear"]))
    modules = []
    for module in resolve_module_order(kernel_root, release):
        name, data = module_payload(kernel_root, module)
        fs.file(name, data)
        modules.append(name)
    template = jinja2.Template((IMAGES_DIR / "rc.sysinit.j2").read_text(), undefined=jinja2.StrictUndefined)
    rc = template.render(modules=modules, marker=READY_MARKER, guest_ip=GUEST_IP, gateway_ip=GATEWAY_IP)
    fs.file("etc/vpmu/rc.sysinit", rc.encode(), 0o755)
    fs.file("etc/inittab", (IMAGES_DIR / "inittab").read_bytes())
    fs.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    fs.file("etc/group", b"root:x:0:\n")
    fs.file("etc/shells", b"/bin/sh\n")
    fs.file("etc/dropbear/dropbear_ed25519_host_key", host_key, 0o600)
    fs.file("root/.ssh/authorized_keys", (client_public + "\n").encode(), 0o600)
    return fs, modules


def build_image(
    kernel: Path | None = None, modules_dir: Path | None = None, out: Path | None = None, log: Log = print
) -> BuildResult:
    """Build (or find in the cache) the guest image and return it.

    :param kernel: a bzImage to use instead of Debian's cloud kernel; its modules come from ``modules_dir``
        or ``/lib/modules/<release>``.
    :param out: where the image goes; default ``<cache>/images/<key>``.
    :raises ToolMissingError: a program the build needs is not installed.
    :raises ImageBuildError: a build step failed.
    :raises UsageError: ``kernel``/``out`` are not usable.
    :raises OutputError: ``out`` (or the cache) cannot be written: full, read-only, a file in the way.
    """
    start = time.monotonic()
    memo = KeyMemo.in_cache()
    source = local_kernel(kernel, modules_dir, memo) if kernel else resolve_debian_kernel(memo=memo)
    binaries = _binaries()
    for tool in ("depmod", "modprobe", "ldd") + (("dpkg-deb",) if source.kernel_path is None else ()):
        _which(tool)
    key = cache_key(source, binaries, memo)
    memo.save()
    where = "--out" if out else "image cache"
    out = Path(out) if out else cache_root() / "images" / key[:16]
    if out.exists() and not out.is_dir():
        raise OutputError(f"{where} {out}: is a file, not a directory")
    existing = out / "manifest.json"
    if existing.is_file():
        try:
            if json.loads(existing.read_text()).get("key") == key:
                image = Image.load(out)
                return BuildResult(image, built=False, seconds=time.monotonic() - start)
        except (ValueError, AttributeError, UsageError):
            pass  # a broken or partial image is rebuilt below
    elif out.exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: directory exists, is not empty and holds no vpmu image; refusing to overwrite")
    outputs.prepare_dir(out.parent, where)  # before downloading anything: full, read-only, a file in the way
    try:
        _build_into(out, source, binaries, key, start, log)
    except OSError as exc:
        written = str(exc.filename or "").startswith((str(out.parent), str(cache_root())))
        if exc.errno in OUTPUT_ERRNOS and written:
            raise OutputError(f"{where} {out}: cannot write the image: {outputs.reason(exc)}") from None
        raise ImageBuildError(f"building the image: {exc.filename or ''}: {outputs.reason(exc)}") from None
    return BuildResult(Image.load(out), built=True, seconds=time.monotonic() - start)


def _build_into(out: Path, source: KernelSource, binaries: dict[str, Path], key: str, start: float, log: Log) -> None:
    """Stage the image in a temporary directory beside ``out`` and rename it into place (whole or not at all)."""
    with tempfile.TemporaryDirectory(prefix=".vpmu-image-", dir=out.parent) as tmp:
        work = Path(tmp)
        log(f"building guest image from {source.description}")
        vmlinuz, kernel_root, release, needs_depmod = _fetch_kernel(source, work, log)
        if needs_depmod:
            _run([_which("depmod"), "-b", str(kernel_root), release], "depmod")
        private, public, host_key, host_public = _generate_keys(work)
        fs, modules = assemble_rootfs(kernel_root, release, binaries, public, host_key)
        staged = work / "image"
        staged.mkdir()
        cpio.write_initramfs(staged / "initramfs.cpio.gz", fs.entries)
        shutil.copyfile(vmlinuz, staged / "vmlinuz")
        (staged / "id_ed25519").write_bytes(private)
        os.chmod(staged / "id_ed25519", 0o600)
        (staged / "id_ed25519.pub").write_text(public + "\n")
        (staged / "host_key.pub").write_text(host_public + "\n")
        manifest = {
            "schema": "vpmu-image/1",
            "key": key,
            "kernel": source.description,
            "kernel_release": release,
            "modules": modules,
            "ready_marker": READY_MARKER,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_s": round(time.monotonic() - start, 2),
        }
        (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)


def find_or_build_image(image_dir: Path | None = None, log: Log = print) -> Image:
    """Return the image in ``image_dir`` if given, else the default image (built on first use)."""
    if image_dir is not None:
        return Image.load(Path(image_dir))
    return build_image(log=log).image
