"""The compiled engine, built once and loaded in milliseconds: AOTInductor shared libraries on disk.

Compiling the model in every process at every start (`torch.compile`, five batch buckets) kept a new
server from serving for about two minutes on 2 cores, and a container without a C++ compiler could not
compile at all. Instead `torch.export` captures the fused model at each batch bucket and AOTInductor
compiles each into a shared library that loads in milliseconds without a compiler.
The buckets are static shapes, as in the in-process engine: one package with a dynamic batch dimension
was measured 0.74x as fast at batch 16 (Inductor specialises loops and MKL's weight packing on the
shape; docs/benchmarks.md). The buckets are compiled in parallel processes, one per core.

An artifact is only as good as its key. Its file name is the digest of everything that changes the
generated code or the numbers it returns: torch version, the CPU instruction set it was compiled for,
batch size, dtype, linear-layer library, the model package's source, and the weights themselves (their bytes, so
a changed checkpoint can never reuse an old artifact). On load the key is checked again, the ISA must
be one this CPU runs, and the artifact's output on a probe batch must match the eager model: a stale,
foreign or damaged artifact is rebuilt, or refused with a logged reason, never served.

The library is kept unpacked (format 3) and mapped where it lies. torch's `.pt2` loader unpacks its
package into $TMPDIR at every load: in the hardened container /tmp is a 64 MiB tmpfs, which two of the
five 33 MB buckets filled, so the server fell back to a slower engine (docker/compose.yaml, the Helm
chart); a model process stopped by a signal also left its copies there; and every process held private
copies where processes mapping one file share its pages. A library is checked against the SHA-256
recorded at build before it is mapped: a truncated library kills the process that maps it (SIGBUS).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from model.configs import IMAGE_SIZE

log = logging.getLogger(__name__)
FORMAT = 4  # bump when the artifact layout or the export recipe changes (2: kernels parallel for any team;
# 3: the library unpacked, mapped in place; 4: compiled for its ISA, not for the build machine)
# Inductor writes `#pragma omp parallel num_threads(N)` into every kernel, N being the compiling process's
# thread count, unless told the team is dynamic. Built in a one-thread pool worker, format 1's kernels were
# all serial (0.84x the in-process engine at batch 16 on 2 threads). Dynamic kernels take the serving
# process's team, whatever LEVIT_THREADS or the container's CPU limit makes it; the hint only decides how
# many loop levels are split (enough for teams up to 8), and measured the same as kernels compiled for
# exactly 2 threads (docs/benchmarks.md).
KERNEL_THREADS_HINT = 8
# Inductor compiles with -march=native plus the ISA's own flags: an `avx2` artifact built on an AVX-512 machine
# then holds AVX-512 instructions, and kills (SIGILL) the process that loads it on a CPU without them. On x86 the
# baseline is a level every AVX2 CPU has, so the key's ISA is all the code needs.
X86_MARCH = "x86-64-v2"
INDUCTOR_CONFIGS = {"freezing": True, "cpp.dynamic_threads": True, "cpp.threads": KERNEL_THREADS_HINT}
# Artifact vs eager on the probe batch, relative to the largest logit. bfloat16 keeps 8 significant bits, and the
# compiled and eager forms round in different places (6.4e-3 apart on LeViT_128S; the deeper variants are
# unmeasured); a damaged artifact is off by its whole output. Only these dtypes are compiled for CPU.
PROBE_RTOL = {"float32": 1e-4, "bfloat16": 2.5e-2}  # bfloat16: measured on LeViT_128S
_CODE_FILES = ("levit.py", "fuse.py", "configs.py")  # what defines the exported graph, with OneDnnLinear
PACKAGE = "model.pt2"  # what AOTInductor writes; unpacked into the two below, then deleted
LIBRARY = "model.so"
KERNELS = "kernel.cpp"  # the generated kernels, for reading (what a bucket runs)
META = "meta.json"


class ArtifactError(RuntimeError):
    """An artifact that cannot be used here; the message says why in one line."""


# Inductor's x86 vector ISAs (`cpu_vec_isa.supported_vec_isa_list`), best first; each name lists the CPU
# features it needs. Kept here so that finding and loading an artifact never imports Inductor (0.9 s and 68 MB
# in every model process, before it can serve); tests/test_aot.py checks the table against Inductor's own.
X86_ISAS = ("avx512 avx512_vnni amx_tile", "avx512 avx512_vnni", "avx512", "avx2")


def _is_x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def x86_features() -> set[str]:
    """What Inductor's `x86_isa_checker` reports, from the same probes in torch.cpu."""
    avx512 = torch.cpu._is_avx512_supported()
    probes = {
        "avx2": torch.cpu._is_avx2_supported(),
        "avx512": avx512,
        "avx512_vnni": avx512 and torch.cpu._is_vnni_supported(),
        "amx_tile": torch.cpu._is_amx_tile_supported(),
    }
    return {name for name, present in probes.items() if present}


def cpu_isas() -> list[str]:
    """Inductor's vector ISAs this CPU can run, best first (e.g. `avx512 avx512_vnni`, `avx512`, `avx2`).

    Read from the CPU's flags, not from Inductor's own check, which compiles a test program: a runtime
    image has no compiler and must still tell which of its baked artifacts this CPU can run.
    """
    if not _is_x86():
        from torch._inductor import cpu_vec_isa

        return [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] if can_compile() else []
    features = x86_features()
    return [isa for isa in X86_ISAS if set(isa.split()) <= features]


def native_isa() -> str:
    """The ISA Inductor compiles for on this machine (honours `ATEN_CPU_CAPABILITY=avx2|avx512`); without a
    compiler, the best this CPU runs."""
    if not can_compile():
        return next(iter(cpu_isas()), "")
    from torch._inductor import cpu_vec_isa

    return str(cpu_vec_isa.pick_vec_isa())


def preferred_isa() -> str:
    """The ISA whose artifact to look for first: the best this CPU runs, as `native_isa` answers on x86 when
    the compiler can target it, without importing Inductor. Only an order: any artifact this CPU runs is used."""
    if _is_x86() and not os.environ.get("ATEN_CPU_CAPABILITY"):
        return next(iter(cpu_isas()), "")
    return native_isa()


def can_compile() -> bool:
    """AOTInductor needs a C++ compiler; a runtime image may have none."""
    return bool(shutil.which("g++") or shutil.which("c++"))


def _code_digest() -> str:
    """The model's source (the export recipe itself is versioned by FORMAT): a change to it rebuilds."""
    import inspect

    from model.engine import OneDnnLinear

    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    digest.update(inspect.getsource(OneDnnLinear).encode())
    return digest.hexdigest()[:16]


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the serving model's tensors (names, shapes, bytes): what the artifact freezes in."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class ArtifactKey:
    """Everything that changes an artifact's code or results. Its digest names the artifact's folder."""

    torch: str
    isa: str
    dtype: str
    linears: str
    code: str
    weights: str
    batch: int = 1
    kernel_threads: str = f"dynamic:{KERNEL_THREADS_HINT}"  # the OpenMP team the kernels are written for
    format: int = FORMAT

    @classmethod
    def of(
        cls, model: nn.Module, dtype: torch.dtype, linears: str, isa: str | None = None, batch: int = 1
    ) -> ArtifactKey:
        return cls(torch.__version__, isa or native_isa(), str(dtype).removeprefix("torch."), linears,
                   _code_digest(), weights_digest(model), batch)  # fmt: skip

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Artifact:
    """The packages of one engine, one per batch bucket, all for the same ISA, linears and weights."""

    folder: Path  # holds one sub-folder per bucket: <digest>/{model.so, kernel.cpp, meta.json}
    keys: dict[int, ArtifactKey]  # bucket -> key
    origin: str  # "cache" (all found on disk), "built" (all compiled at this start), "cache+built"
    build_s: float | None = None  # compile seconds of the buckets, summed, when known

    @property
    def isa(self) -> str:
        return next(iter(self.keys.values())).isa

    @property
    def digest(self) -> str:
        return hashlib.sha256(" ".join(k.digest for _, k in sorted(self.keys.items())).encode()).hexdigest()[:24]

    def describe(self) -> dict[str, object]:
        return {"origin": self.origin, "path": str(self.folder), "isa": self.isa, "key": self.digest,
                "build_s": self.build_s, "batch_sizes": sorted(self.keys)}  # fmt: skip


def _example(batch: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=dtype)


def _probe(batch: int, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator).to(dtype)


def _read_meta(folder: Path) -> dict[str, object]:
    try:
        return json.loads((folder / META).read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{folder}: unreadable {META} ({error})") from None


def load(folder: Path, key: ArtifactKey, reference: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an artifact for `key` and prove it: same key on disk, an ISA this CPU runs, the same numbers."""
    _verify(folder, key)
    if key.isa not in cpu_isas():
        raise ArtifactError(f"{folder}: compiled for {key.isa}, which this CPU lacks ({', '.join(cpu_isas())})")
    try:
        runner = Library(folder / LIBRARY)
    except Exception as error:  # torch raises RuntimeError for what dlopen refuses
        raise ArtifactError(f"{folder}: cannot load {LIBRARY} ({type(error).__name__}: {error})") from None
    probe = _probe(key.batch, getattr(torch, key.dtype))
    with torch.inference_mode():
        got, want = runner(probe), reference(probe)
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if not err <= PROBE_RTOL[key.dtype]:  # `not <=` also catches NaN
        raise ArtifactError(f"{folder}: output differs from the eager model (max rel err {err:.1e})")
    runner.proof = (key.batch, getattr(torch, key.dtype), got.clone())
    return runner


@contextlib.contextmanager
def _locked(folder: Path, name: str) -> Iterator[None]:
    """One builder per bucket across processes (several model instances start at once) and pods on a volume."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def compile_package(model: nn.Module, dtype: torch.dtype, batch: int, target: Path) -> float:
    """torch.export at this batch size, then AOTInductor with frozen weights and kernels parallel over
    whatever OpenMP team runs them (INDUCTOR_CONFIGS); returns seconds taken."""
    start = time.perf_counter()
    with torch.inference_mode(False), torch.no_grad():
        exported = torch.export.export(model, (_example(batch, dtype),))
        configs = {**INDUCTOR_CONFIGS, **({"cpp.march": X86_MARCH} if _is_x86() else {})}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(target), inductor_configs=configs)
    return time.perf_counter() - start


def compiled_isa(package: Path) -> str:
    """The ISA AOTInductor recorded in the package (`AOTI_CPU_ISA`), as `cpu_isas()` spells it."""
    with zipfile.ZipFile(package) as archive:
        for name in archive.namelist():
            if name.endswith("wrapper_metadata.json"):
                return str(json.loads(archive.read(name)).get("AOTI_CPU_ISA", "")).lower()
    return ""


@contextlib.contextmanager
def _isa_env(isa: str) -> Iterator[None]:
    """Inductor compiles for `ATEN_CPU_CAPABILITY` when set (avx2 or avx512 families)."""
    previous = os.environ.get("ATEN_CPU_CAPABILITY")
    os.environ["ATEN_CPU_CAPABILITY"] = isa.split()[0]
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ATEN_CPU_CAPABILITY")
        else:
            os.environ["ATEN_CPU_CAPABILITY"] = previous


class Library:
    """One bucket's compiled model, mapped from its artifact folder (what torch's `.pt2` loader runs once it
    has unpacked the package). One input tensor, one output: no argument flattening to do."""

    def __init__(self, path: Path) -> None:
        self._runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        self.proof: tuple[int, torch.dtype, torch.Tensor] | None = None  # batch, dtype, output of `load`'s probe
        self._owner: Library | None = None  # whose memory this library's shared constants live in

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._runner.run([x])[0]

    def constants(self) -> dict[str, torch.Tensor]:
        """This library's constants by their original names: views of its own buffers, valid while it lives."""
        return self._runner.extract_constants_map(False)

    def share(self, owner: Library, theirs: dict[str, torch.Tensor]) -> int:
        """Run on `owner`'s constants (`theirs`, from `owner.constants()`) wherever they are the same tensors as
        this library's: same name, shape, strides, dtype and layout (for oneDNN's opaque tensors, the same
        memory descriptor). The others (AOTInductor may fold a constant to the batch size, or block a weight for
        it) are copied out of this library's buffers first. Proven on the probe `load` checked: the output must
        not change in any bit, or the library goes back to its own. Returns the bytes now shared.

        AOTInductor never frees tensors it was given this way: the copies live as long as the process, also
        when the proof fails (then they are a few MB lost, once per start).
        """
        if self.proof is None or (plan := self._mapping(theirs)) is None:
            return 0
        mapping, saved = plan
        runner = self._runner
        runner.update_constant_buffer(mapping, True, True, True)  # the inactive buffer, every name, not copied
        runner.swap_constant_buffer()
        batch, dtype, expected = self.proof
        try:
            with torch.inference_mode():
                same = torch.equal(self(_probe(batch, dtype)), expected)
        except BaseException:
            runner.swap_constant_buffer()
            raise
        if not same:
            runner.swap_constant_buffer()  # its own again; the rejected map is never read
            log.warning("an engine bucket runs differently on another bucket's weights: it keeps its own copy")
            return 0
        runner.free_inactive_constant_buffer()  # its own copy: from here on, never swap back
        self._owner = owner  # the shared constants point into the owner's memory
        return saved

    def _mapping(self, theirs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int] | None:
        """Each of this library's constants (by internal name): `theirs` where the same tensor, else a copy of
        its own; and the bytes shared. None where its constants have no one name each (folded at run time).
        The views of its own buffer die with this call: `share` frees that buffer."""
        mine = self.constants()
        names = self._runner.get_constant_names_to_original_fqns()
        if len(set(names.values())) != len(names) or not set(names.values()) <= set(mine):
            return None
        mapping, saved = {}, 0
        for name, fqn in names.items():
            own, other = mine[fqn], theirs.get(fqn)
            if other is not None and _same_layout(own, other):
                mapping[name] = other
                saved += own.numel() * own.element_size()
            else:
                mapping[name] = own.clone()  # its own values, in memory of its own
        return mapping, saved


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    if (a.shape, a.dtype, a.is_mkldnn) != (b.shape, b.dtype, b.is_mkldnn):
        return False
    if not a.is_mkldnn:
        return a.stride() == b.stride()
    try:  # oneDNN may block the same weight differently for another batch size (seen with MKL-linear sets)
        describe = torch.ops.mkldnn._get_mkldnn_serialized_md
        return bool(torch.equal(describe(a), describe(b)))
    except (AttributeError, RuntimeError):
        return False


def share_constants(runners: dict[int, Runner]) -> int:
    """One copy of the weights per process instead of one per bucket; returns the bytes saved.

    Why: each bucket's library carries the frozen weights and copies them into memory at load (31 MB apiece
    for LeViT_128S, five buckets: about 150 MB per model process). AOTInductor lets a library run on tensors it
    does not own (`update_constant_buffer(..., user_managed=True)` into its inactive buffer, swap, free the
    old one), so every bucket runs on the smallest bucket's (docs/benchmarks.md: same outputs, same speed).
    """
    libraries = [runner for _, runner in sorted(runners.items()) if isinstance(runner, Library)]
    if len(libraries) < 2:
        return 0
    owner, *others = libraries
    theirs = owner.constants()
    saved = 0
    for library in others:
        try:
            saved += library.share(owner, theirs)
        except Exception as error:  # RuntimeError where AOTInductor refuses the map; sharing is only an economy
            log.warning("an engine bucket keeps its own copy of the weights: %s", error)
    return saved


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _unpack(package: Path, folder: Path) -> str:
    """The package's library and kernel source into `folder`; returns the library's SHA-256."""
    with zipfile.ZipFile(package) as archive:
        for suffix, name in ((".wrapper.so", LIBRARY), (".kernel.cpp", KERNELS)):
            (member,) = [n for n in archive.namelist() if n.endswith(suffix)]
            with archive.open(member) as source, open(folder / name, "wb") as target:
                shutil.copyfileobj(source, target)
    return _sha256(folder / LIBRARY)


def build(model: nn.Module, key: ArtifactKey, folder: Path) -> float:
    """Compile into `folder/<digest>`, atomically: a reader sees a whole artifact or none."""
    final = folder / key.digest
    tmp = Path(tempfile.mkdtemp(prefix=f".{key.digest}-", dir=folder))
    try:
        with _isa_env(key.isa):
            seconds = compile_package(model, getattr(torch, key.dtype), key.batch, tmp / PACKAGE)
        got = compiled_isa(tmp / PACKAGE)
        if got != key.isa:  # the key must say what the code needs, or a CPU without it would crash
            raise ArtifactError(f"asked Inductor for {key.isa}, it compiled for {got or 'no vector ISA'}")
        try:
            library_sha256 = _unpack(tmp / PACKAGE, tmp)
        except (OSError, ValueError, zipfile.BadZipFile) as error:  # the caller falls back on ArtifactError
            raise ArtifactError(f"cannot unpack the compiled package ({type(error).__name__}: {error})") from None
        (tmp / PACKAGE).unlink()
        meta = {"key": asdict(key), "library_sha256": library_sha256, "build_s": round(seconds, 1),
                "built_at": time.time(), "python": sys.version}  # fmt: skip
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)  # stale: failed its checks
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return seconds


Runner = Callable[[torch.Tensor], torch.Tensor]


def _find_one(
    model: nn.Module, key: ArtifactKey, dirs: list[Path], rejected: list[str] | None = None
) -> tuple[Runner, Path] | None:
    for folder in dirs:
        candidate = folder / key.digest
        if not (candidate / META).exists():
            continue
        try:
            return load(candidate, key, model), folder
        except ArtifactError as error:
            if rejected is not None:
                rejected.append(str(error))
            log.warning("engine artifact rejected: %s", error)
    return None


def _build_s(folder: Path) -> float | None:
    value = _read_meta(folder).get("build_s")
    return float(value) if isinstance(value, int | float) else None


def find(
    model: nn.Module,
    dtype: torch.dtype,
    linears: str,
    dirs: list[Path],
    buckets: tuple[int, ...],
    rejected: list[str] | None = None,
) -> tuple[dict[int, Runner], Artifact] | None:
    """A complete set of artifacts (every bucket) for this model that this CPU runs and that proves itself.

    The best ISA this CPU runs first, then any other it has (an image's portable avx2 set will do).
    Rejected artifacts are logged with the reason, which is also added to `rejected` for the caller's message.
    """
    native = preferred_isa()
    base = ArtifactKey.of(model, dtype, linears, native)
    for isa in [native, *(i for i in cpu_isas() if i != native)]:
        runners, keys, seconds, folder = {}, {}, 0.0, None
        for batch in buckets:
            key = replace(base, isa=isa, batch=batch)
            hit = _find_one(model, key, dirs, rejected)
            if hit is None:
                break
            runners[batch], folder = hit
            keys[batch] = key
            seconds += _build_s(folder / key.digest) or 0.0
        else:
            assert folder is not None
            return runners, Artifact(folder, keys, "cache", round(seconds, 1) or None)
    return None


def _build_worker(model: nn.Module, key: ArtifactKey, folder: Path) -> float:
    """One bucket in a pool process: one thread for the compile, since the pool already uses every core.

    The generated kernels do not inherit this one thread: INDUCTOR_CONFIGS makes them parallel over the team
    of whichever process runs them.
    """
    import torch._inductor.config as inductor_config

    torch.set_num_threads(1)
    inductor_config.compile_threads = 1
    with _locked(folder, key.digest):  # one builder per bucket, also across several model processes
        if _intact(folder / key.digest, key):  # another process built it meanwhile
            return _build_s(folder / key.digest) or 0.0
        return build(model, key, folder)  # absent, or damaged: replaced


def _verify(folder: Path, key: ArtifactKey) -> None:
    """The artifact on disk is the one built for `key` (its recorded key, its library's checksum), or
    ArtifactError says why. Checked before the library is mapped: a truncated one would kill the process."""
    meta = _read_meta(folder)
    if meta.get("key") != asdict(key):
        raise ArtifactError(f"{folder}: its key differs from this model's (stale or foreign artifact)")
    try:
        digest = _sha256(folder / LIBRARY)
    except OSError as error:
        raise ArtifactError(f"{folder}: cannot read {LIBRARY} ({error})") from None
    if digest != meta.get("library_sha256"):
        raise ArtifactError(f"{folder}: {LIBRARY} is not the library that was built (damaged or replaced)")


def _intact(folder: Path, key: ArtifactKey) -> bool:
    try:
        _verify(folder, key)
    except ArtifactError:
        return False
    return True


def build_all(model: nn.Module, keys: list[ArtifactKey], folder: Path, workers: int) -> dict[ArtifactKey, float]:
    """Compile several buckets at once, one process each (spawned: a clean torch in each)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if workers <= 1 or len(keys) == 1:
        return {key: _build_worker(model, key, folder) for key in keys}
    with ProcessPoolExecutor(min(workers, len(keys)), mp_context=mp.get_context("spawn")) as pool:
        futures = {key: pool.submit(_build_worker, model, key, folder) for key in keys}
        return {key: future.result() for key, future in futures.items()}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def create(
    model: nn.Module,
    dtype: torch.dtype,
    linears: str,
    dirs: list[Path],
    buckets: tuple[int, ...],
    rejected: tuple[str, ...] = (),
) -> tuple[dict[int, Runner], Artifact]:
    """Artifacts for every bucket for this CPU: those found are kept, the others are compiled into the first
    writable folder of `dirs`, in parallel.

    Raises ArtifactError when they cannot be built here (no C++ compiler), naming `rejected` (why the
    artifacts found were refused): the caller falls back.
    """
    if not can_compile():
        why = "; ".join(rejected) or f"no artifact for this model and CPU in {', '.join(map(str, dirs))}"
        raise ArtifactError(f"{why}, and no C++ compiler to build one")
    base = ArtifactKey.of(model, dtype, linears, native_isa())
    keys = {batch: replace(base, batch=batch) for batch in buckets}
    target = next((d for d in dirs if _writable(d)), None)
    if target is None:  # read-only everywhere: build for this process alone
        target = Path(tempfile.mkdtemp(prefix="levit-engine-"))
        log.warning("no writable folder in %s: the engine artifacts live in %s for this run only", dirs, target)
    runners: dict[int, Runner] = {}
    for batch, key in keys.items():
        if (hit := _find_one(model, key, dirs)) is not None:
            runners[batch] = hit[0]
    missing = [key for batch, key in keys.items() if batch not in runners]
    log.info("compiling the engine for %s (%s, %s linears), batch sizes %s, into %s", base.isa, base.dtype,
             linears, [k.batch for k in missing], target)  # fmt: skip
    start = time.perf_counter()
    seconds = build_all(model, missing, target, _cores())
    log.info("compiled %d engine artifacts in %.1fs", len(missing), time.perf_counter() - start)
    for key in missing:
        runners[key.batch] = load(target / key.digest, key, model)
    origin = "built" if len(missing) == len(keys) else "cache+built"
    return runners, Artifact(target, keys, origin, round(sum(seconds.values()), 1))


def main(argv: list[str] | None = None) -> int:
    """`python -m model.aot`: build artifacts ahead of time (a container's builder stage)."""
    from model.engine import bucket_sizes, linear_sets, onednn_linears
    from model.fuse import fuse
    from model.loader import load_weights
    from model.precision import cpu_dtype_problem

    parser = argparse.ArgumentParser(prog="python -m model.aot", description=main.__doc__)
    parser.add_argument("--model", default="LeViT_128S")
    parser.add_argument("--weights", default="auto", help="auto | random | PATH | URL, as LEVIT_WEIGHTS")
    parser.add_argument("--cache-dir", type=Path, required=True, help="where the weights are (LEVIT_CACHE_DIR)")
    parser.add_argument("--out", type=Path, required=True, help="artifact folder (an entry of LEVIT_ENGINE_PATH)")
    parser.add_argument("--isa", default="native", help="comma-separated: native, avx2 (a portable baseline)")
    parser.add_argument("--linears", default="onednn,mkl", help="comma-separated: onednn, mkl (float32 only)")
    parser.add_argument(
        "--dtypes", default="float32", help="comma-separated LEVIT_DTYPE values to serve: float32, bfloat16 (AMX CPUs)"
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="LEVIT_MAX_BATCH_SIZE: sets the buckets")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",")
    unknown = set(dtypes) - set(PROBE_RTOL)  # the dtypes artifacts are compiled and proven in
    if unknown:
        parser.error(f"--dtypes: {', '.join(sorted(unknown))} (choose from {', '.join(PROBE_RTOL)})")
    if "bfloat16" in dtypes and (problem := cpu_dtype_problem(torch.bfloat16)):
        # Inductor packs bfloat16 weights for the building CPU's oneDNN: unmeasured on an AMX CPU when built
        # elsewhere, so the builder follows the server's rule.
        parser.error(f"--dtypes bfloat16: build on a CPU that serves it ({problem})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trained, info = load_weights(args.model, args.weights, args.cache_dir)
    isas = [] if "native" not in args.isa.split(",") else [native_isa()]
    for wanted in args.isa.split(","):
        if wanted != "native":
            have = [isa for isa in cpu_isas() if isa == wanted]
            if not have:
                log.warning("skipping ISA %s: this CPU cannot compile for it (has %s)", wanted, ", ".join(cpu_isas()))
            isas += [isa for isa in have if isa not in isas]
    buckets = bucket_sizes(args.max_batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    sets = [(getattr(torch, d), linears) for d in dtypes for linears in linear_sets(getattr(torch, d), args.linears)]
    for dtype, linears in sets:
        # Every CPU with AMX has AVX-512: bfloat16 artifacts for other ISAs would never be picked over them.
        isas_for = [isa for isa in isas if dtype == torch.float32 or isa.startswith("avx512")]
        model = onednn_linears(fuse(trained).eval()) if linears == "onednn" else fuse(trained).eval()
        model = model.to(dtype)
        keys = [ArtifactKey.of(model, dtype, linears, isa, batch) for isa in isas_for for batch in buckets]
        start = time.perf_counter()
        build_all(model, keys, args.out, _cores())
        for key in keys:
            load(args.out / key.digest, key, model)
        log.info("built %d artifacts (%s, %s linears, ISAs %s, batch sizes %s, weights %s) in %.0fs", len(keys),
                 str(dtype).removeprefix("torch."), linears, ", ".join(isas_for), list(buckets), info.id,
                 time.perf_counter() - start)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
