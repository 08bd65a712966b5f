"""Just enough of the Dockerfile and .dockerignore formats to check what the images promise."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


# --- Dockerfile -----------------------------------------------------------------------------------
@dataclass
class Instr:
    kw: str
    args: str


def parse_dockerfile(path: Path) -> list[list[Instr]]:
    """Instructions grouped by stage (stage 0 = ARGs before the first FROM)."""
    stages: list[list[Instr]] = [[]]
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        kw, _, rest = buf.partition(" ")
        instr = Instr(kw.upper(), rest.strip())
        if instr.kw == "FROM":
            stages.append([])
        stages[-1].append(instr)
        buf = ""
    return stages


def arg_defaults(instrs: list[Instr]) -> dict[str, str]:
    out = {}
    for i in instrs:
        if i.kw == "ARG" and "=" in i.args:
            k, _, v = i.args.partition("=")
            out[k] = v
    return out


def env_of(stage: list[Instr]) -> dict[str, str]:
    args = arg_defaults(stage)
    env: dict[str, str] = {}
    for i in stage:
        if i.kw == "ENV":
            for tok in shlex.split(i.args):
                k, _, v = tok.partition("=")
                env[k] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), v)
    return env


def image_levit_env(path: Path) -> dict[str, str]:
    """The LEVIT_* environment the image's final stage sets."""
    return {k: v for k, v in env_of(parse_dockerfile(path)[-1]).items() if k.startswith("LEVIT_")}


def exec_form(stage: list[Instr], kw: str) -> list[str]:
    [instr] = [i for i in stage if i.kw == kw]
    return json.loads(instr.args)


def healthcheck_cmd(stage: list[Instr]) -> list[str]:
    [instr] = [i for i in stage if i.kw == "HEALTHCHECK"]
    return json.loads(instr.args.split(" CMD ", 1)[1])


# --- .dockerignore --------------------------------------------------------------------------------
def docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match + `**`) as a regex over slash-separated paths."""
    pattern = os.path.normpath(pattern.lstrip("/"))
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i : j + 1].replace("[!", "[^"), j + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(is a `!` re-include, pattern) per rule, in file order."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, docker_pattern(line[1:] if negate else line)))
    return rules


def dockerignore_included(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for negate, rx in rules:
        if any(rx.match(p) for p in prefixes):
            included = negate
    return included
