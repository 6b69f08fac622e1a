"""Toy datasets: EditChain records with judge-ready metadata, single-turn pairs, tensor conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mtflow.data.records import EditChain, collate_chains
from mtflow.reward.base import ScoringItem
from mtflow.toy.data import (
    ToyChainDataset,
    ToyPairDataset,
    collate_toy_pairs,
    image_to_tensor,
    tensor_to_image,
)
from mtflow.toy.judge import ToyJudge
from mtflow.toy.world import Edit, Scene, ToyWorld


def test_chain_dataset_yields_edit_chains_the_judge_can_score():
    world = ToyWorld(num_turns=2)
    data = ToyChainDataset(world, split="heldout", num_chains=8)
    assert len(data) == 8
    chains = [data[i] for i in range(8)]
    assert all(isinstance(c, EditChain) and c.num_turns == 2 for c in chains)
    assert len({c.chain_id for c in chains}) == 8
    for c in chains:
        toy = json.loads(json.dumps(c.metadata))["toy"]  # JSON-serialisable
        scenes = [Scene.from_json(s) for s in toy["scenes"]]
        assert np.array_equal(np.asarray(c.source), np.asarray(world.render(scenes[0])))
        assert world.split_of(scenes[0]) == "heldout"
        assert c.edit_types == [e["type"] for e in toy["edits"]]
        assert [Edit.from_json(e).apply(s) for e, s in zip(toy["edits"], scenes)] == scenes[1:]
    # the trainer copies metadata into ScoringItem; ground-truth outputs then score 5 / 5
    items = [
        ScoringItem(f"{c.chain_id}/g0", c.chain_id, c.source,
                    [world.render(Scene.from_json(s)) for s in c.metadata["toy"]["scenes"][1:]],
                    c.instructions, c.metadata)
        for c in chains
    ]  # fmt: skip
    batch = ToyJudge().score(items)
    assert (batch.instruction_following == 5).all() and (batch.content_consistency == 5).all()
    with pytest.raises(IndexError):
        data[8]


def test_chain_dataset_is_reproducible_and_offset_gives_new_chains():
    a = ToyChainDataset(ToyWorld(seed=1), num_chains=4)
    b = ToyChainDataset(ToyWorld(seed=1), num_chains=4)
    c = ToyChainDataset(ToyWorld(seed=1), num_chains=4, offset=4)
    assert [a[i].metadata for i in range(4)] == [b[i].metadata for i in range(4)]
    assert {a[i].chain_id for i in range(4)}.isdisjoint({c[i].chain_id for i in range(4)})
    loader = DataLoader(a, batch_size=2, collate_fn=collate_chains)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(x, EditChain) for x in batches[0])


def test_pair_dataset_targets_are_the_edited_sources():
    world = ToyWorld()
    data = ToyPairDataset(world, num_pairs=50)
    types = set()
    for i in range(50):
        pair = data[i]
        toy = pair.metadata["toy"]
        before, after = (Scene.from_json(s) for s in toy["scenes"])
        assert world.split_of(before) == "train"
        assert np.array_equal(np.asarray(pair.source), np.asarray(world.render(before)))
        assert np.array_equal(np.asarray(pair.target), np.asarray(world.render(after)))
        assert Edit.from_json(toy["edits"][0]).apply(before) == after
        assert pair.instruction == toy["instructions"][0]
        types.add(pair.edit_type)
    assert len(types) == 6
    assert data[3].pair_id != ToyChainDataset(world, num_chains=4)[3].chain_id


def test_collate_pairs_and_tensor_round_trip():
    data = ToyPairDataset(num_pairs=6)
    batch = collate_toy_pairs([data[i] for i in range(6)])
    assert batch.source.shape == batch.target.shape == (6, 3, 32, 32)
    assert batch.source.dtype == torch.float32
    assert batch.source.min() >= -1 and batch.source.max() <= 1
    for i in range(6):
        assert np.array_equal(np.asarray(tensor_to_image(batch.source[i])), np.asarray(data[i].source))
    white = image_to_tensor(ToyWorld().render(Scene("white")))  # (245, 245, 245)
    assert torch.allclose(white, torch.full_like(white, 245 / 127.5 - 1))


def test_single_turn_training_chains_keep_three_turn_heldout_chains():
    """``train_num_turns=1``: the single-turn RL baseline trains on single edits of the same training split, and is
    evaluated on the same K-turn held-out chains as the multi-turn job."""
    from mtflow.toy.module import ToyDataModule

    single = ToyDataModule(num_train_chains=8, num_heldout_chains=4, train_num_turns=1)
    multi = ToyDataModule(num_train_chains=8, num_heldout_chains=4)
    single.setup("fit")
    multi.setup("fit")
    assert {single.sources["train"][i].num_turns for i in range(8)} == {1}
    assert {multi.sources["train"][i].num_turns for i in range(8)} == {3}
    for i in range(4):
        a, b = single.sources["val"][i], multi.sources["val"][i]
        assert a.chain_id == b.chain_id and a.instructions == b.instructions and a.num_turns == 3
    with pytest.raises(ValueError, match="train_num_turns"):
        ToyDataModule(train_num_turns=0)
