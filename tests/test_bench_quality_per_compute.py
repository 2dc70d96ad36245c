"""bench/quality_per_compute.py: its recipes are valid configs, and the table reads records."""
import json

from bench import quality_per_compute as qpc
from tti.config.load import load_config


def test_every_recipe_is_a_valid_config_with_its_own_run_folder():
    for name, sets in qpc.RECIPES.items():
        load_config(qpc.CONFIG, sets)
    assert len(set(qpc.RECIPES)) == len(qpc.RECIPES)


def test_the_table_has_a_row_per_recipe_with_means_and_ranges(tmp_path):
    path = tmp_path / "records.jsonl"
    base = {"gflop_per_image": 0.8685, "steps": 2900, "seen": 0.5, "held_out": 0.3, "colour": 0.9,
            "shape": 0.7, "size": 0.9, "relation": 0.5, "fid": 120.0}
    rows = [{**base, "recipe": "vp_unet", "seed": s, "all": a} for s, a in ((1, 0.4), (2, 0.5))]
    rows.append({**base, "recipe": "flow_unet", "seed": 1, "all": 0.6, "fid": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = qpc.table(path=str(path)).splitlines()
    assert lines[0].startswith("| recipe | seeds | GFLOP/img")
    assert lines[2].startswith("| vp_unet | 1,2 | 0.869 | 2900 | 0.450 (0.400-0.500) |")
    assert lines[3].startswith("| flow_unet | 1 | 0.869 | 2900 | 0.600 |") and "nan" in lines[3]


def test_the_screen_view_keeps_seed_one_and_the_seeds_view_three_seeds(tmp_path):
    path = tmp_path / "records.jsonl"
    base = {"gflop_per_image": 0.87, "steps": 2900, "all": 0.5, "seen": 0.5, "held_out": 0.3,
            "colour": 0.9, "shape": 0.7, "size": 0.9, "relation": 0.5, "fid": 120.0}
    rows = [{**base, "recipe": "vp_unet", "seed": s} for s in (1, 2, 3)]
    rows += [{**base, "recipe": "flow_unet", "seed": s} for s in (2, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    screen = qpc.table("screen", str(path)).splitlines()[2:]
    assert [line.split(" | ")[:2] for line in screen] == [["| vp_unet", "1"], ["| flow_unet", "1"]]
    seeds = qpc.table("seeds", str(path)).splitlines()[2:]
    assert len(seeds) == 1 and seeds[0].startswith("| vp_unet | 1,2,3 |")


def test_the_shipped_quickstart_is_the_studys_winning_recipe():
    shipped = load_config(qpc.CONFIG).to_dict()
    assert shipped == load_config(qpc.CONFIG, qpc.RECIPES["flow_shift2_unet"]).to_dict()
    assert shipped != load_config(qpc.CONFIG, qpc.RECIPES["vp_unet"]).to_dict()
