"""alignDRAW: filterbanks, KL, align attention, padding, vocabulary, learning and sampling."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from tti.models.aligndraw.model import PRESETS, AlignDraw, gaussian_kl
from tti.models.aligndraw.filterbank import FilterbankAttention, filterbank_matrices, read_patches, write_patches
from tti.text.batch import TextBatch
from tti.text.vocab import WordVocab, WordVocabEncoder, build_vocab, tokenize

CAPTIONS = ["a red circle left of a blue square", "a green triangle",
            "a yellow square above a red triangle", "blue circle"]
TINY = dict(image_size=16, draw_steps=4, read_n=3, write_n=4, word_dim=8, lang_dim=8,
            align_dim=12, latent_dim=6, enc_dim=16, dec_dim=16)


@pytest.fixture(autouse=True)
def _one_thread():
    # These ops are tiny: a second thread gains nothing and, on a busy 2-core machine,
    # OpenMP spin-waiting made the learning test ~15x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_encoder(max_length=32):
    return WordVocabEncoder(build_vocab(CAPTIONS), max_length=max_length)


def make_model(encoder, **overrides):
    return AlignDraw(vocab_size=encoder.vocab_size, **{**TINY, **overrides})


def pad_with_garbage(text: TextBatch, extra: int) -> TextBatch:
    """The same captions with `extra` more masked-out columns holding random word ids."""
    junk = torch.randint(0, 5, (len(text), extra), generator=torch.Generator().manual_seed(1))
    tokens = torch.cat([text.tokens, junk], 1)
    return TextBatch(tokens, F.pad(text.mask, (0, extra), value=False))


# ------------------------------------------------------------------ filterbanks
def test_filterbank_matches_closed_form():
    n, height, width = 5, 7, 11
    gx, gy = torch.tensor([6.0, 2.5]), torch.tensor([4.0, 5.5])
    sigma2, delta = torch.tensor([1.3, 0.4]), torch.tensor([1.7, 0.9])
    fx, fy = filterbank_matrices(gx.double(), gy.double(), sigma2.double(), delta.double(),
                                 n, height, width)
    assert fx.shape == (2, n, width) and fy.shape == (2, n, height)
    for b in range(2):
        for i in range(1, n + 1):
            mu_x = gx[b].item() + (i - n / 2 - 0.5) * delta[b].item()
            mu_y = gy[b].item() + (i - n / 2 - 0.5) * delta[b].item()
            row_x = np.array([math.exp(-(a - mu_x) ** 2 / (2 * sigma2[b].item()))
                              for a in range(1, width + 1)])
            row_y = np.array([math.exp(-(a - mu_y) ** 2 / (2 * sigma2[b].item()))
                              for a in range(1, height + 1)])
            np.testing.assert_allclose(fx[b, i - 1].numpy(), row_x / row_x.sum(), rtol=1e-10)
            np.testing.assert_allclose(fy[b, i - 1].numpy(), row_y / row_y.sum(), rtol=1e-10)
    # Rows sum to one and peak at the filter centre (gx=6, delta=1.7, n=5: 2.6, 4.3, 6, ...).
    torch.testing.assert_close(fx.sum(-1), torch.ones(2, n, dtype=torch.float64))
    assert (fx[0].argmax(-1) + 1).tolist() == [3, 4, 6, 8, 9]  # nearest pixels, 1-based


def test_attention_module_centres_the_grid_at_zero_output():
    attention = FilterbankAttention(in_dim=3, n=4, height=10, width=10)
    torch.nn.init.zeros_(attention.params.weight)
    torch.nn.init.zeros_(attention.params.bias)
    with torch.no_grad():
        attention.params.bias[2] = -5.0  # narrow filters, so edge rows are not pulled inward
    fx, fy, gamma = attention(torch.randn(2, 3))
    # g~=0 -> image centre 5.5; delta~=1 -> the grid spans the image: centres 1, 4, 7, 10.
    centres = (fx * torch.arange(1, 11.0)).sum(-1)
    torch.testing.assert_close(centres[0], torch.tensor([1.0, 4.0, 7.0, 10.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(fx, fy)
    torch.testing.assert_close(gamma, torch.ones(2))


@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_full_size_read_then_write_reproduces_the_image(gamma):
    size, batch = 8, 2
    images = torch.rand(batch, 3, size, size, dtype=torch.float64)
    centre = torch.full((batch,), (size + 1) / 2, dtype=torch.float64)
    fx, fy = filterbank_matrices(centre, centre, torch.full((batch,), 1e-3, dtype=torch.float64),
                                 torch.ones(batch, dtype=torch.float64), size, size, size)
    g = torch.full((batch,), gamma, dtype=torch.float64)
    patches = read_patches(images, fx, fy, g)
    torch.testing.assert_close(patches, gamma * images)
    torch.testing.assert_close(write_patches(patches, fx, fy, g), images)


# ------------------------------------------------------------------ KL
def test_gaussian_kl_zero_for_identical_and_matches_torch():
    mu, logsigma = torch.randn(4, 5), torch.randn(4, 5) * 0.5
    assert gaussian_kl(mu, logsigma, mu, logsigma).abs().max() < 1e-6
    mu_p, logsigma_p = torch.randn(4, 5), torch.randn(4, 5) * 0.5
    want = kl_divergence(Normal(mu, logsigma.exp()), Normal(mu_p, logsigma_p.exp()))
    torch.testing.assert_close(gaussian_kl(mu, logsigma, mu_p, logsigma_p), want)


# ------------------------------------------------------------------ caption and padding
def test_align_weights_sum_to_one_and_skip_padding():
    encoder = make_encoder()
    model = make_model(encoder)
    text = encoder(CAPTIONS)
    assert not text.mask.all()  # the batch really has padding
    h_lang, mask = model.encode_caption(text)
    assert (h_lang[~mask] == 0).all()
    _, alpha = model.align(h_lang, model.align.keys(h_lang), mask, torch.randn(4, TINY["dec_dim"]))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4))
    assert (alpha[~mask] == 0).all() and (alpha[mask] > 0).all()


def test_caption_states_do_not_depend_on_batch_padding():
    # The backward LSTM must start at each caption's own last word, not at padding.
    encoder = make_encoder()
    model = make_model(encoder)
    short = encoder(["a green triangle"])
    h_alone, _ = model.encode_caption(short)
    h_batch, mask = model.encode_caption(encoder(["a yellow square above a red triangle",
                                                  "a green triangle"]))
    torch.testing.assert_close(h_batch[1, :3], h_alone[0], atol=1e-6, rtol=0)


def test_extra_padding_changes_neither_loss_nor_samples():
    encoder = make_encoder()
    model = make_model(encoder)
    text = encoder(CAPTIONS)
    padded = pad_with_garbage(text, 5)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    torch.manual_seed(3)
    loss = model.loss(images, text)
    torch.manual_seed(3)
    loss_padded = model.loss(images, padded)
    torch.testing.assert_close(loss_padded, loss, atol=1e-4, rtol=1e-6)
    a = model.sample(text, generator=torch.Generator().manual_seed(5))
    b = model.sample(padded, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bad_text_and_images_give_clear_errors():
    encoder = make_encoder()
    model = make_model(encoder)
    text = encoder(CAPTIONS[:2])
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(TypeError, match="word ids"):
        model.loss(images, TextBatch(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="no real token"):
        model.loss(images, TextBatch(text.tokens, torch.zeros_like(text.mask)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.loss(images + 200, text)
    with pytest.raises(ValueError, match="2 images but 4 captions"):
        model.loss(images, encoder(CAPTIONS))
    with pytest.raises(TypeError, match="unknown options"):
        model.sample(text, temperature=0.5)
    with pytest.raises(ValueError, match="noise"):
        model.sample(text, noise=torch.randn(2, 3, 16, 16))


# ------------------------------------------------------------------ vocabulary
def test_vocab_unknown_words_truncation_and_null():
    encoder = make_encoder(max_length=3)
    vocab = encoder.vocab
    assert tokenize("A red Circle, left-of!") == ["a", "red", "circle", "left", "of"]
    ids = vocab.encode("a purple circle")
    assert ids == [vocab.index["a"], vocab.unk_id, vocab.index["circle"]]
    batch = encoder(["a red circle left of a blue square", "zebra"])
    assert batch.tokens.dtype == torch.long and batch.tokens.shape == (2, 3)
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tokens[1].tolist() == [vocab.unk_id, vocab.pad_id, vocab.pad_id]
    null = encoder.null(3)
    assert null.tokens.tolist() == [[vocab.empty_id]] * 3 and null.mask.all()
    assert encoder([""]).tokens.tolist() == [[vocab.empty_id]]
    assert encoder.dim is None


def test_build_vocab_counts_and_caps():
    vocab = build_vocab(["b a a", "c a b", "d"], min_count=2)
    assert vocab.words == ["<pad>", "<unk>", "<empty>", "a", "b"]
    assert build_vocab(["b a a", "c a b", "d"], max_size=4).words[3:] == ["a"]
    assert build_vocab(["z y", "y z"]) == build_vocab(["y z", "z y"])  # order-free ties
    assert WordVocab.build(["b a a", "c a b", "d"], min_count=2) == vocab
    with pytest.raises(ValueError, match="max_size"):
        build_vocab(["a"], max_size=2)


def test_vocab_round_trips_through_dict_and_state_dict():
    encoder = make_encoder(max_length=7)
    restored = WordVocabEncoder.from_dict(encoder.to_dict())
    assert restored.vocab == encoder.vocab and restored.max_length == 7
    assert WordVocab.from_dict(encoder.vocab.to_dict()) == encoder.vocab
    other = WordVocabEncoder(build_vocab(["x y"]), max_length=2)
    other.load_state_dict(encoder.state_dict())
    assert other.vocab == encoder.vocab and other.max_length == 7
    assert torch.equal(other(CAPTIONS).tokens, encoder(CAPTIONS).tokens)
    with pytest.raises(ValueError, match="WordVocab.from_dict"):
        WordVocab.from_dict({"words": ["a"]})


# ------------------------------------------------------------------ learning and sampling
def test_presets_build_and_every_parameter_gets_a_gradient():
    assert set(PRESETS) == {"coco", "shapes"}
    encoder = make_encoder()
    model = AlignDraw.from_preset("shapes", encoder.vocab_size, image_size=16,
                                  draw_steps=2)
    assert model.config["lang_dim"] == PRESETS["shapes"]["lang_dim"]
    model(torch.rand(2, 3, 16, 16) * 2 - 1, encoder(CAPTIONS[:2])).backward()
    # DDP without find_unused_parameters needs every parameter in the graph.
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_loss_falls_on_a_tiny_set():
    encoder = make_encoder()
    model = AlignDraw.from_preset("shapes", encoder.vocab_size, image_size=16,
                                  draw_steps=6, latent_dim=16, enc_dim=64, dec_dim=64)
    images = -torch.ones(4, 3, 16, 16)
    for k in range(4):  # one coloured square per image, in a different place
        images[k, k % 3, 2 + 2 * k: 8 + 2 * k, 3 * k: 6 + 3 * k] = 1.0
    text = encoder(CAPTIONS)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(80):
        loss = model.loss(images, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
        assert set(model.last_terms) == {"recon", "kl", "total"}
    first, last = np.mean(totals[:5]), np.mean(totals[-5:])
    assert last < 0.2 * first, (first, last)
    terms = model.loss_terms(images, text)
    torch.testing.assert_close(terms["total"], terms["recon"] + terms["kl"])
    assert terms["kl"] >= 0


def test_sample_shapes_range_trajectory_and_determinism():
    encoder = make_encoder()
    model = make_model(encoder)
    text = encoder(CAPTIONS)
    images, trajectory = model.sample(text, generator=torch.Generator().manual_seed(0),
                                      return_trajectory=True, guidance=3.0, sampler="ddim",
                                      steps=50, eta=0.0, noise=None,
                                      null_text=encoder.null(4))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert len(trajectory) == TINY["draw_steps"]
    assert all(c.shape == images.shape for c in trajectory)
    assert all(c.device.type == "cpu" for c in trajectory)
    torch.testing.assert_close(trajectory[-1], images)
    again = model.sample(text, generator=torch.Generator().manual_seed(0))
    other = model.sample(text, generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, again)
    assert not torch.allclose(images, other)
    assert not images.requires_grad
