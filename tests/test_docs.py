"""The manual's training commands compose as written: every override of a ``python -m train.run`` (or
launch/torchrun.sh, launch/slurm.sbatch) command in a bash block of the README and docs parses as the shell
hands it to Hydra and names keys the configs have, and a command that trains on shards of its own selects
a data config that reads them. (The brace-pattern examples once failed in Hydra's parser, and paper-scale
commands on a user's shards kept the synthetic data config.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
    "launch/README.md",
]
ENTRIES = ("-m train.run", "launch/torchrun.sh", "launch/slurm.sbatch")


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                entry = next((e for e in ENTRIES if e in line), None)
                if entry is None or line.lstrip().startswith("#"):
                    continue
                args = shlex.split(line.split(entry, 1)[1], comments=True)  # what the shell passes on
                found.append((doc, line.strip(), args))
    return found


COMMANDS = documented_commands()


def test_the_manual_has_training_commands_to_check():
    assert len(COMMANDS) >= 20 and {doc for doc, _, _ in COMMANDS} >= {"README.md", "launch/README.md"}


@pytest.mark.parametrize(
    "doc, line, args", COMMANDS, ids=[f"{d}:{i}" for i, (d, _, _) in enumerate(COMMANDS)]
)
def test_each_documented_training_command_composes(doc, line, args):
    overrides = [
        a
        for a in args
        if not a.startswith("-") and a not in ("...", "job") and not a.startswith(("hydra/", "hydra."))
    ]
    if "--multirun" in args:  # a sweep's first point: key=a,b,c -> key=a
        overrides = [o.split(",")[0] if "=" in o and "[" not in o else o for o in overrides]
    cfg = compose_config(overrides)
    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    generates = bool(OmegaConf.select(cfg, "data.synthetic.generate", default=False))
    if "data.train_shards" in given:
        assert not generates, f"{doc}: `{line}` trains on its own shards with data=synthetic: add data=shards"
    if cfg.stage_name in ("prior", "decoder"):
        has_clip = OmegaConf.select(cfg, "clip_ckpt", throw_on_missing=False) not in (None, "???")
        embedded = "data=embeddings" in overrides or "data=clip_retrieval" in overrides
        assert has_clip or embedded, (
            f"{doc}: `{line}`: stage={cfg.stage_name} needs clip_ckpt= (or data=embeddings)"
        )
