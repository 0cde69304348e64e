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

Where each file is written matters on several nodes (`trainer.nnodes > 1`) when
`trainer.default_local_dir` is each node's own disk: every actor rank writes its shards on its node,
actor rank 0 writes `perl_adapter/` and `perl_state.pt` on its node, and verl's trainer process (a Ray
actor, which Ray usually places on the driver's node) writes `data.pt`, the marker and the manifest on
its node. verl itself needs no shared filesystem (each rank reloads its own shards; the engine's rank
0 reads `perl_state.pt` and broadcasts it), but the driver reads the adapter and the marker after
training for the held-out evaluation. A file it misses there raises `NotOnThisNode`, which says why
and what to do, instead of a bare FileNotFoundError.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from perl.io import file_sha256
from perl.verl_glue.run_dir import LATEST, latest_step

MANIFEST = "perl_manifest.json"
HASHED_UP_TO = 64 << 20  # files up to 64 MiB are hashed (configs, adapters, the toy's shards); larger ones: size
STEP_PREFIX = "global_step_"


class NotOnThisNode(ValueError):
    """A file of the run directory that the driver needs is not on the driver's node (see the module
    docstring); `perl train` prints it as one error line (exit 2)."""


def not_on_this_node(path: str, needed_for: str, nnodes: int, *, otherwise: str,
                     later: str | None = None) -> NotOnThisNode:
    """The error for a missing `path` that `needed_for` reads. With several nodes the likely cause is
    a node-local run directory, and the fix is a shared one (or evaluating later, `later`, on the
    node that has the checkpoint); on one node it is not, and `otherwise` says what is."""
    if int(nnodes) <= 1:
        return NotOnThisNode(f"{path} is missing, and {needed_for} needs it: {otherwise}")
    fix = ("put trainer.default_local_dir on a filesystem every node mounts (NFS, a cluster filesystem)"
           + ("" if later is None else f", or run with perl.heldout.data=null and evaluate on the node that "
                                       f"has the checkpoint afterwards: {later}"))
    return NotOnThisNode(
        f"{path} is missing on this node ({socket.gethostname()}), and {needed_for} needs it. With "
        f"trainer.nnodes={nnodes}, verl's rank 0 and its trainer process write the adapter and {LATEST} on "
        f"their own nodes, and the driver reads them only where trainer.default_local_dir is shared by all "
        f"nodes. To fix it, {fix}")


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
    moved = ""
    if os.path.isdir(damaged):  # a marker naming a directory that is gone (deleted by hand): nothing to move
        aside = f"{damaged}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(damaged, aside)
        moved = f"moved it to {aside}; "
    from perl.io import atomic_file

    with atomic_file(os.path.join(run_dir, LATEST)) as tmp, open(tmp, "w") as f:
        f.write(str(intact[0]))
    return ResumePlan(intact[0], [f"[perl] {what}",
                                  f"[perl] {moved}resuming from checkpoint {intact[0]}, the newest intact one"])
