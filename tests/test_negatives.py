"""Hard-negative captions (data/negatives.py) and the CLIP picks that measure them (train/validation.py)."""

from __future__ import annotations

import pytest
import torch

from data.negatives import flip_relation, hard_negatives, swap_colours, swap_object_colours
from data.synthetic import caption_for, make_scene


@pytest.mark.parametrize(
    "caption, want",
    [
        ("a red circle and a blue square", "a blue circle and a red square"),
        ("an orange triangle and a yellow diamond", "a yellow triangle and an orange diamond"),
        (
            "A picture of two cyan stars left of an orange cross",
            "A picture of two orange stars left of a cyan cross",
        ),
        ("Red car, GREEN door", "Green car, RED door"),
        ("a red square and a red circle", None),  # one colour: nothing to exchange
        ("three blue squares", None),
        ("a pink triangle on a grey background", "a grey triangle on a pink background"),
    ],
)
def test_swap_colours_exchanges_the_first_two_distinct_colours_and_fits_the_articles(caption, want):
    assert swap_colours(caption) == want


@pytest.mark.parametrize(
    "caption, want",
    [
        ("a red circle and a blue square", "a blue circle and a red square"),
        (
            "a picture of an orange star left of a cyan cross",
            "a picture of a cyan star left of an orange cross",
        ),
        ("two red circles and a blue square", None),  # which colour has more objects: a shortcut
        (
            "a red circle and a blue square on a grey background",
            "a blue circle and a red square on a grey background",
        ),
        ("a pink triangle on a grey background", None),  # which colour is the background's: a shortcut
        ("two red circles and two blue squares", None),  # equal counts, but no article to say so
    ],
)
def test_binding_negatives_exchange_the_colours_of_single_objects_only(caption, want):
    assert swap_object_colours(caption) == want


def test_flip_relation_reverses_the_first_spatial_word():
    assert flip_relation("a red star left of a blue circle") == "a red star right of a blue circle"
    assert flip_relation("Above: a cat below a dog") == "Below: a cat below a dog"
    assert flip_relation("a red star and a blue circle") is None


def test_every_two_group_synthetic_caption_has_a_negative_that_no_longer_describes_it():
    captions = [caption_for(make_scene(0, i), 0, i) for i in range(300)]
    scenes = [make_scene(0, i) for i in range(300)]
    colour, binding, relation = hard_negatives(captions, ["colour", "binding", "relation"])
    for caption, scene, neg_c, neg_b, neg_r in zip(captions, scenes, colour, binding, relation):
        groups = scene["groups"]
        if len(groups) == 2 and groups[0]["colour"] != groups[1]["colour"]:
            assert neg_c is not None and neg_c != caption
        single_objects = len(groups) == 2 and groups[0]["count"] == groups[1]["count"] == 1
        assert (neg_b is not None) == (single_objects and groups[0]["colour"] != groups[1]["colour"]), caption
        if scene["relation"] is not None:
            assert neg_r is not None and neg_r != caption
        else:
            assert neg_r is None, caption
        if neg_c is not None:  # the same words, two of them exchanged (articles aside)
            changed = [(a, b) for a, b in zip(caption.split(), neg_c.split()) if a != b]
            assert len(caption.split()) == len(neg_c.split()) and 2 <= len(changed) <= 4, (caption, neg_c)
    assert sum(c is not None for c in colour) > 100 and sum(r is not None for r in relation) > 50
    assert 20 < sum(b is not None for b in binding) < sum(c is not None for c in colour)
    with pytest.raises(
        ValueError,
        match=r"hard_negatives=\['color'\]: expected distinct kinds among \['colour', 'binding', 'relation'\]",
    ):
        hard_negatives(captions, ["color"])


def test_contrast_picks_measure_whether_the_text_side_tells_a_caption_from_its_negative():
    from data.tokenizer import build_tokenizer
    from train.validation import contrast_picks

    captions = ["a red circle and a blue square", "a red star left of a green cross", "two pink stars"]
    corpus = [caption_for(make_scene(0, i), 0, i) for i in range(200)]
    tok = build_tokenizer("bpe", context_length=16, vocab_size=1024, captions=corpus)
    vocab = {}

    def bag_of_words(tokens: torch.Tensor) -> torch.Tensor:
        """A text encoder that sees only which tokens occur: blind to which colour goes with which shape."""
        out = torch.zeros(tokens.shape[0], 64)
        for i, row in enumerate(tokens.tolist()):
            for t in row:
                out[i, vocab.setdefault(t, len(vocab) % 64)] += 1.0
        return out

    img = bag_of_words(tok(captions))
    picks = contrast_picks(img, img, captions, bag_of_words, tok)
    # exchanged colours leave the bag unchanged (a tie: half); a reversed relation changes a word
    assert picks == {
        "pick_colour": 0.5,
        "pick_colour_n": 2.0,
        "pick_binding": 0.5,
        "pick_binding_n": 2.0,
        "pick_relation": 1.0,
        "pick_relation_n": 1.0,
    }

    def ordered(tokens: torch.Tensor) -> torch.Tensor:
        """One that also sees word order: the image features equal its caption's, so it always picks it."""
        return torch.nn.functional.one_hot(tokens % 32, 32).float().flatten(1)

    img = ordered(tok(captions))
    assert contrast_picks(img, img, captions, ordered, tok)["pick_colour"] == 1.0


def test_hard_negatives_are_tokenised_in_the_loader_workers_and_train_as_on_the_host(tmp_path, monkeypatch):
    """The CLIP's hard negatives were made and tokenised on the training process's host at every step (20-60
    ms at 512 captions: host-bound on a GPU); the data workers make them with the batch now. The module takes
    them from the batch (never tokenising) and computes the same loss as from captions."""
    from data.pipeline import ShardDataset
    from data.tokenizer import build_tokenizer
    from tests.conftest import simple_sample, write_tar
    from tests.test_losses import tiny
    from train.modules.clip import ClipModule

    captions = [
        "a red circle and a blue square",
        "three blue squares",
        "a green star left of a red cross",
    ] * 2
    write_tar(
        tmp_path / "s" / "0.tar", [simple_sample(f"k{i}", c, size=(16, 16)) for i, c in enumerate(captions)]
    )
    tok = build_tokenizer("bpe", context_length=6, vocab_size=600, captions=captions * 20)
    kinds = ["colour", "relation"]
    ds = ShardDataset(str(tmp_path / "s"), batch_size=6, image_size=16, tokenizer=tok, hard_negatives=kinds,
                      shuffle_buffer=0, shuffle_shards=False)  # fmt: skip
    batch = next(b for b in ds if b["__key__"])
    flat = [c for kind in hard_negatives(batch["caption"], kinds) for c in kind]
    assert torch.equal(batch["negative_tokens"], tok([c or "" for c in flat]))
    assert (
        batch["negative_mask"].tolist() == [c is not None for c in flat] and batch["negative_mask"].sum() == 6
    )

    net = tiny()
    net.text.token_embedding = torch.nn.Embedding(tok.vocab_size, 32)
    module = ClipModule(net, tokenizer=tok, zeroshot=False, hard_negatives=kinds)
    module.log, module.log_lr, module._trainer = (lambda *a, **k: None), (lambda: None), object()
    monkeypatch.setattr("train.modules.clip.logs_this_step", lambda trainer: False)
    batch["image"] = batch["image"].float() / 127.5 - 1
    torch.manual_seed(0)
    from_batch = module.training_step(batch, 0)
    host = {k: v for k, v in batch.items() if not k.startswith("negative_")}
    torch.manual_seed(0)
    from_captions = module.training_step(host, 0)
    assert torch.equal(from_batch, from_captions)
    monkeypatch.setattr(module, "tokenizer", None)  # a batch with its negatives: nothing to tokenise here
    assert torch.equal(module.training_step(batch, 0), from_batch)


@pytest.mark.slow
def test_clip_trains_with_hard_negatives_and_validation_reports_the_picks(tmp_path):
    from hydra.errors import InstantiationException

    from tests.conftest import compose_config
    from train.run import train

    overrides = [
        "debug=fast",
        f"paths.data_dir={tmp_path / 'datasets'}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "data.val_batch_size=64",  # every held-out caption: enough of each kind of negative to pick among
    ]
    metrics = train(
        compose_config(
            [*overrides, f"paths.output_dir={tmp_path / 'neg'}", "module.hard_negatives=[colour,relation]"]
        )
    )
    assert 0.0 <= float(metrics["val/pick_colour"]) <= 1.0 and float(metrics["val/pick_colour_n"]) > 5
    assert float(metrics["val/pick_relation_n"]) > 2
    # a third of the synthetic captions or so have a negative of a kind: the mean over both kinds
    assert 0.1 < float(metrics["train/negatives_frac"]) < 0.7
    with pytest.raises(
        InstantiationException, match=r"module.hard_negatives=\['shape'\]: expected distinct kinds"
    ):
        train(
            compose_config(
                [*overrides, f"paths.output_dir={tmp_path / 'bad'}", "module.hard_negatives=[shape]"]
            )
        )
