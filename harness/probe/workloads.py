"""The generated workload's exact instruction and branch counts, declared once.

The probe templates render the loop from :data:`LOOP` (``guest_tests/probes/_common.h.j2``, ``vpmu_loop``);
verdicts derive their exact expectations from the same object; the self-tests run the compiled loop under
valgrind's callgrind and assert these numbers. kvm-unit-tests' 10N+17 belongs to its own bare-metal blob; in a
Linux guest the exact number must come from code we generate, measured differentially (N minus 0 iterations)
so the enable/disable path cancels out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoopWorkload:
    """``vpmu_loop(n, buf)``: per iteration one load, ``add``, ``nops`` NOPs, ``dec``, ``nop``, ``jnz``."""

    nops: int = 5

    @property
    def insns_per_iter(self) -> int:
        return self.nops + 5  # mov (load) + add + nops + dec + nop + jnz

    #: mov rdi->rcx, test, jz (not taken for n > 0, taken for n = 0), ret.
    fixed_insns: int = 4
    branches_per_iter: int = 1  # jnz
    #: jz and ret: the architectural "branch instructions retired" event counts returns too
    #: (SDM Vol. 3B, "Pre-defined Architectural Performance Events": all branch instructions at retirement).
    fixed_branches: int = 2
    loads_per_iter: int = 1

    def instructions(self, iterations: int) -> int:
        """Instructions retired inside ``vpmu_loop`` for ``iterations``."""
        return iterations * self.insns_per_iter + self.fixed_insns

    def branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter + self.fixed_branches

    def conditional_branches(self, iterations: int) -> int:
        """jz once, jnz per iteration: what callgrind's ``Bc`` counts (it does not count ``ret``)."""
        return iterations * self.branches_per_iter + 1

    def delta_instructions(self, iterations: int) -> int:
        """The differential expectation: instructions(n) - instructions(0)."""
        return self.instructions(iterations) - self.instructions(0)

    def delta_branches(self, iterations: int) -> int:
        return self.branches(iterations) - self.branches(0)

    def template_params(self) -> dict[str, int]:
        return {
            "nops": self.nops,
            "insns_per_iter": self.insns_per_iter,
            "fixed_insns": self.fixed_insns,
            "branches_per_iter": self.branches_per_iter,
            "fixed_branches": self.fixed_branches,
        }


LOOP = LoopWorkload()


@dataclass(frozen=True)
class CpuidLoopWorkload:
    """``vpmu_cpuid_loop(n)`` (guest_tests/probes/semantics.c.j2): per iteration ``xor eax``, ``xor ecx``, ``cpuid``,
    ``dec``, ``jnz``. CPUID always exits to the hypervisor, which skips it and must count it as retired (KVM
    kvm_skip_emulated_instruction() -> kvm_pmu_instruction_retired()): the loop's count must survive N VM exits."""

    insns_per_iter: int = 5
    branches_per_iter: int = 1  # jnz
    #: push rbx, mov, test, jz, pop rbx, ret (CPUID clobbers rbx, which the C caller keeps).
    fixed_insns: int = 6
    fixed_branches: int = 2  # jz and ret (the architectural branch event counts returns)

    def instructions(self, iterations: int) -> int:
        return iterations * self.insns_per_iter + self.fixed_insns

    def conditional_branches(self, iterations: int) -> int:
        """jz once, jnz per iteration: callgrind's ``Bc``."""
        return iterations * self.branches_per_iter + 1

    def delta_instructions(self, iterations: int) -> int:
        return iterations * self.insns_per_iter

    def delta_branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter


CPUID_LOOP = CpuidLoopWorkload()


@dataclass(frozen=True)
class RandomBranchWorkload:
    """``vpmu_random_branches(n, bits)`` (guest_tests/probes/semantics.c.j2): per iteration one byte loaded, ``inc``,
    ``test $1``, ``jz`` on that bit (taken for even bytes, else one ``nop`` more), ``dec``, ``jnz``. The bits come from
    a fixed-seed xorshift64 generator the probe runs before the window, so the ``jz`` follows no pattern a predictor
    could learn: about half of them mispredict."""

    insns_per_iter: int = 6  # movzbl, inc, test, jz, dec, jnz; + 1 nop per odd byte
    branches_per_iter: int = 2  # jz, jnz (both conditional)
    fixed_insns: int = 4  # mov, test, jz, ret
    fixed_branches: int = 2  # jz, ret

    def instructions(self, iterations: int, odd: int) -> int:
        """``odd``: how many of the ``iterations`` bytes have bit 0 set (one ``nop`` each)."""
        return iterations * self.insns_per_iter + odd + self.fixed_insns

    def conditional_branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter + 1

    def delta_branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter


RANDOM_BRANCHES = RandomBranchWorkload()


@dataclass(frozen=True)
class FepLoopWorkload:
    """``vpmu_fep_loop(n)`` (guest_tests/probes/semantics.c.j2): per iteration ``dec`` and a ``jnz`` behind KVM's
    forced-emulation prefix (``ud2; .ascii "kvm"``, arch/x86/kvm/x86.c handle_ud()). The ud2 faults, so it never
    retires; KVM skips the 5 prefix bytes, emulates the jnz and counts it as one instruction and one branch
    (x86_emulate_instruction() -> kvm_pmu_instruction_retired(), kvm_pmu_branch_retired()). ``vpmu_fep_twin`` is the
    same loop without the prefix: callgrind checks its counts, and a byte test checks the two differ by the prefix."""

    insns_per_iter: int = 2  # dec, jnz
    branches_per_iter: int = 1  # jnz (emulated)
    fixed_insns: int = 4  # mov, test, jz, ret
    prefix: bytes = bytes((0x0F, 0x0B, 0x6B, 0x76, 0x6D))  # ud2; "kvm"

    def instructions(self, iterations: int) -> int:
        return iterations * self.insns_per_iter + self.fixed_insns

    def conditional_branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter + 1

    def delta_instructions(self, iterations: int) -> int:
        return iterations * self.insns_per_iter

    def delta_branches(self, iterations: int) -> int:
        return iterations * self.branches_per_iter


FEP_LOOP = FepLoopWorkload()
