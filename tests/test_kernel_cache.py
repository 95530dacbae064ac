"""The on-disk cache of arch-specific cubins (quick_lab.build.loader.cached_cubin): a second process
loads instead of compiling; a source change, another arch or another name compiles anew; concurrent
compiles of one kernel are safe. NVRTC only: no GPU needed."""
from __future__ import annotations

import multiprocessing
import shutil

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from quick_lab.build import loader, nvrtc, paths, sources  # noqa: E402

KERNEL = ("dequant.cu", "dequantize_awq", "sm_90")  # small and quick to build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path / "cache"))
    try:
        nvrtc.nvrtc_version()
    except nvrtc.NvrtcError as exc:
        pytest.skip(str(exc))
    return tmp_path / "cache"


def test_cache_dir_is_the_override_or_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.CACHE_DIR_ENV, str(tmp_path))
    assert paths.cache_dir() == tmp_path
    monkeypatch.delenv(paths.CACHE_DIR_ENV)
    assert paths.cache_dir().name == "quick_lab" and paths.cache_dir().is_absolute()


def _compiles(monkeypatch) -> list:
    calls = []
    real = nvrtc.compile_cubin

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(nvrtc, "compile_cubin", counting)
    return calls


def test_second_lookup_loads_the_file_without_compiling(cache, monkeypatch):
    calls = _compiles(monkeypatch)
    name, path = loader.cached_cubin(*KERNEL)
    assert len(calls) == 1 and path.parent == cache / "cubins" and path.stat().st_size > 0
    assert name == "dequantize_awq"  # extern "C": the lowered name is the name
    again = loader.cached_cubin(*KERNEL)
    assert again == (name, path) and len(calls) == 1
    assert sorted(p.suffix for p in path.parent.iterdir()) == [".cubin", ".json"]  # no temporary left


def test_source_arch_or_name_change_compiles_anew(cache, monkeypatch, tmp_path):
    calls = _compiles(monkeypatch)
    _, first = loader.cached_cubin(*KERNEL)
    _, other_arch = loader.cached_cubin("dequant.cu", "dequantize_awq", "sm_80")
    _, other_name = loader.cached_cubin("dequant.cu", "dequantize_quick_t", "sm_90")
    assert len({first, other_arch, other_name}) == 3 and len(calls) == 3
    edited = tmp_path / "kernels"
    shutil.copytree(paths.KERNEL_DIR, edited)
    (edited / "dequant.cu").write_text((edited / "dequant.cu").read_text() + "\n// edited\n")
    monkeypatch.setattr(sources, "KERNEL_DIR", edited)
    _, after_edit = loader.cached_cubin(*KERNEL)
    assert after_edit != first and len(calls) == 4


def test_a_half_written_entry_is_rebuilt(cache):
    name, path = loader.cached_cubin(*KERNEL)
    path.unlink()  # e.g. a process killed between the two renames
    assert loader.cached_cubin(*KERNEL) == (name, path) and path.is_file()


def _build(cache_dir: str, queue) -> None:
    import os

    os.environ[paths.CACHE_DIR_ENV] = cache_dir
    name, path = loader.cached_cubin(*KERNEL)
    queue.put((name, str(path), path.read_bytes()))


def test_concurrent_compiles_of_one_kernel_agree(cache):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build, args=(str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert sorted(p.suffix for p in (cache / "cubins").iterdir()) == [".cubin", ".json"]
