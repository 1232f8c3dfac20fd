"""`attnscope record`: the demo models, append/overwrite intent, prompt sweeps, clear errors."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from analysis.cli import main


def record(*args: str) -> int:
    return main(["record", "--demo", "--num-inference-steps", "2", *args])


def runs(path) -> dict[str, xr.Dataset]:
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    return {name: tree[name].to_dataset() for name in sorted(tree.children)}


def test_demo_record_writes_a_complete_run(tmp_path):
    out = tmp_path / "demo.zarr"
    assert record("--out", str(out), "--span", "cat", "--span", "first4=0:4") == 0
    ds = runs(out)["run-0000"]
    assert ds.attrs["status"] == "complete"
    assert ds.attrs["steps_complete"] == [0, 1]
    assert list(ds.attrs["spans"]) == ["prompt", "cat", "first4"]
    assert ds.attrs["spans"]["first4"] == [0, 1, 2, 3]
    assert not np.isnan(ds.txt2img.values).any()
    assert ds.image.shape == (128, 128, 3)


def test_the_progress_bar_shows_the_write_rate_and_backlog(tmp_path, capsys):
    assert record("--out", str(tmp_path / "demo.zarr"), "--num-inference-steps", "3") == 0
    bar = capsys.readouterr().err
    assert re.search(r"writing \d+ MB/s decoded, [0-2] steps? pending", bar), bar
    assert re.search(r"pending, generation waited \d+\.\d s", bar), bar
    said = re.search(r"recorded run-0000 into \S+ in (\S+) s, of which the generation waited "
                     r"(\S+) s for the writer \(\d+ MB/s decoded made durable\)", bar)  # fmt: skip
    assert said, bar
    assert 0 <= float(said[2]) <= float(said[1])


def test_a_generation_held_up_by_the_writer_is_told_what_writes_less(tmp_path, capsys, monkeypatch):
    from tracer.durable import StagedShards

    write = StagedShards.write

    def slow_disk(self, *args, **kwargs):
        time.sleep(3.0)
        write(self, *args, **kwargs)

    monkeypatch.setattr(StagedShards, "write", slow_disk)
    # One step in flight: the second step's first put() waits for the first step's write, and
    # close() for most of the second's (all but what the pipeline's own work after its last
    # step, decoding the image, took meanwhile: over a second on a loaded machine).
    assert record("--out", str(tmp_path / "slow.zarr"), "--max-pending-steps", "1") == 0
    said = capsys.readouterr().err
    waited = float(re.search(r"the generation waited (\S+) s for the writer", said)[1])
    assert waited >= 2.5, said
    assert "writes slower than the model computes: fewer --keepbits" in said
    assert "--estimate says whether the disk and the writer keep up" in said


def test_a_runs_fixed_cost_gets_no_hint(tmp_path, capsys):
    assert record("--out", str(tmp_path / "quick.zarr")) == 0
    said = capsys.readouterr().err
    assert "for the writer" in said and "writes slower than the model" not in said


def test_existing_store_needs_append_or_overwrite(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    assert record("--out", str(out)) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert record("--out", str(out)) == 2
    assert "already exists; pass --append" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert record("--out", str(out), "--append", "--prompt", "a dog") == 0
    assert list(runs(out)) == ["run-0000", "run-0001"]
    assert record("--out", str(out), "--overwrite", "--prompt", "a red chair") == 0
    assert [ds.attrs["prompt"] for ds in runs(out).values()] == ["a red chair"]


def test_prompt_sweep_resumes_skipping_complete_runs(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat on a chair\n# a comment\n\na red dog\n")
    out = tmp_path / "sweep.zarr"
    sweep = ("--out", str(out), "--prompts", str(prompts), "--seeds", "0,1", "--steps", "0")
    assert record(*sweep) == 0
    found = runs(out)
    assert [(ds.attrs["prompt"], ds.attrs["seed"]) for ds in found.values()] == [
        ("a cat on a chair", 0),
        ("a cat on a chair", 1),
        ("a red dog", 0),
        ("a red dog", 1),
    ]
    # A run that did not complete is recorded again; complete ones are skipped.
    zarr.open_group(out, path="run-0002", mode="r+").attrs["status"] = "failed: killed"
    assert record(*sweep) == 0
    assert "skipping 3 runs already complete" in capsys.readouterr().err
    found = runs(out)
    assert list(found) == [f"run-000{i}" for i in range(5)]
    assert found["run-0004"].attrs["prompt"] == "a red dog"
    assert found["run-0004"].attrs["seed"] == 0
    assert record(*sweep) == 0
    assert len(runs(out)) == 5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # diffusers' own, from Chroma's blocks
@pytest.mark.parametrize(
    ("family", "pipeline", "segments"),
    [
        ("sd3", "StableDiffusion3Pipeline", ["clip", "t5"]),
        ("chroma", "ChromaPipeline", ["prompt"]),
        ("qwen-image", "QwenImagePipeline", ["prompt"]),
        ("flux2", "Flux2KleinPipeline", ["prompt"]),
        ("flux2-dev", "Flux2Pipeline", ["prompt"]),
        ("sana", "SanaPipeline", ["prompt"]),
        ("z-image", "ZImagePipeline", ["prompt"]),
        ("lumina2", "Lumina2Pipeline", ["prompt"]),
        ("cogview4", "CogView4Pipeline", ["prompt"]),
        ("hidream", "HiDreamImagePipeline", ["t5", "llama", "llama_layer"]),
    ],
)
def test_each_family_demo_records_and_draws(tmp_path, family, pipeline, segments):
    out, png = tmp_path / f"{family}.zarr", tmp_path / "cat.png"
    argv = ["record", "--demo", family, "--num-inference-steps", "2", "--out", str(out)]
    assert main(argv) == 0
    ds = runs(out)["run-0000"]
    assert ds.attrs["status"] == "complete" and ds.attrs["pipeline"] == pipeline
    assert list(ds.attrs["segments"]) == segments
    assert main(["heatmap", str(out), "--span", "cat", "--out", str(png)]) == 0
    assert png.stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--demo", "sd3", "--backend", "diffsynth"), "diffsynth runs FLUX only"),
        (("--span", "zebra"), "'zebra' matches no word of the prompt"),
        (("--span", "x=5:900"), r"token range \(5, 900\) is out of range"),
        (("--heads", "9"), r"head 9 is out of range: head must be in 0\.\.3"),
        (("--entity", "a cat", "--entity-mask", "0,0,8,8"), "--entity needs --backend diffsynth"),
        (("--prompts", "/nonexistent/prompts.txt"), "can't read --prompts"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, message):
    out = tmp_path / "bad.zarr"
    assert record("--out", str(out), *args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("attnscope: error: record: ")
    assert re.search(message, err), err


def test_a_pipeline_that_is_not_flux_is_refused_before_anything_is_written(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    model = tmp_path / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(model)
    out = tmp_path / "never.zarr"
    assert main(["record", "--model", str(model), "--out", str(out), "--num-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("attnscope: error: record: attnscope can't trace a ")
    assert "DDPMPipeline; supported: diffusers (" in err and "diffsynth (" in err
    assert "diffusers (FLUX.1, Chroma)" in err and "diffusers (SD3, SD3.5)" in err
    assert not out.exists()


def test_a_non_native_attention_backend_is_refused_before_a_run_exists(tmp_path, capsys):
    from diffusers.models.attention_dispatch import attention_backend

    out = tmp_path / "flex.zarr"
    assert record("--out", str(out)) == 0
    with attention_backend("flex"):
        assert record("--out", str(out), "--append", "--prompt", "a dog") == 2
    err = capsys.readouterr().err
    assert "transformer_blocks.0 runs its attention through diffusers' 'flex' backend" in err
    assert "set_attention_backend('native')" in err and "Traceback" not in err
    assert list(runs(out)) == ["run-0000"]  # no failed run left behind


def test_diffsynth_demo_with_eligen_entities(tmp_path):
    out = tmp_path / "eligen.zarr"
    status = record(
        "--backend",
        "diffsynth",
        "--out",
        str(out),
        "--prompt",
        "a cat and a dog on a chair",
        "--entity",
        "kitten=a small cat",
        "--entity-mask",
        "0,0,64,128",
        "--entity",
        "a brown dog",
        "--entity-mask",
        "64,0,128,128",
    )
    assert status == 0
    ds = runs(out)["run-0000"]
    assert list(ds.entity.values) == ["kitten", "entity1"]
    assert list(ds.attrs["spans"])[:3] == ["kitten", "entity1", "prompt"]
    # The left half of a 128-pixel image: token columns 0..3 of 8.
    assert ds.entity_mask.sel(entity="kitten").values[:, :4].all()
    assert not ds.entity_mask.sel(entity="kitten").values[:, 4:].any()


def test_more_steps_in_flight_reach_the_writer(tmp_path, monkeypatch):
    from tracer.writer import TraceWriter

    taken = []
    init = TraceWriter.__init__

    def spy(self, *args, **kwargs):
        taken.append(kwargs["max_pending"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(TraceWriter, "__init__", spy)
    out = tmp_path / "deep.zarr"
    assert record("--out", str(out), "--num-inference-steps", "4", "--max-pending-steps", "3") == 0
    assert taken == [3]
    assert runs(out)["run-0000"].attrs["steps_complete"] == [0, 1, 2, 3]


def test_no_fsync_records_every_step_and_syncs_none(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "fsync", lambda descriptor: pytest.fail("--no-fsync synced"))
    out = tmp_path / "unsynced.zarr"
    assert record("--out", str(out), "--no-fsync") == 0
    ds = runs(out)["run-0000"]
    assert ds.attrs["status"] == "complete" and ds.attrs["steps_complete"] == [0, 1]
    assert not np.isnan(ds.txt2img.values).any()
