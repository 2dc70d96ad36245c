"""FID: the distance against closed forms and an eigen-decomposition reference, the clean resize
against PIL, the pytorch-fid resize against pytorch-fid's own code, the packaged Inception's
features, the stats cache (keyed by the resize) and the command line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tti.eval.metrics import fid


def reference_frechet(mu1, s1, mu2, s2):
    """tr sqrtm(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))), with symmetric eigen-decompositions."""
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt_s1 @ s2 @ sqrt_s1)
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()


def gaussian_features(rng, n, d, scale):
    mixing = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_frechet_distance_matches_eigen_reference():
    rng = np.random.default_rng(0)
    a, b = gaussian_features(rng, 400, 12, 1.0), gaussian_features(rng, 300, 12, 0.5)
    (mu1, s1), (mu2, s2) = fid.stats(a), fid.stats(b)
    expected = reference_frechet(mu1, s1, mu2, s2)
    assert expected > 1.0
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


def test_stats_are_mean_and_unbiased_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 4))
    mu, sigma = fid.stats(x)
    centred = x - x.mean(0)
    np.testing.assert_allclose(mu, x.sum(0) / 50)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError, match="N >= 2"):
        fid.stats(x[:1])


def test_set_against_itself_is_zero_and_mean_shift_adds_squared_norm():
    rng = np.random.default_rng(2)
    x = gaussian_features(rng, 500, 16, 1.0)
    shift = rng.normal(size=16) * 2
    mu, sigma = fid.stats(x)
    mu_shifted, sigma_shifted = fid.stats(x + shift)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    # equal covariances: the trace terms cancel and only ||d||^2 is left
    assert fid.frechet_distance(mu, sigma, mu_shifted, sigma_shifted) == pytest.approx(
        shift @ shift, rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def pil_clean_resize(image, size):
    """Reference: each channel as a PIL 32-bit float image built from raw bytes, bicubic, clip."""
    height, width, _ = image.shape
    channels = []
    for c in range(3):
        raw = image[:, :, c].astype("<f4").tobytes()
        resized = Image.frombytes("F", (width, height), raw).resize((size, size), Image.Resampling.BICUBIC)
        channels.append(np.array(resized.getdata(), dtype=np.float32).reshape(size, size))
    return np.clip(np.stack(channels, -1), 0, 255)


def test_clean_resize_is_float_pil_bicubic_per_channel():
    image = np.random.default_rng(3).integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
    out = fid.clean_resize(image, 37)
    assert out.shape == (37, 37, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, pil_clean_resize(image, 37))
    # not re-quantised to uint8 (that would be the "legacy" resizes), and clipped to [0, 255]
    assert (out != np.round(out)).any()
    assert out.min() >= 0 and out.max() <= 255
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        fid.clean_resize(image[:, :, :2])


def test_packaged_inception_features_shape_and_pipeline():
    images = torch.from_numpy(np.random.default_rng(4).integers(0, 256, size=(2, 3, 16, 24), dtype=np.uint8))
    # an iterable of batches regrouped into one batch of 2 (tensor input: see the folder-stats test)
    features = fid.inception_features(iter([images[:1], images[1:]]), batch_size=2, progress=False)
    assert features.shape == (2, 2048) and features.dtype == np.float32
    assert np.isfinite(features).all() and features.min() >= 0  # average pool after ReLU
    assert not np.allclose(features[0], features[1])
    # the same pipeline by hand: PIL reference resize, (x - 128) / 128, the raw network
    resized = np.stack([pil_clean_resize(im.permute(1, 2, 0).numpy(), 299) for im in images])
    x = (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128
    with torch.no_grad():
        expected = fid.load_inception("cpu")(x).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="uint8"):
        fid.inception_features(images.float(), progress=False)


def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(fid, "INCEPTION_PACKAGE", "no_such_package_for_fid_test")
    with pytest.raises(fid.InceptionNotInstalledError, match="pip install -r requirements.txt"):
        fid.inception_path()


def odd_images(tmp_path):
    """Odd-sized RGB and grayscale PNGs (pytorch-fid reads both through convert('RGB'))."""
    rng = np.random.default_rng(9)
    paths = []
    for i, (size, mode) in enumerate([((37, 23), "RGB"), ((301, 299), "L"), ((640, 427), "RGB")]):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        path = str(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return paths


def pytorch_fid_network_inputs(paths):
    """What pytorch-fid 0.3.0's own code gives its Inception for each file: its ImagePathDataset
    with torchvision's ToTensor, then InceptionV3.forward's resize and scaling, with the network
    blocks swapped for one that records its input (its weights cannot be downloaded here)."""
    import torchvision.transforms as TF
    from pytorch_fid.fid_score import ImagePathDataset
    from pytorch_fid.inception import InceptionV3

    class Record(torch.nn.Module):
        def forward(self, x):
            return x

    net = InceptionV3.__new__(InceptionV3)  # skips __init__, which downloads the weights
    torch.nn.Module.__init__(net)
    net.resize_input, net.normalize_input = True, True
    net.output_blocks, net.last_needed_block = [0], 0
    net.blocks = torch.nn.ModuleList([Record()])
    dataset = ImagePathDataset(paths, transforms=TF.ToTensor())
    return [net(dataset[i][None])[0][0] for i in range(len(paths))]


def test_pytorch_fid_resize_feeds_the_network_what_pytorch_fid_feeds_it(tmp_path):
    paths = odd_images(tmp_path)
    expected = pytorch_fid_network_inputs(paths)
    folder = fid._FolderImages(paths, "pytorch-fid")
    for i, path in enumerate(paths):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        assert expected[i].shape == (3, 299, 299)
        torch.testing.assert_close(folder[i], expected[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(fid.network_input(rgb, "pytorch-fid"), expected[i], rtol=0, atol=1e-6)
        # the clean resize is another input altogether (antialiased bicubic, (x - 128) / 128)
        clean = fid.network_input(rgb, "clean")
        assert (clean - expected[i]).abs().max() > 0.01
        torch.testing.assert_close(
            clean, (torch.from_numpy(pil_clean_resize(rgb, 299)).permute(2, 0, 1) - 128) / 128)
    with pytest.raises(ValueError, match="pytorch-fid"):
        fid.network_input(rgb, "bilinear")


def pytorch_fid_inception_with_packaged_weights():
    """pytorch-fid 0.3.0's own InceptionV3 (its PyTorch port of the TF FID graph) holding the
    weights of our TorchScript, which is that same graph: its download is replaced by a copy.
    BasicConv2d modules and TorchScript conv groups come in the same order (shapes checked)."""
    import pytorch_fid.inception as pfi

    params = dict(fid.load_inception("cpu").named_parameters())
    groups = [name[:-len(".weight")] for name in params if name.endswith(".weight")]

    def fid_inception_v3():  # pytorch-fid's own, with a copy instead of load_state_dict_from_url
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        for name, block in [("Mixed_5b", pfi.FIDInceptionA(192, pool_features=32)),
                            ("Mixed_5c", pfi.FIDInceptionA(256, pool_features=64)),
                            ("Mixed_5d", pfi.FIDInceptionA(288, pool_features=64)),
                            ("Mixed_6b", pfi.FIDInceptionC(768, channels_7x7=128)),
                            ("Mixed_6c", pfi.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6d", pfi.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6e", pfi.FIDInceptionC(768, channels_7x7=192)),
                            ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                            ("Mixed_7c", pfi.FIDInceptionE_2(2048))]:
            setattr(net, name, block)
        convs = [m for m in net.modules() if type(m).__name__ == "BasicConv2d"]
        assert len(convs) == len(groups)
        with torch.no_grad():
            for conv, group in zip(convs, groups):
                assert conv.conv.weight.shape == params[group + ".weight"].shape, group
                conv.conv.weight.copy_(params[group + ".weight"])
                conv.bn.weight.fill_(1.0)  # the TF graph's batch norms have no scale
                conv.bn.bias.copy_(params[group + ".beta"])
                conv.bn.running_mean.copy_(params[group + ".mean"])
                conv.bn.running_var.copy_(params[group + ".var"])
        return net

    original = pfi.fid_inception_v3
    pfi.fid_inception_v3 = fid_inception_v3
    try:
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        pfi.fid_inception_v3 = original


def test_pytorch_fid_resize_gives_pytorch_fids_features(tmp_path):
    """pytorch-fid's get_activations (its loader, resize, scaling and network) with the same
    weights equals our folder features in pytorch-fid mode up to float rounding."""
    from pytorch_fid.fid_score import get_activations

    path = str(tmp_path / "odd.png")  # smooth content, so the two resizes differ as on photos
    Image.fromarray(np.random.default_rng(10).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
                    ).resize((37, 23), Image.Resampling.BICUBIC).save(path)
    theirs = get_activations([path], pytorch_fid_inception_with_packaged_weights(), batch_size=1,
                             num_workers=0)

    def ours(resize):
        loader = torch.utils.data.DataLoader(fid._FolderImages([path], resize))
        return fid._run_inception(loader, "cpu", 1, progress=False)

    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours("pytorch-fid"), theirs, rtol=0, atol=1e-5 * scale)
    assert np.abs(ours("clean") - theirs).max() > 0.1 * scale


def write_images(folder, seed, n=2, size=(16, 12)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(os.path.join(folder, f"{i:03d}.png"))
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:03d}.png"))) for i in range(n)])


def test_folder_stats_cache_hit_and_invalidation(tmp_path, monkeypatch):
    images = write_images(tmp_path / "imgs", seed=5)
    cache = tmp_path / "cache"
    mu, sigma = fid.folder_stats(str(tmp_path / "imgs"), cache_dir=str(cache), progress=False)
    assert len(os.listdir(cache)) == 1
    # the folder path gives the same stats as the tensor path on the same pixels
    mu_ref, sigma_ref = fid.stats(fid.inception_features(
        torch.from_numpy(images).permute(0, 3, 1, 2), progress=False))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-3, atol=1e-5)

    def no_network_run(*args, **kwargs):
        raise AssertionError("Inception ran although the stats were cached")

    monkeypatch.setattr(fid, "_run_inception", no_network_run)
    mu2, sigma2 = fid.folder_stats(str(tmp_path / "imgs"), cache_dir=str(cache), progress=False)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    # another resize must never read the clean statistics
    with pytest.raises(AssertionError, match="Inception ran"):
        fid.folder_stats(str(tmp_path / "imgs"), cache_dir=str(cache), progress=False,
                         resize="pytorch-fid")
    cached = os.path.join(cache, os.listdir(cache)[0])
    assert "-clean-" in os.path.basename(cached)
    with pytest.raises(fid.FIDInputError, match="clean-resized"):
        fid.load_stats(cached, "pytorch-fid")
    # a new image changes the key: the cache must miss
    Image.fromarray(images[0][::-1].copy()).save(tmp_path / "imgs" / "new.png")
    with pytest.raises(AssertionError, match="Inception ran"):
        fid.folder_stats(str(tmp_path / "imgs"), cache_dir=str(cache), progress=False)


def test_cli_folder_vs_folder_and_save_stats(tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "a", seed=6)
    write_images(tmp_path / "b", seed=7, size=(20, 20))
    cache = str(tmp_path / "cache")
    mu_a, sigma_a = fid.folder_stats(str(tmp_path / "a"), cache_dir=cache, progress=False)
    mu_b, sigma_b = fid.folder_stats(str(tmp_path / "b"), cache_dir=cache, progress=False)
    calls = []

    def recording_distance(*args):
        # scipy's sqrtm of a 2048 x 2048 product takes ~30 s on 2 cores; the math is tested above
        calls.append(args)
        return 12.5

    monkeypatch.setattr(fid, "frechet_distance", recording_distance)
    fid.main([str(tmp_path / "a"), str(tmp_path / "b"), "--device", "cpu", "--cache-dir", cache])
    assert capsys.readouterr().out.strip() == "FID (clean resize): 12.5"
    for got, expected in zip(calls[0], (mu_a, sigma_a, mu_b, sigma_b)):
        np.testing.assert_array_equal(got, expected)
    fid.main(["--save-stats", str(tmp_path / "a"), str(tmp_path / "a.npz"), "--cache-dir", cache])
    mu_saved, sigma_saved = fid.load_stats(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(mu_saved, mu_a)
    np.testing.assert_array_equal(sigma_saved, sigma_a)
    with pytest.raises(fid.FIDInputError, match="exists"):  # never written over
        fid.main(["--save-stats", str(tmp_path / "b"), str(tmp_path / "a.npz"), "--cache-dir", cache])
    np.testing.assert_array_equal(fid.load_stats(str(tmp_path / "a.npz"))[0], mu_a)
    # the pytorch-fid resize: its own statistics, and the printed FID says which resize
    capsys.readouterr()
    fid.main([str(tmp_path / "a"), str(tmp_path / "b"), "--resize", "pytorch-fid", "--cache-dir", cache])
    assert capsys.readouterr().out.strip() == "FID (pytorch-fid resize): 12.5"
    mu_p = fid.folder_stats(str(tmp_path / "a"), cache_dir=cache, progress=False, resize="pytorch-fid")[0]
    np.testing.assert_array_equal(calls[-1][0], mu_p)
    assert not np.allclose(mu_p, mu_a)


def test_module_entry_point_on_npz_stats(tmp_path):
    rng = np.random.default_rng(8)
    (mu1, s1), (mu2, s2) = (fid.stats(gaussian_features(rng, 100, 6, 1.0)) for _ in range(2))
    fid.save_stats(str(tmp_path / "one.npz"), mu1, s1)
    fid.save_stats(str(tmp_path / "two.npz"), mu2, s2)
    result = subprocess.run([sys.executable, "-m", "tti.eval.metrics.fid", str(tmp_path / "one.npz"),
                             str(tmp_path / "two.npz")], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("FID (clean resize): ")
    assert float(result.stdout.split()[-1]) == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-8)
