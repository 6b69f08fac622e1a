"""A short toy fit with TensorBoard and with W&B (offline): one versioned run folder per run whatever the logger,
the full resolved config in the logger's hyperparameters, the held-out table, figures, grids and the sweep metric
``eval/overall_final`` in the logger, read back from the event files / the offline run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mtflow.cli import main
from mtflow.testing.fixtures import REPO_CONFIGS, torch_threads, write_config

SHORT_TOY = {
    "trainer": {"enable_progress_bar": False, "enable_model_summary": False},
    "model": {
        "max_iterations": 2,
        "rollout": {"group_size": 2, "num_steps": 2, "forward_batch_size": 8},
        "evaluation": {"num_steps": 2},
    },
    "data": {"init_args": {"num_train_chains": 8, "num_heldout_chains": 4, "batch_size": 2}},
    "heldout": {"num_chains": 4, "batch_size": 4},
    "image_logger": {"every_n_iterations": 1, "max_rows": 2},
    "checkpoint": {"every_n_iterations": 1},
}


def _fit(tmp_path: Path, logger: dict) -> Path:
    overlay = write_config(
        {**SHORT_TOY, "trainer": {**SHORT_TOY["trainer"], "logger": logger}}, tmp_path / "o.yaml"
    )
    with torch_threads(1):
        cli = main(["fit", "--config", str(REPO_CONFIGS / "toy.yaml"), "--config", str(overlay)])
    return cli.trainer._mtflow_run_dir


def _check_run_folder(run: Path) -> dict:
    for name in ("config.yaml", "status.json", "checkpoints/last.ckpt", "eval/before_after.json"):
        assert (run / name).is_file(), name
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["policy"]["init_args"]["pretrained"] == "mtflow-assets:toy/prior"
    return json.loads((run / "eval" / "before_after.json").read_text())


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.mark.slow
def test_tensorboard_runs_keep_their_folders_and_the_event_files_hold_config_table_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path / "tb"), "name": "toy"},
    }
    runs = [_fit(tmp_path, logger), _fit(tmp_path, logger)]
    assert [r.name for r in runs] == ["version_0", "version_1"] and runs[0].parent == runs[1].parent
    before_after = _check_run_folder(runs[1])

    events = EventAccumulator(str(runs[1]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    # the sweep metric, equal to the number written to disk
    overall = events.Scalars("eval/overall_final")
    assert overall[-1].value == pytest.approx(before_after["after"]["final_overall"], abs=1e-4)
    assert "eval/before/overall_final" in tags["scalars"] and "reward/mean" in tags["scalars"]
    # the figures and grids, pixel for pixel what the run folder holds
    curves = events.Images("eval/turn_curves")[-1]
    assert np.array_equal(
        _png(curves.encoded_image_string),
        np.asarray(Image.open(runs[1] / "eval/turn_curves.png").convert("RGB")),
    )
    chains = events.Images("eval/chains")[-1]
    assert np.array_equal(
        _png(chains.encoded_image_string), np.asarray(Image.open(runs[1] / "eval/chains.png").convert("RGB"))
    )
    rollout = events.Images("rollout")
    assert [e.step for e in rollout] == [1, 2]
    saved = np.asarray(Image.open(runs[1] / "images/rollout_iter000002.png").convert("RGB"))
    assert np.array_equal(_png(rollout[-1].encoded_image_string), saved)
    # the held-out table, as text
    text = events.Tensors("eval/before_after/text_summary")[-1].tensor_proto.string_val[0].decode()
    lines = text.splitlines()
    assert lines[0].startswith("| turn | C_k before | C_k after") and len(lines) == 2 + 3  # K = 3 turns
    # the hyperparameters: the whole resolved config, policy and judge included
    session = None
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            session = {k: v for k, v in data.session_start_info.hparams.items()}
    assert session is not None
    assert session["model/policy/init_args/pretrained"].string_value == "mtflow-assets:toy/prior"
    assert session["model/policy/init_args/lora_rank"].number_value == 8
    assert session["model/policy/init_args/resolution"].number_value == 32
    assert session["model/scorer/class_path"].string_value == "mtflow.toy.judge.ToyJudge"
    assert session["model/algorithm/class_path"].string_value == "mtflow.algorithms.GRPO"
    assert session["run_dir"].string_value == str(runs[1])


@pytest.mark.slow
def test_wandb_offline_runs_keep_their_folders_and_the_offline_run_holds_config_table_images(
    tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    save_dir = tmp_path / "wb"
    save_dir.mkdir()
    logger = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"save_dir": str(save_dir), "project": "toy", "offline": True},
    }
    import wandb

    runs = []
    for _ in range(2):
        runs.append(_fit(tmp_path, logger))
        wandb.finish()  # flush the offline run's files
    # trainer.log_dir is W&B's save_dir for both runs; the run folders are versioned all the same
    assert runs == [save_dir / "toy" / "version_0", save_dir / "toy" / "version_1"]
    before_after = _check_run_folder(runs[1])

    offline = sorted((save_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2
    config, history = _read_offline_run(next(offline[-1].glob("run-*.wandb")))
    model = config["model"]
    assert model["policy"]["init_args"]["pretrained"] == "mtflow-assets:toy/prior"
    assert model["policy"]["init_args"]["lora_rank"] == 8 and model["policy"]["init_args"]["resolution"] == 32
    assert model["scorer"]["class_path"] == "mtflow.toy.judge.ToyJudge"
    assert config["run_dir"] == str(runs[1])

    logged = {key: value for row in history for key, value in row.items()}
    assert logged["eval/overall_final"] == pytest.approx(before_after["after"]["final_overall"], abs=1e-6)
    assert "eval/before/overall_final" in logged and "reward/mean" in logged
    files = offline[-1] / "files"
    table = json.loads((files / logged["eval/before_after/path"]).read_text())
    assert table["columns"][:3] == ["turn", "C_k before", "C_k after"] and len(table["data"]) == 3
    after_c1 = before_after["after"]["conditions"]["model"]["cumulative_success"][0]["value"]
    assert table["data"][0][2] == pytest.approx(round(after_c1, 1))
    for key, on_disk in (("eval/turn_curves", "eval/turn_curves.png"), ("eval/chains", "eval/chains.png")):
        image = files / logged[f"{key}/filenames"][0]
        assert np.array_equal(
            np.asarray(Image.open(image).convert("RGB")),
            np.asarray(Image.open(runs[1] / on_disk).convert("RGB")),
        )


def _read_offline_run(path: Path) -> tuple[dict, list[dict]]:
    """An offline W&B run's config and history rows, read from its transaction log (``run-<id>.wandb``): a
    7-byte W&B header, then LevelDB log framing (32 KiB blocks of chunks: crc32, length, type full / first /
    middle / last) around ``wandb_internal_pb2.Record`` messages. wandb ships no Python reader any more."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending = 7, 32768, b""
    config: dict = {}
    history: list[dict] = []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        if record.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif record.WhichOneof("record_type") == "history":
            history.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            )
    return config, history
