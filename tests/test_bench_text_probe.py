"""bench.text_probe's linear role probe: a separable role is found, a random one is not."""
import torch

from bench.text_probe import linear_accuracy


def test_linear_probe_finds_a_linear_label_and_not_a_random_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(800, 16, generator=gen)
    direction = torch.randn(16, generator=gen)
    linear = (x @ direction > 0).float()
    random = (torch.rand(800, generator=gen) > 0.5).float()
    train, val = slice(0, 600), slice(600, 800)
    _, val_linear = linear_accuracy(x[train], linear[train], x[val], linear[val])
    _, val_random = linear_accuracy(x[train], random[train], x[val], random[val])
    assert val_linear > 0.95
    assert 0.35 < val_random < 0.65


def test_model_probe_reads_the_tokens_the_unet_gets(tmp_path_factory):
    """--checkpoint mode on a tiny run: the "encoder tokens" it reads at each colour word are
    the encoder's layer-3 states that role_features gets from the full hidden-state stack,
    labels alternate left/top (1) and other (0), and every cross-attention block's keys are
    read at the text layers' width."""
    from bench.text_probe import model_role_features, role_features, two_object_captions
    from tiny_run import train_tiny_run
    from tti.models.text_to_image import load_for_inference

    model, cfg = load_for_inference(train_tiny_run(tmp_path_factory), "cpu")
    captions, targets = two_object_captions(40, "val")
    feats, labels = model_role_features(model, model.image_model.backbone, captions, targets)
    reference, ref_labels = role_features(model.text, captions, targets)
    layer = cfg.text.hidden_layer
    # A frozen encoder's states come from the text store, kept in fp16: equal up to its rounding.
    torch.testing.assert_close(feats["encoder tokens"], reference[layer], atol=1e-4, rtol=2 ** -10)
    assert torch.equal(labels, ref_labels) and labels[::2].eq(1).all() and labels[1::2].eq(0).all()
    keys = [k for k in feats if k.startswith("keys")]
    blocks = [m for m in model.image_model.backbone.modules() if hasattr(m, "kv_cross")]
    assert len(keys) == len(blocks) >= 1
    assert feats["text layers"].shape == (len(labels), cfg.model.unet.text_width)
    assert all(feats[k].shape[0] == len(labels) for k in keys)
