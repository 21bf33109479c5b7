"""The README and docs run as written: every `difflens ...` command they show parses, the README's
Quickstart block runs verbatim, and its "GPU users" block runs on a tiny saved Flux pipeline."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from difflens.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


SHELL = ("", "bash", "sh", "console", "shell")


def code_blocks(text: str) -> list[str]:
    """Shell blocks (untagged or tagged as a shell); fences are paired line by line, so a
    ```python block does not shift the pairing of the blocks after it."""
    return [body for lang, body in re.findall(r"^```([\w+-]*)\n(.*?)^```", text, flags=re.S | re.M) if lang in SHELL]


def commands(block: str) -> list[str]:
    """`difflens ...` commands of a shell block, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in block.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        cmd = current.strip()
        current = ""
        if cmd.startswith("difflens "):
            out.append(cmd)
    return out


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for block in code_blocks(path.read_text(encoding="utf-8")):
            for cmd in commands(block):
                if "..." not in cmd:  # an elision (`difflens train ... --resume`), not a command
                    # `[--flag value]` marks an optional part: parse the command with it
                    found.append((path.name, re.sub(r"\[(--[^\]]*)\]", r"\1", cmd)))
    return found


def test_documents_show_commands():
    names = {name for name, _ in documented_commands()}
    assert {"README.md", "training.md", "interpret.md", "browse.md", "intervene.md"} <= names


@pytest.mark.parametrize("where, cmd", documented_commands(), ids=lambda v: v[:60] if isinstance(v, str) else None)
def test_every_documented_command_parses(where, cmd):
    argv = shlex.split(cmd, comments=True)[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `{cmd}` does not parse (exit {e.code})")
    assert getattr(args, "func", None) is not None, f"{where}: `{cmd}` names no verb"


def inline_commands() -> list[tuple[str, str]]:
    """`difflens ...` spans in the prose (outside code blocks): often a verb and a few of its flags."""
    found = []
    for path in DOCS:
        prose = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for m in re.finditer(r"(`+)(difflens [^`]*?)\1", prose):
            cmd = " ".join(m.group(2).split())
            if "<" not in cmd:  # a placeholder (`difflens <name>`), not a command
                found.append((path.name, cmd))
    return found


def _stale(spans: list[tuple[str, str]]) -> list[str]:
    """The spans whose verb does not exist or that show a flag their verb does not have."""
    import argparse

    wrong = []
    for where, cmd in spans:
        node, words = build_parser(), shlex.split(cmd)[1:]
        verbs = 0
        for w in words:
            sub = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
            if not sub or w not in sub[0].choices:
                break
            node, verbs = sub[0].choices[w], verbs + 1
        flags = {o for a in node._actions for o in a.option_strings}
        bad = [w.split("=")[0] for w in words if w.startswith("-") and not re.match(r"-\d", w) and w.split("=")[0] not in flags]
        if verbs == 0 or bad:
            wrong.append(f"{where}: `{cmd}`" + (f" (unknown {', '.join(bad)})" if bad else " (no verb)"))
    return wrong


def test_commands_in_the_prose_name_real_verbs_and_flags():
    """Issue 14: a command quoted in a sentence need not be complete, but its verb and every flag
    it shows must exist (a renamed flag leaves no stale mention behind)."""
    spans = inline_commands()
    assert len(spans) > 20 and _stale(spans) == []
    # the check itself
    assert _stale([("x.md", "difflens train --steps 5 --data d"), ("x.md", "difflens frobnicate"),
                   ("x.md", "difflens store verify"), ("x.md", "difflens steer --scales=-8,8")]) == [
        "x.md: `difflens train --steps 5 --data d` (unknown --steps)", "x.md: `difflens frobnicate` (no verb)"]


def _shim(tmp_path: Path) -> dict:
    """`difflens` on PATH as this interpreter running this source tree."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "difflens"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m difflens "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", DIFFLENS_QUIET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return env


def _run_block(block: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)


@pytest.mark.slow
def test_readme_quickstart_runs_verbatim(tmp_path):
    blocks = code_blocks(section((ROOT / "README.md").read_text(encoding="utf-8"), "Quickstart"))
    block = next(b for b in blocks if b.lstrip().startswith("difflens"))
    work = tmp_path / "work"
    work.mkdir()
    r = _run_block(block, work, _shim(tmp_path))
    assert r.returncode == 0, f"Quickstart failed:\n{r.stderr[-3000:]}"
    for made in ("red.png", "red.json", "grid.png", "scenes/scene_00000.png", "store/manifest.json",
                 "dicts/topk-w256-k8/cfg.json", "eval/eval.json", "interp/report.md", "sweep.png"):
        assert (work / made).exists(), made


@pytest.mark.slow
def test_readme_gpu_users_block_on_a_tiny_saved_flux(tmp_path, tiny_folder):
    """Substitutions, and only these: the folder for the hub id, cpu for cuda and no offload (no GPU
    here), the tiny model's last block and size for FLUX's."""
    folder = tiny_folder("flux")
    blocks = code_blocks(section((ROOT / "README.md").read_text(encoding="utf-8"), "GPU users"))
    block = next(b for b in blocks if "black-forest-labs/FLUX.1-schnell" in b)
    subs = {"black-forest-labs/FLUX.1-schnell": str(folder), "--device cuda": "--device cpu", " --offload model": "",
            "transformer_blocks.18:img": "transformer_blocks.1:img", "--height 512 --width 512": "--height 32 --width 32"}
    for a, b in subs.items():
        assert a in block, a
        block = block.replace(a, b)
    work = tmp_path / "work"
    work.mkdir()
    (work / "prompts.txt").write_text("a red fox in the snow\na blue house\n")
    r = _run_block(block, work, _shim(tmp_path))
    assert r.returncode == 0, f"GPU users block failed:\n{r.stderr[-3000:]}"
    assert "free disk" in r.stderr and (work / "flux_store" / "manifest.json").exists()
    assert (work / "fox.png").exists() and (work / "fox.json").exists()
