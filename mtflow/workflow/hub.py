"""Share a trained LoRA: a model card (``huggingface_hub.ModelCard``) and an upload with ``HfApi``
(``mtflow export --push_to_hub REPO``, ``--model_card_only``).

The card names the base model, the LoRA rank / alpha / targets, the adapter and iteration, holds the run's training
config, its held-out before/after table and chain grid, and the diffusers snippet that loads the file. The token
comes from the environment (``HF_TOKEN`` or ``token_env``), never from a file mtflow writes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from mtflow.export import LORA_FILENAME

CARD_FILE = "README.md"
GRID_FILE = "chains.png"
TAGS = ["mtflow", "lora", "flux-kontext", "image-editing", "multi-turn", "reinforcement-learning"]


def run_folder_of(ckpt_path: str | Path) -> Path | None:
    """The run folder of a checkpoint written by ``mtflow fit`` (``<run>/checkpoints/last.ckpt``), if it is one."""
    run = Path(ckpt_path).resolve().parent.parent
    return run if (run / "config.yaml").is_file() or (run / "status.json").is_file() else None


def _resolved_config(run: Path | None) -> str | None:
    if run is None or not (run / "config.yaml").is_file():
        return None
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    for key in ("ckpt_path", "weights_only", "config"):
        config.pop(key, None)
    return yaml.safe_dump(config, sort_keys=False).rstrip()


def _heldout_table(run: Path | None) -> str | None:
    for name in ("eval/before_after.md", "eval/report.md"):
        if run is not None and (run / name).is_file():
            return (run / name).read_text().strip()
    return None


def build_model_card(
    info: dict[str, Any], adapter: str, repo_id: str | None, run: Path | None, has_grid: bool
):
    """The model card (``huggingface_hub.ModelCard``) of an exported adapter.

    Args:
        info: the checkpoint's ``mtflow`` section (``pretrained``, ``lora``: rank / alpha / targets, ``iteration``).
        adapter: the exported adapter ("default" or "ema").
        repo_id: the Hub repository (for the loading snippet; None: a local folder).
        run: the run folder (config, held-out table), if known.
        has_grid: ``chains.png`` sits next to the card.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base = str(info.get("pretrained") or "black-forest-labs/FLUX.1-Kontext-dev")
    lora = info.get("lora") or {}
    hub_base = (
        base if "/" in base and not Path(base).exists() and not base.startswith("mtflow-assets:") else None
    )
    data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        pipeline_tag="image-to-image",
        tags=TAGS,
    )
    weights = repo_id or "path/to/folder"
    lines = [
        f"# {repo_id.split('/')[-1] if repo_id else 'mtflow LoRA'}",
        "",
        "A LoRA for FLUX.1-Kontext trained with mtflow by multi-turn "
        "reinforcement learning: K-turn edit chains rolled out on the model's own outputs, scored per turn by a VLM "
        "judge for instruction following and content consistency, so that a chain of edits survives.",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` |",
        f"| LoRA rank | {lora.get('rank')} |",
        f"| LoRA alpha | {lora.get('alpha')} |",
        f"| LoRA targets | {', '.join(f'`{t}`' for t in lora.get('targets', []))} |",
        f"| adapter | `{adapter}` |",
        f"| RL iterations | {info.get('iteration')} |",
        f"| file | `{LORA_FILENAME}` (alpha stored per module, as ComfyUI and diffusers expect) |",
        "",
        "## Use with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import FluxKontextPipeline",
        "from diffusers.utils import load_image",
        "",
        f'pipe = FluxKontextPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights("{weights}", weight_name="{LORA_FILENAME}")',
        'image = load_image("photo.png")',
        'for instruction in ["Add a red hat to the dog", "Make the background a beach"]:',
        "    image = pipe(image=image, prompt=instruction, guidance_scale=2.5).images[0]  # each turn edits the last",
        'image.save("edited.png")',
        "```",
    ]
    table = _heldout_table(run)
    if table:
        lines += ["", "## Held-out evaluation", "", table]
    if has_grid:
        lines += [
            "",
            "## Held-out chains",
            "",
            f"![source, then turn 1..K with the judge's IF / CC]({GRID_FILE})",
        ]
    config = _resolved_config(run)
    if config:
        lines += ["", "## Training config", "", "```yaml", config, "```"]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def write_card(
    folder: str | Path, info: dict[str, Any], adapter: str, repo_id: str | None, ckpt_path: str | Path
) -> Path:
    """Write ``README.md`` (and the run's chain grid as ``chains.png``) into ``folder``; returns the card path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = run_folder_of(ckpt_path)
    grid = run / "eval" / GRID_FILE if run is not None else None
    has_grid = grid is not None and grid.is_file()
    if has_grid:
        shutil.copyfile(grid, folder / GRID_FILE)
    card = build_model_card(info, adapter, repo_id, run, has_grid)
    card.save(folder / CARD_FILE)
    return folder / CARD_FILE


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    token_env: str = "HF_TOKEN",
    card_only: bool = False,
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (only the card and grid with ``card_only``) in one
    commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get(token_env) or None)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    patterns = [CARD_FILE, GRID_FILE] if card_only else [CARD_FILE, GRID_FILE, LORA_FILENAME]
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        allow_patterns=patterns,
        commit_message="mtflow: model card" if card_only else "mtflow: LoRA and model card",
    )
    return str(getattr(commit, "commit_url", commit))


def share_export(
    ckpt_path: str | Path,
    output_dir: str | Path,
    adapter: str,
    repo_id: str | None,
    model_card_only: bool,
    private: bool,
    token_env: str,
    policy: Any = None,
) -> Path:
    """What ``mtflow export --push_to_hub`` / ``--model_card_only`` add to the export: the card next to the LoRA
    file (in ``policy``'s layout, see ``mtflow.export.checkpoint_adapter``), then the upload. Returns the card's
    path."""
    from mtflow.export import checkpoint_adapter, save_lora

    tensors, info = checkpoint_adapter(ckpt_path, adapter, policy)
    if not model_card_only:
        save_lora(tensors, output_dir)
    card = write_card(output_dir, info, adapter, repo_id, ckpt_path)
    if repo_id is not None:
        print(f"pushed to {push_folder(output_dir, repo_id, private, token_env, card_only=model_card_only)}")
    return card
