"""numpy's integer sort on AMD Zen 4: its AVX-512 kernel is 4-5x slower there than its AVX2 one.

Counting pairs is mostly ``np.sort`` of int64 keys (:mod:`pmi_pipeline.cooccurrence`). numpy sorts them with
x86-simd-sort, and on a CPU with AVX-512 it takes the AVX-512 kernel. That kernel's partition step stores with
``vpcompressq`` to memory, which Zen 4 (AMD family 0x19) runs in microcode: numpy sorted 2 million int64 in 55 ns
an element there with it, and in 11 ns with its AVX2 kernel (docs/performance.md, eighteenth pass). Many cloud VMs
run on Zen 4 (AWS m7a, for one, and the VM of the eighteenth pass). OpenJDK turned its own AVX-512 sort off on
family 0x19 alone, for the same reason (openjdk/jdk#24053); x86-simd-sort's issue is numpy/x86-simd-sort#6.

numpy reads its dispatch once, at import, from ``NPY_DISABLE_CPU_FEATURES``. So the setting goes into the
environment of the processes that count before they import numpy: the Dask workers our LocalCluster starts
(:mod:`pmi_pipeline.dask_cluster`), and the ``pmi-pipeline`` command's own process (:func:`use_fast_sort`). A
value a user set is left alone; an empty one keeps every kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
#: AMD's family of Zen 3 and Zen 4; of the two, only Zen 4 has AVX-512.
ZEN4_FAMILY = 0x19
#: What numpy 2.4 dispatches beyond AVX2 on x86-64: with these off, it takes its AVX2 kernels (``X86_V3``).
AVX512_FEATURES = "X86_V4 AVX512_ICL AVX512_SPR"
VARIABLE = "NPY_DISABLE_CPU_FEATURES"


def slow_avx512_sort(cpuinfo: str) -> bool:
    """Whether the CPU described by ``cpuinfo`` (the text of /proc/cpuinfo) is one whose AVX-512 compress-store
    is microcoded: AMD, family 0x19, with AVX-512."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor describes them all
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    try:
        family = int(fields.get("cpu family", ""))
    except ValueError:
        return False
    flags = fields.get("flags", "").split()
    return fields.get("vendor_id") == "AuthenticAMD" and family == ZEN4_FAMILY and "avx512f" in flags


def _read_cpuinfo(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # not Linux, or not readable: leave numpy as it is
        return ""


def sort_environ(environ: Mapping[str, str] | None = None, cpuinfo: Path | None = None) -> dict[str, str]:
    """The environment a process that counts should start with: ``{NPY_DISABLE_CPU_FEATURES: ...}`` on Zen 4,
    unless ``environ`` (default ``os.environ``) sets it already; else nothing."""
    environ = os.environ if environ is None else environ
    if VARIABLE in environ or not slow_avx512_sort(_read_cpuinfo(cpuinfo or CPUINFO)):
        return {}
    return {VARIABLE: AVX512_FEATURES}


def use_fast_sort() -> bool:
    """Set :func:`sort_environ` in this process's environment, if numpy is not imported yet (numpy reads it once,
    at import): for this process and every process it starts. Whether it was set."""
    if "numpy" in sys.modules:
        return False
    environ = sort_environ()
    os.environ.update(environ)
    return bool(environ)


def numpy_sorts_slowly() -> bool:
    """Whether this process's numpy sorts with its AVX-512 kernel on a Zen 4 CPU: imported without
    :func:`sort_environ`."""
    from numpy._core._multiarray_umath import __cpu_features__

    return bool(__cpu_features__.get("X86_V4")) and slow_avx512_sort(_read_cpuinfo(CPUINFO))


@functools.cache
def warn_if_sorting_slowly() -> bool:
    """Log a warning, once per process, if :func:`numpy_sorts_slowly`: a library user's process that imported
    numpy before the setting could be made is told what to set. Returns whether numpy sorts slowly here."""
    slow = numpy_sorts_slowly()
    if slow:
        log.warning(
            "numpy sorts with its AVX-512 kernel on this AMD Zen 4 CPU, which counts pairs about half as fast as its "
            "AVX2 kernel: start the process with %s=%r in its environment, or call "
            "pmi_pipeline.sort_dispatch.use_fast_sort() before numpy is imported",
            VARIABLE,
            AVX512_FEATURES,
        )
    return slow
