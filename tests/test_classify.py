"""eval.classify: zero-shot classification of a labelled image folder (ours or an open_clip checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval import classify

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


class ColourNet(torch.nn.Module):
    """A CLIP that knows colours: an image embeds as the one-hot of its strongest channel (R, G, B), a prompt
    as the one-hot of the colour word it names."""

    words = ("red", "green", "blue")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x.mean((2, 3)).argmax(1), 3).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(tokens[:, 0], 3).float()


def colour_tokenizer(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([[next(i for i, w in enumerate(ColourNet.words) if w in p)] for p in prompts])


def folder(root, counts: dict[str, int], strays: dict[str, str] | None = None) -> None:
    """root/<class>/<n>.png of the class's colour (uneven sizes, 48x32 to check the centre crop), and
    ``strays``: one image of another colour in a class."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (48, 32), COLOURS[name]).save(root / name / f"{i}.png")
    for name, colour in (strays or {}).items():
        Image.new("RGB", (40, 40), COLOURS[colour]).save(root / name / "stray.png")


def test_scores_are_exact_on_a_net_that_knows_the_answer_and_a_bad_file_is_skipped(tmp_path):
    folder(tmp_path / "val", {"blue": 2, "green": 3, "red": 5}, strays={"green": "red"})
    (tmp_path / "val" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    classes, items = classify.image_folder(tmp_path / "val")
    assert classes == ["blue", "green", "red"] and len(items) == 12  # (broken.jpg included: read later)
    result = classify.classify(ColourNet(), colour_tokenizer, items, classes, image_size=16, batch_size=4)
    assert (result["n"], result["skipped"]) == (11, 1) and "broken.jpg" in result["skipped_files"][0]
    assert result["top1"] == pytest.approx(10 / 11)  # the stray red image in green/ is called red
    assert result["per_class"] == pytest.approx({"blue": 1.0, "green": 3 / 4, "red": 1.0})
    assert result["mean_per_class_recall"] == pytest.approx((1 + 3 / 4 + 1) / 3)
    assert result["top5"] == 1.0  # (3 classes: top-3)
    # class names in another order than the sorted subdirectories: every image is called wrong
    wrong = classify.classify(ColourNet(), colour_tokenizer, items, ["red", "blue", "green"], image_size=16)
    assert wrong["top1"] == 0.0


def test_the_cli_names_what_it_cannot_take(tmp_path, capsys):
    folder(tmp_path / "val", {"blue": 1, "red": 1})
    (tmp_path / "names.txt").write_text("blue\nred\ngreen\n")
    (tmp_path / "prompts.txt").write_text("a photo\n")
    cases = [
        (["run", "--images", str(tmp_path / "nowhere")], "--images " + str(tmp_path / "nowhere") + ": not a directory"),
        (["run", "--images", str(tmp_path / "val" / "red")], "no class subdirectories"),
        (["run", "--images", str(tmp_path / "val"), "--classnames", str(tmp_path / "names.txt")],
         "3 names for the 2 class subdirectories"),
    ]  # fmt: skip
    for argv, message in cases:
        assert classify.main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(
        ValueError, match=r"each prompt needs one '\{\}' for the class name, got \['a photo'\]"
    ):
        classify.classifier(ColourNet(), colour_tokenizer, ["red"], ["a photo"], "cpu")


def test_a_run_of_ours_and_its_open_clip_export_classify_alike(clip_run, tmp_path, capsys):
    """The CLI on the tiny CLIP run (synthetic shapes sorted by shape into folders; the dataset's caption
    words as prompts), and on an open_clip hub directory of a CLIP with open_clip's stem, read with a CLIP
    BPE file: the same scores as the net in memory."""
    from data.synthetic import make_scene, render
    from data.tokenizer import clip_tokenizer
    from train.models.clip import CLIP
    from train.models.openclip_import import save_open_clip

    run, _ = clip_run
    root = tmp_path / "shapes"
    kept = 0
    for index in range(200):
        scene = make_scene(7, index)
        if len(scene["objects"]) == 1 and kept < 24:
            shape = scene["objects"][0]["shape"]
            (root / shape).mkdir(parents=True, exist_ok=True)
            render(scene, 64).save(root / shape / f"{index}.png")
            kept += 1
    (tmp_path / "prompts.txt").write_text("a {}\na picture of a {}\n")
    assert classify.main([str(run), "--images", str(root), "--templates", str(tmp_path / "prompts.txt"),
                          "--json"]) == 0  # fmt: skip
    ours = json.loads(capsys.readouterr().out)
    assert ours["n"] == 24 and ours["skipped"] == 0 and 0 <= ours["top1"] <= ours["top5"] <= 1

    merges = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    import gzip

    merges.write_bytes(gzip.compress("\n".join(["#version: 0.2", "c i", "ci r", "s q"]).encode()))
    tokenizer = clip_tokenizer(merges, context_length=12)
    torch.manual_seed(0)
    net = CLIP(embed_dim=16, vision={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
               text={"context_length": 12, "vocab_size": tokenizer.vocab_size, "width": 32, "layers": 1,
                     "heads": 2}, eot_id=tokenizer.eot_id)  # fmt: skip
    save_open_clip(net, tmp_path / "hub")
    assert (
        classify.main([str(tmp_path / "hub"), "--images", str(root), "--tokenizer", str(merges), "--json"])
        == 0
    )
    theirs = json.loads(capsys.readouterr().out)
    classes, items = classify.image_folder(root)
    direct = classify.classify(net.eval(), tokenizer, items, classes, image_size=32)
    per_class = direct.pop("per_class")
    assert theirs.pop("per_class") == pytest.approx(per_class)
    assert theirs.pop("skipped_files") == direct.pop("skipped_files") == []
    assert theirs == pytest.approx(direct)
    assert np.isclose(sum(per_class.values()) / len(per_class), direct["mean_per_class_recall"])


def test_evaluation_sees_every_patch_of_a_net_left_in_training_mode(clip_run):
    """eval.zeroshot.evaluate_net and eval.classify put the net in evaluation mode: a CLIP trained with
    patch dropout and handed over in training mode was evaluated on half its patches (and a prompt with
    other braces than {} failed in str.format)."""
    from eval.zeroshot import evaluate_net
    from train.checkpoint import load_stage

    run, val = clip_run
    stage = load_stage(run)
    kwargs = {"image_size": stage.cfg.data.image_size, "normalize": stage.cfg.data.normalize}
    want = evaluate_net(stage.net, stage.tokenizer, val, **kwargs)
    stage.net.visual.patch_dropout = 0.5
    assert evaluate_net(stage.net.train(), stage.tokenizer, val, **kwargs) == want
    assert not stage.net.training
    weights = classify.classifier(ColourNet(), colour_tokenizer, ["red"], ["a {} in {braces}"], "cpu")
    assert weights.shape == (3, 1)
