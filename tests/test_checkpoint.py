"""Checkpoint formats, variant detection, error messages and verified downloads (loopback only)."""

from __future__ import annotations

import hashlib
import http.server
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from model.fuse import fuse
from model.loader import load_weights
from model.weights import WeightsError, download, fetch_official
from tests.helpers import random_levit, timm_state_dict

X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(X)


@pytest.fixture(scope="module")
def source() -> torch.nn.Module:
    return random_levit("LeViT_128S", seed=11)


def test_official_format_loads_strictly(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "LeViT-128S-00000000.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = load_checkpoint(path)
    assert loaded.config.name == "LeViT_128S"
    assert torch.equal(_logits(loaded), _logits(source))
    assert torch.allclose(_logits(fuse(loaded)), _logits(source), rtol=1e-4, atol=1e-5)


def test_bare_state_dict(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "bare.pth"
    torch.save(source.state_dict(), path)
    assert torch.equal(_logits(load_checkpoint(path, "LeViT_128S")), _logits(source))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_format_maps_by_name(tmp_path: Path, source: torch.nn.Module, suffix: str) -> None:
    sd = timm_state_dict(source)
    assert "stem.conv1.linear.weight" in sd
    assert "stages.1.downsample.attn_downsample.kv.linear.weight" in sd
    assert not any("attention_bias_idxs" in k for k in sd)
    path = tmp_path / f"levit_128s{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    assert torch.equal(_logits(load_checkpoint(path)), _logits(source))


def test_variant_detected_for_every_family_member(tmp_path: Path) -> None:
    model = random_levit("LeViT_192", seed=2)
    path = tmp_path / "x.pth"
    torch.save({"model": model.state_dict()}, path)
    assert load_checkpoint(path).config.name == "LeViT_192"


def test_wrong_variant_is_named(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "x.pth"
    torch.save({"model": source.state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"is a LeViT_128S checkpoint, but LeViT_256 was requested"):
        load_checkpoint(path, "LeViT_256")


def test_missing_unexpected_and_shape_problems_are_named(tmp_path: Path, source: torch.nn.Module) -> None:
    sd = dict(source.state_dict())
    del sd["head_dist.l.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.l.weight"] = torch.zeros(10, 384)
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, "LeViT_128S")
    message = str(info.value)
    assert "missing keys: head_dist.l.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "head.l.weight: checkpoint (10, 384) vs model (1000, 384)" in message


class _Evil:
    def __reduce__(self):  # would run on unpickling if weights_only were off
        return (Path("/tmp/levit_pwned").touch, ())


def test_arbitrary_pickles_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"model": _Evil()}, f)
    Path("/tmp/levit_pwned").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_state_dict(path)
    assert not Path("/tmp/levit_pwned").exists()


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pth is not a readable checkpoint"):
        read_state_dict(path)


# --- downloads, against a real HTTP server on 127.0.0.1 ---------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


def _publish(root: Path, source: torch.nn.Module) -> tuple[str, bytes]:
    staging = root / "staging.pth"
    torch.save({"model": source.state_dict()}, staging)
    data = staging.read_bytes()
    name = f"LeViT-128S-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    staging.rename(root / name)
    return name, data


def test_download_verifies_and_caches(served, tmp_path: Path, source: torch.nn.Module) -> None:
    base, root = served
    name, data = _publish(root, source)
    cache = tmp_path / "cache"
    path = download(f"{base}/{name}", cache)
    assert path == cache / name and path.read_bytes() == data
    assert [p.name for p in cache.iterdir()] == [name]  # no temporary files left


def test_download_rejects_wrong_hash_and_leaves_nothing(served, tmp_path: Path, source: torch.nn.Module) -> None:
    base, root = served
    name, _ = _publish(root, source)
    wrong = "LeViT-128S-deadbeef.pth"
    (root / name).rename(root / wrong)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="hash mismatch"):
        download(f"{base}/{wrong}", cache)
    assert list(cache.iterdir()) == []


def test_download_fails_fast_without_server(tmp_path: Path) -> None:
    with socket_port() as port:
        url = f"http://127.0.0.1:{port}/LeViT-128S-96703c44.pth"
    start = time.monotonic()
    with pytest.raises(WeightsError, match="cannot download"):
        download(url, tmp_path / "cache", timeout=2)
    assert time.monotonic() - start < 10


def test_official_fetch_checks_the_published_hash(served, tmp_path: Path, source: torch.nn.Module) -> None:
    """A mirror serving some other file is refused: the official prefix (96703c44) is what counts."""
    base, root = served
    name, _ = _publish(root, source)
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError, match="expected sha256 96703c44"):
        fetch_official("LeViT_128S", cache, url=f"{base}/{name}")
    assert not (cache / "LeViT-128S-96703c44.pth").exists()


def test_auto_weights_fall_back_to_random_offline(tmp_path: Path, caplog) -> None:
    model, info = load_weights("LeViT_128S", "auto", tmp_path / "empty-cache", timeout=1)
    assert info.id == "random(seed=0)" and not info.pretrained
    assert "NO PRETRAINED WEIGHTS" in caplog.text
    again, _ = load_weights("LeViT_128S", "random", tmp_path)
    assert torch.equal(_logits(model), _logits(again))  # deterministic


def test_require_pretrained_refuses_random(tmp_path: Path) -> None:
    with pytest.raises(WeightsError):
        load_weights("LeViT_128S", "auto", tmp_path / "empty-cache", require_pretrained=True, timeout=1)


def test_weights_from_path_record_hash(tmp_path: Path, source: torch.nn.Module) -> None:
    path = tmp_path / "mine.pth"
    torch.save({"model": source.state_dict()}, path)
    _, info = load_weights("LeViT_128S", str(path), tmp_path)
    assert info.source == "file"
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


class socket_port:
    """A port that was free a moment ago and has nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()
