"""The answers every peer must give before it is timed: nobody is measured returning garbage.

The reference is timm's model and timm's transform run in process, batch 1, in the shared torch
environment (`servers/peer_model.py` as a script), once per benchmark run, on every payload that will
be sent. A peer that runs that same pipeline must return the same top-5 indices, in order, for every
photo. levit-serve decodes JPEGs in the DCT domain and runs a BN-fused compiled model, so its
probabilities differ slightly: it must agree on the top-1, and the overlap of its top-5 set with
the reference's is reported.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen import Payload, RawHttpDriver
from bench.peers.peers import SERVERS, Answer, Peer


@dataclass
class Reference:
    versions: dict[str, str]  # torch, torchvision, timm of the environment that computed it
    answers: dict[str, Answer]  # payload filename -> top-5


def compute_reference(python: Path, checkpoint: Path, payloads: list[Payload]) -> Reference:
    """Top-5 of each payload from timm in process (`python` is the shared torch venv's interpreter)."""
    with tempfile.TemporaryDirectory(prefix="levit-peers-ref-") as tmp:
        paths = []
        for index, payload in enumerate(payloads):
            path = Path(tmp) / f"{index}-{payload.filename}"
            path.write_bytes(payload.data)
            paths.append(str(path))
        done = subprocess.run(
            [str(python), str(SERVERS / "peer_model.py"), str(checkpoint), *paths],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode:
        raise SystemExit(f"the reference failed ({python}):\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = {p.filename: (a["indices"], a["scores"]) for p, a in zip(payloads, lines[1:], strict=True)}
    return Reference(lines[0], answers)


async def peer_answers(peer: Peer, driver: RawHttpDriver, payloads: list[Payload]) -> dict[str, Answer]:
    """One request per payload over one connection (`driver` holds the same requests the load uses)."""
    client = await driver.connect()
    try:
        return {p.filename: peer.answer(await client.fetch(i)) for i, p in enumerate(payloads)}
    finally:
        await client.close()


@dataclass
class Check:
    passed: bool
    lines: list[str]  # one per payload, for the report


def check_answers(peer: Peer, got: dict[str, Answer], reference: Reference) -> Check:
    """Exact top-5 (ordered) for the peers; top-1 plus top-5 overlap for levit-serve (`peer.exact` False)."""
    passed, lines = True, []
    for name, (ref_indices, ref_scores) in reference.answers.items():
        indices, scores = got[name]
        if peer.exact:
            same = indices == ref_indices
            verdict = "top-5 equal" if same else f"top-5 {indices} != reference {ref_indices}"
        else:
            same = indices[0] == ref_indices[0]
            overlap = len(set(indices) & set(ref_indices))
            top1 = "equal" if same else f"{indices[0]} != reference {ref_indices[0]}"
            verdict = f"top-1 {top1}, top-5 overlap {overlap}/5"
        passed &= same
        drift = max(abs(a - b) for a, b in zip(scores, ref_scores))
        lines.append(f"{name}: {verdict} (max |score - reference| {drift:.1e})")
    return Check(passed, lines)
