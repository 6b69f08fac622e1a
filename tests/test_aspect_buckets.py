"""Aspect-true conditioning: Kontext's buckets against FluxKontextPipeline's own resizing (both turns at noise 0
on a non-square source), square sources unchanged, one bucket per batch in ChainBatches (exact resume, whole
chains per rank) and in evaluation."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from mtflow.data.loader import ChainBatches, batches_by_size, bucket_batches
from mtflow.data.module import ManifestDataModule
from mtflow.data.records import EditChain
from mtflow.eval.evaluate import evaluate_chains
from mtflow.models.kontext import KontextPolicy
from mtflow.rollout import RolloutConfig, rollout, uint8_to_pil
from mtflow.testing.scorers import BrightnessScorer
from mtflow.testing.tiny_kontext import TinyKontextSpec, build_tiny_kontext

INSTRUCTIONS = ["make it red", "add a circle"]


def _source(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def deep_kontext_path(tmp_path_factory):
    """A tiny Kontext whose VAE downsamples 16x: at Kontext's own 1024 x 1024 area a source is ~1000 tokens, so the
    stock pipeline runs with its default reference resizing (``_auto_resize``) on a CPU."""
    spec = TinyKontextSpec(vae_block_out_channels=(4,) * 5, vae_norm_num_groups=2)
    return build_tiny_kontext(tmp_path_factory.mktemp("models") / "tiny-kontext-deep", spec)


def _kontext(path, resolution: int, **kwargs) -> KontextPolicy:
    return KontextPolicy(
        str(path), dtype="float32", resolution=resolution, max_sequence_length=32, lora_rank=4, **kwargs
    ).load()


def test_noise_free_turns_equal_the_pipeline_with_its_default_resizing(deep_kontext_path):
    policy = _kontext(deep_kontext_path, 1024)
    pipe = FluxKontextPipeline.from_pretrained(deep_kontext_path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    source = _source(150, 90)  # aspect 2 after the pipeline's flooring to 32 px: the 1456 x 720 bucket
    result = rollout(
        policy,
        [EditChain("c", source, INSTRUCTIONS)],
        RolloutConfig(group_size=1, num_steps=2),
        torch.Generator().manual_seed(0),
    )
    size = (1440, 704)  # 1456 x 720 floored to the packing multiple, as the pipeline floors it
    assert result.image_size == size and result.images.shape[-2:] == (704, 1440)
    # The pipeline's default output is a 1024 x 1024 square whatever the source; its reference is auto-resized to
    # the bucket. mtflow edits at the bucket, so the output size is given (max_area = its area keeps it as is).
    call = dict(guidance_scale=2.5, num_inference_steps=2, height=704, width=1440, max_area=704 * 1440)
    call.update(max_sequence_length=32)

    def stock(image, prompt, **kwargs):  # noise from a fresh generator (seed 0) unless latents are given
        runs = [
            pipe(
                image=image,
                prompt=prompt,
                **call,
                **kwargs,
                generator=torch.Generator().manual_seed(0),
                output_type=k,
            )
            for k in ("latent", "pt")
        ]
        return runs[0].images, (runs[1].images * 255).round()

    latents, pixels = stock(source, INSTRUCTIONS[0])
    torch.testing.assert_close(result.final_latents[:, 0], latents, atol=1e-5, rtol=0)
    assert (result.images[:, 0].float() - pixels).abs().max() <= 1
    gen = torch.Generator().manual_seed(0)
    policy.initial_noise(1, gen, size)
    start = policy.initial_noise(1, gen, size)
    latents, pixels = stock(uint8_to_pil(result.images[0, 0]), INSTRUCTIONS[1], latents=start)
    torch.testing.assert_close(result.final_latents[:, 1], latents, atol=1e-5, rtol=0)
    assert (result.images[:, 1].float() - pixels).abs().max() <= 1


def test_buckets_are_the_preferred_resolutions_scaled_and_squares_keep_the_resolution(
    tiny_kontext_path, deep_kontext_path
):
    deep = _kontext(deep_kontext_path, 1024)
    for width, height in PREFERRED_KONTEXT_RESOLUTIONS:  # at 1024: exactly the pipeline's (floored) buckets
        assert deep.edit_size((width * 3, height * 3)) == (width // 32 * 32, height // 32 * 32)
    for resolution in (32, 64, 512):
        policy = _kontext(tiny_kontext_path, resolution)
        for side in (resolution, 3 * resolution, 40):
            assert policy.edit_size((side, side)) == (resolution, resolution)
        landscape, portrait = policy.edit_size((150, 90)), policy.edit_size((90, 150))
        assert landscape == portrait[::-1] and landscape[0] > landscape[1]
    # the toy world's 32 x 32 images: exactly the old square path
    toy = _kontext(tiny_kontext_path, 32)
    square = toy.images_to_pixels([_source(32, 32)])
    assert square.shape == (1, 3, 32, 32) and toy.timestep_grid(4).sigmas.equal(
        toy.timestep_grid(4, (32, 32)).sigmas
    )


def test_a_rollout_refuses_chains_of_different_buckets(tiny_kontext_path):
    policy = _kontext(tiny_kontext_path, 32)
    chains = [EditChain("a", _source(48, 32), ["x"]), EditChain("b", _source(32, 48), ["y"])]
    with pytest.raises(ValueError, match=r"share one edit size, got \[\(24, 36\), \(36, 24\)\]"):
        rollout(policy, chains, RolloutConfig(group_size=2, num_steps=1))


class _Source:
    """Chain indices whose bucket is ``buckets[i]`` (sources are the indices themselves)."""

    def __init__(self, buckets):
        self.buckets = buckets

    def __len__(self):
        return len(self.buckets)

    def __getitem__(self, index):
        return index


def _epoch(loader: ChainBatches) -> list[list[int]]:
    """One pass, every batch marked consumed as the trainer does (the next pass is the next epoch)."""
    batches = []
    for batch in loader:
        batches.append(list(batch.chains))
        batch.mark_consumed()
    return batches


@pytest.mark.parametrize("world,batch_size", [(1, 1), (1, 2), (2, 1), (2, 3)])
def test_one_bucket_is_exactly_the_unbucketed_order(world, batch_size):
    source = _Source([0] * 23)
    for rank, (shuffle, pad) in itertools.product(range(world), [(True, False), (False, True)]):
        kwargs = dict(shuffle=shuffle, seed=5, rank=rank, world_size=world, drop_last=shuffle, pad=pad)
        plain = ChainBatches(source, batch_size, **kwargs)
        bucketed = ChainBatches(source, batch_size, **kwargs, bucket_of=source.buckets.__getitem__)
        assert len(plain) == len(bucketed) and _epoch(plain) == _epoch(bucketed)


def test_every_batch_holds_one_bucket_whole_chains_per_rank_and_resumes_exactly():
    buckets = [i % 3 for i in range(40)] + [3] * 2  # three big buckets and one too small for a batch
    source = _Source(buckets)
    world, batch_size = 2, 3
    loaders = [
        ChainBatches(source, batch_size, seed=7, rank=r, world_size=world, bucket_of=buckets.__getitem__)
        for r in range(world)
    ]
    assert (
        len(loaders[0]) == len(loaders[1]) == 6
    )  # 13 full batches of 3 (bucket 3 never fills one), dealt in pairs
    epochs = [[_epoch(loader) for loader in loaders] for _ in range(2)]
    for ranks in epochs:
        seen = []
        for step in zip(*ranks):
            for batch in step:
                assert len(batch) == batch_size and len({buckets[i] for i in batch}) == 1
            assert not set(step[0]) & set(step[1])  # a chain (a GRPO group) is on one rank only
            seen += [i for batch in step for i in batch]
        assert len(seen) == len(set(seen))  # no chain twice in an epoch
    assert epochs[0] != epochs[1]  # the next epoch is shuffled again
    # resume: consume 2 batches, save, restore into a new loader: the rest of the epoch is identical
    loader = ChainBatches(source, batch_size, seed=7, world_size=world, bucket_of=buckets.__getitem__)
    iterator = iter(loader)
    for _ in range(2):
        next(iterator).mark_consumed()
    state = loader.state_dict()
    restored = ChainBatches(source, batch_size, seed=7, world_size=world, bucket_of=buckets.__getitem__)
    restored.load_state_dict(state)
    assert [list(b.chains) for b in restored] == [list(b.chains) for b in iterator]


def test_evaluation_batches_cover_every_chain_equally_on_every_rank():
    buckets = [0, 1, 0, 2, 1, 0, 0]
    loaders = [
        ChainBatches(
            _Source(buckets),
            2,
            shuffle=False,
            rank=r,
            world_size=2,
            drop_last=False,
            pad=True,
            bucket_of=buckets.__getitem__,
        )
        for r in range(2)
    ]
    batches = [_epoch(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1])  # equal forward calls on every rank (FSDP)
    assert {i for rank in batches for batch in rank for i in batch} == set(range(len(buckets)))
    assert all(
        len({buckets[i] for i in batch}) == 1 and len(batch) == 2 for rank in batches for batch in rank
    )
    assert bucket_batches(range(5), 2, lambda i: 0, partial="fill", multiple=2) == [
        [0, 1],
        [2, 3],
        [4, 0],
        [1, 2],
    ]
    assert batches_by_size(range(6), 2, lambda i: i % 2) == [[0, 2], [4], [1, 3], [5]]


def test_the_data_module_buckets_by_the_policy_and_evaluation_by_bucket(tiny_kontext_path, tmp_path):
    import json

    policy = _kontext(tiny_kontext_path, 32)
    lines = []
    for i, (w, h) in enumerate([(48, 32), (32, 48), (48, 32), (32, 32), (32, 48), (48, 32)]):
        _source(w, h, seed=i).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"id": f"c{i}", "image": f"{i}.png", "instructions": ["make it red"]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    data = ManifestDataModule(str(tmp_path / "m.jsonl"), num_turns=1, batch_size=2, seed=0)
    data.trainer = SimpleNamespace(
        lightning_module=SimpleNamespace(policy=policy), global_rank=0, world_size=1
    )
    batches = [[c.chain_id for c in batch] for batch in data.train_dataloader()]
    sizes = {f"c{i}": policy.edit_size(data.sources["train"].image_size(i)) for i in range(6)}
    assert len(batches) == 2 and all(len({sizes[c] for c in batch}) == 1 for batch in batches)
    # held-out evaluation batches chains by bucket; each chain scores as it does alone
    chains = [data.sources["train"][i] for i in range(6)]
    kwargs = dict(conditions=["model"], num_steps=2, forward_batch_size=4, num_bootstrap=0)
    _, together = evaluate_chains(policy, BrightnessScorer(), chains, batch_size=3, **kwargs)
    for chain, row in zip(together["model"].chain_ids, together["model"].scores.instruction_following):
        _, alone = evaluate_chains(
            policy, BrightnessScorer(), [chains[int(chain[1:])]], batch_size=1, **kwargs
        )
        torch.testing.assert_close(row, alone["model"].scores.instruction_following[0], atol=1e-5, rtol=0)
