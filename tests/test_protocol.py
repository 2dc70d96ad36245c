"""The published COCO 256 protocol one flag away: `tti.export --protocol coco-fid30k` draws
30,000 val captions (here capped at the fixture's 8 val images) from a 256 px model, and
`tti.evaluate` scores them against every val image cut and resized as U-ViT does, with
pytorch-fid's resize, and says so. FID runs through the stand-in features of test_evaluate."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from tti import evaluate, export
from tti.eval.metrics import fid as fid_module
from tti.eval.protocols import COCO_FID30K, ProtocolError, check_image_size, reference_image

from test_evaluate import colour_features, fake_inception  # noqa: F401  (a fixture)
from test_latent_store import latent_run


@pytest.fixture(scope="module")
def protocol_export(coco_fixture, tiny_vae, tmp_path_factory):
    """A 1-step latent run at 256 px, exported under the protocol."""
    run = latent_run(coco_fixture, tiny_vae, tmp_path_factory.mktemp("results"), 1,
                     "train.ckpt_every=1", "train.deterministic=false")
    out = str(tmp_path_factory.mktemp("eval") / "eval_data_run_0")
    export.main(["--checkpoint", run, "--out-dir", out, "--protocol", "coco-fid30k",
                 "--steps", "2", "--device", "cpu"])
    return out


def test_the_export_follows_the_protocol(protocol_export, capsys):
    info = json.load(open(os.path.join(protocol_export, "export_info.json")))
    assert info["protocol"] == "coco-fid30k" and info["n"] == 8  # 30,000 capped at the val size
    names = sorted(os.listdir(os.path.join(protocol_export, "tti", "images")))
    assert len(names) == 8
    assert Image.open(os.path.join(protocol_export, "tti", "images", names[0])).size == (256, 256)
    with pytest.raises(SystemExit):
        export.parse_args(["--checkpoint", protocol_export, "--protocol", "coco-fid30k", "--n", "10"])
    assert "exports 30000 images; leave out --n" in capsys.readouterr().err
    check_image_size(COCO_FID30K, 256)
    with pytest.raises(ProtocolError, match="compares 256x256 images; this model makes 64x64"):
        check_image_size(COCO_FID30K, 64)


def uvit_reference(path):
    """U-ViT's datasets.center_crop with its Lanczos resize, written out independently."""
    img = np.array(Image.open(path).convert("RGB")).astype(np.uint8)
    crop = np.min(img.shape[:2])
    img = img[(img.shape[0] - crop) // 2: (img.shape[0] + crop) // 2,
              (img.shape[1] - crop) // 2: (img.shape[1] + crop) // 2]
    return np.array(Image.fromarray(img, "RGB").resize((256, 256), Image.LANCZOS)).astype(np.uint8)


def test_the_reference_is_every_val_image_cut_as_uvit_does(coco_fixture):
    for image_id in coco_fixture.splits["val2014"]:
        path = coco_fixture.path(image_id)
        assert np.array_equal(reference_image(path, 256), uvit_reference(path))


def pytorch_fid_features(arrays):
    x = torch.stack([torch.tensor(a).permute(2, 0, 1).float() / 255 for a in arrays])
    return colour_features(2 * torch.nn.functional.interpolate(x, size=(299, 299),
                                                               mode="bilinear") - 1)


def test_evaluate_scores_against_the_whole_val_split(protocol_export, coco_fixture,
                                                      fake_inception, tmp_path):  # noqa: F811
    cache = tmp_path / "fid_cache"
    result = evaluate.evaluate(protocol_export, metrics=("fid",), progress=False,
                               fid_cache_dir=str(cache))
    assert result["fid_protocol"] == "coco-fid30k" and result["fid_resize"] == "pytorch-fid"
    assert result["fid_reference"].startswith("all 8 images of val2014, 256 px")
    folder = os.path.join(protocol_export, "tti", "images")
    ref = pytorch_fid_features([uvit_reference(coco_fixture.path(i))
                                for i in coco_fixture.splits["val2014"]])
    gen = pytorch_fid_features([np.asarray(Image.open(os.path.join(folder, n)).convert("RGB"))
                                for n in sorted(os.listdir(folder))])
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    expected = ((gen.mean(0) - ref.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert result["fid"] == pytest.approx(expected, rel=1e-4)
    assert any(n.startswith("fid_reference_coco-fid30k_val2014_256px_") for n in os.listdir(cache))
    assert "coco-fid30k protocol, pytorch-fid resize" in evaluate.markdown_table(result)
    # The same export scored the paired way on request, and the clean resize refused for the protocol.
    paired = evaluate.evaluate(protocol_export, metrics=("fid",), progress=False,
                               fid_cache_dir=str(cache), protocol="pairs")
    assert paired["fid_protocol"] == "pairs" and paired["fid_resize"] == "clean"
    with pytest.raises(ProtocolError, match="uses the pytorch-fid resize"):
        evaluate.evaluate(protocol_export, metrics=("fid",), progress=False, fid_resize="clean")
    assert fid_module.DEFAULT_RESIZE == "clean"
