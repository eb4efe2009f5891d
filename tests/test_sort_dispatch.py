"""numpy's sort dispatch on AMD Zen 4 (pmi_pipeline.sort_dispatch): its AVX-512 sort took 55 ns an element there
and its AVX2 sort 11 ns, and counts took twice as long (docs/performance.md, eighteenth pass)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask
import pytest

from pmi_pipeline import sort_dispatch
from pmi_pipeline.dask_cluster import dask_client, warn_if_workers_sort_slowly
from pmi_pipeline.sort_dispatch import (
    AVX512_FEATURES,
    CPUINFO,
    VARIABLE,
    numpy_sorts_slowly,
    slow_avx512_sort,
    sort_environ,
)

#: The first processor of /proc/cpuinfo on the eighteenth pass's VM (2 cores of an AMD EPYC, Zen 4).
ZEN4 = """\
processor	: 0
vendor_id	: AuthenticAMD
cpu family	: 25
model		: 17
model name	: AMD EPYC
stepping	: 1
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid \
tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx \
f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext cpuid_fault \
vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt \
clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat avx512vbmi \
umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
bogomips	: 5192.29

processor	: 1
vendor_id	: AuthenticAMD
cpu family	: 25
"""
#: Zen 3 is the same family without AVX-512.
ZEN3 = "\n".join(
    " ".join(w for w in line.split(" ") if not w.startswith("avx512")) if line.startswith("flags") else line
    for line in ZEN4.splitlines()
)
ZEN5 = ZEN4.replace("cpu family	: 25", "cpu family	: 26")
INTEL = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family	: 25", "cpu family	: 6")


def _host_is_zen4() -> bool:
    try:
        return slow_avx512_sort(CPUINFO.read_text())
    except OSError:
        return False


@pytest.mark.parametrize(
    ("cpuinfo", "slow"),
    [(ZEN4, True), (ZEN3, False), (ZEN5, False), (INTEL, False), ("", False), ("cpu family : x\n", False)],
    ids=["zen4", "zen3", "zen5", "intel", "empty", "garbled"],
)
def test_only_zen4_sorts_slowly(cpuinfo, slow):
    assert "avx512f" not in ZEN3  # the Zen 3 text really lacks AVX-512
    assert slow_avx512_sort(cpuinfo) is slow


@pytest.fixture()
def zen4_cpuinfo(tmp_path) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    return path


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, {VARIABLE: AVX512_FEATURES}), ({VARIABLE: "AVX512_SPR"}, {}), ({VARIABLE: ""}, {})],
    ids=["unset", "set-by-user", "empty-keeps-avx512"],
)
def test_sort_environ_leaves_a_users_setting_alone(zen4_cpuinfo, environ, expected):
    assert sort_environ(environ, zen4_cpuinfo) == expected


def test_sort_environ_is_empty_where_there_is_no_cpuinfo(tmp_path):
    assert sort_environ({}, tmp_path / "missing") == {}


def _fresh_python(code: str, env: dict[str, str] | None = None, *flags: str) -> Any:
    """What ``code`` prints last, as JSON, run in a fresh interpreter whose environment has ``env`` and no
    setting of numpy's dispatch beyond it."""
    base = {k: v for k, v in os.environ.items() if k != VARIABLE}
    out = subprocess.run(
        [sys.executable, *flags, "-c", code], env={**base, **(env or {})}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def _numpy_features(env: dict[str, str]) -> dict[str, bool]:
    """numpy's dispatched x86 features in a fresh interpreter with ``env``; an ImportWarning (a feature name
    this numpy does not know) fails it."""
    code = (
        "import json; from numpy._core._multiarray_umath import __cpu_features__ as f, __cpu_dispatch__ as d; "
        "print(json.dumps({k: bool(f.get(k)) for k in d}))"
    )
    return _fresh_python(code, env, "-W", "error::ImportWarning")


def test_the_setting_leaves_numpy_only_its_avx2_kernels(zen4_cpuinfo):
    """Every name is one this numpy dispatches (no ImportWarning), and every AVX-512 kernel is off: on any x86
    host, Zen 4 or not."""
    environ = sort_environ({}, zen4_cpuinfo)
    dispatched = _numpy_features({})
    if "X86_V4" not in dispatched:
        pytest.skip(f"numpy here dispatches no AVX-512 kernels: {sorted(dispatched)}")
    assert set(AVX512_FEATURES.split()) <= set(dispatched)
    features = _numpy_features(environ)
    assert not any(on for name, on in features.items() if name != "X86_V3")


def test_use_fast_sort_sets_it_before_numpy_is_imported():
    code = (
        "import json, os, sys; from pmi_pipeline.sort_dispatch import use_fast_sort, numpy_sorts_slowly; "
        "done = use_fast_sort(); import numpy; "
        "print(json.dumps([done, os.environ.get('NPY_DISABLE_CPU_FEATURES'), numpy_sorts_slowly()]))"
    )
    done, value, slow = _fresh_python(code)
    assert done is _host_is_zen4()
    assert value == (AVX512_FEATURES if done else None)
    assert slow is False


def test_use_fast_sort_does_nothing_once_numpy_is_imported(monkeypatch, zen4_cpuinfo):
    import numpy  # noqa: F401

    monkeypatch.setattr(sort_dispatch, "CPUINFO", zen4_cpuinfo)
    monkeypatch.delenv(VARIABLE, raising=False)
    assert sort_dispatch.use_fast_sort() is False
    assert VARIABLE not in os.environ


def test_local_cluster_workers_get_the_setting_on_zen4(monkeypatch, zen4_cpuinfo):
    """Our LocalCluster's workers start with the setting where this process's CPU is Zen 4 (here a Zen 4
    /proc/cpuinfo stands in for the host's), and without it elsewhere."""
    monkeypatch.delenv(VARIABLE, raising=False)
    monkeypatch.setattr(sort_dispatch, "CPUINFO", zen4_cpuinfo)
    with dask_client(n_workers=1) as client:
        assert set(client.run(os.environ.get, VARIABLE).values()) == {AVX512_FEATURES}
    monkeypatch.delenv(VARIABLE, raising=False)  # Dask's nanny leaves what it gave its workers in os.environ
    monkeypatch.setattr(sort_dispatch, "CPUINFO", zen4_cpuinfo.with_name("missing"))
    # Not what a cluster open beside this one (the session's) put in Dask's config for its own workers.
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{VARIABLE}": None}), dask_client(n_workers=1) as client:
        assert set(client.run(os.environ.get, VARIABLE).values()) == {None}


def test_our_local_cluster_workers_do_not_sort_slowly(dask_clients, caplog):
    for client in dask_clients.values():
        assert set(client.run(numpy_sorts_slowly).values()) == {False}
        with caplog.at_level(logging.WARNING):
            assert warn_if_workers_sort_slowly(client) == []
    assert "AVX-512" not in caplog.text


@pytest.mark.skipif(not _host_is_zen4(), reason="only a Zen 4 host has workers that sort slowly")
def test_workers_started_with_avx512_are_named_in_a_warning(monkeypatch, caplog):
    """Workers started as ``dask worker`` may be, without the setting: the warning says what to set."""
    monkeypatch.setenv(VARIABLE, "")  # numpy's default dispatch, as a worker started by hand has
    with dask_client(n_workers=1) as client:
        with caplog.at_level(logging.WARNING):
            slow = warn_if_workers_sort_slowly(client)
        assert slow == list(client.scheduler_info()["workers"])
    assert f"{VARIABLE}={AVX512_FEATURES!r}" in caplog.text


@pytest.mark.skipif(not _host_is_zen4(), reason="only on a Zen 4 host does numpy sort slowly")
def test_a_count_in_a_process_that_sorts_slowly_warns(eurlex_dir):
    """A library user's process that imported numpy with its AVX-512 sort, on Zen 4, is told once."""
    code = (
        "import logging, sys; logging.basicConfig(); from pmi_pipeline.cooccurrence import count_shards; "
        "from pmi_pipeline.shards import discover_shards; paths = discover_shards([sys.argv[1]]); "
        "count_shards(paths, None); count_shards(paths, None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(eurlex_dir)],
        env={**os.environ, VARIABLE: ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr.count("numpy sorts with its AVX-512 kernel on this AMD Zen 4 CPU") == 1


def test_the_command_sets_it_before_numpy_is_imported():
    """``pmi-pipeline`` counts in its own process with ``--no-dask``, and its LocalCluster's workers inherit its
    environment."""
    code = (
        "import json, os, sys; from pmi_pipeline.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(json.dumps([os.environ.get('NPY_DISABLE_CPU_FEATURES'), 'numpy' in sys.modules]))"
    )
    value, numpy_imported = _fresh_python(code)
    assert value == (AVX512_FEATURES if _host_is_zen4() else None)
    assert numpy_imported  # main() imported it, after the setting
