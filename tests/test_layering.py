"""Imports point one way: data -> models / diffusion -> modules -> run / cascade -> eval -> pipeline.

Every import statement counts, function-local ones included (an import inside a function is still a
dependency). A rule names a set of modules and the packages they must not import; the allowances say
why an edge is there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# (modules, forbidden prefixes, what the rule keeps true)
RULES = [
    (
        ("train/models/", "train/diffusion/"),
        ("pytorch_lightning", "lightning", "deepspeed", "wandb", "hydra", "eval", "data", "train.modules"),
        "nets and the diffusion process are plain torch: usable without the trainer, the data or eval",
    ),
    (
        ("data/",),
        ("train", "eval"),
        "the data layer is the bottom: it imports no training or evaluation code",
    ),
    (("train/",), ("eval",), "training code never reaches up into evaluation (train/pipeline.py is the top)"),
    (("eval/",), ("train.pipeline",), "eval/ is below the pipeline that runs it"),
]
# Entry points that compose layers on purpose.
ALLOWED = {
    ("data/embed.py", "train.frozen_clip"): "`python -m data.embed` runs a trained CLIP over shards",
    ("train/pipeline.py", "eval"): "the pipeline trains every stage, then runs the benchmark and the probe",
}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from eval import sample`
    return names


def violations() -> list[str]:
    found = []
    for prefixes, forbidden, why in RULES:
        for prefix in prefixes:
            for path in sorted(REPO.glob(f"{prefix}**/*.py")):
                rel = str(path.relative_to(REPO))
                for name in sorted(imports(path)):
                    bad = [f for f in forbidden if name == f or name.startswith(f + ".")]
                    allowed = any(rel == a and (name == b or name.startswith(b + ".")) for a, b in ALLOWED)
                    if bad and not allowed:
                        found.append(f"{rel} imports {name}: {why}")
    return found


def test_imports_point_one_way():
    assert not violations(), "\n".join(violations())


@pytest.mark.parametrize("source", ["from eval.zeroshot import retrieval_recall", "import pytorch_lightning"])
def test_the_rules_catch_a_wrong_arrow(tmp_path, monkeypatch, source):
    """Negative control: a net that imported evaluation code or the trainer would be reported."""
    fake = tmp_path / "train" / "models" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(source + "\n")
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    assert violations() and "train/models/bad.py imports" in violations()[0]
