"""The exit reason tables against the kernel's own UAPI headers, entry by entry.

The headers are the installed Debian kernel headers (/usr/src/linux-headers-*-common, what
`make setup` installs for bcc) and linux-libc-dev's /usr/include/linux/kvm.h. Entries newer
than those headers are listed here by name; the integration test checks them against the
running kernel's tracepoint formats.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zonewatch.probes.kvm_reasons import (
    EXCEPTION_VECTORS,
    KVM_EXIT_REASONS,
    SVM_EXIT_EXCP_BASE,
    SVM_EXIT_LAST_EXCP,
    SVM_EXIT_REASONS,
    SVM_TRACE_NAMES,
    VMX_EXIT_REASON_FLAGS,
    VMX_EXIT_REASONS,
    KvmIsa,
    exit_reason_name,
    isa_of_trace_name,
    parse_trace_reason,
    userspace_exit_name,
)


def _newest(pattern: str) -> Path | None:
    found = sorted(Path("/").glob(pattern.lstrip("/")))
    return found[-1] if found else None


UAPI = _newest("/usr/src/linux-headers-*-common/arch/x86/include/uapi")
KVM_H_CANDIDATES = [
    p
    for p in (
        _newest("/usr/src/linux-headers-*-common/include/uapi/linux/kvm.h"),
        Path("/usr/include/linux/kvm.h"),
    )
    if p is not None and p.is_file()
]

needs_uapi = pytest.mark.skipif(UAPI is None, reason="no kernel headers (make setup installs them)")

# Newer than the installed (6.1) headers, hence not checkable against them.
NEWER_VMX = {77: "TDCALL", 84: "MSR_READ_IMM", 85: "MSR_WRITE_IMM"}
NEWER_SVM = {0x0A5: "BUS_LOCK", 0x0A6: "IDLE_HLT"}
NEWER_SVM_TRACE = {0x0A5: "buslock", 0x0A6: "idle-halt"}
NEWER_KVM_EXIT = {38: "LOONGARCH_IOCSR", 39: "MEMORY_FAULT", 40: "TDX"}

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(-?(?:0x[0-9a-fA-F]+|\d+))\b", re.MULTILINE)


def defines(path: Path, prefix: str) -> dict[str, int]:
    """name (without prefix) -> value of every numeric `#define <prefix>...` in a header."""
    out: dict[str, int] = {}
    for name, value in _DEFINE.findall(path.read_text()):
        if name.startswith(prefix):
            out[name.removeprefix(prefix)] = int(value, 0)
    return out


def macro_table(path: Path, macro: str, symbols: dict[str, int]) -> dict[int, str]:
    """A `{ CODE [+ X_VECTOR], "name" }, \\` table macro, evaluated with `symbols`."""
    text = path.read_text()
    start = text.index(f"#define {macro} ")
    body: list[str] = []
    for line in text[start:].splitlines()[1:]:
        body.append(line)
        if not line.rstrip().endswith("\\"):
            break
    out: dict[int, str] = {}
    for expr, name in re.findall(r"\{\s*([^,]+?)\s*,\s*\"([^\"]+)\"\s*\}", "\n".join(body)):
        value = sum(symbols[term.strip()] for term in expr.split("+"))
        out[value & 0xFFFFFFFF] = name
    return out


@needs_uapi
def test_vmx_reasons_match_vmx_h() -> None:
    assert UAPI is not None
    header = {v: k for k, v in defines(UAPI / "asm/vmx.h", "EXIT_REASON_").items()}
    ours = {c: n for c, n in VMX_EXIT_REASONS.items() if c not in NEWER_VMX}
    assert ours == header
    for code, name in NEWER_VMX.items():
        assert VMX_EXIT_REASONS[code] == name
        assert code not in header


@needs_uapi
def test_vmx_trace_names_are_the_define_names() -> None:
    """kvm_exit prints VMX reasons from VMX_EXIT_REASONS, which are the define suffixes."""
    assert UAPI is not None
    vmx_h = UAPI / "asm/vmx.h"
    symbols = {f"EXIT_REASON_{k}": v for k, v in defines(vmx_h, "EXIT_REASON_").items()}
    table = macro_table(vmx_h, "VMX_EXIT_REASONS", symbols)
    assert table == {c: n for c, n in VMX_EXIT_REASONS.items() if c not in NEWER_VMX}


@needs_uapi
def test_vmx_flags_match_vmx_h() -> None:
    assert UAPI is not None
    header = defines(UAPI / "asm/vmx.h", "VMX_EXIT_REASONS_")
    assert {v: k for k, v in header.items()} == VMX_EXIT_REASON_FLAGS


@needs_uapi
def test_svm_reasons_match_svm_h() -> None:
    assert UAPI is not None
    svm_h = UAPI / "asm/svm.h"
    header: dict[int, str] = {}
    for name, value in defines(svm_h, "SVM_EXIT_").items():
        if name in ("EXCP_BASE", "LAST_EXCP", "SW"):  # range markers, not exit codes
            continue
        header[value & 0xFFFFFFFF] = name
    for name, value in defines(svm_h, "SVM_VMGEXIT_").items():
        if value >= 0x80000000:  # the rest are sub-operation values, not exit codes
            header[value] = f"VMGEXIT_{name}"
    ours = {c: n for c, n in SVM_EXIT_REASONS.items() if c not in NEWER_SVM}
    assert ours == header
    assert (
        defines(svm_h, "SVM_EXIT_")["EXCP_BASE"],
        defines(svm_h, "SVM_EXIT_")["LAST_EXCP"],
    ) == (SVM_EXIT_EXCP_BASE, SVM_EXIT_LAST_EXCP)


@needs_uapi
def test_svm_trace_names_match_svm_h_table() -> None:
    assert UAPI is not None
    svm_h = UAPI / "asm/svm.h"
    symbols = {f"SVM_EXIT_{k}": v for k, v in defines(svm_h, "SVM_EXIT_").items()}
    symbols |= {f"SVM_VMGEXIT_{k}": v for k, v in defines(svm_h, "SVM_VMGEXIT_").items()}
    symbols |= {f"{k}_VECTOR": v for k, v in _vectors().items()}
    table = macro_table(svm_h, "SVM_EXIT_REASONS", symbols)
    assert {c: n for c, n in SVM_TRACE_NAMES.items() if c not in NEWER_SVM_TRACE} == table


def _vectors() -> dict[str, int]:
    assert UAPI is not None
    return {
        name.removesuffix("_VECTOR"): value
        for name, value in defines(UAPI / "asm/kvm.h", "").items()
        if name.endswith("_VECTOR") and not name.startswith("KVM_")
    }


@needs_uapi
def test_exception_vectors_match_kvm_h() -> None:
    assert {v: k for k, v in _vectors().items()} == EXCEPTION_VECTORS


@pytest.mark.skipif(not KVM_H_CANDIDATES, reason="no linux/kvm.h")
@pytest.mark.parametrize("kvm_h", KVM_H_CANDIDATES, ids=str)
def test_kvm_exit_reasons_match_kvm_h(kvm_h: Path) -> None:
    # Only the kvm_run.exit_reason block: KVM_EXIT_HYPERV_SYNIC, KVM_EXIT_IO_IN and the
    # like share the prefix but are values of other fields.
    text = kvm_h.read_text()
    start = text.index("#define KVM_EXIT_UNKNOWN")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("#define KVM_EXIT_"):
            break
        block.append(line)
    header = {
        int(value, 0): name
        for name, value in re.findall(r"#define KVM_EXIT_(\w+)\s+(\d+)", "\n".join(block))
    }
    ours = {c: n for c, n in KVM_EXIT_REASONS.items() if c not in NEWER_KVM_EXIT}
    assert ours == header
    assert not set(NEWER_KVM_EXIT) & set(header)


# ---- names, the kvm_stat way ---------------------------------------------------------


@pytest.mark.parametrize(
    ("isa", "code", "name"),
    [
        (KvmIsa.VMX, 12, "HLT"),
        (KvmIsa.VMX, 48, "EPT_VIOLATION"),
        (KvmIsa.VMX, 30, "IO_INSTRUCTION"),
        (KvmIsa.VMX, 0x80000021, "INVALID_STATE FAILED_VMENTRY"),
        (KvmIsa.VMX, 0x08000030, "EPT_VIOLATION SGX_ENCLAVE_MODE"),
        (KvmIsa.VMX, 0x00100030, "EPT_VIOLATION 0x100000"),
        (KvmIsa.VMX, 99, "0x63"),
        (KvmIsa.SVM, 0x078, "HLT"),
        (KvmIsa.SVM, 0x400, "NPF"),
        (KvmIsa.SVM, 0x07B, "IOIO"),
        (KvmIsa.SVM, 0x04E, "EXCP_PF"),
        (KvmIsa.SVM, 0x05F, "EXCP_31"),
        (KvmIsa.SVM, 0xFFFFFFFF, "ERR"),
        (KvmIsa.SVM, 0x0A7, "0xa7"),
        (7, 12, "0xc"),
    ],
)
def test_exit_reason_name(isa: int, code: int, name: str) -> None:
    assert exit_reason_name(isa, code) == name


def test_the_two_isas_never_share_a_code_name_pair_by_accident() -> None:
    # Code 12 is HLT on VMX and WRITE_CR2 (0x012 = 18)... different namespaces: the same
    # code must be decoded through the ISA the record carries.
    assert exit_reason_name(KvmIsa.VMX, 0x12) == "VMCALL"
    assert exit_reason_name(KvmIsa.SVM, 0x12) == "WRITE_CR2"


@pytest.mark.parametrize(
    ("code", "name"), [(2, "IO"), (5, "HLT"), (6, "MMIO"), (10, "INTR"), (99, "0x63")]
)
def test_userspace_exit_name(code: int, name: str) -> None:
    assert userspace_exit_name(code) == name


def test_tables_are_dicts_keyed_by_code() -> None:
    """Never positional tuples (the kvmexit.py bug): every table maps code -> name."""
    for table in (VMX_EXIT_REASONS, SVM_EXIT_REASONS, SVM_TRACE_NAMES, KVM_EXIT_REASONS):
        assert isinstance(table, dict)
        assert all(isinstance(k, int) and isinstance(v, str) for k, v in table.items())
        assert len(set(table.values())) == len(table), "a name appears twice"


# ---- trace text back to codes --------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "isa", "code"),
    [
        (["HLT"], KvmIsa.VMX, 12),
        (["INVALID_STATE", "FAILED_VMENTRY"], KvmIsa.VMX, 0x80000021),
        (["0x63"], KvmIsa.VMX, 99),
        (["npf"], KvmIsa.SVM, 0x400),
        (["PF", "excp"], KvmIsa.SVM, 0x04E),
        (["hypercall"], KvmIsa.SVM, 0x081),
        (["idle-halt"], KvmIsa.SVM, 0x0A6),
        (["0xa7"], KvmIsa.SVM, 0x0A7),
    ],
)
def test_parse_trace_reason(words: list[str], isa: KvmIsa, code: int) -> None:
    assert parse_trace_reason(words, isa) == code
    if not words[0].startswith("0x"):
        assert isa_of_trace_name(words[0]) == isa or isa_of_trace_name(" ".join(words)) == isa


def test_parse_trace_reason_rejects_unknown_names() -> None:
    with pytest.raises(ValueError):
        parse_trace_reason(["NOT_A_REASON"], KvmIsa.VMX)
    with pytest.raises(ValueError):
        parse_trace_reason(["bogus", "excp"], KvmIsa.SVM)
    with pytest.raises(ValueError):
        parse_trace_reason([], KvmIsa.SVM)


def test_trace_names_round_trip() -> None:
    for code, name in VMX_EXIT_REASONS.items():
        assert parse_trace_reason(name.split(), KvmIsa.VMX) == code
    for code, name in SVM_TRACE_NAMES.items():
        assert parse_trace_reason(name.split(), KvmIsa.SVM) == code
