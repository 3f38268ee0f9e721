"""Issue 28's targets, met or not, from the rows a GPU check wrote.

    python -m eval.targets DIR [EARLIER ...]    # DIR: a gpu_check's results (its check.tar.gz unpacked):
                                                # bench.json, anchors.json, compiled.json, data.json
    python -m eval.targets --data-target DIR [EARLIER ...]    # the samples/s the data step must feed: the
                                                # fastest CLIP case, else 1.2x open_clip B/16 compiled (3,348)

EARLIER: the results of earlier calls on the same machine (gpu_check passes them, newest first): a file
this call did not write is read from the first of them that has it, so the second call of a session (the
cascade, the data step) is judged with the first call's benchmark rows; the output says which file came
from where.

Prints one markdown row per target: ours (the faster of eager and compiled), the anchor (measured in the
same run when it is there, else the figure an earlier session measured on an H200,
../shared/device/README.md, used only when the rows' ``meta.device`` is an H200 too or is not given) and
the verdict: met, not met, or not measured (a file or a row missing, a row that did not run, or a
speed-up with no anchor measured on this run's GPU).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

# One H200, bf16, measured by an earlier session (../shared/device/README.md): samples/s.
DOCUMENTED_ON = "H200"
DOCUMENTED = {
    ("open_clip_b16", "eager"): 1905.0,
    ("open_clip_b16", "compiled"): 2790.0,
    ("open_clip_l14", "compiled"): 796.0,
    ("diffusers_unet64", "compiled"): 354.0,
    ("dalle2_prior", "eager"): 2016.0,
}


@dataclass(frozen=True)
class Target:
    workload: str
    ours: str  # bench_train case
    mfu: float | None = None  # at least this model-FLOPs utilisation
    anchor: str | None = None  # bench_train anchor case, shown (and compared when speedup is set)
    anchor_mode: str = "eager"  # which of the anchor's figures: eager or compiled
    speedup: float | None = None  # at least this many times the anchor's samples/s

    def wanted(self) -> str:
        parts = [f">= {self.speedup:g}x {self.anchor} {self.anchor_mode}"] if self.speedup else []
        return ", ".join(parts + ([f">= {self.mfu:.0%} MFU"] if self.mfu else []))


TARGETS = (
    Target("CLIP ViT-B/16, batch 256", "clip_b16", mfu=0.55, anchor="open_clip_b16", anchor_mode="compiled", speedup=1.2),
    Target("CLIP ViT-L/14, batch 256", "clip_l14", mfu=0.65, anchor="open_clip_l14", anchor_mode="compiled"),
    Target("prior 768 wide x 12, batch 512", "prior", anchor="dalle2_prior", speedup=3.0),
    Target("decoder at GLIDE-64 widths, batch 64", "decoder", mfu=0.50, anchor="diffusers_unet64", anchor_mode="compiled"),
)  # fmt: skip
DATA_WORKERS = 12  # the data target: the fastest stage's per-GPU rate from at most this many cores
CLIP_B16_TARGET = 1.2 * DOCUMENTED["open_clip_b16", "compiled"]  # the data target without a CLIP row


class Results:
    """A call's results directory with earlier calls' behind it: ``results / name`` is the path of ``name``
    in the first directory that has it (this call's rows win), else in this call's."""

    def __init__(self, dirs) -> None:
        self.dirs = [Path(d) for d in dirs]

    def __truediv__(self, name: str) -> Path:
        return next((d / name for d in self.dirs if (d / name).exists()), self.dirs[0] / name)

    def borrowed(self) -> list[str]:
        """``name (dir)`` for each row file read from an earlier call's directory."""
        names = ("bench.json", "compiled.json", "anchors.json", "data.json")
        return [
            f"{n} ({(self / n).parent})"
            for n in names
            if (self / n).parent != self.dirs[0] and (self / n).exists()
        ]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if isinstance(data, dict) else data


def _ok(rows: list[dict], case: str) -> dict | None:
    return next((r for r in rows if r.get("case") == case and r.get("status") == "ok"), None)


def ours_best(out: Path | Results, case: str) -> tuple[dict, str] | None:
    """The faster of the eager (bench.json) and compiled (compiled.json) rows of ``case``."""
    found = [(r, mode) for name, mode in (("bench", "eager"), ("compiled", "compiled"))
             if (r := _ok(_rows(out / f"{name}.json"), case))]  # fmt: skip
    return max(found, key=lambda f: f[0]["samples_per_s"]) if found else None


def run_device(out: Path | Results) -> str | None:
    """The GPU the rows were measured on (their files' ``meta.device``), or None where none says."""
    for name in ("bench", "compiled", "anchors"):
        path = out / f"{name}.json"
        if path.exists() and isinstance(meta := json.loads(path.read_text()), dict):
            if device := (meta.get("meta") or {}).get("device"):
                return device
    return None


def anchor_rate(
    out: Path | Results, case: str, mode: str, device: str | None
) -> tuple[float | None, str] | None:
    """The anchor's samples/s in this run (anchors.json eager, compiled.json compiled), else the documented
    H200 figure where the rows are from an H200 too (or do not say): another GPU, an H100's slower memory
    say, would make the comparison unfair, so there the rate is None and the label says why. ``device``:
    :func:`run_device`."""
    row = _ok(_rows(out / ("anchors.json" if mode == "eager" else "compiled.json")), case)
    if row:
        return row["samples_per_s"], "this run"
    if (case, mode) in DOCUMENTED:
        if device is None or DOCUMENTED_ON in device:
            return DOCUMENTED[case, mode], "documented"
        return None, f"documented on an {DOCUMENTED_ON} only, this run on {device}"
    return None


def verdicts(out: Path | Results) -> list[dict]:
    rows, device = [], run_device(out)
    for t in TARGETS:
        row = {
            "workload": t.workload,
            "target": t.wanted(),
            "ours": "-",
            "anchor": "-",
            "met": "not measured",
        }
        best = ours_best(out, t.ours)
        rate, label = (anchor_rate(out, t.anchor, t.anchor_mode, device) if t.anchor else None) or (
            None,
            None,
        )
        if label:
            row["anchor"] = (
                f"{rate:,.0f}/s {t.anchor_mode} ({label})" if rate else f"{t.anchor_mode}: {label}"
            )
        if best:
            r, mode = best
            row["ours"] = f"{r['samples_per_s']:,.0f}/s, {r['mfu']:.1%} MFU ({mode})"
            checks = [r["mfu"] >= t.mfu] if t.mfu else []
            ratio = r["samples_per_s"] / rate if rate else None
            if ratio is not None:
                row["ours"] += f", {ratio:.2f}x the anchor"
            if t.speedup:
                checks.append(None if ratio is None else ratio >= t.speedup)
            row["met"] = "not measured" if None in checks else ("met" if all(checks) else "not met")
        rows.append(row)
    rows.append(data_verdict(out))
    return rows


def fastest_clip(out: Path | Results) -> float | None:
    """The fastest CLIP case's samples/s in this run (eager or compiled), or None."""
    clip = [b for c in ("clip_b16", "clip_l14") if (b := ours_best(out, c))]
    return max(r["samples_per_s"] for r, _ in clip) if clip else None


def data_verdict(out: Path | Results) -> dict:
    """Our loader at <= DATA_WORKERS workers against the fastest CLIP case's samples/s of this run."""
    row = {"workload": "data: JPEG decode + crop + batch", "ours": "-", "anchor": "-", "met": "not measured",
           "target": f"the fastest CLIP case's rate from <= {DATA_WORKERS} cores"}  # fmt: skip
    need = fastest_clip(out)
    loads = [
        r for r in _rows(out / "data.json") if r.get("loader") == "ours" and r["workers"] <= DATA_WORKERS
    ]
    plain = [
        r for r in _rows(out / "data.json") if r.get("loader") != "ours" and r["workers"] <= DATA_WORKERS
    ]
    if plain:
        best_plain = max(plain, key=lambda r: r["samples_per_s"])
        row["anchor"] = (
            f"{best_plain['samples_per_s']:,.0f}/s, {best_plain['workers']} workers ({best_plain['loader']})"
        )
    if loads:
        best = max(loads, key=lambda r: r["samples_per_s"])
        row["ours"] = f"{best['samples_per_s']:,.0f}/s, {best['workers']} workers"
        if need:
            row["target"] += f" ({need:,.0f}/s)"
            row["met"] = "met" if best["samples_per_s"] >= need else "not met"
    return row


def table(rows: list[dict]) -> str:
    lines = ["| workload | target | ours | anchor | met |", "|---|---|---|---|---|"]
    lines += [f"| {r['workload']} | {r['target']} | {r['ours']} | {r['anchor']} | {r['met']} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data_target = argv[:1] == ["--data-target"]
    dirs = argv[1:] if data_target else argv
    if not dirs or not all(Path(d).is_dir() for d in dirs):
        print(
            "usage: python -m eval.targets [--data-target] DIR [EARLIER ...]  (gpu_check results directories: "
            "a check.tar.gz unpacked)",
            file=sys.stderr,
        )
        return 2
    results = Results(dirs)
    if data_target:  # the samples/s gpu_check's data step must feed
        print(f"{fastest_clip(results) or CLIP_B16_TARGET:.0f}")
        return 0
    rows = verdicts(results)
    print(table(rows))
    met = sum(r["met"] == "met" for r in rows)
    print(f"\n{met} of {len(rows)} targets met; {sum(r['met'] == 'not measured' for r in rows)} not measured")
    if borrowed := results.borrowed():
        print(f"From earlier calls on this machine: {', '.join(borrowed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
