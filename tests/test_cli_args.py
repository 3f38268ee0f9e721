"""Out-of-range numbers and unknown devices on the command line are usage errors naming the option (exit
2), before any model loads. They failed deep inside: --n 0 in a reshape ("cannot reshape tensor of 0
elements"), --resample -1 as an UnboundLocalError, --iters 0 in statistics.median, --per-category 0 in
torch.cat, --device gpu in torch's device parser, and --fid-reference -5 silently skipped FID."""

from __future__ import annotations

import pytest

from eval import bench_sampler, bench_train, benchmark, probe, sample, zeroshot


@pytest.mark.parametrize(
    ("main", "argv", "said"),
    [
        (sample.main, ["text", "a red circle", "--cascade", "x", "--n", "0"], "argument --n: expected an integer >= 1, got 0"),
        (sample.main, ["text", "a red circle", "--cascade", "x", "--decoder-steps", "-3"], "argument --decoder-steps: expected an integer >= 1, got -3"),
        (sample.main, ["text", "a", "--cascade", "x", "--decoder-guidance", "strong"], "argument --decoder-guidance: expected a number >= 0, got 'strong'"),
        (sample.main, ["inpaint", "a.png", "--mask", "m.png", "--prompt", "red", "--cascade", "x", "--resample", "-1"], "argument --resample: expected an integer >= 0, got -1"),
        (sample.main, ["text", "a", "--cascade", "x", "--device", "gpu"], "argument --device: expected a torch device (cpu, cuda, cuda:N), got 'gpu'"),
        (benchmark.main, ["--cascade", "x", "--per-category", "0"], "argument --per-category: expected an integer >= 1, got 0"),
        (benchmark.main, ["--cascade", "x", "--fid-reference", "-5"], "argument --fid-reference: expected an integer >= 0, got -5"),
        (bench_train.main, ["--iters", "0"], "argument --iters: expected an integer >= 1, got 0"),
        (bench_train.main, ["--batch", "-2"], "argument --batch: expected an integer >= 1, got -2"),
        (probe.main, ["--cascade", "x", "--n", "0"], "argument --n: expected an integer >= 1, got 0"),
        (zeroshot.main, ["run", "--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
        (bench_sampler.main, ["--cascade", "x", "--reference", "0"], "argument --reference: expected an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_bad_numbers_and_devices_are_usage_errors_naming_the_option(main, argv, said, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert said in capsys.readouterr().err
