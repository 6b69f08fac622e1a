"""``mtflow runs ls|show|gallery`` on a real short toy run, and the gallery page opened in a real headless
Chromium: it loads without console errors, shows every logged chain with its scores, and its images load."""

from __future__ import annotations

import csv
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mtflow.cli import main
from mtflow.sweeps.status import RunStatus
from mtflow.testing.browser import chromium_executable, inspect_page
from mtflow.testing.fixtures import REPO_CONFIGS, torch_threads, write_config

OVERLAY = {
    "trainer": {
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "toy"}},
    },
    "model": {
        "max_iterations": 2,
        "rollout": {"group_size": 2, "num_steps": 2, "forward_batch_size": 8},
        "evaluation": {"num_steps": 2},
    },
    "data": {"init_args": {"num_train_chains": 8, "num_heldout_chains": 4, "batch_size": 2}},
    "heldout": {"num_chains": 4, "batch_size": 4},
    "image_logger": {"every_n_iterations": 1, "max_rows": 3},
    "checkpoint": {"every_n_iterations": 0},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A folder with one finished toy run (CSV logger) and one failed run."""
    root = tmp_path_factory.mktemp("runs")
    overlay = dict(OVERLAY, trainer={**OVERLAY["trainer"], "logger": {**OVERLAY["trainer"]["logger"], "init_args": {"save_dir": str(root), "name": "toy"}}})  # fmt: skip
    with torch_threads(1):
        main(
            [
                "fit",
                "--config",
                str(REPO_CONFIGS / "toy.yaml"),
                "--config",
                str(write_config(overlay, root / "o.yaml")),
            ]
        )
    RunStatus(status="failed", error="RuntimeError: judge unreachable", iteration=3).write(
        root / "other" / "version_0"
    )
    return root


class _Counter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.chains, self.scores, self.unscored, self.images = 0, 0, 0, []

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        self.chains += "chain" in classes
        self.scores += "score" in classes and "unscored" not in classes
        self.unscored += "unscored" in classes
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _expected(run: Path) -> tuple[int, int]:
    """Chains and scored turns the run logged (rollout iterations, held-out before and after)."""
    files = sorted((run / "images").glob("rollout_iter*.json"))
    files += [run / "eval" / "heldout_before.json", run / "eval" / "heldout_after.json"]
    chains = [c for f in files for c in json.loads(f.read_text())["chains"]]
    return len(chains), sum(t["if"] is not None for c in chains for t in c["turns"])


def test_ls_and_show_report_status_iteration_reward_and_held_out_numbers(runs, capsys):
    main(["runs", "ls", str(runs), "--json"])
    rows = {
        Path(r["run"]).relative_to(runs).as_posix(): r
        for r in map(json.loads, capsys.readouterr().out.splitlines())
    }
    assert set(rows) == {"toy/version_0", "other/version_0"}
    run = runs / "toy" / "version_0"
    with (run / "metrics.csv").open() as handle:
        rewards = [float(r["reward/mean"]) for r in csv.DictReader(handle) if r.get("reward/mean")]
    before_after = json.loads((run / "eval" / "before_after.json").read_text())
    toy = rows["toy/version_0"]
    assert (toy["status"], toy["iteration"], toy["algorithm"], toy["judge"]) == (
        "completed",
        2,
        "GRPO",
        "ToyJudge",
    )
    assert toy["last_reward"] == pytest.approx(rewards[-1])
    b, a = before_after["before"]["final_overall"], before_after["after"]["final_overall"]
    assert toy["eval"] == f"O_K {b:.1f} -> {a:.1f}"
    assert (rows["other/version_0"]["status"], rows["other/version_0"]["error"]) == (
        "failed",
        "RuntimeError: judge unreachable",
    )

    main(["runs", "ls", str(runs)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "status", "iteration"] and len(table) == 3
    main(["runs", "show", str(run)])
    shown = capsys.readouterr().out
    assert "pretrained: mtflow-assets:toy/prior" in shown and "| turn | C_k before |" in shown
    with pytest.raises(SystemExit, match="is not a run folder"):
        main(["runs", "show", str(runs)])


def test_gallery_page_shows_every_logged_chain_and_escapes_run_text(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "toy" / "version_0", run)
    first = run / "images" / "rollout_iter000001.json"
    data = json.loads(first.read_text())
    data["chains"][0]["turns"][0]["instruction"] = '<img src="x" onerror="alert(1)"> & <b>bold</b>'
    first.write_text(json.dumps(data))
    main(["runs", "gallery", str(run)])
    page = run / "gallery.html"
    counter = _Counter()
    counter.feed(page.read_text())
    chains, scored = _expected(run)
    assert (counter.chains, counter.scores) == (chains, scored) and chains == 2 * 3 + 4 + 4
    assert all((run / src).is_file() for src in counter.images)  # relative paths inside the run folder
    assert (
        "&lt;img src=&quot;x&quot; onerror=&quot;alert(1)&quot;&gt; &amp; &lt;b&gt;bold&lt;/b&gt;"
        in page.read_text()
    )
    assert (run / "gallery_metrics.png").is_file() and "eval/turn_curves.png" in counter.images


@pytest.mark.skipif(
    chromium_executable() is None, reason="no chromium binary (CI installs Debian's chromium)"
)
def test_gallery_in_a_real_headless_chromium(runs, tmp_path):
    pytest.importorskip("playwright")
    run = runs / "toy" / "version_0"
    main(["runs", "gallery", str(run)])
    page = run / "gallery.html"
    counter = _Counter()
    counter.feed(page.read_text())
    chains, scored = _expected(run)
    report = inspect_page(
        page,
        selectors={"chains": ".chain", "scores": ".score:not(.unscored)", "turn_images": ".chain img"},
        screenshot=tmp_path / "gallery.png",
    )
    assert (
        report["console_errors"] == [] and report["failed_requests"] == [] and report["broken_images"] == []
    )
    assert (report["chains"], report["scores"]) == (chains, scored)
    assert (
        report["num_images"] == len(counter.images) and report["turn_images"] == chains * 4
    )  # source + K = 3
    assert report["title"] == "mtflow run version_0"
    from PIL import Image

    shot = Image.open(tmp_path / "gallery.png")
    assert shot.width == 1280 and shot.height > 900  # the full page, longer than one screen
