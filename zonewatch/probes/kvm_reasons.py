"""Exit reason names: VMX and SVM hardware exits (kvm:kvm_exit) and KVM_EXIT_* (kvm_run).

Every table is a dict keyed by the code the kernel uses, never a positional tuple: bcc's
tools/kvmexit.py lost one comma in such a tuple and shifted every later name for years.
tests/unit/test_kvm_reasons.py checks each entry against the kernel's own UAPI headers
(asm/vmx.h, asm/svm.h, linux/kvm.h) and tests/integration checks them against the running
kernel's kvm_exit and kvm_userspace_exit print formats, which know the newest codes.

Names follow kvm_stat: the suffix of the header's #define (EXIT_REASON_HLT -> "HLT",
SVM_EXIT_NPF -> "NPF", KVM_EXIT_MMIO -> "MMIO"). The kvm_exit tracepoint prints SVM codes
under other, lower-case names ("npf", "PF excp"); those are kept apart in SVM_TRACE_NAMES
so recorded trace text can be turned back into codes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence


class KvmIsa(enum.IntEnum):
    """kvm_exit's `isa` field (KVM_ISA_* in arch/x86/kvm/trace.h)."""

    VMX = 1
    SVM = 2


# arch/x86/include/uapi/asm/vmx.h: EXIT_REASON_* (basic exit reasons, bits 15:0).
VMX_EXIT_REASONS: dict[int, str] = {
    0: "EXCEPTION_NMI",
    1: "EXTERNAL_INTERRUPT",
    2: "TRIPLE_FAULT",
    3: "INIT_SIGNAL",
    4: "SIPI_SIGNAL",
    7: "INTERRUPT_WINDOW",
    8: "NMI_WINDOW",
    9: "TASK_SWITCH",
    10: "CPUID",
    12: "HLT",
    13: "INVD",
    14: "INVLPG",
    15: "RDPMC",
    16: "RDTSC",
    18: "VMCALL",
    19: "VMCLEAR",
    20: "VMLAUNCH",
    21: "VMPTRLD",
    22: "VMPTRST",
    23: "VMREAD",
    24: "VMRESUME",
    25: "VMWRITE",
    26: "VMOFF",
    27: "VMON",
    28: "CR_ACCESS",
    29: "DR_ACCESS",
    30: "IO_INSTRUCTION",
    31: "MSR_READ",
    32: "MSR_WRITE",
    33: "INVALID_STATE",
    34: "MSR_LOAD_FAIL",
    36: "MWAIT_INSTRUCTION",
    37: "MONITOR_TRAP_FLAG",
    39: "MONITOR_INSTRUCTION",
    40: "PAUSE_INSTRUCTION",
    41: "MCE_DURING_VMENTRY",
    43: "TPR_BELOW_THRESHOLD",
    44: "APIC_ACCESS",
    45: "EOI_INDUCED",
    46: "GDTR_IDTR",
    47: "LDTR_TR",
    48: "EPT_VIOLATION",
    49: "EPT_MISCONFIG",
    50: "INVEPT",
    51: "RDTSCP",
    52: "PREEMPTION_TIMER",
    53: "INVVPID",
    54: "WBINVD",
    55: "XSETBV",
    56: "APIC_WRITE",
    57: "RDRAND",
    58: "INVPCID",
    59: "VMFUNC",
    60: "ENCLS",
    61: "RDSEED",
    62: "PML_FULL",
    63: "XSAVES",
    64: "XRSTORS",
    67: "UMWAIT",
    68: "TPAUSE",
    74: "BUS_LOCK",
    75: "NOTIFY",
    77: "TDCALL",  # newer than 6.1's headers (6.18 kvm_exit)
    84: "MSR_READ_IMM",  # newer than 6.1's headers (6.18 kvm_exit)
    85: "MSR_WRITE_IMM",  # newer than 6.1's headers (6.18 kvm_exit)
}

# Flag bits above the basic reason (VMX_EXIT_REASONS_* in asm/vmx.h).
VMX_EXIT_REASON_FLAGS: dict[int, str] = {
    0x80000000: "FAILED_VMENTRY",
    0x08000000: "SGX_ENCLAVE_MODE",
}
VMX_BASIC_REASON_MASK = 0xFFFF

# arch/x86/include/uapi/asm/svm.h: SVM_EXIT_* exit codes, the SEV-ES software-defined
# VMGEXIT codes (SVM_VMGEXIT_*, named VMGEXIT_*) and SVM_EXIT_ERR (-1 as the u32 the
# tracepoint holds). The exception intercepts 0x40..0x5f are a range, see svm_exception().
SVM_EXIT_REASONS: dict[int, str] = {
    0x000: "READ_CR0",
    0x002: "READ_CR2",
    0x003: "READ_CR3",
    0x004: "READ_CR4",
    0x008: "READ_CR8",
    0x010: "WRITE_CR0",
    0x012: "WRITE_CR2",
    0x013: "WRITE_CR3",
    0x014: "WRITE_CR4",
    0x018: "WRITE_CR8",
    0x020: "READ_DR0",
    0x021: "READ_DR1",
    0x022: "READ_DR2",
    0x023: "READ_DR3",
    0x024: "READ_DR4",
    0x025: "READ_DR5",
    0x026: "READ_DR6",
    0x027: "READ_DR7",
    0x030: "WRITE_DR0",
    0x031: "WRITE_DR1",
    0x032: "WRITE_DR2",
    0x033: "WRITE_DR3",
    0x034: "WRITE_DR4",
    0x035: "WRITE_DR5",
    0x036: "WRITE_DR6",
    0x037: "WRITE_DR7",
    0x060: "INTR",
    0x061: "NMI",
    0x062: "SMI",
    0x063: "INIT",
    0x064: "VINTR",
    0x065: "CR0_SEL_WRITE",
    0x066: "IDTR_READ",
    0x067: "GDTR_READ",
    0x068: "LDTR_READ",
    0x069: "TR_READ",
    0x06A: "IDTR_WRITE",
    0x06B: "GDTR_WRITE",
    0x06C: "LDTR_WRITE",
    0x06D: "TR_WRITE",
    0x06E: "RDTSC",
    0x06F: "RDPMC",
    0x070: "PUSHF",
    0x071: "POPF",
    0x072: "CPUID",
    0x073: "RSM",
    0x074: "IRET",
    0x075: "SWINT",
    0x076: "INVD",
    0x077: "PAUSE",
    0x078: "HLT",
    0x079: "INVLPG",
    0x07A: "INVLPGA",
    0x07B: "IOIO",
    0x07C: "MSR",
    0x07D: "TASK_SWITCH",
    0x07E: "FERR_FREEZE",
    0x07F: "SHUTDOWN",
    0x080: "VMRUN",
    0x081: "VMMCALL",
    0x082: "VMLOAD",
    0x083: "VMSAVE",
    0x084: "STGI",
    0x085: "CLGI",
    0x086: "SKINIT",
    0x087: "RDTSCP",
    0x088: "ICEBP",
    0x089: "WBINVD",
    0x08A: "MONITOR",
    0x08B: "MWAIT",
    0x08C: "MWAIT_COND",
    0x08D: "XSETBV",
    0x08E: "RDPRU",
    0x08F: "EFER_WRITE_TRAP",
    0x090: "CR0_WRITE_TRAP",
    0x091: "CR1_WRITE_TRAP",
    0x092: "CR2_WRITE_TRAP",
    0x093: "CR3_WRITE_TRAP",
    0x094: "CR4_WRITE_TRAP",
    0x095: "CR5_WRITE_TRAP",
    0x096: "CR6_WRITE_TRAP",
    0x097: "CR7_WRITE_TRAP",
    0x098: "CR8_WRITE_TRAP",
    0x099: "CR9_WRITE_TRAP",
    0x09A: "CR10_WRITE_TRAP",
    0x09B: "CR11_WRITE_TRAP",
    0x09C: "CR12_WRITE_TRAP",
    0x09D: "CR13_WRITE_TRAP",
    0x09E: "CR14_WRITE_TRAP",
    0x09F: "CR15_WRITE_TRAP",
    0x0A2: "INVPCID",
    0x0A5: "BUS_LOCK",  # newer than 6.1's headers (6.18 kvm_exit)
    0x0A6: "IDLE_HLT",  # newer than 6.1's headers (6.18 kvm_exit)
    0x400: "NPF",
    0x401: "AVIC_INCOMPLETE_IPI",
    0x402: "AVIC_UNACCELERATED_ACCESS",
    0x403: "VMGEXIT",
    0x80000001: "VMGEXIT_MMIO_READ",
    0x80000002: "VMGEXIT_MMIO_WRITE",
    0x80000003: "VMGEXIT_NMI_COMPLETE",
    0x80000004: "VMGEXIT_AP_HLT_LOOP",
    0x80000005: "VMGEXIT_AP_JUMP_TABLE",
    0x80000010: "VMGEXIT_PSC",
    0x80000011: "VMGEXIT_GUEST_REQUEST",
    0x80000012: "VMGEXIT_EXT_GUEST_REQUEST",
    0x80000013: "VMGEXIT_AP_CREATION",
    0x8000FFFD: "VMGEXIT_HV_FEATURES",
    0x8000FFFE: "VMGEXIT_TERM_REQUEST",
    0x8000FFFF: "VMGEXIT_UNSUPPORTED_EVENT",
    0xFFFFFFFF: "ERR",
}

SVM_EXIT_EXCP_BASE = 0x040
SVM_EXIT_LAST_EXCP = 0x05F

# x86 exception vectors (the *_VECTOR defines of arch/x86/include/uapi/asm/kvm.h).
EXCEPTION_VECTORS: dict[int, str] = {
    0: "DE",
    1: "DB",
    3: "BP",
    4: "OF",
    5: "BR",
    6: "UD",
    7: "NM",
    8: "DF",
    10: "TS",
    11: "NP",
    12: "SS",
    13: "GP",
    14: "PF",
    16: "MF",
    17: "AC",
    18: "MC",
    19: "XM",
    20: "VE",
}

# The names the kvm_exit tracepoint prints for SVM codes (SVM_EXIT_REASONS in asm/svm.h),
# which differ from the #define names; needed to read recorded trace text back.
SVM_TRACE_NAMES: dict[int, str] = {
    0x000: "read_cr0",
    0x002: "read_cr2",
    0x003: "read_cr3",
    0x004: "read_cr4",
    0x008: "read_cr8",
    0x010: "write_cr0",
    0x012: "write_cr2",
    0x013: "write_cr3",
    0x014: "write_cr4",
    0x018: "write_cr8",
    0x020: "read_dr0",
    0x021: "read_dr1",
    0x022: "read_dr2",
    0x023: "read_dr3",
    0x024: "read_dr4",
    0x025: "read_dr5",
    0x026: "read_dr6",
    0x027: "read_dr7",
    0x030: "write_dr0",
    0x031: "write_dr1",
    0x032: "write_dr2",
    0x033: "write_dr3",
    0x034: "write_dr4",
    0x035: "write_dr5",
    0x036: "write_dr6",
    0x037: "write_dr7",
    0x040: "DE excp",
    0x041: "DB excp",
    0x043: "BP excp",
    0x044: "OF excp",
    0x045: "BR excp",
    0x046: "UD excp",
    0x047: "NM excp",
    0x048: "DF excp",
    0x04A: "TS excp",
    0x04B: "NP excp",
    0x04C: "SS excp",
    0x04D: "GP excp",
    0x04E: "PF excp",
    0x050: "MF excp",
    0x051: "AC excp",
    0x052: "MC excp",
    0x053: "XF excp",
    0x060: "interrupt",
    0x061: "nmi",
    0x062: "smi",
    0x063: "init",
    0x064: "vintr",
    0x065: "cr0_sel_write",
    0x066: "read_idtr",
    0x067: "read_gdtr",
    0x068: "read_ldtr",
    0x069: "read_rt",
    0x06A: "write_idtr",
    0x06B: "write_gdtr",
    0x06C: "write_ldtr",
    0x06D: "write_rt",
    0x06E: "rdtsc",
    0x06F: "rdpmc",
    0x070: "pushf",
    0x071: "popf",
    0x072: "cpuid",
    0x073: "rsm",
    0x074: "iret",
    0x075: "swint",
    0x076: "invd",
    0x077: "pause",
    0x078: "hlt",
    0x079: "invlpg",
    0x07A: "invlpga",
    0x07B: "io",
    0x07C: "msr",
    0x07D: "task_switch",
    0x07E: "ferr_freeze",
    0x07F: "shutdown",
    0x080: "vmrun",
    0x081: "hypercall",
    0x082: "vmload",
    0x083: "vmsave",
    0x084: "stgi",
    0x085: "clgi",
    0x086: "skinit",
    0x087: "rdtscp",
    0x088: "icebp",
    0x089: "wbinvd",
    0x08A: "monitor",
    0x08B: "mwait",
    0x08D: "xsetbv",
    0x08F: "write_efer_trap",
    0x090: "write_cr0_trap",
    0x094: "write_cr4_trap",
    0x098: "write_cr8_trap",
    0x0A2: "invpcid",
    0x0A5: "buslock",  # newer than 6.1's headers (6.18 kvm_exit)
    0x0A6: "idle-halt",  # newer than 6.1's headers (6.18 kvm_exit)
    0x400: "npf",
    0x401: "avic_incomplete_ipi",
    0x402: "avic_unaccelerated_access",
    0x403: "vmgexit",
    0x80000001: "vmgexit_mmio_read",
    0x80000002: "vmgexit_mmio_write",
    0x80000003: "vmgexit_nmi_complete",
    0x80000004: "vmgexit_ap_hlt_loop",
    0x80000005: "vmgexit_ap_jump_table",
    0x80000010: "vmgexit_page_state_change",
    0x80000011: "vmgexit_guest_request",
    0x80000012: "vmgexit_ext_guest_request",
    0x80000013: "vmgexit_ap_creation",
    0x8000FFFD: "vmgexit_hypervisor_feature",
    0xFFFFFFFF: "invalid_guest_state",
}

# include/uapi/linux/kvm.h: kvm_run.exit_reason, as kvm_userspace_exit reports it.
KVM_EXIT_REASONS: dict[int, str] = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    11: "SET_TPR",
    12: "TPR_ACCESS",
    13: "S390_SIEIC",
    14: "S390_RESET",
    15: "DCR",
    16: "NMI",
    17: "INTERNAL_ERROR",
    18: "OSI",
    19: "PAPR_HCALL",
    20: "S390_UCONTROL",
    21: "WATCHDOG",
    22: "S390_TSCH",
    23: "EPR",
    24: "SYSTEM_EVENT",
    25: "S390_STSI",
    26: "IOAPIC_EOI",
    27: "HYPERV",
    28: "ARM_NISV",
    29: "X86_RDMSR",
    30: "X86_WRMSR",
    31: "DIRTY_RING_FULL",
    32: "AP_RESET_HOLD",
    33: "X86_BUS_LOCK",
    34: "XEN",
    35: "RISCV_SBI",
    36: "RISCV_CSR",
    37: "NOTIFY",
    38: "LOONGARCH_IOCSR",  # newer than 6.1's headers (upstream linux/kvm.h)
    39: "MEMORY_FAULT",  # newer than 6.1's headers (upstream linux/kvm.h)
    40: "TDX",  # newer than 6.1's headers (upstream linux/kvm.h)
}


def _hex(code: int) -> str:
    """An unknown code, spelled as the tracepoints' __print_symbolic spells it."""
    return f"{code:#x}"


def vmx_flag_names(code: int) -> list[str]:
    """The flag bits above a VMX basic exit reason, by name (unknown bits in hex)."""
    flags = code & ~VMX_BASIC_REASON_MASK & 0xFFFFFFFF
    names: list[str] = []
    for bit, name in VMX_EXIT_REASON_FLAGS.items():
        if flags & bit:
            names.append(name)
            flags &= ~bit
    if flags:
        names.append(_hex(flags))
    return names


def svm_exception(code: int) -> str | None:
    """The name of an SVM exception intercept (0x40 + vector), None outside that range."""
    if not SVM_EXIT_EXCP_BASE <= code <= SVM_EXIT_LAST_EXCP:
        return None
    vector = code - SVM_EXIT_EXCP_BASE
    return f"EXCP_{EXCEPTION_VECTORS.get(vector, str(vector))}"


def exit_reason_name(isa: int, code: int) -> str:
    """A kvm_exit reason's name, as kvm_stat shows it: "HLT", "EPT_VIOLATION", "NPF".

    VMX flag bits follow the basic reason separated by spaces, as the kvm_exit tracepoint
    prints them ("INVALID_STATE FAILED_VMENTRY"); an unknown code is its hex value.
    """
    if isa == KvmIsa.VMX:
        basic = code & VMX_BASIC_REASON_MASK
        name = VMX_EXIT_REASONS.get(basic, _hex(basic))
        return " ".join([name, *vmx_flag_names(code)])
    if isa == KvmIsa.SVM:
        known = SVM_EXIT_REASONS.get(code)
        if known is not None:
            return known
        return svm_exception(code) or _hex(code)
    return _hex(code)


def userspace_exit_name(code: int) -> str:
    """A kvm_run exit reason's name without the KVM_EXIT_ prefix: "IO", "MMIO", "HLT"."""
    return KVM_EXIT_REASONS.get(code, _hex(code))


# ---- trace text back to codes (the replay of recorded kvm_exit records) -----------------

_VMX_BY_NAME: dict[str, int] = {name: code for code, name in VMX_EXIT_REASONS.items()}
_VMX_FLAGS_BY_NAME: dict[str, int] = {name: bit for bit, name in VMX_EXIT_REASON_FLAGS.items()}
_SVM_BY_TRACE_NAME: dict[str, int] = {name: code for code, name in SVM_TRACE_NAMES.items()}


def isa_of_trace_name(name: str) -> KvmIsa | None:
    """Which table a name printed by kvm_exit comes from (the two never share a name)."""
    if name in _VMX_BY_NAME:
        return KvmIsa.VMX
    if name in _SVM_BY_TRACE_NAME:
        return KvmIsa.SVM
    return None


def parse_trace_reason(words: Sequence[str], isa: KvmIsa) -> int:
    """The exit code behind the words kvm_exit printed after "reason".

    `words` is the name (or hex, for codes the kernel had no name for) followed, on VMX, by
    flag names. ValueError for a name this table does not know.
    """
    if not words:
        raise ValueError("no exit reason")
    head, *flags = words
    if isa == KvmIsa.VMX:
        code = _VMX_BY_NAME.get(head)
        if code is None:
            code = int(head, 16)
        for flag in flags:
            bit = _VMX_FLAGS_BY_NAME.get(flag)
            code |= bit if bit is not None else int(flag, 16)
        return code
    code = _SVM_BY_TRACE_NAME.get(" ".join(words))
    if code is None:
        if flags:
            raise ValueError(f"unknown SVM exit reason {' '.join(words)!r}")
        code = int(head, 16)
    return code


def trace_name_tables() -> Mapping[KvmIsa, Mapping[int, str]]:
    """The names the kvm_exit tracepoint prints, per ISA (for checks against its format)."""
    return {KvmIsa.VMX: VMX_EXIT_REASONS, KvmIsa.SVM: SVM_TRACE_NAMES}
