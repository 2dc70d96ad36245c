"""alignDRAW (Mansimov et al. 2016) behind the model interface.

A bidirectional LSTM reads the caption's word ids (`tti.text.vocab.WordVocabEncoder`); at
each of T steps the generative LSTM attends over the words (align), takes a latent z_t and
adds a DRAW filterbank write to a canvas c_t; the image is sigma(c_T). Training runs an
inference LSTM on DRAW reads of the image and of the error image, with a KL to a learned
prior p(z_t | h_gen(t-1)); the loss is the negative variational bound, nats per image.
The paper's GAN sharpening of samples (a post-processing step) is not implemented.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tti.config.errors import ConfigError
from tti.config.registry import Entry
from tti.config.rules import one_of
from tti.models.aligndraw.filterbank import FilterbankAttention, read_patches, write_patches
from tti.models.noise import draw_noise
from tti.text.batch import TextBatch

# Paper sizes for 32x32 MS-COCO (section 5 / appendix). word_dim is not given there (the
# released code fed one-hot words straight into the LSTM); 128 matches the LSTM width.
# shapes: a CPU-sized model for the embedded shapes dataset.
PRESETS: dict[str, dict] = {
    "coco": dict(image_size=32, draw_steps=32, read_n=9, write_n=9, word_dim=128,
                         lang_dim=128, align_dim=512, latent_dim=275, enc_dim=550, dec_dim=550),
    "shapes": dict(image_size=32, draw_steps=16, read_n=8, write_n=8, word_dim=64,
                           lang_dim=64, align_dim=128, latent_dim=64, enc_dim=256, dec_dim=256),
}

IGNORED_SAMPLER_OPTIONS = frozenset({"guidance", "sampler", "steps", "eta", "noise"})


@dataclass
class AlignDrawConfig:
    preset: str = "shapes"           # shapes | coco (paper sizes); fields below override it
    overrides: dict = field(default_factory=dict)


def validate(cfg) -> None:
    one_of(cfg.model.aligndraw.preset, tuple(PRESETS), "model.aligndraw.preset")


def build(cfg, text_encoder) -> "AlignDraw":
    """The model.aligndraw preset with its overrides, for the word vocabulary of `text_encoder`
    (a WordVocabEncoder); a bad override is a ConfigError naming it."""
    overrides = cfg.model.aligndraw.overrides
    fixed = sorted({"image_size", "vocab_size"} & set(overrides))
    if fixed:
        raise ConfigError(f"model.aligndraw.overrides: {fixed} cannot be set here; they come "
                          f"from data.image_size and the training captions' vocabulary")
    try:
        return AlignDraw.from_preset(cfg.model.aligndraw.preset, vocab_size=len(text_encoder.vocab),
                                     image_size=cfg.data.image_size, **overrides)
    except (TypeError, ValueError) as e:  # a bad field or value, named by the model
        raise ConfigError(f"model.aligndraw.overrides: {e}") from None


# No samplers: it samples its learned prior, whatever sample.* says. Captions are word ids.
ENTRY = Entry("aligndraw", build, AlignDrawConfig, validate, text="vocab",
              label=lambda cfg: "alignDRAW (word embeddings + BiLSTM), prior samples")


def gaussian_kl(mu_q: torch.Tensor, logsigma_q: torch.Tensor,
                mu_p: torch.Tensor, logsigma_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) per element, in nats (same shape as inputs)."""
    var_ratio = torch.exp(2 * (logsigma_q - logsigma_p))
    mean_term = (mu_q - mu_p) ** 2 * torch.exp(-2 * logsigma_p)
    return 0.5 * (var_ratio + mean_term - 1) + logsigma_p - logsigma_q


class CaptionEncoder(nn.Module):
    """Word ids -> bidirectional LSTM states h_lang float [B, L, 2 * lang_dim] (0 at padding).
    Padding is packed away, so the backward direction starts at each caption's last word."""

    def __init__(self, vocab_size: int, word_dim: int, lang_dim: int, pad_id: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(word_dim, lang_dim, batch_first=True, bidirectional=True)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return out


class AlignAttention(nn.Module):
    """e = v^T tanh(U h_lang + W h_gen + b); alpha = softmax over real words; s = sum alpha h_lang.

    forward(h_lang [B, L, D], keys = U h_lang [B, L, A] (from `keys`), mask bool [B, L],
    h_gen [B, dec_dim]) -> (s float [B, D], alpha float [B, L], exactly 0 at padding).
    """

    def __init__(self, lang_dim: int, dec_dim: int, align_dim: int):
        super().__init__()
        self.U = nn.Linear(lang_dim, align_dim, bias=False)
        self.W = nn.Linear(dec_dim, align_dim)  # its bias is b
        self.v = nn.Linear(align_dim, 1, bias=False)

    def keys(self, h_lang: torch.Tensor) -> torch.Tensor:
        """U h_lang, computed once per caption rather than once per step."""
        return self.U(h_lang)

    def forward(self, h_lang, keys, mask, h_gen):
        scores = self.v(torch.tanh(keys + self.W(h_gen)[:, None])).squeeze(-1)
        alpha = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (alpha[:, :, None] * h_lang).sum(1), alpha


class AlignDraw(nn.Module):
    """alignDRAW for RGB images of size image_size x image_size.

    vocab_size: rows of the word-embedding table (len(WordVocabEncoder.vocab)).
    draw_steps: T, the number of canvas updates. read_n / write_n: filterbank grid size N.
    lang_dim: caption LSTM width per direction. align_dim: alignment MLP width.
    latent_dim: z_t size. enc_dim / dec_dim: inference / generative LSTM widths.
    Defaults are the paper's 32x32 COCO model (`PRESETS["coco"]`).
    `config` holds every constructor argument, enough to rebuild the model.
    """

    def __init__(self, vocab_size: int, image_size: int = 32, channels: int = 3,
                 draw_steps: int = 32, read_n: int = 9, write_n: int = 9, word_dim: int = 128,
                 lang_dim: int = 128, align_dim: int = 512, latent_dim: int = 275,
                 enc_dim: int = 550, dec_dim: int = 550, pad_id: int = 0):
        super().__init__()
        if draw_steps < 1:
            raise ValueError(f"AlignDraw: draw_steps must be >= 1, got {draw_steps}")
        self.config = dict(vocab_size=vocab_size, image_size=image_size, channels=channels,
                           draw_steps=draw_steps, read_n=read_n, write_n=write_n,
                           word_dim=word_dim, lang_dim=lang_dim, align_dim=align_dim,
                           latent_dim=latent_dim, enc_dim=enc_dim, dec_dim=dec_dim, pad_id=pad_id)
        self.image_size, self.channels, self.draw_steps = image_size, channels, draw_steps
        self.latent_dim, self.enc_dim, self.dec_dim = latent_dim, enc_dim, dec_dim
        self.write_n = write_n
        self.caption_encoder = CaptionEncoder(vocab_size, word_dim, lang_dim, pad_id)
        self.align = AlignAttention(2 * lang_dim, dec_dim, align_dim)
        self.read_attention = FilterbankAttention(dec_dim, read_n, image_size, image_size)
        self.write_attention = FilterbankAttention(dec_dim, write_n, image_size, image_size)
        read_dim = 2 * channels * read_n * read_n  # image and error image
        self.encoder_lstm = nn.LSTMCell(read_dim + dec_dim, enc_dim)
        self.posterior = nn.Linear(enc_dim, 2 * latent_dim)  # mean, log sigma
        self.prior_mu = nn.Linear(dec_dim, latent_dim)
        self.prior_logsigma = nn.Linear(dec_dim, latent_dim)
        self.decoder_lstm = nn.LSTMCell(latent_dim + 2 * lang_dim, dec_dim)
        self.write_patch = nn.Linear(dec_dim, channels * write_n * write_n)
        self.last_terms: dict[str, torch.Tensor] = {}

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> "AlignDraw":
        """A model from `PRESETS[name]` ("coco", "shapes"), any field overridable."""
        if name not in PRESETS:
            raise ValueError(f"AlignDraw.from_preset: unknown preset {name!r}; "
                             f"choose from {sorted(PRESETS)}")
        fields = set(inspect.signature(cls.__init__).parameters) - {"self", "vocab_size"}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"AlignDraw.from_preset: unknown field(s) {unknown}; "
                             f"valid fields: {sorted(fields)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})

    @property
    def device(self) -> torch.device:
        return self.write_patch.weight.device

    def encode_caption(self, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """TextBatch of word ids -> (h_lang float [B, L, 2 * lang_dim], mask bool [B, L])."""
        tokens, mask = text.tokens, text.mask
        if tokens.dtype != torch.long or tokens.dim() != 2:
            raise TypeError("AlignDraw: text.tokens must be int64 word ids [B, L] from "
                            f"WordVocabEncoder, got {tokens.dtype} {tuple(tokens.shape)}")
        if mask.shape != tokens.shape or mask.dtype != torch.bool:
            raise ValueError(f"AlignDraw: text.mask must be bool {tuple(tokens.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        lengths = mask.sum(1)
        if (lengths == 0).any():
            raise ValueError("AlignDraw: a caption has no real token (mask row all False); "
                             "use WordVocabEncoder.null() for the empty caption")
        right_padded = torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]
        if not torch.equal(mask, right_padded):
            raise ValueError("AlignDraw: text.mask must be right-padded (True then False)")
        return self.caption_encoder(tokens, mask), mask

    def _prior(self, h_dec: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_t | h_gen(t-1)): N(0, I) at the first step, then tanh-squashed linear maps."""
        if step == 0:
            zeros = h_dec.new_zeros(h_dec.shape[0], self.latent_dim)
            return zeros, zeros
        return torch.tanh(self.prior_mu(h_dec)), torch.tanh(self.prior_logsigma(h_dec))

    def _generate_step(self, z, h_lang, keys, mask, dec_state, canvas):
        """One generative step: align on h_gen(t-1), LSTM on [z_t, s], add the write to c."""
        s, _ = self.align(h_lang, keys, mask, dec_state[0])
        h_dec, c_dec = self.decoder_lstm(torch.cat([z, s], -1), dec_state)
        fx, fy, gamma = self.write_attention(h_dec)
        patch = self.write_patch(h_dec).view(-1, self.channels, self.write_n, self.write_n)
        return (h_dec, c_dec), canvas + write_patches(patch, fx, fy, gamma)

    def _check_images(self, images: torch.Tensor) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want or not images.is_floating_point():
            raise ValueError(f"AlignDraw: images must be float [B, {want[0]}, {want[1]}, "
                             f"{want[2]}] in [-1, 1], got {images.dtype} {tuple(images.shape)}")
        lo, hi = images.aminmax()
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"AlignDraw: images must be in [-1, 1], got [{lo:.3f}, {hi:.3f}]")

    def loss_terms(self, images: torch.Tensor, text: TextBatch) -> dict[str, torch.Tensor]:
        """Negative variational bound and its parts, each a scalar mean over the batch.

        images: float [B, 3, H, W] in [-1, 1] (mapped to [0, 1] pixel intensities).
        recon: Bernoulli cross-entropy of sigma(c_T) summed over pixels (nats/image; as in
        the paper, for non-binary pixels it is a cross-entropy, not a normalised density).
        kl: KL(q(z_t | .) || p(z_t | h_gen(t-1))) summed over steps and latent dims.
        total = recon + kl. z_t is drawn with the global torch RNG.
        """
        self._check_images(images)
        if len(text) != images.shape[0]:
            raise ValueError(f"AlignDraw: {images.shape[0]} images but {len(text)} captions")
        x = (images.to(self.device) + 1) / 2
        h_lang, mask = self.encode_caption(text)
        keys = self.align.keys(h_lang)
        batch = x.shape[0]
        dec_state = (x.new_zeros(batch, self.dec_dim), x.new_zeros(batch, self.dec_dim))
        enc_state = (x.new_zeros(batch, self.enc_dim), x.new_zeros(batch, self.enc_dim))
        canvas = torch.zeros_like(x)
        kl = x.new_zeros(batch)
        for step in range(self.draw_steps):
            h_prev = dec_state[0]
            fx, fy, gamma = self.read_attention(h_prev)
            error = x - torch.sigmoid(canvas)
            read = torch.cat([read_patches(x, fx, fy, gamma),
                              read_patches(error, fx, fy, gamma)], 1).flatten(1)
            enc_state = self.encoder_lstm(torch.cat([read, h_prev], -1), enc_state)
            mu_q, logsigma_q = self.posterior(enc_state[0]).chunk(2, -1)
            z = mu_q + torch.exp(logsigma_q) * torch.randn_like(mu_q)
            mu_p, logsigma_p = self._prior(h_prev, step)
            kl = kl + gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p).sum(-1)
            dec_state, canvas = self._generate_step(z, h_lang, keys, mask, dec_state, canvas)
        recon = F.binary_cross_entropy_with_logits(canvas, x, reduction="none").sum((1, 2, 3))
        recon, kl = recon.mean(), kl.mean()
        return {"recon": recon, "kl": kl, "total": recon + kl}

    def loss(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Scalar negative variational bound (nats/image); its parts land in `last_terms`."""
        terms = self.loss_terms(images, text)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return terms["total"]

    def forward(self, images: torch.Tensor, text: TextBatch) -> torch.Tensor:
        return self.loss(images, text)

    @torch.no_grad()
    def sample(self, text: TextBatch, generator: torch.Generator | list | None = None,
               null_text: TextBatch | None = None, return_trajectory: bool = False,
               **sampler_opts):
        """Images for the captions: z_t from the learned prior, image = mean canvas sigma(c_T).

        text: TextBatch of word ids [B, L]. generator: seeds z_t, as draw_noise takes it (one,
        or one per caption). null_text and IGNORED_SAMPLER_OPTIONS (noise only as None) are
        diffusion options, accepted so one sampling script drives every model, and ignored.
        Returns images float [-1, 1] [B, 3, H, W]; with return_trajectory, also the list of
        the T canvases sigma(c_t), each float [-1, 1] [B, 3, H, W] on the CPU.
        """
        unknown = set(sampler_opts) - IGNORED_SAMPLER_OPTIONS
        if unknown:
            raise TypeError(f"AlignDraw.sample: unknown options {sorted(unknown)}; "
                            f"only {sorted(IGNORED_SAMPLER_OPTIONS)} are accepted (and ignored)")
        if sampler_opts.get("noise") is not None:
            raise ValueError("AlignDraw.sample: noise (a diffusion x_T) has no meaning here; "
                             "pass generator to seed alignDRAW's latents")
        h_lang, mask = self.encode_caption(text)
        keys = self.align.keys(h_lang)
        batch, size = h_lang.shape[0], self.image_size
        dec_state = (h_lang.new_zeros(batch, self.dec_dim), h_lang.new_zeros(batch, self.dec_dim))
        canvas = h_lang.new_zeros(batch, self.channels, size, size)
        trajectory = []
        for step in range(self.draw_steps):
            mu_p, logsigma_p = self._prior(dec_state[0], step)
            noise = draw_noise((batch, self.latent_dim), generator, self.device)
            z = mu_p + torch.exp(logsigma_p) * noise
            dec_state, canvas = self._generate_step(z, h_lang, keys, mask, dec_state, canvas)
            if return_trajectory:
                trajectory.append((torch.sigmoid(canvas) * 2 - 1).cpu())
        images = torch.sigmoid(canvas) * 2 - 1
        return (images, trajectory) if return_trajectory else images
