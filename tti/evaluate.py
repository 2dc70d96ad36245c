"""Metrics of an export: FID, CLIP score and caption accuracy -> metrics.json and a table.

    python -m tti.export --checkpoint results/shapes32_diffusion/0 --out-dir eval_data_run_0
    python -m tti.evaluate eval_data_run_0 [--metrics fid,clip,judge] [--device cuda]
        [--fid-resize clean|pytorch-fid] [--protocol pairs|coco-fid30k]

Reads what `tti.export` writes: <dir>/{gt,tti}/images/*.png with {gt,tti}/*_captions.json
(ids = file stems) and export_info.json (the Model column, the data root). Writes
<dir>/metrics.json with
    fid, fid_n, fid_resize         gt vs tti images (Inception-2015-12-05), resized to 299 the
                                   "clean" (default) or "pytorch-fid" way (tti/eval/metrics/fid.py)
    fid_protocol, fid_reference    tti/eval/protocols.py, default the export's own: "pairs"
                                   compares tti with gt; "coco-fid30k" with every val image
                                   as U-ViT prepares them
    clip_score_gt, clip_score_tti  clipscore's CLIP-S (ViT-B/32) of each folder vs its captions
    caption_accuracy_gt, caption_accuracy_tti
                                   the exact judge (shapes dataset only): per fact
                                   (colour/shape/size/relation), all-correct, seen/held-out
    n, model, and `<metric>_unavailable`: why a metric is missing (weights not installed,
    not a shapes dataset, not requested)
and prints a markdown table in the layout of the original README's results table.
A metric left out with --metrics keeps its value from an earlier metrics.json of the same images.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import tti.models  # noqa: F401  (registers the samplers whose names the table shows)
from tti.config.registry import all_samplers
from tti.data.shapes_folder import is_shapes_dataset
from tti.eval.export_folder import ExportError
from tti.eval.metrics import fid
from tti.eval.protocols import PROTOCOLS, ProtocolError, check_image_size, reference_stats
from tti.infra.atomic_file import write_json
from tti.infra.cli import check_at_least, run_cli
from tti.infra.threads import use_free_cpus

METRICS = ("fid", "clip", "judge")
RESULT_KEYS = {"fid": ("fid", "fid_n", "fid_resize", "fid_protocol", "fid_reference"),
               "clip": ("clip_score_gt", "clip_score_tti"),
               "judge": ("caption_accuracy_gt", "caption_accuracy_tti")}
UNAVAILABLE_KEY = {"fid": "fid_unavailable", "clip": "clip_score_unavailable",
                   "judge": "caption_accuracy_unavailable"}


def export_folders(eval_dir: str) -> dict:
    """{"gt": (image_dir, captions_json), "tti": (...), "ids": sorted ids, "gt_captions" and
    "tti_captions": {id: caption}, "paths": {"gt": [...], "tti": [...]} in id order} of an
    export; ExportError (a ValueError) if it is not a finished export or its parts disagree."""
    from tti.eval.metrics.clip_score import match_images_to_captions

    out = {"paths": {}}
    for kind in ("gt", "tti"):
        image_dir = os.path.join(eval_dir, kind, "images")
        captions_json = os.path.join(eval_dir, kind, f"{kind}_captions.json")
        if not os.path.isfile(captions_json):
            raise ExportError(f"{captions_json} not found: is {eval_dir} a finished "
                              f"`python -m tti.export` output?")
        ids, paths, captions = match_images_to_captions(image_dir, captions_json)
        out[kind] = (image_dir, captions_json)
        out["paths"][kind] = paths
        if kind == "gt":
            out["ids"] = ids
        elif ids != out["ids"]:
            raise ExportError(f"{eval_dir}: gt and tti hold different ids "
                              f"({len(out['ids'])} gt, {len(ids)} tti)")
        out[f"{kind}_captions"] = dict(zip(ids, captions))
    return out


def read_json(path: str) -> dict:
    """The JSON object in `path`; {} if there is no such file."""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def model_label(info: dict, eval_dir: str) -> str:
    """The Model column: image size, model (its registry label), encoder (frozen /
    fine-tuned), sampler and guidance where the model has samplers, step."""
    cfg = info.get("config")
    if not cfg:
        return os.path.basename(os.path.normpath(eval_dir))
    s, step = cfg["image_size"], info.get("checkpoint_step", "?")
    text = f"{cfg['text_encoder']} {'fine-tuned' if cfg['text_finetuned'] else 'frozen'}"
    model = cfg.get("label", cfg["model"])  # exports before the registry name the kind only
    if not cfg.get("samplers", cfg["model"] == "diffusion"):  # samples its prior: no options
        return f"{cfg['dataset']}: {s}x{s} {model} ({text}), step {step}"
    o = info.get("sampler_options", {})
    name = all_samplers().get(o.get("sampler"), str(o.get("sampler")))
    steps = cfg.get("model_config", {}).get("gaussian", {}).get("timesteps", cfg.get("timesteps", ""))
    sampler = f"DDPM {steps}".strip() if o.get("sampler") == "ddpm" else f"{name} {o.get('steps')}"
    guide = f", g={o['guidance']:g}" if "guidance" in o else ""
    return f"{cfg['dataset']}: {s}x{s} {model} ({text}), {sampler}{guide}, step {step}"


class _LazyImages:
    """A sized sequence of uint8 [H, W, 3] images read on iteration, with a tqdm bar."""

    def __init__(self, paths: list[str], desc: str, progress: bool):
        self.paths, self.desc, self.progress = paths, desc, progress

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        for path in tqdm(self.paths, desc=self.desc, unit="img", disable=not self.progress):
            yield fid.read_rgb(path)


def compute_fid(folders: dict, device: str, batch_size: int, cache_dir, progress: bool,
                resize: str, protocol=PROTOCOLS["pairs"], info: dict | None = None) -> dict:
    fid.inception_path()  # InceptionNotInstalledError (-> fid_unavailable) when it is missing
    n = len(folders["ids"])
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per side, the export has {n}")
    out = {"fid_n": n, "fid_resize": resize, "fid_protocol": protocol.name}
    if protocol.reference == "split":
        return {**out, **split_fid(folders, protocol, info or {}, device, batch_size, cache_dir,
                                   progress)}
    if progress:
        print(f"FID ({resize} resize): Inception features of 2 x {n} images (cached per "
              f"folder), then a 2048 x 2048 matrix square root")
    value = fid.fid_from_folders(folders["gt"][0], folders["tti"][0], batch_size=batch_size,
                                 device=device, cache_dir=cache_dir, progress=progress,
                                 resize=resize)
    return {"fid": value, **out, "fid_reference": f"the export's {n} gt images"}


def split_fid(folders: dict, protocol, info: dict, device: str, batch_size: int, cache_dir,
              progress: bool) -> dict:
    """FID of the tti images against the protocol's reference: every image of the val split
    the export drew from (export_info.json names it), prepared as the protocol says."""
    if not info.get("data_root") or not info.get("config"):
        raise ProtocolError(f"--protocol {protocol.name} needs export_info.json's data root, "
                            f"val split and image size: export with `python -m tti.export`")
    check_image_size(protocol, info["config"]["image_size"])
    split = info.get("val_split", "val2014")
    if progress:
        print(f"FID, {protocol.name} protocol ({protocol.resize} resize): {len(folders['ids'])} "
              f"generated images against every {split} image ({protocol.description})")
    mu, sigma, n_ref = reference_stats(protocol, info["data_root"], split, device, batch_size,
                                       cache_dir, progress=progress)
    generated = fid.folder_stats(folders["tti"][0], batch_size, device, cache_dir=cache_dir,
                                 progress=progress, resize=protocol.resize)
    return {"fid": fid.frechet_distance(*generated, mu, sigma),
            "fid_reference": f"all {n_ref} images of {split}, {protocol.image_size} px "
                             f"(integer centre crop, PIL Lanczos)"}


def compute_clip(folders: dict, clip_model: str, device: str, batch_size: int,
                 progress: bool) -> dict:
    from tti.eval.metrics.clip_score import clip_score_folder, load_clip

    loaded, reason = load_clip(clip_model, device)
    if loaded is None:
        raise RuntimeError(reason)
    return {f"clip_score_{kind}": clip_score_folder(*folders[kind], loaded.model, loaded.processor,
                                                    batch_size, device, progress)["mean"]
            for kind in ("gt", "tti")}


def compute_judge(folders: dict, data_root: str | None, progress: bool) -> dict:
    from tti.eval.metrics.judge import judge_batch

    if not data_root:
        raise RuntimeError("no data root known (no export_info.json); pass --data-root")
    if not is_shapes_dataset(data_root):
        raise RuntimeError(f"not the embedded shapes dataset (no held_out_pairs.json in "
                           f"{data_root}): the caption judge only reads shapes captions")
    out = {}
    for kind in ("gt", "tti"):
        captions = [folders[f"{kind}_captions"][i] for i in folders["ids"]]
        images = _LazyImages(folders["paths"][kind], f"judge {kind}", progress)
        out[f"caption_accuracy_{kind}"] = judge_batch(images, captions)
    return out


def evaluate(eval_dir: str, metrics=METRICS, device: str = "cpu", clip_model: str | None = None,
             data_root: str | None = None, batch_size: int = 50,
             fid_cache_dir: str | None = "default", progress: bool = True,
             fid_resize: str | None = None, protocol: str | None = None) -> dict:
    """Run the requested metrics (any of METRICS) on an export; write and return
    <eval_dir>/metrics.json. A metric that fails for a known reason (weights not installed, not
    a shapes dataset) gets `<name>_unavailable` instead. protocol: a key of PROTOCOLS, None =
    the export's own (pairs if it names none); fid_resize: None = the protocol's."""
    from tti.eval.metrics.clip_score import CLIP_NAME

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"evaluate: unknown metrics {sorted(unknown)}; choose from {METRICS}")
    folders = export_folders(eval_dir)
    info = read_json(os.path.join(eval_dir, "export_info.json"))
    chosen = PROTOCOLS[protocol or info.get("protocol", "pairs")]
    fid_resize = fid_resize or chosen.resize
    fid.check_resize(fid_resize)
    if chosen.reference == "split" and fid_resize != chosen.resize:
        raise ProtocolError(f"--protocol {chosen.name} uses the {chosen.resize} resize, not "
                            f"{fid_resize}: leave out --fid-resize")
    if info and info.get("status") != "complete":
        print(f"evaluate: warning: {eval_dir}/export_info.json says the export did not finish")
    data_root = data_root or info.get("data_root")
    cache_dir = fid.DEFAULT_CACHE_DIR if fid_cache_dir == "default" else fid_cache_dir
    # Changes when any exported image or caption changes (names, sizes, mtimes).
    paths = folders["paths"]
    key = f"{fid.image_set_key(paths['gt'] + paths['tti'])[:24]}-{len(folders['ids'])}"
    out_path = os.path.join(eval_dir, "metrics.json")
    previous = read_json(out_path)
    result = {"eval_dir": os.path.abspath(eval_dir), "model": model_label(info, eval_dir),
              "n": len(folders["ids"]), "images_key": key, "seconds": {}}
    runners = {
        "fid": lambda: compute_fid(folders, device, batch_size, cache_dir, progress, fid_resize,
                                   chosen, info),
        "clip": lambda: compute_clip(folders, clip_model or CLIP_NAME, device, batch_size, progress),
        "judge": lambda: compute_judge(folders, data_root, progress),
    }
    for name in METRICS:
        if name not in metrics:
            old_reason = previous.get(UNAVAILABLE_KEY[name], "")
            if previous.get("images_key") == key and not old_reason.startswith("not requested"):
                # Same images: keep what an earlier run measured (or why it could not).
                kept = RESULT_KEYS[name] + (UNAVAILABLE_KEY[name],)
                result.update({k: previous[k] for k in kept if k in previous})
                if name in previous.get("seconds", {}):
                    result["seconds"][name] = previous["seconds"][name]
            else:
                result[UNAVAILABLE_KEY[name]] = f"not requested (--metrics {','.join(metrics)})"
            continue
        start = time.perf_counter()
        try:
            result.update(runners[name]())
        except (RuntimeError, ValueError, OSError) as error:
            result[UNAVAILABLE_KEY[name]] = str(error) or type(error).__name__
        result["seconds"][name] = round(time.perf_counter() - start, 2)
    write_json(out_path, result, indent=1)
    return result


def _number(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The original README's results table (Model | FID | GT CLIP | TTI CLIP) plus the
    judge's all-correct accuracy (gt, tti, tti seen / held-out); n/a cells explained below."""
    acc_gt = result.get("caption_accuracy_gt") or {}
    acc_tti = result.get("caption_accuracy_tti") or {}
    value = result.get("fid")
    protocol = result.get("fid_protocol", "pairs")
    how = "" if protocol == "pairs" else f"{protocol} protocol, "
    cells = [result.get("model", "?"),
             f"{value:.3f} (n={result['fid_n']}, {how}{result.get('fid_resize', 'unknown')} resize)"
             if value is not None else "n/a",
             _number(result.get("clip_score_gt"), 4), _number(result.get("clip_score_tti"), 4),
             _number(acc_gt.get("all"), 3), _number(acc_tti.get("all"), 3),
             _number((acc_tti.get("seen") or {}).get("all"), 3),
             _number((acc_tti.get("held_out") or {}).get("all"), 3)]
    header = ["Model", "FID (↓)", "GT CLIP Score (↑)", "TTI CLIP Score (↑)",
              "GT caption acc. (↑)", "TTI caption acc. (↑)", "TTI seen", "TTI held-out"]
    lines = ["| " + " | ".join(header) + " |", "|" + " ----------- |" * len(header),
             "| " + " | ".join(cells) + " |", "",
             f"n = {result.get('n')} image pairs; caption accuracy = share of images the judge "
             f"finds fully correct (colour, shape, size, relation, no extra object). FID resize: "
             f"clean = clean-fid's antialiased bicubic; pytorch-fid = `python -m pytorch_fid`'s "
             f"bilinear (--fid-resize pytorch-fid), comparable to tables made with it. "
             f"FID reference: {result.get('fid_reference', 'the gt images')}."]
    for key in UNAVAILABLE_KEY.values():
        if key in result:
            lines.append(f"- {key}: {result[key]}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m tti.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("eval_dir", help="an export folder, e.g. eval_data_run_0")
    p.add_argument("--metrics", default=",".join(METRICS), help="comma-separated: fid,clip,judge")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clip-model", default=None,
                   help="CLIP folder or HF id in the local cache (default openai/clip-vit-base-patch32)")
    p.add_argument("--data-root", default=None, help="default: data_root in export_info.json")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--fid-resize", choices=fid.RESIZE_MODES, default=None,
                   help="how FID brings images to 299x299 (see tti/eval/metrics/fid.py; "
                        f"default: the protocol's, {fid.DEFAULT_RESIZE} for pairs)")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default=None,
                   help="which FID: pairs (tti vs gt) or coco-fid30k (the published COCO 256 "
                        "table's; tti/eval/protocols.py). Default: the export's own")
    p.add_argument("--fid-cache-dir", default="default",
                   help="where FID folder statistics are cached (default ~/.cache/tti/fid)")
    p.add_argument("--no-fid-cache", action="store_true")
    args = p.parse_args(argv)
    check_at_least(p, args, {"batch_size": 1})
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    bad = sorted(set(metrics) - set(METRICS))
    if bad:
        p.error(f"--metrics: unknown {bad}; choose from {','.join(METRICS)}")
    if not os.path.isdir(args.eval_dir):
        p.error(f"{args.eval_dir} is not a folder (run python -m tti.export first)")
    result = evaluate(args.eval_dir, metrics, device=args.device, clip_model=args.clip_model,
                      data_root=args.data_root, batch_size=args.batch_size,
                      fid_cache_dir=None if args.no_fid_cache else args.fid_cache_dir,
                      fid_resize=args.fid_resize, protocol=args.protocol)
    print(markdown_table(result))
    print(f"\nwrote {os.path.join(args.eval_dir, 'metrics.json')}")
    return result


if __name__ == "__main__":
    use_free_cpus()  # not in main(): in-process callers (tests) keep their own thread count
    run_cli(main)
