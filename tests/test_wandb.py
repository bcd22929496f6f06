"""W&B summary run and dashboard-as-code, with no network: the dashboard is built (and serialised) with sockets
blocked, the summary run is logged offline and read back from its local files."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest

from aurecog.runner import dashboard


@pytest.fixture
def no_network(monkeypatch):
    """Internet sockets refuse to connect (W&B's own service talks over a local Unix socket, which stays)."""
    connect = socket.socket.connect

    def guarded(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access in a test: {address}")
        return connect(self, address, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_dashboard_groups_runs_per_model_and_shows_tables_and_figures(no_network):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    view = dashboard.build_dashboard("synth", "someone", "aurecog", tasks=["au", "intensity"],
                                     figures=["au_heatmap", "claims_forest"])
    assert isinstance(view, ws.Workspace) and (view.entity, view.project) == ("someone", "aurecog")
    panels = [p for s in view.sections for p in s.panels]
    tables = {p.table_name for p in panels if isinstance(p, wr.WeavePanelSummaryTable)}
    assert tables == {"leaderboard", "claims"}
    media = [k for p in panels if isinstance(p, wr.MediaBrowser) for k in p.media_keys]
    assert media == ["au_heatmap", "claims_forest"]
    lines = [p for p in panels if isinstance(p, wr.LinePlot)]
    assert sorted(y for p in lines for y in p.y) == ["train/loss", "val/f1", "val/icc"]
    assert all(p.groupby == wr.Config("model.name") and p.groupby_rangefunc == "minmax" for p in lines)
    bars = [p for p in panels if isinstance(p, wr.BarPlot)]
    assert sorted(m for p in bars for m in p.metrics) == ["test/f1", "test/icc"]
    assert view.runset_settings.groupby == [ws.Config("model.name")]
    assert "dataset" in str(view.runset_settings.filters) and "synth" in str(view.runset_settings.filters)
    spec = view._to_model().model_dump_json()  # the JSON W&B would store: builds offline
    assert "leaderboard" in spec and "au_heatmap" in spec
    default = dashboard.build_dashboard("synth-fermix", "e", "p", tasks=["expression"])
    keys = [k for s in default.sections for p in s.panels if isinstance(p, wr.MediaBrowser) for k in p.media_keys]
    assert keys == ["expression_heatmap", "claims_forest"]


def _results(tmp_path, claims=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path / "results" / "synth"
    out.mkdir(parents=True)
    board = pd.DataFrame({"model": ["baseline", "cisnet"], "task": ["au", "au"], "f1": [0.548, 0.510],
                          "f1_ci_low": [0.50, 0.47], "f1_ci_high": [0.59, 0.55]})
    board.to_csv(out / "leaderboard.csv", index=False)
    (out / "leaderboard.md").write_text("# Leaderboard: synth\n")
    if claims:
        pd.DataFrame({"claim": ["CIS helps"], "model_a": ["cisnet"], "model_b": ["cisnet-resnet34-wo"],
                      "diff": [-0.4], "ci_low": [-2.0], "ci_high": [1.2], "verdict": ["inconclusive"]}
                     ).to_csv(out / "claims.csv", index=False)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.arange(4).reshape(2, 2))
    fig.savefig(out / "au_heatmap.png")
    plt.close(fig)
    return out


def _table(run_dir, key):
    files = sorted((run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json"))
    assert len(files) == 1, [p.name for p in (run_dir / "files").rglob("*")]
    return json.loads(files[0].read_text())


def test_summary_run_logs_leaderboard_claims_and_figures_offline(tmp_path, no_network, monkeypatch):
    out = _results(tmp_path)
    saved = []
    import wandb_workspaces.workspaces as ws

    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self))
    url = dashboard.log_summary_to_wandb("synth", out / "leaderboard.md", out / "leaderboard.csv", "offline")
    assert url is None and not saved  # the dashboard is saved to the project only when online
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    board = _table(runs[0], "leaderboard")
    assert board["columns"] == ["model", "task", "f1", "f1_ci_low", "f1_ci_high"]
    assert [r[0] for r in board["data"]] == ["baseline", "cisnet"] and board["data"][1][2] == pytest.approx(0.51)
    claims = _table(runs[0], "claims")
    assert claims["data"][0][claims["columns"].index("verdict")] == "inconclusive"
    images = list((runs[0] / "files" / "media" / "images").glob("au_heatmap_*.png"))
    assert len(images) == 1


def test_summary_run_without_claims_and_disabled_mode(tmp_path, no_network):
    out = _results(tmp_path, claims=False)
    assert dashboard.log_summary_to_wandb("synth", out / "leaderboard.md", out / "leaderboard.csv",
                                          "disabled") is None
    assert not (out / "wandb").exists()
    assert dashboard.summary_files(out)["claims"] is None
    dashboard.log_summary_to_wandb("synth", out / "leaderboard.md", out / "leaderboard.csv", "offline")
    run = next((out / "wandb").glob("offline-run-*"))
    assert not list((run / "files" / "media" / "table").glob("claims_*"))
    assert _table(run, "leaderboard")["data"]
