"""The compiled engine as an artifact on disk (model/aot.py): built once, found again, checked on load.

One real AOTInductor build per test run (tens of seconds on 2 cores), shared by the module: every other
test copies or damages that artifact, or points a real server at it.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from model import aot
from model.engine import Engine, onednn_linears
from model.fuse import fuse
from model.loader import random_model
from tests.conftest import ROOT, photo
from tests.helpers import random_levit
from tests.stress.procs import ServerProcess

VARIANT = "LeViT_128S"


def served_model() -> torch.nn.Module:
    """What a server with LEVIT_WEIGHTS=random builds: the seeded random model, fused."""
    return fuse(random_model(VARIANT))


@pytest.fixture(scope="module")
def store(engine_store: Path) -> Path:
    return engine_store  # tests/conftest.py built it: the suite's one real compilation


@pytest.fixture(scope="module")
def built(store: Path) -> Engine:
    engine = Engine(served_model(), "aot", 16, linears="onednn", artifact_dirs=[store])
    assert engine.kind == "aot" and engine.artifact is not None
    return engine


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_artifact_matches_eager_at_every_batch_size(built: Engine) -> None:
    reference = served_model()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = reference(x)
    for n in (1, 2, 3, 5, 8, 16):  # one artifact per bucket; 3 and 5 are padded to 4 and 8
        assert _rel_err(built(x[:n]), expected[:n]) <= 1e-5, n
    assert built.buckets == (1, 2, 4, 8, 16) and built.padded_size(5) == 8


def test_a_fresh_folder_gets_a_build_then_serves_it(built: Engine, store: Path) -> None:
    """The session fixture's build: one folder per bucket with its package and key, nothing half-written."""
    keys = built.artifact.keys
    assert sorted(keys) == [1, 2, 4, 8, 16] and {k.batch for k in keys.values()} == set(keys)
    assert sorted(p.name for p in store.iterdir() if not p.name.startswith(".")) == sorted(
        k.digest for k in keys.values()
    )
    for key in keys.values():
        assert sorted(p.name for p in (store / key.digest).iterdir()) == [aot.KERNELS, aot.META, aot.LIBRARY]
        assert json.loads((store / key.digest / aot.META).read_text())["build_s"] > 0


def test_second_start_loads_the_artifact_instead_of_compiling(built: Engine, store: Path) -> None:
    again = Engine(served_model(), "aot", 16, linears="onednn", artifact_dirs=[store])
    assert again.artifact is not None and again.artifact.origin == "cache"
    assert again.artifact.folder == built.artifact.folder and again.artifact.keys == built.artifact.keys
    assert again.artifact.isa == aot.native_isa()
    meta = json.loads((store / again.artifact.keys[16].digest / aot.META).read_text())
    assert meta["key"]["weights"] == aot.weights_digest(onednn_linears(served_model()))
    x = torch.randn(4, 3, 224, 224)
    torch.testing.assert_close(again(x), built(x), rtol=0, atol=0)


def test_kernels_are_parallel_over_whatever_team_runs_them(built: Engine) -> None:
    """Inductor writes `omp parallel num_threads(N)` with the compiling process's N unless told the team is
    dynamic. The buckets compile in one-thread pool workers, so format 1's kernels were all serial: 0.84x the
    in-process engine at batch 16 on 2 threads. Every parallel region must take the serving team instead."""
    source = (built.artifact.folder / built.artifact.keys[16].digest / aot.KERNELS).read_text()
    pragmas = [line.strip() for line in source.splitlines() if line.strip().startswith("#pragma omp parallel")]
    assert len(pragmas) >= 10, "the batch-16 kernels should have parallel regions"
    assert set(pragmas) == {"#pragma omp parallel"}, sorted(set(pragmas))
    assert built.artifact.keys[16].kernel_threads.startswith("dynamic")


def test_loading_maps_the_library_in_place_and_writes_nothing(
    built: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's `.pt2` loader unpacked each package into $TMPDIR: in the hardened container a 64 MiB tmpfs,
    which two buckets filled (the engine fell back to a slower one), and a model process stopped by a
    signal left its copies there. The library is now mapped from the artifact folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    key = built.artifact.keys[4]
    runner = aot.load(built.artifact.folder / key.digest, key, onednn_linears(served_model()))
    assert list(tmp_path.iterdir()) == []
    x = torch.randn(4, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), built(x), rtol=0, atol=0)  # runs from the mapped library


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86's ISA table (other CPUs ask Inductor)")
def test_isa_table_is_inductors_without_importing_it() -> None:
    """model.aot reads the CPU's ISAs without importing Inductor (0.9 s and 68 MB per model process): its table
    and probes must say what Inductor's would, or artifacts this CPU runs would be passed over."""
    probe = "import sys; from model import aot; print(aot.cpu_isas()); print('torch._inductor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    isas, imported = out.stdout.splitlines()
    assert imported == "False"
    from torch._inductor import cpu_vec_isa

    features = {"avx2", "avx512", "avx512_vnni", "amx_tile"}
    inductors = [str(i) for i in cpu_vec_isa.supported_vec_isa_list if set(str(i).split()) <= features]
    assert list(aot.X86_ISAS) == inductors
    assert aot.x86_features() == set(cpu_vec_isa.x86_isa_checker())
    assert isas == repr([i for i in inductors if set(i.split()) <= set(cpu_vec_isa.x86_isa_checker())])


def test_an_engine_on_artifacts_keeps_no_eager_copy(built: Engine) -> None:
    """The artifacts hold the weights; the eager models the engine was built from would only take memory."""
    assert built.model is None and built._plain is None
    assert built.linears == "onednn" and built(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


BUCKETS = (1, 2, 4, 8, 16)


def _loaded(store: Path) -> dict[int, aot.Library]:
    """Every bucket of the suite's artifact, loaded afresh: each library with its own copy of the weights."""
    found = aot.find(onednn_linears(served_model()), torch.float32, "onednn", [store], BUCKETS)
    assert found is not None and sorted(found[0]) == list(BUCKETS)
    return found[0]  # type: ignore[return-value]


def _inputs() -> dict[int, torch.Tensor]:
    return {b: torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b)) for b in BUCKETS}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.inference_mode()
def test_buckets_run_on_one_copy_of_the_weights(store: Path) -> None:
    """Each bucket's library copies the frozen weights into memory at load (31 MB apiece here). Shared, every
    bucket runs on the smallest one's: the same outputs to the bit, and a change to those weights reaches all."""
    x = _inputs()
    own, shared = _loaded(store), _loaded(store)
    constants = shared[1].constants()
    plain = {k: t for k, t in constants.items() if not t.is_mkldnn}  # oneDNN's opaque ones may be blocked per batch
    saved = aot.share_constants(shared)
    assert (len(BUCKETS) - 1) * _nbytes(plain) <= saved <= (len(BUCKETS) - 1) * _nbytes(constants)
    for b in BUCKETS:
        assert torch.equal(shared[b](x[b]), own[b](x[b])), b
    for tensor in shared[1].constants().values():
        if not tensor.is_mkldnn:
            tensor.zero_()
    for b in BUCKETS:
        assert not torch.equal(shared[b](x[b]), own[b](x[b])), b  # every bucket reads the smallest one's


@torch.inference_mode()
def test_a_bucket_keeps_its_own_weights_where_they_differ_or_would_change_its_answers(
    store: Path, caplog: pytest.LogCaptureFixture
) -> None:
    x = _inputs()
    libraries = _loaded(store)
    owner, theirs = libraries[1], libraries[1].constants()
    expected = {b: libraries[b](x[b]) for b in (4, 8)}
    # a constant of another shape (AOTInductor folds some to the batch size with MKL linears): copied, not shared
    name = next(k for k, t in theirs.items() if not t.is_mkldnn and t.numel() > 1)
    saved = libraries[4].share(owner, {**theirs, name: torch.zeros(1)})
    assert 0 < saved <= _nbytes(theirs) - theirs[name].numel() * theirs[name].element_size()
    assert torch.equal(libraries[4](x[4]), expected[4])
    # the same shapes with other values: the probe's answer changes, so the bucket goes back to its own
    wrong = {k: t if t.is_mkldnn else torch.zeros_like(t) for k, t in theirs.items()}
    assert libraries[8].share(owner, wrong) == 0
    assert "keeps its own copy" in caplog.text
    assert torch.equal(libraries[8](x[8]), expected[8])


def test_picking_linears_loads_one_bucket_of_the_slower_set(built: Engine, tmp_path: Path) -> None:
    """With both sets of linears on disk, `auto` times one bucket of each. AOTInductor never unmaps a library,
    so loading every bucket of both kept the slower set's libraries mapped for the process's life (155 MB)."""
    for batch in (1, 2):
        digest = built.artifact.keys[batch].digest
        shutil.copytree(built.artifact.folder / digest, tmp_path / digest)
    mkl = Engine(served_model(), "aot", 2, linears="mkl", artifact_dirs=[tmp_path])  # compiles two buckets
    assert mkl.artifact is not None and mkl.artifact.origin == "built"
    largest = {"onednn": built.artifact.keys[2].digest, "mkl": mkl.artifact.keys[2].digest}
    script = (
        "import json, sys; from pathlib import Path; from model.engine import Engine;"
        "from tests.test_aot import served_model;"
        "e = Engine(served_model(), 'aot', 2, linears='auto', artifact_dirs=[Path(sys.argv[1])]);"
        "maps = open('/proc/self/maps').read().splitlines();"
        "print(json.dumps([e.linears, sorted(e.linear_ms), [k.digest for k in e.artifact.keys.values()],"
        " sorted({line.split()[-1].split('/')[-2] for line in maps if line.endswith('model.so')})]))"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    chosen, timed, digests, mapped = json.loads(out.stdout.splitlines()[-1])
    assert timed == ["mkl", "onednn"] and chosen in timed
    slower = "mkl" if chosen == "onednn" else "onednn"
    assert sorted(mapped) == sorted([*digests, largest[slower]])  # the chosen set, and the one bucket timed


def test_kernels_are_compiled_for_their_isa_not_for_the_build_machine(built: Engine) -> None:
    """Inductor's default -march=native let an `avx2` artifact built on an AVX-512 machine hold AVX-512
    instructions (SIGILL where they are missing): the baseline is fixed, the ISA's own flags add the rest."""
    for key in built.artifact.keys.values():
        source = (built.artifact.folder / key.digest / aot.KERNELS).read_text()
        commands = [line for line in source.splitlines() if line.startswith("// g++")]
        assert commands and all(f"-march={aot.X86_MARCH}" in c and "-march=native" not in c for c in commands)


def test_a_damaged_artifact_is_rebuilt(built: Engine, tmp_path: Path) -> None:
    """Refused at load (checksum), then compiled again in its place: not refused at every start."""
    for batch in (1, 2):
        _copy(built, tmp_path, batch)
    damaged = tmp_path / built.artifact.keys[2].digest / aot.LIBRARY
    damaged.write_bytes(damaged.read_bytes()[:4096])
    engine = Engine(served_model(), "aot", 2, linears="onednn", artifact_dirs=[tmp_path])
    assert engine.artifact is not None and engine.artifact.origin == "cache+built"
    assert aot._intact(tmp_path / built.artifact.keys[2].digest, built.artifact.keys[2])
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(engine(x), built(x), rtol=1e-5, atol=1e-5)


def test_key_covers_weights_linears_isa_and_torch() -> None:
    model = served_model()
    base = aot.ArtifactKey.of(model, torch.float32, "onednn")
    assert aot.ArtifactKey.of(served_model(), torch.float32, "onednn") == base  # deterministic
    other_weights = aot.ArtifactKey.of(fuse(random_levit(VARIANT, seed=9)), torch.float32, "onednn")
    variants = [other_weights, replace(base, linears="mkl"), replace(base, isa="avx2"), replace(base, torch="9.9")]
    assert len({base.digest, *(k.digest for k in variants)}) == 5


def _copy(built: Engine, dest: Path, batch: int = 2) -> tuple[Path, aot.ArtifactKey]:
    """One bucket's artifact folder, copied: tests damage copies, never the suite's store."""
    key = built.artifact.keys[batch]
    dest.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copytree(built.artifact.folder / key.digest, dest / key.digest)), key


def test_foreign_weights_are_refused_by_key_and_by_numbers(built: Engine, tmp_path: Path) -> None:
    folder, key = _copy(built, tmp_path)
    other = onednn_linears(fuse(random_levit(VARIANT, seed=9)))
    other_key = aot.ArtifactKey.of(other, torch.float32, "onednn", batch=key.batch)
    with pytest.raises(aot.ArtifactError, match="key differs"):
        aot.load(folder, other_key, other)
    # a meta file rewritten to claim the other weights: the probe batch still tells
    meta = json.loads((folder / aot.META).read_text())
    meta["key"]["weights"] = other_key.weights
    (folder / aot.META).write_text(json.dumps(meta))
    with pytest.raises(aot.ArtifactError, match="differs from the eager model"):
        aot.load(folder, other_key, other)


def test_artifact_for_an_isa_this_cpu_lacks_is_refused(built: Engine, tmp_path: Path) -> None:
    folder, key = _copy(built, tmp_path)
    key = replace(key, isa="amx_fp99")
    meta = json.loads((folder / aot.META).read_text())
    meta["key"]["isa"] = "amx_fp99"
    (folder / aot.META).write_text(json.dumps(meta))
    with pytest.raises(aot.ArtifactError, match="which this CPU lacks"):
        aot.load(folder, key, onednn_linears(served_model()))


def test_damaged_artifact_is_refused_before_it_is_mapped(built: Engine, tmp_path: Path) -> None:
    """A truncated library would kill the process that maps it (SIGBUS): its checksum is checked first."""
    folder, key = _copy(built, tmp_path)
    library = folder / aot.LIBRARY
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 3])
    with pytest.raises(aot.ArtifactError, match="not the library that was built"):
        aot.load(folder, key, onednn_linears(served_model()))
    library.unlink()
    with pytest.raises(aot.ArtifactError, match="cannot read"):
        aot.load(folder, key, onednn_linears(served_model()))


def test_auto_without_compiler_or_artifact_falls_back_to_trace_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ to be found
    engine = Engine(served_model(), "auto", 4, linears="onednn", artifact_dirs=[tmp_path / "empty"])
    assert engine.kind == "trace" and engine.linears == "mkl" and engine.artifact is None
    assert "no C++ compiler" in (engine.fallback or "")
    x = torch.randn(2, 3, 224, 224)
    assert _rel_err(engine(x), served_model()(x)) <= 1e-4
    with pytest.raises(aot.ArtifactError):  # asked for explicitly: no silent fallback
        Engine(served_model(), "aot", 4, linears="onednn", artifact_dirs=[tmp_path / "empty"])


NO_COMPILER = """
import json, sys
from pathlib import Path
from model.engine import Engine
from model.fuse import fuse
from model.loader import random_model
from model import aot
assert not aot.can_compile()
dirs = [Path(p) for p in sys.argv[1:]]
engine = Engine(fuse(random_model("LeViT_128S")), "auto", 4, linears="onednn", artifact_dirs=dirs)
print(json.dumps({"kind": engine.kind, "artifact": engine.artifact and engine.artifact.describe(),
                  "fallback": engine.fallback}))
"""


def _without_compiler(tmp_path: Path, *dirs: Path) -> dict:
    """A fresh interpreter whose PATH has no C++ compiler, as in the runtime image (nothing cached from here)."""
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", NO_COMPILER, *map(str, dirs)],
        cwd=ROOT, env={**os.environ, "PATH": str(empty)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_found_artifact_needs_no_compiler(built: Engine, tmp_path: Path) -> None:
    """A runtime image has no compiler: it serves from the baked artifacts, the second folder of its path."""
    for batch in (1, 2, 4):
        _copy(built, tmp_path / "baked", batch)
    got = _without_compiler(tmp_path, tmp_path / "volume", tmp_path / "baked")
    assert got["kind"] == "aot" and got["fallback"] is None, got
    assert got["artifact"]["origin"] == "cache" and got["artifact"]["path"] == str(tmp_path / "baked")
    assert got["artifact"]["batch_sizes"] == [1, 2, 4]


def test_without_compiler_a_missing_bucket_means_trace_with_the_reason(built: Engine, tmp_path: Path) -> None:
    for batch in (1, 2):  # bucket 4 is missing and cannot be compiled here
        _copy(built, tmp_path / "baked", batch)
    got = _without_compiler(tmp_path, tmp_path / "baked")
    assert got["kind"] == "trace" and got["artifact"] is None
    assert "no C++ compiler" in got["fallback"]


def test_server_starts_on_the_cached_artifact_and_says_so(built: Engine, store: Path, tmp_path: Path) -> None:
    """`python -m service` in the process model, engine auto: /v1/model names the artifact it loaded.
    Stopped with SIGTERM (which ends model processes by signal), it leaves nothing in its temp dir."""
    server = ServerProcess(
        TMPDIR=str(tmp_path),
        LEVIT_ENGINE="auto",
        LEVIT_LINEARS="onednn",
        LEVIT_ENGINE_PATH=str(store),
        LEVIT_INSTANCES="1",
        LEVIT_THREADS="1",
        LEVIT_WORKERS="1",
        LEVIT_LOG_LEVEL="INFO",
    )
    try:
        model = httpx.get(server.url + "/v1/model").json()
        assert model["engine"] == "aot", model
        assert model["engine_artifact"]["origin"] == "cache"
        assert model["engine_artifact"]["path"] == str(built.artifact.folder)
        assert model["engine_artifact"]["batch_sizes"] == [1, 2, 4, 8, 16]
        assert model["engine_fallback"] == ""
        response = httpx.post(server.url + "/classify", files={"img": ("cat.jpg", photo("cat.jpg"))}, timeout=60)
        assert response.status_code == 200, response.text
    finally:
        status = server.stop()
    assert status == 0
    assert "engine=aot (cache artifacts in" in server.logs()
    assert list(tmp_path.iterdir()) == []
