"""The QEMU ``-cpu`` value of a profile, as data: model name plus requested properties.

``host,pmu=on,+pdcm,-arch-lbr,lbr-fmt=0x5`` -> model ``host``, props ``{pmu: True, pdcm: True, arch-lbr: False,
lbr-fmt: 5}``. Used to ask QEMU which properties exist, what it will grant, and to record requested values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_BOOL_WORDS = {"on": True, "true": True, "yes": True, "off": False, "false": False, "no": False}


@dataclass(frozen=True)
class CpuModel:
    """A parsed ``-cpu`` value."""

    name: str
    props: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> CpuModel:
        """Parse ``MODEL[,+flag|-flag|key=value]...``; raises ValueError on an empty model or item."""
        parts = [p.strip() for p in text.split(",")]
        if not parts[0]:
            raise ValueError(f"-cpu value {text!r} has no model name")
        props: dict[str, Any] = {}
        for item in parts[1:]:
            if not item:
                raise ValueError(f"-cpu value {text!r} has an empty item")
            if item[0] in "+-":
                props[item[1:]] = item[0] == "+"
            elif "=" in item:
                key, value = item.split("=", 1)
                props[key] = _value(value)
            else:
                props[item] = True
        return cls(parts[0], props)

    def qom_type(self) -> str:
        """The QOM type of the model (``max`` -> ``max-x86_64-cpu``)."""
        return f"{self.name}-x86_64-cpu"

    def pmu_requested(self) -> bool:
        """Whether the vPMU is on: ``host`` and ``max`` default to pmu=on, named models to off (QEMU
        target/i386/cpu.c: max_x86_cpu_initfn sets enable_pmu; the ``pmu`` property defaults to false)."""
        default = self.name in ("host", "max")
        return bool(self.props.get("pmu", default))


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in _BOOL_WORDS:
        return _BOOL_WORDS[lowered]
    try:
        return int(text, 0)
    except ValueError:
        return text
