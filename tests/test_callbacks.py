"""The training-time image grid: which trajectories, images and scores it shows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from mtflow.data.records import EditChain
from mtflow.eval.report import chain_grid_captions, save_chain_grid
from mtflow.reward.base import ScoreBatch
from mtflow.rollout import Rollout, RolloutPreview
from mtflow.training.callbacks import RolloutImageLogger

NAN = float("nan")


def _rollout(num_chains: int = 2, group: int = 2, turns: int = 2, size: int = 8) -> Rollout:
    generator = torch.Generator().manual_seed(0)
    chains = [
        EditChain(
            chain_id=f"chain{b}",
            source=Image.new("RGB", (size, size)),
            instructions=[f"chain {b} turn {k + 1}" for k in range(turns)],
        )
        for b in range(num_chains)
    ]
    n = num_chains * group
    empty = torch.empty(0)
    return Rollout(
        chains=chains,
        group_size=group,
        text=None,
        text_index=torch.zeros(n, turns, dtype=torch.long),
        source_images=torch.randint(
            0, 256, (num_chains, 3, size, size), generator=generator, dtype=torch.uint8
        ),
        images=torch.randint(0, 256, (n, turns, 3, size, size), generator=generator, dtype=torch.uint8),
        reference_latents=empty,
        final_latents=empty,
        states=empty,
        next_states=empty,
        log_probs=empty,
        step_indices=empty,
        sigmas=empty,
        model_timesteps=empty,
        noise_level=0.7,
    )


def _scores(n: int, turns: int) -> ScoreBatch:
    instruction_following = 1.0 + torch.arange(n * turns, dtype=torch.float32).view(n, turns) / 4
    scored = torch.ones(n, turns, dtype=torch.bool)
    scored[1, 0] = False
    instruction_following[1, 0] = NAN
    return ScoreBatch(instruction_following, instruction_following.flip(1), scored)


def test_preview_keeps_the_first_rows_with_their_chain_instructions_and_scores():
    result = _rollout()
    scores = _scores(4, 2)
    preview = RolloutPreview.from_rollout(result, scores, rows=3)

    assert preview.num_trajectories == 4
    assert preview.item_ids == ["chain0/g0", "chain0/g1", "chain1/g0"]
    assert preview.chain_ids == ["chain0", "chain0", "chain1"]
    assert preview.instructions[2] == ["chain 1 turn 1", "chain 1 turn 2"]
    assert torch.equal(preview.source_images[1], result.source_images[0])
    assert torch.equal(preview.source_images[2], result.source_images[1])  # row 2 is chain 1's first member
    assert torch.equal(preview.images, result.images[:3])
    assert torch.equal(preview.scores.scored, scores.scored[:3])
    assert torch.equal(preview.scores.instruction_following[2], torch.tensor([2.0, 2.25]))

    items = preview.items()
    assert [item.item_id for item in items] == preview.item_ids
    assert np.array_equal(np.asarray(items[2].outputs[1]), result.images[2, 1].permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(items[2].source), result.source_images[1].permute(1, 2, 0).numpy())
    assert chain_grid_captions(items[2], preview.scores, 2, wrap_width=30, caption_lines=3)[1] == [
        "IF 2.00  CC 2.25",
        "1. chain 1 turn 1",
    ]
    assert (
        chain_grid_captions(items[1], preview.scores, 1, wrap_width=30, caption_lines=3)[1][0] == "unscored"
    )
    assert RolloutPreview.from_rollout(result).scores is None


def test_image_logger_saves_the_captioned_grid_of_the_scored_rollout(tmp_path):
    result = _rollout()
    preview = RolloutPreview.from_rollout(result, _scores(4, 2))
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, loggers=[]
    )
    logger = RolloutImageLogger(every_n_iterations=2, max_rows=3, cell_size=32)

    logger.on_train_batch_end(trainer, SimpleNamespace(last_rollout=preview, iteration=3), None, None, 0)
    assert not (tmp_path / "images").exists()  # iteration 3 is not a multiple of 2
    logger.on_train_batch_end(trainer, SimpleNamespace(last_rollout=preview, iteration=4), None, None, 0)
    saved = np.asarray(Image.open(tmp_path / "images" / "rollout_iter000004.png").convert("RGB"))

    scored, unscored = tmp_path / "scored.png", tmp_path / "unscored.png"
    save_chain_grid(scored, preview.items(), preview.scores, max_chains=3, cell_size=32)
    boxes = save_chain_grid(unscored, preview.items(), None, max_chains=3, cell_size=32)
    assert np.array_equal(saved, np.asarray(Image.open(scored).convert("RGB")))
    assert not np.array_equal(saved, np.asarray(Image.open(unscored).convert("RGB")))  # the scores are drawn
    assert {row for row, _ in boxes} == {0, 1, 2}  # max_rows trajectories
    left, top, right, bottom = boxes[(2, 2)]  # row 2, turn 2: trajectory 2's second output, magnified 4x
    expected = np.asarray(preview.items()[2].outputs[1].resize((32, 32), Image.NEAREST))
    assert (right - left, bottom - top) == (32, 32)
    assert np.array_equal(saved[top:bottom, left:right], expected)
