"""KCIDB output: a results.json as KernelCI's report-database I/O data (``python -m harness report kcidb``).

KCIDB links three kinds of object by id (every id is ``<origin>:<anything>``): a *checkout* (the kernel source
under test), a *build* of it, and the *tests* run on that build. vpmu tests the host kernel (its KVM and perf),
so the checkout and the build describe the host kernel the run was on — its release from the stored host facts
(``uname -r`` there), or the checkout a CI knows (``--checkout-id``, e.g. the kernel commit it built) — and every
check x profile x load of the run is one test object:

* ``path`` = ``vpmu.<check id>`` (KCIDB paths are dot-separated; a character outside ``[A-Za-z0-9_-]`` in a
  segment becomes ``_``), ``status`` = PASS / FAIL / SKIP / ERROR, ``duration`` = the check's seconds;
* ``environment`` = the host: CPU model and microcode, kernel, KVM parameters, vPMU mode, accelerator, QEMU;
* ``misc`` = profile, load, accelerator, the verdict's reason and the matrix cell's key number.

Ids are stable for one results file (the test ids carry a hash of its contents), so submitting the same file
twice updates the same objects instead of duplicating them; hosts that run the same kernel build share its
checkout and build objects.

The schema is KCIDB I/O v5.3, the latest that the ``kcidb-io`` package (PyPI) validates; the self-tests validate
the output with it. It is not needed at run time: where it is installed, the output is validated before writing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from harness import outputs
from harness.errors import HarnessError, UsageError
from harness.report import results
from harness.report.matrix import key_number

#: KCIDB I/O schema version written (kcidb_io.schema.V5_3).
VERSION = {"major": 5, "minor": 3}
DEFAULT_ORIGIN = "vpmu"
STATUS = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP", "error": "ERROR"}
#: KCIDB's origin pattern (schema: ``^[a-z0-9_]+$``).
ORIGIN_RE = re.compile(r"[a-z0-9_]+")
_PATH_BAD = re.compile(r"[^A-Za-z0-9_-]")
#: Comments are free text, kept to one readable line; KCIDB limits log excerpts to 16 KiB (and so does vpmu the
#: reason under misc: an ERROR's reason carries the guest's serial tail).
COMMENT_MAX = 300
EXCERPT_MAX = 16384


def check_origin(origin: str) -> str:
    """:raises UsageError: ``origin`` is not a KCIDB origin (lowercase letters, digits, ``_``)."""
    if not ORIGIN_RE.fullmatch(origin):
        raise UsageError(f"--origin {origin!r}: a KCIDB origin is lowercase letters, digits and '_' only "
                         "(e.g. 'vpmu' or 'acme_lab')")  # fmt: skip
    return origin


def check_checkout_id(checkout_id: str, origin: str) -> str:
    """The checkout id without its ``<origin>:`` prefix (either form is accepted).

    :raises UsageError: empty, or holding a NUL (KCIDB ids are ``<origin>:<any text without NUL>``).
    """
    local = checkout_id.removeprefix(f"{origin}:")
    if not local or "\0" in local:
        raise UsageError(f"--checkout-id {checkout_id!r}: give the CI's id for the kernel checkout under test "
                         "(e.g. its commit hash), not empty")  # fmt: skip
    return local


def kcidb_path(check_id: str) -> str:
    """``vpmu.<check id>`` with every segment made of KCIDB path characters."""
    segments = [_PATH_BAD.sub("_", part) or "_" for part in check_id.split(".")]
    return ".".join(["vpmu", *segments])


def _text(value: Any, limit: int = COMMENT_MAX) -> str:
    """One line of free text without NULs (KCIDB string patterns forbid them), cut at ``limit``."""
    line = str(value).replace("\0", "").split("\n")[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def environment(host: dict[str, Any]) -> dict[str, Any]:
    """The host as a KCIDB test environment: a one-line comment and the facts under ``misc``."""
    cpu = host.get("cpu") or {}
    kvm = host.get("kvm") or {}
    qemu = host.get("qemu") or {}
    facts = {
        "hostname": host.get("hostname"),
        "cpu_model": cpu.get("model_name"),
        "cpu_vendor": cpu.get("vendor"),
        "microcode": cpu.get("microcode"),
        "kernel": host.get("kernel"),
        "kvm_modules": kvm.get("modules"),
        "kvm_enable_pmu": kvm.get("enable_pmu"),
        "kvm_enable_mediated_pmu": kvm.get("enable_mediated_pmu"),
        "kvm_ignore_msrs": kvm.get("ignore_msrs"),
        "vpmu_mode": host.get("vpmu_mode"),
        "accel": host.get("accel"),
        "qemu_version": qemu.get("version"),
    }
    comment = (f"{facts['hostname'] or '?'}: {facts['cpu_model'] or '?'} (microcode {facts['microcode'] or '?'}), "
               f"kernel {facts['kernel'] or '?'}, kvm.enable_pmu={facts['kvm_enable_pmu']}, "
               f"vPMU mode {facts['vpmu_mode'] or 'none'}, accel {facts['accel'] or '?'}")  # fmt: skip
    return {"comment": _text(comment, 1000), "misc": {k: v for k, v in facts.items() if v is not None}}


def build_document(document: dict[str, Any], digest: str, origin: str = DEFAULT_ORIGIN,
                   checkout_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The KCIDB I/O object for one results document; ``digest`` identifies the results file (test ids)."""
    host = document.get("host") or {}
    release = str(host.get("kernel") or "unknown")
    local_checkout = checkout_id or f"kernel-{_slug(release)}"
    checkout: dict[str, Any] = {
        "id": f"{origin}:{local_checkout}",
        "origin": origin,
        "comment": _text(f"host kernel {release} (the kernel whose KVM and perf vpmu tested)"),
        "valid": True,
        "misc": {"kernel_release": release, "source": "--checkout-id" if checkout_id else "uname -r (host facts)"},
    }
    if checkout_id and re.fullmatch(r"[0-9a-f]{40}", checkout_id):
        checkout["git_commit_hash"] = checkout_id
    build = {
        # one build of that checkout per kernel release (the release names the build when the CI gave the commit)
        "id": f"{checkout['id']}:{_slug(release) if checkout_id else 'x86_64'}",
        "checkout_id": checkout["id"],
        "origin": origin,
        "architecture": "x86_64",
        "comment": _text(f"host kernel {release}"),
        "status": "PASS",  # it booted the host the suite ran on
        "misc": {"kernel_release": release},
    }
    env = environment(host)
    tests = []
    for run in document["runs"]:
        for check in run["checks"]:
            tests.append(_test(run, check, build["id"], origin, digest, env))
    return {"version": dict(VERSION), "checkouts": [checkout], "builds": [build], "tests": tests}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _test(run: dict[str, Any], check: dict[str, Any], build_id: str, origin: str, digest: str,
          env: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    profile, load = run["profile"], run["load"]
    reason = str(check.get("reason") or "").replace("\0", "")[:EXCERPT_MAX]
    misc: dict[str, Any] = {"check_id": check["id"], "feature": check.get("feature"), "profile": profile,
                            "load": load, "accel": run.get("accel"), "reason": reason}  # fmt: skip
    key = key_number(check)
    if key:
        misc["key_number"] = key
    misc = {k: v for k, v in misc.items() if v is not None}  # KCIDB: a missing value is absent, never null
    test: dict[str, Any] = {
        "id": f"{origin}:{digest}:{profile}:{load}:{check['id']}",
        "build_id": build_id,
        "origin": origin,
        "path": kcidb_path(check["id"]),
        "status": STATUS[check["status"]],
        "comment": _text(f"{check['id']} on {profile}/{load}" + (f": {reason}" if reason else "")),
        "environment": env,
        "misc": misc,
    }
    if check["status"] in ("fail", "error") and reason:
        test["log_excerpt"] = reason  # what went wrong, where a dashboard shows a failure's log
    duration = check.get("duration_s")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and duration >= 0:
        test["duration"] = float(duration)
    return test


def validate(data: dict[str, Any]) -> str | None:
    """Validate with ``kcidb-io`` where it is installed; return the schema version it checked, None if absent.

    :raises HarnessError: the data does not match the schema (a bug here, not the user's input; exit 1).
    """
    try:
        from jsonschema import ValidationError
        from kcidb_io import schema
    except ImportError:
        return None
    try:
        schema.V5_3.validate_exactly(data)
    except ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise HarnessError(f"report kcidb: the KCIDB data does not validate at {path}: {exc.message}") from None
    return f"{schema.V5_3.major}.{schema.V5_3.minor}"


def write(results_path: Path, out: Path, origin: str = DEFAULT_ORIGIN,
          checkout_id: str | None = None) -> tuple[dict[str, Any], str | None]:  # fmt: skip
    """Read ``results_path``, write the KCIDB data to ``out`` (whole or not at all); return it and the schema
    version kcidb-io validated it against (None: kcidb-io is not installed).

    :raises UsageError: a bad results file, origin or checkout id (one line).
    :raises OutputError: ``out`` cannot be written.
    """
    origin = check_origin(origin)
    local = check_checkout_id(checkout_id, origin) if checkout_id is not None else None
    document = results.load(results_path)
    digest = hashlib.sha256(Path(results_path).read_bytes()).hexdigest()[:16]
    data = build_document(document, digest, origin, local)
    checked = validate(data)
    outputs.prepare_parent(Path(out), "--out")
    outputs.write_text(Path(out), json.dumps(data, indent=1) + "\n", "--out")
    return data, checked


def counts(data: dict[str, Any]) -> str:
    """``1 checkout, 1 build, N tests``: what a submission holds."""
    return f"{len(data['checkouts'])} checkout, {len(data['builds'])} build, {len(data['tests'])} tests"
