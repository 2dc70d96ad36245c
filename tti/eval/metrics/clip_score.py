"""CLIP score as clipscore defines it (Hessel et al. 2021, github.com/jmhessel/clipscore).

CLIP ViT-B/32; each caption is prefixed "A photo depicts "; an image scores
    CLIP-S = 2.5 * max(cos(image embedding, caption embedding), 0)
and the result is the mean over images. Images get the original CLIP preprocessing, done here
with PIL because HF image processors crop and (fast variants) resize a little differently.
Embeddings are float32 (clipscore runs fp16 on a GPU, so scores can differ slightly).
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tti.infra.cli import UserError
from tti.eval.metrics import IMAGE_EXTENSIONS

CLIP_NAME = "openai/clip-vit-base-patch32"
CAPTION_PREFIX = "A photo depicts "
CLIPSCORE_WEIGHT = 2.5
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT_LENGTH = 77


class ImageCaptionPairingError(UserError, ValueError):
    """An image folder and its captions JSON cannot be read or do not pair one to one."""


class LoadedClip(NamedTuple):
    model: "torch.nn.Module"  # transformers CLIPModel, eval mode
    processor: object  # CLIPProcessor (its tokenizer and image mean/std are used)


def load_clip(path_or_name: str = CLIP_NAME, device: str = "cpu") -> tuple[LoadedClip | None, str]:
    """Load CLIP from a local folder or the HF cache, never from the network (the build machines
    cannot): (LoadedClip, "loaded ..."), or (None, a reason saying what is missing and how to get
    it) for the caller to report instead of a score."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path_or_name, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path_or_name, local_files_only=True)
    except (OSError, ValueError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        return None, (f"CLIP weights for '{path_or_name}' are not available locally (not a model "
                      f"folder and not in the HF cache; load_clip never downloads): {detail}. "
                      f"To get them, on a machine with internet run once: python -c \"from "
                      f"transformers import CLIPModel, CLIPProcessor; CLIPModel.from_pretrained("
                      f"'{CLIP_NAME}'); CLIPProcessor.from_pretrained('{CLIP_NAME}')\" "
                      f"(or save both to a folder and pass its path)")
    return LoadedClip(model.eval().to(device), processor), f"loaded CLIP from '{path_or_name}'"


def clip_preprocess(image: Image.Image, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """Original CLIP image transform of one PIL image -> float32 [3, size, size], normalised.

    Short side to `size` with PIL bicubic (long side truncated as torchvision's Resize does),
    center crop (offsets rounded as torchvision's CenterCrop does), RGB, /255, (x - mean) / std.
    """
    width, height = image.size
    if min(width, height) < 1:
        raise ValueError(f"clip_preprocess: empty image of size {image.size}")
    new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(array).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _as_pil_list(images) -> list[Image.Image]:
    """uint8 [N, 3, H, W] tensor/array or list of PIL images -> list of PIL images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"clip_score: images must be uint8 [N, 3, H, W] or a list of PIL "
                             f"images, got {array.dtype} {tuple(array.shape)}")
        return [Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0))) for a in array]
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"clip_score: images[{i}] is {type(image).__name__}, not a PIL image")
    return images


def _embedding(output) -> torch.Tensor:
    """Projected embedding from get_*_features (a tensor in transformers 4, an output in 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_score(images, captions: Sequence[str], model, processor, batch_size: int = 64,
               device: str = "cpu") -> dict:
    """clipscore's CLIP-S of each image against its own caption.

    images: uint8 [N, 3, H, W] (tensor or numpy) or a list of N PIL images (any size/mode);
    captions: N strings, without the "A photo depicts " prefix; model: transformers CLIPModel;
    processor: CLIPProcessor (or a CLIP tokenizer).
    Returns {"mean": float, "per_image": float64 [N] in [0, 2.5]}."""
    pil_images = _as_pil_list(images)
    captions = list(captions)
    if len(pil_images) != len(captions):
        raise ValueError(f"clip_score: {len(pil_images)} images but {len(captions)} captions")
    if not captions:
        raise ValueError("clip_score: no images given")
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
    size = model.config.vision_config.image_size
    max_length = min(CLIP_CONTEXT_LENGTH, model.config.text_config.max_position_embeddings)
    model = model.to(device).eval()
    scores = []
    for start in range(0, len(captions), batch_size):
        pixels = torch.stack([clip_preprocess(im, size, mean, std)
                              for im in pil_images[start:start + batch_size]]).to(device)
        tokens = tokenizer([CAPTION_PREFIX + c for c in captions[start:start + batch_size]],
                           padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        image_emb = _embedding(model.get_image_features(pixel_values=pixels)).float()
        text_emb = _embedding(model.get_text_features(
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device))).float()
        cosine = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1, eps=1e-12)
        scores.append((CLIPSCORE_WEIGHT * cosine.clamp(min=0)).double().cpu().numpy())
    per_image = np.concatenate(scores)
    return {"mean": float(per_image.mean()), "per_image": per_image}


def match_images_to_captions(image_dir: str, captions_json: str) -> tuple[list[str], list[str], list[str]]:
    """(ids, image paths, captions) sorted by id, pairing files in image_dir by stem with the keys of
    captions_json ({"<image id>": "<caption>"}, clipscore's candidates.json).
    ImageCaptionPairingError (a ValueError) unless the two sets match one to one."""
    try:
        with open(captions_json, encoding="utf-8") as f:
            captions = json.load(f)
    except (OSError, ValueError) as error:
        raise ImageCaptionPairingError(f"cannot read captions {captions_json}: {error}") from error
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ImageCaptionPairingError(
            f"{captions_json}: expected a JSON object {{\"<image id>\": \"<caption>\"}}")
    if not os.path.isdir(image_dir):
        raise ImageCaptionPairingError(f"image folder not found: {image_dir}")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(image_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in files:
                raise ImageCaptionPairingError(f"{image_dir}: two images share the id '{stem}': "
                                               f"{os.path.basename(files[stem])} and {name}")
            files[stem] = os.path.join(image_dir, name)
    no_caption = sorted(set(files) - set(captions))
    no_image = sorted(set(captions) - set(files))
    if no_caption or no_image:
        raise ImageCaptionPairingError(
            f"images in {image_dir} and captions in {captions_json} do not match one to one: "
            f"{len(no_caption)} images without a caption (e.g. {no_caption[:5]}), "
            f"{len(no_image)} captions without an image (e.g. {no_image[:5]})")
    ids = sorted(files)
    return ids, [files[i] for i in ids], [captions[i] for i in ids]


def clip_score_folder(image_dir: str, captions_json: str, model, processor, batch_size: int = 64,
                      device: str = "cpu", progress: bool = False) -> dict:
    """CLIP-S of a folder of images against {"<image id>": "<caption>"} (ids = file stems):
    {"mean": float, "per_image": float64 [N], "ids": N ids in the order of per_image}."""
    ids, paths, captions = match_images_to_captions(image_dir, captions_json)
    per_image = []
    for start in tqdm(range(0, len(ids), batch_size), desc=f"CLIP score {image_dir}",
                      unit="batch", disable=not progress):
        images = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as image:
                image.load()
                images.append(image)
        per_image.append(clip_score(images, captions[start:start + batch_size], model, processor,
                                    batch_size=batch_size, device=device)["per_image"])
    per_image = np.concatenate(per_image)
    return {"mean": float(per_image.mean()), "per_image": per_image, "ids": ids}
