"""Official LeViT weights: published URLs, SHA-256 verified downloads into a cache directory."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from model.configs import VARIANTS, LeViTConfig, get_config

DOWNLOAD_TIMEOUT_S = 10.0
_CHUNK = 1 << 20
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class WeightsError(RuntimeError):
    """Weights that could not be fetched or verified; the message says what and why in one line."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/levit-serve`, else `~/.cache/levit-serve`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "levit-serve"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_prefix_from_name(name: str) -> str | None:
    """torch.hub convention: `name-<sha256 prefix>.ext`."""
    match = _HASH_IN_NAME.search(name)
    return match.group(1) if match else None


def cached_weights(config: LeViTConfig, cache_dir: Path) -> Path | None:
    """The verified official file for `config` if it is already in the cache."""
    path = cache_dir / config.weights_file
    if path.is_file() and sha256_file(path).startswith(config.sha256_prefix):
        return path
    return None


def download(url: str, cache_dir: Path, sha256_prefix: str | None = None, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch `url` into `cache_dir`, verify, and only then move it into place (atomic rename).

    A partial or mismatching download never appears under the final name.
    """
    name = url.rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    expected = sha256_prefix or hash_prefix_from_name(name)
    target = cache_dir / name
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{name}.", suffix=".part")
    except OSError as error:
        raise WeightsError(f"cache directory {cache_dir} is not writable: {error.strerror or error}") from None
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        deadline = time.monotonic() + max(timeout * 30, 60)
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                if time.monotonic() > deadline:
                    raise WeightsError(f"download of {url} is too slow; gave up")
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if expected and not actual.startswith(expected):
            raise WeightsError(f"hash mismatch for {url}: expected sha256 {expected}..., got {actual[:16]}...")
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        reason = getattr(error, "reason", None) or error
        raise WeightsError(f"cannot download {url} (offline or unreachable?): {reason}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_official(variant: str, cache_dir: Path, timeout: float = DOWNLOAD_TIMEOUT_S, url: str | None = None) -> Path:
    """Cached official checkpoint for `variant`, downloading it if needed. `url` overrides the mirror."""
    config = get_config(variant)
    if found := cached_weights(config, cache_dir):
        return found
    path = download(url or config.weights_url, cache_dir, config.sha256_prefix, timeout)
    if path.name != config.weights_file:
        path = path.rename(cache_dir / config.weights_file)
    return path


def main(argv: list[str] | None = None) -> int:
    """`levit-weights download --model LeViT_128S --cache-dir DIR`: used by image builds and init containers."""
    parser = argparse.ArgumentParser(prog="levit-weights", description="Fetch official LeViT weights.")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="download and verify one variant's official checkpoint")
    get.add_argument("--model", default=os.environ.get("LEVIT_MODEL", "LeViT_128S"), choices=list(VARIANTS))
    get.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("LEVIT_CACHE_DIR") or default_cache_dir()))
    get.add_argument("--timeout", type=float, default=60.0)
    sub.add_parser("list", help="print each variant's URL")
    args = parser.parse_args(argv)
    if args.command == "list":
        for config in VARIANTS.values():
            print(f"{config.name}\t{config.weights_url}")
        return 0
    try:
        path = fetch_official(args.model, args.cache_dir, timeout=args.timeout)
    except WeightsError as error:
        print(f"levit-weights: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
