"""The model boundary is closed: the trainer, rollout, evaluation, callbacks and FSDP2 code see only the
``EditPolicy`` protocol. With ``mtflow.models.kontext`` blocked from importing, a ``FlowRLModule`` around a second
backbone (``PixelFlowPolicy``, pixel space, no diffusers) trains, is evaluated and checkpoints through a real
Lightning ``Trainer``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from mtflow.models.base import EditPolicy
from mtflow.testing.pixel_policy import PixelFlowPolicy

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["mtflow.models.kontext"] = None  # any import of it now raises ImportError
    import lightning as L
    import torch
    from mtflow.algorithms import GRPO, NFT
    from mtflow.data.module import ManifestDataModule
    from mtflow.eval.evaluate import EvalConfig
    from mtflow.rollout import RolloutConfig
    from mtflow.testing.fixtures import write_random_manifest
    from mtflow.testing.pixel_policy import PixelFlowPolicy
    from mtflow.testing.scorers import BrightnessScorer
    from mtflow.training.callbacks import HeldOutEvaluation, IterationCheckpoint, RunStatusWriter
    from mtflow.training.distributed import shard_policy
    from mtflow.training.module import FlowRLModule

    root = sys.argv[1]
    manifest = write_random_manifest(root + "/data", num_chains=4, num_turns=2, size=16)
    out = {}
    for algorithm in (GRPO(noise_level=0.8), NFT(train_timesteps=2)):
        module = FlowRLModule(
            PixelFlowPolicy(resolution=16),
            BrightnessScorer(),
            algorithm=algorithm,
            rollout=RolloutConfig(group_size=2, num_steps=3, forward_batch_size=4),
            evaluation=EvalConfig(num_steps=2, conditions=["model", "base", "merged"], bootstrap=0),
            ema_decay=0.5,
            max_iterations=2,
        )
        data = ManifestDataModule(str(manifest), val_manifest=str(manifest), num_turns=2, batch_size=2, val_batch_size=2)
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, default_root_dir=root + "/" + algorithm.name,
            callbacks=[IterationCheckpoint(every_n_iterations=1), RunStatusWriter(), HeldOutEvaluation(num_chains=2, batch_size=2)],
        )
        trainer.fit(module, datamodule=data)
        lora_b = [p for n, p in module.policy.adapter_named_parameters() if "lora_B" in n]
        metrics = trainer.test(module, datamodule=data, verbose=False)[0]
        out[algorithm.name] = {
            "iteration": module.iteration,
            "lora_moved": any(float(p.abs().sum()) > 0 for p in lora_b),
            "adapters": module.adapters,
            "eval_keys": sorted(k for k in metrics if k.startswith("eval/")),
            "checkpoint": sorted(torch.load(root + "/" + algorithm.name + "/checkpoints/last.ckpt", weights_only=True)["mtflow"]["adapters"]),
        }
    out["kontext_imported"] = sys.modules.get("mtflow.models.kontext") is not None
    out["diffusers_pipelines_imported"] = any(m.startswith("diffusers.pipelines.flux") for m in sys.modules)
    print(json.dumps(out))
    """
)


def test_trainer_eval_and_fsdp_code_run_a_second_backbone_with_kontext_blocked(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["kontext_imported"] is False and result["diffusers_pipelines_imported"] is False
    for name, adapters in (("GRPO", ["default", "ema"]), ("NFT", ["default", "old", "ema"])):
        run = result[name]
        assert run["iteration"] == 2 and run["lora_moved"], run
        assert run["adapters"] == adapters and run["checkpoint"] == sorted(adapters)
        assert {"eval/overall_final", "eval/consistency_turn2"} <= set(run["eval_keys"])


def test_the_second_backbone_implements_the_protocol_as_jsonargparse_checks_it():
    """``model.policy.class_path`` is validated against ``EditPolicy`` by exact signatures."""
    from jsonargparse._typehints import implements_protocol

    from mtflow.models.kontext import KontextPolicy

    assert implements_protocol(PixelFlowPolicy, EditPolicy) and implements_protocol(KontextPolicy, EditPolicy)
    assert isinstance(PixelFlowPolicy().load(), EditPolicy)  # runtime_checkable: every member is there


def test_pixel_policy_latents_round_trip_exactly():
    import numpy as np
    import torch
    from PIL import Image

    policy = PixelFlowPolicy(resolution=16).load()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    pixels = policy.images_to_pixels([image])
    latents = policy.encode_reference(pixels)
    assert latents.shape == (1, 16, 48)
    assert torch.equal(policy.decode(latents)[0].permute(1, 2, 0), torch.from_numpy(np.asarray(image)))
