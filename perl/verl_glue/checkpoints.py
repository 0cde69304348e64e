"""Checkpoints that prove themselves: a manifest after each save, verified before a resume.

verl writes `global_step_N/` (its shards, the dataloader state; PeRL's engine adds `perl_adapter/`
and `perl_state.pt`) and then `latest_checkpointed_iteration.txt`, so a save cut by a kill or a
full disk leaves the marker on the previous checkpoint. What verl cannot tell is a checkpoint
damaged after it was written (a truncated shard, a half-copied directory): it loads it inside its
workers and crashes with a Ray traceback. So after each save PeRL's trainer writes
`global_step_N/perl_manifest.json` (every file's size, a SHA-256 of the files up to
`HASHED_UP_TO`), atomically; before Ray starts, the entry point verifies the checkpoint verl would
resume from (`resume_plan`).

A damaged checkpoint is skipped, not refused: it is moved aside whole to
`global_step_N.damaged-<time>` (nothing is deleted), the marker goes back to the newest intact
checkpoint, and the console says which file was damaged and which step the run resumes from. The
alternative, refusing, would leave the user to do exactly that by hand; the damaged directory
stays for inspection either way. With no intact checkpoint left the run is refused, naming the
damaged file. Written by hand: verl 0.9.1 has no checkpoint verification.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from perl.io import file_sha256
from perl.verl_glue.run_dir import LATEST, latest_step

MANIFEST = "perl_manifest.json"
HASHED_UP_TO = 64 << 20  # files up to 64 MiB are hashed (configs, adapters, the toy's shards); larger ones: size
STEP_PREFIX = "global_step_"


def step_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"{STEP_PREFIX}{step}")


def _files(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel != MANIFEST and not name.startswith("."):
                out.append(rel)
    return sorted(out)


def write_manifest(run_dir: str, step: int) -> str:
    """`global_step_N/perl_manifest.json`: every file of the checkpoint with its size (and hash)."""
    from perl.io import atomic_file

    root = step_dir(run_dir, step)
    entries = {}
    for rel in _files(root):
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        entries[rel] = {"size": size, **({"sha256": file_sha256(path)} if size <= HASHED_UP_TO else {})}
    path = os.path.join(root, MANIFEST)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump({"step": step, "files": entries}, f, indent=1)
    return path


def verify(run_dir: str, step: int) -> list[str]:
    """What is wrong with checkpoint `step` (empty: intact). A checkpoint without a manifest (written
    before PeRL kept them) cannot be verified and counts as intact."""
    root = step_dir(run_dir, step)
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        return [f"{root} is missing"]
    if not os.path.exists(path):
        return []
    try:
        entries = json.load(open(path))["files"]
    except (OSError, ValueError, KeyError) as e:
        return [f"{path} is unreadable ({e})"]
    problems = []
    for rel, want in entries.items():
        file = os.path.join(root, rel)
        if not os.path.exists(file):
            problems.append(f"{rel} is missing")
            continue
        size = os.path.getsize(file)
        if size != want["size"]:
            problems.append(f"{rel} has {size:,} bytes, {want['size']:,} when saved")
        elif "sha256" in want and file_sha256(file) != want["sha256"]:
            problems.append(f"{rel} changed since it was saved (SHA-256 differs)")
    return problems


@dataclass
class ResumePlan:
    step: int  # the checkpoint verl will resume from (0: from scratch)
    messages: list[str] = field(default_factory=list)


def saved_steps(run_dir: str) -> list[int]:
    steps = []
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        suffix = name[len(STEP_PREFIX):]
        if name.startswith(STEP_PREFIX) and suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps, reverse=True)


def resume_plan(run_dir: str) -> ResumePlan:
    """Verify the checkpoint verl would resume from; a damaged one is moved aside and the marker
    set to the newest intact checkpoint before it (with a manifest, so known to be whole). Raises
    ValueError when none is left."""
    step = latest_step(run_dir)
    if step == 0:
        return ResumePlan(0)
    problems = verify(run_dir, step)
    if not problems:
        return ResumePlan(step)
    damaged = step_dir(run_dir, step)
    intact = [s for s in saved_steps(run_dir) if s < step and os.path.exists(os.path.join(step_dir(run_dir, s), MANIFEST))
              and not verify(run_dir, s)]
    what = f"checkpoint {step} ({damaged}) is damaged: {'; '.join(problems[:3])}"
    if not intact:
        raise ValueError(f"{what}; no intact checkpoint before it. Move {damaged} away (or delete the run "
                         "directory) to start over")
    aside = f"{damaged}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(damaged, aside)
    from perl.io import atomic_file

    with atomic_file(os.path.join(run_dir, LATEST)) as tmp, open(tmp, "w") as f:
        f.write(str(intact[0]))
    return ResumePlan(intact[0], [f"[perl] {what}", f"[perl] moved it to {aside}; resuming from checkpoint "
                                                    f"{intact[0]}, the newest intact one"])
