"""The same calls on a dask.distributed cluster: the API with a Client, the CLI with --scheduler."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from synthetic_trace import Run

import analysis
from analysis.cli import main


def task_names(tasks) -> set[str]:
    """The names of the tasks a task stream saw (keys are names or (name, index...) tuples)."""
    keys = (task["key"] for task in tasks.data)
    return {(key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0] for key in keys}


@pytest.fixture(scope="module")
def cluster():
    # One in-process worker over TCP: a real scheduler and transport, cheap on two cores.
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        dashboard_address=None,
    ) as local:
        yield local


def test_reductions_and_comparisons_run_on_the_cluster(cluster, store):
    path, expected = store
    with Client(cluster) as client, get_task_stream(client) as tasks:
        ds = analysis.open_trace(path)
        mean = ds.txt2img.sel(span="cat").mean(["step", "layer"]).compute()
        sim = analysis.head_similarity(ds.img2txt.sel(span="mat"), metric="cosine").compute()
    ran = task_names(tasks)
    # The worker read the maps (open_trace names the reads of a token row's maps, which the
    # spans read, attnscope-<variable>-row) and reduced them.
    assert {"attnscope-txt2img-row", "attnscope-img2txt-row"} <= ran, ran
    assert any(name.startswith("mean") for name in ran), ran
    np.testing.assert_allclose(
        mean.values, expected["txt2img"][:, :, :, 1].mean(axis=(0, 1)), rtol=1e-6
    )
    vectors = np.moveaxis(expected["img2txt"][:, :, :, 2], 2, 0).reshape(3, -1).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    np.testing.assert_allclose(sim.values, vectors @ vectors.T / np.outer(norms, norms), rtol=1e-9)


def test_a_mean_over_the_runs_of_a_sweep_runs_on_the_cluster(cluster, make_store):
    cat = {"prompt": [0, 1, 2, 3, 4, 5], "cat": [1]}
    path, expected = make_store(Run(spans=cat, seed=1), Run(spans=cat, seed=2))
    with Client(cluster) as client, get_task_stream(client) as tasks:
        sweep = analysis.open_sweep(path)
        mean = sweep.txt2img.sel(span="cat").mean(["run", "step"]).compute()
    assert any(name.startswith("mean") for name in task_names(tasks))
    maps = np.stack([expected[run]["txt2img"][:, :, :, 1] for run in ("run-0000", "run-0001")])
    np.testing.assert_allclose(mean.values, maps.mean(axis=(0, 1)), rtol=1e-6)


def test_the_cli_computes_on_the_scheduler_it_is_given(cluster, store, tmp_path, capsys):
    path, _ = store
    out = tmp_path / "cluster.png"
    with Client(cluster) as watcher, get_task_stream(watcher) as tasks:
        status = main(
            [
                "heatmap",
                str(path),
                "--span",
                "cat",
                "-o",
                str(out),
                "--scheduler",
                cluster.scheduler_address,
            ]
        )
    assert status == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    assert any(name.startswith("mean") for name in task_names(tasks))


def test_an_unreachable_scheduler_is_an_error(store, tmp_path, capsys):
    path, _ = store
    argv = ["heatmap", str(path), "--span", "cat", "-o", str(tmp_path / "x.png")]
    status = main([*argv, "--scheduler", "tcp://127.0.0.1:9", "--scheduler-timeout", "0.5"])
    assert status == 2
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
