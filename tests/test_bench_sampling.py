"""bench/sampling.py's row parsing and paired comparison (the sampler study's statistics)."""
import os
import random

import pytest

from bench.sampling import comparisons, paired_difference, parse_setting


def test_parse_setting():
    assert parse_setting("ddim:50:2", 10) == dict(sampler="ddim", steps=50, guidance=2.0, n=10, eta=0.0)
    assert parse_setting("ddim:50:2:0.5", 10)["eta"] == 0.5
    assert parse_setting("ddpm:all:3.5", 4) == dict(sampler="ddpm", steps=None, guidance=3.5, n=4, eta=0.0)
    assert parse_setting("dpmpp2m:20:2:1", 4) == dict(sampler="dpmpp2m", steps=20, guidance=2.0, n=4, eta=1.0)
    for bad in ("ddim:50", "plms:10:2", "ddim:ten:2", "ddim:50:2:-1", "ddpm:all:2:1", "ddim:5:2:1:1"):
        with pytest.raises(SystemExit, match="sampler:steps:guidance"):
            parse_setting(bad, 1)


def test_comparisons_pair_rows_of_this_run_and_of_a_saved_study():
    """Each row is compared with the first of its run (with a speed ratio) and, caption by
    caption, with every saved row that has per-caption verdicts (no speed ratio)."""
    first = dict(sampler="ddim", steps=50, guidance=2.0, correct=[True, False] * 50, images_per_s=100.0)
    # eta=1 turns 10 of the first row's 50 failures into successes: +10 points, same captions.
    better = dict(first, eta=1.0, correct=[v or i < 20 for i, v in enumerate(first["correct"])],
                  images_per_s=50.0)
    saved = [dict(sampler="ddpm", steps=1000, guidance=2.0, correct=list(better["correct"]),
                  images_per_s=5.0)]
    lines = comparisons([first, better], saved, "study.json").splitlines()
    assert lines[0].startswith("DDIM 50 g=2 eta=1 vs DDIM 50 g=2 on the same 100 captions: "
                               "all-correct +10.0 points")
    assert lines[0].endswith("0.50x the speed")
    assert lines[1].startswith("DDIM 50 g=2 vs DDPM 1000 g=2 of study.json on the same 100 "
                               "captions: all-correct -10.0 points")
    assert "speed" not in lines[1]
    assert "all-correct +0.0 points (95% paired bootstrap [+0.0, +0.0])" in lines[2]  # identical
    assert len(lines) == 3


def test_paired_difference_closed_cases_and_coverage():
    a = [True, False] * 50
    assert paired_difference(a, a) == (0.0, 0.0, 0.0)  # identical verdicts: no spread at all
    mean, lo, hi = paired_difference([False] * 40, [True] * 40)
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    # b flips 10 of 200 of a's verdicts to True: +5 points, interval around it and not 0.
    rng = random.Random(0)
    a = [rng.random() < 0.4 for _ in range(200)]
    false_idx = [i for i, v in enumerate(a) if not v][:10]
    b = [v or i in false_idx for i, v in enumerate(a)]
    mean, lo, hi = paired_difference(a, b)
    assert mean == pytest.approx(0.05)
    assert 0.0 < lo < 0.05 < hi < 0.1


def test_relation_bench_tables_add_up():
    """bench.relation on real renders: every two-object caption lands in one outcome, and the
    true captions of real renders are all "correct"."""
    from bench.relation import layout_outcomes, names_left_first, two_object_captions
    from tti.data.shapes import generate_examples, render_example

    captions = two_object_captions(30)
    examples = [e for e in generate_examples(120, "val", seed=0) if len(e.scene.objects) == 2][:30]
    images = [render_example(e) for e in examples]
    table = layout_outcomes(images, captions)
    assert table["all"] == {"correct": 30}
    assert sum(table["left/top named first"].values()) + sum(table["left/top named second"].values()) == 30
    assert names_left_first("a small red circle to the left of a large blue square")
    assert not names_left_first("a small red circle to the right of a large blue square")
    assert names_left_first("below a large blue square there is a small red circle")  # blue is on top
    assert not names_left_first("a large blue square with a small red circle above it")


def test_order_separation_is_positive_on_the_data_and_zero_on_a_symmetric_image():
    import torch

    from bench.relation import colour_separation, data_separation

    assert data_separation(32, draws=64) > 4.0  # real layouts: A well to the left of B
    half = torch.zeros(3, 32, 32)
    half[0, :, :16], half[2, :, 16:] = 0.9, 0.9  # red left half, blue right half
    assert colour_separation(half, "red", "blue") > 8.0
    assert colour_separation(half, "blue", "red") < -8.0
    both = half + half.flip(-1)  # mirror-symmetric: no side preferred
    assert abs(colour_separation(both, "red", "blue")) < 1e-4


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A Gaussian tiny run: the study compares its samplers (DDIM, DPM++(2M), eta)."""
    from tiny_run import train_tiny_run

    return train_tiny_run(tmp_path_factory, ["model.objective=gaussian"])


def test_cli_writes_verdicts_and_compares_a_later_study_against_them(tiny_run, tmp_path_factory, capsys):
    """bench.sampling end to end on a tiny run: the .json keeps each row's per-caption verdicts;
    a second study with --against pairs its rows with them (identical settings: +0.0 points),
    and one over another number of captions is refused. Run again with the same --out, a
    study reuses the rows it kept."""
    import json

    from bench.sampling import main

    out = tmp_path_factory.mktemp("study") / "first.md"
    base = ["--checkpoint", tiny_run, "--n", "4", "--batch-size", "4", "--device", "cpu"]
    first = main(base + ["--settings", "ddim:2:2", "dpmpp2m:3:2", "--out", str(out)])
    saved = json.load(open(out.with_suffix(".json")))
    assert [r["sampler"] for r in saved] == ["gt", "ddim", "dpmpp2m"]
    assert saved[1]["correct"] == first[1]["correct"] and len(saved[1]["correct"]) == 4
    table = out.read_text()
    assert "vs row 1, points [95% CI]" in table and "| DPM++(2M) | 3 | 2 | 4 |" in table
    assert sorted(os.listdir(out.with_suffix(".rows"))) == ["ddim-2-g2-eta0-n4.pt", "dpmpp2m-3-g2-eta0-n4.pt"]
    capsys.readouterr()
    again = main(base + ["--settings", "ddim:2:2", "dpmpp2m:3:2", "--out", str(out)])
    assert capsys.readouterr().out.count("reusing the images sampled earlier") == 2
    assert [r["correct"] for r in again[1:]] == [r["correct"] for r in first[1:]]
    assert [r["seconds"] for r in again[1:]] == [r["seconds"] for r in first[1:]]

    main(base + ["--settings", "ddim:2:2", "ddim:2:2:1", "--against", str(out.with_suffix(".json"))])
    text = capsys.readouterr().out
    assert "| DDIM (eta 1) | 2 | 2 | 4 |" in text
    assert "DDIM 2 g=2 vs DDIM 2 g=2 of first.json on the same 4 captions: all-correct +0.0 points" in text
    assert "DDIM 2 g=2 eta=1 vs DDIM 2 g=2 of first.json" in text
    with pytest.raises(SystemExit, match="over 4 captions, this study over 3"):
        main(base[:2] + ["--n", "3", "--device", "cpu", "--settings", "ddim:2:2",
                         "--against", str(out.with_suffix(".json"))])


def test_guidance_sweep_draws_fid_and_accuracy_against_guidance(tiny_run, tmp_path_factory, monkeypatch):
    """--guidance-sweep: one row per guidance scale, FID on, and a PNG of both curves. The
    Inception is swapped for colour statistics (tests/test_evaluate.py explains why)."""
    import numpy as np
    from PIL import Image

    from bench.sampling import SWEEP_GUIDANCES, main
    from test_evaluate import colour_features
    from tti.eval.metrics import fid as fid_module

    monkeypatch.setattr(fid_module, "_run_inception",
                        lambda batches, device, total, progress: np.concatenate(
                            [colour_features(b) for b in batches]))
    out = tmp_path_factory.mktemp("sweep") / "sweep.md"
    results = main(["--checkpoint", tiny_run, "--n", "4", "--batch-size", "4", "--device", "cpu",
                    "--guidance-sweep", "--sweep-sampler", "dpmpp2m:2", "--out", str(out)])
    rows = results[1:]
    assert [r["guidance"] for r in rows] == list(SWEEP_GUIDANCES)
    assert all(r["sampler"] == "dpmpp2m" and r["steps"] == 2 and np.isfinite(r["fid"]) for r in rows)
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] > 600
    with pytest.raises(SystemExit, match="not sampler:steps"):
        main(["--checkpoint", tiny_run, "--n", "2", "--guidance-sweep", "--sweep-sampler", "plms:2"])
    with pytest.raises(SystemExit, match=r"objective \(gaussian\) samples with ddim, dpmpp2m, ddpm, not euler"):
        main(["--checkpoint", tiny_run, "--n", "2", "--guidance-sweep", "--sweep-sampler", "euler:2"])


def test_a_flow_checkpoint_is_studied_with_its_own_samplers(tmp_path_factory):
    """The quickstart's objective (rectified flow): Euler and Heun rows, the speed probe
    included, run on a flow checkpoint; Heun's evaluations count two a step but the last."""
    from bench.sampling import main, unet_evaluations
    from tiny_run import train_tiny_run

    run = train_tiny_run(tmp_path_factory)  # configs/shapes32.yaml: rectified flow
    results = main(["--checkpoint", run, "--n", "4", "--batch-size", "4", "--device", "cpu",
                    "--settings", "euler:2:2", "heun:2:2"])
    assert [r["sampler"] for r in results[1:]] == ["euler", "heun"]
    assert all(len(r["correct"]) == 4 for r in results[1:])
    assert unet_evaluations(dict(sampler="heun", steps=2, guidance=2.0, n=4), None) == 4 * 3 * 2
