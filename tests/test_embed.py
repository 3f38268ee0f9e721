"""python -m data.embed: embedding shards from a trained CLIP run, split over ranks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data.embed import embed_shards, main
from data.pipeline import ShardDataset
from data.transforms import Normalize
from tests.conftest import first_batch, simple_sample, write_tar
from train.checkpoint import load_stage, resolve_run


def _read(out: Path) -> list[dict]:
    ds = ShardDataset(
        str(out),
        batch_size=1000,
        image_size=None,
        npy_fields=["img_emb.npy", "txt_emb.npy", "txt_feat.npy", "tokens.npy"],
        shuffle_buffer=0,
        shuffle_shards=False,
        keep_json=True,
    )
    return [b for b in ds if b["__key__"]]


def test_embedding_shards_match_the_model_and_ranks_split_the_shards(clip_run, tmp_path):
    run, val = clip_run
    out = tmp_path / "emb"
    results = [embed_shards(str(run), val, out, batch_size=16, rank=r, world_size=2) for r in (0, 1)]
    assert all(r["shards"] == 2 for r in results), "4 val shards over 2 ranks"
    batches = _read(out)
    keys = [k for b in batches for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 64 == sum(r["samples"] for r in results)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == 64 and len(sizes) == 4
    info = json.loads((out / "embed_info.json").read_text())
    assert info["normalize"] == "clip" and info["embed_dim"] == 128 and info["dtype"] == "float16"
    assert info["global_step"] == 2
    batch = batches[0]
    assert batch["img_emb.npy"].shape[1:] == (128,) and batch["txt_feat.npy"].shape[1:] == (16, 128)
    torch.testing.assert_close(
        batch["img_emb.npy"].norm(dim=-1), torch.ones(len(batch["__key__"])), atol=2e-3, rtol=0
    )
    # the stored embeddings are the model's, up to float16 rounding
    stage = load_stage(run)
    raw = ShardDataset(
        val,
        batch_size=1000,
        image_size=64,
        crop="center",
        tokenizer=stage.tokenizer,
        shuffle_buffer=0,
        shuffle_shards=False,
    )
    by_key = {}
    for b in raw:
        if b["__key__"]:
            with torch.no_grad():
                img = stage.net.encode_image(Normalize("clip")(b["image"]))
                txt = stage.net.encode_text(b["tokens"])
            by_key.update({k: (img[i], txt[i], b["tokens"][i]) for i, k in enumerate(b["__key__"])})
    for b in batches:
        for i, key in enumerate(b["__key__"]):
            torch.testing.assert_close(b["img_emb.npy"][i], by_key[key][0], atol=2e-3, rtol=0)
            torch.testing.assert_close(b["txt_emb.npy"][i], by_key[key][1], atol=2e-3, rtol=0)
            assert torch.equal(b["tokens.npy"][i].long(), by_key[key][2])
    assert all("scene" in j for b in batches for j in b["json"]), "the input json travels along"


def test_a_clip_trained_on_crops_embeds_and_evaluates_at_its_crop_size(clip_run, tmp_path):
    """data.image_size=72 with data.crop_size=64: the net takes 64 px crops; the frozen CLIP (prior,
    decoder, cascade), data.embed and eval.zeroshot fed it 72 px images and stopped ("net.vision.image_size=64
    but images are 72x72"). They resize to 72 and crop the centre 64, as the run's validation did."""
    import shutil

    from omegaconf import OmegaConf

    from eval.zeroshot import evaluate_run
    from train.frozen_clip import FrozenClip

    run, val = clip_run
    cropped = tmp_path / "run"
    shutil.copytree(run, cropped)
    config = OmegaConf.load(cropped / "config.yaml")
    assert config.data.image_size == 64 and config.data.crop_size is None
    config.data.image_size, config.data.crop_size = 72, 64
    OmegaConf.save(config, cropped / "config.yaml")
    clip = FrozenClip(cropped)
    assert (clip.image_size, clip.resize_size) == (64, 72)
    assert clip.embed(torch.zeros(2, 3, 72, 72, dtype=torch.uint8), None)["img_emb"].shape == (2, 128)
    result = embed_shards(str(cropped), val, tmp_path / "emb", batch_size=16)
    assert result["samples"] == 64
    info = json.loads((tmp_path / "emb" / "embed_info.json").read_text())
    assert (info["image_size"], info["resized_to"]) == (64, 72)
    assert 0 <= evaluate_run(str(cropped), shards=val)["i2t_r1"] <= 1


def test_loader_workers_write_the_same_shards_and_count_the_same_skips(clip_run, tmp_path):
    """workers=2: whole shards decoded in two loader processes, embedded and written by this one. The
    output tars are byte for byte those of workers=0, and a corrupt sample is skipped and counted once."""
    run, val = clip_run
    shards = sorted(Path(val).glob("*.tar"))
    bad = [simple_sample("b0"), {**simple_sample("b1"), "jpg": b"not a jpeg"}, simple_sample("b2")]
    write_tar(tmp_path / "in" / "bad.tar", bad)
    spec = "::".join([*map(str, shards[:2]), str(tmp_path / "in" / "bad.tar")])
    results = {w: embed_shards(str(run), spec, tmp_path / f"w{w}", batch_size=10, workers=w) for w in (0, 2)}
    for r in results.values():
        r.pop("seconds")
    assert results[0] == results[2] and results[2]["shards"] == 3 and results[2]["samples"] == 32 + 2
    skipped = {k: v for k, v in results[2].items() if k.startswith("skipped_")}
    assert sum(skipped.values()) == 1, skipped
    names = sorted(p.name for p in (tmp_path / "w0").glob("*.tar"))
    assert names == sorted([*(p.name for p in shards[:2]), "bad.tar"])
    for name in names:
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    assert (tmp_path / "w0" / "sizes.json").read_text() == (tmp_path / "w2" / "sizes.json").read_text()
    assert not list((tmp_path / "w2").glob(".*tmp*"))  # no temporary file left
    with pytest.raises(ValueError, match="workers=-1: expected an integer >= 0"):
        embed_shards(str(run), spec, tmp_path / "x", workers=-1)


def test_cli_and_its_errors(clip_run, tmp_path, capsys):
    run, val = clip_run
    assert main([f"ckpt={run}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 64
    assert main([f"ckpt={run}", "shards=x"]) == 2
    assert "missing option(s) ['out']" in capsys.readouterr().err
    assert main([f"ckpt={tmp_path / 'nope'}", f"shards={val}", f"out={tmp_path}"]) == 2
    assert "expected a run directory" in capsys.readouterr().err
    assert main([f"ckpt={run}", f"shards={val}", f"out={tmp_path}", "workers=two"]) == 2
    assert "workers='two': expected an integer" in capsys.readouterr().err
    # the same CLIP again into its own directory is fine, and so are its weights from elsewhere (a copy);
    # another CLIP's (here: another step's weights) are refused before any shard is written: the prior
    # would train on a mix of two CLIPs' embeddings
    assert main([f"ckpt={run}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 0
    shutil.copytree(run, tmp_path / "copy")
    assert main([f"ckpt={tmp_path / 'copy'}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 0
    info_path = tmp_path / "e" / "embed_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "global_step": 7, "clip_digest": "0" * 16}))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "e").iterdir()}
    assert main([f"ckpt={run}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 2
    err = capsys.readouterr().err
    assert f"out={tmp_path / 'e'} already holds embeddings of {info['checkpoint']} (step 7)" in err
    assert "(step 2): give a new out= directory" in err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "e").iterdir()} == before

    # A digest recorded before it hashed the whole weights (its strided values only) is still this CLIP's.
    # A CLIP that differs in one token's embedding (new tokens learnt with the rest frozen) is another: the
    # strided values alone missed it.
    info_path.write_text(json.dumps({**info, "clip_digest": info["clip_digest"].split(".")[0]}))
    assert main([f"ckpt={run}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 0
    # and stays what it was: the shards embedded before were checked by the strided values alone
    assert json.loads(info_path.read_text())["clip_digest"] == info["clip_digest"].split(".")[0]
    info_path.write_text(json.dumps(info))
    shutil.copytree(run, tmp_path / "one_token")
    _, newest = resolve_run(tmp_path / "one_token")
    state = torch.load(newest, map_location="cpu", weights_only=True)
    table = next(v for k, v in state["state_dict"].items() if k.endswith("token_embedding.weight"))
    assert table.numel() // 1024 > 1  # (flat index 1 is not among the strided values)
    table.view(-1)[1] += 0.01
    torch.save(state, newest)
    assert main([f"ckpt={tmp_path / 'one_token'}", f"shards={val}", f"out={tmp_path / 'e'}", "batch=32"]) == 2
    assert "already holds embeddings of" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_each_torchrun_rank_embeds_on_its_own_gpu_and_help_prints_usage(capsys):
    from data.embed import resolve_device

    assert resolve_device(None, {"LOCAL_RANK": "3", "RANK": "11"}, cuda=True) == "cuda:3"
    assert resolve_device("cuda", {"SLURM_LOCALID": "5"}, cuda=True) == "cuda:5"
    assert resolve_device("cuda:1", {"LOCAL_RANK": "3"}, cuda=True) == "cuda:1"  # explicit wins
    assert resolve_device(None, {"LOCAL_RANK": "3"}, cuda=False) == "cpu"
    with pytest.raises(ValueError, match=r"device='gpu': expected a torch device \(cpu, cuda, cuda:N\)"):
        resolve_device("gpu", {}, cuda=True)  # (torch's own error came from inside the first .to())
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m data.embed ckpt=" in out and "device=" in out


def test_the_clip_lands_on_the_device_it_is_loaded_to(clip_run, tmp_path):
    """data.embed on a GPU loads its CLIP with map_location=cuda:N. The net was built on the CPU and the
    weights copied into it there, so embedding ran on the CPU while done.json said cuda:0. The meta
    device stands in for a GPU: the net, its weights and the CLIP's device are where they were asked to
    be, from a run directory and from an export."""
    from train.checkpoint import export_stage
    from train.frozen_clip import FrozenClip

    run, _ = clip_run
    export = export_stage(run, tmp_path / "export")
    assert FrozenClip(run, map_location="meta").device.type == "meta"
    for path in (run, export):
        net = load_stage(path, map_location="cpu").net
        assert {p.device.type for p in net.parameters()} == {"cpu"}
    assert {p.device.type for p in load_stage(run, map_location="meta").net.parameters()} == {"meta"}


def test_the_clip_embeds_in_fp32_under_a_training_steps_bf16_autocast(clip_run):
    """A decoder trained on image-text shards embeds each batch inside its bf16-mixed training step, while
    data.embed and the cascade embed outside any autocast: bf16 moved the embeddings and token features
    by 0.2-0.5% (mean relative, CPU autocast, the 32 px recipe's CLIP on 64 held-out images), so the
    decoder trained on other conditionings than it sampled from. FrozenClip now embeds in fp32 under
    any autocast."""
    from train.frozen_clip import FrozenClip

    run, val = clip_run
    clip = FrozenClip(run)
    batch = first_batch(val, clip.tokenizer, 8)
    plain = clip.embed(batch["image"], batch["tokens"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = clip.embed(batch["image"], batch["tokens"])
    for key in ("img_emb", "txt_emb", "txt_feat"):
        assert mixed[key].dtype == torch.float32 and torch.equal(mixed[key], plain[key]), key
    # the embedding and the token features from one pass of the text tower (it ran twice), and the same
    # as the net's encode_text and hidden_states give them
    passes = []
    clip.net.text.transformer.register_forward_hook(lambda *_: passes.append(1))
    out = clip.embed(None, batch["tokens"])
    assert len(passes) == 1
    with torch.no_grad():
        assert torch.equal(out["txt_emb"], clip.net.encode_text(batch["tokens"]).half().float())
        assert torch.equal(out["txt_feat"], clip.net.text.hidden_states(batch["tokens"]).half().float())


def test_shards_of_the_same_file_name_are_refused_before_anything_is_written(tmp_path):
    """Two img2dataset runs both have 00000.tar: embedded together, each output shard was written twice
    and the last kept (4 shards in, 2 out, half the embeddings lost, exit 0). Refused, naming both, before
    the CLIP loads (here a path that does not exist) or anything is written."""
    for part in ("part1", "part2"):
        for i in range(2):
            write_tar(tmp_path / part / f"{i:05d}.tar", [simple_sample(f"{part}_{i}")])
    out = tmp_path / "emb"
    spec = f"{tmp_path}/part1/{{00000..00001}}.tar::{tmp_path}/part2"
    with pytest.raises(
        ValueError, match=r"part1/00000.tar and .*part2/00000.tar would both be embedded into 00000.tar"
    ):
        embed_shards(str(tmp_path / "no.ckpt"), spec, out)
    assert not out.exists()


def test_url_shards_are_embedded_under_their_file_name_without_the_query():
    from data.embed import _output_names

    urls = ["https://host/laion/00001.tar?download=true", "https://host/laion/00007.tar", "pipe:cat x.tar"]
    assert _output_names(urls) == ["00001.tar", "00007.tar", "00002.tar"]
