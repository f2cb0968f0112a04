"""Ahead-of-time compile check of the Triton kernels for a GPU, on a machine without one.

Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_kernels.py) runs kernels as Python, so
it accepts code the compiler rejects (a ``break``, say) and says nothing of registers or spills.
Here every launch configuration a kernel module declares in its module-level ``AOT_SPECS`` is
compiled to PTX and a cubin for a target (default: an H100, sm_90) with ``triton.compile``, and
ptxas' own report gives registers and spills. That needs no GPU and no driver: given a target,
``triton.compile`` never asks the driver, and the Triton wheel ships ptxas (no
``TRITON_PTXAS_PATH`` needed). It does need ``TRITON_INTERPRET`` unset (or 0) when triton is
imported, since under the interpreter ``@triton.jit`` returns an interpreter wrapper instead.

    python -m magicpig.kernels.aot [--json]     (exit status 1 when a kernel fails the check)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import pkgutil
import re
import sys
from dataclasses import dataclass
from typing import Any, Optional

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

H100 = GPUTarget("cuda", 90, 32)
MAX_REGISTERS = 255  # per thread, on every NVIDIA GPU since sm_35


@dataclass(frozen=True)
class AotSpec:
    """One launch configuration of a kernel, as a launch would compile it on the device.

    signature: type of every runtime argument ("*fp32", "*bf16", "*i32", "i32", ...);
    constexprs: value of every ``tl.constexpr`` argument. Together they name every argument.
    """

    fn: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]

    @property
    def label(self) -> str:
        """e.g. ``_simhash_kernel(x_ptr=*bf16, K=10, BLOCK_D=128)``: pointers and constexprs."""
        parts = [f"{k}={v}" for k, v in self.signature.items() if v.startswith("*")]
        parts += [f"{k}={v}" for k, v in self.constexprs.items()]
        return f"{self.fn.__name__}({', '.join(parts)})"

    def source(self) -> ASTSource:
        """The ASTSource Triton 3.9 compiles: the signature names every argument, the
        constexpr ones typed "constexpr", and their values go in ``constexprs`` by name."""
        missing = set(self.fn.arg_names) - set(self.signature) - set(self.constexprs)
        extra = (set(self.signature) | set(self.constexprs)) - set(self.fn.arg_names)
        if missing or extra:  # else Triton fails later with an IndexError or a bad IR
            raise ValueError(f"{self.label}: arguments missing {sorted(missing)}, unknown {sorted(extra)}")
        signature = {name: self.signature.get(name, "constexpr") for name in self.fn.arg_names}
        return ASTSource(self.fn, signature, dict(self.constexprs))


@dataclass(frozen=True)
class AotReport:
    """What compiling one spec gave; ``error`` is set (and the rest empty) when it failed.

    registers and spill bytes per thread come from ptxas' -v report: Triton's own ``n_regs`` and
    ``n_spills`` are only filled in when a GPU loads the cubin. shared: bytes per program.
    """

    label: str
    name: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    shared: int = 0
    ptx_target: str = ""
    has_ptx: bool = False
    has_cubin: bool = False
    error: Optional[str] = None

    def problems(self) -> list[str]:
        """Why this kernel would fail or run badly on the device; empty when it is fine."""
        if self.error is not None:
            return [f"does not compile: {self.error}"]
        out = [] if self.has_ptx and self.has_cubin else ["no PTX or no cubin"]
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stored, {self.spill_loads} B loaded per thread")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        return out


def compile_spec(spec: AotSpec, target: GPUTarget = H100) -> AotReport:
    """Compile one spec for ``target``; raises what Triton raises when the compiler rejects it."""
    log = io.StringIO()
    # ptxas runs (and prints its -v report) only on a compile, so skip Triton's cache hits.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(spec.source(), target=target)
    ptxas = log.getvalue()
    used = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    if used is None or spills is None:
        raise RuntimeError(f"{spec.label}: no register or spill counts in ptxas' report:\n{ptxas}")
    ptx = compiled.asm.get("ptx", "")
    target_line = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    return AotReport(
        label=spec.label, name=compiled.name, registers=int(used.group(1)),
        stack_frame=int(spills.group(1)), spill_stores=int(spills.group(2)), spill_loads=int(spills.group(3)),
        shared=int(compiled.metadata.shared), ptx_target=target_line.group(1) if target_line else "",
        has_ptx=bool(ptx), has_cubin=bool(compiled.asm.get("cubin")),
    )


def _modules(package: str) -> list[Any]:
    """The package and every module under it, imported."""
    pkg = importlib.import_module(package)
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=package + ".")]
    return [pkg] + [importlib.import_module(name) for name in names]


def declared_specs(package: str = "magicpig.kernels") -> list[AotSpec]:
    """Every AotSpec in the ``AOT_SPECS`` of the package's modules."""
    return [spec for module in _modules(package) for spec in getattr(module, "AOT_SPECS", ())]


def kernels_without_spec(package: str = "magicpig.kernels") -> list[str]:
    """``module.name`` of every @triton.jit function defined in the package that no AOT_SPECS
    entry compiles: the check cannot vouch for it, so a new kernel must come with a spec."""
    if knobs.runtime.interpret:  # @triton.jit made interpreter wrappers: nothing to find or compile
        raise RuntimeError("TRITON_INTERPRET is set: the AOT check needs triton imported without it")
    covered = {id(spec.fn) for spec in declared_specs(package)}
    return [
        f"{module.__name__}.{name}"
        for module in _modules(package) for name, obj in vars(module).items()
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__ and id(obj) not in covered
    ]


def compile_all(package: str = "magicpig.kernels", target: GPUTarget = H100) -> list[AotReport]:
    """Compile every declared spec; a rejected one gives a report with ``error`` set, so that one
    bad kernel does not hide the others' numbers."""
    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: the AOT check needs triton imported without it")
    reports = []
    for spec in declared_specs(package):
        try:
            reports.append(compile_spec(spec, target))
        except Exception as err:  # noqa: BLE001 - any compiler failure is the finding to report
            reports.append(AotReport(label=spec.label, error=f"{type(err).__name__}: {err}"))
    return reports


def main(argv: list[str]) -> int:
    """Print one line per spec (or JSON with --json); 1 when any kernel has a problem or no spec."""
    missing = kernels_without_spec()
    reports = compile_all()
    if "--json" in argv:
        print(json.dumps({"reports": [dataclasses.asdict(r) for r in reports], "missing": missing}))
    else:
        for r in reports:
            print(f"{r.label}: {r.registers} regs, spills {r.spill_stores}/{r.spill_loads} B, "
                  f"shared {r.shared} B, {r.ptx_target}" if r.error is None else f"{r.label}: {r.error}")
        for name in missing:
            print(f"{name}: no AOT spec")
    return int(bool(missing) or any(r.problems() for r in reports))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
